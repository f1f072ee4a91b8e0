//! The real [`Guest`]: containers of this shim process, each either a VM image (the VM is
//! its process, [`crate::vm_image`]) or an ordinary container run by the guest agent in the
//! shim's VM ([`crate::agent`]).
//!
//! Create mounts the rootfs containerd handed over, and on the blocking pool decides what
//! the image is (`/disk/*` makes it a VM image) and prepares it: the VM image's base,
//! overlay and seed, or the container's root disk ([`crate::rootfs`]) and the copies of its
//! bind-mounted host files. A lone task's VM lives as long as the task; a CRI pod's VM is
//! booted by its first container and lives as long as the sandbox task ([`crate::pod`]).
//! No std lock is held across a conversion or a boot.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use containerd_shim::protos::api::ProcessInfo;
use containerd_shim::protos::events::task::TaskOOM;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::ttrpc::Code;
use devices::disk::{DiskBackend, EmptyDisk};
use devices::image::convert::Limits;
use kestrel_agent_protocol::pod::PodConfig;
use kestrel_agent_protocol::{BlockDevice, GuestEvent};
use sha2::{Digest, Sha256};
use vmm::{DiskConfig, NetConfig, TapSource};

use crate::agent::{AgentVm, BootSpec};
use crate::cgroups;
use crate::events::{Event, EventTx};
use crate::forward::PortForwarder;
use crate::guest::{Guest, GuestError, NewContainer, NewExec};
use crate::hooks;
use crate::netns::{self, NetnsThread};
use crate::pod::{self, PodPlan, PodVm, Sandbox};
use crate::podnet;
use crate::rootfs::{self, PreparedRootfs};
use crate::spec;
use crate::vm_image::{self, ImageError, PodSeed, StateDirs, VmImageTask};
use crate::volumes::{self, HostBlockDevice, HostCopy};

/// Runs `f` on the blocking pool; its failure is "cannot `what`" with `code` (a task of the
/// pool that died is INTERNAL).
async fn blocking<T, E>(
    what: &str,
    code: Code,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, GuestError>
where
    T: Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| host_err(what, Code::INTERNAL)(Box::new(e)))?
        .map_err(|e| GuestError::host(what, code, e))
}

/// Starts a thread in the network namespace at `path` (a new one for `None`).
async fn start_netns(path: Option<PathBuf>) -> Result<NetnsThread, GuestError> {
    blocking("set up the network namespace", Code::INTERNAL, move || {
        NetnsThread::start(path.as_deref())
    })
    .await
}

/// The host file the spec bind-mounts at `/etc/resolv.conf` (CRI's, for the pod).
fn resolv_conf_source(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    spec.mounts()
        .iter()
        .flatten()
        .find(|m| m.destination() == Path::new("/etc/resolv.conf"))
        .and_then(|m| m.source().clone())
}

/// Where the shim keeps its VM's sockets.
pub const RUN_DIR: &str = "/run/kestrel/s";

enum Kind {
    VmImage(Arc<VmImageTask>),
    /// A container the guest agent runs. `owns_vm`: a lone container, whose VM ends with
    /// it; a pod's containers leave the VM to the sandbox.
    Container {
        vm: Arc<AgentVm>,
        owns_vm: bool,
    },
    /// A pod's sandbox task (no pause process runs; see [`crate::pod`]).
    Sandbox(Arc<Sandbox>),
}

struct Entry {
    kind: Kind,
    /// For the spec's hooks.
    spec: Arc<oci_spec::runtime::Spec>,
    bundle: String,
    pid: u32,
    /// The host thread in the container's network namespace, whose tid the hooks get as
    /// the container's pid (a pod's: the sandbox task's pid).
    netns: Option<Arc<NetnsThread>>,
    /// The pod of a pod's container.
    pod: Option<Arc<Sandbox>>,
}

/// What a container brings into the VM.
struct ContainerParts {
    root: PreparedRootfs,
    copies: Vec<HostCopy>,
    blocks: Vec<HostBlockDevice>,
}

enum Prepared {
    VmImage(VmImageTask),
    Container(ContainerParts),
}

pub struct Host {
    dirs: StateDirs,
    /// The model's ordered event channel (for TaskOOM, which only the guest knows of).
    events: EventTx,
    namespace: String,
    /// The directory of this shim's VM sockets.
    run_dir: PathBuf,
    entries: Mutex<HashMap<String, Entry>>,
    /// A container's VM is being booted.
    booting: AtomicBool,
    /// The cancellation flags of the creates whose images are being prepared.
    creating: Mutex<HashMap<String, Arc<AtomicBool>>>,
}

