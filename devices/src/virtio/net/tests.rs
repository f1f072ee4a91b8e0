//! virtio-net driven end to end through the host-side driver harness: MMIO registers as a
//! Linux guest writes them, descriptor chains in guest memory, the VMM thread's event loop,
//! and an in-memory backend in place of the tap (plus one test on a real tap in a private
//! network namespace).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_manager::SubscriberOps;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::tap::test_netns::TestNetns;
use super::{MacAddr, Net, NetBackend, Tap, MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::irq::CountingIrq;
use crate::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE};
use crate::virtio::test_utils::{desc, reg, Driver, TestVmm, RO, WO};
use crate::virtio::{features, interrupt, status, VirtioDevice};

const BASE: u64 = 0xd000_0000;
const RX_RING: u64 = 0x1000;
const TX_RING: u64 = 0x5000;
/// Entries of the driver's rings (the mock driver never wraps its available ring, so each
/// test adds fewer chains than this per queue).
const RING: u16 = 64;
const RX_BUF: u64 = 0x10_0000;
const TX_BUF: u64 = 0x28_0000;
const ALL: u64 = u64::MAX;
const MAC: MacAddr = MacAddr([0x02, 0x6b, 0x65, 0x73, 0x74, 0x01]);

fn bit(b: u32) -> u64 {
    1 << b
}

/// What the in-memory backend holds; shared with the test.
#[derive(Debug, Default)]
struct BackendState {
    /// Frames (header included) waiting for the device to read.
    to_guest: VecDeque<Vec<u8>>,
    /// Frames the device wrote.
    from_guest: Vec<Vec<u8>>,
    /// Every `set_offload` call.
    offloads: Vec<u32>,
    /// Makes the next writes fail with this error.
    write_error: Option<io::ErrorKind>,
    /// Calls of `read_frame`.
    reads: usize,
}

/// A backend in memory. Its fd is an EventFd that is readable exactly while frames wait,
/// like a tap's.
#[derive(Clone)]
struct MemBackend {
    state: Arc<Mutex<BackendState>>,
    ready: Arc<EventFd>,
}

impl MemBackend {
    fn new() -> Self {
        MemBackend {
            state: Arc::default(),
            ready: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        }
    }

    fn state(&self) -> MutexGuard<'_, BackendState> {
        self.state.lock().unwrap()
    }

    /// A frame from "the host": header (flags etc. as given) + `payload`.
    fn push(&self, hdr: [u8; VNET_HDR_LEN], payload: &[u8]) {
        let mut f = hdr.to_vec();
        f.extend_from_slice(payload);
        self.state().to_guest.push_back(f);
        self.ready.write(1).unwrap();
    }
}

impl AsRawFd for MemBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
}

impl NetBackend for MemBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.state();
        s.reads += 1;
        let Some(frame) = s.to_guest.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        if s.to_guest.is_empty() {
            let _ = self.ready.read();
        }
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        let mut s = self.state();
        if let Some(kind) = s.write_error {
            return Err(kind.into());
        }
        s.from_guest.push(frame.to_vec());
        Ok(frame.len())
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.state().offloads.push(flags);
        Ok(())
    }
}

/// One net device wired into a [`TestVmm`] the way the vmm does it.
struct Slot {
    net: Arc<Mutex<Net>>,
    transport: Arc<Mutex<MmioTransport>>,
    irq: CountingIrq,
}

fn add_net(vmm: &mut TestVmm, net: Net) -> Slot {
    let net = Arc::new(Mutex::new(net));
    let irq = CountingIrq::default();
    let transport =
        MmioTransport::new(vmm.mem.clone(), net.clone(), Arc::new(irq.clone())).unwrap();
    let transport = Arc::new(Mutex::new(transport));
    vmm.bus
        .insert(transport.clone(), BASE, MMIO_WINDOW_SIZE)
        .unwrap();
    vmm.em.add_subscriber(net.clone());
    Slot {
        net,
        transport,
        irq,
    }
}

fn setup(mac: Option<MacAddr>) -> (TestVmm, Slot, MemBackend) {
    let backend = MemBackend::new();
    let mut vmm = TestVmm::new();
    let slot = add_net(&mut vmm, Net::new(Box::new(backend.clone()), mac).unwrap());
    (vmm, slot, backend)
}

/// The guest driver: one harness driver per queue (RX = queue 0, TX = queue 1).
struct NetDriver<'a> {
    rx: Driver<'a>,
    tx: Driver<'a>,
    tx_size: u16,
    /// Next free RX buffer address.
    next_rx: u64,
    next_tx: u64,
}

impl<'a> NetDriver<'a> {
    fn new(mem: &'a crate::virtio::GuestMemoryMmap, rings: u64) -> Self {
        Self::with_tx_ring(mem, rings, RING)
    }

