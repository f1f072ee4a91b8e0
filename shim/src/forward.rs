//! CRI's PortForward for a pod VM. containerd dials `localhost:<port>` inside the pod's
//! network namespace (`sandbox_portforward_linux.go`), where nothing of the pod runs: the
//! guest holds the pod's address. The agent reports which TCP ports the guest listens on
//! (`GuestEvent::Listening`); [`PortForwarder::update`] keeps a listener on
//! `127.0.0.1:<port>` (and `[::1]:<port>`) of the namespace for each, opened on the
//! namespace's thread, and joins every accepted connection to a vsock stream to the
//! agent's forwarder, which dials the port in the guest.
//!
//! Listeners are tokio tasks; dropping the forwarder (the VM's end) closes them.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kestrel_agent_protocol::FORWARD_PORT;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

use crate::netns::NetnsThread;

pub struct PortForwarder {
    netns: Arc<NetnsThread>,
    /// The VM's hybrid vsock socket.
    vsock: PathBuf,
    ports: Mutex<HashMap<u16, AbortHandle>>,
}

impl PortForwarder {
    pub fn new(netns: Arc<NetnsThread>, vsock: PathBuf) -> Arc<PortForwarder> {
        Arc::new(PortForwarder {
            netns,
            vsock,
            ports: Mutex::new(HashMap::new()),
        })
    }

    /// The guest listens on `ports` now (sorted, as `GuestEvent::from_line` leaves them):
    /// listen on the new ones, close the gone ones. Called on the tokio runtime; never
    /// blocks.
    pub fn update(self: &Arc<Self>, ports: &[u16]) {
        let mut current = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        current.retain(|port, task| {
            let keep = ports.binary_search(port).is_ok();
            if !keep {
                task.abort();
            }
            keep
        });
        for &port in ports {
            if current.contains_key(&port) {
                continue;
            }
            let me = self.clone();
            let task = tokio::spawn(async move { me.listen(port).await });
            current.insert(port, task.abort_handle());
        }
    }

    async fn listen(self: Arc<Self>, port: u16) {
        let netns = self.netns.clone();
        let bound = tokio::task::spawn_blocking(move || {
            netns.run(move || {
                [
                    SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                    SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
                ]
                .into_iter()
                .filter_map(|a| std::net::TcpListener::bind(a).ok())
                .filter(|l| l.set_nonblocking(true).is_ok())
                .collect::<Vec<_>>()
            })
        })
        .await;
        let listeners: Vec<TcpListener> = match bound {
            Ok(Ok(ls)) => ls
                .into_iter()
                .filter_map(|l| TcpListener::from_std(l).ok())
                .collect(),
            _ => Vec::new(),
        };
        if listeners.is_empty() {
            log::warn!("port {port} of the pod cannot be forwarded: nothing could listen on it in the pod's namespace");
            return;
        }
        log::debug!("forwarding localhost:{port} of the pod's namespace into the VM");
        let mut tasks = tokio::task::JoinSet::new();
        for l in listeners {
            let vsock = self.vsock.clone();
            tasks.spawn(async move {
                while let Ok((conn, _)) = l.accept().await {
                    tokio::spawn(relay(conn, vsock.clone(), port));
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Joins one forwarded connection to the guest's port through the agent.
async fn relay(mut conn: tokio::net::TcpStream, vsock: PathBuf, port: u16) {
    let mut guest = match crate::agent::connect_port(&vsock, FORWARD_PORT).await {
        Ok(s) => s,
        Err(e) => {
            log::warn!("port {port}: cannot reach the VM's forwarder: {e}");
            return;
        }
    };
    if guest
        .write_all(format!("{port}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut guest).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

    /// The host half against a stand-in for the VM's hybrid vsock socket: a connection to
    /// localhost:<port> in the namespace arrives as `CONNECT 1026`, then the port line,
    /// then the client's bytes; the answer flows back.
    #[tokio::test]
    async fn localhost_in_the_namespace_reaches_the_vms_forwarder() {
        if !nix::unistd::Uid::effective().is_root() {
            kestrel_test_support::skip("needs root (a network namespace)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let vsock = dir.path().join("vsock");
        let vm = tokio::net::UnixListener::bind(&vsock).unwrap();
        let netns = Arc::new(NetnsThread::start(None).unwrap());
        // A new namespace's lo is down; CNI's loopback plugin brings it up in a pod's.
        netns
            .run(|| {
                let mut nl = kestrel_agent_protocol::netlink::Netlink::open().unwrap();
                let lo = nl
                    .links()
                    .unwrap()
                    .into_iter()
                    .find(|l| l.name == "lo")
                    .unwrap();
                nl.set_up(lo.index, None).unwrap();
            })
            .unwrap();
        let f = PortForwarder::new(netns.clone(), vsock.clone());
        f.update(&[8080]);
        let guest = tokio::spawn(async move {
            let (s, _) = vm.accept().await.unwrap();
            let mut s = BufReader::new(s);
            let mut line = String::new();
            s.read_line(&mut line).await.unwrap();
            assert_eq!(line, format!("CONNECT {FORWARD_PORT}\n"));
            s.get_mut().write_all(b"OK 1\n").await.unwrap();
            line.clear();
            s.read_line(&mut line).await.unwrap();
            assert_eq!(line, "8080\n");
            let mut req = [0u8; 4];
            s.read_exact(&mut req).await.unwrap();
            assert_eq!(&req, b"ping");
            s.get_mut().write_all(b"pong").await.unwrap();
            s.get_mut().shutdown().await.unwrap();
        });
        // The client on a thread of its own in the namespace (the forwarder's thread must
        // stay free to open listeners).
        let path = PathBuf::from(format!("/proc/{}/ns/net", netns.tid()));
        let client = Arc::new(NetnsThread::start(Some(&path)).unwrap());
        let probe = client.clone();
        let answer = tokio::task::spawn_blocking(move || {
            client
                .run(|| {
                    use std::io::{Read, Write};
                    for _ in 0..100 {
                        if let Ok(mut c) = std::net::TcpStream::connect("127.0.0.1:8080") {
                            c.write_all(b"ping").unwrap();
                            let mut out = String::new();
                            c.read_to_string(&mut out).unwrap();
                            return out;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    String::from("never listened")
                })
                .unwrap()
        })
        .await
        .unwrap();
        assert_eq!(answer, "pong");
        guest.await.unwrap();
        // A port the guest no longer listens on is closed.
        f.update(&[]);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let refused = probe
            .run(|| std::net::TcpStream::connect("127.0.0.1:8080").is_err())
            .unwrap();
        assert!(refused);
    }
}
