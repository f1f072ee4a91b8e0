//! Parsing of virtio-vsock packets (virtio 1.x, 5.10.6): pure functions over a descriptor
//! chain and the guest memory it points into. They run on the VMM thread but touch no device
//! state, so they are unit-tested on their own.
//!
//! A packet is a 44-byte `virtio_vsock_hdr` followed by `hdr.len` bytes of data. Drivers lay
//! it out in any number of descriptors (Linux uses one for the header and one or more for the
//! data on TX, one single descriptor for header and data on RX), so the chain is treated as a
//! scatter-gather list: the header is its first 44 bytes, the data the next `hdr.len`.
//!
//! - [`parse_tx`]: a TX chain (device-readable): header checked field by field, data
//!   segments cut to exactly `hdr.len` bytes, which must be present.
//! - [`parse_rx`]: an RX chain (device-writable): room for a header and some data.
//!
//! Every descriptor is checked to lie in guest memory here; a header that lies about its
//! length never makes the device read or write past the buffers the driver gave.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use super::{uapi, HOST_CID};

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;

/// Why a chain was refused.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("the descriptor chain is empty")]
    EmptyChain,
    #[error("the descriptor chain is longer than {max} descriptors")]
    TooManyDescriptors { max: usize },
    #[error("the descriptor chain loops, points past its table or into unmapped memory")]
    UnterminatedChain,
    #[error("descriptor {index} has the wrong direction for this queue")]
    WrongDirection { index: usize },
    #[error("descriptor {index} is not in guest memory")]
    OutOfMemory { index: usize },
    #[error("the chain holds {len} bytes, fewer than the 44-byte header")]
    ShortHeader { len: u64 },
    #[error("cannot read the packet header")]
    ReadHeader(#[source] GuestMemoryError),
    #[error("header length {len} is larger than the maximum packet size {max}")]
    LenTooLarge { len: u32, max: u32 },
    #[error("header length {len} is larger than the {available} data bytes of the chain")]
    LenPastData { len: u32, available: u64 },
    #[error("unknown operation {0}")]
    UnknownOp(u16),
    #[error("unknown socket type {0}")]
    UnknownType(u16),
    #[error("source CID {cid} is not the guest's CID")]
    WrongSrcCid { cid: u64 },
    #[error("destination CID {cid} is not the host")]
    WrongDstCid { cid: u64 },
}

/// Tests compare errors; guest-memory causes compare by their description.
#[cfg(test)]
impl PartialEq for PacketError {
    fn eq(&self, other: &Self) -> bool {
        format!("{self:?}") == format!("{other:?}")
    }
}

/// The operation of a packet (`VIRTIO_VSOCK_OP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    CreditUpdate,
    CreditRequest,
}

impl Op {
    pub fn from_raw(op: u16) -> Option<Op> {
        Some(match op {
            uapi::OP_REQUEST => Op::Request,
            uapi::OP_RESPONSE => Op::Response,
            uapi::OP_RST => Op::Rst,
            uapi::OP_SHUTDOWN => Op::Shutdown,
            uapi::OP_RW => Op::Rw,
            uapi::OP_CREDIT_UPDATE => Op::CreditUpdate,
            uapi::OP_CREDIT_REQUEST => Op::CreditRequest,
            _ => return None,
        })
    }

    pub fn raw(self) -> u16 {
        match self {
            Op::Request => uapi::OP_REQUEST,
            Op::Response => uapi::OP_RESPONSE,
            Op::Rst => uapi::OP_RST,
            Op::Shutdown => uapi::OP_SHUTDOWN,
            Op::Rw => uapi::OP_RW,
            Op::CreditUpdate => uapi::OP_CREDIT_UPDATE,
            Op::CreditRequest => uapi::OP_CREDIT_REQUEST,
        }
    }
}

/// `struct virtio_vsock_hdr`, field by field (little-endian, packed, 44 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// `N` bytes of `raw` at `at`; the offsets below are constants inside the header.
fn field<const N: usize>(raw: &[u8; HDR_LEN], at: usize) -> [u8; N] {
    raw.get(at..at.saturating_add(N))
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .unwrap_or([0; N])
}

