//! The virtio-mmio transport, version 2 (virtio 1.x, 4.2.2), for one device.
//!
//! Runs on **vCPU threads**: the MMIO bus calls [`BusDevice::read`]/[`BusDevice::write`]
//! under this transport's mutex on every exit into the 4 KiB window. Queue notifications
//! normally bypass it (KVM ioeventfd on [`NOTIFY_REG_OFFSET`]), but a notify write that
//! reaches the bus signals the same EventFd. Nothing here processes a queue.
//!
//! The vmm arms those ioeventfds at the device's first DRIVER_OK
//! ([`MmioTransport::arm_doorbells_at_driver_ok`]), as qemu does: a device the guest never
//! drives registers none, and a VM that ends soon after its last registration does not wait
//! at close for the grace period in which the kernel frees its old I/O bus (12–20 ms
//! measured on a Linux 6.18 host for a VM that exits 3 ms after start).
//!
//! The guest is hostile: a driver that breaks the protocol (a status transition out of
//! order, a queue size that is not a power of two or above the maximum, misaligned or
//! unmapped rings, features that were not offered, queue registers written outside
//! FEATURES_OK..DRIVER_OK) gets DEVICE_NEEDS_RESET and a configuration-change interrupt;
//! only a reset (STATUS = 0) brings the device back. Accesses of the wrong width or at an
//! unknown offset are ignored and logged with a rate limit.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::device::{ActivationContext, GuestMemoryMmap, VirtioDevice, VirtioInterrupt};
use super::{features, status, RateLimitedLog};
use crate::bus::BusDevice;
use crate::irq::IrqLine;

/// Size of the register window: the `4K` of `virtio_mmio.device=4K@…`.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, where the vmm registers one ioeventfd per queue (datamatch: the
/// queue index as a 32-bit value).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = u32::from_le_bytes(*b"KSTL");

// Register offsets (virtio 1.x, 4.2.2).
const REG_MAGIC: u64 = 0x00;
const REG_VERSION: u64 = 0x04;
const REG_DEVICE_ID: u64 = 0x08;
const REG_VENDOR_ID: u64 = 0x0c;
const REG_DEVICE_FEATURES: u64 = 0x10;
const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
const REG_DRIVER_FEATURES: u64 = 0x20;
const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
const REG_QUEUE_SEL: u64 = 0x30;
const REG_QUEUE_NUM_MAX: u64 = 0x34;
const REG_QUEUE_NUM: u64 = 0x38;
const REG_QUEUE_READY: u64 = 0x44;
const REG_QUEUE_NOTIFY: u64 = NOTIFY_REG_OFFSET;
const REG_INTERRUPT_STATUS: u64 = 0x60;
const REG_INTERRUPT_ACK: u64 = 0x64;
const REG_STATUS: u64 = 0x70;
const REG_QUEUE_DESC_LOW: u64 = 0x80;
const REG_QUEUE_DESC_HIGH: u64 = 0x84;
const REG_QUEUE_AVAIL_LOW: u64 = 0x90;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x94;
const REG_QUEUE_USED_LOW: u64 = 0xa0;
const REG_QUEUE_USED_HIGH: u64 = 0xa4;
const REG_SHM_SEL: u64 = 0xac;
const REG_SHM_LEN_LOW: u64 = 0xb0;
const REG_SHM_BASE_HIGH: u64 = 0xbc;
const REG_CONFIG_GENERATION: u64 = 0xfc;
const CONFIG_SPACE: u64 = 0x100;

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("cannot duplicate the EventFd of queue {index}")]
    CloneQueueEvent {
        index: usize,
        #[source]
        source: io::Error,
    },
    #[error("the device has {queues} queues but {events} queue EventFds")]
    QueueEventCount { queues: usize, events: usize },
    #[error("queue {index} has maximum size {size}, which is not a power of two in 1..=32768")]
    BadQueueMaxSize { index: usize, size: u16 },
}

/// Which of the three rings an address register belongs to.
#[derive(Clone, Copy, Debug)]
enum Ring {
    Desc,
    Avail,
    Used,
}

