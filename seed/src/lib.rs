//! cloud-init NoCloud seed images, built in pure Rust.
//!
//! A VM image (DESIGN.md, "VM images") receives the pod's environment the way Virtlet
//! delivered it: a cloud-init *NoCloud* seed disk whose `user-data` makes cloud-init's
//! `write_files` module write `/etc/cloud/environment` as `KEY=VALUE` lines.
//!
//! [`write_seed_image`] writes a 2 MiB FAT12 filesystem (no partition table) whose
//! volume label is `CIDATA` (cloud-init looks for the label `cidata`, case-insensitively)
//! and whose root directory holds two files, `meta-data` and `user-data`, with VFAT long
//! names (8.3 aliases `META-D~1` and `USER-D~1`), and a third, `network-config`, when
//! [`Seed::network_config`] is given. No external tool is run.
//!
//! # `meta-data`
//!
//! ```text
//! instance-id: "<instance_id>"
//! local-hostname: "<hostname>"
//! ```
//!
//! Both are YAML double-quoted scalars; [`Seed::instance_id`] must match
//! `[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,254}` (cloud-init uses it as a directory name) and
//! [`Seed::hostname`] must be an RFC 1123 host name (dot-separated labels of 1–63
//! characters `[A-Za-z0-9-]`, not starting or ending with `-`, at most 253 in all).
//!
//! # `/etc/cloud/environment`
//!
//! One line `NAME=VALUE\n` per [`Seed::env`] entry, in the given order, duplicates kept,
//! value verbatim (no quoting, exactly what Virtlet wrote); [`environment_file`] returns
//! it. Names must match `[A-Za-z_][A-Za-z0-9_]*`. Values may hold any Unicode text
//! (quotes, `:`, `#`, `\`, tabs, line feeds, emoji, ...) except characters that YAML
//! cannot carry verbatim in a block scalar: C0 controls other than tab and line feed
//! (so no CR and no NUL), DEL, C1 controls (U+0080–U+009F, including NEL) and the line
//! separators U+2028/U+2029. A value may also not contain `MIME-Version:` (in any case):
//! cloud-init would take the whole `user-data` for a MIME message. A value containing a
//! line feed simply continues on the next line(s) of the file, as with Virtlet.
//!
//! # `user-data` without [`Seed::extra_user_data`]
//!
//! Exactly this text (every line ends with a line feed):
//!
//! ```text
//! #cloud-config
//! # kestrel: the container environment, one NAME=VALUE line each
//! write_files:
//!   - path: /etc/cloud/environment
//!     content: |+
//!       NAME=VALUE
//!       ...
//!     permissions: '0644'
//! ```
//!
//! `content` is a YAML literal block scalar with "keep" chomping. **Every** line of the
//! environment file (including empty ones) appears indented by exactly six spaces, so
//! a small parser that does not know YAML extracts the file like this
//! ([`extract_environment`] is the reference implementation):
//!
//! 1. find the line that is exactly `    content: |+` (four spaces);
//! 2. take each following line that starts with six spaces, up to (excluding) the first
//!    line that does not (that is `    permissions: '0644'`);
//! 3. remove the six spaces and append a line feed to each; the concatenation is the
//!    file, byte for byte.
//!
//! For example, in shell: `sed -n '/^    content: |+$/,/^    permissions:/{//!s/^      //p}'`.
//!
//! # `user-data` with [`Seed::extra_user_data`]
//!
//! A `multipart/mixed` MIME message, which cloud-init splits into parts:
//!
//! 1. the extra user data: verbatim if it is itself a MIME entity (starts with
//!    `Content-Type:`), otherwise as `text/plain` in base64, which lets cloud-init detect
//!    its type from its first line (`#cloud-config`, `#!`, `#include`, ...);
//! 2. last, the `#cloud-config` above in base64 (cloud-init 22.4 garbles non-ASCII text
//!    in 8-bit MIME parts), with a `merge_how` of `list(append)` and
//!    `dict(no_replace,recurse_list)`: its `write_files` entry is appended to any
//!    `write_files` of the extra cloud-config (and so written last), and no key of the
//!    extra cloud-config is replaced.
//!
//! The boundary is `kestrel-seed-<n>`, with `<n>` chosen so that it occurs nowhere else.
//! The six-space rule above then applies to the decoded last part only.
//!
//! # Size
//!
//! The image holds [`SEED_CAPACITY`] bytes of file data (about 2 MB, in 2 KiB clusters);
//! a seed that does not fit is refused with [`SeedError::TooLarge`].

