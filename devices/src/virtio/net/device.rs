//! The virtio-net device.
//!
//! Two threads touch it, always under its mutex:
//! - **vCPU threads**, through the transport: configuration-space reads (the MAC),
//!   `activate` (stores memory, queues and interrupt, then writes `activate_evt`) and `reset`;
//! - **the VMM thread**, through its event subscriber ([`super::event_handler`]): everything
//!   else — applying the negotiated offloads to the tap, TX (guest → tap) and RX
//!   (tap → guest).
//!
//! # RX never stalls the VMM
//!
//! A frame read from the backend waits in the device until the guest has buffers for it.
//! RX chains are taken from the ring as they are needed and held until a frame fills them
//! (with MRG_RXBUF a frame spans several, and `num_buffers` says how many). When the ring
//! runs dry with a frame pending, the device asks the driver for a notification and stops
//! reading the backend (the subscriber removes the backend fd from the event loop); the RX
//! queue notification resumes it. A frame that can never fit — larger than the next buffer
//! without MRG_RXBUF, or than the whole ring with it — is dropped and counted.
//!
//! # TX
//!
//! Each chain is parsed ([`super::chain::parse_tx`]), copied into a bounce buffer and written
//! to the backend as one frame; refused, oversized and unwritable frames are counted and
//! dropped, and the chain is returned either way. At most [`TX_BUDGET`] chains run per
//! event, so a busy guest cannot starve the rest of the event loop.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::NetBackend;
use super::chain::{self, ChainError, RxBuffer, RxPlan};
use super::metrics::{Counter, NetMetrics};
use super::{
    ETH_HLEN, MAX_BUFFER_LEN, NUM_BUFFERS_OFFSET, QUEUE_SIZE, RX_INDEX, TX_INDEX, VNET_HDR_LEN,
};
use crate::virtio::device::{
    read_config_space, ActivateError, ActivationContext, GuestMemoryMmap, VirtioDevice,
    VirtioInterrupt,
};
use crate::virtio::{device_id, features, RateLimitedLog};

/// TX chains processed per event before the device yields to the event loop (Linux's NAPI
/// weight).
pub const TX_BUDGET: usize = 64;
/// Frames read from the backend per event (the backend fd is level-triggered: more wake us).
pub const RX_BUDGET: usize = 64;
/// Longest chain accepted in either direction (without indirect descriptors a chain cannot
/// be longer than its queue).
const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;
// `activate` destructures the queues as [rx, tx].
const _: () = assert!(RX_INDEX == 0 && TX_INDEX == 1);
/// `struct virtio_net_config` up to `mac` (no STATUS, MQ or MTU fields are offered).
const CONFIG_LEN: usize = 6;

