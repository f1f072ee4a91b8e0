//! `ctr-run`: a containerDisk VM started through containerd and the kestrel shim, beside
//! a plain runc container of the same content, measured interleaved in one run; and the
//! shim's host memory beyond the guest RAM it holds.
//!
//! ```text
//! cargo run --release -p kestrel-benches --bin ctr-run -- [--runs N] [--shim PATH]
//! ```
//!
//! 1. Builds the release `containerd-shim-kestrel-v2` (into this binary's target
//!    directory; cargo does nothing when it is current), the test images of
//!    `tests/images/` (containerDisk `localhost/kestrel-test-vmdisk:1`, cached) and a
//!    runc baseline image `localhost/kestrel-bench-disk:1` (`tests/images/mkoci.py`: the
//!    same `/disk/disk.qcow2` as a plain file plus `/bin/busybox`, running
//!    `cat /disk/disk.qcow2 > /dev/null`). Starts a private containerd (the fixture of
//!    `kestrel-integration-tests`, debug log level, the shim first on the daemon's PATH)
//!    with `KESTREL_STATE_DIR` set to a fresh directory, so the first kestrel run converts
//!    the QCOW2 and later runs find it cached.
//! 2. N rounds (default 3: a VM boot takes about a minute on kvm_pvm), each:
//!    - `ctr run --rm --runtime io.containerd.kestrel.v2 localhost/kestrel-test-vmdisk:1 ID`
//!      (vm-init powers off right after boot), timed from spawn to ctr's exit; the
//!      console must show `vm-init: started` and ctr must exit 0;
//!    - `ctr run --rm localhost/kestrel-bench-disk:1 ID` with runc, timed the same way;
//!    - a detached kestrel task (`ctr run -d --env VM_INIT_WAIT=1`): once its console says
//!      `vm-init: waiting`, the shim's `/proc/<pid>/smaps_rollup` Rss, the Rss of its
//!      guest RAM mapping (the anonymous mapping of exactly the VM's memory size, found in
//!      `/proc/<pid>/smaps`; the size comes from the shim's log) and `VmHWM`; then
//!      `ctr task kill` (SIGTERM: the guest shuts down), `ctr task rm`, `ctr container rm`.
//! 3. Splits each `ctr run --rm` at the `event forwarded` lines containerd logs for the
//!    shim's `/tasks/create`, `/tasks/start` and `/tasks/exit` events (log timestamps
//!    against the wall clock at spawn), prints medians, min/max and ratios, and PASS/MISS
//!    for the shim's overhead target (Rss − guest Rss ≤ 10 MiB, on the median).
//!
//! Every `ctr` call has a 10-minute timeout. Dropping the fixture stops containerd and
//! kills leftover shims; a panic (release builds abort) does the same from a panic hook.
//! The bench exits non-zero only when no kestrel run could be measured.

// A bench tool, not product code: an `expect("what")` on a harness invariant is clearer
// than plumbing errors, and the measurement path returns errors with context anyway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime};

use kestrel_benches::containerd::{
    import, kill_fixture_processes, ms_since, prepare, read_log_since, run_tool, sample_memory,
    task_events, MemSample, FIXTURE,
};
use kestrel_benches::{
    fmt_summary, ms, own_target_dir, ratio, summary, timed_run, which, Ended, HostFacts, RunResult,
    Table,
};
use kestrel_integration_tests::containerd::{
    describe, ConsoleFifo, Containerd, KESTREL_RUNTIME, NAMESPACE,
};
use kestrel_integration_tests::images::{self, VMDISK_IMAGE};

const USAGE: &str = "usage: ctr-run [--runs N] [--shim PATH]
  --runs N     rounds (kestrel run, runc run, kestrel memory sample), default 3
  --shim PATH  use this containerd-shim-kestrel-v2 instead of building the release one";

