//! The hypervisor boundary: the only module that uses `kvm-ioctls`.
//!
//! Its API is hypervisor-neutral on purpose (docs/examples.md, anti-pattern 2): callers get a
//! [`vm::Vm`] that registers memory, interrupts and doorbells, and [`vcpu::Vcpu`]s that run
//! on their own threads and dispatch I/O exits to the device buses.

pub mod vcpu;
pub mod vm;
