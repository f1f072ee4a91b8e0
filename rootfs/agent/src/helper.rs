//! The child side of starting a container process.
//!
//! The agent never forks: it spawns itself (`/proc/self/exe`) with a [`HelperConfig`] in
//! the environment variable [`CONFIG_ENV`]. That fresh, single-threaded process sets itself
//! up from the OCI spec with safe system-call wrappers — session and controlling terminal,
//! cgroup, namespaces, mounts and root (init) or the init's namespaces and root (exec),
//! hostname, rlimits, groups and ids, capabilities, no_new_privs — then reports `ok` on its
//! report pipe, waits for the start byte (containerd's Start), and `exec`s the process. Its
//! pid is the container process's pid. A failure is written to the report pipe as one line
//! and the helper exits 127; the report pipe is close-on-exec, so EOF after `ok` means the
//! exec succeeded.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};

use kestrel_agent_protocol::oci_spec::runtime::{LinuxCapabilities, LinuxSeccomp, Mount, Process};
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};

/// The environment variable carrying the helper's configuration (JSON).
pub const CONFIG_ENV: &str = "KESTREL_HELPER_CONFIG";
#[derive(Debug, Serialize, Deserialize)]
pub struct HelperConfig {
    /// The inherited ends of the report pipe (written) and the start pipe (read).
    pub report_fd: i32,
    pub start_fd: i32,
    pub process: Process,
    pub cgroup: PathBuf,
    pub mode: Mode,
    /// The container's seccomp profile (execs get their container's).
    pub seccomp: Option<LinuxSeccomp>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Mode {
    /// A container's init: a new mount namespace over `rootfs`, and new UTS and IPC
    /// namespaces unless it shares the VM's (a pod's containers share the sandbox's).
    Init {
        rootfs: PathBuf,
        readonly: bool,
        hostname: Option<String>,
        share_uts: bool,
        share_ipc: bool,
        mounts: Vec<Mount>,
        /// Copied bind-mount sources: (destination, path in the agent).
        copied: Vec<(String, PathBuf)>,
        masked: Vec<String>,
        readonly_paths: Vec<String>,
        /// Guest device nodes to bind at container paths (block volumes).
        #[serde(default)]
        devices: Vec<(String, PathBuf)>,
    },
    /// A process joining the namespaces and root of the container whose init is `init_pid`.
    Exec { init_pid: i32 },
}

/// Runs the helper; never returns.
pub fn run(config: &OsStr) -> ! {
    let config: HelperConfig = match serde_json::from_slice(config.as_encoded_bytes()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kestrel-agent: bad helper configuration: {e}");
            std::process::exit(127)
        }
    };
    // SAFETY: the agent created this pipe end for this process alone (it spawns helpers
    // under one lock, with every other fd close-on-exec) and named it in the config; nothing
    // else in this process owns the fd.
    let mut report = File::from(unsafe { OwnedFd::from_raw_fd(config.report_fd) });
    // SAFETY: as for the report fd.
    let start = File::from(unsafe { OwnedFd::from_raw_fd(config.start_fd) });
    match setup(&config) {
        Ok(filters) => {
            let _ = report.write_all(b"ok\n");
            let err = exec(&config.process, start, report.as_fd(), &filters);
            let _ = writeln!(report, "{err}");
        }
        Err(e) => {
            let _ = writeln!(report, "{e}");
        }
    }
    std::process::exit(127)
}

fn err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> String {
    let what = what.into();
    move |e| format!("{what}: {}", io::Error::from(e))
}

fn ioerr(what: impl Into<String>) -> impl FnOnce(io::Error) -> String {
    let what = what.into();
    move |e| format!("{what}: {e}")
}

