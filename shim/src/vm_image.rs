//! VM images shipped as OCI images (KubeVirt's *containerDisk* layout): the disk at
//! `/disk/*.qcow2` (or `.raw`/`.img`) inside the container's rootfs is converted once to a
//! raw base in the image cache (keyed by its content digest) and each task gets its own
//! copy-on-write overlay over that base.
//!
//! [`prepare_task`] runs on tokio's blocking pool during Create (conversion may take
//! seconds); a [`VmImageTask`] then starts, signals and awaits the VM from the shim's
//! runtime, reaching the VMM thread only through its non-blocking control channel.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use containerd_shim::protos::ttrpc::Code;
use devices::disk::raw::RawFile;
use devices::image::convert::Limits;
use devices::image::file_kind;
use devices::image::vm_disk::{self, ExistingOverlay, ImageDirs, PreparedDisk, VmDiskError};
use tokio::sync::{oneshot, watch};
use vmm::{ControlSender, DiskConfig, VmAction, VmConfig, VmExit};

use crate::console::{self, ConsoleWriter};
use crate::guest::{GuestError, NewContainer};
use crate::spec::{self, VmSpec};

/// The directory of a containerDisk image that holds the disk.
pub const DISK_DIR: &str = "disk";
/// Disk file extensions kestrel boots, in order of preference.
pub const DISK_EXTENSIONS: [&str; 3] = ["qcow2", "raw", "img"];

/// Where kestrel keeps converted bases and per-task overlays.
#[derive(Debug, Clone)]
pub struct StateDirs {
    pub images: PathBuf,
    pub overlays: PathBuf,
    pub digests: PathBuf,
}

impl StateDirs {
    /// Under `root` (default `/var/lib/kestrel`, or `$KESTREL_STATE_DIR`).
    pub fn new(root: &Path) -> Self {
        StateDirs {
            images: root.join("images"),
            overlays: root.join("overlays"),
            digests: root.join("digests"),
        }
    }

    pub fn from_env() -> Self {
        let root = std::env::var_os("KESTREL_STATE_DIR")
            .map_or_else(|| PathBuf::from("/var/lib/kestrel"), PathBuf::from);
        StateDirs::new(&root)
    }

    pub fn image_dirs(&self) -> ImageDirs {
        ImageDirs {
            images: self.images.clone(),
            digests: self.digests.clone(),
        }
    }

    /// The overlay of task `id` in containerd namespace `ns`.
    pub fn overlay_path(&self, ns: &str, id: &str) -> PathBuf {
        self.overlays.join(ns).join(format!("{id}.overlay"))
    }
}

/// Errors preparing a VM image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image has no /{DISK_DIR}/*.qcow2, *.raw or *.img (the containerDisk layout kestrel boots)")]
    NoDisk,
    #[error("the image has several disks in /{DISK_DIR} ({0}); kestrel boots exactly one")]
    SeveralDisks(String),
    #[error("the image's /{DISK_DIR} is a {0}, not a directory (the containerDisk layout)")]
    DiskDirNotADirectory(&'static str),
    #[error("the image's /{DISK_DIR}/{name} is a {kind}, not a regular disk image file")]
    NotAFile { name: String, kind: &'static str },
    #[error(
        "the image's /{DISK_DIR}/{name} is a {format} disk; kestrel boots QCOW2 and raw disks \
         (*.qcow2, *.raw, *.img): convert it with `qemu-img convert -O qcow2`"
    )]
    UnsupportedFormat { name: String, format: &'static str },
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("cannot prepare the VM disk")]
    Disk(#[source] VmDiskError),
}

impl ImageError {
    /// True when the image itself is at fault (containerd gets FailedPrecondition).
    pub fn is_user_error(&self) -> bool {
        match self {
            ImageError::NoDisk
            | ImageError::SeveralDisks(_)
            | ImageError::DiskDirNotADirectory(_)
            | ImageError::NotAFile { .. }
            | ImageError::UnsupportedFormat { .. } => true,
            ImageError::Disk(d) => d.is_user_error(),
            ImageError::Read(..) => false,
        }
    }

