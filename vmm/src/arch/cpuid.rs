//! The CPUID a vCPU sees: KVM's supported set, with our topology and, on a kvm_pvm host,
//! without the features its instruction emulator cannot run.
//!
//! kvm_pvm (docs/kvm-pvm.md in the project's shared docs) runs guest kernel code through an
//! emulator that fails on cmpxchg16b, xrstor, popcnt and friends. Hiding those features
//! makes Linux take its fallback paths; on hardware KVM nothing is hidden.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A feature bit: (leaf, subleaf, register, bit).
#[derive(Debug, Clone, Copy)]
struct Feature(u32, u32, Reg, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Ebx,
    Ecx,
}

/// What kvm_pvm's emulator cannot run, and what depends on it (AVX needs XSAVE).
const PVM_HIDDEN: &[Feature] = &[
    Feature(1, 0, Reg::Ecx, 1),  // pclmulqdq
    Feature(1, 0, Reg::Ecx, 12), // fma
    Feature(1, 0, Reg::Ecx, 13), // cx16 (cmpxchg16b)
    Feature(1, 0, Reg::Ecx, 17), // pcid
    Feature(1, 0, Reg::Ecx, 20), // sse4.2
    Feature(1, 0, Reg::Ecx, 23), // popcnt
    Feature(1, 0, Reg::Ecx, 25), // aes
    Feature(1, 0, Reg::Ecx, 26), // xsave
    Feature(1, 0, Reg::Ecx, 27), // osxsave
    Feature(1, 0, Reg::Ecx, 28), // avx
    Feature(1, 0, Reg::Ecx, 29), // f16c
    Feature(1, 0, Reg::Ecx, 30), // rdrand
    Feature(7, 0, Reg::Ebx, 0),  // fsgsbase
    Feature(7, 0, Reg::Ebx, 5),  // avx2
    Feature(7, 0, Reg::Ebx, 10), // invpcid
    Feature(7, 0, Reg::Ebx, 16), // avx512f
    Feature(7, 0, Reg::Ebx, 18), // rdseed
    Feature(7, 0, Reg::Ebx, 20), // smap
    Feature(7, 0, Reg::Ebx, 29), // sha_ni
    Feature(7, 0, Reg::Ecx, 22), // rdpid
];

const HYPERVISOR_BIT: u32 = 1 << 31;
const HTT_BIT: u32 = 1 << 28;

/// Is this host's /dev/kvm served by kvm_pvm?
pub fn host_is_kvm_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
    }
}

/// Adjusts KVM's supported CPUID for vCPU `cpu_id` of `cpu_count`.
pub fn filter(cpuid: &mut CpuId, cpu_id: u8, cpu_count: u8, hide_for_pvm: bool) {
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                // Initial APIC id, logical processor count, HTT when more than one.
                e.ebx = (e.ebx & 0x0000_ffff)
                    | (u32::from(cpu_id) << 24)
                    | (u32::from(cpu_count) << 16);
                if cpu_count > 1 {
                    e.edx |= HTT_BIT;
                } else {
                    e.edx &= !HTT_BIT;
                }
                e.ecx |= HYPERVISOR_BIT;
            }
            // Extended topology: every subleaf reports this vCPU's x2APIC id.
            0xb | 0x1f => e.edx = u32::from(cpu_id),
            _ => {}
        }
        if hide_for_pvm {
            let (function, index) = (e.function, e.index);
            for f in PVM_HIDDEN
                .iter()
                .filter(|f| f.0 == function && f.1 == index)
            {
                *reg_mut(e, f.2) &= !(1 << f.3);
            }
            if e.function == 0xd {
                // No XSAVE: no XSAVE state components.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    fn cpuid() -> CpuId {
        CpuId::from_entries(&[entry(1, 0), entry(7, 0), entry(0xb, 0), entry(0xd, 0)]).unwrap()
    }

    #[test]
    fn topology_and_hypervisor_bit() {
        let mut c = cpuid();
        filter(&mut c, 3, 4, false);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & HYPERVISOR_BIT, 0);
        assert_eq!(e[2].edx, 3);
        // Nothing hidden on hardware KVM.
        assert_eq!(e[0].ecx & (1 << 13), 1 << 13);
        assert_eq!(e[3].eax, !0);
    }

    #[test]
    fn pvm_hides_what_the_emulator_cannot_run() {
        let mut c = cpuid();
        filter(&mut c, 0, 1, true);
        let e = c.as_slice();
        for bit in [1, 13, 17, 20, 23, 25, 26, 28, 30] {
            assert_eq!(e[0].ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        for bit in [0, 10, 18, 20, 29] {
            assert_eq!(e[1].ebx & (1 << bit), 0, "leaf 7 ebx bit {bit}");
        }
        assert_eq!(e[1].ecx & (1 << 22), 0);
        assert_eq!(e[3].eax, 0);
        assert_eq!(e[0].edx & HTT_BIT, 0);
    }
}