/// Sets the process up; returns the seccomp filters still to install right before the
/// exec (all of them with no_new_privs; none without it: they went in while the helper
/// still had CAP_SYS_ADMIN, which installing them then needs).
fn setup(config: &HelperConfig) -> Result<Vec<seccompiler::BpfProgram>, String> {
    let filters = match &config.seccomp {
        Some(profile) => crate::seccomp::filters(profile)?,
        None => Vec::new(),
    };
    nix::unistd::setsid().map_err(err("setsid"))?;
    if config.process.terminal().unwrap_or(false) {
        rustix::process::ioctl_tiocsctty(io::stdin())
            .map_err(|e| format!("make the terminal the controlling terminal: {e}"))?;
    }
    fs::write(config.cgroup.join("cgroup.procs"), b"0")
        .map_err(ioerr(format!("join cgroup {}", config.cgroup.display())))?;
    match &config.mode {
        Mode::Init {
            rootfs,
            readonly,
            hostname,
            share_uts,
            share_ipc,
            mounts,
            copied,
            masked,
            readonly_paths,
            devices,
        } => {
            let mut flags = CloneFlags::CLONE_NEWNS;
            if !share_uts {
                flags |= CloneFlags::CLONE_NEWUTS;
            }
            if !share_ipc {
                flags |= CloneFlags::CLONE_NEWIPC;
            }
            nix::sched::unshare(flags).map_err(err("unshare the container's namespaces"))?;
            make_root(rootfs, mounts, copied, masked, readonly_paths, devices)?;
            if *readonly {
                nix::mount::mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
                .map_err(err("make the root file system read-only"))?;
            }
            // In the VM's UTS namespace the hostname is the pod's, set at boot.
            if let Some(h) = hostname.as_deref().filter(|h| !h.is_empty() && !share_uts) {
                nix::unistd::sethostname(h).map_err(err(format!("set the hostname {h}")))?;
            }
        }
        Mode::Exec { init_pid } => join_container(*init_pid)?,
    }
    let cwd = config.process.cwd();
    nix::unistd::chdir(cwd).map_err(err(format!(
        "change to the working directory {}",
        cwd.display()
    )))?;
    set_rlimits(&config.process)?;
    let nnp = config.process.no_new_privileges().unwrap_or(false);
    if !nnp {
        crate::seccomp::apply(&filters)?;
    }
    set_user(&config.process)?;
    if nnp {
        nix::sys::prctl::set_no_new_privs().map_err(err("set no_new_privs"))?;
        return Ok(filters);
    }
    Ok(Vec::new())
}

/// `dest` inside `root`, refusing `..` (a spec's destination is always absolute).
fn inside(root: &Path, dest: &str) -> Result<PathBuf, String> {
    let mut p = root.to_path_buf();
    for c in Path::new(dest).components() {
        match c {
            Component::Normal(n) => p.push(n),
            Component::RootDir | Component::CurDir => {}
            _ => return Err(format!("mount destination {dest:?} leaves the container")),
        }
    }
    Ok(p)
}

/// Mount options: flags, and the rest as the file system's data.
fn mount_options(options: &[String]) -> (MsFlags, bool, String) {
    let mut flags = MsFlags::empty();
    let mut bind = false;
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "bind" | "rbind" => bind = true,
            "private" | "rprivate" | "slave" | "rslave" | "shared" | "rshared" | "suid" | "dev"
            | "exec" | "atime" | "async" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, bind, data.join(","))
}

fn make_root(
    rootfs: &Path,
    mounts: &[Mount],
    copied: &[(String, PathBuf)],
    masked: &[String],
    readonly_paths: &[String],
    devices: &[(String, PathBuf)],
) -> Result<(), String> {
    let none = None::<&str>;
    nix::mount::mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(err("make the mounts private"))?;
    nix::mount::mount(
        Some(rootfs),
        rootfs,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(err(format!("bind {}", rootfs.display())))?;
    let mut dev_is_tmpfs = false;
    for m in mounts {
        let dest_name = m.destination().to_string_lossy().into_owned();
        let dest = inside(rootfs, &dest_name)?;
        let options = m.options().clone().unwrap_or_default();
        let (flags, bind, data) = mount_options(&options);
        let typ = m.typ().as_deref().unwrap_or("");
        if bind || typ == "bind" {
            let Some((_, src)) = copied.iter().find(|(d, _)| *d == dest_name) else {
                // A host path that was not copied in (too large, or not a file or
                // directory): the shim logged it.
                continue;
            };
            if src.is_dir() {
                fs::create_dir_all(&dest).map_err(ioerr(format!("create {}", dest.display())))?;
            } else {
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent)
                        .map_err(ioerr(format!("create {}", parent.display())))?;
                }
                if !dest.exists() {
                    File::create(&dest).map_err(ioerr(format!("create {}", dest.display())))?;
                }
            }
            nix::mount::mount(
                Some(src.as_path()),
                &dest,
                none,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                none,
            )
            .map_err(err(format!("bind mount {dest_name}")))?;
            if flags.contains(MsFlags::MS_RDONLY) {
                nix::mount::mount(
                    none,
                    &dest,
                    none,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
                    none,
                )
                .map_err(err(format!("make {dest_name} read-only")))?;
            }
            continue;
        }
        // The guest is cgroup v2 only.
        let typ = if typ == "cgroup" { "cgroup2" } else { typ };
        let data = if typ == "cgroup2" {
            String::new()
        } else {
            data
        };
        fs::create_dir_all(&dest).map_err(ioerr(format!("create {}", dest.display())))?;
        let source = m
            .source()
            .as_ref()
            .map_or(typ.to_string(), |s| s.to_string_lossy().into_owned());
        nix::mount::mount(
            Some(source.as_str()),
            &dest,
            Some(typ),
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(err(format!("mount {typ} on {dest_name}")))?;
        if dest_name == "/dev" && typ == "tmpfs" {
            dev_is_tmpfs = true;
        }
    }
    if dev_is_tmpfs {
        populate_dev(&rootfs.join("dev"))?;
    }
    for (path, node) in devices {
        let target = inside(rootfs, path)?;
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(ioerr(format!("create {}", parent.display())))?;
        }
        File::create(&target).map_err(ioerr(format!("create {}", target.display())))?;
        nix::mount::mount(Some(node.as_path()), &target, none, MsFlags::MS_BIND, none).map_err(
            err(format!(
                "bind the block device {} at {path}",
                node.display()
            )),
        )?;
    }
    for p in masked {
        let target = inside(rootfs, p)?;
        let result = if target.is_dir() {
            nix::mount::mount(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                none,
            )
        } else if target.exists() {
            nix::mount::mount(Some("/dev/null"), &target, none, MsFlags::MS_BIND, none)
        } else {
            Ok(())
        };
        result.map_err(err(format!("mask {p}")))?;
    }
    for p in readonly_paths {
        let target = inside(rootfs, p)?;
        if !target.exists() {
            continue;
        }
        nix::mount::mount(
            Some(&target),
            &target,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )
        .and_then(|()| {
            nix::mount::mount(
                none,
                &target,
                none,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                none,
            )
        })
        .map_err(err(format!("make {p} read-only")))?;
    }
    enter_root(rootfs)
}

