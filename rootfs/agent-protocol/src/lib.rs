//! The API between kestrel's shim and its guest agent.
//!
//! The agent serves containerd's own task API (`containerd.task.v2.Task` from
//! `containerd-shim-protos`, the crate the shim serves to containerd) over ttrpc on vsock
//! port [`AGENT_PORT`]. The shim forwards containerd's requests almost one to one and
//! rewrites only what cannot cross the VM boundary:
//!
//! - **rootfs**: `CreateTaskRequest.rootfs` names a virtio-blk disk by its serial
//!   ([`rootfs_mount`]), not host paths;
//! - **the OCI spec**: the bundle lives on the host, so `CreateTaskRequest.options` carries
//!   a [`ContainerConfig`] (the spec, and the contents of the spec's bind mounts of host
//!   files, copied in) as JSON under [`CONTAINER_CONFIG_TYPE_URL`];
//! - **stdio**: each stream is its own vsock connection that the agent opens to the host
//!   (CID 2) on the port the shim put in the request as `vsock:<port>` ([`StdioPort`]);
//!   raw bytes, EOF is a shutdown. With a terminal, stdout carries the merged stream.
//!
//! `Wait` answers only after the process's output has been sent and its streams shut
//! down, so the shim can close containerd's FIFOs before it reports the exit.

pub use containerd_shim_protos as protos;
pub use oci_spec;

#[cfg(feature = "netlink")]
pub mod netlink;
pub mod pod;

use serde::{Deserialize, Serialize};

/// The vsock port the agent's ttrpc server listens on.
pub const AGENT_PORT: u32 = 1024;
/// The host port the agent connects to at boot to report [`GuestEvent`]s, one JSON object
/// a line.
pub const EVENTS_PORT: u32 = 1025;
/// The vsock port of the agent's port forwarder: the host connects, writes the guest TCP
/// port as one line (`8080\n`), and the stream is then joined to a connection to
/// `127.0.0.1:<port>` (or `[::1]:<port>`) in the guest. CRI's PortForward reaches a pod's
/// ports this way.
pub const FORWARD_PORT: u32 = 1026;
/// The host's vsock CID, to which the agent connects for stdio.
pub const HOST_CID: u32 = 2;
/// `type_url` of the `Any` in `CreateTaskRequest.options` that holds a [`ContainerConfig`].
pub const CONTAINER_CONFIG_TYPE_URL: &str = "kestrel.dev/agent/v1/ContainerConfig";
/// `Mount.type` prefix of a rootfs given by disk serial: `Mount { type: "ext4",
/// source: "serial:<serial>" }`.
pub const SERIAL_PREFIX: &str = "serial:";
/// Kernel command-line word that makes the agent serve (without it, it reports what the
/// guest sees and powers off, which is what the boot tests and `kestrel run` use).
pub const SERVE_PARAM: &str = "kestrel.agent=serve";
/// The longest line of the events stream ([`EVENTS_PORT`]) the host reads; a longer one
/// ends the stream.
pub const MAX_EVENT_LINE: usize = 64 * 1024;
/// The most guest ports one [`GuestEvent::Listening`] may name.
pub const MAX_LISTENING_PORTS: usize = 1024;
/// The largest total size of host files copied into a container (bind-mount sources).
pub const MAX_COPIED_BYTES: usize = 1 << 20;

/// What the agent needs to create a container, beyond the task API's request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerConfig {
    /// The container's OCI runtime spec, as containerd wrote it into the bundle.
    pub spec: oci_spec::runtime::Spec,
    /// The sources of the spec's bind mounts that were copied in, by mount destination.
    #[serde(default)]
    pub copied: Vec<CopiedMount>,
    /// Host block devices of the spec (`linux.devices` of type `b`: Kubernetes'
    /// `volumeDevices`), each a virtio-blk disk of the VM that appears at `path` in the
    /// container.
    #[serde(default)]
    pub block_devices: Vec<BlockDevice>,
}

/// A block device of the container: the VM's disk `serial` (of `size` bytes) at `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDevice {
    pub path: String,
    pub serial: String,
    pub size: u64,
}

