//! `kestrel-agent`: PID 1 of kestrel's guest initramfs.
//!
//! Two modes, chosen by the kernel command line:
//!
//! - **serve** (`kestrel.agent=serve`, what the shim boots): after the steps below it
//!   serves containerd's task API over vsock ([`server`]) and runs containers from their
//!   OCI specs ([`container`], [`helper`]);
//! - **report** (otherwise: the boot tests and `kestrel run`): proves that a kestrel microVM
//!   boots all the way to user space, reports what the guest sees, then ends the VM:
//!
//! 1. mounts `/proc`, `/sys` and `/dev` (devtmpfs);
//! 2. writes [`BOOT_TIMER_VALUE`] to the VMM's boot-timer port [`BOOT_TIMER_PORT`]
//!    (the VMM logs the time since its own start when it sees the write);
//! 3. prints `kestrel-agent: cpus=<online CPUs> memory_kib=<MemTotal>` on the console;
//! 4. writes the exit status (0, or 1 after any failure) to the VMM's exit port
//!    [`EXIT_PORT`], which ends the VM with that status, and as a fallback reboots
//!    (`reboot=k panic=-1` on the kernel command line turn that into an i8042 reset, which
//!    also ends the VM).
//!
//! I/O ports are written through `/dev/port`, so the agent needs no `iopl`/`ioperm` and
//! no inline assembly. Failures are printed as `kestrel-agent: error: <what>: <cause>`.
//!
//! Every system call is expensive on kvm_pvm hosts (each is a page fault plus emulated
//! guest kernel code, see `docs/kvm-pvm.md`), so the agent makes as few as it can.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

mod cgroup;
mod container;
mod events;
mod helper;
mod oom;
mod ports;
mod seccomp;
mod server;
mod stdio;
mod volumes;

use rustix::mount::{mount, MountFlags};
use rustix::system::{reboot, RebootCommand};
use rustix::termios::tcdrain;

/// The VMM's boot-timer port: a write marks "guest user space is running".
const BOOT_TIMER_PORT: u64 = 0x440;
/// The byte written to [`BOOT_TIMER_PORT`] (the value Firecracker's boot timer expects).
const BOOT_TIMER_VALUE: u8 = 123;
/// The VMM's exit port: the byte written is the VM's exit status.
const EXIT_PORT: u64 = 0x444;

/// A failed step: what the agent was doing and the OS error it got.
#[derive(Debug)]
pub struct Error {
    what: String,
    cause: Box<dyn std::error::Error + Send + Sync>,
}

impl Error {
    pub fn new(
        what: impl Into<String>,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            what: what.into(),
            cause: cause.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.cause)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.cause)
    }
}

/// The pseudo file systems PID 1 mounts: (source, target, type, flags).
const MOUNTS: [(&str, &str, &str, MountFlags); 3] = [
    (
        "proc",
        "/proc",
        "proc",
        MountFlags::NOSUID
            .union(MountFlags::NODEV)
            .union(MountFlags::NOEXEC),
    ),
    (
        "sysfs",
        "/sys",
        "sysfs",
        MountFlags::NOSUID
            .union(MountFlags::NODEV)
            .union(MountFlags::NOEXEC),
    ),
    ("devtmpfs", "/dev", "devtmpfs", MountFlags::NOSUID),
];

/// Mounts /proc, /sys and /dev; one that is already mounted (EBUSY) is fine.
fn mount_pseudo_filesystems() -> Result<(), Error> {
    for (source, target, fstype, flags) in MOUNTS {
        match mount(source, target, fstype, flags, None).map_err(io::Error::from) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(Error::new(format!("mount {target}"), e)),
        }
    }
    Ok(())
}

/// Number of CPUs in a kernel CPU list such as `0-3,5` (`/sys/devices/system/cpu/online`).
fn count_cpu_list(list: &str) -> Option<u32> {
    let list = list.trim();
    if list.is_empty() {
        return Some(0);
    }
    list.split(',').try_fold(0u32, |total, range| {
        let n = match range.split_once('-') {
            Some((first, last)) => {
                let first: u32 = first.trim().parse().ok()?;
                let last: u32 = last.trim().parse().ok()?;
                last.checked_sub(first)?.checked_add(1)?
            }
            None => {
                range.trim().parse::<u32>().ok()?;
                1
            }
        };
        total.checked_add(n)
    })
}

/// `MemTotal` in KiB from the text of `/proc/meminfo`.
fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemTotal:")?;
        let mut fields = rest.split_whitespace();
        let value = fields.next()?.parse().ok()?;
        match fields.next() {
            Some("kB") | None => Some(value),
            Some(_) => None,
        }
    })
}

fn read_file(path: &str) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::new(format!("read {path}"), e))
}

fn invalid(path: &str, text: &str) -> Error {
    Error::new(
        format!("parse {path}"),
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected contents {text:?}"),
        ),
    )
}

