//! `blk-device`: the virtio-blk device's own cost, without KVM or a guest kernel, beside
//! the host's `pread`/`pwrite` on the same file in the same run.
//!
//! ```text
//! cargo run --release -p kestrel-benches --bin blk-device -- [--rounds N] [--size-mib N]
//!     [--seconds S] [--dir DIR]
//! ```
//!
//! The device is driven through the host-side virtio harness (layer 1 of DESIGN.md:
//! `devices::virtio::test_utils`): guest memory, the virtio-mmio transport on a bus, a
//! driver that puts descriptor chains on the queue as Linux does, and the device served on
//! its own device thread exactly as the vmm runs it, over a `RawFile` backend. The file
//! (`--size-mib`, default 256, non-zero pseudo-random bytes, in `--dir`, default
//! `/var/tmp`) is read once beforehand so both sides read from the page cache.
//!
//! Patterns: 1 MiB sequential and 4 KiB random, reads and writes, at queue depth 1 and 32
//! (the driver submits 32 chains, notifies once, and waits for all 32; each chain has its
//! own 1 MiB buffer). The host baseline does the same requests with `pread`/`pwrite` on
//! one thread, one after another, over as many buffers (the page cache serves both the
//! same way). Each pattern runs `--seconds` (default 2) per
//! side per round (`--rounds`, default 3), host and device interleaved. Reported: MB/s
//! and IOPS (median over rounds), the ratio device/host, and CPU per request (the device
//! thread's: process CPU minus the driver thread's; the host's: its thread's). The target
//! "1 MiB sequential reads ≥ 0.9× host" is reported as PASS/MISS, never as a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use devices::disk::raw::RawFile;
use devices::virtio::block::Block;
use devices::virtio::test_utils::{desc, Driver, TestVmm, RO, WO};
use devices::virtio::GuestMemoryMmap;
use kestrel_benches::{ratio, summary, HostFacts, Summary, Table};
use vm_memory::{Bytes, GuestAddress};

const USAGE: &str = "usage: blk-device [--rounds N] [--size-mib N] [--seconds S] [--dir DIR]";

const BASE: u64 = 0xd000_0000;
const QUEUE: u64 = 0x1000;
const QUEUE_SIZE: u16 = 256;
const HDR: u64 = 0x10_0000;
const STATUS: u64 = 0x11_0000;
const DATA: u64 = 0x20_0000;
const MIB: u64 = 1 << 20;
const MAX_QD: u64 = 32;
const GUEST_MEM: usize = (DATA + MAX_QD * MIB) as usize;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

#[derive(Clone, Copy)]
struct Pattern {
    name: &'static str,
    len: u64,
    random: bool,
    write: bool,
    qd: u64,
}

const PATTERNS: [Pattern; 8] = [
    Pattern {
        name: "seq read 1M qd1",
        len: MIB,
        random: false,
        write: false,
        qd: 1,
    },
    Pattern {
        name: "seq read 1M qd32",
        len: MIB,
        random: false,
        write: false,
        qd: 32,
    },
    Pattern {
        name: "rand read 4K qd1",
        len: 4096,
        random: true,
        write: false,
        qd: 1,
    },
    Pattern {
        name: "rand read 4K qd32",
        len: 4096,
        random: true,
        write: false,
        qd: 32,
    },
    Pattern {
        name: "seq write 1M qd1",
        len: MIB,
        random: false,
        write: true,
        qd: 1,
    },
    Pattern {
        name: "seq write 1M qd32",
        len: MIB,
        random: false,
        write: true,
        qd: 32,
    },
    Pattern {
        name: "rand write 4K qd1",
        len: 4096,
        random: true,
        write: true,
        qd: 1,
    },
    Pattern {
        name: "rand write 4K qd32",
        len: 4096,
        random: true,
        write: true,
        qd: 32,
    },
];

/// One side's result for one pattern in one round.
#[derive(Clone, Copy)]
struct Sample {
    mb_s: f64,
    iops: f64,
    cpu_us_per_req: f64,
}

/// Offsets of successive requests: sequential (wrapping) or xorshift-random, aligned.
struct Offsets {
    next: u64,
    state: u64,
    slots: u64,
    len: u64,
    random: bool,
}

impl Offsets {
    fn new(size: u64, p: Pattern) -> Offsets {
        Offsets {
            next: 0,
            state: 0x9e37_79b9_7f4a_7c15,
            slots: size / p.len,
            len: p.len,
            random: p.random,
        }
    }
}

