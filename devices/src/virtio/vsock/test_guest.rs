//! A fake guest for the vsock device: a split-virtqueue driver for the three queues and a
//! tiny AF_VSOCK stack (listeners, connects, credit, shutdown) that behaves like Linux's
//! virtio_transport, plus the "VMM" (MMIO bus, event manager) from the shared harness.
//!
//! Everything runs on the test thread: [`FakeGuest::pump`] plays the VMM thread's event loop
//! and then the guest driver. Host clients live in the test (non-blocking sockets, or
//! threads for long transfers).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress};

use super::packet::{Header, HDR_LEN};
use super::{uapi, Vsock, VsockLimits, HOST_CID, NUM_QUEUES};
use crate::bus::Bus;
use crate::irq::CountingIrq;
use crate::virtio::device::GuestMemoryMmap;
use crate::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE};
use crate::virtio::status;
use crate::virtio::test_utils::{reg, TestVmm};

pub const GUEST_CID: u64 = 3;
pub const BASE: u64 = 0xd000_0000;
const MEM_SIZE: usize = 32 << 20;
const QSIZE: u16 = 256;
const QUEUES_AT: u64 = 0x1_0000;
const RX_SLOTS_AT: u64 = 0x10_0000;
const RX_SLOT_STRIDE: u64 = 0x2000;
const TX_SLOTS_AT: u64 = 0x100_0000;
const TX_SLOT_STRIDE: u64 = 0x1_1000;
const TX_SLOTS: u64 = 128;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// A unique socket path for one test.
pub fn socket_path(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let p = std::env::temp_dir().join(format!("kvsock-{}-{n}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// The driver side of one split virtqueue: descriptor table, available and used rings.
struct GuestQueue {
    desc: u64,
    avail: u64,
    used: u64,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

impl GuestQueue {
    fn new(base: u64) -> Self {
        GuestQueue {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            free: (0..QSIZE).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
        }
    }

    fn setup(&self, vmm: &TestVmm, index: u32) {
        let w = |r: u64, v: u32| vmm.write32(BASE + r, v);
        w(reg::QUEUE_SEL, index);
        assert_eq!(vmm.read32(BASE + reg::QUEUE_NUM_MAX), u32::from(QSIZE));
        w(reg::QUEUE_NUM, u32::from(QSIZE));
        w(reg::QUEUE_DESC_LOW, self.desc as u32);
        w(reg::QUEUE_DESC_HIGH, 0);
        w(reg::QUEUE_AVAIL_LOW, self.avail as u32);
        w(reg::QUEUE_AVAIL_HIGH, 0);
        w(reg::QUEUE_USED_LOW, self.used as u32);
        w(reg::QUEUE_USED_HIGH, 0);
        w(reg::QUEUE_READY, 1);
    }

    fn has_room(&self, n: usize) -> bool {
        self.free.len() >= n
    }

    /// Puts a chain of (addr, len, device-writable) on the available ring.
    fn add(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> u16 {
        let ids: Vec<u16> = (0..descs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let id = ids[i];
            let mut flags = if writable { F_WRITE } else { 0 };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < ids.len() {
                flags |= F_NEXT;
            }
            let at = GuestAddress(self.desc + 16 * u64::from(id));
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, at).unwrap();
        }
        let head = ids[0];
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        self.chains.insert(head, ids);
        head
    }

    /// New used entries (head, len); their descriptors go back to the free list.
    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.last_used != idx {
            let slot = u64::from(self.last_used % QSIZE);
            let at = self.used + 4 + 8 * slot;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            let head = u16::try_from(id).unwrap();
            let ids = self.chains.remove(&head).expect("used an unknown chain");
            self.free.extend(ids);
            out.push((head, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GState {
    Connecting,
    Established,
    Closed,
}

/// One guest socket.
#[derive(Debug)]
pub struct GuestConn {
    pub state: GState,
    /// Bytes received (kept when `keep`).
    pub data: Vec<u8>,
    pub keep: bool,
    pub hasher: Sha256,
    pub rx_total: u64,
    /// Guest-side credit: what we advertised, received, and consumed.
    pub buf_alloc: u32,
    pub rx_cnt: u32,
    pub fwd_cnt: u32,
    last_fwd_sent: u32,
    /// The application reads what arrives (otherwise the buffer fills and credit stops).
    pub consume: bool,
    /// Send back everything received.
    pub echo: bool,
    /// The device's credit.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    pub tx_cnt: u32,
    pub to_send: VecDeque<u8>,
    /// Once `to_send` is empty, send OP_SHUTDOWN with these flags.
    pub shutdown_when_sent: Option<u32>,
    shutdown_sent: bool,
    /// When the host shuts down its sending side, finish sending and close.
    pub close_on_eof: bool,
    pub peer_shutdown: u32,
    pub got_rst: bool,
    pub max_in_flight: u32,
}

impl GuestConn {
    fn new(state: GState, buf_alloc: u32) -> Self {
        GuestConn {
            state,
            data: Vec::new(),
            keep: true,
            hasher: Sha256::new(),
            rx_total: 0,
            buf_alloc,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_sent: 0,
            consume: true,
            echo: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            to_send: VecDeque::new(),
            shutdown_when_sent: None,
            shutdown_sent: false,
            close_on_eof: false,
            peer_shutdown: 0,
            got_rst: false,
            max_in_flight: 0,
        }
    }

    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// The application reads `n` buffered bytes.
    pub fn consume(&mut self, n: u32) {
        let buffered = self.rx_cnt.wrapping_sub(self.fwd_cnt);
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n.min(buffered));
    }
}

/// Guest settings for new sockets.
#[derive(Clone, Copy, Debug)]
pub struct GuestConfig {
    pub buf_alloc: u32,
    /// Data room of each RX buffer.
    pub rx_buf_len: u32,
    /// RX buffers posted.
    pub rx_bufs: usize,
    /// Largest RW payload the guest sends.
    pub tx_chunk: u32,
    /// Listeners echo what they receive and close on EOF.
    pub echo: bool,
    /// Ignore connection requests (no answer at all).
    pub deaf: bool,
    /// Accepted sockets keep what they receive (else only hash and count it).
    pub keep: bool,
    /// Accepted sockets' applications read what arrives at once.
    pub consume: bool,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            buf_alloc: 256 * 1024,
            rx_buf_len: 4096,
            rx_bufs: 64,
            tx_chunk: 4096,
            echo: true,
            deaf: false,
            keep: true,
            consume: true,
        }
    }
}

pub struct FakeGuest {
    pub vmm: TestVmm,
    pub dev: Arc<Mutex<Vsock>>,
    pub path: PathBuf,
    pub irq: CountingIrq,
    pub cfg: GuestConfig,
    rx: GuestQueue,
    tx: GuestQueue,
    ev: GuestQueue,
    rx_slots: HashMap<u16, u64>,
    free_rx: Vec<u64>,
    tx_slots: HashMap<u16, u64>,
    free_tx: Vec<u64>,
    pub conns: HashMap<(u32, u32), GuestConn>,
    pub listeners: HashSet<u32>,
    /// Raw packets to send before anything else (tests of malformed input).
    pub raw_out: VecDeque<Vec<(u64, u32, bool)>>,
    out: VecDeque<(Header, Vec<u8>)>,
    /// Every header received, in order.
    pub log: Vec<Header>,
    next_port: u32,
}

impl FakeGuest {
    pub fn new(name: &str, limits: VsockLimits, cfg: GuestConfig) -> FakeGuest {
        let path = socket_path(name);
        let dev = Vsock::with_limits(GUEST_CID, &path, limits).unwrap();
        Self::with_device(dev, path, cfg)
    }

    pub fn with_device(dev: Vsock, path: PathBuf, cfg: GuestConfig) -> FakeGuest {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut vmm = TestVmm {
            mem,
            bus: Bus::new(),
            em: EventManager::new().unwrap(),
        };
        let dev = Arc::new(Mutex::new(dev));
        let irq = CountingIrq::default();
        let transport =
            MmioTransport::new(vmm.mem.clone(), dev.clone(), Arc::new(irq.clone())).unwrap();
        vmm.bus
            .insert(Arc::new(Mutex::new(transport)), BASE, MMIO_WINDOW_SIZE)
            .unwrap();
        vmm.em.add_subscriber(dev.clone());
        assert!(cfg.rx_buf_len <= 64 * 1024 && cfg.rx_bufs <= 100);
        FakeGuest {
            vmm,
            dev,
            path,
            irq,
            cfg,
            rx: GuestQueue::new(QUEUES_AT),
            tx: GuestQueue::new(QUEUES_AT + 0x3000),
            ev: GuestQueue::new(QUEUES_AT + 0x6000),
            rx_slots: HashMap::new(),
            free_rx: (0..cfg.rx_bufs as u64)
                .map(|i| RX_SLOTS_AT + i * RX_SLOT_STRIDE * u64::from(cfg.rx_buf_len / 8192 + 1))
                .collect(),
            tx_slots: HashMap::new(),
            free_tx: (0..TX_SLOTS)
                .map(|i| TX_SLOTS_AT + i * TX_SLOT_STRIDE)
                .collect(),
            conns: HashMap::new(),
            listeners: HashSet::new(),
            raw_out: VecDeque::new(),
            out: VecDeque::new(),
            log: Vec::new(),
            next_port: 40000,
        }
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.vmm.mem
    }

    /// Linux's probe: features, three queues, DRIVER_OK; RX buffers posted.
    pub fn probe(&mut self) {
        let w = |vmm: &TestVmm, r: u64, v: u32| vmm.write32(BASE + r, v);
        let vmm = &self.vmm;
        w(vmm, reg::STATUS, 0);
        assert_eq!(vmm.read32(BASE + reg::DEVICE_ID), 19);
        w(vmm, reg::STATUS, status::ACKNOWLEDGE);
        w(vmm, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(vmm, reg::DEVICE_FEATURES_SEL, 1);
        let high = vmm.read32(BASE + reg::DEVICE_FEATURES);
        assert_eq!(high, 1, "VERSION_1 only");
        w(vmm, reg::DRIVER_FEATURES_SEL, 1);
        w(vmm, reg::DRIVER_FEATURES, 1);
        w(vmm, reg::DRIVER_FEATURES_SEL, 0);
        w(vmm, reg::DRIVER_FEATURES, 0);
        w(
            vmm,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        self.rx.setup(vmm, 0);
        self.tx.setup(vmm, 1);
        self.ev.setup(vmm, 2);
        w(vmm, reg::STATUS, 0xf);
        assert_eq!(vmm.read32(BASE + reg::STATUS), 0xf);
        // Event queue buffers, as Linux posts them (never used).
        let mem = self.vmm.mem.clone();
        for i in 0..4 {
            self.ev.add(&mem, &[(0x9000 + 8 * i, 8, true)]);
        }
        self.refill_rx();
        self.pump();
    }

    fn notify(&self, queue: u32) {
        self.vmm.write32(BASE + reg::QUEUE_NOTIFY, queue);
    }

    fn refill_rx(&mut self) {
        let mem = self.vmm.mem.clone();
        let mut added = false;
        while let Some(addr) = self.free_rx.pop() {
            let total = HDR_LEN as u32 + self.cfg.rx_buf_len;
            // Alternate Linux's layouts: one descriptor, or header + data.
            let head = if addr % (2 * RX_SLOT_STRIDE) == 0 {
                self.rx.add(&mem, &[(addr, total, true)])
            } else {
                self.rx.add(
                    &mem,
                    &[
                        (addr, HDR_LEN as u32, true),
                        (addr + 0x100, self.cfg.rx_buf_len, true),
                    ],
                )
            };
            self.rx_slots.insert(head, addr);
            added = true;
        }
        if added {
            self.notify(0);
        }
    }

    /// Queues a control or data packet from guest port `gport` to host port `hport`.
    fn send(&mut self, op: u16, gport: u32, hport: u32, flags: u32, data: Vec<u8>) {
        let (buf_alloc, fwd_cnt) = match self.conns.get_mut(&(gport, hport)) {
            Some(c) => {
                c.last_fwd_sent = c.fwd_cnt;
                (c.buf_alloc, c.fwd_cnt)
            }
            None => (0, 0),
        };
        let hdr = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: gport,
            dst_port: hport,
            len: data.len() as u32,
            type_: uapi::TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        };
        self.out.push_back((hdr, data));
    }

    /// Sends a packet with a header the test chose (`len` is set from `data`).
    pub fn send_raw(&mut self, hdr: Header, data: Vec<u8>) {
        self.out.push_back((hdr, data));
    }

    /// Guest connect() from a fresh port to host port `hport`; returns the guest port.
    pub fn connect(&mut self, hport: u32) -> u32 {
        let gport = self.next_port;
        self.next_port += 1;
        let mut c = GuestConn::new(GState::Connecting, self.cfg.buf_alloc);
        c.echo = false;
        self.conns.insert((gport, hport), c);
        self.send(uapi::OP_REQUEST, gport, hport, 0, Vec::new());
        gport
    }

    /// Data for the guest application to send on a connection.
    pub fn write(&mut self, key: (u32, u32), data: &[u8]) {
        self.conns.get_mut(&key).unwrap().to_send.extend(data);
    }

    /// The guest closes a connection (SHUTDOWN both ways, as close() does).
    pub fn close(&mut self, key: (u32, u32)) {
        let c = self.conns.get_mut(&key).unwrap();
        c.to_send.clear();
        c.shutdown_sent = true;
        self.send(
            uapi::OP_SHUTDOWN,
            key.0,
            key.1,
            uapi::SHUTDOWN_RCV | uapi::SHUTDOWN_SEND,
            Vec::new(),
        );
    }

    /// The guest resets a connection.
    pub fn reset(&mut self, key: (u32, u32)) {
        let c = self.conns.get_mut(&key).unwrap();
        c.to_send.clear();
        c.state = GState::Closed;
        self.send(uapi::OP_RST, key.0, key.1, 0, Vec::new());
    }

    fn handle(&mut self, hdr: Header, data: Vec<u8>) {
        assert_eq!(hdr.src_cid, HOST_CID);
        assert_eq!(hdr.dst_cid, GUEST_CID);
        assert_eq!(hdr.type_, uapi::TYPE_STREAM);
        assert_eq!(hdr.len as usize, data.len());
        self.log.push(hdr);
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = hdr.buf_alloc;
            c.peer_fwd_cnt = hdr.fwd_cnt;
        }
        match hdr.op {
            uapi::OP_REQUEST => {
                if self.cfg.deaf {
                    return;
                }
                if !self.listeners.contains(&hdr.dst_port) || self.conns.contains_key(&key) {
                    self.send(uapi::OP_RST, key.0, key.1, 0, Vec::new());
                    return;
                }
                let mut c = GuestConn::new(GState::Established, self.cfg.buf_alloc);
                c.echo = self.cfg.echo;
                c.close_on_eof = true;
                c.keep = self.cfg.keep;
                c.consume = self.cfg.consume;
                c.peer_buf_alloc = hdr.buf_alloc;
                c.peer_fwd_cnt = hdr.fwd_cnt;
                self.conns.insert(key, c);
                self.send(uapi::OP_RESPONSE, key.0, key.1, 0, Vec::new());
            }
            uapi::OP_RESPONSE => {
                let c = self.conns.get_mut(&key).expect("response for no socket");
                assert_eq!(c.state, GState::Connecting);
                c.state = GState::Established;
            }
            uapi::OP_RW => {
                let c = self.conns.get_mut(&key).expect("data for no socket");
                if c.state == GState::Closed {
                    // Sent before the device saw our reset.
                    return;
                }
                assert_eq!(c.state, GState::Established, "data before established");
                assert_eq!(c.peer_shutdown & uapi::SHUTDOWN_SEND, 0, "data after EOF");
                c.rx_cnt = c.rx_cnt.wrapping_add(hdr.len);
                let in_flight = c.rx_cnt.wrapping_sub(c.fwd_cnt);
                assert!(
                    in_flight <= c.buf_alloc,
                    "device sent {in_flight} bytes in flight, guest advertised {}",
                    c.buf_alloc
                );
                c.max_in_flight = c.max_in_flight.max(in_flight);
                c.rx_total += u64::from(hdr.len);
                c.hasher.update(&data);
                if c.echo {
                    c.to_send.extend(&data);
                }
                if c.keep {
                    c.data.extend_from_slice(&data);
                }
                if c.consume {
                    c.fwd_cnt = c.rx_cnt;
                }
            }
            uapi::OP_SHUTDOWN => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                c.peer_shutdown |= hdr.flags;
                let both = uapi::SHUTDOWN_RCV | uapi::SHUTDOWN_SEND;
                if c.peer_shutdown & both == both {
                    // Linux resets when the peer is gone both ways and nothing is unread.
                    c.state = GState::Closed;
                    self.send(uapi::OP_RST, key.0, key.1, 0, Vec::new());
                } else if c.peer_shutdown & uapi::SHUTDOWN_SEND != 0 && c.close_on_eof {
                    c.shutdown_when_sent = Some(both);
                }
            }
            uapi::OP_RST => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.state = GState::Closed;
                    c.got_rst = true;
                }
            }
            uapi::OP_CREDIT_UPDATE => {}
            uapi::OP_CREDIT_REQUEST => {
                self.send(uapi::OP_CREDIT_UPDATE, key.0, key.1, 0, Vec::new());
            }
            op => panic!("unknown op {op}"),
        }
    }

    /// Turns application data into packets, within the device's credit.
    fn produce(&mut self) {
        let keys: Vec<(u32, u32)> = self.conns.keys().copied().collect();
        for key in keys {
            while let Some(c) = self.conns.get_mut(&key) {
                if c.state != GState::Established {
                    break;
                }
                // Credit update once half our buffer has been consumed unannounced.
                if c.fwd_cnt.wrapping_sub(c.last_fwd_sent) >= c.buf_alloc / 2 {
                    self.send(uapi::OP_CREDIT_UPDATE, key.0, key.1, 0, Vec::new());
                    continue;
                }
                let n = (c.to_send.len() as u32)
                    .min(c.peer_credit())
                    .min(self.cfg.tx_chunk);
                if n > 0 && self.out.len() < TX_SLOTS as usize {
                    let data: Vec<u8> = c.to_send.drain(..n as usize).collect();
                    c.tx_cnt = c.tx_cnt.wrapping_add(n);
                    self.send(uapi::OP_RW, key.0, key.1, 0, data);
                    continue;
                }
                if c.to_send.is_empty() && !c.shutdown_sent {
                    if let Some(flags) = c.shutdown_when_sent {
                        c.shutdown_sent = true;
                        self.send(uapi::OP_SHUTDOWN, key.0, key.1, flags, Vec::new());
                    }
                }
                break;
            }
        }
    }

    fn transmit(&mut self) {
        let mem = self.vmm.mem.clone();
        let mut added = false;
        while !self.free_tx.is_empty() && self.tx.has_room(3) {
            if let Some(descs) = self.raw_out.pop_front() {
                let head = self.tx.add(&mem, &descs);
                self.tx_slots.insert(head, u64::MAX);
                added = true;
                continue;
            }
            let Some((mut hdr, data)) = self.out.pop_front() else {
                break;
            };
            let addr = self.free_tx.pop().unwrap();
            hdr.len = data.len() as u32;
            mem.write_slice(&hdr.to_bytes(), GuestAddress(addr))
                .unwrap();
            mem.write_slice(&data, GuestAddress(addr + 0x100)).unwrap();
            let head = if data.is_empty() {
                self.tx.add(&mem, &[(addr, HDR_LEN as u32, false)])
            } else {
                self.tx.add(
                    &mem,
                    &[
                        (addr, HDR_LEN as u32, false),
                        (addr + 0x100, data.len() as u32, false),
                    ],
                )
            };
            self.tx_slots.insert(head, addr);
            added = true;
        }
        if added {
            self.notify(1);
        }
    }

    /// One round: the VMM's event loop (waiting up to `wait_ms` for a first event), then
    /// the guest reads RX, reclaims TX, refills and sends.
    pub fn pump_wait(&mut self, wait_ms: i32) {
        let mut first = true;
        loop {
            let n = self
                .vmm
                .em
                .run_with_timeout(if first { wait_ms } else { 0 })
                .unwrap();
            first = false;
            if n == 0 {
                break;
            }
        }
        let mem = self.vmm.mem.clone();
        for (head, len) in self.rx.take_used(&mem) {
            let addr = self.rx_slots.remove(&head).unwrap();
            self.free_rx.push(addr);
            assert!(len as usize >= HDR_LEN, "RX used length {len}");
            let split = addr % (2 * RX_SLOT_STRIDE) != 0;
            let mut raw = [0u8; HDR_LEN];
            mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = Header::from_bytes(&raw);
            assert_eq!(len as usize, HDR_LEN + hdr.len as usize);
            assert!(hdr.len <= self.cfg.rx_buf_len);
            let mut data = vec![0u8; hdr.len as usize];
            let at = if split {
                addr + 0x100
            } else {
                addr + HDR_LEN as u64
            };
            mem.read_slice(&mut data, GuestAddress(at)).unwrap();
            self.handle(hdr, data);
        }
        for (head, _) in self.tx.take_used(&mem) {
            let addr = self.tx_slots.remove(&head).unwrap();
            if addr != u64::MAX {
                self.free_tx.push(addr);
            }
        }
        self.refill_rx();
        self.produce();
        self.transmit();
    }

    pub fn pump(&mut self) {
        self.pump_wait(0);
    }

    /// Pumps until `done` holds; panics after `timeout`.
    pub fn run_until(&mut self, timeout: Duration, mut done: impl FnMut(&mut FakeGuest) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < timeout,
                "timed out; metrics {:?}",
                self.metrics()
            );
            self.pump_wait(2);
        }
    }

    pub fn metrics(&self) -> super::VsockMetricsSnapshot {
        self.dev.lock().unwrap().metrics().snapshot()
    }

    pub fn conn(&self, key: (u32, u32)) -> &GuestConn {
        &self.conns[&key]
    }

    pub fn conn_mut(&mut self, key: (u32, u32)) -> &mut GuestConn {
        self.conns.get_mut(&key).unwrap()
    }

    /// The path guest connections to host port `port` reach.
    pub fn port_path(&self, port: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Queue count sanity (the fake guest sets up all of them).
const _: () = assert!(NUM_QUEUES == 3);
