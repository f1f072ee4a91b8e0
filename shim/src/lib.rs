//! `containerd-shim-kestrel-v2`: containerd's runtime `io.containerd.kestrel.v2`.
//!
//! One binary, two roles: the containerd shim v2 (ttrpc task API, events) and the VMM
//! (through the `vmm` crate, on its own threads inside this process). A task is either an
//! ordinary container, whose processes the guest agent runs inside the VM, or a VM image
//! shipped as an OCI image (`/disk/*.qcow2`, KubeVirt's containerDisk layout).
//!
//! Pieces: [`task`] (the ttrpc edge) → [`model`] (states, exits, ordered [`events`]) →
//! [`guest`] (the seam) → [`host`] (the real guest: [`vm_image`], or [`rootfs`] +
//! [`agent`]).
//!
//! The library exists for the binary (`main.rs`) and the fuzz targets (`fuzz/`), which
//! reach the shim's readers of input it does not trust through [`untrusted`].

mod agent;
mod cgroups;
mod console;
mod error;
mod events;
mod forward;
mod guest;
mod hooks;
mod host;
mod logger;
mod model;
mod netns;
mod pod;
mod podnet;
mod rootfs;
pub mod service;
mod spec;
mod task;
mod vm_image;
mod volumes;

/// What the shim reads from the OCI spec containerd wrote and from the guest agent, which
/// a compromised guest controls: the fuzz targets' entry points.
pub mod untrusted {
    pub use crate::agent::{call, read_event_stream};
    pub use crate::spec::{container_vm, grouping, host_name, pod_vm, role, vm_spec};
}
