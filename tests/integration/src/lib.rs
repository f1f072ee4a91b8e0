//! Helpers for kestrel's end-to-end tests (the tests themselves live in `tests/`).
//!
//! - [`containerd`]: a private containerd 1.6 (own root, state and sockets in a temporary
//!   directory; docs/containerd.md §1) driven through `ctr`, with every call under a
//!   timeout, and console capture through a FIFO for detached tasks.
//! - [`cri`]: a synchronous CRI client (kubelet's calls) for the pod tests.
//! - [`images`]: the test images of `tests/images/` (containerDisk and busybox OCI
//!   archives), built once per test process and cached across runs.
//! - [`target_dir`], [`shim_binary`]: where cargo put the binaries under test.

pub mod containerd;
pub mod cri;
pub mod images;
pub mod kestrel;

use std::path::PathBuf;

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .and_then(|p| p.parent())
        .map_or_else(|| manifest.clone(), PathBuf::from)
}

/// Cargo's target directory: `$CARGO_TARGET_DIR`, else derived from the running test
/// binary (`<target>/<profile>/deps/<test>`), else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        };
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let deps = exe.parent()?;
            (deps.file_name()? == "deps").then(|| deps.parent()?.parent().map(PathBuf::from))?
        })
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The file name containerd looks up for runtime `io.containerd.kestrel.v2`.
pub const SHIM_NAME: &str = "containerd-shim-kestrel-v2";

/// The kestrel shim binary: `$KESTREL_SHIM` if set, else the newest of
/// `<target>/{debug,release}/containerd-shim-kestrel-v2`. The error lists where it looked.
pub fn shim_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("KESTREL_SHIM").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("KESTREL_SHIM={} does not exist", path.display()))
        };
    }
    let target = target_dir();
    let candidates: Vec<PathBuf> = ["debug", "release"]
        .iter()
        .map(|p| target.join(p).join(SHIM_NAME))
        .collect();
    candidates
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p.clone())
        .ok_or_else(|| {
            format!(
                "the kestrel shim is not built: none of {} exists (build it with \
                 `cargo build -p kestrel-shim` or point KESTREL_SHIM at the binary)",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}
