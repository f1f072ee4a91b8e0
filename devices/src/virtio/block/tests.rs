//! virtio-blk driven end to end through the host-side driver harness: MMIO registers as a
//! Linux guest writes them, descriptor chains in guest memory, the test's event loop (or
//! the disks' own device threads, as the vmm runs them).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};

use super::{Block, BlockError};
use crate::virtio::test_utils::{desc, reg, Driver, MemDisk, Slot, TestVmm, RO, WO};
use crate::virtio::{features, interrupt, status, VirtioDevice};

const BASE: u64 = 0xd000_0000;
const QUEUE: u64 = 0x1000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const DISK_SIZE: usize = 1 << 20;
const ALL: u64 = u64::MAX;

fn header(mem: &crate::virtio::GuestMemoryMmap, at: u64, req_type: u32, sector: u64) {
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&req_type.to_le_bytes());
    raw[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at)).unwrap();
}

fn status_at(mem: &crate::virtio::GuestMemoryMmap, at: u64) -> u8 {
    mem.read_obj(GuestAddress(at)).unwrap()
}

fn setup(read_only: bool) -> (TestVmm, Slot, MemDisk) {
    let disk = MemDisk::new(DISK_SIZE, read_only);
    let mut vmm = TestVmm::new();
    let slot = vmm.add_block(
        Block::new(Box::new(disk.clone()), Some("kestrel-disk-0")).unwrap(),
        BASE,
    );
    (vmm, slot, disk)
}

/// Submits one chain, notifies through the register, runs the VMM loop; returns (id, len).
fn submit(vmm: &mut TestVmm, d: &mut Driver<'_>, descs: &[RawDescriptor]) -> (u32, u32) {
    let head = d.add_chain(descs);
    d.notify(vmm);
    vmm.run();
    let used = d.take_used();
    assert_eq!(used.len(), 1, "expected one completion, got {used:?}");
    assert_eq!(used[0].0, u32::from(head));
    used[0]
}

