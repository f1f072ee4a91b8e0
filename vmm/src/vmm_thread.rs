//! The VMM thread: one `event_manager::EventManager` loop that owns every host-side event
//! source of the VM — the exit event, the guest console's input, the control channel, and
//! the virtio-net, vsock and rng queues with their taps and sockets (each disk has a device
//! thread of its own). It ends when the VM must stop, then kicks and joins the vCPU
//! threads and stops the disks' threads.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitState, VmExit};
use crate::vstate::vcpu::VcpuThread;
use devices::legacy::i8042::I8042;
use devices::legacy::serial::SerialConsole;
use devices::virtio::block::Block;

/// The event loop's subscriber type.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
pub type Manager = EventManager<Subscriber>;

/// What the host may ask of a running VM.
pub enum VmAction {
    /// Ask the guest to shut down gracefully (Ctrl-Alt-Del through the i8042).
    CtrlAltDel,
    /// Stop the VM now.
    Stop,
    /// Put another disk behind virtio-blk device `index` (in [`VmConfig::disks`] order) and
    /// announce it to the guest with a config-change interrupt; an
    /// [`EmptyDisk`](devices::disk::EmptyDisk) empties the slot.
    ///
    /// [`VmConfig::disks`]: crate::VmConfig::disks
    ReplaceDisk {
        index: usize,
        disk: crate::DiskConfig,
    },
}

impl std::fmt::Debug for VmAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmAction::CtrlAltDel => f.write_str("CtrlAltDel"),
            VmAction::Stop => f.write_str("Stop"),
            VmAction::ReplaceDisk { index, disk } => f
                .debug_struct("ReplaceDisk")
                .field("index", index)
                .field("size", &disk.backend.size())
                .field("serial", &disk.serial)
                .finish(),
        }
    }
}

/// Errors answering a [`VmAction`].
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VM has already stopped")]
    VmGone,
    #[error("cannot deliver Ctrl-Alt-Del to the guest")]
    CtrlAltDel(#[source] devices::legacy::i8042::I8042Error),
    #[error("the VM has no disk {index} (it has {count})")]
    NoDisk { index: usize, count: usize },
    #[error("cannot put the new disk behind disk {index}")]
    ReplaceDisk {
        index: usize,
        #[source]
        source: devices::virtio::block::BlockError,
    },
}

/// A reply callback: runs on the VMM thread, must not block (the shim passes a closure
/// that completes a oneshot channel).
pub type Reply = Box<dyn FnOnce(Result<(), ControlError>) + Send>;

/// Sends actions to the VMM thread. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct ControlSender {
    tx: Sender<(VmAction, Reply)>,
    evt: Arc<EventFd>,
}

impl ControlSender {
    /// Queues `action`; `reply` is called with the outcome (immediately with
    /// [`ControlError::VmGone`] if the VMM thread has ended).
    pub fn send(&self, action: VmAction, reply: Reply) {
        match self.tx.send((action, reply)) {
            Ok(()) => {
                if let Err(e) = self.evt.write(1) {
                    log::error!("cannot wake the VMM thread: {e}");
                }
            }
            Err(mpsc::SendError((_, reply))) => reply(Err(ControlError::VmGone)),
        }
    }
}

struct Control {
    rx: Receiver<(VmAction, Reply)>,
    evt: Arc<EventFd>,
    i8042: Arc<Mutex<I8042>>,
    exit: Arc<ExitState>,
    disks: Vec<Arc<Mutex<Block>>>,
}

impl MutEventSubscriber for Control {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        while let Ok((action, reply)) = self.rx.try_recv() {
            let result = match action {
                VmAction::CtrlAltDel => self
                    .i8042
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .inject_ctrl_alt_del()
                    .map_err(ControlError::CtrlAltDel),
                VmAction::Stop => {
                    self.exit.request(VmExit::Stopped);
                    Ok(())
                }
                VmAction::ReplaceDisk { index, disk } => match self.disks.get(index) {
                    Some(block) => block
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .replace_disk(disk.backend, disk.serial.as_deref())
                        .map_err(|source| ControlError::ReplaceDisk { index, source }),
                    None => Err(ControlError::NoDisk {
                        index,
                        count: self.disks.len(),
                    }),
                },
            };
            reply(result);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.evt, EventSet::IN)) {
            log::error!("cannot watch the control channel: {e}");
        }
    }
}

/// Wakes the loop when an exit is requested (the loop checks [`ExitState::stopping`]).
struct ExitWatch(Arc<ExitState>);

impl MutEventSubscriber for ExitWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.eventfd().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.eventfd(), EventSet::IN)) {
            log::error!("cannot watch the exit event: {e}");
        }
    }
}

