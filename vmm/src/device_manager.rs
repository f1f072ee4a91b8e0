//! Places virtio-mmio devices: a 4 KiB MMIO window and an IRQ each, the irqfd and
//! ioeventfds that connect them to KVM, the subscriber that processes their queues (on
//! the VMM thread; each disk on a device thread of its own, so a slow disk stalls no
//! other device), and the `virtio_mmio.device=` entry that tells the guest kernel where
//! they are. Runs on the builder's thread before the vCPUs start.

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::disk::DiskBackend;
use devices::irq::{EventFdIrq, IrqLine};
use devices::virtio::block::{Block, BlockError, BlockMetrics};
use devices::virtio::net::{
    DhcpBackend, DhcpConfig, MacAddr, Net, NetBackend, NetError, NetMetrics, Tap, TapError,
};
use devices::virtio::rng::{Rng, RngError};
use devices::virtio::vsock::{Vsock, VsockError, VsockMetrics};
use devices::virtio::worker::DeviceThread;
use devices::virtio::{
    MmioError, MmioTransport, VirtioDevice, MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET,
};
use event_manager::SubscriberOps;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{IRQ_MAX, VIRTIO_IRQ_START, VIRTIO_MMIO_START};
use crate::seccomp::{Filters, ThreadKind};
use crate::vmm_thread::Manager;
use crate::vstate::vm::{Vm, VmError};

/// A disk given to the guest as virtio-blk (`/dev/vda`, `/dev/vdb`… in order).
pub struct DiskConfig {
    pub backend: Box<dyn DiskBackend>,
    /// What VIRTIO_BLK_T_GET_ID returns (at most 20 bytes); shows as
    /// `/sys/block/vdX/serial` and `/dev/disk/by-id/virtio-<serial>` in the guest.
    pub serial: Option<String>,
}

/// Which tap device backs a virtio-net device.
pub enum TapSource {
    /// An existing tap interface, by name (in this thread's network namespace).
    Name(String),
    /// A new tap interface, created for this VM and deleted by the kernel when the VM is
    /// gone (needs CAP_NET_ADMIN; the caller configures its address and links).
    Create(String),
    /// A tap fd opened by the caller (e.g. inside a pod's network namespace).
    Fd(std::os::fd::OwnedFd),
}

/// A network interface given to the guest as virtio-net (`eth0`, `eth1`… in order).
pub struct NetConfig {
    pub tap: TapSource,
    /// The guest's MAC address (default: chosen by the guest driver).
    pub mac: Option<MacAddr>,
    /// Answer the guest's DHCP requests in the device with this configuration (a VM image
    /// on a pod network); they never reach the tap.
    pub dhcp: Option<DhcpConfig>,
}

