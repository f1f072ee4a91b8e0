//! `vm-init`: PID 1 of kestrel's containerDisk test image (`tests/images/`).
//!
//! The image is a small ext4 disk (KubeVirt containerDisk layout: `/disk/disk.qcow2` in
//! the OCI image) that the kernel mounts read-write as its root from `/dev/vda`. The shim
//! attaches a cloud-init NoCloud seed (vfat, label `cidata`) as `/dev/vdb`. vm-init proves
//! both arrived and that the root disk is private to this VM, then ends the VM:
//!
//! 1. mounts `/proc`, `/sys`, `/dev` (devtmpfs; already mounted is fine) and prints
//!    `vm-init: started`;
//! 2. mounts `/dev/vdb` read-only (vfat) on `/mnt`, reads `user-data`, takes the content
//!    of the `write_files` entry for `/etc/cloud/environment` (missing: empty), writes it
//!    to `/etc/cloud/environment` and prints each non-empty line as `vm-init: env <line>`;
//! 3. reads the boot counter `/var/lib/vm-init/boots` (missing: 0), prints
//!    `vm-init: previous-boots=<n>`, writes n+1 back, fsyncs and syncs — a second VM
//!    started from the same image must print 0 again (its own overlay);
//! 4. with `VM_INIT_WAIT=1` in the environment: prints `vm-init: waiting`, blocks until
//!    SIGINT (Ctrl-Alt-Del) or SIGTERM, prints `vm-init: shutdown requested`, syncs and
//!    powers off with status 0; otherwise powers off with status `VM_INIT_EXIT` (0-255,
//!    default 0).
//!
//! Powering off writes the status to kestrel's exit port 0x444 through `/dev/port` (as
//! `rootfs/agent` does), with `reboot(RB_AUTOBOOT)` as the fallback. Any failure prints
//! `vm-init: error: <what>: <cause>` and powers off with status 1.
//!
//! SIGINT and SIGTERM are blocked first thing (a signal sent to PID 1 with the default
//! action is discarded unless blocked), and Ctrl-Alt-Del is switched to "send SIGINT to
//! init" (`reboot(RB_DISABLE_CAD)`; the kernel's default is an immediate reboot), so a
//! request that arrives while vm-init is still starting up is not lost.
//!
//! Every system call costs milliseconds on kvm_pvm hosts (docs/kvm-pvm.md): vm-init makes
//! few and batches its console output.

mod cloud_config;

use std::ffi::CStr;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

/// kestrel's exit port: the byte written is the VM's exit status.
const EXIT_PORT: u64 = 0x444;
const SEED_DEVICE: &CStr = c"/dev/vdb";
const SEED_MOUNT: &CStr = c"/mnt";
const USER_DATA: &str = "/mnt/user-data";
const ENVIRONMENT: &str = "/etc/cloud/environment";
const BOOTS: &str = "/var/lib/vm-init/boots";

/// A failed step: what vm-init was doing and why it failed.
#[derive(Debug)]
struct Error {
    what: String,
    cause: Box<dyn std::error::Error>,
}

impl Error {
    fn new(what: impl Into<String>, cause: impl Into<Box<dyn std::error::Error>>) -> Self {
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

/// Thin wrappers around the system calls std does not offer.
mod sys {
    use std::ffi::CStr;
    use std::io;

    fn check(rc: libc::c_int) -> io::Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `mount(2)` without data.
    pub fn mount(
        source: &CStr,
        target: &CStr,
        fstype: &CStr,
        flags: libc::c_ulong,
    ) -> io::Result<()> {
        // SAFETY: all pointers come from live `CStr`s (NUL-terminated, valid for the call);
        // a null `data` pointer is allowed by mount(2).
        check(unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                flags,
                std::ptr::null(),
            )
        })
    }

