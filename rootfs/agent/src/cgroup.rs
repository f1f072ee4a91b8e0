//! Containers' cgroups in the guest: cgroup v2, one group per container under
//! `/sys/fs/cgroup/kestrel/<id>`, holding the container's init, its execs and everything
//! they start. Kill-all, pids, stats (containerd's cgroup v2 `Metrics`) and resource
//! updates read and write these files.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use kestrel_agent_protocol::oci_spec::runtime::LinuxResources;
use kestrel_agent_protocol::protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};

pub const ROOT: &str = "/sys/fs/cgroup";
/// The controllers containers get, where the guest kernel has them.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Mounts cgroup2 (done by PID 1 at boot) and enables the controllers for `kestrel/*`.
pub fn setup() -> io::Result<()> {
    let parent = Path::new(ROOT).join("kestrel");
    fs::create_dir_all(&parent)?;
    for dir in [Path::new(ROOT), parent.as_path()] {
        let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        let enable: Vec<String> = CONTROLLERS
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
            .map(|c| format!("+{c}"))
            .collect();
        if !enable.is_empty() {
            fs::write(dir.join("cgroup.subtree_control"), enable.join(" "))?;
        }
    }
    Ok(())
}

/// The cgroup of container `id` (a path component: the shim checked it).
pub fn path(id: &str) -> PathBuf {
    Path::new(ROOT).join("kestrel").join(id)
}