fn put(raw: &mut [u8; HDR_LEN], at: usize, bytes: &[u8]) {
    if let Some(dst) = raw.get_mut(at..at.saturating_add(bytes.len())) {
        dst.copy_from_slice(bytes);
    }
}

impl Header {
    pub fn from_bytes(raw: &[u8; HDR_LEN]) -> Header {
        Header {
            src_cid: u64::from_le_bytes(field(raw, 0)),
            dst_cid: u64::from_le_bytes(field(raw, 8)),
            src_port: u32::from_le_bytes(field(raw, 16)),
            dst_port: u32::from_le_bytes(field(raw, 20)),
            len: u32::from_le_bytes(field(raw, 24)),
            type_: u16::from_le_bytes(field(raw, 28)),
            op: u16::from_le_bytes(field(raw, 30)),
            flags: u32::from_le_bytes(field(raw, 32)),
            buf_alloc: u32::from_le_bytes(field(raw, 36)),
            fwd_cnt: u32::from_le_bytes(field(raw, 40)),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut raw = [0u8; HDR_LEN];
        put(&mut raw, 0, &self.src_cid.to_le_bytes());
        put(&mut raw, 8, &self.dst_cid.to_le_bytes());
        put(&mut raw, 16, &self.src_port.to_le_bytes());
        put(&mut raw, 20, &self.dst_port.to_le_bytes());
        put(&mut raw, 24, &self.len.to_le_bytes());
        put(&mut raw, 28, &self.type_.to_le_bytes());
        put(&mut raw, 30, &self.op.to_le_bytes());
        put(&mut raw, 32, &self.flags.to_le_bytes());
        put(&mut raw, 36, &self.buf_alloc.to_le_bytes());
        put(&mut raw, 40, &self.fwd_cnt.to_le_bytes());
        raw
    }
}

/// A guest buffer: a validated, non-empty descriptor (or part of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A well-formed packet from the guest's TX queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxPacket {
    pub hdr: Header,
    pub op: Op,
    /// Exactly `hdr.len` bytes of data, in guest memory (device-readable).
    pub data: Vec<Segment>,
}

/// A well-formed RX buffer: where the device writes a header and up to [`Self::data_room`]
/// bytes of data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxBuffer {
    /// The whole chain (device-writable).
    pub segments: Vec<Segment>,
    /// The chain's total length (at least [`HDR_LEN`]).
    pub len: u64,
}

impl RxBuffer {
    /// Bytes of data that fit after the header, at most `max`.
    pub fn data_room(&self, max: u32) -> u32 {
        let room = self.len.saturating_sub(HDR_LEN as u64);
        u32::try_from(room).unwrap_or(u32::MAX).min(max)
    }
}

/// What the device checks TX packets against.
#[derive(Clone, Copy, Debug)]
pub struct TxLimits {
    /// The guest's CID: the only valid source.
    pub guest_cid: u64,
    /// The largest `hdr.len` accepted.
    pub max_pkt_len: u32,
    /// The longest chain accepted (the queue size).
    pub max_descriptors: usize,
}

