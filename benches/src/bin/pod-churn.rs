//! `pod-churn`: one Kubernetes pod through containerd's CRI plugin, many containers passing
//! through it one after another, as a Job's or a CronJob's pod or a restarting container
//! does; what the pod's shim keeps. kestrel beside runc in one run.
//!
//! ```text
//! cargo run --release -p kestrel-benches --bin pod-churn -- [--containers N] [--shim PATH]
//! ```
//!
//! 1. Builds the release shim (or takes `--shim`) and the busybox and pause images, starts
//!    a private containerd with its CRI plugin and a bridge CNI network (the fixture of
//!    `kestrel-integration-tests`).
//! 2. Per runtime (kestrel, then runc): RunPodSandbox, 3 warm-up containers, then N
//!    containers (default 30) in sequence, each CreateContainer + StartContainer of busybox
//!    `echo done`, awaited in its CRI log, StopContainer, RemoveContainer. Before the N and
//!    after them the pod's shim is sampled: Rss (for kestrel minus the Rss of its guest
//!    RAM mapping, which the guest's own page cache fills), open fds, threads. The pod is
//!    removed.
//! 3. Prints the growth over the N containers, per container, and the cycle time.
//!
//! The bench exits non-zero only when the kestrel pod could not be measured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kestrel_benches::containerd::{
    kib_field, kill_fixture_processes, prepare, sample_memory, wait_for_line, FIXTURE, POD_VM_MIB,
};
use kestrel_benches::{fmt_summary, positive, summary, Table};
use kestrel_integration_tests::containerd::Containerd;
use kestrel_integration_tests::cri::Cri;
use kestrel_integration_tests::images;

const USAGE: &str = "usage: pod-churn [--containers N] [--shim PATH]
  --containers N  containers passing through each pod after the warm-up, default 30
  --shim PATH     use this containerd-shim-kestrel-v2 instead of building the release one";

const WARM_UP: usize = 3;
const DONE_TIMEOUT: Duration = Duration::from_secs(600);

struct Options {
    containers: usize,
    shim: Option<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        containers: 30,
        shim: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--containers" => o.containers = positive(&arg, &value()?)?,
            "--shim" => o.shim = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    kestrel_benches::bench_main(
        "pod-churn",
        USAGE,
        "the kestrel pod was not measured; see the failures above",
        parse_args,
        run,
    )
}

/// One look at a pod's shim.
#[derive(Debug, Clone, Copy)]
struct ShimSample {
    /// Rss beyond the guest RAM (kestrel) or the whole Rss (runc), KiB.
    rss_kib: u64,
    fds: usize,
    threads: u64,
}

fn sample(pid: u32, kestrel: bool) -> Result<ShimSample, String> {
    let rss_kib = if kestrel {
        let m = sample_memory(pid, POD_VM_MIB)?;
        m.shim_rss_kib.saturating_sub(m.guest_rss_kib)
    } else {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .map_err(|e| format!("/proc/{pid}/smaps_rollup: {e}"))?;
        kib_field(&rollup, "Rss").ok_or("no Rss")?
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    Ok(ShimSample {
        rss_kib,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()),
        threads: kib_field(&status, "Threads").unwrap_or(0),
    })
}

/// The shim process serving `pod` (an argument `-id <pod>`), of either runtime.
fn pod_shim(c: &Containerd, pod: &str) -> Option<u32> {
    c.shim_processes()
        .into_iter()
        .find(|p| {
            p.args
                .windows(2)
                .any(|w| matches!(w, [k, v] if k == OsStr::new("-id") && v == OsStr::new(pod)))
                && !p.args.iter().any(|a| a == "start" || a == "delete")
        })
        .map(|p| p.pid)
}

struct Churn {
    runtime: &'static str,
    before: ShimSample,
    after: ShimSample,
    cycles_ms: Vec<f64>,
}