/// Every process in the group.
pub fn pids(group: &Path) -> io::Result<Vec<u32>> {
    Ok(fs::read_to_string(group.join("cgroup.procs"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

fn read_u64(group: &Path, file: &str) -> Option<u64> {
    fs::read_to_string(group.join(file))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// `max` (or an absent file) is no limit: 0 in containerd's metrics.
fn read_limit(group: &Path, file: &str) -> u64 {
    read_u64(group, file).unwrap_or(0)
}

/// `key value` lines (memory.stat, cpu.stat, memory.events).
fn keyed(group: &Path, file: &str) -> Vec<(String, u64)> {
    fs::read_to_string(group.join(file))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// The group's statistics as containerd's cgroup v2 `Metrics` (what `ctr task metrics`
/// and CRI decode).
pub fn metrics(group: &Path) -> Metrics {
    let cpu = keyed(group, "cpu.stat");
    let get =
        |list: &[(String, u64)], k: &str| list.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
    let mem = keyed(group, "memory.stat");
    let events = keyed(group, "memory.events");
    Metrics {
        pids: Some(PidsStat {
            current: read_u64(group, "pids.current").unwrap_or(0),
            limit: read_limit(group, "pids.max"),
            ..Default::default()
        })
        .into(),
        cpu: Some(CPUStat {
            usage_usec: get(&cpu, "usage_usec"),
            user_usec: get(&cpu, "user_usec"),
            system_usec: get(&cpu, "system_usec"),
            nr_periods: get(&cpu, "nr_periods"),
            nr_throttled: get(&cpu, "nr_throttled"),
            throttled_usec: get(&cpu, "throttled_usec"),
            ..Default::default()
        })
        .into(),
        memory: Some(MemoryStat {
            anon: get(&mem, "anon"),
            file: get(&mem, "file"),
            kernel_stack: get(&mem, "kernel_stack"),
            slab: get(&mem, "slab"),
            sock: get(&mem, "sock"),
            shmem: get(&mem, "shmem"),
            file_mapped: get(&mem, "file_mapped"),
            file_dirty: get(&mem, "file_dirty"),
            file_writeback: get(&mem, "file_writeback"),
            pgfault: get(&mem, "pgfault"),
            pgmajfault: get(&mem, "pgmajfault"),
            inactive_anon: get(&mem, "inactive_anon"),
            active_anon: get(&mem, "active_anon"),
            inactive_file: get(&mem, "inactive_file"),
            active_file: get(&mem, "active_file"),
            unevictable: get(&mem, "unevictable"),
            usage: read_u64(group, "memory.current").unwrap_or(0),
            usage_limit: read_limit(group, "memory.max"),
            swap_usage: read_u64(group, "memory.swap.current").unwrap_or(0),
            swap_limit: read_limit(group, "memory.swap.max"),
            ..Default::default()
        })
        .into(),
        memory_events: Some(MemoryEvents {
            low: get(&events, "low"),
            high: get(&events, "high"),
            max: get(&events, "max"),
            oom: get(&events, "oom"),
            oom_kill: get(&events, "oom_kill"),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

/// The cgroup v2 file writes for `resources` (memory, pids, CPU), in order.
pub fn resource_writes(resources: &LinuxResources) -> Vec<(&'static str, String)> {
    let mut writes = Vec::new();
    if let Some(mem) = resources.memory() {
        if let Some(limit) = mem.limit() {
            writes.push((
                "memory.max",
                if limit < 0 {
                    "max".into()
                } else {
                    limit.to_string()
                },
            ));
        }
        if let Some(swap) = mem.swap() {
            // OCI's swap is memory + swap; v2's memory.swap.max is swap alone.
            let swap_only = match (swap, mem.limit()) {
                (s, _) if s < 0 => "max".to_string(),
                (s, Some(l)) if l >= 0 => s.saturating_sub(l).max(0).to_string(),
                (s, _) => s.to_string(),
            };
            writes.push(("memory.swap.max", swap_only));
        }
    }
    if let Some(limit) = resources.pids().as_ref().map(|p| p.limit()) {
        writes.push((
            "pids.max",
            if limit <= 0 {
                "max".into()
            } else {
                limit.to_string()
            },
        ));
    }
    if let Some(cpu) = resources.cpu() {
        if let Some(shares) = cpu.shares().filter(|s| *s > 0) {
            // runc's conversion of cgroup v1 shares [2, 262144] to v2 weight [1, 10000].
            let weight = 1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142;
            writes.push(("cpu.weight", weight.to_string()));
        }
        let period = cpu.period().filter(|p| *p > 0).unwrap_or(100_000);
        if let Some(quota) = cpu.quota() {
            let q = if quota <= 0 {
                "max".to_string()
            } else {
                quota.to_string()
            };
            writes.push(("cpu.max", format!("{q} {period}")));
        }
    }
    writes
}

/// Applies `resources` to `group`. A controller the guest kernel lacks (no file) is
/// skipped; any other failure is returned with the file it was for.
pub fn apply(group: &Path, resources: &LinuxResources) -> Result<(), (String, io::Error)> {
    use std::io::Write;
    for (file, value) in resource_writes(resources) {
        let path = group.join(file);
        // Without O_CREAT: cgroupfs refuses to create a file with EACCES (a kernel without
        // swap has no memory.swap.max), which must read as "absent", not as a failure.
        let written = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(value.as_bytes()));
        match written {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                log::debug!("{} is absent; {file}={value} not applied", path.display());
            }
            Err(e) => return Err((format!("write {value} to {}", path.display()), e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_controller_files_are_skipped_not_created() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("memory.max"), "max").unwrap();
        let r: LinuxResources =
            serde_json::from_str(r#"{"memory":{"limit":100663296,"swap":100663296}}"#).unwrap();
        apply(dir.path(), &r).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("memory.max")).unwrap(),
            "100663296"
        );
        assert!(!dir.path().join("memory.swap.max").exists());
    }

    #[test]
    fn resources_become_cgroup_v2_writes() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":268435456,"swap":536870912},"pids":{"limit":64},"cpu":{"shares":1024,"quota":50000,"period":100000}}"#,
        )
        .unwrap();
        assert_eq!(
            resource_writes(&r),
            vec![
                ("memory.max", "268435456".to_string()),
                ("memory.swap.max", "268435456".to_string()),
                ("pids.max", "64".to_string()),
                ("cpu.weight", "39".to_string()),
                ("cpu.max", "50000 100000".to_string()),
            ]
        );
        let unlimited: LinuxResources =
            serde_json::from_str(r#"{"memory":{"limit":-1},"cpu":{"quota":-1}}"#).unwrap();
        assert_eq!(
            resource_writes(&unlimited),
            vec![
                ("memory.max", "max".to_string()),
                ("cpu.max", "max 100000".to_string())
            ]
        );
    }

    #[test]
    fn metrics_of_a_group_from_its_files() {
        let dir = tempfile_dir();
        fs::write(dir.join("memory.current"), "4096\n").unwrap();
        fs::write(dir.join("memory.max"), "max\n").unwrap();
        fs::write(dir.join("memory.stat"), "anon 100\ninactive_file 7\n").unwrap();
        fs::write(dir.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        fs::write(dir.join("pids.current"), "3\n").unwrap();
        fs::write(dir.join("cgroup.procs"), "12\n40\n").unwrap();
        let m = metrics(&dir);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, 0);
        assert_eq!((m.memory.anon, m.memory.inactive_file), (100, 7));
        assert_eq!((m.cpu.usage_usec, m.cpu.user_usec), (1500, 1000));
        assert_eq!(m.pids.current, 3);
        assert_eq!(pids(&dir).unwrap(), vec![12, 40]);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("kestrel-cg-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }
}
