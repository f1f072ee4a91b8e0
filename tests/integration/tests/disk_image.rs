//! Layer 3: VM images through `kestrel run --image` (DESIGN.md, "Disks and images"): the
//! QCOW2 is converted once into the image cache, the base stays read-only and unchanged,
//! and each VM writes into its own copy-on-write overlay, which keeps flushed writes
//! across a second boot and across a SIGKILL of the VMM.
//!
//! The image is the containerDisk test disk (`tests/images/build-containerdisk.sh`: an
//! ext4 file system made into a QCOW2 by `qemu-img`) whose `/sbin/init` is `vm-init`. It
//! prints `vm-init: previous-boots=<n>` from `/var/lib/vm-init/boots`, writes n+1 back,
//! fsyncs, then powers off, or with `VM_INIT_WAIT=1` prints `vm-init: waiting` and
//! waits. vm-init reads that switch (and fails without it) from a cloud-init NoCloud seed
//! on `/dev/vdb`, so every boot gets a seed from `kestrel-seed` as `--disk SEED,ro`.
//!
//! Four boots in all (about a minute each on a kvm_pvm host), one at a time, with a
//! private `KESTREL_STATE_DIR` in a temporary directory:
//!
//! 1. `--image disk.qcow2,overlay=A`: previous-boots=0, exit 0; the cache holds one raw
//!    base, mode 0444, byte-identical to the ext4 the QCOW2 was made from; the overlay
//!    view (read on the host through `devices::disk::overlay::Overlay`) holds boots=1;
//! 2. again with `overlay=A`: previous-boots=1 (the overlay kept the flushed write), the
//!    overlay file reopened rather than replaced (same inode and birth time), no second
//!    conversion;
//! 3. `overlay=B`: previous-boots=0 (a second VM of the image does not see the first's
//!    writes); still exactly one base in `images/`, unchanged (hash, inode, mtime);
//! 4. `overlay=C` with `VM_INIT_WAIT=1`: once the guest printed `vm-init: waiting` (after
//!    its fsync), `kill -9` kestrel; the overlay view, copied into a raw file, passes
//!    `e2fsck -fn` after journal replay (`e2fsck -E journal_only`, what a mount does after
//!    a crash) and holds the counter vm-init flushed.
//!
//! Every check's result is collected and the test fails at the end with all of them, so
//! one run reports everything. Needs `/dev/kvm` (else `skipped: …`), the guest kernel
//! (`scripts/build-guest.sh`), e2fsprogs, qemu-utils, and the debug `kestrel` binary next
//! to this test's directory (`cargo test --workspace` builds it; the test fails clearly
//! if it is missing). `KESTREL_KEEP_TEST_DIR=1` keeps the temporary directory.

// Test code: a failed setup step should panic with its cause.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::disk::overlay::Overlay;
use devices::disk::DiskBackend;
use kestrel_integration_tests::images;
use kestrel_seed::{write_seed_image, Seed};
use sha2::{Digest, Sha256};

/// A boot that has not ended after this long is killed and fails the test.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Where vm-init keeps its counter, inside the guest's root file system.
const BOOTS_FILE: &str = "/var/lib/vm-init/boots";

/// A temporary directory, removed on drop unless `KESTREL_KEEP_TEST_DIR=1`.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("kestrel-disk-image-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KESTREL_KEEP_TEST_DIR").is_some_and(|v| v == "1") {
            println!("kept {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// `<target>/debug/kestrel`: the grandparent of this test binary (`<target>/debug/deps/…`).
fn kestrel_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps");
    let bin = dir.join("kestrel");
    assert!(
        bin.is_file(),
        "the kestrel binary is not built: {} is missing (`cargo test --workspace` builds it; \
         or run `cargo build -p kestrel` first)",
        bin.display()
    );
    bin
}

fn sha256_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("{:x}", h.finalize())
}