fn churn(
    c: &Containerd,
    cri: &Cri,
    logs: &Path,
    runtime: &'static str,
    handler: &str,
    n: usize,
) -> Result<Churn, String> {
    let name = format!("churn-{runtime}-{}", std::process::id());
    let dir = logs.join(&name);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = Cri::pod_config(&name, &dir, &[]);
    let pod = cri
        .run_pod(&config, handler)
        .map_err(|e| format!("RunPodSandbox: {e}"))?;
    let result = (|| {
        let cycle = |i: usize| -> Result<f64, String> {
            let t0 = Instant::now();
            let cname = format!("c{i}");
            let id = cri
                .start_container(
                    &pod,
                    &config,
                    &cname,
                    images::BUSYBOX_IMAGE,
                    &["echo", "done"],
                )
                .map_err(|e| format!("container {i}: Create/StartContainer: {e}"))?;
            if !wait_for_line(&dir.join(format!("{cname}.log")), "done", DONE_TIMEOUT) {
                return Err(format!("container {i}: no output within {DONE_TIMEOUT:?}"));
            }
            cri.stop_container(&id, 0)
                .map_err(|e| format!("container {i}: StopContainer: {e}"))?;
            cri.remove_container(&id)
                .map_err(|e| format!("container {i}: RemoveContainer: {e}"))?;
            Ok(t0.elapsed().as_secs_f64() * 1000.0)
        };
        for i in 0..WARM_UP {
            cycle(i)?;
        }
        let shim = pod_shim(c, &pod).ok_or("the pod's shim process is not to be found")?;
        let before = sample(shim, runtime == "kestrel")?;
        println!("{runtime}: after {WARM_UP} warm-up containers: {before:?}");
        let mut cycles_ms = Vec::new();
        for i in WARM_UP..WARM_UP + n {
            cycles_ms.push(cycle(i)?);
            if (i + 1 - WARM_UP) % 10 == 0 {
                println!(
                    "{runtime}: {} containers: {:?}",
                    i + 1 - WARM_UP,
                    sample(shim, runtime == "kestrel")?
                );
            }
        }
        let after = sample(shim, runtime == "kestrel")?;
        Ok(Churn {
            runtime,
            before,
            after,
            cycles_ms,
        })
    })();
    if let Err(e) = cri.remove_pod(&pod) {
        println!("{runtime}: removing the pod: {e}");
    }
    result
}

fn run(opts: &Options) -> Result<bool, String> {
    let Some(shim) = prepare("pod-churn", opts.shim.as_deref())? else {
        return Ok(true);
    };
    let c = Containerd::builder()
        .shim(&shim)
        .start()
        .map_err(|e| format!("cannot start containerd: {e}"))?;
    let _ = FIXTURE.set((c.pid(), c.dir().to_path_buf()));
    c.import(images::busybox(), "k8s.io");
    c.import(images::pause(), "k8s.io");
    let cri = Cri::connect(c.socket());
    let logs = c.dir().join("pod-logs");
    println!(
        "private containerd in {} (CRI plugin, bridge CNI); {} containers per pod after {WARM_UP} warm-up ones",
        c.dir().display(),
        opts.containers
    );
    let kestrel = churn(&c, &cri, &logs, "kestrel", "kestrel", opts.containers);
    if let Err(e) = &kestrel {
        println!("kestrel: not measured: {e}");
    }
    let runc = churn(&c, &cri, &logs, "runc", "", opts.containers);
    if let Err(e) = &runc {
        println!("runc: not measured: {e}");
    }
    let dir = c.dir().to_path_buf();
    let daemon = c.pid();
    drop(cri);
    drop(c);
    kill_fixture_processes(daemon, &dir);

    let mut t = Table::new(&[
        "pod shim over the containers",
        "Rss before (MiB)",
        "Rss after (MiB)",
        "growth (KiB)",
        "per container (KiB)",
        "fds",
        "threads",
        "cycle (ms)",
    ]);
    for r in [&kestrel, &runc].into_iter().flatten() {
        let growth = r.after.rss_kib as i64 - r.before.rss_kib as i64;
        t.row(vec![
            if r.runtime == "kestrel" {
                "kestrel (beyond guest RAM)".into()
            } else {
                r.runtime.into()
            },
            format!("{:.1}", r.before.rss_kib as f64 / 1024.0),
            format!("{:.1}", r.after.rss_kib as f64 / 1024.0),
            growth.to_string(),
            format!("{:.1}", growth as f64 / r.cycles_ms.len().max(1) as f64),
            format!("{} → {}", r.before.fds, r.after.fds),
            format!("{} → {}", r.before.threads, r.after.threads),
            fmt_summary(summary(r.cycles_ms.iter().copied()), 0),
        ]);
    }
    println!("\n{}", t.render());
    if let Ok(k) = &kestrel {
        let growth = k.after.rss_kib as i64 - k.before.rss_kib as i64;
        println!(
            "target: the pod shim grows by at most 1 MiB: {} ({growth} KiB over {} containers)",
            if growth <= 1024 { "PASS" } else { "MISS" },
            k.cycles_ms.len()
        );
    }
    Ok(kestrel.is_ok())
}
