//! Legacy x86 platform devices: on the port-I/O bus, and the IOAPIC on the MMIO bus.
//!
//! All of them run on vCPU threads (inside [`crate::bus::Bus`] dispatch), except the
//! serial console's input side, which the VMM thread feeds from the host. There is no PIC
//! and no PIT (see [`ioapic`]).
//!
//! | port       | device                                      |
//! |------------|---------------------------------------------|
//! | 0x60, 0x64 | [`i8042::I8042`]: keyboard controller, reset |
//! | 0x3f8–0x3ff| [`serial::SerialConsole`]: COM1              |
//! | 0x440      | [`platform::BootTimer`]                      |
//! | 0x444      | [`platform::ExitPort`]                       |
//! | MMIO 0xfec0_0000 | [`ioapic::Ioapic`]: the I/O APIC (split irqchip) |

pub mod i8042;
pub mod ioapic;
pub mod platform;
pub mod serial;

/// Why the guest asked the platform to end the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformExit {
    /// CPU reset through the keyboard controller (reboot, or `panic=-1` with `reboot=k`).
    Reset,
    /// The guest wrote its exit status to the exit port.
    Exit(u8),
}

/// Called (on a vCPU thread) when the guest asks to end the VM. Must not block.
pub type ExitHook = std::sync::Arc<dyn Fn(PlatformExit) + Send + Sync>;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
pub const I8042_IRQ: u32 = 1;
pub const BOOT_TIMER_PORT: u64 = 0x440;
pub const EXIT_PORT: u64 = 0x444;
