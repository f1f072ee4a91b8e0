//! What the device needs from the host side of the link: a [`Tap`](super::tap::Tap) in
//! production, an in-memory or socketpair backend in tests.
//!
//! Called on the **VMM thread** only (the device's event subscriber), under the device lock.

use std::io;
use std::os::fd::AsRawFd;

/// A frame source and sink that speaks tap's `IFF_VNET_HDR` framing: every frame read or
/// written is one 12-byte `virtio_net_hdr_v1` followed by one Ethernet frame.
///
/// The fd ([`AsRawFd`]) is what the event loop watches for readability; it must be
/// nonblocking.
pub trait NetBackend: AsRawFd + Send {
    /// Reads one frame (header included) into `buf`; returns its length.
    /// [`io::ErrorKind::WouldBlock`] when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes one frame (header included); returns the bytes accepted.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;

    /// Tells the host which offloads the reader accepts (`TUN_F_*` bits, `TUNSETOFFLOAD`).
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;

    /// Frames are waiting that the fd's readiness does not announce (answers the backend
    /// makes itself, see [`DhcpBackend`](super::dhcp::DhcpBackend)): the device reads them
    /// after each TX pass.
    fn has_pending(&self) -> bool {
        false
    }
}
