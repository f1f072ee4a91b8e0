//! The cache of converted raw bases, keyed by the digest of the source image.
//!
//! Runs on the caller's thread before a VM starts (the shim's image preparation, the
//! CLI). Layout of the cache root (default [`DEFAULT_ROOT`]):
//!
//! ```text
//! <algo>-<hex>.raw        a complete, fsync'ed, read-only (0444) raw base
//! <algo>-<hex>.lock       flock'ed while the base is being built, removed after
//! ```
//!
//! The base is built in an unnamed file ([`TempOutput`], `O_TMPFILE`) and linked under its
//! final name only after its data and metadata are durable (fchmod, fsync, link, fsync of
//! the directory), so a crash or a kill never leaves a half-written base that looks valid,
//! nor any temporary file. Concurrent callers for the same digest (threads or processes)
//! serialize on the lock file: the first converts, the others wait and then find the
//! finished base. The builder unlinks the lock file before it unlocks it; a waiter that
//! then holds a lock on an unlinked file starts over on a new one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::convert::{convert, ConvertError, ConvertStats, Limits};
use super::output::TempOutput;
use super::{detect_format, open_input};

/// Where bases live unless the caller says otherwise.
pub const DEFAULT_ROOT: &str = "/var/lib/kestrel/images";

/// Why a base could not be found or built.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("invalid image digest {0:?} (expected ALGORITHM:HEX, e.g. sha256:…)")]
    InvalidDigest(String),
    #[error("I/O error on {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("converting {} failed", path.display())]
    Convert {
        path: PathBuf,
        #[source]
        source: ConvertError,
    },
    /// A caller's builder (see [`ImageCache::get_or_build`]) failed.
    #[error("cannot build {what}")]
    Build {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::Io { what, path, source }
}

/// A converted base in the cache.
#[derive(Debug, Clone)]
pub struct CachedImage {
    /// Path of the read-only raw base.
    pub path: PathBuf,
    /// The digest it is stored under (`algo:hex`).
    pub digest: String,
    /// Size of the virtual disk (the base's length).
    pub virtual_size: u64,
    /// What the conversion did, when this call converted; `None` if it was cached.
    pub converted: Option<ConvertStats>,
}

/// A directory of converted bases.
#[derive(Debug, Clone)]
pub struct ImageCache {
    root: PathBuf,
}

impl Default for ImageCache {
    fn default() -> Self {
        ImageCache::new(DEFAULT_ROOT)
    }
}

impl ImageCache {
    /// A cache rooted at `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ImageCache { root: root.into() }
    }

    /// The cache's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path the base for `digest` has (or will have) in this cache.
    pub fn base_path(&self, digest: &str) -> Result<PathBuf, CacheError> {
        Ok(self.root.join(format!("{}.raw", file_stem(digest)?)))
    }

    /// The base stored under `digest`, if it is complete.
    pub fn lookup(&self, digest: &str) -> Result<Option<CachedImage>, CacheError> {
        let path = self.base_path(digest)?;
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(CachedImage {
                path,
                digest: digest.to_string(),
                virtual_size: m.len(),
                converted: None,
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("cached base", &path)(e)),
        }
    }

    /// Returns the base for `source`, converting it (QCOW2 or raw) if it is not cached.
    ///
    /// `digest` names the content (e.g. the OCI layer digest); without it the sha256 of
    /// `source` is computed. `progress(done, total)` is called only if this call converts,
    /// which it does within `limits`.
    pub fn get_or_convert(
        &self,
        source: &Path,
        digest: Option<&str>,
        limits: &Limits,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CachedImage, CacheError> {
        let digest = match digest {
            Some(d) => d.to_string(),
            None => sha256_file(source).map_err(io_err("source image", source))?,
        };
        let mut stats = None;
        let mut image = self.get_or_build(&digest, &mut |output, _| {
            let input = open_input(source).map_err(io_err("source image", source))?;
            let format = detect_format(&input).map_err(io_err("source image", source))?;
            let s = convert(&input, format, output, limits, progress).map_err(|source_err| {
                CacheError::Convert {
                    path: source.to_path_buf(),
                    source: source_err,
                }
            })?;
            let size = s.virtual_size;
            stats = Some(s);
            Ok(size)
        })?;
        image.converted = stats;
        Ok(image)
    }

    /// Returns the base stored under `digest`, building it with `build` if it is not
    /// cached. `build(file, path)` fills the new, empty, unnamed file (open read-write;
    /// `path` opens it, from a child process too) and returns the disk's size; the cache
    /// then makes it read-only and durable and links it into place. Concurrent callers
    /// for one digest build it once.
    pub fn get_or_build(
        &self,
        digest: &str,
        build: &mut dyn FnMut(&File, &Path) -> Result<u64, CacheError>,
    ) -> Result<CachedImage, CacheError> {
        let stem = file_stem(digest)?;
        if let Some(found) = self.lookup(digest)? {
            return Ok(found);
        }
        fs::create_dir_all(&self.root).map_err(io_err("cache directory", &self.root))?;

        let lock_path = self.root.join(format!("{stem}.lock"));
        let lock = lock_exclusive(&lock_path)?;
        // Another caller may have finished while we waited (we then hold a lock file made
        // anew, which goes too).
        if let Some(found) = self.lookup(digest)? {
            let _ = fs::remove_file(&lock_path);
            drop(lock);
            return Ok(found);
        }

        let final_path = self.root.join(format!("{stem}.raw"));
        let result = self.build(&final_path, build);
        // Unlinked while still locked: a waiter notices and starts over (lock_exclusive).
        let _ = fs::remove_file(&lock_path);
        drop(lock);
        let virtual_size = result?;
        Ok(CachedImage {
            path: final_path,
            digest: digest.to_string(),
            virtual_size,
            converted: None,
        })
    }

    fn build(
        &self,
        final_path: &Path,
        build: &mut dyn FnMut(&File, &Path) -> Result<u64, CacheError>,
    ) -> Result<u64, CacheError> {
        let output = TempOutput::create(&self.root, 0o644)
            .map_err(io_err("temporary base in", &self.root))?;
        let size = build(output.file(), &output.path())?;
        let file = output.file();
        file.set_permissions(fs::Permissions::from_mode(0o444))
            .and_then(|()| file.sync_all())
            .map_err(io_err("new base", final_path))?;
        output
            .persist(final_path)
            .map_err(io_err("cached base", final_path))?;
        Ok(size)
    }
}

