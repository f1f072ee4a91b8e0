//! Places virtio-mmio devices: a 4 KiB MMIO window and an IRQ each, the irqfd and
//! ioeventfds that connect them to KVM, the VMM-thread subscriber that processes their
//! queues, and the `virtio_mmio.device=` entry that tells the guest kernel where they are.
//! Runs on the builder's thread before the vCPUs start.

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::disk::DiskBackend;
use devices::irq::{EventFdIrq, IrqLine};
use devices::virtio::block::{Block, BlockError, BlockMetrics};
use devices::virtio::{
    MmioError, MmioTransport, VirtioDevice, MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET,
};
use event_manager::{MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{IRQ_MAX, VIRTIO_IRQ_START, VIRTIO_MMIO_START};
use crate::vmm_thread::Manager;
use crate::vstate::vm::{Vm, VmError};

/// A disk given to the guest as virtio-blk (`/dev/vda`, `/dev/vdb`… in order).
pub struct DiskConfig {
    pub backend: Box<dyn DiskBackend>,
    /// What VIRTIO_BLK_T_GET_ID returns (at most 20 bytes); shows as
    /// `/sys/block/vdX/serial` and `/dev/disk/by-id/virtio-<serial>` in the guest.
    pub serial: Option<String>,
}

/// Errors attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("too many virtio devices: IRQ lines {VIRTIO_IRQ_START}..={IRQ_MAX} are all taken")]
    NoIrq,
    #[error("cannot create virtio-blk device {index}")]
    Block {
        index: usize,
        #[source]
        source: BlockError,
    },
    #[error("cannot create the virtio-mmio transport")]
    Transport(#[source] MmioError),
    #[error("cannot create an interrupt event")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot place a virtio-mmio window on the bus")]
    Bus(#[source] BusError),
}

/// Allocates MMIO windows and IRQs for virtio devices, in order.
pub struct DeviceManager {
    next_base: u64,
    next_irq: u32,
    cmdline: Vec<String>,
    block_metrics: Vec<Arc<BlockMetrics>>,
}

impl Default for DeviceManager {
    fn default() -> Self {
        DeviceManager {
            next_base: VIRTIO_MMIO_START,
            next_irq: VIRTIO_IRQ_START,
            cmdline: Vec::new(),
            block_metrics: Vec::new(),
        }
    }
}

impl DeviceManager {
    /// Attaches a virtio-blk disk.
    pub fn add_block(
        &mut self,
        vm: &Vm,
        mmio: &mut Bus,
        manager: &mut Manager,
        disk: DiskConfig,
    ) -> Result<(), DeviceError> {
        let index = self.block_metrics.len();
        let block = Block::new(disk.backend, disk.serial.as_deref())
            .map_err(|source| DeviceError::Block { index, source })?;
        self.block_metrics.push(block.metrics());
        let block = Arc::new(Mutex::new(block));
        self.add_virtio(vm, mmio, manager, block.clone(), block)?;
        Ok(())
    }

    /// Wires one virtio device: transport on the bus, irqfd, ioeventfds, subscriber.
    fn add_virtio<D>(
        &mut self,
        vm: &Vm,
        mmio: &mut Bus,
        manager: &mut Manager,
        device: Arc<Mutex<D>>,
        subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>>,
    ) -> Result<(), DeviceError>
    where
        D: VirtioDevice + 'static,
    {
        if self.next_irq > IRQ_MAX {
            return Err(DeviceError::NoIrq);
        }
        let (base, irq) = (self.next_base, self.next_irq);
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&irq_evt, irq)?;
        let line: Arc<dyn IrqLine> = Arc::new(EventFdIrq::new(irq_evt));
        let transport = MmioTransport::new(vm.memory().clone(), device, line)
            .map_err(DeviceError::Transport)?;
        for (i, evt) in transport.queue_events().iter().enumerate() {
            vm.register_mmio_doorbell(evt, base + NOTIFY_REG_OFFSET, i as u32)?;
        }
        mmio.insert(Arc::new(Mutex::new(transport)), base, MMIO_WINDOW_SIZE)
            .map_err(DeviceError::Bus)?;
        manager.add_subscriber(subscriber);
        self.cmdline
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        self.next_base += MMIO_WINDOW_SIZE;
        self.next_irq += 1;
        Ok(())
    }

    /// The kernel command-line entries announcing every device placed so far.
    pub fn cmdline_entries(&self) -> &[String] {
        &self.cmdline
    }

    /// Counters of each virtio-blk disk, in attach order.
    pub fn block_metrics(&self) -> &[Arc<BlockMetrics>] {
        &self.block_metrics
    }
}
