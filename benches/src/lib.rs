//! Shared pieces of kestrel's benchmarks.
//!
//! Every kestrel benchmark runs kestrel and a baseline **side by side in one run** and
//! reports medians and ratios: this project's machines are small, shared and (under
//! kvm_pvm) emulate guest kernel code, so absolute numbers from different runs or hosts
//! are not comparable, but two VMMs measured interleaved on the same host at the same
//! time are.
//!
//! What is here:
//! - [`HostFacts`]: what the report header says about the host (kvm_pvm, CPUs, load);
//! - [`timed_run`]: spawns a VMM process with its stdout piped and measures, from just
//!   before `spawn`, the first output byte, the last output byte, when given console
//!   markers first appeared, and when `wait4` reaped the process (with its peak RSS);
//! - [`Summary`]: median, min and max of a sample;
//! - workspace helpers: building the release `kestrel` binary and assembling the tiny
//!   PVH payloads of `vmm/tests/payloads` (used in place, never copied).
//!
//! `unsafe` here is limited to four libc calls std has no safe form for (`poll`,
//! `wait4` with its `rusage`, `pidfd_open`, and reading `errno` through them); each has
//! a `// SAFETY:` comment.

pub mod containerd;

use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (this crate lives in `<root>/benches`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// An error of the bench harness itself (not a measured VMM's failure), with context.
#[derive(Debug)]
pub struct BenchError(pub String);

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

/// Shorthand for a [`BenchError`] result.
pub type Result<T> = std::result::Result<T, BenchError>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(BenchError(msg.into()))
}

// ---------------------------------------------------------------------------------------
// Host facts

/// What the report header states about the host the numbers come from.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// `/sys/module/kvm_pvm` exists: guest kernel code is emulated (see docs/kvm-pvm.md).
    pub kvm_pvm: bool,
    /// CPUs this process may run on.
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel_release: String,
    /// `/proc/loadavg` at the start of the run (the machine is shared).
    pub loadavg: String,
}

impl HostFacts {
    pub fn probe() -> HostFacts {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        HostFacts {
            kvm_pvm: Path::new("/sys/module/kvm_pvm").exists(),
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel_release: read("/proc/sys/kernel/osrelease").trim().to_string(),
            loadavg: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    /// One line per fact, for the report header.
    pub fn describe(&self) -> String {
        format!(
            "host: kvm_pvm={} ({}), nproc={}, cpu=\"{}\", kernel={}, loadavg at start: {}",
            if self.kvm_pvm { "yes" } else { "no" },
            if self.kvm_pvm {
                "guest kernel code emulated ~1000x slower; VMM costs are real"
            } else {
                "hardware KVM"
            },
            self.nproc,
            self.cpu_model,
            self.kernel_release,
            self.loadavg,
        )
    }
}

/// Finds `program` on `$PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// First line of `program --version`, or `"unknown version"`.
pub fn version_line(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown version".into())
}

// ---------------------------------------------------------------------------------------
// Building what is measured

fn run_tool(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| BenchError(format!("cannot run {cmd:?}: {e}")))?;
    if !out.status.success() {
        return err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The cargo target directory this bench binary was built into (`<target>/<profile>/exe`).
pub fn own_target_dir() -> Result<PathBuf> {
    let exe =
        std::env::current_exe().map_err(|e| BenchError(format!("cannot locate own exe: {e}")))?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| BenchError(format!("unexpected bench location {}", exe.display())))
}

/// Builds the release `kestrel` binary into `target_dir` (cargo does nothing when it is
/// up to date) and returns its path, `<target_dir>/release/kestrel`.
pub fn build_kestrel(target_dir: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    run_tool(
        Command::new(cargo)
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "kestrel",
                "--target-dir",
            ])
            .arg(target_dir)
            .current_dir(workspace_root())
            .stdin(Stdio::null()),
    )?;
    let bin = target_dir.join("release").join("kestrel");
    if !bin.is_file() {
        return err(format!(
            "cargo built kestrel but {} is missing",
            bin.display()
        ));
    }
    Ok(bin)
}

/// Assembles the tiny PVH payload `vmm/tests/payloads/<name>.S` (with the system's `cc`
/// and `ld`, as the vmm tests do) into `out_dir/<name>` and returns that ELF's path.
pub fn assemble_payload(name: &str, out_dir: &Path) -> Result<PathBuf> {
    let src_dir = workspace_root().join("vmm/tests/payloads");
    let src = src_dir.join(format!("{name}.S"));
    if !src.is_file() {
        return err(format!("payload source {} not found", src.display()));
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|e| BenchError(format!("cannot create {}: {e}", out_dir.display())))?;
    let obj = out_dir.join(format!("{name}.o"));
    let elf = out_dir.join(name);
    run_tool(Command::new("cc").arg("-c").arg("-o").arg(&obj).arg(&src))?;
    run_tool(
        Command::new("ld")
            .args(["-m", "elf_x86_64", "-T"])
            .arg(src_dir.join("payload.ld"))
            .arg("-o")
            .arg(&elf)
            .arg(&obj),
    )?;
    Ok(elf)
}