mod fat;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Size of the image [`write_seed_image`] writes, in bytes (2 MiB).
pub const IMAGE_SIZE: u64 = fat::IMAGE_BYTES as u64;

/// Bytes of file data (`meta-data` plus `user-data`, each rounded up to 2 KiB clusters)
/// that fit in the image.
pub const SEED_CAPACITY: usize = fat::DATA_CAPACITY;

/// The FAT volume label; cloud-init's NoCloud datasource matches it as `cidata`.
pub const VOLUME_LABEL: &str = "CIDATA";

/// Where cloud-init's `write_files` puts the environment inside the guest.
pub const ENVIRONMENT_PATH: &str = "/etc/cloud/environment";

/// The line of `user-data` that opens the environment file's block scalar.
pub const CONTENT_LINE: &str = "    content: |+";

/// Indentation of every line of the environment file inside `user-data`.
pub const CONTENT_INDENT: &str = "      ";

/// Everything a NoCloud seed carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seed {
    /// cloud-init's `instance-id`; a new id makes cloud-init run its per-instance modules
    /// again.
    pub instance_id: String,
    /// `local-hostname`: the guest's host name.
    pub hostname: String,
    /// The environment, written to [`ENVIRONMENT_PATH`] as `NAME=VALUE` lines.
    pub env: Vec<(String, String)>,
    /// More user data (a `#cloud-config`, a `#!` script, a MIME message, ...) to run
    /// alongside; see the module documentation for how it is combined.
    pub extra_user_data: Option<String>,
    /// cloud-init's `network-config` (network configuration version 2, YAML), written as a
    /// third file when given: a VM image on a pod network gets the pod's address this way
    /// too, not only by DHCP.
    pub network_config: Option<String>,
}

/// Why a seed could not be built or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SeedError {
    /// The instance id is empty, too long or has a character outside `[A-Za-z0-9._:-]`.
    #[error("invalid instance-id {id:?}: {reason}")]
    InvalidInstanceId {
        /// The id given.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The host name is not an RFC 1123 host name.
    #[error("invalid hostname {hostname:?}: {reason}")]
    InvalidHostname {
        /// The host name given.
        hostname: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An environment variable name is not `[A-Za-z_][A-Za-z0-9_]*`.
    #[error("invalid environment variable name {key:?}: names must match [A-Za-z_][A-Za-z0-9_]*")]
    InvalidEnvName {
        /// The name given.
        key: String,
    },
    /// An environment variable value has something the seed cannot carry.
    #[error("value of environment variable {key} contains {what}, {why}")]
    InvalidEnvValue {
        /// The variable's name.
        key: String,
        /// The offending character or text.
        what: String,
        /// Why it cannot be carried.
        why: &'static str,
    },
    /// `meta-data` and `user-data` do not fit in the image.
    #[error(
        "seed files need {needed} bytes but the {IMAGE_SIZE}-byte seed image holds at most \
         {capacity}: the environment or extra user data is too large"
    )]
    TooLarge {
        /// Bytes needed, rounded up to whole clusters.
        needed: usize,
        /// Bytes available.
        capacity: usize,
    },
    /// Reading or writing the image file failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done ("create", "write", "rename to", ...).
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A bug: the image layout went out of bounds.
    #[error("internal error: seed image layout overflows at byte {offset}")]
    Layout {
        /// Where.
        offset: usize,
    },
}

