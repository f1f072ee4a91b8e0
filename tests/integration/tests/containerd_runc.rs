//! Layer 4 sanity: the private containerd fixture and the hand-made OCI images work with
//! plain runc, so a failure in `containerd_kestrel.rs` is about the shim, not the setup.
//!
//! Needs containerd and runc (scripts/install-deps.sh); without them the tests print
//! `skipped: containerd not installed`.

// Test code: a failed setup step should panic with its cause.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use kestrel_integration_tests::containerd::{describe, which, ConsoleFifo, Containerd, NAMESPACE};
use kestrel_integration_tests::images::{self, BUSYBOX_IMAGE, VMDISK_IMAGE};

fn containerd() -> Option<Containerd> {
    let c = Containerd::builder().start_or_skip()?;
    if which("runc").is_none() {
        kestrel_test_support::skip("runc not installed");
        return None;
    }
    Some(c)
}

/// `ctr run --rm localhost/busybox:1 t1 echo hello` prints hello; the containerDisk image
/// imports and names itself too; a detached task's stdout reaches a [`ConsoleFifo`]
/// through `--log-uri`, and `ctr task kill` / `ctr task rm` end it.
#[test]
fn busybox_with_runc() {
    let Some(c) = containerd() else { return };
    c.import(images::busybox(), NAMESPACE);
    c.import(&images::containerdisk().archive, NAMESPACE);
    let listed = c.ctr_ok(&["image", "ls", "-q"]);
    assert!(
        listed.lines().any(|l| l == BUSYBOX_IMAGE),
        "images: {listed}"
    );
    assert!(
        listed.lines().any(|l| l == VMDISK_IMAGE),
        "images: {listed}"
    );

    let out = c.ctr(&["run", "--rm", BUSYBOX_IMAGE, "t1", "echo", "hello"]);
    assert!(out.status.success(), "ctr run: {}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello",
        "{}",
        describe(&out)
    );

    // Exit status and environment pass through ctr.
    let out = c.ctr(&[
        "run",
        "--rm",
        "--env",
        "FOO=bar",
        BUSYBOX_IMAGE,
        "t2",
        "sh",
        "-c",
        "echo FOO=$FOO; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "FOO=bar");

    // Detached, with stdout into our FIFO; SIGTERM ends it.
    let fifo = ConsoleFifo::new(c.dir().join("t3.out"));
    let log_uri = fifo.path().to_str().unwrap().to_owned();
    let script = "trap 'echo got-term; exit 0' TERM; echo waiting; while :; do sleep 0.1; done";
    c.ctr_ok(&[
        "run",
        "-d",
        "--log-uri",
        &log_uri,
        BUSYBOX_IMAGE,
        "t3",
        "sh",
        "-c",
        script,
    ]);
    assert!(
        fifo.wait_for("waiting\n", Duration::from_secs(30)),
        "console: {:?}",
        fifo.text()
    );
    assert_eq!(c.task_status("t3").as_deref(), Some("RUNNING"));
    c.ctr_ok(&["task", "kill", "t3"]);
    assert!(
        c.wait_task_stopped("t3", Duration::from_secs(30)),
        "t3 did not stop"
    );
    assert!(
        fifo.wait_for("got-term\n", Duration::from_secs(10)),
        "console: {:?}",
        fifo.text()
    );
    let out = c.ctr(&["task", "rm", "t3"]);
    assert!(out.status.success(), "ctr task rm: {}", describe(&out));
    c.ctr_ok(&["container", "rm", "t3"]);
    assert!(c.tasks().is_empty(), "tasks left: {:?}", c.tasks());
    assert!(
        c.containers().is_empty(),
        "containers left: {:?}",
        c.containers()
    );
    assert!(
        c.shim_processes().is_empty(),
        "shims left: {:?}",
        c.shim_processes()
    );
}

/// A shim killed with SIGKILL: containerd notices, and `ctr task rm` / `ctr container rm`
/// still clean up (the same scenario as the kestrel test, checked here with runc's shim).
#[test]
fn runc_shim_killed() {
    let Some(c) = containerd() else { return };
    c.import(images::busybox(), NAMESPACE);
    c.ctr_ok(&["run", "-d", BUSYBOX_IMAGE, "k1", "sleep", "600"]);
    let shim = c
        .shim_processes()
        .into_iter()
        .find(|p| p.args.iter().any(|a| a == "k1"))
        .unwrap_or_else(|| panic!("no shim for k1 among {:?}", c.shim_processes()));
    assert!(
        kestrel_integration_tests::containerd::kill9(shim.pid),
        "shim {} survived SIGKILL",
        shim.pid
    );
    // containerd cleans up a dead shim's task by itself; rm may find it already gone.
    let out = c.ctr(&["task", "rm", "-f", "k1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("not found"),
        "ctr task rm: {}",
        describe(&out)
    );
    c.ctr_ok(&["container", "rm", "k1"]);
    assert!(c.tasks().is_empty(), "tasks left: {:?}", c.tasks());
    assert!(
        c.containers().is_empty(),
        "containers left: {:?}",
        c.containers()
    );
}