#[test]
fn probe_config_and_round_trips() {
    let (mut vmm, slot, disk) = setup(false);
    let mem = vmm.mem.clone();
    let mut d = Driver::new(&mem, BASE, QUEUE, 16);
    let offered = d.device_features(&vmm);
    assert_ne!(offered & features::VERSION_1, 0);
    assert_ne!(offered & features::RING_EVENT_IDX, 0);
    assert_ne!(offered & 1 << VIRTIO_BLK_F_FLUSH, 0);
    assert_ne!(offered & 1 << VIRTIO_BLK_F_DISCARD, 0);
    assert_ne!(offered & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
    assert_eq!(offered & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(d.read(&vmm, reg::DEVICE_ID), 2);

    // Config space: capacity (read as two 32-bit halves, as Linux does), seg_max, blk_size.
    let cap_lo = u32::from_le_bytes(d.config(&vmm, 0, 4).try_into().unwrap());
    let cap_hi = u32::from_le_bytes(d.config(&vmm, 4, 4).try_into().unwrap());
    assert_eq!(
        (u64::from(cap_hi) << 32) | u64::from(cap_lo),
        (DISK_SIZE / 512) as u64
    );
    assert_eq!(d.config(&vmm, 12, 4), 254u32.to_le_bytes());
    assert_eq!(d.config(&vmm, 20, 4), 512u32.to_le_bytes());
    assert_eq!(d.config(&vmm, 0x200, 4), [0; 4]);

    d.probe(&mut vmm, ALL);
    assert!(slot.block.lock().unwrap().queue_evt_registered);

    // OUT: two data descriptors at sector 3.
    let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 3);
    let (_, len) = submit(
        &mut vmm,
        &mut d,
        &[
            desc(HDR, 16, RO),
            desc(DATA, 512, RO),
            desc(DATA + 512, 512, RO),
            desc(STATUS, 1, WO),
        ],
    );
    assert_eq!(len, 1);
    assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_OK as u8);
    assert_eq!(&disk.state().data[3 * 512..5 * 512], &payload[..]);

    // IN of the same sectors into a fresh buffer.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
    let (_, len) = submit(
        &mut vmm,
        &mut d,
        &[
            desc(HDR, 16, RO),
            desc(DATA + 0x1000, 1024, WO),
            desc(STATUS, 1, WO),
        ],
    );
    assert_eq!(len, 1025);
    let mut back = vec![0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(back, payload);

    // A read of many pages, at the end of the disk.
    let big = 256 * 1024;
    header(&mem, HDR, VIRTIO_BLK_T_IN, ((DISK_SIZE - big) / 512) as u64);
    submit(
        &mut vmm,
        &mut d,
        &[
            desc(HDR, 16, RO),
            desc(DATA, big as u32, WO),
            desc(STATUS, 1, WO),
        ],
    );
    assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_OK as u8);
    let mut back = vec![0u8; big];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, disk.state().data[DISK_SIZE - big..]);

    // FLUSH.
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    submit(&mut vmm, &mut d, &[desc(HDR, 16, RO), desc(STATUS, 1, WO)]);
    assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_OK as u8);
    assert_eq!(disk.state().flushes, 1);

    // GET_ID: 20 bytes, zero padded.
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    let (_, len) = submit(
        &mut vmm,
        &mut d,
        &[desc(HDR, 16, RO), desc(DATA, 20, WO), desc(STATUS, 1, WO)],
    );
    assert_eq!(len, 21);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"kestrel-disk-0\0\0\0\0\0\0");

    // DISCARD of two ranges, WRITE_ZEROES of one.
    let seg = |sector: u64, num: u32, flags: u32| {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&num.to_le_bytes());
        raw[12..].copy_from_slice(&flags.to_le_bytes());
        raw
    };
    mem.write_slice(&[seg(8, 8, 0), seg(100, 1, 0)].concat(), GuestAddress(DATA))
        .unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    submit(
        &mut vmm,
        &mut d,
        &[desc(HDR, 16, RO), desc(DATA, 32, RO), desc(STATUS, 1, WO)],
    );
    assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_OK as u8);
    assert_eq!(disk.state().discards, vec![(4096, 4096), (51200, 512)]);
    assert!(disk.state().data[4096..8192].iter().all(|&b| b == 0));

    mem.write_slice(&seg(20, 2, 1), GuestAddress(DATA)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    submit(
        &mut vmm,
        &mut d,
        &[desc(HDR, 16, RO), desc(DATA, 16, RO), desc(STATUS, 1, WO)],
    );
    assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_OK as u8);
    assert_eq!(disk.state().write_zeroes, vec![(10240, 1024)]);

    let m = slot.block.lock().unwrap().metrics().snapshot();
    assert_eq!(m.requests, 7);
    assert_eq!(
        (
            m.reads,
            m.writes,
            m.flushes,
            m.get_ids,
            m.discards,
            m.write_zeroes
        ),
        (2, 1, 1, 1, 1, 1)
    );
    assert_eq!(m.read_bytes, 1024 + big as u64);
    assert_eq!(m.write_bytes, 1024);
    assert_eq!((m.invalid_requests, m.io_errors), (0, 0));
    // Every completion interrupted (no event-idx suppression asked for: used_event is 0,
    // crossed on the first completion only... the driver here never moves it).
    assert!(slot.irq.count() >= 1);
    assert_ne!(
        d.read(&vmm, reg::INTERRUPT_STATUS) & interrupt::USED_RING,
        0
    );
}