/// The guest's vsock device, in Firecracker's hybrid model: host clients connect to
/// `socket` and write `CONNECT <port>\n`; guest connections to host port P reach a listener
/// at `<socket>_P`.
pub struct VsockConfig {
    pub cid: u64,
    pub socket: std::path::PathBuf,
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
    #[error("cannot open the tap device of network interface {index}")]
    Tap {
        index: usize,
        #[source]
        source: TapError,
    },
    #[error("cannot create virtio-net device {index}")]
    Net {
        index: usize,
        #[source]
        source: NetError,
    },
    #[error("cannot create the vsock device")]
    Vsock(#[source] VsockError),
    #[error("cannot create the virtio-rng device")]
    Rng(#[source] RngError),
    #[error("cannot create the virtio-mmio transport")]
    Transport(#[source] MmioError),
    #[error("cannot create an interrupt event")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the thread of virtio-blk device {index}")]
    BlockThread {
        index: usize,
        #[source]
        source: devices::thread::SpawnError<std::io::Error>,
    },
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
    blocks: Vec<Arc<Mutex<Block>>>,
    /// The disks' device threads, stopped and joined when dropped.
    block_threads: Vec<DeviceThread>,
    net_metrics: Vec<Arc<NetMetrics>>,
    vsock_metrics: Option<Arc<VsockMetrics>>,
}

impl Default for DeviceManager {
    fn default() -> Self {
        DeviceManager {
            next_base: VIRTIO_MMIO_START,
            next_irq: VIRTIO_IRQ_START,
            cmdline: Vec::new(),
            block_metrics: Vec::new(),
            blocks: Vec::new(),
            block_threads: Vec::new(),
            net_metrics: Vec::new(),
            vsock_metrics: None,
        }
    }
}

impl DeviceManager {
    /// Attaches a virtio-blk disk, served on a thread of its own (`kestrel-blk<index>`).
    pub fn add_block(
        &mut self,
        vm: &Vm,
        mmio: &mut Bus,
        disk: DiskConfig,
        filters: &Filters,
    ) -> Result<(), DeviceError> {
        let index = self.block_metrics.len();
        let block = Block::new(disk.backend, disk.serial.as_deref())
            .map_err(|source| DeviceError::Block { index, source })?;
        self.block_metrics.push(block.metrics());
        let block = Arc::new(Mutex::new(block));
        self.blocks.push(block.clone());
        self.add_virtio(vm, mmio, block.clone())?;
        let confine = filters.confine(ThreadKind::Device, index as u16);
        let thread = DeviceThread::spawn(format!("kestrel-blk{index}"), block, move || {
            confine().map_err(std::io::Error::other)
        })
        .map_err(|source| DeviceError::BlockThread { index, source })?;
        self.block_threads.push(thread);
        Ok(())
    }

    /// The disks' device threads, for the VMM thread to stop once the vCPUs are gone.
    pub fn take_block_threads(&mut self) -> Vec<DeviceThread> {
        std::mem::take(&mut self.block_threads)
    }

    /// The virtio-blk devices, in order (for [`crate::VmAction::ReplaceDisk`]).
    pub fn blocks(&self) -> Vec<Arc<Mutex<Block>>> {
        self.blocks.clone()
    }

    /// Attaches a virtio-net interface over a tap.
    pub fn add_net(
        &mut self,
        vm: &Vm,
        mmio: &mut Bus,
        manager: &mut Manager,
        net: NetConfig,
    ) -> Result<(), DeviceError> {
        let index = self.net_metrics.len();
        let tap = match net.tap {
            TapSource::Name(name) => Tap::open(&name),
            TapSource::Create(name) => Tap::create(&name),
            TapSource::Fd(fd) => Tap::from_fd(fd),
        }
        .map_err(|source| DeviceError::Tap { index, source })?;
        let backend: Box<dyn NetBackend> = match net.dhcp {
            Some(config) => Box::new(DhcpBackend::new(Box::new(tap), config)),
            None => Box::new(tap),
        };
        let device =
            Net::new(backend, net.mac).map_err(|source| DeviceError::Net { index, source })?;
        self.net_metrics.push(device.metrics());
        let device = Arc::new(Mutex::new(device));
        self.add_virtio(vm, mmio, device.clone())?;
        manager.add_subscriber(device);
        Ok(())
    }

    /// Attaches the vsock device (one per VM).
    pub fn add_vsock(
        &mut self,
        vm: &Vm,
        mmio: &mut Bus,
        manager: &mut Manager,
        cfg: VsockConfig,
    ) -> Result<(), DeviceError> {
        let device = Vsock::new(cfg.cid, &cfg.socket).map_err(DeviceError::Vsock)?;
        self.vsock_metrics = Some(device.metrics());
        let device = Arc::new(Mutex::new(device));
        self.add_virtio(vm, mmio, device.clone())?;
        manager.add_subscriber(device);
        Ok(())
    }

    /// Attaches the entropy device (virtio-rng over the host's /dev/urandom).
    pub fn add_rng(
        &mut self,
        vm: &Vm,
        mmio: &mut Bus,
        manager: &mut Manager,
    ) -> Result<(), DeviceError> {
        let device = Arc::new(Mutex::new(Rng::new().map_err(DeviceError::Rng)?));
        self.add_virtio(vm, mmio, device.clone())?;
        manager.add_subscriber(device);
        Ok(())
    }

    /// Wires one virtio device: transport on the bus, irqfd, ioeventfds armed at the
    /// driver's DRIVER_OK (the caller puts its subscriber on an event loop).
    fn add_virtio<D>(
        &mut self,
        vm: &Vm,
        mmio: &mut Bus,
        device: Arc<Mutex<D>>,
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
        let mut transport = MmioTransport::new(vm.memory().clone(), device, line)
            .map_err(DeviceError::Transport)?;
        transport.arm_doorbells_at_driver_ok(vm.mmio_doorbells(base + NOTIFY_REG_OFFSET));
        mmio.insert(Arc::new(Mutex::new(transport)), base, MMIO_WINDOW_SIZE)
            .map_err(DeviceError::Bus)?;
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

    /// The counters of every device placed so far.
    pub fn metrics(&self) -> DeviceMetrics {
        DeviceMetrics {
            block: self.block_metrics.clone(),
            net: self.net_metrics.clone(),
            vsock: self.vsock_metrics.clone(),
        }
    }
}

/// Per-device counters, readable at any time without taking device locks.
#[derive(Clone, Default)]
pub struct DeviceMetrics {
    /// virtio-blk disks, in attach order.
    pub block: Vec<Arc<BlockMetrics>>,
    /// virtio-net interfaces, in attach order.
    pub net: Vec<Arc<NetMetrics>>,
    pub vsock: Option<Arc<VsockMetrics>>,
}
