//! What the containerd benches share: reading containerd's log (logrus lines, RFC 3339
//! times, the task events it forwarded), sampling a shim's memory from /proc, and set-up
//! (building the release shim, importing images, killing the fixture's processes when a
//! bench panics).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kestrel_integration_tests::containerd::{self, describe, Containerd};

use crate::ms;

// ---------------------------------------------------------------------------------------
// containerd's log

// containerd 1.6 copies a shim's log FIFO into its own stderr as raw bytes, so a shim's
// line can be cut by one of containerd's own and carry another line's `time=` in front
// (`time="A" level=info msg="time="B" level=debug msg="event forwarded" … topic=…`). The
// parsing below therefore works from each `msg="event forwarded"` occurrence: its time is
// the nearest `time="…"` before it on the same line, its topic the next `topic=` after it.

/// The value of `key=` in a logrus line: a quoted string (with `\"` and `\\` escapes)
/// or a bare word.
pub fn field(line: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    let start = if line.starts_with(&pat) {
        0
    } else {
        line.find(&format!(" {pat}"))? + 1
    };
    let rest = line.get(start + pat.len()..)?;
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = quoted.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return Some(out),
                '\\' => out.push(chars.next()?),
                c => out.push(c),
            }
        }
        None
    } else {
        Some(rest.split_whitespace().next().unwrap_or("").to_string())
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// RFC 3339 (`2026-11-22T04:57:31.123456789Z`, or with a `±HH:MM` offset).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let (date, rest) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (d.next()??, d.next()??, d.next()??);
    let (clock, offset) = if let Some(c) = rest.strip_suffix('Z') {
        (c, 0)
    } else {
        let i = rest.rfind(['+', '-'])?;
        let (c, z) = rest.split_at(i);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let (h, m) = z.get(1..)?.split_once(':')?;
        (
            c,
            sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60),
        )
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, mi, sec) = (t.next()??, t.next()??, t.next()??);
    let digits: String = frac.chars().take(9).collect();
    let nanos = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse::<u32>().ok()?
    };
    let secs = days_from_civil(year, month, day) * 86_400 + h * 3600 + mi * 60 + sec - offset;
    Some(UNIX_EPOCH + Duration::new(u64::try_from(secs).ok()?, nanos))
}

/// The task events containerd logged (`event forwarded`/`event published`, topic
/// `/tasks/…`): (time, topic).
pub fn task_events(text: &str) -> Vec<(SystemTime, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        for marker in [r#"msg="event forwarded""#, r#"msg="event published""#] {
            for (pos, _) in line.match_indices(marker) {
                let (before, after) = line.split_at(pos);
                let Some(t) = before.rfind(r#"time=""#) else {
                    continue;
                };
                let at = before
                    .get(t..)
                    .and_then(|f| field(f, "time"))
                    .and_then(|v| parse_rfc3339(&v));
                let topic = field(after, "topic").filter(|t| t.starts_with("/tasks/"));
                if let (Some(at), Some(topic)) = (at, topic) {
                    out.push((at, topic));
                }
            }
        }
    }
    out
}

/// Milliseconds from `t0` to `t` (negative if `t` is earlier).
pub fn ms_since(t0: SystemTime, t: SystemTime) -> f64 {
    match t.duration_since(t0) {
        Ok(d) => ms(d),
        Err(e) => -ms(e.duration()),
    }
}

/// The new part of containerd's log since byte `from`; moves `from` to the end.
pub fn read_log_since(c: &Containerd, from: &mut usize) -> String {
    let bytes = std::fs::read(c.log_path()).unwrap_or_default();
    let new = bytes.get(*from..).unwrap_or_default();
    *from = bytes.len();
    String::from_utf8_lossy(new).into_owned()
}

// ---------------------------------------------------------------------------------------
// /proc

/// A `Key:   123 kB` value of /proc/<pid>/{status,smaps_rollup}.
pub fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// An anonymous mapping of /proc/<pid>/smaps: size, Rss and Anonymous (KiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnonMapping {
    pub size_kib: u64,
    pub rss_kib: u64,
    pub anon_kib: u64,
}

