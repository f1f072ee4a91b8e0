//! The containerd task API (`containerd.task.v2.Task`), the shim's ttrpc edge: each call
//! is decoded, handed to the [`Model`], and its error mapped to a gRPC code.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, Empty, ExecProcessRequest, KillRequest, PidsRequest, PidsResponse,
    ResizePtyRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse,
    StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::asynchronous::util::read_spec;
use containerd_shim::{DeleteResponse, ExitSignal, Task, TtrpcContext, TtrpcResult};

use crate::error::ShimError;
use crate::guest::{NewContainer, NewExec, Stdio};
use crate::host::{self, Host};
use crate::model::Model;
use crate::vm_image::StateDirs;

/// The task service containerd talks to.
#[derive(Clone)]
pub struct TaskService {
    model: Arc<Model<Host>>,
    exit: Arc<ExitSignal>,
}

impl TaskService {
    pub fn new(model: Arc<Model<Host>>, exit: Arc<ExitSignal>) -> Self {
        TaskService { model, exit }
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let spec = read_spec(Path::new(&req.bundle))
            .await
            .map_err(|source| ShimError::Spec {
                bundle: req.bundle.clone(),
                source,
            })?;
        let pid = self
            .model
            .create(NewContainer {
                id: req.id,
                bundle: req.bundle,
                rootfs: req.rootfs,
                spec,
                stdio: Stdio {
                    stdin: req.stdin,
                    stdout: req.stdout,
                    stderr: req.stderr,
                    terminal: req.terminal,
                },
            })
            .await?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let pid = self.model.start(&req.id, &req.exec_id).await?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let spec = req.spec.into_option().ok_or_else(|| {
            ShimError::InvalidArgument(format!("exec {} has no process spec", req.exec_id))
        })?;
        self.model
            .exec(
                &req.id,
                &req.exec_id,
                NewExec {
                    spec,
                    stdio: Stdio {
                        stdin: req.stdin,
                        stdout: req.stdout,
                        stderr: req.stderr,
                        terminal: req.terminal,
                    },
                },
            )
            .await?;
        Ok(Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        self.model
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(Empty::new())
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let (pid, info) = self.model.delete(&req.id, &req.exec_id).await?;
        Ok(DeleteResponse {
            pid,
            exit_status: info.status,
            exited_at: Some(info.at).into(),
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let s = self.model.state(&req.id, &req.exec_id)?;
        Ok(StateResponse {
            id: if req.exec_id.is_empty() {
                req.id
            } else {
                req.exec_id.clone()
            },
            exec_id: req.exec_id,
            bundle: s.bundle,
            pid: s.pid,
            status: s.status.into(),
            stdin: s.stdio.stdin,
            stdout: s.stdio.stdout,
            stderr: s.stdio.stderr,
            terminal: s.stdio.terminal,
            exit_status: s.exit.as_ref().map_or(0, |e| e.status),
            exited_at: s.exit.map(|e| e.at).into(),
            ..Default::default()
        })
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let info = self.model.wait(&req.id, &req.exec_id).await?;
        Ok(WaitResponse {
            exit_status: info.status,
            exited_at: Some(info.at).into(),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        Ok(PidsResponse {
            processes: self.model.pids(&req.id).await?,
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        Ok(StatsResponse {
            stats: Some(self.model.stats(&req.id).await?).into(),
            ..Default::default()
        })
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let resources = req.resources.into_option().unwrap_or_default();
        self.model.update(&req.id, &resources).await?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.model
            .resize_pty(&req.id, &req.exec_id, req.width, req.height)
            .await?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        if req.stdin {
            self.model.close_io(&req.id, &req.exec_id).await?;
        }
        Ok(Empty::new())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.model.pid(&req.id).unwrap_or(0),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        // containerd sends Shutdown after every Delete: only the last one ends the shim.
        if self.model.is_empty() {
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}

/// Where the serving shim's SIGSYS handler writes which forbidden call ended it (see
/// `vmm::seccomp`), for the `delete` action to report once the shim is gone.
fn seccomp_report(run_dir: &Path) -> PathBuf {
    run_dir.join("seccomp-report")
}

/// Gives the SIGSYS handler of the serving shim `shim_id` its places to report: the log
/// FIFO (containerd's log) and the report file in the run directory. The fds stay open
/// for the process's life.
pub fn report_forbidden_calls(namespace: &str, shim_id: &str) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    let run = host::run_dir(namespace, shim_id);
    std::fs::create_dir_all(&run)?;
    let report = std::fs::File::create(seccomp_report(&run))?;
    vmm::seccomp::report_to(report.into_raw_fd());
    let fifo = std::fs::OpenOptions::new().write(true).open("log")?;
    vmm::seccomp::report_to(fifo.into_raw_fd());
    Ok(())
}

/// The exit status `delete` reports for a task whose shim is gone, and why: 128 + SIGSYS
/// with the handler's report when the shim ended on a forbidden call, else 128 + SIGKILL
/// (a shim killed from outside).
pub fn dead_shim_status(run_dir: &Path) -> (u32, Option<String>) {
    match std::fs::read_to_string(seccomp_report(run_dir)) {
        Ok(report) if !report.trim().is_empty() => (
            vmm::seccomp::EXIT_STATUS as u32,
            Some(report.trim_end().to_string()),
        ),
        _ => (128 + libc::SIGKILL as u32, None),
    }
}

/// Cleanup for the `delete` action: the shim may be gone (even killed), so everything is
/// found from the namespace and id. Idempotent.
pub fn cleanup_after_shim(dirs: &StateDirs, namespace: &str, id: &str, bundle: &Path) {
    host::cleanup(dirs, namespace, id);
    let run: PathBuf = host::run_dir(namespace, id);
    if let Err(e) = std::fs::remove_dir_all(&run) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("cannot remove {}: {e}", run.display());
        }
    }
    let rootfs = bundle.join("rootfs");
    if let Err(e) = containerd_shim::mount::umount_recursive(rootfs.to_str(), 0) {
        log::debug!("unmounting {}: {e}", rootfs.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_shim_reports_sigsys_and_the_call_when_its_handler_left_a_report() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(dead_shim_status(dir.path()), (137, None));
        // The serving shim creates the report file empty at start.
        std::fs::write(seccomp_report(dir.path()), "").unwrap();
        assert_eq!(dead_shim_status(dir.path()), (137, None));
        let line = "kestrel: seccomp: the vCPU 0 thread made a forbidden system call: \
                    socket (41); the VMM stops (exit status 159)\n";
        std::fs::write(seccomp_report(dir.path()), line).unwrap();
        assert_eq!(
            dead_shim_status(dir.path()),
            (159, Some(line.trim_end().to_string()))
        );
    }
}
