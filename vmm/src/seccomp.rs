//! Per-thread seccomp filters for the threads that serve the guest, as Firecracker confines
//! its vCPU and VMM threads: each vCPU thread, the VMM thread and each disk's device thread
//! installs an allow-list on itself before it handles anything the guest controls. The
//! lists are what those threads really call (derived with [`SeccompLevel::Log`] from real
//! boots with every device), with the arguments pinned where a call could do more: ioctl
//! only with the requests each thread issues, `mmap`/`mprotect` never executable, `socket`
//! only `AF_UNIX` (vsock's host side), signals only to this process.
//!
//! Opening a file is never allowed, but answered with EACCES rather than fatal: glibc's
//! malloc reads `/sys/devices/system/cpu/online` the first time a thread needs a new arena,
//! on whichever thread that is, and copes with the refusal. (A second filter answers the
//! open calls; the kernel takes the stricter answer of the two.)
//!
//! Any other call outside the list is fatal: the kernel raises SIGSYS on the calling
//! thread, whose handler writes which call it was and from which thread (to stderr and to
//! the files given to [`report_to`]) and ends the process with [`EXIT_STATUS`]. A
//! thread that made a forbidden call may have been taken over by the guest; nothing of the
//! process is trusted after that, so the whole process ends, and its owner (containerd,
//! through the shim's `delete`) reports and cleans up.
//!
//! The other threads of the process (the shim's tokio runtime, the CLI's main thread) are
//! not confined: they open files, run `mke2fs`, talk to containerd.
//!
//! Thread note: [`Filters`] is built once per VM on the builder's thread; each confined
//! thread applies its own program at its start ([`Filters::confine`]); the SIGSYS handler
//! is process-wide and installed once.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::RawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::signal::register_signal_handler;

/// The process's exit status after a forbidden call (128 + SIGSYS, as a shell reports a
/// process killed by SIGSYS).
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// The environment variable the shim reads its [`SeccompLevel`] from.
pub const ENV: &str = "KESTREL_SECCOMP";

/// Errors building or installing the filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("unknown seccomp level {0:?} (expected enforce, log or off)")]
    Level(String),
    #[error("cannot build the seccomp filter of the {0} threads")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot compile the seccomp filter of the {0} threads")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter of {0}")]
    Apply(String, #[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
}

/// How strictly the guest-serving threads are confined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompLevel {
    /// A call outside the allow-list ends the process (the default).
    #[default]
    Enforce,
    /// A call outside the allow-list is allowed and logged by the kernel (`dmesg`, audit:
    /// `type=1326 … comm="vcpu0" … syscall=N`): how the lists are derived.
    Log,
    /// No filter.
    Off,
}

impl FromStr for SeccompLevel {
    type Err = SeccompError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "enforce" | "on" => Ok(SeccompLevel::Enforce),
            "log" => Ok(SeccompLevel::Log),
            "off" => Ok(SeccompLevel::Off),
            other => Err(SeccompError::Level(other.to_string())),
        }
    }
}

impl SeccompLevel {
    /// The level in [`ENV`] ([`SeccompLevel::Enforce`] when unset or empty).
    pub fn from_env() -> Result<Self, SeccompError> {
        match std::env::var(ENV) {
            Ok(v) if !v.is_empty() => v.parse(),
            _ => Ok(SeccompLevel::Enforce),
        }
    }
}

/// The kinds of confined thread, each with its own allow-list (the discriminant is the
/// index of its program in [`Filters`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs `KVM_RUN` and dispatches the guest's MMIO and port I/O.
    Vcpu = 0,
    /// The event loop: net, vsock, rng, console input, control; tears the VM down.
    Vmm = 1,
    /// A disk's own event loop.
    Device = 2,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Vmm => "VMM",
            ThreadKind::Device => "disk",
        }
    }

    fn from_code(code: u8) -> Option<ThreadKind> {
        [ThreadKind::Vcpu, ThreadKind::Vmm, ThreadKind::Device]
            .into_iter()
            .find(|k| *k as u8 == code)
    }
}

// --- the allow-lists ---------------------------------------------------------------------

mod kvm_ioctls_nr {
    use kvm_bindings::{kvm_ioeventfd, kvm_irq_routing, KVMIO};
    vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    vmm_sys_util::ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
}

