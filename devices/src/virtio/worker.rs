//! A device's own event loop on its own thread: how each virtio-blk disk runs, so that
//! a slow disk (an `fdatasync` storm, a read from a cold backend) stalls only its own
//! queue, never the VMM thread that carries the network, vsock and the other disks.
//!
//! The thread runs an `event_manager` loop with the device's ordinary subscriber (the
//! same protocol as on the VMM thread: `activate_evt`, then the queue EventFd) and one
//! more event, the stop EventFd. [`DeviceThread::stop`] (or dropping it) writes that
//! EventFd and joins: the request in progress finishes, nothing after it starts, and the
//! device's disk is closed when the join returns.
//!
//! Thread note: spawned and stopped by the thread that builds and tears down the VM;
//! the device itself is shared as `Arc<Mutex<_>>` with the transport (vCPU threads) as
//! everywhere (see [`super`]).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::thread::{spawn_confined, SpawnError};

/// Stack of a device thread: its loop, a request's parse and a syscall.
const STACK_SIZE: usize = 256 << 10;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A running device thread; dropping it stops and joins it.
pub struct DeviceThread {
    stop: Arc<EventFd>,
    handle: Option<JoinHandle<()>>,
}

/// Ends the loop when the stop EventFd fires.
struct StopWatch {
    evt: Arc<EventFd>,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.evt.as_ref(), EventSet::IN)) {
            log::error!("device thread: cannot watch its stop event: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.stopped.store(true, Ordering::SeqCst);
    }
}

impl DeviceThread {
    /// Runs `device`'s subscriber on a new thread called `name`, after `confine` has run
    /// on it (see [`crate::thread::spawn_confined`]).
    pub fn spawn(
        name: String,
        device: Subscriber,
        confine: impl FnOnce() -> io::Result<()> + Send + 'static,
    ) -> Result<DeviceThread, SpawnError<io::Error>> {
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(SpawnError::Spawn)?);
        let stopped = Arc::new(AtomicBool::new(false));
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| SpawnError::Spawn(io::Error::other(e.to_string())))?;
        manager.add_subscriber(device);
        manager.add_subscriber(Arc::new(Mutex::new(StopWatch {
            evt: stop.clone(),
            stopped: stopped.clone(),
        })));
        let thread_name = name.clone();
        let builder = std::thread::Builder::new()
            .name(name)
            .stack_size(STACK_SIZE);
        let handle = spawn_confined(builder, confine, move || {
            while !stopped.load(Ordering::SeqCst) {
                if let Err(e) = manager.run() {
                    log::error!("{thread_name}: event loop failed, the device stops: {e}");
                    return;
                }
            }
        })?;
        Ok(DeviceThread {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the loop after the request in progress and waits for the thread.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        if let Err(e) = self.stop.write(1) {
            // Without the stop event the thread cannot be joined: leave it running.
            log::error!("device thread: cannot signal stop: {e}");
            return;
        }
        if handle.join().is_err() {
            log::error!("a device thread panicked");
        }
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
