//! `vmm-fixed-cost`: kestrel's own start-up, shut-down and memory cost beside qemu's
//! `-M microvm`, measured interleaved in one run.
//!
//! ```text
//! cargo run --release -p kestrel-benches --bin vmm-fixed-cost -- [--runs N] [--linux-runs M]
//!     [--kestrel PATH] [--qemu PATH] [--assets DIR] [--cmdline S]
//! ```
//!
//! 1. Builds the release `kestrel` (next to this binary, in the same target directory)
//!    and assembles `vmm/tests/payloads/hello.S` in place.
//! 2. **Tiny payload**: runs `kestrel run --kernel hello --no-initrd` and qemu microvm on
//!    the same ELF, alternately, N times each (default 20, after one discarded warm-up
//!    each) and reports medians and min/max of: process start → first guest output byte;
//!    last output byte (the payload then pokes the exit port at once) → `wait4` returned;
//!    peak RSS (`ru_maxrss`). Checks the output and exit status of every run (kestrel 42,
//!    qemu's isa-debug-exit (42 << 1) | 1 = 85) and compares against the targets
//!    (first output ≤ 4 ms, exit → gone ≤ 5 ms, peak RSS ≤ 5 MiB): PASS/MISS is reported,
//!    never turned into a failure.
//! 3. **Linux boot** (when the guest assets exist; `--linux-runs`, default 1, 0 skips):
//!    our vmlinux + initramfs under both VMMs with the same command line; times to the
//!    first console byte, to `Run /init`, to the agent's `kestrel-agent:` line and to
//!    process exit. Every boot is killed after 600 s.
//!
//! The bench exits non-zero only when kestrel itself could not be measured (build
//! failure, or no valid kestrel run).

// A bench tool, not product code: an `expect("what")` on a harness invariant is clearer
// than plumbing errors, and the measurement path returns errors with context anyway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use kestrel_benches::{
    assemble_payload, build_kestrel, ms, os, own_target_dir, qemu_linux_args, ratio, timed_run,
    version_line, which, Ended, HostFacts, RunResult, Summary, Table, GUEST_CMDLINE,
};

