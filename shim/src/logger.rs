//! The shim's log: containerd's `log` FIFO in the bundle, one logrus-style line per
//! record (`time=… level=… msg="…"`), which containerd copies into its own log.
//!
//! containerd-shim's own logger formats a record with `writeln!` straight onto the FIFO,
//! one write(2) per piece of the format; containerd's copy of the FIFO then interleaves
//! those pieces with its own lines (a CI run saw "task " and the rest of a line split by
//! a containerd event). Here a record is formatted first and written with one call, so a
//! line up to the pipe's atomic size (`PIPE_BUF`, 4 KiB) is never split.
//!
//! Thread note: any thread logs; the FIFO is behind a mutex.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::str::FromStr;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

/// Logs to `file`, one write per record.
pub struct LineLogger {
    file: Mutex<File>,
}

impl LineLogger {
    /// Installs the logger on the bundle's `log` FIFO (the shim's working directory) at
    /// `RUST_LOG`'s level (info when unset or unparsable), debug at least when containerd
    /// runs with `--debug`.
    pub fn install(debug: bool) -> std::io::Result<()> {
        let file = OpenOptions::new().write(true).open("log")?;
        let level = std::env::var("RUST_LOG")
            .ok()
            .and_then(|l| LevelFilter::from_str(&l).ok())
            .unwrap_or(LevelFilter::Info);
        let level = if debug {
            level.max(LevelFilter::Debug)
        } else {
            level
        };
        log::set_max_level(level);
        log::set_boxed_logger(Box::new(LineLogger {
            file: Mutex::new(file),
        }))
        .map_err(std::io::Error::other)
    }
}

/// One record as a logrus line: containerd shows the shim's lines as they are.
fn line(time: &str, record: &Record) -> String {
    format!(
        "time=\"{time}\" level={} msg=\"{}\"\n\n",
        record.level().as_str().to_lowercase(),
        record.args()
    )
}

impl Log for LineLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let line = line(&time, record);
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // A closed FIFO (containerd restarting) loses the line; the shim goes on.
        let _ = file.write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_logrus_line() {
        let args = format_args!("task {}: the guest's OOM killer killed a process", "t1");
        let record = Record::builder().args(args).level(log::Level::Info).build();
        assert_eq!(
            line("2026-12-07T03:09:26Z", &record),
            "time=\"2026-12-07T03:09:26Z\" level=info msg=\"task t1: the guest's OOM killer killed a process\"\n\n"
        );
    }
}