#[test]
fn read_only_disk_refuses_writes_even_if_driver_ignores_the_bit() {
    let (mut vmm, slot, disk) = setup(true);
    let mem = vmm.mem.clone();
    let mut d = Driver::new(&mem, BASE, QUEUE, 16);
    let offered = d.device_features(&vmm);
    assert_ne!(offered & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(
        offered & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
        0
    );
    // A driver that does not accept RO.
    d.probe(&mut vmm, !(1 << VIRTIO_BLK_F_RO));

    let before = disk.state().data.clone();
    mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let (_, len) = submit(
        &mut vmm,
        &mut d,
        &[desc(HDR, 16, RO), desc(DATA, 512, RO), desc(STATUS, 1, WO)],
    );
    assert_eq!(
        (len, status_at(&mem, STATUS)),
        (1, VIRTIO_BLK_S_IOERR as u8)
    );

    mem.write_slice(&[0u8; 16], GuestAddress(DATA)).unwrap();
    mem.write_obj(1u32, GuestAddress(DATA + 8)).unwrap();
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&mem, HDR, t, 0);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        submit(
            &mut vmm,
            &mut d,
            &[desc(HDR, 16, RO), desc(DATA, 16, RO), desc(STATUS, 1, WO)],
        );
        assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_IOERR as u8);
    }
    assert_eq!(disk.state().data, before);

    // Reads still work.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
    submit(
        &mut vmm,
        &mut d,
        &[desc(HDR, 16, RO), desc(DATA, 512, WO), desc(STATUS, 1, WO)],
    );
    assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_OK as u8);
    let m = slot.block.lock().unwrap().metrics().snapshot();
    assert_eq!((m.io_errors, m.write_bytes, m.reads), (3, 0, 1));
}

#[test]
fn malformed_requests_fail_alone() {
    let (mut vmm, slot, _disk) = setup(false);
    let mem = vmm.mem.clone();
    let mut d = Driver::new(&mem, BASE, QUEUE, 16);
    d.probe(&mut vmm, ALL);
    let last_sector = (DISK_SIZE / 512) as u64;

    // (header type, sector, chain, expected used len, expected status if any)
    type Case = (u32, u64, Vec<RawDescriptor>, u32, Option<u32>);
    let cases: Vec<Case> = vec![
        // short header
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![desc(HDR, 8, RO), desc(DATA, 512, WO), desc(STATUS, 1, WO)],
            1,
            Some(VIRTIO_BLK_S_IOERR),
        ),
        // header in a write-only descriptor
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![desc(HDR, 16, WO), desc(DATA, 512, WO), desc(STATUS, 1, WO)],
            1,
            Some(VIRTIO_BLK_S_IOERR),
        ),
        // sector past the end
        (
            VIRTIO_BLK_T_IN,
            last_sector,
            vec![desc(HDR, 16, RO), desc(DATA, 512, WO), desc(STATUS, 1, WO)],
            1,
            Some(VIRTIO_BLK_S_IOERR),
        ),
        // sector * 512 overflows
        (
            VIRTIO_BLK_T_OUT,
            u64::MAX,
            vec![desc(HDR, 16, RO), desc(DATA, 512, RO), desc(STATUS, 1, WO)],
            1,
            Some(VIRTIO_BLK_S_IOERR),
        ),
        // data of the wrong direction
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![desc(HDR, 16, RO), desc(DATA, 512, RO), desc(STATUS, 1, WO)],
            1,
            Some(VIRTIO_BLK_S_IOERR),
        ),
        // zero-length data
        (
            VIRTIO_BLK_T_OUT,
            0,
            vec![desc(HDR, 16, RO), desc(DATA, 0, RO), desc(STATUS, 1, WO)],
            1,
            Some(VIRTIO_BLK_S_IOERR),
        ),
        // unknown type
        (
            99,
            0,
            vec![desc(HDR, 16, RO), desc(STATUS, 1, WO)],
            1,
            Some(VIRTIO_BLK_S_UNSUPP),
        ),
        // status descriptor read-only: no status to write
        (
            VIRTIO_BLK_T_OUT,
            0,
            vec![desc(HDR, 16, RO), desc(DATA, 512, RO), desc(STATUS, 1, RO)],
            0,
            None,
        ),
        // status descriptor empty
        (
            VIRTIO_BLK_T_OUT,
            0,
            vec![desc(HDR, 16, RO), desc(DATA, 512, RO), desc(STATUS, 0, WO)],
            0,
            None,
        ),
        // status missing (chain ends with read-only data)
        (
            VIRTIO_BLK_T_OUT,
            0,
            vec![desc(HDR, 16, RO), desc(DATA, 512, RO)],
            0,
            None,
        ),
        // data outside guest memory
        (
            VIRTIO_BLK_T_IN,
            0,
            vec![
                desc(HDR, 16, RO),
                desc(0x8000_0000, 512, WO),
                desc(STATUS, 1, WO),
            ],
            1,
            Some(VIRTIO_BLK_S_IOERR),
        ),
    ];
    for (i, (t, sector, chain, want_len, want_status)) in cases.into_iter().enumerate() {
        header(&mem, HDR, t, sector);
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let (_, len) = submit(&mut vmm, &mut d, &chain);
        assert_eq!(len, want_len, "case {i}");
        let want = want_status.map_or(0xee, |s| s as u8);
        assert_eq!(status_at(&mem, STATUS), want, "case {i}");
    }

    // A descriptor loop: written by hand (the harness links chains properly).
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let looped = [
        RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(HDR, 16, 1, 15)),
        RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
            DATA,
            512,
            1 | 2,
            14,
        )),
    ];
    // Head at 14 -> 15 -> 14 ...
    d.add_raw(&looped, 14);
    d.notify(&vmm);
    vmm.run();
    assert_eq!(d.take_used(), vec![(14, 0)]);

    // The device still works.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    submit(
        &mut vmm,
        &mut d,
        &[desc(HDR, 16, RO), desc(DATA, 512, WO), desc(STATUS, 1, WO)],
    );
    assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_OK as u8);
    assert_eq!(d.read(&vmm, reg::STATUS), 0xf);
    let m = slot.block.lock().unwrap().metrics().snapshot();
    assert_eq!(m.invalid_requests, 12);
    assert_eq!(m.requests, 13);
}

