//! The pod's accounting on the host: the shim process — its VMM and vCPU threads, i.e. the
//! whole pod VM — joins the sandbox spec's `linux.cgroupsPath`, as Kata's
//! `sandbox_cgroup_only` does, so the pod's CPU and memory are charged where kubelet reads
//! them (the pod cgroup above it) and its limits apply. Both forms of the path are read:
//! cgroupfs (`/kubepods/burstable/pod<uid>/<id>`) and systemd
//! (`kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`), on the unified hierarchy or on
//! every v1 controller hierarchy. The process's own cgroups are remembered so it can leave
//! and the directories be removed when the pod ends.
//!
//! Sync (file writes in /sys/fs/cgroup); called from the blocking pool.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::well_known_types::any::Any;

const ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroupsPath {0:?} is neither an absolute path nor slice:prefix:name")]
    BadPath(String),
    #[error("cannot {what} {}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The relative path a `cgroupsPath` names under a hierarchy's root.
pub fn relative_path(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let bad = || CgroupError::BadPath(cgroups_path.to_string());
    if let Some(p) = cgroups_path.strip_prefix('/') {
        if p.split('/').any(|c| c == "..") {
            return Err(bad());
        }
        return Ok(PathBuf::from(p));
    }
    let mut parts = cgroups_path.split(':');
    let (Some(slice), Some(prefix), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if name.is_empty() || [slice, prefix, name].iter().any(|p| p.contains('/')) {
        return Err(bad());
    }
    let mut path = expand_slice(if slice.is_empty() {
        "system.slice"
    } else {
        slice
    })
    .ok_or_else(bad)?;
    path.push(if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    });
    Ok(path)
}

/// systemd's slice nesting: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`.
fn expand_slice(slice: &str) -> Option<PathBuf> {
    let stem = slice.strip_suffix(".slice")?;
    if stem.is_empty() || stem == "-" {
        return Some(PathBuf::new());
    }
    if stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return None;
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Some(path)
}

/// The hierarchies to join: the unified one, or each v1 controller mount (one per line of
/// `/proc/self/cgroup` with a controller), with this process's current path in each.
fn hierarchies() -> Vec<(PathBuf, String)> {
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let unified = Path::new(ROOT).join("cgroup.controllers").exists();
    own.lines()
        .filter_map(|line| {
            let mut f = line.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let mount = if unified {
                (controllers.is_empty()).then(|| PathBuf::from(ROOT))?
            } else {
                if controllers.is_empty() {
                    return None;
                }
                // `name=systemd` is mounted as "systemd"; "cpu,cpuacct" may be split.
                let name = controllers.trim_start_matches("name=");
                let dir = Path::new(ROOT).join(name);
                if dir.is_dir() {
                    dir
                } else {
                    let first = name.split(',').next()?;
                    Path::new(ROOT).join(first)
                }
            };
            Some((mount, path.to_string()))
        })
        .collect()
}

/// A new v1 cpuset cgroup has no CPUs or memory nodes, and nothing can join it: each new
/// level between `mount` and `dir` gets its parent's (as runc does).
fn inherit_cpuset(mount: &Path, dir: &Path) -> Result<(), CgroupError> {
    let Ok(rel) = dir.strip_prefix(mount) else {
        return Ok(());
    };
    let mut parent = mount.to_path_buf();
    for part in rel.components() {
        let child = parent.join(part);
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let Ok(current) = fs::read_to_string(child.join(file)) else {
                continue;
            };
            if current.trim().is_empty() {
                let inherited = fs::read_to_string(parent.join(file)).unwrap_or_default();
                fs::write(child.join(file), inherited.trim()).map_err(|source| {
                    CgroupError::Io {
                        what: "set up",
                        path: child.join(file),
                        source,
                    }
                })?;
            }
        }
        parent = child;
    }
    Ok(())
}

/// Where this process was before [`join`] moved it.
pub struct Joined {
    dirs: Vec<PathBuf>,
    before: Vec<PathBuf>,
}