/// Collects the chain's descriptors, checks shape, direction and memory; returns the
/// non-empty ones as segments and the total length.
fn gather<M>(
    chain: &mut DescriptorChain<M>,
    max: usize,
    device_writes: bool,
) -> Result<(Vec<Segment>, u64), PacketError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    // One more than the maximum to tell "too long" from "exactly the maximum".
    let descs: Vec<Descriptor> = chain.by_ref().take(max.saturating_add(1)).collect();
    let mem = chain.memory();
    if descs.len() > max {
        return Err(PacketError::TooManyDescriptors { max });
    }
    let Some(last) = descs.last() else {
        return Err(PacketError::EmptyChain);
    };
    // The iterator stops early on a loop (its TTL), a bad index or an unreadable descriptor;
    // the last descriptor it produced then still says "next".
    if last.has_next() {
        return Err(PacketError::UnterminatedChain);
    }
    let access = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut total = 0u64;
    let mut segments = Vec::with_capacity(descs.len());
    for (index, d) in descs.iter().enumerate() {
        if d.is_write_only() != device_writes {
            return Err(PacketError::WrongDirection { index });
        }
        if d.len() == 0 {
            continue;
        }
        let in_memory =
            usize::try_from(d.len()).is_ok_and(|len| mem.check_range(d.addr(), len, access));
        if !in_memory {
            return Err(PacketError::OutOfMemory { index });
        }
        total = total.saturating_add(u64::from(d.len()));
        segments.push(Segment {
            addr: d.addr(),
            len: d.len(),
        });
    }
    Ok((segments, total))
}

/// The part of `segments` covering bytes `[start, start + len)` of the list. `None` when the
/// list is shorter.
pub fn sub_range(segments: &[Segment], start: u64, len: u64) -> Option<Vec<Segment>> {
    let end = start.checked_add(len)?;
    let mut out = Vec::new();
    let mut pos = 0u64;
    for seg in segments {
        let seg_end = pos.checked_add(u64::from(seg.len))?;
        let from = start.max(pos);
        let to = end.min(seg_end);
        if from < to {
            let skip = from.checked_sub(pos)?;
            out.push(Segment {
                addr: seg.addr.checked_add(skip)?,
                len: u32::try_from(to.checked_sub(from)?).ok()?,
            });
        }
        pos = seg_end;
        if pos >= end {
            return Some(out);
        }
    }
    (pos >= end).then_some(out)
}

/// Reads `buf.len()` bytes from the start of `segments`.
pub fn read_segments<G: GuestMemory + ?Sized>(
    mem: &G,
    segments: &[Segment],
    buf: &mut [u8],
) -> Result<(), GuestMemoryError> {
    let expected = buf.len();
    let mut rest = buf;
    for seg in segments {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(seg.len as usize);
        let (chunk, tail) = rest.split_at_mut(n);
        mem.read_slice(chunk, seg.addr)?;
        rest = tail;
    }
    if rest.is_empty() {
        Ok(())
    } else {
        Err(GuestMemoryError::PartialBuffer {
            expected,
            completed: expected.saturating_sub(rest.len()),
        })
    }
}

/// Writes `data` starting `offset` bytes into `segments`.
pub fn write_segments<G: GuestMemory + ?Sized>(
    mem: &G,
    segments: &[Segment],
    offset: u64,
    data: &[u8],
) -> Result<(), GuestMemoryError> {
    let range =
        sub_range(segments, offset, data.len() as u64).ok_or(GuestMemoryError::PartialBuffer {
            expected: data.len(),
            completed: 0,
        })?;
    let mut rest = data;
    for seg in range {
        let n = rest.len().min(seg.len as usize);
        let (chunk, tail) = rest.split_at(n);
        mem.write_slice(chunk, seg.addr)?;
        rest = tail;
    }
    Ok(())
}

/// Reads the header at the start of `segments` (at least [`HDR_LEN`] bytes long).
fn read_header<G: GuestMemory + ?Sized>(
    mem: &G,
    segments: &[Segment],
) -> Result<Header, PacketError> {
    let mut raw = [0u8; HDR_LEN];
    read_segments(mem, segments, &mut raw).map_err(PacketError::ReadHeader)?;
    Ok(Header::from_bytes(&raw))
}

