//! Layer 4: faults and load through containerd, with a tiny payload standing in for the
//! guest kernel (`KESTREL_ASSETS` of a private containerd points at a directory whose
//! `vmlinux` is a payload of `vmm/tests/payloads`), so hundreds of VM-image tasks take
//! minutes. Each task is a `ctr run --config` of a spec whose root holds `/disk/disk.raw`.
//!
//! - sequential cycles: `hello` (prints, exits 42) run, waited and removed, one after the
//!   other; then as many at once;
//! - kills: `storm` (endless garbage I/O on every device, the disk included) run
//!   detached, its shim killed with SIGKILL mid-storm; containerd must see the task stop
//!   within 5 s, and the task's removal must leave nothing.
//!
//! Before and after, the host is counted — containerd's fds (not its threads: Go keeps
//! the threads a burst made), shim processes, mounts under containerd's and kestrel's
//! directories, kestrel's overlays and run directories, containerd's bundles — and must
//! be the same (a lone VM-image task has no tap; the CRI tests check a pod's). Other
//! kestrel tests must not run meanwhile (cargo runs test binaries one at a time). Counts come from `KESTREL_SOAK_CYCLES` (default 1000),
//! `KESTREL_SOAK_CONCURRENT` (50), `KESTREL_SOAK_KILLS` (100).
//!
//! The kill test's console is a `file://` log URI (`ctr run -d --log-uri file:///…`).
//!
//! Skipped (`skipped: …`) without containerd or /dev/kvm.

// Test code: a failed setup step should panic with its cause.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kestrel_integration_tests::containerd::{self, describe, Containerd, KESTREL_RUNTIME};
use kestrel_integration_tests::kestrel::{self, assert_gone};

#[path = "../../../vmm/tests/payloads/assemble.rs"]
mod assemble;

const TIMEOUT: Duration = Duration::from_secs(120);

fn count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What a task could leak, counted on the host.
#[derive(Debug, PartialEq, Eq)]
struct HostCounts {
    containerd_fds: usize,
    shims: usize,
    mounts: usize,
    overlays: Vec<String>,
    run_dirs: Vec<String>,
    bundles: usize,
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).map_or(Vec::new(), |d| {
        d.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    });
    v.sort();
    v
}

fn host_counts(c: &Containerd) -> HostCounts {
    let pid = c.pid().unwrap();
    HostCounts {
        containerd_fds: entries(Path::new(&format!("/proc/{pid}/fd"))),
        shims: c.shim_processes().len(),
        mounts: std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| {
                let m = Path::new(m);
                m.starts_with(c.dir())
                    || m.starts_with("/run/kestrel")
                    || m.starts_with(kestrel::state_dir())
            })
            .count(),
        overlays: names(
            &kestrel::state_dir()
                .join("overlays")
                .join(containerd::NAMESPACE),
        ),
        run_dirs: names(Path::new("/run/kestrel/s")),
        bundles: entries(
            &c.state_dir()
                .join("io.containerd.runtime.v2.task")
                .join(containerd::NAMESPACE),
        ),
    }
}

