//! The I/O APIC, in userspace: KVM's *split irqchip*. The local APICs stay in the kernel;
//! the IOAPIC is this register model on the MMIO bus; there is no 8259 PIC and no 8254 PIT
//! (Linux finds no PIC, uses its NULL legacy PIC, and times with the LAPIC's TSC-deadline
//! timer and kvmclock, as under Cloud Hypervisor). A VM without the in-kernel PIC, IOAPIC
//! and PIT is destroyed in well under a millisecond, where the kernel's own irqchip and PIT
//! cost 20 ms of SRCU grace periods at exit.
//!
//! Devices raise a pin by writing an irqfd bound to GSI = pin. The guest programs each
//! pin's redirection entry here; every change to the set of unmasked entries is pushed to
//! KVM as the whole GSI routing table ([`MsiRouting`]), one MSI route per unmasked pin, so
//! an irqfd write reaches the LAPIC without leaving the kernel. Pins are pulsed (the irqfd
//! asserts and deasserts at once), so a pulse on a masked pin is lost, as with KVM's own
//! IOAPIC for edge-triggered pins; there is no remote IRR to clear at EOI, and level entries
//! read back with remote IRR and delivery status clear.
//!
//! Registers (Intel 82093AA, version 0x11): IOREGSEL at offset 0x00, IOWIN at 0x10; index 0
//! the id, 1 the version and last entry, 2 the arbitration id, 0x10 + 2n / 0x11 + 2n the low
//! and high halves of entry n.
//!
//! Runs on vCPU threads (MMIO exits), serialised by the bus's mutex; it holds no lock of
//! its own and blocks only on the routing ioctl.

use crate::bus::BusDevice;

/// Pins (GSIs 0..23), as the MP table describes them.
pub const IOAPIC_PINS: usize = 24;
/// The size of its MMIO window.
pub const IOAPIC_MMIO_LEN: u64 = 0x1000;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;

const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_TABLE: u8 = 0x10;
const VERSION: u32 = 0x11;

const ENTRY_MASKED: u64 = 1 << 16;
/// Delivery status (bit 12) and remote IRR (bit 14) are read-only and always clear here.
const ENTRY_READ_ONLY: u64 = (1 << 12) | (1 << 14);
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;

/// What the LAPICs receive when a pin fires: an MSI address and data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Where the IOAPIC's routes go: KVM's GSI routing table in the VMM, a recorder in tests.
pub trait MsiRouting: Send {
    /// Replaces the whole table with `routes`: (GSI, message) for every unmasked pin.
    fn set_routes(&mut self, routes: &[(u32, MsiMessage)]) -> std::io::Result<()>;
}

/// The MSI a redirection entry stands for: vector (bits 0–7), delivery mode (8–10),
/// destination mode (11) and trigger mode (15) keep their places in the MSI data and
/// address; the destination (bits 56–63) becomes the address's destination id.
fn message(entry: u64) -> MsiMessage {
    let dest = (entry >> 56) & 0xff;
    let dest_mode = (entry >> 11) & 1;
    let data = (entry & 0xff) | (entry & (0x7 << 8)) | (entry & (1 << 15));
    MsiMessage {
        address: MSI_ADDRESS_BASE | (dest << 12) | (dest_mode << 2),
        data: data as u32,
    }
}

/// Entry register `index` → (pin, is the high half).
fn entry_half(index: u8) -> Option<(usize, bool)> {
    let n = usize::from(index.checked_sub(REG_TABLE)?);
    (n / 2 < IOAPIC_PINS).then_some((n / 2, n % 2 == 1))
}

/// The userspace IOAPIC.
pub struct Ioapic {
    id: u8,
    select: u8,
    entries: [u64; IOAPIC_PINS],
    /// What KVM holds now (empty at start: every pin masked).
    routes: Vec<(u32, MsiMessage)>,
    router: Box<dyn MsiRouting>,
    route_error_logged: bool,
}