/// Errors of the net device: building it, and moving frames.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot create an EventFd")]
    EventFd(#[source] io::Error),
    #[error("{text:?} is not a MAC address (six hex bytes separated by ':')")]
    InvalidMac { text: String },
    #[error("cannot read a frame from the backend")]
    ReadBackend(#[source] io::Error),
    #[error("cannot write a frame to the backend")]
    WriteBackend(#[source] io::Error),
    #[error("the backend took {written} of {len} bytes of a frame")]
    ShortWrite { written: usize, len: usize },
    #[error("cannot set offloads {flags:#x} on the backend")]
    SetOffload {
        flags: u32,
        #[source]
        source: io::Error,
    },
    #[error("malformed descriptor chain")]
    Chain(#[source] ChainError),
    #[error("virtqueue error")]
    Queue(#[source] virtio_queue::Error),
    #[error("cannot raise the interrupt")]
    Interrupt(#[source] io::Error),
}

/// An error and its causes on one line, for logs.
struct Causes<'a>(&'a dyn std::error::Error);

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// A MAC address, `aa:bb:cc:dd:ee:ff` in text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, NetError> {
        let invalid = || NetError::InvalidMac { text: s.to_owned() };
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut bytes {
            let part = parts.next().ok_or_else(invalid)?;
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(invalid());
            }
            *b = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The `TUN_F_*` offloads to set on the tap for the features a driver accepted: which
/// partially-checksummed and GSO frames the guest can take on its RX queue. TSO and UFO
/// need GUEST_CSUM (virtio 1.x, 5.1.3.1); a driver that accepts them without it gets none.
pub fn tap_offload_flags(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

/// What `activate` handed over.
struct Active {
    mem: GuestMemoryMmap,
    rx_queue: Queue,
    tx_queue: Queue,
    interrupt: VirtioInterrupt,
    acked_features: u64,
    mergeable: bool,
}

/// Receive state, apart from the queues so both can be borrowed at once.
struct Rx {
    /// One frame read from the backend (header + frame).
    buf: Vec<u8>,
    /// Length of the frame in `buf` that waits for guest buffers.
    pending: Option<usize>,
    /// Chains taken from the ring and not filled yet, in ring order.
    held: VecDeque<RxBuffer>,
    /// Waiting for the driver to add buffers: the backend is not read meanwhile.
    stalled: bool,
}

/// What happened to a pending frame.
enum Placement {
    Delivered,
    Dropped,
    /// No room yet; the driver will notify the RX queue when it adds buffers.
    Stalled,
}

/// A virtio-net device. Share it as `Arc<Mutex<Net>>` with the transport and the VMM
/// thread's `EventManager` (see [`super`] for the wiring).
pub struct Net {
    backend: Box<dyn NetBackend>,
    features: u64,
    config: [u8; CONFIG_LEN],
    queue_max_sizes: [u16; 2],
    queue_evts: [EventFd; 2],
    pub(super) activate_evt: EventFd,
    active: Option<Active>,
    rx: Rx,
    tx_buf: Vec<u8>,
    metrics: Arc<NetMetrics>,
    log: RateLimitedLog,
    /// Whether the subscriber has put the queue EventFds into the event loop.
    pub(super) queue_evts_registered: bool,
    /// Whether the backend fd is in the event loop (see [`Net::wants_backend_events`]).
    pub(super) backend_registered: bool,
    /// The backend reported an error or hang-up on its fd, or end of file; it is not read
    /// or watched any more.
    pub(super) backend_failed: bool,
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("features", &self.features)
            .field("active", &self.active.is_some())
            .field("rx_stalled", &self.rx.stalled)
            .field("backend_registered", &self.backend_registered)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A device over `backend` (a [`Tap`](super::Tap) in production). With a `mac` the
    /// device offers VIRTIO_NET_F_MAC; without one the guest picks a random address.
    pub fn new(backend: Box<dyn NetBackend>, mac: Option<MacAddr>) -> Result<Net, NetError> {
        let bit = |b: u32| 1u64 << b;
        let mut features = features::VERSION_1
            | features::RING_EVENT_IDX
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_UFO)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_UFO)
            | bit(VIRTIO_NET_F_MRG_RXBUF);
        let mut config = [0u8; CONFIG_LEN];
        if let Some(MacAddr(mac)) = mac {
            features |= bit(VIRTIO_NET_F_MAC);
            config = mac;
        }
        let new_evt = || EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Net {
            backend,
            features,
            config,
            queue_max_sizes: [QUEUE_SIZE; 2],
            queue_evts: [new_evt()?, new_evt()?],
            activate_evt: new_evt()?,
            active: None,
            rx: Rx {
                buf: vec![0; MAX_BUFFER_LEN],
                pending: None,
                held: VecDeque::new(),
                stalled: false,
            },
            tx_buf: vec![0; MAX_BUFFER_LEN],
            metrics: Arc::default(),
            log: RateLimitedLog::default(),
            queue_evts_registered: false,
            backend_registered: false,
            backend_failed: false,
        })
    }

    /// The device's counters (shared; read them without locking the device).
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    pub(super) fn rx_queue_evt(&self) -> &EventFd {
        let [rx, _] = &self.queue_evts;
        rx
    }

    pub(super) fn tx_queue_evt(&self) -> &EventFd {
        let [_, tx] = &self.queue_evts;
        tx
    }

    pub(super) fn backend(&self) -> &dyn NetBackend {
        &*self.backend
    }

    pub(super) fn log(&mut self) -> &mut RateLimitedLog {
        &mut self.log
    }

    /// Whether the backend fd belongs in the event loop: while the device is active, RX is
    /// not waiting for guest buffers, and the backend has not failed.
    pub(super) fn wants_backend_events(&self) -> bool {
        self.active.is_some() && !self.rx.stalled && !self.backend_failed
    }

    /// Whether RX is waiting for the guest to add buffers.
    pub fn rx_stalled(&self) -> bool {
        self.rx.stalled
    }

    /// VMM thread, on activation: tells the backend which offloads the guest accepted.
    pub(super) fn apply_offloads(&mut self) {
        let Some(active) = &self.active else {
            return;
        };
        let flags = tap_offload_flags(active.acked_features);
        if let Err(source) = self.backend.set_offload(flags) {
            self.metrics.add(Counter::OffloadErrors, 1);
            let e = NetError::SetOffload { flags, source };
            self.log.warn(format_args!("virtio-net: {}", Causes(&e)));
        }
    }

    /// VMM thread, on an RX queue notification: the driver added buffers.
    pub(super) fn resume_rx(&mut self) {
        self.rx.stalled = false;
        if let Some(a) = self.active.as_mut() {
            // Notifications are only wanted while stalled (see `place`).
            if let Err(e) = a.rx_queue.disable_notification(&a.mem) {
                self.log.warn(format_args!(
                    "virtio-net: cannot disable RX notifications: {}",
                    Causes(&NetError::Queue(e))
                ));
            }
        }
        self.process_rx();
    }

    /// Moves frames from the backend into guest buffers until the backend is empty, the
    /// budget is spent, or the guest has no room (then RX stalls).
    pub(super) fn process_rx(&mut self) {
        let Net {
            backend,
            active,
            rx,
            metrics,
            log,
            backend_failed,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return;
        };
        if rx.stalled || *backend_failed {
            return;
        }
        let mut used = false;
        for _ in 0..RX_BUDGET {
            let len = match rx.pending {
                Some(len) => len,
                None => match backend.read_frame(&mut rx.buf) {
                    Ok(0) => {
                        // End of file: a backend that is gone (a tap never does this).
                        log::error!("virtio-net: the backend closed; no longer reading it");
                        *backend_failed = true;
                        break;
                    }
                    Ok(n) if n < VNET_HDR_LEN + ETH_HLEN => {
                        metrics.add(Counter::RxDropped, 1);
                        log.warn(format_args!(
                            "virtio-net: dropped a {n}-byte frame from the backend"
                        ));
                        continue;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        metrics.add(Counter::RxBackendErrors, 1);
                        log.warn(format_args!(
                            "virtio-net: {}",
                            Causes(&NetError::ReadBackend(e))
                        ));
                        break;
                    }
                },
            };
            rx.pending = Some(len);
            let placement = rx.place(a, len, metrics, log, &mut used);
            match placement {
                Placement::Delivered | Placement::Dropped => rx.pending = None,
                Placement::Stalled => {
                    rx.stalled = true;
                    metrics.add(Counter::RxStalls, 1);
                    break;
                }
            }
        }
        if used {
            signal_if_needed(&mut a.rx_queue, &a.mem, &a.interrupt, log);
        }
    }

    /// Sends every chain the driver queued on TX (at most [`TX_BUDGET`] per call, then the
    /// device notifies itself to continue after other events); then delivers what the
    /// backend answered itself ([`NetBackend::has_pending`]).
    pub(super) fn process_tx(&mut self) {
        self.transmit_queued();
        if self.backend.has_pending() {
            self.process_rx();
        }
    }

    fn transmit_queued(&mut self) {
        let Net {
            backend,
            active,
            tx_buf,
            metrics,
            log,
            queue_evts,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return;
        };
        let mut budget = TX_BUDGET;
        // A guest can publish an available index no chain can be popped for (more than a
        // queue ahead): `enable_notification` would then report "more work" forever. Stop
        // on a broken ring, or after a second pass that made no progress.
        let mut idle_passes = 0u32;
        loop {
            if let Err(e) = a.tx_queue.disable_notification(&a.mem) {
                log.warn(format_args!(
                    "virtio-net: cannot disable TX notifications: {}",
                    Causes(&NetError::Queue(e))
                ));
                return;
            }
            let mut completed = 0u32;
            let mut broken = false;
            while budget > 0 {
                let chain = match pop(&mut a.tx_queue, &a.mem, log) {
                    Pop::Chain(chain) => chain,
                    Pop::Empty => break,
                    Pop::Broken => {
                        broken = true;
                        break;
                    }
                };
                budget = budget.saturating_sub(1);
                let head = chain.head_index();
                transmit(backend.as_mut(), &a.mem, chain, tx_buf, metrics, log);
                if let Err(e) = a.tx_queue.add_used(&a.mem, head, 0) {
                    log.warn(format_args!(
                        "virtio-net: cannot return TX chain {head}: {}",
                        Causes(&NetError::Queue(e))
                    ));
                }
                completed = completed.saturating_add(1);
            }
            if completed > 0 {
                idle_passes = 0;
                signal_if_needed(&mut a.tx_queue, &a.mem, &a.interrupt, log);
            } else {
                idle_passes = idle_passes.saturating_add(1);
            }
            if budget == 0 {
                // Come back after the other ready events; notifications stay off meanwhile.
                let [_, tx_evt] = &*queue_evts;
                if let Err(e) = tx_evt.write(1) {
                    log.warn(format_args!("virtio-net: cannot requeue TX work: {e}"));
                }
                return;
            }
            let more = enable_notification(&mut a.tx_queue, &a.mem, log);
            if !more || broken || idle_passes > 1 {
                return;
            }
        }
    }
}

/// What taking the next chain from a queue gave.
enum Pop<'m> {
    Chain(virtio_queue::DescriptorChain<&'m GuestMemoryMmap>),
    /// Nothing available.
    Empty,
    /// The available ring is unusable (an index more than a queue ahead, unreadable).
    Broken,
}

fn pop<'m>(queue: &mut Queue, mem: &'m GuestMemoryMmap, log: &mut RateLimitedLog) -> Pop<'m> {
    match queue.iter(mem) {
        Ok(mut iter) => iter.next().map_or(Pop::Empty, Pop::Chain),
        Err(e) => {
            log.warn(format_args!(
                "virtio-net: broken available ring: {}",
                Causes(&NetError::Queue(e))
            ));
            Pop::Broken
        }
    }
}

