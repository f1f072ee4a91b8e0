//! A CRI client for tests: containerd's CRI plugin over its gRPC socket, with k8s-cri's
//! generated v1 API (docs/containerd.md §5), made synchronous (each call runs on the
//! client's own tokio runtime under a timeout) so the tests read like kubelet's steps.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerStatsRequest, CreateContainerRequest,
    ExecSyncRequest, ImageSpec, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest,
    RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopContainerRequest, StopPodSandboxRequest,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub use k8s_cri::v1;

/// How long one CRI call may take (RunPodSandbox boots a VM: tens of seconds here).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
}

/// A container's volume mounts (host path, container path, read-only), devices,
/// environment and annotations.
#[derive(Default)]
pub struct Extra<'a> {
    pub mounts: &'a [(&'a Path, &'a str, bool)],
    /// Host devices: (host path, container path), read-write (`volumeDevices`).
    pub devices: &'a [(&'a Path, &'a str)],
    pub envs: &'a [(&'a str, &'a str)],
    pub annotations: &'a [(&'a str, &'a str)],
}

/// What ExecSync returned.
#[derive(Debug)]
pub struct ExecResult {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

impl Cri {
    /// Connects to containerd's socket at `socket`.
    pub fn connect(socket: &Path) -> Cri {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
        let socket = socket.to_path_buf();
        let channel = rt
            .block_on(async move {
                Endpoint::try_from("http://[::]:50051")?
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let socket = socket.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                UnixStream::connect(socket).await?,
                            ))
                        }
                    }))
                    .await
            })
            .unwrap_or_else(|e| panic!("connect to containerd's CRI socket: {e}"));
        Cri {
            rt,
            client: RuntimeServiceClient::new(channel),
        }
    }

    fn call<T>(
        &self,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        self.rt.block_on(async {
            match tokio::time::timeout(CALL_TIMEOUT, f).await {
                Ok(r) => r.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded(
                    "the test's CRI call timed out",
                )),
            }
        })
    }

    /// A pod config: `name` in namespace `default`, logs under `log_dir`, its own network,
    /// the pod cgroup [`Cri::cgroup_parent`]`(name)` as kubelet's cgroupfs driver names one.
    pub fn pod_config(
        name: &str,
        log_dir: &Path,
        annotations: &[(&str, &str)],
    ) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.to_string(),
            log_directory: log_dir.display().to_string(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: Self::cgroup_parent(name),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The pod cgroup of pod `name` (kubelet makes it; the tests leave it to
    /// [`remove_cgroup_parent`]).
    pub fn cgroup_parent(name: &str) -> String {
        format!("/kestrel-test/pod-{name}")
    }

    pub fn run_pod(
        &self,
        config: &PodSandboxConfig,
        handler: &str,
    ) -> Result<String, tonic::Status> {
        let mut c = self.client.clone();
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_string(),
        };
        self.call(async move { c.run_pod_sandbox(req).await })
            .map(|r| r.pod_sandbox_id)
    }

    /// The pod's IP address.
    pub fn pod_ip(&self, pod: &str) -> String {
        let mut c = self.client.clone();
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: pod.to_string(),
            verbose: false,
        };
        let status = self
            .call(async move { c.pod_sandbox_status(req).await })
            .unwrap_or_else(|e| panic!("PodSandboxStatus: {e}"));
        status
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default()
    }

    /// The sandbox's OCI runtime spec (from the verbose PodSandboxStatus).
    pub fn pod_spec(&self, pod: &str) -> Option<serde_json::Value> {
        let mut c = self.client.clone();
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: pod.to_string(),
            verbose: true,
        };
        let status = self
            .call(async move { c.pod_sandbox_status(req).await })
            .ok()?;
        let info: serde_json::Value = serde_json::from_str(status.info.get("info")?).ok()?;
        info.get("runtimeSpec").cloned()
    }

    /// The path of the pod's network namespace.
    pub fn pod_netns(&self, pod: &str) -> Option<String> {
        self.pod_spec(pod)?
            .pointer("/linux/namespaces")?
            .as_array()?
            .iter()
            .find(|n| n.get("type").and_then(|t| t.as_str()) == Some("network"))?
            .get("path")?
            .as_str()
            .map(str::to_string)
    }

    /// Creates and starts `name` running `command` from `image` in the pod; its log goes to
    /// `<pod log dir>/<name>.log`.
    pub fn start_container(
        &self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String, tonic::Status> {
        self.start_container_with(pod, pod_config, name, image, command, &Extra::default())
    }

    /// [`Cri::start_container`] with kubelet's volume mounts, environment and annotations.
    pub fn start_container_with(
        &self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        name: &str,
        image: &str,
        command: &[&str],
        extra: &Extra<'_>,
    ) -> Result<String, tonic::Status> {
        let mut c = self.client.clone();
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.to_string(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
                command: command.iter().map(|s| s.to_string()).collect(),
                log_path: format!("{name}.log"),
                envs: extra
                    .envs
                    .iter()
                    .map(|(k, v)| v1::KeyValue {
                        key: k.to_string(),
                        value: v.to_string(),
                    })
                    .collect(),
                annotations: extra
                    .annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                devices: extra
                    .devices
                    .iter()
                    .map(|(host, container)| v1::Device {
                        host_path: host.display().to_string(),
                        container_path: container.to_string(),
                        permissions: "rwm".into(),
                    })
                    .collect(),
                mounts: extra
                    .mounts
                    .iter()
                    .map(|(host, container, readonly)| v1::Mount {
                        host_path: host.display().to_string(),
                        container_path: container.to_string(),
                        readonly: *readonly,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            sandbox_config: Some(pod_config.clone()),
        };
        let id = self
            .call(async move { c.create_container(req).await })?
            .container_id;
        let mut c = self.client.clone();
        let req = StartContainerRequest {
            container_id: id.clone(),
        };
        self.call(async move { c.start_container(req).await })?;
        Ok(id)
    }

    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_secs: i64,
    ) -> Result<ExecResult, tonic::Status> {
        let mut c = self.client.clone();
        let req = ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_secs,
        };
        self.call(async move { c.exec_sync(req).await })
            .map(|r| ExecResult {
                stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
                exit_code: r.exit_code,
            })
    }

    /// PodSandboxStats (kubelet's pod-level stats).
    pub fn pod_stats(&self, pod: &str) -> Result<v1::PodSandboxStats, tonic::Status> {
        let mut c = self.client.clone();
        let req = v1::PodSandboxStatsRequest {
            pod_sandbox_id: pod.to_string(),
        };
        self.call(async move { c.pod_sandbox_stats(req).await })
            .map(|r| r.stats.unwrap_or_default())
    }

    pub fn container_stats(&self, id: &str) -> Result<v1::ContainerStats, tonic::Status> {
        let mut c = self.client.clone();
        let req = ContainerStatsRequest {
            container_id: id.to_string(),
        };
        self.call(async move { c.container_stats(req).await })
            .map(|r| r.stats.unwrap_or_default())
    }

    /// UpdateContainerResources with a new memory limit.
    pub fn update_memory(&self, id: &str, limit_bytes: i64) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        let req = v1::UpdateContainerResourcesRequest {
            container_id: id.to_string(),
            linux: Some(v1::LinuxContainerResources {
                memory_limit_in_bytes: limit_bytes,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.call(async move { c.update_container_resources(req).await })
            .map(drop)
    }

    pub fn stop_container(&self, id: &str, timeout: i64) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        let req = StopContainerRequest {
            container_id: id.to_string(),
            timeout,
        };
        self.call(async move { c.stop_container(req).await })
            .map(drop)
    }

    pub fn remove_container(&self, id: &str) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        let req = RemoveContainerRequest {
            container_id: id.to_string(),
        };
        self.call(async move { c.remove_container(req).await })
            .map(drop)
    }

    /// StopPodSandbox then RemovePodSandbox.
    pub fn remove_pod(&self, pod: &str) -> Result<(), tonic::Status> {
        let mut c = self.client.clone();
        let req = StopPodSandboxRequest {
            pod_sandbox_id: pod.to_string(),
        };
        self.call(async move { c.stop_pod_sandbox(req).await })?;
        let mut c = self.client.clone();
        let req = RemovePodSandboxRequest {
            pod_sandbox_id: pod.to_string(),
        };
        self.call(async move { c.remove_pod_sandbox(req).await })
            .map(drop)
    }
}

/// Removes the pod cgroup of pod `name` (and the tests' parent when empty) from every
/// hierarchy, as kubelet does after the pod; best effort.
pub fn remove_cgroup_parent(name: &str) {
    let parent = Cri::cgroup_parent(name);
    let Ok(roots) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut dirs: Vec<std::path::PathBuf> = roots.flatten().map(|e| e.path()).collect();
    dirs.push("/sys/fs/cgroup".into());
    for root in dirs {
        let dir = root.join(parent.trim_start_matches('/'));
        let _ = std::fs::remove_dir(&dir);
        if let Some(up) = dir.parent() {
            let _ = std::fs::remove_dir(up);
        }
    }
}
