//! The interface between a virtio transport and a virtio device.
//!
//! The transport ([`MmioTransport`](super::MmioTransport)) calls these methods on **vCPU
//! threads**, under the device's mutex: configuration-space accesses, `activate` when the
//! driver writes DRIVER_OK, `reset` when it writes 0 to STATUS. Queue processing is the
//! device's business and happens on the VMM thread (see the module docs of [`super`]).

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::interrupt;
use crate::irq::IrqLine;

/// Guest memory as devices see it; the vmm creates guest memory with this same type.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Why a device refused to activate. The transport answers with DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the device needs {expected} queues, the transport passed {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {0} is required but the driver did not make it ready")]
    QueueNotReady(usize),
    #[error("the device is already active")]
    AlreadyActive,
    #[error("cannot signal the device's activation event")]
    ActivateEvent(#[source] io::Error),
}

/// Raises a device's interrupt: sets bits in the interrupt status the transport reports at
/// InterruptStatus (and the driver clears through InterruptACK), then triggers the line.
///
/// Cheap to clone; clones share the status word.
#[derive(Clone)]
pub struct VirtioInterrupt {
    status: Arc<AtomicU32>,
    line: Arc<dyn IrqLine>,
}

impl std::fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioInterrupt")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl VirtioInterrupt {
    pub fn new(line: Arc<dyn IrqLine>) -> Self {
        VirtioInterrupt {
            status: Arc::new(AtomicU32::new(0)),
            line,
        }
    }

    /// Tells the driver that a queue's used ring has new entries.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(interrupt::USED_RING)
    }

    /// Tells the driver that the configuration space (or the device status) changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.signal(interrupt::CONFIG_CHANGE)
    }

    fn signal(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.line.trigger()
    }

    /// The current interrupt status bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears `bits` (the driver's InterruptACK write).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Everything a device gets when the driver sets DRIVER_OK.
pub struct ActivationContext {
    pub mem: GuestMemoryMmap,
    /// One entry per queue of [`VirtioDevice::queue_max_sizes`], in order. A queue the driver
    /// made ready has been validated against `mem` (size, alignment, ring ranges) and has
    /// event-idx set as negotiated; queues the driver left alone are passed not ready.
    pub queues: Vec<Queue>,
    pub interrupt: VirtioInterrupt,
    /// The features the driver accepted (a subset of [`VirtioDevice::features`]).
    pub acked_features: u64,
}

/// A virtio device, driven by a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id ([`super::device_id`]).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; the number of queues is the length.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers.
    fn features(&self) -> u64;

    /// One EventFd per queue, signalled when the driver notifies that queue. The device
    /// creates them once and keeps them for its lifetime; the transport clones them (for
    /// ioeventfd registration and for notify-register writes that reach the bus).
    fn queue_events(&self) -> &[EventFd];

    /// Reads the device-specific configuration space at `offset`. Bytes past the end of
    /// the configuration space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration space at `offset` (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Takes memory, queues and interrupt and starts the device. Must not process queues on
    /// the calling (vCPU) thread: hand off to the VMM thread.
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError>;

    /// Stops the device and drops what `activate` gave it; the device may be activated again.
    fn reset(&mut self);

    fn is_activated(&self) -> bool;
}

impl std::fmt::Debug for dyn VirtioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VirtioDevice(type {})", self.device_type())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::CountingIrq;

    #[test]
    fn interrupt_sets_and_acks_status_bits() {
        let irq = CountingIrq::default();
        let intr = VirtioInterrupt::new(Arc::new(irq.clone()));
        intr.signal_used_queue().unwrap();
        intr.signal_config_change().unwrap();
        assert_eq!(
            intr.status(),
            interrupt::USED_RING | interrupt::CONFIG_CHANGE
        );
        assert_eq!(irq.count(), 2);
        let clone = intr.clone();
        clone.ack(interrupt::USED_RING);
        assert_eq!(intr.status(), interrupt::CONFIG_CHANGE);
    }
}

/// Serves a driver's read of a device's configuration space from `config`: bytes past its
/// end (or an offset that does not fit) read as zeroes. Offsets and lengths come from the
/// guest.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(src) = usize::try_from(offset)
        .ok()
        .and_then(|start| config.get(start..))
    else {
        return;
    };
    for (dst, src) in data.iter_mut().zip(src) {
        *dst = *src;
    }
}

#[cfg(test)]
mod config_space_tests {
    use super::read_config_space;

    #[test]
    fn reads_inside_partly_past_and_past_the_end() {
        let config = [1u8, 2, 3, 4];
        let mut b = [9u8; 2];
        read_config_space(&config, 1, &mut b);
        assert_eq!(b, [2, 3]);
        let mut b = [9u8; 4];
        read_config_space(&config, 2, &mut b);
        assert_eq!(b, [3, 4, 0, 0]);
        read_config_space(&config, 8, &mut b);
        assert_eq!(b, [0; 4]);
        read_config_space(&config, u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
