//! `kestrel`: run a microVM without containerd (`kestrel run`), convert images
//! (`kestrel convert`); `args::USAGE` has the options.
//!
//! `run` boots the guest on this process's own threads, streams its console to stdout
//! (stdin goes to the console), and exits with the guest's status. Errors are one line on
//! stderr: what failed and why, outermost first.

mod args;
mod convert;
mod logger;
mod run;

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use args::Command;

/// Exit status for kestrel's own failures (bad input, no KVM…), as `docker run` uses.
const EXIT_KESTREL_ERROR: u8 = 125;
const EXIT_USAGE: u8 = 2;

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
        Command::Convert { input, output } => match convert::run_convert(&input, &output) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kestrel: error: {}", vmm::error_chain(&e));
                ExitCode::from(EXIT_KESTREL_ERROR)
            }
        },
        Command::Run(run) => match run::run_vm(run, start) {
            Ok(status) => {
                let _ = std::io::stdout().flush();
                // Exit right away: the VM's threads are already joined.
                std::process::exit(status)
            }
            Err(e) => {
                eprintln!("kestrel: error: {}", vmm::error_chain(&e));
                ExitCode::from(EXIT_KESTREL_ERROR)
            }
        },
    }
}