impl Ioapic {
    /// An IOAPIC with APIC id `id` (the MP table's), every pin masked.
    pub fn new(id: u8, router: Box<dyn MsiRouting>) -> Self {
        Ioapic {
            id: id & 0xf,
            select: 0,
            entries: [ENTRY_MASKED; IOAPIC_PINS],
            routes: Vec::new(),
            router,
            route_error_logged: false,
        }
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID | REG_ARBITRATION => u32::from(self.id) << 24,
            REG_VERSION => VERSION | ((IOAPIC_PINS as u32 - 1) << 16),
            index => match entry_half(index) {
                Some((pin, high)) => {
                    let e = self.entries.get(pin).copied().unwrap_or(ENTRY_MASKED);
                    if high {
                        (e >> 32) as u32
                    } else {
                        e as u32
                    }
                }
                None => 0,
            },
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = ((value >> 24) & 0xf) as u8,
            index => {
                // Version, arbitration and unused indices are read-only.
                let Some((pin, high)) = entry_half(index) else {
                    return;
                };
                let Some(e) = self.entries.get_mut(pin) else {
                    return;
                };
                *e = if high {
                    (*e & 0xffff_ffff) | (u64::from(value) << 32)
                } else {
                    (*e & !0xffff_ffff) | u64::from(value)
                } & !ENTRY_READ_ONLY;
                self.update_routes();
            }
        }
    }

    /// Pushes the routes of the unmasked pins to KVM when they changed.
    fn update_routes(&mut self) {
        let routes: Vec<(u32, MsiMessage)> = (0u32..)
            .zip(self.entries.iter())
            .filter(|(_, e)| *e & ENTRY_MASKED == 0)
            .map(|(gsi, &e)| (gsi, message(e)))
            .collect();
        if routes == self.routes {
            return;
        }
        match self.router.set_routes(&routes) {
            Ok(()) => self.routes = routes,
            // Kept as it was: the next entry write tries again.
            Err(e) if !self.route_error_logged => {
                self.route_error_logged = true;
                log::error!("IOAPIC: cannot set the interrupt routes: {e}");
            }
            Err(_) => {}
        }
    }
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            IOREGSEL => u32::from(self.select),
            IOWIN if data.len() == 4 => self.read_register(),
            _ => 0,
        };
        data.fill(0);
        for (d, s) in data.iter_mut().zip(value.to_le_bytes()) {
            *d = s;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (IOREGSEL, [select, ..]) => self.select = *select,
            (IOWIN, &[a, b, c, d]) => self.write_register(u32::from_le_bytes([a, b, c, d])),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<Vec<(u32, MsiMessage)>>>>;

    struct Recorder(Log);

    impl MsiRouting for Recorder {
        fn set_routes(&mut self, routes: &[(u32, MsiMessage)]) -> std::io::Result<()> {
            self.0.lock().unwrap().push(routes.to_vec());
            Ok(())
        }
    }

    fn ioapic() -> (Ioapic, Log) {
        let log = Log::default();
        (Ioapic::new(1, Box::new(Recorder(log.clone()))), log)
    }

    fn write_reg(io: &mut Ioapic, index: u8, value: u32) {
        io.write(IOREGSEL, &[index]);
        io.write(IOWIN, &value.to_le_bytes());
    }

    fn read_reg(io: &mut Ioapic, index: u8) -> u32 {
        io.write(IOREGSEL, &[index]);
        let mut b = [0u8; 4];
        io.read(IOWIN, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn id_version_and_masked_entries_at_reset() {
        let (mut io, log) = ioapic();
        assert_eq!(read_reg(&mut io, REG_ID), 1 << 24);
        assert_eq!(read_reg(&mut io, REG_ARBITRATION), 1 << 24);
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0011);
        for pin in 0..IOAPIC_PINS as u8 {
            assert_eq!(read_reg(&mut io, REG_TABLE + 2 * pin), 1 << 16);
            assert_eq!(read_reg(&mut io, REG_TABLE + 2 * pin + 1), 0);
        }
        assert_eq!(read_reg(&mut io, 0x40), 0, "past the table");
        write_reg(&mut io, REG_VERSION, 0);
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0011, "read-only");
        write_reg(&mut io, REG_ID, 5 << 24);
        assert_eq!(read_reg(&mut io, REG_ID), 5 << 24);
        assert!(
            log.lock().unwrap().is_empty(),
            "nothing routed while all masked"
        );
    }

    #[test]
    fn an_unmasked_entry_becomes_an_msi_route_and_masking_removes_it() {
        let (mut io, log) = ioapic();
        // Pin 5: destination APIC 3 (physical), vector 0x31, fixed, edge — written as Linux
        // does, high half first.
        write_reg(&mut io, REG_TABLE + 11, 3 << 24);
        assert!(log.lock().unwrap().is_empty(), "still masked");
        write_reg(&mut io, REG_TABLE + 10, 0x31);
        // Pin 9: logical destination 0x01, vector 0x41, lowest priority, level.
        write_reg(&mut io, REG_TABLE + 19, 1 << 24);
        write_reg(
            &mut io,
            REG_TABLE + 18,
            0x41 | (1 << 8) | (1 << 11) | (1 << 15),
        );
        // Masking pin 5 again.
        write_reg(&mut io, REG_TABLE + 10, 0x31 | (1 << 16));
        let pin5 = (
            5,
            MsiMessage {
                address: 0xfee0_3000,
                data: 0x31,
            },
        );
        let pin9 = (
            9,
            MsiMessage {
                address: 0xfee0_1004,
                data: 0x8141,
            },
        );
        assert_eq!(
            *log.lock().unwrap(),
            vec![vec![pin5], vec![pin5, pin9], vec![pin9]]
        );
        assert_eq!(read_reg(&mut io, REG_TABLE + 18), 0x8941);
        assert_eq!(read_reg(&mut io, REG_TABLE + 19), 1 << 24);
    }

    #[test]
    fn read_only_bits_and_unchanged_routes_are_not_pushed() {
        let (mut io, log) = ioapic();
        write_reg(&mut io, REG_TABLE + 8, 0x30 | (1 << 12) | (1 << 14));
        assert_eq!(
            read_reg(&mut io, REG_TABLE + 8),
            0x30,
            "status bits read clear"
        );
        write_reg(&mut io, REG_TABLE + 8, 0x30);
        // Rewriting a masked entry, or the same route, changes nothing in KVM.
        write_reg(&mut io, REG_TABLE + 2, 0x20 | (1 << 16));
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (mut io, log) = ioapic();
        io.write(IOREGSEL, &[REG_TABLE]);
        io.write(IOWIN, &[0x30]); // a 1-byte window write
        io.write(IOWIN, &[0x30, 0, 0, 0, 0, 0, 0, 0]); // 8 bytes
        io.write(0x20, &[0x30, 0, 0, 0]);
        io.write(IOREGSEL, &[]);
        let mut b = [0xaau8; 2];
        io.read(IOWIN, &mut b);
        assert_eq!(b, [0, 0]);
        io.write(IOREGSEL, &[0xff]);
        let mut b = [0u8; 4];
        io.read(IOREGSEL, &mut b);
        assert_eq!(b, [0xff, 0, 0, 0]);
        io.read(IOWIN, &mut b);
        assert_eq!(b, [0; 4]);
        assert!(log.lock().unwrap().is_empty());
        assert_eq!(read_reg(&mut io, REG_TABLE), 1 << 16);
    }

    struct Failing(Arc<Mutex<u32>>);

    impl MsiRouting for Failing {
        fn set_routes(&mut self, _: &[(u32, MsiMessage)]) -> std::io::Result<()> {
            *self.0.lock().unwrap() += 1;
            Err(std::io::Error::from_raw_os_error(libc::ENOMEM))
        }
    }

    #[test]
    fn a_failed_push_is_retried_on_the_next_write() {
        let calls = Arc::new(Mutex::new(0));
        let mut io = Ioapic::new(0, Box::new(Failing(calls.clone())));
        write_reg(&mut io, REG_TABLE, 0x30);
        write_reg(&mut io, REG_TABLE + 1, 0);
        assert_eq!(*calls.lock().unwrap(), 2);
    }
}
