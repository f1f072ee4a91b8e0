//! QCOW2 header and table parsing, with every value bounded before it is used.
//!
//! The input is hostile (DESIGN.md, "Disks and images"): [`Qcow2Header::parse`] refuses
//! backing files, external data files, encryption, extended L2 entries, unknown
//! incompatible features, the corrupt bit and any size or offset out of bounds *before*
//! anything is allocated or any other part of the file is read. The helpers that decode
//! L1/L2 entries and compressed clusters check alignment, ranges and output size again
//! for every entry, since tables are read lazily, one at a time.
//!
//! Only the active image is read: internal snapshots are ignored and refcounts are never
//! consulted (so the dirty bit, which only says refcounts may be stale, is accepted).
//!
//! Used by the converter ([`super::convert`]), which runs on the caller's thread before
//! the VM starts.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Largest virtual disk accepted: 16 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 16 << 40;
/// Smallest and largest cluster_bits (512 bytes to 2 MiB), as qemu.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table accepted, in bytes (qemu's QCOW_MAX_L1_SIZE).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted, in bytes (qemu's QCOW_MAX_REFTABLE_SIZE).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest number of internal snapshots accepted (qemu's QCOW_MAX_SNAPSHOTS).
pub const MAX_SNAPSHOTS: u32 = 65536;

const V2_HEADER_LEN: u32 = 72;
const V3_HEADER_LEN: u32 = 104;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Largest extra data of one snapshot table entry (qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA).
const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// Largest snapshot table (qemu's QCOW_MAX_SNAPSHOTS_SIZE).
const MAX_SNAPSHOT_TABLE_BYTES: u64 = 1024 * MAX_SNAPSHOTS as u64;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Bits 9..=55 of an L1 or standard L2 entry: the host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1 << 0;
/// Bits 1..=8 and 56..=61 of a standard L2 entry must be zero.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Why a QCOW2 image is refused or could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("I/O error reading the QCOW2 {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("not a QCOW2 image (bad magic)")]
    BadMagic,
    #[error("the file is too short for a QCOW2 header")]
    Truncated,
    #[error("unsupported QCOW2 version {0} (only 2 and 3)")]
    UnsupportedVersion(u32),
    #[error("QCOW2 images with a backing file are refused")]
    BackingFile,
    #[error("QCOW2 images with an external data file are refused")]
    ExternalDataFile,
    #[error("encrypted QCOW2 images are refused")]
    Encrypted,
    #[error("QCOW2 images with extended L2 entries (subclusters) are not supported")]
    ExtendedL2,
    #[error("the QCOW2 image is marked corrupt")]
    MarkedCorrupt,
    #[error("unknown QCOW2 incompatible feature bits {0:#x}")]
    UnknownIncompatibleFeatures(u64),
    #[error("unsupported QCOW2 compression type {0} (only zlib and zstd)")]
    UnsupportedCompression(u8),
    #[error("invalid QCOW2 header: {0}")]
    InvalidHeader(String),
    #[error("invalid QCOW2 table entry: {0}")]
    InvalidEntry(String),
    #[error("compressed cluster at host offset {offset:#x} does not decompress to one cluster: {reason}")]
    BadCompressedCluster { offset: u64, reason: String },
    #[error("compressed cluster at host offset {offset:#x} could not be decompressed")]
    Decompress {
        offset: u64,
        #[source]
        source: io::Error,
    },
}

fn invalid(msg: impl Into<String>) -> Qcow2Error {
    Qcow2Error::InvalidHeader(msg.into())
}

/// The compression used by compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (no zlib header), as qemu writes it.
    Deflate,
    /// One or more zstd frames.
    Zstd,
}

/// A validated QCOW2 header. Every field is within the bounds documented on the
/// constants of this module and consistent with the file's length.
#[derive(Debug, Clone)]
pub struct Qcow2Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub virtual_size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
}

