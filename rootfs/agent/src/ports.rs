//! A pod's ports for CRI's PortForward, which dials `localhost:<port>` inside the pod's
//! network namespace on the host: the pod's VM tells the shim which TCP ports are listened
//! on ([`watch`], from `/proc/net/tcp{,6}` once a second, reported as
//! `GuestEvent::Listening` when the set changes), the shim listens on them in the
//! namespace and opens a vsock stream to [`FORWARD_PORT`] per connection, which
//! [`serve`] joins to `127.0.0.1:<port>` in the guest — also reaching what listens on the
//! guest's loopback only.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use kestrel_agent_protocol::{GuestEvent, FORWARD_PORT};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, VsockAddr};

use crate::events::Events;

/// The TCP ports in LISTEN state in a `/proc/net/tcp` or `tcp6` table.
pub fn listening(table: &str) -> BTreeSet<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != "0A" {
                return None;
            }
            let port = local.rsplit_once(':')?.1;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

fn listening_now() -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        ports.extend(listening(
            &std::fs::read_to_string(table).unwrap_or_default(),
        ));
    }
    ports
}

/// Reports the listening ports whenever they change (a thread of its own).
pub fn watch(events: Arc<Events>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("ports".into())
        .spawn(move || {
            let mut last = None;
            loop {
                let now = listening_now();
                if last.as_ref() != Some(&now) {
                    events.send(&GuestEvent::Listening {
                        ports: now.iter().copied().collect(),
                    });
                    last = Some(now);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })?;
    Ok(())
}

/// Accepts the host's forwarded connections on [`FORWARD_PORT`] (a thread of its own, and
/// two more per connection).
pub fn serve() -> io::Result<()> {
    let fd = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::bind(
        fd.as_raw_fd(),
        &VsockAddr::new(libc::VMADDR_CID_ANY, FORWARD_PORT),
    )?;
    rustix::net::listen(&fd, 64)?;
    std::thread::Builder::new()
        .name("forward".into())
        .spawn(move || loop {
            match rustix::net::accept_with(&fd, rustix::net::SocketFlags::CLOEXEC) {
                Ok(conn) => {
                    let stream = File::from(conn);
                    let _ = std::thread::Builder::new()
                        .name("forward-conn".into())
                        .spawn(move || forward(stream));
                }
                Err(e) => {
                    log::warn!("port forwarding stops: {e}");
                    return;
                }
            }
        })?;
    Ok(())
}

/// Reads the port line, connects in the guest, copies both ways until both sides end.
fn forward(host: File) {
    let mut reader = BufReader::new(host);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || line.len() > 8 {
        return;
    }
    let Ok(port) = line.trim().parse::<u16>() else {
        log::warn!("port forwarding: bad port line {line:?}");
        return;
    };
    let target =
        TcpStream::connect(("127.0.0.1", port)).or_else(|_| TcpStream::connect(("::1", port)));
    let mut target = match target {
        Ok(t) => t,
        Err(e) => {
            log::info!("port forwarding to {port}: {e}");
            return;
        }
    };
    // What the host sent after the line is already in the reader's buffer.
    let buffered = reader.buffer().to_vec();
    let host = reader.into_inner();
    if !buffered.is_empty() && target.write_all(&buffered).is_err() {
        return;
    }
    let (Ok(mut host_r), Ok(mut target_r)) = (host.try_clone(), target.try_clone()) else {
        return;
    };
    let mut host_w = host;
    let up = std::thread::Builder::new()
        .name("forward-up".into())
        .spawn(move || {
            let _ = io::copy(&mut host_r, &mut target);
            let _ = target.shutdown(Shutdown::Write);
        });
    let _ = io::copy(&mut target_r, &mut host_w);
    let _ = socket::shutdown(host_w.as_raw_fd(), socket::Shutdown::Write);
    if let Ok(up) = up {
        let _ = up.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_ports_come_from_the_tcp_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0500580A:1F90 0100580A:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
        assert_eq!(
            listening(tcp).into_iter().collect::<Vec<_>>(),
            [0x35, 0x1f90]
        );
        let tcp6 =
            "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:01BB 00000000000000000000000000000000:0000 0A 0
";
        assert_eq!(listening(tcp6).into_iter().collect::<Vec<_>>(), [443]);
        assert!(listening("").is_empty());
        assert!(listening("header\n garbage\n").is_empty());
    }
}
