//! Containers and their processes in the guest: creating a container (its rootfs disk
//! mounted, its cgroup, its init spawned through the [`crate::helper`]), execs, starting,
//! signals, exits (one reaper, as PID 1 must be) and deletion.
//!
//! Threads: the ttrpc server's handler threads call in; the reaper thread reaps every
//! child (and every orphan reparented to PID 1); one short-lived thread per exit waits for
//! the process's output to drain before the exit is published to `Wait`.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use kestrel_agent_protocol::oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process};
use kestrel_agent_protocol::{own_namespace, ContainerConfig, StdioPort, SERIAL_PREFIX};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::helper::{HelperConfig, Mode, CONFIG_ENV};
use crate::{cgroup, stdio};

/// How long an exit waits for the process's output to reach EOF (a daemon child may hold
/// its stdout open forever).
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// Where containers' rootfs mounts and copied files live in the guest.
const RUN_DIR: &str = "/run/kestrel/c";

/// Errors of the agent's operations; [`crate::server`] maps them to gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("container {0} not found")]
    NoContainer(String),
    #[error("process {exec} of container {id} not found")]
    NoProcess { id: String, exec: String },
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("process {0} has already exited")]
    Exited(String),
    #[error("{0} is running")]
    Running(String),
    #[error("no disk with serial {0:?} in the guest")]
    NoDisk(String),
    #[error(
        "disk {serial:?} did not reach its size of {want} bytes (still {have}) within {secs} s"
    )]
    DiskSize {
        serial: String,
        want: u64,
        have: u64,
        secs: u64,
    },
    #[error("{0}")]
    Pod(String),
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The helper's own report: what it was doing and why it failed.
    #[error("{0}")]
    Setup(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

fn nix_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> AgentError {
    let what = what.into();
    move |e| AgentError::Io {
        what,
        source: io::Error::from(e),
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

/// One process: a container's init or an exec.
pub struct Proc {
    pub pid: u32,
    start: Mutex<Option<File>>,
    report: Mutex<Option<File>>,
    pty: Option<File>,
    outputs: Mutex<Option<stdio::Outputs>>,
    exit: Mutex<Option<Exit>>,
    exited: Condvar,
}

impl Proc {
    pub fn exit(&self) -> Option<Exit> {
        *lock(&self.exit)
    }

    /// Blocks until the process has exited and its output drained.
    pub fn wait(&self) -> Exit {
        let mut g = lock(&self.exit);
        loop {
            if let Some(e) = *g {
                return e;
            }
            g = self.exited.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn finish(&self, status: u32) {
        if let Some(outputs) = lock(&self.outputs).take() {
            if !outputs.drain(DRAIN_LIMIT) {
                log::warn!(
                    "pid {}: output still open {DRAIN_LIMIT:?} after exit",
                    self.pid
                );
            }
        }
        *lock(&self.exit) = Some(Exit {
            status,
            at: SystemTime::now(),
        });
        self.exited.notify_all();
    }

    pub fn resize(&self, width: u32, height: u32) -> Result<(), AgentError> {
        let Some(master) = &self.pty else {
            return Ok(());
        };
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        stdio::resize(master, clamp(width), clamp(height)).map_err(io_err("resize the terminal"))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Container {
    dir: PathBuf,
    seccomp: Option<kestrel_agent_protocol::oci_spec::runtime::LinuxSeccomp>,
    oom_watch: Option<nix::sys::inotify::WatchDescriptor>,
    rootfs: PathBuf,
    cgroup: PathBuf,
    init: Arc<Proc>,
    execs: HashMap<String, Arc<Proc>>,
}

/// Every container of this guest, and the reaper's table of pids.
pub struct Agent {
    oom: Option<Arc<crate::oom::OomWatcher>>,
    /// Why the pod's setup at boot failed: every container is refused with it.
    pod_error: Option<String>,
    containers: Mutex<HashMap<String, Container>>,
    /// Started processes by pid. Spawning holds this lock (so the reaper cannot see a pid
    /// before it is here, and no two helpers inherit each other's pipes).
    watched: Mutex<HashMap<i32, Arc<Proc>>>,
    children: Condvar,
}

/// The stdio a process asks for.
pub struct StdioRequest {
    pub stdin: Option<StdioPort>,
    pub stdout: Option<StdioPort>,
    pub stderr: Option<StdioPort>,
    pub terminal: bool,
}

fn check_id(id: &str) -> Result<(), AgentError> {
    if id.is_empty() || id == "." || id == ".." || id.contains('/') || id.contains('\0') {
        return Err(AgentError::Invalid(format!("{id:?} is not a valid id")));
    }
    Ok(())
}

impl Agent {
    pub fn new(oom: Option<Arc<crate::oom::OomWatcher>>, pod_error: Option<String>) -> Self {
        Agent {
            oom,
            pod_error,
            containers: Mutex::default(),
            watched: Mutex::default(),
            children: Condvar::new(),
        }
    }

    /// Reaps children forever (PID 1's duty); run on its own thread.
    pub fn reap(&self) {
        use nix::sys::wait::{waitpid, WaitStatus};
        loop {
            let status = match waitpid(None::<Pid>, None) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, u32::try_from(code).unwrap_or(255)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as u32),
                Ok(_) | Err(nix::Error::EINTR) => continue,
                Err(_) => {
                    // No children: wait until one is spawned.
                    let g = lock(&self.watched);
                    drop(
                        self.children
                            .wait_timeout(g, Duration::from_secs(1))
                            .map_err(|e| e.into_inner()),
                    );
                    continue;
                }
            };
            let (pid, code) = status;
            let Some(proc) = lock(&self.watched).remove(&pid.as_raw()) else {
                continue;
            };
            let spawned = std::thread::Builder::new().name("exit".into()).spawn({
                let proc = proc.clone();
                move || proc.finish(code)
            });
            if spawned.is_err() {
                proc.finish(code);
            }
        }
    }

    pub fn create(
        &self,
        id: &str,
        rootfs: &kestrel_agent_protocol::protos::api::Mount,
        config: ContainerConfig,
        io: StdioRequest,
    ) -> Result<u32, AgentError> {
        check_id(id)?;
        if let Some(e) = &self.pod_error {
            return Err(AgentError::Pod(e.clone()));
        }
        if lock(&self.containers).contains_key(id) {
            return Err(AgentError::Exists(format!("container {id}")));
        }
        let dir = Path::new(RUN_DIR).join(id);
        let result = self.create_in(id, &dir, rootfs, config, io);
        if result.is_err() {
            cleanup_dir(&dir, &cgroup::path(id));
        }
        let (container, pid) = result?;
        lock(&self.containers).insert(id.to_string(), container);
        Ok(pid)
    }

    fn create_in(
        &self,
        id: &str,
        dir: &Path,
        rootfs_mount: &kestrel_agent_protocol::protos::api::Mount,
        config: ContainerConfig,
        io: StdioRequest,
    ) -> Result<(Container, u32), AgentError> {
        let rootfs = dir.join("rootfs");
        fs::create_dir_all(&rootfs).map_err(io_err(format!("create {}", rootfs.display())))?;
        mount_rootfs(rootfs_mount, &rootfs)?;
        let copied = crate::volumes::place(&dir.join("copied"), &config.copied)?;
        let mut devices = Vec::new();
        for d in &config.block_devices {
            devices.push((d.path.clone(), disk_by_serial(&d.serial, Some(d.size))?));
        }
        let group = cgroup::path(id);
        fs::create_dir_all(&group).map_err(io_err(format!("create cgroup {}", group.display())))?;
        let spec = config.spec;
        let linux = spec.linux().clone().unwrap_or_default();
        if let Some(r) = linux.resources() {
            apply_resources(&group, r)?;
        }
        let process = spec
            .process()
            .clone()
            .ok_or_else(|| AgentError::Invalid("the spec has no process".into()))?;
        let mode = Mode::Init {
            rootfs: rootfs.clone(),
            readonly: spec
                .root()
                .as_ref()
                .and_then(|r| r.readonly())
                .unwrap_or(false),
            hostname: spec.hostname().clone(),
            share_uts: !own_namespace(&spec, LinuxNamespaceType::Uts),
            share_ipc: !own_namespace(&spec, LinuxNamespaceType::Ipc),
            devices,
            mounts: spec.mounts().clone().unwrap_or_default(),
            copied,
            masked: linux.masked_paths().clone().unwrap_or_default(),
            readonly_paths: linux.readonly_paths().clone().unwrap_or_default(),
        };
        let seccomp = linux.seccomp().clone();
        let init = self.spawn(process, &group, mode, seccomp.clone(), io)?;
        let pid = init.pid;
        let oom_watch = self.oom.as_ref().and_then(|w| match w.watch(id, &group) {
            Ok(wd) => Some(wd),
            Err(e) => {
                log::warn!("container {id}: OOM kills are not reported: {e}");
                None
            }
        });
        Ok((
            Container {
                dir: dir.to_path_buf(),
                seccomp,
                oom_watch,
                rootfs,
                cgroup: group,
                init,
                execs: HashMap::new(),
            },
            pid,
        ))
    }

    /// Spawns the helper for `process` and waits until it is set up (or failed).
    fn spawn(
        &self,
        process: Process,
        group: &Path,
        mode: Mode,
        seccomp: Option<kestrel_agent_protocol::oci_spec::runtime::LinuxSeccomp>,
        io: StdioRequest,
    ) -> Result<Arc<Proc>, AgentError> {
        let connect = |port: Option<StdioPort>, name: &str| {
            port.map(stdio::connect)
                .transpose()
                .map_err(io_err(format!("connect the {name} stream to the host")))
        };
        let stdin = connect(io.stdin, "stdin")?;
        let stdout = connect(io.stdout, "stdout")?;
        let stderr = connect(io.stderr, "stderr")?;
        let terminal = io.terminal || process.terminal().unwrap_or(false);
        let mut process = process;
        process.set_terminal(Some(terminal));

        let pty = if terminal {
            Some(stdio::open_pty().map_err(io_err("open a terminal"))?)
        } else {
            None
        };
        let (report_r, report_w) = nix::unistd::pipe().map_err(nix_err("create a pipe"))?;
        let (start_r, start_w) = nix::unistd::pipe().map_err(nix_err("create a pipe"))?;
        for fd in [&report_r, &start_w] {
            nix::fcntl::fcntl(
                fd.as_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(nix_err("set close-on-exec"))?;
        }
        let config = HelperConfig {
            report_fd: report_w.as_raw_fd(),
            start_fd: start_r.as_raw_fd(),
            process,
            cgroup: group.to_path_buf(),
            mode,
            seccomp,
        };
        let json = serde_json::to_string(&config)
            .map_err(|e| AgentError::Invalid(format!("cannot encode the process: {e}")))?;
        let mut cmd = Command::new("/proc/self/exe");
        cmd.env_clear().env(CONFIG_ENV, json);
        let slave_stdio = |slave: &OwnedFd| -> Result<Stdio, AgentError> {
            Ok(Stdio::from(
                slave
                    .try_clone()
                    .map_err(io_err("duplicate the terminal"))?,
            ))
        };
        match &pty {
            Some((_, slave)) => {
                cmd.stdin(slave_stdio(slave)?)
                    .stdout(slave_stdio(slave)?)
                    .stderr(slave_stdio(slave)?);
            }
            None => {
                let piped = |s: &Option<File>| {
                    if s.is_some() {
                        Stdio::piped()
                    } else {
                        Stdio::null()
                    }
                };
                cmd.stdin(piped(&stdin))
                    .stdout(piped(&stdout))
                    .stderr(piped(&stderr));
            }
        }

        let mut watched = lock(&self.watched);
        let mut child = cmd.spawn().map_err(io_err("spawn the container process"))?;
        drop((report_w, start_r));
        let pid = child.id();
        let mut outputs = stdio::Outputs::default();
        let relay = |r: io::Result<()>| r.map_err(io_err("start a stdio thread"));
        let master = match pty {
            Some((master, slave)) => {
                drop(slave);
                let dup = || master.try_clone().map_err(io_err("duplicate the terminal"));
                if let Some(out) = stdout {
                    relay(outputs.copy("tty", dup()?, out))?;
                }
                if let Some(input) = stdin {
                    relay(stdio::copy_input(input, dup()?))?;
                }
                Some(master)
            }
            None => {
                if let (Some(out), Some(p)) = (stdout, child.stdout.take()) {
                    relay(outputs.copy("stdout", File::from(OwnedFd::from(p)), out))?;
                }
                if let (Some(err), Some(p)) = (stderr, child.stderr.take()) {
                    relay(outputs.copy("stderr", File::from(OwnedFd::from(p)), err))?;
                }
                if let (Some(input), Some(p)) = (stdin, child.stdin.take()) {
                    relay(stdio::copy_input(input, File::from(OwnedFd::from(p))))?;
                }
                None
            }
        };
        let proc = Arc::new(Proc {
            pid,
            start: Mutex::new(Some(File::from(start_w))),
            report: Mutex::new(None),
            pty: master,
            outputs: Mutex::new(Some(outputs)),
            exit: Mutex::new(None),
            exited: Condvar::new(),
        });
        watched.insert(pid as i32, proc.clone());
        drop(watched);
        self.children.notify_one();

        let mut report = File::from(report_r);
        let line = read_line(&mut report);
        if line.trim() != "ok" {
            return Err(AgentError::Setup(if line.is_empty() {
                "the container process died while being set up".into()
            } else {
                line.trim().to_string()
            }));
        }
        *lock(&proc.report) = Some(report);
        Ok(proc)
    }

    fn with<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Container) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        let mut all = lock(&self.containers);
        let c = all
            .get_mut(id)
            .ok_or_else(|| AgentError::NoContainer(id.to_string()))?;
        f(c)
    }

    pub fn process(&self, id: &str, exec: &str) -> Result<Arc<Proc>, AgentError> {
        self.with(id, |c| {
            if exec.is_empty() {
                Ok(c.init.clone())
            } else {
                c.execs
                    .get(exec)
                    .cloned()
                    .ok_or_else(|| AgentError::NoProcess {
                        id: id.to_string(),
                        exec: exec.to_string(),
                    })
            }
        })
    }

    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: Process,
        io: StdioRequest,
    ) -> Result<(), AgentError> {
        check_id(exec_id)?;
        let (group, init_pid, seccomp) = self.with(id, |c| {
            if c.execs.contains_key(exec_id) {
                return Err(AgentError::Exists(format!("exec {exec_id} of {id}")));
            }
            if c.init.exit().is_some() {
                return Err(AgentError::Exited(id.to_string()));
            }
            Ok((c.cgroup.clone(), c.init.pid as i32, c.seccomp.clone()))
        })?;
        let proc = self.spawn(process, &group, Mode::Exec { init_pid }, seccomp, io)?;
        self.with(id, |c| {
            c.execs.insert(exec_id.to_string(), proc);
            Ok(())
        })
    }

    /// Lets a created process exec; fails with the helper's reason if the exec failed.
    pub fn start(&self, id: &str, exec: &str) -> Result<u32, AgentError> {
        let proc = self.process(id, exec)?;
        let Some(mut start) = lock(&proc.start).take() else {
            return Err(AgentError::Invalid(format!(
                "process {} was already started",
                proc.pid
            )));
        };
        start.write_all(&[1]).map_err(io_err("start the process"))?;
        drop(start);
        let report = lock(&proc.report).take();
        if let Some(mut report) = report {
            let mut why = String::new();
            let _ = report.read_to_string(&mut why);
            if !why.trim().is_empty() {
                return Err(AgentError::Setup(why.trim().to_string()));
            }
        }
        Ok(proc.pid)
    }

    pub fn kill(&self, id: &str, exec: &str, signal: u32, all: bool) -> Result<(), AgentError> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| AgentError::Invalid(format!("{signal} is not a signal")))?;
        let proc = self.process(id, exec)?;
        if all && exec.is_empty() {
            let group = self.with(id, |c| Ok(c.cgroup.clone()))?;
            for pid in cgroup::pids(&group).map_err(io_err("list the container's processes"))? {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig);
            }
            return Ok(());
        }
        if proc.exit().is_some() {
            return Err(AgentError::Exited(
                format!("{id} {exec}").trim().to_string(),
            ));
        }
        nix::sys::signal::kill(Pid::from_raw(proc.pid as i32), sig)
            .map_err(nix_err(format!("signal pid {}", proc.pid)))
    }

    /// Removes a stopped process; for the init, the whole container (every process left in
    /// its cgroup is killed, its rootfs unmounted).
    pub fn delete(&self, id: &str, exec: &str) -> Result<Option<Exit>, AgentError> {
        let mut all = lock(&self.containers);
        let c = all
            .get_mut(id)
            .ok_or_else(|| AgentError::NoContainer(id.to_string()))?;
        if !exec.is_empty() {
            let p = c.execs.get(exec).ok_or_else(|| AgentError::NoProcess {
                id: id.to_string(),
                exec: exec.to_string(),
            })?;
            if p.exit().is_none() && lock(&p.start).is_none() {
                return Err(AgentError::Running(format!("exec {exec} of {id}")));
            }
            let exit = p.exit();
            c.execs.remove(exec);
            return Ok(exit);
        }
        if c.init.exit().is_none() && lock(&c.init.start).is_none() {
            return Err(AgentError::Running(format!("container {id}")));
        }
        let Some(c) = all.remove(id) else {
            return Err(AgentError::NoContainer(id.to_string()));
        };
        drop(all);
        let exit = c.init.exit();
        if let (Some(w), Some(wd)) = (&self.oom, c.oom_watch) {
            w.unwatch(wd);
        }
        for pid in cgroup::pids(&c.cgroup).unwrap_or_default() {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        for _ in 0..100 {
            if cgroup::pids(&c.cgroup)
                .map(|p| p.is_empty())
                .unwrap_or(true)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::mount::umount2(&c.rootfs, nix::mount::MntFlags::MNT_DETACH);
        cleanup_dir(&c.dir, &c.cgroup);
        Ok(exit)
    }

    pub fn pids(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        let group = self.with(id, |c| Ok(c.cgroup.clone()))?;
        cgroup::pids(&group).map_err(io_err("list the container's processes"))
    }

    pub fn metrics(
        &self,
        id: &str,
    ) -> Result<kestrel_agent_protocol::protos::cgroups_v2::metrics::Metrics, AgentError> {
        let group = self.with(id, |c| Ok(c.cgroup.clone()))?;
        Ok(cgroup::metrics(&group))
    }

    pub fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), AgentError> {
        let group = self.with(id, |c| Ok(c.cgroup.clone()))?;
        apply_resources(&group, resources)
    }
}

fn apply_resources(group: &Path, r: &LinuxResources) -> Result<(), AgentError> {
    cgroup::apply(group, r).map_err(|(what, source)| AgentError::Io { what, source })
}

fn read_line(f: &mut File) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while let Ok(1) = f.read(&mut b) {
        if b[0] == b'\n' {
            break;
        }
        out.push(b[0]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn cleanup_dir(dir: &Path, group: &Path) {
    let rootfs = dir.join("rootfs");
    let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            log::warn!("cannot remove {}: {e}", dir.display());
        }
    }
    let _ = fs::remove_dir(group);
}

/// The disk with virtio serial `serial` (`/dev/vdX`), once it has `size` bytes when a size
/// is announced (see [`await_size`]).
fn disk_by_serial(serial: &str, size: Option<u64>) -> Result<PathBuf, AgentError> {
    let (device, sysfs) = device_by_serial(serial)?;
    if let Some(size) = size {
        await_size(&device, &sysfs, serial, size)?;
    }
    Ok(device)
}

/// The block device whose virtio serial is `serial` (`/dev/vdX`) and its sysfs directory.
fn device_by_serial(serial: &str) -> Result<(PathBuf, PathBuf), AgentError> {
    let entries = fs::read_dir("/sys/block").map_err(io_err("list /sys/block"))?;
    for e in entries.flatten() {
        let name = e.file_name();
        let found = fs::read_to_string(e.path().join("serial"))
            .map(|s| s.trim_end_matches(['\n', '\0']) == serial)
            .unwrap_or(false);
        if found {
            return Ok((Path::new("/dev").join(name), e.path()));
        }
    }
    Err(AgentError::NoDisk(serial.to_string()))
}

/// How long a disk put behind a slot of a running VM may take to show its size (the
/// kernel handles the config-change interrupt in a work queue).
const DISK_SIZE_WAIT: Duration = Duration::from_secs(10);

/// Waits until the block device at `sysfs` has `want` bytes; then drops whatever the
/// kernel cached of the slot's previous disk.
fn await_size(device: &Path, sysfs: &Path, serial: &str, want: u64) -> Result<(), AgentError> {
    let deadline = std::time::Instant::now() + DISK_SIZE_WAIT;
    let size_of = || {
        fs::read_to_string(sysfs.join("size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(0, |sectors| sectors.saturating_mul(512))
    };
    loop {
        let have = size_of();
        if have == want {
            break;
        }
        if std::time::Instant::now() >= deadline {
            return Err(AgentError::DiskSize {
                serial: serial.to_string(),
                want,
                have,
                secs: DISK_SIZE_WAIT.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let dev = File::open(device).map_err(io_err(format!("open {}", device.display())))?;
    nix::fcntl::posix_fadvise(
        &dev,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .map_err(nix_err(format!(
        "drop the page cache of {}",
        device.display()
    )))
}

fn mount_rootfs(
    m: &kestrel_agent_protocol::protos::api::Mount,
    target: &Path,
) -> Result<(), AgentError> {
    use nix::mount::MsFlags;
    let serial = m.source.strip_prefix(SERIAL_PREFIX).ok_or_else(|| {
        AgentError::Invalid(format!(
            "rootfs source {:?} is not {SERIAL_PREFIX}<disk serial>",
            m.source
        ))
    })?;
    let device = disk_by_serial(serial, kestrel_agent_protocol::mount_size(m))?;
    let mut flags = MsFlags::empty();
    if m.options.iter().any(|o| o == "ro") {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(
        Some(&device),
        target,
        Some(m.type_.as_str()),
        flags,
        None::<&str>,
    )
    .map_err(nix_err(format!(
        "mount {} ({}) on {}",
        device.display(),
        m.type_,
        target.display()
    )))
}
