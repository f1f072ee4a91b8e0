//! Layer 4: bad input to the kestrel shim through containerd, as a matrix. Each case is a
//! `ctr run --config SPEC` (the spec's root is a directory made here, so a bad image layout
//! needs no image import) that must fail with the right gRPC code — containerd shows it
//! as the error's last words (`failed precondition`, `invalid argument`) — and a message
//! naming what and where, and leave nothing behind (`assert_gone`). Nothing here boots a
//! guest: every case is refused before a VM exists, so the matrix takes seconds.
//!
//! Skipped (`skipped: …`) without containerd or /dev/kvm.

// Test code: a failed setup step should panic with its cause.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use kestrel_integration_tests::containerd::{describe, Containerd};
use kestrel_integration_tests::kestrel::{self, assert_gone, unique};

const TIMEOUT: Duration = Duration::from_secs(120);

/// One refused input.
struct Case {
    name: &'static str,
    /// Builds the spec's root directory.
    root: fn(&Path),
    /// Annotations of the spec.
    annotations: &'static [(&'static str, &'static str)],
    /// The process's args (None: the spec's default).
    args: Option<&'static [&'static str]>,
    /// The words containerd ends the error with (the gRPC code).
    code: &'static str,
    /// What the message must say.
    says: &'static [&'static str],
}

fn disk_dir(root: &Path) -> PathBuf {
    let d = root.join("disk");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// A 1 MiB raw disk: a VM image whose boot would succeed up to the VM itself.
fn raw_disk(root: &Path) {
    std::fs::write(disk_dir(root).join("disk.raw"), vec![0u8; 1 << 20]).unwrap();
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "disk-is-a-directory",
            root: |r| std::fs::create_dir(disk_dir(r).join("disk.qcow2")).unwrap(),
            annotations: &[],
            args: None,
            code: "failed precondition",
            says: &["/disk/disk.qcow2 is a directory, not a regular disk image file"],
        },
        Case {
            name: "disk-is-a-fifo",
            root: |r| mkfifo(&disk_dir(r).join("disk.qcow2")),
            annotations: &[],
            args: None,
            code: "failed precondition",
            says: &["/disk/disk.qcow2 is a FIFO"],
        },
        Case {
            name: "disk-links-to-a-host-file",
            root: |r| {
                std::os::unix::fs::symlink("/etc/passwd", disk_dir(r).join("disk.raw")).unwrap()
            },
            annotations: &[],
            args: None,
            code: "failed precondition",
            says: &["/disk/disk.raw is a symbolic link"],
        },
        Case {
            name: "disk-dir-links-to-the-host",
            root: |r| std::os::unix::fs::symlink("/var/lib", r.join("disk")).unwrap(),
            annotations: &[],
            args: None,
            code: "failed precondition",
            says: &["/disk is a symbolic link, not a directory"],
        },
        Case {
            name: "unknown-disk-format",
            root: |r| std::fs::write(disk_dir(r).join("win.vmdk"), b"KDMV").unwrap(),
            annotations: &[],
            args: None,
            code: "failed precondition",
            says: &["/disk/win.vmdk is a VMDK disk", "qemu-img convert"],
        },
        Case {
            name: "two-disks",
            root: |r| {
                raw_disk(r);
                std::fs::write(disk_dir(r).join("data.qcow2"), b"QFI\xfb").unwrap();
            },
            annotations: &[],
            args: None,
            code: "failed precondition",
            says: &["several disks in /disk (data.qcow2, disk.raw)"],
        },
        Case {
            name: "truncated-qcow2",
            root: |r| {
                let mut h = b"QFI\xfb\0\0\0\x03".to_vec();
                h.resize(40, 0);
                std::fs::write(disk_dir(r).join("disk.qcow2"), h).unwrap();
            },
            annotations: &[],
            args: None,
            code: "failed precondition",
            says: &["prepare the VM image", "disk.qcow2"],
        },
        Case {
            name: "bad-cpus-annotation",
            root: raw_disk,
            annotations: &[("io.kestrel.vm.cpus", "lots")],
            args: None,
            code: "invalid argument",
            says: &[r#"io.kestrel.vm.cpus="lots""#],
        },
        Case {
            name: "bad-memory-annotation",
            root: raw_disk,
            annotations: &[("io.kestrel.vm.memory_mib", "-5")],
            args: None,
            code: "invalid argument",
            says: &[r#"io.kestrel.vm.memory_mib="-5""#],
        },
        Case {
            name: "more-memory-than-the-host",
            root: raw_disk,
            annotations: &[("io.kestrel.vm.memory_mib", "1073741824")],
            args: None,
            code: "invalid argument",
            says: &["1073741824 MiB of guest memory asked; this host has"],
        },
        Case {
            name: "container-more-vcpus-than-the-host",
            root: |r| std::fs::create_dir_all(r.join("bin")).unwrap(),
            annotations: &[("io.kestrel.vm.cpus", "255")],
            args: Some(&["/bin/true"]),
            code: "invalid argument",
            says: &["255 vCPUs asked; this host allows at most"],
        },
        Case {
            name: "bad-agent-timeout",
            root: |r| std::fs::create_dir_all(r.join("bin")).unwrap(),
            annotations: &[("io.kestrel.vm.agent_timeout_seconds", "soon")],
            args: Some(&["/bin/true"]),
            code: "invalid argument",
            says: &["io.kestrel.vm.agent_timeout_seconds"],
        },
    ]
}

/// Writes the spec of a case: ctr's default spec with `root` as its root.
fn write_spec(c: &Containerd, dir: &Path, case: &Case, root: &Path) -> PathBuf {
    let annotations: serde_json::Map<String, serde_json::Value> = case
        .annotations
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
        .collect();
    let path = dir.join(format!("{}.json", case.name));
    kestrel::write_spec(
        c,
        &path,
        root,
        serde_json::Value::Object(annotations),
        case.args,
    );
    path
}

/// Runs `case` through `c`; returns what went wrong (None: as expected).
fn check(c: &Containerd, dir: &Path, case: &Case) -> Option<String> {
    let root = dir.join(format!("{}-root", case.name));
    std::fs::create_dir_all(&root).unwrap();
    (case.root)(&root);
    let spec = write_spec(c, dir, case, &root);
    let id = unique(&format!("bad-{}", case.name));
    let args = kestrel::run_config_args(&spec, &id);
    let out = c.ctr_with_timeout(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        TIMEOUT,
    );
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    eprintln!("{}: {err}", case.name);
    let mut wrong = Vec::new();
    if out.status.success() {
        wrong.push("succeeded".to_string());
    }
    if !err.ends_with(case.code) {
        wrong.push(format!("does not end with {:?}", case.code));
    }
    for s in case.says {
        if !err.contains(s) {
            wrong.push(format!("does not say {s:?}"));
        }
    }
    // ctr --rm leaves the container to us after a failed start.
    let _ = c.ctr(&["container", "rm", &id]);
    if let Err(e) = std::panic::catch_unwind(|| assert_gone(c, &id)) {
        let what = e
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "left something".into());
        wrong.push(what);
    }
    (!wrong.is_empty())
        .then(|| format!("{}: {}\n  {}", case.name, wrong.join("; "), describe(&out)))
}

