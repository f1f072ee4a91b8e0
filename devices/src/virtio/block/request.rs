//! Parsing of virtio-blk requests (virtio 1.x, 5.2.6): a pure function over a descriptor
//! chain and the guest memory it points into. Runs on the device thread, but touches no device
//! state, so it is unit-tested and fuzzed on its own.
//!
//! Layout accepted (the one every driver uses): the first descriptor is the 16-byte header
//! (device-readable), then the data descriptors, then the status descriptor (device-writable,
//! the status is its last byte). Everything read from the guest is bounds-checked here; the
//! device executes a [`Request`] without re-validating it.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// Bytes per sector; sector numbers in requests are always in these units.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request header (type, reserved, sector).
pub const HEADER_LEN: u32 = 16;
/// Size of one discard / write-zeroes segment (sector, num_sectors, flags).
pub const SEGMENT_LEN: u32 = 16;
/// The only defined flag of a write-zeroes segment.
pub const FLAG_UNMAP: u32 = 1;

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the descriptor chain is empty")]
    EmptyChain,
    #[error("the descriptor chain is longer than {max} descriptors")]
    TooManyDescriptors { max: usize },
    #[error("the descriptor chain loops, points past its table or into unmapped memory")]
    UnterminatedChain,
    #[error("the last (status) descriptor is not device-writable")]
    StatusNotWritable,
    #[error("the status descriptor has length 0")]
    StatusEmpty,
    #[error("the status byte is not in guest memory")]
    StatusOutOfMemory,
    #[error("the chain has no header descriptor")]
    MissingHeader,
    #[error("the header descriptor is device-writable")]
    HeaderWriteOnly,
    #[error("the header descriptor has {len} bytes, fewer than 16")]
    ShortHeader { len: u32 },
    #[error("cannot read the request header")]
    ReadHeader(#[source] GuestMemoryError),
    #[error("request type {0} is not supported")]
    UnsupportedType(u32),
    #[error("data descriptor {index} has the wrong direction")]
    DataWrongDirection { index: usize },
    #[error("data descriptor {index} has length 0")]
    EmptyDataDescriptor { index: usize },
    #[error("data descriptor {index} is not in guest memory")]
    DataOutOfMemory { index: usize },
    #[error("the request has no data descriptor")]
    MissingData,
    #[error("a flush request carries data descriptors")]
    UnexpectedData,
    #[error("data length {len} is not a multiple of 512")]
    UnalignedLength { len: u64 },
    #[error("sector {sector} overflows a byte offset")]
    SectorOverflow { sector: u64 },
    #[error("{len} bytes at sector {sector} are past the end of the {capacity}-sector disk")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("the segment table has {len} bytes, not a non-zero multiple of 16")]
    BadSegmentTable { len: u64 },
    #[error("{count} segments, more than the {max} advertised")]
    TooManySegments { count: u64, max: u32 },
    #[error("cannot read the segment table")]
    ReadSegments(#[source] GuestMemoryError),
    #[error("segment flags {flags:#x} are not supported for this request type")]
    UnsupportedFlags { flags: u32 },
    #[error("a segment of {num} sectors is larger than the {max} advertised")]
    TooManySectors { num: u32, max: u32 },
}

/// Tests compare errors; guest-memory causes compare by their description.
#[cfg(test)]
impl PartialEq for RequestError {
    fn eq(&self, other: &Self) -> bool {
        format!("{self:?}") == format!("{other:?}")
    }
}

impl RequestError {
    /// The status byte the driver gets for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnsupportedType(_) | RequestError::UnsupportedFlags { .. } => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A refused request: the error, and where its status byte is when the chain has a valid
/// one (otherwise the chain is returned to the used ring with length 0).
#[derive(Debug, thiserror::Error)]
#[cfg_attr(test, derive(PartialEq))]
#[error("malformed virtio-blk request")]
pub struct Rejected {
    #[source]
    pub error: RequestError,
    pub status: Option<GuestAddress>,
}

/// A guest buffer: a validated descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A validated byte range of the disk for discard / write-zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
    /// WRITE_ZEROES only: the driver allows deallocation.
    pub unmap: bool,
}

/// What a request asks for; offsets are bytes, already checked against the disk size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    In { offset: u64, data: Vec<Segment> },
    Out { offset: u64, data: Vec<Segment> },
    Flush,
    GetId { data: Vec<Segment> },
    Discard(Vec<Range>),
    WriteZeroes(Vec<Range>),
}

