//! What every one-queue device (virtio-blk, virtio-rng) does the same way on its event
//! loop (virtio-rng's is the **VMM thread**, each virtio-blk disk's its **device thread**):
//! the `event_manager` subscriber protocol, and serving the queue in batches.
//!
//! Subscriber: at build time it watches only `activate_evt`. When the transport activates
//! the device (vCPU thread) and writes `activate_evt`, the queue EventFd goes into the event
//! loop (once for the device's lifetime: the EventFd survives resets) and whatever the
//! driver queued already is processed. Queue events that arrive while the device is not
//! active (before activation, after a reset) are drained and ignored.
//!
//! Serving ([`serve`]): every available chain is handed to the device and completed, then
//! notifications are re-enabled; it loops while the driver added chains in between
//! (virtio-queue's suppression protocol) and raises at most one interrupt per batch, only
//! when the driver asked for it (event idx).

use std::io;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, GuestMemoryMmap, RateLimitedLog, VirtioInterrupt};

const PROCESS_ACTIVATE: u32 = 0;
const PROCESS_QUEUE: u32 = 1;

/// A device with one queue, seen by its subscriber.
pub trait SingleQueue {
    /// For log lines: `virtio-blk`, `virtio-rng`.
    const NAME: &'static str;
    fn activate_evt(&self) -> &EventFd;
    fn queue_evt(&self) -> &EventFd;
    /// Whether the queue EventFd is in the event loop already.
    fn queue_evt_registered(&mut self) -> &mut bool;
    fn is_active(&self) -> bool;
    fn log(&mut self) -> &mut RateLimitedLog;
    /// Serves the queue (usually through [`serve`]).
    fn process_queue(&mut self);
}

/// The activation checks of a one-queue device (vCPU thread, from
/// `VirtioDevice::activate`): not active yet, exactly one queue and it is ready; then
/// `activate_evt` is written so the subscriber registers the queue on its event loop.
pub fn activate(
    already_active: bool,
    queues: Vec<Queue>,
    activate_evt: &EventFd,
) -> Result<Queue, ActivateError> {
    if already_active {
        return Err(ActivateError::AlreadyActive);
    }
    let got = queues.len();
    let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
        return Err(ActivateError::QueueCount { expected: 1, got });
    };
    if !queue.ready() {
        return Err(ActivateError::QueueNotReady(0));
    }
    activate_evt
        .write(1)
        .map_err(ActivateError::ActivateEvent)?;
    Ok(queue)
}

/// Consumes an EventFd's counter; an empty counter (spurious wake-up) is fine.
fn drain(evt: &EventFd) -> io::Result<()> {
    match evt.read() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

/// `MutEventSubscriber::init`.
pub fn init<D: SingleQueue>(dev: &mut D, ops: &mut EventOps) {
    if let Err(e) = ops.add(Events::with_data(
        dev.activate_evt(),
        PROCESS_ACTIVATE,
        EventSet::IN,
    )) {
        log::error!("{}: cannot register the activate event: {e}", D::NAME);
    }
}

/// `MutEventSubscriber::process`.
pub fn process<D: SingleQueue>(dev: &mut D, events: Events, ops: &mut EventOps) {
    let source = events.data();
    if !events.event_set().contains(EventSet::IN) {
        let set = events.event_set();
        dev.log().warn(format_args!(
            "{}: unexpected event {set:?} from source {source}",
            D::NAME
        ));
        return;
    }
    match source {
        PROCESS_ACTIVATE => {
            if let Err(e) = drain(dev.activate_evt()) {
                log::error!("{}: cannot read the activate event: {e}", D::NAME);
            }
            if !*dev.queue_evt_registered() {
                match ops.add(Events::with_data(
                    dev.queue_evt(),
                    PROCESS_QUEUE,
                    EventSet::IN,
                )) {
                    Ok(()) => *dev.queue_evt_registered() = true,
                    Err(e) => log::error!("{}: cannot register the queue event: {e}", D::NAME),
                }
            }
            // The driver may have queued requests before the queue event was registered.
            dev.process_queue();
        }
        PROCESS_QUEUE => {
            if let Err(e) = drain(dev.queue_evt()) {
                dev.log().warn(format_args!(
                    "{}: cannot read the queue event: {e}",
                    D::NAME
                ));
            }
            if dev.is_active() {
                dev.process_queue();
            } else {
                dev.log()
                    .warn(format_args!("{}: queue notified while not active", D::NAME));
            }
        }
        _ => {
            dev.log()
                .warn(format_args!("{}: unknown event source {source}", D::NAME));
        }
    }
}

/// Completes every available chain of `queue` with `handle` (which returns the used
/// length: bytes written into the guest).
pub fn serve(
    name: &str,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    log: &mut RateLimitedLog,
    mut handle: impl FnMut(DescriptorChain<&GuestMemoryMmap>, &mut RateLimitedLog) -> u32,
) {
    // A guest can publish an available index that no chain can be popped for (an index
    // more than a queue ahead); `enable_notification` would then report "more work"
    // forever. Stop on an iterator error, or after a second pass that made no progress.
    let mut idle_passes = 0u32;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            log.warn(format_args!("{name}: cannot disable notifications: {e}"));
            return;
        }
        let mut completed = 0u32;
        let mut broken = false;
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    log.warn(format_args!("{name}: broken available ring: {e}"));
                    broken = true;
                    None
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = handle(chain, log);
            if let Err(e) = queue.add_used(mem, head, len) {
                log.warn(format_args!("{name}: cannot complete request {head}: {e}"));
            }
            completed = completed.saturating_add(1);
        }
        if completed > 0 {
            idle_passes = 0;
            match queue.needs_notification(mem) {
                Ok(true) => {
                    if let Err(e) = interrupt.signal_used_queue() {
                        log.warn(format_args!("{name}: cannot raise interrupt: {e}"));
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    log.warn(format_args!("{name}: used_event unreadable: {e}"));
                }
            }
        } else {
            idle_passes = idle_passes.saturating_add(1);
        }
        if broken || idle_passes > 1 {
            // Re-enable notifications so a fixed ring is served on the next kick.
            let _ = queue.enable_notification(mem);
            return;
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => return,
            Err(e) => {
                log.warn(format_args!("{name}: cannot enable notifications: {e}"));
                return;
            }
        }
    }
}