    /// The gRPC code containerd gets: the image's fault is FAILED_PRECONDITION, a
    /// conversion past its deadline DEADLINE_EXCEEDED, one cancelled CANCELLED, no room
    /// RESOURCE_EXHAUSTED, anything else INTERNAL.
    pub fn code(&self) -> Code {
        use devices::image::cache::CacheError;
        use devices::image::convert::ConvertError;
        if let ImageError::Disk(VmDiskError::Cache(CacheError::Convert { source, .. })) = self {
            match source {
                ConvertError::TimedOut(_) => return Code::DEADLINE_EXCEEDED,
                ConvertError::Cancelled => return Code::CANCELLED,
                ConvertError::NoSpace { .. } => return Code::RESOURCE_EXHAUSTED,
                _ => {}
            }
        }
        if self.is_user_error() {
            Code::FAILED_PRECONDITION
        } else {
            Code::INTERNAL
        }
    }
}

/// Disk formats kestrel does not boot, by file extension, with their names.
const OTHER_DISK_FORMATS: [(&str, &str); 7] = [
    ("vmdk", "VMDK"),
    ("vdi", "VDI"),
    ("vhd", "VHD"),
    ("vhdx", "VHDX"),
    ("qed", "QED"),
    ("qcow", "QCOW version 1"),
    ("iso", "ISO 9660 (CD-ROM)"),
];