    fn with_tx_ring(mem: &'a crate::virtio::GuestMemoryMmap, rings: u64, tx_size: u16) -> Self {
        NetDriver {
            rx: Driver::new(mem, BASE, RX_RING + rings, RING),
            tx: Driver::new(mem, BASE, TX_RING + rings, tx_size),
            tx_size,
            next_rx: RX_BUF,
            next_tx: TX_BUF,
        }
    }

    /// Negotiation, both queues, DRIVER_OK; then the VMM thread takes the activation.
    fn probe(&self, vmm: &mut TestVmm, wanted: u64) -> u64 {
        let accepted = self.rx.negotiate(vmm, wanted);
        self.rx.setup_queue(vmm);
        self.setup_tx_queue(vmm);
        self.rx.driver_ok(vmm);
        assert_eq!(
            self.rx.read(vmm, reg::STATUS),
            0xf,
            "device refused DRIVER_OK"
        );
        vmm.run();
        accepted
    }

    fn setup_tx_queue(&self, vmm: &TestVmm) {
        let d = &self.tx;
        d.write(vmm, reg::QUEUE_SEL, 1);
        assert_eq!(d.read(vmm, reg::QUEUE_NUM_MAX), 256);
        d.write(vmm, reg::QUEUE_NUM, u32::from(self.tx_size));
        let split = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
        for (addr, lo_reg, hi_reg) in [
            (
                d.vq.desc_table_addr(),
                reg::QUEUE_DESC_LOW,
                reg::QUEUE_DESC_HIGH,
            ),
            (
                d.vq.avail_addr(),
                reg::QUEUE_AVAIL_LOW,
                reg::QUEUE_AVAIL_HIGH,
            ),
            (d.used_addr, reg::QUEUE_USED_LOW, reg::QUEUE_USED_HIGH),
        ] {
            let (lo, hi) = split(addr);
            d.write(vmm, lo_reg, lo);
            d.write(vmm, hi_reg, hi);
        }
        d.write(vmm, reg::QUEUE_READY, 1);
    }

    /// Posts `n` RX buffers of `len` bytes (one descriptor each); returns their addresses.
    fn post_rx(&mut self, n: usize, len: u32) -> Vec<(u16, u64)> {
        (0..n)
            .map(|_| {
                let addr = self.next_rx;
                self.next_rx += u64::from(len).next_multiple_of(0x100);
                (self.rx.add_chain(&[desc(addr, len, WO)]), addr)
            })
            .collect()
    }

    fn notify_rx(&self, vmm: &TestVmm) {
        self.rx.write(vmm, reg::QUEUE_NOTIFY, 0);
    }

    /// Queues header + `payload` as a TX chain of two descriptors; returns the head.
    fn queue_tx(&mut self, hdr: [u8; VNET_HDR_LEN], payload: &[u8]) -> u16 {
        let at = self.next_tx;
        self.next_tx += (VNET_HDR_LEN + payload.len()) as u64 + 0x100;
        let mem = self.tx.mem;
        mem.write_slice(&hdr, GuestAddress(at)).unwrap();
        mem.write_slice(payload, GuestAddress(at + VNET_HDR_LEN as u64))
            .unwrap();
        self.tx.add_chain(&[
            desc(at, VNET_HDR_LEN as u32, RO),
            desc(at + VNET_HDR_LEN as u64, payload.len() as u32, RO),
        ])
    }

    fn notify_tx(&self, vmm: &TestVmm) {
        self.tx.write(vmm, reg::QUEUE_NOTIFY, 1);
    }
}

/// An Ethernet frame of `len` bytes whose bytes are recognisable (`seed + i`).
fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

fn read(mem: &crate::virtio::GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// `num_buffers` of the header written at `addr`.
fn num_buffers(mem: &crate::virtio::GuestMemoryMmap, addr: u64) -> u16 {
    mem.read_obj(GuestAddress(addr + 10)).unwrap()
}

const CSUM_HDR: [u8; VNET_HDR_LEN] = [1, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0];

#[test]
fn features_config_and_offload_negotiation() {
    let (mut vmm, slot, backend) = setup(Some(MAC));
    let mem = vmm.mem.clone();
    let d = NetDriver::new(&mem, 0);
    assert_eq!(d.rx.read(&vmm, reg::DEVICE_ID), 1);
    let offered = d.rx.device_features(&vmm);
    for b in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(offered & bit(b), 0, "feature bit {b}");
    }
    assert_ne!(offered & features::VERSION_1, 0);
    assert_ne!(offered & features::RING_EVENT_IDX, 0);
    // The MAC, byte by byte as Linux reads it; nothing past it.
    let mac: Vec<u8> = (0..6).map(|i| d.rx.config(&vmm, i, 1)[0]).collect();
    assert_eq!(mac, MAC.0);
    assert_eq!(d.rx.config(&vmm, 6, 4), [0; 4]);
    // Config writes are ignored.
    assert!(vmm.bus.write(BASE + reg::CONFIG, &[0xff]));
    assert_eq!(d.rx.config(&vmm, 0, 1), [MAC.0[0]]);

    // Everything accepted: the tap gets every RX offload.
    d.probe(&mut vmm, ALL);
    assert!(slot.net.lock().unwrap().is_activated());
    use libc::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO};
    assert_eq!(
        backend.state().offloads,
        vec![TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO]
    );

    // Reset; a driver that only takes checksum offload.
    d.rx.write(&vmm, reg::STATUS, 0);
    assert!(!slot.net.lock().unwrap().is_activated());
    let d = NetDriver::new(&mem, 0x10_000);
    let wanted = features::VERSION_1 | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_CSUM);
    assert_eq!(d.probe(&mut vmm, wanted), wanted);
    assert_eq!(backend.state().offloads.last(), Some(&TUN_F_CSUM));

    // And one that takes none (TX offloads only matter to the guest).
    d.rx.write(&vmm, reg::STATUS, 0);
    let d = NetDriver::new(&mem, 0x20_000);
    d.probe(&mut vmm, features::VERSION_1 | bit(VIRTIO_NET_F_HOST_TSO4));
    assert_eq!(backend.state().offloads.last(), Some(&0));
    assert_eq!(
        slot.net.lock().unwrap().metrics().snapshot().offload_errors,
        0
    );
}

