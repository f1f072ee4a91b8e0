//! `ctr-container`: an ordinary container (busybox) in a kestrel microVM through containerd,
//! beside the same container with runc, interleaved in one run: `ctr run --rm … true`,
//! `ctr task exec … true`, kestrel's time split into its phases, and the shim's host
//! memory beyond the guest RAM it holds.
//!
//! ```text
//! cargo run --release -p kestrel-benches --bin ctr-container -- [--runs N] [--execs M] [--shim PATH]
//! ```
//!
//! 1. Builds the release shim (or takes `--shim`), the busybox image
//!    (`tests/images/build-busybox.sh`), starts a private containerd (the fixture of
//!    `kestrel-integration-tests`, debug log level) with a fresh `KESTREL_STATE_DIR`, so the
//!    first kestrel run builds the rootfs image and later ones find it cached.
//! 2. N rounds (default 3), each: kestrel `ctr run --rm`, runc `ctr run --rm` (both
//!    `true`, timed from spawn to ctr's exit); then one detached container each
//!    (`sleep` loop) and M execs (default 3) of `true` into each, alternating; one memory
//!    sample of the kestrel shim (Rss minus the Rss of its guest RAM mapping); both
//!    containers killed and removed.
//! 3. Splits each kestrel run with the shim's `timing: task=<id> <phase>_ms=<ms>` log lines
//!    (prepare: rootfs image from the cache or built; vm_build; agent_ready: from the VM's
//!    start to its agent's answer, i.e. the guest kernel's boot; create and start: the
//!    agent's calls; run: from Start to the agent's answer to Wait, i.e. the process's
//!    run and exit in the guest; teardown: Delete, the VM's stop and cleanup); "other" is the rest of
//!    ctr's time (shim start, containerd, ctr). Prints medians, ratios and PASS/MISS for the
//!    targets: everything but the guest boot ≤ 1.0× runc's whole run, a warm rootfs
//!    ≤ 5 ms, shim memory beyond guest RAM ≤ 10 MiB.
//!
//! The bench exits non-zero only when no kestrel run could be measured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kestrel_benches::containerd::{
    import, kill_fixture_processes, prepare, read_log_since, sample_memory, FIXTURE,
};
use kestrel_benches::{fmt_summary, positive, ratio, summary, Table};
use kestrel_integration_tests::containerd::{describe, ConsoleFifo, Containerd, KESTREL_RUNTIME};
use kestrel_integration_tests::images::{self, BUSYBOX_IMAGE};

const USAGE: &str = "usage: ctr-container [--runs N] [--execs M] [--shim PATH]
  --runs N     rounds (kestrel run, runc run, detached pair with execs), default 3
  --execs M    execs of `true` into each detached container per round, default 3
  --shim PATH  use this containerd-shim-kestrel-v2 instead of building the release one";

const CTR_TIMEOUT: Duration = Duration::from_secs(600);
/// The VM size of a container without a memory limit (the shim's default).
const CONTAINER_VM_MIB: u64 = 128;
const PHASES: [&str; 7] = [
    "prepare",
    "vm_build",
    "agent_ready",
    "create",
    "start",
    "run",
    "teardown",
];

struct Options {
    runs: usize,
    execs: usize,
    shim: Option<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        runs: 3,
        execs: 3,
        shim: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => o.runs = positive(&arg, &value()?)?,
            "--execs" => o.execs = positive(&arg, &value()?)?,
            "--shim" => o.shim = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

/// The `<phase>_ms` the shim logged for task `id`.
fn timing(log: &str, id: &str, phase: &str) -> Option<f64> {
    let marker = format!("timing: task={id} {phase}_ms=");
    log.lines().find_map(|l| {
        let rest = l.split_once(&marker)?.1;
        let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        rest.get(..end)?.parse().ok()
    })
}

/// One kestrel `ctr run --rm`: total and phases (ms).
struct KestrelRun {
    total: f64,
    phases: Vec<Option<f64>>,
    cached: bool,
}

impl KestrelRun {
    fn phase(&self, name: &str) -> Option<f64> {
        let i = PHASES.iter().position(|p| *p == name)?;
        self.phases.get(i).copied().flatten()
    }

