//! A copy-on-write overlay over a shared read-only raw base (DESIGN.md, "Disks and
//! images"): N VMs of one image share one base; each writes only into its own sparse
//! overlay file.
//!
//! Used from its device's thread (one request at a time per device, see [`super`]).
//!
//! # On-disk format (version 1; all integers little-endian)
//!
//! ```text
//! offset 0      header, HEADER_LEN (4096) bytes:
//!                 0  magic          8 bytes  "KSTLCOW\0"
//!                 8  version        u32      1
//!                12  chunk_shift    u32      log2 of the chunk size (12..=24; default 16 = 64 KiB)
//!                16  base_size      u64      size of the base, = size of the virtual disk
//!                24  bitmap_offset  u64      HEADER_LEN
//!                32  bitmap_len     u64      ceil(chunks / 8) bytes
//!                40  data_offset    u64      bitmap_offset + bitmap_len rounded up to a chunk
//!                48  zeroes up to HEADER_LEN
//! bitmap_offset the allocation bitmap: bit (i % 8) of byte (i / 8) set = chunk i's data
//!               is in the overlay; clear = read it from the base
//! data_offset   the data region, base_size bytes, sparse: byte x of the disk lives at
//!               data_offset + x (so a chunk sits at its own offset)
//! ```
//!
//! # Crash consistency
//!
//! A bit only ever goes from 0 to 1. Before a chunk's bit is set in memory, its data is
//! complete in the overlay (the rest of a partially written chunk is copied from the
//! base first). The bitmap is written to the file only in [`DiskBackend::flush`], and only
//! after an `fdatasync` has made the data durable; a second `fdatasync` then makes the
//! bitmap durable before the flush is acknowledged. So after a VMM kill, every chunk
//! whose bit is set on disk has durable data, every flushed write survives, and a chunk
//! whose bit did not reach the disk reads from the base (its unflushed writes are lost,
//! as on any disk with a volatile write cache). A torn bitmap write leaves each bit
//! either old or new, both of which are consistent.
//!
//! Discard and write-zeroes punch holes in the overlay and mark the chunks allocated, so
//! the range reads as zeroes rather than as the base.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::raw::{punch_hole, write_zeroes_slow};
use super::{check_range, DiskBackend, DiskError, IoBufs};

/// Magic at offset 0 of an overlay file.
pub const OVERLAY_MAGIC: [u8; 8] = *b"KSTLCOW\0";
/// Format version written and accepted.
pub const OVERLAY_VERSION: u32 = 1;
/// Length of the header; the bitmap starts here.
pub const HEADER_LEN: u64 = 4096;
/// Default chunk size: 64 KiB.
pub const DEFAULT_CHUNK_SHIFT: u32 = 16;
/// Smallest and largest chunk_shift accepted.
pub const MIN_CHUNK_SHIFT: u32 = 12;
/// See [`MIN_CHUNK_SHIFT`].
pub const MAX_CHUNK_SHIFT: u32 = 24;
/// Largest allocation bitmap accepted (32 MiB covers 16 TiB at 64 KiB chunks).
pub const MAX_BITMAP_LEN: u64 = 64 << 20;
/// Dirty bitmap bytes are tracked, and written at flush, in pages of this size.
const BITMAP_PAGE: u64 = 4096;

/// Why an overlay could not be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("I/O error on the {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a kestrel overlay (bad magic)", .0.display())]
    BadMagic(PathBuf),
    #[error("unsupported overlay version {0}")]
    UnsupportedVersion(u32),
    #[error("the overlay belongs to a base of {overlay} bytes, but the base has {base} bytes")]
    BaseSizeMismatch { overlay: u64, base: u64 },
    #[error("the overlay is corrupt: {0}")]
    Corrupt(String),
    #[error("chunk shift {0} is outside {MIN_CHUNK_SHIFT}..={MAX_CHUNK_SHIFT}")]
    BadChunkShift(u32),
    #[error("a base of {0} bytes needs a bitmap larger than {MAX_BITMAP_LEN} bytes")]
    TooLarge(u64),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> OverlayError {
    let path = path.to_path_buf();
    move |source| OverlayError::Io { what, path, source }
}

