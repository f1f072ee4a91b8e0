//! Kubernetes pods on kestrel, through containerd 1.6's CRI plugin as kubelet drives it
//! (the `kestrel` runtime handler, a bridge CNI network from Debian's plugins), with a
//! runc pod on the same bridge (docs/pods.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kestrel_integration_tests::cri::{remove_cgroup_parent, Cri, Extra};
use kestrel_integration_tests::images;
use kestrel_integration_tests::kestrel::{self, unique};

const BUSYBOX: &str = "localhost/busybox:1";
/// The first container: output on both streams, then a web server on the guest's
/// loopback only.
const WEB: &str =
    "echo hello from web; echo oops >&2; mkdir -p /www; echo pong > /www/index.html; \
                   exec httpd -f -p 127.0.0.1:8080 -h /www";

fn netns_count() -> usize {
    std::fs::read_dir("/run/netns").map_or(0, |d| d.count())
}

fn wait_for_file(path: &Path, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A loop device over a 4 MiB file starting with `head`; detached on drop.
struct LoopDevice {
    device: std::path::PathBuf,
}

impl LoopDevice {
    fn new(file: &Path, head: &[u8]) -> LoopDevice {
        let mut data = vec![0u8; 4 << 20];
        data[..head.len()].copy_from_slice(head);
        std::fs::write(file, data).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice {
            device: String::from_utf8_lossy(&out.stdout).trim().into(),
        }
    }

    fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        std::fs::File::open(&self.device)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// The pod's shim ends within 20 s of the pod's removal.
fn assert_exits(shim: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while kestrel_integration_tests::containerd::alive(shim) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !kestrel_integration_tests::containerd::alive(shim),
        "the pod's shim still runs"
    );
}

/// `GET /` from localhost:`port` inside the network namespace at `netns`, as containerd's
/// PortForward dials it (busybox's nc on the host; its wget needs NSS).
fn http_get_in(netns: &str, port: u16) -> String {
    use std::io::Write;
    let mut child = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args([
            "/bin/busybox",
            "nc",
            "-w",
            "5",
            "127.0.0.1",
            &port.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.0\r\n\r\n");
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A ConfigMap volume as kubelet's atomic writer leaves it: `<version>/key`, `..data` →
/// `<version>`, `key` → `..data/key`; an update swaps `..data` and drops the old version.
fn write_configmap(dir: &Path, version: &str, value: &str) {
    std::fs::create_dir_all(dir.join(version)).unwrap();
    std::fs::write(dir.join(version).join("key"), value).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if !dir.join("key").exists() {
        std::os::unix::fs::symlink("..data/key", dir.join("key")).unwrap();
    }
    if let Some(old) = old.filter(|o| o != Path::new(version)) {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// One kestrel pod of two containers in one VM and one shim, on the pod network beside a
/// runc pod: exec (output, status, timeout), logs, stats, IP both ways, teardown.
#[test]
fn a_pod_of_two_containers_runs_in_one_vm_on_the_pod_network() {
    let Some(setup) = kestrel::setup(&[]) else {
        return;
    };
    let c = &setup.c;
    c.import(images::busybox(), "k8s.io");
    c.import(images::pause(), "k8s.io");
    let cri = Cri::connect(c.socket());
    let logs = c.dir().join("pod-logs");
    let netns_before = netns_count();

    // A runc pod on the bridge.
    let runc_logs = logs.join("runc");
    std::fs::create_dir_all(&runc_logs).unwrap();
    let runc_name = unique("runc-pod");
    let runc_config = Cri::pod_config(&runc_name, &runc_logs, &[]);
    let runc_pod = cri.run_pod(&runc_config, "").expect("runc RunPodSandbox");
    let runc_ip = cri.pod_ip(&runc_pod);
    let runc_box = cri
        .start_container(&runc_pod, &runc_config, "box", BUSYBOX, &["sleep", "3600"])
        .expect("runc container");

    // The kestrel pod.
    let kestrel_logs = logs.join("kestrel");
    std::fs::create_dir_all(&kestrel_logs).unwrap();
    let name = unique("kpod");
    let config = Cri::pod_config(
        &name,
        &kestrel_logs,
        &[("io.kestrel.vm.container_slots", "3")],
    );
    let since = Instant::now();
    let pod = cri
        .run_pod(&config, "kestrel")
        .expect("kestrel RunPodSandbox");
    println!("RunPodSandbox: {:.1} s", since.elapsed().as_secs_f64());
    let pod_ip = cri.pod_ip(&pod);
    assert!(pod_ip.starts_with("10.88."), "pod IP {pod_ip:?}");
    let shim = c.kestrel_shim_pid(&pod).expect("the pod's shim");

    // Volumes as kubelet lays them out: a ConfigMap (atomic writer), an emptyDir both
    // containers mount, a termination log.
    let vols = c.dir().join("volumes");
    let cm = vols.join("cm");
    write_configmap(&cm, "..2026_01", "one");
    let empty_dir = vols.join("data");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let term_log = vols.join("termination-log");
    std::fs::write(&term_log, b"").unwrap();
    // A raw block volume (volumeDevices): a loop device over a file.
    let block = LoopDevice::new(&vols.join("block.img"), b"KESTREL-BLOCK");

    let web = cri
        .start_container_with(
            &pod,
            &config,
            "web",
            BUSYBOX,
            &["sh", "-c", WEB],
            &Extra {
                mounts: &[(&cm, "/etc/cfg", true), (&empty_dir, "/data", false)],
                ..Extra::default()
            },
        )
        .expect("first container");
    let side = cri
        .start_container_with(
            &pod,
            &config,
            "side",
            BUSYBOX,
            &["sleep", "3600"],
            &Extra {
                mounts: &[
                    (&empty_dir, "/data", false),
                    (&term_log, "/dev/termination-log", false),
                ],
                devices: &[(&block.device, "/dev/xvdb")],
                ..Extra::default()
            },
        )
        .expect("second container");
    // One shim process serves the pod.
    let shims: Vec<u32> = c
        .shim_processes()
        .into_iter()
        .filter(|p| {
            p.args
                .first()
                .is_some_and(|a| a.to_string_lossy().ends_with("containerd-shim-kestrel-v2"))
        })
        .map(|p| p.pid)
        .collect();
    assert_eq!(shims, [shim]);
    assert!(
        c.kestrel_shim_pid(&web).is_none(),
        "a shim of its own for {web}"
    );

    // Logs in the CRI log file, stdout and stderr apart.
    let log = wait_for_file(
        &kestrel_logs.join("web.log"),
        "oops",
        Duration::from_secs(30),
    );
    assert!(log.contains(" stdout F hello from web"), "{log}");
    assert!(log.contains(" stderr F oops"), "{log}");

    // ExecSync: output, status; both containers see the pod's address and hostname.
    for id in [&web, &side] {
        let r = cri
            .exec_sync(
                id,
                &["sh", "-c", "hostname; ip -o -4 addr show eth0; ip route"],
                60,
            )
            .expect("exec");
        assert_eq!(r.exit_code, 0, "{r:?}");
        assert!(r.stdout.starts_with(&format!("{name}\n")), "{r:?}");
        assert!(r.stdout.contains(&format!("inet {pod_ip}/16")), "{r:?}");
        // CNI's default route, through the bridge's gateway.
        assert!(r.stdout.contains("default via 10.88.0.1 dev eth0"), "{r:?}");
    }
    let r = cri
        .exec_sync(&side, &["sh", "-c", "echo err >&2; exit 3"], 60)
        .unwrap();
    assert_eq!((r.exit_code, r.stderr.as_str()), (3, "err\n"), "{r:?}");
    let since = Instant::now();
    let timed_out = cri.exec_sync(&side, &["sleep", "30"], 2);
    assert!(timed_out.is_err(), "{timed_out:?}");
    assert!(
        since.elapsed() < Duration::from_secs(25),
        "{:?}",
        since.elapsed()
    );

    // The pod network, both ways with the runc pod.
    let r = cri
        .exec_sync(&web, &["ping", "-c", "1", "-W", "10", &runc_ip], 60)
        .unwrap();
    assert_eq!(r.exit_code, 0, "kestrel → runc {runc_ip}: {r:?}");
    let r = cri
        .exec_sync(&runc_box, &["ping", "-c", "1", "-W", "10", &pod_ip], 60)
        .unwrap();
    assert_eq!(r.exit_code, 0, "runc → kestrel {pod_ip}: {r:?}");

    // PortForward: containerd dials localhost:<port> in the pod's netns, which reaches
    // the server listening on the guest's 127.0.0.1.
    let netns = cri.pod_netns(&pod).expect("the pod's netns path");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = http_get_in(&netns, 8080);
        if out.ends_with("\r\n\r\npong\n") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "localhost:8080 in {netns} never answered: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Accounting: the pod VM (the shim process) is in the sandbox's cgroup.
    let spec = cri.pod_spec(&pod).expect("the sandbox spec");
    let cgroups_path = spec["linux"]["cgroupsPath"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!cgroups_path.is_empty(), "{spec}");
    let cgroups = std::fs::read_to_string(format!("/proc/{shim}/cgroup")).unwrap();
    assert!(
        cgroups
            .lines()
            .any(|l| l.contains(":memory:") && l.ends_with(&cgroups_path)),
        "{cgroups_path} not in\n{cgroups}"
    );

    // Stats of a container (the CRI plugin decodes cgroup metrics).
    let stats = cri.container_stats(&web).expect("ContainerStats");
    let mem = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map_or(0, |v| v.value);
    assert!(mem > 0, "{stats:?}");

    // Volumes: the ConfigMap and CRI's own files are there, the emptyDir is shared, a
    // ConfigMap update arrives, the termination log comes back out.
    let script = "cat /etc/cfg/key; echo; echo shared > /data/note; \
                  grep -c nameserver /etc/resolv.conf; cat /etc/hostname";
    let r = cri.exec_sync(&web, &["sh", "-c", script], 60).unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(r.stdout.starts_with("one\n"), "{r:?}");
    assert!(r.stdout.ends_with(&format!("{name}\n")), "{r:?}");
    // The block volume: its data, and a write that reaches the host device.
    let script = "head -c 13 /dev/xvdb; echo written | dd of=/dev/xvdb bs=512 seek=2 \
                  conv=notrunc,fsync 2>/dev/null; dd if=/dev/xvdb bs=512 skip=2 count=1 \
                  2>/dev/null | head -c 7";
    let r = cri.exec_sync(&side, &["sh", "-c", script], 60).unwrap();
    assert_eq!(r.stdout, "KESTREL-BLOCKwritten", "{r:?}");
    assert_eq!(block.read_at(1024, 7), b"written");
    let r = cri.exec_sync(&side, &["cat", "/data/note"], 60).unwrap();
    assert_eq!(r.stdout, "shared\n", "{r:?}");
    write_configmap(&cm, "..2026_02", "two");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = cri.exec_sync(&web, &["cat", "/etc/cfg/key"], 60).unwrap();
        if r.stdout == "two" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ConfigMap update did not arrive: {r:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let r = cri
        .exec_sync(
            &side,
            &["sh", "-c", "echo goodbye > /dev/termination-log"],
            60,
        )
        .unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");

    // UpdateContainerResources reaches the container's cgroup in the guest.
    cri.update_memory(&side, 96 << 20)
        .expect("UpdateContainerResources");
    let r = cri
        .exec_sync(
            &side,
            &[
                "sh",
                "-c",
                "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max",
            ],
            60,
        )
        .unwrap();
    assert_eq!(r.stdout.trim(), (96u64 << 20).to_string(), "{r:?}");

    // Pod stats: the pod cgroup (which holds the VM) and every container's Pids answer.
    match cri.pod_stats(&pod) {
        Ok(stats) => {
            let linux = stats.linux.expect("linux pod stats");
            let mem = linux
                .memory
                .and_then(|m| m.working_set_bytes)
                .map_or(0, |v| v.value);
            assert!(mem > 0, "{linux:?}");
        }
        Err(e) => panic!("PodSandboxStats: {e:?}"),
    }

    // Stop and remove one container: the other keeps running in the VM.
    cri.stop_container(&side, 0).unwrap();
    assert_eq!(std::fs::read_to_string(&term_log).unwrap(), "goodbye\n");
    cri.remove_container(&side).unwrap();
    let r = cri.exec_sync(&web, &["true"], 60).unwrap();
    assert_eq!(r.exit_code, 0);

    cri.remove_pod(&pod).expect("remove the kestrel pod");
    cri.remove_pod(&runc_pod).expect("remove the runc pod");
    remove_cgroup_parent(&name);
    remove_cgroup_parent(&runc_name);
    assert_exits(shim);
    assert_eq!(netns_count(), netns_before, "a network namespace is left");
    // No state, bundle or mount of the pod or its containers.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    for id in [&pod, &web, &side] {
        let left = kestrel::leftovers(id);
        assert!(left.is_empty(), "kestrel state of {id} left: {left:?}");
        let bundle = c
            .state_dir()
            .join("io.containerd.runtime.v2.task/k8s.io")
            .join(id);
        assert!(!bundle.exists(), "{} left", bundle.display());
        assert!(
            !mounts.contains(id.as_str()),
            "a mount of {id} left:\n{mounts}"
        );
    }
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains("kestrel0"), "{links}");
    assert!(!kestrel::run_dir_in("k8s.io", &pod).exists());
}

/// A VM-image pod (KubeVirt's containerDisk as the pod's container) boots that disk as the
/// pod's VM on the pod network: the kernel's DHCP client gets the pod IP from virtio-net's
/// DHCP server, a runc pod reaches it, the console is the container's log, the pod's
/// environment reaches the guest, exec is refused, stats come from the host.
#[test]
fn a_vm_image_pod_joins_the_pod_network() {
    let disk = images::containerdisk();
    let Some(setup) = kestrel::setup(&[]) else {
        return;
    };
    let c = &setup.c;
    c.import(images::busybox(), "k8s.io");
    c.import(images::pause(), "k8s.io");
    c.import(&disk.archive, "k8s.io");
    let cri = Cri::connect(c.socket());
    let logs = c.dir().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();

    let runc_name = unique("runc-peer");
    let runc_config = Cri::pod_config(&runc_name, &logs, &[]);
    let runc_pod = cri.run_pod(&runc_config, "").expect("runc RunPodSandbox");
    let runc_box = cri
        .start_container(&runc_pod, &runc_config, "box", BUSYBOX, &["sleep", "3600"])
        .expect("runc container");

    let name = unique("vmpod");
    let config = Cri::pod_config(&name, &logs, &[]);
    let since = Instant::now();
    let pod = cri
        .run_pod(&config, "kestrel")
        .expect("kestrel RunPodSandbox");
    // The sandbox needs no VM: the first container decides what the VM is.
    println!("RunPodSandbox: {:.3} s", since.elapsed().as_secs_f64());
    let pod_ip = cri.pod_ip(&pod);
    let vm = cri
        .start_container_with(
            &pod,
            &config,
            "vm",
            "localhost/kestrel-test-vmdisk:1",
            &["vm"],
            &Extra {
                envs: &[("VM_INIT_WAIT", "1"), ("GREETING", "hello pod")],
                annotations: &[("io.kestrel.vm.cmdline", "ip=dhcp")],
                ..Extra::default()
            },
        )
        .expect("the VM image's container");
    let log = wait_for_file(
        &logs.join("vm.log"),
        "vm-init: waiting",
        Duration::from_secs(300),
    );
    assert!(log.contains("vm-init: waiting"), "{log}");
    assert!(log.contains("vm-init: env GREETING=hello pod"), "{log}");
    assert!(log.contains(&format!("my address is {pod_ip}")), "{log}");

    let r = cri
        .exec_sync(&runc_box, &["ping", "-c", "1", "-W", "10", &pod_ip], 60)
        .unwrap();
    assert_eq!(r.exit_code, 0, "runc → VM image {pod_ip}: {r:?}");

    let err = cri.exec_sync(&vm, &["true"], 10).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    let stats = cri.container_stats(&vm).expect("ContainerStats");
    let mem = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map_or(0, |v| v.value);
    assert!(mem > 0, "{stats:?}");

    // A second container cannot join a VM-image pod.
    let err = cri
        .start_container(&pod, &config, "more", BUSYBOX, &["true"])
        .unwrap_err();
    assert!(err.message().contains("VM image"), "{err:?}");

    let shim = c.kestrel_shim_pid(&pod).expect("the pod's shim");
    cri.remove_pod(&pod).expect("remove the VM-image pod");
    cri.remove_pod(&runc_pod).expect("remove the runc pod");
    remove_cgroup_parent(&name);
    remove_cgroup_parent(&runc_name);
    assert_exits(shim);
}

/// What kestrel cannot run is refused with the code kubelet acts on.
#[test]
fn a_host_network_pod_is_refused() {
    let Some(setup) = kestrel::setup(&[]) else {
        return;
    };
    let c = &setup.c;
    c.import(images::pause(), "k8s.io");
    let cri = Cri::connect(c.socket());
    let logs = c.dir().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut config = Cri::pod_config(&unique("hostnet"), &logs, &[]);
    config.hostname.clear();
    if let Some(ns) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        ns.network = kestrel_integration_tests::cri::v1::NamespaceMode::Node as i32;
    }
    let err = cri.run_pod(&config, "kestrel").unwrap_err();
    assert!(
        err.message()
            .contains("host-network pods are not supported"),
        "{err:?}"
    );
    // A bad annotation, and more than the host has: refused at RunPodSandbox, before the
    // pod's VM or network.
    for (name, annotation, says) in [
        (
            "badslots",
            ("io.kestrel.vm.container_slots", "99"),
            "io.kestrel.vm.container_slots",
        ),
        (
            "huge",
            ("io.kestrel.vm.memory_mib", "1073741824"),
            "1073741824 MiB of guest memory asked; this host has",
        ),
        (
            "many",
            ("io.kestrel.vm.cpus", "255"),
            "255 vCPUs asked; this host allows at most",
        ),
    ] {
        let config = Cri::pod_config(&unique(name), &logs, &[annotation]);
        let err = cri.run_pod(&config, "kestrel").unwrap_err();
        assert!(err.message().contains(says), "{name}: {err:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.shim_processes().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        c.shim_processes().is_empty(),
        "a shim outlived the refused pods: {:?}",
        c.shim_processes()
    );
}