const USAGE: &str =
    "usage: vmm-fixed-cost [--runs N] [--linux-runs M] [--kestrel PATH] [--qemu PATH]
                      [--assets DIR] [--cmdline STRING]
  --runs N        tiny-payload runs per VMM, interleaved (default 20; 10 or more recommended)
  --linux-runs M  Linux boots per VMM when the guest assets exist (default 1; 0 skips)
  --kestrel PATH  measure this kestrel binary instead of building the release one
  --qemu PATH     the baseline (default: qemu-system-x86_64 on $PATH)
  --assets DIR    where vmlinux and initramfs.cpio are (default: kestrel's search order)
  --cmdline S     kernel command line for both VMMs' Linux boots";

/// What hello.S prints before it writes its exit status.
const GREETING: &str = "hello from the payload\n";
/// hello.S's exit status, as kestrel returns it.
const KESTREL_PAYLOAD_STATUS: i32 = 42;
/// qemu's isa-debug-exit turns a write of v into exit status (v << 1) | 1.
const QEMU_PAYLOAD_STATUS: i32 = (42 << 1) | 1;
/// The agent writes 0 to the exit port on success.
const KESTREL_LINUX_STATUS: i32 = 0;
const QEMU_LINUX_STATUS: i32 = 1;

/// stderr lines after which a VMM will never exit on its own: qemu stops the guest on a
/// KVM internal error and waits (kestrel exits with status 125).
const GIVE_UP: &[&str] = &["KVM internal error"];

const TINY_TIMEOUT: Duration = Duration::from_secs(60);
const LINUX_TIMEOUT: Duration = Duration::from_secs(600);

const TARGET_FIRST_OUTPUT_MS: f64 = 4.0;
const TARGET_EXIT_MS: f64 = 5.0;
const TARGET_RSS_MIB: f64 = 5.0;

struct Options {
    runs: usize,
    linux_runs: usize,
    kestrel: Option<PathBuf>,
    qemu: Option<PathBuf>,
    assets: Option<PathBuf>,
    /// `None`: [`GUEST_CMDLINE`] (kestrel's default; qemu also gets the kvm_pvm parameters).
    cmdline: Option<String>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        runs: 20,
        linux_runs: 1,
        kestrel: None,
        qemu: None,
        assets: None,
        cmdline: None,
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
        let number = |v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{name} takes a number, not {v:?}"))
        };
        match name.as_str() {
            "--runs" => o.runs = number(value()?)?.max(1),
            "--linux-runs" => o.linux_runs = number(value()?)?,
            "--kestrel" => o.kestrel = Some(value()?.into()),
            "--qemu" => o.qemu = Some(value()?.into()),
            "--assets" => o.assets = Some(value()?.into()),
            "--cmdline" => o.cmdline = Some(value()?),
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(o)
}

/// One of the two VMMs being compared: how to invoke it and what status means success.
struct Vmm {
    name: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
    expect_status: i32,
}

impl Vmm {
    fn command_line(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            let a = a.to_string_lossy();
            if a.contains(' ') {
                s.push_str(&format!(" '{a}'"));
            } else {
                s.push(' ');
                s.push_str(&a);
            }
        }
        s
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn fmt_summary(s: Option<Summary>, unit: &str, decimals: usize) -> String {
    match s {
        Some(s) => format!(
            "{:.d$} {unit} [{:.d$}..{:.d$}] n={}",
            s.median,
            s.min,
            s.max,
            s.n,
            d = decimals
        ),
        None => "-".into(),
    }
}

/// Why a tiny-payload run cannot be counted, if it cannot.
fn tiny_run_problem(r: &RunResult, expect_status: i32) -> Option<String> {
    if r.timed_out {
        return Some(format!("no exit within {TINY_TIMEOUT:?}, killed"));
    }
    if r.ended != Ended::Exited(expect_status) {
        return Some(format!("{} (expected {expect_status})", r.ended));
    }
    if r.output_text() != GREETING {
        return Some(format!(
            "console output {:?} (expected {GREETING:?})",
            r.output_text()
        ));
    }
    None
}

fn stderr_tail(r: &RunResult) -> String {
    let lines: Vec<&str> = r.stderr.lines().collect();
    let from = lines.len().saturating_sub(5);
    lines.get(from..).unwrap_or_default().join(" / ")
}

/// Samples of one VMM over the tiny-payload runs.
#[derive(Default)]
struct TinySamples {
    first_ms: Vec<f64>,
    exit_ms: Vec<f64>,
    rss_mib: Vec<f64>,
    failures: Vec<String>,
}

impl TinySamples {
    fn add(&mut self, run: usize, r: &RunResult, expect_status: i32) {
        if let Some(p) = tiny_run_problem(r, expect_status) {
            self.failures
                .push(format!("run {run}: {p}; stderr: {}", stderr_tail(r)));
            return;
        }
        // Both exist: the output was checked to be the greeting.
        self.first_ms
            .push(ms(r.first_byte.expect("output was read")));
        self.exit_ms
            .push(ms(r.exit_gap().expect("output was read")));
        self.rss_mib.push(mib(r.max_rss_kib));
    }
}

fn target_row(what: &str, got: Option<Summary>, unit: &str, limit: f64) -> Vec<String> {
    let (value, result) = match got {
        Some(s) => (
            format!("{:.2} {unit}", s.median),
            if s.median <= limit { "PASS" } else { "MISS" },
        ),
        None => ("-".into(), "no data"),
    };
    vec![what.into(), value, format!("{limit} {unit}"), result.into()]
}

/// Section 2: the tiny payload. Returns false when kestrel produced no valid run.
fn tiny_payload(
    opts: &Options,
    kestrel: &Path,
    qemu: Option<&Path>,
    work: &Path,
) -> Result<bool, String> {
    let payload = assemble_payload("hello", &work.join("payloads")).map_err(|e| e.to_string())?;
    let kestrel_vmm = Vmm {
        name: "kestrel",
        program: kestrel.to_path_buf(),
        args: {
            let mut a = os(&["run", "--kernel"]);
            a.push(payload.clone().into());
            a.push("--no-initrd".into());
            a
        },
        expect_status: KESTREL_PAYLOAD_STATUS,
    };
    let mut qemu_vmm = qemu.map(|q| Vmm {
        name: "qemu",
        program: q.to_path_buf(),
        args: {
            let mut a = os(&[
                "-M",
                "microvm",
                "-enable-kvm",
                "-cpu",
                "host,-arch-capabilities",
                "-m",
                "128",
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-monitor",
                "none",
                "-kernel",
            ]);
            a.push(payload.clone().into());
            a.extend(os(&["-device", "isa-debug-exit,iobase=0x444,iosize=1"]));
            a
        },
        expect_status: QEMU_PAYLOAD_STATUS,
    });

    println!();
    println!(
        "== VMM fixed cost: tiny PVH payload (vmm/tests/payloads/hello.S), {} runs per VMM, \
         interleaved kestrel/qemu, after 1 discarded warm-up run each",
        opts.runs
    );
    println!("payload ELF: {}", payload.display());
    println!(
        "kestrel: {}   (expects status {KESTREL_PAYLOAD_STATUS})",
        kestrel_vmm.command_line()
    );
    match &qemu_vmm {
        Some(q) => println!(
            "qemu:    {}   (expects status {QEMU_PAYLOAD_STATUS} = (42 << 1) | 1)",
            q.command_line()
        ),
        None => println!("skipped baseline: qemu-system-x86_64 not installed"),
    }

    let stderr_path = work.join("tiny.stderr");
    let run = |v: &Vmm| {
        timed_run(&v.program, &v.args, &[], TINY_TIMEOUT, &[], &stderr_path)
            .map_err(|e| format!("{}: {e}", v.name))
    };

    // Warm-up: page cache, dynamic loader, KVM module state. Also the place where a
    // baseline that does not work on this host is found and dropped.
    let w = run(&kestrel_vmm)?;
    if let Some(p) = tiny_run_problem(&w, kestrel_vmm.expect_status) {
        println!(
            "warning: kestrel warm-up run: {p}; stderr: {}",
            stderr_tail(&w)
        );
    }
    if let Some(q) = &qemu_vmm {
        let w = run(q)?;
        if let Some(p) = tiny_run_problem(&w, q.expect_status) {
            println!(
                "baseline failed, dropped: qemu warm-up run: {p}; stderr: {}",
                stderr_tail(&w)
            );
            qemu_vmm = None;
        }
    }

    let mut ks = TinySamples::default();
    let mut qs = TinySamples::default();
    for i in 1..=opts.runs {
        ks.add(i, &run(&kestrel_vmm)?, kestrel_vmm.expect_status);
        if let Some(q) = &qemu_vmm {
            qs.add(i, &run(q)?, q.expect_status);
        }
    }

    let have_qemu = qemu_vmm.is_some();
    let (k_first, k_exit, k_rss) = (
        Summary::of(&ks.first_ms),
        Summary::of(&ks.exit_ms),
        Summary::of(&ks.rss_mib),
    );
    let (q_first, q_exit, q_rss) = if have_qemu {
        (
            Summary::of(&qs.first_ms),
            Summary::of(&qs.exit_ms),
            Summary::of(&qs.rss_mib),
        )
    } else {
        (None, None, None)
    };
    let mut t = Table::new(&[
        "metric",
        "kestrel median [min..max]",
        "qemu microvm median [min..max]",
        "ratio kestrel/qemu",
    ]);
    t.row(vec![
        "process start -> first guest output byte".into(),
        fmt_summary(k_first, "ms", 2),
        fmt_summary(q_first, "ms", 2),
        ratio(k_first, q_first),
    ]);
    t.row(vec![
        "exit request (last byte) -> process gone".into(),
        fmt_summary(k_exit, "ms", 2),
        fmt_summary(q_exit, "ms", 2),
        ratio(k_exit, q_exit),
    ]);
    t.row(vec![
        "peak RSS (wait4 ru_maxrss)".into(),
        fmt_summary(k_rss, "MiB", 1),
        fmt_summary(q_rss, "MiB", 1),
        ratio(k_rss, q_rss),
    ]);
    println!();
    print!("{}", t.render());
    for (name, s) in [("kestrel", &ks), ("qemu", &qs)] {
        for f in &s.failures {
            println!("{name}: not counted: {f}");
        }
    }

    let mut targets = Table::new(&["target (kestrel)", "kestrel median", "target", "result"]);
    targets.row(target_row(
        "first output byte",
        k_first,
        "ms",
        TARGET_FIRST_OUTPUT_MS,
    ));
    targets.row(target_row(
        "exit request -> process gone",
        k_exit,
        "ms",
        TARGET_EXIT_MS,
    ));
    targets.row(target_row("peak RSS", k_rss, "MiB", TARGET_RSS_MIB));
    println!();
    print!("{}", targets.render());
    Ok(k_first.is_some())
}

fn find_assets(explicit: Option<&Path>) -> Option<(PathBuf, PathBuf)> {
    let mut dirs = Vec::new();
    match explicit {
        Some(d) => dirs.push(d.to_path_buf()),
        None => {
            // kestrel's own search order (cli assets).
            if let Some(d) = std::env::var_os("KESTREL_ASSETS") {
                dirs.push(PathBuf::from(d));
            }
            dirs.push(PathBuf::from("/usr/local/share/kestrel"));
            if let Some(home) = std::env::var_os("HOME") {
                dirs.push(PathBuf::from(home).join(".cache/kestrel/assets"));
            }
        }
    }
    dirs.into_iter()
        .map(|d| (d.join("vmlinux"), d.join("initramfs.cpio")))
        .find(|(k, i)| k.is_file() && i.is_file())
}

/// Samples of one VMM over the Linux boots (seconds).
#[derive(Default)]
struct LinuxSamples {
    first: Vec<f64>,
    run_init: Vec<f64>,
    agent: Vec<f64>,
    exit: Vec<f64>,
    rss_mib: Vec<f64>,
    notes: Vec<String>,
}

impl LinuxSamples {
    fn add(&mut self, run: usize, r: &RunResult, expect_status: i32, log: &Path) {
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        if let Some(v) = secs(r.first_byte) {
            self.first.push(v);
        }
        if let Some(v) = secs(r.markers.first().copied().flatten()) {
            self.run_init.push(v);
        }
        if let Some(v) = secs(r.markers.get(1).copied().flatten()) {
            self.agent.push(v);
        }
        let mut note = format!(
            "run {run}: {}, {:.1} s, console log {}",
            r.ended,
            r.gone.as_secs_f64(),
            log.display()
        );
        if let Some(g) = &r.gave_up_on {
            note.push_str(&format!(
                "; killed: it printed {g:?} and would not exit; stderr: {}",
                stderr_tail(r)
            ));
        } else if r.timed_out {
            note.push_str(&format!("; killed after {LINUX_TIMEOUT:?}"));
        } else if r.ended == Ended::Exited(expect_status) {
            self.exit.push(r.gone.as_secs_f64());
            self.rss_mib.push(mib(r.max_rss_kib));
        } else {
            note.push_str(&format!(
                "; expected status {expect_status}, exit time not counted; stderr: {}",
                stderr_tail(r)
            ));
        }
        for (marker, t) in ["Run /init", "kestrel-agent:"].iter().zip(&r.markers) {
            if t.is_none() {
                note.push_str(&format!("; {marker:?} never appeared"));
            }
        }
        self.notes.push(note);
    }
}

/// Section 3: Linux boot to init, both VMMs, same kernel, initramfs and command line.
fn linux_boot(
    opts: &Options,
    host: &HostFacts,
    kestrel: &Path,
    qemu: Option<&Path>,
    work: &Path,
) -> Result<(), String> {
    println!();
    if opts.linux_runs == 0 {
        println!("== Linux boot: skipped (--linux-runs 0)");
        return Ok(());
    }
    let Some((vmlinux, initramfs)) = find_assets(opts.assets.as_deref()) else {
        println!(
            "== Linux boot: skipped: no vmlinux + initramfs.cpio found ($KESTREL_ASSETS, \
             /usr/local/share/kestrel, ~/.cache/kestrel/assets); build them with \
             scripts/build-guest.sh"
        );
        return Ok(());
    };
    println!(
        "== Linux boot to init: {} boot(s) per VMM, interleaved, 1 vCPU, 128 MiB, killed after {:?}",
        opts.linux_runs, LINUX_TIMEOUT
    );
    // kestrel adds its kvm_pvm parameters itself; qemu is given the same ones.
    let cmdline = opts
        .cmdline
        .clone()
        .unwrap_or_else(|| GUEST_CMDLINE.to_string());
    if host.kvm_pvm {
        println!(
            "kvm_pvm host: qemu's command line also gets `{}` (kestrel adds it by itself)",
            vmm::arch::cpuid::PVM_KERNEL_PARAMS
        );
    }
    println!("kernel: {}", vmlinux.display());
    println!("initramfs: {}", initramfs.display());
    let kestrel_vmm = Vmm {
        name: "kestrel",
        program: kestrel.to_path_buf(),
        args: {
            let mut a = os(&["run", "--kernel"]);
            a.push(vmlinux.clone().into());
            a.push("--initrd".into());
            a.push(initramfs.clone().into());
            a.extend(os(&[
                "--cmdline",
                &cmdline,
                "--cpus",
                "1",
                "--memory",
                "128",
            ]));
            a
        },
        expect_status: KESTREL_LINUX_STATUS,
    };
    let qemu_vmm = qemu.map(|q| Vmm {
        name: "qemu",
        program: q.to_path_buf(),
        args: {
            // acpi=off, rtc=off: the platform kestrel gives the guest (no ACPI, no RTC);
            // auto-kernel-cmdline=off: qemu appends nothing, both guests get the same
            // command line. -no-reboot: the agent's fallback reboot ends qemu as it ends
            // kestrel.
            qemu_linux_args(
                ",auto-kernel-cmdline=off",
                host.kvm_pvm,
                &vmlinux,
                &initramfs,
                &cmdline,
            )
        },
        expect_status: QEMU_LINUX_STATUS,
    });
    println!(
        "kestrel: {}   (expects status {KESTREL_LINUX_STATUS})",
        kestrel_vmm.command_line()
    );
    match &qemu_vmm {
        Some(q) => println!(
            "qemu:    {}   (expects status {QEMU_LINUX_STATUS} = (0 << 1) | 1)",
            q.command_line()
        ),
        None => println!("skipped baseline: qemu-system-x86_64 not installed"),
    }

    let logs = work.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let markers = ["Run /init", "kestrel-agent:"];
    let boot = |v: &Vmm, i: usize, s: &mut LinuxSamples| -> Result<(), String> {
        let log = logs.join(format!("linux-{}-{i}.console", v.name));
        let stderr = logs.join(format!("linux-{}-{i}.stderr", v.name));
        let r = timed_run(
            &v.program,
            &v.args,
            &markers,
            LINUX_TIMEOUT,
            GIVE_UP,
            &stderr,
        )
        .map_err(|e| format!("{}: {e}", v.name))?;
        std::fs::write(&log, &r.output).map_err(|e| format!("writing {}: {e}", log.display()))?;
        s.add(i, &r, v.expect_status, &log);
        Ok(())
    };
    let mut ks = LinuxSamples::default();
    let mut qs = LinuxSamples::default();
    for i in 1..=opts.linux_runs {
        boot(&kestrel_vmm, i, &mut ks)?;
        if let Some(q) = &qemu_vmm {
            boot(q, i, &mut qs)?;
        }
    }

    let mut t = Table::new(&[
        "metric (from process start)",
        "kestrel median [min..max]",
        "qemu microvm median [min..max]",
        "ratio kestrel/qemu",
    ]);
    let rows = [
        ("first console byte", &ks.first, &qs.first, "s", 3),
        ("\"Run /init\" (kernel)", &ks.run_init, &qs.run_init, "s", 2),
        ("\"kestrel-agent:\" (agent)", &ks.agent, &qs.agent, "s", 2),
        ("process exit", &ks.exit, &qs.exit, "s", 2),
        ("peak RSS", &ks.rss_mib, &qs.rss_mib, "MiB", 1),
    ];
    for (what, k, q, unit, d) in rows {
        let (k, q) = (Summary::of(k), Summary::of(q));
        t.row(vec![
            what.into(),
            fmt_summary(k, unit, d),
            fmt_summary(q, unit, d),
            ratio(k, q),
        ]);
    }
    println!();
    print!("{}", t.render());
    for (name, s) in [("kestrel", &ks), ("qemu", &qs)] {
        for n in &s.notes {
            println!("{name}: {n}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    kestrel_benches::bench_main(
        "vmm-fixed-cost",
        USAGE,
        "no valid kestrel run; see the failures above",
        parse_args,
        run,
    )
}

fn run(opts: &Options) -> Result<bool, String> {
    let host = HostFacts::probe();
    let target_dir = own_target_dir().map_err(|e| e.to_string())?;
    let work = target_dir.join("kestrel-benches");
    println!("kestrel vmm-fixed-cost bench");
    println!("{}", host.describe());
    if cfg!(debug_assertions) {
        println!(
            "note: this harness is a debug build (kestrel itself is always measured in release)"
        );
    }

    let kestrel = match &opts.kestrel {
        Some(k) => k.clone(),
        None => build_kestrel(&target_dir).map_err(|e| format!("building kestrel: {e}"))?,
    };
    println!("kestrel binary: {}", kestrel.display());
    let qemu = opts
        .qemu
        .clone()
        .or_else(|| which("qemu-system-x86_64"))
        .filter(|q| q.is_file());
    match &qemu {
        Some(q) => println!("baseline: {} ({})", q.display(), version_line(q)),
        None => println!("skipped baseline: qemu-system-x86_64 not installed"),
    }

    let ok = tiny_payload(opts, &kestrel, qemu.as_deref(), &work)?;
    linux_boot(opts, &host, &kestrel, qemu.as_deref(), &work)?;
    println!();
    println!(
        "All numbers above were measured in this run; ratios < 1 mean kestrel is cheaper. \
         loadavg at end: {}",
        HostFacts::probe().loadavg
    );
    Ok(ok)
}