    fn other(&self) -> Option<f64> {
        let sum: Option<f64> = self.phases.iter().copied().sum();
        sum.map(|s| self.total - s)
    }
}

fn timed(c: &Containerd, args: &[&str]) -> Result<f64, String> {
    let t0 = Instant::now();
    let out = c.ctr_with_timeout(args, CTR_TIMEOUT);
    let total = t0.elapsed().as_secs_f64() * 1000.0;
    if out.status.success() {
        Ok(total)
    } else {
        Err(format!("`ctr {}`: {}", args.join(" "), describe(&out)))
    }
}

fn main() -> ExitCode {
    kestrel_benches::bench_main(
        "ctr-container",
        USAGE,
        "no valid kestrel run; see the failures above",
        parse_args,
        run,
    )
}

struct StateDir(PathBuf);

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Samples {
    kestrel: Vec<KestrelRun>,
    runc: Vec<f64>,
    kestrel_exec: Vec<f64>,
    runc_exec: Vec<f64>,
    overhead_mib: Vec<f64>,
}

fn run(opts: &Options) -> Result<bool, String> {
    let Some(shim) = prepare("ctr-container", opts.shim.as_deref())? else {
        return Ok(true);
    };
    let state = StateDir(std::env::temp_dir().join(format!(
        "kestrel-ctr-container-state-{}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&state.0);
    let c = Containerd::builder()
        .shim(&shim)
        .env("KESTREL_STATE_DIR", &state.0)
        .start()
        .map_err(|e| format!("cannot start containerd: {e}"))?;
    let _ = FIXTURE.set((c.pid(), c.dir().to_path_buf()));
    import(&c, images::busybox())?;
    println!(
        "image {BUSYBOX_IMAGE}; private containerd in {}, fresh KESTREL_STATE_DIR (the first kestrel run builds the rootfs image)",
        c.dir().display()
    );

    let mut s = Samples {
        kestrel: Vec::new(),
        runc: Vec::new(),
        kestrel_exec: Vec::new(),
        runc_exec: Vec::new(),
        overhead_mib: Vec::new(),
    };
    let mut log_from = 0usize;
    let pid = std::process::id();
    for i in 1..=opts.runs {
        let id = format!("k{pid}-{i}");
        let _ = read_log_since(&c, &mut log_from);
        let args = [
            "run",
            "--rm",
            "--runtime",
            KESTREL_RUNTIME,
            BUSYBOX_IMAGE,
            &id,
            "true",
        ];
        match timed(&c, &args) {
            Ok(total) => {
                let log = read_log_since(&c, &mut log_from);
                let phases = PHASES.iter().map(|p| timing(&log, &id, p)).collect();
                let cached =
                    log.contains(&format!("task {id}: container")) && log.contains("(cached)");
                let r = KestrelRun {
                    total,
                    phases,
                    cached,
                };
                println!(
                    "round {i}: kestrel run {total:.0} ms: {} other {:.0}; rootfs {}",
                    PHASES
                        .iter()
                        .map(|p| format!("{p} {:.1}", r.phase(p).unwrap_or(f64::NAN)))
                        .collect::<Vec<_>>()
                        .join(", "),
                    r.other().unwrap_or(f64::NAN),
                    if r.cached { "cached" } else { "built" }
                );
                s.kestrel.push(r);
            }
            Err(e) => println!("round {i}: kestrel not counted: {e}"),
        }
        let id = format!("r{pid}-{i}");
        match timed(&c, &["run", "--rm", BUSYBOX_IMAGE, &id, "true"]) {
            Ok(t) => {
                println!("round {i}: runc run {t:.0} ms");
                s.runc.push(t);
            }
            Err(e) => println!("round {i}: runc not counted: {e}"),
        }
        if let Err(e) = exec_round(&c, opts.execs, i, &mut s, &mut log_from) {
            println!("round {i}: exec/memory not counted: {e}");
        }
    }
    let dir = c.dir().to_path_buf();
    let daemon = c.pid();
    drop(c);
    kill_fixture_processes(daemon, &dir);
    report(&s);
    Ok(!s.kestrel.is_empty())
}

/// One detached container of each runtime, `execs` execs of `true` into each, a memory
/// sample of the kestrel shim.
fn exec_round(
    c: &Containerd,
    execs: usize,
    round: usize,
    s: &mut Samples,
    log_from: &mut usize,
) -> Result<(), String> {
    let pid = std::process::id();
    let (k, r) = (format!("kx{pid}-{round}"), format!("rx{pid}-{round}"));
    let console = ConsoleFifo::new(c.dir().join(format!("kx-{round}.console")));
    let loop_cmd = ["sh", "-c", "echo up; while true; do sleep 1; done"];
    let mut kargs = vec![
        "run",
        "-d",
        "--runtime",
        KESTREL_RUNTIME,
        "--log-uri",
        console.path().to_str().unwrap(),
        BUSYBOX_IMAGE,
        &k,
    ];
    kargs.extend(loop_cmd);
    timed(c, &kargs)?;
    let mut rargs = vec!["run", "-d", BUSYBOX_IMAGE, &r];
    rargs.extend(loop_cmd);
    let result = (|| {
        timed(c, &rargs)?;
        if !console.wait_for("up", CTR_TIMEOUT) {
            return Err("the kestrel container did not start".to_string());
        }
        for e in 0..execs {
            let exec_id = format!("e{e}");
            s.kestrel_exec.push(timed(
                c,
                &["task", "exec", "--exec-id", &exec_id, &k, "true"],
            )?);
            s.runc_exec.push(timed(
                c,
                &["task", "exec", "--exec-id", &exec_id, &r, "true"],
            )?);
        }
        let shim = c
            .kestrel_shim_pid(&k)
            .ok_or_else(|| format!("no shim process for {k}"))?;
        let m = sample_memory(shim, CONTAINER_VM_MIB)?;
        let overhead = (m.shim_rss_kib.saturating_sub(m.guest_rss_kib)) as f64 / 1024.0;
        println!(
            "round {round}: execs kestrel {:?} ms, runc {:?} ms; shim Rss {:.1} MiB, guest RAM Rss {:.1} MiB, beyond guest {overhead:.1} MiB",
            s.kestrel_exec.iter().rev().take(execs).map(|v| v.round()).collect::<Vec<_>>(),
            s.runc_exec.iter().rev().take(execs).map(|v| v.round()).collect::<Vec<_>>(),
            m.shim_rss_kib as f64 / 1024.0,
            m.guest_rss_kib as f64 / 1024.0,
        );
        s.overhead_mib.push(overhead);
        Ok(())
    })();
    for id in [&k, &r] {
        let _ = c.ctr(&["task", "kill", "-s", "KILL", id]);
        let _ = c.wait_task_stopped(id, Duration::from_secs(60));
        let _ = c.ctr(&["task", "rm", "-f", id]);
        let _ = c.ctr(&["container", "rm", id]);
    }
    let _ = read_log_since(c, log_from);
    result
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

fn report(s: &Samples) {
    let k_total = summary(s.kestrel.iter().map(|r| r.total));
    let runc = summary(s.runc.iter().copied());
    let non_guest = summary(
        s.kestrel
            .iter()
            .filter_map(|r| Some(r.total - r.phase("agent_ready")?)),
    );
    println!();
    let mut t = Table::new(&["", "kestrel (ms)", "runc (ms)", "kestrel/runc"]);
    t.row(vec![
        "ctr run --rm busybox true".into(),
        fmt_summary(k_total, 0),
        fmt_summary(runc, 0),
        ratio(k_total, runc),
    ]);
    t.row(vec![
        "  the same without the guest's boot (agent_ready)".into(),
        fmt_summary(non_guest, 0),
        fmt_summary(runc, 0),
        ratio(non_guest, runc),
    ]);
    // What runs on the host: everything but the calls into the guest and its boot.
    let host_side = summary(
        s.kestrel
            .iter()
            .filter_map(|r| Some(r.phase("prepare")? + r.phase("vm_build")? + r.other()?)),
    );
    t.row(vec![
        "  host side only (prepare + vm_build + other)".into(),
        fmt_summary(host_side, 0),
        fmt_summary(runc, 0),
        ratio(host_side, runc),
    ]);
    let (ke, re) = (
        summary(s.kestrel_exec.iter().copied()),
        summary(s.runc_exec.iter().copied()),
    );
    t.row(vec![
        "ctr task exec … true".into(),
        fmt_summary(ke, 0),
        fmt_summary(re, 0),
        ratio(ke, re),
    ]);
    print!("{}", t.render());
    println!();
    let mut p = Table::new(&["kestrel phase", "ms"]);
    for phase in PHASES {
        p.row(vec![
            phase.into(),
            fmt_summary(summary(s.kestrel.iter().filter_map(|r| r.phase(phase))), 1),
        ]);
    }
    let first = s
        .kestrel
        .iter()
        .find(|r| !r.cached)
        .and_then(|r| r.phase("prepare"));
    let warm = summary(
        s.kestrel
            .iter()
            .filter(|r| r.cached)
            .filter_map(|r| r.phase("prepare")),
    );
    p.row(vec![
        "  prepare, rootfs built (first run)".into(),
        first.map_or("-".into(), |v| format!("{v:.1}")),
    ]);
    p.row(vec![
        "  prepare, rootfs cached".into(),
        fmt_summary(warm, 1),
    ]);
    p.row(vec![
        "other (shim start, containerd, ctr)".into(),
        fmt_summary(summary(s.kestrel.iter().filter_map(KestrelRun::other)), 1),
    ]);
    print!("{}", p.render());
    println!();
    let overhead = summary(s.overhead_mib.iter().copied());
    println!(
        "shim + VMM memory beyond guest RAM: {} MiB",
        fmt_summary(overhead, 1)
    );
    if let (Some(n), Some(r)) = (non_guest, runc) {
        println!(
            "target: everything but the guest's boot <= 1.0x runc's ctr run: {:.2}x {}",
            n.median / r.median,
            verdict(n.median <= r.median)
        );
    }
    if let (Some(h), Some(r)) = (host_side, runc) {
        println!(
            "  (host side only: {:.2}x {}; create, start, run and teardown are guest work, emulated on kvm_pvm)",
            h.median / r.median,
            verdict(h.median <= r.median)
        );
    }
    if let Some(w) = warm {
        println!(
            "target: warm rootfs <= 5 ms: {:.1} ms {}",
            w.median,
            verdict(w.median <= 5.0)
        );
    }
    if let Some(o) = overhead {
        println!(
            "target: shim + VMM beyond guest RAM <= 10 MiB: {:.1} MiB {}",
            o.median,
            verdict(o.median <= 10.0)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_shims_timing_lines() {
        let log = r#"time="2026-12-06T21:00:00Z" level=info msg="timing: task=k1 prepare_ms=1.250" runtime=io.containerd.kestrel.v2
time="2026-12-06T21:00:01Z" level=info msg="timing: task=k1 agent_ready_ms=20345.5"
time="2026-12-06T21:00:01Z" level=info msg="timing: task=k10 start_ms=9""#;
        assert_eq!(timing(log, "k1", "prepare"), Some(1.25));
        assert_eq!(timing(log, "k1", "agent_ready"), Some(20345.5));
        assert_eq!(timing(log, "k1", "start"), None);
        assert_eq!(timing(log, "k10", "start"), Some(9.0));
        let r = KestrelRun {
            total: 100.0,
            phases: vec![Some(10.0); 7],
            cached: true,
        };
        assert_eq!(r.other(), Some(30.0));
        assert_eq!(r.phase("teardown"), Some(10.0));
    }
}
