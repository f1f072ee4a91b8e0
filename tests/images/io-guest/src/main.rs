//! `io-guest`: PID 1 of kestrel's block-throughput initramfs (`tests/images/io-guest/`).
//!
//! Packed alone into an initramfs by `rootfs/mkinitramfs.sh` (see `build.sh` here), it
//! measures I/O on the VM's first virtio-blk disk for `benches/src/bin/blk-throughput.rs`:
//!
//! 1. mounts `/proc`, `/sys` and `/dev` (devtmpfs; already mounted is fine);
//! 2. reads its parameters from `/proc/cmdline` (dotted parameters never reach init's
//!    argv or environment):
//!
//!    | parameter | meaning | default |
//!    |---|---|---|
//!    | `io_guest.dev=PATH` | the disk | `/dev/vda` |
//!    | `io_guest.tests=A,B…` | patterns, in order: `seqread`, `randread`, `seqwrite`, `randwrite` | all four, in that order |
//!    | `io_guest.size_mib=N` | the region used (from offset 0) and the most each pattern moves | the whole disk |
//!    | `io_guest.seconds=N` | time limit of each pattern | 10 |
//!    | `io_guest.seq_kib=N` | request size of the sequential patterns | 1024 |
//!    | `io_guest.rand_kib=N` | request size of the random patterns | 4 |
//!
//!    A pattern stops after moving `size_mib` or after `seconds`, whichever comes first;
//!    writes end with an `fdatasync`, which is timed too;
//! 3. opens the disk with `O_DIRECT` (the guest's page cache is never involved), prints
//!    `io-guest: disk dev=/dev/vda bytes=<size>`, then one line per pattern:
//!
//!    ```text
//!    io-guest: result test=seqread bs=1048576 ops=<n> bytes=<n> secs=<s> mbps=<MB/s> iops=<ops/s>
//!    ```
//!
//!    (MB = 10^6 bytes; `secs` from the guest's monotonic clock) and `io-guest: done`;
//! 4. ends the VM: status 0 (1 after an error, printed as `io-guest: error: …`) written
//!    to I/O port 0x444 through `/dev/port` — kestrel's exit port, qemu's
//!    `isa-debug-exit` — with `reboot(RB_AUTOBOOT)` as the fallback.
//!
//! Random offsets come from a fixed-seed xorshift generator, aligned to the request size.
//! Written data is a non-zero pattern (no zero-page shortcuts anywhere).
//!
//! Every system call costs milliseconds on kvm_pvm hosts (docs/kvm-pvm.md): each request
//! is one `pread`/`pwrite`, the clock is read through the vDSO, and the console gets whole
//! lines.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// kestrel's exit port (qemu: `isa-debug-exit,iobase=0x444`).
const EXIT_PORT: u64 = 0x444;
/// O_DIRECT buffers are aligned to this.
const ALIGN: usize = 4096;

// ---------------------------------------------------------------------------------------
// Console

static KMSG: Mutex<Option<File>> = Mutex::new(None);

/// Prints one line (a `\n` is added) with a single write: stdout, or `/dev/kmsg` once
/// stdout failed (docs/kvm-pvm.md, "write(1) to /dev/console").
fn say(text: &str) {
    let line = format!("io-guest: {text}\n");
    let mut guard = match KMSG.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(kmsg) = guard.as_mut() {
        let _ = kmsg.write_all(line.as_bytes());
        return;
    }
    let mut stdout = io::stdout().lock();
    if stdout
        .write_all(line.as_bytes())
        .and_then(|()| stdout.flush())
        .is_ok()
    {
        return;
    }
    if let Ok(mut kmsg) = OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = kmsg.write_all(line.as_bytes());
        *guard = Some(kmsg);
    }
}

// ---------------------------------------------------------------------------------------
// System calls std does not offer

mod sys {
    use std::ffi::CStr;
    use std::io;

