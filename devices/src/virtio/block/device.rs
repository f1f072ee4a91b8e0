//! The virtio-blk device.
//!
//! Two threads touch it, always under its mutex:
//! - **vCPU threads**, through the transport: configuration-space reads, `activate`
//!   (stores memory, queue and interrupt, then writes `activate_evt`) and `reset`;
//! - **its device thread** ([`crate::virtio::worker`]), through its event subscriber
//!   ([`super::event_handler`]): queue processing, which parses each chain ([`super::request::parse`]), runs it against the
//!   disk and completes it, with event-idx notification suppression.
//!
//! A malformed request fails alone (status IOERR or UNSUPP when it has a writable status
//! byte, otherwise it is returned with used length 0); the device keeps running.

use std::io;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemoryError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::{BlockMetrics, Counter};
use super::request::{self, Range, RequestKind, RequestLimits, Segment, SECTOR_SIZE};
use crate::disk::{DiskBackend, DiskError, IoBufs};
use crate::virtio::device::{
    read_config_space, ActivateError, ActivationContext, GuestMemoryMmap, VirtioDevice,
    VirtioInterrupt,
};
use crate::virtio::{device_id, features, single_queue, RateLimitedLog};

/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Maximum length of the serial number GET_ID returns (VIRTIO_BLK_ID_BYTES).
pub const SERIAL_LEN: usize = 20;

/// Data descriptors per request: the queue minus header and status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Per-segment limit of discard and write-zeroes, in sectors (2 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
const MAX_DISCARD_SEG: u32 = 32;
/// Discard granularity hint, in sectors (4 KiB, so holes can be punched).
const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// Length of the configuration space we expose (through `write_zeroes_may_unmap`+padding).
const CONFIG_LEN: usize = 60;

/// Errors of the block device: building it, and running a request against the disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("serial number of {len} bytes is longer than 20")]
    SerialTooLong { len: usize },
    #[error("cannot create an EventFd")]
    EventFd(#[source] io::Error),
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("disk I/O failed")]
    Disk(#[source] DiskError),
    #[error("guest memory access failed")]
    GuestMemory(#[source] GuestMemoryError),
    #[error("request offset overflows")]
    Overflow,
}

/// What `activate` handed over.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: VirtioInterrupt,
}

/// Request execution state, apart from the queue so both can be borrowed at once.
struct Io {
    disk: Box<dyn DiskBackend>,
    read_only: bool,
    serial: [u8; SERIAL_LEN],
    limits: RequestLimits,
    metrics: Arc<BlockMetrics>,
}

/// A virtio-blk device. Share it as `Arc<Mutex<Block>>` with the transport and the VMM
/// thread's `EventManager` (see [`crate::virtio`] for the wiring).
pub struct Block {
    io: Io,
    log: RateLimitedLog,
    features: u64,
    config: [u8; CONFIG_LEN],
    queue_max_sizes: [u16; 1],
    queue_evts: [EventFd; 1],
    pub(super) activate_evt: EventFd,
    active: Option<Active>,
    /// Whether the subscriber has put the queue EventFd into the event loop.
    pub(super) queue_evt_registered: bool,
}

