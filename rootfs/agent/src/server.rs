//! The agent's ttrpc server: containerd's task API (`containerd.task.v2.Task`) on vsock
//! port [`AGENT_PORT`], each call mapped onto [`Agent`]. Errors leave with real gRPC codes
//! so the shim can pass them on to containerd unchanged.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use kestrel_agent_protocol::netlink::Netlink;
use kestrel_agent_protocol::oci_spec::runtime::{LinuxResources, Process};
use kestrel_agent_protocol::pod::PodConfig;
use kestrel_agent_protocol::protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PidsRequest,
    PidsResponse, ProcessInfo, ResizePtyRequest, ShutdownRequest, StartRequest, StartResponse,
    StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use kestrel_agent_protocol::protos::protobuf::well_known_types::any::Any;
use kestrel_agent_protocol::protos::protobuf::well_known_types::timestamp::Timestamp;
use kestrel_agent_protocol::protos::protobuf::Message;
use kestrel_agent_protocol::protos::shim_sync::{create_task, Task};
use kestrel_agent_protocol::protos::ttrpc::{self, Code, TtrpcContext};
use kestrel_agent_protocol::{
    Call, ContainerConfig, Reply, StdioPort, AGENT_PORT, CALL_METHOD, KESTREL_SERVICE,
};
use rustix::mount::{mount, MountFlags};

use crate::container::{Agent, AgentError, Exit, StdioRequest};
use crate::{cgroup, Error};

impl AgentError {
    fn code(&self) -> Code {
        match self {
            AgentError::NoContainer(_) | AgentError::NoProcess { .. } | AgentError::Exited(_) => {
                Code::NOT_FOUND
            }
            AgentError::Exists(_) => Code::ALREADY_EXISTS,
            AgentError::Invalid(_) | AgentError::NoDisk(_) => Code::INVALID_ARGUMENT,
            AgentError::DiskSize { .. } => Code::UNAVAILABLE,
            AgentError::Pod(_) => Code::FAILED_PRECONDITION,
            AgentError::Running(_) => Code::FAILED_PRECONDITION,
            // The process could not be set up from its spec (a missing binary, a bad mount).
            AgentError::Setup(_) => Code::FAILED_PRECONDITION,
            AgentError::Io { .. } => Code::INTERNAL,
        }
    }
}

/// An error and its causes on one line, outermost first (`what: why: why…`).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cur = c.source();
    }
    msg
}

fn status(e: AgentError) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), error_chain(&e)))
}

