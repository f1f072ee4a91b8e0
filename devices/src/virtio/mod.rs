//! virtio devices over the virtio-mmio transport (virtio 1.x, "modern" registers only).
//!
//! # Pieces
//!
//! - [`mmio::MmioTransport`]: the 4 KiB register window of one device. It sits on the MMIO
//!   [`Bus`](crate::bus::Bus) and runs on **vCPU threads** (every MMIO exit). It owns the
//!   queue configuration until the driver writes DRIVER_OK, then hands guest memory, the
//!   queues and the interrupt to the device ([`device::VirtioDevice::activate`]).
//! - [`device::VirtioDevice`]: what a device (block, later net and vsock) implements.
//! - [`block::Block`]: virtio-blk over a [`DiskBackend`](crate::disk::DiskBackend). Its
//!   queue is processed by its `event_manager` subscriber on **its own device thread**
//!   ([`worker::DeviceThread`]), so one slow disk stalls nothing else; net, vsock and rng
//!   are served on the **VMM thread**.
//!
//! # Threading contract
//!
//! A device is shared as `Arc<Mutex<Block>>` between the transport (vCPU threads: register
//! accesses, activation, reset) and the `EventManager` that serves its queue (the VMM
//! thread's, or the device thread's). The lock order is always *transport → device*; the
//! event loop only ever takes the device lock, and the device never calls back into the
//! transport, so the two cannot deadlock. The interrupt status lives in the transport
//! (an atomic), so the guest's interrupt handler never waits for a device busy on I/O.
//!
//! Activation is handed off like Firecracker does: `activate` (vCPU thread) stores memory,
//! queues and interrupt and writes the device's `activate_evt`; the device's subscriber,
//! registered at build time and watching only `activate_evt`, then registers the queue
//! EventFds on its event loop. Queue processing never runs on a vCPU thread. A reset (the
//! driver writes 0 to STATUS) drops the device's memory and queues; the queue EventFds stay
//! registered and events that arrive while the device is inactive are drained and ignored.
//!
//! # Wiring (what the `vmm` crate does for each virtio-blk disk)
//!
//! ```text
//! // 1. device; `serial` is at most 20 bytes (None: no serial)
//! let block = Arc::new(Mutex::new(Block::new(Box::new(disk), Some("disk0"))?));
//! // 2. interrupt: an EventFd the vmm registers as KVM irqfd for GSI `irq`
//! let irq_evt = EventFd::new(EFD_NONBLOCK)?;
//! vm_fd.register_irqfd(&irq_evt, irq)?;
//! let irq_line: Arc<dyn IrqLine> = Arc::new(EventFdIrq::new(irq_evt));
//! // 3. transport (guest memory is the vmm's own GuestMemoryMmap, cloned)
//! let mut transport = MmioTransport::new(mem.clone(), block.clone(), irq_line)?;
//! // 4. ioeventfds, armed at the driver's first DRIVER_OK (on that vCPU thread): queue i
//! //    notifies at mmio_base + NOTIFY_REG_OFFSET with datamatch i (u32)
//! transport.arm_doorbells_at_driver_ok(Box::new(move |evts| {
//!     for (i, evt) in (0u32..).zip(evts) {
//!         vm_fd.register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), i)?;
//!     }
//!     Ok(())
//! }));
//! // 5. bus: the 4 KiB window
//! mmio_bus.insert(Arc::new(Mutex::new(transport)), base, MMIO_WINDOW_SIZE)?;
//! // 6. the device's event subscriber (registers `activate_evt` in `init`), on a thread
//! //    of its own (net, vsock, rng: `event_manager.add_subscriber(dev)` on the VMM thread)
//! //    (`confine` runs first on that thread: the VMM installs its seccomp filter there)
//! let thread = DeviceThread::spawn("kestrel-blk0".into(), block.clone(), confine)?; // joined on drop
//! // 7. kernel command line
//! cmdline.push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
//! // metrics at any time, without the device lock: block.lock()?.metrics() -> Arc<BlockMetrics>
//! ```
//!
//! `ioeventfd` registration is an optimisation: a guest write to the notify register that
//! reaches the bus (no ioeventfd yet, or its registration failed) signals the same EventFd.

pub mod block;
pub mod device;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod single_queue;
pub mod vsock;
pub mod worker;

#[cfg(any(test, feature = "test-harness"))]
pub mod test_utils;

use std::fmt;
use std::time::{Duration, Instant};

pub use device::{
    ActivateError, ActivationContext, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
};
pub use mmio::{MmioError, MmioTransport, MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET};

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 0x01;
    pub const DRIVER: u32 = 0x02;
    pub const DRIVER_OK: u32 = 0x04;
    pub const FEATURES_OK: u32 = 0x08;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bits shared by the transport and the device.
pub mod interrupt {
    /// The device used a buffer in a queue.
    pub const USED_RING: u32 = 0x1;
    /// The configuration (or DEVICE_NEEDS_RESET) changed.
    pub const CONFIG_CHANGE: u32 = 0x2;
}

/// Feature bits common to all devices.
pub mod features {
    /// VIRTIO_RING_F_EVENT_IDX.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// VIRTIO_F_VERSION_1: the device is a modern (non-legacy) device.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Virtio device ids (virtio 1.x, 5).
pub mod device_id {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const RNG: u32 = 4;
    pub const VSOCK: u32 = 19;
}

/// A log sink that lets a burst of messages through per time window and counts the rest, so
/// a guest that repeats a bad access cannot flood the host's log.
///
/// One limiter per device; it needs `&mut self`, which the device's lock already provides.
#[derive(Debug)]
pub struct RateLimitedLog {
    burst: u32,
    window: Duration,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        RateLimitedLog::new(10, Duration::from_secs(5))
    }
}

impl RateLimitedLog {
    /// At most `burst` messages per `window`.
    pub const fn new(burst: u32, window: Duration) -> Self {
        RateLimitedLog {
            burst,
            window,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Logs `args` at warning level unless this window's burst is used up. Returns whether
    /// the message was logged.
    pub fn warn(&mut self, args: fmt::Arguments<'_>) -> bool {
        let now = Instant::now();
        let expired = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            if self.suppressed > 0 {
                log::warn!("{} similar messages suppressed", self.suppressed);
            }
            self.window_start = Some(now);
            self.in_window = 0;
            self.suppressed = 0;
        }
        if self.in_window < self.burst {
            self.in_window = self.in_window.saturating_add(1);
            log::warn!("{args}");
            true
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            false
        }
    }

    /// How many messages this window has dropped so far.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_log_drops_after_burst_and_recovers() {
        let mut log = RateLimitedLog::new(2, Duration::from_millis(20));
        assert!(log.warn(format_args!("one")));
        assert!(log.warn(format_args!("two")));
        assert!(!log.warn(format_args!("three")));
        assert_eq!(log.suppressed(), 1);
        std::thread::sleep(Duration::from_millis(25));
        assert!(log.warn(format_args!("four")));
        assert_eq!(log.suppressed(), 0);
    }
}