#[test]
fn too_many_descriptors_is_refused() {
    let (mut vmm, _slot, _disk) = setup(false);
    let mem = vmm.mem.clone();
    // A queue larger than the device's seg_max + 2 would allow only with indirect tables;
    // an indirect table of 300 descriptors is the way a guest can try it.
    let mut d = Driver::new(&mem, BASE, QUEUE, 16);
    d.probe(&mut vmm, ALL);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let table = 0x38_0000u64;
    let n = 300u16;
    for i in 0..n {
        let (addr, len, flags) = match i {
            0 => (HDR, 16, 1),
            i if i == n - 1 => (STATUS, 1, 2),
            _ => (DATA, 512, 1 | 2),
        };
        let raw = RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
            addr,
            len,
            flags,
            i + 1,
        ));
        mem.write_obj(raw, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }
    let head = RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
        table,
        16 * u32::from(n),
        4,
        0,
    ));
    d.add_raw(&[head], 0);
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    d.notify(&vmm);
    vmm.run();
    assert_eq!(d.take_used(), vec![(0, 0)]);
    assert_eq!(status_at(&mem, STATUS), 0xee);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let (mut vmm, slot, _disk) = setup(false);
    let mem = vmm.mem.clone();
    let mut d = Driver::new(&mem, BASE, QUEUE, 16);
    let accepted = d.probe(&mut vmm, ALL);
    assert_ne!(accepted & features::RING_EVENT_IDX, 0);
    let read = |d: &mut Driver<'_>| {
        d.add_chain(&[desc(HDR, 16, RO), desc(DATA, 512, WO), desc(STATUS, 1, WO)])
    };
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);

    // used_event = 0: the first completion (used idx 0 -> 1) interrupts.
    d.set_used_event(0);
    read(&mut d);
    d.notify(&vmm);
    vmm.run();
    assert_eq!(d.take_used().len(), 1);
    assert_eq!(slot.irq.count(), 1);
    // The device asks to be notified for the next entry.
    assert_eq!(d.avail_event(), 1);

    // The driver has not moved used_event: two more completions, no interrupt.
    read(&mut d);
    read(&mut d);
    d.notify(&vmm);
    vmm.run();
    assert_eq!(d.take_used().len(), 2);
    assert_eq!(slot.irq.count(), 1);
    assert_eq!(d.avail_event(), 3);

    // used_event = 4: completions 3 -> 4 do not cross it, 4 -> 5 does.
    d.set_used_event(4);
    read(&mut d);
    d.notify(&vmm);
    vmm.run();
    assert_eq!(slot.irq.count(), 1);
    read(&mut d);
    d.notify(&vmm);
    vmm.run();
    assert_eq!(d.take_used().len(), 2);
    assert_eq!(slot.irq.count(), 2);

    // A batch of three that crosses used_event interrupts once.
    d.set_used_event(6);
    for _ in 0..3 {
        read(&mut d);
    }
    d.notify(&vmm);
    vmm.run();
    assert_eq!(d.take_used().len(), 3);
    assert_eq!(slot.irq.count(), 3);
}