/// One syscall's admissible argument patterns (any of them; an empty list: any arguments).
type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn cond(
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
}

/// Adds `calls` with any arguments.
fn allow(rules: &mut Rules, calls: &[libc::c_long]) {
    for &nr in calls {
        rules.insert(nr, Vec::new());
    }
}

/// Adds `nr` when argument `arg` is one of `values`.
fn allow_arg(
    rules: &mut Rules,
    nr: libc::c_long,
    arg: u8,
    len: SeccompCmpArgLen,
    values: &[u64],
) -> Result<(), seccompiler::BackendError> {
    let entry = rules.entry(nr).or_default();
    for &v in values {
        entry.push(SeccompRule::new(vec![SeccompCondition::new(
            arg,
            len.clone(),
            SeccompCmpOp::Eq,
            v,
        )?])?);
    }
    Ok(())
}

/// Adds `nr` when argument `arg` has none of the bits of `mask`.
fn allow_without_bits(
    rules: &mut Rules,
    nr: libc::c_long,
    arg: u8,
    mask: u64,
) -> Result<(), seccompiler::BackendError> {
    rules
        .entry(nr)
        .or_default()
        .push(SeccompRule::new(vec![cond(
            arg,
            SeccompCmpOp::MaskedEq(mask),
            0,
        )?])?);
    Ok(())
}

/// What every confined thread calls: memory (never executable), locks, time, its own
/// signals, logging, closing, ending.
fn common(rules: &mut Rules) -> Result<(), seccompiler::BackendError> {
    allow(
        rules,
        &[
            libc::SYS_futex,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_restart_syscall,
            libc::SYS_munmap,
            libc::SYS_madvise,
            libc::SYS_mremap,
            libc::SYS_brk,
            libc::SYS_sched_yield,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_getrandom,
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
        ],
    );
    let exec = libc::PROT_EXEC as u64;
    allow_without_bits(rules, libc::SYS_mmap, 2, exec)?;
    allow_without_bits(rules, libc::SYS_mprotect, 2, exec)?;
    // Signals only within this process (a vCPU kick, abort).
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u64;
    allow_arg(rules, libc::SYS_tgkill, 0, SeccompCmpArgLen::Dword, &[pid])?;
    // Cloning an eventfd for a device's thread, a socket's flags.
    allow_arg(
        rules,
        libc::SYS_fcntl,
        1,
        SeccompCmpArgLen::Dword,
        &[
            libc::F_DUPFD_CLOEXEC as u64,
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
        ],
    )?;
    Ok(())
}

/// A disk's event loop: epoll, eventfds, positioned I/O, flush, discard.
fn device(rules: &mut Rules) -> Result<(), seccompiler::BackendError> {
    common(rules)?;
    allow(
        rules,
        &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_readv,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
            libc::SYS_lseek,
            libc::SYS_fstat,
        ],
    );
    Ok(())
}

/// The VMM thread: a disk's calls (it closes the disks and may flush an overlay), the
/// taps, vsock's Unix sockets, the vCPU kicks, the VM's teardown.
fn vmm(rules: &mut Rules) -> Result<(), seccompiler::BackendError> {
    device(rules)?;
    allow(
        rules,
        &[
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_shutdown,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_getsockopt,
            // vsock's retransmit timer.
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
            // vsock's listening socket file, removed when the device goes.
            libc::SYS_unlink,
            libc::SYS_unlinkat,
        ],
    );
    allow_arg(
        rules,
        libc::SYS_socket,
        0,
        SeccompCmpArgLen::Dword,
        &[libc::AF_UNIX as u64],
    )?;
    allow_arg(
        rules,
        libc::SYS_ioctl,
        1,
        SeccompCmpArgLen::Dword,
        &[libc::FIONBIO, libc::TUNSETOFFLOAD],
    )?;
    Ok(())
}

/// A vCPU thread: `KVM_RUN`, the IOAPIC's MSI routes, device activation at DRIVER_OK (the
/// queues' ioeventfds, a tap's offloads, cloned eventfds), console output.
fn vcpu(rules: &mut Rules) -> Result<(), seccompiler::BackendError> {
    common(rules)?;
    allow_arg(
        rules,
        libc::SYS_ioctl,
        1,
        SeccompCmpArgLen::Dword,
        &[
            kvm_ioctls_nr::KVM_RUN(),
            kvm_ioctls_nr::KVM_SET_GSI_ROUTING(),
            kvm_ioctls_nr::KVM_IOEVENTFD(),
            libc::TUNSETOFFLOAD,
        ],
    )?;
    Ok(())
}

