//! The VM's copies of host files that containers bind-mount (see
//! `kestrel_agent_protocol::CopiedMount`).
//!
//! A copy with a host `source` is a volume of the VM, at `/run/kestrel/volumes/<hash>`:
//! written when the first container mounts it, shared by every later one (a pod's emptyDir
//! and `/etc/hosts`), kept in step with the host by [`sync`] and read back by [`read`]. A
//! `/dev/shm` directory is a tmpfs there. A copy without a source (an older shim) belongs
//! to its container, under the container's directory.
//!
//! Runs on the ttrpc server's threads; one lock orders every change to the volumes.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kestrel_agent_protocol::{CopiedEntry, CopiedMount, EntryKind, MAX_COPIED_BYTES};

use crate::container::AgentError;

const VOLUMES_DIR: &str = "/run/kestrel/volumes";

static LOCK: Mutex<()> = Mutex::new(());

fn io_err(what: String) -> impl FnOnce(io::Error) -> AgentError {
    move |source| AgentError::Io { what, source }
}

/// FNV-1a: a stable name for a host path.
fn volume_path(source: &str) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in source.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Path::new(VOLUMES_DIR).join(format!("{h:016x}"))
}

fn entry_path(base: &Path, e: &CopiedEntry) -> Result<PathBuf, AgentError> {
    let rel = e
        .relative()
        .map_err(|e| AgentError::Invalid(e.to_string()))?;
    Ok(if e.path.is_empty() {
        base.to_path_buf()
    } else {
        base.join(rel)
    })
}

/// Writes `entries` under `base` (which must not exist yet).
fn write_tree(base: &Path, entries: &[CopiedEntry]) -> Result<(), AgentError> {
    for e in entries {
        let path = entry_path(base, e)?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(format!("create {}", parent.display())))?;
        }
        match &e.kind {
            EntryKind::Dir => fs::create_dir_all(&path),
            EntryKind::File(data) => fs::write(&path, data),
            EntryKind::Symlink(to) => std::os::unix::fs::symlink(to, &path),
        }
        .map_err(io_err(format!("write {}", path.display())))?;
        set_mode(&path, e)?;
    }
    Ok(())
}

fn set_mode(path: &Path, e: &CopiedEntry) -> Result<(), AgentError> {
    if matches!(e.kind, EntryKind::Symlink(_)) {
        return Ok(());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(e.mode & 0o7777))
        .map_err(io_err(format!("chmod {}", path.display())))
}

/// Where each copied mount is in the VM, as (destination, path) pairs; `own` is the
/// container's directory for copies without a source.
pub fn place(own: &Path, copied: &[CopiedMount]) -> Result<Vec<(String, PathBuf)>, AgentError> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = Vec::new();
    for (i, m) in copied.iter().enumerate() {
        let path = if m.source.is_empty() {
            let base = own.join(i.to_string());
            write_tree(&base, &m.entries)?;
            base
        } else {
            let base = volume_path(&m.source);
            if fs::symlink_metadata(&base).is_err() {
                create_volume(&base, m)?;
            }
            base
        };
        out.push((m.destination.clone(), path));
    }
    Ok(out)
}

fn create_volume(base: &Path, m: &CopiedMount) -> Result<(), AgentError> {
    fs::create_dir_all(VOLUMES_DIR).map_err(io_err(format!("create {VOLUMES_DIR}")))?;
    let is_dir = matches!(m.entries.first().map(|e| &e.kind), Some(EntryKind::Dir));
    if m.destination == "/dev/shm" && is_dir {
        fs::create_dir(base).map_err(io_err(format!("create {}", base.display())))?;
        return nix::mount::mount(
            Some("shm"),
            base,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some("mode=1777,size=65536k"),
        )
        .map_err(|e| AgentError::Io {
            what: format!("mount a tmpfs for /dev/shm at {}", base.display()),
            source: io::Error::from(e),
        });
    }
    // Written aside and renamed into place: a crash never leaves half a volume.
    let tmp = base.with_extension("new");
    let _ = fs::remove_dir_all(&tmp);
    let _ = fs::remove_file(&tmp);
    write_tree(&tmp, &m.entries)?;
    fs::rename(&tmp, base).map_err(io_err(format!("create {}", base.display())))
}

/// Makes the volume of `source` equal to `entries`, in place (a bind mount of it must keep
/// seeing it): new and changed files and symlinks go in by rename, as kubelet's atomic
/// writer swaps `..data`; entries the host no longer has are removed afterwards.
pub fn sync(source: &str, entries: &[CopiedEntry]) -> Result<(), AgentError> {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let base = volume_path(source);
    let Ok(md) = fs::symlink_metadata(&base) else {
        // No container has mounted it yet: it is written whole when one does.
        return Ok(());
    };
    let total: usize = entries
        .iter()
        .map(|e| match &e.kind {
            EntryKind::File(d) => d.len(),
            _ => 0,
        })
        .sum();
    if total > MAX_COPIED_BYTES {
        return Err(AgentError::Invalid(format!(
            "volume {source} has more than {MAX_COPIED_BYTES} bytes"
        )));
    }
    if md.is_file() {
        // A bind-mounted file: rewrite its contents (a rename would leave the mount on the
        // old inode).
        if let Some(EntryKind::File(data)) = entries.first().map(|e| &e.kind) {
            fs::write(&base, data).map_err(io_err(format!("write {}", base.display())))?;
        }
        return Ok(());
    }
    sync_dir(&base, entries)
}

