//! Initial vCPU register state for the two entry protocols we boot with.
//!
//! * PVH: 32-bit protected mode, paging off, `ebx` = hvm_start_info.
//! * Linux 64-bit boot protocol: long mode with an identity map of the first GiB, `rsi` =
//!   zero page.
//!
//! Pure functions producing kvm-bindings structs, plus the guest-memory pieces they rely on
//! (GDT, page tables); the `vstate` module hands them to KVM.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    BOOT_STACK_ADDR, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, PVH_INFO_ADDR,
    ZERO_PAGE_ADDR,
};

/// Which entry protocol the kernel is started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryProtocol {
    /// PVH entry point from the ELF note.
    Pvh,
    /// 64-bit Linux boot protocol (bzImage, or an ELF vmlinux without a PVH note).
    Linux64,
}

/// Errors writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the {0} into guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// GDT entries (flags, base, limit) in the packed descriptor format.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment(entry: u64, index: u8) -> kvm_segment {
    let bit = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: {
            let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
            if bit(55, 1) == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: u16::from(index) * 8,
        type_: bit(40, 0xf),
        present: bit(47, 1),
        dpl: bit(45, 0x3),
        db: bit(54, 1),
        s: bit(44, 1),
        l: bit(53, 1),
        g: bit(55, 1),
        avl: bit(52, 1),
        unusable: if bit(47, 1) == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// The GDT for `protocol`: null, code, data, TSS.
fn gdt(protocol: EntryProtocol) -> [u64; 4] {
    let code = match protocol {
        EntryProtocol::Pvh => gdt_entry(0xc09b, 0, 0xfffff), // 32-bit, 4 GiB
        EntryProtocol::Linux64 => gdt_entry(0xa09b, 0, 0xfffff), // 64-bit
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Writes the GDT, an empty IDT and (for 64-bit entry) identity-mapping page tables.
pub fn write_boot_tables(mem: &GuestMemoryMmap, protocol: EntryProtocol) -> Result<(), RegsError> {
    let w = |what, addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| RegsError::Write(what, e))
    };
    for (i, e) in gdt(protocol).iter().enumerate() {
        w("GDT", GDT_ADDR + 8 * i as u64, *e)?;
    }
    w("IDT", IDT_ADDR, 0)?;
    if protocol == EntryProtocol::Linux64 {
        // PML4[0] → PDPT, PDPT[0] → PD, PD: 512 × 2 MiB pages (first GiB).
        w("page tables", PML4_ADDR, PDPT_ADDR | 0x03)?;
        w("page tables", PDPT_ADDR, PD_ADDR | 0x03)?;
        for i in 0..512u64 {
            w("page tables", PD_ADDR + i * 8, (i << 21) | 0x83)?;
        }
    }
    Ok(())
}

/// Special registers for `protocol`, starting from the vCPU's current `sregs`.
pub fn sregs(mut sregs: kvm_sregs, protocol: EntryProtocol) -> kvm_sregs {
    let table = gdt(protocol);
    let code = segment(table[1], 1);
    let data = segment(table[2], 2);
    let tss = segment(table[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match protocol {
        EntryProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryProtocol::Linux64 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// General registers at the kernel entry point.
pub fn regs(entry: u64, protocol: EntryProtocol) -> kvm_regs {
    let mut r = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match protocol {
        EntryProtocol::Pvh => r.rbx = PVH_INFO_ADDR,
        EntryProtocol::Linux64 => {
            r.rsp = BOOT_STACK_ADDR;
            r.rbp = BOOT_STACK_ADDR;
            r.rsi = ZERO_PAGE_ADDR;
        }
    }
    r
}

/// x87 and SSE control words as after FNINIT / reset.
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The MSRs a freshly reset CPU would have, plus write-back memory by default.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let c = segment(gdt(EntryProtocol::Linux64)[1], 1);
        assert_eq!(
            (c.l, c.db, c.present, c.type_, c.selector),
            (1, 0, 1, 0xb, 8)
        );
        assert_eq!(c.limit, 0xffff_ffff);
        let c32 = segment(gdt(EntryProtocol::Pvh)[1], 1);
        assert_eq!((c32.l, c32.db, c32.g), (0, 1, 1));
        let d = segment(gdt(EntryProtocol::Pvh)[2], 2);
        assert_eq!((d.type_, d.selector, d.s), (3, 16, 1));
    }

    #[test]
    fn entry_registers() {
        let r = regs(0x100_0000, EntryProtocol::Pvh);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0000, PVH_INFO_ADDR, 2));
        let r = regs(0x20_0200, EntryProtocol::Linux64);
        assert_eq!((r.rsi, r.rsp), (ZERO_PAGE_ADDR, BOOT_STACK_ADDR));
        let s = sregs(kvm_sregs::default(), EntryProtocol::Linux64);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
        let s = sregs(kvm_sregs::default(), EntryProtocol::Pvh);
        assert_eq!((s.cr0 & X86_CR0_PG, s.efer), (0, 0));
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem, EntryProtocol::Linux64).unwrap();
        let pd_last: u64 = mem.read_obj(GuestAddress(PD_ADDR + 511 * 8)).unwrap();
        assert_eq!(pd_last, (511 << 21) | 0x83);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
    }
}