fn invalid(msg: String) -> ttrpc::Error {
    status(AgentError::Invalid(msg))
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

fn stdio(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> ttrpc::Result<StdioRequest> {
    let port = |s: &str| StdioPort::parse(s).map_err(|e| invalid(e.to_string()));
    Ok(StdioRequest {
        stdin: port(stdin)?,
        stdout: port(stdout)?,
        stderr: port(stderr)?,
        terminal,
    })
}

struct Service {
    agent: Arc<Agent>,
}

impl Task for Service {
    fn create(
        &self,
        _: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        let options = req
            .options
            .as_ref()
            .ok_or_else(|| invalid("CreateTaskRequest has no container configuration".into()))?;
        let config = ContainerConfig::from_any(options).map_err(|e| invalid(e.to_string()))?;
        let [rootfs] = req.rootfs.as_slice() else {
            return Err(invalid(format!(
                "expected one rootfs mount, got {}",
                req.rootfs.len()
            )));
        };
        let io = stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal)?;
        let pid = self
            .agent
            .create(&req.id, rootfs, config, io)
            .map_err(status)?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(&self, _: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let pid = self.agent.start(&req.id, &req.exec_id).map_err(status)?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| invalid("ExecProcessRequest has no process spec".into()))?;
        let process: Process = serde_json::from_slice(&spec.value)
            .map_err(|e| invalid(format!("cannot decode the exec's process spec: {e}")))?;
        let io = stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal)?;
        self.agent
            .exec(&req.id, &req.exec_id, process, io)
            .map_err(status)?;
        Ok(Empty::new())
    }

    fn kill(&self, _: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        self.agent
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .map_err(status)?;
        Ok(Empty::new())
    }

    fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let proc = self.agent.process(&req.id, &req.exec_id).map_err(status)?;
        let Exit { status, at } = proc.wait();
        Ok(WaitResponse {
            exit_status: status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        })
    }

    fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> ttrpc::Result<DeleteResponse> {
        let pid = self
            .agent
            .process(&req.id, &req.exec_id)
            .map_err(status)?
            .pid;
        let exit = self.agent.delete(&req.id, &req.exec_id).map_err(status)?;
        Ok(DeleteResponse {
            pid,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            ..Default::default()
        })
    }

    fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let pids = self.agent.pids(&req.id).map_err(status)?;
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let proc = self.agent.process(&req.id, &req.exec_id).map_err(status)?;
        proc.resize(req.width, req.height).map_err(status)?;
        Ok(Empty::new())
    }

    fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        // stdin ends when the host shuts its side of the stream down; only check the name.
        self.agent.process(&req.id, &req.exec_id).map_err(status)?;
        Ok(Empty::new())
    }

    fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let metrics = self.agent.metrics(&req.id).map_err(status)?;
        let value = metrics.write_to_bytes().map_err(|e| {
            status(AgentError::Io {
                what: "encode the metrics".into(),
                source: io::Error::other(e),
            })
        })?;
        Ok(StatsResponse {
            stats: Some(Any {
                type_url: "io.containerd.cgroups.v2.Metrics".into(),
                value,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
    }

    fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let Some(any) = req.resources.as_ref() else {
            return Ok(Empty::new());
        };
        let resources: LinuxResources = serde_json::from_slice(&any.value)
            .map_err(|e| invalid(format!("cannot decode the resources: {e}")))?;
        self.agent.update(&req.id, &resources).map_err(status)?;
        Ok(Empty::new())
    }

    fn connect(&self, _: &TtrpcContext, req: ConnectRequest) -> ttrpc::Result<ConnectResponse> {
        let task_pid = self.agent.process(&req.id, "").map(|p| p.pid).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            ..Default::default()
        })
    }

    fn shutdown(&self, _: &TtrpcContext, _: ShutdownRequest) -> ttrpc::Result<Empty> {
        Ok(Empty::new())
    }
}

/// kestrel's own calls ([`Call`]): JSON in, JSON out.
struct KestrelCall;

impl KestrelCall {
    fn call(req: &ttrpc::Request) -> Result<Reply, AgentError> {
        let call = Call::decode(&req.payload).map_err(|e| AgentError::Invalid(e.to_string()))?;
        match call {
            Call::SyncVolume { source, entries } => {
                crate::volumes::sync(&source, &entries).map(|()| Reply::Done)
            }
            Call::ReadVolume { source } => {
                crate::volumes::read(&source).map(|data| Reply::Data { data })
            }
        }
    }
}

impl ttrpc::MethodHandler for KestrelCall {
    fn handler(&self, ctx: TtrpcContext, req: ttrpc::Request) -> ttrpc::Result<()> {
        let mut res = ttrpc::Response::new();
        match Self::call(&req)
            .and_then(|r| r.encode().map_err(|e| AgentError::Invalid(e.to_string())))
        {
            Ok(payload) => {
                res.set_status(ttrpc::get_status(Code::OK, String::new()));
                res.payload = payload;
            }
            Err(e) => {
                if let ttrpc::Error::RpcStatus(status) = status(e) {
                    res.set_status(status);
                }
            }
        }
        ttrpc::response_to_channel(ctx.mh.stream_id, res, ctx.res_tx)
    }
}

fn mounted(what: &str, e: rustix::io::Errno) -> Result<(), Error> {
    if e == rustix::io::Errno::BUSY {
        Ok(())
    } else {
        Err(Error::new(format!("mount {what}"), io::Error::from(e)))
    }
}

