//! The KVM virtual machine: guest memory slots, the in-kernel irqchip and PIT, irqfds and
//! ioeventfds. Created and configured on the builder's thread; `register_*` may be called
//! from any thread afterwards (KVM serialises them).

use std::io;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::vcpu::Vcpu;
use crate::arch::layout::KVM_TSS_ADDR;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel/kvm_amd, or enable nested virtualization)")]
    NoKvm,
    #[error("no permission to open /dev/kvm (run as root or join the kvm group)")]
    KvmPermission,
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] io::Error),
    #[error("KVM API version {0} is not the expected 12")]
    KvmApiVersion(i32),
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot allocate {0} MiB of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
}

/// Asks for transparent huge pages on guest RAM (where THP is opt-in). Fewer, larger
/// pages cut the cost of faulting guest memory in, most of all under shadow paging.
fn advise_huge_pages(memory: &GuestMemoryMmap, start: GuestAddress, len: u64) {
    let Ok(host) = memory.get_host_address(start) else {
        return;
    };
    let Ok(len) = usize::try_from(len) else {
        return;
    };
    // SAFETY: `host..host+len` is one anonymous mapping owned by `memory`; MADV_HUGEPAGE
    // only changes how the kernel backs it, never its contents or validity.
    let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        log::debug!(
            "madvise(MADV_HUGEPAGE) on guest memory failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A KVM VM with its guest memory.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemoryMmap,
}

impl Vm {
    /// Opens /dev/kvm, creates the VM, maps `regions` (guest address, length) of anonymous,
    /// lazily-touched memory, and creates the in-kernel irqchip and PIT.
    pub fn new(regions: &[(u64, u64)]) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT => VmError::NoKvm,
            libc::EACCES | libc::EPERM => VmError::KvmPermission,
            _ => VmError::OpenKvm(io::Error::from_raw_os_error(e.errno())),
        })?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::KvmApiVersion(version));
        }
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("create a VM", e))?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(|e| VmError::Kvm("set the TSS address", e))?;

        let total: u64 = regions.iter().map(|r| r.1).sum();
        let ranges: Vec<(GuestAddress, usize)> = regions
            .iter()
            .map(|&(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let memory =
            GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory(total >> 20, e))?;
        for (slot, region) in memory.iter().enumerate() {
            advise_huge_pages(&memory, region.start_addr(), region.len());
            let host = memory.get_host_address(region.start_addr()).map_err(|_| {
                VmError::Kvm("map guest memory", kvm_ioctls::Error::new(libc::EFAULT))
            })?;
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: `host` points at a live mapping of `region.len()` bytes owned by
            // `memory`, which this Vm keeps alive at least as long as the VM fd.
            unsafe { fd.set_user_memory_region(mem_region) }
                .map_err(|e| VmError::Kvm("register guest memory", e))?;
        }

        fd.create_irq_chip()
            .map_err(|e| VmError::Kvm("create the in-kernel irqchip", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Kvm("create the in-kernel PIT", e))?;
        Ok(Vm { kvm, fd, memory })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The most vCPUs KVM allows in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// The CPUID leaves KVM can virtualise on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("read the supported CPUID", e))
    }

    /// Routes writes of `evt` to interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmError::Kvm("register an irqfd", e))
    }

    /// Signals `evt` when the guest writes `datamatch` (4 bytes) to MMIO address `addr`,
    /// without an exit to userspace.
    pub fn register_mmio_doorbell(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|e| VmError::Kvm("register an ioeventfd", e))
    }

    /// Creates vCPU `id` (its APIC id).
    pub fn create_vcpu(&self, id: u8) -> Result<Vcpu, VmError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| VmError::Kvm("create a vCPU", e))?;
        Ok(Vcpu::new(id, fd))
    }
}