// ---------------------------------------------------------------------------------------
// One timed run of a VMM process

/// How a measured process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Signaled(i32),
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Exited(c) => write!(f, "exit status {c}"),
            Ended::Signaled(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// What one run of a VMM process measured. Every time is from just before `spawn`.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The first byte read from the process's stdout (the guest console).
    pub first_byte: Option<Duration>,
    /// The last byte read before end of file.
    pub last_byte: Option<Duration>,
    /// For each marker asked for: when the console output first contained it (the read
    /// that completed it).
    pub markers: Vec<Option<Duration>>,
    /// When `wait4` returned: the process is gone.
    pub gone: Duration,
    pub ended: Ended,
    /// `ru_maxrss` of the process, KiB.
    pub max_rss_kib: u64,
    /// Everything it wrote on stdout.
    pub output: Vec<u8>,
    /// Everything it wrote on stderr.
    pub stderr: String,
    /// The bench killed the process: the deadline passed or a `give_up` string appeared.
    pub timed_out: bool,
    /// The `give_up` string that made the bench kill the process, if one did.
    pub gave_up_on: Option<String>,
}

impl RunResult {
    /// From the last output byte to the process being reaped.
    pub fn exit_gap(&self) -> Option<Duration> {
        self.last_byte.map(|l| self.gone.saturating_sub(l))
    }

    pub fn output_text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }
}

fn last_os_error(what: &str) -> BenchError {
    BenchError(format!("{what}: {}", io::Error::last_os_error()))
}

/// `pidfd_open(pid)`: a descriptor that becomes readable when the process exits, so the
/// wait for exit can have a deadline without racing a reaped (and reused) pid.
fn pidfd_open(pid: libc::pid_t) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, no pointers; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = RawFd::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until `fd` is readable or `deadline` passes; true when readable (or hung up).
fn wait_readable(fd: RawFd, deadline: Instant) -> Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid, writable pollfd and the count is 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            return Ok(true);
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(last_os_error("poll"));
        }
    }
}

/// Reaps `pid` with `wait4`, returning how it ended and its peak RSS in KiB.
fn reap(pid: libc::pid_t) -> Result<(Ended, u64)> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `status` and `ru` are valid and writable for the duration of the call.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            let ended = if libc::WIFEXITED(status) {
                Ended::Exited(libc::WEXITSTATUS(status))
            } else {
                Ended::Signaled(libc::WTERMSIG(status))
            };
            return Ok((ended, u64::try_from(ru.ru_maxrss).unwrap_or(0)));
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(last_os_error("wait4"));
        }
    }
}

/// How often the stderr file is checked for a [`timed_run`] `give_up` string while the
/// console is quiet.
const STDERR_CHECK: Duration = Duration::from_secs(1);