/// Asks the driver to notify the queue again; returns whether chains are already waiting.
fn enable_notification(queue: &mut Queue, mem: &GuestMemoryMmap, log: &mut RateLimitedLog) -> bool {
    match queue.enable_notification(mem) {
        Ok(more) => more,
        Err(e) => {
            log.warn(format_args!(
                "virtio-net: cannot enable notifications: {}",
                Causes(&NetError::Queue(e))
            ));
            false
        }
    }
}

/// Parses, gathers and writes one TX chain; counts what happened to it.
fn transmit(
    backend: &mut dyn NetBackend,
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
    metrics: &NetMetrics,
    log: &mut RateLimitedLog,
) {
    let head = chain.head_index();
    let frame = match chain::parse_tx(chain, MAX_DESCRIPTORS, MAX_BUFFER_LEN as u64)
        .and_then(|f| chain::gather(mem, &f, buf))
    {
        Ok(frame) => frame,
        Err(e) => {
            let counter = if e.is_too_long() {
                Counter::TxDroppedTooLarge
            } else {
                Counter::TxMalformedChains
            };
            metrics.add(counter, 1);
            log.warn(format_args!(
                "virtio-net: TX chain {head} dropped: {}",
                Causes(&NetError::Chain(e))
            ));
            return;
        }
    };
    let len = frame.len();
    let result = match backend.write_frame(frame) {
        Ok(n) if n == len => Ok(()),
        Ok(written) => Err(NetError::ShortWrite { written, len }),
        Err(e) => Err(NetError::WriteBackend(e)),
    };
    match result {
        Ok(()) => {
            metrics.add(Counter::TxPackets, 1);
            metrics.add(Counter::TxBytes, len.saturating_sub(VNET_HDR_LEN) as u64);
        }
        Err(e) => {
            metrics.add(Counter::TxBackendErrors, 1);
            log.warn(format_args!(
                "virtio-net: TX frame of {len} bytes dropped: {}",
                Causes(&e)
            ));
        }
    }
}

