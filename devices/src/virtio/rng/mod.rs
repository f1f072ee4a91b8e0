//! virtio-rng (virtio 1.x, 5.4, "entropy device"): the guest's hardware RNG, fed from the
//! host's `/dev/urandom`. Linux's hw_random core credits what it reads, so the guest's
//! RNG is seeded at boot (`getrandom()` in a container does not block), also where the
//! CPU's RDRAND is hidden (kvm_pvm hosts) and the kernel's jitter fallback would take
//! minutes of emulated code.
//!
//! One request queue; each chain's writable descriptors are filled with random bytes (at
//! most [`MAX_REQUEST_BYTES`] per chain, so a guest cannot make one request cost the VMM
//! thread more than that), read-only descriptors are skipped. No configuration space, no
//! device features beyond VERSION_1.
//!
//! Threads: configuration and activation on **vCPU threads** (through the transport),
//! queue processing on the **VMM thread** ([`crate::virtio::single_queue`]).

use std::fs::File;
use std::io::{self, Read};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::device::{
    ActivateError, ActivationContext, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
};
use crate::virtio::single_queue::{self, SingleQueue};
use crate::virtio::{device_id, features, RateLimitedLog};

#[cfg(test)]
mod tests;

/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 64;
/// The most random bytes one chain gets.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot open /dev/urandom")]
    Source(#[source] io::Error),
    #[error("cannot create an EventFd")]
    EventFd(#[source] io::Error),
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: VirtioInterrupt,
}

/// The entropy device. Share it as `Arc<Mutex<Rng>>` with the transport and the VMM
/// thread's `EventManager`, like every virtio device (see [`crate::virtio`]).
pub struct Rng {
    source: File,
    buf: Vec<u8>,
    queue_max_sizes: [u16; 1],
    queue_evts: [EventFd; 1],
    activate_evt: EventFd,
    queue_evt_registered: bool,
    active: Option<Active>,
    log: RateLimitedLog,
    /// Random bytes handed to the guest so far.
    bytes: u64,
}

impl Rng {
    pub fn new() -> Result<Rng, RngError> {
        let new_evt = || EventFd::new(EFD_NONBLOCK).map_err(RngError::EventFd);
        Ok(Rng {
            source: File::open("/dev/urandom").map_err(RngError::Source)?,
            buf: vec![0; MAX_REQUEST_BYTES as usize],
            queue_max_sizes: [QUEUE_SIZE],
            queue_evts: [new_evt()?],
            activate_evt: new_evt()?,
            queue_evt_registered: false,
            active: None,
            log: RateLimitedLog::default(),
            bytes: 0,
        })
    }

    /// Random bytes given to the guest so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes
    }
}

/// Fills the chain's writable descriptors; returns the bytes written.
fn fill(
    source: &mut File,
    buf: &mut [u8],
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    log: &mut RateLimitedLog,
) -> u32 {
    let mut written: u32 = 0;
    for d in chain {
        if !d.is_write_only() {
            continue;
        }
        let want = d.len().min(MAX_REQUEST_BYTES - written);
        let Some(chunk) = buf.get_mut(..want as usize) else {
            break;
        };
        if chunk.is_empty() {
            break;
        }
        if let Err(e) = source.read_exact(chunk) {
            log.warn(format_args!("virtio-rng: cannot read /dev/urandom: {e}"));
            break;
        }
        if let Err(e) = mem.write_slice(chunk, d.addr()) {
            log.warn(format_args!(
                "virtio-rng: descriptor at {:#x} is not in guest memory: {e}",
                d.addr().0
            ));
            break;
        }
        written += want;
    }
    written
}

impl SingleQueue for Rng {
    const NAME: &'static str = "virtio-rng";

    fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    fn queue_evt(&self) -> &EventFd {
        let [evt] = &self.queue_evts;
        evt
    }

    fn queue_evt_registered(&mut self) -> &mut bool {
        &mut self.queue_evt_registered
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn log(&mut self) -> &mut RateLimitedLog {
        &mut self.log
    }

    fn process_queue(&mut self) {
        let Some(Active {
            mem,
            queue,
            interrupt,
        }) = self.active.as_mut()
        else {
            return;
        };
        let (source, buf, bytes) = (&mut self.source, &mut self.buf, &mut self.bytes);
        single_queue::serve(
            "virtio-rng",
            queue,
            mem,
            interrupt,
            &mut self.log,
            |chain, log| {
                let n = fill(source, buf, mem, chain, log);
                *bytes = bytes.saturating_add(u64::from(n));
                n
            },
        );
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_id::RNG
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

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log.warn(format_args!(
            "virtio-rng: {}-byte config write at {offset:#x} ignored",
            data.len()
        ));
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        let queue = single_queue::activate(self.active.is_some(), ctx.queues, &self.activate_evt)?;
        self.active = Some(Active {
            mem: ctx.mem,
            queue,
            interrupt: ctx.interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        single_queue::init(self, ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        single_queue::process(self, events, ops);
    }
}
