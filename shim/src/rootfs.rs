//! A container's root file system as a disk: the merged tree containerd hands the shim
//! (overlay mounts of the image's layer snapshots) becomes an ext4 image that the guest
//! agent mounts.
//!
//! The image is built once per image (per set of lower layers) with `mke2fs -d` and kept in
//! the image cache ([`devices::image::cache`]: temporary file, fsync, rename), so a second
//! container of the same image pays only for its own copy-on-write overlay, a sparse file
//! that holds that container's writes and that no other container sees. The cache key
//! names the layer directories by path, device, inode and change time, so a layer that is
//! removed and made again under the same path (a reset containerd) gets a new image. When
//! the container's upper layer already holds files (CRI copies image volumes there) the
//! image is built for that container alone.
//!
//! Blocking (file walks, `mke2fs`): runs on tokio's blocking pool.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use containerd_shim::protos::api::Mount;
use devices::disk::overlay::{Overlay, OverlayError};
use devices::disk::raw::RawFile;
use devices::disk::DiskBackend;
use devices::image::cache::{CacheError, ImageCache};
use sha2::{Digest, Sha256};

use crate::vm_image::StateDirs;

/// Free space the container gets in its root file system beyond the image's files.
pub const FREE_BYTES: u64 = 1 << 30;
/// The guest sees the rootfs disk under this serial.
pub const SERIAL_PREFIX: &str = "kestrel-root-";

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot read the image's files under {}", .0.display())]
    Walk(PathBuf, #[source] io::Error),
    #[error("cannot run mke2fs (install e2fsprogs)")]
    Spawn(#[source] io::Error),
    #[error("mke2fs failed: {0}")]
    Mke2fs(String),
    #[error("cannot use the image cache")]
    Cache(#[source] CacheError),
    #[error("cannot create the container's writable layer {}", .0.display())]
    Overlay(PathBuf, #[source] OverlayError),
    #[error("cannot open {}", .0.display())]
    Open(PathBuf, #[source] devices::disk::DiskError),
}

/// A container's root disk.
pub struct PreparedRootfs {
    /// The read-only base image (cached) or the container's own image.
    pub base: PathBuf,
    pub disk: Box<dyn DiskBackend>,
    /// True when the base came from the cache without building anything.
    pub cache_hit: bool,
}

fn option<'a>(m: &'a Mount, key: &str) -> Option<&'a str> {
    m.options
        .iter()
        .find_map(|o| o.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// The cache digest of a rootfs made of `mounts`, or `None` when it is not shareable.
pub fn cache_digest(mounts: &[Mount]) -> io::Result<Option<String>> {
    let [m] = mounts else { return Ok(None) };
    let layers: Vec<PathBuf> = match m.type_.as_str() {
        "overlay" => {
            if let Some(upper) = option(m, "upperdir") {
                if fs::read_dir(upper)?.next().is_some() {
                    return Ok(None);
                }
            }
            match option(m, "lowerdir") {
                Some(l) => l.split(':').map(PathBuf::from).collect(),
                None => return Ok(None),
            }
        }
        "bind" if m.options.iter().any(|o| o == "ro") => vec![PathBuf::from(&m.source)],
        _ => return Ok(None),
    };
    let mut h = Sha256::new();
    h.update(b"kestrel-rootfs-ext4-v1\n");
    for l in &layers {
        let md = fs::metadata(l)?;
        h.update(format!(
            "{}\0{}:{}:{}.{}\n",
            l.display(),
            md.dev(),
            md.ino(),
            md.ctime(),
            md.ctime_nsec()
        ));
    }
    Ok(Some(format!("sha256:{:x}", h.finalize())))
}

/// Bytes and inodes an ext4 image of `dir` needs for its files.
fn tree_size(dir: &Path) -> Result<(u64, u64), RootfsError> {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).map_err(|e| RootfsError::Walk(d.clone(), e))?;
        for e in entries {
            let e = e.map_err(|e| RootfsError::Walk(d.clone(), e))?;
            let md = e
                .metadata()
                .map_err(|err| RootfsError::Walk(e.path(), err))?;
            inodes += 1;
            bytes += md.len().div_ceil(4096) * 4096;
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// Writes an ext4 image of `tree` into `out` (an existing, empty file).
fn mke2fs(tree: &Path, out: &Path) -> Result<u64, RootfsError> {
    let (bytes, inodes) = tree_size(tree)?;
    let inodes = inodes * 2 + 16_384;
    // Files, inode tables, block-group overhead, then free space for the container.
    let size = (bytes + bytes / 8 + inodes * 256 + (64 << 20) + FREE_BYTES).div_ceil(1 << 20) << 20;
    let output = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256"])
        // No journal: the writable layer lives and dies with the container. Inode tables
        // written now, so the guest never zeroes them in the background.
        .args([
            "-O",
            "^has_journal",
            "-E",
            "lazy_itable_init=0,root_owner=0:0",
        ])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-d")
        .arg(tree)
        .arg(out)
        .arg(format!("{}k", size >> 10))
        .output()
        .map_err(RootfsError::Spawn)?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        return Err(RootfsError::Mke2fs(format!(
            "{} ({})",
            err.trim(),
            output.status
        )));
    }
    Ok(size)
}

/// The container's own files in the state directory (writable layer, unshared image).
fn own_paths(dirs: &StateDirs, ns: &str, id: &str) -> (PathBuf, PathBuf) {
    let d = dirs.overlays.join(ns);
    (
        d.join(format!("{id}.rootfs.overlay")),
        d.join(format!("{id}.rootfs.ext4")),
    )
}

/// The root disk of container `id`, whose merged tree is mounted at `tree`.
pub fn prepare(
    dirs: &StateDirs,
    mounts: &[Mount],
    tree: &Path,
    ns: &str,
    id: &str,
) -> Result<PreparedRootfs, RootfsError> {
    let (overlay_path, own_image) = own_paths(dirs, ns, id);
    if let Some(parent) = overlay_path.parent() {
        fs::create_dir_all(parent).map_err(|e| RootfsError::Walk(parent.to_path_buf(), e))?;
    }
    let digest = cache_digest(mounts).map_err(|e| RootfsError::Walk(tree.to_path_buf(), e))?;
    let Some(digest) = digest else {
        // Not shareable: an image of this container's own, written in place.
        let _ = fs::remove_file(&own_image);
        fs::File::create(&own_image).map_err(|e| RootfsError::Walk(own_image.clone(), e))?;
        mke2fs(tree, &own_image)?;
        let disk = RawFile::open(&own_image, false)
            .map_err(|e| RootfsError::Open(own_image.clone(), e))?;
        return Ok(PreparedRootfs {
            base: own_image,
            disk: Box::new(disk),
            cache_hit: false,
        });
    };
    let cache = ImageCache::new(&dirs.images);
    let mut built = false;
    let image = cache
        .get_or_build(&digest, &mut |_, path| {
            built = true;
            mke2fs(tree, path).map_err(|e| CacheError::Build {
                what: format!("the rootfs image of {}", tree.display()),
                source: Box::new(e),
            })
        })
        .map_err(RootfsError::Cache)?;
    let _ = fs::remove_file(&overlay_path);
    let overlay = Overlay::create(&image.path, &overlay_path)
        .map_err(|e| RootfsError::Overlay(overlay_path.clone(), e))?;
    Ok(PreparedRootfs {
        base: image.path,
        disk: Box::new(overlay),
        cache_hit: !built,
    })
}

/// Removes a container's writable layer and unshared image. Idempotent.
pub fn cleanup(dirs: &StateDirs, ns: &str, id: &str) {
    let (overlay, own) = own_paths(dirs, ns, id);
    for p in [overlay, own] {
        match fs::remove_file(&p) {
            Ok(()) => log::info!("removed {}", p.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove {}: {e}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay_mount(lower: &Path, upper: &Path) -> Mount {
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                format!("workdir={}", upper.parent().unwrap().join("work").display()),
                format!("upperdir={}", upper.display()),
                format!("lowerdir={}", lower.display()),
            ],
            ..Default::default()
        }
    }

    fn have_mke2fs() -> bool {
        Command::new("mke2fs").arg("-V").output().is_ok()
    }

    #[test]
    fn the_digest_names_the_layers_and_refuses_a_filled_upper() {
        let dir = tempfile::tempdir().unwrap();
        let (l1, l2, up) = (
            dir.path().join("l1"),
            dir.path().join("l2"),
            dir.path().join("up"),
        );
        for d in [&l1, &l2, &up] {
            fs::create_dir(d).unwrap();
        }
        let a = cache_digest(&[overlay_mount(&l1, &up)]).unwrap().unwrap();
        assert!(a.starts_with("sha256:"));
        assert_eq!(
            cache_digest(&[overlay_mount(&l1, &up)]).unwrap().unwrap(),
            a
        );
        assert_ne!(
            cache_digest(&[overlay_mount(&l2, &up)]).unwrap().unwrap(),
            a
        );
        // The same path made again is another layer.
        fs::remove_dir(&l1).unwrap();
        fs::create_dir(&l1).unwrap();
        assert_ne!(
            cache_digest(&[overlay_mount(&l1, &up)]).unwrap().unwrap(),
            a
        );
        fs::write(up.join("volume-file"), b"x").unwrap();
        assert_eq!(cache_digest(&[overlay_mount(&l1, &up)]).unwrap(), None);
        assert_eq!(cache_digest(&[]).unwrap(), None);
    }

    #[test]
    fn a_second_container_shares_the_image_and_writes_apart() {
        if !have_mke2fs() {
            kestrel_test_support::skip("mke2fs (e2fsprogs) is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let dirs = StateDirs::new(&dir.path().join("state"));
        let (tree, up) = (dir.path().join("tree"), dir.path().join("up"));
        fs::create_dir_all(tree.join("bin")).unwrap();
        fs::create_dir(&up).unwrap();
        fs::write(tree.join("bin/hello"), b"#!/bin/sh\necho hi\n").unwrap();
        let mounts = [overlay_mount(&tree, &up)];
        let mut a = prepare(&dirs, &mounts, &tree, "ns", "a").unwrap();
        assert!(!a.cache_hit);
        let mut b = prepare(&dirs, &mounts, &tree, "ns", "b").unwrap();
        assert!(b.cache_hit);
        assert_eq!(a.base, b.base);
        // The base is a real ext4 image holding the file.
        let out = Command::new("debugfs")
            .args(["-R", "cat /bin/hello"])
            .arg(&a.base)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "#!/bin/sh\necho hi\n");
        // Writes land in a's overlay only.
        let size = a.disk.size();
        a.disk.write_at(0, &[0xAB; 512]).unwrap();
        let mut buf = [0u8; 512];
        b.disk.read_at(0, &mut buf).unwrap();
        assert_ne!(buf, [0xAB; 512]);
        assert!(size >= FREE_BYTES);
        cleanup(&dirs, "ns", "a");
        assert!(!dirs.overlays.join("ns/a.rootfs.overlay").exists());
        assert!(dirs.overlays.join("ns/b.rootfs.overlay").exists());
    }
}
