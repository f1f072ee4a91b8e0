//! The containerd task service for a VM-image task: one task per shim process, whose
//! "process" is the VM running inside this process.
//!
//! Runs on the shim's tokio runtime. Slow work (image conversion, building the VM) goes to
//! the blocking pool; the VMM thread is reached through `ControlSender` with a reply
//! callback that completes a oneshot, so no tokio worker ever blocks on the VM. The VM's
//! end arrives the same way (the `on_exit` callback), becomes the task's exit status and a
//! `TaskExit` event.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, Empty, ExecProcessRequest, KillRequest, PidsRequest, PidsResponse,
    ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse, Status, WaitRequest,
    WaitResponse,
};
use containerd_shim::asynchronous::util::{mount_rootfs, read_spec};
use containerd_shim::protos::api::ProcessInfo;
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::timestamp;
use containerd_shim::{Context, DeleteResponse, ExitSignal, Task, TtrpcContext, TtrpcResult};
use tokio::sync::{oneshot, watch, Mutex};
use vmm::{ControlSender, DiskConfig, VmAction, VmConfig, VmExit};

use crate::console::{self, ConsoleWriter};
use crate::error::ShimError;
use crate::spec::{self, VmSpec};
use crate::vm_image::{self, StateDirs};
use devices::disk::raw::RawFile;

/// The exit status of a task whose VM could not start (as `docker run` reports a runtime
/// failure).
const EXIT_NOT_STARTED: u32 = 125;

/// How a task ended.
#[derive(Debug, Clone)]
struct ExitInfo {
    status: u32,
    at: Timestamp,
}

enum Phase {
    /// Created, VM built but not started.
    Created(Box<VmConfig>),
    Running(ControlSender),
    Stopped,
}

struct VmTask {
    id: String,
    bundle: String,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    grace: Duration,
    phase: Phase,
    console_writer: Option<ConsoleWriter>,
    exited: watch::Receiver<Option<ExitInfo>>,
    exited_tx: Option<watch::Sender<Option<ExitInfo>>>,
}

impl VmTask {
    fn status(&self) -> Status {
        match (&self.phase, self.exited.borrow().is_some()) {
            (_, true) | (Phase::Stopped, _) => Status::STOPPED,
            (Phase::Created(_), false) => Status::CREATED,
            (Phase::Running(_), false) => Status::RUNNING,
        }
    }

    fn state_name(&self) -> &'static str {
        match self.status() {
            Status::CREATED => "created",
            Status::RUNNING => "running",
            _ => "stopped",
        }
    }
}

/// The task service containerd talks to.
#[derive(Clone)]
pub struct TaskService {
    task: Arc<Mutex<Option<VmTask>>>,
    publisher: Arc<RemotePublisher>,
    namespace: String,
    exit: Arc<ExitSignal>,
    dirs: StateDirs,
}