/// Parses a chain from the TX queue against `limits`.
pub fn parse_tx<M>(
    mut chain: DescriptorChain<M>,
    limits: &TxLimits,
) -> Result<TxPacket, PacketError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let (segments, total) = gather(&mut chain, limits.max_descriptors, false)?;
    if total < HDR_LEN as u64 {
        return Err(PacketError::ShortHeader { len: total });
    }
    let hdr = read_header(chain.memory(), &segments)?;
    let op = Op::from_raw(hdr.op).ok_or(PacketError::UnknownOp(hdr.op))?;
    if hdr.type_ != uapi::TYPE_STREAM {
        return Err(PacketError::UnknownType(hdr.type_));
    }
    if hdr.src_cid != limits.guest_cid {
        return Err(PacketError::WrongSrcCid { cid: hdr.src_cid });
    }
    if hdr.dst_cid != HOST_CID {
        return Err(PacketError::WrongDstCid { cid: hdr.dst_cid });
    }
    if hdr.len > limits.max_pkt_len {
        return Err(PacketError::LenTooLarge {
            len: hdr.len,
            max: limits.max_pkt_len,
        });
    }
    let available = total.saturating_sub(HDR_LEN as u64);
    let data = sub_range(&segments, HDR_LEN as u64, u64::from(hdr.len)).ok_or(
        PacketError::LenPastData {
            len: hdr.len,
            available,
        },
    )?;
    Ok(TxPacket { hdr, op, data })
}

/// Parses a chain from the RX queue: device-writable, room for at least a header.
pub fn parse_rx<M>(
    mut chain: DescriptorChain<M>,
    max_descriptors: usize,
) -> Result<RxBuffer, PacketError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let (segments, len) = gather(&mut chain, max_descriptors, true)?;
    if len < HDR_LEN as u64 {
        return Err(PacketError::ShortHeader { len });
    }
    Ok(RxBuffer { segments, len })
}

