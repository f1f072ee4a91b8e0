//! Descriptor chains of virtio-net (virtio 1.x, 5.1.6) as pure functions over a chain and
//! the guest memory it points into: TX chains become a validated frame, RX chains a
//! validated buffer, and the placement of one received frame over RX buffers is planned and
//! written here. Runs on the VMM thread, but touches no device state, so every malformed
//! shape is unit-tested on its own.
//!
//! With VIRTIO_F_VERSION_1 the driver may frame a packet any way it likes (the header need
//! not have a descriptor of its own), so both directions are treated as byte streams: a TX
//! chain is `header ++ frame` over device-readable descriptors, an RX chain is device-writable
//! space. Every length and address read from the guest is checked here; the device copies
//! through the returned [`Segment`]s without re-validating them.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use super::{ETH_HLEN, VNET_HDR_LEN};

/// Why a chain was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("the descriptor chain is empty")]
    EmptyChain,
    #[error("the descriptor chain is longer than {max} descriptors")]
    TooManyDescriptors { max: usize },
    #[error("the descriptor chain loops, points past its table or into unmapped memory, or totals 4 GiB or more")]
    UnterminatedChain,
    #[error("descriptor {index} has the wrong direction")]
    WrongDirection { index: usize },
    #[error("descriptor {index} has length 0")]
    EmptyDescriptor { index: usize },
    #[error("descriptor {index} wraps around the guest address space")]
    AddressOverflow { index: usize },
    #[error("descriptor {index} is not in guest memory")]
    OutOfMemory { index: usize },
    #[error("the chain holds {len} bytes, fewer than the 12-byte virtio-net header")]
    ShortHeader { len: u64 },
    #[error("the frame after the header has {len} bytes, fewer than an Ethernet header")]
    FrameTooShort { len: u64 },
    #[error("the chain holds {len} bytes, more than the {max} a frame may have")]
    TooLong { len: u64, max: u64 },
    #[error("cannot copy the frame out of guest memory")]
    GuestMemory(#[source] GuestMemoryError),
}

impl ChainError {
    /// A well-formed TX chain whose frame is over the size limit (counted apart from
    /// malformed chains).
    pub fn is_too_long(&self) -> bool {
        matches!(self, ChainError::TooLong { .. })
    }
}

/// Tests compare errors; guest-memory causes compare by their description.
#[cfg(test)]
impl PartialEq for ChainError {
    fn eq(&self, other: &Self) -> bool {
        format!("{self:?}") == format!("{other:?}")
    }
}

/// A guest buffer: a validated descriptor (inside guest memory, no wrap-around, non-empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A TX chain: header and frame, `len` bytes in all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxFrame {
    pub segments: Vec<Segment>,
    /// Header plus frame; at most the `max_len` given to [`parse_tx`].
    pub len: u64,
}

/// An RX chain the device may write a frame (or part of one) into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxBuffer {
    /// The chain's head index, for the used ring.
    pub head: u16,
    pub segments: Vec<Segment>,
    /// Sum of the segment lengths; at least the 12-byte header.
    pub capacity: u64,
}

/// Collects at most `max` descriptors; refuses longer, empty and unterminated chains.
fn collect<M>(chain: &mut DescriptorChain<M>, max: usize) -> Result<Vec<Descriptor>, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    // One more than the maximum tells "too long" from "exactly the maximum".
    let descs: Vec<Descriptor> = chain.by_ref().take(max.saturating_add(1)).collect();
    if descs.len() > max {
        return Err(ChainError::TooManyDescriptors { max });
    }
    let last = descs.last().ok_or(ChainError::EmptyChain)?;
    // The iterator stops early on a loop (its TTL), a bad index or an unreadable descriptor;
    // the last descriptor it produced then still says "next".
    if last.has_next() {
        return Err(ChainError::UnterminatedChain);
    }
    Ok(descs)
}

