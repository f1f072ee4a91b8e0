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
pub mod output;
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

/// Opens an input image read-only without blocking: a FIFO's `open` would wait for a
/// writer forever, so the file is opened `O_NONBLOCK` (which has no effect on regular files
/// and block devices) and [`input_len`] then refuses anything else.
pub fn open_input(path: &std::path::Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    // Reads of what is left (a regular file or a block device) block as usual.
    let flags = rustix::fs::fcntl_getfl(&file)?;
    rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK)?;
    Ok(file)
}

/// What kind of file `ft` is, for messages ("directory", "FIFO"…).
pub fn file_kind(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_file() {
        "regular file"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// The length of an input image: a regular file's size or a block device's (which
/// `stat` reports as 0). Anything else is refused with [`io::ErrorKind::InvalidInput`]
/// and a message naming its kind.
pub fn input_len(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata()?;
    let ft = meta.file_type();
    if ft.is_file() {
        Ok(meta.len())
    } else if ft.is_block_device() {
        rustix::fs::seek(file, rustix::fs::SeekFrom::End(0)).map_err(io::Error::from)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "it is a {}, not a regular file or a block device",
                file_kind(ft)
            ),
        ))
    }
}

/// Refuses an output path that exists and is not a regular file (a device, a FIFO, a
/// directory): the converter replaces the output by a rename, which would destroy it.
pub fn check_output_path(path: &std::path::Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(m) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "it is a {}; the output must be a regular file or a new path",
                file_kind(m.file_type())
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
