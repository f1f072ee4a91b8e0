//! Command-line parsing for `kestrel` (no dependencies; the surface is small).

use std::path::PathBuf;

pub const USAGE: &str = "usage:
  kestrel run [--kernel PATH] [--initrd PATH | --no-initrd] [--cmdline STRING]
              [--cpus N] [--memory MiB]
      Boot a microVM: the console is this terminal, the exit status is the guest's.
      Defaults: the guest kernel and initramfs built by scripts/build-guest.sh,
      1 vCPU, 128 MiB.
  kestrel version";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(RunArgs),
    Version,
    Help,
}

#[derive(Debug, PartialEq, Eq)]
pub struct RunArgs {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub no_initrd: bool,
    pub cmdline: Option<String>,
    pub cpus: u8,
    pub memory_mib: u64,
}

impl Default for RunArgs {
    fn default() -> Self {
        RunArgs {
            kernel: None,
            initrd: None,
            no_initrd: false,
            cmdline: None,
            cpus: 1,
            memory_mib: 128,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("missing command")]
    NoCommand,
    #[error("unknown command {0:?}")]
    UnknownCommand(String),
    #[error("unknown option {0:?}")]
    UnknownOption(String),
    #[error("option {0} needs a value")]
    MissingValue(String),
    #[error("{option} takes a number from {min} to {max}, not {value:?}")]
    BadNumber {
        option: String,
        value: String,
        min: u64,
        max: u64,
    },
    #[error("--initrd and --no-initrd exclude each other")]
    InitrdConflict,
}

fn number(option: &str, value: &str, min: u64, max: u64) -> Result<u64, ArgsError> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| ArgsError::BadNumber {
            option: option.into(),
            value: value.into(),
            min,
            max,
        })
}

pub fn parse(argv: &[String]) -> Result<Command, ArgsError> {
    let (cmd, rest) = argv.split_first().ok_or(ArgsError::NoCommand)?;
    match cmd.as_str() {
        "run" => parse_run(rest).map(Command::Run),
        "version" | "--version" | "-V" => Ok(Command::Version),
        "help" | "--help" | "-h" => Ok(Command::Help),
        other => Err(ArgsError::UnknownCommand(other.into())),
    }
}

fn parse_run(argv: &[String]) -> Result<RunArgs, ArgsError> {
    let mut a = RunArgs::default();
    let mut it = argv.iter();
    while let Some(opt) = it.next() {
        // Accept both `--opt value` and `--opt=value`.
        let (name, inline) = match opt.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (opt.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| ArgsError::MissingValue(name.into()))
        };
        match name {
            "--kernel" => a.kernel = Some(value()?.into()),
            "--initrd" => a.initrd = Some(value()?.into()),
            "--no-initrd" => a.no_initrd = true,
            "--cmdline" => a.cmdline = Some(value()?),
            // 0 passes parsing so that the VMM's own check reports it with its reason.
            "--cpus" => a.cpus = number(name, &value()?, 0, 255)? as u8,
            "--memory" => a.memory_mib = number(name, &value()?, 0, 1 << 30)?,
            "--help" | "-h" => return Err(ArgsError::UnknownOption(name.into())),
            other => return Err(ArgsError::UnknownOption(other.into())),
        }
    }
    if a.no_initrd && a.initrd.is_some() {
        return Err(ArgsError::InitrdConflict);
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command, ArgsError> {
        parse(&s.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn run_options() {
        let Command::Run(r) = p("run --kernel /k --cpus=2 --memory 256 --cmdline x").unwrap()
        else {
            panic!()
        };
        assert_eq!(r.kernel, Some("/k".into()));
        assert_eq!((r.cpus, r.memory_mib), (2, 256));
        assert_eq!(r.cmdline.as_deref(), Some("x"));
        assert_eq!(p("run").unwrap(), Command::Run(RunArgs::default()));
    }

    #[test]
    fn bad_input() {
        assert_eq!(p(""), Err(ArgsError::NoCommand));
        assert!(matches!(p("boot"), Err(ArgsError::UnknownCommand(_))));
        assert!(matches!(
            p("run --cpus two"),
            Err(ArgsError::BadNumber { .. })
        ));
        assert!(matches!(
            p("run --cpus 300"),
            Err(ArgsError::BadNumber { .. })
        ));
        assert!(matches!(
            p("run --memory -1"),
            Err(ArgsError::BadNumber { .. })
        ));
        assert!(matches!(p("run --kernel"), Err(ArgsError::MissingValue(_))));
        assert!(matches!(
            p("run --frobnicate"),
            Err(ArgsError::UnknownOption(_))
        ));
        assert_eq!(
            p("run --initrd x --no-initrd"),
            Err(ArgsError::InitrdConflict)
        );
    }
}
