//! virtio-blk (virtio 1.x, 5.2) over a [`DiskBackend`](crate::disk::DiskBackend).
//!
//! - [`device`]: the [`Block`] device: features, configuration space, activation (vCPU
//!   thread, through the transport) and queue processing (the disk's device thread).
//! - [`event_handler`]: the `event_manager` subscriber that runs on the device thread.
//! - [`request`]: the pure parser of request descriptor chains.
//! - [`metrics`]: counters readable without the device lock.
//!
//! One request queue of [`QUEUE_SIZE`] entries; requests run in order on the disk's own
//! thread, their data moved by vectored I/O straight between guest memory and the file.

pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod request;

#[cfg(test)]
mod tests;

pub use device::{Block, BlockError, QUEUE_SIZE, SERIAL_LEN};
pub use metrics::{BlockMetrics, BlockMetricsSnapshot};