/// A well-formed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// The status byte (in guest memory, device-writable).
    pub status: GuestAddress,
}

/// What the device advertised in its configuration space.
#[derive(Clone, Copy, Debug)]
pub struct RequestLimits {
    /// Disk size in sectors.
    pub capacity: u64,
    /// Maximum number of data descriptors (`seg_max`).
    pub max_data_descriptors: usize,
    pub max_discard_segments: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_segments: u32,
    pub max_write_zeroes_sectors: u32,
}

/// Parses the request `chain` against `limits`.
pub fn parse<M>(mut chain: DescriptorChain<M>, limits: &RequestLimits) -> Result<Request, Rejected>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let reject = |error| Rejected {
        error,
        status: None,
    };

    // Header + data + status; one more to tell "too long" from "exactly the maximum".
    let max = limits.max_data_descriptors.saturating_add(2);
    let descs: Vec<Descriptor> = chain.by_ref().take(max.saturating_add(1)).collect();
    let mem = chain.memory();
    if descs.len() > max {
        return Err(reject(RequestError::TooManyDescriptors { max }));
    }
    let Some((status_desc, rest)) = descs.split_last() else {
        return Err(reject(RequestError::EmptyChain));
    };
    // The iterator stops early on a loop (its TTL), a bad index or an unreadable descriptor;
    // the last descriptor it produced then still says "next".
    if status_desc.has_next() {
        return Err(reject(RequestError::UnterminatedChain));
    }
    if !status_desc.is_write_only() {
        return Err(reject(RequestError::StatusNotWritable));
    }
    let status = status_desc
        .len()
        .checked_sub(1)
        .ok_or(RequestError::StatusEmpty)
        .and_then(|last| {
            status_desc
                .addr()
                .checked_add(u64::from(last))
                .filter(|&a| mem.check_range(a, 1, Permissions::Write))
                .ok_or(RequestError::StatusOutOfMemory)
        })
        .map_err(reject)?;

    parse_body(mem, rest, limits)
        .map(|kind| Request { kind, status })
        .map_err(|error| Rejected {
            error,
            status: Some(status),
        })
}

/// Parses header and data once the status byte is known.
fn parse_body<G: GuestMemory + ?Sized>(
    mem: &G,
    descs: &[Descriptor],
    limits: &RequestLimits,
) -> Result<RequestKind, RequestError> {
    let Some((header, data)) = descs.split_first() else {
        return Err(RequestError::MissingHeader);
    };
    if header.is_write_only() {
        return Err(RequestError::HeaderWriteOnly);
    }
    if header.len() < HEADER_LEN {
        return Err(RequestError::ShortHeader { len: header.len() });
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(RequestError::ReadHeader)?;
    let (type_bytes, rest) = raw.split_at(4);
    let sector_bytes = rest.get(4..12).unwrap_or_default();
    let req_type = u32::from_le_bytes(type_bytes.try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(sector_bytes.try_into().unwrap_or_default());

    match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = req_type == VIRTIO_BLK_T_OUT;
            let (segments, len) = data_segments(mem, data, !write)?;
            if len == 0 {
                return Err(RequestError::MissingData);
            }
            if len % SECTOR_SIZE != 0 {
                return Err(RequestError::UnalignedLength { len });
            }
            let offset = byte_range(sector, len, limits.capacity)?;
            Ok(if write {
                RequestKind::Out {
                    offset,
                    data: segments,
                }
            } else {
                RequestKind::In {
                    offset,
                    data: segments,
                }
            })
        }
        VIRTIO_BLK_T_FLUSH => {
            if data.is_empty() {
                Ok(RequestKind::Flush)
            } else {
                Err(RequestError::UnexpectedData)
            }
        }
        VIRTIO_BLK_T_GET_ID => {
            let (segments, len) = data_segments(mem, data, true)?;
            if len == 0 {
                return Err(RequestError::MissingData);
            }
            Ok(RequestKind::GetId { data: segments })
        }
        VIRTIO_BLK_T_DISCARD => {
            let ranges = parse_ranges(
                mem,
                data,
                limits,
                limits.max_discard_segments,
                limits.max_discard_sectors,
                false,
            )?;
            Ok(RequestKind::Discard(ranges))
        }
        VIRTIO_BLK_T_WRITE_ZEROES => {
            let ranges = parse_ranges(
                mem,
                data,
                limits,
                limits.max_write_zeroes_segments,
                limits.max_write_zeroes_sectors,
                true,
            )?;
            Ok(RequestKind::WriteZeroes(ranges))
        }
        other => Err(RequestError::UnsupportedType(other)),
    }
}

