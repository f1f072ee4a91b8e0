//! VM images shipped as OCI images (KubeVirt's *containerDisk* layout): the disk at
//! `/disk/*.qcow2` (or `.raw`/`.img`) inside the container's rootfs is converted once to a
//! raw base in the image cache (keyed by its content digest) and each task gets its own
//! copy-on-write overlay over that base.
//!
//! Runs on tokio's blocking pool during Create (conversion may take seconds); nothing here
//! touches the VM.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use devices::disk::overlay::{Overlay, OverlayError};
use devices::image::cache::{sha256_file, CacheError, ImageCache};
use sha2::{Digest, Sha256};

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
    #[error("cannot convert the VM disk to a raw base")]
    Cache(#[source] CacheError),
    #[error("cannot create the task's copy-on-write overlay {0}")]
    Overlay(PathBuf, #[source] OverlayError),
    #[error("cannot create {0}")]
    CreateDir(PathBuf, #[source] io::Error),
}

impl ImageError {
    /// True when the image itself is at fault (containerd gets FailedPrecondition).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            ImageError::NoDisk
                | ImageError::SeveralDisks(_)
                | ImageError::Cache(CacheError::Convert { .. })
        )
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

/// The content digest of `disk`, remembered by file identity (device, inode, size, mtime)
/// so that a second start of the same image does not read it again.
pub fn content_digest(dirs: &StateDirs, disk: &Path) -> Result<String, ImageError> {
    let meta = fs::metadata(disk).map_err(|e| ImageError::Read(disk.into(), e))?;
    let identity = format!(
        "{}:{}:{}:{}.{}",
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    );
    let key = format!("{:x}", Sha256::digest(identity.as_bytes()));
    let memo = dirs.digests.join(key);
    if let Ok(d) = fs::read_to_string(&memo) {
        if d.starts_with("sha256:") {
            return Ok(d);
        }
    }
    let digest = sha256_file(disk).map_err(|e| ImageError::Read(disk.into(), e))?;
    // The memo is an optimisation: failing to write it only costs a re-hash next time.
    if fs::create_dir_all(&dirs.digests).is_ok() {
        let tmp = memo.with_extension("tmp");
        if fs::write(&tmp, &digest)
            .and_then(|_| fs::rename(&tmp, &memo))
            .is_err()
        {
            log::debug!("cannot remember the digest of {}", disk.display());
        }
    }
    Ok(digest)
}

/// The guest's root device for a raw disk: the first partition when the disk has an MBR
/// or GPT partition table, the whole disk otherwise.
pub fn root_device(base: &Path) -> Result<String, ImageError> {
    let mut head = [0u8; 1024];
    let mut f = File::open(base).map_err(|e| ImageError::Read(base.into(), e))?;
    let n = f
        .read(&mut head)
        .map_err(|e| ImageError::Read(base.into(), e))?;
    let head = head.get(..n).unwrap_or(&[]);
    let gpt = head.get(512..520) == Some(b"EFI PART");
    let mbr =
        head.get(510..512) == Some(&[0x55, 0xaa]) && head.get(446 + 4).is_some_and(|t| *t != 0);
    // An ext2/3/4 superblock at 1024 means a bare filesystem even if byte 510 looks like an
    // MBR signature; only a partition table yields a partition.
    Ok(if gpt || mbr {
        "/dev/vda1".into()
    } else {
        "/dev/vda".into()
    })
}

/// A task's disk, ready to attach.
pub struct PreparedDisk {
    pub base: PathBuf,
    pub overlay_path: PathBuf,
    pub overlay: Overlay,
    pub root_device: String,
}

/// Converts `disk` through the cache (once per content digest) and creates the task's
/// overlay (replacing a stale one from an earlier task of the same id).
pub fn prepare(
    dirs: &StateDirs,
    disk: &Path,
    ns: &str,
    id: &str,
) -> Result<PreparedDisk, ImageError> {
    let digest = content_digest(dirs, disk)?;
    let cache = ImageCache::new(&dirs.images);
    let mut last_pct = 0;
    let base = cache
        .get_or_convert(disk, Some(&digest), &mut |done, total| {
            let pct = done.saturating_mul(100).checked_div(total).unwrap_or(100);
            if pct >= last_pct + 10 || (pct == 100 && last_pct != 100) {
                log::info!("converting {}: {pct}%", disk.display());
                last_pct = pct;
            }
        })
        .map_err(ImageError::Cache)?;
    let overlay_path = dirs.overlay_path(ns, id);
    if let Some(parent) = overlay_path.parent() {
        fs::create_dir_all(parent).map_err(|e| ImageError::CreateDir(parent.into(), e))?;
    }
    let _ = fs::remove_file(&overlay_path);
    let overlay = Overlay::create(&base.path, &overlay_path)
        .map_err(|e| ImageError::Overlay(overlay_path.clone(), e))?;
    let root_device = root_device(&base.path)?;
    Ok(PreparedDisk {
        base: base.path,
        overlay_path,
        overlay,
        root_device,
    })
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
    fn root_device_follows_the_partition_table() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        fs::write(&p, vec![0u8; 4096]).unwrap();
        assert_eq!(root_device(&p).unwrap(), "/dev/vda");
        let mut mbr = vec![0u8; 4096];
        mbr[446 + 4] = 0x83;
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        fs::write(&p, &mbr).unwrap();
        assert_eq!(root_device(&p).unwrap(), "/dev/vda1");
    }

    #[test]
    fn digest_is_remembered_by_file_identity() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = StateDirs::new(dir.path());
        let disk = dir.path().join("disk.raw");
        fs::write(&disk, b"hello").unwrap();
        let d1 = content_digest(&dirs, &disk).unwrap();
        assert_eq!(
            d1,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(fs::read_dir(&dirs.digests).unwrap().count(), 1);
        assert_eq!(content_digest(&dirs, &disk).unwrap(), d1);
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