#[test]
fn no_mac_means_no_mac_feature() {
    let (vmm, _slot, _backend) = setup(None);
    let mem = vmm.mem.clone();
    let d = NetDriver::new(&mem, 0);
    assert_eq!(d.rx.device_features(&vmm) & bit(VIRTIO_NET_F_MAC), 0);
    assert_eq!(d.rx.config(&vmm, 0, 6), [0; 6]);
}

#[test]
fn tx_frames_reach_the_backend() {
    let (mut vmm, slot, backend) = setup(Some(MAC));
    let mem = vmm.mem.clone();
    let mut d = NetDriver::new(&mem, 0);
    d.probe(&mut vmm, ALL);

    let payloads = [frame(60, 1), frame(1514, 2), frame(MAX_FRAME_LEN, 3)];
    let heads: Vec<u16> = payloads.iter().map(|p| d.queue_tx(CSUM_HDR, p)).collect();
    d.notify_tx(&vmm);
    vmm.run();
    let used = d.tx.take_used();
    assert_eq!(
        used,
        heads.iter().map(|&h| (u32::from(h), 0)).collect::<Vec<_>>()
    );
    let sent = backend.state().from_guest.clone();
    assert_eq!(sent.len(), 3);
    for (s, p) in sent.iter().zip(&payloads) {
        assert_eq!(s[..VNET_HDR_LEN], CSUM_HDR, "the header passes through");
        assert_eq!(&s[VNET_HDR_LEN..], &p[..]);
    }
    // One descriptor holding header and frame, and one split inside the header.
    let at = TX_BUF + 0x30_000;
    let mut whole = CSUM_HDR.to_vec();
    whole.extend(frame(100, 9));
    mem.write_slice(&whole, GuestAddress(at)).unwrap();
    d.tx.add_chain(&[desc(at, whole.len() as u32, RO)]);
    d.tx.add_chain(&[desc(at, 5, RO), desc(at + 5, whole.len() as u32 - 5, RO)]);
    d.notify_tx(&vmm);
    vmm.run();
    assert_eq!(d.tx.take_used().len(), 2);
    assert_eq!(backend.state().from_guest[3], whole);
    assert_eq!(backend.state().from_guest[4], whole);

    let m = slot.net.lock().unwrap().metrics().snapshot();
    assert_eq!(m.tx_packets, 5);
    assert_eq!(m.tx_bytes, (60 + 1514 + MAX_FRAME_LEN + 200) as u64);
    assert!(slot.irq.count() >= 1);
    assert_ne!(
        d.rx.read(&vmm, reg::INTERRUPT_STATUS) & interrupt::USED_RING,
        0
    );
}