fn be32(buf: &[u8], at: usize) -> Result<u32, Qcow2Error> {
    buf.get(at..at.saturating_add(4))
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or(Qcow2Error::Truncated)
}

fn be64(buf: &[u8], at: usize) -> Result<u64, Qcow2Error> {
    buf.get(at..at.saturating_add(8))
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or(Qcow2Error::Truncated)
}

/// Reads as much of `buf` as the file holds at `offset`; returns the length read.
pub(crate) fn read_up_to(file: &File, mut offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..) {
        if rest.is_empty() {
            break;
        }
        match file.read_at(rest, offset) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                offset = offset.saturating_add(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl Qcow2Header {
    /// Bytes needed by [`Qcow2Header::parse`]: the header and its extensions live in the
    /// first cluster, and the largest cluster accepted is 2 MiB, but everything we read
    /// must be within the first cluster; 4 KiB covers the fixed header of every version.
    pub const PROBE_LEN: usize = 4096;

    /// Reads and validates the header of `file` (`file_len` bytes long).
    pub fn read(file: &File, file_len: u64) -> Result<Self, Qcow2Error> {
        let mut first = vec![0u8; Self::PROBE_LEN];
        let n = read_up_to(file, 0, &mut first).map_err(|source| Qcow2Error::Io {
            what: "header",
            source,
        })?;
        first.truncate(n);
        let header = Self::parse(&first, file_len)?;
        // The extensions may run past the probe when clusters are bigger than 4 KiB.
        let ext_end = header.cluster_size();
        if ext_end > first.len() as u64 && (n as u64) < file_len {
            let len = usize::try_from(ext_end.min(file_len))
                .map_err(|_| invalid("cluster size does not fit in memory"))?;
            let mut cluster = vec![0u8; len];
            let n = read_up_to(file, 0, &mut cluster).map_err(|source| Qcow2Error::Io {
                what: "header extensions",
                source,
            })?;
            cluster.truncate(n);
            header.check_extensions(&cluster)?;
        } else {
            header.check_extensions(&first)?;
        }
        header.check_snapshots(file)?;
        Ok(header)
    }

    /// Walks the snapshot table as qemu does when it opens an image (the snapshots are
    /// never read otherwise): every entry's extra data at most [`MAX_SNAPSHOT_EXTRA`]
    /// bytes, the table at most [`MAX_SNAPSHOT_TABLE_BYTES`]. Past the end of the file
    /// reads as zeroes, as in qemu.
    fn check_snapshots(&self, file: &File) -> Result<(), Qcow2Error> {
        let mut offset = self.snapshots_offset;
        for i in 0..self.nb_snapshots {
            offset = offset.next_multiple_of(8);
            let mut h = [0u8; 40];
            read_up_to(file, offset, &mut h).map_err(|source| Qcow2Error::Io {
                what: "snapshot table",
                source,
            })?;
            let field16 = |at: usize| {
                h.get(at..at + 2)
                    .and_then(|b| <[u8; 2]>::try_from(b).ok())
                    .map_or(0, u16::from_be_bytes)
            };
            let id_len = u64::from(field16(12));
            let name_len = u64::from(field16(14));
            let extra = be32(&h, 36)?;
            if extra > MAX_SNAPSHOT_EXTRA {
                return Err(invalid(format!(
                    "snapshot table entry {i} has {extra} bytes of extra data (at most \
                     {MAX_SNAPSHOT_EXTRA})"
                )));
            }
            offset = offset + 40 + u64::from(extra) + id_len + name_len;
            if offset - self.snapshots_offset > MAX_SNAPSHOT_TABLE_BYTES {
                return Err(invalid(format!(
                    "the snapshot table is larger than {MAX_SNAPSHOT_TABLE_BYTES} bytes"
                )));
            }
        }
        Ok(())
    }

    /// Validates the fixed header in `buf` (the first bytes of a file of `file_len` bytes).
    /// Header extensions are checked by [`Qcow2Header::check_extensions`].
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Self, Qcow2Error> {
        if buf.get(0..4) != Some(&QCOW2_MAGIC[..]) {
            return Err(if buf.len() < 4 {
                Qcow2Error::Truncated
            } else {
                Qcow2Error::BadMagic
            });
        }
        let version = be32(buf, 4)?;
        if version != 2 && version != 3 {
            return Err(Qcow2Error::UnsupportedVersion(version));
        }
        let backing_file_offset = be64(buf, 8)?;
        let cluster_bits = be32(buf, 20)?;
        let virtual_size = be64(buf, 24)?;
        let crypt_method = be32(buf, 32)?;
        let l1_size = be32(buf, 36)?;
        let l1_table_offset = be64(buf, 40)?;
        let refcount_table_offset = be64(buf, 48)?;
        let refcount_table_clusters = be32(buf, 56)?;
        let nb_snapshots = be32(buf, 60)?;
        let snapshots_offset = be64(buf, 64)?;

        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 3 {
            (
                be64(buf, 72)?,
                be64(buf, 80)?,
                be64(buf, 88)?,
                be32(buf, 96)?,
                be32(buf, 100)?,
            )
        } else {
            (0, 0, 0, 4, V2_HEADER_LEN)
        };

        // Refusals that name a feature come first, so the user learns what is wrong.
        if backing_file_offset != 0 {
            return Err(Qcow2Error::BackingFile);
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Qcow2Error::ExternalDataFile);
        }
        if crypt_method != 0 {
            return Err(Qcow2Error::Encrypted);
        }
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Qcow2Error::UnknownIncompatibleFeatures(unknown));
        }
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(Qcow2Error::MarkedCorrupt);
        }
        if incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(Qcow2Error::ExtendedL2);
        }

        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(format!(
                "cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        if version == 3 {
            if header_length < V3_HEADER_LEN || header_length % 8 != 0 {
                return Err(invalid(format!("header length {header_length}")));
            }
            if u64::from(header_length) > cluster_size {
                return Err(invalid("header length exceeds one cluster"));
            }
            if refcount_order > 6 {
                return Err(invalid(format!("refcount order {refcount_order}")));
            }
        }
        let compression = if header_length > V3_HEADER_LEN {
            let ty = *buf
                .get(V3_HEADER_LEN as usize)
                .ok_or(Qcow2Error::Truncated)?;
            match ty {
                0 => Compression::Deflate,
                1 if incompatible & INCOMPAT_COMPRESSION != 0 => Compression::Zstd,
                1 => return Err(invalid("zstd compression without the compression-type bit")),
                other => return Err(Qcow2Error::UnsupportedCompression(other)),
            }
        } else if incompatible & INCOMPAT_COMPRESSION != 0 {
            return Err(invalid(
                "compression-type bit set but no compression type field",
            ));
        } else {
            Compression::Deflate
        };

        if virtual_size > MAX_VIRTUAL_SIZE {
            return Err(invalid(format!(
                "virtual size {virtual_size} exceeds the limit of {MAX_VIRTUAL_SIZE} bytes"
            )));
        }
        let needed = l1_entries_for(virtual_size, cluster_bits);
        if needed.saturating_mul(8) > MAX_L1_BYTES {
            return Err(invalid(format!(
                "virtual size {virtual_size} needs an L1 table larger than {MAX_L1_BYTES} bytes \
                 with {cluster_size}-byte clusters"
            )));
        }
        if u64::from(l1_size) < needed {
            return Err(invalid(format!(
                "L1 table of {l1_size} entries is too small for virtual size {virtual_size} \
                 (needs {needed})"
            )));
        }
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(invalid(format!(
                "L1 table of {l1_size} entries is too large"
            )));
        }
        if l1_size > 0 {
            check_table(
                "L1 table",
                l1_table_offset,
                l1_bytes,
                cluster_size,
                file_len,
            )?;
        }
        let reftable_bytes = u64::from(refcount_table_clusters)
            .checked_mul(cluster_size)
            .ok_or_else(|| invalid("refcount table size overflows"))?;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(invalid(format!(
                "refcount table of {refcount_table_clusters} clusters is too large"
            )));
        }
        check_table(
            "refcount table",
            refcount_table_offset,
            reftable_bytes,
            cluster_size,
            file_len,
        )?;
        if nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid(format!("{nb_snapshots} snapshots")));
        }
        // qemu checks the alignment of these tables even when they are empty.
        for (what, offset) in [
            ("L1 table", l1_table_offset),
            ("snapshot table", snapshots_offset),
        ] {
            if offset % cluster_size != 0 {
                return Err(invalid(format!(
                    "{what} offset {offset:#x} is not cluster-aligned"
                )));
            }
        }
        if nb_snapshots > 0 {
            check_table(
                "snapshot table",
                snapshots_offset,
                1,
                cluster_size,
                file_len,
            )?;
        }
        if refcount_table_clusters == 0 {
            return Err(invalid("the image has no refcount table"));
        }
        if autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 && incompatible & INCOMPAT_DATA_FILE == 0 {
            return Err(invalid(
                "the raw-external-data bit is set without an external data file",
            ));
        }

        Ok(Qcow2Header {
            version,
            cluster_bits,
            // qemu sizes a QCOW2 disk in whole 512-byte sectors, rounding down.
            virtual_size: virtual_size & !511,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible_features: incompatible,
            compatible_features: compatible,
            autoclear_features: autoclear,
            refcount_order,
            header_length,
            compression,
        })
    }

    /// Walks the header extensions in `first_cluster` (the first bytes of the file, up to
    /// one cluster) and refuses the ones that name another file or encryption. Unknown
    /// extensions are ignored, as the specification requires.
    pub fn check_extensions(&self, first_cluster: &[u8]) -> Result<(), Qcow2Error> {
        let end = first_cluster.len().min(self.cluster_size_usize());
        let mut at = self.header_length as usize;
        while at < end {
            let past = || {
                invalid(format!(
                    "the header extension at offset {at} runs past the first cluster \
                     ({end} bytes)"
                ))
            };
            let ty = be32(first_cluster, at).map_err(|_| past())?;
            let len = be32(first_cluster, at.saturating_add(4)).map_err(|_| past())?;
            // qemu checks the length before the type, the end marker's too.
            if (len as usize) > end.saturating_sub(at + 8) {
                return Err(invalid(format!(
                    "header extension of type {ty:#010x} at offset {at} ({len} bytes) runs \
                     past the first cluster ({end} bytes)"
                )));
            }
            if ty == EXT_END {
                return Ok(());
            }
            match ty {
                // Without a backing file (refused by `parse`) the backing format is unused,
                // as in qemu.
                EXT_BACKING_FORMAT => {}
                EXT_DATA_FILE => return Err(Qcow2Error::ExternalDataFile),
                EXT_CRYPTO_HEADER => return Err(Qcow2Error::Encrypted),
                _ => {}
            }
            let padded = (len as usize)
                .checked_add(7)
                .map(|l| l & !7)
                .ok_or_else(|| invalid("header extension length overflows"))?;
            at = at
                .checked_add(8)
                .and_then(|a| a.checked_add(padded))
                .filter(|&a| a <= end)
                .ok_or_else(|| {
                    invalid(format!(
                        "header extension of type {ty:#010x} at offset {at} ({len} bytes) runs \
                         past the first cluster ({end} bytes)"
                    ))
                })?;
        }
        Ok(())
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    fn cluster_size_usize(&self) -> usize {
        1usize << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Bytes of virtual disk covered by one L2 table.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size() * self.l2_entries()
    }

    /// L1 entries that map the virtual disk (the rest, if any, map snapshot VM state).
    pub fn l1_entries_needed(&self) -> u64 {
        l1_entries_for(self.virtual_size, self.cluster_bits)
    }
}

