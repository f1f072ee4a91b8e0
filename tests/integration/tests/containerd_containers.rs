//! Layer 4: ordinary containers in a microVM, through containerd and the kestrel shim, as a
//! user runs them:
//!
//! ```sh
//! ctr run --rm --runtime io.containerd.kestrel.v2 localhost/busybox:1 c1 echo hi
//! ```
//!
//! Each container boots our guest kernel and agent (tens of seconds on a kvm_pvm host), so
//! every boot checks several things; the tests run one at a time.
//!
//! Skipped (`skipped: …`) without containerd or /dev/kvm. The shim binary is
//! `$KESTREL_SHIM` or `<target>/{debug,release}/containerd-shim-kestrel-v2`; if it is
//! missing the tests FAIL.

// Test code: a failed setup step should panic with its cause.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kestrel_integration_tests::containerd::{
    self, describe, run_with_timeout, ConsoleFifo, Containerd, KESTREL_RUNTIME, NAMESPACE,
};
use kestrel_integration_tests::images::{self, BUSYBOX_IMAGE};
use kestrel_integration_tests::kestrel::{self, assert_gone, unique, Setup};

/// Generous: one Linux boot is 20–60 s here, more on two busy cores.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// An exec or a signal in a running container.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

fn setup() -> Option<Setup> {
    kestrel::setup(&[images::busybox()])
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).replace('\r', "")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `sh -c SCRIPT` (for pipes and `script`, which gives ctr a terminal).
fn shell(script: &str, timeout: Duration) -> Output {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script);
    run_with_timeout(cmd, timeout)
}

fn ctr_prefix(c: &Containerd) -> String {
    format!("ctr -a {} -n {NAMESPACE}", c.socket().display())
}

/// A task's output lines, stdout and stderr kept apart, its exit status, its hostname, a
/// seeded RNG; writes stay in the container's own layer (a second container of the same
/// image, on the cached root image, does not see them); the memory limit applies in the
/// guest and its OOM kill is published as TaskOOM.
#[test]
fn container_output_exit_status_and_private_rootfs() {
    let Some(setup) = setup() else {
        return;
    };
    let c = &setup.c;
    let a = unique("ca");
    let out = c.ctr_with_timeout(
        &[
            "run",
            "--rm",
            "--runtime",
            KESTREL_RUNTIME,
            "--env",
            "GREETING=hello",
            BUSYBOX_IMAGE,
            &a,
            "sh",
            "-c",
            // /dev/random blocks until the guest's RNG is seeded (virtio-rng).
            "echo hi; echo oops >&2; echo $GREETING; echo data > /written; cat /written; hostname; head -c 8 /dev/random | wc -c; exit 3",
        ],
        BOOT_TIMEOUT,
    );
    assert_eq!(
        stdout(&out).lines().collect::<Vec<_>>(),
        ["hi", "hello", "data", a.as_str(), "8"],
        "{}",
        describe(&out)
    );
    assert!(stderr(&out).contains("oops"), "{}", describe(&out));
    assert_eq!(
        out.status.code(),
        Some(3),
        "ctr must exit with the status: {}",
        describe(&out)
    );
    assert_gone(c, &a);

    let b = unique("cb");
    let out = c.ctr_with_timeout(
        &[
            "run",
            "--rm",
            "--runtime",
            KESTREL_RUNTIME,
            "--memory-limit",
            "8388608",
            BUSYBOX_IMAGE,
            &b,
            "sh",
            "-c",
            // A string that doubles until the container's 8 MiB limit stops it.
            r#"cat /written || echo not-there; awk 'BEGIN { s = "x"; while (1) s = s s }'; echo awk=$?"#,
        ],
        BOOT_TIMEOUT,
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        stdout(&out).lines().collect::<Vec<_>>(),
        ["not-there", "awk=137"],
        "{}",
        describe(&out)
    );
    let log = c.log();
    assert!(
        log.contains(&format!(
            "task {b}: the guest's OOM killer killed a process"
        )) && log.contains("topic=/tasks/oom"),
        "the OOM kill must be published as TaskOOM; log:\n{}",
        c.log_tail(40)
    );
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("task {b}: container")) && l.contains("(cached)")),
        "the second container must use the cached root image; log:\n{}",
        c.log_tail(40)
    );
    assert_gone(c, &b);
}