#[test]
fn oversized_and_malformed_tx_are_dropped_and_counted() {
    let (mut vmm, slot, backend) = setup(Some(MAC));
    let mem = vmm.mem.clone();
    let mut d = NetDriver::new(&mem, 0);
    d.probe(&mut vmm, ALL);

    // One byte over the limit.
    let big = d.queue_tx(CSUM_HDR, &frame(MAX_FRAME_LEN + 1, 0));
    // Header too short, a device-writable descriptor, a zero-length descriptor, outside
    // guest memory, address wrap-around.
    let bad: Vec<u16> = [
        vec![desc(TX_BUF, 8, RO)],
        vec![desc(TX_BUF, 12, RO), desc(TX_BUF + 0x100, 60, WO)],
        vec![desc(TX_BUF, 12, RO), desc(TX_BUF + 0x100, 0, RO)],
        vec![desc(TX_BUF, 12, RO), desc(0x8000_0000, 60, RO)],
        vec![desc(TX_BUF, 12, RO), desc(u64::MAX - 8, 60, RO)],
    ]
    .iter()
    .map(|c| d.tx.add_chain(c))
    .collect();
    // A good frame after all of them still goes out.
    let good = d.queue_tx(CSUM_HDR, &frame(60, 7));
    d.notify_tx(&vmm);
    vmm.run();
    let used = d.tx.take_used();
    let mut want = vec![(u32::from(big), 0)];
    want.extend(bad.iter().map(|&h| (u32::from(h), 0)));
    want.push((u32::from(good), 0));
    assert_eq!(used, want);
    assert_eq!(backend.state().from_guest.len(), 1);
    assert_eq!(backend.state().from_guest[0][VNET_HDR_LEN..], frame(60, 7));

    // The backend refusing a frame drops it, nothing more.
    backend.state().write_error = Some(io::ErrorKind::WouldBlock);
    d.queue_tx(CSUM_HDR, &frame(60, 8));
    d.notify_tx(&vmm);
    vmm.run();
    assert_eq!(d.tx.take_used().len(), 1);

    let m = slot.net.lock().unwrap().metrics().snapshot();
    assert_eq!(m.tx_dropped_too_large, 1);
    assert_eq!(m.tx_malformed_chains, 5);
    assert_eq!(m.tx_backend_errors, 1);
    assert_eq!((m.tx_packets, m.tx_bytes), (1, 60));
    assert_eq!(
        d.rx.read(&vmm, reg::STATUS),
        0xf,
        "the device keeps running"
    );
}

#[test]
fn rx_fills_mergeable_buffers() {
    let (mut vmm, slot, backend) = setup(Some(MAC));
    let mem = vmm.mem.clone();
    let mut d = NetDriver::new(&mem, 0);
    let accepted = d.probe(&mut vmm, ALL);
    assert_ne!(accepted & bit(VIRTIO_NET_F_MRG_RXBUF), 0);

    let bufs = d.post_rx(4, 1000);
    d.notify_rx(&vmm);
    vmm.run();
    // 12 + 2500 bytes: three buffers, the last one partly.
    let payload = frame(2500, 5);
    backend.push(CSUM_HDR, &payload);
    vmm.run();
    let used = d.rx.take_used();
    assert_eq!(
        used,
        vec![
            (u32::from(bufs[0].0), 1000),
            (u32::from(bufs[1].0), 1000),
            (u32::from(bufs[2].0), 512)
        ]
    );
    assert_eq!(num_buffers(&mem, bufs[0].1), 3);
    let hdr = read(&mem, bufs[0].1, VNET_HDR_LEN);
    assert_eq!(
        hdr[..10],
        CSUM_HDR[..10],
        "the backend's header reaches the guest"
    );
    let mut got = read(&mem, bufs[0].1, 1000)[VNET_HDR_LEN..].to_vec();
    got.extend(read(&mem, bufs[1].1, 1000));
    got.extend(read(&mem, bufs[2].1, 512));
    assert_eq!(got, payload);

    // A small frame takes the fourth buffer alone; num_buffers 1.
    backend.push([0; VNET_HDR_LEN], &frame(60, 6));
    vmm.run();
    assert_eq!(d.rx.take_used(), vec![(u32::from(bufs[3].0), 72)]);
    assert_eq!(num_buffers(&mem, bufs[3].1), 1);
    assert_eq!(read(&mem, bufs[3].1 + 12, 60), frame(60, 6));

    let m = slot.net.lock().unwrap().metrics().snapshot();
    assert_eq!((m.rx_packets, m.rx_bytes), (2, 2560));
    assert!(slot.irq.count() >= 1);
}

#[test]
fn rx_pauses_with_an_empty_ring_and_resumes_on_notification() {
    let (mut vmm, slot, backend) = setup(Some(MAC));
    let mem = vmm.mem.clone();
    let mut d = NetDriver::new(&mem, 0);
    d.probe(&mut vmm, ALL);
    let net = || slot.net.lock().unwrap();
    assert!(net().backend_registered);
    let before = backend.state().reads;

    // Frames arrive before the guest has posted any buffer.
    for seed in 0..3 {
        backend.push([0; VNET_HDR_LEN], &frame(100, seed));
    }
    vmm.run();
    assert!(net().rx_stalled());
    assert!(
        !net().backend_registered,
        "the backend fd left the event loop"
    );
    let reads = backend.state().reads;
    assert_eq!(
        reads - before,
        1,
        "one frame read and held, the rest left in the backend"
    );

    // More frames: nobody reads them, and the loop does not spin.
    backend.push([0; VNET_HDR_LEN], &frame(100, 3));
    assert_eq!(vmm.em.run_with_timeout(0).unwrap(), 0);
    assert_eq!(backend.state().reads, reads);

    // Two buffers: the pending frame and the next one go in, then RX waits again.
    let bufs = d.post_rx(2, 2048);
    d.notify_rx(&vmm);
    vmm.run();
    let used = d.rx.take_used();
    assert_eq!(used.len(), 2);
    assert_eq!(read(&mem, bufs[0].1 + 12, 100), frame(100, 0));
    assert_eq!(read(&mem, bufs[1].1 + 12, 100), frame(100, 1));
    assert!(net().rx_stalled());

    // Enough buffers for the rest: RX drains the backend and watches it again.
    let bufs = d.post_rx(4, 2048);
    d.notify_rx(&vmm);
    vmm.run();
    assert_eq!(d.rx.take_used().len(), 2);
    assert_eq!(read(&mem, bufs[0].1 + 12, 100), frame(100, 2));
    assert_eq!(read(&mem, bufs[1].1 + 12, 100), frame(100, 3));
    assert!(!net().rx_stalled());
    assert!(net().backend_registered);
    // And new frames flow straight in.
    backend.push([0; VNET_HDR_LEN], &frame(100, 4));
    vmm.run();
    assert_eq!(d.rx.take_used(), vec![(u32::from(bufs[2].0), 112)]);

    let m = net().metrics().snapshot();
    assert_eq!(m.rx_packets, 5);
    assert_eq!(m.rx_stalls, 2);
    assert_eq!(m.rx_dropped + m.rx_dropped_too_large, 0);
}