impl Block {
    /// A device over `disk`. `serial` (at most 20 bytes) is what GET_ID returns.
    pub fn new(disk: Box<dyn DiskBackend>, serial: Option<&str>) -> Result<Block, BlockError> {
        let serial_bytes = serial_bytes(serial)?;
        let size = disk.size();
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "virtio-blk: disk size {size} is not a multiple of 512; the tail is not visible"
            );
        }
        let capacity = size / SECTOR_SIZE;
        let read_only = disk.read_only();

        let mut features = features::VERSION_1
            | features::RING_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }

        let limits = RequestLimits {
            capacity,
            max_data_descriptors: SEG_MAX as usize,
            max_discard_segments: MAX_DISCARD_SEG,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_segments: MAX_DISCARD_SEG,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
        };
        let new_evt = || EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd);
        Ok(Block {
            io: Io {
                disk,
                read_only,
                serial: serial_bytes,
                limits,
                metrics: Arc::default(),
            },
            log: RateLimitedLog::default(),
            features,
            config: config_space(&limits),
            queue_max_sizes: [QUEUE_SIZE],
            queue_evts: [new_evt()?],
            activate_evt: new_evt()?,
            active: None,
            queue_evt_registered: false,
        })
    }

    /// Puts `disk` (seen as `serial`) behind the device in place of the current disk, and
    /// tells an active guest that the capacity changed (a config-change interrupt): how a
    /// container joins a running pod VM, whose placeholder disks (an [`EmptyDisk`]) are
    /// attached at boot because virtio-mmio has no hotplug. The features stay those the
    /// guest negotiated: a read-only disk behind a writable slot refuses writes with IOERR.
    /// Runs on the VMM thread, between requests (it waits for the one in progress).
    ///
    /// [`EmptyDisk`]: crate::disk::EmptyDisk
    pub fn replace_disk(
        &mut self,
        disk: Box<dyn DiskBackend>,
        serial: Option<&str>,
    ) -> Result<(), BlockError> {
        let serial = serial_bytes(serial)?;
        self.io.limits.capacity = disk.size() / SECTOR_SIZE;
        self.io.read_only = disk.read_only() || self.features & (1 << VIRTIO_BLK_F_RO) != 0;
        self.io.disk = disk;
        self.io.serial = serial;
        self.config = config_space(&self.io.limits);
        if let Some(active) = &self.active {
            if let Err(e) = active.interrupt.signal_config_change() {
                self.log
                    .warn(format_args!("virtio-blk: cannot signal a new disk: {e}"));
            }
        }
        Ok(())
    }

    /// The device's counters (shared; read them without locking the device).
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.io.metrics.clone()
    }

    /// The queue's EventFd (the one the subscriber watches).
    pub(super) fn queue_evt(&self) -> &EventFd {
        let [evt] = &self.queue_evts;
        evt
    }

    pub(super) fn log(&mut self) -> &mut RateLimitedLog {
        &mut self.log
    }

    /// Serves every available request (see [`single_queue::serve`]).
    pub(super) fn process_queue(&mut self) {
        let Some(Active {
            mem,
            queue,
            interrupt,
        }) = self.active.as_mut()
        else {
            return;
        };
        let io = &mut self.io;
        single_queue::serve(
            "virtio-blk",
            queue,
            mem,
            interrupt,
            &mut self.log,
            |chain, log| io.handle(mem, chain, log),
        );
    }
}

