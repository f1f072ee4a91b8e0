//! Streaming QCOW2/raw → raw conversion with sparse output and bounded memory.
//!
//! Runs before the VM exists, on the caller's thread (the image cache or the `kestrel
//! convert` command); nothing here is used by the VMM.
//!
//! Memory is bounded by the cluster size, not the image: the L1 table is read in pieces
//! of at most [`L1_CHUNK_ENTRIES`] entries, one L2 table (one cluster) at a time, runs of
//! contiguous data clusters up to [`RUN_BYTES`], and a write buffer of [`RUN_BYTES`].
//! Before the output is touched, the header is validated ([`Qcow2Header::read`]) and a
//! first pass over the L1 and L2 tables checks every entry (alignment, offsets within the
//! file), so a hostile image is refused before anything is written; only a compressed
//! cluster that does not decompress to exactly one cluster is found mid-way (the caller
//! then discards its temporary output). The output is sized with `ftruncate` first;
//! unallocated clusters, zero clusters and all-zero [`ZERO_BLOCK`]-byte blocks of data are
//! never written, so they stay holes.
//!
//! The work is bounded by the input, not by what its tables claim: the first pass keeps a
//! bitmap of the file's clusters ([`HostMap`]) and refuses an L2 table or a data cluster
//! used twice or overlapping the header, the L1 table or the refcount table (a 16 MiB file
//! whose L2 entries all name one cluster would otherwise describe 16 TiB of data); the
//! compressed data actually decompressed may not add up to more bytes than the file has.
//! Before writing, the output's filesystem must have room for every allocated cluster.
//! [`Limits`] adds a deadline and a cancellation flag, checked at least once per L2 table.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::qcow2::{read_up_to, ClusterMapping, Decompressor, Qcow2Error, Qcow2Header};
use super::ImageFormat;

/// Granularity of zero detection in the output (and of its holes).
pub const ZERO_BLOCK: usize = 4096;
/// Largest read of contiguous data clusters, and size of the output buffer.
pub const RUN_BYTES: usize = 2 << 20;
/// L1 entries read at once.
pub const L1_CHUNK_ENTRIES: usize = 4096;
/// Progress is reported at least every this many bytes of virtual disk.
pub const PROGRESS_STEP: u64 = 16 << 20;

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("the QCOW2 input is refused or unreadable")]
    Qcow2(#[source] Qcow2Error),
    #[error("I/O error on the {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot use the input")]
    Input(#[source] io::Error),
    #[error("the raw input is larger than the {limit}-byte limit")]
    TooLarge { limit: u64 },
    #[error("cannot make the output {size} bytes long (the virtual size)")]
    SizeOutput {
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "the output's filesystem has {free} bytes free; the image's allocated clusters need up \
         to {needed}"
    )]
    NoSpace { needed: u64, free: u64 },
    #[error("the conversion did not finish within {0:?}")]
    TimedOut(Duration),
    #[error("the conversion was cancelled")]
    Cancelled,
}

/// Bounds on one conversion, checked at least once per L2 table (or 2 MiB of raw data).
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Give up with [`ConvertError::TimedOut`] after this long.
    pub timeout: Option<Duration>,
    /// Give up with [`ConvertError::Cancelled`] once this is set.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// [`Limits`] of a running conversion.
struct Budget<'a> {
    limits: &'a Limits,
    deadline: Option<Instant>,
}

impl<'a> Budget<'a> {
    fn new(limits: &'a Limits) -> Self {
        Budget {
            limits,
            deadline: limits.timeout.map(|t| Instant::now() + t),
        }
    }

    fn check(&self) -> Result<(), ConvertError> {
        if self
            .limits
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return Err(ConvertError::Cancelled);
        }
        match (self.deadline, self.limits.timeout) {
            (Some(d), Some(t)) if Instant::now() >= d => Err(ConvertError::TimedOut(t)),
            _ => Ok(()),
        }
    }
}

