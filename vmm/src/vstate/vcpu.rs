//! A virtual CPU: its initial state, and the loop that runs it on its own thread.
//!
//! The loop dispatches port-I/O and MMIO exits to the device buses and turns terminal exits
//! (triple fault, internal error…) into a [`VmExit`]. To stop a vCPU that sits in `KVM_RUN`
//! (a halted guest CPU never exits on its own), the VMM thread sends it [`kick_signal`]; the
//! handler sets `immediate_exit` in the vCPU's `kvm_run` page, so even a signal that lands
//! just before `KVM_RUN` makes it return at once. No timeouts, no polling.

use std::cell::Cell;
use std::ptr;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use kvm_bindings::{
    kvm_run, CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::regs::{self, EntryProtocol};
use crate::exit::{ExitState, VmExit};
use crate::seccomp::{Filters, SeccompError, ThreadKind};
use devices::bus::Bus;
use devices::thread::{spawn_confined, SpawnError};

/// Errors configuring or starting a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot {what} of vCPU {id}")]
    Kvm {
        what: &'static str,
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start the thread of vCPU {0}")]
    Spawn(u8, #[source] SpawnError<SeccompError>),
}

/// The real-time signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    // The running vCPU's kvm_run page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: `run` is this thread's kvm_run mapping, set by `Vcpu::run_loop` before
            // the first KVM_RUN and cleared before the VcpuFd (and so the mapping) is
            // dropped. Writing one byte is async-signal-safe.
            unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 1) };
        }
    });
}

/// Installs the kick handler (process-wide; idempotent).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal)
}

/// Bits of the local APIC state for LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// One vCPU, before it runs.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    pub(super) fn new(id: u8, fd: VcpuFd) -> Self {
        Vcpu { id, fd }
    }

    fn kvm_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError + '_ {
        move |source| VcpuError::Kvm {
            what,
            id: self.id,
            source,
        }
    }

    /// Sets CPUID, MSRs, FPU and LAPIC; for the boot CPU also the entry registers.
    /// Application processors wait for INIT/SIPI from the guest (in-kernel LAPIC).
    pub fn configure(
        &self,
        cpuid: &CpuId,
        boot: Option<(u64, EntryProtocol)>,
    ) -> Result<(), VcpuError> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(self.kvm_err("set the CPUID"))?;
        let entries = regs::boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Kvm {
            what: "build the MSR list",
            id: self.id,
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.kvm_err("set the boot MSRs"))?;
        if set != entries.len() {
            let missing = entries.get(set).map(|e| e.index).unwrap_or_default();
            log::debug!(
                "vCPU {}: KVM set {set} of {} boot MSRs (stopped at {missing:#x})",
                self.id,
                entries.len()
            );
        }
        self.fd
            .set_fpu(&regs::fpu())
            .map_err(self.kvm_err("set the FPU state"))?;
        self.set_lint()?;
        if let Some((entry, protocol)) = boot {
            let sregs = self
                .fd
                .get_sregs()
                .map_err(self.kvm_err("read the special registers"))?;
            self.fd
                .set_sregs(&regs::sregs(sregs, protocol))
                .map_err(self.kvm_err("set the special registers"))?;
            self.fd
                .set_regs(&regs::regs(entry, protocol))
                .map_err(self.kvm_err("set the registers"))?;
        }
        Ok(())
    }

    fn set_lint(&self) -> Result<(), VcpuError> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(self.kvm_err("read the LAPIC"))?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let Some(bytes) = lapic.regs.get_mut(reg..reg + 4) else {
                continue;
            };
            let mut raw = [0u8; 4];
            for (d, s) in raw.iter_mut().zip(bytes.iter()) {
                *d = *s as u8;
            }
            let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
            for (d, s) in bytes.iter_mut().zip(v.to_le_bytes()) {
                *d = s as libc::c_char;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(self.kvm_err("set the LAPIC"))
    }

    /// Starts the vCPU on its own thread, confined by `filters` before its first `KVM_RUN`.
    pub fn start(
        self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitState>,
        filters: &Filters,
    ) -> Result<VcpuThread, VcpuError> {
        let id = self.id;
        let builder = thread::Builder::new()
            .name(format!("vcpu{id}"))
            .stack_size(256 << 10);
        let confine = filters.confine(ThreadKind::Vcpu, u16::from(id));
        let handle = spawn_confined(builder, confine, move || self.run_loop(&pio, &mmio, &exit))
            .map_err(|e| VcpuError::Spawn(id, e))?;
        Ok(VcpuThread { handle })
    }

    fn run_loop(mut self, pio: &Bus, mmio: &Bus, exit: &ExitState) {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|p| p.set(run));
        while !exit.stopping() {
            let reason = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    None
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    pio.write(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    mmio.write(addr, data);
                    None
                }
                // EOI of a level-triggered IOAPIC route. Pins are pulsed (irqfds), so no
                // line is still asserted and there is no remote IRR to clear.
                Ok(VcpuExit::IoapicEoi(_)) => None,
                Ok(VcpuExit::Shutdown) => Some(VmExit::TripleFault),
                Ok(VcpuExit::Hlt) => Some(VmExit::Crashed(format!(
                    "vCPU {} halted without an in-kernel local APIC",
                    self.id
                ))),
                Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                    KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Exited(0),
                    KVM_SYSTEM_EVENT_CRASH => VmExit::Crashed("the guest reported a crash".into()),
                    other => VmExit::Crashed(format!("unknown system event {other}")),
                }),
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::Crashed(format!(
                    "KVM could not enter vCPU {} (hardware reason {reason:#x}, host cpu {cpu})",
                    self.id
                ))),
                Ok(VcpuExit::InternalError) => {
                    let detail = self.internal_error_detail();
                    Some(VmExit::Crashed(format!(
                        "KVM internal error on vCPU {}: {detail}",
                        self.id
                    )))
                }
                Ok(other) => Some(VmExit::Crashed(format!(
                    "unexpected exit on vCPU {}: {other:?}",
                    self.id
                ))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                Err(e) => Some(VmExit::Crashed(format!(
                    "KVM_RUN failed on vCPU {}: {e}",
                    self.id
                ))),
            };
            if let Some(reason) = reason {
                exit.request(reason);
            }
        }
        KVM_RUN.with(|p| p.set(ptr::null_mut()));
    }

    fn internal_error_detail(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the exit union is
        // the one KVM filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal
            .data
            .iter()
            .take(n)
            .map(|d| format!("{d:#x}"))
            .collect();
        let what = match internal.suberror {
            1 => "emulation failure",
            2 => "simultaneous exception",
            3 => "delivery event",
            _ => "other",
        };
        format!(
            "suberror {} ({what}), data [{}]",
            internal.suberror,
            data.join(", ")
        )
    }
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: JoinHandle<()>,
}

impl VcpuThread {
    /// Kicks the vCPU out of `KVM_RUN`; the caller has already set the stop flag.
    pub fn kick(&self) {
        if !self.handle.is_finished() {
            // ESRCH only means the thread has just ended.
            let _ = self.handle.kill(kick_signal());
        }
    }

    /// Waits for the thread to leave its loop.
    pub fn join(self) {
        if self.handle.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}
