//! Where kestrel's guest kernel and initramfs are found when the caller does not say
//! (shared by the CLI, the shim and the tests).
//!
//! `$KESTREL_ASSETS` when it is set (and then only there); otherwise
//! `/usr/local/share/kestrel` (what `scripts/install.sh` writes), then
//! `~/.cache/kestrel/assets` (what `scripts/build-guest.sh` writes).

use std::path::PathBuf;

pub const KERNEL: &str = "vmlinux";
pub const INITRD: &str = "initramfs.cpio";

#[derive(Debug, thiserror::Error)]
#[error("no default {name} found (looked in {searched}); build it with scripts/build-guest.sh or pass a path")]
pub struct AssetError {
    name: &'static str,
    searched: String,
}

pub fn search_dirs() -> Vec<PathBuf> {
    if let Some(d) = std::env::var_os("KESTREL_ASSETS") {
        return vec![PathBuf::from(d)];
    }
    let mut dirs = vec![PathBuf::from("/usr/local/share/kestrel")];
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cache/kestrel/assets"));
    }
    dirs
}

pub fn default_asset(name: &'static str) -> Result<PathBuf, AssetError> {
    let dirs = search_dirs();
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .ok_or_else(|| AssetError {
            name,
            searched: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}
