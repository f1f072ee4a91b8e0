//! The connection multiplexer: bridges guest vsock ports to host Unix sockets. Runs on the
//! **VMM thread** only, called by the device's event subscriber.
//!
//! It owns the listening socket at the configured path, the host clients still sending their
//! `CONNECT <port>\n` line ("handshakes"), and the connection table keyed by
//! `(local port, guest port)`. It routes guest packets to connections (creating one on a
//! guest OP_REQUEST, answering OP_RST for packets of unknown connections) and picks the next
//! packet for the guest, round-robin over connections with something to say.
//!
//! The muxer never touches the event loop while it works: every change of what a host socket
//! wants polled is recorded, and [`Muxer::reconcile`] applies them through `EventOps` at the
//! end of each event. A socket leaving the table goes to a graveyard and is closed only after
//! it has been removed from epoll, so a file descriptor number is never reused while still
//! registered.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events};

/// Closing a Unix socket with unread bytes makes the peer's next read fail with
/// ECONNRESET instead of EOF, even after it read everything the guest sent. So before a
/// host socket is closed, its read side is shut (the host's further writes fail with
/// EPIPE) and what the host had written and nobody will read is discarded: the host then
/// sees the guest's data, then EOF. Non-blocking and bounded by the socket's buffer.
fn discard_unread(stream: &UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Read);
    let mut buf = [0u8; 16 * 1024];
    for _ in 0..256 {
        match (&*stream).read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

use super::csm::{ConnConfig, ConnError, Connection, IoEvent, State};
use super::metrics::{Counter, VsockMetrics};
use super::packet::{Header, Op};
use super::{uapi, VsockLimits, HOST_CID};
use crate::virtio::RateLimitedLog;

/// Host-side ports of host-initiated connections: `[2^30, 2^31)`, round-robin.
const LOCAL_PORT_MIN: u32 = 1 << 30;
const LOCAL_PORT_END: u32 = 1 << 31;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// Resets for unknown connections waiting for RX buffers; more are dropped.
const MAX_QUEUED_RESETS: usize = 1024;
/// Connections accepted per listener event (the listener is level-triggered).
const ACCEPT_BATCH: usize = 64;

/// Errors of the multiplexer.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot make the listening socket non-blocking")]
    Nonblocking(#[source] io::Error),
}

/// Identifies a connection: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKey {
    Conn(ConnKey),
    Handshake(RawFd),
}

/// Who owns a host socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Handshake,
    Conn(ConnKey),
}

/// A host client that has not finished its `CONNECT` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// The multiplexer.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    limits: VsockLimits,
    conns: HashMap<ConnKey, Connection>,
    handshakes: HashMap<RawFd, Handshake>,
    endpoints: HashMap<RawFd, Endpoint>,
    /// What each host socket is registered for in epoll.
    registered: HashMap<RawFd, EventSet>,
    /// Sockets whose wanted events may have changed.
    dirty: Vec<RawFd>,
    /// Sockets to deregister, then close.
    graveyard: Vec<UnixStream>,
    /// Connections with something for the guest (may hold stale keys).
    rxq: VecDeque<ConnKey>,
    queued: HashSet<ConnKey>,
    /// Resets for packets of unknown connections: (local port, guest port).
    resets: VecDeque<(u32, u32)>,
    local_ports: HashSet<u32>,
    last_local_port: u32,
    timers: BinaryHeap<Reverse<(Instant, TimerKey)>>,
    metrics: Arc<VsockMetrics>,
    log: RateLimitedLog,
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // We created the socket file; leave no stale one behind.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn event_set(interest: super::csm::Interest) -> EventSet {
    let mut set = EventSet::empty();
    if interest.read {
        set |= EventSet::IN;
    }
    if interest.write {
        set |= EventSet::OUT;
    }
    set
}

