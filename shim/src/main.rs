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
mod service;
mod spec;
mod task;
mod vm_image;
mod volumes;

#[tokio::main]
async fn main() {
    let config = containerd_shim::Config {
        // The VM runs in this process: there are no child processes to reap.
        no_reaper: true,
        // Our own logger writes each line at once (`logger`); installed by `Service::new`.
        no_setup_logger: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<service::Service>(
        "io.containerd.kestrel.v2",
        Some(config),
    )
    .await;
}