/// The device nodes and links a container's fresh /dev needs, bound from the guest's
/// devtmpfs.
fn populate_dev(dev: &Path) -> Result<(), String> {
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(node);
        File::create(&target).map_err(ioerr(format!("create {}", target.display())))?;
        let source = Path::new("/dev").join(node);
        nix::mount::mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err(format!("bind {}", source.display())))?;
    }
    let links = [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ];
    for (name, to) in links {
        let link = dev.join(name);
        match std::os::unix::fs::symlink(to, &link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("link {}: {e}", link.display())),
        }
    }
    Ok(())
}

/// Makes `rootfs` this mount namespace's root: pivot_root, or — where the old root cannot
/// be pivoted away (an initramfs root) — moving the mount over / and chroot.
fn enter_root(rootfs: &Path) -> Result<(), String> {
    nix::unistd::chdir(rootfs).map_err(err(format!("change to {}", rootfs.display())))?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            nix::mount::umount2(".", MntFlags::MNT_DETACH).map_err(err("detach the old root"))?;
        }
        Err(nix::Error::EINVAL) => {
            nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(err("move the container's root over /"))?;
            nix::unistd::chroot(".").map_err(err("chroot into the container's root"))?;
        }
        Err(e) => return Err(err("pivot_root")(e)),
    }
    nix::unistd::chdir("/").map_err(err("change to /"))
}

/// Joins the namespaces and root of a running container's init.
fn join_container(init_pid: i32) -> Result<(), String> {
    let proc = PathBuf::from(format!("/proc/{init_pid}"));
    let open = |p: PathBuf| File::open(&p).map_err(ioerr(format!("open {}", p.display())));
    let root = open(proc.join("root"))?;
    let namespaces = [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ];
    let files: Vec<(File, CloneFlags, &str)> = namespaces
        .iter()
        .map(|(n, f)| Ok((open(proc.join("ns").join(n))?, *f, *n)))
        .collect::<Result<_, String>>()?;
    for (file, flag, name) in files {
        nix::sched::setns(file.as_fd(), flag)
            .map_err(err(format!("join the {name} namespace of pid {init_pid}")))?;
    }
    nix::unistd::fchdir(root.as_fd()).map_err(err("change to the container's root"))?;
    nix::unistd::chroot(".").map_err(err("chroot into the container's root"))
}

fn set_rlimits(process: &Process) -> Result<(), String> {
    use nix::sys::resource::{setrlimit, Resource};
    for r in process.rlimits().iter().flatten() {
        let name = format!("{:?}", r.typ());
        let resource = match name.as_str() {
            "RlimitCpu" => Resource::RLIMIT_CPU,
            "RlimitFsize" => Resource::RLIMIT_FSIZE,
            "RlimitData" => Resource::RLIMIT_DATA,
            "RlimitStack" => Resource::RLIMIT_STACK,
            "RlimitCore" => Resource::RLIMIT_CORE,
            "RlimitRss" => Resource::RLIMIT_RSS,
            "RlimitNproc" => Resource::RLIMIT_NPROC,
            "RlimitNofile" => Resource::RLIMIT_NOFILE,
            "RlimitMemlock" => Resource::RLIMIT_MEMLOCK,
            "RlimitAs" => Resource::RLIMIT_AS,
            "RlimitLocks" => Resource::RLIMIT_LOCKS,
            "RlimitSigpending" => Resource::RLIMIT_SIGPENDING,
            "RlimitMsgqueue" => Resource::RLIMIT_MSGQUEUE,
            "RlimitNice" => Resource::RLIMIT_NICE,
            "RlimitRtprio" => Resource::RLIMIT_RTPRIO,
            "RlimitRttime" => Resource::RLIMIT_RTTIME,
            _ => return Err(format!("unknown rlimit {name}")),
        };
        setrlimit(resource, r.soft(), r.hard()).map_err(err(format!("set {name}")))?;
    }
    Ok(())
}