/// The line the tests parse: `kestrel-agent: cpus=<n> memory_kib=<n>`.
fn system_report() -> Result<String, Error> {
    const ONLINE: &str = "/sys/devices/system/cpu/online";
    const MEMINFO: &str = "/proc/meminfo";
    let online = read_file(ONLINE)?;
    let cpus = count_cpu_list(&online).ok_or_else(|| invalid(ONLINE, &online))?;
    let meminfo = read_file(MEMINFO)?;
    let memory_kib =
        mem_total_kib(&meminfo).ok_or_else(|| invalid(MEMINFO, "(no MemTotal line)"))?;
    Ok(format!(
        "kestrel-agent: cpus={cpus} memory_kib={memory_kib}\n"
    ))
}

/// Where the agent's lines go: stdout, which the kernel connects to `/dev/console` (the
/// initramfs carries that node). If writing there fails (EIO from a console tty whose UART
/// did not start, EBADF when the kernel had no console to give), the agent opens
/// `/dev/console` itself, reports the failure there and keeps using it.
#[derive(Default)]
struct Console {
    fallback: Option<File>,
}

impl Console {
    /// Waits until the serial port has sent everything written so far. The tty layer
    /// transmits asynchronously (by interrupt, maybe on another CPU); without this, the
    /// VM can end before the last lines leave the guest.
    fn drain(&self) {
        // Not a tty (or already gone): nothing is queued in a tty buffer to wait for.
        let _ = match &self.fallback {
            Some(console) => tcdrain(console),
            None => tcdrain(io::stdout()),
        };
    }

    /// Writes one whole line (ending in `\n`); there is nowhere left to report a failure to.
    fn line(&mut self, text: &str) {
        if let Some(console) = &mut self.fallback {
            let _ = console.write_all(text.as_bytes());
            return;
        }
        let mut stdout = io::stdout().lock();
        let Err(e) = stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
        else {
            return;
        };
        drop(stdout);
        let opened = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/console");
        if let Ok(mut console) = opened {
            let report = format!("kestrel-agent: error: write stdout: {e}\n");
            let _ = console.write_all(report.as_bytes());
            let _ = console.write_all(text.as_bytes());
            self.fallback = Some(console);
        }
    }

    fn error(&mut self, error: &Error) {
        self.line(&format!("kestrel-agent: error: {error}\n"));
    }
}

/// The VMM's I/O ports, written through `/dev/port` (offset = port number).
struct Ports(File);

impl Ports {
    fn open() -> Result<Self, Error> {
        OpenOptions::new()
            .write(true)
            .open("/dev/port")
            .map(Self)
            .map_err(|e| Error::new("open /dev/port", e))
    }

    fn write(&self, port: u64, value: u8) -> Result<(), Error> {
        match self.0.write_at(&[value], port) {
            Ok(1) => Ok(()),
            Ok(_) => Err(Error::new(
                format!("write port {port:#x}"),
                io::Error::from(io::ErrorKind::WriteZero),
            )),
            Err(e) => Err(Error::new(format!("write port {port:#x}"), e)),
        }
    }
}

/// Ends the VM with `status`: the exit port first, then reboot. If both fail, PID 1
/// exits, the kernel panics and `panic=-1` reboots.
fn end_vm(console: &mut Console, ports: Option<&Ports>, status: u8) -> ! {
    console.drain();
    if let Some(ports) = ports {
        if let Err(e) = ports.write(EXIT_PORT, status) {
            console.error(&e);
        }
    }
    let e = match reboot(RebootCommand::Restart) {
        Err(e) => io::Error::from(e),
        Ok(()) => io::Error::other("reboot(2) returned"),
    };
    console.error(&Error::new("reboot", e));
    std::process::exit(i32::from(status))
}

/// True when the kernel command line asks the agent to serve.
fn serve_mode() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .map(|c| {
            c.split_whitespace()
                .any(|w| w == kestrel_agent_protocol::SERVE_PARAM)
        })
        .unwrap_or(false)
}

fn main() {
    if let Some(config) = std::env::var_os(helper::CONFIG_ENV) {
        // A process the agent spawned to become a container's process (never returns).
        helper::run(&config);
    }
    let mut console = Console::default();
    if let Err(e) = mount_pseudo_filesystems() {
        console.error(&e);
        end_vm(&mut console, None, 1);
    }
    let ports = match Ports::open() {
        Ok(ports) => ports,
        Err(e) => {
            console.error(&e);
            end_vm(&mut console, None, 1);
        }
    };
    let report = ports
        .write(BOOT_TIMER_PORT, BOOT_TIMER_VALUE)
        .and_then(|()| system_report());
    let status = match report {
        Ok(report) => {
            console.line(&report);
            if serve_mode() {
                match server::serve() {
                    Ok(()) => 0,
                    Err(e) => {
                        console.error(&e);
                        1
                    }
                }
            } else {
                0
            }
        }
        Err(e) => {
            console.error(&e);
            1
        }
    };
    end_vm(&mut console, Some(&ports), status);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-3,5,7-8"), Some(7));
        assert_eq!(count_cpu_list(""), Some(0));
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
        assert_eq!(count_cpu_list("0-4294967295"), None);
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:         118504 kB\nMemFree:           99208 kB\n";
        assert_eq!(mem_total_kib(text), Some(118_504));
        assert_eq!(mem_total_kib("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total_kib("MemTotal: lots kB\n"), None);
        assert_eq!(mem_total_kib("MemTotal: 5 MB\n"), None);
    }
}