impl Muxer {
    /// Listens at `path` (which must not exist) for host clients of the guest `guest_cid`.
    pub fn new(
        guest_cid: u64,
        path: &Path,
        limits: VsockLimits,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Muxer, MuxerError> {
        let listener = UnixListener::bind(path).map_err(|source| MuxerError::Bind {
            path: path.to_owned(),
            source,
        })?;
        let muxer = Muxer {
            guest_cid,
            path: path.to_owned(),
            listener,
            limits,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            endpoints: HashMap::new(),
            registered: HashMap::new(),
            dirty: Vec::new(),
            graveyard: Vec::new(),
            rxq: VecDeque::new(),
            queued: HashSet::new(),
            resets: VecDeque::new(),
            local_ports: HashSet::new(),
            last_local_port: LOCAL_PORT_MIN.wrapping_sub(1),
            timers: BinaryHeap::new(),
            metrics,
            log: RateLimitedLog::default(),
        };
        // From here on, dropping `muxer` removes the socket file.
        muxer
            .listener
            .set_nonblocking(true)
            .map_err(MuxerError::Nonblocking)?;
        Ok(muxer)
    }

    /// The listening socket (the subscriber registers it once).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn log(&mut self) -> &mut RateLimitedLog {
        &mut self.log
    }

    fn conn_config(&self) -> ConnConfig {
        ConnConfig {
            buf_alloc: self.limits.conn_buf_size,
            request_timeout: self.limits.request_timeout,
            shutdown_timeout: self.limits.shutdown_timeout,
        }
    }

    fn in_use(&self) -> usize {
        self.conns.len().saturating_add(self.handshakes.len())
    }

    fn update_active(&self) {
        self.metrics.set_active(self.in_use());
    }

    /// Number of connections (handshakes included).
    pub fn connection_count(&self) -> usize {
        self.in_use()
    }

    /// Whether [`Self::recv_pkt`] may have something.
    pub fn has_pending_rx(&self) -> bool {
        !self.resets.is_empty() || !self.rxq.is_empty()
    }