    /// `mount(2)` without data.
    pub fn mount(
        source: &CStr,
        target: &CStr,
        fstype: &CStr,
        flags: libc::c_ulong,
    ) -> io::Result<()> {
        // SAFETY: all pointers come from live `CStr`s (NUL-terminated, valid for the call);
        // a null `data` pointer is allowed by mount(2).
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                flags,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `reboot(RB_AUTOBOOT)`. Only returns on failure.
    pub fn reboot() -> io::Error {
        // SAFETY: reboot(2) takes no pointers; on success it does not return.
        unsafe { libc::reboot(libc::RB_AUTOBOOT) };
        io::Error::last_os_error()
    }
}

const MOUNTS: [(&CStr, &CStr, &CStr, libc::c_ulong); 3] = [
    (
        c"proc",
        c"/proc",
        c"proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    (
        c"sysfs",
        c"/sys",
        c"sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    (c"devtmpfs", c"/dev", c"devtmpfs", libc::MS_NOSUID),
];

fn mount_all() -> Result<(), String> {
    for (source, target, fstype, flags) in MOUNTS {
        match sys::mount(source, target, fstype, flags) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                return Err(format!(
                    "mount {} on {}: {e}",
                    source.to_string_lossy(),
                    target.to_string_lossy()
                ))
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Parameters

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    SeqRead,
    RandRead,
    SeqWrite,
    RandWrite,
}

impl Pattern {
    const ALL: [Pattern; 4] = [
        Pattern::SeqRead,
        Pattern::RandRead,
        Pattern::SeqWrite,
        Pattern::RandWrite,
    ];

    fn name(self) -> &'static str {
        match self {
            Pattern::SeqRead => "seqread",
            Pattern::RandRead => "randread",
            Pattern::SeqWrite => "seqwrite",
            Pattern::RandWrite => "randwrite",
        }
    }

    fn parse(s: &str) -> Option<Pattern> {
        Pattern::ALL.into_iter().find(|p| p.name() == s)
    }

    fn random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite)
    }

    fn write(self) -> bool {
        matches!(self, Pattern::SeqWrite | Pattern::RandWrite)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Params {
    dev: String,
    tests: Vec<Pattern>,
    /// `None`: the whole disk.
    size: Option<u64>,
    seconds: u64,
    seq_bs: usize,
    rand_bs: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            dev: "/dev/vda".into(),
            tests: Pattern::ALL.to_vec(),
            size: None,
            seconds: 10,
            seq_bs: 1024 * 1024,
            rand_bs: 4096,
        }
    }
}

/// A request size in KiB: a positive multiple of 4 KiB, at most 64 MiB.
fn block_size(key: &str, v: &str) -> Result<usize, String> {
    let kib: usize = v.parse().map_err(|_| format!("{key}={v}: not a number"))?;
    if kib == 0 || kib % 4 != 0 || kib > 64 * 1024 {
        return Err(format!(
            "{key}={v}: must be a multiple of 4 from 4 to 65536"
        ));
    }
    Ok(kib * 1024)
}

/// Parses the `io_guest.*` parameters of a kernel command line.
fn parse_params(cmdline: &str) -> Result<Params, String> {
    let mut p = Params::default();
    for word in cmdline.split_whitespace() {
        let Some(rest) = word.strip_prefix("io_guest.") else {
            continue;
        };
        let (key, v) = rest
            .split_once('=')
            .ok_or_else(|| format!("{word}: no value"))?;
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{word}: not a number"))
        };
        match key {
            "dev" => p.dev = v.to_string(),
            "tests" => {
                p.tests = v
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(|t| {
                        Pattern::parse(t).ok_or_else(|| format!("{word}: unknown pattern {t:?}"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "size_mib" => {
                p.size = Some(
                    number(v)?
                        .checked_mul(1 << 20)
                        .ok_or_else(|| format!("{word}: too large"))?,
                )
            }
            "seconds" => p.seconds = number(v)?,
            "seq_kib" => p.seq_bs = block_size(word, v)?,
            "rand_kib" => p.rand_bs = block_size(word, v)?,
            other => return Err(format!("unknown parameter io_guest.{other}")),
        }
    }
    Ok(p)
}

// ---------------------------------------------------------------------------------------
// Measuring

/// An aligned buffer for O_DIRECT, carved out of a larger `Vec` (no unsafe allocation).
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, fill: u8) -> AlignedBuf {
        let storage = vec![fill; len + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN).min(ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    fn as_slice(&self) -> &[u8] {
        self.storage
            .get(self.start..self.start + self.len)
            .unwrap_or_default()
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        self.storage
            .get_mut(self.start..self.start + self.len)
            .unwrap_or_default()
    }
}

/// xorshift64: fixed seed, so every run touches the same offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[derive(Debug)]
struct Outcome {
    ops: u64,
    bytes: u64,
    elapsed: Duration,
}

/// Runs one pattern over `[0, region)` of `disk`.
fn run_pattern(
    disk: &File,
    pattern: Pattern,
    bs: usize,
    region: u64,
    limit: Duration,
) -> Result<Outcome, String> {
    let bs64 = bs as u64;
    let blocks = region / bs64;
    if blocks == 0 {
        return Err(format!(
            "{}: region of {region} bytes is smaller than one request ({bs})",
            pattern.name()
        ));
    }
    let mut buf = AlignedBuf::new(bs, 0xa5);
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i as u8) ^ 0x5a | 1;
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut ops, mut bytes) = (0u64, 0u64);
    let start = Instant::now();
    while bytes < region && start.elapsed() < limit {
        let block = if pattern.random() {
            rng.next() % blocks
        } else {
            ops % blocks
        };
        let offset = block * bs64;
        let n = if pattern.write() {
            disk.write_at(buf.as_slice(), offset)
        } else {
            disk.read_at(buf.as_mut_slice(), offset)
        }
        .map_err(|e| format!("{} at offset {offset}: {e}", pattern.name()))?;
        if n != bs {
            return Err(format!(
                "{} at offset {offset}: {n} of {bs} bytes",
                pattern.name()
            ));
        }
        ops += 1;
        bytes += bs64;
    }
    if pattern.write() {
        disk.sync_data()
            .map_err(|e| format!("{}: fdatasync: {e}", pattern.name()))?;
    }
    Ok(Outcome {
        ops,
        bytes,
        elapsed: start.elapsed(),
    })
}

fn result_line(pattern: Pattern, bs: usize, o: &Outcome) -> String {
    let secs = o.elapsed.as_secs_f64().max(1e-9);
    format!(
        "result test={} bs={bs} ops={} bytes={} secs={secs:.3} mbps={:.2} iops={:.1}",
        pattern.name(),
        o.ops,
        o.bytes,
        o.bytes as f64 / secs / 1e6,
        o.ops as f64 / secs
    )
}

fn run() -> Result<(), String> {
    mount_all()?;
    let cmdline =
        std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("read /proc/cmdline: {e}"))?;
    let params = parse_params(&cmdline)?;
    let mut disk = OpenOptions::new()
        .read(true)
        .write(params.tests.iter().any(|t| t.write()))
        .custom_flags(libc::O_DIRECT)
        .open(&params.dev)
        .map_err(|e| format!("open {} with O_DIRECT: {e}", params.dev))?;
    let size = disk
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("size of {}: {e}", params.dev))?;
    let region = params.size.map_or(size, |s| s.min(size));
    say(&format!(
        "disk dev={} bytes={size} region={region} seconds={}",
        params.dev, params.seconds
    ));
    let limit = Duration::from_secs(params.seconds);
    for &pattern in &params.tests {
        let bs = if pattern.random() {
            params.rand_bs
        } else {
            params.seq_bs
        };
        let outcome = run_pattern(&disk, pattern, bs, region, limit)?;
        say(&result_line(pattern, bs, &outcome));
    }
    say("done");
    Ok(())
}