#[test]
fn without_event_idx_every_batch_interrupts() {
    let (mut vmm, slot, _disk) = setup(false);
    let mem = vmm.mem.clone();
    let mut d = Driver::new(&mem, BASE, QUEUE, 16);
    d.probe(&mut vmm, !features::RING_EVENT_IDX);
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    for i in 1..=3 {
        d.add_chain(&[desc(HDR, 16, RO), desc(STATUS, 1, WO)]);
        d.add_chain(&[desc(HDR, 16, RO), desc(STATUS, 1, WO)]);
        d.notify(&vmm);
        vmm.run();
        assert_eq!(d.take_used().len(), 2);
        assert_eq!(slot.irq.count(), i);
    }
    // The driver acknowledges; the status bit clears.
    d.write(&vmm, reg::INTERRUPT_ACK, interrupt::USED_RING);
    assert_eq!(d.read(&vmm, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn ioeventfd_path_and_requests_queued_before_activation() {
    let (mut vmm, slot, disk) = setup(false);
    let mem = vmm.mem.clone();
    let mut d = Driver::new(&mem, BASE, QUEUE, 16);
    d.negotiate(&vmm, ALL);
    d.setup_queue(&vmm);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
    d.add_chain(&[desc(HDR, 16, RO), desc(DATA, 512, WO), desc(STATUS, 1, WO)]);
    // Notified before DRIVER_OK (as KVM would deliver it: the EventFd).
    slot.transport.lock().unwrap().queue_events()[0]
        .write(1)
        .unwrap();
    vmm.run();
    assert!(d.take_used().is_empty());
    d.driver_ok(&vmm);
    // Activation happened on this ("vCPU") thread, processing waits for the VMM loop.
    assert!(d.take_used().is_empty());
    vmm.run();
    assert_eq!(d.take_used().len(), 1);
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got[..], &disk.state().data[1024..1536]);

    // Next request through the ioeventfd only.
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    d.add_chain(&[desc(HDR, 16, RO), desc(STATUS, 1, WO)]);
    slot.transport.lock().unwrap().queue_events()[0]
        .write(1)
        .unwrap();
    vmm.run();
    assert_eq!(d.take_used().len(), 1);
    assert_eq!(disk.state().flushes, 1);
}

#[test]
fn reset_and_reprobe() {
    let (mut vmm, slot, disk) = setup(false);
    let mem = vmm.mem.clone();
    {
        let mut d = Driver::new(&mem, BASE, QUEUE, 16);
        d.probe(&mut vmm, ALL);
        header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        submit(&mut vmm, &mut d, &[desc(HDR, 16, RO), desc(STATUS, 1, WO)]);
        d.write(&vmm, reg::STATUS, 0);
        assert_eq!(d.read(&vmm, reg::STATUS), 0);
        // Linux tears queues down after the reset.
        d.write(&vmm, reg::QUEUE_SEL, 0);
        d.write(&vmm, reg::QUEUE_READY, 0);
        assert_eq!(d.read(&vmm, reg::STATUS), 0);
        assert!(!slot.block.lock().unwrap().is_activated());
        // A notification while reset is drained and ignored.
        d.add_chain(&[desc(HDR, 16, RO), desc(STATUS, 1, WO)]);
        d.notify(&vmm);
        vmm.run();
        assert!(d.take_used().is_empty());
    }
    // A new driver instance (fresh rings) probes again.
    let mut d = Driver::new(&mem, BASE, QUEUE + 0x4000, 16);
    d.probe(&mut vmm, ALL);
    submit(&mut vmm, &mut d, &[desc(HDR, 16, RO), desc(STATUS, 1, WO)]);
    assert_eq!(disk.state().flushes, 2);
}

#[test]
fn several_disks_in_one_event_loop() {
    let mut vmm = TestVmm::new();
    let disks: Vec<MemDisk> = (0..3).map(|_| MemDisk::new(64 * 1024, false)).collect();
    let slots: Vec<Slot> = disks
        .iter()
        .enumerate()
        .map(|(i, disk)| {
            let serial = format!("disk{i}");
            let block = Block::new(Box::new(disk.clone()), Some(&serial)).unwrap();
            vmm.add_block(block, BASE + 0x1000 * i as u64)
        })
        .collect();
    let mem = vmm.mem.clone();
    let mut drivers: Vec<Driver<'_>> = (0..3)
        .map(|i| {
            Driver::new(
                &mem,
                BASE + 0x1000 * i as u64,
                QUEUE + 0x4000 * i as u64,
                16,
            )
        })
        .collect();
    for d in &drivers {
        d.probe(&mut vmm, ALL);
    }
    // Each disk gets a different write; all are notified before the loop runs once.
    for (i, d) in drivers.iter_mut().enumerate() {
        let hdr = HDR + 0x100 * i as u64;
        let data = DATA + 0x1000 * i as u64;
        header(&mem, hdr, VIRTIO_BLK_T_OUT, 1);
        mem.write_slice(&[i as u8 + 1; 512], GuestAddress(data))
            .unwrap();
        d.add_chain(&[
            desc(hdr, 16, RO),
            desc(data, 512, RO),
            desc(STATUS + i as u64, 1, WO),
        ]);
        d.notify(&vmm);
    }
    vmm.run();
    for (i, d) in drivers.iter_mut().enumerate() {
        assert_eq!(d.take_used().len(), 1);
        assert_eq!(status_at(&mem, STATUS + i as u64), VIRTIO_BLK_S_OK as u8);
        assert!(disks[i].state().data[512..1024]
            .iter()
            .all(|&b| b == i as u8 + 1));
        assert_eq!(slots[i].irq.count(), 1);
    }
}

#[test]
fn serial_longer_than_20_bytes_is_refused() {
    let disk = MemDisk::new(4096, false);
    let err = Block::new(Box::new(disk), Some("123456789012345678901"))
        .err()
        .unwrap();
    assert!(matches!(err, BlockError::SerialTooLong { len: 21 }));
}

#[test]
fn needs_reset_raises_config_interrupt() {
    let (vmm, slot, _disk) = setup(false);
    let mem = vmm.mem.clone();
    let d = Driver::new(&mem, BASE, QUEUE, 16);
    d.write(&vmm, reg::STATUS, status::ACKNOWLEDGE);
    d.write(&vmm, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER_OK);
    assert_ne!(d.read(&vmm, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(
        d.read(&vmm, reg::INTERRUPT_STATUS),
        interrupt::CONFIG_CHANGE
    );
    assert_eq!(slot.irq.count(), 1);
}

#[test]
fn bogus_available_index_does_not_spin_the_vmm_thread() {
    let (mut vmm, slot, _disk) = setup(false);
    let mem = vmm.mem.clone();
    let mut d = Driver::new(&mem, BASE, QUEUE, 16);
    d.probe(&mut vmm, ALL);
    // The available index jumps more than a queue ahead.
    let idx_addr = GuestAddress(d.vq.avail_addr().0 + 2);
    mem.write_obj(200u16, idx_addr).unwrap();
    d.notify(&vmm);
    vmm.run();
    assert!(d.take_used().is_empty());
    // The driver puts a sane index back: the device serves it.
    mem.write_obj(0u16, idx_addr).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    submit(&mut vmm, &mut d, &[desc(HDR, 16, RO), desc(STATUS, 1, WO)]);
    assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_OK as u8);
    assert_eq!(slot.block.lock().unwrap().metrics().snapshot().flushes, 1);
}

#[test]
fn a_disk_put_behind_a_placeholder_is_announced_and_served() {
    let mut vmm = TestVmm::new();
    let slot = vmm.add_block(
        Block::new(Box::new(crate::disk::EmptyDisk), Some("empty-0")).unwrap(),
        BASE,
    );
    let mem = vmm.mem.clone();
    let mut d = Driver::new(&mem, BASE, QUEUE, 16);
    d.probe(&mut vmm, ALL);
    assert_eq!(d.config(&vmm, 0, 8), [0; 8]);
    // A read of the empty disk fails alone.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    submit(
        &mut vmm,
        &mut d,
        &[desc(HDR, 16, RO), desc(DATA, 512, WO), desc(STATUS, 1, WO)],
    );
    assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_IOERR as u8);
    let irqs = slot.irq.count();

    let disk = MemDisk::new(DISK_SIZE, false);
    disk.state().data[512..516].copy_from_slice(b"root");
    slot.block
        .lock()
        .unwrap()
        .replace_disk(Box::new(disk.clone()), Some("kestrel-rootfs-7"))
        .unwrap();
    assert_eq!(slot.irq.count(), irqs + 1);
    assert_ne!(
        d.read(&vmm, reg::INTERRUPT_STATUS) & interrupt::CONFIG_CHANGE,
        0
    );
    assert_eq!(
        d.config(&vmm, 0, 8),
        ((DISK_SIZE / 512) as u64).to_le_bytes()
    );
    header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
    submit(
        &mut vmm,
        &mut d,
        &[desc(HDR, 16, RO), desc(DATA, 512, WO), desc(STATUS, 1, WO)],
    );
    assert_eq!(status_at(&mem, STATUS), VIRTIO_BLK_S_OK as u8);
    let mut back = [0u8; 4];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(&back, b"root");
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    submit(
        &mut vmm,
        &mut d,
        &[desc(HDR, 16, RO), desc(DATA, 20, WO), desc(STATUS, 1, WO)],
    );
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..16], b"kestrel-rootfs-7");
    assert_eq!(id[16..], [0; 4]);

    // Back to empty (the container was deleted): the capacity is 0 again.
    slot.block
        .lock()
        .unwrap()
        .replace_disk(Box::new(crate::disk::EmptyDisk), None)
        .unwrap();
    assert_eq!(d.config(&vmm, 0, 8), [0; 8]);
    let long = "x".repeat(21);
    assert!(matches!(
        slot.block
            .lock()
            .unwrap()
            .replace_disk(Box::new(crate::disk::EmptyDisk), Some(&long)),
        Err(BlockError::SerialTooLong { len: 21 })
    ));
}

