//! What every test layer of kestrel shares: the rule for skipping, and the figures of the
//! reliability campaign.
//!
//! A test that cannot run here (no `/dev/kvm`, no containerd, not root, a tool missing)
//! calls [`skip`], which prints `skipped: <reason>` and returns, so a developer's machine
//! without KVM still runs the rest. On the project's own machines `.ci/run` sets
//! [`REQUIRE_ALL`]`=1` (when `/dev/kvm` exists), and then a skip is a failure: CI cannot
//! go green by skipping.

/// The environment variable that turns every skip into a failure.
pub const REQUIRE_ALL: &str = "KESTREL_REQUIRE_KVM";

/// True when this machine must run every test (`KESTREL_REQUIRE_KVM=1`).
pub fn required() -> bool {
    std::env::var(REQUIRE_ALL).is_ok_and(|v| v == "1")
}

/// Skips the calling test: prints `skipped: <reason>`, or panics when [`required`].
pub fn skip(reason: impl std::fmt::Display) {
    println!("skipped: {reason}");
    if required() {
        panic!("skipped: {reason} — but {REQUIRE_ALL}=1: this machine must run every test");
    }
}

/// The environment variable naming the file [`campaign`] appends its lines to
/// (`scripts/test.sh` sets it and prints the file at the end of the run).
pub const CAMPAIGN_REPORT: &str = "KESTREL_CAMPAIGN_REPORT";

/// Reports one figure of the reliability campaign (cases tried, crashes, leaks, time): on
/// stderr, and appended as a line to the file [`CAMPAIGN_REPORT`] names, so one run's
/// figures survive cargo's capture of a passing test's output.
pub fn campaign(line: impl std::fmt::Display) {
    use std::io::Write;
    let line = format!("{line}\n");
    eprint!("campaign: {line}");
    if let Some(path) = std::env::var_os(CAMPAIGN_REPORT) {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            eprintln!("campaign: cannot append to {}: {e}", path.to_string_lossy());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_fails_only_when_everything_is_required() {
        // Both branches, in one test: the variable is process-wide.
        let before = std::env::var_os(REQUIRE_ALL);
        // No other test of this crate reads the environment.
        std::env::set_var(REQUIRE_ALL, "0");
        skip("a reason");
        std::env::set_var(REQUIRE_ALL, "1");
        let caught = std::panic::catch_unwind(|| skip("a reason"));
        match before {
            Some(v) => std::env::set_var(REQUIRE_ALL, v),
            None => std::env::remove_var(REQUIRE_ALL),
        }
        let msg = caught.unwrap_err();
        let msg = msg
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or("");
        assert!(
            msg.contains("a reason") && msg.contains(REQUIRE_ALL),
            "{msg}"
        );
    }
}