impl Iterator for Offsets {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        let slot = if self.random {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            self.state % self.slots
        } else {
            let s = self.next;
            self.next = (self.next + 1) % self.slots;
            s
        };
        Some(slot * self.len)
    }
}

/// CPU time (user + system) of this thread, or of the whole process.
fn cpu(who: libc::c_int) -> Duration {
    // SAFETY: getrusage writes one rusage into the zeroed value we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn sample(bytes: u64, reqs: u64, elapsed: Duration, cpu: Duration) -> Sample {
    let s = elapsed.as_secs_f64();
    Sample {
        mb_s: bytes as f64 / s / 1e6,
        iops: reqs as f64 / s,
        cpu_us_per_req: cpu.as_secs_f64() * 1e6 / reqs.max(1) as f64,
    }
}

/// The host's own pread/pwrite, one request after another, over `qd` buffers as the
/// driver's (so both sides touch the same amount of memory).
fn host_run(file: &File, size: u64, p: Pattern, seconds: f64) -> Sample {
    let mut bufs = vec![vec![0x5au8; p.len as usize]; p.qd as usize];
    let mut offsets = Offsets::new(size, p);
    let (mut reqs, mut bytes) = (0u64, 0u64);
    let cpu0 = cpu(libc::RUSAGE_THREAD);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        for buf in &mut bufs {
            let at = offsets.next().unwrap();
            if p.write {
                file.write_all_at(buf, at).unwrap();
            } else {
                file.read_exact_at(buf, at).unwrap();
            }
            reqs += 1;
            bytes += p.len;
        }
    }
    sample(
        bytes,
        reqs,
        start.elapsed(),
        cpu(libc::RUSAGE_THREAD) - cpu0,
    )
}

fn header(mem: &GuestMemoryMmap, i: u64, req_type: u32, offset: u64) {
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&req_type.to_le_bytes());
    raw[8..].copy_from_slice(&(offset / 512).to_le_bytes());
    mem.write_slice(&raw, GuestAddress(HDR + 16 * i)).unwrap();
}

/// The virtio-blk device on its device thread, driven at queue depth `p.qd`.
fn device_run(vmm: &TestVmm, d: &mut Driver<'_>, size: u64, p: Pattern, seconds: f64) -> Sample {
    let mem = &vmm.mem;
    let mut offsets = Offsets::new(size, p);
    let (mut reqs, mut bytes) = (0u64, 0u64);
    let req_type = if p.write { T_OUT } else { T_IN };
    let cpu0 = (cpu(libc::RUSAGE_SELF), cpu(libc::RUSAGE_THREAD));
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        for i in 0..p.qd {
            header(mem, i, req_type, offsets.next().unwrap());
            mem.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
            d.add_chain(&[
                desc(HDR + 16 * i, 16, RO),
                desc(DATA + i * MIB, p.len as u32, if p.write { RO } else { WO }),
                desc(STATUS + i, 1, WO),
            ]);
        }
        d.notify(vmm);
        let mut done = 0u64;
        while done < p.qd {
            let used = d.take_used();
            if used.is_empty() {
                std::hint::spin_loop();
            }
            done += used.len() as u64;
        }
        for i in 0..p.qd {
            let status: u8 = mem.read_obj(GuestAddress(STATUS + i)).unwrap();
            assert_eq!(status, 0, "{}: request {i} failed", p.name);
        }
        reqs += p.qd;
        bytes += p.qd * p.len;
    }
    let elapsed = start.elapsed();
    let device_cpu =
        (cpu(libc::RUSAGE_SELF) - cpu0.0).saturating_sub(cpu(libc::RUSAGE_THREAD) - cpu0.1);
    sample(bytes, reqs, elapsed, device_cpu)
}