/// A disk whose flushes wait at a gate the test opens: a backend stuck in `fdatasync`.
struct GatedDisk {
    inner: MemDisk,
    entered: std::sync::mpsc::Sender<()>,
    gate: std::sync::mpsc::Receiver<()>,
}

impl crate::disk::DiskBackend for GatedDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_vectored_at(
        &mut self,
        offset: u64,
        bufs: &crate::disk::IoBufs<'_>,
    ) -> Result<(), crate::disk::DiskError> {
        self.inner.read_vectored_at(offset, bufs)
    }
    fn write_vectored_at(
        &mut self,
        offset: u64,
        bufs: &crate::disk::IoBufs<'_>,
    ) -> Result<(), crate::disk::DiskError> {
        self.inner.write_vectored_at(offset, bufs)
    }
    fn flush(&mut self) -> Result<(), crate::disk::DiskError> {
        let _ = self.entered.send(());
        let _ = self.gate.recv();
        self.inner.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), crate::disk::DiskError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), crate::disk::DiskError> {
        self.inner.write_zeroes(offset, len)
    }
}

/// Polls `d`'s used ring until `n` completions arrived (the device threads run apart).
fn wait_used(d: &mut Driver<'_>, n: usize) -> Vec<(u32, u32)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut used = Vec::new();
    while used.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} completions arrived: {used:?}",
            used.len()
        );
        used.extend(d.take_used());
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    used
}

