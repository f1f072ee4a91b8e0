//! `vm-density`: how many tasks this host holds at once through containerd, and how fast
//! they start — kestrel microVMs (a tiny payload standing in for the guest kernel) beside
//! runc containers, in one run.
//!
//! ```text
//! cargo run --release -p kestrel-benches --bin vm-density -- [--count N] [--parallel P] [--shim PATH]
//! ```
//!
//! 1. Builds the release shim (or takes `--shim`), assembles `vmm/tests/payloads/halt.S`
//!    (prints `halting`, then halts with interrupts off until the host ends the VM) as the
//!    `vmlinux` of a private assets directory (`KESTREL_ASSETS`), writes a VM-image spec
//!    whose root holds a 1 MiB `/disk/disk.raw`, imports the busybox image, and starts a
//!    private containerd (the fixture of `kestrel-integration-tests`).
//! 2. For each runtime (kestrel first, then runc: `busybox sleep`): starts N detached tasks
//!    (`ctr run -d`, default 1000), P `ctr` processes in flight (default 2 × nproc), timed
//!    from the first spawn to the last `ctr` exit; stops at the first start that fails and
//!    reports how many were held. With all of them running: `ctr task ls` must list every
//!    one RUNNING; the host's `MemAvailable` drop since before the first start, the summed
//!    Pss of the runtime's processes (shims; for runc also the containers' processes), and
//!    their thread count. Then removes them (`ctr task rm -f`, `ctr container rm`, P in
//!    flight), timed, and checks that no shim is left.
//! 3. Prints, per runtime: tasks held at once, start rate (tasks per second per core, the
//!    figure Firecracker's specification puts at 5 microVMs/s/core), host memory and Pss
//!    per task, threads per task, teardown rate; and the kestrel/runc ratios.
//!
//! Exits non-zero only when no kestrel task could be started.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kestrel_benches::containerd::{import, kib_field, kill_fixture_processes, prepare, FIXTURE};
use kestrel_benches::{positive, Table};
use kestrel_integration_tests::containerd::{describe, Containerd, KESTREL_RUNTIME};
use kestrel_integration_tests::images::{self, BUSYBOX_IMAGE};
use kestrel_integration_tests::kestrel;

const USAGE: &str = "usage: vm-density [--count N] [--parallel P] [--shim PATH]
  --count N     tasks of each runtime held at once, default 1000
  --parallel P  ctr processes in flight while starting and removing, default 2 x nproc
  --shim PATH   use this containerd-shim-kestrel-v2 instead of building the release one";

const CTR_TIMEOUT: Duration = Duration::from_secs(300);

struct Options {
    count: usize,
    parallel: usize,
    shim: Option<PathBuf>,
}

fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        count: 1000,
        parallel: 2 * nproc(),
        shim: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--count" => o.count = positive(&arg, &value()?)?,
            "--parallel" => o.parallel = positive(&arg, &value()?)?,
            "--shim" => o.shim = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    kestrel_benches::bench_main(
        "vm-density",
        USAGE,
        "no kestrel task could be started; see above",
        parse_args,
        run,
    )
}

/// What one runtime's round measured.
struct Round {
    runtime: &'static str,
    held: usize,
    first_failure: Option<String>,
    start: Duration,
    mem_available_drop_kib: u64,
    pss_kib: u64,
    threads: usize,
    teardown: Duration,
    left_over: usize,
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| kib_field(&m, "MemAvailable"))
        .unwrap_or(0)
}

/// Pss (from smaps_rollup) and threads of `pid` and all its descendants.
fn tree_cost(pid: u32, pss: &mut u64, threads: &mut usize) {
    let read = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default();
    *pss += kib_field(&read("smaps_rollup"), "Pss").unwrap_or(0);
    *threads += kib_field(&read("status"), "Threads").unwrap_or(0) as usize;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            tree_cost(child, pss, threads);
        }
    }
}