/// The anonymous mappings (no path name) of an smaps text.
pub fn anon_mappings(smaps: &str) -> Vec<AnonMapping> {
    let mut out = Vec::new();
    let mut cur: Option<AnonMapping> = None;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        let is_header =
            first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        if is_header {
            out.extend(cur.take());
            // address perms offset dev inode [path]
            if f.nth(4).is_none() {
                cur = Some(AnonMapping {
                    size_kib: 0,
                    rss_kib: 0,
                    anon_kib: 0,
                });
            }
            continue;
        }
        let Some(m) = cur.as_mut() else { continue };
        let value = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match first {
            "Size:" => m.size_kib = value,
            "Rss:" => m.rss_kib = value,
            "Anonymous:" => m.anon_kib = value,
            _ => {}
        }
    }
    out.extend(cur);
    out
}

/// One sample of a running kestrel shim.
#[derive(Debug, Clone)]
pub struct MemSample {
    pub shim_rss_kib: u64,
    pub shim_anon_kib: u64,
    pub guest_rss_kib: u64,
    pub guest_anon_kib: u64,
    /// Guest mappings found: how many anonymous mappings have exactly the VM's size.
    pub guest_mappings: usize,
    pub hwm_kib: Option<u64>,
}

pub fn sample_memory(pid: u32, memory_mib: u64) -> Result<MemSample, String> {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{f}"))
            .map_err(|e| format!("cannot read /proc/{pid}/{f}: {e}"))
    };
    let rollup = read("smaps_rollup")?;
    let smaps = read("smaps")?;
    let status = read("status")?;
    let guest: Vec<AnonMapping> = anon_mappings(&smaps)
        .into_iter()
        .filter(|m| m.size_kib == memory_mib * 1024)
        .collect();
    if guest.is_empty() {
        return Err(format!(
            "no anonymous mapping of {memory_mib} MiB in /proc/{pid}/smaps"
        ));
    }
    Ok(MemSample {
        shim_rss_kib: kib_field(&rollup, "Rss").ok_or("no Rss in smaps_rollup")?,
        shim_anon_kib: kib_field(&rollup, "Anonymous").unwrap_or(0),
        guest_rss_kib: guest.iter().map(|m| m.rss_kib).sum(),
        guest_anon_kib: guest.iter().map(|m| m.anon_kib).sum(),
        guest_mappings: guest.len(),
        hwm_kib: kib_field(&status, "VmHWM"),
    })
}

// ---------------------------------------------------------------------------------------
// Set-up

/// The fixture's daemon and directory, for the panic hook: a release build aborts on
/// panic, so the fixture's Drop would never run.
pub static FIXTURE: OnceLock<(Option<u32>, PathBuf)> = OnceLock::new();

pub fn install_panic_cleanup(bench: &'static str) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        if let Some((daemon, dir)) = FIXTURE.get() {
            eprintln!(
                "{}: panicked; killing containerd and its shims ({} is left behind)",
                bench,
                dir.display()
            );
            kill_fixture_processes(*daemon, dir);
        }
    }));
}

/// SIGKILLs the daemon and every process with an argument under `dir` (its shims).
pub fn kill_fixture_processes(daemon: Option<u32>, dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut killed = Vec::new();
    for p in containerd::processes() {
        let ours =
            Some(p.pid) == daemon || p.args.iter().any(|a| a.to_string_lossy().contains(&needle));
        if ours && p.pid != std::process::id() {
            containerd::kill9(p.pid);
            killed.push(p.pid);
        }
    }
    killed
}

pub fn run_tool(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Builds the release shim into `target_dir` and returns its path.
pub fn build_shim(target_dir: &Path) -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    run_tool(
        Command::new(cargo)
            .args(["build", "--release", "--quiet", "-p", "kestrel-shim"])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(crate::workspace_root()),
    )?;
    let bin = target_dir
        .join("release")
        .join(kestrel_integration_tests::SHIM_NAME);
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "cargo built the shim but {} is missing",
            bin.display()
        ))
    }
}

