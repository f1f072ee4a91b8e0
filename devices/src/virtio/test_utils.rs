// Harness code for tests and benches: an unwrap is an assertion here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::new_without_default
)]

//! A host-side virtio driver for tests: guest memory, an in-memory disk, and a "VMM" with an
//! MMIO bus and an `EventManager`, driven exactly as a Linux guest driver and the vmm do.
//!
//! Everything runs on the test thread: MMIO writes play the vCPU, [`TestVmm::run`] plays
//! the VMM thread's event loop.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::block::Block;
use super::device::GuestMemoryMmap;
use super::mmio::{MmioTransport, MMIO_WINDOW_SIZE};
use super::status;
use crate::bus::Bus;
use crate::disk::{check_range, DiskBackend, DiskError, IoBufs};
use crate::irq::CountingIrq;

/// Descriptor direction: device-readable.
pub const RO: bool = false;
/// Descriptor direction: device-writable.
pub const WO: bool = true;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// A descriptor (the chain builder sets NEXT and the next index).
pub fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
    let flags = if writable { VRING_DESC_F_WRITE } else { 0 };
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

/// What [`MemDisk`] recorded; shared with the test after the disk is boxed into a device.
#[derive(Debug, Default)]
pub struct MemDiskState {
    pub data: Vec<u8>,
    pub read_only: bool,
    pub flushes: u32,
    pub discards: Vec<(u64, u64)>,
    pub write_zeroes: Vec<(u64, u64)>,
}

/// An in-memory [`DiskBackend`]; clones share the same state.
#[derive(Clone, Debug, Default)]
pub struct MemDisk(pub Arc<Mutex<MemDiskState>>);

