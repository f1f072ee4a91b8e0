//! What the shim takes from a task's OCI runtime spec: the VM's size (for a VM image, and
//! for an ordinary container's VM), the environment for the guest, the hostname, and
//! kestrel's annotations.

use oci_spec::runtime::Spec;

/// Annotation: guest memory in MiB (overrides the spec's memory limit).
pub const ANN_MEMORY: &str = "io.kestrel.vm.memory_mib";
/// Annotation: number of vCPUs (overrides the spec's CPU quota).
pub const ANN_CPUS: &str = "io.kestrel.vm.cpus";
/// Annotation: the guest's root device (default: detected from the disk).
pub const ANN_ROOT: &str = "io.kestrel.vm.root";
/// Annotation: extra kernel command-line arguments.
pub const ANN_CMDLINE: &str = "io.kestrel.vm.cmdline";
/// Annotation: seconds between a SIGTERM's Ctrl-Alt-Del and stopping the VM.
pub const ANN_GRACE: &str = "io.kestrel.vm.shutdown_grace_seconds";
/// Annotation: seconds a container's VM may take to boot until its agent answers.
pub const ANN_AGENT_TIMEOUT: &str = "io.kestrel.vm.agent_timeout_seconds";

/// Annotation: how many containers a pod's VM can hold at once (each takes a disk slot and
/// an IRQ line at boot; virtio-mmio has no hotplug).
pub const ANN_SLOTS: &str = "io.kestrel.vm.container_slots";
pub const DEFAULT_SLOTS: u64 = 8;
/// IRQ lines 5–23 minus the pod VM's net, vsock and rng devices.
pub const MAX_SLOTS: u64 = 16;

/// containerd's CRI annotations (`pkg/cri/annotations`).
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// What a task is to its shim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A task of its own (`ctr run`, nerdctl): its own VM.
    Lone,
    /// A CRI pod sandbox: the pod's VM.
    Sandbox,
    /// An app container of the pod whose sandbox task is `sandbox`.
    PodContainer { sandbox: String },
}

/// The task's role, from containerd's CRI annotations.
pub fn role(spec: &Spec) -> Role {
    let ann = spec.annotations().as_ref();
    let get = |k: &str| ann.and_then(|a| a.get(k)).map(String::as_str);
    match (get(CRI_CONTAINER_TYPE), get(CRI_SANDBOX_ID)) {
        (Some("sandbox"), _) => Role::Sandbox,
        (Some("container"), Some(sandbox)) if !sandbox.is_empty() => Role::PodContainer {
            sandbox: sandbox.to_string(),
        },
        _ => Role::Lone,
    }
}

/// The shim a task belongs to: its pod's sandbox id, or its own.
pub fn grouping(spec: &Spec, id: &str) -> String {
    match role(spec) {
        Role::PodContainer { sandbox } => sandbox,
        Role::Sandbox | Role::Lone => id.to_string(),
    }
}

/// Guest memory a container's VM has beyond the container's memory limit (kernel, agent).
pub const CONTAINER_VM_OVERHEAD_MIB: u64 = 128;
/// How long a container's VM may take to boot by default: well under a second on
/// hardware KVM, tens of seconds where guest kernel code is emulated (kvm_pvm).
pub const DEFAULT_AGENT_TIMEOUT_SECS: u64 = 300;

pub const DEFAULT_MEMORY_MIB: u64 = 128;
pub const DEFAULT_CPUS: u8 = 1;
pub const DEFAULT_GRACE_SECS: u64 = 30;
/// The smallest VM kestrel builds from a memory limit: below this a Linux guest does not boot.
pub const MIN_MEMORY_MIB: u64 = 64;

/// The VM a task asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub cpus: u8,
    pub memory_mib: u64,
    pub env: Vec<(String, String)>,
    pub hostname: String,
    pub root: Option<String>,
    pub extra_cmdline: Option<String>,
    pub grace_secs: u64,
}

/// Errors in the spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("annotation {key}={value:?} is not a valid number")]
    BadAnnotation { key: &'static str, value: String },
    #[error("environment entry {0:?} has no '='")]
    BadEnv(String),
}

fn annotation_number(spec: &Spec, key: &'static str) -> Result<Option<u64>, SpecError> {
    let Some(value) = spec.annotations().as_ref().and_then(|a| a.get(key)) else {
        return Ok(None);
    };
    value
        .trim()
        .parse::<u64>()
        .map(Some)
        .map_err(|_| SpecError::BadAnnotation {
            key,
            value: value.clone(),
        })
}