    /// The signal set {SIGINT, SIGTERM}.
    fn shutdown_signals() -> libc::sigset_t {
        // SAFETY: sigset_t is a plain bit array; all-zero is a valid (empty) set, and
        // sigaddset only writes inside the set we own.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            set
        }
    }

    /// Blocks SIGINT and SIGTERM so they stay pending until [`wait_shutdown_signal`].
    pub fn block_shutdown_signals() -> io::Result<()> {
        let set = shutdown_signals();
        // SAFETY: `set` is a valid sigset_t; a null old-set pointer is allowed.
        let rc = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        check(rc)
    }

    /// Waits for SIGINT or SIGTERM (blocked beforehand); returns the signal number.
    pub fn wait_shutdown_signal() -> io::Result<libc::c_int> {
        let set = shutdown_signals();
        loop {
            // SAFETY: `set` is a valid sigset_t; a null siginfo pointer is allowed.
            let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
            if sig >= 0 {
                return Ok(sig);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// `reboot(2)` with a command that returns (RB_DISABLE_CAD).
    pub fn disable_ctrl_alt_del() -> io::Result<()> {
        // SAFETY: reboot(2) takes no pointers; RB_DISABLE_CAD only sets a kernel flag.
        check(unsafe { libc::reboot(libc::RB_DISABLE_CAD) })
    }

    /// `reboot(RB_AUTOBOOT)`. Only returns on failure.
    pub fn reboot() -> io::Error {
        // SAFETY: reboot(2) takes no pointers; on success it does not return.
        unsafe { libc::reboot(libc::RB_AUTOBOOT) };
        io::Error::last_os_error()
    }

    /// `sync(2)`.
    pub fn sync() {
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() }
    }
}

/// Where vm-init's lines go: `/dev/console` when it can be opened, else stdout.
enum Console {
    Device(File),
    Stdout,
}

impl Console {
    fn open() -> Self {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/console")
            .map_or(Self::Stdout, Self::Device)
    }

    /// Writes whole lines at once; there is nowhere to report a failure to.
    fn write(&mut self, text: &str) {
        let _ = match self {
            Self::Device(f) => f.write_all(text.as_bytes()),
            Self::Stdout => io::stdout().lock().write_all(text.as_bytes()),
        };
    }

    fn error(&mut self, error: &Error) {
        self.write(&format!("vm-init: error: {error}\n"));
    }
}

/// Ends the VM with `status`: the exit port, then reboot. If both fail, PID 1 exits, the
/// kernel panics and `panic=-1` reboots.
fn power_off(console: &mut Console, status: u8) -> ! {
    sys::sync();
    // The tty sends asynchronously: let the console's last lines leave the guest first.
    let _ = rustix::termios::tcdrain(std::io::stdout());
    match OpenOptions::new().write(true).open("/dev/port") {
        Ok(port) => match port.write_at(&[status], EXIT_PORT) {
            Ok(1) => {}
            Ok(_) => console.error(&Error::new("write exit port", "short write")),
            Err(e) => console.error(&Error::new("write exit port", e)),
        },
        Err(e) => console.error(&Error::new("open /dev/port", e)),
    }
    let e = sys::reboot();
    console.error(&Error::new("reboot", e));
    std::process::exit(i32::from(status))
}

/// The pseudo file systems: (source, target, type, flags).
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

fn mount(source: &CStr, target: &CStr, fstype: &CStr, flags: libc::c_ulong) -> Result<(), Error> {
    match sys::mount(source, target, fstype, flags) {
        Ok(()) => Ok(()),
        // already mounted (the kernel mounts devtmpfs itself with DEVTMPFS_MOUNT)
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        Err(e) => Err(Error::new(
            format!(
                "mount {} on {}",
                source.to_string_lossy(),
                target.to_string_lossy()
            ),
            e,
        )),
    }
}

/// The value of `key` in a `KEY=VALUE` environment file (optional `export `, quotes).
fn env_value<'a>(environment: &'a str, key: &str) -> Option<&'a str> {
    environment.lines().rev().find_map(|line| {
        let line = line.trim();
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (k, v) = line.split_once('=')?;
        if k.trim() != key {
            return None;
        }
        let v = v.trim();
        Some(
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v),
        )
    })
}

/// What to do once the checks are done.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    Exit(u8),
    WaitForSignal,
}

fn ending(environment: &str) -> Result<Ending, Error> {
    if env_value(environment, "VM_INIT_WAIT") == Some("1") {
        return Ok(Ending::WaitForSignal);
    }
    match env_value(environment, "VM_INIT_EXIT") {
        None | Some("") => Ok(Ending::Exit(0)),
        Some(v) => v
            .parse()
            .map(Ending::Exit)
            .map_err(|e| Error::new(format!("VM_INIT_EXIT={v}"), e)),
    }
}