fn disk_io(what: &'static str) -> impl FnOnce(io::Error) -> DiskError {
    move |source| DiskError::Io { what, source }
}

/// Layout derived from the base size and chunk shift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    size: u64,
    chunk_shift: u32,
    bitmap_len: u64,
    data_offset: u64,
}

impl Layout {
    fn new(size: u64, chunk_shift: u32) -> Result<Self, OverlayError> {
        if !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&chunk_shift) {
            return Err(OverlayError::BadChunkShift(chunk_shift));
        }
        let chunk = 1u64 << chunk_shift;
        let chunks = size.div_ceil(chunk);
        let bitmap_len = chunks.div_ceil(8);
        if bitmap_len > MAX_BITMAP_LEN {
            return Err(OverlayError::TooLarge(size));
        }
        // Both terms are small (bounded above), so no overflow.
        let data_offset = (HEADER_LEN + bitmap_len).div_ceil(chunk) * chunk;
        data_offset
            .checked_add(size)
            .ok_or(OverlayError::TooLarge(size))?;
        Ok(Layout {
            size,
            chunk_shift,
            bitmap_len,
            data_offset,
        })
    }

    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        let fields: [&[u8]; 7] = [
            &OVERLAY_MAGIC,
            &OVERLAY_VERSION.to_le_bytes(),
            &self.chunk_shift.to_le_bytes(),
            &self.size.to_le_bytes(),
            &HEADER_LEN.to_le_bytes(),
            &self.bitmap_len.to_le_bytes(),
            &self.data_offset.to_le_bytes(),
        ];
        let mut at = 0;
        for f in fields {
            if let Some(dst) = h.get_mut(at..at + f.len()) {
                dst.copy_from_slice(f);
            }
            at += f.len();
        }
        h
    }
}

fn le32(h: &[u8], at: usize) -> u32 {
    h.get(at..at + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_le_bytes)
}

fn le64(h: &[u8], at: usize) -> u64 {
    h.get(at..at + 8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes)
}

/// A copy-on-write disk: reads of chunks never written come from the base.
#[derive(Debug)]
pub struct Overlay {
    base: File,
    overlay: File,
    layout: Layout,
    bitmap: Vec<u8>,
    /// Pages of `bitmap` changed since the last flush.
    dirty_pages: BTreeSet<u64>,
    /// Cleared the first time the filesystem refuses to punch a hole.
    can_punch: bool,
    /// Scratch for copying the rest of a chunk from the base.
    scratch: Vec<u8>,
}

impl Overlay {
    /// Creates a new overlay file at `overlay` (which must not exist) over `base`, with
    /// 64 KiB chunks.
    pub fn create(base: &Path, overlay: &Path) -> Result<Self, OverlayError> {
        Self::create_with_chunk_shift(base, overlay, DEFAULT_CHUNK_SHIFT)
    }

    /// Like [`Overlay::create`], with chunks of `1 << chunk_shift` bytes.
    pub fn create_with_chunk_shift(
        base: &Path,
        overlay: &Path,
        chunk_shift: u32,
    ) -> Result<Self, OverlayError> {
        let base_file = open_base(base)?;
        let size = base_file.metadata().map_err(io_err("base", base))?.len();
        let layout = Layout::new(size, chunk_shift)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(overlay)
            .map_err(io_err("overlay", overlay))?;
        let init = || -> io::Result<()> {
            // The bitmap and data region are holes (zeroes) after set_len.
            file.set_len(layout.data_offset + size)?;
            file.write_all_at(&layout.encode(), 0)?;
            file.sync_all()
        };
        if let Err(e) = init() {
            let _ = std::fs::remove_file(overlay);
            return Err(io_err("overlay", overlay)(e));
        }
        Ok(Self::assemble(base_file, file, layout, Vec::new()))
    }