fn check_instance_id(id: &str) -> Result<(), SeedError> {
    let fail = |reason| {
        Err(SeedError::InvalidInstanceId {
            id: id.to_owned(),
            reason,
        })
    };
    if id.is_empty() {
        return fail("it is empty");
    }
    if id.len() > 255 {
        return fail("it is longer than 255 characters");
    }
    if id.starts_with('.') {
        return fail("it starts with '.'");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
    {
        return fail("only ASCII letters, digits, '.', '_', ':' and '-' are allowed");
    }
    Ok(())
}

fn check_hostname(hostname: &str) -> Result<(), SeedError> {
    let fail = |reason| {
        Err(SeedError::InvalidHostname {
            hostname: hostname.to_owned(),
            reason,
        })
    };
    if hostname.is_empty() {
        return fail("it is empty");
    }
    if hostname.len() > 253 {
        return fail("it is longer than 253 characters");
    }
    for label in hostname.split('.') {
        if label.is_empty() || label.len() > 63 {
            return fail("each dot-separated label must have 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return fail("only ASCII letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return fail("a label may not start or end with '-'");
        }
    }
    Ok(())
}

fn check_env_name(key: &str) -> Result<(), SeedError> {
    let mut bytes = key.bytes();
    let valid = matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(SeedError::InvalidEnvName {
            key: key.to_owned(),
        })
    }
}

/// Whether YAML (PyYAML, as cloud-init uses) reads `c` verbatim inside a block scalar.
fn yaml_block_safe(c: char) -> bool {
    matches!(c, '\t' | '\n' | ' '..='~' | '\u{A0}'..='\u{2027}' | '\u{202A}'..='\u{D7FF}'
        | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

fn check_env_value(key: &str, value: &str) -> Result<(), SeedError> {
    if let Some(c) = value.chars().find(|&c| !yaml_block_safe(c)) {
        return Err(SeedError::InvalidEnvValue {
            key: key.to_owned(),
            what: format!("U+{:04X}", u32::from(c)),
            why: "which cloud-init's YAML reader does not accept verbatim (it is a control \
                  character or a line break other than line feed)",
        });
    }
    if value.to_lowercase().contains("mime-version:") {
        return Err(SeedError::InvalidEnvValue {
            key: key.to_owned(),
            what: "\"MIME-Version:\"".to_owned(),
            why: "which would make cloud-init parse user-data as a MIME message",
        });
    }
    Ok(())
}

/// Escapes `s` as a YAML double-quoted scalar (including the quotes).
fn yaml_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || !yaml_block_safe(c) || c == '\u{FEFF}' => {
                out.push_str(&format!("\\U{:08X}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `meta-data` file: `instance-id` and `local-hostname`.
pub fn meta_data(seed: &Seed) -> Result<String, SeedError> {
    check_instance_id(&seed.instance_id)?;
    check_hostname(&seed.hostname)?;
    Ok(format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        yaml_quoted(&seed.instance_id),
        yaml_quoted(&seed.hostname)
    ))
}

/// The exact contents cloud-init writes to [`ENVIRONMENT_PATH`].
pub fn environment_file(seed: &Seed) -> Result<String, SeedError> {
    let mut out = String::new();
    for (key, value) in &seed.env {
        check_env_name(key)?;
        check_env_value(key, value)?;
        out.push_str(key);
        out.push('=');
        out.push_str(value);
        out.push('\n');
    }
    Ok(out)
}

/// Our `#cloud-config`, with a `merge_how` when it is one part of several.
fn cloud_config(environment: &str, merge: bool) -> String {
    let mut out = String::with_capacity(environment.len() * 2 + 256);
    out.push_str("#cloud-config\n# kestrel: the container environment, one NAME=VALUE line each\n");
    if merge {
        out.push_str(
            "merge_how:\n  - name: list\n    settings: [append]\n  - name: dict\n    settings: [no_replace, recurse_list]\n",
        );
    }
    out.push_str("write_files:\n  - path: ");
    out.push_str(ENVIRONMENT_PATH);
    out.push('\n');
    out.push_str(CONTENT_LINE);
    out.push('\n');
    for line in environment.split_terminator('\n') {
        out.push_str(CONTENT_INDENT);
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("    permissions: '0644'\n");
    out
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, in lines of 76 characters, each ending in "\n".
/// Standard base64 (RFC 4648, with padding) on one line.
pub fn base64(data: &[u8]) -> String {
    let mut encoded = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let sextet = (n >> (18 - 6 * i)) & 0x3F;
                encoded.extend(BASE64.get(sextet as usize).map(|&b| char::from(b)));
            } else {
                encoded.push('=');
            }
        }
    }
    encoded
}

/// [`base64`] in lines of 76 characters, each ending with a line feed (MIME).
fn base64_lines(data: &[u8]) -> String {
    let encoded = base64(data);
    let mut out = String::with_capacity(encoded.len() + encoded.len() / 76 + 1);
    let mut rest = encoded.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(76));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out
}

/// The `user-data` file; see the module documentation for its exact format.
pub fn user_data(seed: &Seed) -> Result<String, SeedError> {
    let environment = environment_file(seed)?;
    let extra = match seed.extra_user_data.as_deref() {
        None | Some("") => return Ok(cloud_config(&environment, false)),
        Some(extra) => extra,
    };
    let ours = cloud_config(&environment, true);
    let boundary = (0u32..)
        .map(|n| format!("kestrel-seed-{n}"))
        .find(|b| !extra.contains(b.as_str()))
        .unwrap_or_default();
    let part_headers = |content_type: &str, file_name: &str| {
        format!(
            "--{boundary}\nContent-Type: {content_type}; charset=\"utf-8\"\nMIME-Version: 1.0\n\
             Content-Transfer-Encoding: base64\nContent-Disposition: attachment; \
             filename=\"{file_name}\"\n\n"
        )
    };
    let mut out =
        format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n");
    let is_mime = extra
        .get(..13)
        .is_some_and(|head| head.eq_ignore_ascii_case("content-type:"));
    if is_mime {
        out.push_str(&format!("--{boundary}\n"));
        out.push_str(extra);
        if !extra.ends_with('\n') {
            out.push('\n');
        }
    } else {
        out.push_str(&part_headers("text/plain", "user-data"));
        out.push_str(&base64_lines(extra.as_bytes()));
    }
    out.push_str(&part_headers(
        "text/cloud-config",
        "kestrel-environment.cfg",
    ));
    out.push_str(&base64_lines(ours.as_bytes()));
    out.push_str(&format!("--{boundary}--\n"));
    Ok(out)
}

/// Extracts the environment file from a single-part `user-data` (one produced without
/// [`Seed::extra_user_data`]) by the six-space rule of the module documentation, without
/// parsing YAML. `None` if there is no [`CONTENT_LINE`].
pub fn extract_environment(user_data: &str) -> Option<String> {
    let mut lines = user_data.split('\n');
    lines.by_ref().find(|l| *l == CONTENT_LINE)?;
    let mut out = String::new();
    for line in lines {
        match line.strip_prefix(CONTENT_INDENT) {
            Some(content) => {
                out.push_str(content);
                out.push('\n');
            }
            None => break,
        }
    }
    Some(out)
}

/// 32-bit FNV-1a, for a volume serial number that is stable per instance id.
fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811C_9DC5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Builds the whole seed image in memory ([`IMAGE_SIZE`] bytes).
pub fn build_seed_image(seed: &Seed) -> Result<Vec<u8>, SeedError> {
    let meta = meta_data(seed)?;
    let user = user_data(seed)?;
    let mut label = [b' '; 11];
    label
        .get_mut(..VOLUME_LABEL.len())
        .ok_or(SeedError::Layout { offset: 0 })?
        .copy_from_slice(VOLUME_LABEL.as_bytes());
    let mut files = vec![
        fat::File {
            name: "meta-data",
            data: meta.as_bytes(),
        },
        fat::File {
            name: "user-data",
            data: user.as_bytes(),
        },
    ];
    if let Some(net) = seed.network_config.as_deref() {
        files.push(fat::File {
            name: "network-config",
            data: net.as_bytes(),
        });
    }
    fat::build(&label, fnv1a(seed.instance_id.as_bytes()), &files)
}

/// Writes the seed image to `path`: first to a temporary file in the same directory,
/// synced, then renamed over `path`, so `path` is either absent, the old file, or the
/// complete new image.
pub fn write_seed_image(seed: &Seed, path: &Path) -> Result<(), SeedError> {
    let image = build_seed_image(seed)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "seed".into(), |n| n.to_string_lossy().into_owned());
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| SeedError::Io { op, path, source }
    };
    let mut attempt = 0u32;
    let (tmp_path, mut file) = loop {
        let tmp = dir.join(format!(".{name}.{}.{attempt}.tmp", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
            }
            Err(e) => return Err(io("create", &tmp)(e)),
        }
    };
    let result = file
        .write_all(&image)
        .map_err(io("write", &tmp_path))
        .and_then(|()| file.sync_all().map_err(io("sync", &tmp_path)))
        .and_then(|()| fs::rename(&tmp_path, path).map_err(io("rename a temporary file to", path)));
    drop(file);
    if let Err(e) = result {
        // Best effort: the error that matters is the one being returned.
        let _ = fs::remove_file(&tmp_path);
        return Err(e);
    }
    // Make the rename durable.
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", &dir))
}

#[cfg(test)]
mod tests;
