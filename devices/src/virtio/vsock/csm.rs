//! One vsock connection: a guest AF_VSOCK stream bridged to a host Unix stream. Runs on the
//! **VMM thread** only (called by the [`muxer`](super::muxer)); it owns the host socket but
//! never touches the event loop: the muxer asks it what it wants polled ([`Connection::interest`])
//! and when it has something for the guest ([`Connection::has_pending_rx`]).
//!
//! # Flow control (credit), both ways
//!
//! Every packet carries the sender's `buf_alloc` (receive buffer size) and `fwd_cnt` (bytes it
//! has consumed from that buffer so far, wrapping u32). A sender may have at most
//! `buf_alloc - (sent - fwd_cnt)` bytes in flight.
//!
//! - **Guest → host**: our `buf_alloc` is the per-connection buffer limit; `fwd_cnt` counts
//!   bytes actually written to the host socket. Data the host socket does not take yet waits
//!   in `tx_buf`, so a slow host reader withholds credit from the guest. A guest that sends
//!   beyond its credit is reset. We send OP_CREDIT_UPDATE when the guest's view of our free
//!   space has fallen below half and we have news worth sending.
//! - **Host → guest**: we read from the host socket at most the guest's credit, and stop
//!   polling the host socket while the credit is zero (after one OP_CREDIT_REQUEST).
//!
//! # Shutdown and reset
//!
//! Host EOF becomes OP_SHUTDOWN(SEND) (plus RCV when the host closed its socket entirely:
//! HUP); guest OP_SHUTDOWN(SEND) becomes `shutdown(Write)` once `tx_buf` is written. When the
//! guest has shut down both directions, or both sides have stopped sending, the connection
//! flushes, shuts the host socket down and sends OP_RST; it is then [`State::Closed`] and the
//! muxer drops it. Errors (host I/O, protocol violations, credit overruns, timeouts) reset
//! the connection at once: the host socket is shut down, the guest gets OP_RST.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::packet::{Header, Op};
use super::uapi;

/// Why a connection was reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("the guest sent {len} bytes with only {free} bytes of credit left")]
    CreditExceeded { len: u32, free: u32 },
    #[error("the guest sent data after shutting down its sending side")]
    DataAfterShutdown,
    #[error("unexpected {op:?} packet in state {state:?}")]
    Protocol { op: Op, state: State },
    #[error("cannot write to the host socket")]
    HostWrite(#[source] io::Error),
    #[error("cannot read from the host socket")]
    HostRead(#[source] io::Error),
    #[error("the guest did not answer in time")]
    Timeout,
    #[error("a packet could not be written into the guest's RX buffer")]
    Undeliverable(#[source] vm_memory::GuestMemoryError),
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: OP_REQUEST queued or sent, waiting for OP_RESPONSE.
    LocalInit,
    /// Guest-initiated: the host socket is connected, OP_RESPONSE queued.
    PeerInit,
    Established,
    /// Reset or finished: only an OP_RST for the guest is left.
    Closing,
    /// Nothing left to do; the muxer drops it.
    Closed,
}

/// What the connection wants polled on its host socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
}

/// What epoll reported for the host socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoEvent {
    pub readable: bool,
    pub writable: bool,
    /// The host closed its socket entirely (both directions).
    pub hup: bool,
}

/// Per-connection settings (from [`VsockLimits`](super::VsockLimits)).
#[derive(Clone, Copy, Debug)]
pub struct ConnConfig {
    pub buf_alloc: u32,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
}

// Pending packets for the guest, in the order `recv_pkt` emits them.
const P_RST: u8 = 1;
const P_RESPONSE: u8 = 1 << 1;
const P_REQUEST: u8 = 1 << 2;
const P_RW: u8 = 1 << 3;
const P_CREDIT_UPDATE: u8 = 1 << 4;