impl From<Qcow2Error> for ConvertError {
    fn from(e: Qcow2Error) -> Self {
        ConvertError::Qcow2(e)
    }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ConvertError {
    move |source| ConvertError::Io { what, source }
}

/// What a conversion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertStats {
    /// Format of the input.
    pub format: ImageFormat,
    /// Size of the virtual disk, and of the output file.
    pub virtual_size: u64,
    /// Bytes of data actually written to the output (the rest are holes).
    pub bytes_written: u64,
}

/// Converts `input` (of `format`) into `output`, a raw image of the virtual disk.
///
/// `output` must be open for writing; it is truncated and resized to the virtual size and
/// written sparsely. It is *not* synced: the caller decides (the cache fsyncs before it
/// renames a base into place, `kestrel convert` fdatasyncs before its rename). `progress(done, total)` is
/// called with virtual bytes processed as the conversion advances (at least once at the
/// end, with `done == total`). On error the output holds a partial image: callers write
/// to a temporary file and rename it only on success (see [`super::cache`]).
pub fn convert(
    input: &File,
    format: ImageFormat,
    output: &File,
    limits: &Limits,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats, ConvertError> {
    let budget = Budget::new(limits);
    let file_len = super::input_len(input).map_err(ConvertError::Input)?;
    // Mostly sequential reads: ask for a larger readahead (advisory, errors ignored).
    let _ = rustix::fs::fadvise(input, 0, None, rustix::fs::Advice::Sequential);
    let (virtual_size, bytes_written) = match format {
        ImageFormat::Qcow2 => {
            // Everything in the header is validated before the output is touched.
            let header = Qcow2Header::read(input, file_len)?;
            let written = convert_qcow2(input, file_len, &header, output, &budget, progress)?;
            (header.virtual_size, written)
        }
        ImageFormat::Raw => {
            if file_len > super::qcow2::MAX_VIRTUAL_SIZE {
                return Err(ConvertError::TooLarge {
                    limit: super::qcow2::MAX_VIRTUAL_SIZE,
                });
            }
            // qemu sizes a raw disk in whole 512-byte sectors, rounding up (zeroes).
            let size = file_len.next_multiple_of(512);
            let meta = input.metadata().map_err(io_err("input"))?;
            let allocated = if meta.file_type().is_file() {
                (meta.blocks() * 512).min(file_len)
            } else {
                file_len
            };
            check_space(output, allocated)?;
            prepare_output(output, size)?;
            let written = copy_raw(input, file_len, output, &budget, progress)?;
            (size, written)
        }
    };
    progress(virtual_size, virtual_size);
    Ok(ConvertStats {
        format,
        virtual_size,
        bytes_written,
    })
}

fn prepare_output(output: &File, size: u64) -> Result<(), ConvertError> {
    // Truncating to 0 only when needed: on ext4 a truncate to 0 arms "auto_da_alloc",
    // which starts writeback of the whole file at close and slows the conversion down.
    if output.metadata().map_err(io_err("output"))?.len() != 0 {
        output.set_len(0).map_err(io_err("output"))?;
    }
    output
        .set_len(size)
        .map_err(|source| ConvertError::SizeOutput { size, source })
}

/// Refuses to start when the output's filesystem has less than `needed` bytes free.
pub(crate) fn check_space(output: &File, needed: u64) -> Result<(), ConvertError> {
    let st = rustix::fs::fstatvfs(output).map_err(|e| io_err("output")(e.into()))?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if needed > free {
        return Err(ConvertError::NoSpace { needed, free });
    }
    Ok(())
}

/// One bit per cluster of the input file: set for the header, the L1 and refcount tables,
/// every L2 table and every data cluster, each of which may be used once.
pub(crate) struct HostMap {
    bits: Vec<u64>,
    cluster_bits: u32,
    /// Clusters marked.
    claimed: u64,
}

/// Largest [`HostMap`] (64 MiB): files of more clusters than this are refused.
const MAX_HOST_MAP_BITS: u64 = 1 << 29;

impl HostMap {
    fn new(header: &Qcow2Header, file_len: u64) -> Result<Self, Qcow2Error> {
        let clusters = file_len.div_ceil(header.cluster_size());
        if clusters > MAX_HOST_MAP_BITS {
            return Err(Qcow2Error::InvalidHeader(format!(
                "the file has {clusters} clusters of {} bytes; at most {MAX_HOST_MAP_BITS} are \
                 supported",
                header.cluster_size()
            )));
        }
        let mut map = HostMap {
            bits: vec![0; clusters.div_ceil(64) as usize],
            cluster_bits: header.cluster_bits,
            claimed: 0,
        };
        let cs = header.cluster_size();
        map.claim_range(0, cs, "the header")?;
        let l1_bytes = u64::from(header.l1_size) * 8;
        map.claim_range(header.l1_table_offset, l1_bytes, "the L1 table")?;
        let reftable = u64::from(header.refcount_table_clusters) * cs;
        map.claim_range(header.refcount_table_offset, reftable, "the refcount table")?;
        Ok(map)
    }

    /// Marks the clusters of `[offset, offset + len)` (within the file) as used by `what`.
    fn claim_range(&mut self, offset: u64, len: u64, what: &str) -> Result<(), Qcow2Error> {
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let end = offset.saturating_add(len).div_ceil(1 << self.cluster_bits);
        for c in first..end {
            if !self.claim(c) {
                return Err(Qcow2Error::InvalidEntry(format!(
                    "{what} overlaps another table at host offset {:#x}",
                    c << self.cluster_bits
                )));
            }
        }
        Ok(())
    }

    /// Marks cluster `c`; false when it was already used (or is past the file).
    fn claim(&mut self, c: u64) -> bool {
        let Some(word) = self.bits.get_mut((c / 64) as usize) else {
            return false;
        };
        let bit = 1u64 << (c % 64);
        if *word & bit != 0 {
            return false;
        }
        *word |= bit;
        self.claimed += 1;
        true
    }

    /// Bytes of the file in clusters no table or data cluster uses: where compressed
    /// data can be.
    fn unclaimed_bytes(&self, file_len: u64) -> u64 {
        file_len.saturating_sub(self.claimed << self.cluster_bits)
    }

    /// True when the cluster holding host offset `offset` is used by a table or data.
    fn used(&self, offset: u64) -> bool {
        let c = offset >> self.cluster_bits;
        self.bits
            .get((c / 64) as usize)
            .is_some_and(|w| w & (1u64 << (c % 64)) != 0)
    }
}

/// True when every byte of `buf` is zero (vectorizes well).
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    let whole = chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0);
    whole && chunks.remainder().iter().all(|&b| b == 0)
}