/// The run directory of the shim `shim_id` in `namespace` (short: socket paths are limited).
pub fn run_dir(namespace: &str, shim_id: &str) -> PathBuf {
    let h = Sha256::digest(format!("{namespace}/{shim_id}").as_bytes());
    let hex: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Path::new(RUN_DIR).join(hex)
}

/// What would refuse a lone container's VM, checked before its rootfs is built: the
/// spec's sizes and annotations against this host, the guest kernel and initramfs, the
/// seccomp level.
fn check_container_vm(spec: &oci_spec::runtime::Spec) -> Result<(), GuestError> {
    let vm = spec::container_vm(spec)
        .map_err(|e| GuestError::host("size the VM from the spec", Code::INVALID_ARGUMENT, e))?;
    check_agent_vm(&vm)
}

/// What would refuse an agent VM of size `vm` (a container's or a pod's) on this host.
fn check_agent_vm(vm: &spec::ContainerVm) -> Result<(), GuestError> {
    let asset = |name| {
        vmm::assets::default_asset(name).map_err(|e| {
            GuestError::host(
                "find the guest kernel and initramfs",
                Code::FAILED_PRECONDITION,
                e,
            )
        })
    };
    let (kernel, initrd) = (asset(vmm::assets::KERNEL)?, asset(vmm::assets::INITRD)?);
    vmm::config::check_host(u64::from(vm.cpus), vm.memory_mib, &kernel, Some(&initrd))
        .map_err(|e| GuestError::host("size the VM", Code::INVALID_ARGUMENT, e))?;
    seccomp_level()?;
    Ok(())
}

/// The seccomp level of the VMs this shim starts (`KESTREL_SECCOMP`).
pub fn seccomp_level() -> Result<vmm::SeccompLevel, GuestError> {
    vmm::SeccompLevel::from_env().map_err(|e| {
        GuestError::host(
            format!(
                "confine the VM ({} in the shim's environment)",
                vmm::seccomp::ENV
            ),
            Code::FAILED_PRECONDITION,
            e,
        )
    })
}

/// Logs how long a phase of a task took, as `timing: task=<id> <phase>_ms=<ms>` (the
/// `ctr-container` bench reads these lines from containerd's log).
pub fn log_timing(id: &str, phase: &str, since: Instant) {
    log::info!(
        "timing: task={id} {phase}_ms={:.3}",
        since.elapsed().as_secs_f64() * 1000.0
    );
}

