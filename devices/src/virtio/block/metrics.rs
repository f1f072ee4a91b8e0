//! virtio-blk counters. Updated on the disk's device thread, read from anywhere without the device lock.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one virtio-blk device.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    requests: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    get_ids: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    invalid_requests: AtomicU64,
    io_errors: AtomicU64,
}

/// A point-in-time copy of [`BlockMetrics`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockMetricsSnapshot {
    /// Every chain taken from the queue, well-formed or not.
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub get_ids: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    /// Bytes copied from the disk into the guest.
    pub read_bytes: u64,
    /// Bytes copied from the guest onto the disk.
    pub write_bytes: u64,
    /// Malformed requests (refused by the parser).
    pub invalid_requests: u64,
    /// Well-formed requests that failed (backend error, read-only disk).
    pub io_errors: u64,
}

pub(crate) enum Counter {
    Requests,
    Reads,
    Writes,
    Flushes,
    GetIds,
    Discards,
    WriteZeroes,
    ReadBytes,
    WriteBytes,
    InvalidRequests,
    IoErrors,
}

impl BlockMetrics {
    pub(crate) fn add(&self, counter: Counter, n: u64) {
        let c = match counter {
            Counter::Requests => &self.requests,
            Counter::Reads => &self.reads,
            Counter::Writes => &self.writes,
            Counter::Flushes => &self.flushes,
            Counter::GetIds => &self.get_ids,
            Counter::Discards => &self.discards,
            Counter::WriteZeroes => &self.write_zeroes,
            Counter::ReadBytes => &self.read_bytes,
            Counter::WriteBytes => &self.write_bytes,
            Counter::InvalidRequests => &self.invalid_requests,
            Counter::IoErrors => &self.io_errors,
        };
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> BlockMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockMetricsSnapshot {
            requests: get(&self.requests),
            reads: get(&self.reads),
            writes: get(&self.writes),
            flushes: get(&self.flushes),
            get_ids: get(&self.get_ids),
            discards: get(&self.discards),
            write_zeroes: get(&self.write_zeroes),
            read_bytes: get(&self.read_bytes),
            write_bytes: get(&self.write_bytes),
            invalid_requests: get(&self.invalid_requests),
            io_errors: get(&self.io_errors),
        }
    }
}
