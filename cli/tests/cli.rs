//! The `kestrel` binary as a user runs it: exit statuses, console output and one-line
//! errors. Tests that boot need /dev/kvm and print `skipped: <reason>` without it.

// Test code: a failed setup step should panic with its cause.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

#[path = "../../vmm/tests/payloads/assemble.rs"]
mod assemble;

fn kestrel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(args)
        .env("KESTREL_ASSETS", "/nonexistent-kestrel-assets")
        .env("HOME", "/nonexistent-home")
        .stdin(Stdio::null())
        .output()
        .expect("kestrel runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn kvm_unavailable() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
        .map(|e| format!("/dev/kvm not usable: {e}"))
}

/// Asserts a kestrel error: status 125 and exactly one line on stderr containing `what`.
fn assert_error(o: &Output, what: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("kestrel: error: ") && err.contains(what),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2_with_usage() {
    for args in [
        &[][..],
        &["boot"],
        &["run", "--cpus", "two"],
        &["run", "--kernel"],
        &["run", "--bogus"],
    ] {
        let o = kestrel(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(stderr(&o).contains("usage:"), "{args:?}");
    }
    let o = kestrel(&["--help"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("kestrel run"));
}

#[test]
fn missing_default_assets_say_where_they_were_looked_for() {
    let o = kestrel(&["run"]);
    assert_error(
        &o,
        "no default vmlinux found (looked in /nonexistent-kestrel-assets",
    );
    assert!(stderr(&o).contains("scripts/build-guest.sh"));
}

#[test]
fn bad_kernel_and_sizes_are_one_line_errors() {
    let dir = assemble::out_dir();
    let script = dir.join("cli-not-a-kernel");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let s = script.to_str().unwrap();
    assert_error(
        &kestrel(&["run", "--kernel", "/nonexistent/vmlinux", "--no-initrd"]),
        "kernel /nonexistent/vmlinux does not exist",
    );
    assert_error(
        &kestrel(&["run", "--kernel", s, "--no-initrd", "--cpus", "0"]),
        "at least 1 vCPU",
    );
    assert_error(
        &kestrel(&["run", "--kernel", s, "--no-initrd", "--cpus", "255"]),
        "255 vCPUs asked",
    );
    assert_error(
        &kestrel(&["run", "--kernel", s, "--no-initrd", "--memory", "0"]),
        "0 MiB asked",
    );
    assert_error(
        &kestrel(&["run", "--kernel", s, "--no-initrd", "--memory", "100000000"]),
        "this host has",
    );
    // A VM that cannot start fails before its image is converted.
    let state = tempfile::tempdir().unwrap();
    let image = state.path().join("disk.raw");
    std::fs::write(&image, vec![1u8; 1 << 20]).unwrap();
    for (args, what) in [
        (
            vec!["--kernel", "/nonexistent/vmlinux"],
            "kernel /nonexistent/vmlinux does not exist",
        ),
        (
            vec!["--kernel", s, "--memory", "100000000"],
            "this host has",
        ),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_kestrel"))
            .arg("run")
            .args(&args)
            .arg("--image")
            .arg(&image)
            .env("KESTREL_STATE_DIR", state.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_error(&o, what);
        assert!(
            !state.path().join("images").exists(),
            "{args:?}: converted before refusing"
        );
    }
    if let Some(why) = kvm_unavailable() {
        kestrel_test_support::skip(format!("the not-a-kernel check needs KVM: {why}"));
        return;
    }
    assert_error(
        &kestrel(&["run", "--kernel", s, "--no-initrd"]),
        "is not a kernel kestrel can boot",
    );
}

#[test]
fn runs_a_guest_and_exits_with_its_status() {
    if let Some(why) = kvm_unavailable() {
        kestrel_test_support::skip(why);
        return;
    }
    let hello = assemble::payload("hello");
    let o = kestrel(&["run", "--kernel", hello.to_str().unwrap(), "--no-initrd"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "hello from the payload\n"
    );
    assert_eq!(o.status.code(), Some(42));
    let err = stderr(&o);
    assert!(err.contains("guest boot time"), "{err}");
    assert!(err.contains("powered off with status 42"), "{err}");
    assert!(Path::new(&hello).exists());
}