/// Raises the queue's interrupt if the driver asked for it (event-idx suppression).
fn signal_if_needed(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    log: &mut RateLimitedLog,
) {
    match queue.needs_notification(mem) {
        Ok(true) => {
            if let Err(e) = interrupt.signal_used_queue() {
                log.warn(format_args!(
                    "virtio-net: {}",
                    Causes(&NetError::Interrupt(e))
                ));
            }
        }
        Ok(false) => {}
        Err(e) => {
            log.warn(format_args!(
                "virtio-net: used_event unreadable: {}",
                Causes(&NetError::Queue(e))
            ));
        }
    }
}

impl Rx {
    /// Places the pending frame of `len` bytes into guest buffers, taking chains from the
    /// ring as needed. Sets `used` when anything went to the used ring.
    fn place(
        &mut self,
        a: &mut Active,
        len: usize,
        metrics: &NetMetrics,
        log: &mut RateLimitedLog,
        used: &mut bool,
    ) -> Placement {
        let mut retried = false;
        loop {
            let plan = chain::plan_rx(
                self.held.iter().map(|b| b.capacity),
                len as u64,
                a.mergeable,
            );
            match plan {
                RxPlan::Fits { buffers } => {
                    self.deliver(a, len, buffers, metrics, log);
                    *used = true;
                    return Placement::Delivered;
                }
                RxPlan::TooLarge => {
                    self.drop_too_large(len, metrics, log);
                    return Placement::Dropped;
                }
                RxPlan::NeedMore => {}
            }
            // Take the next chain from the ring.
            match pop(&mut a.rx_queue, &a.mem, log) {
                Pop::Chain(chain) => {
                    retried = false;
                    let head = chain.head_index();
                    match chain::parse_rx(chain, MAX_DESCRIPTORS) {
                        Ok(buffer) => self.held.push_back(buffer),
                        Err(e) => {
                            metrics.add(Counter::RxMalformedChains, 1);
                            log.warn(format_args!(
                                "virtio-net: RX chain {head} refused: {}",
                                Causes(&NetError::Chain(e))
                            ));
                            add_used(a, head, 0, log);
                            *used = true;
                        }
                    }
                    continue;
                }
                Pop::Broken => {
                    // Wait for the driver's next kick (it may repair the ring).
                    enable_notification(&mut a.rx_queue, &a.mem, log);
                    return Placement::Stalled;
                }
                Pop::Empty => {}
            }
            // The ring is empty. With every descriptor of the ring held, no more can come.
            let held_descriptors: usize = self.held.iter().map(|b| b.segments.len()).sum();
            if held_descriptors >= usize::from(a.rx_queue.size()) {
                self.drop_too_large(len, metrics, log);
                return Placement::Dropped;
            }
            // Ask for a notification when buffers come; one may have raced in meanwhile
            // (look once: an index that claims chains it cannot give would loop forever).
            if !enable_notification(&mut a.rx_queue, &a.mem, log) || retried {
                return Placement::Stalled;
            }
            retried = true;
        }
    }