/// The VM of an ordinary container (run by the guest agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerVm {
    pub cpus: u8,
    pub memory_mib: u64,
    pub extra_cmdline: Option<String>,
    pub agent_timeout_secs: u64,
}

/// The VM for container `spec`: the annotations, else the container's CPU quota and its
/// memory limit plus [`CONTAINER_VM_OVERHEAD_MIB`] (the limit itself applies to the
/// container's cgroup in the guest).
pub fn container_vm(spec: &Spec) -> Result<ContainerVm, SpecError> {
    let (quota_cpus, limit_mib) = resource_hints(spec);
    let cpus = annotation_number(spec, ANN_CPUS)?
        .or(quota_cpus)
        .map_or(DEFAULT_CPUS, |n| u8::try_from(n).unwrap_or(u8::MAX));
    let memory_mib = match annotation_number(spec, ANN_MEMORY)? {
        Some(m) => m,
        None => CONTAINER_VM_OVERHEAD_MIB + limit_mib.unwrap_or(0),
    };
    Ok(ContainerVm {
        cpus,
        memory_mib,
        extra_cmdline: spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(ANN_CMDLINE))
            .cloned(),
        agent_timeout_secs: annotation_number(spec, ANN_AGENT_TIMEOUT)?
            .unwrap_or(DEFAULT_AGENT_TIMEOUT_SECS),
    })
}

/// The VM of a pod, from its sandbox spec: the `io.kestrel.vm.*` annotations (the pod's
/// annotations that containerd's `pod_annotations` lets through), else what kubelet sums
/// up for the pod (CRI's sandbox-cpu-quota/-period and sandbox-memory), plus
/// [`CONTAINER_VM_OVERHEAD_MIB`]; and its container slots.
pub fn pod_vm(spec: &Spec) -> Result<(ContainerVm, usize), SpecError> {
    let mut vm = container_vm(spec)?;
    let has = |k: &str| {
        spec.annotations()
            .as_ref()
            .is_some_and(|a| a.contains_key(k))
    };
    if !has(ANN_CPUS) {
        let quota = annotation_number(spec, CRI_SANDBOX_CPU_QUOTA)?.filter(|q| *q > 0);
        let period = annotation_number(spec, CRI_SANDBOX_CPU_PERIOD)?.filter(|p| *p > 0);
        if let (Some(q), Some(p)) = (quota, period) {
            vm.cpus = u8::try_from(q.div_ceil(p)).unwrap_or(u8::MAX);
        }
    }
    if !has(ANN_MEMORY) {
        if let Some(bytes) = annotation_number(spec, CRI_SANDBOX_MEMORY)?.filter(|m| *m > 0) {
            vm.memory_mib = CONTAINER_VM_OVERHEAD_MIB + (bytes >> 20);
        }
    }
    let slots = annotation_number(spec, ANN_SLOTS)?.unwrap_or(DEFAULT_SLOTS);
    if !(1..=MAX_SLOTS).contains(&slots) {
        return Err(SpecError::BadAnnotation {
            key: ANN_SLOTS,
            value: format!("{slots} (1 to {MAX_SLOTS})"),
        });
    }
    Ok((vm, slots as usize))
}

/// The CPU count a CPU quota asks for, and the memory limit in MiB.
fn resource_hints(spec: &Spec) -> (Option<u64>, Option<u64>) {
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let quota_cpus = resources.and_then(|r| r.cpu().as_ref()).and_then(|c| {
        let quota = u64::try_from(c.quota()?).ok().filter(|q| *q > 0)?;
        let period = c.period().filter(|p| *p > 0)?;
        Some(quota.div_ceil(period))
    });
    let limit_mib = resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .and_then(|l| u64::try_from(l).ok())
        .filter(|l| *l > 0)
        .map(|l| l >> 20);
    (quota_cpus, limit_mib)
}

