//! The shim's errors, and how they reach containerd: every error maps to a real gRPC
//! code (NotFound, InvalidArgument, FailedPrecondition…) so containerd and the CRI plugin
//! can act on it, with the whole cause chain in the message.

use containerd_shim::protos::ttrpc::{self, Code};

use crate::vm_image::ImageError;

/// Errors of the task service.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("task {0} not found")]
    TaskNotFound(String),
    #[error("this shim runs one task ({0}); {1} belongs to another shim")]
    OtherTask(String, String),
    #[error("exec process {0} not found (VM-image tasks have no exec processes)")]
    ExecNotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("task {id} is {state}; cannot {action}")]
    WrongState {
        id: String,
        state: &'static str,
        action: &'static str,
    },
    #[error("{0} is not supported by kestrel for VM-image tasks")]
    Unsupported(&'static str),
    #[error("cannot read the OCI spec in bundle {bundle}")]
    Spec {
        bundle: String,
        #[source]
        source: containerd_shim::Error,
    },
    #[error("cannot prepare the VM image of task {id}")]
    Image {
        id: String,
        #[source]
        source: ImageError,
    },
    #[error("cannot start the VM of task {id}")]
    StartVm {
        id: String,
        #[source]
        source: vmm::BuildVmError,
    },
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM of task {0} is gone")]
    VmGone(String),
}

impl ShimError {
    fn code(&self) -> Code {
        match self {
            ShimError::TaskNotFound(_) | ShimError::ExecNotFound(_) | ShimError::OtherTask(..) => {
                Code::NOT_FOUND
            }
            ShimError::InvalidArgument(_) | ShimError::Spec { .. } => Code::INVALID_ARGUMENT,
            ShimError::Image { source, .. } if source.is_user_error() => Code::FAILED_PRECONDITION,
            ShimError::WrongState { .. } | ShimError::VmGone(_) => Code::FAILED_PRECONDITION,
            ShimError::Unsupported(_) => Code::UNIMPLEMENTED,
            ShimError::Image { .. } | ShimError::StartVm { .. } | ShimError::Io { .. } => {
                Code::INTERNAL
            }
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        let msg = vmm::error_chain(&e);
        log::warn!("{msg}");
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), msg))
    }
}
