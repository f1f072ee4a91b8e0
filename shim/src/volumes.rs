//! The host side of the VM's volumes (`kestrel_agent_protocol::CopiedMount`): what a
//! container bind-mounts from the host (CRI's `/etc/hosts`, `/etc/resolv.conf`,
//! `/etc/hostname`, `/dev/shm`, the termination log; kubelet's service-account token,
//! ConfigMaps, Secrets, emptyDirs) is copied into the VM at create, at most
//! [`MAX_COPIED_BYTES`] in all, without a shared file system.
//!
//! Afterwards [`watch`] polls the sources every [`POLL`] and sends a changed one to the
//! guest (`Call::SyncVolume`), as Kata's watchable mounts do, so ConfigMap and Secret
//! updates reach the containers within seconds; and a file the container may write (the
//! termination log) is copied back out when the container exits ([`HostCopy::copy_out`]).
//! Runs on the blocking pool (walks) and the tokio runtime (calls).

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use devices::disk::raw::RawFile;
use kestrel_agent_protocol::{CopiedEntry, CopiedMount, EntryKind, MAX_COPIED_BYTES};

/// How often the sources are checked for changes.
pub const POLL: Duration = Duration::from_secs(2);

/// Files kubelet and CRI manage for the whole pod: never copied back out.
const POD_FILES: [&str; 3] = ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf"];

/// One copied bind mount and what the shim keeps doing with it.
#[derive(Debug, Clone)]
pub struct HostCopy {
    pub mount: CopiedMount,
    /// The source's [`fingerprint`] when it was copied.
    pub fingerprint: u64,
    /// A writable file of the container's own: copied back to the host at its exit.
    pub copy_out: bool,
}

/// Copies the host sources of the spec's bind mounts (files and small directories) for
/// the guest. A source that cannot be copied is left out with a warning.
pub fn copy_bind_sources(spec: &oci_spec::runtime::Spec) -> Vec<HostCopy> {
    let mut budget = MAX_COPIED_BYTES;
    let mut out = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let opts = m.options().clone().unwrap_or_default();
        let bind =
            m.typ().as_deref() == Some("bind") || opts.iter().any(|o| o == "bind" || o == "rbind");
        let Some(source) = m.source().as_ref().filter(|_| bind) else {
            continue;
        };
        let destination = m.destination().to_string_lossy().into_owned();
        // Taken before the copy: a change while copying is seen at the next poll.
        let fingerprint = fingerprint(source);
        match copy_tree(source, &mut budget) {
            Ok(entries) => {
                let is_file = matches!(entries.first().map(|e| &e.kind), Some(EntryKind::File(_)));
                let read_only = opts.iter().any(|o| o == "ro");
                out.push(HostCopy {
                    copy_out: is_file && !read_only && !POD_FILES.contains(&destination.as_str()),
                    fingerprint,
                    mount: CopiedMount {
                        source: source.display().to_string(),
                        destination,
                        entries,
                    },
                })
            }
            Err(why) => log::warn!(
                "bind mount {} on {destination} is not copied into the VM: {why}",
                source.display()
            ),
        }
    }
    out
}

/// A host block device of the spec (Kubernetes' `volumeDevices`; `ctr run --device`), to
/// become a virtio-blk disk of the VM at `path` in the container.
pub struct HostBlockDevice {
    pub path: String,
    pub disk: RawFile,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockDeviceError {
    #[error("block device {major}:{minor} for {path} is not on the host (/sys/dev/block)")]
    NotFound {
        path: String,
        major: i64,
        minor: i64,
    },
    #[error("cannot open block device {} for {path}", .device.display())]
    Open {
        path: String,
        device: std::path::PathBuf,
        #[source]
        source: devices::disk::DiskError,
    },
}

/// Opens the spec's block devices (`linux.devices` of type `b`), found on the host by their
/// major and minor numbers; read-only unless their permissions allow writes.
pub fn open_block_devices(
    spec: &oci_spec::runtime::Spec,
) -> Result<Vec<HostBlockDevice>, BlockDeviceError> {
    use oci_spec::runtime::LinuxDeviceType;
    let devices = spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for d in devices.iter().filter(|d| d.typ() == LinuxDeviceType::B) {
        let path = d.path().to_string_lossy().into_owned();
        let (major, minor) = (d.major(), d.minor());
        let uevent = fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))
            .unwrap_or_default();
        let Some(name) = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME=")) else {
            return Err(BlockDeviceError::NotFound { path, major, minor });
        };
        let device = Path::new("/dev").join(name);
        let writable = spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.devices().as_ref())
            .is_none_or(|rules| {
                rules.iter().any(|r| {
                    r.allow()
                        && r.major().is_none_or(|m| m == major)
                        && r.minor().is_none_or(|m| m == minor)
                        && r.access().as_deref().is_some_and(|a| a.contains('w'))
                })
            });
        let disk = RawFile::open(&device, !writable).map_err(|source| BlockDeviceError::Open {
            path: path.clone(),
            device: device.clone(),
            source,
        })?;
        out.push(HostBlockDevice { path, disk });
    }
    Ok(out)
}