/// The runc baseline: the containerDisk's disk as a plain file, plus busybox.
const BASELINE_IMAGE: &str = "localhost/kestrel-bench-disk:1";
const BASELINE_CMD: &str = r#"["/bin/busybox","sh","-c","cat /disk/disk.qcow2 > /dev/null"]"#;

/// Every `ctr` call is killed after this.
const CTR_TIMEOUT: Duration = Duration::from_secs(600);
/// From `ctr task kill` (SIGTERM) to the task being stopped.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(120);
/// Memory size of the test VM when the shim's log does not say (the shim's default).
const DEFAULT_MEMORY_MIB: u64 = 128;
const TARGET_OVERHEAD_MIB: f64 = 10.0;

struct Options {
    runs: usize,
    shim: Option<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        runs: 3,
        shim: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--runs" => {
                let v = value()?;
                o.runs = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("--runs: not a positive number: {v}"))?;
            }
            "--shim" => o.shim = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

/// What the log says about one `ctr run`: ms from spawn to each task event.
#[derive(Debug, Default, Clone)]
struct Events {
    create: Option<f64>,
    start: Option<f64>,
    exit: Option<f64>,
    /// The shim logged `converting …` (the QCOW2 was not in the cache).
    converted: bool,
}

/// The events of one run in `text` (the log written since just before its spawn at `t0`).
fn events_of(text: &str, t0: SystemTime) -> Events {
    let mut e = Events {
        // The shim logs `converting <disk>: <pct>%` while it converts.
        converted: text
            .lines()
            .any(|l| l.contains("converting /") && l.contains('%')),
        ..Events::default()
    };
    for (at, topic) in task_events(text) {
        let at = ms_since(t0, at);
        if at < 0.0 {
            continue;
        }
        let slot = match topic.as_str() {
            "/tasks/create" => &mut e.create,
            "/tasks/start" => &mut e.start,
            "/tasks/exit" => &mut e.exit,
            _ => continue,
        };
        slot.get_or_insert(at);
    }
    e
}

/// The VM memory size the shim logged for task `id` (`task ID: 1 vCPU(s), 128 MiB, …`).
fn logged_memory_mib(text: &str, id: &str) -> Option<u64> {
    let prefix = format!("task {id}: ");
    text.lines().find_map(|l| {
        let (_, rest) = l.split_once(&prefix)?;
        let (_, after) = rest.split_once(", ")?;
        after.split_once(" MiB")?.0.trim().parse().ok()
    })
}

