//! A raw image file as a disk: pread/pwrite, fdatasync for flush, punched holes for
//! discard and write-zeroes.
//!
//! Used from the VMM thread (one request at a time per device, see [`super`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{check_range, DiskBackend, DiskError, IoBufs};

/// Size of the zero buffer used when punching holes is not supported.
const ZERO_CHUNK: usize = 64 << 10;

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> DiskError {
    move |source| DiskError::Io { what, source }
}

/// Punches a hole over `[offset, offset+len)` of `file` (keeping its size).
/// Returns `Ok(false)` when the filesystem cannot punch holes.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    use rustix::fs::{fallocate, FallocateFlags};
    if len == 0 {
        return Ok(true);
    }
    match fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Writes zeroes over `[offset, offset+len)` of `file` with plain writes.
pub(crate) fn write_zeroes_slow(file: &File, mut offset: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; ZERO_CHUNK];
    let end = offset.saturating_add(len);
    while offset < end {
        let n = (end - offset).min(ZERO_CHUNK as u64) as usize;
        file.write_all_at(zeroes.get(..n).unwrap_or_default(), offset)?;
        offset += n as u64;
    }
    Ok(())
}

/// A disk backed by one raw file; its size is the file's length when opened.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
    read_only: bool,
    /// Cleared the first time the filesystem refuses to punch a hole.
    can_punch: bool,
}

impl RawFile {
    /// Opens `path` (read-only when `read_only`, else read-write).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(io_err("image file (open)"))?;
        Self::from_file(file, read_only)
    }

    /// Wraps an open file or block device. A writable disk needs it opened for writing.
    pub fn from_file(mut file: File, read_only: bool) -> Result<Self, DiskError> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::FileTypeExt;
        let md = file.metadata().map_err(io_err("image file (stat)"))?;
        // A block device's size is where its end is, not its inode's length (0).
        let size = if md.file_type().is_block_device() {
            file.seek(SeekFrom::End(0))
                .map_err(io_err("block device (size)"))?
        } else {
            md.len()
        };
        Ok(RawFile {
            file,
            size,
            read_only,
            can_punch: true,
        })
    }

    fn zero_range(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        if self.can_punch {
            if punch_hole(&self.file, offset, len).map_err(io_err("image file (punch hole)"))? {
                return Ok(());
            }
            self.can_punch = false;
        }
        write_zeroes_slow(&self.file, offset, len).map_err(io_err("image file (write zeroes)"))
    }
}

impl DiskBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored_at(&mut self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), DiskError> {
        check_range(offset, bufs.len(), self.size)?;
        bufs.read_exact_at(&self.file, offset)
            .map_err(io_err("image file (read)"))
    }

    fn write_vectored_at(&mut self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, bufs.len(), self.size)?;
        bufs.write_all_at(&self.file, offset)
            .map_err(io_err("image file (write)"))
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(io_err("image file (flush)"))
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.zero_range(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.zero_range(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vmm_sys_util::tempdir::TempDir;

    fn disk(size: u64) -> (TempDir, std::path::PathBuf) {
        let dir = TempDir::new_with_prefix("/tmp/kestrel-raw").unwrap();
        let path = dir.as_path().join("disk.raw");
        File::create(&path).unwrap().set_len(size).unwrap();
        (dir, path)
    }

    #[test]
    fn read_write_flush_and_ranges() {
        let (_dir, path) = disk(1 << 20);
        let mut d = RawFile::open(&path, false).unwrap();
        assert_eq!(d.size(), 1 << 20);
        d.write_at(4096, &[0xab; 512]).unwrap();
        d.flush().unwrap();
        let mut buf = [0u8; 1024];
        d.read_at(4096 - 512, &mut buf).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 0));
        assert!(buf[512..].iter().all(|&b| b == 0xab));
        assert!(matches!(
            d.write_at((1 << 20) - 1, &[0; 2]),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.read_at(u64::MAX, &mut buf),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(d.discard(u64::MAX, 2).is_err());
    }

    #[test]
    fn discard_and_write_zeroes_punch_holes() {
        let (_dir, path) = disk(4 << 20);
        let mut d = RawFile::open(&path, false).unwrap();
        d.write_at(0, &vec![0x5a; 4 << 20]).unwrap();
        d.flush().unwrap();
        let before = std::fs::metadata(&path).unwrap().blocks();
        d.discard(1 << 20, 2 << 20).unwrap();
        d.write_zeroes(100, 50).unwrap();
        d.flush().unwrap();
        let mut buf = vec![0u8; 4 << 20];
        d.read_at(0, &mut buf).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 0x5a));
        assert!(buf[100..150].iter().all(|&b| b == 0));
        assert!(buf[150..1 << 20].iter().all(|&b| b == 0x5a));
        assert!(buf[1 << 20..3 << 20].iter().all(|&b| b == 0));
        assert!(buf[3 << 20..].iter().all(|&b| b == 0x5a));
        let after = std::fs::metadata(&path).unwrap().blocks();
        assert!(after < before, "holes were punched: {before} -> {after}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
    }

    #[test]
    fn slow_zeroes_fallback() {
        let (_dir, path) = disk(256 << 10);
        let mut d = RawFile::open(&path, false).unwrap();
        d.write_at(0, &[1; 256 << 10]).unwrap();
        d.can_punch = false;
        d.write_zeroes(1000, 200_000).unwrap();
        let mut buf = vec![0u8; 256 << 10];
        d.read_at(0, &mut buf).unwrap();
        assert!(buf[..1000].iter().all(|&b| b == 1));
        assert!(buf[1000..201_000].iter().all(|&b| b == 0));
        assert!(buf[201_000..].iter().all(|&b| b == 1));
    }

    #[test]
    fn read_only_refuses_changes() {
        let (_dir, path) = disk(1 << 16);
        let mut d = RawFile::open(&path, true).unwrap();
        assert!(d.read_only());
        assert!(matches!(d.write_at(0, &[1]), Err(DiskError::ReadOnly)));
        assert!(matches!(d.discard(0, 512), Err(DiskError::ReadOnly)));
        assert!(matches!(d.write_zeroes(0, 512), Err(DiskError::ReadOnly)));
        let mut buf = [1u8; 16];
        d.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 16]);
        d.flush().unwrap();
    }
}