/// Validates every descriptor for `access`; returns the segments and their total length.
fn segments<G: GuestMemory + ?Sized>(
    mem: &G,
    descs: &[Descriptor],
    device_writes: bool,
) -> Result<(Vec<Segment>, u64), ChainError> {
    let access = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut total = 0u64;
    let mut out = Vec::with_capacity(descs.len());
    for (index, d) in descs.iter().enumerate() {
        if d.is_write_only() != device_writes {
            return Err(ChainError::WrongDirection { index });
        }
        let len = d.len();
        if len == 0 {
            return Err(ChainError::EmptyDescriptor { index });
        }
        // The last byte must not wrap past 2^64.
        if d.addr()
            .0
            .checked_add(u64::from(len.saturating_sub(1)))
            .is_none()
        {
            return Err(ChainError::AddressOverflow { index });
        }
        let in_memory = usize::try_from(len).is_ok_and(|n| mem.check_range(d.addr(), n, access));
        if !in_memory {
            return Err(ChainError::OutOfMemory { index });
        }
        // At most 65536 descriptors of < 4 GiB each: cannot overflow, but stay checked.
        total = total.saturating_add(u64::from(len));
        out.push(Segment {
            addr: d.addr(),
            len,
        });
    }
    Ok((out, total))
}

/// Parses a TX chain: device-readable descriptors holding the 12-byte header and an Ethernet
/// frame, `max_len` bytes at most (header included), `max_descriptors` descriptors at most.
pub fn parse_tx<M>(
    mut chain: DescriptorChain<M>,
    max_descriptors: usize,
    max_len: u64,
) -> Result<TxFrame, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let descs = collect(&mut chain, max_descriptors)?;
    let (segments, len) = self::segments(chain.memory(), &descs, false)?;
    let frame = len
        .checked_sub(VNET_HDR_LEN as u64)
        .ok_or(ChainError::ShortHeader { len })?;
    if frame < ETH_HLEN as u64 {
        return Err(ChainError::FrameTooShort { len: frame });
    }
    if len > max_len {
        return Err(ChainError::TooLong { len, max: max_len });
    }
    Ok(TxFrame { segments, len })
}

/// Parses an RX chain: device-writable descriptors, at least a header's worth of space, at
/// most `max_descriptors` descriptors.
pub fn parse_rx<M>(
    mut chain: DescriptorChain<M>,
    max_descriptors: usize,
) -> Result<RxBuffer, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let descs = collect(&mut chain, max_descriptors)?;
    let (segments, capacity) = self::segments(chain.memory(), &descs, true)?;
    // Each buffer must hold at least the header (virtio 1.x, 5.1.6.3.1), mergeable or not.
    if capacity < VNET_HDR_LEN as u64 {
        return Err(ChainError::ShortHeader { len: capacity });
    }
    Ok(RxBuffer {
        head,
        segments,
        capacity,
    })
}

/// Copies a parsed TX chain out of guest memory into `buf`; returns the filled prefix.
pub fn gather<'b, G: GuestMemory + ?Sized>(
    mem: &G,
    frame: &TxFrame,
    buf: &'b mut [u8],
) -> Result<&'b [u8], ChainError> {
    let max = buf.len() as u64;
    let too_long = || ChainError::TooLong {
        len: frame.len,
        max,
    };
    let total = usize::try_from(frame.len).map_err(|_| too_long())?;
    if total > buf.len() {
        return Err(too_long());
    }
    let mut at = 0usize;
    for seg in &frame.segments {
        let end = at.saturating_add(seg.len as usize);
        let dst = buf.get_mut(at..end).ok_or_else(too_long)?;
        mem.read_slice(dst, seg.addr)
            .map_err(ChainError::GuestMemory)?;
        at = end;
    }
    buf.get(..at).ok_or_else(too_long)
}

/// Where a received frame of `frame_len` bytes (header included) goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxPlan {
    /// Into the first `buffers` buffers.
    Fits { buffers: usize },
    /// The buffers given are not enough yet; more may come.
    NeedMore,
    /// Without mergeable buffers, the next buffer is too small: the frame can never fit it.
    TooLarge,
}