/// Opens and flocks the lock file at `path`, again if its holder unlinked it meanwhile
/// (the lock then no longer excludes anyone who opens the path anew).
fn lock_exclusive(path: &Path) -> Result<File, CacheError> {
    loop {
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_err("lock file", path))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err("lock file", path)(e.into()))?;
        let held = lock.metadata().map_err(io_err("lock file", path))?;
        match fs::metadata(path) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => return Ok(lock),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("lock file", path)(e)),
        }
    }
}

/// `algo:hex` → `algo-hex`, refusing anything that could escape the cache directory.
fn file_stem(digest: &str) -> Result<String, CacheError> {
    let bad = || CacheError::InvalidDigest(digest.to_string());
    let (algo, hex) = digest.split_once(':').ok_or_else(bad)?;
    let algo_ok = !algo.is_empty()
        && algo.len() <= 32
        && algo
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let hex_ok = (32..=128).contains(&hex.len())
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !algo_ok || !hex_ok {
        return Err(bad());
    }
    Ok(format!("{algo}-{hex}"))
}

/// The sha256 digest of a file, as `sha256:<hex>`, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = open_input(path)?;
    super::input_len(&file)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256:{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};
    use vmm_sys_util::tempdir::TempDir;

    fn patterned(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn digests_are_validated() {
        assert!(file_stem("sha256:../../etc/passwd").is_err());
        assert!(file_stem("sha256").is_err());
        assert!(file_stem("SHA256:00000000000000000000000000000000").is_err());
        assert!(file_stem("sha256:0000000000000000000000000000000g").is_err());
        assert_eq!(
            file_stem("sha256:00000000000000000000000000000000").unwrap(),
            "sha256-00000000000000000000000000000000"
        );
    }

    #[test]
    fn converts_once_and_is_read_only() {
        let dir = TempDir::new_with_prefix("/tmp/kestrel-cache").unwrap();
        let src = dir.as_path().join("src.raw");
        let data = patterned(1 << 20);
        fs::write(&src, &data).unwrap();
        let cache = ImageCache::new(dir.as_path().join("images"));
        let mut calls = 0;
        let first = cache
            .get_or_convert(&src, None, &Limits::default(), &mut |_, _| calls += 1)
            .unwrap();
        assert!(first.converted.is_some());
        assert!(calls > 0);
        assert_eq!(first.digest, sha256_file(&src).unwrap());
        assert_eq!(fs::read(&first.path).unwrap(), data);
        let mode = fs::metadata(&first.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
        let second = cache
            .get_or_convert(&src, None, &Limits::default(), &mut |_, _| {})
            .unwrap();
        assert!(second.converted.is_none());
        assert_eq!(second.path, first.path);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(cache.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn failed_conversion_leaves_nothing() {
        let dir = TempDir::new_with_prefix("/tmp/kestrel-cache").unwrap();
        let src = dir.as_path().join("bad.qcow2");
        // A QCOW2 magic followed by garbage: refused.
        let mut bad = b"QFI\xfb\0\0\0\x09".to_vec();
        bad.resize(4096, 0xff);
        fs::write(&src, &bad).unwrap();
        let cache = ImageCache::new(dir.as_path().join("images"));
        let digest = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
        let err = cache
            .get_or_convert(&src, Some(digest), &Limits::default(), &mut |_, _| {})
            .unwrap_err();
        assert!(matches!(err, CacheError::Convert { .. }), "{err:?}");
        assert!(cache.lookup(digest).unwrap().is_none());
        let leftovers: Vec<_> = fs::read_dir(cache.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn concurrent_callers_convert_once() {
        let dir = TempDir::new_with_prefix("/tmp/kestrel-cache").unwrap();
        let src = dir.as_path().join("src.raw");
        fs::write(&src, patterned(4 << 20)).unwrap();
        let cache = ImageCache::new(dir.as_path().join("images"));
        let digest = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
        let barrier = Arc::new(Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (cache, src, barrier) = (cache.clone(), src.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    cache
                        .get_or_convert(&src, Some(digest), &Limits::default(), &mut |_, _| {})
                        .unwrap()
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let conversions = results.iter().filter(|r| r.converted.is_some()).count();
        assert_eq!(conversions, 1);
        assert!(results.iter().all(|r| r.path == results[0].path));
        assert_eq!(fs::read(&results[0].path).unwrap(), patterned(4 << 20));
        // Neither the builder nor a waiter leaves a lock file.
        let names: Vec<_> = fs::read_dir(cache.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