/// A vsock connection.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    state: State,
    local_port: u32,
    peer_port: u32,
    cfg: ConnConfig,
    host_initiated: bool,
    was_established: bool,
    /// Guest data bytes written to the host socket since the last `take_forwarded`.
    forwarded: u64,

    // Guest → host.
    /// Bytes waiting to be written to the host socket.
    tx_buf: VecDeque<u8>,
    /// How many bytes at the front of `tx_buf` are ours (the `OK` line), not guest data.
    tx_prefix: usize,
    /// Guest data bytes accepted (written or buffered).
    recv_cnt: Wrapping<u32>,
    /// Guest data bytes written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,

    // Host → guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Data bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// An OP_CREDIT_REQUEST went out and no credit came back yet.
    credit_requested: bool,

    // Shutdown.
    peer_shut_send: bool,
    peer_shut_rcv: bool,
    /// Host EOF seen (OP_SHUTDOWN(SEND) sent to the guest).
    local_eof: bool,
    /// The host closed its socket entirely.
    host_hup: bool,
    /// We did `shutdown(Write)` on the host socket.
    write_shut: bool,

    pending: u8,
    deadline: Option<Instant>,
    new_deadline: bool,
    error: Option<ConnError>,
}

impl Connection {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, cfg: ConnConfig) -> Self {
        Connection {
            stream,
            state: State::LocalInit,
            local_port,
            peer_port,
            cfg,
            host_initiated: false,
            was_established: false,
            forwarded: 0,
            tx_buf: VecDeque::new(),
            tx_prefix: 0,
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            credit_requested: false,
            peer_shut_send: false,
            peer_shut_rcv: false,
            local_eof: false,
            host_hup: false,
            write_shut: false,
            pending: 0,
            deadline: None,
            new_deadline: false,
            error: None,
        }
    }

    /// A host-initiated connection (the host client sent `CONNECT <peer_port>`): an
    /// OP_REQUEST for the guest is pending.
    pub fn new_local(stream: UnixStream, local_port: u32, peer_port: u32, cfg: ConnConfig) -> Self {
        let mut c = Connection::new(stream, local_port, peer_port, cfg);
        c.host_initiated = true;
        c.pending = P_REQUEST;
        c
    }

    /// A guest-initiated connection whose host socket is connected: an OP_RESPONSE is
    /// pending. `request` is the guest's OP_REQUEST (it carries the guest's credit).
    pub fn new_peer(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        cfg: ConnConfig,
        request: &Header,
    ) -> Self {
        let mut c = Connection::new(stream, local_port, peer_port, cfg);
        c.state = State::PeerInit;
        c.peer_buf_alloc = request.buf_alloc;
        c.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        c.pending = P_RESPONSE;
        c
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Whether the connection ever got established (for metrics: closed vs refused).
    pub fn was_established(&self) -> bool {
        self.was_established
    }

    /// Whether the host opened it (its local port was allocated by the muxer).
    pub fn host_initiated(&self) -> bool {
        self.host_initiated
    }

    /// Guest data bytes written to the host socket since the last call (for metrics).
    pub fn take_forwarded(&mut self) -> u64 {
        std::mem::take(&mut self.forwarded)
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    /// The error that reset the connection, once.
    pub fn take_error(&mut self) -> Option<ConnError> {
        self.error.take()
    }

    /// A deadline set since the last call (the muxer arms its timer with it).
    pub fn take_new_deadline(&mut self) -> Option<Instant> {
        if std::mem::take(&mut self.new_deadline) {
            self.deadline
        } else {
            None
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether [`Self::recv_pkt`] may have a packet for the guest.
    pub fn has_pending_rx(&self) -> bool {
        self.pending != 0
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest data bytes buffered toward the host socket.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len().saturating_sub(self.tx_prefix)
    }

    fn live(&self) -> bool {
        matches!(
            self.state,
            State::LocalInit | State::PeerInit | State::Established
        )
    }

    fn can_read_host(&self) -> bool {
        self.state == State::Established && !self.local_eof && !self.peer_shut_rcv
    }

    pub fn interest(&self) -> Interest {
        Interest {
            read: self.can_read_host() && self.pending & P_RW == 0 && self.peer_credit() > 0,
            write: self.live() && !self.tx_buf.is_empty(),
        }
    }

    fn set_deadline(&mut self, at: Instant) {
        self.deadline = Some(at);
        self.new_deadline = true;
    }

    /// Resets the connection: the host socket is shut down now, the guest gets OP_RST.
    pub fn kill(&mut self, reason: ConnError) {
        if !self.live() {
            return;
        }
        self.error = Some(reason);
        self.close_with_rst();
    }

    fn close_with_rst(&mut self) {
        self.tx_buf.clear();
        self.tx_prefix = 0;
        // The host client sees EOF at once, whenever the guest takes the OP_RST.
        let _ = self.stream.shutdown(Shutdown::Both);
        self.write_shut = true;
        self.state = State::Closing;
        self.pending = P_RST;
        self.deadline = None;
    }

    /// Both sides are done and everything is written: shut down and reset.
    fn finish(&mut self) {
        self.shut_write();
        self.close_with_rst();
    }

    fn shut_write(&mut self) {
        if !self.write_shut {
            self.write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    fn maybe_finish(&mut self) {
        if self.state != State::Established || !self.tx_buf.is_empty() {
            return;
        }
        let guest_closed = self.peer_shut_send && self.peer_shut_rcv;
        let both_sent_all = self.peer_shut_send && self.local_eof;
        if guest_closed || both_sent_all {
            self.finish();
        }
    }

    /// Whether the guest's idea of our free buffer space is stale enough for an update.
    fn peer_needs_credit_update(&self) -> bool {
        let seen_in_flight = (self.recv_cnt - self.last_fwd_cnt_sent).0;
        let seen_free = self.cfg.buf_alloc.saturating_sub(seen_in_flight);
        let news = (self.fwd_cnt - self.last_fwd_cnt_sent).0;
        seen_free < self.cfg.buf_alloc / 2
            && news > 0
            && (news >= self.cfg.buf_alloc / 4 || self.buffered() == 0)
    }

    /// A packet from the guest for this connection.
    pub fn on_packet(&mut self, op: Op, hdr: &Header, data: &[u8], now: Instant) {
        if !self.live() {
            return;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        match (self.state, op) {
            (_, Op::Rst) => {
                // The guest dropped the connection: nothing more to tell it.
                self.tx_buf.clear();
                self.pending = 0;
                self.deadline = None;
                self.state = State::Closed;
            }
            (State::LocalInit, Op::Response) => {
                self.state = State::Established;
                self.was_established = true;
                self.deadline = None;
                let ok = format!("OK {}\n", self.local_port);
                self.tx_prefix = ok.len();
                self.tx_buf.extend(ok.as_bytes());
                self.flush();
            }
            (State::Established, Op::Rw) => self.guest_data(data),
            (State::Established, Op::Shutdown) => self.guest_shutdown(hdr.flags, now),
            (State::Established | State::PeerInit, Op::CreditUpdate) => {}
            (State::Established | State::PeerInit, Op::CreditRequest) => {
                self.pending |= P_CREDIT_UPDATE;
            }
            (state, op) => self.kill(ConnError::Protocol { op, state }),
        }
    }

    fn guest_data(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.peer_shut_send {
            self.kill(ConnError::DataAfterShutdown);
            return;
        }
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let in_flight = (self.recv_cnt - self.fwd_cnt).0;
        let free = self.cfg.buf_alloc.saturating_sub(in_flight);
        if len > free {
            self.kill(ConnError::CreditExceeded { len, free });
            return;
        }
        self.recv_cnt += len;
        let mut written = 0;
        if self.tx_buf.is_empty() {
            match self.stream.write(data) {
                Ok(n) => written = n.min(data.len()),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.kill(ConnError::HostWrite(e));
                    return;
                }
            }
            self.fwd_cnt += u32::try_from(written).unwrap_or(u32::MAX);
            self.forwarded = self.forwarded.saturating_add(written as u64);
        }
        self.tx_buf
            .extend(data.get(written..).unwrap_or_default().iter().copied());
        if self.peer_needs_credit_update() {
            self.pending |= P_CREDIT_UPDATE;
        }
    }

    fn guest_shutdown(&mut self, flags: u32, now: Instant) {
        self.peer_shut_rcv |= flags & uapi::SHUTDOWN_RCV != 0;
        self.peer_shut_send |= flags & uapi::SHUTDOWN_SEND != 0;
        if self.peer_shut_send && self.tx_buf.is_empty() {
            self.shut_write();
        }
        if self.peer_shut_send && self.peer_shut_rcv && self.deadline.is_none() {
            // Time to flush what is left for the host.
            self.set_deadline(now + self.cfg.shutdown_timeout);
        }
        if self.peer_shut_rcv {
            // Nothing read from the host can be delivered any more.
            self.pending &= !P_RW;
        }
        self.maybe_finish();
    }

    /// Writes as much of `tx_buf` as the host socket takes.
    fn flush(&mut self) {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => {
                    self.kill(ConnError::HostWrite(io::ErrorKind::WriteZero.into()));
                    return;
                }
                Ok(n) => {
                    let n = n.min(front.len());
                    self.tx_buf.drain(..n);
                    let ours = n.min(self.tx_prefix);
                    self.tx_prefix = self.tx_prefix.saturating_sub(ours);
                    let data = u32::try_from(n.saturating_sub(ours)).unwrap_or(u32::MAX);
                    self.fwd_cnt += data;
                    self.forwarded = self.forwarded.saturating_add(u64::from(data));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.kill(ConnError::HostWrite(e));
                    return;
                }
            }
        }
        if self.tx_buf.is_empty() && self.peer_shut_send {
            self.shut_write();
        }
        self.maybe_finish();
        if self.live() && self.peer_needs_credit_update() {
            self.pending |= P_CREDIT_UPDATE;
        }
    }

    /// epoll reported `ev` on the host socket.
    pub fn on_event(&mut self, ev: IoEvent) {
        if !self.live() {
            return;
        }
        if ev.hup {
            self.host_hup = true;
        }
        if ev.writable && !self.tx_buf.is_empty() {
            self.flush();
        }
        if (ev.readable || ev.hup) && self.can_read_host() {
            self.pending |= P_RW;
        }
    }

    /// Resets the connection if its deadline has passed. Returns whether it did.
    pub fn on_timeout(&mut self, now: Instant) -> bool {
        match self.deadline {
            Some(d) if d <= now && self.live() => {
                self.kill(ConnError::Timeout);
                true
            }
            _ => false,
        }
    }

    fn header(&self, op: u16) -> Header {
        Header {
            src_cid: 0,
            dst_cid: 0,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: uapi::TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: self.cfg.buf_alloc,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, its data read into `buf` (whose length is the room in
    /// the guest's RX buffer). Returns the header (CIDs left 0 for the muxer) and the data
    /// length, or `None` when there is nothing to send.
    pub fn recv_pkt(&mut self, buf: &mut [u8], now: Instant) -> Option<(Header, usize)> {
        let (hdr, n) = self.next_pkt(buf, now)?;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        if self.pending & P_CREDIT_UPDATE != 0 && !self.peer_needs_credit_update() {
            // This packet carried our fwd_cnt already.
            self.pending &= !P_CREDIT_UPDATE;
        }
        Some((hdr, n))
    }

    fn next_pkt(&mut self, buf: &mut [u8], now: Instant) -> Option<(Header, usize)> {
        if self.pending & P_RST != 0 {
            self.pending = 0;
            self.state = State::Closed;
            return Some((self.header(uapi::OP_RST), 0));
        }
        if self.pending & P_RESPONSE != 0 {
            self.pending &= !P_RESPONSE;
            self.state = State::Established;
            self.was_established = true;
            return Some((self.header(uapi::OP_RESPONSE), 0));
        }
        if self.pending & P_REQUEST != 0 {
            self.pending &= !P_REQUEST;
            self.set_deadline(now + self.cfg.request_timeout);
            return Some((self.header(uapi::OP_REQUEST), 0));
        }
        if self.pending & P_RW != 0 {
            if let Some(pkt) = self.read_host(buf, now) {
                return Some(pkt);
            }
        }
        if self.pending & P_CREDIT_UPDATE != 0 {
            self.pending &= !P_CREDIT_UPDATE;
            return Some((self.header(uapi::OP_CREDIT_UPDATE), 0));
        }
        None
    }

    /// The RW part of `next_pkt`: data, host EOF as OP_SHUTDOWN, or a credit request.
    fn read_host(&mut self, buf: &mut [u8], now: Instant) -> Option<(Header, usize)> {
        if !self.can_read_host() {
            self.pending &= !P_RW;
            return None;
        }
        let credit = self.peer_credit();
        if credit == 0 {
            self.pending &= !P_RW;
            if self.credit_requested {
                return None;
            }
            self.credit_requested = true;
            return Some((self.header(uapi::OP_CREDIT_REQUEST), 0));
        }
        let max = buf.len().min(usize::try_from(credit).unwrap_or(usize::MAX));
        let dst = buf.get_mut(..max)?;
        if dst.is_empty() {
            // No room in this RX buffer: keep RW pending for the next one.
            return None;
        }
        match self.stream.read(dst) {
            Ok(0) => {
                self.pending &= !P_RW;
                self.local_eof = true;
                let mut hdr = self.header(uapi::OP_SHUTDOWN);
                hdr.flags = uapi::SHUTDOWN_SEND;
                if self.host_hup {
                    // The host is gone both ways; the guest should reset soon.
                    hdr.flags |= uapi::SHUTDOWN_RCV;
                    self.set_deadline(now + self.cfg.shutdown_timeout);
                }
                // Queues the final OP_RST after this packet if the guest is done too.
                self.maybe_finish();
                Some((hdr, 0))
            }
            Ok(n) => {
                let n = n.min(max);
                self.rx_cnt += u32::try_from(n).unwrap_or(u32::MAX);
                let mut hdr = self.header(uapi::OP_RW);
                hdr.len = u32::try_from(n).unwrap_or(u32::MAX);
                Some((hdr, n))
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                // Drained; epoll tells us when there is more.
                self.pending &= !P_RW;
                None
            }
            Err(e) => {
                self.kill(ConnError::HostRead(e));
                self.pending = 0;
                self.state = State::Closed;
                Some((self.header(uapi::OP_RST), 0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use super::*;

    const BUF: u32 = 1024;
    const LOCAL: u32 = 1 << 30;
    const PEER: u32 = 5000;

    fn cfg() -> ConnConfig {
        ConnConfig {
            buf_alloc: BUF,
            request_timeout: Duration::from_millis(100),
            shutdown_timeout: Duration::from_millis(100),
        }
    }

    fn guest_hdr(op: u16, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: PEER,
            dst_port: LOCAL,
            len: 0,
            type_: uapi::TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// An established guest-initiated connection; the guest offers `peer_buf` of credit.
    fn established(peer_buf: u32) -> (Connection, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let req = guest_hdr(uapi::OP_REQUEST, peer_buf, 0);
        let mut c = Connection::new_peer(ours, LOCAL, PEER, cfg(), &req);
        let mut buf = [0u8; 64];
        let (h, n) = c.recv_pkt(&mut buf, Instant::now()).unwrap();
        assert_eq!((h.op, n), (uapi::OP_RESPONSE, 0));
        assert_eq!((h.src_port, h.dst_port, h.buf_alloc), (LOCAL, PEER, BUF));
        assert_eq!(c.state(), State::Established);
        assert!(!c.has_pending_rx());
        (c, host)
    }

    fn rw(c: &mut Connection, data: &[u8], fwd_cnt: u32) {
        let mut h = guest_hdr(uapi::OP_RW, 4096, fwd_cnt);
        h.len = data.len() as u32;
        c.on_packet(Op::Rw, &h, data, Instant::now());
    }

    fn recv(c: &mut Connection, room: usize) -> Option<(Header, Vec<u8>)> {
        let mut buf = vec![0u8; room];
        c.recv_pkt(&mut buf, Instant::now())
            .map(|(h, n)| (h, buf[..n].to_vec()))
    }

    fn read_all(s: &mut UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return out,
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn is_eof(s: &mut UnixStream) -> bool {
        matches!(s.read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn guest_to_host_credit_accounting() {
        let (mut c, mut host) = established(4096);
        // Fill the host socket so further data stays in tx_buf.
        let filler = vec![0u8; 1 << 20];
        let mut stuffed = 0;
        while let Ok(n) = (&c.stream).write(&filler) {
            stuffed += n;
        }
        assert!(stuffed > 0);

        rw(&mut c, &[1u8; 600], 0);
        assert_eq!(c.buffered(), 600);
        assert!(c.interest().write);
        rw(&mut c, &[2u8; 424], 0);
        assert_eq!(c.buffered(), BUF as usize);
        assert_eq!(c.state(), State::Established);
        // One byte past the credit: reset.
        rw(&mut c, &[3u8], 0);
        assert!(matches!(
            c.take_error(),
            Some(ConnError::CreditExceeded { len: 1, free: 0 })
        ));
        let (h, _) = recv(&mut c, 64).unwrap();
        assert_eq!(h.op, uapi::OP_RST);
        assert!(c.is_closed());
        drop(c);
        // The host sees what was written before, then EOF.
        let mut got = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match host.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, stuffed);
    }

    #[test]
    fn credit_update_when_the_host_drains() {
        let (mut c, mut host) = established(4096);
        let filler = vec![0u8; 1 << 20];
        let mut stuffed = 0;
        while let Ok(n) = (&c.stream).write(&filler) {
            stuffed += n;
        }
        rw(&mut c, &[7u8; BUF as usize], 0);
        assert!(!c.has_pending_rx(), "nothing forwarded yet, no update");
        // The host reads everything; the socket is writable again.
        let mut drained = 0;
        while drained < stuffed + BUF as usize {
            drained += read_all(&mut host).len();
            c.on_event(IoEvent {
                writable: true,
                ..Default::default()
            });
        }
        assert_eq!(c.buffered(), 0);
        assert!(!c.interest().write);
        let (h, data) = recv(&mut c, 64).unwrap();
        assert_eq!(h.op, uapi::OP_CREDIT_UPDATE);
        assert!(data.is_empty());
        assert_eq!((h.buf_alloc, h.fwd_cnt), (BUF, BUF));
        assert!(recv(&mut c, 64).is_none());

        // Small writes that go straight through need no update until half is used.
        rw(&mut c, &[1u8; 100], 0);
        assert!(!c.has_pending_rx());
        assert_eq!(read_all(&mut host).len(), 100);
        // A credit request is answered.
        c.on_packet(
            Op::CreditRequest,
            &guest_hdr(uapi::OP_CREDIT_REQUEST, 4096, 0),
            &[],
            Instant::now(),
        );
        let (h, _) = recv(&mut c, 64).unwrap();
        assert_eq!((h.op, h.fwd_cnt), (uapi::OP_CREDIT_UPDATE, BUF + 100));
    }

    #[test]
    fn host_to_guest_respects_guest_credit() {
        let (mut c, mut host) = established(100);
        host.write_all(&[9u8; 1000]).unwrap();
        c.on_event(IoEvent {
            readable: true,
            ..Default::default()
        });
        assert!(!c.interest().read, "no polling while RW is pending");
        let (h, data) = recv(&mut c, 4096).unwrap();
        assert_eq!((h.op, data.len()), (uapi::OP_RW, 100));
        assert_eq!(h.len, 100);
        assert_eq!(c.peer_credit(), 0);
        // Out of credit: one credit request, then silence, and the socket is not polled.
        let (h, _) = recv(&mut c, 4096).unwrap();
        assert_eq!(h.op, uapi::OP_CREDIT_REQUEST);
        assert!(recv(&mut c, 4096).is_none());
        assert!(!c.interest().read);
        // The guest consumed 60 bytes.
        c.on_packet(
            Op::CreditUpdate,
            &guest_hdr(uapi::OP_CREDIT_UPDATE, 100, 60),
            &[],
            Instant::now(),
        );
        assert_eq!(c.peer_credit(), 60);
        assert!(c.interest().read);
        c.on_event(IoEvent {
            readable: true,
            ..Default::default()
        });
        let (_, data) = recv(&mut c, 4096).unwrap();
        assert_eq!(data.len(), 60);
        // The RX buffer's room limits too.
        c.on_packet(
            Op::CreditUpdate,
            &guest_hdr(uapi::OP_CREDIT_UPDATE, 1000, 160),
            &[],
            Instant::now(),
        );
        c.on_event(IoEvent {
            readable: true,
            ..Default::default()
        });
        let (_, data) = recv(&mut c, 16).unwrap();
        assert_eq!(data.len(), 16);
        // A guest that shrinks its buffer below what is in flight gets nothing more.
        c.on_packet(
            Op::CreditUpdate,
            &guest_hdr(uapi::OP_CREDIT_UPDATE, 10, 160),
            &[],
            Instant::now(),
        );
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn guest_shuts_down_both_ways() {
        let (mut c, mut host) = established(4096);
        rw(&mut c, b"bye", 0);
        let mut h = guest_hdr(uapi::OP_SHUTDOWN, 4096, 0);
        h.flags = uapi::SHUTDOWN_RCV | uapi::SHUTDOWN_SEND;
        c.on_packet(Op::Shutdown, &h, &[], Instant::now());
        let (h, _) = recv(&mut c, 64).unwrap();
        assert_eq!(h.op, uapi::OP_RST);
        assert!(c.is_closed());
        assert!(c.take_error().is_none(), "a clean close is no error");
        assert_eq!(read_all(&mut host), b"bye");
        assert!(is_eof(&mut host));
    }

    #[test]
    fn guest_half_close_then_host_answers_and_closes() {
        let (mut c, mut host) = established(4096);
        rw(&mut c, b"request", 0);
        let mut h = guest_hdr(uapi::OP_SHUTDOWN, 4096, 0);
        h.flags = uapi::SHUTDOWN_SEND;
        c.on_packet(Op::Shutdown, &h, &[], Instant::now());
        assert_eq!(c.state(), State::Established);
        // The host reads the request, then EOF.
        assert_eq!(read_all(&mut host), b"request");
        assert!(is_eof(&mut host));
        // It answers and closes its side.
        host.write_all(b"response").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        c.on_event(IoEvent {
            readable: true,
            ..Default::default()
        });
        let (h, data) = recv(&mut c, 4096).unwrap();
        assert_eq!((h.op, &data[..]), (uapi::OP_RW, &b"response"[..]));
        let (h, _) = recv(&mut c, 4096).unwrap();
        assert_eq!((h.op, h.flags), (uapi::OP_SHUTDOWN, uapi::SHUTDOWN_SEND));
        assert!(c.deadline().is_none(), "a half close has no deadline");
        let (h, _) = recv(&mut c, 4096).unwrap();
        assert_eq!(h.op, uapi::OP_RST);
        assert!(c.is_closed());
    }

    #[test]
    fn host_closes_and_the_guest_must_reset_in_time() {
        let (mut c, host) = established(4096);
        drop(host);
        c.on_event(IoEvent {
            readable: true,
            hup: true,
            ..Default::default()
        });
        let now = Instant::now();
        let (h, _) = recv(&mut c, 4096).unwrap();
        assert_eq!(h.op, uapi::OP_SHUTDOWN);
        assert_eq!(h.flags, uapi::SHUTDOWN_RCV | uapi::SHUTDOWN_SEND);
        let deadline = c.take_new_deadline().unwrap();
        assert!(deadline >= now + Duration::from_millis(100));
        assert!(!c.interest().read);
        assert!(!c.on_timeout(now));
        assert!(c.on_timeout(deadline));
        assert!(matches!(c.take_error(), Some(ConnError::Timeout)));
        let (h, _) = recv(&mut c, 4096).unwrap();
        assert_eq!(h.op, uapi::OP_RST);

        // The same, but the guest resets first.
        let (mut c, host) = established(4096);
        drop(host);
        c.on_event(IoEvent {
            readable: true,
            hup: true,
            ..Default::default()
        });
        recv(&mut c, 4096).unwrap();
        c.on_packet(Op::Rst, &guest_hdr(uapi::OP_RST, 0, 0), &[], Instant::now());
        assert!(c.is_closed());
        assert!(!c.has_pending_rx());
    }

    #[test]
    fn writes_to_a_closed_host_reset() {
        let (mut c, host) = established(4096);
        drop(host);
        rw(&mut c, b"lost", 0);
        assert!(matches!(c.take_error(), Some(ConnError::HostWrite(_))));
        let (h, _) = recv(&mut c, 64).unwrap();
        assert_eq!(h.op, uapi::OP_RST);
    }

    #[test]
    fn host_initiated_handshake_and_timeout() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let mut c = Connection::new_local(ours, LOCAL, 52, cfg());
        assert_eq!(c.state(), State::LocalInit);
        assert_eq!(c.interest(), Interest::default());
        let now = Instant::now();
        let (h, _) = recv(&mut c, 64).unwrap();
        assert_eq!(
            (h.op, h.src_port, h.dst_port),
            (uapi::OP_REQUEST, LOCAL, 52)
        );
        assert!(c.take_new_deadline().is_some());
        // Data before the response is a protocol error... tested below; here: response.
        let mut resp = guest_hdr(uapi::OP_RESPONSE, 2048, 0);
        resp.src_port = 52;
        c.on_packet(Op::Response, &resp, &[], now);
        assert_eq!(c.state(), State::Established);
        assert!(c.was_established());
        assert!(c.deadline().is_none());
        assert_eq!(read_all(&mut host), format!("OK {LOCAL}\n").as_bytes());
        assert_eq!(c.peer_credit(), 2048);
        // The OK line is not guest data: fwd_cnt stays 0.
        rw(&mut c, b"x", 0);
        let mut buf = [0u8; 64];
        c.on_packet(
            Op::CreditRequest,
            &guest_hdr(uapi::OP_CREDIT_REQUEST, 2048, 0),
            &[],
            now,
        );
        let (h, _) = c.recv_pkt(&mut buf, now).unwrap();
        assert_eq!(h.fwd_cnt, 1);

        // No answer in time: reset, the host client sees EOF without OK.
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let mut c = Connection::new_local(ours, LOCAL, 52, cfg());
        recv(&mut c, 64).unwrap();
        let d = c.take_new_deadline().unwrap();
        assert!(c.on_timeout(d));
        assert!(!c.was_established());
        assert_eq!(recv(&mut c, 64).unwrap().0.op, uapi::OP_RST);
        assert!(is_eof(&mut host));

        // The guest refuses (RST): closed, nothing sent back, the host client sees EOF.
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut c = Connection::new_local(ours, LOCAL, 52, cfg());
        recv(&mut c, 64).unwrap();
        c.on_packet(Op::Rst, &guest_hdr(uapi::OP_RST, 0, 0), &[], now);
        assert!(c.is_closed());
        assert!(!c.has_pending_rx());
        drop(c);
        assert!(is_eof(&mut host));
    }

    #[test]
    fn protocol_violations_reset() {
        // RW before the response was sent.
        let (ours, _host) = UnixStream::pair().unwrap();
        let req = guest_hdr(uapi::OP_REQUEST, 4096, 0);
        let mut c = Connection::new_peer(ours, LOCAL, PEER, cfg(), &req);
        rw(&mut c, b"early", 0);
        assert!(matches!(
            c.take_error(),
            Some(ConnError::Protocol {
                op: Op::Rw,
                state: State::PeerInit
            })
        ));
        assert_eq!(recv(&mut c, 64).unwrap().0.op, uapi::OP_RST);

        // A second request on an established connection.
        let (mut c, _host) = established(4096);
        c.on_packet(Op::Request, &req, &[], Instant::now());
        assert!(matches!(c.take_error(), Some(ConnError::Protocol { .. })));

        // Data after SHUTDOWN(SEND).
        let (mut c, _host) = established(4096);
        let mut h = guest_hdr(uapi::OP_SHUTDOWN, 4096, 0);
        h.flags = uapi::SHUTDOWN_SEND;
        c.on_packet(Op::Shutdown, &h, &[], Instant::now());
        rw(&mut c, b"late", 0);
        assert!(matches!(c.take_error(), Some(ConnError::DataAfterShutdown)));

        // Packets after the reset are ignored.
        c.on_packet(Op::Rw, &h, b"x", Instant::now());
        assert!(c.take_error().is_none());
    }

    #[test]
    fn shutdown_waits_for_the_buffer_then_times_out() {
        let (mut c, _host) = established(4096);
        let filler = vec![0u8; 1 << 20];
        while (&c.stream).write(&filler).is_ok() {}
        rw(&mut c, &[1u8; 100], 0);
        let mut h = guest_hdr(uapi::OP_SHUTDOWN, 4096, 0);
        h.flags = uapi::SHUTDOWN_RCV | uapi::SHUTDOWN_SEND;
        let now = Instant::now();
        c.on_packet(Op::Shutdown, &h, &[], now);
        assert_eq!(c.state(), State::Established, "still flushing");
        let d = c.take_new_deadline().unwrap();
        assert!(!c.on_timeout(now));
        assert!(c.on_timeout(d));
        assert_eq!(recv(&mut c, 64).unwrap().0.op, uapi::OP_RST);
    }
}