fn cap_set(
    names: Option<
        &std::collections::HashSet<kestrel_agent_protocol::oci_spec::runtime::Capability>,
    >,
) -> Result<caps::CapsHashSet, String> {
    let mut set = caps::CapsHashSet::new();
    for c in names.into_iter().flatten() {
        let name = c.to_string();
        let name = if name.starts_with("CAP_") {
            name
        } else {
            format!("CAP_{name}")
        };
        set.insert(
            name.parse()
                .map_err(|_| format!("unknown capability {name}"))?,
        );
    }
    Ok(set)
}

/// Groups, gid and uid, keeping exactly the spec's capabilities across the change of uid.
fn set_user(process: &Process) -> Result<(), String> {
    use caps::CapSet;
    use nix::unistd::{Gid, Uid};
    let user = process.user();
    let empty = LinuxCapabilities::default();
    let c = process.capabilities().as_ref().unwrap_or(&empty);
    let bounding = cap_set(c.bounding().as_ref())?;
    for cap in caps::all() {
        if !bounding.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|e| format!("drop {cap} from the bounding set: {e}"))?;
        }
    }
    caps::securebits::set_keepcaps(true).map_err(|e| format!("keep capabilities: {e}"))?;
    let groups: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).map_err(err("set the additional groups"))?;
    let gid = Gid::from_raw(user.gid());
    nix::unistd::setresgid(gid, gid, gid).map_err(err(format!("set gid {gid}")))?;
    let uid = Uid::from_raw(user.uid());
    nix::unistd::setresuid(uid, uid, uid).map_err(err(format!("set uid {uid}")))?;
    // Effective first: it must stay within the permitted set as that shrinks.
    for (set, names) in [
        (CapSet::Effective, c.effective()),
        (CapSet::Permitted, c.permitted()),
        (CapSet::Inheritable, c.inheritable()),
    ] {
        caps::set(None, set, &cap_set(names.as_ref())?)
            .map_err(|e| format!("set {set:?} capabilities: {e}"))?;
    }
    let ambient = cap_set(c.ambient().as_ref())?;
    caps::clear(None, CapSet::Ambient).map_err(|e| format!("clear ambient capabilities: {e}"))?;
    for cap in ambient {
        caps::raise(None, CapSet::Ambient, cap).map_err(|e| format!("raise ambient {cap}: {e}"))?;
    }
    caps::securebits::set_keepcaps(false).map_err(|e| format!("reset keepcaps: {e}"))
}

/// Waits for the start byte, then replaces this process with the container's. Returns only
/// on failure.
fn exec(
    process: &Process,
    mut start: File,
    report: std::os::fd::BorrowedFd<'_>,
    filters: &[seccompiler::BpfProgram],
) -> String {
    let mut byte = [0u8; 1];
    match start.read(&mut byte) {
        Ok(1) => {}
        // The agent is gone or deleted the process before starting it.
        _ => std::process::exit(127),
    }
    drop(start);
    if let Err(e) = nix::fcntl::fcntl(
        report,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    ) {
        return format!(
            "set close-on-exec on the report pipe: {}",
            io::Error::from(e)
        );
    }
    let args = process.args().clone().unwrap_or_default();
    let Some((program, rest)) = args.split_first() else {
        return "the process has no args".to_string();
    };
    if let Err(e) = crate::seccomp::apply(filters) {
        return e;
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest).env_clear();
    for e in process.env().iter().flatten() {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    let e = cmd.exec();
    format!("exec {program}: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_stay_inside() {
        let root = Path::new("/run/c/rootfs");
        assert_eq!(inside(root, "/proc").unwrap(), root.join("proc"));
        assert_eq!(inside(root, "/dev/./pts").unwrap(), root.join("dev/pts"));
        assert!(inside(root, "/../etc").is_err());
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let opts: Vec<String> = ["nosuid", "noexec", "nodev", "mode=755", "size=65536k", "ro"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (flags, bind, data) = mount_options(&opts);
        assert!(flags.contains(
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        ));
        assert!(!bind);
        assert_eq!(data, "mode=755,size=65536k");
        let (_, bind, _) = mount_options(&["rbind".to_string(), "ro".to_string()]);
        assert!(bind);
    }
}