/// Plans a frame over buffers of the given capacities, in ring order. Without MRG_RXBUF a
/// frame must fit one buffer; with it, a frame spans as many buffers as it needs.
pub fn plan_rx(
    capacities: impl IntoIterator<Item = u64>,
    frame_len: u64,
    mergeable: bool,
) -> RxPlan {
    let mut capacities = capacities.into_iter();
    if !mergeable {
        return match capacities.next() {
            None => RxPlan::NeedMore,
            Some(c) if c >= frame_len => RxPlan::Fits { buffers: 1 },
            Some(_) => RxPlan::TooLarge,
        };
    }
    let mut have = 0u64;
    for (i, c) in capacities.enumerate() {
        have = have.saturating_add(c);
        if have >= frame_len {
            return RxPlan::Fits { buffers: i + 1 };
        }
    }
    RxPlan::NeedMore
}

/// Writes `frame` over `buffers` in order; returns the bytes written into each buffer (the
/// used lengths). Buffers past the end of the frame get nothing (and are not returned).
pub fn scatter<G: GuestMemory + ?Sized>(
    mem: &G,
    frame: &[u8],
    buffers: &[RxBuffer],
) -> Result<Vec<u32>, ChainError> {
    let mut rest = frame;
    let mut used = Vec::with_capacity(buffers.len());
    for buffer in buffers {
        if rest.is_empty() {
            break;
        }
        let mut written = 0u32;
        for seg in &buffer.segments {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(seg.len as usize);
            let (chunk, tail) = rest.split_at(n);
            mem.write_slice(chunk, seg.addr)
                .map_err(ChainError::GuestMemory)?;
            // n <= seg.len, a u32.
            written = written.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
            rest = tail;
        }
        used.push(written);
    }
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{desc, RO, WO};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const A: u64 = 0x1_0000;
    const B: u64 = 0x2_0000;
    const MEM_END: u64 = 0x10_0000;
    const MAX: u64 = 12 + 1514;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_END as usize)]).unwrap()
    }

    fn tx(m: &GuestMemoryMmap<()>, descs: &[RawDescriptor]) -> Result<TxFrame, ChainError> {
        let vq = MockSplitQueue::new(m, 16);
        parse_tx(vq.build_desc_chain(descs).unwrap(), 4, MAX)
    }

    fn rx(m: &GuestMemoryMmap<()>, descs: &[RawDescriptor]) -> Result<RxBuffer, ChainError> {
        let vq = MockSplitQueue::new(m, 16);
        parse_rx(vq.build_desc_chain(descs).unwrap(), 4)
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn tx_accepts_any_framing() {
        let m = mem();
        // Header in its own descriptor, frame in two more.
        let f = tx(
            &m,
            &[desc(A, 12, RO), desc(B, 14, RO), desc(B + 100, 50, RO)],
        )
        .unwrap();
        assert_eq!(f.len, 76);
        assert_eq!(f.segments, vec![seg(A, 12), seg(B, 14), seg(B + 100, 50)]);
        // Header and frame in one descriptor; the header split over two.
        assert_eq!(tx(&m, &[desc(A, 26, RO)]).unwrap().len, 26);
        let f = tx(&m, &[desc(A, 5, RO), desc(B, 21, RO)]).unwrap();
        assert_eq!(f.len, 26);
        // Exactly the maximum.
        assert_eq!(tx(&m, &[desc(A, MAX as u32, RO)]).unwrap().len, MAX);
    }

    #[test]
    fn tx_malformed_shapes() {
        let m = mem();
        let cases: Vec<(Vec<RawDescriptor>, ChainError)> = vec![
            // header too short
            (vec![desc(A, 11, RO)], ChainError::ShortHeader { len: 11 }),
            (
                vec![desc(A, 6, RO), desc(B, 5, RO)],
                ChainError::ShortHeader { len: 11 },
            ),
            // header but no Ethernet header after it
            (
                vec![desc(A, 12, RO), desc(B, 13, RO)],
                ChainError::FrameTooShort { len: 13 },
            ),
            // a device-writable descriptor
            (
                vec![desc(A, 12, RO), desc(B, 60, WO)],
                ChainError::WrongDirection { index: 1 },
            ),
            (
                vec![desc(A, 60, WO)],
                ChainError::WrongDirection { index: 0 },
            ),
            // zero length
            (
                vec![desc(A, 12, RO), desc(B, 0, RO), desc(B, 60, RO)],
                ChainError::EmptyDescriptor { index: 1 },
            ),
            // address + length wraps around 2^64
            (
                vec![desc(A, 12, RO), desc(u64::MAX - 10, 100, RO)],
                ChainError::AddressOverflow { index: 1 },
            ),
            // outside guest memory, and straddling its end
            (
                vec![desc(A, 12, RO), desc(0x8000_0000, 60, RO)],
                ChainError::OutOfMemory { index: 1 },
            ),
            (
                vec![desc(A, 12, RO), desc(MEM_END - 10, 60, RO)],
                ChainError::OutOfMemory { index: 1 },
            ),
            // over the frame limit
            (
                vec![desc(A, 12, RO), desc(B, MAX as u32 - 11, RO)],
                ChainError::TooLong {
                    len: MAX + 1,
                    max: MAX,
                },
            ),
            // lengths that overflow the 2^32 a chain may total: the chain iterator stops
            (
                vec![desc(A, u32::MAX, RO), desc(B, u32::MAX, RO)],
                ChainError::UnterminatedChain,
            ),
            // the largest length a descriptor can carry
            (
                vec![desc(A, u32::MAX, RO)],
                ChainError::OutOfMemory { index: 0 },
            ),
            // too many descriptors (limit 4)
            (
                (0..5).map(|i| desc(A + 100 * i, 20, RO)).collect(),
                ChainError::TooManyDescriptors { max: 4 },
            ),
        ];
        for (i, (descs, want)) in cases.into_iter().enumerate() {
            assert_eq!(tx(&m, &descs).unwrap_err(), want, "case {i}");
        }
        assert!(tx(&m, &[desc(A, MAX as u32 + 1, RO)])
            .unwrap_err()
            .is_too_long());
        assert!(!tx(&m, &[desc(A, 1, RO)]).unwrap_err().is_too_long());
    }

    #[test]
    fn tx_loops_and_bad_indices_are_unterminated() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        // 0 -> 1 -> 0 ...
        let looped = [
            RawDescriptor::from(Descriptor::new(A, 12, 1, 1)),
            RawDescriptor::from(Descriptor::new(B, 512, 1, 0)),
        ];
        let chain = vq.build_multiple_desc_chains(&looped).unwrap();
        assert_eq!(
            parse_tx(chain, 100, MAX).unwrap_err(),
            ChainError::UnterminatedChain
        );
        // "next" past the table.
        let vq = MockSplitQueue::new(&m, 16);
        let past = [RawDescriptor::from(Descriptor::new(A, 60, 1, 40))];
        let chain = vq.build_multiple_desc_chains(&past).unwrap();
        assert_eq!(
            parse_tx(chain, 100, MAX).unwrap_err(),
            ChainError::UnterminatedChain
        );
    }

    #[test]
    fn rx_buffers() {
        let m = mem();
        let b = rx(&m, &[desc(A, 12, WO), desc(B, 1514, WO)]).unwrap();
        assert_eq!(b.capacity, 1526);
        assert_eq!(b.segments, vec![seg(A, 12), seg(B, 1514)]);
        assert_eq!(b.head, 0);
        assert_eq!(rx(&m, &[desc(A, 12, WO)]).unwrap().capacity, 12);

        let cases: Vec<(Vec<RawDescriptor>, ChainError)> = vec![
            (vec![desc(A, 11, WO)], ChainError::ShortHeader { len: 11 }),
            (
                vec![desc(A, 12, WO), desc(B, 100, RO)],
                ChainError::WrongDirection { index: 1 },
            ),
            (
                vec![desc(A, 0, WO)],
                ChainError::EmptyDescriptor { index: 0 },
            ),
            (
                vec![desc(u64::MAX, 2, WO)],
                ChainError::AddressOverflow { index: 0 },
            ),
            (
                vec![desc(MEM_END, 100, WO)],
                ChainError::OutOfMemory { index: 0 },
            ),
            (
                vec![desc(A, u32::MAX, WO), desc(B, 2, WO)],
                ChainError::UnterminatedChain,
            ),
            (
                (0..5).map(|i| desc(A + 100 * i, 20, WO)).collect(),
                ChainError::TooManyDescriptors { max: 4 },
            ),
        ];
        for (i, (descs, want)) in cases.into_iter().enumerate() {
            assert_eq!(rx(&m, &descs).unwrap_err(), want, "case {i}");
        }
        // The last byte of memory is fine; one past it is not.
        assert!(rx(&m, &[desc(MEM_END - 12, 12, WO)]).is_ok());
        assert!(rx(&m, &[desc(MEM_END - 11, 12, WO)]).is_err());
    }

    #[test]
    fn gather_copies_in_order() {
        let m = mem();
        m.write_slice(&[1u8; 12], GuestAddress(A)).unwrap();
        m.write_slice(&[2u8; 20], GuestAddress(B)).unwrap();
        let f = tx(&m, &[desc(A, 12, RO), desc(B, 20, RO)]).unwrap();
        let mut buf = [0u8; 64];
        let got = gather(&m, &f, &mut buf).unwrap();
        assert_eq!(got.len(), 32);
        assert!(got[..12].iter().all(|&b| b == 1));
        assert!(got[12..].iter().all(|&b| b == 2));
        let mut small = [0u8; 31];
        assert!(gather(&m, &f, &mut small).unwrap_err().is_too_long());
    }

    #[test]
    fn plans() {
        use RxPlan::*;
        assert_eq!(plan_rx([1526], 1526, false), Fits { buffers: 1 });
        assert_eq!(plan_rx([1525, 9000], 1526, false), TooLarge);
        assert_eq!(plan_rx([], 60, false), NeedMore);
        assert_eq!(plan_rx([], 60, true), NeedMore);
        assert_eq!(plan_rx([100, 100, 100], 250, true), Fits { buffers: 3 });
        assert_eq!(plan_rx([100, 100, 100], 200, true), Fits { buffers: 2 });
        assert_eq!(plan_rx([100, 100], 201, true), NeedMore);
        assert_eq!(
            plan_rx([u64::MAX, u64::MAX], 201, true),
            Fits { buffers: 1 }
        );
    }

    #[test]
    fn scatter_spans_buffers_and_segments() {
        let m = mem();
        let buffers = vec![
            rx(&m, &[desc(A, 12, WO), desc(A + 0x100, 8, WO)]).unwrap(),
            rx(&m, &[desc(B, 16, WO)]).unwrap(),
            rx(&m, &[desc(B + 0x100, 16, WO)]).unwrap(),
        ];
        let frame: Vec<u8> = (0..30u8).collect();
        assert_eq!(scatter(&m, &frame, &buffers).unwrap(), vec![20, 10]);
        let mut got = [0u8; 12];
        m.read_slice(&mut got, GuestAddress(A)).unwrap();
        assert_eq!(got, frame[..12]);
        let mut got = [0u8; 8];
        m.read_slice(&mut got, GuestAddress(A + 0x100)).unwrap();
        assert_eq!(got, frame[12..20]);
        let mut got = [0u8; 10];
        m.read_slice(&mut got, GuestAddress(B)).unwrap();
        assert_eq!(got, frame[20..]);
        assert_eq!(scatter(&m, &[], &buffers).unwrap(), Vec::<u32>::new());
    }
}
