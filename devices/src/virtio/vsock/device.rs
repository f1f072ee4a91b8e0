//! The virtio-vsock device.
//!
//! Two threads touch it, always under its mutex:
//! - **vCPU threads**, through the transport: configuration-space reads (the guest CID),
//!   `activate` (stores memory, queues and interrupt, then writes `activate_evt`) and
//!   `reset` (drops them and asks the VMM thread, through the same event, to drop every
//!   connection);
//! - **the VMM thread**, through its event subscriber ([`super::event_handler`]): the TX
//!   queue (each chain parsed by [`packet::parse_tx`] and handed to the [`Muxer`]), the RX
//!   queue (filled with whatever the muxer has for the guest), host sockets and timers.
//!
//! A malformed chain is returned with used length 0, counted and logged (rate-limited); the
//! device keeps running.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::metrics::{Counter, VsockMetrics};
use super::muxer::{Muxer, MuxerError};
use super::packet::{self, TxLimits};
use super::{VsockLimits, HOST_CID, MAX_PKT_LEN, NUM_QUEUES, QUEUE_SIZE, RXQ, TXQ};
use crate::virtio::device::{
    read_config_space, ActivateError, ActivationContext, GuestMemoryMmap, VirtioDevice,
    VirtioInterrupt,
};
use crate::virtio::{device_id, features, RateLimitedLog};

