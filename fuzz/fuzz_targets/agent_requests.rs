//! Fuzzes the agent's readers of what the host sends it (the other direction of the agent
//! protocol): a `CreateTaskRequest` as ttrpc delivers it (protobuf), its container
//! configuration (`options`, JSON), its stdio fields and rootfs mount, kestrel's own calls
//! (JSON), and the pod configuration on the kernel command line. Checked: nothing panics,
//! and a copied path that is accepted never leaves the directory it is joined to.
//!
//! Input: byte 0 picks the reader, the rest is its input.
//! `cargo fuzz run agent_requests` from the repository root.

#![no_main]

use std::path::{Component, Path};

use kestrel_agent_protocol::pod::PodConfig;
use kestrel_agent_protocol::protos::api::CreateTaskRequest;
use kestrel_agent_protocol::protos::protobuf::Message;
use kestrel_agent_protocol::{mount_size, Call, ContainerConfig, CopiedEntry, StdioPort};
use libfuzzer_sys::fuzz_target;

fn check_entries(entries: &[CopiedEntry]) {
    for e in entries {
        if let Ok(rel) = e.relative() {
            let joined = Path::new("/run/kestrel/volumes/v").join(rel);
            assert!(joined.starts_with("/run/kestrel/volumes/v"));
            assert!(joined
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_))));
        }
    }
}

fn check_config(config: &ContainerConfig) {
    for m in &config.copied {
        check_entries(&m.entries);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            let Ok(req) = CreateTaskRequest::parse_from_bytes(rest) else {
                return;
            };
            for field in [&req.stdin, &req.stdout, &req.stderr] {
                let _ = StdioPort::parse(field);
            }
            for m in &req.rootfs {
                let _ = mount_size(m);
            }
            if let Some(Ok(config)) = req.options.as_ref().map(ContainerConfig::from_any) {
                check_config(&config);
            }
        }
        1 => {
            if let Ok(Call::SyncVolume { entries, .. }) = Call::decode(rest) {
                check_entries(&entries);
            }
        }
        2 => {
            let mut any =
                kestrel_agent_protocol::protos::protobuf::well_known_types::any::Any::new();
            any.type_url = kestrel_agent_protocol::CONTAINER_CONFIG_TYPE_URL.to_string();
            any.value = rest.to_vec();
            if let Ok(config) = ContainerConfig::from_any(&any) {
                check_config(&config);
            }
        }
        _ => {
            if let Ok(cmdline) = std::str::from_utf8(rest) {
                let _ = PodConfig::from_cmdline(cmdline);
            }
        }
    }
});