/// Validates data descriptors (direction, non-empty, in guest memory); returns them and
/// their total length.
fn data_segments<G: GuestMemory + ?Sized>(
    mem: &G,
    data: &[Descriptor],
    device_writes: bool,
) -> Result<(Vec<Segment>, u64), RequestError> {
    let access = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut total = 0u64;
    let mut segments = Vec::with_capacity(data.len());
    for (index, d) in data.iter().enumerate() {
        if d.is_write_only() != device_writes {
            return Err(RequestError::DataWrongDirection { index });
        }
        if d.len() == 0 {
            return Err(RequestError::EmptyDataDescriptor { index });
        }
        let in_memory =
            usize::try_from(d.len()).is_ok_and(|len| mem.check_range(d.addr(), len, access));
        if !in_memory {
            return Err(RequestError::DataOutOfMemory { index });
        }
        // At most 65536 descriptors of < 4 GiB each: cannot overflow, but stay checked.
        total = total.saturating_add(u64::from(d.len()));
        segments.push(Segment {
            addr: d.addr(),
            len: d.len(),
        });
    }
    Ok((segments, total))
}

/// `sector * 512`, checked to lie with `len` bytes inside a disk of `capacity` sectors.
fn byte_range(sector: u64, len: u64, capacity: u64) -> Result<u64, RequestError> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::SectorOverflow { sector })?;
    let end = offset.checked_add(len);
    let disk_bytes = capacity.saturating_mul(SECTOR_SIZE);
    match end {
        Some(end) if end <= disk_bytes => Ok(offset),
        _ => Err(RequestError::OutOfRange {
            sector,
            len,
            capacity,
        }),
    }
}

