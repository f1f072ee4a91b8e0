//! Layer 4: VM images (KubeVirt containerDisk layout) through containerd and the kestrel
//! shim, as a user runs them:
//!
//! ```sh
//! ctr run --rm --runtime io.containerd.kestrel.v2 localhost/kestrel-test-vmdisk:1 vm1
//! ```
//!
//! The image (tests/images/build-containerdisk.sh) is an ext4 disk whose `/sbin/init` is
//! `vm-init`: it prints `vm-init: started`, one `vm-init: env K=V` line per variable of the
//! cloud-init seed, `vm-init: previous-boots=<n>` (a counter it keeps on its own disk),
//! then powers off with `VM_INIT_EXIT`, or with `VM_INIT_WAIT=1` waits for SIGTERM/SIGINT
//! (`vm-init: waiting` … `vm-init: shutdown requested`) and powers off with 0.
//!
//! Each VM boot takes about a minute on a kvm_pvm host, so the tests share boots: three in
//! all (one attached run, two detached tasks at once). The tests run one at a time.
//!
//! Skipped (`skipped: …`) without containerd or /dev/kvm. The shim binary is
//! `$KESTREL_SHIM` or `<target>/{debug,release}/containerd-shim-kestrel-v2`; if it is
//! missing the tests FAIL.

// Test code: a failed setup step should panic with its cause.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Duration;

use kestrel_integration_tests::containerd::{self, describe, ConsoleFifo, KESTREL_RUNTIME};
use kestrel_integration_tests::images::{self, VMDISK_IMAGE};
use kestrel_integration_tests::kestrel::{self, assert_gone, unique, Setup};

/// Generous: one Linux boot is about a minute here, two at once on two busy cores more.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// From a shutdown request to the task's exit.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(120);

fn setup() -> Option<Setup> {
    kestrel::setup(&[&images::containerdisk().archive])
}

fn assert_console_has(console: &str, lines: &[&str]) {
    for line in lines {
        assert!(
            console.lines().any(|l| l.trim_end_matches('\r') == *line),
            "console lacks the line {line:?}; console:\n{console}"
        );
    }
    assert!(
        !console.contains("vm-init: error"),
        "vm-init reported an error; console:\n{console}"
    );
}

/// One attached run: the console is ctr's stdout, the environment arrives through the
/// seed, and ctr exits with the guest's status.
#[test]
fn vm_image_console_env_and_exit_status() {
    let Some(setup) = setup() else {
        return;
    };
    let c = &setup.c;
    let id = unique("vm1");
    let out = c.ctr_with_timeout(
        &[
            "run",
            "--rm",
            "--runtime",
            KESTREL_RUNTIME,
            "--env",
            "FOO=bar",
            "--env",
            "VM_INIT_EXIT=3",
            VMDISK_IMAGE,
            &id,
        ],
        BOOT_TIMEOUT,
    );
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_console_has(
        &console,
        &[
            "vm-init: started",
            "vm-init: env FOO=bar",
            "vm-init: env VM_INIT_EXIT=3",
            "vm-init: previous-boots=0",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "ctr run must exit with the guest's status: {}",
        describe(&out)
    );
    assert_gone(c, &id);
}

/// Two detached tasks of one image at once (each on its own overlay over one converted
/// base, so both see a fresh disk); a shim killed with SIGKILL that `ctr task rm` /
/// `ctr container rm` still clean up after; a graceful stop with `ctr task kill` (SIGTERM).
#[test]
fn vm_image_two_tasks_kill_and_shim_sigkill() {
    let Some(setup) = setup() else {
        return;
    };
    let c = &setup.c;
    let a = unique("vm-a");
    let b = unique("vm-b");
    let console_a = ConsoleFifo::new(c.dir().join("vm-a.console"));
    let console_b = ConsoleFifo::new(c.dir().join("vm-b.console"));
    for (id, console, who) in [(&a, &console_a, "WHO=a"), (&b, &console_b, "WHO=b")] {
        let log_uri = console.path().to_str().unwrap();
        let out = c.ctr_with_timeout(
            &[
                "run",
                "-d",
                "--runtime",
                KESTREL_RUNTIME,
                "--log-uri",
                log_uri,
                "--env",
                "VM_INIT_WAIT=1",
                "--env",
                who,
                VMDISK_IMAGE,
                id,
            ],
            BOOT_TIMEOUT,
        );
        assert!(out.status.success(), "ctr run -d {id}: {}", describe(&out));
    }
    for (id, console, who) in [(&a, &console_a, "WHO=a"), (&b, &console_b, "WHO=b")] {
        assert!(
            console.wait_for("vm-init: waiting", BOOT_TIMEOUT),
            "{id} did not reach `vm-init: waiting`; console:\n{}",
            console.text()
        );
        assert_console_has(
            &console.text(),
            &[
                "vm-init: started",
                &format!("vm-init: env {who}"),
                "vm-init: env VM_INIT_WAIT=1",
                "vm-init: previous-boots=0",
            ],
        );
        assert_eq!(
            c.task_status(id).as_deref(),
            Some("RUNNING"),
            "tasks: {:?}",
            c.tasks()
        );
    }

    // Kill b's shim (and with it the VM) with SIGKILL; containerd and the `delete` action
    // must still clean up.
    let shim = c.kestrel_shim_pid(&b).unwrap_or_else(|| {
        panic!(
            "no kestrel shim process for {b} among {:?}",
            c.shim_processes()
        )
    });
    containerd::assert_guest_threads_confined(shim);
    assert!(containerd::kill9(shim), "shim {shim} survived SIGKILL");
    assert!(
        c.wait_task_stopped(&b, SHUTDOWN_TIMEOUT),
        "{b} still running after its shim died: {:?}",
        c.tasks()
    );
    let out = c.ctr(&["task", "rm", "-f", &b]);
    let err = String::from_utf8_lossy(&out.stderr);
    // containerd may have cleaned up the dead shim's task by itself already.
    assert!(
        out.status.success() || err.contains("not found"),
        "ctr task rm {b}: {}",
        describe(&out)
    );
    c.ctr_ok(&["container", "rm", &b]);
    assert_gone(c, &b);

    // The other VM was not disturbed. Graceful: SIGTERM asks the guest to shut down
    // (Ctrl-Alt-Del → SIGINT to init); vm-init powers off with status 0.
    assert_eq!(
        c.task_status(&a).as_deref(),
        Some("RUNNING"),
        "tasks: {:?}",
        c.tasks()
    );
    c.ctr_ok(&["task", "kill", &a]);
    assert!(
        console_a.wait_for("vm-init: shutdown requested", SHUTDOWN_TIMEOUT),
        "{a} did not see the shutdown request; console:\n{}",
        console_a.text()
    );
    assert!(
        c.wait_task_stopped(&a, SHUTDOWN_TIMEOUT),
        "{a} did not stop: {:?}",
        c.tasks()
    );
    let out = c.ctr(&["task", "rm", &a]);
    assert!(out.status.success(), "ctr task rm {a}: {}", describe(&out));
    // ctr 1.6 reports a non-zero exit status as a warning: "task <id> exit with non-zero
    // exit code <n>".
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("non-zero exit code"),
        "{a} must power off with status 0: {}",
        describe(&out)
    );
    c.ctr_ok(&["container", "rm", &a]);
    assert_gone(c, &a);

    assert!(c.tasks().is_empty(), "tasks left: {:?}", c.tasks());
}