/// A storm of flushes stuck on one disk does not hold up another disk: each disk is
/// served on its own thread. The stuck flushes then complete in order, each with OK.
#[test]
fn a_flush_storm_on_one_disk_does_not_stall_another() {
    use std::sync::mpsc::channel;
    let mut vmm = TestVmm::new();
    let (entered_tx, entered) = channel();
    let (open_gate, gate) = channel();
    let slow = GatedDisk {
        inner: MemDisk::new(64 * 1024, false),
        entered: entered_tx,
        gate,
    };
    let fast = MemDisk::new(64 * 1024, false);
    let (_a, thread_a) = vmm.add_block_on_thread(Block::new(Box::new(slow), None).unwrap(), BASE);
    let (_b, thread_b) = vmm.add_block_on_thread(
        Block::new(Box::new(fast.clone()), None).unwrap(),
        BASE + 0x1000,
    );
    let mem = vmm.mem.clone();
    let mut da = Driver::new(&mem, BASE, QUEUE, 64);
    let mut db = Driver::new(&mem, BASE + 0x1000, QUEUE + 0x4000, 16);
    da.probe(&mut vmm, ALL);
    db.probe(&mut vmm, ALL);

    const FLUSHES: u64 = 32;
    for i in 0..FLUSHES {
        header(&mem, HDR + 16 * i, VIRTIO_BLK_T_FLUSH, 0);
        mem.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
        da.add_chain(&[desc(HDR + 16 * i, 16, RO), desc(STATUS + i, 1, WO)]);
    }
    da.notify(&vmm);
    entered
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the slow disk's thread reaches its first flush");

    // The other disk reads while the first flush is stuck.
    header(&mem, HDR + 0x1000, VIRTIO_BLK_T_IN, 2);
    let b_status = STATUS + 0x1000;
    db.add_chain(&[
        desc(HDR + 0x1000, 16, RO),
        desc(DATA, 512, WO),
        desc(b_status, 1, WO),
    ]);
    db.notify(&vmm);
    assert_eq!(wait_used(&mut db, 1).len(), 1);
    assert_eq!(status_at(&mem, b_status), VIRTIO_BLK_S_OK as u8);
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back[..], fast.state().data[1024..1536]);
    assert!(
        da.take_used().is_empty(),
        "no flush may complete before the gate opens"
    );

    for _ in 0..FLUSHES {
        open_gate.send(()).unwrap();
    }
    let used = wait_used(&mut da, FLUSHES as usize);
    let heads: Vec<u32> = used.iter().map(|&(id, _)| id).collect();
    let expected: Vec<u32> = (0..FLUSHES as u32).map(|i| 2 * i).collect();
    assert_eq!(heads, expected, "completions come in submission order");
    for i in 0..FLUSHES {
        assert_eq!(status_at(&mem, STATUS + i), VIRTIO_BLK_S_OK as u8);
    }
    thread_a.stop();
    thread_b.stop();
}
