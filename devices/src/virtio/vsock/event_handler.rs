//! The vsock device's `event_manager` subscriber. Runs on the **VMM thread** only.
//!
//! At build time (`init`) it watches `activate_evt`, the listening Unix socket and the timer:
//! host clients may connect before the guest driver is up (their OP_REQUEST waits for RX
//! buffers). When the transport activates the device (vCPU thread) and writes
//! `activate_evt`, the subscriber puts the three queue EventFds into the event loop (once
//! for the device's lifetime) and processes whatever the driver queued already. A reset
//! writes the same event; the subscriber then drops every connection.
//!
//! Host sockets of connections and handshakes come and go: after every event the muxer
//! applies its polling changes through `EventOps` ([`Muxer::reconcile`]), and the timer is
//! re-armed for the earliest connection or handshake deadline.
//!
//! [`Muxer::reconcile`]: super::muxer::Muxer::reconcile

use std::io;
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::device::Vsock;
use super::{EVQ, RXQ, TXQ};
use crate::virtio::device::VirtioDevice;

const PROCESS_ACTIVATE: u32 = 0;
const PROCESS_RXQ: u32 = 1;
const PROCESS_TXQ: u32 = 2;
const PROCESS_EVQ: u32 = 3;
const PROCESS_LISTENER: u32 = 4;
const PROCESS_TIMER: u32 = 5;
/// Every host socket (the muxer looks the fd up).
const PROCESS_SOCKET: u32 = 6;

/// Consumes an EventFd's counter; an empty counter (spurious wake-up) is fine.
fn drain(evt: &EventFd) -> io::Result<()> {
    match evt.read() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

impl Vsock {
    fn process_activate_event(&mut self, ops: &mut EventOps, now: Instant) {
        if let Err(e) = drain(&self.activate_evt) {
            log::error!("vsock: cannot read the activate event: {e}");
        }
        if !self.is_activated() {
            // A reset: the purge already ran at the top of `process`.
            return;
        }
        if !self.queue_evts_registered {
            let sources = [(RXQ, PROCESS_RXQ), (TXQ, PROCESS_TXQ), (EVQ, PROCESS_EVQ)];
            let mut all = true;
            for (index, token) in sources {
                let Some(evt) = self.queue_evts.get(index) else {
                    continue;
                };
                if let Err(e) = ops.add(Events::with_data(evt, token, EventSet::IN)) {
                    all = false;
                    log::error!("vsock: cannot register queue event {index}: {e}");
                }
            }
            self.queue_evts_registered = all;
        }
        // The driver may have queued packets before the queue events were registered.
        self.process_tx(now);
    }

    fn process_queue_event(&mut self, index: usize, now: Instant) {
        if let Some(evt) = self.queue_evts.get(index) {
            if let Err(e) = drain(evt) {
                self.log()
                    .warn(format_args!("vsock: cannot read queue event {index}: {e}"));
            }
        }
        if !self.is_activated() {
            self.log().warn(format_args!(
                "vsock: queue {index} notified while not active"
            ));
            return;
        }
        if index == TXQ {
            self.process_tx(now);
        }
        // RX: new buffers; `process` fills them. Event queue: nothing to do.
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            PROCESS_ACTIVATE,
            EventSet::IN,
        )) {
            log::error!("vsock: cannot register the activate event: {e}");
        }
        if let Err(e) = ops.add(Events::with_data(
            self.muxer.listener(),
            PROCESS_LISTENER,
            EventSet::IN,
        )) {
            log::error!("vsock: cannot register the listening socket: {e}");
        }
        if let Err(e) = ops.add(Events::with_data(&self.timer, PROCESS_TIMER, EventSet::IN)) {
            log::error!("vsock: cannot register the timer: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let now = Instant::now();
        if self.purge_pending {
            self.purge_pending = false;
            self.muxer.purge();
        }
        let source = events.data();
        match source {
            PROCESS_ACTIVATE => self.process_activate_event(ops, now),
            PROCESS_RXQ => self.process_queue_event(RXQ, now),
            PROCESS_TXQ => self.process_queue_event(TXQ, now),
            PROCESS_EVQ => self.process_queue_event(EVQ, now),
            PROCESS_LISTENER => self.muxer.accept(now),
            // Re-arming below clears the expiry; the timer fd is never read (a read could
            // block if it was re-armed since epoll reported it).
            PROCESS_TIMER => self.muxer.sweep(now),
            PROCESS_SOCKET => self
                .muxer
                .on_socket_event(events.fd(), events.event_set(), now),
            _ => {
                self.log()
                    .warn(format_args!("vsock: unknown event source {source}"));
            }
        }
        self.process_rx(now);
        self.muxer.reconcile(ops, PROCESS_SOCKET);
        self.rearm_timer(now, source == PROCESS_TIMER);
    }
}