/// Finds the one disk of a containerDisk rootfs. Symbolic links are never followed: an
/// image's `/disk` or `/disk/x.qcow2` pointing at `/etc/shadow` or `/dev/sda` would
/// otherwise resolve on the host, not in the image.
pub fn find_disk(rootfs: &Path) -> Result<PathBuf, ImageError> {
    let dir = rootfs.join(DISK_DIR);
    match fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(m) => return Err(ImageError::DiskDirNotADirectory(file_kind(m.file_type()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ImageError::NoDisk),
        Err(e) => return Err(ImageError::Read(dir, e)),
    }
    let entries = fs::read_dir(&dir).map_err(|e| ImageError::Read(dir.clone(), e))?;
    let mut disks: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::Read(dir.clone(), e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if let Some((_, format)) = OTHER_DISK_FORMATS.iter().find(|(e, _)| *e == ext) {
            return Err(ImageError::UnsupportedFormat { name, format });
        }
        if !DISK_EXTENSIONS.contains(&ext.as_str()) {
            continue;
        }
        let t = entry
            .file_type()
            .map_err(|e| ImageError::Read(path.clone(), e))?;
        if !t.is_file() {
            return Err(ImageError::NotAFile {
                name,
                kind: file_kind(t),
            });
        }
        disks.push(path);
    }
    disks.sort();
    match disks.len() {
        0 => Err(ImageError::NoDisk),
        1 => Ok(disks.remove(0)),
        _ => Err(ImageError::SeveralDisks(
            disks
                .iter()
                .filter_map(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

/// How long an image conversion may take: `$KESTREL_CONVERT_TIMEOUT` seconds, default
/// [`DEFAULT_CONVERT_TIMEOUT`]. The conversion holds the image cache's lock for its
/// digest, so a hostile image must not keep it forever.
pub fn convert_timeout() -> Duration {
    std::env::var("KESTREL_CONVERT_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_CONVERT_TIMEOUT, Duration::from_secs)
}

/// 30 minutes: a 100 GiB image at 100 MB/s takes 17.
pub const DEFAULT_CONVERT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Prepares the disk of task `id` in namespace `ns` (see [`vm_disk::prepare`]).
pub fn prepare(
    dirs: &StateDirs,
    disk: &Path,
    ns: &str,
    id: &str,
    limits: &Limits,
) -> Result<PreparedDisk, ImageError> {
    let mut last = 0;
    vm_disk::prepare(
        &dirs.image_dirs(),
        disk,
        &dirs.overlay_path(ns, id),
        ExistingOverlay::Replace,
        limits,
        &mut |pct| {
            if pct >= last + 10 || (pct == 100 && last != 100) {
                log::info!("converting {}: {pct}%", disk.display());
                last = pct;
            }
        },
    )
    .map_err(ImageError::Disk)
}

/// The guest kernel's command line for a VM image booted from its first disk.
pub fn kernel_cmdline(vm: &VmSpec, root_device: &str) -> String {
    let root = vm.root.as_deref().unwrap_or(root_device);
    let mut c = format!("{} root={root} rw", vmm::DEFAULT_CMDLINE);
    if let Some(extra) = vm
        .extra_cmdline
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        vmm::config::append_cmdline(&mut c, extra);
    }
    c
}

fn host_err(
    what: impl Into<String>,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> GuestError {
    let what = what.into();
    move |source| GuestError::Host {
        what,
        code: Code::INTERNAL,
        source,
    }
}

/// A VM-image container: its process is the VM.
pub struct VmImageTask {
    grace: Duration,
    /// Guest RAM, the limit of the task's statistics.
    pub memory_bytes: u64,
    pending: Mutex<Option<(Box<VmConfig>, ConsoleWriter)>>,
    control: Mutex<Option<ControlSender>>,
    exit: watch::Sender<Option<u32>>,
}

/// What a VM image that is a pod's VM gets in its seed beyond its own spec.
#[derive(Debug, Clone, Default)]
pub struct PodSeed {
    /// The pod's hostname.
    pub hostname: String,
    /// cloud-init `network-config` for the pod network.
    pub network_config: Option<String>,
    /// More user data (the pod's volumes as `write_files`).
    pub user_data: Option<String>,
}

/// Prepares the VM of container `c`, whose image files are at `rootfs` and hold `disk`:
/// the base and overlay, the cloud-init seed (the spec's environment reaches
/// `/etc/cloud/environment`; a pod's network and volumes, `pod`), the console on
/// containerd's FIFOs. Blocking.
pub fn prepare_task(
    dirs: &StateDirs,
    ns: &str,
    c: &NewContainer,
    disk: &Path,
    pod: Option<&PodSeed>,
    limits: &Limits,
) -> Result<VmImageTask, GuestError> {
    let vm = spec::vm_spec(&c.spec, &c.id)
        .map_err(|e| GuestError::host("size the VM from the spec", Code::INVALID_ARGUMENT, e))?;
    // Before the conversion, which may take minutes.
    let kernel = vmm::assets::default_asset(vmm::assets::KERNEL)
        .map_err(|e| GuestError::host("find the guest kernel", Code::FAILED_PRECONDITION, e))?;
    vmm::config::check_host(u64::from(vm.cpus), vm.memory_mib, &kernel, None)
        .map_err(|e| GuestError::host("size the VM", Code::INVALID_ARGUMENT, e))?;
    let seccomp = crate::host::seccomp_level()?;
    let prepared = prepare(dirs, disk, ns, &c.id, limits)
        .map_err(|e| GuestError::host("prepare the VM image", e.code(), e))?;

    // The cloud-init NoCloud seed: the environment reaches /etc/cloud/environment.
    let seed_path = Path::new(&c.bundle).join("cidata.img");
    let seed = kestrel_seed::Seed {
        instance_id: c.id.clone(),
        hostname: pod
            .map(|p| p.hostname.clone())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| vm.hostname.clone()),
        env: vm.env.clone(),
        extra_user_data: pod.and_then(|p| p.user_data.clone()),
        network_config: pod.and_then(|p| p.network_config.clone()),
    };
    kestrel_seed::write_seed_image(&seed, &seed_path).map_err(|e| {
        let code = match e {
            kestrel_seed::SeedError::Io { .. } => Code::INTERNAL,
            _ => Code::INVALID_ARGUMENT,
        };
        GuestError::host(
            "write the cloud-init seed (the environment for the VM)",
            code,
            e,
        )
    })?;
    let seed_disk = RawFile::open(&seed_path, true).map_err(|e| {
        host_err(format!("open the cloud-init seed {}", seed_path.display()))(Box::new(e))
    })?;
    let (sink, writer) = console::start(&c.stdio.stdout, &c.stdio.stderr)
        .map_err(|e| host_err("start the console writer")(Box::new(e)))?;
    let console_in = console::open_stdin(&c.stdio.stdin)
        .map_err(|e| host_err(format!("open stdin {}", c.stdio.stdin))(Box::new(e)))?;

    let mut config = VmConfig::new(kernel);
    config.seccomp = seccomp;
    config.rng = true;
    config.initrd = None;
    config.cmdline = kernel_cmdline(&vm, &prepared.root_device);
    config.vcpus = vm.cpus;
    config.memory_mib = vm.memory_mib;
    config.disks.push(DiskConfig {
        backend: Box::new(prepared.overlay),
        serial: Some("kestrel-root".into()),
    });
    config.disks.push(DiskConfig {
        backend: Box::new(seed_disk),
        serial: Some("cidata".into()),
    });
    config.console_out = Box::new(sink);
    config.console_in = console_in;
    log::info!(
        "task {}: VM image, {} vCPU(s), {} MiB, base {}, overlay {}",
        c.id,
        vm.cpus,
        vm.memory_mib,
        prepared.base.display(),
        prepared.overlay_path.display()
    );
    Ok(VmImageTask {
        grace: Duration::from_secs(vm.grace_secs),
        memory_bytes: vm.memory_mib << 20,
        pending: Mutex::new(Some((Box::new(config), writer))),
        control: Mutex::new(None),
        exit: watch::channel(None).0,
    })
}

/// Delivers `action` to the VM's VMM thread and awaits its answer.
pub async fn send(control: &ControlSender, action: VmAction) -> Result<(), GuestError> {
    let what = format!("deliver {action:?} to the VM");
    let (tx, rx) = oneshot::channel();
    control.send(
        action,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(vmm::ControlError::VmGone)) | Err(_) => Err(GuestError::VmGone),
        Ok(Err(e)) => Err(host_err(what)(Box::new(e))),
    }
}

impl VmImageTask {
    /// Gives the VM a network interface (the pod's tap); only before it starts.
    pub fn attach_net(&self, net: vmm::NetConfig) -> Result<(), GuestError> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.as_mut() {
            Some((config, _)) => {
                config.nets.push(net);
                Ok(())
            }
            None => Err(GuestError::Invalid("the VM has already started".into())),
        }
    }

    fn take_pending(&self) -> Option<(Box<VmConfig>, ConsoleWriter)> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Boots the VM; its end is awaited by [`VmImageTask::wait`].
    pub async fn start(&self, id: &str) -> Result<(), GuestError> {
        let Some((mut config, writer)) = self.take_pending() else {
            return Err(GuestError::Invalid(format!(
                "the VM of task {id} was already started"
            )));
        };
        let (vm_exit_tx, vm_exit_rx) = oneshot::channel::<VmExit>();
        config.on_exit = Some(Box::new(move |exit: &VmExit| {
            let _ = vm_exit_tx.send(exit.clone());
        }));
        let started = tokio::task::spawn_blocking(move || vmm::start_vm(*config))
            .await
            .map_err(|e| host_err("start the VM")(Box::new(e)))?;
        let handle = started.map_err(|e| host_err("start the VM")(Box::new(e)))?;
        *self.control.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle.control());
        // The VMM thread owns the VM from here; the handle only joins it.
        tokio::task::spawn_blocking(move || drop(handle.wait()));
        let exit = self.exit.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let vm_exit = vm_exit_rx.await.unwrap_or_else(|_| {
                VmExit::Crashed("the VMM thread ended without a report".into())
            });
            log::info!("task {id}: {vm_exit}");
            // The console drains and closes the FIFOs before the exit is reported.
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
            exit.send_replace(Some(vm_exit.status() as u32));
        });
        Ok(())
    }

    pub async fn wait(&self) -> u32 {
        let mut rx = self.exit.subscribe();
        let status = rx.wait_for(Option::is_some).await.ok().and_then(|s| *s);
        status.unwrap_or(crate::model::EXIT_UNKNOWN)
    }

    /// SIGTERM, SIGINT and SIGPWR ask the guest to shut down (Ctrl-Alt-Del) and stop the VM
    /// after the grace period; SIGKILL stops it now. Before start, the VM is dropped.
    pub async fn kill(&self, id: &str, signal: u32) -> Result<(), GuestError> {
        if let Some((config, writer)) = self.take_pending() {
            drop(config);
            drop(writer);
            return Ok(());
        }
        let control = self
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(GuestError::VmGone)?;
        match signal as i32 {
            libc::SIGKILL => send(&control, VmAction::Stop).await,
            libc::SIGTERM | libc::SIGINT | libc::SIGPWR => {
                send(&control, VmAction::CtrlAltDel).await?;
                let grace = self.grace;
                log::info!("task {id}: asked the guest to shut down; stopping it in {grace:?} if it has not");
                let id = id.to_string();
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    if send(&control, VmAction::Stop).await.is_ok() {
                        log::info!("task {id}: the guest did not shut down within {grace:?}; stopped it");
                    }
                });
                Ok(())
            }
            other => Err(GuestError::Invalid(format!(
                "signal {other} cannot be delivered to a VM (SIGTERM/SIGINT/SIGPWR ask the guest to shut down, SIGKILL stops it)"
            ))),
        }
    }
}

