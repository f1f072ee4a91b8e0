//! `cri-pod`: a Kubernetes pod through containerd's CRI plugin, kestrel beside runc in one
//! run, as kubelet starts one: RunPodSandbox, CreateContainer, StartContainer, until the
//! container's first output is in its CRI log file; and the shim's host memory per pod
//! (the RuntimeClass overhead of deploy/runtimeclass.yaml).
//!
//! ```text
//! cargo run --release -p kestrel-benches --bin cri-pod -- [--runs N] [--shim PATH]
//! ```
//!
//! 1. Builds the release shim (or takes `--shim`) and the busybox and pause images, starts
//!    a private containerd with its CRI plugin and a bridge CNI network (the fixture of
//!    `kestrel-integration-tests`).
//! 2. N rounds (default 2), each: a kestrel pod, then a runc pod, each with one busybox
//!    container `echo ready; exec sleep 3600`, timed from RunPodSandbox to the `ready` line
//!    in the container's log (polled every 5 ms); the kestrel time split into
//!    RunPodSandbox, the pod VM's boot (the shim's `agent_ready`: the guest kernel until
//!    its agent answers), the rest of Create+Start, and the wait for the log line. One
//!    memory sample of the kestrel shim with the pod running: its Rss, the Rss of the
//!    guest RAM mapping, the rest (shim + VMM). Both pods are removed.
//! 3. Prints medians and ratios.
//!
//! The bench exits non-zero only when no kestrel pod could be measured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kestrel_benches::containerd::{
    kill_fixture_processes, prepare, read_log_since, sample_memory, wait_for_line, FIXTURE,
    POD_VM_MIB,
};
use kestrel_benches::{fmt_summary, positive, ratio, summary, Table};
use kestrel_integration_tests::containerd::Containerd;
use kestrel_integration_tests::cri::Cri;
use kestrel_integration_tests::images;

const USAGE: &str = "usage: cri-pod [--runs N] [--shim PATH]
  --runs N     rounds (a kestrel pod, then a runc pod), default 2
  --shim PATH  use this containerd-shim-kestrel-v2 instead of building the release one";

const READY_TIMEOUT: Duration = Duration::from_secs(600);

struct Options {
    runs: usize,
    shim: Option<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        runs: 2,
        shim: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--runs" => o.runs = positive(&arg, &value()?)?,
            "--shim" => o.shim = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    kestrel_benches::bench_main(
        "cri-pod",
        USAGE,
        "no kestrel pod was measured; see the failures above",
        parse_args,
        run,
    )
}