fn main() {
    let status = match run() {
        Ok(()) => 0,
        Err(e) => {
            say(&format!("error: {e}"));
            1
        }
    };
    // The tty sends asynchronously: let the result lines leave the guest first.
    let _ = rustix::termios::tcdrain(io::stdout());
    match OpenOptions::new().write(true).open("/dev/port") {
        Ok(port) => {
            if let Err(e) = port.write_at(&[status], EXIT_PORT) {
                say(&format!("error: write port {EXIT_PORT:#x}: {e}"));
            }
        }
        Err(e) => say(&format!("error: open /dev/port: {e}")),
    }
    let e = sys::reboot();
    say(&format!("error: reboot: {e}"));
    std::process::exit(i32::from(status));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters() {
        assert_eq!(
            parse_params("console=ttyS0 quiet").unwrap(),
            Params::default()
        );
        let p = parse_params(
            "x io_guest.tests=randwrite,seqread io_guest.size_mib=64 io_guest.seconds=3 \
             io_guest.seq_kib=512 io_guest.rand_kib=8 io_guest.dev=/dev/vdb",
        )
        .unwrap();
        assert_eq!(p.tests, vec![Pattern::RandWrite, Pattern::SeqRead]);
        assert_eq!(p.size, Some(64 << 20));
        assert_eq!((p.seconds, p.seq_bs, p.rand_bs), (3, 512 * 1024, 8192));
        assert_eq!(p.dev, "/dev/vdb");
        assert!(parse_params("io_guest.tests=copy").is_err());
        assert!(parse_params("io_guest.seq_kib=6").is_err());
        assert!(parse_params("io_guest.nope=1").is_err());
    }

    #[test]
    fn patterns_stop_at_the_region_and_read_back() {
        let path = std::env::temp_dir().join(format!("io-guest-test-{}", std::process::id()));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(1 << 20).unwrap();
        let o = run_pattern(
            &f,
            Pattern::SeqWrite,
            64 * 1024,
            1 << 20,
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!((o.ops, o.bytes), (16, 1 << 20));
        let o = run_pattern(
            &f,
            Pattern::RandRead,
            4096,
            1 << 20,
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(o.bytes, 1 << 20);
        let mut back = vec![0u8; 4096];
        f.read_exact_at(&mut back, 8192).unwrap();
        assert!(back.iter().all(|&b| b != 0));
        assert!(result_line(Pattern::SeqWrite, 4096, &o)
            .starts_with("result test=seqwrite bs=4096 ops=256 bytes=1048576 secs="));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn buffers_are_aligned() {
        for len in [4096, 65536] {
            let b = AlignedBuf::new(len, 1);
            assert_eq!(b.as_slice().len(), len);
            assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
        }
    }
}