/// Number of L1 entries needed to map `size` bytes with `cluster_bits` clusters.
fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    // cluster_bits <= 21, so the shift is at most 2*21-3 = 39 bits.
    let shift = cluster_bits * 2 - 3;
    size.div_ceil(1u64 << shift)
}

fn check_table(
    what: &str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), Qcow2Error> {
    if offset % cluster_size != 0 {
        return Err(invalid(format!(
            "{what} offset {offset:#x} is not cluster-aligned"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(invalid(format!(
            "{what} at {offset:#x} ({len} bytes) lies past the end of the {file_len}-byte file"
        ))),
    }
}

/// Where the data of one guest cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterMapping {
    /// Reads as zeroes (unallocated with no backing file, or the zero flag).
    Zero,
    /// Uncompressed data at this cluster-aligned host offset (within the file).
    Data(u64),
    /// Compressed data: `len` bytes at host offset `offset` (clamped to the file's end).
    Compressed { offset: u64, len: u64 },
}

impl Qcow2Header {
    /// Decodes an L1 entry: the host offset of its L2 table, or `None` if unallocated.
    pub fn l2_table_offset(&self, l1_entry: u64, file_len: u64) -> Result<Option<u64>, Qcow2Error> {
        let offset = l1_entry & OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        let cs = self.cluster_size();
        if offset % cs != 0 {
            return Err(Qcow2Error::InvalidEntry(format!(
                "L2 table offset {offset:#x} is not cluster-aligned"
            )));
        }
        match offset.checked_add(cs) {
            Some(end) if end <= file_len => Ok(Some(offset)),
            _ => Err(Qcow2Error::InvalidEntry(format!(
                "L2 table at {offset:#x} lies past the end of the file"
            ))),
        }
    }

    /// Decodes a standard L2 entry, the one of the cluster at `guest` (for messages).
    pub fn cluster_mapping(
        &self,
        l2_entry: u64,
        guest: u64,
        file_len: u64,
    ) -> Result<ClusterMapping, Qcow2Error> {
        if l2_entry & L2_COMPRESSED != 0 {
            // Bits 0..x-1: host offset; bits x..61: additional 512-byte sectors.
            let x = 62 - (self.cluster_bits - 8);
            let offset = l2_entry & ((1u64 << x) - 1);
            let sectors = ((l2_entry >> x) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
            // sectors <= 2^13, so this cannot overflow; offset % 512 < 512 <= sectors*512.
            let len = sectors * 512 - (offset % 512);
            if offset >= file_len {
                return Err(Qcow2Error::InvalidEntry(format!(
                    "compressed cluster at {offset:#x} (guest offset {guest:#x}) lies past the \
                     end of the file"
                )));
            }
            // qemu reads past EOF as zeroes; the decompressor fails if it needs them.
            let len = len.min(file_len - offset);
            return Ok(ClusterMapping::Compressed { offset, len });
        }
        let offset = l2_entry & OFFSET_MASK;
        if l2_entry & L2_RESERVED != 0 {
            return Err(Qcow2Error::InvalidEntry(format!(
                "L2 entry {l2_entry:#x} for guest offset {guest:#x} has reserved bits set"
            )));
        }
        if l2_entry & L2_ZERO != 0 || offset == 0 {
            return Ok(ClusterMapping::Zero);
        }
        if offset % self.cluster_size() != 0 {
            return Err(Qcow2Error::InvalidEntry(format!(
                "data cluster offset {offset:#x} (guest offset {guest:#x}) is not cluster-aligned"
            )));
        }
        if offset >= file_len {
            return Err(Qcow2Error::InvalidEntry(format!(
                "data cluster at {offset:#x} (guest offset {guest:#x}) lies past the end of the \
                 file"
            )));
        }
        Ok(ClusterMapping::Data(offset))
    }
}

/// Decompresses one compressed cluster into `out` (exactly one cluster long), refusing
/// data that would inflate past it or fall short of it.
pub struct Decompressor {
    kind: Compression,
    deflate: flate2::Decompress,
    zstd: Option<zstd::stream::raw::Decoder<'static>>,
    /// One cluster plus one byte, to detect output past the cluster.
    scratch: Vec<u8>,
}

impl Decompressor {
    /// A decompressor for `kind` and clusters of `cluster_size` bytes.
    pub fn new(kind: Compression, cluster_size: usize) -> Result<Self, Qcow2Error> {
        let zstd = match kind {
            Compression::Deflate => None,
            Compression::Zstd => {
                let mut d = zstd::stream::raw::Decoder::new()
                    .map_err(|source| Qcow2Error::Decompress { offset: 0, source })?;
                // A window larger than a cluster is useless for one cluster of output;
                // bound it so a hostile frame cannot make zstd allocate a huge one.
                d.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(22))
                    .map_err(|source| Qcow2Error::Decompress { offset: 0, source })?;
                Some(d)
            }
        };
        Ok(Decompressor {
            kind,
            deflate: flate2::Decompress::new(false),
            zstd,
            scratch: vec![0; cluster_size.saturating_add(1)],
        })
    }

    /// Decompresses `input` (read from host offset `offset`) into `out`; returns the
    /// bytes of `input` the compressed data really took.
    pub fn decompress(
        &mut self,
        offset: u64,
        input: &[u8],
        out: &mut [u8],
    ) -> Result<u64, Qcow2Error> {
        let bad = |reason: &str| Qcow2Error::BadCompressedCluster {
            offset,
            reason: reason.to_string(),
        };
        match self.kind {
            Compression::Deflate => {
                self.deflate.reset(false);
                let status = self
                    .deflate
                    .decompress(input, &mut self.scratch, flate2::FlushDecompress::Finish)
                    .map_err(|e| Qcow2Error::Decompress {
                        offset,
                        source: io::Error::new(io::ErrorKind::InvalidData, e),
                    })?;
                let produced = usize::try_from(self.deflate.total_out()).unwrap_or(usize::MAX);
                if produced > out.len() {
                    return Err(bad("it inflates past one cluster"));
                }
                if produced < out.len() {
                    return Err(bad(match status {
                        flate2::Status::StreamEnd => "it inflates to less than one cluster",
                        _ => "the compressed data is truncated",
                    }));
                }
                out.copy_from_slice(self.scratch.get(..produced).ok_or_else(|| bad("size"))?);
                Ok(self.deflate.total_in())
            }
            Compression::Zstd => {
                use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
                let dec = self.zstd.as_mut().ok_or_else(|| bad("no zstd decoder"))?;
                dec.reinit()
                    .map_err(|source| Qcow2Error::Decompress { offset, source })?;
                let mut inb = InBuffer::around(input);
                let mut outb = OutBuffer::around(&mut self.scratch[..]);
                let mut remaining;
                loop {
                    let (in_before, out_before) = (inb.pos(), outb.pos());
                    remaining = dec
                        .run(&mut inb, &mut outb)
                        .map_err(|source| Qcow2Error::Decompress { offset, source })?;
                    if outb.pos() > out.len() {
                        return Err(bad("it inflates past one cluster"));
                    }
                    if outb.pos() == out.len() && remaining == 0 {
                        break;
                    }
                    if inb.pos() == in_before && outb.pos() == out_before {
                        return Err(bad(if outb.pos() < out.len() {
                            "it inflates to less than one cluster"
                        } else {
                            "the frame does not end after one cluster"
                        }));
                    }
                    if remaining == 0 && inb.pos() == input.len() {
                        return Err(bad("it inflates to less than one cluster"));
                    }
                }
                let produced = outb.pos();
                out.copy_from_slice(self.scratch.get(..produced).ok_or_else(|| bad("size"))?);
                Ok(inb.pos() as u64)
            }
        }
    }
}