/// Runs `program args…` with stdin from /dev/null, stdout piped (read here, timed) and
/// stderr to `stderr_path`; kills it if it is still running after `timeout`, or once its
/// stderr contains one of `give_up` (a VMM that stopped its guest but will not exit,
/// as qemu does after a KVM internal error). Such a run is reported as `timed_out`.
///
/// The measurement path does nothing but `poll` + `read` on the pipe, then `poll` on a
/// pidfd and `wait4`; markers are searched for only in the bytes just read. The stderr
/// file is only looked at when the console has been quiet for a second.
pub fn timed_run(
    program: &Path,
    args: &[OsString],
    markers: &[&str],
    timeout: Duration,
    give_up: &[&str],
    stderr_path: &Path,
) -> Result<RunResult> {
    let stderr_file = File::create(stderr_path)
        .map_err(|e| BenchError(format!("cannot create {}: {e}", stderr_path.display())))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr_file));

    let t0 = Instant::now();
    let deadline = t0 + timeout;
    let mut child = cmd
        .spawn()
        .map_err(|e| BenchError(format!("cannot start {}: {e}", program.display())))?;
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| BenchError(format!("pid {} out of range", child.id())))?;
    let pidfd = pidfd_open(pid);
    let Some(mut stdout) = child.stdout.take() else {
        return err("spawned child has no stdout pipe");
    };

    let mut output = Vec::new();
    let mut first_byte = None;
    let mut last_byte = None;
    let mut found: Vec<Option<Duration>> = vec![None; markers.len()];
    let mut timed_out = false;
    let mut gave_up_on = None;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let slice_end = if give_up.is_empty() {
            deadline
        } else {
            deadline.min(Instant::now() + STDERR_CHECK)
        };
        if !wait_readable(stdout.as_raw_fd(), slice_end)? {
            if Instant::now() >= deadline {
                timed_out = true;
                break;
            }
            let text = std::fs::read_to_string(stderr_path).unwrap_or_default();
            if let Some(g) = give_up.iter().find(|g| text.contains(*g)) {
                gave_up_on = Some(g.to_string());
                timed_out = true;
                break;
            }
            continue;
        }
        let n = match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return err(format!("reading {}'s stdout: {e}", program.display())),
        };
        let now = t0.elapsed();
        first_byte.get_or_insert(now);
        last_byte = Some(now);
        // Search only the new bytes plus enough of the old ones for a marker that spans
        // two reads.
        let longest = markers.iter().map(|m| m.len()).max().unwrap_or(0);
        let from = output.len().saturating_sub(longest);
        output.extend_from_slice(buf.get(..n).unwrap_or_default());
        let tail = output.get(from..).unwrap_or_default();
        for (slot, marker) in found.iter_mut().zip(markers) {
            if slot.is_none() && contains(tail, marker.as_bytes()) {
                *slot = Some(now);
            }
        }
    }
    // End of file on stdout: the process is exiting. Wait for it with the same deadline.
    if !timed_out {
        if let Some(pidfd) = &pidfd {
            timed_out = !wait_readable(pidfd.as_raw_fd(), deadline)?;
        }
    }
    if timed_out {
        // Not reaped yet, so `pid` is still this child.
        let _ = child.kill();
    }
    let (ended, max_rss_kib) = reap(pid)?;
    let gone = t0.elapsed();
    let stderr = std::fs::read_to_string(stderr_path).unwrap_or_default();
    Ok(RunResult {
        first_byte,
        last_byte,
        markers: found,
        gone,
        ended,
        max_rss_kib,
        output,
        stderr,
        timed_out,
        gave_up_on,
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// Statistics and formatting

/// Median, min and max of a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    /// `None` for an empty sample. The median of an even-sized sample is the mean of the
    /// two middle values.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let mid = |i: usize| v.get(i).copied().unwrap_or(f64::NAN);
        let median = if n % 2 == 1 {
            mid(n / 2)
        } else {
            (mid(n / 2 - 1) + mid(n / 2)) / 2.0
        };
        Some(Summary {
            median,
            min: mid(0),
            max: mid(n - 1),
            n,
        })
    }
}

/// `median [min..max] n=N` with `decimals` digits, or `-` for no sample.
pub fn fmt_summary(s: Option<Summary>, decimals: usize) -> String {
    match s {
        Some(s) => format!(
            "{:.d$} [{:.d$}..{:.d$}] n={}",
            s.median,
            s.min,
            s.max,
            s.n,
            d = decimals
        ),
        None => "-".into(),
    }
}

/// The [`Summary`] of any iterator of values.
pub fn summary(v: impl IntoIterator<Item = f64>) -> Option<Summary> {
    Summary::of(&v.into_iter().collect::<Vec<_>>())
}

/// The value of option `arg` as a count of at least 1.
pub fn positive(arg: &str, v: &str) -> std::result::Result<usize, String> {
    v.parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{arg}: {v:?} is not a positive number"))
}

/// A bench's `main`: parses the options (`Err("")` asks for the usage), runs the bench,
/// and maps the outcome to the exit status — 0 when it measured, 1 when `run` measured
/// nothing (`nothing` says what was missing) or failed, 2 for bad arguments.
pub fn bench_main<O>(
    bench: &str,
    usage: &str,
    nothing: &str,
    parse: impl FnOnce() -> std::result::Result<O, String>,
    run: impl FnOnce(&O) -> std::result::Result<bool, String>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let opts = match parse() {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{usage}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{bench}: {e}\n{usage}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("{bench}: {nothing}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{bench}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `a / b` formatted to two significant-ish decimals, or `-` when either is missing.
pub fn ratio(a: Option<Summary>, b: Option<Summary>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.median > 0.0 => format!("{:.2}", a.median / b.median),
        _ => "-".into(),
    }
}

/// A fixed-width text table.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|s| s.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let width: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for (i, r) in self.rows.iter().enumerate() {
            let line: Vec<String> = r
                .iter()
                .zip(&width)
                .map(|(s, w)| format!("{s:<w$}"))
                .collect();
            out.push_str(line.join(" | ").trim_end());
            out.push('\n');
            if i == 0 {
                let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
                out.push_str(&rule.join("-|-"));
                out.push('\n');
            }
        }
        out
    }
}

/// The guest command line both VMMs boot with: kestrel's default.
pub const GUEST_CMDLINE: &str = vmm::DEFAULT_CMDLINE;