    fn drop_too_large(&self, len: usize, metrics: &NetMetrics, log: &mut RateLimitedLog) {
        metrics.add(Counter::RxDroppedTooLarge, 1);
        let room: u64 = self.held.iter().map(|b| b.capacity).sum();
        log.warn(format_args!(
            "virtio-net: dropped a {len}-byte frame: the guest's RX buffers hold {room} bytes"
        ));
    }

    /// Writes the pending frame into the first `buffers` held chains and returns them.
    fn deliver(
        &mut self,
        a: &mut Active,
        len: usize,
        buffers: usize,
        metrics: &NetMetrics,
        log: &mut RateLimitedLog,
    ) {
        let num_buffers = u16::try_from(buffers).unwrap_or(u16::MAX).to_le_bytes();
        let chains: Vec<RxBuffer> = self.held.drain(..buffers.min(self.held.len())).collect();
        let frame = self.buf.get_mut(..len).unwrap_or_default();
        if let Some(field) = frame.get_mut(NUM_BUFFERS_OFFSET..VNET_HDR_LEN) {
            field.copy_from_slice(&num_buffers);
        }
        match chain::scatter(&a.mem, frame, &chains) {
            Ok(lens) => {
                for (i, b) in chains.iter().enumerate() {
                    add_used(a, b.head, lens.get(i).copied().unwrap_or(0), log);
                }
                metrics.add(Counter::RxPackets, 1);
                metrics.add(Counter::RxBytes, len.saturating_sub(VNET_HDR_LEN) as u64);
            }
            Err(e) => {
                metrics.add(Counter::RxDropped, 1);
                log.warn(format_args!(
                    "virtio-net: RX frame lost: {}",
                    Causes(&NetError::Chain(e))
                ));
                for b in &chains {
                    add_used(a, b.head, 0, log);
                }
            }
        }
    }
}

