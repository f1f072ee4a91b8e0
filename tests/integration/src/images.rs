//! The test images of `tests/images/`, built by their scripts once per test process (the
//! scripts cache their outputs across runs in `${KESTREL_CACHE:-~/.cache/kestrel}/images`).
//!
//! - [`containerdisk`]: `localhost/kestrel-test-vmdisk:1`, KubeVirt containerDisk layout
//!   (`/disk/disk.qcow2`, an ext4 root whose `/sbin/init` is `tests/images/vm-init`);
//! - [`busybox`]: `localhost/busybox:1`, busybox-static with `Cmd ["/bin/sh"]`.
//!
//! Both archives import with `ctr image import` and name themselves.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Name of the containerDisk test image.
pub const VMDISK_IMAGE: &str = "localhost/kestrel-test-vmdisk:1";
/// Name of the busybox image.
pub const BUSYBOX_IMAGE: &str = "localhost/busybox:1";

/// Outputs of `tests/images/build-containerdisk.sh`.
#[derive(Debug, Clone)]
pub struct ContainerDisk {
    /// The OCI archive (`ctr image import` it).
    pub archive: PathBuf,
    /// The disk as it sits in the image.
    pub qcow2: PathBuf,
    /// The same disk before conversion (raw ext4).
    pub ext4: PathBuf,
    /// The static guest init.
    pub vm_init: PathBuf,
}

/// `tests/images/`.
pub fn images_dir() -> PathBuf {
    crate::workspace_root().join("tests").join("images")
}

/// Runs a build script; its stdout lists the output paths, one a line.
fn run_script(name: &str) -> Result<Vec<PathBuf>, String> {
    let script = images_dir().join(name);
    let out = Command::new("bash")
        .arg(&script)
        .env("CARGO_TARGET_DIR", crate::target_dir())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect())
}

/// Builds (or finds in the cache) the containerDisk test image; panics with the script's
/// output on failure.
pub fn containerdisk() -> &'static ContainerDisk {
    static IMAGE: OnceLock<Result<ContainerDisk, String>> = OnceLock::new();
    let built = IMAGE.get_or_init(|| {
        let paths = run_script("build-containerdisk.sh")?;
        match paths.as_slice() {
            [archive, qcow2, ext4, vm_init] => Ok(ContainerDisk {
                archive: archive.clone(),
                qcow2: qcow2.clone(),
                ext4: ext4.clone(),
                vm_init: vm_init.clone(),
            }),
            other => Err(format!("build-containerdisk.sh printed {other:?}")),
        }
    });
    match built {
        Ok(image) => image,
        Err(e) => panic!("cannot build the containerDisk test image: {e}"),
    }
}

/// The busybox and pause archives of `build-busybox.sh`.
fn busybox_archives() -> &'static (PathBuf, PathBuf) {
    static ARCHIVES: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    let built = ARCHIVES.get_or_init(|| match run_script("build-busybox.sh")?.as_slice() {
        [busybox, pause] => Ok((busybox.clone(), pause.clone())),
        other => Err(format!("build-busybox.sh printed {other:?}")),
    });
    match built {
        Ok(p) => p,
        Err(e) => panic!("cannot build the busybox test image: {e}"),
    }
}

/// Builds (or finds in the cache) the busybox image archive; panics on failure.
pub fn busybox() -> &'static Path {
    &busybox_archives().0
}

/// The CRI sandbox image `localhost/pause:1` (busybox's root; sleeps until TERM).
pub fn pause() -> &'static Path {
    &busybox_archives().1
}