impl MemDisk {
    /// A disk of `size` bytes; byte i holds `i % 251` so reads are recognisable.
    pub fn new(size: usize, read_only: bool) -> Self {
        let data = (0..size).map(|i| (i % 251) as u8).collect();
        MemDisk(Arc::new(Mutex::new(MemDiskState {
            data,
            read_only,
            ..Default::default()
        })))
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, MemDiskState> {
        self.0.lock().unwrap()
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, DiskError> {
        let size = self.size();
        check_range(offset, len, size)?;
        Ok(offset as usize..(offset + len) as usize)
    }
}

impl DiskBackend for MemDisk {
    fn size(&self) -> u64 {
        self.state().data.len() as u64
    }
    fn read_only(&self) -> bool {
        self.state().read_only
    }
    fn read_vectored_at(&mut self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), DiskError> {
        let r = self.range(offset, bufs.len())?;
        bufs.copy_from(&self.state().data[r]);
        Ok(())
    }
    fn write_vectored_at(&mut self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), DiskError> {
        let r = self.range(offset, bufs.len())?;
        let mut s = self.state();
        if s.read_only {
            return Err(DiskError::ReadOnly);
        }
        bufs.copy_to(&mut s.data[r]);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.state().flushes += 1;
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        let r = self.range(offset, len)?;
        let mut s = self.state();
        s.data[r].fill(0);
        s.discards.push((offset, len));
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        let r = self.range(offset, len)?;
        let mut s = self.state();
        s.data[r].fill(0);
        s.write_zeroes.push((offset, len));
        Ok(())
    }
}

/// Guest memory for tests: 4 MiB at 0.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

/// One virtio-mmio device in a [`TestVmm`].
pub struct Slot {
    pub transport: Arc<Mutex<MmioTransport>>,
    pub block: Arc<Mutex<Block>>,
    pub irq: CountingIrq,
}

/// The vmm side: guest memory, MMIO bus, event manager.
pub struct TestVmm {
    pub mem: GuestMemoryMmap,
    pub bus: Bus,
    pub em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
}

impl TestVmm {
    pub fn new() -> Self {
        Self::with_memory(guest_memory())
    }

    /// A vmm over `mem` (benches that need room for many buffers).
    pub fn with_memory(mem: GuestMemoryMmap) -> Self {
        TestVmm {
            mem,
            bus: Bus::new(),
            em: EventManager::new().unwrap(),
        }
    }

    /// Wires a block device the way the vmm does (see the `virtio` module docs).
    pub fn add_block(&mut self, block: Block, base: u64) -> Slot {
        let block = Arc::new(Mutex::new(block));
        let (transport, irq) = self.add_device(block.clone(), base);
        Slot {
            transport,
            block,
            irq,
        }
    }

    /// Wires a block device as the vmm does, on a device thread of its own (which the
    /// test's [`TestVmm::run`] does not drive); the thread stops when dropped.
    pub fn add_block_on_thread(
        &mut self,
        block: Block,
        base: u64,
    ) -> (Slot, crate::virtio::worker::DeviceThread) {
        let block = Arc::new(Mutex::new(block));
        let (transport, irq) = self.add_transport(block.clone(), base);
        let thread = crate::virtio::worker::DeviceThread::spawn(
            format!("test-blk{base:x}"),
            block.clone(),
            || Ok(()),
        )
        .unwrap();
        (
            Slot {
                transport,
                block,
                irq,
            },
            thread,
        )
    }

    /// Wires any virtio device at `base`: transport on the bus, subscriber in the loop.
    pub fn add_device<D>(
        &mut self,
        device: Arc<Mutex<D>>,
        base: u64,
    ) -> (Arc<Mutex<MmioTransport>>, CountingIrq)
    where
        D: crate::virtio::VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let wired = self.add_transport(device.clone(), base);
        self.em.add_subscriber(device);
        wired
    }

    /// The transport of `device` on the bus at `base`.
    fn add_transport<D>(
        &mut self,
        device: Arc<Mutex<D>>,
        base: u64,
    ) -> (Arc<Mutex<MmioTransport>>, CountingIrq)
    where
        D: crate::virtio::VirtioDevice + Send + 'static,
    {
        let irq = CountingIrq::default();
        let transport =
            MmioTransport::new(self.mem.clone(), device.clone(), Arc::new(irq.clone())).unwrap();
        let transport = Arc::new(Mutex::new(transport));
        self.bus
            .insert(transport.clone(), base, MMIO_WINDOW_SIZE)
            .unwrap();
        (transport, irq)
    }

    pub fn read32(&self, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.bus.read(addr, &mut b));
        u32::from_le_bytes(b)
    }

    pub fn write32(&self, addr: u64, v: u32) {
        assert!(self.bus.write(addr, &v.to_le_bytes()));
    }

    /// Runs the VMM thread's event loop until no event is pending.
    pub fn run(&mut self) -> usize {
        let mut total = 0;
        loop {
            let n = self.em.run_with_timeout(0).unwrap();
            if n == 0 {
                return total;
            }
            total += n;
        }
    }
}

/// Register offsets the driver uses.
pub mod reg {
    pub const MAGIC: u64 = 0x00;
    pub const VERSION: u64 = 0x04;
    pub const DEVICE_ID: u64 = 0x08;
    pub const VENDOR_ID: u64 = 0x0c;
    pub const DEVICE_FEATURES: u64 = 0x10;
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const QUEUE_NOTIFY: u64 = 0x50;
    pub const INTERRUPT_STATUS: u64 = 0x60;
    pub const INTERRUPT_ACK: u64 = 0x64;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    pub const QUEUE_DESC_HIGH: u64 = 0x84;
    pub const QUEUE_AVAIL_LOW: u64 = 0x90;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x94;
    pub const QUEUE_USED_LOW: u64 = 0xa0;
    pub const QUEUE_USED_HIGH: u64 = 0xa4;
    pub const CONFIG_GENERATION: u64 = 0xfc;
    pub const CONFIG: u64 = 0x100;
}