#[test]
fn rx_notification_is_requested_with_event_idx() {
    let (mut vmm, slot, backend) = setup(Some(MAC));
    let mem = vmm.mem.clone();
    let mut d = NetDriver::new(&mem, 0);
    let accepted = d.probe(&mut vmm, ALL);
    assert_ne!(accepted & features::RING_EVENT_IDX, 0);
    let bufs = d.post_rx(1, 2048);
    d.notify_rx(&vmm);
    vmm.run();
    backend.push([0; VNET_HDR_LEN], &frame(100, 0));
    backend.push([0; VNET_HDR_LEN], &frame(100, 1));
    vmm.run();
    assert_eq!(d.rx.take_used(), vec![(u32::from(bufs[0].0), 112)]);
    assert!(slot.net.lock().unwrap().rx_stalled());
    // The device took one chain: it asks to hear about the next (avail index 1).
    assert_eq!(d.rx.avail_event(), 1);
    // Without a notification the buffer is not noticed...
    d.post_rx(1, 2048);
    vmm.run();
    assert!(d.rx.take_used().is_empty());
    // ...with one (the driver sends it: avail_event was crossed) it is.
    d.notify_rx(&vmm);
    vmm.run();
    assert_eq!(d.rx.take_used().len(), 1);
}

#[test]
fn rx_frame_larger_than_the_buffers_is_dropped() {
    // Without mergeable buffers: the frame must fit the next buffer; the buffer stays for
    // the next frame.
    let (mut vmm, slot, backend) = setup(Some(MAC));
    let mem = vmm.mem.clone();
    let mut d = NetDriver::new(&mem, 0);
    let accepted = d.probe(&mut vmm, !bit(VIRTIO_NET_F_MRG_RXBUF));
    assert_eq!(accepted & bit(VIRTIO_NET_F_MRG_RXBUF), 0);
    let bufs = d.post_rx(1, 1526);
    d.notify_rx(&vmm);
    vmm.run();
    backend.push([0; VNET_HDR_LEN], &frame(1515, 0));
    backend.push([0; VNET_HDR_LEN], &frame(1514, 1));
    vmm.run();
    assert_eq!(d.rx.take_used(), vec![(u32::from(bufs[0].0), 1526)]);
    assert_eq!(read(&mem, bufs[0].1 + 12, 1514), frame(1514, 1));
    assert_eq!(num_buffers(&mem, bufs[0].1), 1);
    let m = slot.net.lock().unwrap().metrics().snapshot();
    assert_eq!((m.rx_dropped_too_large, m.rx_packets), (1, 1));

    // Mergeable: a frame larger than the whole ring can hold.
    let (mut vmm, slot, backend) = setup(Some(MAC));
    let mem = vmm.mem.clone();
    let mut d = NetDriver::new(&mem, 0);
    d.probe(&mut vmm, ALL);
    let bufs = d.post_rx(usize::from(RING), 100);
    d.notify_rx(&vmm);
    vmm.run();
    backend.push([0; VNET_HDR_LEN], &frame(usize::from(RING) * 100, 0));
    backend.push([0; VNET_HDR_LEN], &frame(60, 1));
    vmm.run();
    // The small frame lands in the first buffer: the big one gave every buffer back.
    assert_eq!(d.rx.take_used(), vec![(u32::from(bufs[0].0), 72)]);
    assert_eq!(read(&mem, bufs[0].1 + 12, 60), frame(60, 1));
    let m = slot.net.lock().unwrap().metrics().snapshot();
    assert_eq!((m.rx_dropped_too_large, m.rx_packets), (1, 1));
    assert!(!slot.net.lock().unwrap().rx_stalled());
}

