//! VM images shipped as OCI images (KubeVirt's *containerDisk* layout): the disk at
//! `/disk/*.qcow2` (or `.raw`/`.img`) inside the container's rootfs is converted once to a
//! raw base in the image cache (keyed by its content digest) and each task gets its own
//! copy-on-write overlay over that base.
//!
//! Runs on tokio's blocking pool during Create (conversion may take seconds); nothing here
//! touches the VM.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use devices::image::vm_disk::{self, ExistingOverlay, ImageDirs, PreparedDisk, VmDiskError};

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
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("cannot prepare the VM disk")]
    Disk(#[source] VmDiskError),
}

impl ImageError {
    /// True when the image itself is at fault (containerd gets FailedPrecondition).
    pub fn is_user_error(&self) -> bool {
        match self {
            ImageError::NoDisk | ImageError::SeveralDisks(_) => true,
            ImageError::Disk(d) => d.is_user_error(),
            ImageError::Read(..) => false,
        }
    }
}

/// Finds the one disk of a containerDisk rootfs.
pub fn find_disk(rootfs: &Path) -> Result<PathBuf, ImageError> {
    let dir = rootfs.join(DISK_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ImageError::NoDisk),
        Err(e) => return Err(ImageError::Read(dir, e)),
    };
    let mut disks: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| ImageError::Read(dir.clone(), e))?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if DISK_EXTENSIONS.contains(&ext) && path.is_file() {
            disks.push(path);
        }
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

/// Prepares the disk of task `id` in namespace `ns` (see [`vm_disk::prepare`]).
pub fn prepare(
    dirs: &StateDirs,
    disk: &Path,
    ns: &str,
    id: &str,
) -> Result<PreparedDisk, ImageError> {
    let mut last = 0;
    vm_disk::prepare(
        &dirs.image_dirs(),
        disk,
        &dirs.overlay_path(ns, id),
        ExistingOverlay::Replace,
        &mut |pct| {
            if pct >= last + 10 || (pct == 100 && last != 100) {
                log::info!("converting {}: {pct}%", disk.display());
                last = pct;
            }
        },
    )
    .map_err(ImageError::Disk)
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
    fn prepare_converts_once_and_gives_each_task_an_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = StateDirs::new(&dir.path().join("state"));
        let disk = dir.path().join("vm.raw");
        fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
        let a = prepare(&dirs, &disk, "default", "a").unwrap();
        let b = prepare(&dirs, &disk, "default", "b").unwrap();
        assert_eq!(a.base, b.base);
        assert_ne!(a.overlay_path, b.overlay_path);
        assert!(a.overlay_path.exists() && b.overlay_path.exists());
        assert_eq!(a.root_device, "/dev/vda");
        cleanup(&dirs, "default", "a");
        cleanup(&dirs, "default", "a");
        assert!(!a.overlay_path.exists() && b.overlay_path.exists());
    }
}
