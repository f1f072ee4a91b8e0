//! The virtio-mmio transport, version 2 (virtio 1.x, 4.2.2), for one device.
//!
//! Runs on **vCPU threads**: the MMIO bus calls [`BusDevice::read`]/[`BusDevice::write`]
//! under this transport's mutex on every exit into the 4 KiB window. Queue notifications
//! normally bypass it (KVM ioeventfd on [`NOTIFY_REG_OFFSET`]), but a notify write that
//! reaches the bus signals the same EventFd. Nothing here processes a queue.
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

/// The virtio-mmio register window of one device. Put it on the MMIO bus at `base` with
/// length [`MMIO_WINDOW_SIZE`].
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: VirtioInterrupt,
    queue_evts: Vec<EventFd>,
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
                    evt.try_clone().map_err(|source| MmioError::CloneQueueEvent { index, source })
                })
                .collect::<Result<Vec<_>, _>>()?;
            (dev.device_type(), dev.features(), queues, queue_evts)
        };
        Ok(MmioTransport {
            device,
            mem,
            interrupt: VirtioInterrupt::new(irq),
            queue_evts,
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
        usize::try_from(self.queue_sel).ok().and_then(|i| self.queues.get(i))
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
                self.log.warn(format_args!("virtio-mmio: cannot raise interrupt: {e}"));
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
            Err(e) => self.needs_reset(format_args!("activation failed: {e}")),
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
        let Some(q) = usize::try_from(sel).ok().and_then(|i| self.queues.get_mut(i)) else {
            self.needs_reset(format_args!("queue register {offset:#x} written for queue {sel}"));
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
                1 => check_rings(mem, q).map(|()| q.set_ready(true)).map_err(|why| {
                    format!("queue {sel} made ready with invalid rings: {why}")
                }),
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
        let evt = usize::try_from(value).ok().and_then(|i| self.queue_evts.get(i));
        match evt {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    self.log.warn(format_args!("virtio-mmio: cannot signal queue {value}: {e}"));
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
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_AVAIL_LOW
            | REG_QUEUE_AVAIL_HIGH
            | REG_QUEUE_USED_LOW
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
        ("descriptor table", q.desc_table(), 16 * size, Permissions::Read),
        ("available ring", q.avail_ring(), 6 + 2 * size, Permissions::ReadWrite),
        ("used ring", q.used_ring(), 6 + 8 * size, Permissions::ReadWrite),
    ];
    for (name, addr, len, access) in rings {
        if !mem.check_range(GuestAddress(addr), len, access) {
            return Err(format!("{name} {addr:#x}+{len:#x} is not in guest memory"));
        }
    }
    Ok(())
}
