//! The block device's `event_manager` subscriber. Runs on the **VMM thread** only.
//!
//! At build time it watches only `activate_evt`. When the transport activates the device
//! (vCPU thread) and writes `activate_evt`, the subscriber puts the queue EventFd into the
//! event loop (once for the device's lifetime: the EventFd survives resets) and processes
//! whatever the driver queued already. Queue events that arrive while the device is not
//! active (before activation, after a reset) are drained and ignored.

use std::io;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::device::Block;
use crate::virtio::device::VirtioDevice;

const PROCESS_ACTIVATE: u32 = 0;
const PROCESS_QUEUE: u32 = 1;

/// Consumes an EventFd's counter; an empty counter (spurious wake-up) is fine.
fn drain(evt: &EventFd) -> io::Result<()> {
    match evt.read() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

impl Block {
    fn process_activate_event(&mut self, ops: &mut EventOps) {
        if let Err(e) = drain(&self.activate_evt) {
            log::error!("virtio-blk: cannot read the activate event: {e}");
        }
        if !self.queue_evt_registered {
            match ops.add(Events::with_data(
                self.queue_evt(),
                PROCESS_QUEUE,
                EventSet::IN,
            )) {
                Ok(()) => self.queue_evt_registered = true,
                Err(e) => log::error!("virtio-blk: cannot register the queue event: {e}"),
            }
        }
        // The driver may have queued requests before the queue event was registered.
        self.process_queue();
    }

    fn process_queue_event(&mut self) {
        if let Err(e) = drain(self.queue_evt()) {
            self.log()
                .warn(format_args!("virtio-blk: cannot read the queue event: {e}"));
        }
        if self.is_activated() {
            self.process_queue();
        } else {
            self.log()
                .warn(format_args!("virtio-blk: queue notified while not active"));
        }
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            PROCESS_ACTIVATE,
            EventSet::IN,
        )) {
            log::error!("virtio-blk: cannot register the activate event: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let source = events.data();
        if !events.event_set().contains(EventSet::IN) {
            self.log().warn(format_args!(
                "virtio-blk: unexpected event {:?} from source {source}",
                events.event_set()
            ));
            return;
        }
        match source {
            PROCESS_ACTIVATE => self.process_activate_event(ops),
            PROCESS_QUEUE => self.process_queue_event(),
            _ => {
                self.log()
                    .warn(format_args!("virtio-blk: unknown event source {source}"));
            }
        }
    }
}