/// [`sync`] of a directory volume at `base`.
fn sync_dir(base: &Path, entries: &[CopiedEntry]) -> Result<(), AgentError> {
    let mut keep = HashSet::new();
    for e in entries {
        let path = entry_path(base, e)?;
        keep.insert(path.clone());
        if e.path.is_empty() {
            continue;
        }
        let current = fs::symlink_metadata(&path).ok();
        match &e.kind {
            EntryKind::Dir => {
                if !current.as_ref().is_some_and(fs::Metadata::is_dir) {
                    remove_any(&path)?;
                    fs::create_dir_all(&path)
                        .map_err(io_err(format!("create {}", path.display())))?;
                }
            }
            EntryKind::File(data) => {
                let same = current.as_ref().is_some_and(fs::Metadata::is_file)
                    && fs::read(&path).is_ok_and(|d| d == *data);
                if !same {
                    let tmp = sibling(&path);
                    fs::write(&tmp, data).map_err(io_err(format!("write {}", tmp.display())))?;
                    set_mode(&tmp, e)?;
                    replace(&tmp, &path)?;
                }
            }
            EntryKind::Symlink(to) => {
                let same = fs::read_link(&path).is_ok_and(|t| t == Path::new(to));
                if !same {
                    let tmp = sibling(&path);
                    let _ = fs::remove_file(&tmp);
                    std::os::unix::fs::symlink(to, &tmp)
                        .map_err(io_err(format!("write {}", tmp.display())))?;
                    replace(&tmp, &path)?;
                }
            }
        }
        set_mode(&path, e)?;
    }
    remove_extra(base, &keep)
}

fn sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".kestrel-sync-{name}"))
}

/// Renames `tmp` over `path`; a directory in the way is removed first.
fn replace(tmp: &Path, path: &Path) -> Result<(), AgentError> {
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        remove_any(path)?;
    }
    fs::rename(tmp, path).map_err(io_err(format!("replace {}", path.display())))
}

fn remove_any(path: &Path) -> Result<(), AgentError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => Ok(()),
    }
    .map_err(io_err(format!("remove {}", path.display())))
}

/// Removes what is under `dir` and not in `keep` (children before their directory).
fn remove_extra(dir: &Path, keep: &HashSet<PathBuf>) -> Result<(), AgentError> {
    let entries = fs::read_dir(dir).map_err(io_err(format!("list {}", dir.display())))?;
    for e in entries.flatten() {
        let path = e.path();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if !keep.contains(&path) {
            remove_any(&path)?;
        } else if is_dir {
            remove_extra(&path, keep)?;
        }
    }
    Ok(())
}

/// The contents of the volume of `source`, which must be a regular file.
pub fn read(source: &str) -> Result<Vec<u8>, AgentError> {
    let base = volume_path(source);
    let md = fs::symlink_metadata(&base).map_err(io_err(format!("read volume {source}")))?;
    if !md.is_file() || md.len() > MAX_COPIED_BYTES as u64 {
        return Err(AgentError::Invalid(format!(
            "volume {source} is not a file of at most {MAX_COPIED_BYTES} bytes"
        )));
    }
    fs::read(&base).map_err(io_err(format!("read volume {source}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, data: &str) -> CopiedEntry {
        CopiedEntry {
            path: path.into(),
            mode: 0o644,
            kind: EntryKind::File(data.as_bytes().to_vec()),
        }
    }

    fn dir(path: &str) -> CopiedEntry {
        CopiedEntry {
            path: path.into(),
            mode: 0o755,
            kind: EntryKind::Dir,
        }
    }

    fn link(path: &str, to: &str) -> CopiedEntry {
        CopiedEntry {
            path: path.into(),
            mode: 0o777,
            kind: EntryKind::Symlink(to.into()),
        }
    }

    /// A ConfigMap as kubelet's atomic writer lays it out, then its update.
    #[test]
    fn a_configmap_update_is_applied_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("cm");
        let v1 = [
            dir(""),
            dir("..2026_01"),
            file("..2026_01/key", "one"),
            link("..data", "..2026_01"),
            link("key", "..data/key"),
        ];
        write_tree(&base, &v1).unwrap();
        let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&base).unwrap());
        let v2 = [
            dir(""),
            dir("..2026_02"),
            file("..2026_02/key", "two"),
            file("..2026_02/new", "new"),
            link("..data", "..2026_02"),
            link("key", "..data/key"),
            link("new", "..data/new"),
        ];
        sync_dir(&base, &v2).unwrap();
        assert_eq!(fs::read_to_string(base.join("key")).unwrap(), "two");
        assert_eq!(fs::read_to_string(base.join("new")).unwrap(), "new");
        assert!(!base.join("..2026_01").exists());
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&fs::metadata(&base).unwrap()),
            inode
        );
        let names: Vec<String> = fs::read_dir(&base)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with(".kestrel-sync")),
            "{names:?}"
        );
        assert!(entry_path(&base, &file("../x", "")).is_err());
    }

    #[test]
    fn volume_paths_are_stable_and_distinct() {
        assert_eq!(volume_path("/a"), volume_path("/a"));
        assert_ne!(volume_path("/a"), volume_path("/b"));
        assert!(volume_path("/a").starts_with(VOLUMES_DIR));
    }
}