/// One long-running container: exec (output, exit status, stdin piped through, a
/// terminal with its size), `ctr task ps`, `ctr task metrics`, signals to an exec (TERM
/// ignored, then KILL), SIGTERM to an init that traps it.
#[test]
fn container_exec_ps_metrics_and_signals() {
    let Some(setup) = setup() else {
        return;
    };
    let c = &setup.c;
    let id = unique("cx");
    let console = ConsoleFifo::new(c.dir().join("cx.console"));
    let out = c.ctr_with_timeout(
        &[
            "run",
            "-d",
            "--runtime",
            KESTREL_RUNTIME,
            "--log-uri",
            console.path().to_str().unwrap(),
            BUSYBOX_IMAGE,
            &id,
            "sh",
            "-c",
            "trap 'echo got-TERM; exit 7' TERM; echo ready; while true; do sleep 1; done",
        ],
        BOOT_TIMEOUT,
    );
    assert!(out.status.success(), "ctr run -d: {}", describe(&out));
    assert!(
        console.wait_for("ready", BOOT_TIMEOUT),
        "no `ready`; console:\n{}",
        console.text()
    );
    assert_eq!(c.task_status(&id).as_deref(), Some("RUNNING"));

    let out = c.ctr_with_timeout(
        &[
            "task",
            "exec",
            "--exec-id",
            "e1",
            &id,
            "sh",
            "-c",
            "echo exec-out; echo exec-err >&2; exit 5",
        ],
        CALL_TIMEOUT,
    );
    assert_eq!(stdout(&out).trim(), "exec-out", "{}", describe(&out));
    assert!(stderr(&out).contains("exec-err"), "{}", describe(&out));
    assert_eq!(out.status.code(), Some(5), "{}", describe(&out));

    let ctr = ctr_prefix(c);
    let out = shell(
        &format!(
            "printf 'line1\\nline2\\n' | {ctr} task exec --exec-id e2 {id} sh -c 'cat; echo done'"
        ),
        CALL_TIMEOUT,
    );
    assert_eq!(stdout(&out), "line1\nline2\ndone\n", "{}", describe(&out));

    // `script` gives ctr a terminal of 40x100; the exec's terminal gets that size.
    let out = shell(
        &format!(
            "script -qec \"stty rows 40 cols 100; {ctr} task exec -t --exec-id e3 {id} sh -c 'test -t 0 && echo is-a-tty; stty size'\" /dev/null"
        ),
        CALL_TIMEOUT,
    );
    let text = stdout(&out);
    assert!(
        text.contains("is-a-tty") && text.contains("40 100"),
        "{}",
        describe(&out)
    );

    let ps = c.ctr_ok(&["task", "ps", &id]);
    let pids: Vec<u32> = ps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(pids.len() >= 2, "sh and sleep at least: {ps}");
    let metrics = c.ctr_ok(&["task", "metrics", &id]);
    let usage: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("memory.usage "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no memory.usage in:\n{metrics}"));
    assert!(usage > 0, "{metrics}");
    assert!(metrics.contains("cpu.usage_usec"), "{metrics}");

    // An exec that ignores SIGTERM: TERM leaves it running, KILL ends it with 137.
    let mut stubborn = c.ctr_spawn(&[
        "task",
        "exec",
        "--exec-id",
        "e4",
        &id,
        "sh",
        "-c",
        "trap '' TERM; echo ignoring; while true; do sleep 1; done",
    ]);
    assert!(
        stubborn.stdout.wait_for("ignoring", CALL_TIMEOUT),
        "exec e4 did not start"
    );
    c.ctr_ok(&["task", "kill", "--exec-id", "e4", "-s", "TERM", &id]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        stubborn.wait_timeout(Duration::ZERO).is_none(),
        "e4 ended on SIGTERM"
    );
    c.ctr_ok(&["task", "kill", "--exec-id", "e4", "-s", "KILL", &id]);
    let out = stubborn
        .wait_timeout(CALL_TIMEOUT)
        .expect("e4 did not end on SIGKILL");
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));

    // The init traps SIGTERM and exits 7.
    c.ctr_ok(&["task", "kill", &id]);
    assert!(
        console.wait_for("got-TERM", CALL_TIMEOUT),
        "console:\n{}",
        console.text()
    );
    assert!(
        c.wait_task_stopped(&id, CALL_TIMEOUT),
        "tasks: {:?}",
        c.tasks()
    );
    let out = c.ctr(&["task", "rm", &id]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        stderr(&out).contains("exit code 7"),
        "ctr task rm reports the exit status: {}",
        describe(&out)
    );
    c.ctr_ok(&["container", "rm", &id]);
    assert_gone(c, &id);
}

