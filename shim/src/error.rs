//! The shim's errors, and how they reach containerd: every error maps to a real gRPC
//! code (NotFound, InvalidArgument, FailedPrecondition…) so containerd and the CRI plugin
//! can act on it, with the whole cause chain in the message.

use containerd_shim::protos::ttrpc::{self, Code};

use crate::guest::GuestError;

/// Errors of the task service.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("task {0} not found")]
    TaskNotFound(String),
    #[error("process {exec:?} of task {id} not found")]
    ExecNotFound { id: String, exec: String },
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{what} is {state}; cannot {action}")]
    WrongState {
        what: String,
        state: &'static str,
        action: &'static str,
    },
    /// containerd's own wording for a signal to a process that has exited.
    #[error("{0}: process already finished")]
    ProcessFinished(String),
    #[error("cannot read the OCI spec in bundle {bundle}")]
    Spec {
        bundle: String,
        #[source]
        source: containerd_shim::Error,
    },
    #[error("cannot {what}")]
    Guest {
        what: String,
        #[source]
        source: GuestError,
    },
}

impl ShimError {
    pub fn code(&self) -> Code {
        match self {
            ShimError::TaskNotFound(_)
            | ShimError::ExecNotFound { .. }
            | ShimError::ProcessFinished(_) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::InvalidArgument(_) | ShimError::Spec { .. } => Code::INVALID_ARGUMENT,
            ShimError::WrongState { .. } => Code::FAILED_PRECONDITION,
            ShimError::Guest { source, .. } => source.code(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: ShimError) -> (Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn errors_reach_containerd_with_their_codes_and_causes() {
        let cases = [
            (ShimError::TaskNotFound("t".into()), Code::NOT_FOUND),
            (
                ShimError::ExecNotFound {
                    id: "t".into(),
                    exec: "e".into(),
                },
                Code::NOT_FOUND,
            ),
            (ShimError::ProcessFinished("task t".into()), Code::NOT_FOUND),
            (
                ShimError::AlreadyExists("task t".into()),
                Code::ALREADY_EXISTS,
            ),
            (
                ShimError::InvalidArgument("x".into()),
                Code::INVALID_ARGUMENT,
            ),
            (
                ShimError::WrongState {
                    what: "task t".into(),
                    state: "running",
                    action: "delete it",
                },
                Code::FAILED_PRECONDITION,
            ),
            (
                ShimError::Guest {
                    what: "start task t".into(),
                    source: GuestError::Agent {
                        code: Code::FAILED_PRECONDITION,
                        message: "exec nosuch: No such file or directory".into(),
                    },
                },
                Code::FAILED_PRECONDITION,
            ),
            (
                ShimError::Guest {
                    what: "exec".into(),
                    source: GuestError::Unsupported("exec", "VM-image tasks"),
                },
                Code::UNIMPLEMENTED,
            ),
            (
                ShimError::Guest {
                    what: "create task t".into(),
                    source: GuestError::host(
                        "prepare the rootfs",
                        Code::INTERNAL,
                        std::io::Error::other("disk full"),
                    ),
                },
                Code::INTERNAL,
            ),
        ];
        for (err, code) in cases {
            let (got, msg) = status(err);
            assert_eq!(got, code, "{msg}");
        }
        let (_, msg) = status(ShimError::Guest {
            what: "create task t".into(),
            source: GuestError::host(
                "prepare the rootfs",
                Code::INTERNAL,
                std::io::Error::other("disk full"),
            ),
        });
        assert_eq!(
            msg,
            "cannot create task t: cannot prepare the rootfs: disk full"
        );
    }
}