fn now() -> Timestamp {
    timestamp().unwrap_or_default()
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShimError {
    let what = what.into();
    move |source| ShimError::Io { what, source }
}

/// The shim process's pid: the VM runs inside it, so it is the task's pid too.
fn pid() -> u32 {
    std::process::id()
}

impl TaskService {
    pub fn new(publisher: RemotePublisher, namespace: String, exit: Arc<ExitSignal>) -> Self {
        TaskService {
            task: Arc::new(Mutex::new(None)),
            publisher: Arc::new(publisher),
            namespace,
            exit,
            dirs: StateDirs::from_env(),
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            log::error!("cannot publish {topic}: {e}");
        }
    }

    fn check_id<'a>(task: &'a mut Option<VmTask>, id: &str) -> Result<&'a mut VmTask, ShimError> {
        let Some(t) = task.as_mut() else {
            return Err(ShimError::TaskNotFound(id.to_string()));
        };
        if t.id != id {
            return Err(ShimError::OtherTask(t.id.clone(), id.to_string()));
        }
        Ok(t)
    }

    fn check_exec(exec_id: &str) -> Result<(), ShimError> {
        if exec_id.is_empty() {
            Ok(())
        } else {
            Err(ShimError::ExecNotFound(exec_id.to_string()))
        }
    }

    async fn create_task(&self, req: CreateTaskRequest) -> Result<CreateTaskResponse, ShimError> {
        let mut slot = self.task.lock().await;
        if let Some(t) = slot.as_ref() {
            return Err(ShimError::InvalidArgument(format!(
                "this shim already runs task {}",
                t.id
            )));
        }
        let id = req.id.clone();
        let bundle = PathBuf::from(&req.bundle);
        let oci = read_spec(&bundle).await.map_err(|source| ShimError::Spec {
            bundle: req.bundle.clone(),
            source,
        })?;
        let vm = spec::vm_spec(&oci, &id).map_err(|e| ShimError::InvalidArgument(e.to_string()))?;

        // The image's files: containerd hands us the rootfs as mounts.
        let rootfs = bundle.join("rootfs");
        let mut mounted = false;
        if !req.rootfs.is_empty() {
            std::fs::create_dir_all(&rootfs)
                .map_err(io_err(format!("create {}", rootfs.display())))?;
            for m in &req.rootfs {
                mount_rootfs(m, &rootfs).await.map_err(|e| ShimError::Io {
                    what: format!("mount the rootfs at {}", rootfs.display()),
                    source: std::io::Error::other(e.to_string()),
                })?;
                mounted = true;
            }
        }
        let (dirs, ns, task_id, root) = (
            self.dirs.clone(),
            self.namespace.clone(),
            id.clone(),
            rootfs.clone(),
        );
        let prepared = tokio::task::spawn_blocking(move || {
            let result = vm_image::find_disk(&root)
                .and_then(|disk| vm_image::prepare(&dirs, &disk, &ns, &task_id));
            if mounted {
                // The base lives in the image cache now; the rootfs is no longer needed.
                if let Err(e) = containerd_shim::mount::umount_recursive(root.to_str(), 0) {
                    log::warn!("cannot unmount {}: {e}", root.display());
                }
            }
            result
        })
        .await
        .map_err(|e| ShimError::Io {
            what: "prepare the VM image".into(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(|source| ShimError::Image {
            id: id.clone(),
            source,
        })?;

        let kernel =
            vmm::assets::default_asset(vmm::assets::KERNEL).map_err(|e| ShimError::Io {
                what: "find the guest kernel".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let (sink, writer) =
            console::start(&req.stdout, &req.stderr).map_err(io_err("start the console writer"))?;
        let console_in =
            console::open_stdin(&req.stdin).map_err(io_err(format!("open stdin {}", req.stdin)))?;

        // The cloud-init NoCloud seed: the environment reaches /etc/cloud/environment.
        let seed_path = bundle.join("cidata.img");
        let seed = kestrel_seed::Seed {
            instance_id: id.clone(),
            hostname: vm.hostname.clone(),
            env: vm.env.clone(),
            extra_user_data: None,
        };
        kestrel_seed::write_seed_image(&seed, &seed_path).map_err(|e| match e {
            kestrel_seed::SeedError::Io { .. } => ShimError::Io {
                what: format!("write the cloud-init seed {}", seed_path.display()),
                source: std::io::Error::other(vmm::error_chain(&e)),
            },
            other => ShimError::InvalidArgument(format!(
                "cannot pass the environment to the VM: {}",
                vmm::error_chain(&other)
            )),
        })?;
        let seed_disk = RawFile::open(&seed_path, true).map_err(|e| ShimError::Io {
            what: format!("open the cloud-init seed {}", seed_path.display()),
            source: std::io::Error::other(vmm::error_chain(&e)),
        })?;

        let mut config = VmConfig::new(kernel);
        config.initrd = None;
        config.cmdline = kernel_cmdline(&vm, &prepared.root_device);
        config.vcpus = vm.cpus;
        config.memory_mib = vm.memory_mib;
        config.disks.push(DiskConfig {
            backend: Box::new(prepared.overlay),
            serial: Some("kestrel-root".into()),
        });
        config.disks.push(DiskConfig {
            backend: Box::new(seed_disk),
            serial: Some("cidata".into()),
        });
        config.console_out = Box::new(sink);
        config.console_in = console_in;
        log::info!(
            "task {id}: {} vCPU(s), {} MiB, base {}, overlay {}",
            vm.cpus,
            vm.memory_mib,
            prepared.base.display(),
            prepared.overlay_path.display()
        );

        let (exited_tx, exited) = watch::channel(None);
        *slot = Some(VmTask {
            id: id.clone(),
            bundle: req.bundle.clone(),
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            grace: Duration::from_secs(vm.grace_secs),
            phase: Phase::Created(Box::new(config)),
            console_writer: Some(writer),
            exited,
            exited_tx: Some(exited_tx),
        });
        drop(slot);
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: id,
                bundle: req.bundle,
                rootfs: req.rootfs,
                io: Default::default(),
                pid: pid(),
                ..Default::default()
            }),
        )
        .await;
        Ok(CreateTaskResponse {
            pid: pid(),
            ..Default::default()
        })
    }

    async fn start_task(&self, req: StartRequest) -> Result<StartResponse, ShimError> {
        Self::check_exec(&req.exec_id)?;
        let mut slot = self.task.lock().await;
        let task = Self::check_id(&mut slot, &req.id)?;
        let Phase::Created(_) = &task.phase else {
            return Err(ShimError::WrongState {
                id: req.id,
                state: task.state_name(),
                action: "start it",
            });
        };
        let Phase::Created(mut config) = std::mem::replace(&mut task.phase, Phase::Stopped) else {
            return Err(ShimError::VmGone(req.id));
        };
        let (vm_exit_tx, vm_exit_rx) = oneshot::channel::<VmExit>();
        config.on_exit = Some(Box::new(move |exit: &VmExit| {
            let _ = vm_exit_tx.send(exit.clone());
        }));
        let started = tokio::task::spawn_blocking(move || vmm::start_vm(*config))
            .await
            .map_err(|e| ShimError::Io {
                what: "start the VM".into(),
                source: std::io::Error::other(e.to_string()),
            })
            .and_then(|r| {
                r.map_err(|source| ShimError::StartVm {
                    id: req.id.clone(),
                    source,
                })
            });
        let handle = match started {
            Ok(h) => h,
            Err(e) => {
                // The task ends without running, so that Wait and State still answer.
                let exit = Self::end_unstarted(task, EXIT_NOT_STARTED);
                drop(slot);
                self.publish_exit(&req.id, &exit).await;
                return Err(e);
            }
        };
        task.phase = Phase::Running(handle.control());
        // The VMM thread owns the VM from here; the handle only joins it.
        tokio::task::spawn_blocking(move || drop(handle.wait()));

        let exited_tx = task.exited_tx.take();
        let writer = task.console_writer.take();
        let service = self.clone();
        let id = req.id.clone();
        tokio::spawn(async move { service.on_vm_exit(id, vm_exit_rx, writer, exited_tx).await });
        drop(slot);

        self.publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: req.id,
                pid: pid(),
                ..Default::default()
            }),
        )
        .await;
        Ok(StartResponse {
            pid: pid(),
            ..Default::default()
        })
    }

    /// Ends a task whose VM never ran: drops the console and records `status`.
    fn end_unstarted(task: &mut VmTask, status: u32) -> ExitInfo {
        task.phase = Phase::Stopped;
        task.console_writer.take();
        let info = ExitInfo { status, at: now() };
        if let Some(tx) = task.exited_tx.take() {
            let _ = tx.send(Some(info.clone()));
        }
        info
    }

    async fn publish_exit(&self, id: &str, info: &ExitInfo) {
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: id.to_string(),
                id: id.to_string(),
                pid: pid(),
                exit_status: info.status,
                exited_at: Some(info.at.clone()).into(),
                ..Default::default()
            }),
        )
        .await;
    }

    /// Waits for the VM to end, lets the console drain and close, records the exit and
    /// publishes `TaskExit`.
    async fn on_vm_exit(
        &self,
        id: String,
        vm_exit: oneshot::Receiver<VmExit>,
        writer: Option<ConsoleWriter>,
        exited_tx: Option<watch::Sender<Option<ExitInfo>>>,
    ) {
        let exit = vm_exit
            .await
            .unwrap_or_else(|_| VmExit::Crashed("the VMM thread ended without a report".into()));
        log::info!("task {id}: {exit}");
        if let Some(w) = writer {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
        let info = ExitInfo {
            status: exit.status() as u32,
            at: now(),
        };
        {
            let mut slot = self.task.lock().await;
            if let Some(t) = slot.as_mut().filter(|t| t.id == id) {
                t.phase = Phase::Stopped;
            }
        }
        if let Some(tx) = exited_tx {
            let _ = tx.send(Some(info.clone()));
        }
        self.publish_exit(&id, &info).await;
    }

    async fn kill_task(&self, req: KillRequest) -> Result<(), ShimError> {
        Self::check_exec(&req.exec_id)?;
        let mut slot = self.task.lock().await;
        let task = Self::check_id(&mut slot, &req.id)?;
        let control = match &task.phase {
            Phase::Running(c) if task.exited.borrow().is_none() => c.clone(),
            Phase::Created(_) => {
                let exit = Self::end_unstarted(task, 128 + req.signal);
                drop(slot);
                self.publish_exit(&req.id, &exit).await;
                return Ok(());
            }
            _ => {
                return Err(ShimError::WrongState {
                    id: req.id,
                    state: "stopped",
                    action: "signal it",
                })
            }
        };
        let grace = task.grace;
        drop(slot);
        match req.signal as i32 {
            libc::SIGKILL => send(&control, VmAction::Stop, &req.id).await,
            libc::SIGTERM | libc::SIGINT | libc::SIGPWR => {
                send(&control, VmAction::CtrlAltDel, &req.id).await?;
                log::info!("task {}: asked the guest to shut down; stopping it in {grace:?} if it has not", req.id);
                let id = req.id.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    if send(&control, VmAction::Stop, &id).await.is_ok() {
                        log::info!("task {id}: the guest did not shut down within {grace:?}; stopped it");
                    }
                });
                Ok(())
            }
            other => Err(ShimError::InvalidArgument(format!(
                "signal {other} cannot be delivered to a VM (SIGTERM/SIGINT/SIGPWR ask the guest to shut down, SIGKILL stops it)"
            ))),
        }
    }

    async fn delete_task(&self, req: DeleteRequest) -> Result<DeleteResponse, ShimError> {
        Self::check_exec(&req.exec_id)?;
        let mut slot = self.task.lock().await;
        let task = Self::check_id(&mut slot, &req.id)?;
        if task.status() == Status::RUNNING {
            return Err(ShimError::WrongState {
                id: req.id,
                state: "running",
                action: "delete it",
            });
        }
        let info = task.exited.borrow().clone().unwrap_or(ExitInfo {
            status: 0,
            at: now(),
        });
        *slot = None;
        drop(slot);
        vm_image::cleanup(&self.dirs, &self.namespace, &req.id);
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                id: req.id,
                pid: pid(),
                exit_status: info.status,
                exited_at: Some(info.at.clone()).into(),
                ..Default::default()
            }),
        )
        .await;
        Ok(DeleteResponse {
            pid: pid(),
            exit_status: info.status,
            exited_at: Some(info.at).into(),
            ..Default::default()
        })
    }

    async fn state_of(&self, req: StateRequest) -> Result<StateResponse, ShimError> {
        Self::check_exec(&req.exec_id)?;
        let mut slot = self.task.lock().await;
        let task = Self::check_id(&mut slot, &req.id)?;
        let exit = task.exited.borrow().clone();
        Ok(StateResponse {
            id: task.id.clone(),
            bundle: task.bundle.clone(),
            pid: pid(),
            status: task.status().into(),
            stdin: task.stdin.clone(),
            stdout: task.stdout.clone(),
            stderr: task.stderr.clone(),
            terminal: task.terminal,
            exit_status: exit.as_ref().map_or(0, |e| e.status),
            exited_at: exit.map(|e| e.at).into(),
            ..Default::default()
        })
    }

    async fn wait_for(&self, req: WaitRequest) -> Result<WaitResponse, ShimError> {
        Self::check_exec(&req.exec_id)?;
        let mut rx = {
            let mut slot = self.task.lock().await;
            Self::check_id(&mut slot, &req.id)?.exited.clone()
        };
        let info = loop {
            if let Some(info) = rx.borrow().clone() {
                break info;
            }
            if rx.changed().await.is_err() {
                return Err(ShimError::VmGone(req.id));
            }
        };
        Ok(WaitResponse {
            exit_status: info.status,
            exited_at: Some(info.at).into(),
            ..Default::default()
        })
    }
}