/// Registers the queues' notification EventFds (in queue order) as the device's doorbells.
/// Called once, on a vCPU thread, when the driver first sets DRIVER_OK.
pub type ArmDoorbells = Box<dyn FnOnce(&[EventFd]) -> io::Result<()> + Send>;

/// The virtio-mmio register window of one device. Put it on the MMIO bus at `base` with
/// length [`MMIO_WINDOW_SIZE`].
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: VirtioInterrupt,
    queue_evts: Vec<EventFd>,
    arm_doorbells: Option<ArmDoorbells>,
    queues: Vec<Queue>,
    device_id: u32,
    offered_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    log: RateLimitedLog,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_id", &self.device_id)
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport for `device`, raising its interrupt on `irq` (an [`EventFdIrq`] registered
    /// as irqfd in the vmm). `mem` is the guest memory the device will use.
    ///
    /// [`EventFdIrq`]: crate::irq::EventFdIrq
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        irq: Arc<dyn IrqLine>,
    ) -> Result<Self, MmioError> {
        let (device_id, offered_features, queues, queue_evts) = {
            let dev = lock(&device);
            let sizes = dev.queue_max_sizes();
            let events = dev.queue_events();
            if sizes.len() != events.len() {
                return Err(MmioError::QueueEventCount {
                    queues: sizes.len(),
                    events: events.len(),
                });
            }
            let queues = sizes
                .iter()
                .enumerate()
                .map(|(index, &size)| {
                    Queue::new(size).map_err(|_| MmioError::BadQueueMaxSize { index, size })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let queue_evts = events
                .iter()
                .enumerate()
                .map(|(index, evt)| {
                    evt.try_clone()
                        .map_err(|source| MmioError::CloneQueueEvent { index, source })
                })
                .collect::<Result<Vec<_>, _>>()?;
            (dev.device_type(), dev.features(), queues, queue_evts)
        };
        Ok(MmioTransport {
            device,
            mem,
            interrupt: VirtioInterrupt::new(irq),
            queue_evts,
            arm_doorbells: None,
            queues,
            device_id,
            offered_features,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            log: RateLimitedLog::default(),
        })
    }

    /// Has `arm` register the queues' doorbells at the first DRIVER_OK. Until then (and if
    /// it fails) notify writes reach [`BusDevice::write`], which signals the same EventFds.
    pub fn arm_doorbells_at_driver_ok(&mut self, arm: ArmDoorbells) {
        self.arm_doorbells = Some(arm);
    }

    /// The per-queue notification EventFds, in queue order: register each as a KVM ioeventfd
    /// at `base + NOTIFY_REG_OFFSET` with datamatch = its index (u32).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device status register as the driver sees it.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The interrupt this transport raises (shared with the device once active).
    pub fn interrupt(&self) -> &VirtioInterrupt {
        &self.interrupt
    }

    fn selected_queue(&self) -> Option<&Queue> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    /// Marks the device broken until the driver resets it.
    fn needs_reset(&mut self, why: std::fmt::Arguments<'_>) {
        self.log.warn(format_args!(
            "virtio-mmio (device {}): {why}; setting DEVICE_NEEDS_RESET",
            self.device_id
        ));
        if self.status & status::DEVICE_NEEDS_RESET == 0 {
            self.status |= status::DEVICE_NEEDS_RESET;
            if let Err(e) = self.interrupt.signal_config_change() {
                self.log
                    .warn(format_args!("virtio-mmio: cannot raise interrupt: {e}"));
            }
        }
    }

    fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.ack(u32::MAX);
        lock(&self.device).reset();
    }

    fn write_status(&mut self, new: u32) {
        use status::*;
        if new == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if old & DEVICE_NEEDS_RESET != 0 {
            // The driver has not noticed yet; keep the bit until it resets.
            self.log.warn(format_args!(
                "virtio-mmio (device {}): status write {new:#x} while DEVICE_NEEDS_RESET ignored",
                self.device_id
            ));
            return;
        }
        if new == old {
            return;
        }
        if new == old | FAILED {
            self.status = new;
            return;
        }
        if old & FAILED != 0 {
            self.needs_reset(format_args!("status {new:#x} written after FAILED"));
            return;
        }
        const ACK_DRIVER: u32 = ACKNOWLEDGE | DRIVER;
        const UP_TO_FEATURES_OK: u32 = ACK_DRIVER | FEATURES_OK;
        match (old, new) {
            (0, ACKNOWLEDGE) | (ACKNOWLEDGE, ACK_DRIVER) => self.status = new,
            (ACK_DRIVER, UP_TO_FEATURES_OK) => {
                let unoffered = self.acked_features & !self.offered_features;
                if unoffered != 0 {
                    self.needs_reset(format_args!(
                        "driver accepted features {unoffered:#x} that were not offered"
                    ));
                } else if self.acked_features & features::VERSION_1 == 0 {
                    // A legacy driver: refuse FEATURES_OK (the driver reads it back and fails).
                    self.log.warn(format_args!(
                        "virtio-mmio (device {}): driver did not accept VERSION_1; FEATURES_OK refused",
                        self.device_id
                    ));
                } else {
                    self.status = new;
                }
            }
            (UP_TO_FEATURES_OK, n) if n == UP_TO_FEATURES_OK | DRIVER_OK => self.activate(),
            _ => self.needs_reset(format_args!("bad status transition {old:#x} -> {new:#x}")),
        }
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, q) in self.queues.iter().enumerate() {
            // The driver may have moved a ring after making the queue ready.
            if q.ready() {
                if let Err(why) = check_rings(&self.mem, q) {
                    self.needs_reset(format_args!("queue {index} at DRIVER_OK: {why}"));
                    return;
                }
            }
            let mut state = q.state();
            state.event_idx_enabled = event_idx;
            match Queue::try_from(state) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    self.needs_reset(format_args!("queue {index} is invalid at DRIVER_OK: {e}"));
                    return;
                }
            }
        }
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        let ctx = ActivationContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        let result = lock(&self.device).activate(ctx);
        match result {
            Ok(()) => self.status |= status::DRIVER_OK,
            Err(e) => {
                self.needs_reset(format_args!("activation failed: {e}"));
                return;
            }
        }
        if let Some(arm) = self.arm_doorbells.take() {
            if let Err(e) = arm(&self.queue_evts) {
                log::warn!(
                    "virtio-mmio (device {}): cannot arm the queue doorbells, notifications \
                     go through the VMM: {e}",
                    self.device_id
                );
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status != status::ACKNOWLEDGE | status::DRIVER {
            let status = self.status;
            self.needs_reset(format_args!("DriverFeatures written in status {status:#x}"));
            return;
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | value,
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (value << 32),
            sel if value != 0 => {
                self.needs_reset(format_args!("features {value:#x} accepted in page {sel}"))
            }
            _ => {}
        }
    }

    /// Applies a write to a queue configuration register, if the protocol allows it now.
    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        let in_setup = self.status & status::FEATURES_OK != 0
            && self.status & status::DRIVER_OK == 0
            && self.status & status::DEVICE_NEEDS_RESET == 0;
        if !in_setup {
            // Linux writes QueueReady = 0 while tearing down queues after a reset.
            if offset == REG_QUEUE_READY && value == 0 && self.status == 0 {
                return;
            }
            let status = self.status;
            self.needs_reset(format_args!(
                "queue register {offset:#x} written in status {status:#x}"
            ));
            return;
        }
        let sel = self.queue_sel;
        let mem = &self.mem;
        let Some(q) = usize::try_from(sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
        else {
            self.needs_reset(format_args!(
                "queue register {offset:#x} written for queue {sel}"
            ));
            return;
        };
        let result: Result<(), String> = match offset {
            REG_QUEUE_NUM => q
                .try_set_size(u16::try_from(value).unwrap_or(0))
                .map_err(|_| format!("queue {sel}: bad size {value} (max {})", q.max_size())),
            REG_QUEUE_READY => match value {
                0 => {
                    q.set_ready(false);
                    Ok(())
                }
                1 => check_rings(mem, q)
                    .map(|()| q.set_ready(true))
                    .map_err(|why| format!("queue {sel} made ready with invalid rings: {why}")),
                _ => Err(format!("queue {sel}: QueueReady = {value}")),
            },
            REG_QUEUE_DESC_LOW => set_ring_addr(q, Ring::Desc, Some(value), None),
            REG_QUEUE_DESC_HIGH => set_ring_addr(q, Ring::Desc, None, Some(value)),
            REG_QUEUE_AVAIL_LOW => set_ring_addr(q, Ring::Avail, Some(value), None),
            REG_QUEUE_AVAIL_HIGH => set_ring_addr(q, Ring::Avail, None, Some(value)),
            REG_QUEUE_USED_LOW => set_ring_addr(q, Ring::Used, Some(value), None),
            REG_QUEUE_USED_HIGH => set_ring_addr(q, Ring::Used, None, Some(value)),
            _ => Ok(()),
        };
        if let Err(why) = result {
            self.needs_reset(format_args!("{why}"));
        }
    }

    fn notify(&mut self, value: u32) {
        let evt = usize::try_from(value)
            .ok()
            .and_then(|i| self.queue_evts.get(i));
        match evt {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    self.log.warn(format_args!(
                        "virtio-mmio: cannot signal queue {value}: {e}"
                    ));
                }
            }
            None => {
                self.log.warn(format_args!(
                    "virtio-mmio (device {}): notify for missing queue {value}",
                    self.device_id
                ));
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device_id,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => (self.offered_features & 0xffff_ffff) as u32,
                1 => (self.offered_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: their length and base read as all-ones.
            REG_SHM_LEN_LOW..=REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                self.log.warn(format_args!(
                    "virtio-mmio (device {}): read of register {offset:#x} ignored",
                    self.device_id
                ));
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM | REG_QUEUE_READY | REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_AVAIL_LOW | REG_QUEUE_AVAIL_HIGH | REG_QUEUE_USED_LOW
            | REG_QUEUE_USED_HIGH => self.write_queue_reg(offset, value),
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            REG_SHM_SEL => {}
            _ => {
                self.log.warn(format_args!(
                    "virtio-mmio (device {}): write of register {offset:#x} ignored",
                    self.device_id
                ));
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            } else {
                data.fill(0);
                self.log.warn(format_args!(
                    "virtio-mmio: {}-byte config read at {offset:#x} ignored",
                    data.len()
                ));
            }
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset % 4 == 0 => *word = self.read_reg(offset).to_le_bytes(),
            _ => {
                data.fill(0);
                self.log.warn(format_args!(
                    "virtio-mmio: {}-byte register read at {offset:#x} ignored",
                    data.len()
                ));
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            } else {
                self.log.warn(format_args!(
                    "virtio-mmio: {}-byte config write at {offset:#x} ignored",
                    data.len()
                ));
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset % 4 == 0 => self.write_reg(offset, u32::from_le_bytes(word)),
            _ => {
                self.log.warn(format_args!(
                    "virtio-mmio: {}-byte register write at {offset:#x} ignored",
                    data.len()
                ));
            }
        }
    }
}

/// Locks a device; a poisoned lock (a panic on another thread) keeps serving its state.
fn lock(device: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

fn set_ring_addr(
    q: &mut Queue,
    ring: Ring,
    low: Option<u32>,
    high: Option<u32>,
) -> Result<(), String> {
    let current = match ring {
        Ring::Desc => q.desc_table(),
        Ring::Avail => q.avail_ring(),
        Ring::Used => q.used_ring(),
    };
    let low = low.map_or(current & 0xffff_ffff, u64::from);
    let high = high.map_or(current >> 32, u64::from);
    let addr = GuestAddress((high << 32) | low);
    let result = match ring {
        Ring::Desc => q.try_set_desc_table_address(addr),
        Ring::Avail => q.try_set_avail_ring_address(addr),
        Ring::Used => q.try_set_used_ring_address(addr),
    };
    result.map_err(|e| format!("{ring:?} ring at {:#x}: {e}", addr.0))
}

/// Checks that a queue's three rings lie in guest memory (virtio 1.x, 2.7).
fn check_rings(mem: &GuestMemoryMmap, q: &Queue) -> Result<(), String> {
    let size = usize::from(q.size());
    let rings = [
        (
            "descriptor table",
            q.desc_table(),
            16 * size,
            Permissions::Read,
        ),
        (
            "available ring",
            q.avail_ring(),
            6 + 2 * size,
            Permissions::ReadWrite,
        ),
        (
            "used ring",
            q.used_ring(),
            6 + 8 * size,
            Permissions::ReadWrite,
        ),
    ];
    for (name, addr, len, access) in rings {
        if !mem.check_range(GuestAddress(addr), len, access) {
            return Err(format!("{name} {addr:#x}+{len:#x} is not in guest memory"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::Block;
    use crate::virtio::interrupt;
    use crate::virtio::test_utils::{reg, Driver, MemDisk, Slot, TestVmm};
    use status::*;

    const BASE: u64 = 0xd000_0000;
    const QUEUE: u64 = 0x1000;

    fn setup() -> (TestVmm, Slot) {
        let mut vmm = TestVmm::new();
        let block = Block::new(Box::new(MemDisk::new(1 << 16, false)), None).unwrap();
        let slot = vmm.add_block(block, BASE);
        (vmm, slot)
    }

    fn needs_reset(d: &Driver<'_>, vmm: &TestVmm) -> bool {
        d.read(vmm, reg::STATUS) & DEVICE_NEEDS_RESET != 0
    }

    /// Runs the Linux sequence up to (not including) queue setup.
    fn to_features_ok(d: &Driver<'_>, vmm: &TestVmm) {
        d.negotiate(vmm, u64::MAX);
        assert_eq!(d.read(vmm, reg::STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    #[test]
    fn identity_registers() {
        let (vmm, _slot) = setup();
        let mem = vmm.mem.clone();
        let d = Driver::new(&mem, BASE, QUEUE, 16);
        assert_eq!(d.read(&vmm, reg::MAGIC), MAGIC);
        assert_eq!(d.read(&vmm, reg::VERSION), 2);
        assert_eq!(d.read(&vmm, reg::DEVICE_ID), 2);
        assert_eq!(d.read(&vmm, reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(d.read(&vmm, reg::CONFIG_GENERATION), 0);
        assert_eq!(d.read(&vmm, REG_SHM_LEN_LOW), u32::MAX);
        d.write(&vmm, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(d.read(&vmm, reg::DEVICE_FEATURES), 0);
        d.write(&vmm, reg::QUEUE_SEL, 0);
        assert_eq!(d.read(&vmm, reg::QUEUE_NUM_MAX), 256);
        d.write(&vmm, reg::QUEUE_SEL, 1);
        assert_eq!(d.read(&vmm, reg::QUEUE_NUM_MAX), 0);
        assert_eq!(d.read(&vmm, reg::QUEUE_READY), 0);
    }

    #[test]
    fn wrong_width_and_unknown_offsets_are_ignored() {
        let (vmm, slot) = setup();
        let mem = vmm.mem.clone();
        let d = Driver::new(&mem, BASE, QUEUE, 16);
        let mut two = [0xffu8; 2];
        assert!(vmm.bus.read(BASE + reg::MAGIC, &mut two));
        assert_eq!(two, [0, 0]);
        let mut eight = [0xffu8; 8];
        assert!(vmm.bus.read(BASE + reg::MAGIC, &mut eight));
        assert_eq!(eight, [0; 8]);
        // Unaligned 4-byte read.
        let mut four = [0xffu8; 4];
        assert!(vmm.bus.read(BASE + 2, &mut four));
        assert_eq!(four, [0; 4]);
        // A 1-byte status write does nothing.
        assert!(vmm.bus.write(BASE + reg::STATUS, &[ACKNOWLEDGE as u8]));
        assert_eq!(d.read(&vmm, reg::STATUS), 0);
        // Unknown register, write-only register read.
        d.write(&vmm, 0x0f0, 1);
        assert_eq!(d.read(&vmm, 0x0f0), 0);
        assert_eq!(d.read(&vmm, reg::QUEUE_NUM), 0);
        // Config space of odd width.
        let mut three = [0xffu8; 3];
        assert!(vmm.bus.read(BASE + reg::CONFIG, &mut three));
        assert_eq!(three, [0; 3]);
        assert!(!needs_reset(&d, &vmm));
        assert_eq!(slot.irq.count(), 0);
    }

    #[test]
    fn bad_status_transitions_need_reset() {
        let (vmm, slot) = setup();
        let mem = vmm.mem.clone();
        let d = Driver::new(&mem, BASE, QUEUE, 16);
        let bad: &[&[u32]] = &[
            &[DRIVER],
            &[ACKNOWLEDGE, ACKNOWLEDGE | FEATURES_OK],
            &[
                ACKNOWLEDGE,
                ACKNOWLEDGE | DRIVER,
                ACKNOWLEDGE | DRIVER | DRIVER_OK,
            ],
            &[ACKNOWLEDGE, ACKNOWLEDGE | DRIVER, ACKNOWLEDGE],
            &[ACKNOWLEDGE, DEVICE_NEEDS_RESET | ACKNOWLEDGE],
        ];
        for (i, seq) in bad.iter().enumerate() {
            d.write(&vmm, reg::STATUS, 0);
            assert_eq!(d.read(&vmm, reg::STATUS), 0);
            assert_eq!(
                d.read(&vmm, reg::INTERRUPT_STATUS),
                0,
                "reset clears interrupts"
            );
            for &s in *seq {
                d.write(&vmm, reg::STATUS, s);
            }
            assert!(needs_reset(&d, &vmm), "sequence {i}: {seq:x?}");
            assert_eq!(
                d.read(&vmm, reg::INTERRUPT_STATUS),
                interrupt::CONFIG_CHANGE
            );
            assert_eq!(slot.irq.count(), i as u64 + 1);
            // Nothing but a reset gets out of it.
            d.write(&vmm, reg::STATUS, ACKNOWLEDGE);
            assert!(needs_reset(&d, &vmm));
        }
        // FAILED is accepted at any point and sticks until reset.
        d.write(&vmm, reg::STATUS, 0);
        d.write(&vmm, reg::STATUS, ACKNOWLEDGE);
        d.write(&vmm, reg::STATUS, ACKNOWLEDGE | FAILED);
        assert_eq!(d.read(&vmm, reg::STATUS), ACKNOWLEDGE | FAILED);
    }

    #[test]
    fn feature_negotiation_rules() {
        let (vmm, slot) = setup();
        let mem = vmm.mem.clone();
        let d = Driver::new(&mem, BASE, QUEUE, 16);
        let offered = d.device_features(&vmm);

        // A feature that was not offered.
        d.write(&vmm, reg::STATUS, ACKNOWLEDGE);
        d.write(&vmm, reg::STATUS, ACKNOWLEDGE | DRIVER);
        d.write(&vmm, reg::DRIVER_FEATURES_SEL, 0);
        d.write(&vmm, reg::DRIVER_FEATURES, (offered as u32) | 1 << 7);
        d.write(&vmm, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert!(needs_reset(&d, &vmm));

        // Features in a page past 1.
        d.write(&vmm, reg::STATUS, 0);
        d.write(&vmm, reg::STATUS, ACKNOWLEDGE);
        d.write(&vmm, reg::STATUS, ACKNOWLEDGE | DRIVER);
        d.write(&vmm, reg::DRIVER_FEATURES_SEL, 2);
        d.write(&vmm, reg::DRIVER_FEATURES, 1);
        assert!(needs_reset(&d, &vmm));

        // A legacy driver (no VERSION_1): FEATURES_OK is refused, nothing else.
        d.write(&vmm, reg::STATUS, 0);
        d.write(&vmm, reg::STATUS, ACKNOWLEDGE);
        d.write(&vmm, reg::STATUS, ACKNOWLEDGE | DRIVER);
        d.write(&vmm, reg::DRIVER_FEATURES_SEL, 0);
        d.write(&vmm, reg::DRIVER_FEATURES, offered as u32);
        d.write(&vmm, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(d.read(&vmm, reg::STATUS), ACKNOWLEDGE | DRIVER);

        // Features written after FEATURES_OK.
        to_features_ok(&d, &vmm);
        let irqs = slot.irq.count();
        d.write(&vmm, reg::DRIVER_FEATURES, 0);
        assert!(needs_reset(&d, &vmm));
        assert_eq!(slot.irq.count(), irqs + 1);

        // The accepted subset is what the transport reports.
        to_features_ok(&d, &vmm);
        assert_eq!(slot.transport.lock().unwrap().acked_features(), offered);
    }

    #[test]
    fn queue_register_violations() {
        let (vmm, _slot) = setup();
        let mem = vmm.mem.clone();
        let d = Driver::new(&mem, BASE, QUEUE, 16);
        type Step = (u64, u32);
        let cases: &[(&str, bool, &[Step])] = &[
            ("size not a power of two", true, &[(reg::QUEUE_NUM, 24)]),
            ("size over the maximum", true, &[(reg::QUEUE_NUM, 512)]),
            ("size zero", true, &[(reg::QUEUE_NUM, 0)]),
            ("size over u16", true, &[(reg::QUEUE_NUM, 0x1_0000)]),
            (
                "misaligned descriptor table",
                true,
                &[(reg::QUEUE_DESC_LOW, 0x1008)],
            ),
            (
                "misaligned used ring",
                true,
                &[(reg::QUEUE_USED_LOW, 0x1002)],
            ),
            ("QueueReady = 2", true, &[(reg::QUEUE_READY, 2)]),
            (
                "missing queue",
                true,
                &[(reg::QUEUE_SEL, 1), (reg::QUEUE_NUM, 16)],
            ),
            (
                "rings outside guest memory",
                true,
                &[
                    (reg::QUEUE_NUM, 16),
                    (reg::QUEUE_DESC_HIGH, 1),
                    (reg::QUEUE_READY, 1),
                ],
            ),
            (
                "rings straddling the end of guest memory",
                true,
                &[
                    (reg::QUEUE_NUM, 16),
                    (reg::QUEUE_USED_LOW, 0x3f_fffc),
                    (reg::QUEUE_READY, 1),
                ],
            ),
            (
                "queue registers before FEATURES_OK",
                false,
                &[(reg::QUEUE_NUM, 16)],
            ),
        ];
        for (name, after_features_ok, steps) in cases {
            d.write(&vmm, reg::STATUS, 0);
            if *after_features_ok {
                to_features_ok(&d, &vmm);
                d.write(&vmm, reg::QUEUE_SEL, 0);
            } else {
                d.write(&vmm, reg::STATUS, ACKNOWLEDGE);
                d.write(&vmm, reg::STATUS, ACKNOWLEDGE | DRIVER);
            }
            for &(r, v) in *steps {
                d.write(&vmm, r, v);
            }
            assert!(needs_reset(&d, &vmm), "{name}");
            assert_eq!(d.read(&vmm, reg::QUEUE_READY), 0, "{name}");
        }
    }

    #[test]
    fn queue_registers_after_driver_ok_and_activation_failures() {
        let (mut vmm, slot) = setup();
        let mem = vmm.mem.clone();
        let d = Driver::new(&mem, BASE, QUEUE, 16);
        // DRIVER_OK without a ready queue: the device refuses activation.
        to_features_ok(&d, &vmm);
        d.write(
            &vmm,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(needs_reset(&d, &vmm));
        assert_eq!(d.read(&vmm, reg::STATUS) & DRIVER_OK, 0);

        // A ring moved out of memory after QueueReady: caught at DRIVER_OK.
        to_features_ok(&d, &vmm);
        d.setup_queue(&vmm);
        d.write(&vmm, reg::QUEUE_AVAIL_HIGH, 0x10);
        d.write(
            &vmm,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(needs_reset(&d, &vmm));
        assert!(!slot.block.lock().unwrap().is_activated());

        // Proper probe, then a queue register write: NEEDS_RESET, the device keeps its state.
        d.probe(&mut vmm, u64::MAX);
        d.write(&vmm, reg::QUEUE_NUM, 16);
        assert!(needs_reset(&d, &vmm));
        assert_ne!(d.read(&vmm, reg::STATUS) & DRIVER_OK, 0);
        // Reset, then Linux's teardown write is harmless.
        d.write(&vmm, reg::STATUS, 0);
        d.write(&vmm, reg::QUEUE_READY, 0);
        assert_eq!(d.read(&vmm, reg::STATUS), 0);
        assert!(!slot.block.lock().unwrap().is_activated());
    }

    #[test]
    fn notify_register_signals_the_queue_eventfd() {
        let (vmm, slot) = setup();
        let mem = vmm.mem.clone();
        let d = Driver::new(&mem, BASE, QUEUE, 16);
        d.write(&vmm, reg::QUEUE_NOTIFY, 0);
        d.write(&vmm, reg::QUEUE_NOTIFY, 0);
        d.write(&vmm, reg::QUEUE_NOTIFY, 7); // no such queue: ignored
        let t = slot.transport.lock().unwrap();
        assert_eq!(t.queue_events().len(), 1);
        assert_eq!(t.queue_events()[0].read().unwrap(), 2);
    }

    #[test]
    fn doorbells_are_armed_once_at_the_first_successful_driver_ok() {
        let (mut vmm, slot) = setup();
        let armed = Arc::new(Mutex::new(Vec::new()));
        let record = armed.clone();
        slot.transport
            .lock()
            .unwrap()
            .arm_doorbells_at_driver_ok(Box::new(move |evts| {
                record.lock().unwrap().push(evts.len());
                Ok(())
            }));
        let mem = vmm.mem.clone();
        let d = Driver::new(&mem, BASE, QUEUE, 16);
        // A refused activation (no queue ready) arms nothing.
        to_features_ok(&d, &vmm);
        d.driver_ok(&vmm);
        assert!(needs_reset(&d, &vmm));
        d.write(&vmm, reg::STATUS, 0);
        to_features_ok(&d, &vmm);
        d.setup_queue(&vmm);
        assert!(armed.lock().unwrap().is_empty(), "not before DRIVER_OK");
        d.driver_ok(&vmm);
        assert_eq!(*armed.lock().unwrap(), vec![1]);
        // A reset and a second probe keep the doorbells they have.
        d.write(&vmm, reg::STATUS, 0);
        d.probe(&mut vmm, u64::MAX);
        assert_eq!(*armed.lock().unwrap(), vec![1]);
    }

    #[test]
    fn interrupt_ack_clears_only_acked_bits() {
        let (vmm, slot) = setup();
        let mem = vmm.mem.clone();
        let d = Driver::new(&mem, BASE, QUEUE, 16);
        let t = slot.transport.lock().unwrap();
        t.interrupt().signal_used_queue().unwrap();
        t.interrupt().signal_config_change().unwrap();
        drop(t);
        assert_eq!(d.read(&vmm, reg::INTERRUPT_STATUS), 3);
        d.write(&vmm, reg::INTERRUPT_ACK, interrupt::USED_RING);
        assert_eq!(
            d.read(&vmm, reg::INTERRUPT_STATUS),
            interrupt::CONFIG_CHANGE
        );
        d.write(&vmm, reg::INTERRUPT_ACK, interrupt::CONFIG_CHANGE);
        assert_eq!(d.read(&vmm, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn new_refuses_mismatched_queue_events() {
        struct Broken(Vec<EventFd>);
        impl VirtioDevice for Broken {
            fn device_type(&self) -> u32 {
                99
            }
            fn queue_max_sizes(&self) -> &[u16] {
                &[16, 100]
            }
            fn features(&self) -> u64 {
                0
            }
            fn queue_events(&self) -> &[EventFd] {
                &self.0
            }
            fn read_config(&self, _: u64, _: &mut [u8]) {}
            fn write_config(&mut self, _: u64, _: &[u8]) {}
            fn activate(
                &mut self,
                _: ActivationContext,
            ) -> Result<(), super::super::ActivateError> {
                Ok(())
            }
            fn reset(&mut self) {}
            fn is_activated(&self) -> bool {
                false
            }
        }
        let mem = crate::virtio::test_utils::guest_memory();
        let irq: Arc<dyn IrqLine> = Arc::new(crate::irq::CountingIrq::default());
        let one = Arc::new(Mutex::new(Broken(vec![EventFd::new(0).unwrap()])));
        assert!(matches!(
            MmioTransport::new(mem.clone(), one, irq.clone()),
            Err(MmioError::QueueEventCount {
                queues: 2,
                events: 1
            })
        ));
        let two = Arc::new(Mutex::new(Broken(vec![
            EventFd::new(0).unwrap(),
            EventFd::new(0).unwrap(),
        ])));
        assert!(matches!(
            MmioTransport::new(mem, two, irq),
            Err(MmioError::BadQueueMaxSize {
                index: 1,
                size: 100
            })
        ));
    }
}
