//! kestrel's emulated devices: the I/O bus that vCPU exits are dispatched on, the legacy
//! platform devices (COM1, i8042, boot timer, exit port), and (later) virtio devices and
//! disk image formats.
//!
//! This crate never sees KVM: the `vmm` crate wires devices to the hypervisor through the
//! small traits defined here ([`bus::BusDevice`], [`irq::IrqLine`]).

pub mod bus;
pub mod disk;
pub mod image;
pub mod irq;
pub mod legacy;
pub mod thread;
pub mod virtio;

/// An error and its causes on one line, outermost first (`what: why: why…`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
