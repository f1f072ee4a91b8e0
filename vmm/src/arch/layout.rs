//! The guest physical memory map (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT                         0x0000_9000  PML4 (64-bit Linux boot)
//! 0x0000_0520  IDT                         0x0000_a000  PDPT
//! 0x0000_6000  PVH hvm_start_info          0x0000_b000  PD (identity map, first 1 GiB)
//! 0x0000_6040  PVH memory map              0x0002_0000  kernel command line
//! 0x0000_7000  Linux zero page             0x0009_fc00  EBDA: MP table
//! 0x0000_8ff0  boot stack (grows down)     0x0010_0000  kernel (bzImage; ELF at its paddr)
//!                                          …            RAM
//! 0xd000_0000  MMIO: virtio-mmio devices, 4 KiB each, up to the IOAPIC/LAPIC at 0xfec0_0000
//! 0x1_0000_0000  RAM above 4 GiB when the guest has more than MMIO_GAP_START of memory
//! ```
//! The initramfs is placed page-aligned at the top of RAM below the MMIO gap.

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Linux's x86 COMMAND_LINE_SIZE.
pub const CMDLINE_MAX_SIZE: usize = 2048;
pub const EBDA_START: u64 = 0x9fc00;
pub const HIMEM_START: u64 = 0x10_0000;

pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio windows are allocated from here, one page each.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS on Intel hosts, just below the BIOS area.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// First IRQ line given to virtio-mmio devices; 0–4 are legacy (timer, keyboard, COM1).
pub const VIRTIO_IRQ_START: u32 = 5;
/// Last IOAPIC pin (24 pins).
pub const IRQ_MAX: u32 = 23;

/// The guest RAM regions for `mem_size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_the_mmio_gap() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