/// The calls that open a file by name: refused with EACCES by [`no_open_program`].
const OPEN_CALLS: [libc::c_long; 4] = [
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_creat,
];

fn program(kind: ThreadKind, level: SeccompLevel) -> Result<BpfProgram, SeccompError> {
    let what = kind.name();
    let mut rules = Rules::new();
    let built = match kind {
        ThreadKind::Vcpu => vcpu(&mut rules),
        ThreadKind::Vmm => vmm(&mut rules),
        ThreadKind::Device => device(&mut rules),
    };
    built.map_err(|e| SeccompError::Build(what, e))?;
    if level == SeccompLevel::Enforce {
        // Passed here, answered EACCES by the other filter.
        allow(&mut rules, &OPEN_CALLS);
    }
    let mismatch = match level {
        SeccompLevel::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    compile(what, rules, mismatch, SeccompAction::Allow)
}

/// The filter every confined thread gets at [`SeccompLevel::Enforce`] besides its
/// allow-list: opening a file fails with EACCES.
fn no_open_program() -> Result<BpfProgram, SeccompError> {
    let mut rules = Rules::new();
    allow(&mut rules, &OPEN_CALLS);
    let refuse = SeccompAction::Errno(libc::EACCES as u32);
    compile("confined", rules, SeccompAction::Allow, refuse)
}

/// `rules` answered `on_match`, everything else `mismatch`, as BPF for x86_64.
fn compile(
    what: &'static str,
    rules: Rules,
    mismatch: SeccompAction,
    on_match: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(rules, mismatch, on_match, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build(what, e))?;
    filter
        .try_into()
        .map_err(|e| SeccompError::Compile(what, e))
}

/// The compiled programs of one VM's threads (none at [`SeccompLevel::Off`]): the vCPU,
/// VMM and disk allow-lists, then the open filter (at [`SeccompLevel::Enforce`]).
#[derive(Clone)]
pub struct Filters {
    programs: Option<Arc<Programs>>,
}

struct Programs {
    by_kind: [BpfProgram; 3],
    no_open: Option<BpfProgram>,
}

impl Filters {
    /// Compiles the three programs and installs the SIGSYS handler.
    pub fn new(level: SeccompLevel) -> Result<Filters, SeccompError> {
        if level == SeccompLevel::Off {
            log::warn!("seccomp is off: the threads serving the guest are not confined");
            return Ok(Filters { programs: None });
        }
        install_handler()?;
        let programs = Programs {
            by_kind: [
                program(ThreadKind::Vcpu, level)?,
                program(ThreadKind::Vmm, level)?,
                program(ThreadKind::Device, level)?,
            ],
            no_open: match level {
                SeccompLevel::Enforce => Some(no_open_program()?),
                _ => None,
            },
        };
        Ok(Filters {
            programs: Some(Arc::new(programs)),
        })
    }

    /// The function a thread of `kind` (`index`: the vCPU or disk number) runs first, to
    /// confine itself; its error says which thread.
    pub fn confine(
        &self,
        kind: ThreadKind,
        index: u16,
    ) -> impl FnOnce() -> Result<(), SeccompError> + Send + 'static {
        let programs = self.programs.clone();
        move || {
            let Some(programs) = programs else {
                return Ok(());
            };
            let Some(program) = programs.by_kind.get(kind as usize) else {
                return Ok(());
            };
            THREAD.with(|t| t.set(Some((kind as u8, index))));
            let apply = |p: &BpfProgram| {
                seccompiler::apply_filter(p)
                    .map_err(|e| SeccompError::Apply(thread_label(kind, index), e))
            };
            if let Some(no_open) = &programs.no_open {
                apply(no_open)?;
            }
            apply(program)
        }
    }
}

/// Names a confined thread ("the VMM thread", "the vCPU 2 thread"); allocation-free, so
/// the SIGSYS handler uses it too.
fn write_thread(out: &mut impl std::fmt::Write, kind: ThreadKind, index: u16) -> std::fmt::Result {
    match kind {
        ThreadKind::Vmm => out.write_str("the VMM thread"),
        k => write!(out, "the {} {index} thread", k.name()),
    }
}