/// What every containerd bench checks and prints before its fixture starts: `None` (after
/// `skipped: …`) without containerd or a usable /dev/kvm; runc (the baseline) is required;
/// the shim is `shim` or the freshly built release one. Installs the panic cleanup.
pub fn prepare(bench: &'static str, shim: Option<&Path>) -> Result<Option<PathBuf>, String> {
    println!("kestrel {bench} bench");
    println!("{}", crate::HostFacts::probe().describe());
    if !containerd::installed() {
        println!("skipped: containerd not installed");
        return Ok(None);
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        println!("skipped: /dev/kvm not usable: {e}");
        return Ok(None);
    }
    let runc = crate::which("runc").ok_or("runc not installed (the baseline)")?;
    let shim = match shim {
        Some(s) => s.to_path_buf(),
        None => {
            let target_dir = crate::own_target_dir().map_err(|e| e.to_string())?;
            build_shim(&target_dir).map_err(|e| format!("building the shim: {e}"))?
        }
    };
    let containerd_bin = crate::which("containerd").ok_or("containerd not on PATH")?;
    println!("shim: {}", shim.display());
    println!(
        "containerd: {}; runc: {}",
        crate::version_line(&containerd_bin),
        crate::version_line(&runc)
    );
    install_panic_cleanup(bench);
    Ok(Some(shim))
}

pub fn import(c: &Containerd, archive: &Path) -> Result<(), String> {
    let tar = archive.to_string_lossy();
    let out = c.ctr_with_timeout(&["image", "import", &tar], Duration::from_secs(600));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ctr image import {tar}: {}", describe(&out)))
    }
}

/// The VM of a pod without io.kestrel.vm.* annotations or pod limits (the shim's default).
pub const POD_VM_MIB: u64 = 128;

/// Polls `path` every 5 ms until it holds `needle` (true) or `timeout` passed (false).
pub fn wait_for_line(path: &Path, needle: &str, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_logrus_lines() {
        let line = r#"time="2026-11-22T04:57:31.123456789Z" level=debug msg="event forwarded" ns=kestrel-test topic=/tasks/create type=containerd.events.TaskCreate"#;
        assert_eq!(field(line, "msg").unwrap(), "event forwarded");
        assert_eq!(field(line, "topic").unwrap(), "/tasks/create");
        assert_eq!(field(line, "ns").unwrap(), "kestrel-test");
        assert!(field(line, "nope").is_none());
        let q = r#"time="x" msg="say \"hi\" \\ ok" level=info"#;
        assert_eq!(field(q, "msg").unwrap(), r#"say "hi" \ ok"#);
        let events = task_events(&format!("{line}\nnoise\n"));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].1, "/tasks/create");
        // A shim line cut into by one of containerd's (seen in containerd 1.6's log).
        let cut = r#"time="2026-11-22T05:19:36.793185537Z" level=info msg="time="2026-11-22T05:19:36.797225169Z" level=debug msg="event forwarded" ns=kestrel-test topic=/tasks/create type=containerd.events.TaskCreate"#;
        let events = task_events(cut);
        assert_eq!(events.len(), 1);
        assert_eq!(
            events[0].0,
            parse_rfc3339("2026-11-22T05:19:36.797225169Z").unwrap()
        );
        // Not a task event.
        assert!(task_events(r#"time="2026-11-22T05:19:36Z" level=debug msg="event published" ns=n topic=/snapshot/prepare"#).is_empty());
    }

    #[test]
    fn parses_rfc3339() {
        let t = parse_rfc3339("1970-01-02T00:00:01.5Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(86_401_500)
        );
        let a = parse_rfc3339("2026-11-22T04:57:31.123456789Z").unwrap();
        let b = parse_rfc3339("2026-11-22T05:57:31.123456789+01:00").unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_795_323_451
        );
        assert_eq!(
            a.duration_since(UNIX_EPOCH).unwrap().subsec_nanos(),
            123_456_789
        );
    }

    #[test]
    fn finds_anonymous_mappings() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234   /usr/bin/shim
Size:               1024 kB
Rss:                 512 kB
Anonymous:             0 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:               40960 kB
Anonymous:         40960 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  16 kB
Anonymous:            16 kB
";
        let m = anon_mappings(smaps);
        assert_eq!(
            m,
            vec![AnonMapping {
                size_kib: 131_072,
                rss_kib: 40_960,
                anon_kib: 40_960
            }]
        );
        let status = "Name:\tx\nVmHWM:\t  12345 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(kib_field(status, "VmHWM"), Some(12345));
        assert_eq!(kib_field(status, "VmRSS"), Some(100));
    }
}