/// A bind mount whose host source (a file or a small directory) was copied into the VM.
///
/// A copy is a *volume* of the VM keyed by its host source: every container that mounts
/// the same source shares one copy (a pod's emptyDir, its `/etc/hosts`), the shim keeps it
/// in step with the host ([`Call::SyncVolume`]: ConfigMaps, Secrets and tokens change), and
/// reads back what a container wrote into a file ([`Call::ReadVolume`]: the termination
/// log). A `/dev/shm` directory is a tmpfs of the VM shared the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopiedMount {
    /// The host path the copy was made from (empty: a copy of the container's own).
    #[serde(default)]
    pub source: String,
    /// The mount's destination in the container.
    pub destination: String,
    /// The source's entries: one with an empty path for a file, else the directory tree.
    pub entries: Vec<CopiedEntry>,
}

/// One file, directory or symlink of a copied mount source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopiedEntry {
    /// Relative to the mount's source; empty for the source itself.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    pub kind: EntryKind,
}

impl CopiedEntry {
    /// The entry's path relative to the mount's source, refused unless every component is
    /// a plain name (no `..`, no root, no `.`): the host names it, and the agent joins it to
    /// a directory of its own.
    pub fn relative(&self) -> Result<&std::path::Path, ProtocolError> {
        let rel = std::path::Path::new(&self.path);
        if rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(ProtocolError::NotRelative(self.path.clone()));
        }
        Ok(rel)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
}

/// The agent's second ttrpc service beside containerd's task API: kestrel's own calls, one
/// method whose request and answer are JSON ([`Call`], [`Reply`]) in the ttrpc payload.
pub const KESTREL_SERVICE: &str = "kestrel.agent.v1.Kestrel";
pub const CALL_METHOD: &str = "Call";

/// A call of [`KESTREL_SERVICE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum Call {
    /// Make the volume copied from `source` equal to `entries` (as [`CopiedMount`] has
    /// them), in place: changed files and symlinks are replaced by rename, missing entries
    /// removed. A volume no container has mounted yet is left alone.
    SyncVolume {
        source: String,
        entries: Vec<CopiedEntry>,
    },
    /// The contents of the volume copied from `source`, a regular file.
    ReadVolume { source: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Done,
    Data { data: Vec<u8> },
}

impl Call {
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        serde_json::to_vec(self).map_err(ProtocolError::Json)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        serde_json::from_slice(bytes).map_err(ProtocolError::Json)
    }
}

impl Reply {
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        serde_json::to_vec(self).map_err(ProtocolError::Json)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        serde_json::from_slice(bytes).map_err(ProtocolError::Json)
    }
}

/// What the agent reports without being asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum GuestEvent {
    /// The kernel's OOM killer killed a process of this container (its cgroup's
    /// `memory.events` oom_kill count went up).
    Oom { container_id: String },
    /// The TCP ports something in the pod VM listens on now (all of them, sorted), sent
    /// when the set changes: the shim listens on the same ports on localhost of the pod's
    /// network namespace, where CRI's PortForward dials, and forwards to [`FORWARD_PORT`].
    Listening { ports: Vec<u16> },
}

impl GuestEvent {
    /// One line of the events stream.
    pub fn to_line(&self) -> Result<String, ProtocolError> {
        let mut line = serde_json::to_string(self).map_err(ProtocolError::Json)?;
        line.push('\n');
        Ok(line)
    }

    /// Decodes one line of the events stream. The agent may be compromised: a
    /// [`GuestEvent::Listening`] comes back sorted, without repeats, and with at most
    /// [`MAX_LISTENING_PORTS`] ports (the host opens two listeners for each).
    pub fn from_line(line: &str) -> Result<Self, ProtocolError> {
        let mut event: GuestEvent =
            serde_json::from_str(line.trim_end()).map_err(ProtocolError::Json)?;
        if let GuestEvent::Listening { ports } = &mut event {
            ports.sort_unstable();
            ports.dedup();
            if ports.len() > MAX_LISTENING_PORTS {
                return Err(ProtocolError::TooManyPorts(ports.len()));
            }
        }
        Ok(event)
    }
}

/// Errors decoding what the other side sent.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("stdio address {0:?} is not vsock:<port>")]
    BadStdio(String),
    #[error("CreateTaskRequest.options is not a {CONTAINER_CONFIG_TYPE_URL} (got {0:?})")]
    NotAConfig(String),
    #[error("cannot decode the container configuration")]
    Json(#[source] serde_json::Error),
    #[error("the kernel command line's {} is not base64url", pod::POD_PARAM)]
    BadPodParam,
    #[error("copied path {0:?} is not relative")]
    NotRelative(String),
    #[error("the guest reports {0} listening ports (at most {MAX_LISTENING_PORTS})")]
    TooManyPorts(usize),
}