/// The console lines for the environment file.
fn env_report(environment: &str) -> String {
    let mut out = String::new();
    for line in environment.lines().filter(|l| !l.trim().is_empty()) {
        out.push_str("vm-init: env ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Steps 2 and 3; returns the environment file's text.
fn check_disks(console: &mut Console) -> Result<String, Error> {
    mount(
        SEED_DEVICE,
        SEED_MOUNT,
        c"vfat",
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    )?;
    let user_data = std::fs::read_to_string(USER_DATA)
        .map_err(|e| Error::new(format!("read {USER_DATA}"), e))?;
    let environment = cloud_config::file_content(&user_data, ENVIRONMENT)
        .map_err(|e| Error::new(format!("parse {USER_DATA}"), e))?
        .unwrap_or_default();
    std::fs::write(ENVIRONMENT, &environment)
        .map_err(|e| Error::new(format!("write {ENVIRONMENT}"), e))?;

    let previous: u64 = match std::fs::read_to_string(BOOTS) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|e| Error::new(format!("parse {BOOTS} ({:?})", text.trim()), e))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(Error::new(format!("read {BOOTS}"), e)),
    };
    let mut report = env_report(&environment);
    report.push_str(&format!("vm-init: previous-boots={previous}\n"));
    console.write(&report);

    let write_boots = || -> io::Result<()> {
        let mut f = File::create(BOOTS)?;
        f.write_all(format!("{}\n", previous.saturating_add(1)).as_bytes())?;
        f.sync_all()
    };
    write_boots().map_err(|e| Error::new(format!("write {BOOTS}"), e))?;
    sys::sync();
    Ok(environment)
}

fn run(console: &mut Console) -> Result<u8, Error> {
    let environment = check_disks(console)?;
    match ending(&environment)? {
        Ending::Exit(status) => Ok(status),
        Ending::WaitForSignal => {
            console.write("vm-init: waiting\n");
            sys::wait_shutdown_signal().map_err(|e| Error::new("wait for SIGINT/SIGTERM", e))?;
            console.write("vm-init: shutdown requested\n");
            Ok(0)
        }
    }
}

fn main() {
    let mut console = Console::Stdout;
    let early = sys::block_shutdown_signals()
        .map_err(|e| Error::new("block SIGINT/SIGTERM", e))
        .and_then(|()| {
            sys::disable_ctrl_alt_del().map_err(|e| Error::new("reboot(RB_DISABLE_CAD)", e))
        })
        .and_then(|()| {
            MOUNTS
                .iter()
                .try_for_each(|&(s, t, f, fl)| mount(s, t, f, fl))
        });
    if let Err(e) = early {
        console.error(&e);
        power_off(&mut console, 1);
    }
    console = Console::open();
    console.write("vm-init: started\n");
    let status = run(&mut console).unwrap_or_else(|e| {
        console.error(&e);
        1
    });
    power_off(&mut console, status);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_values() {
        let env = "FOO=bar\nexport Q=\"x y\"\nVM_INIT_EXIT=3\nVM_INIT_EXIT=4\n";
        assert_eq!(env_value(env, "FOO"), Some("bar"));
        assert_eq!(env_value(env, "Q"), Some("x y"));
        assert_eq!(env_value(env, "VM_INIT_EXIT"), Some("4"));
        assert_eq!(env_value(env, "NOPE"), None);
    }

    #[test]
    fn endings() {
        assert_eq!(ending("").unwrap(), Ending::Exit(0));
        assert_eq!(ending("VM_INIT_EXIT=3\n").unwrap(), Ending::Exit(3));
        assert_eq!(
            ending("VM_INIT_EXIT=3\nVM_INIT_WAIT=1\n").unwrap(),
            Ending::WaitForSignal
        );
        assert_eq!(ending("VM_INIT_WAIT=0\n").unwrap(), Ending::Exit(0));
        assert!(ending("VM_INIT_EXIT=256\n").is_err());
        assert!(ending("VM_INIT_EXIT=x\n").is_err());
    }

    #[test]
    fn report() {
        assert_eq!(
            env_report("A=1\n\nB=2"),
            "vm-init: env A=1\nvm-init: env B=2\n"
        );
        assert_eq!(env_report(""), "");
    }
}