const INPUT: u32 = 0;
const DRAINED: u32 = 1;

/// Feeds host input into the guest console, pausing while the UART's FIFO is full.
struct ConsoleInput {
    input: File,
    serial: Arc<Mutex<SerialConsole>>,
    drained: EventFd,
    pending: Vec<u8>,
    watching_input: bool,
}

impl ConsoleInput {
    fn flush_pending(&mut self) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        match serial.enqueue_input(&self.pending) {
            Ok(n) => {
                self.pending.drain(..n.min(self.pending.len()));
            }
            Err(e) => {
                log::warn!("console input dropped: {e}");
                self.pending.clear();
            }
        }
    }

    fn set_input_watch(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.watching_input {
            return;
        }
        let ev = Events::with_data(&self.input, INPUT, EventSet::IN);
        let r = if on { ops.add(ev) } else { ops.remove(ev) };
        match r {
            Ok(()) => self.watching_input = on,
            Err(e) => log::debug!("console input not watched: {e}"),
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            INPUT => {
                let mut buf = [0u8; 256];
                match self.input.read(&mut buf) {
                    Ok(0) => {
                        self.set_input_watch(ops, false);
                        return;
                    }
                    Ok(n) => self.pending.extend_from_slice(buf.get(..n).unwrap_or(&[])),
                    Err(e)
                        if e.kind() == io::ErrorKind::Interrupted
                            || e.kind() == io::ErrorKind::WouldBlock =>
                    {
                        return
                    }
                    Err(e) => {
                        log::warn!("console input closed: {e}");
                        self.set_input_watch(ops, false);
                        return;
                    }
                }
            }
            _ => {
                let _ = self.drained.read();
            }
        }
        self.flush_pending();
        // Stop reading the host side while the guest has not taken what we have.
        let room = self.pending.is_empty();
        self.set_input_watch(ops, room);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.drained, DRAINED, EventSet::IN)) {
            log::error!("cannot watch the console FIFO: {e}");
        }
        self.set_input_watch(ops, true);
    }
}

/// Everything the VMM thread owns.
pub(crate) struct VmmThread {
    pub manager: Manager,
    pub exit: Arc<ExitState>,
    /// The vCPU threads, sent once they all run (nothing if one could not start).
    pub vcpus: Receiver<Vec<VcpuThread>>,
    /// The disks' device threads (see `devices::virtio::worker`).
    pub block_threads: Vec<devices::virtio::worker::DeviceThread>,
    pub on_exit: Option<crate::config::OnExit>,
}

/// Builds the subscribers every VM has; returns the control sender.
pub(crate) fn add_core_subscribers(
    manager: &mut Manager,
    exit: &Arc<ExitState>,
    i8042: Arc<Mutex<I8042>>,
    serial: &Arc<Mutex<SerialConsole>>,
    console_in: Option<File>,
    disks: Vec<Arc<Mutex<Block>>>,
) -> io::Result<ControlSender> {
    use event_manager::SubscriberOps;
    manager.add_subscriber(Arc::new(Mutex::new(ExitWatch(exit.clone()))));
    let (tx, rx) = mpsc::channel();
    let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    manager.add_subscriber(Arc::new(Mutex::new(Control {
        rx,
        evt: evt.clone(),
        i8042,
        exit: exit.clone(),
        disks,
    })));
    if let Some(input) = console_in {
        let drained = serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .input_drained_evt()
            .try_clone()?;
        log::debug!("console input from fd {}", input.as_raw_fd());
        manager.add_subscriber(Arc::new(Mutex::new(ConsoleInput {
            input,
            serial: serial.clone(),
            drained,
            pending: Vec::new(),
            watching_input: false,
        })));
    }
    Ok(ControlSender { tx, evt })
}

impl VmmThread {
    /// Runs the loop until the VM must stop; then stops the vCPUs, closes every device's
    /// host side (so the console's output reaches EOF) and reports.
    pub fn run(self) -> VmExit {
        let VmmThread {
            mut manager,
            exit,
            vcpus,
            block_threads,
            on_exit,
        } = self;
        while !exit.stopping() {
            if let Err(e) = manager.run() {
                exit.request(VmExit::Crashed(format!("the VMM event loop failed: {e}")));
            }
        }
        let vcpus = vcpus.recv().unwrap_or_default();
        for v in &vcpus {
            v.kick();
        }
        for v in vcpus {
            v.join();
        }
        // Each disk finishes the request in progress; its file is closed after the join.
        block_threads.into_iter().for_each(|t| t.stop());
        drop(manager);
        let reason = exit.reason().unwrap_or(VmExit::Stopped);
        if let Some(cb) = on_exit {
            cb(&reason);
        }
        reason
    }
}