    /// Opens an existing overlay over `base`, checking that it was made for a base of the
    /// same size.
    pub fn open(base: &Path, overlay: &Path) -> Result<Self, OverlayError> {
        let base_file = open_base(base)?;
        let base_size = base_file.metadata().map_err(io_err("base", base))?.len();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(overlay)
            .map_err(io_err("overlay", overlay))?;
        let file_len = file.metadata().map_err(io_err("overlay", overlay))?.len();
        let mut h = [0u8; HEADER_LEN as usize];
        if file_len < HEADER_LEN {
            return Err(OverlayError::BadMagic(overlay.to_path_buf()));
        }
        file.read_exact_at(&mut h, 0)
            .map_err(io_err("overlay", overlay))?;
        if h.get(..8) != Some(&OVERLAY_MAGIC[..]) {
            return Err(OverlayError::BadMagic(overlay.to_path_buf()));
        }
        let version = le32(&h, 8);
        if version != OVERLAY_VERSION {
            return Err(OverlayError::UnsupportedVersion(version));
        }
        let size = le64(&h, 16);
        if size != base_size {
            return Err(OverlayError::BaseSizeMismatch {
                overlay: size,
                base: base_size,
            });
        }
        let layout = Layout::new(size, le32(&h, 12))?;
        if le64(&h, 24) != HEADER_LEN
            || le64(&h, 32) != layout.bitmap_len
            || le64(&h, 40) != layout.data_offset
        {
            return Err(OverlayError::Corrupt("inconsistent header".into()));
        }
        if file_len < layout.data_offset + size {
            return Err(OverlayError::Corrupt(format!(
                "file is {file_len} bytes, shorter than its data region"
            )));
        }
        // bitmap_len <= MAX_BITMAP_LEN, so this allocation is bounded.
        let mut bitmap = vec![0u8; layout.bitmap_len as usize];
        file.read_exact_at(&mut bitmap, HEADER_LEN)
            .map_err(io_err("overlay bitmap", overlay))?;
        Ok(Self::assemble(base_file, file, layout, bitmap))
    }

    /// Opens `overlay` if it exists, else creates it (64 KiB chunks).
    pub fn open_or_create(base: &Path, overlay: &Path) -> Result<Self, OverlayError> {
        match Self::create(base, overlay) {
            Err(OverlayError::Io { source, .. })
                if source.kind() == io::ErrorKind::AlreadyExists =>
            {
                Self::open(base, overlay)
            }
            other => other,
        }
    }

    fn assemble(base: File, overlay: File, layout: Layout, mut bitmap: Vec<u8>) -> Self {
        bitmap.resize(layout.bitmap_len as usize, 0);
        Overlay {
            base,
            overlay,
            layout,
            bitmap,
            dirty_pages: BTreeSet::new(),
            can_punch: true,
            scratch: Vec::new(),
        }
    }

    /// Size of one chunk in bytes.
    pub fn chunk_size(&self) -> u64 {
        1u64 << self.layout.chunk_shift
    }