/// Writes a packet (header, then `data`) into an RX buffer. `data` must fit
/// ([`RxBuffer::data_room`]). Returns the used length.
pub fn write_rx<G: GuestMemory + ?Sized>(
    mem: &G,
    buf: &RxBuffer,
    hdr: &Header,
    data: &[u8],
) -> Result<u32, GuestMemoryError> {
    write_segments(mem, &buf.segments, 0, &hdr.to_bytes())?;
    write_segments(mem, &buf.segments, HDR_LEN as u64, data)?;
    let used = HDR_LEN.saturating_add(data.len());
    Ok(u32::try_from(used).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::virtio::test_utils::{desc, RO, WO};

    const GUEST_CID: u64 = 3;
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const MEM_SIZE: u64 = 0x10_0000;

    fn limits() -> TxLimits {
        TxLimits {
            guest_cid: GUEST_CID,
            max_pkt_len: 64 * 1024,
            max_descriptors: 8,
        }
    }

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    fn good_header(len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 52,
            len,
            type_: uapi::TYPE_STREAM,
            op: uapi::OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    fn write_header(m: &GuestMemoryMmap<()>, at: u64, hdr: &Header) {
        m.write_slice(&hdr.to_bytes(), GuestAddress(at)).unwrap();
    }

    fn tx(m: &GuestMemoryMmap<()>, descs: &[RawDescriptor]) -> Result<TxPacket, PacketError> {
        let vq = MockSplitQueue::new(m, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        parse_tx(chain, &limits())
    }

    fn rx(m: &GuestMemoryMmap<()>, descs: &[RawDescriptor]) -> Result<RxBuffer, PacketError> {
        let vq = MockSplitQueue::new(m, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        parse_rx(chain, 8)
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn header_round_trips_in_wire_layout() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0x1111_2222,
            dst_port: 0x3333_4444,
            len: 0x55,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0x4_0000,
            fwd_cnt: 0xdead_beef,
        };
        let raw = h.to_bytes();
        assert_eq!(&raw[..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&raw[24..28], &0x55u32.to_le_bytes());
        assert_eq!(&raw[28..30], &1u16.to_le_bytes());
        assert_eq!(&raw[30..32], &5u16.to_le_bytes());
        assert_eq!(&raw[40..44], &0xdead_beefu32.to_le_bytes());
        assert_eq!(Header::from_bytes(&raw), h);
        for raw_op in 1..=7 {
            assert_eq!(Op::from_raw(raw_op).unwrap().raw(), raw_op);
        }
        assert_eq!(Op::from_raw(0), None);
        assert_eq!(Op::from_raw(8), None);
    }

    #[test]
    fn parses_split_and_single_descriptor_packets() {
        let m = mem();
        // Header and data in separate descriptors; the data descriptor is longer than len.
        write_header(&m, HDR, &good_header(100));
        let p = tx(&m, &[desc(HDR, 44, RO), desc(DATA, 4096, RO)]).unwrap();
        assert_eq!(p.op, Op::Rw);
        assert_eq!(p.hdr.fwd_cnt, 7);
        assert_eq!(p.data, vec![seg(DATA, 100)]);

        // Header and data in one descriptor.
        write_header(&m, HDR, &good_header(10));
        let p = tx(&m, &[desc(HDR, 44 + 10, RO)]).unwrap();
        assert_eq!(p.data, vec![seg(HDR + 44, 10)]);

        // Header split over two descriptors, data over three (with an empty one between).
        let h = good_header(30);
        let raw = h.to_bytes();
        m.write_slice(&raw[..20], GuestAddress(HDR)).unwrap();
        m.write_slice(&raw[20..], GuestAddress(DATA)).unwrap();
        let p = tx(
            &m,
            &[
                desc(HDR, 20, RO),
                desc(DATA, 24 + 5, RO),
                desc(0x3_0000, 0, RO),
                desc(0x4_0000, 10, RO),
                desc(0x5_0000, 100, RO),
            ],
        )
        .unwrap();
        assert_eq!(p.hdr, h);
        assert_eq!(
            p.data,
            vec![seg(DATA + 24, 5), seg(0x4_0000, 10), seg(0x5_0000, 15)]
        );

        // A control packet: len 0, no data descriptor.
        let mut h = good_header(0);
        h.op = uapi::OP_REQUEST;
        write_header(&m, HDR, &h);
        let p = tx(&m, &[desc(HDR, 44, RO)]).unwrap();
        assert_eq!(p.op, Op::Request);
        assert!(p.data.is_empty());
    }

    #[test]
    fn short_headers_and_empty_chains() {
        let m = mem();
        write_header(&m, HDR, &good_header(0));
        assert_eq!(
            tx(&m, &[desc(HDR, 43, RO)]).unwrap_err(),
            PacketError::ShortHeader { len: 43 }
        );
        assert_eq!(
            tx(&m, &[desc(HDR, 20, RO), desc(HDR + 20, 23, RO)]).unwrap_err(),
            PacketError::ShortHeader { len: 43 }
        );
        // A zero-length chain (one empty descriptor).
        assert_eq!(
            tx(&m, &[desc(HDR, 0, RO)]).unwrap_err(),
            PacketError::ShortHeader { len: 0 }
        );
        assert_eq!(
            rx(&m, &[desc(HDR, 0, WO)]).unwrap_err(),
            PacketError::ShortHeader { len: 0 }
        );
        assert_eq!(
            rx(&m, &[desc(HDR, 40, WO)]).unwrap_err(),
            PacketError::ShortHeader { len: 40 }
        );
    }

    #[test]
    fn wrong_direction() {
        let m = mem();
        write_header(&m, HDR, &good_header(10));
        // Header device-writable on TX.
        assert_eq!(
            tx(&m, &[desc(HDR, 44, WO), desc(DATA, 10, RO)]).unwrap_err(),
            PacketError::WrongDirection { index: 0 }
        );
        // Data device-writable on TX.
        assert_eq!(
            tx(&m, &[desc(HDR, 44, RO), desc(DATA, 10, WO)]).unwrap_err(),
            PacketError::WrongDirection { index: 1 }
        );
        // Device-readable on RX.
        assert_eq!(
            rx(&m, &[desc(HDR, 44, RO)]).unwrap_err(),
            PacketError::WrongDirection { index: 0 }
        );
        assert_eq!(
            rx(&m, &[desc(HDR, 44, WO), desc(DATA, 4096, RO)]).unwrap_err(),
            PacketError::WrongDirection { index: 1 }
        );
    }

    #[test]
    fn lengths_that_lie() {
        let m = mem();
        // len larger than the data descriptors.
        write_header(&m, HDR, &good_header(4097));
        assert_eq!(
            tx(&m, &[desc(HDR, 44, RO), desc(DATA, 4096, RO)]).unwrap_err(),
            PacketError::LenPastData {
                len: 4097,
                available: 4096
            }
        );
        // len with no data descriptor at all.
        write_header(&m, HDR, &good_header(1));
        assert_eq!(
            tx(&m, &[desc(HDR, 44, RO)]).unwrap_err(),
            PacketError::LenPastData {
                len: 1,
                available: 0
            }
        );
        // len over the maximum packet size, even with enough data descriptors.
        write_header(&m, HDR, &good_header(64 * 1024 + 1));
        assert_eq!(
            tx(&m, &[desc(HDR, 44, RO), desc(DATA, 128 * 1024, RO)]).unwrap_err(),
            PacketError::LenTooLarge {
                len: 64 * 1024 + 1,
                max: 64 * 1024
            }
        );
        write_header(&m, HDR, &good_header(u32::MAX));
        assert_eq!(
            tx(&m, &[desc(HDR, 44, RO), desc(DATA, 4096, RO)]).unwrap_err(),
            PacketError::LenTooLarge {
                len: u32::MAX,
                max: 64 * 1024
            }
        );
        // Exactly the maximum is fine.
        write_header(&m, HDR, &good_header(64 * 1024));
        let p = tx(&m, &[desc(HDR, 44, RO), desc(DATA, 64 * 1024, RO)]).unwrap();
        assert_eq!(p.data, vec![seg(DATA, 64 * 1024)]);
    }

    #[test]
    fn bad_op_type_and_cids() {
        let m = mem();
        type Case = (fn(&mut Header), PacketError);
        let cases: [Case; 6] = [
            (|h| h.op = 0, PacketError::UnknownOp(0)),
            (|h| h.op = 8, PacketError::UnknownOp(8)),
            (|h| h.type_ = 2, PacketError::UnknownType(2)),
            (|h| h.src_cid = 4, PacketError::WrongSrcCid { cid: 4 }),
            (
                |h| h.src_cid = HOST_CID,
                PacketError::WrongSrcCid { cid: 2 },
            ),
            (
                |h| h.dst_cid = GUEST_CID,
                PacketError::WrongDstCid { cid: 3 },
            ),
        ];
        for (mutate, expected) in cases {
            let mut h = good_header(0);
            mutate(&mut h);
            write_header(&m, HDR, &h);
            assert_eq!(tx(&m, &[desc(HDR, 44, RO)]).unwrap_err(), expected);
        }
    }

    #[test]
    fn descriptors_outside_memory_and_bad_chains() {
        let m = mem();
        write_header(&m, HDR, &good_header(10));
        assert_eq!(
            tx(&m, &[desc(HDR, 44, RO), desc(MEM_SIZE - 5, 10, RO)]).unwrap_err(),
            PacketError::OutOfMemory { index: 1 }
        );
        assert_eq!(
            tx(&m, &[desc(u64::MAX - 10, 44, RO)]).unwrap_err(),
            PacketError::OutOfMemory { index: 0 }
        );
        assert_eq!(
            rx(&m, &[desc(MEM_SIZE - 40, 4096, WO)]).unwrap_err(),
            PacketError::OutOfMemory { index: 0 }
        );
        // Too many descriptors (limit 8).
        let descs: Vec<_> = (0..9).map(|i| desc(DATA + 64 * i, 64, RO)).collect();
        assert_eq!(
            tx(&m, &descs).unwrap_err(),
            PacketError::TooManyDescriptors { max: 8 }
        );
        // A loop.
        let vq = MockSplitQueue::new(&m, 16);
        let looped = [
            RawDescriptor::from(Descriptor::new(HDR, 44, 1, 1)),
            RawDescriptor::from(Descriptor::new(DATA, 10, 1, 0)),
        ];
        let chain = vq.build_multiple_desc_chains(&looped).unwrap();
        let big = TxLimits {
            max_descriptors: 100,
            ..limits()
        };
        assert_eq!(
            parse_tx(chain, &big).unwrap_err(),
            PacketError::UnterminatedChain
        );
    }

    #[test]
    fn rx_buffers_and_writes_stay_inside() {
        let m = mem();
        let b = rx(&m, &[desc(HDR, 44 + 4096, WO)]).unwrap();
        assert_eq!(b.data_room(64 * 1024), 4096);
        assert_eq!(b.data_room(100), 100);
        let b2 = rx(&m, &[desc(HDR, 44, WO), desc(DATA, 10, WO)]).unwrap();
        assert_eq!(b2.data_room(u32::MAX), 10);

        // Header straddling two descriptors, data following.
        let b3 = rx(&m, &[desc(HDR, 30, WO), desc(DATA, 30, WO)]).unwrap();
        let h = good_header(16);
        let data: Vec<u8> = (0..16).collect();
        assert_eq!(write_rx(&m, &b3, &h, &data).unwrap(), 60);
        let mut raw = [0u8; 60];
        m.read_slice(&mut raw[..30], GuestAddress(HDR)).unwrap();
        m.read_slice(&mut raw[30..], GuestAddress(DATA)).unwrap();
        assert_eq!(&raw[..44], &h.to_bytes());
        assert_eq!(&raw[44..], &data[..]);

        // Data that does not fit is refused, nothing past the buffer is touched.
        m.write_slice(&[0xaa; 16], GuestAddress(DATA + 30)).unwrap();
        assert!(write_rx(&m, &b3, &h, &[1u8; 17]).is_err());
        let mut after = [0u8; 16];
        m.read_slice(&mut after, GuestAddress(DATA + 30)).unwrap();
        assert_eq!(after, [0xaa; 16]);
    }

    #[test]
    fn sub_range_edges() {
        let segs = [seg(0x100, 10), seg(0x200, 10)];
        assert_eq!(sub_range(&segs, 0, 0), Some(vec![]));
        assert_eq!(
            sub_range(&segs, 5, 10),
            Some(vec![seg(0x105, 5), seg(0x200, 5)])
        );
        assert_eq!(sub_range(&segs, 20, 0), Some(vec![]));
        assert_eq!(sub_range(&segs, 20, 1), None);
        assert_eq!(sub_range(&segs, 0, 21), None);
        assert_eq!(sub_range(&segs, u64::MAX, 2), None);
        assert_eq!(sub_range(&[], 0, 0), Some(vec![]));
    }

    #[test]
    fn random_chains_never_panic() {
        let m = mem();
        let mut x: u64 = 0x1234_5678_9abc_def0;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let mut raw = [0u8; HDR_LEN];
            for b in raw.iter_mut() {
                *b = next() as u8;
            }
            // Make some of them plausible.
            if next() % 2 == 0 {
                raw[..8].copy_from_slice(&GUEST_CID.to_le_bytes());
                raw[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
                raw[28..30].copy_from_slice(&1u16.to_le_bytes());
                raw[30..32].copy_from_slice(&((next() % 9) as u16).to_le_bytes());
                raw[24..28].copy_from_slice(&((next() % 9000) as u32).to_le_bytes());
            }
            m.write_slice(&raw, GuestAddress(HDR)).unwrap();
            let n = (next() % 5) as usize + 1;
            let descs: Vec<_> = (0..n)
                .map(|i| {
                    let addr = if next() % 10 == 0 {
                        next()
                    } else {
                        HDR + 0x1000 * i as u64
                    };
                    let len = (next() % 5000) as u32;
                    desc(addr, len, next() % 7 == 0)
                })
                .collect();
            let _ = tx(&m, &descs);
            let _ = rx(&m, &descs);
        }
    }
}