impl Io {
    /// Runs one chain; returns the used length (bytes written into the guest).
    fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        log: &mut RateLimitedLog,
    ) -> u32 {
        self.metrics.add(Counter::Requests, 1);
        let head = chain.head_index();
        let request = match request::parse(chain, &self.limits) {
            Ok(r) => r,
            Err(rejected) => {
                self.metrics.add(Counter::InvalidRequests, 1);
                log.warn(format_args!(
                    "virtio-blk: request {head} refused: {}",
                    rejected.error
                ));
                return match rejected.status {
                    Some(addr) if mem.write_obj(rejected.error.status(), addr).is_ok() => 1,
                    _ => 0,
                };
            }
        };
        let (status, written) = match self.execute(mem, &request.kind) {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(e) => {
                self.metrics.add(Counter::IoErrors, 1);
                let cause = std::error::Error::source(&e)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default();
                log.warn(format_args!(
                    "virtio-blk: request {head} failed: {e}{cause}"
                ));
                (VIRTIO_BLK_S_IOERR as u8, 0)
            }
        };
        match mem.write_obj(status, request.status) {
            Ok(()) => written.saturating_add(1),
            Err(e) => {
                log.warn(format_args!(
                    "virtio-blk: cannot write status of {head}: {e}"
                ));
                written
            }
        }
    }

    /// Executes a parsed request; returns the bytes written into guest buffers.
    fn execute(&mut self, mem: &GuestMemoryMmap, kind: &RequestKind) -> Result<u32, BlockError> {
        let refuse_ro = |ro: bool| {
            if ro {
                Err(BlockError::ReadOnly)
            } else {
                Ok(())
            }
        };
        match kind {
            RequestKind::In { offset, data } => {
                self.metrics.add(Counter::Reads, 1);
                let n = self.transfer(mem, *offset, data, Direction::ToGuest)?;
                self.metrics.add(Counter::ReadBytes, u64::from(n));
                Ok(n)
            }
            RequestKind::Out { offset, data } => {
                self.metrics.add(Counter::Writes, 1);
                refuse_ro(self.read_only)?;
                let n = self.transfer(mem, *offset, data, Direction::ToDisk)?;
                self.metrics.add(Counter::WriteBytes, u64::from(n));
                Ok(0)
            }
            RequestKind::Flush => {
                self.metrics.add(Counter::Flushes, 1);
                self.disk.flush().map_err(BlockError::Disk)?;
                Ok(0)
            }
            RequestKind::GetId { data } => {
                self.metrics.add(Counter::GetIds, 1);
                self.write_serial(mem, data)
            }
            RequestKind::Discard(ranges) => {
                self.metrics.add(Counter::Discards, 1);
                refuse_ro(self.read_only)?;
                for r in ranges {
                    self.disk
                        .discard(r.offset, r.len)
                        .map_err(BlockError::Disk)?;
                }
                Ok(0)
            }
            RequestKind::WriteZeroes(ranges) => {
                self.metrics.add(Counter::WriteZeroes, 1);
                refuse_ro(self.read_only)?;
                for &Range { offset, len, .. } in ranges {
                    self.disk
                        .write_zeroes(offset, len)
                        .map_err(BlockError::Disk)?;
                }
                Ok(0)
            }
        }
    }

    /// Moves data between the disk at `offset` and the guest buffers: the kernel reads or
    /// writes guest memory directly (vectored I/O), nothing is copied here.
    fn transfer(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        data: &[Segment],
        dir: Direction,
    ) -> Result<u32, BlockError> {
        let bufs = IoBufs::from_guest(mem, data.iter().map(|s| (s.addr, s.len)))
            .map_err(BlockError::GuestMemory)?;
        match dir {
            Direction::ToGuest => self.disk.read_vectored_at(offset, &bufs),
            Direction::ToDisk => self.disk.write_vectored_at(offset, &bufs),
        }
        .map_err(BlockError::Disk)?;
        // The parser bounds a request's data by the disk size, and the disk by u64.
        u32::try_from(bufs.len()).map_err(|_| BlockError::Overflow)
    }

    /// GET_ID: the serial, zero-padded to 20 bytes, truncated to the guest's buffers.
    fn write_serial(&mut self, mem: &GuestMemoryMmap, data: &[Segment]) -> Result<u32, BlockError> {
        let mut remaining: &[u8] = &self.serial;
        let mut written = 0u32;
        for seg in data {
            if remaining.is_empty() {
                break;
            }
            let n = remaining.len().min(seg.len as usize);
            let (chunk, rest) = remaining.split_at(n);
            mem.write_slice(chunk, seg.addr)
                .map_err(BlockError::GuestMemory)?;
            written = written.saturating_add(n as u32);
            remaining = rest;
        }
        Ok(written)
    }
}

#[derive(Clone, Copy)]
enum Direction {
    ToGuest,
    ToDisk,
}

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` (virtio 1.x, 5.2.4).
/// GET_ID's answer: `serial`, zero-padded to 20 bytes.
fn serial_bytes(serial: Option<&str>) -> Result<[u8; SERIAL_LEN], BlockError> {
    let mut bytes = [0u8; SERIAL_LEN];
    if let Some(s) = serial {
        let dst = bytes
            .get_mut(..s.len())
            .ok_or(BlockError::SerialTooLong { len: s.len() })?;
        dst.copy_from_slice(s.as_bytes());
    }
    Ok(bytes)
}

fn config_space(limits: &RequestLimits) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let fields: [(usize, &[u8]); 8] = [
        (0, &limits.capacity.to_le_bytes()),
        (12, &SEG_MAX.to_le_bytes()),
        (20, &(SECTOR_SIZE as u32).to_le_bytes()),
        (36, &limits.max_discard_sectors.to_le_bytes()),
        (40, &limits.max_discard_segments.to_le_bytes()),
        (44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes()),
        (48, &limits.max_write_zeroes_sectors.to_le_bytes()),
        (52, &limits.max_write_zeroes_segments.to_le_bytes()),
    ];
    for (at, bytes) in fields {
        if let Some(dst) = c.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }
    // write_zeroes_may_unmap: the backend may punch holes for zeroed ranges.
    if let Some(b) = c.get_mut(56) {
        *b = 1;
    }
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_id::BLOCK
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
        // Nothing in our configuration space is writable (no CONFIG_WCE).
        self.log.warn(format_args!(
            "virtio-blk: {}-byte config write at {offset:#x} ignored",
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
