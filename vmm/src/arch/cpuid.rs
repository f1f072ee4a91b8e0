//! The CPUID a vCPU sees: KVM's supported set with our topology, and the kvm_pvm quirk.
//!
//! kvm_pvm (docs/kvm-pvm.md in the project's shared docs) runs guest kernel code through an
//! instruction emulator that fails on cmpxchg16b, xrstor, popcnt and friends. Measured on
//! such a host: kvm_pvm does **not** honour feature bits cleared in KVM_SET_CPUID2 (leaf 1
//! ECX and leaf 7 still show xsave, popcnt, fsgsbase… to the guest, with kestrel and with
//! qemu's `-cpu host,-xsave,…` alike), while the topology fields are honoured. So on kvm_pvm
//! the VMM tells the guest kernel on its command line ([`PVM_KERNEL_PARAMS`]) to treat
//! those features as absent; Linux then takes its fallback paths. On hardware KVM nothing
//! is hidden and the command line is untouched.

use kvm_bindings::CpuId;

/// Kernel parameters that clear, in the guest kernel, the CPU features kvm_pvm's emulator
/// cannot run. `noxsave` also clears what depends on XSAVE (AVX, AVX2, AVX-512, FMA, F16C);
/// `clearcpuid` takes Linux's capability numbers (word × 32 + bit; names need
/// `CONFIG_X86_FEATURE_NAMES`): pclmulqdq 4*32+1, cx16 4*32+13, pcid 4*32+17, sse4_2 4*32+20,
/// popcnt 4*32+23, aes 4*32+25, rdrand 4*32+30, fsgsbase 9*32+0, invpcid 9*32+10, rdseed
/// 9*32+18, smap 9*32+20, sha_ni 9*32+29, rdpid 16*32+22. Linux reads at most 127
/// characters of the `clearcpuid` value.
pub const PVM_KERNEL_PARAMS: &str =
    "noxsave clearcpuid=129,141,145,148,151,153,158,288,298,306,308,317,534";

/// KVM's paravirtual feature leaf, and its "send IPIs by hypercall" bit. On kvm_pvm, a
/// guest that uses PV IPIs hangs while bringing up its second CPU (measured with qemu:
/// `-cpu …,-kvm-pv-ipi` boots); unlike the feature bits above, kvm_pvm honours this leaf.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;

const HYPERVISOR_BIT: u32 = 1 << 31;
/// Leaf 1 ECX: the LAPIC timer's TSC-deadline mode, which KVM emulates but leaves out of
/// its supported CPUID. With no PIT in the VM, Linux needs it (and ARAT, which KVM does
/// report) to skip PIT-based timer calibration.
const TSC_DEADLINE_BIT: u32 = 1 << 24;
const HTT_BIT: u32 = 1 << 28;

/// Is this host's /dev/kvm served by kvm_pvm?
pub fn host_is_kvm_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Adjusts KVM's supported CPUID for vCPU `cpu_id` of `cpu_count`: APIC ids, logical
/// processor count and the hypervisor bit; the TSC-deadline timer when KVM has it
/// (`tsc_deadline`); on kvm_pvm (`pvm`), no paravirtual IPIs.
pub fn filter(cpuid: &mut CpuId, cpu_id: u8, cpu_count: u8, tsc_deadline: bool, pvm: bool) {
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
                if tsc_deadline {
                    e.ecx |= TSC_DEADLINE_BIT;
                }
            }
            // Extended topology: every subleaf reports this vCPU's x2APIC id.
            0xb | 0x1f => e.edx = u32::from(cpu_id),
            KVM_CPUID_FEATURES if pvm => e.eax &= !KVM_FEATURE_PV_SEND_IPI,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

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

    #[test]
    fn topology_and_hypervisor_bit() {
        let mut c = CpuId::from_entries(&[
            entry(1, 0),
            entry(7, 0),
            entry(0xb, 0),
            entry(KVM_CPUID_FEATURES, 0),
        ])
        .unwrap();
        filter(&mut c, 3, 4, false, false);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & HYPERVISOR_BIT, 0);
        assert_ne!(e[0].edx & HTT_BIT, 0);
        assert_eq!(e[2].edx, 3);
        // Feature bits are left as KVM reports them.
        assert_eq!((e[0].ecx, e[1].ebx), (!0, !0));
        assert_eq!(e[3].eax, !0, "PV IPIs stay on hardware KVM");
        c.as_mut_slice()[0].ecx = 0;
        filter(&mut c, 0, 1, true, true);
        assert_eq!(c.as_slice()[0].edx & HTT_BIT, 0);
        assert_eq!(
            c.as_slice()[0].ecx,
            HYPERVISOR_BIT | TSC_DEADLINE_BIT,
            "TSC deadline when KVM has it"
        );
        assert_eq!(
            c.as_slice()[3].eax,
            !KVM_FEATURE_PV_SEND_IPI,
            "no PV IPIs on kvm_pvm"
        );
    }

    #[test]
    fn pvm_params_fit_linux_limits() {
        let (noxsave, clear) = PVM_KERNEL_PARAMS.split_once(' ').unwrap();
        assert_eq!(noxsave, "noxsave");
        let bits = clear.strip_prefix("clearcpuid=").unwrap();
        assert!(bits.len() < 128, "Linux reads 127 characters of clearcpuid");
        // Capability numbers of the features kvm-pvm.md lists (word * 32 + bit).
        let expected = [
            4 * 32 + 1,
            4 * 32 + 13,
            4 * 32 + 17,
            4 * 32 + 20,
            4 * 32 + 23,
            4 * 32 + 25,
            4 * 32 + 30,
            9 * 32,
            9 * 32 + 10,
            9 * 32 + 18,
            9 * 32 + 20,
            9 * 32 + 29,
            16 * 32 + 22,
        ];
        let got: Vec<u32> = bits.split(',').map(|b| b.parse().unwrap()).collect();
        assert_eq!(got, expected);
    }
}
