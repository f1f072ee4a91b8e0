//! The I/O bus: maps guest port-I/O or MMIO addresses to devices.
//!
//! vCPU threads call [`Bus::read`]/[`Bus::write`] on every PIO/MMIO exit, so lookups are a
//! `BTreeMap` range search and each device sits behind its own mutex (devices on different
//! addresses never contend). The bus is built before the vCPUs start and is immutable
//! afterwards.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable by port I/O or MMIO.
///
/// `offset` is relative to the start of the range the device was inserted at. `data` is
/// the access as the guest made it (1, 2, 4 or 8 bytes); a device ignores sizes it does
/// not support (reads of such sizes should leave `data` as all-ones or zero).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// An address space of devices: one for port I/O, one for MMIO.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Bus::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let overlaps_prev = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(&b, e)| b + e.len > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then_some((offset, entry))
    }

    /// Dispatches a guest read. Returns false when no device lives at `addr` (the caller
    /// then fills `data` with all-ones, as an unclaimed bus reads on real hardware).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((offset, entry)) = self.resolve(addr) else {
            return false;
        };
        // A poisoned lock means a device panicked earlier; keep serving with its state.
        let mut dev = entry.device.lock().unwrap_or_else(|e| e.into_inner());
        dev.read(offset, data);
        true
    }

    /// Dispatches a guest write. Returns false when no device lives at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((offset, entry)) = self.resolve(addr) else {
            return false;
        };
        let mut dev = entry.device.lock().unwrap_or_else(|e| e.into_inner());
        dev.write(offset, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fa, &mut buf));
        assert_eq!(buf, [2]);
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(a.lock().unwrap().last_write, Some((7, vec![9])));
        assert!(!bus.read(0x400, &mut buf));
        assert!(!bus.write(0x3f7, &[1]));
    }

    #[test]
    fn refuses_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(d(), 0x108, 0x10),
            Err(BusError::Overlap {
                base: 0x108,
                len: 0x10
            })
        );
        assert_eq!(
            bus.insert(d(), 0xf8, 0x10),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10
            })
        );
        assert!(bus.insert(d(), 0x110, 0x10).is_ok());
        assert!(bus.insert(d(), 0xf0, 0x10).is_ok());
        assert_eq!(
            bus.insert(d(), 0x200, 0),
            Err(BusError::BadRange {
                base: 0x200,
                len: 0
            })
        );
        assert_eq!(
            bus.insert(d(), u64::MAX, 2),
            Err(BusError::BadRange {
                base: u64::MAX,
                len: 2
            })
        );
    }
}