async fn send(control: &ControlSender, action: VmAction, id: &str) -> Result<(), ShimError> {
    let (tx, rx) = oneshot::channel();
    control.send(
        action,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(vmm::ControlError::VmGone)) | Err(_) => Err(ShimError::VmGone(id.to_string())),
        Ok(Err(e)) => Err(ShimError::Io {
            what: format!("deliver {action:?} to task {id}"),
            source: std::io::Error::other(vmm::error_chain(&e)),
        }),
    }
}

/// The guest kernel's command line for a VM image booted from its first disk.
pub fn kernel_cmdline(vm: &VmSpec, root_device: &str) -> String {
    let root = vm.root.as_deref().unwrap_or(root_device);
    let mut c = format!("{} root={root} rw", vmm::DEFAULT_CMDLINE);
    if let Some(extra) = vm
        .extra_cmdline
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        vmm::config::append_cmdline(&mut c, extra);
    }
    c
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let id = req.id.clone();
        let result = self.create_task(req).await;
        if result.is_err() {
            // Nothing of a failed create may stay behind.
            vm_image::cleanup(&self.dirs, &self.namespace, &id);
        }
        Ok(result?)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        Ok(self.start_task(req).await?)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        self.kill_task(req).await?;
        Ok(Empty::new())
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        Ok(self.delete_task(req).await?)
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        Ok(self.state_of(req).await?)
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        Ok(self.wait_for(req).await?)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let mut slot = self.task.lock().await;
        Self::check_id(&mut slot, &req.id)?;
        Ok(PidsResponse {
            processes: vec![ProcessInfo {
                pid: pid(),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: pid(),
            task_pid: pid(),
            ..Default::default()
        })
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        Self::check_exec(&req.exec_id)?;
        let mut slot = self.task.lock().await;
        Self::check_id(&mut slot, &req.id)?;
        // The console keeps reading stdin until its writer closes; nothing to do here.
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, _req: ExecProcessRequest) -> TtrpcResult<Empty> {
        Err(ShimError::Unsupported("exec").into())
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        if self.task.lock().await.is_none() {
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}

/// Cleanup for the `delete` action: the shim may be gone (even killed), so everything is
/// found from the namespace and id. Idempotent.
pub fn cleanup_after_shim(dirs: &StateDirs, namespace: &str, id: &str, bundle: &Path) {
    vm_image::cleanup(dirs, namespace, id);
    let rootfs = bundle.join("rootfs");
    if let Err(e) = containerd_shim::mount::umount_recursive(rootfs.to_str(), 0) {
        log::debug!("unmounting {}: {e}", rootfs.display());
    }
}
