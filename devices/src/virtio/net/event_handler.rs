//! The net device's `event_manager` subscriber. Runs on the **VMM thread** only.
//!
//! At build time it watches only `activate_evt`. When the transport activates the device
//! (vCPU thread) and writes `activate_evt`, the subscriber puts both queue EventFds into the
//! event loop (once for the device's lifetime: they survive resets), applies the offloads the
//! driver accepted to the backend, and processes what is already queued.
//!
//! The backend fd is watched level-triggered, and only while the device is active, RX is not
//! waiting for guest buffers and the backend has not failed
//! (`Net::wants_backend_events`): after every event the subscriber adds or removes it to
//! match. So a guest that stops posting RX buffers stops the reads from the tap instead of
//! spinning the loop, and its RX queue notification brings them back.
//!
//! Queue events that arrive while the device is not active (before activation, after a
//! reset) are drained and ignored; a backend event then only takes the fd out of the loop.

use std::io;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::device::Net;
use crate::virtio::device::VirtioDevice;

const PROCESS_ACTIVATE: u32 = 0;
const PROCESS_RX_QUEUE: u32 = 1;
const PROCESS_TX_QUEUE: u32 = 2;
const PROCESS_BACKEND: u32 = 3;

/// Consumes an EventFd's counter; an empty counter (spurious wake-up) is fine.
fn drain(evt: &EventFd) -> io::Result<()> {
    match evt.read() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

impl Net {
    fn process_activate_event(&mut self, ops: &mut EventOps) {
        if let Err(e) = drain(&self.activate_evt) {
            log::error!("virtio-net: cannot read the activate event: {e}");
        }
        if !self.queue_evts_registered {
            let rx = Events::with_data(self.rx_queue_evt(), PROCESS_RX_QUEUE, EventSet::IN);
            let tx = Events::with_data(self.tx_queue_evt(), PROCESS_TX_QUEUE, EventSet::IN);
            match ops.add(rx).and_then(|()| ops.add(tx)) {
                Ok(()) => self.queue_evts_registered = true,
                Err(e) => log::error!("virtio-net: cannot register the queue events: {e}"),
            }
        }
        if !self.is_activated() {
            // Reset again before the VMM thread got here.
            return;
        }
        self.apply_offloads();
        // The driver may have queued frames and buffers before the events were registered.
        self.process_tx();
        self.resume_rx();
    }

    fn process_rx_queue_event(&mut self) {
        if let Err(e) = drain(self.rx_queue_evt()) {
            self.log().warn(format_args!(
                "virtio-net: cannot read the RX queue event: {e}"
            ));
        }
        if self.is_activated() {
            self.resume_rx();
        } else {
            self.log().warn(format_args!(
                "virtio-net: RX queue notified while not active"
            ));
        }
    }

    fn process_tx_queue_event(&mut self) {
        if let Err(e) = drain(self.tx_queue_evt()) {
            self.log().warn(format_args!(
                "virtio-net: cannot read the TX queue event: {e}"
            ));
        }
        if self.is_activated() {
            self.process_tx();
        } else {
            self.log().warn(format_args!(
                "virtio-net: TX queue notified while not active"
            ));
        }
    }

    fn process_backend_event(&mut self, set: EventSet) {
        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) && !set.contains(EventSet::IN) {
            // Level-triggered: left in the loop, it would wake us forever.
            log::error!("virtio-net: the backend fd reported {set:?}; no longer reading it");
            self.backend_failed = true;
            return;
        }
        // Inactive: `sync_backend` below takes the fd out of the loop.
        self.process_rx();
    }

    /// Adds the backend fd to the event loop or removes it, to match
    /// [`Net::wants_backend_events`].
    fn sync_backend(&mut self, ops: &mut EventOps) {
        let want = self.wants_backend_events();
        if want == self.backend_registered {
            return;
        }
        let events =
            Events::with_data_raw(self.backend().as_raw_fd(), PROCESS_BACKEND, EventSet::IN);
        if want {
            match ops.add(events) {
                Ok(()) => self.backend_registered = true,
                Err(e) => log::error!("virtio-net: cannot watch the backend fd: {e}"),
            }
        } else {
            if let Err(e) = ops.remove(events) {
                log::error!("virtio-net: cannot stop watching the backend fd: {e}");
            }
            self.backend_registered = false;
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            PROCESS_ACTIVATE,
            EventSet::IN,
        )) {
            log::error!("virtio-net: cannot register the activate event: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let source = events.data();
        let set = events.event_set();
        match source {
            PROCESS_BACKEND => self.process_backend_event(set),
            _ if !set.contains(EventSet::IN) => {
                self.log().warn(format_args!(
                    "virtio-net: unexpected event {set:?} from source {source}"
                ));
            }
            PROCESS_ACTIVATE => self.process_activate_event(ops),
            PROCESS_RX_QUEUE => self.process_rx_queue_event(),
            PROCESS_TX_QUEUE => self.process_tx_queue_event(),
            _ => {
                self.log()
                    .warn(format_args!("virtio-net: unknown event source {source}"));
            }
        }
        self.sync_backend(ops);
    }
}
