//! `blk-throughput`: in-guest virtio-blk throughput under kestrel, beside the same I/O
//! done on the host and under qemu `-M microvm`, measured in one run.
//!
//! ```text
//! cargo run --release -p kestrel-benches --bin blk-throughput -- [--runs N] [--size-mib N]
//!     [--seconds N] [--seq-kib N] [--rand-kib N] [--kestrel PATH] [--qemu PATH]
//!     [--qemu-cache MODE] [--assets DIR]
//! ```
//!
//! 1. Builds the release `kestrel` (next to this binary) and the io-guest initramfs
//!    (`tests/images/io-guest/build.sh`: a static PID 1 packed by `rootfs/mkinitramfs.sh`),
//!    and writes a raw disk file of `--size-mib` (default 256) of non-zero pseudo-random
//!    bytes (never sparse: holes would read as free zeroes).
//! 2. Per round (`--runs`, default 1), interleaved: the **host** runs the four patterns on
//!    that file itself — through the page cache (what kestrel's raw-file backend and
//!    qemu `cache=writeback` do) and with `O_DIRECT` — then **kestrel** and **qemu**
//!    each boot our `vmlinux` with the io-guest initramfs, the file attached as
//!    virtio-blk, 1 vCPU, 128 MiB, the same kernel command line. In the guest, io-guest
//!    opens `/dev/vda` with `O_DIRECT` and runs: sequential read (`--seq-kib`, default
//!    1024 KiB requests), random read (`--rand-kib`, default 4 KiB), sequential write,
//!    random write; each pattern stops after `--size-mib` or `--seconds` (default 10),
//!    whichever comes first; writes end with an fdatasync, timed too. It prints one
//!    `io-guest: result …` line per pattern (its own monotonic clock) and ends the VM.
//! 3. Prints MB/s and IOPS per pattern (median over rounds) and the ratios kestrel/host
//!    (page cache) and kestrel/qemu; the target "sequential ≥ 0.9× host" is reported as
//!    PASS/MISS, never as a failure.
//!
//! qemu: `-drive file=DISK,format=raw,if=none,id=d0,cache=MODE -device
//! virtio-blk-device,drive=d0` (virtio-mmio; `--qemu-cache`, default `writeback`, the
//! page-cache mode kestrel's backend matches; `none` is qemu with `O_DIRECT` on the host).
//! On a kvm_pvm host both VMMs get the kernel switches that hide what the emulator cannot
//! run, as in `vmm-fixed-cost`. The bench exits non-zero only when kestrel could not be
//! built or measured at all.

// A bench tool, not product code: an `expect("what")` on a harness invariant is clearer
// than plumbing errors, and the measurement path returns errors with context anyway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use kestrel_benches::{
    build_kestrel, os, own_target_dir, qemu_linux_args, ratio, timed_run, version_line, which,
    workspace_root, Ended, HostFacts, RunResult, Summary, Table, GUEST_CMDLINE,
};

