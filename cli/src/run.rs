//! `kestrel run`: from parsed arguments to a running VM, on the main thread.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Instant;

use devices::disk::overlay::{Overlay, OverlayError};
use devices::disk::raw::RawFile;
use devices::disk::{DiskBackend, DiskError};
use devices::image::vm_disk::{self, ExistingOverlay, ImageDirs, VmDiskError};
use devices::virtio::net::MacAddr;
use vmm::{DiskConfig, NetConfig, TapSource, VmConfig, VsockConfig};

use crate::args::{DiskArg, RunArgs};

/// Errors of `kestrel run` before or while the VM runs.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Asset(#[from] vmm::assets::AssetError),
    #[error("cannot prepare VM image {0}")]
    Image(PathBuf, #[source] VmDiskError),
    #[error("cannot open disk {0}")]
    Disk(PathBuf, #[source] DiskError),
    #[error("cannot open disk {0} with overlay {1}")]
    Overlay(PathBuf, PathBuf, #[source] OverlayError),
    #[error("invalid MAC address {0:?} (expected six hex bytes like 02:00:00:00:00:01)")]
    Mac(String),
    #[error(transparent)]
    Config(#[from] vmm::config::ConfigError),
    #[error(transparent)]
    Vm(#[from] vmm::BuildVmError),
    #[error("bad {}", vmm::seccomp::ENV)]
    Seccomp(#[source] vmm::seccomp::SeccompError),
}

/// Where the CLI keeps converted images: `$KESTREL_STATE_DIR` or `/var/lib/kestrel`, like
/// the shim, so both share one image cache.
fn state_root() -> PathBuf {
    std::env::var_os("KESTREL_STATE_DIR")
        .map_or_else(|| PathBuf::from("/var/lib/kestrel"), PathBuf::from)
}

/// A temporary overlay removed when `kestrel run` ends.
struct TempOverlay(PathBuf);

impl Drop for TempOverlay {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn open_disk(d: &DiskArg) -> Result<Box<dyn DiskBackend>, RunError> {
    Ok(match &d.overlay {
        Some(overlay) => Box::new(
            Overlay::open_or_create(&d.path, overlay)
                .map_err(|e| RunError::Overlay(d.path.clone(), overlay.clone(), e))?,
        ),
        None => Box::new(
            RawFile::open(&d.path, d.read_only).map_err(|e| RunError::Disk(d.path.clone(), e))?,
        ),
    })
}

/// Boots the VM described by `run` and returns the guest's exit status.
pub fn run_vm(run: RunArgs, start: Instant) -> Result<i32, RunError> {
    let kernel = match run.kernel {
        Some(k) => k,
        None => vmm::assets::default_asset(vmm::assets::KERNEL)?,
    };
    let mut config = VmConfig::new(kernel);
    config.start_time = start;
    config.seccomp = match run.seccomp {
        Some(level) => level,
        None => vmm::SeccompLevel::from_env().map_err(RunError::Seccomp)?,
    };
    // The guest's RNG is seeded at boot.
    config.rng = true;
    config.vcpus = run.cpus;
    config.memory_mib = run.memory_mib;
    if let Some(c) = run.cmdline {
        config.cmdline = c;
    }
    config.initrd = match (run.initrd, run.no_initrd || run.image.is_some()) {
        (Some(i), _) => Some(i),
        (None, true) => None,
        (None, false) => Some(vmm::assets::default_asset(vmm::assets::INITRD)?),
    };
    // Before the image conversion, which may take minutes.
    vmm::config::check_host(
        u64::from(config.vcpus),
        config.memory_mib,
        &config.kernel,
        config.initrd.as_deref(),
    )?;

    let mut _temp_overlay = None;
    if let Some(image) = &run.image {
        // A named overlay keeps the guest's writes across runs; the default one is
        // temporary.
        let (overlay_path, existing) = match &image.overlay {
            Some(p) => (p.clone(), ExistingOverlay::Keep),
            None => {
                let p = state_root()
                    .join("overlays/cli")
                    .join(format!("{}.overlay", std::process::id()));
                _temp_overlay = Some(TempOverlay(p.clone()));
                (p, ExistingOverlay::Replace)
            }
        };
        let mut last = None;
        let prepared = vm_disk::prepare(
            &ImageDirs::under(&state_root()),
            &image.path,
            &overlay_path,
            existing,
            &Default::default(),
            &mut |pct| {
                if last != Some(pct) {
                    eprint!("\rkestrel: converting {}: {pct}%", image.path.display());
                    last = Some(pct);
                }
            },
        )
        .map_err(|e| RunError::Image(image.path.clone(), e))?;
        if last.is_some() {
            eprintln!();
        }
        vmm::config::append_cmdline(
            &mut config.cmdline,
            &format!("root={} rw", prepared.root_device),
        );
        config.disks.push(DiskConfig {
            backend: Box::new(prepared.overlay),
            serial: None,
        });
    }
    for d in &run.disks {
        config.disks.push(DiskConfig {
            backend: open_disk(d)?,
            serial: d.serial.clone(),
        });
    }
    for n in run.nets {
        let mac = match n.mac {
            Some(m) => Some(m.parse::<MacAddr>().map_err(|_| RunError::Mac(m))?),
            None => None,
        };
        config.nets.push(NetConfig {
            tap: if n.create {
                TapSource::Create(n.tap)
            } else {
                TapSource::Name(n.tap)
            },
            mac,
            dhcp: None,
        });
    }
    config.vsock = run.vsock.map(|v| VsockConfig {
        cid: v.cid,
        socket: v.socket,
    });
    config.console_in = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .map(std::fs::File::from);
    config.on_boot = Some(Box::new(|elapsed| {
        eprintln!(
            "kestrel: guest boot time {:.1} ms (from kestrel start to the guest's boot-timer write)",
            elapsed.as_secs_f64() * 1000.0
        );
    }));

    let handle = vmm::start_vm(config)?;
    let exit = handle.wait();
    match &exit {
        vmm::VmExit::Exited(0) => {}
        other => eprintln!("kestrel: {other}"),
    }
    Ok(exit.status())
}
