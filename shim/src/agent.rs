//! A VM running kestrel's guest agent, and the shim's client to it.
//!
//! [`AgentVm::boot`] builds the VM (our kernel, the agent's initramfs, the first
//! container's root disk, vsock) and connects to the agent's ttrpc server through the hybrid
//! vsock socket (`CONNECT 1024`), retrying until the agent listens. Requests are containerd's
//! own task API, forwarded with the rootfs, the spec and stdio rewritten (see
//! `kestrel_agent_protocol`).
//!
//! stdio: for every stream containerd gave a FIFO for, the shim listens at `<vsock>_<port>`
//! before it sends the request; the agent connects there from the guest. One tokio task per
//! stream copies between the connection and the FIFO. Output tasks end at the stream's EOF
//! and close their FIFO; [`AgentVm::wait`] awaits them after the agent's Wait answered (the
//! agent answers only after the process's output left the guest), so containerd sees EOF
//! before the exit. stdin ends with containerd's CloseIO: the shim shuts its side down.
//!
//! Runs on the shim's tokio runtime; the VMM thread is reached only through the control
//! channel, and the VM build through the blocking pool.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use containerd_shim::api::{
    CloseIORequest, CreateTaskRequest, DeleteRequest, ExecProcessRequest, KillRequest, PidsRequest,
    ResizePtyRequest, StartRequest, StatsRequest, UpdateTaskRequest, WaitRequest,
};
use containerd_shim::protos::api::ProcessInfo;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::shim_async::TaskClient;
use containerd_shim::protos::ttrpc::{self, Code};
use devices::disk::{DiskBackend, EmptyDisk};
use devices::virtio::net::MacAddr;
use devices::virtio::RateLimitedLog;
use kestrel_agent_protocol::{
    pod::PodConfig, BlockDevice, Call, ContainerConfig, GuestEvent, Reply, StdioPort, AGENT_PORT,
    CALL_METHOD, EVENTS_PORT, KESTREL_SERVICE, MAX_EVENT_LINE, SERVE_PARAM,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use vmm::{
    ControlSender, DiskConfig, NetConfig, TapSource, VmAction, VmConfig, VmExit, VsockConfig,
};

use crate::guest::{GuestError, NewContainer, NewExec, Stdio};
use crate::host::log_timing;
use crate::volumes::{self, HostCopy};

/// The guest's vsock CID.
pub const GUEST_CID: u64 = 3;
/// How long output may take to reach containerd after the agent reported an exit.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// First port of the stdio streams (the agent listens on [`AGENT_PORT`]).
const FIRST_STDIO_PORT: u32 = 0x1_0000;

/// Why an agent VM could not be booted or reached.
#[derive(Debug, thiserror::Error)]
pub enum AgentVmError {
    #[error("no guest asset")]
    Asset(#[source] vmm::assets::AssetError),
    #[error("cannot create {}", .0.display())]
    Dir(PathBuf, #[source] io::Error),
    #[error("cannot build the VM")]
    Build(#[source] vmm::BuildVmError),
    #[error("the VM ended before its agent answered ({exit}); last console lines:\n{console}")]
    Ended { exit: String, console: String },
    #[error("the guest agent did not answer within {secs} s; last console lines:\n{console}")]
    Timeout { secs: u64, console: String },
    #[error("the blocking pool failed")]
    Join(#[source] tokio::task::JoinError),
}

/// The last bytes of the guest's console (kernel messages and the agent's own lines), kept
/// for error messages. Written by vCPU threads one byte at a time: never blocks.
#[derive(Clone, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

const TAIL_BYTES: usize = 8 << 10;

impl ConsoleTail {
    fn lock(&self) -> MutexGuard<'_, VecDeque<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last `n` lines.
    pub fn lines(&self, n: usize) -> String {
        let bytes: Vec<u8> = self.lock().iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        let skip = lines.len().saturating_sub(n);
        lines.into_iter().skip(skip).collect::<Vec<_>>().join("\n")
    }
}

impl Write for ConsoleTail {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut buf = self.lock();
        buf.extend(data);
        let excess = buf.len().saturating_sub(TAIL_BYTES);
        buf.drain(..excess);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The VM to boot for containers.
pub struct BootSpec {
    /// The task the VM is booted for (for the logs).
    pub task: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub extra_cmdline: Option<String>,
    /// The container disk slots, in order: a lone container's root disk (with the id of
    /// its container), or a pod's empty placeholders that containers take later
    /// ([`AgentVm::attach_disk`]).
    pub slots: Vec<(Option<String>, DiskConfig)>,
    /// The pod network's tap and the MAC the guest NIC takes (the pod veth's).
    pub net: Option<(OwnedFd, MacAddr)>,
    /// What the agent sets up before it serves (hostname, pod network).
    pub pod: Option<PodConfig>,
    /// Where the vsock sockets live (removed with the VM).
    pub dir: PathBuf,
    pub agent_timeout: Duration,
    /// Called with every event the agent reports (OOM kills).
    pub on_event: Box<dyn Fn(GuestEvent) + Send + Sync>,
}

/// The stdio relays of one process.
#[derive(Default)]
struct ProcIo {
    outputs: Vec<JoinHandle<()>>,
    tasks: Vec<tokio::task::AbortHandle>,
    stdin_close: Option<Arc<Notify>>,
}

impl ProcIo {
    fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub struct AgentVm {
    client: TaskClient,
    control: ControlSender,
    dir: PathBuf,
    vsock: PathBuf,
    next_port: AtomicU32,
    io: Mutex<HashMap<(String, String), ProcIo>>,
    exit: watch::Receiver<Option<VmExit>>,
    console: ConsoleTail,
    events: tokio::task::AbortHandle,
    /// Which container holds each disk slot.
    slots: Arc<Mutex<Vec<Option<String>>>>,
    next_serial: AtomicU32,
    /// The same connection, for kestrel's own calls.
    raw: ttrpc::asynchronous::Client,
    volumes: Arc<Mutex<HashMap<String, Volume>>>,
    /// Per container, the sources of the files copied back out at its exit.
    copy_out: Mutex<HashMap<String, Vec<String>>>,
    watcher: tokio::task::AbortHandle,
}

/// A host source copied into the VM, and who mounts it.
struct Volume {
    fingerprint: u64,
    users: Vec<String>,
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(0)
}

fn agent_err(e: ttrpc::Error) -> GuestError {
    match e {
        ttrpc::Error::RpcStatus(s) => GuestError::Agent {
            code: s.code.enum_value_or_default(),
            message: s.message,
        },
        other => GuestError::Transport(other),
    }
}

/// Opens a host → guest stream to `port` through the hybrid vsock socket.
pub async fn connect_port(vsock: &Path, port: u32) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(vsock).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    let mut line = Vec::new();
    loop {
        let b = s.read_u8().await?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad vsock handshake",
            ));
        }
    }
    if line.starts_with(b"OK ") {
        Ok(s)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad vsock handshake",
        ))
    }
}

fn host_err(what: &str, e: AgentVmError) -> GuestError {
    let code = match e {
        AgentVmError::Asset(_) => Code::FAILED_PRECONDITION,
        AgentVmError::Ended { .. } | AgentVmError::Timeout { .. } => Code::UNAVAILABLE,
        _ => Code::INTERNAL,
    };
    GuestError::host(what, code, e)
}

impl AgentVm {
    /// Boots the VM and waits until its agent answers.
    pub async fn boot(spec: BootSpec) -> Result<Arc<AgentVm>, GuestError> {
        let err = |e| host_err("boot the VM for the container", e);
        let kernel = vmm::assets::default_asset(vmm::assets::KERNEL)
            .map_err(|e| err(AgentVmError::Asset(e)))?;
        let initrd = vmm::assets::default_asset(vmm::assets::INITRD)
            .map_err(|e| err(AgentVmError::Asset(e)))?;
        let seccomp = crate::host::seccomp_level()?;
        tokio::fs::create_dir_all(&spec.dir)
            .await
            .map_err(|e| err(AgentVmError::Dir(spec.dir.clone(), e)))?;
        let vsock = spec.dir.join("vsock");
        let _ = tokio::fs::remove_file(&vsock).await;
        // The agent connects here at boot to report events: listen before the VM runs.
        let events_path = PathBuf::from(format!("{}_{EVENTS_PORT}", vsock.display()));
        let _ = tokio::fs::remove_file(&events_path).await;
        let events_listener = UnixListener::bind(&events_path).map_err(|e| {
            GuestError::host(
                format!("listen at {}", events_path.display()),
                Code::INTERNAL,
                e,
            )
        })?;
        let slots: Arc<Mutex<Vec<Option<String>>>> = Arc::new(Mutex::new(
            spec.slots.iter().map(|(owner, _)| owner.clone()).collect(),
        ));
        let events =
            tokio::spawn(read_events(events_listener, slots.clone(), spec.on_event)).abort_handle();

        let console = ConsoleTail::default();
        let mut config = VmConfig::new(kernel);
        config.seccomp = seccomp;
        // Seeds the guest's RNG at boot: a container's first getrandom() must not block.
        config.rng = true;
        config.initrd = Some(initrd);
        // `quiet`: every console byte is an exit to the VMM; the tail is kept for errors.
        config.cmdline = format!("{} quiet {SERVE_PARAM}", vmm::DEFAULT_CMDLINE);
        if let Some(extra) = spec
            .extra_cmdline
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            vmm::config::append_cmdline(&mut config.cmdline, extra);
        }
        if let Some(pod) = &spec.pod {
            let param = pod
                .to_param()
                .map_err(|e| GuestError::host("encode the pod configuration", Code::INTERNAL, e))?;
            vmm::config::append_cmdline(&mut config.cmdline, &param);
        }
        config.vcpus = spec.vcpus;
        config.memory_mib = spec.memory_mib;
        config
            .disks
            .extend(spec.slots.into_iter().map(|(_, disk)| disk));
        if let Some((tap, mac)) = spec.net {
            config.nets.push(NetConfig {
                tap: TapSource::Fd(tap),
                mac: Some(mac),
                dhcp: None,
            });
        }
        config.vsock = Some(VsockConfig {
            cid: GUEST_CID,
            socket: vsock.clone(),
        });
        config.console_out = Box::new(console.clone());
        let (exit_tx, exit) = watch::channel(None);
        config.on_exit = Some(Box::new(move |e: &VmExit| {
            exit_tx.send_replace(Some(e.clone()));
        }));
        let since = Instant::now();
        let built = tokio::task::spawn_blocking(move || vmm::start_vm(config))
            .await
            .map_err(AgentVmError::Join)
            .and_then(|r| r.map_err(AgentVmError::Build));
        let handle = match built {
            Ok(h) => h,
            Err(e) => {
                events.abort();
                let _ = tokio::fs::remove_dir_all(&spec.dir).await;
                return Err(err(e));
            }
        };
        log_timing(&spec.task, "vm_build", since);
        let control = handle.control();
        tokio::task::spawn_blocking(move || drop(handle.wait()));

        let started = Instant::now();
        let stream = match Self::connect_agent(&vsock, &exit, &console, spec.agent_timeout).await {
            Ok(s) => s,
            Err(e) => {
                events.abort();
                stop(&control).await;
                let _ = tokio::fs::remove_dir_all(&spec.dir).await;
                return Err(err(e));
            }
        };
        // From the VM's start to its agent's answer: the guest kernel's boot.
        log_timing(&spec.task, "agent_ready", started);
        let raw =
            ttrpc::asynchronous::Client::new(ttrpc::asynchronous::transport::Socket::new(stream));
        let client = TaskClient::new(raw.clone());
        let volumes = Arc::new(Mutex::new(HashMap::new()));
        let watcher = tokio::spawn(watch_volumes(raw.clone(), volumes.clone())).abort_handle();
        Ok(Arc::new(AgentVm {
            client,
            control,
            dir: spec.dir,
            vsock,
            next_port: AtomicU32::new(FIRST_STDIO_PORT),
            io: Mutex::new(HashMap::new()),
            exit,
            console,
            events,
            slots,
            next_serial: AtomicU32::new(1),
            raw,
            volumes,
            copy_out: Mutex::new(HashMap::new()),
            watcher,
        }))
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Option<String>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts container `id`'s root disk into a free slot of the running VM; returns the
    /// serial the guest sees it under.
    pub async fn attach_disk(
        &self,
        id: &str,
        disk: Box<dyn DiskBackend>,
    ) -> Result<String, GuestError> {
        let index = {
            let mut slots = self.slots();
            let count = slots.len();
            let free = slots.iter().position(Option::is_none).ok_or_else(|| {
                GuestError::host(
                    "add the container to the pod's VM",
                    Code::RESOURCE_EXHAUSTED,
                    io::Error::other(format!(
                        "all {count} container slots are taken (the pod annotation {} sets how many)",
                        crate::spec::ANN_SLOTS
                    )),
                )
            })?;
            if let Some(slot) = slots.get_mut(free) {
                *slot = Some(id.to_string());
            }
            free
        };
        let n = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let serial = format!("{}{n}", crate::rootfs::SERIAL_PREFIX);
        let action = VmAction::ReplaceDisk {
            index,
            disk: DiskConfig {
                backend: disk,
                serial: Some(serial.clone()),
            },
        };
        match crate::vm_image::send(&self.control, action).await {
            Ok(()) => Ok(serial),
            Err(e) => {
                if let Some(slot) = self.slots().get_mut(index) {
                    *slot = None;
                }
                Err(e)
            }
        }
    }

    /// Empties the slots of container `id` (its root disk and block volumes, after the
    /// agent deleted the container).
    pub async fn detach_disk(&self, id: &str) {
        let held: Vec<usize> = self
            .slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_deref() == Some(id))
            .map(|(i, _)| i)
            .collect();
        for index in held {
            let action = VmAction::ReplaceDisk {
                index,
                disk: DiskConfig {
                    backend: Box::new(EmptyDisk),
                    serial: None,
                },
            };
            if let Err(e) = crate::vm_image::send(&self.control, action).await {
                log::debug!("slot {index} of {id} not emptied: {e}");
            }
            if let Some(slot) = self.slots().get_mut(index) {
                *slot = None;
            }
        }
    }

    /// Whether the VM has stopped.
    pub fn ended(&self) -> Option<VmExit> {
        self.exit.borrow().clone()
    }

    /// Resolves when the VM has stopped.
    pub async fn wait_ended(&self) -> VmExit {
        let mut exit = self.exit.clone();
        let ended = match exit.wait_for(Option::is_some).await {
            Ok(e) => e.clone(),
            Err(_) => None,
        };
        ended.unwrap_or(VmExit::Stopped)
    }

    async fn connect_agent(
        vsock: &Path,
        exit: &watch::Receiver<Option<VmExit>>,
        console: &ConsoleTail,
        limit: Duration,
    ) -> Result<UnixStream, AgentVmError> {
        let deadline = Instant::now() + limit;
        let mut exit = exit.clone();
        loop {
            if let Some(e) = exit.borrow().clone() {
                return Err(AgentVmError::Ended {
                    exit: e.to_string(),
                    console: console.lines(20),
                });
            }
            // Until the guest's vsock driver runs, the device answers a CONNECT after its
            // 2 s timeout; once it runs, a port nobody listens on is refused at once.
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(5), connect_port(vsock, AGENT_PORT)).await
            {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(AgentVmError::Timeout {
                    secs: limit.as_secs(),
                    console: console.lines(20),
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = exit.changed() => {}
            }
        }
    }

    fn io(&self) -> MutexGuard<'_, HashMap<(String, String), ProcIo>> {
        self.io.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Listens for the agent's connection of one stream; returns its `vsock:<port>`.
    fn listen(&self) -> Result<(String, UnixListener, PathBuf), GuestError> {
        let port = self.next_port.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("{}_{port}", self.vsock.display()));
        let listener = UnixListener::bind(&path).map_err(|e| {
            GuestError::host(format!("listen at {}", path.display()), Code::INTERNAL, e)
        })?;
        Ok((StdioPort(port).address(), listener, path))
    }

    /// Relays for containerd's FIFOs in `stdio`; returns the ports for the request.
    fn open_stdio(&self, stdio: &Stdio) -> Result<(Stdio, ProcIo), GuestError> {
        let mut io = ProcIo::default();
        let mut ports = Stdio {
            terminal: stdio.terminal,
            ..Default::default()
        };
        let result = (|| {
            for (fifo, port) in [
                (&stdio.stdout, &mut ports.stdout),
                (&stdio.stderr, &mut ports.stderr),
            ] {
                if fifo.is_empty() {
                    continue;
                }
                let (address, listener, path) = self.listen()?;
                *port = address;
                let task = tokio::spawn(relay_out(listener, path, fifo.clone()));
                io.tasks.push(task.abort_handle());
                io.outputs.push(task);
            }
            if !stdio.stdin.is_empty() {
                let (address, listener, path) = self.listen()?;
                ports.stdin = address;
                let close = Arc::new(Notify::new());
                let task =
                    tokio::spawn(relay_in(listener, path, stdio.stdin.clone(), close.clone()));
                io.tasks.push(task.abort_handle());
                io.stdin_close = Some(close);
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok((ports, io)),
            Err(e) => {
                io.abort();
                Err(e)
            }
        }
    }

    /// Creates container `c` on the disk the guest sees as `serial` (of `size` bytes).
    pub async fn create(
        &self,
        c: &NewContainer,
        serial: &str,
        size: u64,
        copied: Vec<HostCopy>,
        block_devices: Vec<BlockDevice>,
    ) -> Result<u32, GuestError> {
        let (ports, io) = self.open_stdio(&c.stdio)?;
        let mut spec = c.spec.clone();
        if spec.hostname().as_deref().is_none_or(str::is_empty)
            && kestrel_agent_protocol::own_namespace(
                &spec,
                oci_spec::runtime::LinuxNamespaceType::Uts,
            )
        {
            // The container's UTS namespace would otherwise inherit the VM's "(none)".
            spec.set_hostname(Some(crate::spec::host_name(&c.id)));
        }
        let config = ContainerConfig {
            spec,
            copied: copied.iter().map(|c| c.mount.clone()).collect(),
            block_devices,
        };
        let options = config.to_any().map_err(|e| {
            GuestError::host("encode the container configuration", Code::INTERNAL, e)
        })?;
        let req = CreateTaskRequest {
            id: c.id.clone(),
            rootfs: vec![kestrel_agent_protocol::rootfs_mount(
                serial, "ext4", false, size,
            )],
            terminal: ports.terminal,
            stdin: ports.stdin,
            stdout: ports.stdout,
            stderr: ports.stderr,
            options: Some(options).into(),
            ..Default::default()
        };
        match self.client.create(ctx(), &req).await {
            Ok(r) => {
                self.io().insert((c.id.clone(), String::new()), io);
                self.add_volumes(&c.id, &copied);
                Ok(r.pid)
            }
            Err(e) => {
                io.abort();
                Err(agent_err(e))
            }
        }
    }

    /// Watches the container's copied sources; remembers what to copy out at its exit.
    fn add_volumes(&self, id: &str, copied: &[HostCopy]) {
        let mut volumes = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
        for c in copied {
            volumes
                .entry(c.mount.source.clone())
                .or_insert_with(|| Volume {
                    fingerprint: c.fingerprint,
                    users: Vec::new(),
                })
                .users
                .push(id.to_string());
        }
        drop(volumes);
        let out: Vec<String> = copied
            .iter()
            .filter(|c| c.copy_out)
            .map(|c| c.mount.source.clone())
            .collect();
        if !out.is_empty() {
            self.copy_out
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.to_string(), out);
        }
    }

    fn remove_volumes(&self, id: &str) {
        self.volumes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, v| {
                v.users.retain(|u| u != id);
                !v.users.is_empty()
            });
        self.copy_out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Copies what container `id` wrote into its own writable files (the termination log)
    /// back to their host sources.
    async fn copy_back(&self, id: &str) {
        let sources = self
            .copy_out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .unwrap_or_default();
        for source in sources {
            match call(
                &self.raw,
                &Call::ReadVolume {
                    source: source.clone(),
                },
            )
            .await
            {
                Ok(Reply::Data { data }) => {
                    if let Err(e) = tokio::fs::write(&source, data).await {
                        log::warn!("{id}: cannot copy {source} back out of the VM: {e}");
                    }
                }
                Ok(other) => log::warn!("{id}: the agent answered {other:?} for {source}"),
                Err(e) => log::warn!("{id}: cannot read {source} back from the VM: {e}"),
            }
        }
    }

    pub async fn start(&self, id: &str, exec: &str) -> Result<u32, GuestError> {
        let req = StartRequest {
            id: id.to_string(),
            exec_id: exec.to_string(),
            ..Default::default()
        };
        let since = Instant::now();
        let started = self.client.start(ctx(), &req).await;
        log_timing(
            id,
            if exec.is_empty() {
                "start"
            } else {
                "exec_start"
            },
            since,
        );
        started.map(|r| r.pid).map_err(agent_err)
    }

    pub async fn exec(&self, id: &str, exec: &str, p: &NewExec) -> Result<(), GuestError> {
        let (ports, io) = self.open_stdio(&p.stdio)?;
        let req = ExecProcessRequest {
            id: id.to_string(),
            exec_id: exec.to_string(),
            terminal: ports.terminal,
            stdin: ports.stdin,
            stdout: ports.stdout,
            stderr: ports.stderr,
            spec: Some(p.spec.clone()).into(),
            ..Default::default()
        };
        match self.client.exec(ctx(), &req).await {
            Ok(_) => {
                self.io().insert((id.to_string(), exec.to_string()), io);
                Ok(())
            }
            Err(e) => {
                io.abort();
                Err(agent_err(e))
            }
        }
    }

    pub async fn kill(
        &self,
        id: &str,
        exec: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), GuestError> {
        let req = KillRequest {
            id: id.to_string(),
            exec_id: exec.to_string(),
            signal,
            all,
            ..Default::default()
        };
        self.client
            .kill(ctx(), &req)
            .await
            .map(drop)
            .map_err(agent_err)
    }

    /// The exit status, once the process's output reached containerd.
    pub async fn wait(&self, id: &str, exec: &str) -> Result<u32, GuestError> {
        let req = WaitRequest {
            id: id.to_string(),
            exec_id: exec.to_string(),
            ..Default::default()
        };
        let since = Instant::now();
        let status = self
            .client
            .wait(ctx(), &req)
            .await
            .map_err(agent_err)?
            .exit_status;
        // From the model's Wait (right after Start) to the agent's answer: the process's
        // run and its exit, in the guest.
        log_timing(id, if exec.is_empty() { "run" } else { "exec_run" }, since);
        if exec.is_empty() {
            self.copy_back(id).await;
        }
        let outputs = self
            .io()
            .get_mut(&(id.to_string(), exec.to_string()))
            .map(|io| std::mem::take(&mut io.outputs))
            .unwrap_or_default();
        for out in outputs {
            if tokio::time::timeout(DRAIN_LIMIT, out).await.is_err() {
                log::warn!("{id} {exec}: output still open {DRAIN_LIMIT:?} after the exit");
            }
        }
        Ok(status)
    }

    pub async fn delete(&self, id: &str, exec: &str) -> Result<(), GuestError> {
        if let Some(io) = self.io().remove(&(id.to_string(), exec.to_string())) {
            io.abort();
        }
        if exec.is_empty() {
            self.remove_volumes(id);
        }
        let req = DeleteRequest {
            id: id.to_string(),
            exec_id: exec.to_string(),
            ..Default::default()
        };
        match self.client.delete(ctx(), &req).await {
            Ok(_) => Ok(()),
            Err(e) => match agent_err(e) {
                GuestError::Agent {
                    code: Code::NOT_FOUND,
                    ..
                } => Ok(()),
                other => Err(other),
            },
        }
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<ProcessInfo>, GuestError> {
        let req = PidsRequest {
            id: id.to_string(),
            ..Default::default()
        };
        self.client
            .pids(ctx(), &req)
            .await
            .map(|r| r.processes)
            .map_err(agent_err)
    }

    pub async fn stats(&self, id: &str) -> Result<Any, GuestError> {
        let req = StatsRequest {
            id: id.to_string(),
            ..Default::default()
        };
        let r = self.client.stats(ctx(), &req).await.map_err(agent_err)?;
        r.stats
            .into_option()
            .ok_or_else(|| GuestError::Invalid("the agent sent no statistics".into()))
    }

    pub async fn update(&self, id: &str, resources: &Any) -> Result<(), GuestError> {
        let req = UpdateTaskRequest {
            id: id.to_string(),
            resources: Some(resources.clone()).into(),
            ..Default::default()
        };
        self.client
            .update(ctx(), &req)
            .await
            .map(drop)
            .map_err(agent_err)
    }

    pub async fn resize_pty(
        &self,
        id: &str,
        exec: &str,
        width: u32,
        height: u32,
    ) -> Result<(), GuestError> {
        let req = ResizePtyRequest {
            id: id.to_string(),
            exec_id: exec.to_string(),
            width,
            height,
            ..Default::default()
        };
        self.client
            .resize_pty(ctx(), &req)
            .await
            .map(drop)
            .map_err(agent_err)
    }

    /// Ends the process's stdin: the shim shuts its side of the stream down.
    pub async fn close_io(&self, id: &str, exec: &str) -> Result<(), GuestError> {
        if let Some(close) = self
            .io()
            .get(&(id.to_string(), exec.to_string()))
            .and_then(|io| io.stdin_close.clone())
        {
            close.notify_one();
        }
        let req = CloseIORequest {
            id: id.to_string(),
            exec_id: exec.to_string(),
            stdin: true,
            ..Default::default()
        };
        self.client
            .close_io(ctx(), &req)
            .await
            .map(drop)
            .map_err(agent_err)
    }

    /// Stops the VM and removes its sockets.
    pub async fn shutdown(&self) {
        self.events.abort();
        self.watcher.abort();
        stop(&self.control).await;
        let mut exit = self.exit.clone();
        let ended = tokio::time::timeout(Duration::from_secs(10), exit.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok());
        if !ended {
            log::warn!("the VM did not stop within 10 s");
        }
        log::debug!("guest console at the end:\n{}", self.console.lines(50));
        match tokio::fs::remove_dir_all(&self.dir).await {
            Ok(()) => {}
            // Stopped before (a pod's VM stops at the sandbox's kill and again at its end).
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove {}: {e}", self.dir.display()),
        }
    }
}

/// Stops the VM; one that is gone already is fine.
async fn stop(control: &ControlSender) {
    let _ = crate::vm_image::send(control, VmAction::Stop).await;
}

/// One of kestrel's own calls to the agent ([`KESTREL_SERVICE`]).
pub async fn call(client: &ttrpc::asynchronous::Client, c: &Call) -> Result<Reply, GuestError> {
    let payload = c
        .encode()
        .map_err(|e| GuestError::host("encode a call to the agent", Code::INTERNAL, e))?;
    let req = ttrpc::Request {
        service: KESTREL_SERVICE.to_string(),
        method: CALL_METHOD.to_string(),
        payload,
        ..Default::default()
    };
    let res = client.request(req).await.map_err(GuestError::Transport)?;
    if let Some(status) = res
        .status
        .as_ref()
        .filter(|s| s.code.enum_value_or_default() != Code::OK)
    {
        return Err(GuestError::Agent {
            code: status.code.enum_value_or_default(),
            message: status.message.clone(),
        });
    }
    Reply::decode(&res.payload)
        .map_err(|e| GuestError::host("decode the agent's answer", Code::INTERNAL, e))
}

/// Every [`volumes::POLL`], sends the guest each copied source that changed on the host.
async fn watch_volumes(
    client: ttrpc::asynchronous::Client,
    volumes: Arc<Mutex<HashMap<String, Volume>>>,
) {
    loop {
        tokio::time::sleep(volumes::POLL).await;
        let known: Vec<(String, u64)> = volumes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(s, v)| (s.clone(), v.fingerprint))
            .collect();
        if known.is_empty() {
            continue;
        }
        let changed = tokio::task::spawn_blocking(move || {
            known
                .into_iter()
                .filter_map(|(source, old)| {
                    let path = Path::new(&source);
                    let now = volumes::fingerprint(path);
                    if now == old || now == 0 {
                        return None;
                    }
                    let mut budget = kestrel_agent_protocol::MAX_COPIED_BYTES;
                    match volumes::copy_tree(path, &mut budget) {
                        Ok(entries) => Some((source, now, entries)),
                        Err(e) => {
                            log::warn!("volume {source} changed but cannot be copied: {e}");
                            None
                        }
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (source, fingerprint, entries) in changed {
            let sync = Call::SyncVolume {
                source: source.clone(),
                entries,
            };
            match call(&client, &sync).await {
                Ok(_) => {
                    log::info!("volume {source} changed on the host: synced into the VM");
                    if let Some(v) = volumes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_mut(&source)
                    {
                        v.fingerprint = fingerprint;
                    }
                }
                Err(GuestError::Transport(_)) => return,
                Err(e) => log::warn!("volume {source}: {e}"),
            }
        }
    }
}

/// Reads the agent's events stream until the VM is gone; `slots` names the VM's
/// containers.
async fn read_events(
    listener: UnixListener,
    slots: Arc<Mutex<Vec<Option<String>>>>,
    on_event: Box<dyn Fn(GuestEvent) + Send + Sync>,
) {
    let Ok((stream, _)) = listener.accept().await else {
        return;
    };
    let owns = |id: &str| {
        slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|s| s.as_deref() == Some(id))
    };
    read_event_stream(stream, owns, on_event).await;
}

/// Reads an events stream (one JSON object a line, [`GuestEvent`]) until it ends, and
/// hands each event to `on_event`. The agent may be compromised: a line that does not
/// decode is logged and skipped, one longer than [`MAX_EVENT_LINE`] ends the stream (the
/// shim never holds more of it), and an OOM kill of a container `owns` does not know is
/// dropped (it would reach containerd as another task's event).
pub async fn read_event_stream(
    stream: impl tokio::io::AsyncRead + Unpin,
    owns: impl Fn(&str) -> bool,
    on_event: impl Fn(GuestEvent),
) {
    use tokio::io::AsyncBufReadExt;
    let mut reader = tokio::io::BufReader::new(stream);
    let mut line = Vec::new();
    // A compromised agent may send bad lines without end: containerd's log gets a few.
    let mut log = RateLimitedLog::default();
    loop {
        line.clear();
        let limit = (MAX_EVENT_LINE + 1) as u64;
        match (&mut reader).take(limit).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) if line.last() != Some(&b'\n') && line.len() > MAX_EVENT_LINE => {
                log::warn!(
                    "the guest agent sent an event line over {MAX_EVENT_LINE} bytes: events stream closed"
                );
                return;
            }
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        match GuestEvent::from_line(&text) {
            Ok(GuestEvent::Oom { container_id }) if !owns(&container_id) => {
                log.warn(format_args!(
                    "the guest agent reports an OOM kill in {container_id:?}, which is not a container of this VM: ignored"
                ));
            }
            Ok(event) => on_event(event),
            Err(e) => {
                log.warn(format_args!(
                    "the guest agent sent a bad event {:?}: {e}",
                    text.trim_end()
                ));
            }
        }
    }
}

/// The agent's one connection to a stdio listener; the listener and its socket file go
/// right after (each stream is connected once).
async fn accept_once(listener: UnixListener, path: &Path) -> Option<UnixStream> {
    let accepted = listener.accept().await;
    drop(listener);
    let _ = tokio::fs::remove_file(path).await;
    accepted.ok().map(|(stream, _)| stream)
}

/// Copies the agent's stream of one output into containerd's FIFO, then closes it.
async fn relay_out(listener: UnixListener, path: PathBuf, fifo: String) {
    let Some(mut stream) = accept_once(listener, &path).await else {
        return;
    };
    // A `file://` URI's file is appended to; a FIFO is opened read-write, so opening never
    // fails or blocks for want of a reader.
    let out: io::Result<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> =
        match crate::console::log_file(&fifo) {
            Some(file) => tokio::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .open(file)
                .await
                .map(|f| Box::new(f) as _),
            None => pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(&fifo)
                .map(|p| Box::new(p) as _),
        };
    match out {
        Ok(mut out) => {
            if let Err(e) = tokio::io::copy(&mut stream, &mut out).await {
                log::debug!("output to {fifo} ended: {e}");
            }
        }
        Err(e) => {
            log::warn!("cannot open {fifo}: {e}; the output is discarded");
            let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
        }
    }
}

/// Copies containerd's stdin FIFO into the agent's stream until CloseIO, then shuts the
/// stream's write side down (the process sees EOF).
async fn relay_in(listener: UnixListener, path: PathBuf, fifo: String, close: Arc<Notify>) {
    let Some(mut stream) = accept_once(listener, &path).await else {
        return;
    };
    // Read-only: EOF once containerd's writer has come and gone (a FIFO that never had a
    // writer is simply not readable yet); CloseIO ends it too.
    let mut input = match pipe::OpenOptions::new().open_receiver(&fifo) {
        Ok(i) => i,
        Err(e) => {
            log::warn!("cannot open {fifo}: {e}; stdin is closed");
            let _ = stream.shutdown().await;
            return;
        }
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            r = input.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let Some(chunk) = buf.get(..n) else { break };
                    if stream.write_all(chunk).await.is_err() {
                        break;
                    }
                }
            },
            _ = close.notified() => {
                // What the writer left in the FIFO before CloseIO still goes in.
                while let Ok(n) = input.try_read(&mut buf) {
                    let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) else { break };
                    if stream.write_all(chunk).await.is_err() {
                        break;
                    }
                }
                break;
            }
        }
    }
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn events_of(stream: &[u8]) -> Vec<GuestEvent> {
        let seen = Mutex::new(Vec::new());
        let owns = |id: &str| id == "c1";
        read_event_stream(stream, owns, |e| seen.lock().unwrap().push(e)).await;
        seen.into_inner().unwrap()
    }

    #[tokio::test]
    async fn events_of_a_compromised_agent_are_bounded() {
        let oom = |id: &str| GuestEvent::Oom {
            container_id: id.into(),
        };
        // Bad lines are skipped; an OOM kill of another VM's container never reaches
        // containerd; the last line needs no newline.
        let stream = b"{\"event\":\"oom\",\"container_id\":\"c1\"}\nnot json\n\
            {\"event\":\"oom\",\"container_id\":\"other-pod\"}\n\xff\xfe\n\
            {\"event\":\"listening\",\"ports\":[80,22,80]}";
        assert_eq!(
            events_of(stream).await,
            [
                oom("c1"),
                GuestEvent::Listening {
                    ports: vec![22, 80]
                }
            ]
        );
        // A line up to the limit is read; a longer one ends the stream.
        let padded = |n: usize| {
            let mut l = b"{\"event\":\"oom\",\"container_id\":\"c1\"}".to_vec();
            l.resize(n, b' ');
            l.push(b'\n');
            l
        };
        let mut stream = padded(MAX_EVENT_LINE);
        stream.extend(padded(MAX_EVENT_LINE + 1));
        stream.extend(padded(40));
        assert_eq!(events_of(&stream).await, [oom("c1")]);
    }
}
