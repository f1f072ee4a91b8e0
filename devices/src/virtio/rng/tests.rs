//! virtio-rng through the host-side driver harness: Linux's probe sequence over MMIO
//! registers, chains in guest memory, the VMM thread's event loop.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use super::{Rng, MAX_REQUEST_BYTES};
use crate::virtio::test_utils::{desc, reg, Driver, TestVmm, RO, WO};
use crate::virtio::{device_id, features};

const BASE: u64 = 0xd000_0000;
const QUEUE: u64 = 0x1000;
const BUF: u64 = 0x10_0000;

fn setup() -> (TestVmm, Arc<Mutex<Rng>>) {
    let mut vmm = TestVmm::new();
    let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
    vmm.add_device(rng.clone(), BASE);
    (vmm, rng)
}

#[test]
fn fills_writable_buffers_with_random_bytes() {
    let (mut vmm, rng) = setup();
    let mem = vmm.mem.clone();
    let mut d = Driver::new(&mem, BASE, QUEUE, super::QUEUE_SIZE);
    assert_eq!(d.read(&vmm, reg::DEVICE_ID), device_id::RNG);
    assert_eq!(d.probe(&mut vmm, u64::MAX), features::VERSION_1);

    // Two requests of 64 bytes each get different bytes, and nothing past them is touched.
    mem.write_slice(&[0u8; 256], GuestAddress(BUF)).unwrap();
    d.add_chain(&[desc(BUF, 64, WO)]);
    d.add_chain(&[desc(BUF + 128, 64, WO)]);
    d.notify(&vmm);
    vmm.run();
    let used = d.take_used();
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [64, 64]);
    let mut got = [0u8; 256];
    mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_ne!(got[..64], [0u8; 64]);
    assert_ne!(got[..64], got[128..192]);
    assert_eq!(got[64..128], [0u8; 64]);
    assert_eq!(got[192..], [0u8; 64]);
    assert_eq!(rng.lock().unwrap().bytes_served(), 128);
}

#[test]
fn malformed_chains_are_bounded_and_the_device_keeps_serving() {
    let (mut vmm, rng) = setup();
    let mem = vmm.mem.clone();
    let mut d = Driver::new(&mem, BASE, QUEUE, super::QUEUE_SIZE);
    d.probe(&mut vmm, u64::MAX);
    // A read-only descriptor gets nothing; a huge one at most MAX_REQUEST_BYTES; one
    // outside guest memory ends that chain.
    d.add_chain(&[desc(BUF, 32, RO)]);
    d.add_chain(&[desc(BUF, 1 << 20, WO), desc(BUF + (1 << 20), 4096, WO)]);
    d.add_chain(&[desc(0xffff_0000_0000, 64, WO)]);
    d.add_chain(&[desc(BUF, 0, WO), desc(BUF, 16, WO)]);
    d.notify(&vmm);
    vmm.run();
    let used: Vec<u32> = d.take_used().iter().map(|u| u.1).collect();
    assert_eq!(used, [0, MAX_REQUEST_BYTES, 0, 0]);
    // Still serving.
    d.add_chain(&[desc(BUF, 8, WO)]);
    d.notify(&vmm);
    vmm.run();
    assert_eq!(d.take_used().iter().map(|u| u.1).collect::<Vec<_>>(), [8]);
    assert_eq!(
        rng.lock().unwrap().bytes_served(),
        u64::from(MAX_REQUEST_BYTES) + 8
    );
}
