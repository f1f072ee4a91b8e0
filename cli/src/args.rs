//! Command-line parsing for `kestrel` (no dependencies; the surface is small).

use std::path::PathBuf;

pub const USAGE: &str = "usage:
  kestrel run [--kernel PATH] [--initrd PATH | --no-initrd] [--cmdline STRING]
              [--cpus N] [--memory MiB]
              [--image PATH[,overlay=FILE]] [--disk PATH[,ro][,serial=S][,overlay=FILE]]...
              [--net tap=NAME[,mac=MAC][,create]]... [--vsock cid=N,socket=PATH]
              [--seccomp enforce|log|off]
      Boot a microVM: the console is this terminal, the exit status is the guest's.
      Defaults: the guest kernel and initramfs built by scripts/build-guest.sh,
      1 vCPU, 128 MiB.
      --image   boot a VM image (QCOW2 or raw) as the root disk /dev/vda: converted once
                to a raw base in the image cache, written through a copy-on-write overlay
                (temporary unless overlay=FILE); implies --no-initrd.
      --disk    attach a raw disk file as is (never format-probed); overlay=FILE keeps
                PATH read-only and writes to FILE.
      --net     attach a virtio-net interface on an existing tap device, or on a new one
                with `create` (removed when the VM ends).
      --vsock   attach vsock: host clients connect to PATH and send CONNECT <port>;
                guest connections to host port P reach PATH_P.
      --seccomp the vCPU, VMM and disk threads' seccomp filters (default enforce, or
                $KESTREL_SECCOMP): a forbidden call ends kestrel with status 159; `log`
                lets it through and the kernel logs it.
  kestrel convert INPUT OUTPUT
      Convert a QCOW2 (or raw) image to a sparse raw file.
  kestrel version";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(RunArgs),
    Convert { input: PathBuf, output: PathBuf },
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
    pub image: Option<ImageArg>,
    pub disks: Vec<DiskArg>,
    pub nets: Vec<NetArg>,
    pub vsock: Option<VsockArg>,
    /// `--seccomp`; None: `KESTREL_SECCOMP` or enforce.
    pub seccomp: Option<vmm::SeccompLevel>,
}

/// `--image PATH[,overlay=FILE]`
#[derive(Debug, PartialEq, Eq)]
pub struct ImageArg {
    pub path: PathBuf,
    pub overlay: Option<PathBuf>,
}

/// `--disk PATH[,ro][,serial=S][,overlay=FILE]`
#[derive(Debug, PartialEq, Eq)]
pub struct DiskArg {
    pub path: PathBuf,
    pub read_only: bool,
    pub serial: Option<String>,
    pub overlay: Option<PathBuf>,
}

/// `--net tap=NAME[,mac=MAC][,create]`
#[derive(Debug, PartialEq, Eq)]
pub struct NetArg {
    pub tap: String,
    pub mac: Option<String>,
    /// Create the tap instead of opening an existing one.
    pub create: bool,
}

/// `--vsock cid=N,socket=PATH`
#[derive(Debug, PartialEq, Eq)]
pub struct VsockArg {
    pub cid: u64,
    pub socket: PathBuf,
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
            image: None,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            seccomp: None,
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
    #[error("{option} {value:?}: {why}")]
    BadSpec {
        option: &'static str,
        value: String,
        why: String,
    },
    #[error("convert takes INPUT and OUTPUT")]
    ConvertArgs,
}

/// One `key=value` (or bare `flag`) item of a device spec.
type SpecOption<'a> = (&'a str, Option<&'a str>);

/// The comma-separated items of a device spec.
fn options(value: &str) -> impl Iterator<Item = SpecOption<'_>> {
    value
        .split(',')
        .map(|p| p.split_once('=').map_or((p, None), |(k, v)| (k, Some(v))))
}

/// A spec whose first item is a path: the path and the remaining options.
fn path_and_options<'a>(
    option: &'static str,
    value: &'a str,
) -> Result<(&'a str, Vec<SpecOption<'a>>), ArgsError> {
    let mut items = options(value);
    match items.next() {
        Some((path, None)) if !path.is_empty() => Ok((path, items.collect())),
        _ => Err(bad(option, value, "the first item must be a path")),
    }
}

fn bad(option: &'static str, value: &str, why: impl Into<String>) -> ArgsError {
    ArgsError::BadSpec {
        option,
        value: value.into(),
        why: why.into(),
    }
}

fn parse_image(value: &str) -> Result<ImageArg, ArgsError> {
    let (path, opts) = path_and_options("--image", value)?;
    let mut arg = ImageArg {
        path: path.into(),
        overlay: None,
    };
    for (k, v) in opts {
        match (k, v) {
            ("overlay", Some(f)) if !f.is_empty() => arg.overlay = Some(f.into()),
            _ => {
                return Err(bad(
                    "--image",
                    value,
                    format!("unknown option {k:?} (expected overlay=FILE)"),
                ))
            }
        }
    }
    Ok(arg)
}