/// One pod start: RunPodSandbox, Create+Start, first output (ms).
struct PodStart {
    sandbox: f64,
    containers: f64,
    total: f64,
    agent_ready: Option<f64>,
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

/// Starts one pod of one busybox container; returns the pod id, container id and times.
fn start_pod(
    cri: &Cri,
    logs: &Path,
    name: &str,
    handler: &str,
) -> Result<(String, String, PodStart), String> {
    let dir = logs.join(name);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = Cri::pod_config(name, &dir, &[]);
    let t0 = Instant::now();
    let pod = cri
        .run_pod(&config, handler)
        .map_err(|e| format!("RunPodSandbox: {e}"))?;
    let sandbox = t0.elapsed().as_secs_f64() * 1000.0;
    let id = cri
        .start_container(
            &pod,
            &config,
            "c",
            images::BUSYBOX_IMAGE,
            &["sh", "-c", "echo ready; exec sleep 3600"],
        )
        .map_err(|e| format!("Create/StartContainer: {e}"))?;
    let containers = t0.elapsed().as_secs_f64() * 1000.0 - sandbox;
    if !wait_for_line(&dir.join("c.log"), "ready", READY_TIMEOUT) {
        return Err("no output within the timeout".into());
    }
    let total = t0.elapsed().as_secs_f64() * 1000.0;
    Ok((
        pod,
        id,
        PodStart {
            sandbox,
            containers,
            total,
            agent_ready: None,
        },
    ))
}

fn run(opts: &Options) -> Result<bool, String> {
    let Some(shim) = prepare("cri-pod", opts.shim.as_deref())? else {
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
        "private containerd in {} (CRI plugin, bridge CNI)",
        c.dir().display()
    );

    let (mut kestrel, mut runc_starts, mut overhead, mut shim_rss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut log_from = 0usize;
    let pid = std::process::id();
    for round in 1..=opts.runs {
        let _ = read_log_since(&c, &mut log_from);
        match start_pod(&cri, &logs, &format!("k{pid}-{round}"), "kestrel") {
            Ok((pod, id, mut s)) => {
                let log = read_log_since(&c, &mut log_from);
                s.agent_ready = timing(&log, &id, "agent_ready");
                println!(
                    "round {round}: kestrel pod {:.0} ms: RunPodSandbox {:.0}, Create+Start {:.0} (VM boot {:.0}), output {:.0}",
                    s.total,
                    s.sandbox,
                    s.containers,
                    s.agent_ready.unwrap_or(f64::NAN),
                    s.total - s.sandbox - s.containers
                );
                match c
                    .kestrel_shim_pid(&pod)
                    .ok_or("no shim process".to_string())
                    .and_then(|p| sample_memory(p, POD_VM_MIB))
                {
                    Ok(m) => {
                        let beyond = m.shim_rss_kib.saturating_sub(m.guest_rss_kib) as f64 / 1024.0;
                        println!(
                            "round {round}: shim Rss {:.1} MiB (guest RAM {:.1} MiB, shim + VMM {beyond:.1} MiB)",
                            m.shim_rss_kib as f64 / 1024.0,
                            m.guest_rss_kib as f64 / 1024.0
                        );
                        overhead.push(beyond);
                        shim_rss.push(m.shim_rss_kib as f64 / 1024.0);
                    }
                    Err(e) => println!("round {round}: memory not sampled: {e}"),
                }
                kestrel.push(s);
                if let Err(e) = cri.remove_pod(&pod) {
                    println!("round {round}: removing the kestrel pod: {e}");
                }
            }
            Err(e) => println!("round {round}: kestrel not counted: {e}"),
        }
        match start_pod(&cri, &logs, &format!("r{pid}-{round}"), "") {
            Ok((pod, _, s)) => {
                println!(
                    "round {round}: runc pod {:.0} ms (RunPodSandbox {:.0})",
                    s.total, s.sandbox
                );
                runc_starts.push(s);
                let _ = cri.remove_pod(&pod);
            }
            Err(e) => println!("round {round}: runc not counted: {e}"),
        }
    }
    let dir = c.dir().to_path_buf();
    let daemon = c.pid();
    drop(cri);
    drop(c);
    kill_fixture_processes(daemon, &dir);

    let k = summary(kestrel.iter().map(|s| s.total));
    let r = summary(runc_starts.iter().map(|s| s.total));
    let boot = summary(kestrel.iter().filter_map(|s| s.agent_ready));
    let k_no_boot = summary(
        kestrel
            .iter()
            .filter_map(|s| Some(s.total - s.agent_ready?)),
    );
    println!();
    let mut t = Table::new(&[
        "pod start to first output",
        "kestrel (ms)",
        "runc (ms)",
        "kestrel/runc",
    ]);
    t.row(vec![
        "whole".into(),
        fmt_summary(k, 0),
        fmt_summary(r, 0),
        ratio(k, r),
    ]);
    t.row(vec![
        "  RunPodSandbox".into(),
        fmt_summary(summary(kestrel.iter().map(|s| s.sandbox)), 0),
        fmt_summary(summary(runc_starts.iter().map(|s| s.sandbox)), 0),
        ratio(
            summary(kestrel.iter().map(|s| s.sandbox)),
            summary(runc_starts.iter().map(|s| s.sandbox)),
        ),
    ]);
    t.row(vec![
        "  the pod VM's boot (agent_ready, in Create)".into(),
        fmt_summary(boot, 0),
        "-".into(),
        "-".into(),
    ]);
    t.row(vec![
        "  all but the VM's boot".into(),
        fmt_summary(k_no_boot, 0),
        fmt_summary(r, 0),
        ratio(k_no_boot, r),
    ]);
    print!("{}", t.render());
    println!();
    println!(
        "shim Rss per pod: {} MiB, of it shim + VMM beyond the guest RAM: {} MiB (guest RAM {POD_VM_MIB} MiB, touched as used)",
        fmt_summary(summary(shim_rss.iter().copied()), 1),
        fmt_summary(summary(overhead.iter().copied()), 1)
    );
    Ok(!kestrel.is_empty())
}
