//! Interrupt lines as devices see them.
//!
//! A device raises its interrupt through an [`IrqLine`]; the `vmm` crate implements it with
//! an `EventFd` registered as a KVM irqfd, tests implement it with a counter. Triggering
//! is cheap and may happen on any thread (vCPU threads for legacy devices, the VMM thread
//! for virtio queues).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// One edge-triggered interrupt line into the guest.
pub trait IrqLine: Send + Sync {
    /// Raises the interrupt once.
    fn trigger(&self) -> io::Result<()>;
}

/// An interrupt delivered by writing an `EventFd` that the VMM registered as an irqfd.
#[derive(Debug)]
pub struct EventFdIrq(EventFd);

impl EventFdIrq {
    pub fn new(evt: EventFd) -> Self {
        EventFdIrq(evt)
    }

    /// The `EventFd` to register with the hypervisor.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl IrqLine for EventFdIrq {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// An interrupt line for tests: counts how often it was raised.
#[derive(Debug, Default, Clone)]
pub struct CountingIrq(Arc<AtomicU64>);

impl CountingIrq {
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl IrqLine for CountingIrq {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl<T: IrqLine + ?Sized> IrqLine for Arc<T> {
    fn trigger(&self) -> io::Result<()> {
        (**self).trigger()
    }
}