/// Runs `job(i)` for i in 0..n on `parallel` threads; stops handing out work after the
/// first failure. Returns the successes and the first failure.
fn in_flight(
    n: usize,
    parallel: usize,
    job: impl Fn(usize) -> Result<(), String> + Sync,
) -> (usize, Option<String>) {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_failure = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..parallel.min(n) {
            s.spawn(|| loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                match job(i) {
                    Ok(()) => {
                        let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if d % 100 == 0 {
                            println!("  … {d} of {n}");
                        }
                    }
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        first_failure.lock().unwrap().get_or_insert(e);
                    }
                }
            });
        }
    });
    (done.into_inner(), first_failure.into_inner().unwrap())
}

fn ctr(c: &Containerd, args: &[&str]) -> Result<(), String> {
    let out = c.ctr_with_timeout(args, CTR_TIMEOUT);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ctr {}: {}", args.join(" "), describe(&out)))
    }
}

fn round(
    c: &Containerd,
    runtime: &'static str,
    opts: &Options,
    start_args: impl Fn(&str) -> Vec<String> + Sync,
) -> Round {
    let id = |i: usize| format!("density-{runtime}-{i}");
    let before = mem_available_kib();
    println!(
        "{runtime}: starting {} tasks, {} at a time",
        opts.count, opts.parallel
    );
    let t0 = Instant::now();
    let (held, first_failure) = in_flight(opts.count, opts.parallel, |i| {
        let args = start_args(&id(i));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ctr(c, &args)
    });
    let start = t0.elapsed();
    if let Some(e) = &first_failure {
        println!("{runtime}: start {} failed: {e}", held + 1);
    }
    // Running, all of them, before anything is counted.
    let running = c
        .tasks()
        .iter()
        .filter(|(t, status)| t.starts_with(&format!("density-{runtime}-")) && status == "RUNNING")
        .count();
    std::thread::sleep(Duration::from_secs(2));
    let drop_kib = before.saturating_sub(mem_available_kib());
    let (mut pss, mut threads) = (0, 0);
    for shim in c.shim_processes() {
        tree_cost(shim.pid, &mut pss, &mut threads);
    }
    println!(
        "{runtime}: {held} started in {:.1} s, {running} RUNNING; MemAvailable down {} MiB, Pss {} MiB, {threads} threads",
        start.as_secs_f64(),
        drop_kib / 1024,
        pss / 1024
    );
    let t0 = Instant::now();
    let (removed, failure) = in_flight(opts.count, opts.parallel, |i| {
        let id = id(i);
        let _ = c.ctr_with_timeout(&["task", "rm", "-f", &id], CTR_TIMEOUT);
        let _ = c.ctr_with_timeout(&["container", "rm", &id], CTR_TIMEOUT);
        Ok(())
    });
    let teardown = t0.elapsed();
    if let Some(e) = failure {
        println!("{runtime}: removal failed: {e}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.shim_processes().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left_over = c.shim_processes().len();
    println!(
        "{runtime}: {removed} removed in {:.1} s; {left_over} shim processes left",
        teardown.as_secs_f64()
    );
    Round {
        runtime,
        held: held.min(running),
        first_failure,
        start,
        mem_available_drop_kib: drop_kib,
        pss_kib: pss,
        threads,
        teardown,
        left_over,
    }
}

fn run(opts: &Options) -> Result<bool, String> {
    let Some(shim) = prepare("vm-density", opts.shim.as_deref())? else {
        return Ok(true);
    };
    let work = std::env::temp_dir().join(format!("kestrel-vm-density-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let assets = work.join("assets");
    std::fs::create_dir_all(&assets).map_err(|e| format!("{}: {e}", assets.display()))?;
    let payload = kestrel_benches::assemble_payload("halt", &work)
        .map_err(|e| format!("assembling the halt payload: {e}"))?;
    std::fs::copy(&payload, assets.join("vmlinux")).map_err(|e| e.to_string())?;
    std::fs::write(assets.join("initramfs.cpio"), b"").map_err(|e| e.to_string())?;
    let c = Containerd::builder()
        .shim(&shim)
        .env("KESTREL_ASSETS", &assets)
        .env("KESTREL_STATE_DIR", work.join("state"))
        .start()
        .map_err(|e| format!("cannot start containerd: {e}"))?;
    let _ = FIXTURE.set((c.pid(), c.dir().to_path_buf()));
    import(&c, images::busybox())?;
    let root = work.join("root");
    std::fs::create_dir_all(root.join("disk")).map_err(|e| e.to_string())?;
    std::fs::write(root.join("disk/disk.raw"), vec![0u8; 1 << 20]).map_err(|e| e.to_string())?;
    let spec = work.join("halt.json");
    kestrel::write_spec(&c, &spec, &root, serde_json::json!({}), None);
    println!(
        "kestrel: VM-image tasks booting {} (halt payload), default VM size; runc: {BUSYBOX_IMAGE} sleep",
        payload.display()
    );

    let spec_arg = spec.to_string_lossy().into_owned();
    let kestrel = round(&c, "kestrel", opts, |id| {
        [
            "run",
            "-d",
            "--runtime",
            KESTREL_RUNTIME,
            "--config",
            &spec_arg,
            id,
        ]
        .map(String::from)
        .to_vec()
    });
    let runc = round(&c, "runc", opts, |id| {
        ["run", "-d", BUSYBOX_IMAGE, id, "sleep", "1000000"]
            .map(String::from)
            .to_vec()
    });
    let dir = c.dir().to_path_buf();
    let daemon = c.pid();
    drop(c);
    kill_fixture_processes(daemon, &dir);
    let _ = std::fs::remove_dir_all(&work);
    report(&[&kestrel, &runc]);
    Ok(kestrel.held > 0)
}

fn per_task(total: f64, r: &Round) -> Option<f64> {
    (r.held > 0).then(|| total / r.held as f64)
}

/// A per-task figure of one round (`None` when the round held nothing).
type Metric<'a> = dyn Fn(&Round) -> Option<f64> + 'a;

fn report(rounds: &[&Round; 2]) {
    let cores = nproc() as f64;
    let rate = |r: &Round| (r.held > 0).then(|| r.held as f64 / r.start.as_secs_f64() / cores);
    let teardown =
        |r: &Round| (r.held > 0).then(|| r.held as f64 / r.teardown.as_secs_f64() / cores);
    let mem = |r: &Round| per_task(r.mem_available_drop_kib as f64 / 1024.0, r);
    let pss = |r: &Round| per_task(r.pss_kib as f64 / 1024.0, r);
    let threads = |r: &Round| per_task(r.threads as f64, r);
    let fmt = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
    let ratio = |f: &Metric<'_>| match (f(rounds[0]), f(rounds[1])) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    };
    let held = |r: &Round| Some(r.held as f64);
    let rows: [(&str, &Metric<'_>, usize); 6] = [
        ("tasks held at once", &held, 0),
        ("start rate, tasks/s/core", &rate, 1),
        ("host MemAvailable drop per task, MiB", &mem, 2),
        ("Pss per task (shim and below), MiB", &pss, 2),
        ("threads per task", &threads, 1),
        ("removal rate, tasks/s/core", &teardown, 1),
    ];
    let mut t = Table::new(&["per runtime", rounds[0].runtime, rounds[1].runtime, "ratio"]);
    for (label, f, decimals) in rows {
        t.row(vec![
            label.into(),
            fmt(f(rounds[0]), decimals),
            fmt(f(rounds[1]), decimals),
            ratio(f),
        ]);
    }
    println!("\n{}", t.render());
    for r in rounds {
        if let Some(e) = &r.first_failure {
            println!("{}: held {} when a start failed: {e}", r.runtime, r.held);
        }
        if r.left_over > 0 {
            println!(
                "{}: {} shim processes outlived their removal",
                r.runtime, r.left_over
            );
        }
    }
    let k = rate(rounds[0]);
    println!(
        "start rate target (Firecracker: 5 microVMs/s/core): {}",
        match k {
            Some(v) if v >= 5.0 => format!("PASS ({v:.1})"),
            Some(v) => format!("MISS ({v:.1})"),
            None => "-".into(),
        }
    );
}