/// A stdio stream's vsock port, as written in the task API's stdin/stdout/stderr fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StdioPort(pub u32);

impl StdioPort {
    /// `vsock:<port>`.
    pub fn address(self) -> String {
        format!("vsock:{}", self.0)
    }

    /// `None` for an empty field (no such stream).
    pub fn parse(field: &str) -> Result<Option<StdioPort>, ProtocolError> {
        if field.is_empty() {
            return Ok(None);
        }
        field
            .strip_prefix("vsock:")
            .and_then(|p| p.parse().ok())
            .map(|p| Some(StdioPort(p)))
            .ok_or_else(|| ProtocolError::BadStdio(field.to_string()))
    }
}

/// `Mount.options` entry giving the disk's size in bytes, `kestrel.size=<bytes>`: a disk
/// put behind a pod VM's placeholder slot reaches the guest with a config-change interrupt,
/// so the agent waits until the device has this size before it mounts it.
pub const SIZE_OPTION: &str = "kestrel.size=";

/// Whether the spec gives the container a namespace of `typ` of its own. One with a `path`
/// names a host namespace (a pod's containers name the sandbox's): in the guest that is the
/// VM's, which the container shares; none at all is the VM's too.
pub fn own_namespace(
    spec: &oci_spec::runtime::Spec,
    typ: oci_spec::runtime::LinuxNamespaceType,
) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == typ && n.path().is_none()))
}

/// The rootfs mount of a container whose root is the disk with `serial`, of `size` bytes.
pub fn rootfs_mount(serial: &str, fstype: &str, read_only: bool, size: u64) -> protos::api::Mount {
    let mut options = vec![format!("{SIZE_OPTION}{size}")];
    if read_only {
        options.push("ro".to_string());
    }
    protos::api::Mount {
        type_: fstype.to_string(),
        source: format!("{SERIAL_PREFIX}{serial}"),
        options,
        ..Default::default()
    }
}

/// The size a [`rootfs_mount`] announces, if any.
pub fn mount_size(m: &protos::api::Mount) -> Option<u64> {
    m.options
        .iter()
        .find_map(|o| o.strip_prefix(SIZE_OPTION))
        .and_then(|v| v.parse().ok())
}

impl ContainerConfig {
    /// As the `Any` of `CreateTaskRequest.options`.
    pub fn to_any(&self) -> Result<protos::protobuf::well_known_types::any::Any, ProtocolError> {
        Ok(protos::protobuf::well_known_types::any::Any {
            type_url: CONTAINER_CONFIG_TYPE_URL.to_string(),
            value: serde_json::to_vec(self).map_err(ProtocolError::Json)?,
            ..Default::default()
        })
    }