/// A NoCloud seed whose environment is `env`.
fn make_seed(path: &Path, instance: &str, env: &[(&str, &str)]) {
    let seed = Seed {
        instance_id: instance.into(),
        hostname: instance.into(),
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        extra_user_data: None,
        network_config: None,
    };
    write_seed_image(&seed, path).unwrap();
}

/// A running `kestrel run`: its console lines arrive on `lines`.
struct Vm {
    name: String,
    child: Child,
    lines: Receiver<String>,
    console: Vec<String>,
    stdout_reader: Option<JoinHandle<()>>,
    stderr_reader: Option<JoinHandle<String>>,
    started: Instant,
}

/// How a boot ended.
struct Boot {
    status: ExitStatus,
    console: String,
    stderr: String,
    secs: f64,
}

impl Boot {
    fn previous_boots(&self) -> Option<u64> {
        previous_boots(&self.console)
    }

    fn describe(&self) -> String {
        format!(
            "status {}, {:.1} s\n--- console ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.secs,
            tail(&self.console, 30),
            tail(&self.stderr, 10)
        )
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn previous_boots(console: &str) -> Option<u64> {
    console.lines().find_map(|l| {
        l.trim_end()
            .strip_prefix("vm-init: previous-boots=")?
            .parse()
            .ok()
    })
}

impl Vm {
    fn start(kestrel: &Path, state: &Path, image: &Path, overlay: &Path, seed: &Path) -> Vm {
        let name = overlay.file_name().unwrap().to_string_lossy().into_owned();
        let mut child = Command::new(kestrel)
            .arg("run")
            .arg("--image")
            .arg(format!("{},overlay={}", image.display(), overlay.display()))
            .arg("--disk")
            .arg(format!("{},ro", seed.display()))
            .env("KESTREL_STATE_DIR", state)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", kestrel.display()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout_reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut s);
            s
        });
        println!("boot {name}: started");
        Vm {
            name,
            child,
            lines,
            console: Vec::new(),
            stdout_reader: Some(stdout_reader),
            stderr_reader: Some(stderr_reader),
            started: Instant::now(),
        }
    }

    /// Collects console lines until one contains `needle` (true) or the console closes or
    /// the deadline passes (false).
    fn wait_for(&mut self, needle: &str) -> bool {
        let deadline = self.started + BOOT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.console.push(line);
                    if found {
                        return true;
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    /// Waits for the process to end (killing it at the deadline) and collects everything.
    fn finish(mut self) -> Boot {
        let deadline = self.started + BOOT_TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                println!(
                    "boot {}: no exit within {BOOT_TIMEOUT:?}, killing it",
                    self.name
                );
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let secs = self.started.elapsed().as_secs_f64();
        if let Some(r) = self.stdout_reader.take() {
            let _ = r.join();
        }
        self.console.extend(self.lines.try_iter());
        let stderr = self
            .stderr_reader
            .take()
            .map(|r| r.join().unwrap_or_default())
            .unwrap_or_default();
        println!("boot {}: ended with {status} after {secs:.1} s", self.name);
        Boot {
            status,
            console: self.console.join("\n"),
            stderr,
            secs,
        }
    }

    /// `kill -9` of the kestrel process, then [`Vm::finish`].
    fn sigkill(mut self) -> Boot {
        self.child.kill().unwrap();
        self.finish()
    }
}

fn boot(kestrel: &Path, state: &Path, image: &Path, overlay: &Path, seed: &Path) -> Boot {
    Vm::start(kestrel, state, image, overlay, seed).finish()
}

/// The raw bases in the cache.
fn bases(state: &Path) -> Vec<PathBuf> {
    let Ok(dir) = fs::read_dir(state.join("images")) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = dir
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "raw"))
        .collect();
    v.sort();
    v
}

/// Copies the disk as `overlay` over `base` shows it into the raw file `out`.
fn materialize(base: &Path, overlay: &Path, out: &Path) {
    let mut view = Overlay::open(base, overlay).unwrap_or_else(|e| {
        panic!(
            "Overlay::open({}, {}): {e}",
            base.display(),
            overlay.display()
        )
    });
    let size = view.size();
    let mut f = File::create(out).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < size {
        let n = usize::try_from((size - offset).min(buf.len() as u64)).unwrap();
        view.read_at(offset, &mut buf[..n]).unwrap();
        f.write_all(&buf[..n]).unwrap();
        offset += n as u64;
    }
    f.sync_all().unwrap();
}

