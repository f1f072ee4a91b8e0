//! Builds a descriptor chain from fuzz input (shared by the chain targets through `#[path]`).
//!
//! Input: byte 0 = number of descriptors (mod 17), then 16 bytes per descriptor (addr, len,
//! flags, next, little-endian), then the contents of guest memory at DATA. Addresses are
//! kept near guest memory so the parsers get past the range checks.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 0x2_0000;
const DATA: u64 = 0x1000;
const QUEUE_SIZE: u16 = 16;

/// Calls `f` with the chain `input` describes over guest memory it fills; does nothing
/// for an input too short to describe one.
pub fn with_chain(input: &[u8], f: impl FnOnce(DescriptorChain<&GuestMemoryMmap>)) {
    let Some((&count, rest)) = input.split_first() else {
        return;
    };
    let count = usize::from(count) % (usize::from(QUEUE_SIZE) + 1);
    if count == 0 || rest.len() < count * 16 {
        return;
    }
    let (table, contents) = rest.split_at(count * 16);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let contents = &contents[..contents.len().min(MEM_SIZE - DATA as usize)];
    if mem.write_slice(contents, GuestAddress(DATA)).is_err() {
        return;
    }
    let descs: Vec<RawDescriptor> = table
        .chunks_exact(16)
        .map(|c| {
            let u64_at = |i: usize| u64::from_le_bytes(c[i..i + 8].try_into().unwrap());
            let u32_at = |i: usize| u32::from_le_bytes(c[i..i + 4].try_into().unwrap());
            let u16_at = |i: usize| u16::from_le_bytes(c[i..i + 2].try_into().unwrap());
            let addr = u64_at(0) % (2 * MEM_SIZE as u64);
            RawDescriptor::from(Descriptor::new(addr, u32_at(8), u16_at(12), u16_at(14)))
        })
        .collect();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let Ok(chain) = vq.build_multiple_desc_chains(&descs) else {
        return;
    };
    f(chain);
}