    /// Number of chunks whose data lives in the overlay.
    pub fn allocated_chunks(&self) -> u64 {
        self.bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    fn is_allocated(&self, chunk: u64) -> bool {
        self.bitmap
            .get((chunk / 8) as usize)
            .is_some_and(|b| b & (1 << (chunk % 8)) != 0)
    }

    fn chunk_end(&self, chunk: u64) -> u64 {
        ((chunk + 1) << self.layout.chunk_shift).min(self.layout.size)
    }

    /// Marks every chunk overlapping `[offset, end)` (end > offset) allocated.
    fn mark(&mut self, offset: u64, end: u64) {
        let first = offset >> self.layout.chunk_shift;
        let last = (end - 1) >> self.layout.chunk_shift;
        for chunk in first..=last {
            let byte = chunk / 8;
            if let Some(b) = self.bitmap.get_mut(byte as usize) {
                let bit = 1u8 << (chunk % 8);
                if *b & bit == 0 {
                    *b |= bit;
                    self.dirty_pages.insert(byte / BITMAP_PAGE);
                }
            }
        }
    }

    /// Copies `[from, to)` of the base into the overlay (within one chunk).
    fn copy_from_base(&mut self, from: u64, to: u64) -> Result<(), DiskError> {
        if to <= from {
            return Ok(());
        }
        // Within one chunk: at most 16 MiB.
        self.scratch.resize((to - from) as usize, 0);
        self.base
            .read_exact_at(&mut self.scratch, from)
            .map_err(disk_io("base (copy-up read)"))?;
        self.overlay
            .write_all_at(&self.scratch, self.layout.data_offset + from)
            .map_err(disk_io("overlay (copy-up write)"))
    }

    /// Before `[offset, end)` is written: the parts of its first and last chunks outside
    /// the range are copied from the base if those chunks are not yet in the overlay.
    fn copy_up_edges(&mut self, offset: u64, end: u64) -> Result<(), DiskError> {
        let shift = self.layout.chunk_shift;
        let first = offset >> shift;
        let last = (end - 1) >> shift;
        if !self.is_allocated(first) {
            self.copy_from_base(first << shift, offset)?;
            if first == last {
                self.copy_from_base(end, self.chunk_end(first))?;
            }
        }
        if last != first && !self.is_allocated(last) {
            self.copy_from_base(end, self.chunk_end(last))?;
        }
        Ok(())
    }

    fn zero_range(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        check_range(offset, len, self.layout.size)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        self.copy_up_edges(offset, end)?;
        let at = self.layout.data_offset + offset;
        let mut done = false;
        if self.can_punch {
            done = punch_hole(&self.overlay, at, len).map_err(disk_io("overlay (punch hole)"))?;
            self.can_punch = done;
        }
        if !done {
            write_zeroes_slow(&self.overlay, at, len).map_err(disk_io("overlay (write zeroes)"))?;
        }
        self.mark(offset, end);
        Ok(())
    }
}

fn open_base(base: &Path) -> Result<File, OverlayError> {
    // Never writable: the base is shared by every VM of the image.
    OpenOptions::new()
        .read(true)
        .open(base)
        .map_err(io_err("base", base))
}

impl DiskBackend for Overlay {
    fn size(&self) -> u64 {
        self.layout.size
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read_vectored_at(&mut self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), DiskError> {
        check_range(offset, bufs.len(), self.layout.size)?;
        let end = offset + bufs.len();
        let shift = self.layout.chunk_shift;
        let mut pos = offset;
        while pos < end {
            // The longest run of chunks with the same allocation state.
            let allocated = self.is_allocated(pos >> shift);
            let mut run_end = self.chunk_end(pos >> shift).min(end);
            while run_end < end && self.is_allocated(run_end >> shift) == allocated {
                run_end = self.chunk_end(run_end >> shift).min(end);
            }
            let dst = bufs.range(pos - offset, run_end - offset);
            if allocated {
                dst.read_exact_at(&self.overlay, self.layout.data_offset + pos)
                    .map_err(disk_io("overlay (read)"))?;
            } else {
                dst.read_exact_at(&self.base, pos)
                    .map_err(disk_io("base (read)"))?;
            }
            pos = run_end;
        }
        Ok(())
    }

    fn write_vectored_at(&mut self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), DiskError> {
        check_range(offset, bufs.len(), self.layout.size)?;
        if bufs.is_empty() {
            return Ok(());
        }
        let end = offset + bufs.len();
        self.copy_up_edges(offset, end)?;
        // The data sits at its own offset in the overlay, so one write covers the range.
        bufs.write_all_at(&self.overlay, self.layout.data_offset + offset)
            .map_err(disk_io("overlay (write)"))?;
        self.mark(offset, end);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        // 1. Data (and punched holes) durable before any bit that points at it.
        self.overlay
            .sync_data()
            .map_err(disk_io("overlay (flush data)"))?;
        if self.dirty_pages.is_empty() {
            return Ok(());
        }
        // 2. The changed bitmap pages, then 3. make them durable.
        for &page in &self.dirty_pages {
            let start = page * BITMAP_PAGE;
            let end = (start + BITMAP_PAGE).min(self.layout.bitmap_len);
            let bytes = self
                .bitmap
                .get(start as usize..end as usize)
                .ok_or_else(|| DiskError::Corrupt("overlay bitmap".into()))?;
            self.overlay
                .write_all_at(bytes, HEADER_LEN + start)
                .map_err(disk_io("overlay (write bitmap)"))?;
        }
        self.overlay
            .sync_data()
            .map_err(disk_io("overlay (flush bitmap)"))?;
        self.dirty_pages.clear();
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.zero_range(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.zero_range(offset, len)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        // An orderly close keeps unflushed writes too; a kill relies on the ordering above.
        if !self.dirty_pages.is_empty() {
            if let Err(e) = self.flush() {
                log::warn!("flushing the overlay on close failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use vmm_sys_util::tempdir::TempDir;

    const MIB: u64 = 1 << 20;

    /// A base of `size` bytes with a recognizable pattern, and a path for the overlay.
    fn setup(size: u64) -> (TempDir, PathBuf, PathBuf, Vec<u8>) {
        let dir = TempDir::new_with_prefix("/tmp/kestrel-overlay").unwrap();
        let base = dir.as_path().join("base.raw");
        let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8 + 1).collect();
        std::fs::write(&base, &data).unwrap();
        let mut perms = std::fs::metadata(&base).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
        std::fs::set_permissions(&base, perms).unwrap();
        let overlay = dir.as_path().join("vm.overlay");
        (dir, base, overlay, data)
    }

    fn sha(path: &Path) -> Vec<u8> {
        Sha256::digest(std::fs::read(path).unwrap()).to_vec()
    }

    fn read_all(d: &mut Overlay) -> Vec<u8> {
        let mut buf = vec![0u8; d.size() as usize];
        d.read_at(0, &mut buf).unwrap();
        buf
    }

    #[test]
    fn reads_come_from_base_until_written() {
        let (_dir, base, ov, data) = setup(MIB + 4096);
        let mut d = Overlay::create(&base, &ov).unwrap();
        assert_eq!(d.size(), MIB + 4096);
        assert_eq!(read_all(&mut d), data);
        assert_eq!(d.allocated_chunks(), 0);
    }

    #[test]
    fn read_after_write_and_partial_chunks() {
        let (_dir, base, ov, mut expect) = setup(MIB + 4096);
        let base_hash = sha(&base);
        let mut d = Overlay::create(&base, &ov).unwrap();
        // Partial write inside one chunk, one across a chunk boundary, one that covers
        // whole chunks, and one in the short last chunk.
        let writes: [(u64, usize, u8); 4] = [
            (100, 10, 0xa1),
            (65536 - 300, 1000, 0xb2),
            (3 * 65536, 2 * 65536, 0xc3),
            (MIB + 10, 20, 0xd4),
        ];
        for (off, len, val) in writes {
            d.write_at(off, &vec![val; len]).unwrap();
            expect[off as usize..off as usize + len].fill(val);
        }
        assert_eq!(read_all(&mut d), expect);
        // Unaligned reads across allocated and unallocated chunks.
        let mut buf = vec![0u8; 200_000];
        d.read_at(12_345, &mut buf).unwrap();
        assert_eq!(buf[..], expect[12_345..212_345]);
        assert_eq!(d.allocated_chunks(), 1 + 1 + 2 + 1);
        d.flush().unwrap();
        drop(d);
        assert_eq!(sha(&base), base_hash, "the base is never written");
    }

    #[test]
    fn reopen_keeps_flushed_writes() {
        let (_dir, base, ov, mut expect) = setup(2 * MIB);
        {
            let mut d = Overlay::create(&base, &ov).unwrap();
            d.write_at(70_000, &[9; 5000]).unwrap();
            d.flush().unwrap();
        }
        expect[70_000..75_000].fill(9);
        let mut d = Overlay::open(&base, &ov).unwrap();
        assert_eq!(read_all(&mut d), expect);
        assert_eq!(d.allocated_chunks(), 1);
        // open_or_create opens the existing file.
        drop(d);
        let mut d = Overlay::open_or_create(&base, &ov).unwrap();
        assert_eq!(read_all(&mut d), expect);
    }

    #[test]
    fn killed_vmm_keeps_flushed_and_drops_unflushed_new_chunks() {
        let (_dir, base, ov, mut expect) = setup(2 * MIB);
        let mut d = Overlay::create(&base, &ov).unwrap();
        d.write_at(0, &[7; 4096]).unwrap();
        d.flush().unwrap();
        expect[..4096].fill(7);
        // Written but never flushed, then the process "dies" (no Drop runs).
        d.write_at(MIB, &[8; 4096]).unwrap();
        std::mem::forget(d);
        let mut d = Overlay::open(&base, &ov).unwrap();
        // The new chunk's bit never reached the disk: it reads from the base.
        assert_eq!(read_all(&mut d), expect);
    }

    #[test]
    fn discard_and_write_zeroes_read_zero() {
        let (_dir, base, ov, mut expect) = setup(MIB);
        let base_hash = sha(&base);
        let mut d = Overlay::create(&base, &ov).unwrap();
        d.discard(1000, 200_000).unwrap();
        d.write_zeroes(500_000, 65536).unwrap();
        d.write_at(700_000, &[3; 100]).unwrap();
        d.discard(700_050, 10).unwrap();
        expect[1000..201_000].fill(0);
        expect[500_000..565_536].fill(0);
        expect[700_000..700_100].fill(3);
        expect[700_050..700_060].fill(0);
        assert_eq!(read_all(&mut d), expect);
        d.flush().unwrap();
        drop(d);
        let mut d = Overlay::open(&base, &ov).unwrap();
        assert_eq!(read_all(&mut d), expect);
        assert_eq!(sha(&base), base_hash);
    }

    #[test]
    fn ranges_are_checked() {
        let (_dir, base, ov, _) = setup(MIB);
        let mut d = Overlay::create(&base, &ov).unwrap();
        let mut buf = [0u8; 2];
        assert!(matches!(
            d.read_at(MIB - 1, &mut buf),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.write_at(u64::MAX, &buf),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.discard(MIB, 1),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.write_zeroes(u64::MAX, 2),
            Err(DiskError::OutOfRange { .. })
        ));
        d.write_at(MIB, &[]).unwrap();
    }

    #[test]
    fn open_checks_the_overlay() {
        let (dir, base, ov, _) = setup(MIB);
        drop(Overlay::create(&base, &ov).unwrap());
        assert!(matches!(
            Overlay::create(&base, &ov),
            Err(OverlayError::Io { .. })
        ));
        // A base of another size.
        let other = dir.as_path().join("other.raw");
        std::fs::write(&other, vec![0u8; 2 * MIB as usize]).unwrap();
        assert!(matches!(
            Overlay::open(&other, &ov),
            Err(OverlayError::BaseSizeMismatch { overlay, base }) if overlay == MIB && base == 2 * MIB
        ));
        // Not an overlay at all.
        assert!(matches!(
            Overlay::open(&base, &base),
            Err(OverlayError::BadMagic(_))
        ));
        // A bad chunk shift in the header.
        let f = OpenOptions::new().write(true).open(&ov).unwrap();
        f.write_all_at(&40u32.to_le_bytes(), 12).unwrap();
        assert!(matches!(
            Overlay::open(&base, &ov),
            Err(OverlayError::BadChunkShift(40))
        ));
        f.write_all_at(&2u32.to_le_bytes(), 8).unwrap();
        assert!(matches!(
            Overlay::open(&base, &ov),
            Err(OverlayError::UnsupportedVersion(2))
        ));
    }

    #[test]
    fn overlay_file_stays_sparse() {
        let (_dir, base, ov, _) = setup(8 * MIB);
        let mut d = Overlay::create(&base, &ov).unwrap();
        d.write_at(4 * MIB + 10, &[1; 10]).unwrap();
        d.flush().unwrap();
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&ov).unwrap());
        // One 64 KiB chunk plus header and bitmap pages: far below 8 MiB.
        assert!(blocks * 512 < 512 << 10, "{blocks} blocks");
    }
}
