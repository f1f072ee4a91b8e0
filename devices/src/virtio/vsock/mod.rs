//! virtio-vsock (virtio 1.x, 5.10) emulated in userspace, in Firecracker's *hybrid* model:
//! the guest's AF_VSOCK sockets are bridged to AF_UNIX sockets on the host (this host has no
//! `/dev/vhost-vsock`).
//!
//! # Protocol seen from the host
//!
//! The device listens on a Unix socket at a configured path `P`.
//!
//! - **Host → guest**: a host client connects to `P` and writes `CONNECT <port>\n`. The device
//!   sends the guest an OP_REQUEST for that port; on OP_RESPONSE it answers the client
//!   `OK <hostport>\n` (the host-side vsock port it allocated, in `[2^30, 2^31)`) and the
//!   socket becomes a byte stream to the guest's listener. If the guest resets the request
//!   (nobody listens) or does not answer in time, the client's socket is closed without a
//!   reply. A malformed command or a full connection table closes it as well.
//! - **Guest → host**: a guest connection to host CID 2, port `N`, reaches a listener at
//!   `P_N`; if nobody listens there the guest gets OP_RST.
//!
//! Either side may half-close: host EOF becomes OP_SHUTDOWN(SEND) to the guest (a full close
//! of the host socket, seen as HUP, adds RCV); a guest OP_SHUTDOWN(SEND) becomes
//! `shutdown(Write)` on the host socket once everything the guest sent has been written. When
//! both directions are done, or the guest shuts down both at once, the device flushes, sends
//! OP_RST and closes the host socket; a guest that never finishes a shutdown is reset after a
//! timeout. Flow control is virtio-vsock's credit scheme in both directions (see [`csm`]).
//!
//! # Pieces and threads
//!
//! - [`device::Vsock`]: the virtio device. Configuration space and activation run on **vCPU
//!   threads** (through the transport); queue processing runs on the **VMM thread**.
//! - [`event_handler`]: the `event_manager` subscriber, **VMM thread** only. It watches the
//!   activate event, the three queue events, the listening socket, a timer, and every host
//!   socket (added, changed and removed through `EventOps` as connections come and go).
//! - [`muxer`]: the connection table, host handshakes, port allocation, timers (VMM thread).
//! - [`csm`]: one connection's state machine: credits, shutdown, reset (VMM thread).
//! - [`packet`]: pure parsers of TX/RX descriptor chains.
//! - [`metrics`]: counters readable from any thread without the device lock.
//!
//! Host sockets are non-blocking except the `connect` to `P_N`, which, like Firecracker's,
//! is a blocking `connect(2)` on the VMM thread (immediate unless the listener's backlog is
//! full). Writes to a closed host socket return EPIPE: the process must ignore SIGPIPE (Rust
//! binaries do by default).

//!
//! # Wiring (what the `vmm` crate does for the vsock device)
//!
//! Same steps as virtio-blk (see [`crate::virtio`]), with three queues:
//!
//! ```text
//! // 1. device: guest CID (>= 3) and the host socket path (must not exist; bound now, so host
//! //    clients may connect before the guest is up; removed when the device is dropped)
//! let vsock = Arc::new(Mutex::new(Vsock::new(cid, Path::new("/run/kestrel/<id>/vsock.sock"))?));
//! // 2.-5. irqfd, MmioTransport::new(mem.clone(), vsock.clone(), irq_line)?, one ioeventfd per
//! //    queue (datamatch 0 = RX, 1 = TX, 2 = event), bus insert of the 4 KiB window
//! // 6. VMM thread: the subscriber (registers activate_evt, the listening socket and its timer
//! //    in `init`; queue EventFds on activation; host sockets as connections come and go)
//! event_manager.add_subscriber(vsock.clone());
//! // 7. kernel command line: virtio_mmio.device=4K@{base:#x}:{irq}
//! // metrics at any time, without the device lock: vsock.lock()?.metrics() -> Arc<VsockMetrics>
//! ```
//!
//! Limits (connections, per-connection buffer, timeouts) default to [`VsockLimits::default`];
//! [`Vsock::with_limits`] overrides them.

pub mod csm;
pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod muxer;
pub mod packet;

#[cfg(test)]
mod test_guest;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use device::{Vsock, VsockError};
pub use metrics::{VsockMetrics, VsockMetricsSnapshot};

/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// RX, TX, event.
pub const NUM_QUEUES: usize = 3;
/// Index of the RX queue (device → driver).
pub const RXQ: usize = 0;
/// Index of the TX queue (driver → device).
pub const TXQ: usize = 1;
/// Index of the event queue (unused: we never migrate).
pub const EVQ: usize = 2;

/// The host's CID (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// The largest data payload of one packet, both ways (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_LEN: u32 = 64 * 1024;

/// Wire constants of `include/uapi/linux/virtio_vsock.h`.
pub mod uapi {
    pub const OP_REQUEST: u16 = 1;
    pub const OP_RESPONSE: u16 = 2;
    pub const OP_RST: u16 = 3;
    pub const OP_SHUTDOWN: u16 = 4;
    pub const OP_RW: u16 = 5;
    pub const OP_CREDIT_UPDATE: u16 = 6;
    pub const OP_CREDIT_REQUEST: u16 = 7;
    /// OP_SHUTDOWN flag: the sender will receive no more data.
    pub const SHUTDOWN_RCV: u32 = 1;
    /// OP_SHUTDOWN flag: the sender will send no more data.
    pub const SHUTDOWN_SEND: u32 = 2;
    pub const TYPE_STREAM: u16 = 1;
}

/// Limits and timeouts of one device. [`Default`] is what the vmm uses; tests shrink them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VsockLimits {
    /// Connections (established or being set up, host handshakes included) at once.
    pub max_connections: usize,
    /// Per connection: bytes the guest may have in flight toward the host socket (our
    /// `buf_alloc`). Data the host socket does not take yet waits in a buffer of this size;
    /// credit is only returned as the host reads.
    pub conn_buf_size: u32,
    /// How long the guest has to answer an OP_REQUEST.
    pub request_timeout: Duration,
    /// How long the guest has to finish a shutdown (answer with OP_RST) before we reset.
    pub shutdown_timeout: Duration,
    /// How long a host client has to send its `CONNECT <port>\n` line.
    pub handshake_timeout: Duration,
}

impl Default for VsockLimits {
    fn default() -> Self {
        VsockLimits {
            max_connections: 1024,
            conn_buf_size: 256 * 1024,
            request_timeout: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
        }
    }
}