/// Reads and validates the segment table of a discard or write-zeroes request.
fn parse_ranges<G: GuestMemory + ?Sized>(
    mem: &G,
    data: &[Descriptor],
    limits: &RequestLimits,
    max_segments: u32,
    max_sectors: u32,
    write_zeroes: bool,
) -> Result<Vec<Range>, RequestError> {
    let (segments, len) = data_segments(mem, data, false)?;
    if len == 0 || len % u64::from(SEGMENT_LEN) != 0 {
        return Err(RequestError::BadSegmentTable { len });
    }
    let count = len / u64::from(SEGMENT_LEN);
    if count > u64::from(max_segments) {
        return Err(RequestError::TooManySegments {
            count,
            max: max_segments,
        });
    }
    // Bounded by max_segments * 16 bytes.
    let mut table =
        vec![0u8; usize::try_from(len).map_err(|_| RequestError::BadSegmentTable { len })?];
    let mut filled = 0usize;
    for seg in &segments {
        let n = usize::try_from(seg.len).map_err(|_| RequestError::BadSegmentTable { len })?;
        let end = filled
            .checked_add(n)
            .ok_or(RequestError::BadSegmentTable { len })?;
        let dst = table
            .get_mut(filled..end)
            .ok_or(RequestError::BadSegmentTable { len })?;
        mem.read_slice(dst, seg.addr)
            .map_err(RequestError::ReadSegments)?;
        filled = end;
    }

    let mut ranges = Vec::with_capacity(table.len() / SEGMENT_LEN as usize);
    for raw in table.chunks_exact(SEGMENT_LEN as usize) {
        let field = |from: usize, to: usize| raw.get(from..to).unwrap_or_default();
        let sector = u64::from_le_bytes(field(0, 8).try_into().unwrap_or_default());
        let num = u32::from_le_bytes(field(8, 12).try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(field(12, 16).try_into().unwrap_or_default());
        let allowed = if write_zeroes { FLAG_UNMAP } else { 0 };
        if flags & !allowed != 0 {
            return Err(RequestError::UnsupportedFlags { flags });
        }
        if num > max_sectors {
            return Err(RequestError::TooManySectors {
                num,
                max: max_sectors,
            });
        }
        let bytes = u64::from(num) * SECTOR_SIZE;
        let offset = byte_range(sector, bytes, limits.capacity)?;
        ranges.push(Range {
            offset,
            len: bytes,
            unmap: flags & FLAG_UNMAP != 0,
        });
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{desc, RO, WO};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const SEGS: u64 = 0x4_0000;

    fn limits() -> RequestLimits {
        RequestLimits {
            capacity: 64,
            max_data_descriptors: 4,
            max_discard_segments: 2,
            max_discard_sectors: 16,
            max_write_zeroes_segments: 1,
            max_write_zeroes_sectors: 32,
        }
    }

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap<()>, req_type: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&req_type.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(HDR)).unwrap();
    }

    fn segments(mem: &GuestMemoryMmap<()>, segs: &[(u64, u32, u32)]) {
        for (i, &(sector, num, flags)) in segs.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&sector.to_le_bytes());
            raw[8..12].copy_from_slice(&num.to_le_bytes());
            raw[12..].copy_from_slice(&flags.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(SEGS + 16 * i as u64))
                .unwrap();
        }
    }

    fn run(mem: &GuestMemoryMmap<()>, descs: &[RawDescriptor]) -> Result<Request, Rejected> {
        let vq = MockSplitQueue::new(mem, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        parse(chain, &limits())
    }

    fn err(r: Result<Request, Rejected>) -> (RequestError, Option<GuestAddress>) {
        let e = r.unwrap_err();
        (e.error, e.status)
    }

    const ST: Option<GuestAddress> = Some(GuestAddress(STATUS));

    #[test]
    fn parses_read_write_flush_get_id() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 2);
        let r = run(
            &m,
            &[
                desc(HDR, 16, RO),
                desc(DATA, 512, WO),
                desc(DATA + 512, 512, WO),
                desc(STATUS, 1, WO),
            ],
        )
        .unwrap();
        assert_eq!(r.status, GuestAddress(STATUS));
        assert_eq!(
            r.kind,
            RequestKind::In {
                offset: 1024,
                data: vec![
                    Segment {
                        addr: GuestAddress(DATA),
                        len: 512
                    },
                    Segment {
                        addr: GuestAddress(DATA + 512),
                        len: 512
                    }
                ]
            }
        );

        header(&m, VIRTIO_BLK_T_OUT, 63);
        let r = run(
            &m,
            &[desc(HDR, 16, RO), desc(DATA, 512, RO), desc(STATUS, 1, WO)],
        )
        .unwrap();
        assert!(matches!(r.kind, RequestKind::Out { offset: 32256, .. }));

        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let r = run(&m, &[desc(HDR, 16, RO), desc(STATUS, 1, WO)]).unwrap();
        assert_eq!(r.kind, RequestKind::Flush);

        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let r = run(
            &m,
            &[desc(HDR, 16, RO), desc(DATA, 20, WO), desc(STATUS, 1, WO)],
        )
        .unwrap();
        assert!(matches!(r.kind, RequestKind::GetId { .. }));

        // The status is the last byte of a longer status descriptor.
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let r = run(&m, &[desc(HDR, 16, RO), desc(STATUS, 9, WO)]).unwrap();
        assert_eq!(r.status, GuestAddress(STATUS + 8));
    }

    #[test]
    fn parses_discard_and_write_zeroes() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        segments(&m, &[(0, 8, 0), (60, 4, 0)]);
        let r = run(
            &m,
            &[desc(HDR, 16, RO), desc(SEGS, 32, RO), desc(STATUS, 1, WO)],
        )
        .unwrap();
        assert_eq!(
            r.kind,
            RequestKind::Discard(vec![
                Range {
                    offset: 0,
                    len: 4096,
                    unmap: false
                },
                Range {
                    offset: 60 * 512,
                    len: 2048,
                    unmap: false
                }
            ])
        );
        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segments(&m, &[(1, 2, FLAG_UNMAP)]);
        let r = run(
            &m,
            &[desc(HDR, 16, RO), desc(SEGS, 16, RO), desc(STATUS, 1, WO)],
        )
        .unwrap();
        assert_eq!(
            r.kind,
            RequestKind::WriteZeroes(vec![Range {
                offset: 512,
                len: 1024,
                unmap: true
            }])
        );
    }

    #[test]
    fn header_errors() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            err(run(
                &m,
                &[desc(HDR, 15, RO), desc(DATA, 512, WO), desc(STATUS, 1, WO)]
            )),
            (RequestError::ShortHeader { len: 15 }, ST)
        );
        assert_eq!(
            err(run(
                &m,
                &[desc(HDR, 16, WO), desc(DATA, 512, WO), desc(STATUS, 1, WO)]
            )),
            (RequestError::HeaderWriteOnly, ST)
        );
        assert_eq!(
            err(run(&m, &[desc(STATUS, 1, WO)])),
            (RequestError::MissingHeader, ST)
        );
        assert_eq!(
            err(run(&m, &[desc(0x20_0000, 16, RO), desc(STATUS, 1, WO)]))
                .0
                .status(),
            VIRTIO_BLK_S_IOERR as u8
        );
        header(&m, 77, 0);
        let (e, s) = err(run(&m, &[desc(HDR, 16, RO), desc(STATUS, 1, WO)]));
        assert_eq!(s, ST);
        assert_eq!(e, RequestError::UnsupportedType(77));
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn sector_errors() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 64);
        assert_eq!(
            err(run(
                &m,
                &[desc(HDR, 16, RO), desc(DATA, 512, WO), desc(STATUS, 1, WO)]
            )),
            (
                RequestError::OutOfRange {
                    sector: 64,
                    len: 512,
                    capacity: 64
                },
                ST
            )
        );
        header(&m, VIRTIO_BLK_T_OUT, 63);
        assert_eq!(
            err(run(
                &m,
                &[desc(HDR, 16, RO), desc(DATA, 1024, RO), desc(STATUS, 1, WO)]
            ))
            .0,
            RequestError::OutOfRange {
                sector: 63,
                len: 1024,
                capacity: 64
            }
        );
        header(&m, VIRTIO_BLK_T_IN, u64::MAX / 256);
        assert_eq!(
            err(run(
                &m,
                &[desc(HDR, 16, RO), desc(DATA, 512, WO), desc(STATUS, 1, WO)]
            ))
            .0,
            RequestError::SectorOverflow {
                sector: u64::MAX / 256
            }
        );
        // offset fits, offset + len overflows
        header(&m, VIRTIO_BLK_T_IN, u64::MAX / 512);
        assert!(matches!(
            err(run(
                &m,
                &[desc(HDR, 16, RO), desc(DATA, 1024, WO), desc(STATUS, 1, WO)]
            ))
            .0,
            RequestError::OutOfRange { .. }
        ));
    }

    #[test]
    fn data_errors() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            err(run(
                &m,
                &[desc(HDR, 16, RO), desc(DATA, 512, RO), desc(STATUS, 1, WO)]
            )),
            (RequestError::DataWrongDirection { index: 0 }, ST)
        );
        assert_eq!(
            err(run(
                &m,
                &[
                    desc(HDR, 16, RO),
                    desc(DATA, 512, WO),
                    desc(DATA, 0, WO),
                    desc(STATUS, 1, WO)
                ]
            ))
            .0,
            RequestError::EmptyDataDescriptor { index: 1 }
        );
        assert_eq!(
            err(run(&m, &[desc(HDR, 16, RO), desc(STATUS, 1, WO)])).0,
            RequestError::MissingData
        );
        assert_eq!(
            err(run(
                &m,
                &[desc(HDR, 16, RO), desc(DATA, 100, WO), desc(STATUS, 1, WO)]
            ))
            .0,
            RequestError::UnalignedLength { len: 100 }
        );
        assert_eq!(
            err(run(
                &m,
                &[
                    desc(HDR, 16, RO),
                    desc(0xf_ff00, 512, WO),
                    desc(STATUS, 1, WO)
                ]
            ))
            .0,
            RequestError::DataOutOfMemory { index: 0 }
        );
        header(&m, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            err(run(
                &m,
                &[desc(HDR, 16, RO), desc(DATA, 512, WO), desc(STATUS, 1, WO)]
            ))
            .0,
            RequestError::DataWrongDirection { index: 0 }
        );
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(
            err(run(
                &m,
                &[desc(HDR, 16, RO), desc(DATA, 20, RO), desc(STATUS, 1, WO)]
            ))
            .0,
            RequestError::DataWrongDirection { index: 0 }
        );
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            err(run(
                &m,
                &[desc(HDR, 16, RO), desc(DATA, 512, RO), desc(STATUS, 1, WO)]
            ))
            .0,
            RequestError::UnexpectedData
        );
    }

    #[test]
    fn status_errors() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        // Missing status: the data descriptor is last but device-readable... and for IN it
        // is writable, so this chain "ends" in a 512-byte status; the header is then the
        // only other descriptor: no data.
        assert_eq!(
            err(run(&m, &[desc(HDR, 16, RO), desc(DATA, 512, WO)])),
            (RequestError::MissingData, Some(GuestAddress(DATA + 511)))
        );
        header(&m, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            err(run(&m, &[desc(HDR, 16, RO), desc(DATA, 512, RO)])),
            (RequestError::StatusNotWritable, None)
        );
        assert_eq!(
            err(run(
                &m,
                &[desc(HDR, 16, RO), desc(DATA, 512, RO), desc(STATUS, 0, WO)]
            )),
            (RequestError::StatusEmpty, None)
        );
        assert_eq!(
            err(run(
                &m,
                &[desc(HDR, 16, RO), desc(DATA, 512, RO), desc(STATUS, 1, RO)]
            )),
            (RequestError::StatusNotWritable, None)
        );
        assert_eq!(
            err(run(
                &m,
                &[
                    desc(HDR, 16, RO),
                    desc(DATA, 512, RO),
                    desc(0x10_0000, 1, WO)
                ]
            )),
            (RequestError::StatusOutOfMemory, None)
        );
    }

    #[test]
    fn chain_shape_errors() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        // Header + 5 data (limit 4) + status.
        let mut descs = vec![desc(HDR, 16, RO)];
        descs.extend((0..5).map(|i| desc(DATA + 512 * i, 512, RO)));
        descs.push(desc(STATUS, 1, WO));
        assert_eq!(
            err(run(&m, &descs)),
            (RequestError::TooManyDescriptors { max: 6 }, None)
        );

        // A loop: 0 -> 1 -> 0 ...
        let vq = MockSplitQueue::new(&m, 16);
        let looped = [
            RawDescriptor::from(Descriptor::new(HDR, 16, 1, 1)),
            RawDescriptor::from(Descriptor::new(DATA, 512, 1, 0)),
        ];
        let chain = vq.build_multiple_desc_chains(&looped).unwrap();
        let big = RequestLimits {
            max_data_descriptors: 100,
            ..limits()
        };
        assert_eq!(
            parse(chain, &big).unwrap_err(),
            Rejected {
                error: RequestError::UnterminatedChain,
                status: None
            }
        );
        // "next" past the table.
        let vq = MockSplitQueue::new(&m, 16);
        let past = [RawDescriptor::from(Descriptor::new(HDR, 16, 1, 40))];
        let chain = vq.build_multiple_desc_chains(&past).unwrap();
        assert_eq!(
            parse(chain, &big).unwrap_err().error,
            RequestError::UnterminatedChain
        );
    }

    #[test]
    fn segment_table_errors() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        let run_segs = |len: u32| {
            run(
                &m,
                &[desc(HDR, 16, RO), desc(SEGS, len, RO), desc(STATUS, 1, WO)],
            )
        };
        segments(&m, &[(0, 1, 0), (1, 1, 0), (2, 1, 0)]);
        assert_eq!(
            err(run_segs(20)),
            (RequestError::BadSegmentTable { len: 20 }, ST)
        );
        assert_eq!(
            err(run_segs(48)).0,
            RequestError::TooManySegments { count: 3, max: 2 }
        );
        assert_eq!(
            err(run(&m, &[desc(HDR, 16, RO), desc(STATUS, 1, WO)])).0,
            RequestError::BadSegmentTable { len: 0 }
        );
        segments(&m, &[(0, 1, FLAG_UNMAP)]);
        let (e, _) = err(run_segs(16));
        assert_eq!(e, RequestError::UnsupportedFlags { flags: 1 });
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
        segments(&m, &[(0, 17, 0)]);
        assert_eq!(
            err(run_segs(16)).0,
            RequestError::TooManySectors { num: 17, max: 16 }
        );
        segments(&m, &[(60, 8, 0)]);
        assert!(matches!(
            err(run_segs(16)).0,
            RequestError::OutOfRange { sector: 60, .. }
        ));
        segments(&m, &[(u64::MAX, 1, 0)]);
        assert_eq!(
            err(run_segs(16)).0,
            RequestError::SectorOverflow { sector: u64::MAX }
        );

        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segments(&m, &[(0, 1, 0x4)]);
        assert_eq!(
            err(run_segs(16)).0,
            RequestError::UnsupportedFlags { flags: 4 }
        );
        segments(&m, &[(0, 1, 0), (1, 1, 0)]);
        assert_eq!(
            err(run_segs(32)).0,
            RequestError::TooManySegments { count: 2, max: 1 }
        );
        // The table spread over two descriptors is read in order.
        segments(&m, &[(3, 2, 0)]);
        let r = run(
            &m,
            &[
                desc(HDR, 16, RO),
                desc(SEGS, 10, RO),
                desc(SEGS + 10, 6, RO),
                desc(STATUS, 1, WO),
            ],
        )
        .unwrap();
        assert_eq!(
            r.kind,
            RequestKind::WriteZeroes(vec![Range {
                offset: 1536,
                len: 1024,
                unmap: false
            }])
        );
    }

    /// A cheap in-tree fuzz run (the cargo-fuzz target in fuzz/ goes further):
    /// random descriptor tables and memory never make the parser panic, and a parsed
    /// request only points into guest memory.
    #[test]
    fn random_chains_never_panic() {
        let m = mem();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut parsed = 0;
        for _ in 0..4000 {
            let n = (next() % 8 + 1) as usize;
            let descs: Vec<RawDescriptor> = (0..n)
                .map(|_| {
                    let r = next();
                    let addr =
                        [HDR, DATA, STATUS, SEGS, 0xf_fff0, r % 0x20_0000][(r >> 40) as usize % 6];
                    let len = [0, 1, 16, 20, 512, 1024, (r >> 8) as u32][(r >> 48) as usize % 7];
                    let flags = (r >> 16) as u16 & 0x7;
                    let next_idx = (r >> 24) as u16 % 20;
                    RawDescriptor::from(Descriptor::new(addr, len, flags, next_idx))
                })
                .collect();
            let r = next();
            let types = [
                VIRTIO_BLK_T_IN,
                VIRTIO_BLK_T_OUT,
                VIRTIO_BLK_T_FLUSH,
                VIRTIO_BLK_T_GET_ID,
                VIRTIO_BLK_T_DISCARD,
                VIRTIO_BLK_T_WRITE_ZEROES,
                r as u32,
            ];
            header(&m, types[(r >> 32) as usize % types.len()], next() % 80);
            segments(
                &m,
                &[(next() % 80, (next() % 40) as u32, (next() % 3) as u32)],
            );
            let vq = MockSplitQueue::new(&m, 16);
            let Ok(chain) = vq.build_multiple_desc_chains(&descs) else {
                continue;
            };
            if let Ok(req) = parse(chain, &limits()) {
                parsed += 1;
                assert!(m.check_range(req.status, 1, Permissions::Write));
                if let RequestKind::In { data, .. } | RequestKind::Out { data, .. } = &req.kind {
                    for s in data {
                        assert!(m.check_range(s.addr, s.len as usize, Permissions::Read));
                    }
                }
            }
        }
        assert!(parsed > 0);
    }
}
