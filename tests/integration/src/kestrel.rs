//! What the containerd tests of the kestrel shim share: one private containerd per test
//! (one test at a time: VMs are expensive on this project's machines), unique ids, and
//! the check that a task left nothing behind.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use sha2::Digest;

use crate::containerd::{self, Containerd, NAMESPACE};

/// VMs are expensive here: one test at a time per test binary.
static SERIAL: Mutex<()> = Mutex::new(());

/// A private containerd with kestrel as a runtime; keep the whole value alive for the
/// test (the guard serialises the tests; a pattern like `Setup { c, .. }` would drop it at
/// once).
pub struct Setup {
    pub c: Containerd,
    _serial: MutexGuard<'static, ()>,
}

/// Starts containerd with the kestrel shim and imports `images` into the test namespace;
/// `None` (after printing `skipped: …`) without containerd or /dev/kvm. Panics when the
/// shim is not built.
pub fn setup(images: &[&Path]) -> Option<Setup> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !containerd::installed() {
        kestrel_test_support::skip("containerd not installed");
        return None;
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        kestrel_test_support::skip(format!("/dev/kvm not usable: {e}"));
        return None;
    }
    let shim = crate::shim_binary().unwrap_or_else(|e| panic!("{e}"));
    let c = Containerd::builder().shim(shim).start_or_skip()?;
    for image in images {
        c.import(image, NAMESPACE);
    }
    Some(Setup { c, _serial: serial })
}

/// Writes to `path` ctr's default spec with `root` as its (read-only) root, no terminal,
/// `annotations`, and `args` as the process's when given: a task `ctr run --config` runs
/// without an image. Panics on failure (a test's setup).
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
pub fn write_spec(
    c: &Containerd,
    path: &Path,
    root: &Path,
    annotations: serde_json::Value,
    args: Option<&[&str]>,
) {
    let mut s: serde_json::Value = serde_json::from_str(&c.ctr_ok(&["oci", "spec"])).unwrap();
    s["root"] = serde_json::json!({"path": root, "readonly": true});
    s["process"]["terminal"] = serde_json::json!(false);
    if let Some(args) = args {
        s["process"]["args"] = serde_json::json!(args);
    }
    s["annotations"] = annotations;
    std::fs::write(path, serde_json::to_vec(&s).unwrap()).unwrap();
}

/// `ctr run --rm` of task `id` from the spec file `spec` on the kestrel runtime.
pub fn run_config_args(spec: &Path, id: &str) -> Vec<String> {
    let spec = spec.to_string_lossy();
    let spec = spec.as_ref();
    [
        "run",
        "--rm",
        "--runtime",
        containerd::KESTREL_RUNTIME,
        "--config",
        spec,
        id,
    ]
    .map(String::from)
    .to_vec()
}

/// Container ids unique to this test process: /var/lib/kestrel is shared with other runs.
pub fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// kestrel's state directory (image cache, writable layers): `$KESTREL_STATE_DIR`, else
/// `/var/lib/kestrel`.
pub fn state_dir() -> PathBuf {
    std::env::var_os("KESTREL_STATE_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/var/lib/kestrel"), PathBuf::from)
}

/// Files and directories under kestrel's state directory whose name mentions `id`.
/// What kestrel's state directory still holds of task `id` (overlays, writable layers).
pub fn leftovers(id: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, id: &str, depth: u32, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if e.file_name().to_string_lossy().contains(id) {
                found.push(path.clone());
            }
            if depth < 6 && e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&path, id, depth + 1, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(&state_dir(), id, 0, &mut found);
    found
}

/// The shim's socket directory of task `id`: `/run/kestrel/s/<first 8 bytes of
/// sha256("<namespace>/<id>")>` (the shim's `host::run_dir`).
pub fn run_dir(id: &str) -> PathBuf {
    run_dir_in(NAMESPACE, id)
}

/// The run directory of the shim of task `id` in containerd namespace `ns`.
pub fn run_dir_in(ns: &str, id: &str) -> PathBuf {
    let digest = sha2::Sha256::digest(format!("{ns}/{id}").as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Path::new("/run/kestrel/s").join(hex)
}

/// Nothing of task `id` is left: no task, no container, no shim, no bundle, no state
/// (overlays, writable layers), no VM sockets.
pub fn assert_gone(c: &Containerd, id: &str) {
    assert!(
        c.task_status(id).is_none(),
        "task {id} still listed: {:?}",
        c.tasks()
    );
    assert!(
        !c.containers().iter().any(|x| x == id),
        "container {id} still listed: {:?}",
        c.containers()
    );
    let shims: Vec<_> = c
        .shim_processes()
        .into_iter()
        .filter(|p| p.args.iter().any(|a| a.to_string_lossy() == id))
        .collect();
    assert!(shims.is_empty(), "shim processes of {id} left: {shims:?}");
    assert!(
        !c.bundle_dir(id).exists(),
        "bundle {} left",
        c.bundle_dir(id).display()
    );
    let left = leftovers(id);
    assert!(left.is_empty(), "kestrel state of {id} left: {left:?}");
    let run = run_dir(id);
    assert!(
        !run.exists(),
        "VM sockets of {id} left in {}",
        run.display()
    );
}