/// Errors of building the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {cid} is reserved (it must be at least 3 and below 2^32 - 1)")]
    InvalidCid { cid: u64 },
    #[error("cannot create an EventFd")]
    EventFd(#[source] io::Error),
    #[error("cannot create the timer")]
    Timer(#[source] io::Error),
    #[error("cannot set up the host socket")]
    Muxer(#[source] MuxerError),
}

/// What `activate` handed over.
struct Active {
    mem: GuestMemoryMmap,
    /// RX, TX, event.
    queues: [Queue; NUM_QUEUES],
    interrupt: VirtioInterrupt,
}

/// A virtio-vsock device bridged to Unix sockets. Share it as `Arc<Mutex<Vsock>>` with the
/// transport and the VMM thread's `EventManager` (see [`crate::virtio::vsock`]).
pub struct Vsock {
    cid: u64,
    pub(super) muxer: Muxer,
    metrics: Arc<VsockMetrics>,
    queue_max_sizes: [u16; NUM_QUEUES],
    pub(super) queue_evts: [EventFd; NUM_QUEUES],
    pub(super) activate_evt: EventFd,
    pub(super) timer: TimerFd,
    /// The deadline the timer is armed for.
    pub(super) timer_armed: Option<Instant>,
    active: Option<Active>,
    /// Whether the subscriber has put the queue EventFds into the event loop.
    pub(super) queue_evts_registered: bool,
    /// A reset happened: the VMM thread drops every connection before anything else.
    pub(super) purge_pending: bool,
    /// Data of one packet, either way.
    bounce: Vec<u8>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.cid)
            .field("path", &self.muxer.path())
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device for guest CID `cid` whose host side listens at `path` (which must not exist;
    /// it is removed when the device is dropped). Guest connections to port N go to
    /// `<path>_N`.
    pub fn new(cid: u64, path: &Path) -> Result<Vsock, VsockError> {
        Vsock::with_limits(cid, path, VsockLimits::default())
    }

    /// [`Vsock::new`] with explicit limits and timeouts.
    pub fn with_limits(cid: u64, path: &Path, limits: VsockLimits) -> Result<Vsock, VsockError> {
        if cid <= HOST_CID || cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid { cid });
        }
        let new_evt = || EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd);
        let queue_evts = [new_evt()?, new_evt()?, new_evt()?];
        let activate_evt = new_evt()?;
        let timer = TimerFd::new().map_err(|e| VsockError::Timer(e.into()))?;
        let metrics = Arc::new(VsockMetrics::default());
        let muxer = Muxer::new(cid, path, limits, metrics.clone()).map_err(VsockError::Muxer)?;
        Ok(Vsock {
            cid,
            muxer,
            metrics,
            queue_max_sizes: [QUEUE_SIZE; NUM_QUEUES],
            queue_evts,
            activate_evt,
            timer,
            timer_armed: None,
            active: None,
            queue_evts_registered: false,
            purge_pending: false,
            bounce: vec![0; MAX_PKT_LEN as usize],
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The device's counters (shared; read them without locking the device).
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    pub(super) fn log(&mut self) -> &mut RateLimitedLog {
        self.muxer.log()
    }

    /// Processes every chain of the TX queue; loops while the driver added chains in
    /// between (virtio-queue's suppression protocol). Raises at most one interrupt per
    /// batch, when the driver wants one.
    pub(super) fn process_tx(&mut self, now: Instant) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Active {
            mem,
            queues,
            interrupt,
        } = active;
        let Some(queue) = queues.get_mut(TXQ) else {
            return;
        };
        let limits = TxLimits {
            guest_cid: self.cid,
            max_pkt_len: MAX_PKT_LEN,
            max_descriptors: usize::from(QUEUE_SIZE),
        };
        let muxer = &mut self.muxer;
        let metrics = &self.metrics;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                muxer
                    .log()
                    .warn(format_args!("vsock: cannot disable TX notifications: {e}"));
                return;
            }
            let mut completed = false;
            loop {
                let chain = match queue.iter(&*mem) {
                    Ok(mut iter) => iter.next(),
                    Err(e) => {
                        muxer
                            .log()
                            .warn(format_args!("vsock: broken TX available ring: {e}"));
                        None
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                metrics.inc(Counter::TxPackets);
                match packet::parse_tx(chain, &limits) {
                    Ok(pkt) => {
                        let len = pkt.hdr.len as usize;
                        match self.bounce.get_mut(..len) {
                            Some(data) => match packet::read_segments(&*mem, &pkt.data, data) {
                                Ok(()) => muxer.send_pkt(&pkt.hdr, pkt.op, data, now),
                                Err(e) => {
                                    metrics.inc(Counter::MalformedPackets);
                                    muxer.log().warn(format_args!(
                                        "vsock: cannot read TX packet {head}: {e}"
                                    ));
                                }
                            },
                            None => metrics.inc(Counter::MalformedPackets),
                        }
                    }
                    Err(e) => {
                        metrics.inc(Counter::MalformedPackets);
                        muxer
                            .log()
                            .warn(format_args!("vsock: TX packet {head} refused: {e}"));
                    }
                }
                if let Err(e) = queue.add_used(&*mem, head, 0) {
                    muxer
                        .log()
                        .warn(format_args!("vsock: cannot complete TX packet {head}: {e}"));
                }
                completed = true;
            }
            if completed {
                notify(queue, mem, interrupt, muxer.log());
            }
            match queue.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    muxer
                        .log()
                        .warn(format_args!("vsock: cannot enable TX notifications: {e}"));
                    return;
                }
            }
        }
    }

    /// Fills RX buffers with whatever the muxer has for the guest, until it has nothing or
    /// the driver has no buffers left (then the driver's next notification resumes).
    pub(super) fn process_rx(&mut self, now: Instant) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Active {
            mem,
            queues,
            interrupt,
        } = active;
        let Some(queue) = queues.get_mut(RXQ) else {
            return;
        };
        let muxer = &mut self.muxer;
        let metrics = &self.metrics;
        let mut completed = false;
        while muxer.has_pending_rx() {
            let chain = match queue.iter(&*mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    muxer
                        .log()
                        .warn(format_args!("vsock: broken RX available ring: {e}"));
                    break;
                }
            };
            let Some(chain) = chain else {
                // Out of buffers; make sure the driver tells us when it adds some.
                match queue.enable_notification(&*mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        muxer
                            .log()
                            .warn(format_args!("vsock: cannot enable RX notifications: {e}"));
                        break;
                    }
                }
            };
            let head = chain.head_index();
            let buf = match packet::parse_rx(chain, usize::from(QUEUE_SIZE)) {
                Ok(buf) => buf,
                Err(e) => {
                    metrics.inc(Counter::MalformedPackets);
                    muxer
                        .log()
                        .warn(format_args!("vsock: RX buffer {head} refused: {e}"));
                    if let Err(e) = queue.add_used(&*mem, head, 0) {
                        muxer
                            .log()
                            .warn(format_args!("vsock: cannot return RX buffer {head}: {e}"));
                    }
                    completed = true;
                    continue;
                }
            };
            let room = buf.data_room(MAX_PKT_LEN) as usize;
            let Some(dst) = self.bounce.get_mut(..room) else {
                break;
            };
            let Some((hdr, n)) = muxer.recv_pkt(dst, now) else {
                // Nothing after all (host sockets drained): keep the buffer for later.
                queue.go_to_previous_position();
                break;
            };
            let data = self.bounce.get(..n).unwrap_or_default();
            let used = match packet::write_rx(&*mem, &buf, &hdr, data) {
                Ok(len) => {
                    metrics.inc(Counter::RxPackets);
                    len
                }
                Err(e) => {
                    muxer.delivery_failed(&hdr, e);
                    0
                }
            };
            if let Err(e) = queue.add_used(&*mem, head, used) {
                muxer
                    .log()
                    .warn(format_args!("vsock: cannot complete RX buffer {head}: {e}"));
            }
            completed = true;
        }
        if completed {
            notify(queue, mem, interrupt, muxer.log());
        }
    }

    /// Arms the timer for the muxer's next deadline (or disarms it). Re-arming also clears
    /// an expiry already signalled, so the timer fd is never read; `fired` forces that.
    pub(super) fn rearm_timer(&mut self, now: Instant, fired: bool) {
        let next = self.muxer.next_deadline();
        if next == self.timer_armed && !fired {
            return;
        }
        let delay = match next {
            // Never zero: that would disarm.
            Some(at) => at
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)),
            None => Duration::ZERO,
        };
        match self.timer.reset(delay, None) {
            Ok(()) => self.timer_armed = next,
            Err(e) => {
                self.timer_armed = None;
                self.log()
                    .warn(format_args!("vsock: cannot arm the timer: {e}"));
            }
        }
    }
}