/// Removes what a task left in the state directories. Idempotent.
pub fn cleanup(dirs: &StateDirs, ns: &str, id: &str) {
    let path = dirs.overlay_path(ns, id);
    match fs::remove_file(&path) {
        Ok(()) => log::info!("removed overlay {}", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("cannot remove overlay {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exactly_one_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(find_disk(dir.path()), Err(ImageError::NoDisk)));
        fs::create_dir(dir.path().join("disk")).unwrap();
        fs::write(dir.path().join("disk/readme.txt"), b"x").unwrap();
        assert!(matches!(find_disk(dir.path()), Err(ImageError::NoDisk)));
        fs::write(dir.path().join("disk/vm.qcow2"), b"x").unwrap();
        assert_eq!(
            find_disk(dir.path()).unwrap(),
            dir.path().join("disk/vm.qcow2")
        );
        fs::write(dir.path().join("disk/other.raw"), b"x").unwrap();
        let err = find_disk(dir.path()).unwrap_err();
        assert!(err.to_string().contains("other.raw, vm.qcow2"), "{err}");
        assert!(err.is_user_error());
    }

    #[test]
    fn a_disk_that_is_not_a_regular_file_or_not_a_format_we_boot_is_refused() {
        let case = |setup: &dyn Fn(&Path)| {
            let dir = tempfile::tempdir().unwrap();
            setup(dir.path());
            let err = find_disk(dir.path()).unwrap_err();
            assert_eq!(err.code(), Code::FAILED_PRECONDITION, "{err}");
            err.to_string()
        };
        let disk = |root: &Path| {
            fs::create_dir(root.join("disk")).unwrap();
            root.join("disk/disk.qcow2")
        };
        assert_eq!(
            case(&|r| fs::create_dir(disk(r)).unwrap()),
            "the image's /disk/disk.qcow2 is a directory, not a regular disk image file"
        );
        assert!(case(&|r| {
            let p = disk(r);
            let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: mkfifo with a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        })
        .contains("/disk/disk.qcow2 is a FIFO"));
        // A link to a host file is never followed.
        assert!(
            case(&|r| std::os::unix::fs::symlink("/etc/passwd", disk(r)).unwrap())
                .contains("/disk/disk.qcow2 is a symbolic link")
        );
        assert!(
            case(&|r| std::os::unix::fs::symlink("/var/lib", r.join("disk")).unwrap())
                .contains("/disk is a symbolic link, not a directory")
        );
        assert!(case(&|r| {
            disk(r);
            fs::write(r.join("disk/win.VMDK"), b"x").unwrap();
        })
        .contains("/disk/win.VMDK is a VMDK disk; kestrel boots QCOW2 and raw"));
    }

    #[test]
    fn prepare_converts_once_and_gives_each_task_an_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = StateDirs::new(&dir.path().join("state"));
        let disk = dir.path().join("vm.raw");
        fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
        let a = prepare(&dirs, &disk, "default", "a", &Limits::default()).unwrap();
        let b = prepare(&dirs, &disk, "default", "b", &Limits::default()).unwrap();
        assert_eq!(a.base, b.base);
        assert_ne!(a.overlay_path, b.overlay_path);
        assert!(a.overlay_path.exists() && b.overlay_path.exists());
        assert_eq!(a.root_device, "/dev/vda");
        cleanup(&dirs, "default", "a");
        cleanup(&dirs, "default", "a");
        assert!(!a.overlay_path.exists() && b.overlay_path.exists());
    }
}