#[test]
fn malformed_rx_chains_are_returned_empty() {
    let (mut vmm, slot, backend) = setup(Some(MAC));
    let mem = vmm.mem.clone();
    let mut d = NetDriver::new(&mem, 0);
    d.probe(&mut vmm, ALL);
    let bad: Vec<u16> = [
        vec![desc(RX_BUF, 2048, RO)],
        vec![desc(RX_BUF, 8, WO)],
        vec![desc(RX_BUF, 0, WO)],
        vec![desc(0x8000_0000, 2048, WO)],
    ]
    .iter()
    .map(|c| d.rx.add_chain(c))
    .collect();
    let good = d.rx.add_chain(&[desc(RX_BUF + 0x1000, 2048, WO)]);
    d.notify_rx(&vmm);
    backend.push([0; VNET_HDR_LEN], &frame(100, 0));
    vmm.run();
    let mut want: Vec<(u32, u32)> = bad.iter().map(|&h| (u32::from(h), 0)).collect();
    want.push((u32::from(good), 112));
    assert_eq!(d.rx.take_used(), want);
    assert_eq!(read(&mem, RX_BUF + 0x1000 + 12, 100), frame(100, 0));
    let m = slot.net.lock().unwrap().metrics().snapshot();
    assert_eq!((m.rx_malformed_chains, m.rx_packets), (4, 1));
}

#[test]
fn short_backend_frames_are_dropped() {
    let (mut vmm, slot, backend) = setup(Some(MAC));
    let mem = vmm.mem.clone();
    let mut d = NetDriver::new(&mem, 0);
    d.probe(&mut vmm, ALL);
    d.post_rx(2, 2048);
    d.notify_rx(&vmm);
    backend.push([0; VNET_HDR_LEN], &frame(13, 0));
    backend.push([0; VNET_HDR_LEN], &frame(14, 0));
    vmm.run();
    assert_eq!(d.rx.take_used().len(), 1);
    let m = slot.net.lock().unwrap().metrics().snapshot();
    assert_eq!((m.rx_dropped, m.rx_packets), (1, 1));
}

#[test]
fn frames_queued_before_activation_and_reset_while_stalled() {
    let (mut vmm, slot, backend) = setup(Some(MAC));
    let mem = vmm.mem.clone();
    let mut d = NetDriver::new(&mem, 0);
    // Before DRIVER_OK the backend is not read and queue events are ignored.
    backend.push([0; VNET_HDR_LEN], &frame(100, 0));
    assert_eq!(vmm.run(), 0);
    d.rx.negotiate(&vmm, ALL);
    d.rx.setup_queue(&vmm);
    d.setup_tx_queue(&vmm);
    d.post_rx(1, 2048);
    d.queue_tx([0; VNET_HDR_LEN], &frame(60, 1));
    d.notify_tx(&vmm);
    vmm.run();
    assert!(backend.state().from_guest.is_empty());
    d.rx.driver_ok(&vmm);
    vmm.run();
    assert_eq!(d.rx.take_used().len(), 1);
    assert_eq!(d.tx.take_used().len(), 1);
    assert_eq!(backend.state().from_guest.len(), 1);

    // Stall with a frame pending, then reset: the frame is dropped, the fd leaves the loop.
    backend.push([0; VNET_HDR_LEN], &frame(100, 2));
    vmm.run();
    assert!(slot.net.lock().unwrap().rx_stalled());
    d.rx.write(&vmm, reg::STATUS, 0);
    assert_eq!(d.rx.read(&vmm, reg::STATUS), 0);
    assert!(!slot.net.lock().unwrap().rx_stalled());
    backend.push([0; VNET_HDR_LEN], &frame(100, 3));
    vmm.run();
    assert!(!slot.net.lock().unwrap().backend_registered);
    assert_eq!(slot.net.lock().unwrap().metrics().snapshot().rx_dropped, 1);

    // A new driver instance gets the frames that waited in the backend.
    let mut d = NetDriver::new(&mem, 0x10_000);
    d.next_rx = RX_BUF + 0x8_0000;
    d.probe(&mut vmm, ALL);
    let bufs = d.post_rx(2, 2048);
    d.notify_rx(&vmm);
    vmm.run();
    assert_eq!(d.rx.take_used().len(), 1);
    assert_eq!(read(&mem, bufs[0].1 + 12, 100), frame(100, 3));
    assert!(slot.net.lock().unwrap().backend_registered);
}

