//! How a VM ends, and the shared state through which vCPU threads, devices and the host
//! ask it to end.
//!
//! The first reason recorded wins. Recording one sets the stop flag every vCPU checks
//! before re-entering the guest and wakes the VMM thread through an `EventFd`; the VMM
//! thread then kicks the remaining vCPUs out of `KVM_RUN`, joins them and reports.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote this status to kestrel's exit port (a power-off with a status).
    Exited(u8),
    /// The guest reset the machine: a reboot, or a kernel panic with `panic=-1`.
    Reset,
    /// A triple fault: the guest's CPU state became unrecoverable.
    TripleFault,
    /// KVM could not run the guest any further (emulation failure, failed entry…).
    Crashed(String),
    /// The host stopped the VM.
    Stopped,
}

impl VmExit {
    /// The process exit status this end maps to (a shell-style status for the CLI and the
    /// containerd task).
    pub fn status(&self) -> i32 {
        match self {
            VmExit::Exited(s) => i32::from(*s),
            VmExit::Reset => 0,
            VmExit::Stopped => 137,
            VmExit::TripleFault | VmExit::Crashed(_) => 125,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Exited(s) => write!(f, "the guest powered off with status {s}"),
            VmExit::Reset => write!(f, "the guest reset (reboot or kernel panic)"),
            VmExit::TripleFault => write!(f, "the guest triple-faulted"),
            VmExit::Crashed(why) => write!(f, "the VM crashed: {why}"),
            VmExit::Stopped => write!(f, "the VM was stopped by the host"),
        }
    }
}

/// Shared between vCPU threads, exit-requesting devices and the VMM thread.
pub struct ExitState {
    reason: Mutex<Option<VmExit>>,
    stop: AtomicBool,
    evt: EventFd,
}

impl ExitState {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitState {
            reason: Mutex::new(None),
            stop: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless another one came first, and wakes the VMM thread.
    pub fn request(&self, reason: VmExit) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot wake the VMM thread for a VM exit: {e}");
        }
    }

    /// True once the VM must stop; checked by vCPUs before every `KVM_RUN`.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Readable once an exit was requested.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let s = ExitState::new().unwrap();
        assert!(!s.stopping());
        s.request(VmExit::Exited(3));
        s.request(VmExit::Reset);
        assert!(s.stopping());
        assert_eq!(s.reason(), Some(VmExit::Exited(3)));
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn statuses() {
        assert_eq!(VmExit::Exited(42).status(), 42);
        assert_eq!(VmExit::Reset.status(), 0);
        assert_eq!(VmExit::TripleFault.status(), 125);
    }
}
