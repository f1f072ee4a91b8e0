//! A VM disk ready to boot: a source image (QCOW2 or raw) converted once through the
//! [image cache](super::cache) and a copy-on-write [overlay](crate::disk::overlay) over the
//! cached base, plus the guest's root device. Shared by the `kestrel` CLI (`--image`) and
//! the shim (containerDisk images), on the caller's thread before the VM starts.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::cache::{sha256_file, CacheError, ImageCache};
use super::convert::Limits;
use crate::disk::overlay::{Overlay, OverlayError};

/// Where converted bases and remembered digests live.
#[derive(Debug, Clone)]
pub struct ImageDirs {
    /// The image cache root (converted raw bases).
    pub images: PathBuf,
    /// Remembered content digests, by file identity.
    pub digests: PathBuf,
}

impl ImageDirs {
    /// `<root>/images` and `<root>/digests`.
    pub fn under(root: &Path) -> Self {
        ImageDirs {
            images: root.join("images"),
            digests: root.join("digests"),
        }
    }
}

/// Errors preparing a VM disk.
#[derive(Debug, thiserror::Error)]
pub enum VmDiskError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("cannot convert the VM disk to a raw base")]
    Cache(#[source] CacheError),
    #[error("cannot create the copy-on-write overlay {0}")]
    Overlay(PathBuf, #[source] OverlayError),
    #[error("cannot create {0}")]
    CreateDir(PathBuf, #[source] io::Error),
}

impl VmDiskError {
    /// True when the image itself is at fault (refused or corrupt input).
    pub fn is_user_error(&self) -> bool {
        matches!(self, VmDiskError::Cache(CacheError::Convert { .. }))
    }
}

/// The content digest of `disk`, remembered by file identity (device, inode, size, mtime)
/// so that a second start of the same image does not read it again. Only the digest of an
/// image that converted is remembered ([`ContentDigest::remember`]).
pub fn content_digest(dirs: &ImageDirs, disk: &Path) -> Result<ContentDigest, VmDiskError> {
    let meta = fs::metadata(disk).map_err(|e| VmDiskError::Read(disk.into(), e))?;
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
            return Ok(ContentDigest {
                digest: d,
                memo: None,
            });
        }
    }
    let digest = sha256_file(disk).map_err(|e| VmDiskError::Read(disk.into(), e))?;
    Ok(ContentDigest {
        digest,
        memo: Some(memo),
    })
}

/// A disk's content digest, and where to remember it if it was computed anew.
#[derive(Debug, Clone)]
pub struct ContentDigest {
    pub digest: String,
    memo: Option<PathBuf>,
}

impl ContentDigest {
    /// Remembers the digest for the next start. The memo is an optimisation: failing to
    /// write it only costs a re-hash next time.
    pub fn remember(&self) {
        let Some(memo) = &self.memo else { return };
        let written = memo
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| {
                let tmp = memo.with_extension("tmp");
                fs::write(&tmp, &self.digest).and_then(|_| fs::rename(&tmp, memo))
            });
        if let Err(e) = written {
            log::debug!("cannot remember a digest in {}: {e}", memo.display());
        }
    }
}

/// The guest's root device for a raw disk: the first partition when the disk has an MBR
/// or GPT partition table, the whole disk otherwise.
pub fn root_device(base: &Path) -> Result<String, VmDiskError> {
    let mut head = [0u8; 1024];
    let mut f = File::open(base).map_err(|e| VmDiskError::Read(base.into(), e))?;
    let n = f
        .read(&mut head)
        .map_err(|e| VmDiskError::Read(base.into(), e))?;
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

/// A disk ready to attach.
pub struct PreparedDisk {
    pub base: PathBuf,
    pub overlay_path: PathBuf,
    pub overlay: Overlay,
    pub root_device: String,
}

/// What [`prepare`] does with an overlay file that already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExistingOverlay {
    /// Replace it with an empty one (a stale overlay of an earlier task).
    Replace,
    /// Keep it and its writes (an overlay the user names to reuse).
    Keep,
}

