//! A process's stdio as vsock streams to the host: the agent connects to the host (CID 2)
//! on the port the shim named, and one thread per stream copies bytes between the stream
//! and the process's pipe (or its terminal's master side).
//!
//! Output streams end with a shutdown of the vsock write side once the process side reached
//! EOF (every writer closed; for a terminal, EIO after the last slave fd closed), and their
//! threads are joined before the process's exit is reported, so the host has all output
//! before it learns of the exit. stdin ends when the host shuts down its side (containerd's
//! CloseIO): the pipe to the process is closed then.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kestrel_agent_protocol::{StdioPort, HOST_CID};
use nix::sys::socket::{self, AddressFamily, Shutdown, SockFlag, SockType, VsockAddr};

/// Opens the vsock stream to the host on `port`.
pub fn connect(port: StdioPort) -> io::Result<File> {
    let fd = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(HOST_CID, port.0),
    )?;
    Ok(File::from(fd))
}

/// The output copies of one process: joined (with a deadline) before its exit is reported.
#[derive(Default)]
pub struct Outputs {
    done: Vec<mpsc::Receiver<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Outputs {
    /// Copies `from` (the process side) to `to` (the vsock stream) until EOF, then shuts
    /// the stream's write side down.
    pub fn copy(&mut self, name: &'static str, mut from: File, to: File) -> io::Result<()> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("out-{name}"))
            .spawn(move || {
                let mut to = to;
                copy_until_eof(&mut from, &mut to);
                let _ = socket::shutdown(
                    std::os::fd::AsRawFd::as_raw_fd(&to.as_fd()),
                    Shutdown::Write,
                );
                let _ = tx.send(());
            })?;
        self.done.push(rx);
        self.threads.push(thread);
        Ok(())
    }

    /// Waits until every output reached EOF, at most `limit` in all (a daemon that keeps
    /// the process's stdout open must not hold its exit back forever). Returns false when
    /// the deadline passed first.
    pub fn drain(self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut all = true;
        for rx in &self.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if rx.recv_timeout(left).is_err() {
                all = false;
            }
        }
        if all {
            for t in self.threads {
                let _ = t.join();
            }
        }
        all
    }
}

/// Copies the host's stdin stream into the process until the host shuts it down, then
/// closes the process side.
pub fn copy_input(mut from: File, mut to: File) -> io::Result<()> {
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || copy_until_eof(&mut from, &mut to))?;
    Ok(())
}

fn copy_until_eof(from: &mut File, to: &mut File) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A terminal's master reads EIO once the last slave fd is closed: EOF.
            Err(_) => return,
        };
        let Some(chunk) = buf.get(..n) else { return };
        if to.write_all(chunk).is_err() {
            // The reader is gone; keep reading so the writer never blocks on a full pipe.
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        }
    }
}

/// A new pseudo-terminal: (master, slave).
pub fn open_pty() -> io::Result<(File, OwnedFd)> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(std::ffi::OsStr::from_bytes(name.as_bytes()))?;
    Ok((File::from(master), OwnedFd::from(slave)))
}

/// Sets a terminal's window size.
pub fn resize(master: &File, width: u16, height: u16) -> io::Result<()> {
    let size = rustix::termios::Winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(master, size).map_err(io::Error::from)
}
