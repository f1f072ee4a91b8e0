//! An output file that appears under its name only when complete.
//!
//! [`TempOutput::create`] opens an *unnamed* file in the output's directory (`O_TMPFILE`):
//! whatever kills the writer (an error, SIGTERM, SIGKILL, a crash), nothing is left on
//! disk, and the name never exceeds the output's own. [`TempOutput::persist`] links the
//! finished file into place (`linkat` through `/proc/self/fd`, then a rename when the
//! name is taken). Filesystems without `O_TMPFILE` get a short hidden name instead,
//! removed on drop. Runs on the caller's thread.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A file being written in `dir`, not yet under its final name.
#[derive(Debug)]
pub struct TempOutput {
    file: File,
    dir: PathBuf,
    /// The hidden name of the fallback (no `O_TMPFILE`); removed on drop unless persisted.
    named: Option<PathBuf>,
}

fn hidden_name(dir: &Path) -> PathBuf {
    dir.join(format!(
        ".kestrel-{}-{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

impl TempOutput {
    /// A new, empty file in `dir` with permissions `mode`, open read-write.
    pub fn create(dir: &Path, mode: u32) -> io::Result<Self> {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        match OpenOptions::new()
            .read(true)
            .write(true)
            .mode(mode)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
        {
            Ok(file) => {
                return Ok(TempOutput {
                    file,
                    dir: dir.to_path_buf(),
                    named: None,
                })
            }
            // EOPNOTSUPP (or EISDIR from kernels that predate it): fall back to a name.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EISDIR)
                ) => {}
            Err(e) => return Err(e),
        }
        let path = hidden_name(dir);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)?;
        Ok(TempOutput {
            file,
            dir: dir.to_path_buf(),
            named: Some(path),
        })
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// A path that opens this file, also from a child process (`/proc/<pid>/fd/<fd>`, or
    /// the hidden name of the fallback).
    pub fn path(&self) -> PathBuf {
        match &self.named {
            Some(p) => p.clone(),
            None => PathBuf::from(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                self.file.as_raw_fd()
            )),
        }
    }

    /// Gives the file the name `path` (in the directory it was created in), replacing
    /// what is there, and fsyncs the directory. The caller syncs the data first.
    pub fn persist(mut self, path: &Path) -> io::Result<()> {
        match self.named.take() {
            Some(tmp) => {
                if let Err(e) = fs::rename(&tmp, path) {
                    self.named = Some(tmp);
                    return Err(e);
                }
            }
            None => {
                let proc_path = PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()));
                match link(&proc_path, path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        // Link under a hidden name, then rename over the old file.
                        let tmp = hidden_name(&self.dir);
                        link(&proc_path, &tmp)?;
                        if let Err(e) = fs::rename(&tmp, path) {
                            let _ = fs::remove_file(&tmp);
                            return Err(e);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        File::open(&self.dir)?.sync_all()
    }
}

fn link(from: &Path, to: &Path) -> io::Result<()> {
    rustix::fs::linkat(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    )
    .map_err(io::Error::from)
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if let Some(tmp) = self.named.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn nothing_is_named_until_persisted_and_a_drop_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let t = TempOutput::create(dir.path(), 0o644).unwrap();
        t.file().write_all(b"partial").unwrap();
        // /tmp supports O_TMPFILE: the file has no name at all.
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
        drop(t);
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn persist_creates_or_replaces_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let t = TempOutput::create(dir.path(), 0o600).unwrap();
        t.file().write_all(b"one").unwrap();
        t.persist(&out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"one");
        let t = TempOutput::create(dir.path(), 0o600).unwrap();
        t.file().write_all(b"two").unwrap();
        t.persist(&out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"two");
        assert_eq!(names(dir.path()), ["out"]);
    }
}