fn add_used(a: &mut Active, head: u16, len: u32, log: &mut RateLimitedLog) {
    if let Err(e) = a.rx_queue.add_used(&a.mem, head, len) {
        log.warn(format_args!(
            "virtio-net: cannot return RX chain {head}: {}",
            Causes(&NetError::Queue(e))
        ));
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_id::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only for a VERSION_1 driver; nothing else is writable.
        self.log.warn(format_args!(
            "virtio-net: {}-byte config write at {offset:#x} ignored",
            data.len()
        ));
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = ctx.queues.len();
        let Ok(queues) = <[Queue; 2]>::try_from(ctx.queues) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        for (i, q) in queues.iter().enumerate() {
            if !q.ready() {
                return Err(ActivateError::QueueNotReady(i));
            }
        }
        let [rx_queue, tx_queue] = queues;
        self.activate_evt
            .write(1)
            .map_err(ActivateError::ActivateEvent)?;
        let mergeable = ctx.acked_features & (1u64 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        self.active = Some(Active {
            mem: ctx.mem,
            rx_queue,
            tx_queue,
            interrupt: ctx.interrupt,
            acked_features: ctx.acked_features,
            mergeable,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        // Held chains belong to the old rings; the pending frame is lost with them.
        self.rx.held.clear();
        self.rx.stalled = false;
        if self.rx.pending.take().is_some() {
            self.metrics.add(Counter::RxDropped, 1);
        }
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_and_prints() {
        let mac: MacAddr = "02:aB:00:ff:10:01".parse().unwrap();
        assert_eq!(mac, MacAddr([0x02, 0xab, 0, 0xff, 0x10, 0x01]));
        assert_eq!(mac.to_string(), "02:ab:00:ff:10:01");
        for bad in [
            "",
            "02:ab:00:ff:10",
            "02:ab:00:ff:10:01:02",
            "02:ab:00:ff:10:1",
            "02:ab:00:ff:10:0g",
            "02-ab-00-ff-10-01",
            "+2:ab:00:ff:10:01",
        ] {
            assert!(
                matches!(bad.parse::<MacAddr>(), Err(NetError::InvalidMac { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn offload_mapping() {
        let bit = |b: u32| 1u64 << b;
        assert_eq!(tap_offload_flags(0), 0);
        // Host-side (TX) features need nothing from the tap.
        assert_eq!(
            tap_offload_flags(bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4)),
            0
        );
        assert_eq!(
            tap_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM)),
            libc::TUN_F_CSUM
        );
        // TSO without GUEST_CSUM is a driver bug: no offloads at all.
        assert_eq!(tap_offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        assert_eq!(
            tap_offload_flags(
                bit(VIRTIO_NET_F_GUEST_CSUM)
                    | bit(VIRTIO_NET_F_GUEST_TSO4)
                    | bit(VIRTIO_NET_F_GUEST_TSO6)
                    | bit(VIRTIO_NET_F_GUEST_UFO)
            ),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
        );
        assert_eq!(
            tap_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO6)),
            libc::TUN_F_CSUM | libc::TUN_F_TSO6
        );
    }
}