/// Reads the VM's shape from `spec`; `id` is the fallback hostname.
pub fn vm_spec(spec: &Spec, id: &str) -> Result<VmSpec, SpecError> {
    let (quota_cpus, limit_mib) = resource_hints(spec);
    let limit_mib = limit_mib.map(|l| l.max(MIN_MEMORY_MIB));

    let cpus = annotation_number(spec, ANN_CPUS)?
        .or(quota_cpus)
        .map_or(DEFAULT_CPUS, |n| u8::try_from(n).unwrap_or(u8::MAX));
    let memory_mib = annotation_number(spec, ANN_MEMORY)?
        .or(limit_mib)
        .unwrap_or(DEFAULT_MEMORY_MIB);

    let mut env = Vec::new();
    for entry in spec
        .process()
        .as_ref()
        .and_then(|p| p.env().as_ref())
        .into_iter()
        .flatten()
    {
        let (k, v) = entry
            .split_once('=')
            .ok_or_else(|| SpecError::BadEnv(entry.clone()))?;
        env.push((k.to_string(), v.to_string()));
    }
    let annotation = |k: &str| spec.annotations().as_ref().and_then(|a| a.get(k)).cloned();
    Ok(VmSpec {
        cpus,
        memory_mib,
        env,
        hostname: host_name(
            spec.hostname()
                .as_deref()
                .filter(|h| !h.is_empty())
                .unwrap_or(id),
        ),
        root: annotation(ANN_ROOT),
        extra_cmdline: annotation(ANN_CMDLINE),
        grace_secs: annotation_number(spec, ANN_GRACE)?.unwrap_or(DEFAULT_GRACE_SECS),
    })
}

