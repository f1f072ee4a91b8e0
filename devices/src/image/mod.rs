//! Disk image formats: the QCOW2 → raw converter and the cache of converted bases.
//!
//! Everything here runs before a VM starts, on the caller's thread (the shim's image
//! preparation or the `kestrel convert` command); the VMM itself only ever opens raw
//! files (DESIGN.md, "Disks and images") and never probes a disk's format.
//!
//! - [`qcow2`]: header and table parsing, every value bounded, hostile features refused;
//! - [`convert`]: the streaming, sparse converter (QCOW2 or raw in, raw out);
//! - [`cache`]: converted bases stored by digest, built once even by concurrent callers.

pub mod cache;
pub mod convert;
pub mod qcow2;
pub mod vm_disk;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;

/// The format of an input image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// A raw disk image.
    Raw,
    /// A QCOW2 image (version 2 or 3).
    Qcow2,
}

impl ImageFormat {
    /// The format's usual name (`raw`, `qcow2`).
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Detects the format of an *input* image by its magic: QCOW2 if it starts with
/// `QFI\xfb`, raw otherwise. Only for images being imported; never call this on a disk a
/// guest has written to.
pub fn detect_format(file: &File) -> io::Result<ImageFormat> {
    let mut magic = [0u8; 4];
    let n = qcow2::read_up_to(file, 0, &mut magic)?;
    Ok(if n == 4 && magic == qcow2::QCOW2_MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}