/// Raises the queue's interrupt if the driver wants one.
fn notify(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    log: &mut RateLimitedLog,
) {
    match queue.needs_notification(mem) {
        Ok(true) => {
            if let Err(e) = interrupt.signal_used_queue() {
                log.warn(format_args!("vsock: cannot raise interrupt: {e}"));
            }
        }
        Ok(false) => {}
        Err(e) => {
            log.warn(format_args!("vsock: used_event unreadable: {e}"));
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_id::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn features(&self) -> u64 {
        features::VERSION_1
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// `struct virtio_vsock_config`: `le64 guest_cid`.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log().warn(format_args!(
            "vsock: {}-byte config write at {offset:#x} ignored",
            data.len()
        ));
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = ctx.queues.len();
        let Ok(queues) = <[Queue; NUM_QUEUES]>::try_from(ctx.queues) else {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got,
            });
        };
        // The event queue is only used for migration; RX and TX are required.
        for index in [RXQ, TXQ] {
            if !queues.get(index).is_some_and(|q| q.ready()) {
                return Err(ActivateError::QueueNotReady(index));
            }
        }
        self.activate_evt
            .write(1)
            .map_err(ActivateError::ActivateEvent)?;
        self.active = Some(Active {
            mem: ctx.mem,
            queues,
            interrupt: ctx.interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        // The guest's sockets are gone: the VMM thread drops the host sides.
        self.purge_pending = true;
        if let Err(e) = self.activate_evt.write(1) {
            log::error!("vsock: cannot signal the reset to the VMM thread: {e}");
        }
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}