/// Moves this whole process into `cgroups_path` in every hierarchy (creating it).
pub fn join(cgroups_path: &str) -> Result<Joined, CgroupError> {
    let rel = relative_path(cgroups_path)?;
    let mut joined = Joined {
        dirs: Vec::new(),
        before: Vec::new(),
    };
    for (mount, current) in hierarchies() {
        let dir = mount.join(&rel);
        if !dir.starts_with(&mount) {
            continue;
        }
        fs::create_dir_all(&dir).map_err(|source| CgroupError::Io {
            what: "create",
            path: dir.clone(),
            source,
        })?;
        inherit_cpuset(&mount, &dir)?;
        let procs = dir.join("cgroup.procs");
        fs::write(&procs, std::process::id().to_string()).map_err(|source| CgroupError::Io {
            what: "join",
            path: procs,
            source,
        })?;
        joined
            .before
            .push(mount.join(current.trim_start_matches('/')));
        joined.dirs.push(dir);
    }
    Ok(joined)
}

impl Joined {
    /// Moves the process back where it was and removes the (now empty) directories.
    pub fn leave(self) {
        for (dir, before) in self.dirs.iter().zip(&self.before) {
            let _ = fs::write(before.join("cgroup.procs"), std::process::id().to_string());
            if let Err(e) = fs::remove_dir(dir) {
                log::debug!("cannot remove {}: {e}", dir.display());
            }
        }
    }
}

/// The VM's cost as cgroup v2 `Metrics` (what CRI decodes) when no guest cgroup answers
/// for it — a pod's sandbox task, a VM-image task: the shim process's CPU time (VMM and
/// vCPU threads) and resident memory (guest RAM it touched plus the VMM's own), with the
/// guest's RAM as the limit.
pub fn process_metrics(limit_bytes: u64) -> Result<Any, CgroupError> {
    use kestrel_agent_protocol::protos::cgroups_v2::metrics as v2;
    let io = |what, path: &str| {
        let path = PathBuf::from(path);
        move |source| CgroupError::Io { what, path, source }
    };
    let stat = fs::read_to_string("/proc/self/stat").map_err(io("read", "/proc/self/stat"))?;
    // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .filter(|v| *v > 0)
        .unwrap_or(100);
    let status =
        fs::read_to_string("/proc/self/status").map_err(io("read", "/proc/self/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let metrics = v2::Metrics {
        cpu: Some(v2::CPUStat {
            usage_usec: ticks.saturating_mul(1_000_000) / hz,
            ..Default::default()
        })
        .into(),
        memory: Some(v2::MemoryStat {
            usage: rss_kib.saturating_mul(1024),
            usage_limit: limit_bytes,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let value =
        containerd_shim::protos::protobuf::Message::write_to_bytes(&metrics).map_err(|e| {
            CgroupError::Io {
                what: "encode",
                path: PathBuf::from("metrics"),
                source: io::Error::other(e),
            }
        })?;
    Ok(Any {
        type_url: "io.containerd.cgroups.v2.Metrics".into(),
        value,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_reports_its_cpu_and_memory() {
        use kestrel_agent_protocol::protos::cgroups_v2::metrics::Metrics;
        let any = process_metrics(256 << 20).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m: Metrics =
            containerd_shim::protos::protobuf::Message::parse_from_bytes(&any.value).unwrap();
        assert!(m.memory.usage > 0);
        assert_eq!(m.memory.usage_limit, 256 << 20);
    }

    #[test]
    fn both_forms_of_cgroups_path_are_read() {
        assert_eq!(
            relative_path("/kubepods/burstable/pod1/abc").unwrap(),
            PathBuf::from("kubepods/burstable/pod1/abc")
        );
        assert_eq!(
            relative_path("kubepods-burstable-pod1.slice:cri-containerd:abc").unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            relative_path(":cri-containerd:abc").unwrap(),
            PathBuf::from("system.slice/cri-containerd-abc.scope")
        );
        assert_eq!(
            relative_path("-.slice::abc").unwrap(),
            PathBuf::from("abc.scope")
        );
        for bad in [
            "",
            "relative/path",
            "/a/../b",
            "a:b",
            "a.slice:b:c:d",
            "x:y:z",
            "a--b.slice:p:n",
            "a.slice:p:",
        ] {
            assert!(relative_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_process_joins_and_leaves() {
        if !nix::unistd::Uid::effective().is_root() || hierarchies().is_empty() {
            kestrel_test_support::skip("needs root and a cgroup hierarchy");
            return;
        }
        let path = format!("/kestrel-test-{}", std::process::id());
        let joined = join(&path).unwrap();
        let now = fs::read_to_string("/proc/self/cgroup").unwrap();
        assert!(now.contains(&path), "{now}");
        let dirs = joined.dirs.clone();
        joined.leave();
        let after = fs::read_to_string("/proc/self/cgroup").unwrap();
        assert!(!after.contains(&path), "{after}");
        assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?}");
    }
}
