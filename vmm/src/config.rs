//! What a VM is made of, as the CLI and the shim describe it, and its validation.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::arch::mptable::MAX_CPUS;
use crate::device_manager::{DiskConfig, NetConfig, VsockConfig};
use crate::exit::VmExit;

/// Called once, on the VMM thread, with how the VM ended.
pub type OnExit = Box<dyn FnOnce(&VmExit) + Send>;
/// Called once, on a vCPU thread, with the guest's boot time.
pub type OnBoot = Box<dyn FnOnce(Duration) + Send>;

/// The command line kestrel gives a guest unless told otherwise: console on COM1, reset
/// through the i8042 on reboot and on panic (both end the VM), no waiting on legacy
/// hardware that is not there.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd nomodule tsc=reliable";

/// Appends `arg` to a kernel command line, space-separated.
pub fn append_cmdline(cmdline: &mut String, arg: &str) {
    if !cmdline.is_empty() {
        cmdline.push(' ');
    }
    cmdline.push_str(arg);
}

/// A VM to build and start.
pub struct VmConfig {
    /// ELF vmlinux (PVH or 64-bit entry) or bzImage.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// virtio-blk disks, in the order the guest sees them (`vda`, `vdb`…).
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces over taps, in the order the guest sees them.
    pub nets: Vec<NetConfig>,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// A virtio-rng entropy device (after the other virtio devices), so the guest's RNG
    /// is seeded at boot.
    pub rng: bool,
    /// Where the guest console (COM1) goes.
    pub console_out: Box<dyn Write + Send>,
    /// Host input for the guest console, if any (a terminal, pipe or socket).
    pub console_in: Option<File>,
    /// When the VMM process started: the boot timer reports guest boot relative to it.
    pub start_time: Instant,
    /// Called once, on a vCPU thread, when the guest signals the boot timer (under the
    /// vCPU thread's seccomp filter, as `on_exit`).
    pub on_boot: Option<OnBoot>,
    /// Called once, on the VMM thread, when the VM has stopped and its vCPUs are joined.
    /// Runs under the VMM thread's seccomp filter: it may wake another thread (a channel,
    /// an eventfd), not open files or spawn processes.
    pub on_exit: Option<OnExit>,
    /// How the threads serving the guest are confined (see [`crate::seccomp`]).
    pub seccomp: crate::seccomp::SeccompLevel,
}

impl VmConfig {
    /// A config with kestrel's defaults (1 vCPU, 128 MiB, console to stdout).
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: 1,
            memory_mib: 128,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            rng: false,
            console_out: Box::new(std::io::stdout()),
            console_in: None,
            start_time: Instant::now(),
            on_boot: None,
            on_exit: None,
            seccomp: crate::seccomp::SeccompLevel::default(),
        }
    }
}

/// A config the VMM refuses before touching KVM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("a VM needs at least 1 vCPU")]
    NoVcpus,
    #[error("{asked} vCPUs asked; this host allows at most {max}")]
    TooManyVcpus { asked: u64, max: u64 },
    #[error("a VM needs memory: 0 MiB asked")]
    NoMemory,
    #[error("{asked} MiB of guest memory asked; this host has {host} MiB of RAM and swap")]
    MemoryTooLarge { asked: u64, host: u64 },
    #[error("kernel {0} does not exist")]
    KernelMissing(PathBuf),
    #[error("initramfs {0} does not exist")]
    InitrdMissing(PathBuf),
}

/// The host's RAM plus swap in MiB (what a guest could be given at most).
pub fn host_memory_mib() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return u64::MAX;
    };
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("MemTotal:") + field("SwapTotal:")) >> 10
}

/// The checks that need no KVM, against this host: vCPUs and memory within what it has,
/// kernel and initrd present. Callers run it before slow preparation (an image
/// conversion) so that a VM that cannot start fails at once; [`crate::start_vm`] runs it
/// again.
pub fn check_host(
    vcpus: u64,
    memory_mib: u64,
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
) -> Result<(), ConfigError> {
    validate(
        vcpus,
        memory_mib,
        u64::from(MAX_CPUS),
        host_memory_mib(),
        kernel,
        initrd,
    )
}

/// Checks sizes and paths; `max_vcpus` is what the hypervisor allows.
pub fn validate(
    vcpus: u64,
    memory_mib: u64,
    max_vcpus: u64,
    host_mib: u64,
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
) -> Result<(), ConfigError> {
    let max = max_vcpus.min(u64::from(MAX_CPUS));
    match vcpus {
        0 => return Err(ConfigError::NoVcpus),
        n if n > max => return Err(ConfigError::TooManyVcpus { asked: n, max }),
        _ => {}
    }
    match memory_mib {
        0 => return Err(ConfigError::NoMemory),
        m if m > host_mib => {
            return Err(ConfigError::MemoryTooLarge {
                asked: m,
                host: host_mib,
            })
        }
        _ => {}
    }
    if !kernel.exists() {
        return Err(ConfigError::KernelMissing(kernel.into()));
    }
    if let Some(rd) = initrd.filter(|p| !p.exists()) {
        return Err(ConfigError::InitrdMissing(rd.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn refuses_bad_sizes_and_paths() {
        let k = Path::new("/proc/self/exe");
        assert_eq!(
            validate(0, 128, 8, 1024, k, None),
            Err(ConfigError::NoVcpus)
        );
        assert_eq!(
            validate(9, 128, 8, 1024, k, None),
            Err(ConfigError::TooManyVcpus { asked: 9, max: 8 })
        );
        assert_eq!(
            validate(300, 128, 1024, 1024, k, None),
            Err(ConfigError::TooManyVcpus {
                asked: 300,
                max: 254
            })
        );
        assert_eq!(validate(1, 0, 8, 1024, k, None), Err(ConfigError::NoMemory));
        assert_eq!(
            validate(1, 2048, 8, 1024, k, None),
            Err(ConfigError::MemoryTooLarge {
                asked: 2048,
                host: 1024
            })
        );
        let missing = Path::new("/nonexistent/vmlinux");
        assert_eq!(
            validate(1, 128, 8, 1024, missing, None),
            Err(ConfigError::KernelMissing(missing.into()))
        );
        assert_eq!(
            validate(1, 128, 8, 1024, k, Some(missing)),
            Err(ConfigError::InitrdMissing(missing.into()))
        );
        assert!(validate(8, 1024, 8, 1024, k, None).is_ok());
    }

    #[test]
    fn host_memory_is_known() {
        assert!(host_memory_mib() > 0);
    }
}