    /// The earliest pending deadline (possibly of an entry that no longer matters).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    fn queue_reset(&mut self, local_port: u32, peer_port: u32) {
        if self.resets.len() >= MAX_QUEUED_RESETS {
            self.metrics.inc(Counter::DroppedResets);
        } else {
            self.resets.push_back((local_port, peer_port));
        }
    }

    /// Bookkeeping after anything happened to a connection: errors, timers, removal, RX
    /// queueing, polling.
    fn after_conn(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let forwarded = conn.take_forwarded();
        let error = conn.take_error();
        let deadline = conn.take_new_deadline();
        let closed = conn.is_closed();
        let pending = conn.has_pending_rx();
        let fd = conn.stream().as_raw_fd();
        if forwarded > 0 {
            self.metrics.add(Counter::TxBytes, forwarded);
        }
        if let Some(e) = error {
            self.metrics.inc(Counter::ConnErrors);
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            self.log.warn(format_args!(
                "vsock: connection {}<->{} reset: {e}{cause}",
                key.local_port, key.peer_port
            ));
        }
        if let Some(at) = deadline {
            self.timers.push(Reverse((at, TimerKey::Conn(key))));
        }
        if closed {
            self.remove_conn(key);
            return;
        }
        if pending && self.queued.insert(key) {
            self.rxq.push_back(key);
        }
        self.dirty.push(fd);
    }

    fn remove_conn(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        if conn.was_established() {
            self.metrics.inc(Counter::ClosedConnections);
        } else {
            self.metrics.inc(Counter::RefusedConnections);
        }
        if conn.host_initiated() {
            self.local_ports.remove(&key.local_port);
        }
        self.queued.remove(&key);
        let stream = conn.into_stream();
        self.endpoints.remove(&stream.as_raw_fd());
        self.graveyard.push(stream);
        self.update_active();
    }

    /// Drops every connection without telling the guest (the driver reset the device).
    pub fn purge(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            if let Some(conn) = self.conns.get_mut(&key) {
                let _ = conn.stream().shutdown(std::net::Shutdown::Both);
            }
            self.remove_conn(key);
        }
        self.rxq.clear();
        self.queued.clear();
        self.resets.clear();
    }

    /// A packet from the guest's TX queue, its data copied out of guest memory.
    pub fn send_pkt(&mut self, hdr: &Header, op: Op, data: &[u8], now: Instant) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            let was_local_init = conn.state() == State::LocalInit;
            conn.on_packet(op, hdr, data, now);
            if was_local_init && conn.state() == State::Established {
                self.metrics.inc(Counter::HostConnections);
            }
            self.after_conn(key);
            return;
        }
        match op {
            Op::Request => self.guest_connect(key, hdr),
            // Nothing to reset.
            Op::Rst => {}
            _ => self.queue_reset(key.local_port, key.peer_port),
        }
    }

    /// The guest connects to host port `key.local_port`: reach `<path>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.in_use() >= self.limits.max_connections {
            self.metrics.inc(Counter::RefusedConnections);
            self.log.warn(format_args!(
                "vsock: guest connection to port {} refused: {} connections open",
                key.local_port,
                self.in_use()
            ));
            self.queue_reset(key.local_port, key.peer_port);
            return;
        }
        let mut target = OsString::from(self.path.as_os_str());
        target.push(format!("_{}", key.local_port));
        let stream = UnixStream::connect(&target).and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        });
        match stream {
            Ok(stream) => {
                let fd = stream.as_raw_fd();
                let conn = Connection::new_peer(
                    stream,
                    key.local_port,
                    key.peer_port,
                    self.conn_config(),
                    hdr,
                );
                self.conns.insert(key, conn);
                self.endpoints.insert(fd, Endpoint::Conn(key));
                self.update_active();
                self.after_conn(key);
            }
            Err(e) => {
                // Nobody listens: the guest's connect() gets ECONNRESET.
                self.metrics.inc(Counter::RefusedConnections);
                log::debug!(
                    "vsock: guest connection to {} refused: {e}",
                    Path::new(&target).display()
                );
                self.queue_reset(key.local_port, key.peer_port);
            }
        }
    }

    /// The next packet for the guest; data goes into `buf` (the room of the RX buffer).
    /// Returns the complete header and the data length.
    pub fn recv_pkt(&mut self, buf: &mut [u8], now: Instant) -> Option<(Header, usize)> {
        if let Some((local_port, peer_port)) = self.resets.pop_front() {
            self.metrics.inc(Counter::ResetsSent);
            return Some((
                Header {
                    src_cid: HOST_CID,
                    dst_cid: self.guest_cid,
                    src_port: local_port,
                    dst_port: peer_port,
                    type_: uapi::TYPE_STREAM,
                    op: uapi::OP_RST,
                    ..Header::default()
                },
                0,
            ));
        }
        // Each connection queued now gets at most one turn.
        for _ in 0..self.rxq.len() {
            let key = self.rxq.pop_front()?;
            self.queued.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let pkt = conn.recv_pkt(buf, now);
            self.after_conn(key);
            let Some((mut hdr, n)) = pkt else {
                continue;
            };
            hdr.src_cid = HOST_CID;
            hdr.dst_cid = self.guest_cid;
            match hdr.op {
                uapi::OP_RW => self.metrics.add(Counter::RxBytes, n as u64),
                uapi::OP_RST => self.metrics.inc(Counter::ResetsSent),
                uapi::OP_RESPONSE => self.metrics.inc(Counter::GuestConnections),
                _ => {}
            }
            return Some((hdr, n));
        }
        None
    }

    /// The packet `hdr` could not be written into the guest's RX buffer: the connection
    /// lost data, reset it.
    pub fn delivery_failed(&mut self, hdr: &Header, error: vm_memory::GuestMemoryError) {
        let key = ConnKey {
            local_port: hdr.src_port,
            peer_port: hdr.dst_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.kill(ConnError::Undeliverable(error));
            self.after_conn(key);
        }
    }

    /// The listening socket is readable: accept host clients.
    pub fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.log
                        .warn(format_args!("vsock: cannot accept a host connection: {e}"));
                    return;
                }
            };
            if self.in_use() >= self.limits.max_connections {
                self.metrics.inc(Counter::RefusedConnections);
                self.log.warn(format_args!(
                    "vsock: host connection refused: {} connections open",
                    self.in_use()
                ));
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                self.log.warn(format_args!(
                    "vsock: cannot make a host connection non-blocking: {e}"
                ));
                continue;
            }
            let fd = stream.as_raw_fd();
            let deadline = now + self.limits.handshake_timeout;
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::new(),
                    deadline,
                },
            );
            self.endpoints.insert(fd, Endpoint::Handshake);
            self.timers
                .push(Reverse((deadline, TimerKey::Handshake(fd))));
            self.dirty.push(fd);
            self.update_active();
        }
    }

    /// epoll reported `events` on host socket `fd`.
    pub fn on_socket_event(&mut self, fd: RawFd, events: EventSet, now: Instant) {
        let error = events.contains(EventSet::ERROR);
        match self.endpoints.get(&fd).copied() {
            Some(Endpoint::Handshake) => self.read_handshake(fd, now),
            Some(Endpoint::Conn(key)) => {
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.on_event(IoEvent {
                        readable: events.contains(EventSet::IN) || error,
                        writable: events.contains(EventSet::OUT) || error,
                        hup: events.contains(EventSet::HANG_UP),
                    });
                }
                self.after_conn(key);
            }
            None => {}
        }
    }

    fn fail_handshake(&mut self, fd: RawFd, why: &str) {
        if let Some(hs) = self.handshakes.remove(&fd) {
            self.endpoints.remove(&fd);
            self.graveyard.push(hs.stream);
            self.metrics.inc(Counter::RefusedConnections);
            self.log
                .warn(format_args!("vsock: host connection refused: {why}"));
            self.update_active();
        }
    }

    /// Reads the `CONNECT <port>\n` line one byte at a time (what follows it is data for
    /// the guest and stays in the socket).
    fn read_handshake(&mut self, fd: RawFd, _now: Instant) {
        let line = {
            let Some(hs) = self.handshakes.get_mut(&fd) else {
                return;
            };
            loop {
                if hs.line.len() >= MAX_CONNECT_LINE {
                    break Err("the CONNECT line is too long");
                }
                let mut byte = [0u8; 1];
                match hs.stream.read(&mut byte) {
                    Ok(0) => break Err("the client closed before CONNECT"),
                    Ok(_) if byte == [b'\n'] => break Ok(std::mem::take(&mut hs.line)),
                    Ok(_) => hs.line.extend_from_slice(&byte),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break Err("cannot read the CONNECT line"),
                }
            }
        };
        let port = match line {
            Ok(line) => match parse_connect(&line) {
                Some(port) => port,
                None => return self.fail_handshake(fd, "malformed CONNECT line"),
            },
            Err(why) => return self.fail_handshake(fd, why),
        };
        let Some(local_port) = self.alloc_local_port(port) else {
            return self.fail_handshake(fd, "no free local port");
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let conn = Connection::new_local(hs.stream, local_port, port, self.conn_config());
        self.local_ports.insert(local_port);
        self.conns.insert(key, conn);
        self.endpoints.insert(fd, Endpoint::Conn(key));
        self.after_conn(key);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=self.limits.max_connections {
            let next = self.last_local_port.wrapping_add(1);
            self.last_local_port = if (LOCAL_PORT_MIN..LOCAL_PORT_END).contains(&next) {
                next
            } else {
                LOCAL_PORT_MIN
            };
            let port = self.last_local_port;
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.local_ports.contains(&port) && !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    /// Handles every deadline up to `now`.
    pub fn sweep(&mut self, now: Instant) {
        while let Some(Reverse((at, key))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            match key {
                TimerKey::Conn(key) => {
                    if let Some(conn) = self.conns.get_mut(&key) {
                        conn.on_timeout(now);
                        self.after_conn(key);
                    }
                }
                TimerKey::Handshake(fd) => {
                    let expired = self
                        .handshakes
                        .get(&fd)
                        .is_some_and(|hs| hs.deadline <= now);
                    if expired {
                        self.fail_handshake(fd, "no CONNECT line in time");
                    }
                }
            }
        }
    }

    /// Applies polling changes through `ops`: closes the graveyard (after deregistering),
    /// then adds, modifies or removes each changed socket. `token` is the subscriber's
    /// event data for host sockets.
    pub fn reconcile(&mut self, ops: &mut EventOps, token: u32) {
        for stream in std::mem::take(&mut self.graveyard) {
            let fd = stream.as_raw_fd();
            if self.registered.remove(&fd).is_some() {
                if let Err(e) = ops.remove(Events::empty(&stream)) {
                    self.log
                        .warn(format_args!("vsock: cannot stop polling socket {fd}: {e}"));
                }
            }
            discard_unread(&stream);
            drop(stream);
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for fd in dirty {
            let wanted = match self.endpoints.get(&fd) {
                Some(Endpoint::Handshake) => EventSet::IN,
                Some(Endpoint::Conn(key)) => match self.conns.get(key) {
                    Some(conn) => event_set(conn.interest()),
                    None => continue,
                },
                None => continue,
            };
            let current = self.registered.get(&fd).copied();
            let result = match current {
                None if wanted.is_empty() => Ok(()),
                None => ops.add(Events::with_data_raw(fd, token, wanted)).map(|()| {
                    self.registered.insert(fd, wanted);
                }),
                Some(_) if wanted.is_empty() => {
                    self.registered.remove(&fd);
                    ops.remove(Events::empty_raw(fd))
                }
                Some(set) if set == wanted => Ok(()),
                Some(_) => ops
                    .modify(Events::with_data_raw(fd, token, wanted))
                    .map(|()| {
                        self.registered.insert(fd, wanted);
                    }),
            };
            if let Err(e) = result {
                self.log
                    .warn(format_args!("vsock: cannot poll socket {fd}: {e}"));
            }
        }
    }
}

/// `CONNECT <port>` (keyword in any case, optional `\r`) → the port.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_ascii_whitespace();
    let keyword = words.next()?;
    let port = words.next()?;
    if !keyword.eq_ignore_ascii_case("connect") || words.next().is_some() {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"connect 1024\r"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT 52 53"), None);
        assert_eq!(parse_connect(b"OPEN 52"), None);
        assert_eq!(parse_connect(b"CONNECT \xff"), None);
        assert_eq!(parse_connect(b""), None);
    }

    #[test]
    fn local_ports_round_robin_and_skip_used() {
        let dir = std::env::temp_dir().join(format!("kestrel-vsock-mux-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let limits = VsockLimits {
            max_connections: 4,
            ..VsockLimits::default()
        };
        let mut m = Muxer::new(3, &dir, limits, Arc::default()).unwrap();
        assert_eq!(m.alloc_local_port(52), Some(LOCAL_PORT_MIN));
        m.local_ports.insert(LOCAL_PORT_MIN + 1);
        assert_eq!(m.alloc_local_port(52), Some(LOCAL_PORT_MIN + 2));
        m.last_local_port = LOCAL_PORT_END - 1;
        assert_eq!(m.alloc_local_port(52), Some(LOCAL_PORT_MIN));
        // Every candidate taken: none.
        m.local_ports.extend(LOCAL_PORT_MIN..LOCAL_PORT_MIN + 10);
        m.last_local_port = LOCAL_PORT_MIN - 1;
        assert_eq!(m.alloc_local_port(52), None);
        drop(m);
        assert!(!dir.exists(), "the socket file is removed on drop");
    }
}