/// Writes `data` at `offset`, skipping all-zero [`ZERO_BLOCK`]s (aligned to the file, so
/// holes fall on filesystem blocks); returns bytes written.
fn write_sparse(out: &File, offset: u64, data: &[u8]) -> io::Result<u64> {
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let mut pos = 0usize;
    let block = ZERO_BLOCK as u64;
    while pos < data.len() {
        // The block ends at the next multiple of ZERO_BLOCK in the file.
        let abs = offset + pos as u64;
        let next = ((abs / block + 1) * block - abs) as usize;
        let end = (pos + next).min(data.len());
        let zero = is_zero(data.get(pos..end).unwrap_or_default());
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(start)) => {
                let run = data.get(start..pos).unwrap_or_default();
                out.write_all_at(run, offset + start as u64)?;
                written += run.len() as u64;
                run_start = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(start) = run_start {
        let run = data.get(start..).unwrap_or_default();
        out.write_all_at(run, offset + start as u64)?;
        written += run.len() as u64;
    }
    Ok(written)
}

/// Coalesces small contiguous pieces of output into one buffer before writing them.
struct SparseWriter<'a> {
    out: &'a File,
    buf: Vec<u8>,
    start: u64,
    written: u64,
}

impl<'a> SparseWriter<'a> {
    fn new(out: &'a File) -> Self {
        SparseWriter {
            out,
            buf: Vec::with_capacity(RUN_BYTES),
            start: 0,
            written: 0,
        }
    }