/// The driver side of one device: Linux's virtio_mmio probe sequence, then requests.
pub struct Driver<'a> {
    pub base: u64,
    /// Its descriptor table and available ring (written here, modulo the size).
    pub vq: MockSplitQueue<'a, GuestMemoryMmap>,
    /// The used ring, right after the available ring (the mock's own `used_addr`
    /// overlaps the upper half of its available ring).
    pub used_addr: GuestAddress,
    pub mem: &'a GuestMemoryMmap,
    next_desc: u16,
    next_avail: u16,
    size: u16,
    last_used: u16,
}

impl<'a> Driver<'a> {
    /// A driver whose queue (of `size` entries) lives at `queue_base`.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, queue_base: u64, size: u16) -> Self {
        let vq = MockSplitQueue::create(mem, GuestAddress(queue_base), size);
        // flags, idx, ring[size], used_event; the used ring is 4-byte aligned.
        let avail_end = vq.avail_addr().0 + 6 + 2 * u64::from(size);
        Driver {
            base,
            vq,
            used_addr: GuestAddress((avail_end + 3) & !3),
            mem,
            next_desc: 0,
            next_avail: 0,
            size,
            last_used: 0,
        }
    }

    pub fn read(&self, vmm: &TestVmm, reg: u64) -> u32 {
        vmm.read32(self.base + reg)
    }

    pub fn write(&self, vmm: &TestVmm, reg: u64, v: u32) {
        vmm.write32(self.base + reg, v)
    }

    pub fn device_features(&self, vmm: &TestVmm) -> u64 {
        self.write(vmm, reg::DEVICE_FEATURES_SEL, 1);
        let high = u64::from(self.read(vmm, reg::DEVICE_FEATURES));
        self.write(vmm, reg::DEVICE_FEATURES_SEL, 0);
        let low = u64::from(self.read(vmm, reg::DEVICE_FEATURES));
        (high << 32) | low
    }

    fn add_status(&self, vmm: &TestVmm, bits: u32) {
        let s = self.read(vmm, reg::STATUS);
        self.write(vmm, reg::STATUS, s | bits);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation (accepts `offered & wanted`) and
    /// FEATURES_OK, as Linux does. Returns the accepted features.
    pub fn negotiate(&self, vmm: &TestVmm, wanted: u64) -> u64 {
        self.write(vmm, reg::STATUS, 0);
        assert_eq!(self.read(vmm, reg::MAGIC), 0x7472_6976);
        assert_eq!(self.read(vmm, reg::VERSION), 2);
        assert_ne!(self.read(vmm, reg::DEVICE_ID), 0);
        self.add_status(vmm, status::ACKNOWLEDGE);
        self.add_status(vmm, status::DRIVER);
        let accepted = self.device_features(vmm) & wanted;
        self.write(vmm, reg::DRIVER_FEATURES_SEL, 1);
        self.write(vmm, reg::DRIVER_FEATURES, (accepted >> 32) as u32);
        self.write(vmm, reg::DRIVER_FEATURES_SEL, 0);
        self.write(vmm, reg::DRIVER_FEATURES, accepted as u32);
        self.add_status(vmm, status::FEATURES_OK);
        assert_ne!(
            self.read(vmm, reg::STATUS) & status::FEATURES_OK,
            0,
            "FEATURES_OK refused"
        );
        accepted
    }

    /// Queue 0 setup as `vm_setup_vq` does it.
    pub fn setup_queue(&self, vmm: &TestVmm) {
        self.write(vmm, reg::QUEUE_SEL, 0);
        assert_eq!(self.read(vmm, reg::QUEUE_READY), 0);
        let max = self.read(vmm, reg::QUEUE_NUM_MAX);
        assert!(u32::from(self.size) <= max);
        self.write(vmm, reg::QUEUE_NUM, u32::from(self.size));
        let split = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
        let (lo, hi) = split(self.vq.desc_table_addr());
        self.write(vmm, reg::QUEUE_DESC_LOW, lo);
        self.write(vmm, reg::QUEUE_DESC_HIGH, hi);
        let (lo, hi) = split(self.vq.avail_addr());
        self.write(vmm, reg::QUEUE_AVAIL_LOW, lo);
        self.write(vmm, reg::QUEUE_AVAIL_HIGH, hi);
        let (lo, hi) = split(self.used_addr);
        self.write(vmm, reg::QUEUE_USED_LOW, lo);
        self.write(vmm, reg::QUEUE_USED_HIGH, hi);
        self.write(vmm, reg::QUEUE_READY, 1);
        assert_eq!(self.read(vmm, reg::QUEUE_READY), 1);
    }

    pub fn driver_ok(&self, vmm: &TestVmm) {
        self.add_status(vmm, status::DRIVER_OK);
    }

    /// Full probe: negotiate, set up queue 0, DRIVER_OK; the VMM thread then takes the
    /// activation. Returns the accepted features.
    pub fn probe(&self, vmm: &mut TestVmm, wanted: u64) -> u64 {
        let accepted = self.negotiate(vmm, wanted);
        self.setup_queue(vmm);
        self.driver_ok(vmm);
        assert_eq!(self.read(vmm, reg::STATUS), 0xf, "device refused DRIVER_OK");
        vmm.run();
        accepted
    }

    /// Puts a chain on the available ring (not yet notified). Returns its head index.
    pub fn add_chain(&mut self, descs: &[RawDescriptor]) -> u16 {
        let n = descs.len() as u16;
        assert!(n <= self.size);
        if self.next_desc + n > self.size {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        let linked: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = Descriptor::from(*d);
                let last = i + 1 == descs.len();
                let flags = if last {
                    d.flags() & !VRING_DESC_F_NEXT
                } else {
                    d.flags() | VRING_DESC_F_NEXT
                };
                let next = if last { 0 } else { head + i as u16 + 1 };
                RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), flags, next))
            })
            .collect();
        self.add_raw(&linked, head);
        self.next_desc += n;
        head
    }

    /// Stores `descs` as they are from table index `head` on and makes `head` available
    /// (for chains the harness would not build, e.g. loops).
    pub fn add_raw(&mut self, descs: &[RawDescriptor], head: u16) {
        for (i, d) in descs.iter().enumerate() {
            self.vq.desc_table().store(head + i as u16, *d).unwrap();
        }
        let ring = self.vq.avail_addr();
        let slot = u64::from(self.next_avail % self.size);
        self.mem
            .write_obj(head, ring.unchecked_add(4 + 2 * slot))
            .unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        // The index after the entry (x86 keeps the stores in order, as a guest's wmb).
        self.mem
            .write_obj(self.next_avail, ring.unchecked_add(2))
            .unwrap();
    }

    /// Notifies queue 0 through the MMIO register (the path without ioeventfd).
    pub fn notify(&self, vmm: &TestVmm) {
        self.write(vmm, reg::QUEUE_NOTIFY, 0);
    }

    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj::<u16>(self.used_addr.unchecked_add(2))
            .unwrap()
    }

    /// New used-ring entries (id, len) since the last call.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx = self.used_idx();
        let mut out = Vec::new();
        while self.last_used != idx {
            let slot = u64::from(self.last_used % self.size);
            let addr = self.used_addr.unchecked_add(4 + 8 * slot);
            let id: u32 = self.mem.read_obj(addr).unwrap();
            let len: u32 = self.mem.read_obj(addr.unchecked_add(4)).unwrap();
            out.push((id, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }

    /// Sets `used_event` (the driver's interrupt threshold under EVENT_IDX).
    pub fn set_used_event(&self, v: u16) {
        let addr = self
            .vq
            .avail_addr()
            .unchecked_add(4 + 2 * u64::from(self.size));
        self.mem.write_obj(v, addr).unwrap();
    }

    /// Reads `avail_event` (the device's notification threshold under EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        let addr = self.used_addr.unchecked_add(4 + 8 * u64::from(self.size));
        self.mem.read_obj(addr).unwrap()
    }

    /// Reads the device's config space (`len` bytes at `offset`).
    pub fn config(&self, vmm: &TestVmm, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        assert!(vmm.bus.read(self.base + reg::CONFIG + offset, &mut buf));
        buf
    }
}