/// The runc baseline archive: `/disk/disk.qcow2` (the containerDisk's own file) and
/// `/bin/busybox`, made with tests/images/mkoci.py.
fn build_baseline(qcow2: &Path, out_dir: &Path) -> Result<PathBuf, String> {
    let busybox =
        std::env::var_os("BUSYBOX").map_or_else(|| PathBuf::from("/bin/busybox"), PathBuf::from);
    if !busybox.is_file() {
        return Err(format!(
            "{} not found (apt-get install busybox-static)",
            busybox.display()
        ));
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let out = out_dir.join("kestrel-bench-disk.tar");
    let file_arg = |src: &Path, dst: &str| {
        let mut a = OsString::from(src);
        a.push("=");
        a.push(dst);
        a
    };
    run_tool(
        Command::new("python3")
            .arg(images::images_dir().join("mkoci.py"))
            .args(["--name", BASELINE_IMAGE, "--cmd", BASELINE_CMD, "--file"])
            .arg(file_arg(&busybox, "/bin/busybox"))
            .arg("--file")
            .arg(file_arg(qcow2, "/disk/disk.qcow2"))
            .arg(&out),
    )?;
    Ok(out)
}

fn file_size_kib(p: &Path) -> f64 {
    std::fs::metadata(p).map_or(0.0, |m| m.len() as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------
// Measurements

/// One `ctr run --rm`, with its log-derived events.
struct CtrRun {
    result: RunResult,
    events: Events,
}

impl CtrRun {
    fn total_ms(&self) -> f64 {
        ms(self.result.gone)
    }

    /// (spawn → TaskCreate, TaskCreate → TaskStart, TaskStart → TaskExit, TaskExit → gone)
    fn phases(&self) -> [Option<f64>; 4] {
        let e = &self.events;
        let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        [
            e.create,
            diff(e.create, e.start),
            diff(e.start, e.exit),
            diff(e.exit, Some(self.total_ms())),
        ]
    }
}

fn fmt_opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "?".into(), |v| format!("{v:.0}"))
}

/// Runs `ctr ARGS` timed from spawn to exit; the problem if it does not count.
fn ctr_run_timed(
    c: &Containerd,
    ctr: &Path,
    args: &[&str],
    expect_console: Option<&str>,
    log_from: &mut usize,
    stderr_path: &Path,
) -> Result<CtrRun, String> {
    let mut full: Vec<OsString> = vec![
        "-a".into(),
        c.socket().into(),
        "-n".into(),
        NAMESPACE.into(),
    ];
    full.extend(args.iter().map(OsString::from));
    let _ = read_log_since(c, log_from);
    let wall0 = SystemTime::now();
    let result =
        timed_run(ctr, &full, &[], CTR_TIMEOUT, &[], stderr_path).map_err(|e| e.to_string())?;
    // Let containerd copy the last shim log lines.
    std::thread::sleep(Duration::from_millis(200));
    let events = events_of(&read_log_since(c, log_from), wall0);
    let problem = if result.timed_out {
        Some(format!("no exit within {CTR_TIMEOUT:?}, killed"))
    } else if result.ended != Ended::Exited(0) {
        Some(format!("ctr: {}", result.ended))
    } else {
        expect_console
            .filter(|m| !result.output_text().contains(m))
            .map(|m| format!("console lacks {m:?}"))
    };
    match problem {
        None => Ok(CtrRun { result, events }),
        Some(p) => {
            let out = result.output_text();
            let tail: Vec<&str> = out.lines().rev().take(5).collect();
            Err(format!(
                "{p}; stderr: {}; console tail: {}",
                result.stderr.trim(),
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            ))
        }
    }
}

/// One detached kestrel task: boot until `vm-init: waiting`, sample, shut down.
struct MemRun {
    sample: MemSample,
    memory_mib: u64,
    boot_ms: f64,
    shutdown_ms: Option<f64>,
    /// The console showed `vm-init: shutdown requested` (the guest got the SIGTERM as
    /// Ctrl-Alt-Del); otherwise the shim stopped the VM after its grace period.
    graceful: bool,
}

fn memory_run(c: &Containerd, id: &str, log_from: &mut usize) -> Result<MemRun, String> {
    let console = ConsoleFifo::new(c.dir().join(format!("{id}.console")));
    let log_uri = console.path().to_string_lossy().into_owned();
    let _ = read_log_since(c, log_from);
    let t0 = Instant::now();
    let out = c.ctr_with_timeout(
        &[
            "run",
            "-d",
            "--runtime",
            KESTREL_RUNTIME,
            "--log-uri",
            &log_uri,
            "--env",
            "VM_INIT_WAIT=1",
            VMDISK_IMAGE,
            id,
        ],
        CTR_TIMEOUT,
    );
    let result = (|| {
        if !out.status.success() {
            return Err(format!("ctr run -d: {}", describe(&out)));
        }
        // Serial console lines end in "\r\n".
        if !console.wait_for("vm-init: waiting", CTR_TIMEOUT) {
            return Err(format!(
                "no `vm-init: waiting` within {CTR_TIMEOUT:?}; console:\n{}",
                console.text()
            ));
        }
        let boot_ms = ms(t0.elapsed());
        let pid = c
            .kestrel_shim_pid(id)
            .ok_or_else(|| format!("no kestrel shim process for {id}"))?;
        let log = read_log_since(c, log_from);
        let memory_mib = logged_memory_mib(&log, id).unwrap_or(DEFAULT_MEMORY_MIB);
        // The guest sits in sigwaitinfo now; give the host side a moment to settle.
        std::thread::sleep(Duration::from_secs(1));
        let sample = sample_memory(pid, memory_mib)?;
        Ok((boot_ms, memory_mib, sample))
    })();

    // Always take the task down, whatever happened above.
    let t_kill = Instant::now();
    let killed = c.ctr_with_timeout(&["task", "kill", id], CTR_TIMEOUT);
    let stopped = killed.status.success() && c.wait_task_stopped(id, SHUTDOWN_TIMEOUT);
    let shutdown_ms = stopped.then(|| ms(t_kill.elapsed()));
    if !stopped {
        let _ = c.ctr_with_timeout(&["task", "kill", "-s", "SIGKILL", id], CTR_TIMEOUT);
        c.wait_task_stopped(id, SHUTDOWN_TIMEOUT);
    }
    let _ = c.ctr_with_timeout(&["task", "rm", id], CTR_TIMEOUT);
    let rm = c.ctr_with_timeout(&["container", "rm", id], CTR_TIMEOUT);
    let graceful = console.text().contains("vm-init: shutdown requested");

    let (boot_ms, memory_mib, sample) = result?;
    if !stopped {
        return Err(format!(
            "sampled, but `ctr task kill` did not stop {id} within {SHUTDOWN_TIMEOUT:?}: {}",
            describe(&killed)
        ));
    }
    if !rm.status.success() {
        return Err(format!("ctr container rm {id}: {}", describe(&rm)));
    }
    Ok(MemRun {
        sample,
        memory_mib,
        boot_ms,
        shutdown_ms,
        graceful,
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------

fn main() -> ExitCode {
    kestrel_benches::bench_main(
        "ctr-run",
        USAGE,
        "no valid kestrel run; see the failures above",
        parse_args,
        run,
    )
}

/// Removes kestrel's per-run state directory (converted base, overlays) when dropped;
/// declared before the fixture so that it goes after the shims are gone.
struct StateDir(PathBuf);

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(opts: &Options) -> Result<bool, String> {
    let Some(shim) = prepare("ctr-run", opts.shim.as_deref())? else {
        return Ok(true);
    };
    let target_dir = own_target_dir().map_err(|e| e.to_string())?;
    if std::env::var_os("CARGO_TARGET_DIR").is_none() {
        // The image scripts build vm-init under $CARGO_TARGET_DIR/guest.
        std::env::set_var("CARGO_TARGET_DIR", &target_dir);
    }
    let work = target_dir.join("kestrel-benches");
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;

    // Everything that can fail (or panic) before containerd runs.
    let vmdisk = images::containerdisk();
    let baseline = build_baseline(&vmdisk.qcow2, &work.join("ctr-run"))?;
    println!(
        "images: {VMDISK_IMAGE} ({:.0} KiB archive, disk.qcow2 {:.0} KiB) with runtime {KESTREL_RUNTIME}; \
         baseline {BASELINE_IMAGE} ({:.0} KiB archive: the same disk.qcow2 + busybox, \
         cmd `cat /disk/disk.qcow2 > /dev/null`) with runc",
        file_size_kib(&vmdisk.archive),
        file_size_kib(&vmdisk.qcow2),
        file_size_kib(&baseline),
    );

    let state = StateDir(
        std::env::temp_dir().join(format!("kestrel-ctr-run-state-{}", std::process::id())),
    );
    let _ = std::fs::remove_dir_all(&state.0);
    let c = Containerd::builder()
        .shim(&shim)
        .env("KESTREL_STATE_DIR", &state.0)
        .start()
        .map_err(|e| format!("cannot start containerd: {e}"))?;
    let _ = FIXTURE.set((c.pid(), c.dir().to_path_buf()));
    println!(
        "private containerd in {} (KESTREL_STATE_DIR={}, fresh: the first kestrel run converts the QCOW2)",
        c.dir().display(),
        state.0.display()
    );
    import(&c, &vmdisk.archive)?;
    import(&c, &baseline)?;
    let ctr = which("ctr").ok_or("ctr not on PATH")?;

    let mut kestrel_runs: Vec<(usize, CtrRun)> = Vec::new();
    let mut runc_runs: Vec<(usize, CtrRun)> = Vec::new();
    let mut mem_runs: Vec<MemRun> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut log_from = 0usize;
    let pid = std::process::id();
    println!();
    println!(
        "== {} rounds, interleaved: kestrel `ctr run --rm`, runc `ctr run --rm`, kestrel detached memory sample",
        opts.runs
    );
    for i in 1..=opts.runs {
        let id = format!("k{pid}-{i}");
        let r = ctr_run_timed(
            &c,
            &ctr,
            &[
                "run",
                "--rm",
                "--runtime",
                KESTREL_RUNTIME,
                VMDISK_IMAGE,
                &id,
            ],
            Some("vm-init: started"),
            &mut log_from,
            &logs.join(format!("ctr-run-kestrel-{i}.stderr")),
        );
        match r {
            Ok(r) => {
                let [create, start, guest, teardown] = r.phases();
                println!(
                    "round {i}: kestrel {:.0} ms (to TaskCreate {}, Start {}, guest {}, teardown {}){}",
                    r.total_ms(),
                    fmt_opt_ms(create),
                    fmt_opt_ms(start),
                    fmt_opt_ms(guest),
                    fmt_opt_ms(teardown),
                    if r.events.converted { "; converted the QCOW2" } else { "" }
                );
                kestrel_runs.push((i, r));
            }
            Err(e) => {
                println!("round {i}: kestrel not counted: {e}");
                failures.push(format!("kestrel run {i}: {e}"));
            }
        }

        let id = format!("r{pid}-{i}");
        let r = ctr_run_timed(
            &c,
            &ctr,
            &["run", "--rm", BASELINE_IMAGE, &id],
            None,
            &mut log_from,
            &logs.join(format!("ctr-run-runc-{i}.stderr")),
        );
        match r {
            Ok(r) => {
                let [create, start, process, teardown] = r.phases();
                println!(
                    "round {i}: runc {:.0} ms (to TaskCreate {}, Start {}, process {}, teardown {})",
                    r.total_ms(),
                    fmt_opt_ms(create),
                    fmt_opt_ms(start),
                    fmt_opt_ms(process),
                    fmt_opt_ms(teardown),
                );
                runc_runs.push((i, r));
            }
            Err(e) => {
                println!("round {i}: runc not counted: {e}");
                failures.push(format!("runc run {i}: {e}"));
            }
        }

        let id = format!("m{pid}-{i}");
        match memory_run(&c, &id, &mut log_from) {
            Ok(m) => {
                let s = &m.sample;
                println!(
                    "round {i}: memory: shim Rss {:.1} MiB, guest RAM Rss {:.1} MiB ({} MiB mapping), \
                     overhead {:.1} MiB, VmHWM {}; run -d → waiting {:.0} ms, kill → stopped {}",
                    mib(s.shim_rss_kib),
                    mib(s.guest_rss_kib),
                    m.memory_mib,
                    mib(s.shim_rss_kib.saturating_sub(s.guest_rss_kib)),
                    s.hwm_kib.map_or_else(|| "?".into(), |h| format!("{:.1} MiB", mib(h))),
                    m.boot_ms,
                    fmt_opt_ms(m.shutdown_ms).replace('?', "-") + " ms",
                );
                if !m.graceful {
                    println!(
                        "  note: no `vm-init: shutdown requested` on the console: the guest did not \
                         act on SIGTERM (Ctrl-Alt-Del); the shim stopped the VM after its grace period"
                    );
                }
                if s.guest_mappings != 1 {
                    println!(
                        "  note: {} mappings of the VM's size were counted as guest RAM",
                        s.guest_mappings
                    );
                }
                mem_runs.push(m);
            }
            Err(e) => {
                println!("round {i}: memory not counted: {e}");
                failures.push(format!("memory run {i}: {e}"));
            }
        }
    }

    report(&kestrel_runs, &runc_runs, &mem_runs);
    if !failures.is_empty() {
        println!();
        println!("not counted:");
        for f in &failures {
            println!("  {f}");
        }
    }

    let dir = c.dir().to_path_buf();
    let daemon = c.pid();
    drop(c);
    let left = kill_fixture_processes(daemon, &dir);
    println!();
    println!(
        "containerd stopped; leftover processes after the fixture's cleanup: {}",
        if left.is_empty() {
            "none".to_string()
        } else {
            format!("{left:?} (killed)")
        }
    );
    drop(state);
    println!(
        "All numbers above were measured in this run; ratios are kestrel/runc. loadavg at end: {}",
        HostFacts::probe().loadavg
    );
    Ok(!kestrel_runs.is_empty())
}

fn report(kestrel: &[(usize, CtrRun)], runc: &[(usize, CtrRun)], mem: &[MemRun]) {
    println!();
    println!("== `ctr run --rm`, ms from spawn (median [min..max] n)");
    let mut t = Table::new(&[
        "",
        "kestrel (VM image)",
        "runc (same disk + busybox)",
        "ratio",
    ]);
    let total = |runs: &[(usize, CtrRun)]| summary(runs.iter().map(|(_, r)| r.total_ms()));
    let (kt, rt) = (total(kestrel), total(runc));
    t.row(vec![
        "total: spawn → ctr exited".into(),
        fmt_summary(kt, 0),
        fmt_summary(rt, 0),
        ratio(kt, rt),
    ]);
    let names = [
        "spawn → TaskCreate (ctr, containerd, shim start, Create)",
        "TaskCreate → TaskStart (Start)",
        "TaskStart → TaskExit (guest / process)",
        "TaskExit → ctr exited (Delete, shim exit, ctr --rm)",
    ];
    for (k, name) in names.iter().enumerate() {
        let phase = |runs: &[(usize, CtrRun)]| {
            summary(
                runs.iter()
                    .filter_map(|(_, r)| r.phases().get(k).copied().flatten()),
            )
        };
        let (a, b) = (phase(kestrel), phase(runc));
        t.row(vec![
            (*name).into(),
            fmt_summary(a, 0),
            fmt_summary(b, 0),
            ratio(a, b),
        ]);
    }
    print!("{}", t.render());

    // Create with and without the conversion.
    let first: Vec<f64> = kestrel
        .iter()
        .filter(|(_, r)| r.events.converted)
        .filter_map(|(_, r)| r.events.create)
        .collect();
    let cached = summary(
        kestrel
            .iter()
            .filter(|(_, r)| !r.events.converted)
            .filter_map(|(_, r)| r.events.create),
    );
    let runc_create = summary(runc.iter().filter_map(|(_, r)| r.events.create));
    println!(
        "kestrel spawn → TaskCreate: converting run(s) {} ms; cached runs {} ms (runc {} ms, ratio cached/runc {})",
        if first.is_empty() {
            "-".to_string()
        } else {
            first.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", ")
        },
        fmt_summary(cached, 0),
        fmt_summary(runc_create, 0),
        ratio(cached, runc_create),
    );
    let missing = kestrel
        .iter()
        .filter(|(_, r)| r.events.exit.is_none())
        .count()
        + runc.iter().filter(|(_, r)| r.events.exit.is_none()).count();
    if missing > 0 {
        println!("note: {missing} run(s) without task events in containerd's log: phases shown as missing");
    }

    println!();
    println!("== kestrel shim memory while the guest waits (MiB; median [min..max] n)");
    let s = |f: &dyn Fn(&MemRun) -> Option<f64>| summary(mem.iter().filter_map(f));
    let rss = s(&|m| Some(mib(m.sample.shim_rss_kib)));
    let guest = s(&|m| Some(mib(m.sample.guest_rss_kib)));
    let overhead = s(&|m| {
        Some(mib(m
            .sample
            .shim_rss_kib
            .saturating_sub(m.sample.guest_rss_kib)))
    });
    let anon_overhead = s(&|m| {
        Some(mib(m
            .sample
            .shim_anon_kib
            .saturating_sub(m.sample.guest_anon_kib)))
    });
    let hwm = s(&|m| m.sample.hwm_kib.map(mib));
    let mut t = Table::new(&["", "value", "target", "result"]);
    t.row(vec![
        "shim Rss (smaps_rollup)".into(),
        fmt_summary(rss, 1),
        "".into(),
        "".into(),
    ]);
    t.row(vec![
        format!(
            "guest RAM Rss (the {} MiB anonymous mapping)",
            mem.first().map_or(DEFAULT_MEMORY_MIB, |m| m.memory_mib)
        ),
        fmt_summary(guest, 1),
        "".into(),
        "".into(),
    ]);
    let verdict = match overhead {
        Some(o) if o.median <= TARGET_OVERHEAD_MIB => "PASS",
        Some(_) => "MISS",
        None => "no data",
    };
    t.row(vec![
        "shim Rss − guest Rss (overhead)".into(),
        fmt_summary(overhead, 1),
        format!("≤ {TARGET_OVERHEAD_MIB} MiB"),
        verdict.into(),
    ]);
    t.row(vec![
        "  of which anonymous (Anonymous − guest Anonymous)".into(),
        fmt_summary(anon_overhead, 1),
        "".into(),
        "".into(),
    ]);
    t.row(vec![
        "shim peak Rss (VmHWM)".into(),
        fmt_summary(hwm, 1),
        "".into(),
        "".into(),
    ]);
    t.row(vec![
        "`ctr run -d` → `vm-init: waiting` (ms)".into(),
        fmt_summary(s(&|m| Some(m.boot_ms)), 0),
        "".into(),
        "".into(),
    ]);
    t.row(vec![
        "`ctr task kill` → STOPPED (ms, polled every 250 ms)".into(),
        fmt_summary(s(&|m| m.shutdown_ms), 0),
        "".into(),
        format!(
            "{}/{} graceful",
            mem.iter().filter(|m| m.graceful).count(),
            mem.len()
        ),
    ]);
    print!("{}", t.render());
}
#[cfg(test)]
mod tests {
    use super::*;
    use kestrel_benches::containerd::parse_rfc3339;

    #[test]
    fn finds_events_and_memory() {
        let t0 = parse_rfc3339("2026-11-22T04:00:00Z").unwrap();
        let log = r#"time="2026-11-22T03:59:59Z" level=debug msg="event forwarded" topic=/tasks/exit
time="2026-11-22T04:00:01Z" level=info msg="converting /x/disk/disk.qcow2: 100%"
time="2026-11-22T04:00:01.5Z" level=info msg="task k1: 1 vCPU(s), 128 MiB, base /b, overlay /o"
time="2026-11-22T04:00:02Z" level=debug msg="event forwarded" ns=n topic=/tasks/create type=T
time="2026-11-22T04:00:02.25Z" level=debug msg="event forwarded" ns=n topic=/tasks/start type=T
time="2026-11-22T04:01:00Z" level=debug msg="event forwarded" ns=n topic=/tasks/exit type=T"#;
        let e = events_of(log, t0);
        assert_eq!(
            (e.create, e.start, e.exit),
            (Some(2000.0), Some(2250.0), Some(60000.0))
        );
        assert!(e.converted);
        assert_eq!(logged_memory_mib(log, "k1"), Some(128));
        assert_eq!(logged_memory_mib(log, "k2"), None);
        let cut = "task k3: 1 vCPU(s), 256 MiB, base /b, overlay /o\"";
        assert_eq!(logged_memory_mib(cut, "k3"), Some(256));
    }
}
