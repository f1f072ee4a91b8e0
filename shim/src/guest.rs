//! The seam between the shim's task model ([`crate::model`]) and what runs containers'
//! processes: a VM image (the VM is the process) or containers through the guest agent.
//! The model keeps states, exits and events; a [`Guest`] only acts. Tests put a fake behind
//! it, so the whole lifecycle runs without booting anything.

use async_trait::async_trait;
use containerd_shim::protos::api::{Mount, ProcessInfo};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::ttrpc::Code;
use oci_spec::runtime::Spec;

/// A container to create: containerd's request with the bundle's spec already read.
#[derive(Debug, Clone)]
pub struct NewContainer {
    pub id: String,
    pub bundle: String,
    pub rootfs: Vec<Mount>,
    pub spec: Spec,
    pub stdio: Stdio,
}

/// containerd's stdio FIFO paths of one process (empty: no such stream).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// An exec process to add to a running container.
#[derive(Debug, Clone)]
pub struct NewExec {
    /// containerd's `ExecProcessRequest.spec`: the OCI Process as JSON.
    pub spec: Any,
    pub stdio: Stdio,
}

/// What a guest reports when an operation fails, with the gRPC code containerd gets.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The guest agent answered with an error status (its code is kept).
    #[error("the guest agent: {message}")]
    Agent { code: Code, message: String },
    /// The guest agent could not be reached, or the VM is gone.
    #[error("cannot reach the guest agent")]
    Transport(#[source] containerd_shim::protos::ttrpc::Error),
    #[error("the VM has stopped")]
    VmGone,
    #[error("{0} is not supported for {1}")]
    Unsupported(&'static str, &'static str),
    #[error("{0}")]
    Invalid(String),
    /// Preparing the host side failed (image, rootfs, VM build); the cause says why.
    #[error("cannot {what}")]
    Host {
        what: String,
        code: Code,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl GuestError {
    pub fn code(&self) -> Code {
        match self {
            GuestError::Agent { code, .. } | GuestError::Host { code, .. } => *code,
            GuestError::Transport(_) => Code::UNAVAILABLE,
            GuestError::VmGone => Code::FAILED_PRECONDITION,
            GuestError::Unsupported(..) => Code::UNIMPLEMENTED,
            GuestError::Invalid(_) => Code::INVALID_ARGUMENT,
        }
    }

    pub fn host(
        what: impl Into<String>,
        code: Code,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        GuestError::Host {
            what: what.into(),
            code,
            source: Box::new(source),
        }
    }
}

/// What runs containers' processes. Every call is for a container the model knows; `exec`
/// is the exec id ("" for the container's init).
#[async_trait]
pub trait Guest: Send + Sync + 'static {
    /// Prepares the container and its init process (not started); returns the init's pid.
    async fn create(&self, c: &NewContainer) -> Result<u32, GuestError>;
    /// containerd deleted or killed container `id` while its `create` runs: stop what
    /// can be stopped (an image conversion), so that `create` fails soon. Never blocks.
    fn cancel_create(&self, id: &str);
    /// Starts a created process; returns its pid.
    async fn start(&self, id: &str, exec: &str) -> Result<u32, GuestError>;
    async fn exec(&self, id: &str, exec: &str, p: &NewExec) -> Result<(), GuestError>;
    async fn kill(&self, id: &str, exec: &str, signal: u32, all: bool) -> Result<(), GuestError>;
    /// Resolves with the exit status once the process has exited and its output reached
    /// containerd's FIFOs, which are closed then.
    async fn wait(&self, id: &str, exec: &str) -> Result<u32, GuestError>;
    /// Releases a stopped process (the container itself for the init).
    async fn delete(&self, id: &str, exec: &str) -> Result<(), GuestError>;
    async fn pids(&self, id: &str) -> Result<Vec<ProcessInfo>, GuestError>;
    async fn stats(&self, id: &str) -> Result<Any, GuestError>;
    async fn update(&self, id: &str, resources: &Any) -> Result<(), GuestError>;
    async fn resize_pty(
        &self,
        id: &str,
        exec: &str,
        width: u32,
        height: u32,
    ) -> Result<(), GuestError>;
    async fn close_io(&self, id: &str, exec: &str) -> Result<(), GuestError>;
}