/// `ctr run -t` gives the process a terminal of ctr's size; `--seccomp` (containerd's
/// default profile, an allow list with argument conditions) lets a shell run.
#[test]
fn container_run_with_a_terminal() {
    let Some(setup) = setup() else {
        return;
    };
    let c = &setup.c;
    let id = unique("ct");
    let out = shell(
        &format!(
            "script -qec \"stty rows 33 cols 77; {} run --rm -t --seccomp --runtime {KESTREL_RUNTIME} {BUSYBOX_IMAGE} {id} sh -c 'test -t 0 && echo is-a-tty; stty size; exit 4'\" /dev/null; echo status=$?",
            ctr_prefix(c)
        ),
        BOOT_TIMEOUT,
    );
    let text = stdout(&out);
    assert!(
        text.contains("is-a-tty") && text.contains("33 77"),
        "{}",
        describe(&out)
    );
    assert!(
        text.contains("status=4"),
        "ctr exits with the status: {}",
        describe(&out)
    );
    assert_gone(c, &id);
}

/// A directory with busybox, for specs whose root is a host directory.
fn busybox_root(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "echo", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    root
}

/// A spec from a file (`ctr run --config`): its hooks run on the host with the state on
/// stdin, whose pid is in the container's own network namespace; its seccomp profile and
/// read-only root apply in the guest; a process whose binary is missing, and a bad
/// annotation, fail with clear errors and leave nothing behind.
#[test]
fn container_spec_hooks_and_missing_binary() {
    let Some(setup) = setup() else {
        return;
    };
    let c = &setup.c;
    let dir = c.dir().join("hooks");
    std::fs::create_dir_all(&dir).unwrap();
    let base: serde_json::Value = serde_json::from_str(&c.ctr_ok(&["oci", "spec"])).unwrap();
    let spec_with = |root: &Path, args: &[&str], tag: &str| -> PathBuf {
        let mut s = base.clone();
        // A deny list: mkdir fails with EACCES, everything else is allowed.
        s["linux"]["seccomp"] = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}],
        });
        // The busybox root is read-only; the empty one is not (nothing writes there).
        s["root"] = serde_json::json!({"path": root, "readonly": tag == "ok"});
        s["process"]["args"] = serde_json::json!(args);
        s["process"]["terminal"] = serde_json::json!(false);
        let hook = |stage: &str| {
            serde_json::json!([{
                "path": "/bin/sh",
                "args": ["sh", "-c", format!("cat > {}/{tag}-{stage}.json", dir.display())],
            }])
        };
        // createRuntime also records the network namespace of the state's pid (what
        // nerdctl's hook wires the container's network into).
        let state_file = dir.join(format!("{tag}-createRuntime.json"));
        let create = format!(
            "cat > {f}; /bin/sed -E 's/.*\"pid\":([0-9]+).*/\\1/' {f} | {{ read p; /bin/readlink /proc/$p/ns/net > {d}/{tag}-netns; }}",
            f = state_file.display(),
            d = dir.display()
        );
        s["hooks"] = serde_json::json!({
            "createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", create]}],
            "poststart": hook("poststart"),
            "poststop": hook("poststop"),
        });
        let path = dir.join(format!("{tag}.json"));
        std::fs::write(&path, serde_json::to_vec(&s).unwrap()).unwrap();
        path
    };
    let state = |tag: &str, stage: &str| -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(dir.join(format!("{tag}-{stage}.json"))).ok()?;
        serde_json::from_str(&text).ok()
    };

    // An empty root: the binary is missing.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let id = unique("cm");
    let spec = spec_with(&empty, &["/bin/true"], "missing");
    let out = c.ctr_with_timeout(
        &[
            "run",
            "--rm",
            "--runtime",
            KESTREL_RUNTIME,
            "--config",
            spec.to_str().unwrap(),
            &id,
        ],
        BOOT_TIMEOUT,
    );
    assert!(!out.status.success(), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains("/bin/true") && err.contains("No such file"),
        "the error must name the missing binary: {}",
        describe(&out)
    );
    assert_eq!(
        state("missing", "createRuntime").unwrap()["id"],
        id.as_str()
    );
    assert!(
        state("missing", "poststart").is_none(),
        "poststart ran without a start"
    );
    assert!(
        state("missing", "poststop").is_some(),
        "poststop did not run"
    );
    // ctr --rm leaves the container to us after a failed start.
    let _ = c.ctr(&["container", "rm", &id]);
    assert_gone(c, &id);

    // A bad annotation is refused before anything boots, naming the annotation.
    let id = unique("cb");
    let mut bad: serde_json::Value =
        serde_json::from_slice(&std::fs::read(spec_with(&empty, &["/bin/true"], "bad")).unwrap())
            .unwrap();
    bad["annotations"] = serde_json::json!({"io.kestrel.vm.cpus": "many"});
    let bad_spec = dir.join("bad-annotation.json");
    std::fs::write(&bad_spec, serde_json::to_vec(&bad).unwrap()).unwrap();
    let out = c.ctr_with_timeout(
        &[
            "run",
            "--rm",
            "--runtime",
            KESTREL_RUNTIME,
            "--config",
            bad_spec.to_str().unwrap(),
            &id,
        ],
        BOOT_TIMEOUT,
    );
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        stderr(&out).contains(r#"io.kestrel.vm.cpus="many""#),
        "the error must name the annotation: {}",
        describe(&out)
    );
    assert!(
        state("bad", "createRuntime").is_none(),
        "hooks ran for a refused spec"
    );
    let _ = c.ctr(&["container", "rm", &id]);
    assert_gone(c, &id);

    // A root with busybox: every hook sees the container's state.
    let root = busybox_root(&dir);
    let id = unique("ch");
    let spec = spec_with(
        &root,
        &[
            "sh",
            "-c",
            "mkdir /made 2>/dev/null || echo mkdir-denied; echo x > /file 2>/dev/null || echo read-only; echo x > /dev/shm/f && echo shm-writable; echo from-spec",
        ],
        "ok",
    );
    let started = Instant::now();
    let out = c.ctr_with_timeout(
        &[
            "run",
            "--rm",
            "--runtime",
            KESTREL_RUNTIME,
            "--config",
            spec.to_str().unwrap(),
            &id,
        ],
        BOOT_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "{} after {:?}",
        describe(&out),
        started.elapsed()
    );
    assert_eq!(
        stdout(&out).lines().collect::<Vec<_>>(),
        ["mkdir-denied", "read-only", "shm-writable", "from-spec"],
        "the spec's seccomp profile applies: {}",
        describe(&out)
    );
    let created = state("ok", "createRuntime").expect("createRuntime did not run");
    assert_eq!(created["id"], id.as_str());
    assert!(created["pid"].as_u64().unwrap_or(0) > 0, "{created}");
    assert!(
        created["bundle"].as_str().unwrap_or("").ends_with(&id),
        "{created}"
    );
    let netns = std::fs::read_to_string(dir.join("ok-netns")).unwrap_or_default();
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert!(
        netns.starts_with("net:[") && netns.trim() != ours.to_string_lossy(),
        "the hooks' pid must be in the container's own network namespace: {netns:?} (ours {ours:?})"
    );
    assert_eq!(
        state("ok", "poststart").expect("poststart")["status"],
        "running"
    );
    assert_eq!(
        state("ok", "poststop").expect("poststop")["status"],
        "stopped"
    );
    assert_gone(c, &id);
}

