//! kestrel's two paravirtual platform ports.
//!
//! * [`BootTimer`] (port 0x440): the guest writes [`BOOT_TIMER_MAGIC`] once when its init
//!   starts; the VMM logs the time since its own process started (like Firecracker's
//!   boot-timer device). Later writes are ignored.
//! * [`ExitPort`] (port 0x444): a one-byte write ends the VM with that exit status. The
//!   guest agent uses it to power off with a status; without ACPI a Linux guest has no
//!   other way to say "power off" to the VMM.
//!
//! Both run on the vCPU thread that made the access.

use std::time::{Duration, Instant};

use super::{ExitHook, PlatformExit};
use crate::bus::BusDevice;

/// The value a guest writes to the boot-timer port.
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// Records the first time the guest signals "init started".
pub struct BootTimer {
    start: Instant,
    on_boot: Option<Box<dyn FnOnce(Duration) + Send>>,
}

impl BootTimer {
    /// `start` is the VMM process's start; `on_boot` receives the elapsed time once.
    pub fn new(start: Instant, on_boot: Box<dyn FnOnce(Duration) + Send>) -> Self {
        BootTimer {
            start,
            on_boot: Some(on_boot),
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_TIMER_MAGIC) {
            if let Some(cb) = self.on_boot.take() {
                cb(self.start.elapsed());
            }
        }
    }
}

/// Ends the VM with the status byte the guest writes.
pub struct ExitPort {
    hook: ExitHook,
}

impl ExitPort {
    pub fn new(hook: ExitHook) -> Self {
        ExitPort { hook }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, Some(&status)) = (offset, data.first()) {
            (self.hook)(PlatformExit::Exit(status));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn boot_timer_fires_once_on_magic() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut t = BootTimer::new(Instant::now(), Box::new(move |d| s.lock().unwrap().push(d)));
        t.write(0, &[1]);
        assert!(seen.lock().unwrap().is_empty());
        t.write(0, &[BOOT_TIMER_MAGIC]);
        t.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn exit_port_reports_status() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut p = ExitPort::new(Arc::new(move |e| s.lock().unwrap().push(e)));
        p.write(0, &[7]);
        p.write(1, &[9]);
        p.write(0, &[]);
        assert_eq!(*seen.lock().unwrap(), vec![PlatformExit::Exit(7)]);
    }
}