fn parse_disk(value: &str) -> Result<DiskArg, ArgsError> {
    let (path, opts) = path_and_options("--disk", value)?;
    let mut arg = DiskArg {
        path: path.into(),
        read_only: false,
        serial: None,
        overlay: None,
    };
    for (k, v) in opts {
        match (k, v) {
            ("ro", None) => arg.read_only = true,
            ("serial", Some(s)) if s.len() <= 20 => arg.serial = Some(s.into()),
            ("serial", Some(_)) => {
                return Err(bad("--disk", value, "a serial has at most 20 bytes"))
            }
            ("overlay", Some(f)) if !f.is_empty() => arg.overlay = Some(f.into()),
            _ => {
                return Err(bad(
                    "--disk",
                    value,
                    format!("unknown option {k:?} (expected ro, serial=S, overlay=FILE)"),
                ))
            }
        }
    }
    if arg.read_only && arg.overlay.is_some() {
        return Err(bad(
            "--disk",
            value,
            "ro and overlay= exclude each other (an overlay is writable)",
        ));
    }
    Ok(arg)
}

fn parse_net(value: &str) -> Result<NetArg, ArgsError> {
    let mut arg = NetArg {
        tap: String::new(),
        mac: None,
        create: false,
    };
    for item in options(value) {
        match item {
            ("tap", Some(v)) if !v.is_empty() => arg.tap = v.to_string(),
            ("mac", Some(v)) if !v.is_empty() => arg.mac = Some(v.to_string()),
            ("create", None) => arg.create = true,
            (k, _) => {
                return Err(bad(
                    "--net",
                    value,
                    format!("unknown option {k:?} (expected tap=NAME[,mac=MAC][,create])"),
                ))
            }
        }
    }
    if arg.tap.is_empty() {
        return Err(bad("--net", value, "tap=NAME is required"));
    }
    Ok(arg)
}

fn parse_vsock(value: &str) -> Result<VsockArg, ArgsError> {
    let (mut cid, mut socket) = (None, None);
    for item in options(value) {
        match item {
            ("cid", Some(v)) => {
                cid = Some(
                    v.parse::<u64>()
                        .map_err(|_| bad("--vsock", value, format!("cid {v:?} is not a number")))?,
                )
            }
            ("socket", Some(v)) if !v.is_empty() => socket = Some(PathBuf::from(v)),
            (k, _) => {
                return Err(bad(
                    "--vsock",
                    value,
                    format!("unknown option {k:?} (expected cid=N,socket=PATH)"),
                ))
            }
        }
    }
    match (cid, socket) {
        (Some(cid), Some(socket)) => Ok(VsockArg { cid, socket }),
        _ => Err(bad(
            "--vsock",
            value,
            "cid=N and socket=PATH are both required",
        )),
    }
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
        "convert" => match rest {
            [input, output] => Ok(Command::Convert {
                input: input.into(),
                output: output.into(),
            }),
            _ => Err(ArgsError::ConvertArgs),
        },
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
            "--image" => a.image = Some(parse_image(&value()?)?),
            "--disk" => a.disks.push(parse_disk(&value()?)?),
            "--net" => a.nets.push(parse_net(&value()?)?),
            "--vsock" => a.vsock = Some(parse_vsock(&value()?)?),
            "--seccomp" => {
                let v = value()?;
                a.seccomp = Some(
                    v.parse()
                        .map_err(|_| bad("--seccomp", &v, "expected enforce, log or off"))?,
                )
            }
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
        assert_eq!(
            p("run --seccomp strict").unwrap_err().to_string(),
            "--seccomp \"strict\": expected enforce, log or off"
        );
        match p("run --seccomp=log") {
            Ok(Command::Run(r)) => assert_eq!(r.seccomp, Some(vmm::SeccompLevel::Log)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_device_specs_name_the_option() {
        assert!(matches!(p("convert a"), Err(ArgsError::ConvertArgs)));
        for bad in [
            "run --disk ,ro",
            "run --disk d,rw",
            "run --disk d,ro,overlay=o",
            "run --disk d,serial=012345678901234567890",
            "run --net mac=02:00:00:00:00:01",
            "run --net tap=t0,speed=10",
            "run --vsock cid=x,socket=/s",
            "run --vsock cid=3",
            "run --image i,cow",
        ] {
            assert!(matches!(p(bad), Err(ArgsError::BadSpec { .. })), "{bad}");
        }
    }

    #[test]
    fn device_specs() {
        let Command::Run(r) = p("run --image vm.qcow2,overlay=/tmp/o --disk d.raw,ro,serial=data --disk e.raw,overlay=e.cow --net tap=tap0,mac=02:00:00:00:00:01 --net tap=kt%d,create --vsock cid=3,socket=/tmp/v.sock").unwrap() else {
            panic!()
        };
        assert_eq!(
            r.image,
            Some(ImageArg {
                path: "vm.qcow2".into(),
                overlay: Some("/tmp/o".into())
            })
        );
        assert_eq!(
            r.disks[0],
            DiskArg {
                path: "d.raw".into(),
                read_only: true,
                serial: Some("data".into()),
                overlay: None
            }
        );
        assert_eq!(r.disks[1].overlay, Some("e.cow".into()));
        assert_eq!(
            r.nets,
            vec![
                NetArg {
                    tap: "tap0".into(),
                    mac: Some("02:00:00:00:00:01".into()),
                    create: false
                },
                NetArg {
                    tap: "kt%d".into(),
                    mac: None,
                    create: true
                },
            ]
        );
        assert_eq!(
            r.vsock,
            Some(VsockArg {
                cid: 3,
                socket: "/tmp/v.sock".into()
            })
        );
        assert_eq!(
            p("convert in.qcow2 out.raw").unwrap(),
            Command::Convert {
                input: "in.qcow2".into(),
                output: "out.raw".into()
            }
        );
    }
}