fn host_err(
    what: impl Into<String>,
    code: Code,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> GuestError {
    let what = what.into();
    move |source| GuestError::Host { what, code, source }
}

/// Where the container's files are: containerd's mounts go to `<bundle>/rootfs`; without
/// mounts the spec's `root.path` (relative to the bundle) already holds them.
fn rootfs_tree(c: &NewContainer, mounted: bool) -> PathBuf {
    let bundle = Path::new(&c.bundle);
    match c.spec.root().as_ref().map(|r| r.path()) {
        Some(p) if !mounted => bundle.join(p),
        _ => bundle.join("rootfs"),
    }
}

impl Host {
    pub fn new(dirs: StateDirs, namespace: String, shim_id: &str, events: EventTx) -> Self {
        Host {
            run_dir: run_dir(&namespace, shim_id),
            dirs,
            events,
            namespace,
            entries: Mutex::new(HashMap::new()),
            booting: AtomicBool::new(false),
            creating: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn vm_image(&self, id: &str) -> Option<Arc<VmImageTask>> {
        match self.entries().get(id).map(|e| &e.kind) {
            Some(Kind::VmImage(t)) => Some(t.clone()),
            _ => None,
        }
    }

    fn agent(&self, id: &str) -> Result<Arc<AgentVm>, GuestError> {
        match self.entries().get(id).map(|e| &e.kind) {
            Some(Kind::Container { vm, .. }) => Ok(vm.clone()),
            Some(Kind::VmImage(_)) => Err(GuestError::Unsupported("this call", "VM-image tasks")),
            Some(Kind::Sandbox(_)) => Err(GuestError::Unsupported(
                "this call",
                "a pod's sandbox task (the VM; its containers have processes)",
            )),
            None => Err(GuestError::Invalid(format!("task {id} is not prepared"))),
        }
    }

    fn sandbox(&self, id: &str) -> Option<Arc<Sandbox>> {
        match self.entries().get(id).map(|e| &e.kind) {
            Some(Kind::Sandbox(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// Runs the hooks of `stage` for `id`; only createRuntime failures are errors.
    async fn hooks(&self, stage: hooks::Stage, id: &str) -> Result<(), GuestError> {
        let Some((spec, bundle, pid)) = self.entries().get(id).map(|e| {
            let pid = e.netns.as_ref().map_or(e.pid, |t| t.tid());
            (e.spec.clone(), e.bundle.clone(), pid)
        }) else {
            return Ok(());
        };
        match hooks::run(stage, &spec, id, pid, &bundle).await {
            Ok(()) => Ok(()),
            Err(e) if stage == hooks::Stage::CreateRuntime => Err(GuestError::host(
                "run the spec's hooks",
                Code::FAILED_PRECONDITION,
                e,
            )),
            Err(e) => {
                log::warn!("task {id}: {}", vmm::error_chain(&e));
                Ok(())
            }
        }
    }

    fn insert(&self, c: &NewContainer, kind: Kind, pid: u32, netns: Option<Arc<NetnsThread>>) {
        self.entries().insert(
            c.id.clone(),
            Entry {
                kind,
                spec: Arc::new(c.spec.clone()),
                bundle: c.bundle.clone(),
                pid,
                netns,
                pod: None,
            },
        );
    }

    /// Gives lone container `id` the network namespace its spec asks for (see
    /// [`crate::netns`]).
    async fn enter_netns(
        &self,
        id: &str,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<(), GuestError> {
        let Some(path) = netns::requested(spec) else {
            return Ok(());
        };
        let thread = start_netns(path).await?;
        if let Some(e) = self.entries().get_mut(id) {
            e.netns = Some(Arc::new(thread));
        }
        Ok(())
    }

    /// Mounts the rootfs, prepares the container on the blocking pool, unmounts. A VM
    /// image in a pod gets `pod`'s hostname and network in its seed, and the pod's volumes.
    /// The image conversion it may start stops at [`vm_image::convert_timeout`], or
    /// when containerd deletes or kills the task meanwhile ([`Guest::cancel_create`]).
    async fn prepare(
        &self,
        c: &NewContainer,
        pod: Option<PodSeed>,
    ) -> Result<Prepared, GuestError> {
        let since = Instant::now();
        let cancel = Arc::new(AtomicBool::new(false));
        self.creating().insert(c.id.clone(), cancel.clone());
        let limits = Limits {
            timeout: Some(vm_image::convert_timeout()),
            cancel: Some(cancel),
        };
        let prepared = self.prepare_in(c, pod, limits).await;
        self.creating().remove(&c.id);
        log_timing(&c.id, "prepare", since);
        prepared
    }

    fn creating(&self) -> MutexGuard<'_, HashMap<String, Arc<AtomicBool>>> {
        self.creating.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn prepare_in(
        &self,
        c: &NewContainer,
        pod: Option<PodSeed>,
        limits: Limits,
    ) -> Result<Prepared, GuestError> {
        let mounted = !c.rootfs.is_empty();
        let tree = rootfs_tree(c, mounted);
        if mounted {
            tokio::fs::create_dir_all(&tree).await.map_err(|e| {
                host_err(format!("create {}", tree.display()), Code::INTERNAL)(Box::new(e))
            })?;
            for m in &c.rootfs {
                containerd_shim::asynchronous::util::mount_rootfs(m, &tree)
                    .await
                    .map_err(|e| {
                        host_err(
                            format!("mount the rootfs at {}", tree.display()),
                            Code::INTERNAL,
                        )(Box::new(e))
                    })?;
            }
        }
        let (dirs, ns, c2) = (self.dirs.clone(), self.namespace.clone(), c.clone());
        let prepared = tokio::task::spawn_blocking(move || {
            let result = match vm_image::find_disk(&tree) {
                Ok(disk) => {
                    let pod = pod.map(|mut p| {
                        p.user_data = pod::write_files(&volumes::copy_bind_sources(&c2.spec));
                        p
                    });
                    vm_image::prepare_task(&dirs, &ns, &c2, &disk, pod.as_ref(), &limits)
                        .map(Prepared::VmImage)
                }
                // A lone container boots a VM of its own: what would refuse it is checked
                // before its rootfs is built.
                Err(ImageError::NoDisk) => (if pod.is_none() {
                    check_container_vm(&c2.spec)
                } else {
                    Ok(())
                })
                .and_then(|()| {
                    volumes::open_block_devices(&c2.spec).map_err(|e| {
                        GuestError::host(
                            "open the spec's block devices",
                            Code::FAILED_PRECONDITION,
                            e,
                        )
                    })
                })
                .and_then(|blocks| {
                    let root =
                        rootfs::prepare(&dirs, &c2.rootfs, &tree, &ns, &c2.id).map_err(|e| {
                            GuestError::host(
                                "prepare the container's root file system",
                                Code::INTERNAL,
                                e,
                            )
                        })?;
                    Ok(Prepared::Container(ContainerParts {
                        root,
                        copies: volumes::copy_bind_sources(&c2.spec),
                        blocks,
                    }))
                }),
                Err(e) => Err(GuestError::host("read the image", e.code(), e)),
            };
            if mounted {
                // The image lives in kestrel's cache now; the mount is no longer needed.
                if let Err(e) = containerd_shim::mount::umount_recursive(tree.to_str(), 0) {
                    log::warn!("cannot unmount {}: {e}", tree.display());
                }
            }
            result
        })
        .await
        .map_err(|e| host_err("prepare the container", Code::INTERNAL)(Box::new(e)))?;
        prepared
    }

    async fn boot_and_create(
        &self,
        c: &NewContainer,
        parts: ContainerParts,
    ) -> Result<(Arc<AgentVm>, u32), GuestError> {
        let ContainerParts {
            root,
            copies,
            blocks,
        } = parts;
        let vm = spec::container_vm(&c.spec).map_err(|e| {
            GuestError::host("size the VM from the spec", Code::INVALID_ARGUMENT, e)
        })?;
        log::info!(
            "task {}: container, {} vCPU(s), {} MiB, rootfs {} ({})",
            c.id,
            vm.cpus,
            vm.memory_mib,
            root.base.display(),
            if root.cache_hit { "cached" } else { "built" }
        );
        let serial = format!("{}0", rootfs::SERIAL_PREFIX);
        let size = root.disk.size();
        let mut slots = vec![(
            Some(c.id.clone()),
            DiskConfig {
                backend: root.disk,
                serial: Some(serial.clone()),
            },
        )];
        let mut devices = Vec::new();
        for (i, b) in blocks.into_iter().enumerate() {
            let serial = format!("{}dev{i}", rootfs::SERIAL_PREFIX);
            devices.push(BlockDevice {
                path: b.path,
                serial: serial.clone(),
                size: DiskBackend::size(&b.disk),
            });
            let disk = DiskConfig {
                backend: Box::new(b.disk),
                serial: Some(serial),
            };
            slots.push((Some(c.id.clone()), disk));
        }
        let agent = AgentVm::boot(BootSpec {
            task: c.id.clone(),
            vcpus: vm.cpus,
            memory_mib: vm.memory_mib,
            extra_cmdline: vm.extra_cmdline,
            slots,
            net: None,
            pod: None,
            dir: self.run_dir.clone(),
            agent_timeout: Duration::from_secs(vm.agent_timeout_secs),
            on_event: self.on_event(None),
        })
        .await?;
        let since = Instant::now();
        let created = agent.create(c, &serial, size, copies, devices).await;
        log_timing(&c.id, "create", since);
        match created {
            Ok(pid) => Ok((agent, pid)),
            Err(e) => {
                agent.shutdown().await;
                Err(e)
            }
        }
    }

    /// Acts on what the agent reports: OOM kills become containerd events, a pod's
    /// listening ports go to its port forwarder.
    fn on_event(
        &self,
        forwarder: Option<Arc<PortForwarder>>,
    ) -> Box<dyn Fn(GuestEvent) + Send + Sync> {
        let events = self.events.clone();
        Box::new(move |e| match e {
            GuestEvent::Oom { container_id } => {
                log::info!("task {container_id}: the guest's OOM killer killed a process");
                let _ = events.send(Event::Oom(TaskOOM {
                    container_id,
                    ..Default::default()
                }));
            }
            GuestEvent::Listening { ports } => match &forwarder {
                Some(f) => f.update(&ports),
                None => log::debug!("the guest listens on {ports:?}"),
            },
        })
    }

    /// The pod's sandbox task: the shim joins the sandbox's cgroup, a thread parks in the
    /// pod netns (its tid is the task's pid) and a tap is wired to the pod's veth. The VM
    /// comes with the first container ([`crate::pod`]).
    async fn create_sandbox(&self, c: &NewContainer) -> Result<u32, GuestError> {
        let invalid = |what: &str, e: Box<dyn std::error::Error + Send + Sync>| GuestError::Host {
            what: what.to_string(),
            code: Code::INVALID_ARGUMENT,
            source: e,
        };
        let (vm, slots) = spec::pod_vm(&c.spec)
            .map_err(|e| invalid("size the pod's VM from the sandbox spec", Box::new(e)))?;
        // Refused now, not at the first container: nothing of the pod exists yet.
        check_agent_vm(&vm)?;
        let Some(path) = netns::requested(&c.spec) else {
            return Err(invalid(
                "run the pod",
                "kestrel pods need their own network namespace: host-network pods are not supported".into(),
            ));
        };
        if self
            .entries()
            .values()
            .any(|e| !matches!(e.kind, Kind::VmImage(_)))
        {
            return Err(GuestError::Host {
                what: "run the pod".into(),
                code: Code::ALREADY_EXISTS,
                source: "this shim already runs a VM".into(),
            });
        }
        let cgroups_path = c
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().clone())
            .map(|p| p.to_string_lossy().into_owned());
        let resolv = resolv_conf_source(&c.spec);
        let (cgroup, dns) = blocking(
            "join the sandbox's cgroup",
            Code::INVALID_ARGUMENT,
            move || {
                let dns = resolv
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .map(|t| pod::Dns::parse(&t))
                    .unwrap_or_default();
                cgroups_path
                    .map(|p| cgroups::join(&p))
                    .transpose()
                    .map(|j| (j, dns))
            },
        )
        .await?;
        let plan = PodPlan {
            vm,
            slots,
            hostname: c.spec.hostname().clone().unwrap_or_default(),
            dns,
        };
        match self.wire_pod(path).await {
            Ok((netns, attached)) => {
                let pid = netns.tid();
                log::info!(
                    "task {}: pod sandbox, {}; its first container boots the VM",
                    c.id,
                    attached
                        .as_ref()
                        .map_or("no network".to_string(), |a| format!(
                            "pod network on {}",
                            a.tap_name
                        ))
                );
                let sandbox = Sandbox::new(plan, netns.clone(), attached, cgroup);
                self.insert(c, Kind::Sandbox(Arc::new(sandbox)), pid, Some(netns));
                Ok(pid)
            }
            Err(e) => {
                if let Some(j) = cgroup {
                    let _ = tokio::task::spawn_blocking(move || j.leave()).await;
                }
                Err(e)
            }
        }
    }

    /// The pod netns thread and the tap wired to the pod's veth.
    async fn wire_pod(
        &self,
        path: Option<PathBuf>,
    ) -> Result<(Arc<NetnsThread>, Option<podnet::Attached>), GuestError> {
        let netns = Arc::new(start_netns(path).await?);
        let attached = {
            let netns = netns.clone();
            blocking("wire the pod network", Code::INTERNAL, move || {
                podnet::attach(&netns)
            })
            .await?
        };
        Ok((netns, attached))
    }

    /// Boots the agent VM of the pod, with empty container slots, on the pod's tap.
    async fn boot_pod_vm(&self, sandbox: &Sandbox, task: &str) -> Result<Arc<AgentVm>, GuestError> {
        let plan = &sandbox.plan;
        let net = sandbox
            .tap_for_vm()
            .map_err(|e| GuestError::host("give the VM the pod's tap", Code::INTERNAL, e))?;
        let forwarder = PortForwarder::new(sandbox.netns.clone(), self.run_dir.join("vsock"));
        log::info!(
            "task {task}: pod VM, {} vCPU(s), {} MiB, {} container slot(s)",
            plan.vm.cpus,
            plan.vm.memory_mib,
            plan.slots
        );
        AgentVm::boot(BootSpec {
            task: task.to_string(),
            vcpus: plan.vm.cpus,
            memory_mib: plan.vm.memory_mib,
            extra_cmdline: plan.vm.extra_cmdline.clone(),
            slots: (0..plan.slots)
                .map(|_| {
                    let empty = DiskConfig {
                        backend: Box::new(EmptyDisk),
                        serial: None,
                    };
                    (None, empty)
                })
                .collect(),
            net,
            pod: Some(PodConfig {
                hostname: plan.hostname.clone(),
                network: sandbox.network.clone(),
            }),
            dir: self.run_dir.clone(),
            agent_timeout: Duration::from_secs(plan.vm.agent_timeout_secs),
            on_event: self.on_event(Some(forwarder)),
        })
        .await
    }

    /// A container of the pod: the first one boots the pod's VM — the agent VM, whose
    /// free slot then takes its root disk, or, for a VM image, the image itself.
    async fn create_in_pod(&self, c: &NewContainer, sandbox_id: &str) -> Result<u32, GuestError> {
        let Some(sandbox) = self.sandbox(sandbox_id) else {
            return Err(GuestError::Host {
                what: format!("add container {} to pod {sandbox_id}", c.id),
                code: Code::FAILED_PRECONDITION,
                source: "the pod's sandbox task is not in this shim".into(),
            });
        };
        let seed = PodSeed {
            hostname: sandbox.plan.hostname.clone(),
            network_config: sandbox
                .network
                .as_ref()
                .map(|n| pod::network_config(n, &sandbox.plan.dns)),
            user_data: None,
        };
        let prepared = self.prepare(c, Some(seed)).await?;
        let only_one = || GuestError::Host {
            what: format!("add container {} to pod {sandbox_id}", c.id),
            code: Code::FAILED_PRECONDITION,
            source: "a pod whose VM is a VM image holds that one container".into(),
        };
        let mut pod_vm = sandbox.vm.lock().await;
        let result = match prepared {
            Prepared::VmImage(task) => {
                if pod_vm.is_some() {
                    return Err(only_one());
                }
                let tap = sandbox.tap_for_vm().map_err(|e| {
                    GuestError::host("give the VM the pod's tap", Code::INTERNAL, e)
                })?;
                if let (Some((fd, mac)), Some(net)) = (tap, sandbox.network.as_ref()) {
                    task.attach_net(NetConfig {
                        tap: TapSource::Fd(fd),
                        mac: Some(mac),
                        dhcp: pod::dhcp_config(net, &sandbox.plan.hostname, &sandbox.plan.dns),
                    })?;
                }
                log::info!("task {}: a VM image is the VM of pod {sandbox_id}", c.id);
                let task = Arc::new(task);
                *pod_vm = Some(PodVm::Image(task.clone()));
                // The VM runs in this process: its pid is the task's.
                let pid = std::process::id();
                self.insert(c, Kind::VmImage(task), pid, None);
                Ok(pid)
            }
            Prepared::Container(ContainerParts {
                root,
                copies,
                blocks,
            }) => {
                let vm = match &*pod_vm {
                    Some(PodVm::Agent(vm)) => vm.clone(),
                    Some(PodVm::Image(_)) => return Err(only_one()),
                    None => {
                        let vm = self.boot_pod_vm(&sandbox, &c.id).await?;
                        sandbox.booted(&vm);
                        *pod_vm = Some(PodVm::Agent(vm.clone()));
                        vm
                    }
                };
                let size = root.disk.size();
                let serial = vm.attach_disk(&c.id, root.disk).await?;
                let mut devices = Vec::new();
                for b in blocks {
                    let size = DiskBackend::size(&b.disk);
                    match vm.attach_disk(&c.id, Box::new(b.disk)).await {
                        Ok(serial) => devices.push(BlockDevice {
                            path: b.path,
                            serial,
                            size,
                        }),
                        Err(e) => {
                            vm.detach_disk(&c.id).await;
                            return Err(e);
                        }
                    }
                }
                let since = Instant::now();
                match vm.create(c, &serial, size, copies, devices).await {
                    Ok(pid) => {
                        log_timing(&c.id, "create", since);
                        self.insert(c, Kind::Container { vm, owns_vm: false }, pid, None);
                        Ok(pid)
                    }
                    Err(e) => {
                        vm.detach_disk(&c.id).await;
                        Err(e)
                    }
                }
            }
        };
        if result.is_ok() {
            if let Some(e) = self.entries().get_mut(&c.id) {
                e.pod = Some(sandbox.clone());
            }
        }
        result
    }

    async fn create_container(
        &self,
        c: &NewContainer,
        parts: ContainerParts,
    ) -> Result<u32, GuestError> {
        // Claims the boot only when no container VM exists and none is booting.
        let has_vm = self
            .entries()
            .values()
            .any(|e| !matches!(e.kind, Kind::VmImage(_)));
        if has_vm || self.booting.swap(true, Ordering::SeqCst) {
            return Err(GuestError::Unsupported(
                "a second container in one shim",
                "a lone task's shim (each ctr task gets its own shim and VM; a CRI pod's containers share theirs)",
            ));
        }
        let result = self.boot_and_create(c, parts).await;
        let result = result.map(|(vm, pid)| {
            self.insert(c, Kind::Container { vm, owns_vm: true }, pid, None);
            pid
        });
        self.booting.store(false, Ordering::SeqCst);
        result
    }
}

impl Host {
    /// [`cleanup`] on the blocking pool (unlinking large sparse files can take a while).
    async fn cleanup_blocking(&self, id: &str) {
        let (dirs, ns, id) = (self.dirs.clone(), self.namespace.clone(), id.to_string());
        let _ = tokio::task::spawn_blocking(move || cleanup(&dirs, &ns, &id)).await;
    }

    /// Drops container `id` from the guest (the VM with its last container).
    async fn forget(&self, id: &str) -> Result<(), GuestError> {
        let entry = self.entries().remove(id);
        if let Some(pod) = entry.as_ref().and_then(|e| e.pod.as_ref()) {
            // A VM image was the pod's VM: the pod may get a new one (a restart).
            let mut vm = pod.vm.lock().await;
            if matches!(&*vm, Some(PodVm::Image(_))) {
                *vm = None;
            }
        }
        match entry.map(|e| e.kind) {
            Some(Kind::Container { vm, owns_vm }) => {
                if vm.ended().is_some() {
                    // The pod's VM went first: nothing is left in the guest.
                    return Ok(());
                }
                let deleted = vm.delete(id, "").await;
                if owns_vm {
                    vm.shutdown().await;
                } else {
                    vm.detach_disk(id).await;
                }
                deleted
            }
            Some(Kind::Sandbox(sandbox)) => {
                sandbox.end().await;
                Ok(())
            }
            Some(Kind::VmImage(task)) => task.kill(id, libc::SIGKILL as u32).await.or(Ok(())),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Guest for Host {
    fn cancel_create(&self, id: &str) {
        if let Some(flag) = self.creating().get(id) {
            log::info!("task {id} is deleted while it is being created: cancelling");
            flag.store(true, Ordering::Relaxed);
        }
    }

    async fn create(&self, c: &NewContainer) -> Result<u32, GuestError> {
        let role = spec::role(&c.spec);
        let result = match &role {
            spec::Role::Sandbox => self.create_sandbox(c).await,
            spec::Role::PodContainer { sandbox } => self.create_in_pod(c, sandbox).await,
            spec::Role::Lone => match self.prepare(c, None).await {
                Ok(Prepared::VmImage(task)) => {
                    // The VM runs in this process: its pid is the task's.
                    let pid = std::process::id();
                    self.insert(c, Kind::VmImage(Arc::new(task)), pid, None);
                    Ok(pid)
                }
                Ok(Prepared::Container(parts)) => self.create_container(c, parts).await,
                Err(e) => Err(e),
            },
        };
        let result = match result {
            Ok(pid) => {
                // A pod's namespaces are the sandbox's (CRI made them); a lone task may
                // ask for a new one or name one.
                let netns = match role {
                    spec::Role::Lone => self.enter_netns(&c.id, &c.spec).await,
                    _ => Ok(()),
                };
                let ready = match netns {
                    Ok(()) => self.hooks(hooks::Stage::CreateRuntime, &c.id).await,
                    Err(e) => Err(e),
                };
                match ready {
                    Ok(()) => Ok(pid),
                    Err(e) => {
                        let _ = self.forget(&c.id).await;
                        Err(e)
                    }
                }
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            // Nothing of a failed create may stay behind.
            self.cleanup_blocking(&c.id).await;
        }
        result
    }

    async fn start(&self, id: &str, exec: &str) -> Result<u32, GuestError> {
        let pid = if let Some(task) = self.vm_image(id) {
            task.start(id).await?;
            std::process::id()
        } else if let Some(sandbox) = self.sandbox(id).filter(|_| exec.is_empty()) {
            // Nothing to start: the task's pid is the netns thread's.
            sandbox.netns.tid()
        } else {
            self.agent(id)?.start(id, exec).await?
        };
        if exec.is_empty() {
            self.hooks(hooks::Stage::Poststart, id).await?;
        }
        Ok(pid)
    }

    async fn exec(&self, id: &str, exec: &str, p: &NewExec) -> Result<(), GuestError> {
        if self.vm_image(id).is_some() {
            return Err(GuestError::Unsupported(
                "exec",
                "VM-image tasks (the VM is the process)",
            ));
        }
        self.agent(id)?.exec(id, exec, p).await
    }

    async fn kill(&self, id: &str, exec: &str, signal: u32, all: bool) -> Result<(), GuestError> {
        if let Some(task) = self.vm_image(id) {
            return task.kill(id, signal).await;
        }
        if let Some(sandbox) = self.sandbox(id).filter(|_| exec.is_empty()) {
            sandbox.kill(signal).await;
            return Ok(());
        }
        self.agent(id)?.kill(id, exec, signal, all).await
    }

    async fn wait(&self, id: &str, exec: &str) -> Result<u32, GuestError> {
        if let Some(task) = self.vm_image(id) {
            return Ok(task.wait().await);
        }
        if let Some(sandbox) = self.sandbox(id).filter(|_| exec.is_empty()) {
            return Ok(sandbox.wait().await);
        }
        self.agent(id)?.wait(id, exec).await
    }

    async fn delete(&self, id: &str, exec: &str) -> Result<(), GuestError> {
        if !exec.is_empty() {
            return self.agent(id)?.delete(id, exec).await;
        }
        let since = Instant::now();
        self.hooks(hooks::Stage::Poststop, id).await?;
        let result = self.forget(id).await;
        self.cleanup_blocking(id).await;
        log_timing(id, "teardown", since);
        result
    }

    async fn pids(&self, id: &str) -> Result<Vec<ProcessInfo>, GuestError> {
        if self.vm_image(id).is_some() {
            return Ok(vec![ProcessInfo {
                pid: std::process::id(),
                ..Default::default()
            }]);
        }
        if let Some(sandbox) = self.sandbox(id) {
            return Ok(vec![ProcessInfo {
                pid: sandbox.netns.tid(),
                ..Default::default()
            }]);
        }
        let vm = self.agent(id)?;
        if vm.ended().is_some() {
            // CRI's pod stats fail as a whole on a Pids error: a container of a stopped
            // pod VM simply has no processes.
            return Ok(Vec::new());
        }
        vm.pids(id).await
    }

    async fn stats(&self, id: &str) -> Result<Any, GuestError> {
        // The VM as a whole is measured on the host; a container in its guest cgroup.
        let whole_vm = match self.entries().get(id).map(|e| &e.kind) {
            Some(Kind::VmImage(t)) => Some(t.memory_bytes),
            Some(Kind::Sandbox(s)) => Some(s.memory_bytes()),
            _ => None,
        };
        match whole_vm {
            Some(limit) => {
                blocking("read the VM's statistics", Code::INTERNAL, move || {
                    cgroups::process_metrics(limit)
                })
                .await
            }
            None => self.agent(id)?.stats(id).await,
        }
    }

    async fn update(&self, id: &str, resources: &Any) -> Result<(), GuestError> {
        self.agent(id)?.update(id, resources).await
    }

    async fn resize_pty(&self, id: &str, exec: &str, w: u32, h: u32) -> Result<(), GuestError> {
        if self.vm_image(id).is_some() {
            return Ok(());
        }
        self.agent(id)?.resize_pty(id, exec, w, h).await
    }

    async fn close_io(&self, id: &str, exec: &str) -> Result<(), GuestError> {
        if self.vm_image(id).is_some() {
            // The console keeps reading stdin until the VM ends.
            return Ok(());
        }
        self.agent(id)?.close_io(id, exec).await
    }
}

/// Removes what container `id` left in the state directories. Idempotent; also what the
/// `delete` action runs after a shim that died.
pub fn cleanup(dirs: &StateDirs, ns: &str, id: &str) {
    vm_image::cleanup(dirs, ns, id);
    rootfs::cleanup(dirs, ns, id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dirs_are_short_and_distinct() {
        let a = run_dir("default", &"x".repeat(64));
        assert!(a.as_os_str().len() < 40, "{}", a.display());
        assert_ne!(a, run_dir("k8s.io", &"x".repeat(64)));
        assert_eq!(a, run_dir("default", &"x".repeat(64)));
    }
}