#[test]
fn ioeventfd_path_and_needs_reset() {
    let (mut vmm, slot, backend) = setup(Some(MAC));
    let mem = vmm.mem.clone();
    let mut d = NetDriver::new(&mem, 0);
    d.probe(&mut vmm, ALL);
    // Notified as KVM would: through the transport's EventFds (queue 1 = TX).
    d.queue_tx([0; VNET_HDR_LEN], &frame(60, 1));
    slot.transport.lock().unwrap().queue_events()[1]
        .write(1)
        .unwrap();
    vmm.run();
    assert_eq!(backend.state().from_guest.len(), 1);

    // A driver that activates with the TX queue not ready: DEVICE_NEEDS_RESET.
    d.rx.write(&vmm, reg::STATUS, 0);
    let d = NetDriver::new(&mem, 0x10_000);
    d.rx.negotiate(&vmm, ALL);
    d.rx.setup_queue(&vmm);
    d.rx.driver_ok(&vmm);
    assert_ne!(d.rx.read(&vmm, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert!(!slot.net.lock().unwrap().is_activated());
}

/// The device on a real tap, inside a network namespace this test makes: the guest asks
/// the namespace's kernel for its MAC (ARP) and gets the answer in its RX buffers.
#[test]
fn real_tap_arp_round_trip() {
    let ns = match TestNetns::new() {
        Ok(ns) => ns,
        Err(reason) => {
            kestrel_test_support::skip(reason);
            return;
        }
    };
    let tap = ns.run(|| Tap::create("ktn%d")).unwrap();
    let name = tap.name().to_owned();
    ns.ip(&["link", "set", &name, "up"]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", &name]);

    let mut vmm = TestVmm::new();
    let slot = add_net(&mut vmm, Net::new(Box::new(tap), Some(MAC)).unwrap());
    let mem = vmm.mem.clone();
    let mut d = NetDriver::new(&mem, 0);
    d.probe(&mut vmm, ALL);
    let bufs = d.post_rx(16, 2048);
    d.notify_rx(&vmm);
    vmm.run();

    // "who has 10.77.0.1, tell 10.77.0.2" from our MAC.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&MAC.0);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&MAC.0);
    arp.extend_from_slice(&[10, 77, 0, 2, 0, 0, 0, 0, 0, 0, 10, 77, 0, 1]);
    d.queue_tx([0; VNET_HDR_LEN], &arp);
    d.notify_tx(&vmm);

    let deadline = Instant::now() + Duration::from_secs(5);
    let reply = 'wait: loop {
        vmm.em.run_with_timeout(20).unwrap();
        for (id, len) in d.rx.take_used() {
            let addr = bufs.iter().find(|b| u32::from(b.0) == id).unwrap().1;
            let f = read(&mem, addr + 12, len as usize - 12);
            // ARP reply (opcode 2); the kernel's IPv6 chatter is skipped.
            if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                break 'wait f;
            }
        }
        assert!(Instant::now() < deadline, "no ARP reply through the device");
    };
    assert_eq!(reply[..6], MAC.0, "addressed to the guest");
    assert_eq!(reply[28..32], [10, 77, 0, 1]);
    let m = slot.net.lock().unwrap().metrics().snapshot();
    assert_eq!(m.tx_packets, 1);
    assert!(m.rx_packets >= 1);
    // The namespace's kernel saw the frame arrive on the tap.
    assert!(ns_rx_packets(&ns, &name) >= 1);
}

fn ns_rx_packets(ns: &TestNetns, dev: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["-n", &ns.name, "-s", "-j", "link", "show", dev])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // "rx":{"bytes":N,"packets":N,...}
    let rx = text.split("\"rx\":{").nth(1).unwrap_or_default();
    rx.split("\"packets\":")
        .nth(1)
        .and_then(|s| s.split([',', '}']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn bogus_available_index_does_not_spin_the_vmm_thread() {
    let (mut vmm, slot, backend) = setup(Some(MAC));
    let mem = vmm.mem.clone();
    let mut d = NetDriver::new(&mem, 0);
    d.probe(&mut vmm, ALL);
    // TX: the available index jumps more than a queue ahead.
    let tx_idx = GuestAddress(d.tx.vq.avail_addr().0 + 2);
    mem.write_obj(200u16, tx_idx).unwrap();
    d.notify_tx(&vmm);
    vmm.run();
    assert!(d.tx.take_used().is_empty());
    // RX: the same, with a frame waiting.
    let rx_idx = GuestAddress(d.rx.vq.avail_addr().0 + 2);
    mem.write_obj(200u16, rx_idx).unwrap();
    d.notify_rx(&vmm);
    backend.push([0; VNET_HDR_LEN], &frame(100, 0));
    vmm.run();
    assert!(slot.net.lock().unwrap().rx_stalled());

    // The driver puts sane indices back: both queues are served.
    mem.write_obj(0u16, tx_idx).unwrap();
    mem.write_obj(0u16, rx_idx).unwrap();
    d.queue_tx([0; VNET_HDR_LEN], &frame(60, 1));
    d.notify_tx(&vmm);
    let bufs = d.post_rx(1, 2048);
    d.notify_rx(&vmm);
    vmm.run();
    assert_eq!(d.tx.take_used().len(), 1);
    assert_eq!(backend.state().from_guest.len(), 1);
    assert_eq!(d.rx.take_used(), vec![(u32::from(bufs[0].0), 112)]);
}

/// A backend that reports end of file: the device stops watching it instead of spinning.
#[test]
fn backend_eof_stops_reading() {
    struct Eof(EventFd);
    impl AsRawFd for Eof {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }
    impl NetBackend for Eof {
        fn read_frame(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Ok(0)
        }
        fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
            Ok(frame.len())
        }
        fn set_offload(&mut self, _: u32) -> io::Result<()> {
            Err(io::ErrorKind::Unsupported.into())
        }
    }
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    // Always readable, like a socket at EOF.
    evt.write(1).unwrap();
    let mut vmm = TestVmm::new();
    let slot = add_net(&mut vmm, Net::new(Box::new(Eof(evt)), Some(MAC)).unwrap());
    let mem = vmm.mem.clone();
    let mut d = NetDriver::new(&mem, 0);
    d.probe(&mut vmm, ALL);
    assert!(slot.net.lock().unwrap().backend_failed);
    assert!(!slot.net.lock().unwrap().backend_registered);
    assert_eq!(vmm.em.run_with_timeout(0).unwrap(), 0);
    // TX still works; the failed offload call was counted.
    d.queue_tx([0; VNET_HDR_LEN], &frame(60, 0));
    d.notify_tx(&vmm);
    vmm.run();
    assert_eq!(d.tx.take_used().len(), 1);
    let m = slot.net.lock().unwrap().metrics().snapshot();
    assert_eq!((m.tx_packets, m.offload_errors), (1, 1));
}

#[test]
fn tx_yields_to_the_event_loop_after_its_budget() {
    let (mut vmm, slot, backend) = setup(Some(MAC));
    let mem = vmm.mem.clone();
    let mut d = NetDriver::with_tx_ring(&mem, 0, 256);
    d.probe(&mut vmm, ALL);
    let n = super::device::TX_BUDGET + 36;
    let mut whole = vec![0u8; VNET_HDR_LEN];
    whole.extend(frame(60, 0));
    mem.write_slice(&whole, GuestAddress(TX_BUF)).unwrap();
    for _ in 0..n {
        d.tx.add_chain(&[desc(TX_BUF, whole.len() as u32, RO)]);
    }
    d.notify_tx(&vmm);
    // One pass of the loop: a budget's worth, and the device rings itself for the rest.
    assert_eq!(vmm.em.run_with_timeout(0).unwrap(), 1);
    assert_eq!(d.tx.take_used().len(), super::device::TX_BUDGET);
    assert_eq!(vmm.em.run_with_timeout(0).unwrap(), 1);
    assert_eq!(d.tx.take_used().len(), 36);
    assert_eq!(backend.state().from_guest.len(), n);
    assert_eq!(
        slot.net.lock().unwrap().metrics().snapshot().tx_packets,
        n as u64
    );
}

#[test]
fn dhcp_requests_are_answered_by_the_device_and_never_reach_the_tap() {
    use super::dhcp::{test_discover, DhcpBackend, DhcpConfig, SERVER_MAC};
    let backend = MemBackend::new();
    let config = DhcpConfig {
        client_mac: MAC.0,
        address: std::net::Ipv4Addr::new(10, 88, 0, 9),
        prefix: 16,
        gateway: Some(std::net::Ipv4Addr::new(10, 88, 0, 1)),
        routes: vec![],
        dns: vec![],
        domain: None,
        hostname: None,
        mtu: None,
        server: std::net::Ipv4Addr::new(10, 88, 0, 1),
        lease_secs: 3600,
    };
    let mut vmm = TestVmm::new();
    let dhcp = DhcpBackend::new(Box::new(backend.clone()), config);
    let _slot = add_net(&mut vmm, Net::new(Box::new(dhcp), Some(MAC)).unwrap());
    let mem = vmm.mem.clone();
    let mut d = NetDriver::new(&mem, 0);
    d.probe(&mut vmm, ALL);
    let bufs = d.post_rx(2, 2048);
    d.notify_rx(&vmm);
    vmm.run();

    d.queue_tx([0; VNET_HDR_LEN], &test_discover(MAC.0));
    d.queue_tx([0; VNET_HDR_LEN], &frame(60, 1));
    d.notify_tx(&vmm);
    vmm.run();
    assert_eq!(d.tx.take_used().len(), 2);
    // Only the ordinary frame went to the tap; the offer arrived on RX at once.
    assert_eq!(backend.state().from_guest.len(), 1);
    let used = d.rx.take_used();
    assert_eq!(used.len(), 1, "{used:?}");
    assert_eq!(used[0].0, u32::from(bufs[0].0));
    let got = read(&mem, bufs[0].1, used[0].1 as usize);
    assert_eq!(&got[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12], &SERVER_MAC);
    // yiaddr in the BOOTP reply.
    let yiaddr = VNET_HDR_LEN + 14 + 28 + 16;
    assert_eq!(&got[yiaddr..yiaddr + 4], &[10, 88, 0, 9]);
}
