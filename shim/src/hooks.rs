//! The OCI spec's hooks, run on the host as runc runs them (nerdctl wires a container's
//! network in a `createRuntime` hook): `createRuntime` once the container exists (before
//! Create answers; a failure fails the Create), `poststart` after Start, `poststop` after
//! Delete (failures of these two are logged). Each hook gets the container's state as JSON
//! on stdin, its own args and environment, and its timeout.

use std::time::Duration;

use oci_spec::runtime::{Hook, Hooks};
use tokio::io::AsyncWriteExt;

/// A hook with no timeout of its own gets this much.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    CreateRuntime,
    Poststart,
    Poststop,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::CreateRuntime => "createRuntime",
            Stage::Poststart => "poststart",
            Stage::Poststop => "poststop",
        }
    }

    fn status(self) -> &'static str {
        match self {
            Stage::CreateRuntime => "creating",
            Stage::Poststart => "running",
            Stage::Poststop => "stopped",
        }
    }

    fn hooks(self, hooks: &Hooks) -> &[Hook] {
        let list = match self {
            Stage::CreateRuntime => hooks.create_runtime(),
            Stage::Poststart => hooks.poststart(),
            Stage::Poststop => hooks.poststop(),
        };
        list.as_deref().unwrap_or(&[])
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{stage} hook {path} could not run")]
    Spawn {
        stage: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{stage} hook {path} did not finish within {secs} s")]
    Timeout {
        stage: &'static str,
        path: String,
        secs: u64,
    },
    #[error("{stage} hook {path} failed ({status}): {stderr}")]
    Failed {
        stage: &'static str,
        path: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// What a hook reads on stdin: the OCI runtime's state of the container.
pub fn state(
    id: &str,
    pid: u32,
    bundle: &str,
    stage: Stage,
    spec: &oci_spec::runtime::Spec,
) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ociVersion": spec.version(),
        "id": id,
        "status": stage.status(),
        "pid": pid,
        "bundle": bundle,
        "annotations": spec.annotations().clone().unwrap_or_default(),
    }))
    .unwrap_or_default()
}

/// Runs the spec's hooks of `stage`, in order, stopping at the first failure.
pub async fn run(
    stage: Stage,
    spec: &oci_spec::runtime::Spec,
    id: &str,
    pid: u32,
    bundle: &str,
) -> Result<(), HookError> {
    let Some(hooks) = spec.hooks() else {
        return Ok(());
    };
    let list = stage.hooks(hooks);
    if list.is_empty() {
        return Ok(());
    }
    let input = state(id, pid, bundle, stage, spec);
    for hook in list {
        run_one(stage, hook, &input).await?;
    }
    Ok(())
}

async fn run_one(stage: Stage, hook: &Hook, input: &[u8]) -> Result<(), HookError> {
    let path = hook.path().display().to_string();
    let spawn_err = |source| HookError::Spawn {
        stage: stage.name(),
        path: path.clone(),
        source,
    };
    let mut cmd = tokio::process::Command::new(hook.path());
    let args = hook.args().clone().unwrap_or_default();
    if let Some((argv0, rest)) = args.split_first() {
        cmd.arg0(argv0).args(rest);
    }
    cmd.env_clear();
    for e in hook.env().iter().flatten() {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its state may close stdin early: not an error.
        let _ = stdin.write_all(input).await;
    }
    let limit = hook
        .timeout()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    let output = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(r) => r.map_err(spawn_err)?,
        Err(_) => {
            return Err(HookError::Timeout {
                stage: stage.name(),
                path,
                secs: limit.as_secs(),
            })
        }
    };
    if !output.status.success() {
        return Err(HookError::Failed {
            stage: stage.name(),
            path,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(hooks: serde_json::Value) -> oci_spec::runtime::Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "annotations": {"a": "b"},
            "hooks": hooks,
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn hooks_get_the_state_on_stdin_args_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let spec = spec_with(serde_json::json!({
            "createRuntime": [{
                "path": "/bin/sh",
                "args": ["sh", "-c", format!("echo \"$1 $HOOK_ENV\" > {0}; cat >> {0}", out.display()), "sh", "first-arg"],
                "env": ["HOOK_ENV=set"],
            }],
        }));
        run(Stage::CreateRuntime, &spec, "c1", 42, "/b")
            .await
            .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let (line, json) = text.split_once('\n').unwrap();
        assert_eq!(line, "first-arg set");
        let state: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(state["id"], "c1");
        assert_eq!(state["pid"], 42);
        assert_eq!(state["bundle"], "/b");
        assert_eq!(state["annotations"]["a"], "b");
        // Other stages have no hooks here.
        run(Stage::Poststop, &spec, "c1", 42, "/b").await.unwrap();
    }

    #[tokio::test]
    async fn a_failing_or_slow_hook_is_an_error_that_says_which() {
        let spec = spec_with(serde_json::json!({
            "poststart": [{"path": "/bin/sh", "args": ["sh", "-c", "echo broken >&2; exit 4"]}],
            "poststop": [{"path": "/bin/sleep", "args": ["sleep", "5"], "timeout": 1}],
        }));
        let err = run(Stage::Poststart, &spec, "c1", 1, "/b")
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("poststart hook /bin/sh failed") && msg.contains("broken"),
            "{msg}"
        );
        let err = run(Stage::Poststop, &spec, "c1", 1, "/b")
            .await
            .unwrap_err();
        assert!(matches!(err, HookError::Timeout { secs: 1, .. }), "{err}");
        let spec = spec_with(serde_json::json!({"createRuntime": [{"path": "/nonexistent/hook"}]}));
        let err = run(Stage::CreateRuntime, &spec, "c1", 1, "/b")
            .await
            .unwrap_err();
        assert!(matches!(err, HookError::Spawn { .. }), "{err}");
    }
}
