//! Fuzzes the virtio-mmio transport and the queues behind it, as a hostile guest drives
//! them: register writes and reads of any offset and width in any order, guest memory
//! (rings, descriptor tables, buffers) overwritten between them, and the VMM thread's
//! event loop run at any point, for a virtio-blk device (on an in-memory disk) and a
//! virtio-rng device on one MMIO bus.
//!
//! Input, one operation after another (the first byte's low bit picks the device):
//! - `0`: 32-bit register write: offset byte × 4, value (4 bytes);
//! - `1`: write of 1, 2, 4 or 8 bytes (or 3: a bad width) at any offset of the window;
//! - `2`: read of such a width at any offset;
//! - `3`: guest memory write: address (2 bytes), length (1 byte), bytes;
//! - `4`: the VMM thread's event loop (queue processing) until idle;
//! - `5`: Linux's probe sequence with fuzzed features, queue size and ring addresses,
//!   ending in DRIVER_OK (so the queues are reached without the fuzzer finding it).
//!
//! Checked: nothing panics, MAGIC and VERSION always read back, the interrupt status has
//! only its two bits, a reset (STATUS = 0) reads back as 0.
//! `cargo fuzz run mmio_transport` from the repository root.

#![no_main]

use std::sync::{Arc, Mutex};

use devices::virtio::block::Block;
use devices::virtio::rng::Rng;
use devices::virtio::test_utils::{reg, MemDisk, TestVmm};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 0x1_0000;
const BASES: [u64; 2] = [0xd000_0000, 0xd000_1000];

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fn width(selector: u8) -> usize {
    [1, 2, 4, 8, 3][usize::from(selector) % 5]
}

fn write32(vmm: &TestVmm, base: u64, offset: u64, value: u32) {
    assert!(vmm.bus.write(base + offset, &value.to_le_bytes()));
}

fn read32(vmm: &TestVmm, base: u64, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    assert!(vmm.bus.read(base + offset, &mut b));
    u32::from_le_bytes(b)
}

/// The register writes of Linux's `virtio_mmio` probe and `vm_setup_vq` for queue 0, with
/// the values from the input.
fn probe(vmm: &TestVmm, base: u64, input: &mut Input<'_>) -> Option<()> {
    let features = [input.u32()?, input.u32()?];
    let size = input.u16()?;
    let rings = [input.u16()?, input.u16()?, input.u16()?];
    for (offset, value) in [
        (reg::STATUS, 0),
        (reg::STATUS, 1),
        (reg::STATUS, 3),
        (reg::DRIVER_FEATURES_SEL, 1),
        (reg::DRIVER_FEATURES, features[1]),
        (reg::DRIVER_FEATURES_SEL, 0),
        (reg::DRIVER_FEATURES, features[0]),
        (reg::STATUS, 0xb),
        (reg::QUEUE_SEL, 0),
        (reg::QUEUE_NUM, u32::from(size)),
        (reg::QUEUE_DESC_LOW, u32::from(rings[0])),
        (reg::QUEUE_DESC_HIGH, 0),
        (reg::QUEUE_AVAIL_LOW, u32::from(rings[1])),
        (reg::QUEUE_AVAIL_HIGH, 0),
        (reg::QUEUE_USED_LOW, u32::from(rings[2])),
        (reg::QUEUE_USED_HIGH, 0),
        (reg::QUEUE_READY, 1),
        (reg::STATUS, 0xf),
    ] {
        write32(vmm, base, offset, value);
    }
    Some(())
}

fn run(data: &[u8]) -> Option<()> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let mut vmm = TestVmm::with_memory(mem.clone());
    let block = Block::new(Box::new(MemDisk::new(64 * 1024, false)), Some("fuzz")).ok()?;
    vmm.add_block(block, BASES[0]);
    vmm.add_device(Arc::new(Mutex::new(Rng::new().ok()?)), BASES[1]);

    let mut input = Input(data);
    while let Some(op) = input.byte() {
        let base = BASES[usize::from(op & 1)];
        match (op >> 1) % 6 {
            0 => {
                let offset = u64::from(input.byte()?) * 4;
                let value = input.u32()?;
                write32(&vmm, base, offset, value);
                if offset == reg::STATUS && value == 0 {
                    assert_eq!(
                        read32(&vmm, base, reg::STATUS),
                        0,
                        "a reset reads back as 0"
                    );
                }
            }
            1 => {
                let offset = u64::from(input.u16()?) % 0x1000;
                let w = width(input.byte()?);
                let bytes = input.take(w)?;
                assert!(vmm.bus.write(base + offset, bytes));
            }
            2 => {
                let offset = u64::from(input.u16()?) % 0x1000;
                let mut buf = vec![0u8; width(input.byte()?)];
                assert!(vmm.bus.read(base + offset, &mut buf));
            }
            3 => {
                let addr = u64::from(input.u16()?);
                let len = usize::from(input.byte()?);
                let bytes = input.take(len.min(input.0.len()))?;
                let _ = mem.write_slice(bytes, GuestAddress(addr));
            }
            4 => {
                vmm.run();
            }
            _ => probe(&vmm, base, &mut input)?,
        }
        assert_eq!(read32(&vmm, base, reg::MAGIC), 0x7472_6976);
        assert_eq!(read32(&vmm, base, reg::VERSION), 2);
        assert_eq!(read32(&vmm, base, reg::INTERRUPT_STATUS) & !3, 0);
    }
    vmm.run();
    Some(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
