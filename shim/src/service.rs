//! The shim binary's lifecycle (containerd's shim v2 protocol): `start` spawns the server
//! process and prints its address, the server serves the task API until `Shutdown`, and
//! `delete` cleans up after a task whose shim may be gone.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::util::timestamp;
use containerd_shim::{Config, DeleteResponse, Flags, StartOpts};

use crate::events;
use crate::host::Host;
use crate::model::Model;
use crate::task::{cleanup_after_shim, dead_shim_status, report_forbidden_calls, TaskService};
use crate::vm_image::StateDirs;

pub struct Service {
    namespace: String,
    id: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

impl Service {
    /// The id of the shim process serving this task. One shim process (and so one VM) per
    /// lone task or per pod: a pod's containers are grouped under its sandbox id, so
    /// containerd 1.6/1.7's `start` for each of them finds the pod's shim listening and gets
    /// its address (2.x skips `start` for them).
    fn grouping(&self) -> String {
        match oci_spec::runtime::Spec::load(self.bundle.join("config.json")) {
            Ok(spec) => crate::spec::grouping(&spec, &self.id),
            Err(e) => {
                log::warn!("cannot read {}/config.json: {e}", self.bundle.display());
                self.id.clone()
            }
        }
    }
}

#[async_trait]
impl Shim for Service {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        // The serving shim (no action) logs to the bundle's FIFO; `start` and `delete`
        // have none (containerd reads their stdout).
        if args.action.is_empty() && !args.socket.is_empty() {
            if let Err(e) = crate::logger::LineLogger::install(args.debug) {
                eprintln!("kestrel shim: cannot open the log FIFO: {e}");
            }
            if let Err(e) = report_forbidden_calls(&args.namespace, &args.id) {
                log::warn!("a forbidden system call would be reported in stderr only: {e}");
            }
        }
        Service {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: if args.bundle.is_empty() {
                std::env::current_dir().unwrap_or_default()
            } else {
                PathBuf::from(&args.bundle)
            },
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let address = spawn(opts, &self.grouping(), Vec::new()).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let (exit_status, report) =
            dead_shim_status(&crate::host::run_dir(&self.namespace, &self.grouping()));
        if let Some(report) = report {
            // containerd logs what `delete` writes to stderr ("cleanup warnings").
            eprintln!("{report}");
        }
        cleanup_after_shim(
            &StateDirs::from_env(),
            &self.namespace,
            &self.id,
            &self.bundle,
        );
        Ok(DeleteResponse {
            pid: 0,
            exit_status,
            exited_at: Some(timestamp()?).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let (tx, rx) = events::channel();
        tokio::spawn(events::forward(rx, publisher, self.namespace.clone()));
        let host = Host::new(
            StateDirs::from_env(),
            self.namespace.clone(),
            &self.id,
            tx.clone(),
        );
        TaskService::new(Model::new(Arc::new(host), tx), self.exit.clone())
    }
}
