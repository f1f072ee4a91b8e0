//! QCOW2 → raw conversion: kestrel's converter against `qemu-img convert -O raw`, on the
//! same inputs, in one run (see benches/convert/README.md).
//!
//! Makes a ~1 GiB virtual disk with real data (random, text-like and zero regions),
//! turns it into QCOW2 with qemu-img (uncompressed and zlib-compressed), then times both
//! converters on each (median of `KESTREL_BENCH_RUNS`, default 5, alternating which tool goes first, with the page cache
//! dropped before each run when possible) and prints the times, the ratio and the
//! allocated size of both outputs. Work files go to `KESTREL_BENCH_DIR` (default a
//! directory under /var/tmp) and are removed at the end.
//!
//! `cargo bench -p devices --bench convert`

// A benchmark program, not code that handles hostile input: failing loudly is right.
#![allow(clippy::expect_used, clippy::indexing_slicing)]

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use devices::image::convert::convert;
use devices::image::detect_format;

const MIB: usize = 1 << 20;

fn main() {
    if !Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        println!("skipped: qemu-img not installed");
        return;
    }
    let size_mib: usize = env_or("KESTREL_BENCH_MIB", 1024);
    let runs: usize = env_or("KESTREL_BENCH_RUNS", 5);
    let dir = std::env::var_os("KESTREL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(format!(
                "/var/tmp/kestrel-bench-convert-{}",
                std::process::id()
            ))
        });
    fs::create_dir_all(&dir).expect("create the bench directory");
    let can_drop = drop_caches();
    println!(
        "convert bench: {size_mib} MiB virtual disk, median of {runs} runs, page cache {}",
        if can_drop {
            "dropped before each run"
        } else {
            "NOT dropped (no permission)"
        }
    );

    // KESTREL_BENCH_KEEP=1 keeps (and reuses) the work files.
    let keep = std::env::var_os("KESTREL_BENCH_KEEP").is_some();
    let raw = dir.join("source.raw");
    if !(keep && raw.exists()) {
        make_source(&raw, size_mib);
    }
    let inputs = [
        (
            "qcow2 (uncompressed)",
            "plain.qcow2",
            &["-o", "compat=1.1"][..],
        ),
        (
            "qcow2 (zlib, -c)",
            "zlib.qcow2",
            &["-c", "-o", "compat=1.1"][..],
        ),
    ];
    for (label, name, opts) in inputs {
        let q = dir.join(name);
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[path_str(&raw), path_str(&q)]);
        if !(keep && q.exists()) {
            qemu_img(&args);
        }
        let qsize = fs::metadata(&q).map(|m| m.len()).unwrap_or(0);
        let ours_out = dir.join("ours.raw");
        let theirs_out = dir.join("qemu.raw");
        // Mode 1, as each tool does by default: qemu-img convert does not sync its output
        // (it leaves dirty pages behind); ours is timed without the caller's fdatasync.
        // Mode 2, durable: both followed by an fdatasync of the output.
        let run_ours = |durable: bool| {
            let _ = fs::remove_file(&ours_out);
            drop_caches();
            let cpu = cpu_ticks();
            let t = Instant::now();
            let input = File::open(&q).expect("open input");
            let format = detect_format(&input).expect("detect");
            let output = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&ours_out)
                .expect("create output");
            convert(&input, format, &output, &Default::default(), &mut |_, _| {}).expect("convert");
            if durable {
                output.sync_data().expect("fdatasync");
            }
            Sample {
                wall: t.elapsed(),
                cpu: ticks(cpu_ticks().0 - cpu.0),
            }
        };
        let run_theirs = |durable: bool| {
            let _ = fs::remove_file(&theirs_out);
            drop_caches();
            let cpu = cpu_ticks();
            let t = Instant::now();
            qemu_img(&[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                path_str(&q),
                path_str(&theirs_out),
            ]);
            if durable {
                File::open(&theirs_out)
                    .and_then(|f| f.sync_data())
                    .expect("fdatasync");
            }
            Sample {
                wall: t.elapsed(),
                cpu: ticks(cpu_ticks().1 - cpu.1),
            }
        };
        // One untimed round of each first (the virtual disk's host-side cache makes the
        // first read of a new file slower), then alternate which tool goes first.
        run_ours(false);
        run_theirs(false);
        let mut results = Vec::new();
        for durable in [false, true] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for i in 0..runs.max(1) {
                if i % 2 == 0 {
                    ours.push(run_ours(durable));
                    theirs.push(run_theirs(durable));
                } else {
                    theirs.push(run_theirs(durable));
                    ours.push(run_ours(durable));
                }
            }
            results.push((durable, Summary::of(ours), Summary::of(theirs)));
        }
        let same = files_equal(&ours_out, &theirs_out);
        let alloc = |p: &Path| fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0);
        println!("\n{label}: input file {:.1} MiB", qsize as f64 / MIB as f64);
        for (durable, ours, theirs) in results {
            println!(
                "  {}:",
                if durable {
                    "durable (+ fdatasync of the output)"
                } else {
                    "default (no sync)"
                }
            );
            for (name, r) in [("kestrel ", &ours), ("qemu-img", &theirs)] {
                println!(
                    "    {name}  wall median {:>6.3} s (min {:.3}, max {:.3})  {:>7.1} MiB/s  cpu median {:.2} s",
                    r.median.as_secs_f64(),
                    r.min.as_secs_f64(),
                    r.max.as_secs_f64(),
                    size_mib as f64 / r.median.as_secs_f64(),
                    r.cpu.as_secs_f64()
                );
            }
            println!(
                "    ratio kestrel/qemu-img: wall median {:.2}x, wall min {:.2}x, cpu {:.2}x (target <= 1.00x)",
                ours.median.as_secs_f64() / theirs.median.as_secs_f64(),
                ours.min.as_secs_f64() / theirs.min.as_secs_f64(),
                ours.cpu.as_secs_f64() / theirs.cpu.as_secs_f64().max(0.001)
            );
        }
        println!(
            "  allocated: kestrel {:.1} MiB, qemu-img {:.1} MiB; outputs identical: {same}",
            alloc(&ours_out) as f64 / MIB as f64,
            alloc(&theirs_out) as f64 / MIB as f64
        );
        let _ = fs::remove_file(&ours_out);
        let _ = fs::remove_file(&theirs_out);
        if !keep {
            let _ = fs::remove_file(&q);
        }
    }
    if !keep {
        let _ = fs::remove_file(&raw);
        let _ = fs::remove_dir(&dir);
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`; false if not permitted.
fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

struct Sample {
    wall: Duration,
    cpu: Duration,
}

struct Summary {
    median: Duration,
    min: Duration,
    max: Duration,
    /// Median CPU time (user + system), in /proc's 10 ms ticks.
    cpu: Duration,
}

impl Summary {
    fn of(samples: Vec<Sample>) -> Self {
        let mut wall: Vec<Duration> = samples.iter().map(|s| s.wall).collect();
        let mut cpu: Vec<Duration> = samples.iter().map(|s| s.cpu).collect();
        wall.sort();
        cpu.sort();
        Summary {
            median: wall[wall.len() / 2],
            min: wall[0],
            max: wall[wall.len() - 1],
            cpu: cpu[cpu.len() / 2],
        }
    }
}

/// (this process's user+system ticks, its waited-for children's user+system ticks),
/// from /proc/self/stat (fields 14-17, in USER_HZ = 100 ticks per second).
fn cpu_ticks() -> (u64, u64) {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    if f.len() < 4 {
        return (0, 0);
    }
    (f[0] + f[1], f[2] + f[3])
}

fn ticks(n: u64) -> Duration {
    Duration::from_millis(n * 10)
}

fn files_equal(a: &Path, b: &Path) -> bool {
    let (Ok(mut fa), Ok(mut fb)) = (File::open(a), File::open(b)) else {
        return false;
    };
    let (mut ba, mut bb) = (vec![0u8; 4 * MIB], vec![0u8; 4 * MIB]);
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => break,
        }
    }
    n
}

/// The source disk: per 4 MiB stripe, 40% random (incompressible), 40% text-like
/// (compressible), 10% sparse small records in zeroes, 10% zeroes.
fn make_source(path: &Path, size_mib: usize) {
    let mut f = File::create(path).expect("create source");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let words: [&[u8]; 8] = [
        b"kernel ",
        b"systemd ",
        b"/usr/lib/x86_64-linux-gnu/",
        b"libc.so.6 ",
        b"0x7ffe ",
        b"ELF ",
        b"cloud-init ",
        b"\n",
    ];
    let stripe = 4 * MIB;
    let mut buf = vec![0u8; stripe];
    for s in 0..size_mib.div_ceil(4) {
        buf.fill(0);
        let kind = s % 10;
        match kind {
            0..=3 => {
                for c in buf.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    c.copy_from_slice(&x.to_le_bytes());
                }
            }
            4..=7 => {
                let mut at = 0;
                let mut i = s;
                while at < stripe {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    i += 1;
                    let w = words[(x as usize ^ i) % words.len()];
                    let n = w.len().min(stripe - at);
                    buf[at..at + n].copy_from_slice(&w[..n]);
                    at += n;
                    if x % 5 == 0 {
                        let num = format!("{:08x} ", x >> 32);
                        let n = num.len().min(stripe - at);
                        buf[at..at + n].copy_from_slice(&num.as_bytes()[..n]);
                        at += n;
                    }
                }
            }
            8 => {
                for rec in (0..stripe).step_by(256 * 1024) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    buf[rec..rec + 8].copy_from_slice(&x.to_le_bytes());
                }
            }
            _ => {}
        }
        if kind == 9 {
            // Leave a hole.
            f.set_len(((s + 1) * stripe) as u64).expect("extend source");
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(((s + 1) * stripe) as u64))
                .expect("seek");
        } else {
            f.write_all(&buf).expect("write source");
        }
    }
    f.set_len((size_mib * MIB) as u64).expect("size source");
    f.sync_all().expect("sync source");
}
