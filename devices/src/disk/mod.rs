//! Disk backends: what a virtio-blk device reads and writes.
//!
//! The VMM only ever opens raw files (DESIGN.md, "Disks and images"): a QCOW2 image is
//! converted to raw before a VM starts, so the backends here are a plain raw file and a
//! copy-on-write overlay over a shared read-only raw base. A backend is used by its
//! device's thread only (one request at a time per device), hence `&mut self` and `Send`.
//! Data moves between the file and guest memory by vectored I/O ([`IoBufs`]), uncopied.

pub mod iov;
pub mod overlay;
pub mod raw;

pub use iov::IoBufs;

use std::io;

/// Errors of a disk backend. Offsets are byte offsets into the virtual disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("access of {len} bytes at offset {offset} is past the end of the {size}-byte disk")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("I/O error on the disk's {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the disk's {0} is corrupt")]
    Corrupt(String),
}

/// A virtual disk of fixed size, addressed in bytes.
///
/// Every method checks `offset + len <= size()` (with checked arithmetic) and returns
/// [`DiskError::OutOfRange`] otherwise; callers may pass guest-controlled values.
pub trait DiskBackend: Send {
    /// Size of the virtual disk in bytes.
    fn size(&self) -> u64;
    /// True when writes, discards and write-zeroes must be refused.
    fn read_only(&self) -> bool;
    /// Fills `bufs` (guest memory, straight from the kernel) from `offset`, exactly.
    fn read_vectored_at(&mut self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), DiskError>;
    /// Writes all of `bufs` at `offset`.
    fn write_vectored_at(&mut self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), DiskError>;
    /// Fills `buf` from `offset`, exactly.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.read_vectored_at(offset, &IoBufs::from_slice(buf))
    }
    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.write_vectored_at(offset, &IoBufs::from_shared(buf))
    }
    /// Makes every acknowledged write durable (fdatasync and whatever metadata it needs).
    fn flush(&mut self) -> Result<(), DiskError>;
    /// The guest no longer needs `[offset, offset+len)`; reads of it may return zeroes
    /// afterwards (punch a hole where possible).
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError>;
    /// `[offset, offset+len)` must read as zeroes afterwards.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DiskError>;
}

/// A disk of zero bytes: what a placeholder virtio-blk device holds until a real disk is
/// put behind it (see [`crate::virtio::block::Block::replace_disk`]). Every access is out
/// of range; flushes succeed.
#[derive(Debug, Default, Clone, Copy)]
pub struct EmptyDisk;

impl DiskBackend for EmptyDisk {
    fn size(&self) -> u64 {
        0
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_vectored_at(&mut self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), DiskError> {
        check_range(offset, bufs.len(), 0)
    }
    fn write_vectored_at(&mut self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), DiskError> {
        check_range(offset, bufs.len(), 0)
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        check_range(offset, len, 0)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        check_range(offset, len, 0)
    }
}

/// Checks that `[offset, offset + len)` lies within a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks_overflow_and_end() {
        assert!(check_range(0, 512, 512).is_ok());
        assert!(check_range(512, 0, 512).is_ok());
        assert!(check_range(1, 512, 512).is_err());
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
    }
}
