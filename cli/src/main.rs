//! `kestrel`: run a microVM without containerd.
//!
//! ```text
//! kestrel run [--kernel K] [--initrd I] [--cmdline S] [--cpus N] [--memory MiB]
//! ```
//! Boots the guest on this process's own threads, streams its console to stdout (stdin goes
//! to the console), and exits with the guest's status. Errors are one line on stderr:
//! what failed and why, outermost first.

mod args;
mod logger;

use std::error::Error;
use std::io::Write;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::Instant;

use args::{Command, RunArgs};

/// Exit status for kestrel's own failures (bad input, no KVM…), as `docker run` uses.
const EXIT_KESTREL_ERROR: u8 = 125;
const EXIT_USAGE: u8 = 2;

/// Formats an error and its causes on one line.
fn chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn main() -> ExitCode {
    let start = Instant::now();
    logger::init();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let cmd = match args::parse(&argv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kestrel: {e}\n\n{}", args::USAGE);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cmd {
        Command::Help => {
            println!("{}", args::USAGE);
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("kestrel {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Run(run) => match run_vm(run, start) {
            Ok(status) => {
                let _ = std::io::stdout().flush();
                // Exit right away: the VM's threads are already joined.
                std::process::exit(status)
            }
            Err(e) => {
                eprintln!("kestrel: error: {}", chain(e.as_ref()));
                ExitCode::from(EXIT_KESTREL_ERROR)
            }
        },
    }
}

fn run_vm(run: RunArgs, start: Instant) -> Result<i32, Box<dyn Error>> {
    let kernel = match run.kernel {
        Some(k) => k,
        None => vmm::assets::default_asset(vmm::assets::KERNEL)?,
    };
    let initrd = match run.initrd {
        Some(i) => Some(i),
        None if run.no_initrd => None,
        None => Some(vmm::assets::default_asset(vmm::assets::INITRD)?),
    };
    let mut config = vmm::VmConfig::new(kernel);
    config.start_time = start;
    config.initrd = initrd;
    if let Some(c) = run.cmdline {
        config.cmdline = c;
    }
    config.vcpus = run.cpus;
    config.memory_mib = run.memory_mib;
    config.console_in = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .map(std::fs::File::from);
    config.on_boot = Some(Box::new(|elapsed| {
        eprintln!("kestrel: guest boot time {:.1} ms (from kestrel start to the guest's boot-timer write)", elapsed.as_secs_f64() * 1000.0);
    }));
    let handle = vmm::start_vm(config)?;
    let exit = handle.wait();
    match &exit {
        vmm::VmExit::Exited(0) => {}
        other => eprintln!("kestrel: {other}"),
    }
    Ok(exit.status())
}
