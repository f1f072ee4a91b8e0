//! kestrel's virtual machine monitor: a KVM VM with guest memory, vCPUs, x86_64 direct
//! kernel boot (PVH or the 64-bit Linux protocol), the legacy platform devices, and the
//! threads that run it.
//!
//! Synchronous by design: no tokio, no ttrpc. Callers (the `kestrel` CLI, the containerd
//! shim) describe a VM with [`VmConfig`], start it with [`start_vm`], talk to it through a
//! [`ControlSender`] (non-blocking, with a reply callback) and learn how it ended from
//! [`VmmHandle::wait`] or [`VmConfig::on_exit`].
//!
//! Threads: one per vCPU (running `KVM_RUN`, dispatching I/O exits to the device buses),
//! one VMM thread (an `event_manager` loop owning every host-side event source) and one
//! per disk; each confines itself with a seccomp filter before serving the guest
//! ([`seccomp`]).
//! `kvm-ioctls` is used only in [`vstate`].

pub mod arch;
pub mod assets;
pub mod builder;
pub mod config;
pub mod device_manager;
pub mod exit;
pub mod seccomp;
pub mod vmm_thread;
pub mod vstate;

pub use builder::{start_vm, BuildVmError, VmmHandle};
pub use config::{VmConfig, DEFAULT_CMDLINE};
pub use device_manager::{DeviceMetrics, DiskConfig, NetConfig, TapSource, VsockConfig};
pub use devices::virtio::net::{DhcpConfig, MacAddr};
pub use exit::VmExit;
pub use seccomp::SeccompLevel;
pub use vmm_thread::{ControlError, ControlSender, VmAction};

/// An error and its causes on one line (see [`devices::error_chain`]): how the CLI and
/// the shim report errors.
pub use devices::error_chain;