fn run_tool(program: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (e2fsprogs installed?): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `debugfs -R "cat FILE"` of an ext4 image, trimmed; `None` when it is not there.
fn read_guest_file(raw: &Path, file: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {file}"))
        .arg(raw)
        .stdin(Stdio::null())
        .output()
        .expect("run debugfs (e2fsprogs)");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// Failed checks, reported together at the end.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        let what = what.into();
        println!("{} {what}", if ok { "ok:  " } else { "FAIL:" });
        if !ok {
            self.0.push(what);
        }
    }
}

#[test]
fn vm_image_overlays_are_private_keep_flushed_writes_and_survive_sigkill() {
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        kestrel_test_support::skip(format!("/dev/kvm not usable: {e}"));
        return;
    }
    let kestrel = kestrel_binary();
    vmm::assets::default_asset(vmm::assets::KERNEL)
        .expect("guest kernel built (scripts/build-guest.sh)");
    let disk = images::containerdisk();
    let tmp = TempDir::new();
    let state = tmp.0.join("state");
    let (a, b, c) = (tmp.0.join("A"), tmp.0.join("B"), tmp.0.join("C"));
    let (seed_exit, seed_wait) = (tmp.0.join("seed-exit.img"), tmp.0.join("seed-wait.img"));
    make_seed(&seed_exit, "disk-image-test", &[]);
    make_seed(&seed_wait, "disk-image-test-wait", &[("VM_INIT_WAIT", "1")]);
    let source_hash = sha256_file(&disk.ext4);
    let mut checks = Checks::default();

    // (a) first boot: conversion, the guest's flushed write lands in overlay A only.
    let b1 = boot(&kestrel, &state, &disk.qcow2, &a, &seed_exit);
    checks.check(
        b1.status.code() == Some(0) && b1.previous_boots() == Some(0),
        format!(
            "boot 1 (overlay A): exit 0 and previous-boots=0; got {:?}, previous-boots {:?}{}",
            b1.status.code(),
            b1.previous_boots(),
            if b1.status.code() == Some(0) && b1.previous_boots() == Some(0) {
                String::new()
            } else {
                format!("\n{}", b1.describe())
            }
        ),
    );
    checks.check(
        b1.stderr.contains("converting"),
        "boot 1 converted the QCOW2 (stderr says `converting`)",
    );
    let found = bases(&state);
    checks.check(
        found.len() == 1,
        format!("one base in images/ after boot 1: {found:?}"),
    );
    let Some(base) = found.first().cloned() else {
        panic!("no base in the image cache; failures: {:#?}", checks.0);
    };
    let meta1 = fs::metadata(&base).unwrap();
    checks.check(
        meta1.permissions().mode() & 0o777 == 0o444,
        format!(
            "the base is read-only: mode {:o}",
            meta1.permissions().mode() & 0o777
        ),
    );
    let base_hash = sha256_file(&base);
    checks.check(
        base_hash == source_hash,
        format!(
            "the base is byte-identical to the ext4 the QCOW2 was made from after boot 1 \
             ({base_hash} vs {source_hash})"
        ),
    );
    let view_a = tmp.0.join("A.raw");
    materialize(&base, &a, &view_a);
    let counter_a = read_guest_file(&view_a, BOOTS_FILE);
    checks.check(
        counter_a.as_deref() == Some("1"),
        format!("overlay A holds {BOOTS_FILE} = 1 after boot 1: {counter_a:?}"),
    );

    // (b) the same overlay again keeps the write; another overlay does not see it.
    // Inode and birth time: a deleted and re-created file may get the same inode back.
    let identity = |p: &Path| fs::metadata(p).map(|m| (m.ino(), m.created().ok())).ok();
    let a_before = identity(&a);
    let b2 = boot(&kestrel, &state, &disk.qcow2, &a, &seed_exit);
    let a_after = identity(&a);
    checks.check(
        a_after == a_before,
        format!(
            "boot 2 reopened overlay A rather than replacing it: (inode, birth time) \
             {a_before:?} before, {a_after:?} after"
        ),
    );
    checks.check(
        b2.status.code() == Some(0) && b2.previous_boots() == Some(1),
        format!(
            "boot 2 (overlay A again): exit 0 and previous-boots=1; got {:?}, previous-boots {:?}{}",
            b2.status.code(),
            b2.previous_boots(),
            if b2.previous_boots() == Some(1) {
                String::new()
            } else {
                format!("\n{}", b2.describe())
            }
        ),
    );
    checks.check(
        !b2.stderr.contains("converting"),
        "boot 2 did not convert again",
    );
    let b3 = boot(&kestrel, &state, &disk.qcow2, &b, &seed_exit);
    checks.check(
        b3.status.code() == Some(0) && b3.previous_boots() == Some(0),
        format!(
            "boot 3 (overlay B): exit 0 and previous-boots=0; got {:?}, previous-boots {:?}{}",
            b3.status.code(),
            b3.previous_boots(),
            if b3.previous_boots() == Some(0) {
                String::new()
            } else {
                format!("\n{}", b3.describe())
            }
        ),
    );
    checks.check(
        !b3.stderr.contains("converting"),
        "boot 3 did not convert again",
    );
    let found = bases(&state);
    checks.check(
        found == [base.clone()],
        format!("still exactly one base in images/ after boot 3: {found:?}"),
    );
    let meta3 = fs::metadata(&base).unwrap();
    checks.check(
        (meta3.ino(), meta3.mtime(), meta3.mtime_nsec())
            == (meta1.ino(), meta1.mtime(), meta1.mtime_nsec()),
        "the base's inode and mtime did not change over boots 2 and 3",
    );
    checks.check(
        sha256_file(&base) == base_hash,
        "the base's content did not change over boots 2 and 3",
    );

    // (c) SIGKILL after the guest's fsync: the overlay is consistent and keeps the write.
    let mut vm = Vm::start(&kestrel, &state, &disk.qcow2, &c, &seed_wait);
    let waiting = vm.wait_for("vm-init: waiting");
    let b4 = vm.sigkill();
    checks.check(
        waiting,
        format!(
            "boot 4 (overlay C, VM_INIT_WAIT=1) reached `vm-init: waiting`{}",
            if waiting {
                String::new()
            } else {
                format!("\n{}", b4.describe())
            }
        ),
    );
    checks.check(
        b4.status.signal() == Some(libc::SIGKILL),
        format!("kestrel died of SIGKILL: {}", b4.status),
    );
    let view_c = tmp.0.join("C.raw");
    materialize(&base, &c, &view_c);
    let view = view_c.to_str().unwrap();
    let (replay, replay_out) = run_tool("e2fsck", &["-E", "journal_only", "-y", view]);
    checks.check(
        replay <= 1,
        format!("journal replay (e2fsck -E journal_only -y) exit {replay}: {replay_out}"),
    );
    let (fsck, fsck_out) = run_tool("e2fsck", &["-fn", view]);
    checks.check(
        fsck == 0,
        format!("e2fsck -fn of overlay C after SIGKILL: exit {fsck}\n{fsck_out}"),
    );
    let expected = previous_boots(&b4.console).map(|n| (n + 1).to_string());
    let counter_c = read_guest_file(&view_c, BOOTS_FILE);
    checks.check(
        expected.is_some() && counter_c == expected,
        format!(
            "overlay C holds the flushed counter after SIGKILL: {counter_c:?} (expected {expected:?})"
        ),
    );
    checks.check(
        sha256_file(&base) == base_hash,
        "the base's content did not change over boot 4",
    );

    assert!(
        checks.0.is_empty(),
        "{} check(s) failed:\n{}",
        checks.0.len(),
        checks.0.join("\n")
    );
}
