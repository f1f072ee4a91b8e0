//! virtio-net (virtio 1.x, 5.1) over a tap interface.
//!
//! - [`device`]: the [`Net`] device: features, configuration space (the MAC), activation
//!   (vCPU thread, through the transport) and the RX and TX paths (VMM thread).
//! - [`event_handler`]: the `event_manager` subscriber that runs on the VMM thread; it
//!   watches the two queue EventFds and the backend's fd.
//! - [`chain`]: pure parsing of TX chains and RX buffers, and the placement of received frames.
//! - [`backend`]: the [`NetBackend`] trait the device reads and writes frames through.
//! - [`dhcp`]: a DHCP server as a backend wrapper, for VM images on a pod network.
//! - [`tap`]: the Linux tap backend (the only `unsafe` of this crate).
//! - [`metrics`]: counters readable without the device lock.
//!
//! Threads: the transport calls the device on **vCPU threads** (config space, activation,
//! reset); the subscriber runs RX, TX and the tap on the **VMM thread**; the tap is opened on
//! whichever thread builds the device, in the pod's network namespace.
//!
//! Two queues of [`QUEUE_SIZE`] entries: receive ([`RX_INDEX`]) and transmit ([`TX_INDEX`]).
//! Frames cross the device as `virtio_net_hdr_v1` (12 bytes) + Ethernet frame, both on the
//! queues and on the tap (`IFF_VNET_HDR`), so checksum and segmentation offloads pass through.
//!
//! # Wiring (what the `vmm` crate does for each network interface)
//!
//! Steps 2–7 are the virtio-blk steps of [`crate::virtio`], with `net` for `block`:
//!
//! ```text
//! // 1. backend: a tap opened in the pod's network namespace (see `tap` for namespaces and
//! //    who deletes the interface), then the device; `mac` None lets the guest pick one
//! let tap = Tap::open("tap0")?;                      // or Tap::from_fd(fd) / Tap::create(..)
//! let mac: MacAddr = "02:00:00:00:00:01".parse()?;
//! let net = Arc::new(Mutex::new(Net::new(Box::new(tap), Some(mac))?));
//! // 2. irqfd, 3. MmioTransport::new(mem.clone(), net.clone(), irq_line)?,
//! // 4. one ioeventfd per queue (2 queues: datamatch 0 = RX, 1 = TX), 5. bus window,
//! // 6. VMM thread: the subscriber; it adds the queue EventFds and the tap fd itself
//! event_manager.add_subscriber(net.clone());
//! // 7. cmdline: virtio_mmio.device=4K@{base:#x}:{irq}
//! // metrics at any time, without the device lock: net.lock()?.metrics() -> Arc<NetMetrics>
//! ```

pub mod backend;
pub mod chain;
pub mod device;
pub mod dhcp;
pub mod event_handler;
pub mod metrics;
pub mod tap;

#[cfg(test)]
mod tests;

pub use backend::NetBackend;
pub use device::{tap_offload_flags, MacAddr, Net, NetError};
pub use dhcp::{DhcpBackend, DhcpConfig};
pub use metrics::{NetMetrics, NetMetricsSnapshot};
pub use tap::{Tap, TapError};

/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_INDEX: usize = 0;
/// Index of the transmit queue.
pub const TX_INDEX: usize = 1;
/// Size of `struct virtio_net_hdr_v1`, the header before every frame (VERSION_1 always uses
/// it, with or without mergeable buffers).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Ethernet header without VLAN tag.
pub const ETH_HLEN: usize = 14;
/// Largest Ethernet frame in either direction: a 64 KiB (GSO) packet plus an Ethernet header
/// with a VLAN tag. Larger frames are dropped and counted.
pub const MAX_FRAME_LEN: usize = 64 * 1024 + 18;
/// Largest header + frame.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
