//! `kestrel convert INPUT OUTPUT`: converts a QCOW2 (or raw) image to a sparse raw image
//! with the same converter the image cache uses.
//!
//! Runs on the main thread of the CLI. Progress goes to stderr (a `\r`-updated line on a
//! terminal, a line every 10% otherwise); the summary goes to stdout. The output is
//! written to an unnamed file in its directory and linked into place only when complete
//! ([`TempOutput`]), so an error or a kill (SIGINT, SIGTERM, SIGKILL) leaves nothing: not a
//! partial image under the output's name, nor a temporary file.

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devices::image::convert::{convert, ConvertError, ConvertStats, Limits};
use devices::image::output::TempOutput;
use devices::image::{check_output_path, detect_format, open_input};

/// Why `kestrel convert` failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertCliError {
    #[error("cannot read the input image {}", path.display())]
    Input {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the output image {}", path.display())]
    Output {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot convert {} to {}", input.display(), output.display())]
    Convert {
        input: PathBuf,
        output: PathBuf,
        #[source]
        source: ConvertError,
    },
    #[error("cannot move the converted image to {}", path.display())]
    Finish {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the output path {} has no file name", .0.display())]
    BadOutput(PathBuf),
}

/// Converts `input` to a raw image at `output` (replaced if it is a regular file),
/// showing progress on stderr and printing a summary on stdout. Nothing is left at
/// `output`, nor any temporary file, when this fails.
pub fn run_convert(input: &Path, output: &Path) -> Result<(), ConvertCliError> {
    let started = Instant::now();
    let input_err = |source| ConvertCliError::Input {
        path: input.to_path_buf(),
        source,
    };
    let output_err = |source| ConvertCliError::Output {
        path: output.to_path_buf(),
        source,
    };
    let in_file = open_input(input).map_err(input_err)?;
    devices::image::input_len(&in_file).map_err(input_err)?;
    let format = detect_format(&in_file).map_err(input_err)?;
    if output.file_name().is_none() {
        return Err(ConvertCliError::BadOutput(output.to_path_buf()));
    }
    check_output_path(output).map_err(output_err)?;
    let dir = output.parent().unwrap_or(Path::new("."));
    let out = TempOutput::create(dir, 0o644).map_err(output_err)?;

    let mut progress = Progress::new(io::stderr().is_terminal());
    let result = convert(
        &in_file,
        format,
        out.file(),
        &Limits::default(),
        &mut |done, total| progress.update(done, total),
    );
    progress.finish();
    let stats = result.map_err(|source| ConvertCliError::Convert {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        source,
    })?;
    // Data, then the name (persist fsyncs the directory).
    out.file().sync_data().map_err(output_err)?;
    out.persist(output)
        .map_err(|source| ConvertCliError::Finish {
            path: output.to_path_buf(),
            source,
        })?;
    print_summary(output, &stats, started.elapsed());
    Ok(())
}

fn print_summary(output: &Path, stats: &ConvertStats, elapsed: Duration) {
    let secs = elapsed.as_secs_f64();
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "output:       {}", output.display());
    let _ = writeln!(out, "format:       {} -> raw", stats.format);
    let _ = writeln!(
        out,
        "virtual size: {} ({} bytes)",
        human(stats.virtual_size),
        stats.virtual_size
    );
    let _ = writeln!(
        out,
        "written:      {} ({} bytes allocated, the rest are holes)",
        human(stats.bytes_written),
        stats.bytes_written
    );
    let _ = writeln!(
        out,
        "time:         {secs:.2} s ({:.1} MiB/s of virtual disk)",
        mib_per_s(stats.virtual_size, secs)
    );
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = UNITS[0];
    for u in UNITS.iter().skip(1) {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.2} {unit}")
}

fn mib_per_s(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / (1024.0 * 1024.0) / secs
    } else {
        0.0
    }
}

/// The progress display on stderr.
struct Progress {
    tty: bool,
    start: Instant,
    last_draw: Option<Instant>,
    /// Last 10% step printed (non-tty).
    last_step: u64,
    drew: bool,
}

impl Progress {
    fn new(tty: bool) -> Self {
        Progress {
            tty,
            start: Instant::now(),
            last_draw: None,
            last_step: 0,
            drew: false,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let rate = mib_per_s(done, self.start.elapsed().as_secs_f64());
        let mut err = io::stderr().lock();
        if self.tty {
            let now = Instant::now();
            let due = self
                .last_draw
                .is_none_or(|t| now.duration_since(t) >= Duration::from_millis(100));
            if due || done == total {
                self.last_draw = Some(now);
                self.drew = true;
                let _ = write!(
                    err,
                    "\rconverting: {pct:5.1}%  {:>10} / {}  {rate:7.1} MiB/s ",
                    human(done),
                    human(total)
                );
                let _ = err.flush();
            }
        } else {
            let step = (pct / 10.0) as u64;
            if step > self.last_step {
                self.last_step = step;
                let _ = writeln!(err, "converting: {pct:.0}% ({rate:.1} MiB/s)");
            }
        }
    }

    fn finish(&mut self) {
        if self.tty && self.drew {
            let _ = writeln!(io::stderr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::FileTypeExt;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kestrel-cli-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn converts_raw_and_leaves_no_temp() {
        let d = tmpdir("ok");
        let input = d.join("in.raw");
        let data: Vec<u8> = (0..307_200u32).map(|i| (i % 251) as u8).collect();
        fs::write(&input, &data).unwrap();
        let output = d.join("out.raw");
        run_convert(&input, &output).unwrap();
        assert_eq!(fs::read(&output).unwrap(), data);
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn failure_leaves_nothing_behind() {
        let d = tmpdir("bad");
        let input = d.join("bad.qcow2");
        let mut bad = b"QFI\xfb\0\0\0\x03".to_vec();
        bad.resize(4096, 0xff);
        fs::write(&input, &bad).unwrap();
        let output = d.join("out.raw");
        let err = run_convert(&input, &output).unwrap_err();
        assert!(matches!(err, ConvertCliError::Convert { .. }), "{err:?}");
        // Refused outputs: a device is never replaced, a directory is not a file.
        let err = run_convert(&input, Path::new("/dev/null")).unwrap_err();
        assert!(matches!(err, ConvertCliError::Output { .. }), "{err:?}");
        assert!(Path::new("/dev/null")
            .metadata()
            .unwrap()
            .file_type()
            .is_char_device());
        let err = run_convert(&input, &d).unwrap_err();
        assert!(matches!(err, ConvertCliError::Output { .. }), "{err:?}");
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512.00 B");
        assert_eq!(human(3 << 30), "3.00 GiB");
    }
}
