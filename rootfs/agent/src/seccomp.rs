//! The OCI spec's seccomp profile as BPF filters (rust-vmm's `seccompiler`; syscall names
//! from the `syscalls` crate's x86_64 table), applied by the [`crate::helper`] just before
//! it execs the container's process.
//!
//! One seccomp filter returns one action on a match, so a profile with several actions
//! becomes a stack of filters, and the kernel keeps the most restrictive answer:
//! - when the default action is not ALLOW, a filter that allows every syscall the profile
//!   names (an ALLOW entry only under its argument conditions) and answers the default
//!   action for the rest;
//! - one filter per other action, matching its entries (with their conditions) and
//!   allowing everything else.
//!
//! Names the table does not know are skipped (as runc does with names libseccomp does not
//! know). SCMP_ACT_NOTIFY is refused: there is no seccomp agent here.

use std::collections::BTreeMap;
use std::str::FromStr;

use kestrel_agent_protocol::oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator, LinuxSyscall,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

const EPERM: u32 = 1;

/// Syscall number → its rules (`None`: matches whatever the arguments).
type Rules = BTreeMap<i64, Option<Vec<SeccompRule>>>;

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<SeccompAction, String> {
    Ok(match a {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(errno.unwrap_or(EPERM)),
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno.unwrap_or(EPERM)),
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActNotify => {
            return Err("seccomp action SCMP_ACT_NOTIFY is not supported".into())
        }
    })
}

/// The conditions of one entry (all must hold), or `None` for an unconditional entry.
fn rule(entry: &LinuxSyscall) -> Result<Option<SeccompRule>, String> {
    let args = entry.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Ok(None);
    }
    let mut conditions = Vec::new();
    for a in &args {
        let (op, value) = match a.op() {
            LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, a.value()),
            LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, a.value()),
            LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, a.value()),
            LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, a.value()),
            LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, a.value()),
            LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, a.value()),
            // OCI: `value` is the mask, `valueTwo` what the masked argument must equal.
            LinuxSeccompOperator::ScmpCmpMaskedEq => (
                SeccompCmpOp::MaskedEq(a.value()),
                a.value_two().unwrap_or(0),
            ),
        };
        let index = u8::try_from(a.index())
            .ok()
            .filter(|i| *i < 6)
            .ok_or_else(|| format!("seccomp argument index {} is not 0-5", a.index()))?;
        conditions.push(
            SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
                .map_err(|e| format!("seccomp condition on argument {index}: {e}"))?,
        );
    }
    SeccompRule::new(conditions)
        .map(Some)
        .map_err(|e| format!("seccomp rule: {e}"))
}

/// Adds `entry`'s syscalls to `rules`; `conditional` keeps its argument conditions (an
/// unconditional entry, or one already present unconditionally, matches always).
fn add(rules: &mut Rules, entry: &LinuxSyscall, conditional: bool) -> Result<(), String> {
    let r = if conditional { rule(entry)? } else { None };
    for name in entry.names() {
        let Ok(sysno) = syscalls::x86_64::Sysno::from_str(name) else {
            log::debug!("seccomp: unknown syscall {name} skipped");
            continue;
        };
        let slot = rules
            .entry(i64::from(sysno.id()))
            .or_insert_with(|| Some(Vec::new()));
        match (&r, slot.as_mut()) {
            (Some(rule), Some(list)) => list.push(rule.clone()),
            // Unconditional: matches whatever the arguments.
            (None, _) => *slot = None,
            (Some(_), None) => {}
        }
    }
    Ok(())
}

fn compile(
    rules: Rules,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    // seccompiler: an empty rule list matches unconditionally.
    let rules = rules
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(|e| format!("seccomp filter: {e}"))?;
    BpfProgram::try_from(filter).map_err(|e| format!("seccomp filter: {e}"))
}

/// The filters for `profile`, in the order to install them.
pub fn filters(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, String> {
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let entries = profile.syscalls().clone().unwrap_or_default();
    let mut out = Vec::new();
    if default != SeccompAction::Allow {
        let mut named = BTreeMap::new();
        for e in &entries {
            let a = action(e.action(), e.errno_ret())?;
            if a == default {
                continue;
            }
            // ALLOW entries allow under their conditions; other actions are decided by
            // their own filter, so this one lets their syscalls through.
            add(&mut named, e, a == SeccompAction::Allow)?;
        }
        out.push(compile(named, default.clone(), SeccompAction::Allow)?);
    }
    let mut by_action: Vec<(SeccompAction, Rules)> = Vec::new();
    for e in &entries {
        let a = action(e.action(), e.errno_ret())?;
        if a == SeccompAction::Allow || a == default {
            continue;
        }
        let i = match by_action.iter().position(|(x, _)| *x == a) {
            Some(i) => i,
            None => {
                by_action.push((a.clone(), BTreeMap::new()));
                by_action.len() - 1
            }
        };
        if let Some((_, rules)) = by_action.get_mut(i) {
            add(rules, e, true)?;
        }
    }
    for (a, rules) in by_action {
        out.push(compile(rules, SeccompAction::Allow, a)?);
    }
    Ok(out)
}

/// Installs `filters` on this thread (the helper is single-threaded).
pub fn apply(filters: &[BpfProgram]) -> Result<(), String> {
    for f in filters {
        seccompiler::apply_filter(f).map_err(|e| format!("install the seccomp filter: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn an_allow_list_profile_is_one_filter() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["read","write","nosuchcall"],"action":"SCMP_ACT_ALLOW"},
                {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":0,"op":"SCMP_CMP_EQ"}]},
                {"names":["clone"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]}
            ]}"#,
        );
        let f = filters(&p).unwrap();
        assert_eq!(f.len(), 1);
        assert!(!f[0].is_empty());
    }

    #[test]
    fn other_actions_get_their_own_filters() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,"syscalls":[
                {"names":["read"],"action":"SCMP_ACT_ALLOW"},
                {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38},
                {"names":["ptrace"],"action":"SCMP_ACT_KILL_PROCESS"}
            ]}"#,
        );
        assert_eq!(filters(&p).unwrap().len(), 3);
        // A deny list: no default filter.
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#,
        );
        assert_eq!(filters(&p).unwrap().len(), 1);
        let p = profile(r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#);
        assert!(filters(&p).unwrap().is_empty());
    }

    #[test]
    fn an_installed_filter_denies_what_the_profile_denies() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
        );
        let f = filters(&p).unwrap();
        let dir = std::env::temp_dir().join(format!("kestrel-seccomp-{}", std::process::id()));
        // Filters are per thread: this thread only.
        let (made, read) = std::thread::spawn(move || {
            apply(&f).unwrap();
            (
                std::fs::create_dir(&dir),
                std::fs::read_to_string("/proc/self/status"),
            )
        })
        .join()
        .unwrap();
        assert_eq!(made.unwrap_err().raw_os_error(), Some(13));
        assert!(read.unwrap().contains("Seccomp:"));
    }

    #[test]
    fn bad_profiles_are_refused_with_a_reason() {
        let p = profile(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#);
        assert!(filters(&p).unwrap_err().contains("NOTIFY"));
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW","args":[{"index":9,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        assert!(filters(&p).unwrap_err().contains("index 9"));
    }
}