/// Converts `disk` through the cache (once per content digest, within `limits`) and opens
/// the overlay at `overlay_path`, creating it if needed. Conversion progress goes to
/// `progress` (percent done).
pub fn prepare(
    dirs: &ImageDirs,
    disk: &Path,
    overlay_path: &Path,
    existing: ExistingOverlay,
    limits: &Limits,
    progress: &mut dyn FnMut(u64),
) -> Result<PreparedDisk, VmDiskError> {
    let digest = content_digest(dirs, disk)?;
    let cache = ImageCache::new(&dirs.images);
    let base = cache
        .get_or_convert(disk, Some(&digest.digest), limits, &mut |done, total| {
            progress(done.saturating_mul(100).checked_div(total).unwrap_or(100))
        })
        .map_err(VmDiskError::Cache)?;
    digest.remember();
    if let Some(parent) = overlay_path.parent() {
        fs::create_dir_all(parent).map_err(|e| VmDiskError::CreateDir(parent.into(), e))?;
    }
    let overlay = match existing {
        ExistingOverlay::Replace => {
            let _ = fs::remove_file(overlay_path);
            Overlay::create(&base.path, overlay_path)
        }
        ExistingOverlay::Keep => Overlay::open_or_create(&base.path, overlay_path),
    }
    .map_err(|e| VmDiskError::Overlay(overlay_path.into(), e))?;
    let root_device = root_device(&base.path)?;
    Ok(PreparedDisk {
        base: base.path,
        overlay_path: overlay_path.into(),
        overlay,
        root_device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskBackend;

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
        let dirs = ImageDirs::under(dir.path());
        let disk = dir.path().join("disk.raw");
        fs::write(&disk, b"hello").unwrap();
        let d1 = content_digest(&dirs, &disk).unwrap();
        assert_eq!(
            d1.digest,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        // Nothing is remembered until the caller says the image converted.
        assert!(!dirs.digests.exists());
        d1.remember();
        assert_eq!(fs::read_dir(&dirs.digests).unwrap().count(), 1);
        let d2 = content_digest(&dirs, &disk).unwrap();
        assert_eq!(d2.digest, d1.digest);
        assert!(d2.memo.is_none(), "read from the memo");
    }

    #[test]
    fn prepare_converts_once_and_gives_each_caller_an_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = ImageDirs::under(&dir.path().join("state"));
        let disk = dir.path().join("vm.raw");
        fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
        let mut seen = Vec::new();
        let a_path = dir.path().join("a.overlay");
        let mut a = prepare(
            &dirs,
            &disk,
            &a_path,
            ExistingOverlay::Replace,
            &Limits::default(),
            &mut |p| seen.push(p),
        )
        .unwrap();
        let b_path = dir.path().join("b.overlay");
        let b = prepare(
            &dirs,
            &disk,
            &b_path,
            ExistingOverlay::Replace,
            &Limits::default(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(a.base, b.base);
        assert_eq!(seen.last(), Some(&100));
        assert!(a.overlay_path.exists() && b.overlay_path.exists());
        assert_eq!(a.root_device, "/dev/vda");

        // Keep reopens an overlay with its writes; Replace starts it over.
        a.overlay.write_at(0, &[9u8; 512]).unwrap();
        a.overlay.flush().unwrap();
        drop(a);
        let mut buf = [0u8; 512];
        let mut kept = prepare(
            &dirs,
            &disk,
            &a_path,
            ExistingOverlay::Keep,
            &Limits::default(),
            &mut |_| {},
        )
        .unwrap();
        kept.overlay.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [9u8; 512]);
        drop(kept);
        let mut fresh = prepare(
            &dirs,
            &disk,
            &a_path,
            ExistingOverlay::Replace,
            &Limits::default(),
            &mut |_| {},
        )
        .unwrap();
        fresh.overlay.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 512]);
    }
}