/// A shim killed with SIGKILL while its container runs: containerd sees the task stop,
/// and `ctr task rm` / `ctr container rm` (with the shim's `delete` action) clean up.
#[test]
fn container_shim_killed_is_cleaned_up() {
    let Some(setup) = setup() else {
        return;
    };
    let c = &setup.c;
    let id = unique("ck");
    let console = ConsoleFifo::new(c.dir().join("ck.console"));
    let out = c.ctr_with_timeout(
        &[
            "run",
            "-d",
            "--runtime",
            KESTREL_RUNTIME,
            "--log-uri",
            console.path().to_str().unwrap(),
            BUSYBOX_IMAGE,
            &id,
            "sh",
            "-c",
            "echo up; while true; do sleep 1; done",
        ],
        BOOT_TIMEOUT,
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        console.wait_for("up", BOOT_TIMEOUT),
        "console:\n{}",
        console.text()
    );
    let shim = c
        .kestrel_shim_pid(&id)
        .unwrap_or_else(|| panic!("no shim for {id} among {:?}", c.shim_processes()));
    containerd::assert_guest_threads_confined(shim);
    assert!(containerd::kill9(shim), "shim {shim} survived SIGKILL");
    assert!(
        c.wait_task_stopped(&id, CALL_TIMEOUT),
        "{id} still running after its shim died: {:?}",
        c.tasks()
    );
    let out = c.ctr(&["task", "rm", "-f", &id]);
    assert!(
        out.status.success() || stderr(&out).contains("not found"),
        "{}",
        describe(&out)
    );
    c.ctr_ok(&["container", "rm", &id]);
    assert_gone(c, &id);
}
