//! Fuzzes the shim's readers of a task's OCI spec (the bundle's `config.json`, with
//! kestrel's and CRI's annotations): the input is the JSON. Checked: nothing panics, the
//! VM's shape stays within what the readers promise (a pod's slots within 1..=16, a valid
//! host name), and the guest gets every environment entry.
//! `cargo fuzz run shim_spec` from the repository root.

#![no_main]

use kestrel_shim::untrusted::{container_vm, grouping, host_name, pod_vm, role, vm_spec};
use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::Spec;

fn valid_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fuzz_target!(|json: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<Spec>(json) else {
        return;
    };
    let _ = role(&spec);
    let _ = grouping(&spec, "task-id");
    let _ = container_vm(&spec);
    if let Ok((_, slots)) = pod_vm(&spec) {
        assert!((1..=16).contains(&slots));
    }
    if let Ok(vm) = vm_spec(&spec, "task_id") {
        assert!(valid_host_name(&vm.hostname), "{:?}", vm.hostname);
        let env = spec.process().as_ref().and_then(|p| p.env().as_ref());
        assert_eq!(vm.env.len(), env.map_or(0, Vec::len));
    }
    if let Some(h) = spec.hostname() {
        assert!(valid_host_name(&host_name(h)));
    }
});