/// `cmdline` as qemu must be given it: on a kvm_pvm host, plus the kernel parameters that
/// kestrel appends by itself there (kvm_pvm ignores the CPUID feature masks a VMM sets,
/// for qemu's `-cpu host,-xsave,…` as for kestrel; see `vmm::arch::cpuid`).
pub fn qemu_cmdline(cmdline: &str, kvm_pvm: bool) -> String {
    let mut c = cmdline.to_string();
    if kvm_pvm {
        vmm::config::append_cmdline(&mut c, vmm::arch::cpuid::PVM_KERNEL_PARAMS);
    }
    c
}

/// qemu's `-cpu` for this host: the host CPU without the MSR qemu cannot set here and, on
/// kvm_pvm, without paravirtual IPIs (they hang SMP bring-up; kestrel clears them too).
pub fn qemu_cpu(kvm_pvm: bool) -> String {
    let mut cpu = String::from("host,-arch-capabilities");
    if kvm_pvm {
        cpu.push_str(",-kvm-pv-ipi");
    }
    cpu
}

/// `args` as the `OsString`s a `Command` takes.
pub fn os(args: &[&str]) -> Vec<std::ffi::OsString> {
    args.iter().map(std::ffi::OsString::from).collect()
}

/// qemu `-M microvm` arguments that boot `vmlinux` + `initramfs` the way kestrel boots a
/// Linux guest: 1 vCPU, 128 MiB, console on stdio, no ACPI and no RTC (the platform kestrel
/// gives the guest), `-no-reboot` (a guest reset ends qemu as it ends kestrel), kestrel's
/// exit port (`isa-debug-exit` at 0x444: a write of v exits with `(v << 1) | 1`), and on a
/// kvm_pvm host the quirks kestrel applies by itself ([`qemu_cpu`], [`qemu_cmdline`]).
/// `machine_extra` is appended to the machine options; callers add their devices after.
pub fn qemu_linux_args(
    machine_extra: &str,
    kvm_pvm: bool,
    vmlinux: &Path,
    initramfs: &Path,
    cmdline: &str,
) -> Vec<std::ffi::OsString> {
    let mut a = os(&[
        "-M",
        &format!("microvm,acpi=off,rtc=off{machine_extra}"),
        "-enable-kvm",
        "-cpu",
        &qemu_cpu(kvm_pvm),
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
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0x444,iosize=1",
        "-kernel",
    ]);
    a.push(vmlinux.into());
    a.push("-initrd".into());
    a.push(initramfs.into());
    a.push("-append".into());
    a.push(qemu_cmdline(cmdline, kvm_pvm).into());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_median_min_max() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn markers_across_reads() {
        assert!(contains(b"abc Run /init as", b"Run /init"));
        assert!(!contains(b"Run /ini", b"Run /init"));
    }

    #[test]
    fn timed_run_measures_a_process() {
        let dir = std::env::temp_dir();
        let r = timed_run(
            Path::new("/bin/sh"),
            &["-c".into(), "printf 'one\\ntwo\\n'; exit 7".into()],
            &["two", "never"],
            Duration::from_secs(30),
            &[],
            &dir.join(format!("kestrel-bench-test-{}.stderr", std::process::id())),
        )
        .unwrap();
        assert_eq!(r.ended, Ended::Exited(7));
        assert_eq!(r.output_text(), "one\ntwo\n");
        assert!(r.first_byte.is_some() && r.markers[0].is_some() && r.markers[1].is_none());
        assert!(r.max_rss_kib > 0 && !r.timed_out);
        assert!(r.gone >= r.last_byte.unwrap());
    }

    #[test]
    fn timed_run_gives_up_on_stderr() {
        let dir = std::env::temp_dir();
        let t = Instant::now();
        let r = timed_run(
            Path::new("/bin/sh"),
            &[
                "-c".into(),
                "echo 'KVM internal error' >&2; exec sleep 30".into(),
            ],
            &[],
            Duration::from_secs(30),
            &["KVM internal error"],
            &dir.join(format!("kestrel-bench-test3-{}.stderr", std::process::id())),
        )
        .unwrap();
        assert!(r.timed_out && t.elapsed() < Duration::from_secs(10));
        assert_eq!(r.gave_up_on.as_deref(), Some("KVM internal error"));
        assert_eq!(r.ended, Ended::Signaled(libc::SIGKILL));
    }

    #[test]
    fn timed_run_kills_at_the_deadline() {
        let dir = std::env::temp_dir();
        let r = timed_run(
            Path::new("/bin/sleep"),
            &["30".into()],
            &[],
            Duration::from_millis(200),
            &[],
            &dir.join(format!("kestrel-bench-test2-{}.stderr", std::process::id())),
        )
        .unwrap();
        assert!(r.timed_out);
        assert_eq!(r.ended, Ended::Signaled(libc::SIGKILL));
    }
}