fn thread_label(kind: ThreadKind, index: u16) -> String {
    let mut s = String::new();
    let _ = write_thread(&mut s, kind, index);
    s
}

// --- the SIGSYS handler ------------------------------------------------------------------

thread_local! {
    // Which confined thread this is (kind code, index), for the SIGSYS handler.
    static THREAD: Cell<Option<(u8, u16)>> = const { Cell::new(None) };
}

/// Up to two more places the report goes (the shim's log FIFO and its run-directory
/// record), besides stderr.
static REPORT_FDS: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];

/// Also writes the report of a forbidden call to `fd` (kept open by the caller for the
/// process's life). At most two; a third replaces the second.
pub fn report_to(fd: RawFd) {
    let slot = if REPORT_FDS[0].load(Ordering::SeqCst) < 0 {
        &REPORT_FDS[0]
    } else {
        &REPORT_FDS[1]
    };
    slot.store(fd, Ordering::SeqCst);
}

/// The `_sigsys` member of `siginfo_t` on x86_64 (after si_signo, si_errno, si_code and
/// padding): what the kernel fills in for SECCOMP_RET_TRAP.
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

/// si_code of a SIGSYS raised by seccomp.
const SYS_SECCOMP: libc::c_int = 1;

/// A fixed buffer that `write!` fills without allocating (the handler may not allocate).
struct StackBuf {
    buf: [u8; 256],
    len: usize,
}

impl std::fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for &b in s.as_bytes() {
            let Some(slot) = self.buf.get_mut(self.len) else {
                return Ok(());
            };
            *slot = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// The report line for a forbidden call `nr` made by `thread` (None: an unconfined
/// thread, or a SIGSYS sent from outside when `seccomp` is false).
fn report(buf: &mut StackBuf, thread: Option<(u8, u16)>, seccomp: bool, nr: i64) {
    let who = thread.and_then(|(k, i)| ThreadKind::from_code(k).map(|k| (k, i)));
    let _ = buf.write_str("kestrel: seccomp: ");
    if !seccomp {
        let _ = write!(buf, "SIGSYS received from outside");
    } else {
        let name = usize::try_from(nr)
            .ok()
            .and_then(syscalls::x86_64::Sysno::new)
            .map_or("unknown", |s| s.name());
        let _ = match who {
            Some((k, i)) => write_thread(buf, k, i),
            None => buf.write_str("a thread"),
        };
        let _ = write!(buf, " made a forbidden system call: {name} ({nr})");
    }
    let _ = writeln!(buf, "; the VMM stops (exit status {EXIT_STATUS})");
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes an SA_SIGINFO handler a valid siginfo_t, whose SIGSYS layout
    // on x86_64 is `SigsysInfo`'s.
    let (code, nr) = unsafe {
        let info = &*(info as *const SigsysInfo);
        (info.code, i64::from(info.syscall))
    };
    let mut buf = StackBuf {
        buf: [0; 256],
        len: 0,
    };
    report(&mut buf, THREAD.with(|t| t.get()), code == SYS_SECCOMP, nr);
    let line = buf.buf.get(..buf.len).unwrap_or(&[]);
    let fds = [
        libc::STDERR_FILENO,
        REPORT_FDS[0].load(Ordering::SeqCst),
        REPORT_FDS[1].load(Ordering::SeqCst),
    ];
    for fd in fds.into_iter().filter(|&fd| fd >= 0) {
        // SAFETY: write(2) with a valid buffer is async-signal-safe; a bad fd only fails.
        let _ = unsafe { libc::write(fd, line.as_ptr().cast(), line.len()) };
    }
    // SAFETY: _exit is async-signal-safe and ends the process without running anything
    // else of it (no destructor, no atexit handler).
    unsafe { libc::_exit(EXIT_STATUS) };
}

/// Installs the process-wide SIGSYS handler (idempotent).
pub fn install_handler() -> Result<(), SeccompError> {
    register_signal_handler(libc::SIGSYS, on_sigsys).map_err(SeccompError::Handler)
}

#[cfg(test)]
mod tests;