/// containerd settles (closes a shim's connection, reaps) a moment after a task is gone.
fn settled_counts(c: &Containerd, before: &HostCounts) -> HostCounts {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = host_counts(c);
        if &now == before || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A private containerd whose shims boot `payload` as the guest kernel, and a spec whose
/// root is a VM image (`extra` annotations added).
struct Rig {
    c: Containerd,
    dir: PathBuf,
}

impl Rig {
    fn new(payload: &str) -> Rig {
        let assets =
            std::env::temp_dir().join(format!("kestrel-soak-{}-{payload}", std::process::id()));
        std::fs::create_dir_all(&assets).unwrap();
        std::fs::copy(assemble::payload(payload), assets.join("vmlinux")).unwrap();
        std::fs::write(assets.join("initramfs.cpio"), b"").unwrap();
        let c = Containerd::builder()
            .shim(kestrel_integration_tests::shim_binary().unwrap())
            .env("KESTREL_ASSETS", &assets)
            .start()
            .unwrap();
        let dir = c.dir().join("soak");
        std::fs::create_dir_all(dir.join("root/disk")).unwrap();
        std::fs::write(dir.join("root/disk/disk.raw"), vec![0u8; 1 << 20]).unwrap();
        Rig { c, dir }
    }

    fn spec(&self, name: &str, annotations: serde_json::Value) -> PathBuf {
        let path = self.dir.join(format!("{name}.json"));
        kestrel::write_spec(&self.c, &path, &self.dir.join("root"), annotations, None);
        path
    }
}

#[test]
fn hundreds_of_vm_tasks_in_sequence_and_at_once_leak_nothing() {
    let Some(_serial) = kestrel::setup(&[]) else {
        return;
    };
    let rig = Rig::new("hello");
    let c = &rig.c;
    let spec = rig.spec("hello", serde_json::json!({}));
    let (cycles, concurrent) = (
        count("KESTREL_SOAK_CYCLES", 1000),
        count("KESTREL_SOAK_CONCURRENT", 50),
    );
    // One warm-up task: containerd opens what it keeps (snapshotter, plugins) on first use.
    let run_one = |id: &str| {
        let args = kestrel::run_config_args(&spec, id);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = c.ctr_with_timeout(&args, TIMEOUT);
        assert_eq!(out.status.code(), Some(42), "{id}: {}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("hello from the payload"),
            "{id}: {}",
            describe(&out)
        );
    };
    run_one("soak-warmup");
    let before = host_counts(c);

    let started = Instant::now();
    for i in 0..cycles {
        run_one(&format!("soak-{i}"));
    }
    let sequential = started.elapsed();
    let after = settled_counts(c, &before);
    assert_eq!(after, before, "after {cycles} sequential tasks");

    let started = Instant::now();
    let children: Vec<_> = (0..concurrent)
        .map(|i| {
            let id = format!("soak-par-{i}");
            let mut cmd = Command::new("ctr");
            cmd.args([
                "-a",
                c.socket().to_str().unwrap(),
                "-n",
                containerd::NAMESPACE,
            ])
            .args(kestrel::run_config_args(&spec, &id));
            (id, cmd.output_spawned())
        })
        .collect();
    for (id, child) in children {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(42), "{id}: {}", describe(&out));
    }
    let parallel = started.elapsed();
    let after = settled_counts(c, &before);
    assert_eq!(after, before, "after {concurrent} tasks at once");
    for i in 0..concurrent {
        assert_gone(c, &format!("soak-par-{i}"));
    }
    kestrel_test_support::campaign(format_args!(
        "soak: {cycles} VM tasks in sequence in {:.1} s ({:.0} ms each, {:.2} tasks/s/core), \
         {concurrent} at once in {:.1} s ({:.1} starts/s/core); host counts unchanged: {after:?}",
        sequential.as_secs_f64(),
        sequential.as_secs_f64() * 1000.0 / cycles.max(1) as f64,
        cycles as f64 / sequential.as_secs_f64() / cores(),
        parallel.as_secs_f64(),
        concurrent as f64 / parallel.as_secs_f64() / cores(),
    ));
}

#[test]
fn a_shim_killed_mid_storm_is_seen_within_5_s_and_leaves_nothing() {
    let Some(_serial) = kestrel::setup(&[]) else {
        return;
    };
    let rig = Rig::new("storm");
    let c = &rig.c;
    let spec = rig.spec(
        "storm",
        serde_json::json!({"io.kestrel.vm.cmdline": "storm!"}),
    );
    let kills = count("KESTREL_SOAK_KILLS", 100);
    let mut worst = Duration::ZERO;
    let mut before = None;
    for i in 0..kills {
        let id = format!("soak-kill-{i}");
        let log = rig.dir.join(format!("{id}.log"));
        let out = c.ctr_with_timeout(
            &[
                "run",
                "-d",
                "--runtime",
                KESTREL_RUNTIME,
                "--log-uri",
                &format!("file://{}", log.display()),
                "--config",
                spec.to_str().unwrap(),
                &id,
            ],
            TIMEOUT,
        );
        assert!(out.status.success(), "{id}: {}", describe(&out));
        // Mid-storm: the guest has printed and is hammering its devices.
        let deadline = Instant::now() + TIMEOUT;
        while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("storm")) {
            assert!(
                Instant::now() < deadline,
                "{id}: the storm never started; task {:?}, console {:?}",
                c.task_status(&id),
                std::fs::read_to_string(&log)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        let shim = c.kestrel_shim_pid(&id).unwrap();
        let killed = Instant::now();
        assert!(
            containerd::kill9(shim),
            "{id}: shim {shim} survived SIGKILL"
        );
        assert!(
            c.wait_task_stopped(&id, Duration::from_secs(5)),
            "{id}: still running 5 s after its shim died: {:?}",
            c.tasks()
        );
        worst = worst.max(killed.elapsed());
        let _ = c.ctr(&["task", "rm", "-f", &id]);
        c.ctr_ok(&["container", "rm", &id]);
        assert_gone(c, &id);
        let now = settled_counts(c, before.get_or_insert_with(|| host_counts(c)));
        assert_eq!(Some(&now), before.as_ref(), "after killing {id}");
    }
    kestrel_test_support::campaign(format_args!(
        "soak: {kills} shims killed mid-storm; containerd saw each task stop within {:.0} ms",
        worst.as_secs_f64() * 1000.0
    ));
}

fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

/// `Command::spawn` with its output captured.
trait SpawnOutput {
    fn output_spawned(&mut self) -> std::process::Child;
}

impl SpawnOutput for Command {
    fn output_spawned(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
}