    pub fn from_any(
        any: &protos::protobuf::well_known_types::any::Any,
    ) -> Result<Self, ProtocolError> {
        if any.type_url != CONTAINER_CONFIG_TYPE_URL {
            return Err(ProtocolError::NotAConfig(any.type_url.clone()));
        }
        serde_json::from_slice(&any.value).map_err(ProtocolError::Json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_addresses() {
        assert_eq!(StdioPort(2001).address(), "vsock:2001");
        assert_eq!(
            StdioPort::parse("vsock:2001").unwrap(),
            Some(StdioPort(2001))
        );
        assert_eq!(StdioPort::parse("").unwrap(), None);
        for bad in ["/run/fifo", "vsock:", "vsock:x", "vsock:99999999999"] {
            assert!(StdioPort::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_round_trips_through_any() {
        let spec: oci_spec::runtime::Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","process":{"cwd":"/","user":{"uid":0,"gid":0},"args":["echo","hi"]}}"#,
        )
        .unwrap();
        let config = ContainerConfig {
            spec,
            block_devices: vec![],
            copied: vec![CopiedMount {
                source: "/var/lib/pod/hosts".into(),
                destination: "/etc/hosts".into(),
                entries: vec![CopiedEntry {
                    path: String::new(),
                    mode: 0o644,
                    kind: EntryKind::File(b"127.0.0.1 localhost\n".to_vec()),
                }],
            }],
        };
        let any = config.to_any().unwrap();
        let back = ContainerConfig::from_any(&any).unwrap();
        assert_eq!(back.copied, config.copied);
        assert_eq!(
            back.spec
                .process()
                .as_ref()
                .unwrap()
                .args()
                .as_ref()
                .unwrap(),
            &["echo", "hi"]
        );
        let mut wrong = any.clone();
        wrong.type_url = "other".into();
        assert!(matches!(
            ContainerConfig::from_any(&wrong),
            Err(ProtocolError::NotAConfig(_))
        ));
    }

    #[test]
    fn events_are_json_lines() {
        let e = GuestEvent::Oom {
            container_id: "c1".into(),
        };
        let line = e.to_line().unwrap();
        assert_eq!(line, "{\"event\":\"oom\",\"container_id\":\"c1\"}\n");
        assert_eq!(GuestEvent::from_line(&line).unwrap(), e);
        assert!(GuestEvent::from_line("{\"event\":\"reboot\"}").is_err());
        assert!(GuestEvent::from_line("not json").is_err());
    }

    #[test]
    fn own_namespaces_are_those_without_a_path() {
        use oci_spec::runtime::LinuxNamespaceType::{Ipc, Network, Uts};
        let spec: oci_spec::runtime::Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"uts"},{"type":"ipc","path":"/proc/7/ns/ipc"}]}}"#,
        )
        .unwrap();
        assert!(own_namespace(&spec, Uts));
        assert!(!own_namespace(&spec, Ipc));
        assert!(!own_namespace(&spec, Network));
        let none: oci_spec::runtime::Spec =
            serde_json::from_str(r#"{"ociVersion":"1.0.2"}"#).unwrap();
        assert!(!own_namespace(&none, Uts));
    }

    #[test]
    fn calls_and_replies_round_trip() {
        let call = Call::SyncVolume {
            source: "/var/lib/kubelet/pods/u/volumes/cm".into(),
            entries: vec![CopiedEntry {
                path: "..data".into(),
                mode: 0o777,
                kind: EntryKind::Symlink("..2026_12_07".into()),
            }],
        };
        assert_eq!(Call::decode(&call.encode().unwrap()).unwrap(), call);
        let reply = Reply::Data {
            data: b"done".to_vec(),
        };
        assert_eq!(Reply::decode(&reply.encode().unwrap()).unwrap(), reply);
        assert!(Call::decode(b"{\"call\":\"format_disk\"}").is_err());
    }

    #[test]
    fn rootfs_by_serial() {
        let m = rootfs_mount("kestrel-r1", "ext4", true, 1 << 30);
        assert_eq!(
            (m.type_.as_str(), m.source.as_str()),
            ("ext4", "serial:kestrel-r1")
        );
        assert_eq!(m.options, ["kestrel.size=1073741824", "ro"]);
        assert_eq!(mount_size(&m), Some(1 << 30));
        assert_eq!(mount_size(&protos::api::Mount::default()), None);
    }

    #[test]
    fn copied_paths_stay_below_their_base() {
        let entry = |path: &str| CopiedEntry {
            path: path.into(),
            mode: 0o644,
            kind: EntryKind::Dir,
        };
        for ok in ["", "a", "a/b", "..data", "a/..b/c"] {
            assert!(entry(ok).relative().is_ok(), "{ok}");
        }
        for bad in [
            "..",
            "../x",
            "a/../../x",
            "/etc",
            "./a",
            "a/./b/..",
            "a//../b",
        ] {
            assert!(
                matches!(entry(bad).relative(), Err(ProtocolError::NotRelative(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn listening_ports_come_back_sorted_and_bounded() {
        let event = GuestEvent::from_line("{\"event\":\"listening\",\"ports\":[8080,22,8080]}\n");
        assert_eq!(
            event.unwrap(),
            GuestEvent::Listening {
                ports: vec![22, 8080]
            }
        );
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let line = GuestEvent::Listening { ports: all }.to_line().unwrap();
        assert!(matches!(
            GuestEvent::from_line(&line),
            Err(ProtocolError::TooManyPorts(65536))
        ));
        let most: Vec<u16> = (1..=MAX_LISTENING_PORTS as u16).collect();
        let line = GuestEvent::Listening { ports: most }.to_line().unwrap();
        assert!(line.len() < MAX_EVENT_LINE);
        assert!(GuestEvent::from_line(&line).is_ok());
    }
}