const USAGE: &str = "usage: blk-throughput [--runs N] [--size-mib N] [--seconds N] [--seq-kib N]
                      [--rand-kib N] [--kestrel PATH] [--qemu PATH] [--qemu-cache MODE]
                      [--assets DIR]
  --runs N          rounds (host, kestrel, qemu each once per round; default 1)
  --size-mib N      disk file size = region each pattern covers at most (default 256)
  --seconds N       time limit of each pattern (default 10)
  --seq-kib N       sequential request size, multiple of 4 (default 1024)
  --rand-kib N      random request size, multiple of 4 (default 4)
  --kestrel PATH    measure this kestrel binary instead of building the release one
  --qemu PATH       the baseline (default: qemu-system-x86_64 on $PATH)
  --qemu-cache MODE qemu -drive cache= mode (default writeback; none = O_DIRECT)
  --assets DIR      where vmlinux is (default: kestrel's search order)";

/// stderr lines after which a VMM will never exit on its own.
const GIVE_UP: &[&str] = &["KVM internal error"];

/// Boot allowance on top of the patterns' time limits.
const BOOT_ALLOWANCE: Duration = Duration::from_secs(600);

/// The patterns, in the order io-guest runs them.
const PATTERNS: [&str; 4] = ["seqread", "randread", "seqwrite", "randwrite"];

/// Target: kestrel's sequential throughput at least this share of the host's.
const TARGET_SEQ_SHARE: f64 = 0.9;

struct Options {
    runs: usize,
    size_mib: u64,
    seconds: u64,
    seq_kib: usize,
    rand_kib: usize,
    kestrel: Option<PathBuf>,
    qemu: Option<PathBuf>,
    qemu_cache: String,
    assets: Option<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        runs: 1,
        size_mib: 256,
        seconds: 10,
        seq_kib: 1024,
        rand_kib: 4,
        kestrel: None,
        qemu: None,
        qemu_cache: "writeback".into(),
        assets: None,
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
            v.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{name} takes a positive number, not {v:?}"))
        };
        let kib = |v: String| {
            number(v)
                .and_then(|n| usize::try_from(n).map_err(|e| e.to_string()))
                .and_then(|n| {
                    if n % 4 == 0 && n <= 64 * 1024 {
                        Ok(n)
                    } else {
                        Err(format!("{name} must be a multiple of 4 up to 65536"))
                    }
                })
        };
        match name.as_str() {
            "--runs" => o.runs = usize::try_from(number(value()?)?).unwrap_or(1),
            "--size-mib" => o.size_mib = number(value()?)?,
            "--seconds" => o.seconds = number(value()?)?,
            "--seq-kib" => o.seq_kib = kib(value()?)?,
            "--rand-kib" => o.rand_kib = kib(value()?)?,
            "--kestrel" => o.kestrel = Some(value()?.into()),
            "--qemu" => o.qemu = Some(value()?.into()),
            "--qemu-cache" => o.qemu_cache = value()?,
            "--assets" => o.assets = Some(value()?.into()),
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if o.seq_kib.max(o.rand_kib) as u64 > o.size_mib * 1024 {
        return Err("--seq-kib and --rand-kib must not exceed the disk size".into());
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------
// Inputs

/// `vmlinux` from `--assets` or kestrel's search order.
fn find_vmlinux(explicit: Option<&Path>) -> Option<PathBuf> {
    let mut dirs = Vec::new();
    match explicit {
        Some(d) => dirs.push(d.to_path_buf()),
        None => {
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
        .map(|d| d.join("vmlinux"))
        .find(|k| k.is_file())
}

/// Runs `tests/images/io-guest/build.sh` (static build + initramfs, cached) and returns
/// the initramfs path it prints.
fn build_io_guest(target_dir: &Path) -> Result<PathBuf, String> {
    let script = workspace_root().join("tests/images/io-guest/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("CARGO_TARGET_DIR", target_dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let path = PathBuf::from(path);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("{} printed no initramfs path", script.display()))
    }
}

/// xorshift64 state step.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Writes `size` bytes of non-zero pseudo-random data to `path` and syncs it.
fn make_disk(path: &Path, size: u64) -> Result<(), String> {
    let ctx = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let mut f = File::create(path).map_err(ctx)?;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            word.copy_from_slice(&(xorshift(&mut state) | 0x0101_0101_0101_0101).to_le_bytes());
        }
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        f.write_all(buf.get(..n).unwrap_or_default()).map_err(ctx)?;
        left -= n as u64;
    }
    f.sync_all().map_err(ctx)
}

// ---------------------------------------------------------------------------------------
// Measurements

/// One pattern's outcome.
#[derive(Debug, Clone, Copy)]
struct Measured {
    mbps: f64,
    iops: f64,
}

/// Results of one run of the four patterns, by pattern name.
type RunResults = BTreeMap<String, Measured>;

/// An aligned buffer carved out of a larger `Vec` (O_DIRECT wants 4 KiB alignment).
fn aligned(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    storage.resize(len + 4096, 0x5a);
    let start = storage.as_ptr().align_offset(4096).min(4096);
    storage.get_mut(start..start + len).unwrap_or_default()
}

/// The host baseline: the same patterns, request sizes and limits as io-guest, on the
/// disk file itself, through the page cache or with `O_DIRECT`.
fn host_run(disk: &Path, o: &Options, direct: bool) -> Result<RunResults, String> {
    let ctx = |e: std::io::Error| format!("host I/O on {}: {e}", disk.display());
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let f = opts.open(disk).map_err(ctx)?;
    let region = o.size_mib << 20;
    let limit = Duration::from_secs(o.seconds);
    let mut storage = Vec::new();
    let mut results = RunResults::new();
    for pattern in PATTERNS {
        let random = pattern.starts_with("rand");
        let write = pattern.ends_with("write");
        let bs = if random { o.rand_kib } else { o.seq_kib } * 1024;
        let buf = aligned(&mut storage, bs);
        let blocks = region / bs as u64;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let (mut ops, mut bytes) = (0u64, 0u64);
        let start = Instant::now();
        while bytes < region && start.elapsed() < limit {
            let block = if random {
                xorshift(&mut rng) % blocks
            } else {
                ops % blocks
            };
            let offset = block * bs as u64;
            if write {
                f.write_all_at(buf, offset).map_err(ctx)?;
            } else {
                f.read_exact_at(buf, offset).map_err(ctx)?;
            }
            ops += 1;
            bytes += bs as u64;
        }
        if write {
            f.sync_data().map_err(ctx)?;
        }
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        results.insert(
            pattern.to_string(),
            Measured {
                mbps: bytes as f64 / secs / 1e6,
                iops: ops as f64 / secs,
            },
        );
    }
    Ok(results)
}

/// The value of `key=` in a whitespace-separated line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// io-guest's result lines in a console log.
fn parse_results(console: &str) -> RunResults {
    console
        .lines()
        .filter_map(|l| l.trim_end().split_once("io-guest: result "))
        .filter_map(|(_, rest)| {
            Some((
                field(rest, "test")?.to_string(),
                Measured {
                    mbps: field(rest, "mbps")?.parse().ok()?,
                    iops: field(rest, "iops")?.parse().ok()?,
                },
            ))
        })
        .collect()
}

/// One of the two VMMs being compared.
struct Vmm {
    name: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
    /// The exit status when io-guest wrote 0 to the exit port.
    expect_status: i32,
}

fn command_line(v: &Vmm) -> String {
    let mut s = v.program.display().to_string();
    for a in &v.args {
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

/// Boots `v` once; returns the parsed results or why the run does not count.
fn vm_run(v: &Vmm, timeout: Duration, logs: &Path, round: usize) -> Result<RunResults, String> {
    let stderr = logs.join(format!("{}-{round}.stderr", v.name));
    let console_log = logs.join(format!("{}-{round}.console", v.name));
    let r: RunResult = timed_run(
        &v.program,
        &v.args,
        &["Run /init", "io-guest: done"],
        timeout,
        GIVE_UP,
        &stderr,
    )
    .map_err(|e| format!("{}: {e}", v.name))?;
    let _ = std::fs::write(&console_log, &r.output);
    let console = r.output_text();
    let results = parse_results(&console);
    let secs = r.gone.as_secs_f64();
    let run_init = r.markers.first().copied().flatten();
    println!(
        "  {} round {round}: {} after {secs:.1} s (\"Run /init\" at {}), {} result line(s); console {}",
        v.name,
        r.ended,
        run_init.map_or_else(|| "-".into(), |d| format!("{:.1} s", d.as_secs_f64())),
        results.len(),
        console_log.display()
    );
    if r.timed_out {
        return Err(format!(
            "{} killed (timeout or give-up); stderr {}",
            v.name,
            stderr.display()
        ));
    }
    if let Some(e) = console.lines().find(|l| l.contains("io-guest: error:")) {
        return Err(format!("{}: {}", v.name, e.trim()));
    }
    if r.ended != Ended::Exited(v.expect_status) || results.len() != PATTERNS.len() {
        return Err(format!(
            "{}: {} (expected status {}), {} of {} results; see {} and {}",
            v.name,
            r.ended,
            v.expect_status,
            results.len(),
            PATTERNS.len(),
            console_log.display(),
            stderr.display()
        ));
    }
    Ok(results)
}

// ---------------------------------------------------------------------------------------
// Report

/// Samples per pattern of one contender.
#[derive(Default)]
struct Samples {
    mbps: BTreeMap<String, Vec<f64>>,
    iops: BTreeMap<String, Vec<f64>>,
    failures: Vec<String>,
}

impl Samples {
    fn add(&mut self, r: Result<RunResults, String>) {
        match r {
            Ok(r) => {
                for (k, m) in r {
                    self.mbps.entry(k.clone()).or_default().push(m.mbps);
                    self.iops.entry(k).or_default().push(m.iops);
                }
            }
            Err(e) => self.failures.push(e),
        }
    }

    fn mbps(&self, p: &str) -> Option<Summary> {
        Summary::of(self.mbps.get(p).map_or(&[][..], Vec::as_slice))
    }

    fn iops(&self, p: &str) -> Option<Summary> {
        Summary::of(self.iops.get(p).map_or(&[][..], Vec::as_slice))
    }

    fn cell(&self, p: &str) -> String {
        match (self.mbps(p), self.iops(p)) {
            (Some(m), Some(i)) if m.n > 1 => format!(
                "{:.1} MB/s {:.0} IOPS [{:.1}..{:.1}] n={}",
                m.median, i.median, m.min, m.max, m.n
            ),
            (Some(m), Some(i)) => format!("{:.1} MB/s {:.0} IOPS", m.median, i.median),
            _ => "-".into(),
        }
    }
}

fn main() -> ExitCode {
    kestrel_benches::bench_main(
        "blk-throughput",
        USAGE,
        "no valid kestrel run; see the failures above",
        parse_args,
        run,
    )
}

fn run(o: &Options) -> Result<bool, String> {
    let host = HostFacts::probe();
    let target_dir = own_target_dir().map_err(|e| e.to_string())?;
    let work = target_dir.join("kestrel-benches").join("blk-throughput");
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("creating {}: {e}", logs.display()))?;
    println!("kestrel blk-throughput bench");
    println!("{}", host.describe());

    let kestrel = match &o.kestrel {
        Some(k) => k.clone(),
        None => build_kestrel(&target_dir).map_err(|e| format!("building kestrel: {e}"))?,
    };
    println!("kestrel binary: {}", kestrel.display());
    let qemu = o
        .qemu
        .clone()
        .or_else(|| which("qemu-system-x86_64"))
        .filter(|q| q.is_file());
    match &qemu {
        Some(q) => println!("baseline: {} ({})", q.display(), version_line(q)),
        None => println!("skipped baseline: qemu-system-x86_64 not installed"),
    }
    let vmlinux = find_vmlinux(o.assets.as_deref())
        .ok_or("no vmlinux found ($KESTREL_ASSETS, /usr/local/share/kestrel, ~/.cache/kestrel/assets); build it with scripts/build-guest.sh")?;
    let initramfs = build_io_guest(&target_dir)?;
    println!("kernel: {}", vmlinux.display());
    println!("initramfs: {}", initramfs.display());
    let disk = work.join("disk.raw");
    make_disk(&disk, o.size_mib << 20)?;
    println!(
        "disk: {} ({} MiB of non-zero pseudo-random data)",
        disk.display(),
        o.size_mib
    );

    // kestrel adds its kvm_pvm parameters itself; qemu gets them through qemu_cmdline.
    let mut cmdline = GUEST_CMDLINE.to_string();
    cmdline.push_str(&format!(
        " io_guest.size_mib={} io_guest.seconds={} io_guest.seq_kib={} io_guest.rand_kib={}",
        o.size_mib, o.seconds, o.seq_kib, o.rand_kib
    ));
    let kestrel_vmm = Vmm {
        name: "kestrel",
        program: kestrel.clone(),
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
                "--disk",
            ]));
            a.push(disk.clone().into());
            a
        },
        expect_status: 0,
    };
    let qemu_vmm = qemu.as_ref().map(|q| Vmm {
        name: "qemu",
        program: q.clone(),
        args: {
            // acpi=off, rtc=off: the platform kestrel gives the guest. The automatic
            // command line stays on: it adds the virtio_mmio.device= entry of the disk.
            let mut a = qemu_linux_args("", host.kvm_pvm, &vmlinux, &initramfs, &cmdline);
            a.push("-drive".into());
            a.push(
                format!(
                    "file={},format=raw,if=none,id=d0,cache={}",
                    disk.display(),
                    o.qemu_cache
                )
                .into(),
            );
            a.extend(os(&["-device", "virtio-blk-device,drive=d0"]));
            a
        },
        // isa-debug-exit: a write of v exits with (v << 1) | 1.
        expect_status: 1,
    });
    println!();
    println!(
        "== {} round(s): host (page cache, O_DIRECT), kestrel, qemu; patterns {}; \
         each stops after {} MiB or {} s; sequential {} KiB, random {} KiB requests",
        o.runs,
        PATTERNS.join(", "),
        o.size_mib,
        o.seconds,
        o.seq_kib,
        o.rand_kib
    );
    println!("kestrel: {}", command_line(&kestrel_vmm));
    if let Some(q) = &qemu_vmm {
        println!("qemu:    {}", command_line(q));
    }

    let timeout = BOOT_ALLOWANCE + Duration::from_secs(o.seconds * PATTERNS.len() as u64 * 2);
    let (mut hs, mut hd, mut ks, mut qs) = (
        Samples::default(),
        Samples::default(),
        Samples::default(),
        Samples::default(),
    );
    for round in 1..=o.runs {
        hs.add(host_run(&disk, o, false));
        hd.add(host_run(&disk, o, true));
        println!("  host round {round}: done");
        ks.add(vm_run(&kestrel_vmm, timeout, &logs, round));
        if let Some(q) = &qemu_vmm {
            qs.add(vm_run(q, timeout, &logs, round));
        }
    }

    let mut t = Table::new(&[
        "pattern",
        "host (page cache)",
        "host O_DIRECT",
        "kestrel (guest O_DIRECT)",
        &format!("qemu microvm cache={}", o.qemu_cache),
        "kestrel/host",
        "kestrel/qemu",
    ]);
    for p in PATTERNS {
        let bs = if p.starts_with("rand") {
            o.rand_kib
        } else {
            o.seq_kib
        };
        t.row(vec![
            format!("{p} {bs}K"),
            hs.cell(p),
            hd.cell(p),
            ks.cell(p),
            qs.cell(p),
            ratio(ks.mbps(p), hs.mbps(p)),
            ratio(ks.mbps(p), qs.mbps(p)),
        ]);
    }
    println!();
    print!("{}", t.render());
    for (name, s) in [
        ("host", &hs),
        ("host O_DIRECT", &hd),
        ("kestrel", &ks),
        ("qemu", &qs),
    ] {
        for f in &s.failures {
            println!("not counted ({name}): {f}");
        }
    }
    println!();
    for p in ["seqread", "seqwrite"] {
        let share = match (ks.mbps(p), hs.mbps(p)) {
            (Some(k), Some(h)) if h.median > 0.0 => Some(k.median / h.median),
            _ => None,
        };
        println!(
            "target {p}: kestrel >= {TARGET_SEQ_SHARE} x host (page cache): {}",
            match share {
                Some(s) if s >= TARGET_SEQ_SHARE => format!("PASS ({s:.2})"),
                Some(s) => format!("MISS ({s:.3})"),
                None => "no data".into(),
            }
        );
    }
    if host.kvm_pvm {
        println!(
            "note: kvm_pvm host: every guest request runs the guest kernel's block path in \
             emulated kernel code (~1000x slower, docs/kvm-pvm.md), so guest/host ratios here \
             measure the emulator; kestrel/qemu is the VMM comparison"
        );
    }
    println!(
        "All numbers above were measured in this run (MB = 10^6 bytes). loadavg at end: {}",
        HostFacts::probe().loadavg
    );
    Ok(!ks.mbps.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_parse() {
        let console = "noise\r\nio-guest: result test=seqread bs=1048576 ops=3 bytes=3145728 \
                       secs=1.000 mbps=3.15 iops=3.0\r\n[  1.0] io-guest: result test=randread \
                       bs=4096 ops=10 bytes=40960 secs=2.000 mbps=0.02 iops=5.0\nio-guest: done\n";
        let r = parse_results(console);
        assert_eq!(r.len(), 2);
        assert!((r["seqread"].mbps - 3.15).abs() < 1e-9);
        assert!((r["randread"].iops - 5.0).abs() < 1e-9);
    }
}
