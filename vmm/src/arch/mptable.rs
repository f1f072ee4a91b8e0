//! The Intel MultiProcessor table (spec 1.4): how a Linux guest without ACPI learns its
//! CPUs, the IOAPIC and how ISA IRQs are routed. Built as bytes and written into the EBDA.

use super::layout::{IOAPIC_ADDR, IRQ_MAX, LAPIC_ADDR};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT: u8 = 2;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// CPU signature (family 6) and feature flags (FPU, APIC) as a BIOS would report them.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

/// The most vCPUs an MP table describes here: APIC ids are one byte and the IOAPIC takes
/// the id after the last CPU.
pub const MAX_CPUS: u8 = 254;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit an MP table (1 to {MAX_CPUS})")]
    TooManyCpus(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer structure followed by the configuration table, for a
/// table placed at guest physical address `addr`.
pub fn build(addr: u64, num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;

    for id in 0..num_cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOT } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The IOAPIC.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n → IOAPIC pin n, conforming polarity and trigger; IRQ 0 as ExtINT.
    for irq in 0..=IRQ_MAX as u8 {
        let kind = if irq == 0 { MP_IRQ_EXTINT } else { MP_IRQ_INT };
        entries.extend_from_slice(&[3, kind, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 = ExtINT, LINT1 = NMI on every local APIC.
    entries.extend_from_slice(&[4, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"KESTREL ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    let sum = checksum(&table);
    if let Some(c) = table.get_mut(7) {
        *c = sum;
    }

    let mut out = Vec::with_capacity(FLOATING_LEN + table_len);
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&((addr + FLOATING_LEN as u64) as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(4); // spec revision
    out.push(0); // checksum, below
    out.extend_from_slice(&[0u8; 5]); // feature bytes: no default configuration, no IMCR
    let sum = checksum(&out);
    if let Some(c) = out.get_mut(10) {
        *c = sum;
    }
    out.extend_from_slice(&table);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_cpu_entries() {
        let t = build(0x9fc00, 8).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
        assert_eq!(ptr, 0x9fc00 + 16);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 8 + 1 + 1 + 24 + 2);
        // The first entry is the boot processor with APIC id 0; the eighth is id 7.
        assert_eq!(
            &table[44..48],
            &[0, 0, APIC_VERSION, CPU_ENABLED | CPU_BOOT]
        );
        assert_eq!(
            &table[44 + 7 * 20..44 + 7 * 20 + 4],
            &[0, 7, APIC_VERSION, CPU_ENABLED]
        );
    }

    #[test]
    fn refuses_zero_and_too_many_cpus() {
        assert_eq!(build(0, 0), Err(MpTableError::TooManyCpus(0)));
        assert_eq!(build(0, 255), Err(MpTableError::TooManyCpus(255)));
        assert!(build(0, MAX_CPUS).is_ok());
    }
}
