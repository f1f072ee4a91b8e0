//! Builds a VM from a [`VmConfig`] and starts it: memory, kernel and boot structures,
//! legacy devices on the buses, vCPUs, and the VMM thread. Runs on the caller's thread;
//! returns once every thread is running.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use devices::bus::{Bus, BusError};
use devices::irq::{EventFdIrq, IrqLine};
use devices::legacy::i8042::I8042;
use devices::legacy::ioapic::{Ioapic, IOAPIC_MMIO_LEN};
use devices::legacy::platform::{BootTimer, ExitPort};
use devices::legacy::serial::{SerialConsole, SerialError};
use devices::legacy::{self, ExitHook, PlatformExit};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::boot::{self, BootError};
use crate::arch::{cpuid, layout, regs};
use crate::config::{self, ConfigError, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager, DeviceMetrics};
use crate::exit::{ExitState, VmExit};
use crate::seccomp::{Filters, SeccompError, ThreadKind};
use crate::vmm_thread::{self, ControlSender, Manager, VmmThread};
use crate::vstate::vcpu::{self, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// Errors building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildVmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot write the boot page tables")]
    BootTables(#[source] regs::RegsError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error("cannot create the {0} device")]
    Device(&'static str, #[source] std::io::Error),
    #[error("cannot create the serial console")]
    Serial(#[source] SerialError),
    #[error("cannot place a device on the bus")]
    Bus(#[source] BusError),
    #[error("cannot start the VMM thread")]
    VmmThread(#[source] devices::thread::SpawnError<SeccompError>),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// A running VM.
pub struct VmmHandle {
    exited: mpsc::Receiver<VmExit>,
    control: ControlSender,
    metrics: DeviceMetrics,
}

impl VmmHandle {
    /// A sender for [`crate::VmAction`]s (Ctrl-Alt-Del, stop).
    pub fn control(&self) -> ControlSender {
        self.control.clone()
    }

    /// The devices' counters (bytes, packets, requests, errors), in config order.
    pub fn metrics(&self) -> &DeviceMetrics {
        &self.metrics
    }

    /// Blocks until the VM has stopped: its vCPU threads are joined and its devices closed.
    /// The VMM thread then releases the KVM VM and guest memory on its own, so the caller
    /// does not wait for the kernel's VM teardown (under a millisecond with the split
    /// irqchip); a caller that exits right away pays it at exit.
    pub fn wait(self) -> VmExit {
        self.exited
            .recv()
            .unwrap_or_else(|_| VmExit::Crashed("the VMM thread panicked".into()))
    }
}

fn irq_line(vm: &Vm, gsi: u32, what: &'static str) -> Result<Arc<dyn IrqLine>, BuildVmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildVmError::Device(what, e))?;
    vm.register_irqfd(&evt, gsi)?;
    Ok(Arc::new(EventFdIrq::new(evt)))
}

/// Builds the VM described by `config` and starts it.
pub fn start_vm(mut config: VmConfig) -> Result<VmmHandle, BuildVmError> {
    let mem_size = config.memory_mib << 20;
    // Cheap checks before KVM: sizes against the host, paths.
    config::check_host(
        u64::from(config.vcpus),
        config.memory_mib,
        &config.kernel,
        config.initrd.as_deref(),
    )?;
    // Compiled before anything is allocated: a VM is never started unconfined by mistake.
    let filters = Filters::new(config.seccomp)?;
    let vm = Vm::new(&layout::ram_regions(mem_size))?;
    config::validate(
        u64::from(config.vcpus),
        config.memory_mib,
        vm.max_vcpus() as u64,
        u64::MAX,
        &config.kernel,
        config.initrd.as_deref(),
    )?;
    let mem = vm.memory();
    let pvm = cpuid::host_is_kvm_pvm();

    // The boot payload.
    let kernel = boot::load_kernel(mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => {
            let limit = kernel
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|&m| m > 0)
                .map_or(boot::low_ram_end(mem_size), |m| {
                    m.saturating_add(1).min(boot::low_ram_end(mem_size))
                });
            Some(boot::load_initrd(mem, path, kernel.end, limit)?)
        }
        None => None,
    };
    // Legacy devices.
    let exit = Arc::new(ExitState::new().map_err(|e| BuildVmError::Device("exit event", e))?);
    let exit_for_devices = exit.clone();
    let exit_hook: ExitHook = Arc::new(move |e| {
        exit_for_devices.request(match e {
            PlatformExit::Reset => VmExit::Reset,
            PlatformExit::Exit(s) => VmExit::Exited(s),
        })
    });
    let serial = Arc::new(Mutex::new(
        SerialConsole::new(
            irq_line(&vm, legacy::COM1_IRQ, "serial")?,
            config.console_out,
        )
        .map_err(BuildVmError::Serial)?,
    ));
    let i8042 = Arc::new(Mutex::new(I8042::new(
        irq_line(&vm, legacy::I8042_IRQ, "i8042")?,
        exit_hook.clone(),
    )));
    let on_boot = config.on_boot.take().unwrap_or_else(|| {
        Box::new(|elapsed| log::info!("guest booted in {:.1} ms", elapsed.as_secs_f64() * 1000.0))
    });
    let mut pio = Bus::new();
    pio.insert(serial.clone(), legacy::COM1_PORT, 8)
        .map_err(BuildVmError::Bus)?;
    pio.insert(i8042.clone(), legacy::I8042_PORT, legacy::I8042_PORT_LEN)
        .map_err(BuildVmError::Bus)?;
    pio.insert(
        Arc::new(Mutex::new(BootTimer::new(config.start_time, on_boot))),
        legacy::BOOT_TIMER_PORT,
        1,
    )
    .map_err(BuildVmError::Bus)?;
    pio.insert(
        Arc::new(Mutex::new(ExitPort::new(exit_hook))),
        legacy::EXIT_PORT,
        1,
    )
    .map_err(BuildVmError::Bus)?;
    let mut mmio = Bus::new();
    // The MP table gives the IOAPIC the APIC id after the last CPU.
    let ioapic = Ioapic::new(config.vcpus, Box::new(vm.gsi_router()));
    mmio.insert(
        Arc::new(Mutex::new(ioapic)),
        layout::IOAPIC_ADDR,
        IOAPIC_MMIO_LEN,
    )
    .map_err(BuildVmError::Bus)?;
    let mut manager = Manager::new()
        .map_err(|e| BuildVmError::Device("event manager", std::io::Error::other(e.to_string())))?;

    // virtio devices, announced on the kernel command line.
    let mut device_manager = DeviceManager::default();
    for disk in std::mem::take(&mut config.disks) {
        device_manager.add_block(&vm, &mut mmio, disk, &filters)?;
    }
    for net in std::mem::take(&mut config.nets) {
        device_manager.add_net(&vm, &mut mmio, &mut manager, net)?;
    }
    if let Some(vsock) = config.vsock.take() {
        device_manager.add_vsock(&vm, &mut mmio, &mut manager, vsock)?;
    }
    if config.rng {
        device_manager.add_rng(&vm, &mut mmio, &mut manager)?;
    }
    let mut cmdline = config.cmdline.clone();
    for entry in device_manager.cmdline_entries() {
        config::append_cmdline(&mut cmdline, entry);
    }
    if pvm {
        // kvm_pvm ignores CPUID feature masks; tell the guest kernel instead.
        log::debug!(
            "kvm_pvm host: adding `{}` to the kernel command line",
            cpuid::PVM_KERNEL_PARAMS
        );
        config::append_cmdline(&mut cmdline, cpuid::PVM_KERNEL_PARAMS);
    }
    boot::write_cmdline(mem, &cmdline)?;
    boot::write_boot_info(mem, &kernel, cmdline.len(), initrd, mem_size, config.vcpus)?;
    regs::write_boot_tables(mem, kernel.protocol).map_err(BuildVmError::BootTables)?;

    // vCPUs.
    let base_cpuid = vm.supported_cpuid()?;
    let tsc_deadline = vm.has_tsc_deadline_timer();
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let v = vm.create_vcpu(id)?;
        let mut c = base_cpuid.clone();
        cpuid::filter(&mut c, id, config.vcpus, tsc_deadline, pvm);
        let boot = (id == 0).then_some((kernel.entry, kernel.protocol));
        v.configure(&c, boot)?;
        vcpus.push(v);
    }

    // The VMM thread's event sources.
    let control = vmm_thread::add_core_subscribers(
        &mut manager,
        &exit,
        i8042,
        &serial,
        config.console_in.take(),
        device_manager.blocks(),
    )
    .map_err(|e| BuildVmError::Device("control channel", e))?;

    vcpu::install_kick_handler()?;
    // The VMM thread first (confined, before the guest runs), then the vCPUs, whose
    // threads it gets once they all run; if one cannot start, the VMM thread gets none
    // and ends with the exit requested here.
    let (vcpus_tx, vcpus_rx) = mpsc::channel();
    let vmm = VmmThread {
        manager,
        exit: exit.clone(),
        vcpus: vcpus_rx,
        block_threads: device_manager.take_block_threads(),
        on_exit: config.on_exit.take(),
    };
    // The VM (KVM fds, guest memory) lives as long as the VMM thread.
    let (exited_tx, exited) = mpsc::channel();
    let confine = filters.confine(ThreadKind::Vmm, 0);
    devices::thread::spawn_confined(
        thread::Builder::new().name("vmm".into()),
        confine,
        move || {
            let reason = vmm.run();
            let _ = exited_tx.send(reason);
            // After reporting: destroying the KVM VM takes the kernel milliseconds.
            drop(vm);
        },
    )
    .map_err(BuildVmError::VmmThread)?;
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    let mut threads = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        match v.start(pio.clone(), mmio.clone(), exit.clone(), &filters) {
            Ok(t) => threads.push(t),
            Err(e) => {
                exit.request(VmExit::Stopped);
                threads.iter().for_each(|t| t.kick());
                threads.into_iter().for_each(|t| t.join());
                return Err(e.into());
            }
        }
    }
    let _ = vcpus_tx.send(threads);
    Ok(VmmHandle {
        exited,
        control,
        metrics: device_manager.metrics(),
    })
}