struct Args {
    rounds: usize,
    size_mib: u64,
    seconds: f64,
    dir: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        rounds: 3,
        size_mib: 256,
        seconds: 2.0,
        dir: PathBuf::from("/var/tmp"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        let bad = |v: &str| format!("bad value {v:?} for {flag}\n{USAGE}");
        match flag.as_str() {
            "--rounds" => {
                let v = value()?;
                a.rounds = v.parse().ok().filter(|&n| n > 0).ok_or_else(|| bad(&v))?;
            }
            "--size-mib" => {
                let v = value()?;
                a.size_mib = v.parse().ok().filter(|&n| n >= 64).ok_or_else(|| bad(&v))?;
            }
            "--seconds" => {
                let v = value()?;
                a.seconds = v
                    .parse()
                    .ok()
                    .filter(|&s: &f64| s > 0.0)
                    .ok_or_else(|| bad(&v))?;
            }
            "--dir" => a.dir = PathBuf::from(value()?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let size = args.size_mib * MIB;
    let path = args
        .dir
        .join(format!("kestrel-blk-device-{}.raw", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) => {
            eprintln!("blk-device: cannot create {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    // Non-zero pseudo-random bytes, so nothing reads as a free hole; then warm the cache.
    let mut chunk = vec![0u8; MIB as usize];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..args.size_mib {
        for b in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&(x | 1).to_le_bytes());
        }
        file.write_all(&chunk).unwrap();
    }
    for at in (0..size).step_by(MIB as usize) {
        file.read_exact_at(&mut chunk, at).unwrap();
    }
    let result = run(&args, &file, &path, size);
    let _ = std::fs::remove_file(&path);
    result
}

fn run(args: &Args, file: &File, path: &std::path::Path, size: u64) -> ExitCode {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST_MEM)]).unwrap();
    mem.write_slice(&vec![0xa5u8; (MAX_QD * MIB) as usize], GuestAddress(DATA))
        .unwrap();
    let mut vmm = TestVmm::with_memory(mem.clone());
    let disk = RawFile::open(path, false).unwrap();
    let (_slot, thread) = vmm.add_block_on_thread(Block::new(Box::new(disk), None).unwrap(), BASE);
    let mut d = Driver::new(&mem, BASE, QUEUE, QUEUE_SIZE);
    d.probe(&mut vmm, u64::MAX);

    println!("blk-device: virtio-blk on its device thread (layer-1 harness, no KVM) vs host pread/pwrite");
    println!("{}", HostFacts::probe().describe());
    println!(
        "file {} ({} MiB, page cache), {} round(s) x {} s per pattern and side",
        path.display(),
        args.size_mib,
        args.rounds,
        args.seconds
    );
    // Per pattern: the host's samples and the device's, one per round.
    let mut results: Vec<(Pattern, Vec<Sample>, Vec<Sample>)> = PATTERNS
        .iter()
        .map(|&p| (p, Vec::new(), Vec::new()))
        .collect();
    for round in 0..args.rounds {
        for (p, host, dev) in &mut results {
            host.push(host_run(file, size, *p, args.seconds));
            dev.push(device_run(&vmm, &mut d, size, *p, args.seconds));
        }
        eprintln!("blk-device: round {} of {} done", round + 1, args.rounds);
    }
    thread.stop();

    let med = |v: &[Sample], f: fn(&Sample) -> f64| summary(v.iter().map(f));
    let show =
        |s: Option<Summary>, d: usize| s.map_or("-".into(), |s| format!("{:.d$}", s.median, d = d));
    let mut t = Table::new(&[
        "pattern",
        "host MB/s",
        "device MB/s",
        "device/host",
        "host IOPS",
        "device IOPS",
        "host CPU us/req",
        "device CPU us/req",
    ]);
    for (p, h, dv) in &results {
        t.row(vec![
            p.name.into(),
            show(med(h, |s| s.mb_s), 0),
            show(med(dv, |s| s.mb_s), 0),
            ratio(med(dv, |s| s.mb_s), med(h, |s| s.mb_s)),
            show(med(h, |s| s.iops), 0),
            show(med(dv, |s| s.iops), 0),
            show(med(h, |s| s.cpu_us_per_req), 1),
            show(med(dv, |s| s.cpu_us_per_req), 1),
        ]);
    }
    print!("{}", t.render());
    let target = results
        .first()
        .and_then(|(_, h, dv)| med(dv, |s| s.mb_s).zip(med(h, |s| s.mb_s)))
        .map(|(d, h)| d.median / h.median);
    match target {
        Some(r) => println!(
            "target 1 MiB sequential reads >= 0.9x host (qd1): {:.2}x {}",
            r,
            if r >= 0.9 { "PASS" } else { "MISS" }
        ),
        None => println!("target 1 MiB sequential reads >= 0.9x host: not measured"),
    }
    ExitCode::SUCCESS
}