    fn push(&mut self, offset: u64, data: &[u8]) -> Result<(), ConvertError> {
        let end = self.start + self.buf.len() as u64;
        if !self.buf.is_empty() && (offset != end || self.buf.len() + data.len() > RUN_BYTES) {
            self.flush()?;
        }
        if data.len() >= RUN_BYTES / 2 {
            self.flush()?;
            self.written += write_sparse(self.out, offset, data).map_err(io_err("output"))?;
            return Ok(());
        }
        if self.buf.is_empty() {
            self.start = offset;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ConvertError> {
        if !self.buf.is_empty() {
            self.written +=
                write_sparse(self.out, self.start, &self.buf).map_err(io_err("output"))?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// A run of data clusters contiguous both in the guest and in the file.
struct DataRun {
    guest: u64,
    host: u64,
    len: u64,
}

/// One L2 table as [`walk_l2_tables`] gives it.
struct L2Table<'a> {
    /// Host offset of the table.
    offset: u64,
    /// The entries covering the visited guest range.
    entries: &'a [u8],
}

/// What [`walk_l2_tables`] calls for each L2 table: `(guest_start, guest_end, table)`.
type L2Visitor<'a> = dyn FnMut(u64, u64, Option<L2Table<'_>>) -> Result<(), ConvertError> + 'a;

/// Calls `f(guest_start, guest_end, table)` for every L1 entry that maps the disk, in
/// guest order. `table` holds the L2 entries covering `[guest_start, guest_end)`, or is
/// `None` when the L2 table is unallocated. One L2 table is in memory at a time; the
/// budget is checked before each.
fn walk_l2_tables(
    input: &File,
    file_len: u64,
    header: &Qcow2Header,
    budget: &Budget<'_>,
    f: &mut L2Visitor<'_>,
) -> Result<(), ConvertError> {
    let cs = header.cluster_size();
    let size = header.virtual_size;
    let coverage = header.l2_coverage();
    let l1_needed = header.l1_entries_needed();
    // cluster_size <= 2 MiB, l1_needed <= MAX_L1_BYTES / 8.
    let mut l1_buf = vec![0u8; L1_CHUNK_ENTRIES.min(l1_needed as usize) * 8];
    let mut l2_buf = vec![0u8; cs as usize];
    let mut l1_index = 0u64;
    while l1_index < l1_needed {
        let n = (l1_needed - l1_index).min(L1_CHUNK_ENTRIES as u64) as usize;
        let chunk = l1_buf.get_mut(..n * 8).unwrap_or_default();
        let at = header.l1_table_offset + l1_index * 8;
        input
            .read_exact_at(chunk, at)
            .map_err(|source| Qcow2Error::Io {
                what: "L1 table",
                source,
            })?;
        for entry in chunk.chunks_exact(8) {
            let entry = u64::from_be_bytes(<[u8; 8]>::try_from(entry).unwrap_or_default());
            let guest_start = l1_index * coverage;
            let guest_end = guest_start.saturating_add(coverage).min(size);
            l1_index += 1;
            budget.check()?;
            let Some(l2_offset) = header.l2_table_offset(entry, file_len)? else {
                f(guest_start, guest_end, None)?;
                continue;
            };
            input
                .read_exact_at(&mut l2_buf, l2_offset)
                .map_err(|source| Qcow2Error::Io {
                    what: "L2 table",
                    source,
                })?;
            let clusters = (guest_end - guest_start).div_ceil(cs) as usize;
            let table = L2Table {
                offset: l2_offset,
                entries: l2_buf.get(..clusters * 8).unwrap_or_default(),
            };
            f(guest_start, guest_end, Some(table))?;
        }
    }
    Ok(())
}

fn l2_entries(table: &[u8]) -> impl Iterator<Item = u64> + '_ {
    table
        .chunks_exact(8)
        .map(|e| u64::from_be_bytes(<[u8; 8]>::try_from(e).unwrap_or_default()))
}

fn convert_qcow2(
    input: &File,
    file_len: u64,
    header: &Qcow2Header,
    output: &File,
    budget: &Budget<'_>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, ConvertError> {
    // First pass: every L1 and L2 entry is checked (alignment, within the file, each
    // table and data cluster used once) before the output is touched, so only a bad
    // compressed cluster can fail mid-way.
    let cs = header.cluster_size();
    let mut host = HostMap::new(header, file_len)?;
    let mut allocated = 0u64;
    walk_l2_tables(
        input,
        file_len,
        header,
        budget,
        &mut |guest_start, _, table| {
            let Some(table) = table else { return Ok(()) };
            if !host.claim(table.offset / cs) {
                return Err(Qcow2Error::InvalidEntry(format!(
                    "the L2 table at host offset {:#x} (guest offset {guest_start:#x}) is also \
                 used by another table or a data cluster",
                    table.offset
                ))
                .into());
            }
            for (j, e) in l2_entries(table.entries).enumerate() {
                let guest = guest_start + j as u64 * cs;
                match header.cluster_mapping(e, guest, file_len)? {
                    ClusterMapping::Zero => {}
                    ClusterMapping::Data(h) => {
                        if !host.claim(h / cs) {
                            return Err(Qcow2Error::InvalidEntry(format!(
                                "the data cluster at host offset {h:#x} (guest offset \
                             {guest:#x}) is also used by another cluster or a table"
                            ))
                            .into());
                        }
                        allocated += cs;
                    }
                    ClusterMapping::Compressed { .. } => allocated += cs,
                }
            }
            Ok(())
        },
    )?;
    check_space(output, allocated.min(header.virtual_size))?;
    prepare_output(output, header.virtual_size)?;

    // cluster_size <= 2 MiB.
    let cs_usize = cs as usize;
    // Bytes of compressed data decompressed so far: streams of a sound image do not
    // overlap, so they fit in the clusters that hold no table or data.
    let mut compressed_in = 0u64;
    let compressed_room = host.unclaimed_bytes(file_len);
    let size = header.virtual_size;
    let mut writer = SparseWriter::new(output);
    let mut run_buf: Vec<u8> = Vec::new();
    let mut cluster_buf = vec![0u8; cs_usize];
    // A compressed cluster is at most two clusters long (13 bits of sectors at 2 MiB).
    let mut comp_buf: Vec<u8> = Vec::new();
    let mut decompressor: Option<Decompressor> = None;
    let mut last_report = 0u64;

    walk_l2_tables(
        input,
        file_len,
        header,
        budget,
        &mut |guest_start, guest_end, table| {
            let Some(table) = table else {
                progress(guest_end, size);
                return Ok(());
            };
            let mut run: Option<DataRun> = None;
            for (j, e) in l2_entries(table.entries).enumerate() {
                let guest = guest_start + j as u64 * cs;
                if guest >= last_report + PROGRESS_STEP {
                    last_report = guest;
                    progress(guest, size);
                }
                // The last cluster may extend past the virtual size.
                let len = cs.min(size - guest);
                match header.cluster_mapping(e, guest, file_len)? {
                    ClusterMapping::Zero => {}
                    ClusterMapping::Data(host) => {
                        if let Some(r) = run.as_mut() {
                            if r.guest + r.len == guest
                                && r.host + r.len == host
                                && r.len + len <= RUN_BYTES as u64
                            {
                                r.len += len;
                                continue;
                            }
                        }
                        if let Some(r) = run.take() {
                            flush_run(input, &r, &mut run_buf, &mut writer)?;
                        }
                        run = Some(DataRun { guest, host, len });
                        continue;
                    }
                    ClusterMapping::Compressed { offset, len: clen } => {
                        if host.used(offset) {
                            return Err(Qcow2Error::InvalidEntry(format!(
                                "the compressed cluster at host offset {offset:#x} (guest \
                                 offset {guest:#x}) lies in a table or a data cluster"
                            ))
                            .into());
                        }
                        let dec = match decompressor.as_mut() {
                            Some(d) => d,
                            None => decompressor
                                .insert(Decompressor::new(header.compression, cs_usize)?),
                        };
                        // clen <= 2 clusters by construction of the entry.
                        comp_buf.resize(clen as usize, 0);
                        input
                            .read_exact_at(&mut comp_buf, offset)
                            .map_err(|source| Qcow2Error::Io {
                                what: "compressed cluster",
                                source,
                            })?;
                        compressed_in += dec.decompress(offset, &comp_buf, &mut cluster_buf)?;
                        if compressed_in > compressed_room {
                            return Err(Qcow2Error::InvalidEntry(format!(
                                "compressed clusters overlap: by guest offset {guest:#x} they \
                                 take more than the {compressed_room} bytes of the file that \
                                 hold no table or data cluster"
                            ))
                            .into());
                        }
                        writer.push(guest, cluster_buf.get(..len as usize).unwrap_or_default())?;
                    }
                }
                if let Some(r) = run.take() {
                    flush_run(input, &r, &mut run_buf, &mut writer)?;
                }
            }
            if let Some(r) = run.take() {
                flush_run(input, &r, &mut run_buf, &mut writer)?;
            }
            progress(guest_end, size);
            Ok(())
        },
    )?;
    writer.flush()?;
    Ok(writer.written)
}

fn flush_run(
    input: &File,
    run: &DataRun,
    buf: &mut Vec<u8>,
    writer: &mut SparseWriter<'_>,
) -> Result<(), ConvertError> {
    // run.len <= RUN_BYTES.
    buf.resize(run.len as usize, 0);
    let n = read_up_to(input, run.host, buf).map_err(|source| Qcow2Error::Io {
        what: "data cluster",
        source,
    })?;
    // Past the end of the file reads as zeroes (qemu does the same).
    if let Some(tail) = buf.get_mut(n..) {
        tail.fill(0);
    }
    writer.push(run.guest, buf)
}

/// Copies a raw image sparsely: holes of the input (SEEK_DATA/SEEK_HOLE) are skipped,
/// data is read in [`RUN_BYTES`] pieces and all-zero blocks are not written.
fn copy_raw(
    input: &File,
    size: u64,
    output: &File,
    budget: &Budget<'_>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, ConvertError> {
    use rustix::fs::{seek, SeekFrom};
    let mut buf = vec![0u8; RUN_BYTES];
    let mut written = 0u64;
    let mut pos = 0u64;
    while pos < size {
        // Find the next data region; filesystems without SEEK_DATA report all as data.
        let data_start = match seek(input, SeekFrom::Data(pos)) {
            Ok(off) => off,
            Err(rustix::io::Errno::NXIO) => size,
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => pos,
            Err(e) => return Err(io_err("input")(e.into())),
        };
        if data_start >= size {
            break;
        }
        let data_end = match seek(input, SeekFrom::Hole(data_start)) {
            Ok(off) if off > data_start => off.min(size),
            _ => size,
        };
        let mut at = data_start;
        while at < data_end {
            budget.check()?;
            let n = (data_end - at).min(RUN_BYTES as u64) as usize;
            let chunk = buf.get_mut(..n).unwrap_or_default();
            input.read_exact_at(chunk, at).map_err(io_err("input"))?;
            written += write_sparse(output, at, chunk).map_err(io_err("output"))?;
            at += n as u64;
            progress(at, size);
        }
        pos = data_end;
    }
    Ok(written)
}