/// What serving needs beyond PID 1's pseudo file systems: ptys, /run, cgroup v2.
fn setup_guest() -> Result<(), Error> {
    let dirs = ["/dev/pts", "/run", "/sys/fs/cgroup"];
    for d in dirs {
        std::fs::create_dir_all(d).map_err(|e| Error::new(format!("create {d}"), e))?;
    }
    let nosuid = MountFlags::NOSUID | MountFlags::NOEXEC;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        nosuid,
        Some(c"ptmxmode=0666,mode=0620"),
    )
    .or_else(|e| mounted("/dev/pts", e))?;
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        Some(c"mode=0755"),
    )
    .or_else(|e| mounted("/run", e))?;
    mount(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid | MountFlags::NODEV,
        None,
    )
    .or_else(|e| mounted("/sys/fs/cgroup", e))?;
    cgroup::setup().map_err(|e| Error::new("enable the cgroup controllers", e))
}

/// The pod's setup from the kernel command line (hostname, network), if this VM is a
/// pod's (then `true`). A failure is kept and refuses every container: the shim cannot see
/// the console.
fn setup_pod() -> Result<bool, String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let pod = match PodConfig::from_cmdline(&cmdline) {
        Ok(Some(pod)) => pod,
        Ok(None) => return Ok(false),
        Err(e) => return Err(format!("the pod configuration is unreadable: {e}")),
    };
    if !pod.hostname.is_empty() {
        nix::unistd::sethostname(&pod.hostname)
            .map_err(|e| format!("cannot set the hostname {:?}: {e}", pod.hostname))?;
    }
    let Some(net) = pod.network else {
        return Ok(true);
    };
    Netlink::open()
        .and_then(|mut nl| nl.apply(&net))
        .map_err(|e| format!("cannot configure the pod network: {}", error_chain(&e)))?;
    let addresses: Vec<String> = net.addresses.iter().map(ToString::to_string).collect();
    println!(
        "kestrel-agent: pod network {} on {}",
        addresses.join(" "),
        net.mac
    );
    Ok(true)
}

/// Serves until the VM is stopped.
pub fn serve() -> Result<(), Error> {
    setup_guest()?;
    let (in_pod, pod_error) = match setup_pod() {
        Ok(in_pod) => (in_pod, None),
        Err(e) => {
            println!("kestrel-agent: {e}");
            (true, Some(e))
        }
    };
    let events = crate::events::Events::connect();
    if in_pod {
        // CRI's PortForward reaches the pod's ports through the shim.
        crate::ports::serve().map_err(|e| Error::new("serve port forwarding", e))?;
        crate::ports::watch(events.clone()).map_err(|e| Error::new("watch the ports", e))?;
    }
    let oom = match crate::oom::OomWatcher::start(events) {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn!("OOM kills are not reported: {e}");
            None
        }
    };
    let agent = Arc::new(Agent::new(oom, pod_error));
    {
        let agent = agent.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || agent.reap())
            .map_err(|e| Error::new("start the reaper", e))?;
    }
    let service: Arc<dyn Task + Send + Sync> = Arc::new(Service { agent });
    let mut kestrel: HashMap<String, Box<dyn ttrpc::MethodHandler + Send + Sync>> = HashMap::new();
    kestrel.insert(
        format!("/{KESTREL_SERVICE}/{CALL_METHOD}"),
        Box::new(KestrelCall),
    );
    let mut server = ttrpc::Server::new()
        .bind(&format!("vsock://-1:{AGENT_PORT}"))
        .map_err(|e| Error::new(format!("listen on vsock port {AGENT_PORT}"), e))?
        .register_service(create_task(service))
        .register_service(kestrel)
        .set_thread_count_min(2)
        .set_thread_count_default(4)
        .set_thread_count_max(64);
    server
        .start()
        .map_err(|e| Error::new("start the ttrpc server", e))?;
    println!("kestrel-agent: serving on vsock port {AGENT_PORT}");
    loop {
        std::thread::park();
    }
}
