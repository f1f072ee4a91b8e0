//! The KVM virtual machine: guest memory slots, the split irqchip (local APICs in the
//! kernel, the IOAPIC in userspace: `devices::legacy::ioapic`; no PIC, no PIT), irqfds,
//! ioeventfds and GSI routes. Created and configured on the builder's thread;
//! `register_*` and the [`GsiRouter`] may be used from any thread afterwards (KVM
//! serialises them).
//!
//! Why split: closing a VM fd with KVM's in-kernel PIC, IOAPIC and PIT waits for several
//! SRCU grace periods while they unregister from the I/O buses (20–23 ms measured on a
//! kvm_pvm host, most of it `kvm_free_pit` and the irqchip); with the split irqchip the
//! same close takes about 0.3 ms.

use std::io;
use std::sync::Arc;

use devices::legacy::ioapic::{MsiMessage, MsiRouting, IOAPIC_PINS};
use devices::virtio::mmio::ArmDoorbells;
use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_msi, kvm_userspace_memory_region, CpuId, KvmIrqRouting,
    KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
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

/// A KVM VM with its guest memory. The memory outlives the VM fd: the fields drop in
/// order, and the only other holder of the fd, the IOAPIC's [`GsiRouter`], is dropped with
/// the buses when the vCPU threads end.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
}

/// Writes the IOAPIC's routes into KVM's GSI routing table.
pub struct GsiRouter(Arc<VmFd>);

impl MsiRouting for GsiRouter {
    fn set_routes(&mut self, routes: &[(u32, MsiMessage)]) -> io::Result<()> {
        let mut table = KvmIrqRouting::new(routes.len()).map_err(io::Error::other)?;
        for (entry, &(gsi, msg)) in table.as_mut_slice().iter_mut().zip(routes) {
            entry.gsi = gsi;
            entry.type_ = KVM_IRQ_ROUTING_MSI;
            entry.u.msi = kvm_irq_routing_msi {
                address_lo: msg.address as u32,
                address_hi: (msg.address >> 32) as u32,
                data: msg.data,
                ..Default::default()
            };
        }
        self.0.set_gsi_routing(&table).map_err(io::Error::from)
    }
}

impl Vm {
    /// Opens /dev/kvm, creates the VM, maps `regions` (guest address, length) of anonymous,
    /// lazily-touched memory, and enables the split irqchip (before any vCPU exists, as
    /// KVM requires).
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

        let mut split = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        // GSIs below this many are IOAPIC pins: KVM exits on EOI of their level routes.
        split.args[0] = IOAPIC_PINS as u64;
        fd.enable_cap(&split)
            .map_err(|e| VmError::Kvm("enable the split irqchip (KVM_CAP_SPLIT_IRQCHIP)", e))?;
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            memory,
        })
    }

    /// What the userspace IOAPIC programs its routes through.
    pub fn gsi_router(&self) -> GsiRouter {
        GsiRouter(self.fd.clone())
    }

    /// Whether the in-kernel LAPICs offer the TSC-deadline timer (the guest's timer
    /// without a PIT; KVM leaves the CPUID bit to the VMM).
    pub fn has_tsc_deadline_timer(&self) -> bool {
        self.fd.check_extension(Cap::TscDeadlineTimer)
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

    /// Registers queue doorbells for a virtio-mmio window, when called (on a vCPU thread,
    /// at DRIVER_OK): KVM signals the `i`-th EventFd when the guest writes `i` (4 bytes) to
    /// MMIO address `addr`, without an exit to userspace.
    pub fn mmio_doorbells(&self, addr: u64) -> ArmDoorbells {
        let fd = self.fd.clone();
        Box::new(move |evts: &[EventFd]| {
            for (i, evt) in (0u32..).zip(evts) {
                fd.register_ioevent(evt, &IoEventAddress::Mmio(addr), i)
                    .map_err(io::Error::from)?;
            }
            Ok(())
        })
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