/// A valid RFC 1123 host name from `name` (a container id may hold `_` or be longer than
/// a label may be): invalid characters become `-`, labels are cut to 63 characters.
pub fn host_name(name: &str) -> String {
    let labels: Vec<String> = name
        .split('.')
        .map(|l| {
            let l: String = l
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .take(63)
                .collect();
            l.trim_matches('-').to_string()
        })
        .filter(|l| !l.is_empty())
        .collect();
    let h = labels.join(".");
    if h.is_empty() {
        "kestrel".to_string()
    } else {
        h.chars()
            .take(253)
            .collect::<String>()
            .trim_end_matches(['-', '.'])
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_without_limits() {
        let s = vm_spec(
            &spec(r#"{"ociVersion":"1.0.2","process":{"cwd":"/","user":{"uid":0,"gid":0},"env":["PATH=/bin","A=b=c"]}}"#),
            "vm1",
        )
        .unwrap();
        assert_eq!((s.cpus, s.memory_mib), (DEFAULT_CPUS, DEFAULT_MEMORY_MIB));
        assert_eq!(
            s.env,
            vec![("PATH".into(), "/bin".into()), ("A".into(), "b=c".into())]
        );
        assert_eq!(s.hostname, "vm1");
        assert_eq!(s.grace_secs, DEFAULT_GRACE_SECS);
    }

    #[test]
    fn sizes_from_limits_and_annotations() {
        let s = vm_spec(
            &spec(r#"{"ociVersion":"1.0.2","hostname":"web","linux":{"resources":{"cpu":{"quota":150000,"period":100000},"memory":{"limit":536870912}}}}"#),
            "x",
        )
        .unwrap();
        assert_eq!((s.cpus, s.memory_mib, s.hostname.as_str()), (2, 512, "web"));
        let s = vm_spec(
            &spec(r#"{"ociVersion":"1.0.2","annotations":{"io.kestrel.vm.cpus":"4","io.kestrel.vm.memory_mib":"1024","io.kestrel.vm.root":"/dev/vda2"},"linux":{"resources":{"memory":{"limit":1048576}}}}"#),
            "x",
        )
        .unwrap();
        assert_eq!(
            (s.cpus, s.memory_mib, s.root.as_deref()),
            (4, 1024, Some("/dev/vda2"))
        );
        // A tiny memory limit still gives a bootable VM.
        let s = vm_spec(
            &spec(r#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":1048576}}}}"#),
            "x",
        )
        .unwrap();
        assert_eq!(s.memory_mib, MIN_MEMORY_MIB);
    }

    #[test]
    fn container_vms_add_room_for_the_guest() {
        let v = container_vm(&spec(r#"{"ociVersion":"1.0.2"}"#)).unwrap();
        assert_eq!(
            (v.cpus, v.memory_mib, v.agent_timeout_secs),
            (1, CONTAINER_VM_OVERHEAD_MIB, DEFAULT_AGENT_TIMEOUT_SECS)
        );
        let v = container_vm(&spec(
            r#"{"ociVersion":"1.0.2","annotations":{"io.kestrel.vm.agent_timeout_seconds":"9"},"linux":{"resources":{"cpu":{"quota":200000,"period":100000},"memory":{"limit":268435456}}}}"#,
        ))
        .unwrap();
        assert_eq!(
            (v.cpus, v.memory_mib, v.agent_timeout_secs),
            (2, 256 + CONTAINER_VM_OVERHEAD_MIB, 9)
        );
        let v = container_vm(&spec(
            r#"{"ociVersion":"1.0.2","annotations":{"io.kestrel.vm.memory_mib":"512","io.kestrel.vm.cmdline":"loglevel=7"}}"#,
        ))
        .unwrap();
        assert_eq!(
            (v.memory_mib, v.extra_cmdline.as_deref()),
            (512, Some("loglevel=7"))
        );
        assert!(container_vm(&spec(
            r#"{"ociVersion":"1.0.2","annotations":{"io.kestrel.vm.agent_timeout_seconds":"soon"}}"#
        ))
        .is_err());
    }

    #[test]
    fn host_names_are_made_valid() {
        assert_eq!(host_name("vm1"), "vm1");
        assert_eq!(host_name("my_vm.example"), "my-vm.example");
        assert_eq!(host_name("_-_"), "kestrel");
        assert_eq!(host_name(&"a".repeat(100)).len(), 63);
    }

    #[test]
    fn bad_annotation_is_named() {
        let err = vm_spec(
            &spec(r#"{"ociVersion":"1.0.2","annotations":{"io.kestrel.vm.cpus":"many"}}"#),
            "x",
        )
        .unwrap_err();
        assert_eq!(
            err,
            SpecError::BadAnnotation {
                key: ANN_CPUS,
                value: "many".into()
            }
        );
    }
}

#[cfg(test)]
mod pod_tests {
    use super::*;

    fn with_annotations(pairs: &[(&str, &str)]) -> Spec {
        let ann: serde_json::Map<String, serde_json::Value> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "annotations": ann}))
            .unwrap()
    }

    #[test]
    fn roles_and_groupings_come_from_cri_annotations() {
        let lone = with_annotations(&[]);
        assert_eq!(role(&lone), Role::Lone);
        assert_eq!(grouping(&lone, "c1"), "c1");
        let sandbox = with_annotations(&[(CRI_CONTAINER_TYPE, "sandbox"), (CRI_SANDBOX_ID, "p1")]);
        assert_eq!(role(&sandbox), Role::Sandbox);
        assert_eq!(grouping(&sandbox, "p1"), "p1");
        let app = with_annotations(&[(CRI_CONTAINER_TYPE, "container"), (CRI_SANDBOX_ID, "p1")]);
        assert_eq!(
            role(&app),
            Role::PodContainer {
                sandbox: "p1".into()
            }
        );
        assert_eq!(grouping(&app, "c2"), "p1");
        let odd = with_annotations(&[(CRI_CONTAINER_TYPE, "container")]);
        assert_eq!(role(&odd), Role::Lone);
    }

    #[test]
    fn a_pod_vm_is_sized_from_kubelets_sums_or_kestrels_annotations() {
        let (vm, slots) = pod_vm(&with_annotations(&[])).unwrap();
        assert_eq!(
            (vm.cpus, vm.memory_mib, slots),
            (DEFAULT_CPUS, CONTAINER_VM_OVERHEAD_MIB, 8)
        );
        let (vm, _) = pod_vm(&with_annotations(&[
            (CRI_SANDBOX_CPU_QUOTA, "250000"),
            (CRI_SANDBOX_CPU_PERIOD, "100000"),
            (CRI_SANDBOX_MEMORY, "268435456"),
        ]))
        .unwrap();
        assert_eq!(
            (vm.cpus, vm.memory_mib),
            (3, CONTAINER_VM_OVERHEAD_MIB + 256)
        );
        let (vm, slots) = pod_vm(&with_annotations(&[
            (CRI_SANDBOX_MEMORY, "268435456"),
            (ANN_MEMORY, "1024"),
            (ANN_CPUS, "2"),
            (ANN_SLOTS, "3"),
        ]))
        .unwrap();
        assert_eq!((vm.cpus, vm.memory_mib, slots), (2, 1024, 3));
        for bad in ["0", "17", "many"] {
            let err = pod_vm(&with_annotations(&[(ANN_SLOTS, bad)])).unwrap_err();
            assert!(
                matches!(err, SpecError::BadAnnotation { key: ANN_SLOTS, .. }),
                "{bad}"
            );
        }
    }
}
