//! The VM's serial console as the task's stdio.
//!
//! Guest console output is written by vCPU threads one byte at a time and must never
//! block them (a stalled console would stall the guest kernel's printk): bytes go into a
//! bounded buffer that a writer thread drains into the task's stdout FIFO. When nobody reads
//! the FIFO and the buffer is full, output is dropped and counted. The FIFO is opened by the
//! writer thread (opening a FIFO blocks until a reader exists) and closed once the VM is gone
//! and the buffer is drained, so containerd sees EOF.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// How much console output waits for a slow reader before output is dropped.
const BUFFER_LIMIT: usize = 1 << 20;

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    buf: VecDeque<u8>,
    closed: bool,
}

/// The writer end handed to the VMM as the console output.
pub struct ConsoleSink {
    shared: Arc<Shared>,
}

impl Write for ConsoleSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.buf.len() + data.len() > BUFFER_LIMIT {
            self.shared
                .dropped
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        } else {
            st.buf.extend(data);
            self.shared.ready.notify_one();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleSink {
    fn drop(&mut self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.ready.notify_one();
    }
}

/// The thread that copies console output to the task's stdout.
pub struct ConsoleWriter {
    thread: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl ConsoleWriter {
    /// Waits until every byte was written (or the FIFO failed) and the FIFO is closed.
    pub fn join(self) {
        if self.thread.join().is_err() {
            log::error!("the console writer thread panicked");
        }
        let dropped = self.shared.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            log::warn!("{dropped} bytes of console output were dropped (nobody read stdout)");
        }
    }
}

/// The file of a `file://` stdio URI (`ctr run --log-uri file:///PATH`): output is
/// appended to it (created 0640 if missing) instead of a FIFO.
pub fn log_file(stdio: &str) -> Option<&std::path::Path> {
    stdio.strip_prefix("file://").map(std::path::Path::new)
}

/// Opens a task's output: appends to a `file://` URI's file, else opens the FIFO.
fn open_output(target: &std::path::Path) -> io::Result<File> {
    match target.to_str().and_then(log_file) {
        Some(file) => OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(file),
        // Opening a FIFO blocks until its reader comes; a signal meanwhile is no failure.
        None => loop {
            match OpenOptions::new().write(true).open(target) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        },
    }
}

/// Starts copying to `stdout` (a FIFO path or a `file://` URI; empty means discard).
/// `stderr`, if given, gets no data (the console is one stream) but is opened and closed
/// when the VM is gone, so its reader sees EOF too. Returns the sink for the VMM and the writer to join after the VM
/// ended.
pub fn start(stdout: &str, stderr: &str) -> io::Result<(ConsoleSink, ConsoleWriter)> {
    let shared = Arc::new(Shared::default());
    let path = (!stdout.is_empty()).then(|| PathBuf::from(stdout));
    let err_path = (!stderr.is_empty()).then(|| PathBuf::from(stderr));
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            copy_out(path, &s);
            if let Some(p) = err_path.filter(|p| p.to_str().and_then(log_file).is_none()) {
                // Without a reader this fails with ENXIO, which is fine: nobody waits for EOF.
                let _ = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(p);
            }
        })?;
    Ok((
        ConsoleSink {
            shared: shared.clone(),
        },
        ConsoleWriter { thread, shared },
    ))
}

fn copy_out(path: Option<PathBuf>, shared: &Shared) {
    let mut out: Option<File> = match &path {
        Some(p) => match open_output(p) {
            Ok(f) => Some(f),
            Err(e) => {
                log::warn!(
                    "cannot open stdout {}: {e}; console output is discarded",
                    p.display()
                );
                None
            }
        },
        None => None,
    };
    loop {
        let chunk: Vec<u8> = {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            while st.buf.is_empty() && !st.closed {
                st = shared.ready.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.buf.is_empty() {
                return;
            }
            st.buf.drain(..).collect()
        };
        if let Some(f) = out.as_mut() {
            if let Err(e) = f.write_all(&chunk) {
                log::warn!("console output stopped: {e}");
                out = None;
            }
        }
    }
}

/// Opens the stdin FIFO for the console's input without blocking (no writer yet is fine).
pub fn open_stdin(stdin: &str) -> io::Result<Option<File>> {
    if stdin.is_empty() {
        return Ok(None);
    }
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(stdin)
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn output_reaches_the_file_and_it_is_closed_after_the_sink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, b"").unwrap();
        let (mut sink, writer) = start(path.to_str().unwrap(), "").unwrap();
        for b in b"boot log\n" {
            sink.write_all(&[*b]).unwrap();
        }
        drop(sink);
        writer.join();
        let mut s = String::new();
        File::open(&path).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "boot log\n");
    }

    #[test]
    fn a_slow_reader_never_blocks_the_writer() {
        let (mut sink, writer) = start("", "").unwrap();
        let big = vec![b'x'; BUFFER_LIMIT * 3];
        for chunk in big.chunks(4096) {
            sink.write_all(chunk).unwrap();
        }
        drop(sink);
        writer.join();
    }
}