#[test]
fn bad_input_gets_its_grpc_code_a_message_and_leaves_nothing() {
    let Some(setup) = kestrel::setup(&[]) else {
        return;
    };
    let c = &setup.c;
    let dir = c.dir().join("bad-input");
    std::fs::create_dir_all(&dir).unwrap();
    let cases = cases();
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| check(c, &dir, case))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    kestrel_test_support::campaign(format_args!(
        "bad input to the shim: {} cases, each refused as expected, nothing left",
        cases.len()
    ));
}

/// The shim's environment is wrong: no guest kernel where `KESTREL_ASSETS` points, or an
/// unknown `KESTREL_SECCOMP` level.
#[test]
fn a_shim_environment_without_assets_or_with_a_bad_seccomp_level_is_refused() {
    let Some(setup) = kestrel::setup(&[]) else {
        return;
    };
    let shim = kestrel_integration_tests::shim_binary().unwrap();
    let dir = setup.c.dir().join("bad-env");
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("no-assets");
    std::fs::create_dir_all(&empty).unwrap();
    let container = |name: &'static str, says: &'static [&'static str]| Case {
        name,
        root: |r| std::fs::create_dir_all(r.join("bin")).unwrap(),
        annotations: &[],
        args: Some(&["/bin/true"]),
        code: "failed precondition",
        says,
    };
    let vm_image = |name: &'static str, says: &'static [&'static str]| Case {
        name,
        root: raw_disk,
        annotations: &[],
        args: None,
        code: "failed precondition",
        says,
    };
    let mut failures = Vec::new();
    let mut cases = 0;
    let no_assets = Containerd::builder()
        .shim(&shim)
        .env("KESTREL_ASSETS", &empty)
        .start()
        .unwrap();
    let looked = format!("no default vmlinux found (looked in {})", empty.display());
    let looked: &'static str = Box::leak(looked.into_boxed_str());
    for case in [
        container("no-kernel-container", Box::leak(Box::new([looked]))),
        vm_image(
            "no-kernel-vm-image",
            Box::leak(Box::new(["find the guest kernel", looked])),
        ),
    ] {
        failures.extend(check(&no_assets, &dir, &case));
        cases += 1;
    }
    drop(no_assets);
    let bad_level = Containerd::builder()
        .shim(&shim)
        .env("KESTREL_SECCOMP", "strict")
        .start()
        .unwrap();
    let says: &'static [&'static str] = &[
        "KESTREL_SECCOMP",
        "unknown seccomp level \"strict\" (expected enforce, log or off)",
    ];
    for case in [
        container("bad-seccomp-container", says),
        vm_image("bad-seccomp-vm-image", says),
    ] {
        failures.extend(check(&bad_level, &dir, &case));
        cases += 1;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    kestrel_test_support::campaign(format_args!(
        "bad input to the shim: {cases} cases of a bad shim environment, each refused as expected, nothing left"
    ));
}