/// Copies `source` (a file, or a directory tree of files, directories and symlinks)
/// within `budget` bytes of file data.
pub fn copy_tree(source: &Path, budget: &mut usize) -> Result<Vec<CopiedEntry>, String> {
    use std::os::unix::fs::PermissionsExt;
    let mut entries = Vec::new();
    let mut stack = vec![(source.to_path_buf(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        let md = fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mode = md.permissions().mode() & 0o7777;
        let kind = if md.is_dir() {
            let mut children: Vec<_> = fs::read_dir(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .filter_map(|e| e.ok())
                .collect();
            children.sort_by_key(|e| e.file_name());
            for c in children.into_iter().rev() {
                let name = c.file_name().to_string_lossy().into_owned();
                let child_rel = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                stack.push((c.path(), child_rel));
            }
            EntryKind::Dir
        } else if md.is_file() {
            let len = usize::try_from(md.len()).unwrap_or(usize::MAX);
            if len > *budget {
                return Err(format!("more than {MAX_COPIED_BYTES} bytes"));
            }
            *budget -= len;
            EntryKind::File(fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?)
        } else if md.file_type().is_symlink() {
            let to = fs::read_link(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            EntryKind::Symlink(to.to_string_lossy().into_owned())
        } else {
            return Err(format!(
                "{} is not a file, directory or symlink",
                path.display()
            ));
        };
        entries.push(CopiedEntry {
            path: rel,
            mode,
            kind,
        });
    }
    Ok(entries)
}

/// What changes when the tree at `source` changes (names, kinds, sizes, modes, times,
/// symlink targets), without reading file data; 0 when it cannot be read.
pub fn fingerprint(source: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    let mut stack = vec![source.to_path_buf()];
    let mut seen = 0usize;
    while let Some(path) = stack.pop() {
        seen += 1;
        if seen > 10_000 {
            break;
        }
        let Ok(md) = fs::symlink_metadata(&path) else {
            return 0;
        };
        path.hash(&mut h);
        (md.mode(), md.len(), md.mtime(), md.mtime_nsec(), md.ino()).hash(&mut h);
        if md.file_type().is_symlink() {
            fs::read_link(&path).ok().hash(&mut h);
        } else if md.is_dir() {
            let mut children: Vec<_> = fs::read_dir(&path)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            children.sort();
            stack.extend(children);
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_sources_are_copied_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hosts");
        fs::write(&file, b"127.0.0.1 localhost\n").unwrap();
        let log = dir.path().join("termination-log");
        fs::write(&log, b"").unwrap();
        let tree = dir.path().join("cfg");
        fs::create_dir_all(tree.join("sub")).unwrap();
        fs::write(tree.join("sub/a"), b"a").unwrap();
        std::os::unix::fs::symlink("sub/a", tree.join("link")).unwrap();
        let big = dir.path().join("big");
        fs::write(&big, vec![0u8; MAX_COPIED_BYTES + 1]).unwrap();
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": file, "options": ["rbind", "rw"]},
                {"destination": "/cfg", "source": tree, "options": ["rbind", "ro"]},
                {"destination": "/big", "type": "bind", "source": big},
                {"destination": "/dev/termination-log", "type": "bind", "source": log, "options": ["rbind"]},
            ]
        }))
        .unwrap();
        let copied = copy_bind_sources(&spec);
        let dests: Vec<&str> = copied
            .iter()
            .map(|c| c.mount.destination.as_str())
            .collect();
        assert_eq!(dests, ["/etc/hosts", "/cfg", "/dev/termination-log"]);
        assert_eq!(copied[0].mount.source, file.display().to_string());
        assert_eq!(
            copied[0].mount.entries[0].kind,
            EntryKind::File(b"127.0.0.1 localhost\n".to_vec())
        );
        let paths: Vec<&str> = copied[1]
            .mount
            .entries
            .iter()
            .map(|e| e.path.as_str())
            .collect();
        assert_eq!(paths, ["", "link", "sub", "sub/a"]);
        assert_eq!(
            copied[1].mount.entries[1].kind,
            EntryKind::Symlink("sub/a".into())
        );
        // Only the container's own writable file goes back out.
        let out: Vec<bool> = copied.iter().map(|c| c.copy_out).collect();
        assert_eq!(out, [false, false, true]);
    }

    #[test]
    fn fingerprints_change_with_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let a = fingerprint(dir.path());
        assert_eq!(a, fingerprint(dir.path()));
        fs::write(dir.path().join("key"), b"one").unwrap();
        let b = fingerprint(dir.path());
        assert_ne!(a, b);
        // kubelet's atomic writer: a new ..data target.
        std::os::unix::fs::symlink("x", dir.path().join("..data")).unwrap();
        let c = fingerprint(dir.path());
        assert_ne!(b, c);
        fs::remove_file(dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("y", dir.path().join("..data")).unwrap();
        assert_ne!(c, fingerprint(dir.path()));
        assert_eq!(fingerprint(&dir.path().join("missing")), 0);
    }
}
