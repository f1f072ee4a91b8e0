//! virtio-vsock driven end to end without KVM: MMIO registers as Linux writes them, a fake
//! guest vsock stack on the three queues ([`super::test_guest`]), real Unix sockets on the
//! host side, the VMM thread's event loop.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};
use vm_memory::Bytes;

use super::packet::{Header, HDR_LEN};
use super::test_guest::{FakeGuest, GState, GuestConfig, BASE, GUEST_CID};
use super::{uapi, VsockLimits, HOST_CID};
use crate::virtio::test_utils::reg;
use crate::virtio::VirtioDevice;

const TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes of each bulk transfer (each way).
const TRANSFER_SIZE: usize = 16 << 20;
const FIRST_LOCAL_PORT: u32 = 1 << 30;

fn limits() -> VsockLimits {
    VsockLimits {
        request_timeout: Duration::from_millis(200),
        shutdown_timeout: Duration::from_millis(200),
        handshake_timeout: Duration::from_millis(200),
        ..VsockLimits::default()
    }
}

/// Reads what is available; returns whether the peer closed (EOF or reset).
fn drain(s: &mut UnixStream, into: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => into.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) => panic!("{e}"),
        }
    }
}

fn host_connect(g: &FakeGuest, line: &[u8]) -> UnixStream {
    let mut s = UnixStream::connect(g.path()).unwrap();
    s.write_all(line).unwrap();
    s.set_nonblocking(true).unwrap();
    s
}

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn probe_and_config() {
    let mut g = FakeGuest::new("probe", limits(), GuestConfig::default());
    assert_eq!(g.vmm.read32(BASE + reg::DEVICE_ID), 19);
    assert_eq!(g.vmm.read32(BASE + reg::CONFIG), GUEST_CID as u32);
    assert_eq!(g.vmm.read32(BASE + reg::CONFIG + 4), 0);
    assert_eq!(g.vmm.read32(BASE + reg::CONFIG + 8), 0);
    for q in 0..3 {
        g.vmm.write32(BASE + reg::QUEUE_SEL, q);
        assert_eq!(g.vmm.read32(BASE + reg::QUEUE_NUM_MAX), 256);
    }
    g.probe();
    assert!(g.dev.lock().unwrap().is_activated());
    assert!(g.path().exists());
    // The CID is validated.
    let p = super::test_guest::socket_path("cid");
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            super::Vsock::new(cid, &p),
            Err(super::VsockError::InvalidCid { .. })
        ));
    }
    // An existing path is refused.
    assert!(matches!(
        super::Vsock::new(4, g.path()),
        Err(super::VsockError::Muxer(_))
    ));
}

#[test]
fn host_connect_echo_and_half_close() {
    let mut g = FakeGuest::new("echo", limits(), GuestConfig::default());
    g.listeners.insert(1234);
    g.probe();
    // Data right behind the CONNECT line waits for the connection.
    let mut h = host_connect(&g, b"CONNECT 1234\nhello");
    let mut got = Vec::new();
    g.run_until(TIMEOUT, |_| {
        drain(&mut h, &mut got);
        got.ends_with(b"hello")
    });
    assert_eq!(got, format!("OK {FIRST_LOCAL_PORT}\nhello").as_bytes());
    assert!(g.irq.count() > 0, "used buffers raise the interrupt");
    h.write_all(b" world").unwrap();
    g.run_until(TIMEOUT, |_| {
        drain(&mut h, &mut got);
        got.ends_with(b" world")
    });
    // Host half-close: the guest sees EOF, finishes and closes; the host sees EOF.
    h.shutdown(Shutdown::Write).unwrap();
    g.run_until(TIMEOUT, |_| drain(&mut h, &mut got));
    let key = (1234, FIRST_LOCAL_PORT);
    g.run_until(TIMEOUT, |g| g.metrics().active_connections == 0);
    assert_eq!(g.conn(key).state, GState::Closed);
    assert_eq!(g.conn(key).data, b"hello world");
    let m = g.metrics();
    assert_eq!((m.host_connections, m.closed_connections), (1, 1));
    assert_eq!((m.rx_bytes, m.tx_bytes), (11, 11));
    assert_eq!((m.malformed_packets, m.conn_errors), (0, 0));
    // Guest saw REQUEST, RW, RW, SHUTDOWN(SEND), RST.
    let ops: Vec<u16> = g.log.iter().map(|h| h.op).collect();
    assert_eq!(ops.first(), Some(&uapi::OP_REQUEST));
    assert_eq!(ops.last(), Some(&uapi::OP_RST));
    assert!(g
        .log
        .iter()
        .any(|h| h.op == uapi::OP_SHUTDOWN && h.flags == uapi::SHUTDOWN_SEND));
}

#[test]
fn guest_connects_to_host_listener() {
    let mut g = FakeGuest::new("gconn", limits(), GuestConfig::default());
    g.probe();
    let l = UnixListener::bind(g.port_path(5000)).unwrap();
    let gport = g.connect(5000);
    let key = (gport, 5000);
    g.run_until(TIMEOUT, |g| g.conn(key).state == GState::Established);
    let (mut s, _) = l.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    g.write(key, b"ping");
    let mut got = Vec::new();
    g.run_until(TIMEOUT, |_| {
        drain(&mut s, &mut got);
        got == b"ping"
    });
    s.write_all(b"pong").unwrap();
    g.run_until(TIMEOUT, |g| g.conn(key).data == b"pong");
    // The guest closes: the device flushes, resets, the host sees EOF.
    g.close(key);
    let mut eof = false;
    g.run_until(TIMEOUT, |g| {
        eof = eof || drain(&mut s, &mut got);
        eof && g.conn(key).got_rst
    });
    let m = g.metrics();
    assert_eq!((m.guest_connections, m.closed_connections), (1, 1));
    assert_eq!(m.active_connections, 0);
    assert_eq!((m.rx_bytes, m.tx_bytes), (4, 4));
}

#[test]
fn refused_connections_are_closed_cleanly() {
    let mut g = FakeGuest::new("refuse", limits(), GuestConfig::default());
    g.probe();
    // Guest → host port nobody listens on: RST.
    let gport = g.connect(6000);
    g.run_until(TIMEOUT, |g| g.conn((gport, 6000)).got_rst);
    // Host → guest port nobody listens on: the client sees EOF, never OK.
    let mut h = host_connect(&g, b"CONNECT 999\n");
    let mut got = Vec::new();
    g.run_until(TIMEOUT, |_| drain(&mut h, &mut got));
    assert!(got.is_empty());
    // A malformed command.
    let mut h = host_connect(&g, b"HELLO 1\n");
    g.run_until(TIMEOUT, |_| drain(&mut h, &mut got));
    // An endless line.
    let mut h = host_connect(&g, &[b'A'; 100]);
    g.run_until(TIMEOUT, |_| drain(&mut h, &mut got));
    // Silence: the handshake times out.
    let mut h = host_connect(&g, b"");
    g.run_until(TIMEOUT, |_| drain(&mut h, &mut got));
    assert!(got.is_empty());
    g.run_until(TIMEOUT, |g| g.metrics().active_connections == 0);
    let m = g.metrics();
    assert_eq!(m.refused_connections, 5);
    assert_eq!((m.host_connections, m.guest_connections), (0, 0));
}

#[test]
fn request_timeout_when_the_guest_never_answers() {
    let cfg = GuestConfig {
        deaf: true,
        ..GuestConfig::default()
    };
    let mut g = FakeGuest::new("deaf", limits(), cfg);
    g.probe();
    let mut h = host_connect(&g, b"CONNECT 1234\n");
    let mut got = Vec::new();
    g.run_until(TIMEOUT, |_| drain(&mut h, &mut got));
    assert!(got.is_empty());
    g.run_until(TIMEOUT, |g| g.log.len() >= 2);
    assert_eq!(g.log[0].op, uapi::OP_REQUEST);
    assert_eq!(g.log[1].op, uapi::OP_RST);
    assert_eq!(g.metrics().refused_connections, 1);
}

#[test]
fn many_connections_at_once() {
    const N: usize = 48;
    let mut g = FakeGuest::new("many", limits(), GuestConfig::default());
    g.listeners.insert(1234);
    g.probe();
    let l = UnixListener::bind(g.port_path(7000)).unwrap();
    l.set_nonblocking(true).unwrap();

    // Host-initiated, echoed by the guest.
    let mut hosts: Vec<(UnixStream, Vec<u8>, Vec<u8>)> = (0..N)
        .map(|i| {
            let payload = pattern(3000 + 97 * i, i as u64 + 1);
            let mut line = b"CONNECT 1234\n".to_vec();
            line.extend_from_slice(&payload);
            (host_connect(&g, &line), payload, Vec::new())
        })
        .collect();
    // Guest-initiated, each sending its own payload.
    let guests: Vec<(u32, Vec<u8>)> = (0..N)
        .map(|i| {
            let gport = g.connect(7000);
            let payload = pattern(5000 + 13 * i, 1000 + i as u64);
            g.write((gport, 7000), &payload);
            (gport, payload)
        })
        .collect();
    let mut accepted: Vec<(UnixStream, Vec<u8>)> = Vec::new();
    g.run_until(TIMEOUT, |_| {
        while let Ok((s, _)) = l.accept() {
            s.set_nonblocking(true).unwrap();
            accepted.push((s, Vec::new()));
        }
        for (s, got) in accepted.iter_mut() {
            drain(s, got);
        }
        for (s, _, got) in hosts.iter_mut() {
            drain(s, got);
        }
        let host_done = hosts.iter().all(|(_, p, got)| {
            got.len() >= p.len() + 14 && got.ends_with(p) && got.starts_with(b"OK ")
        });
        let total: usize = accepted.iter().map(|(_, got)| got.len()).sum();
        let want: usize = guests.iter().map(|(_, p)| p.len()).sum();
        host_done && accepted.len() == N && total == want
    });
    // Every guest payload arrived intact on some accepted socket.
    let mut received: Vec<Vec<u8>> = accepted.iter().map(|(_, got)| got.clone()).collect();
    for (_, payload) in &guests {
        let at = received
            .iter()
            .position(|r| r == payload)
            .expect("payload lost");
        received.swap_remove(at);
    }
    // Distinct local ports.
    let mut ports: Vec<&[u8]> = hosts.iter().map(|(_, _, got)| &got[..14]).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), N);
    let m = g.metrics();
    assert_eq!(m.active_connections, 2 * N as u64);
    assert_eq!(
        (m.host_connections, m.guest_connections),
        (N as u64, N as u64)
    );
    // Everyone hangs up.
    drop(hosts);
    drop(accepted);
    g.run_until(TIMEOUT, |g| g.metrics().active_connections == 0);
    assert_eq!(g.metrics().closed_connections, 2 * N as u64);
    assert_eq!(g.metrics().conn_errors, 0);
}

#[test]
fn bulk_transfer_host_to_guest() {
    let cfg = GuestConfig {
        echo: false,
        keep: false,
        ..GuestConfig::default()
    };
    let mut g = FakeGuest::new("h2g", limits(), cfg);
    g.listeners.insert(1234);
    g.probe();
    let path = g.path().to_owned();
    let host = thread::spawn(move || {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(b"CONNECT 1234\n").unwrap();
        let mut ok = [0u8; 14];
        s.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, format!("OK {FIRST_LOCAL_PORT}\n").as_bytes());
        let data = pattern(TRANSFER_SIZE, 42);
        let digest = Sha256::digest(&data);
        s.write_all(&data).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        // The guest closes after EOF.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        digest
    });
    let key = (1234, FIRST_LOCAL_PORT);
    g.run_until(TIMEOUT * 4, |g| {
        g.conns.get(&key).is_some_and(|c| c.state == GState::Closed) && host.is_finished()
    });
    let digest = host.join().unwrap();
    let c = g.conn(key);
    assert_eq!(c.rx_total, TRANSFER_SIZE as u64);
    assert_eq!(c.hasher.clone().finalize(), digest);
    assert!(c.max_in_flight <= c.buf_alloc);
    let m = g.metrics();
    assert_eq!(m.rx_bytes, TRANSFER_SIZE as u64);
    assert_eq!(m.conn_errors, 0);
}

#[test]
fn bulk_transfer_guest_to_host() {
    let mut g = FakeGuest::new("g2h", limits(), GuestConfig::default());
    g.probe();
    let l = UnixListener::bind(g.port_path(5001)).unwrap();
    let host = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut data = Vec::new();
        s.read_to_end(&mut data).unwrap();
        (data.len(), Sha256::digest(&data))
    });
    let data = pattern(TRANSFER_SIZE, 7);
    let digest = Sha256::digest(&data);
    let gport = g.connect(5001);
    let key = (gport, 5001);
    g.write(key, &data);
    g.conn_mut(key).shutdown_when_sent = Some(uapi::SHUTDOWN_SEND);
    drop(data);
    g.run_until(TIMEOUT * 4, |g| {
        g.conn(key).state == GState::Closed && host.is_finished()
    });
    let (len, got) = host.join().unwrap();
    assert_eq!(len, TRANSFER_SIZE);
    assert_eq!(got, digest);
    let m = g.metrics();
    assert_eq!(m.tx_bytes, TRANSFER_SIZE as u64);
    assert_eq!(m.conn_errors, 0);
    g.run_until(TIMEOUT, |g| g.metrics().active_connections == 0);
}

#[test]
fn guest_closes_mid_stream() {
    let cfg = GuestConfig {
        echo: false,
        keep: false,
        ..GuestConfig::default()
    };
    let mut g = FakeGuest::new("gclose", limits(), cfg);
    g.listeners.insert(1234);
    g.probe();
    for (round, reset) in [(0u32, true), (1, false)] {
        let path = g.path().to_owned();
        let host = thread::spawn(move || {
            let mut s = UnixStream::connect(path).unwrap();
            s.write_all(b"CONNECT 1234\n").unwrap();
            let mut ok = [0u8; 14];
            s.read_exact(&mut ok).unwrap();
            let chunk = pattern(65536, 3);
            let mut sent = 0usize;
            // Write until the guest's close makes writes fail.
            while sent < 1 << 30 {
                match s.write(&chunk) {
                    Ok(n) => sent += n,
                    Err(_) => return sent,
                }
            }
            panic!("the writes never failed");
        });
        let key = (1234, FIRST_LOCAL_PORT + round);
        g.run_until(TIMEOUT, |g| {
            g.conns.get(&key).is_some_and(|c| c.rx_total >= 1 << 20)
        });
        if reset {
            g.reset(key);
        } else {
            g.close(key);
        }
        g.run_until(TIMEOUT, |g| {
            host.is_finished() && g.metrics().active_connections == 0
        });
        let sent = host.join().unwrap();
        assert!(sent as u64 >= g.conn(key).rx_total);
    }
    let m = g.metrics();
    assert_eq!((m.host_connections, m.closed_connections), (2, 2));
}

#[test]
fn host_closes_mid_stream() {
    let mut g = FakeGuest::new("hclose", limits(), GuestConfig::default());
    g.probe();
    let l = UnixListener::bind(g.port_path(5002)).unwrap();
    let host = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        s.read_exact(&mut buf).unwrap();
        // Hang up in the middle.
    });
    let gport = g.connect(5002);
    let key = (gport, 5002);
    g.write(key, &pattern(8 << 20, 5));
    g.run_until(TIMEOUT, |g| {
        host.is_finished() && g.conn(key).state == GState::Closed
    });
    host.join().unwrap();
    let c = g.conn(key);
    assert!(
        c.got_rst || c.peer_shutdown == uapi::SHUTDOWN_RCV | uapi::SHUTDOWN_SEND,
        "the guest learns the host is gone"
    );
    g.run_until(TIMEOUT, |g| g.metrics().active_connections == 0);
    assert_eq!(g.metrics().closed_connections, 1);
}

#[test]
fn credit_is_respected_both_ways() {
    let cfg = GuestConfig {
        echo: false,
        consume: false,
        buf_alloc: 4096,
        ..GuestConfig::default()
    };
    let limits = VsockLimits {
        conn_buf_size: 8192,
        ..limits()
    };
    let mut g = FakeGuest::new("credit", limits, cfg);
    g.listeners.insert(1234);
    g.probe();
    // Host → guest: the guest advertises 4 KiB and reads nothing.
    let mut h = host_connect(&g, b"CONNECT 1234\n");
    let key = (1234, FIRST_LOCAL_PORT);
    let mut got = Vec::new();
    g.run_until(TIMEOUT, |g| {
        drain(&mut h, &mut got);
        g.conns.contains_key(&key) && got.len() == 14
    });
    let data = pattern(64 * 1024, 9);
    h.write_all(&data).unwrap();
    g.run_until(TIMEOUT, |g| g.conn(key).rx_total == 4096);
    for _ in 0..20 {
        g.pump_wait(2);
    }
    assert_eq!(g.conn(key).rx_total, 4096, "nothing past the credit");
    assert!(g.log.iter().any(|h| h.op == uapi::OP_CREDIT_REQUEST));
    // The application reads from now on; credit updates let the rest through.
    let c = g.conn_mut(key);
    c.consume(4096);
    c.consume = true;
    g.run_until(TIMEOUT, |g| g.conn(key).rx_total == data.len() as u64);
    let c = g.conn(key);
    assert_eq!(c.data, data);
    assert!(c.max_in_flight <= 4096);

    // Guest → host: the host does not read; the device's 8 KiB buffer and the socket
    // buffer fill up, the guest stalls without being reset, then everything arrives.
    let big = pattern(2 << 20, 11);
    g.write(key, &big);
    for _ in 0..50 {
        g.pump_wait(2);
    }
    let stalled = g.conn(key).tx_cnt;
    assert!(
        (stalled as usize) < big.len(),
        "the host socket cannot hold 2 MiB"
    );
    assert_eq!(g.metrics().conn_errors, 0);
    let mut recv = Vec::new();
    g.run_until(TIMEOUT, |_| {
        drain(&mut h, &mut recv);
        recv.len() == big.len()
    });
    assert_eq!(recv, big);
    assert_eq!(g.metrics().conn_errors, 0);

    // A guest that ignores our credit is reset.
    let c = g.conn(key);
    let mut hdr = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: key.0,
        dst_port: key.1,
        type_: uapi::TYPE_STREAM,
        op: uapi::OP_RW,
        buf_alloc: c.buf_alloc,
        fwd_cnt: c.fwd_cnt,
        ..Header::default()
    };
    // Fill the host socket first so data stays in the device's buffer.
    let filler = vec![0u8; 60000];
    for _ in 0..20 {
        hdr.len = filler.len() as u32;
        g.send_raw(hdr, filler.clone());
    }
    g.run_until(TIMEOUT, |g| g.conn(key).state == GState::Closed);
    assert_eq!(g.metrics().conn_errors, 1);
}

#[test]
fn malformed_packets_are_counted_and_survived() {
    let mut g = FakeGuest::new("malformed", limits(), GuestConfig::default());
    g.listeners.insert(1234);
    g.probe();
    let good = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 1,
        dst_port: 2,
        type_: uapi::TYPE_STREAM,
        op: uapi::OP_RW,
        ..Header::default()
    };
    let bad: [fn(&mut Header); 4] = [
        |h| h.src_cid = 9,
        |h| h.dst_cid = 9,
        |h| h.op = 99,
        |h| h.type_ = 5,
    ];
    for mutate in bad {
        let mut h = good;
        mutate(&mut h);
        g.send_raw(h, Vec::new());
    }
    // A short header, a device-writable TX descriptor, a len larger than the data.
    g.raw_out.push_back(vec![(0x9_0000, 20, false)]);
    g.raw_out.push_back(vec![(0x9_0000, HDR_LEN as u32, true)]);
    let mut liar = good;
    liar.len = 5000;
    g.mem()
        .write_slice(&liar.to_bytes(), vm_memory::GuestAddress(0x9_1000))
        .ok();
    g.raw_out.push_back(vec![
        (0x9_1000, HDR_LEN as u32, false),
        (0x9_2000, 100, false),
    ]);
    g.pump();
    g.run_until(TIMEOUT, |g| g.metrics().malformed_packets == 7);
    // A well-formed packet for an unknown connection gets a reset.
    g.send_raw(good, Vec::new());
    g.run_until(TIMEOUT, |g| g.log.iter().any(|h| h.op == uapi::OP_RST));
    // The device still works.
    let mut h = host_connect(&g, b"CONNECT 1234\nok?");
    let mut got = Vec::new();
    g.run_until(TIMEOUT, |_| {
        drain(&mut h, &mut got);
        got.ends_with(b"ok?")
    });
    assert_eq!(g.metrics().malformed_packets, 7);
}

#[test]
fn connection_limit() {
    let limits = VsockLimits {
        max_connections: 2,
        ..limits()
    };
    let mut g = FakeGuest::new("limit", limits, GuestConfig::default());
    g.listeners.insert(1234);
    g.probe();
    let mut a = host_connect(&g, b"CONNECT 1234\n");
    let mut b = host_connect(&g, b"CONNECT 1234\n");
    let (mut ga, mut gb) = (Vec::new(), Vec::new());
    g.run_until(TIMEOUT, |_| {
        drain(&mut a, &mut ga);
        drain(&mut b, &mut gb);
        ga.len() == 14 && gb.len() == 14
    });
    let mut c = host_connect(&g, b"CONNECT 1234\n");
    let mut gc = Vec::new();
    g.run_until(TIMEOUT, |_| drain(&mut c, &mut gc));
    assert!(gc.is_empty());
    let gport = g.connect(1);
    g.run_until(TIMEOUT, |g| g.conn((gport, 1)).got_rst);
    let m = g.metrics();
    assert_eq!((m.active_connections, m.refused_connections), (2, 2));
}

#[test]
fn driver_reset_drops_connections() {
    let mut g = FakeGuest::new("reset", limits(), GuestConfig::default());
    g.listeners.insert(1234);
    g.probe();
    let mut h = host_connect(&g, b"CONNECT 1234\n");
    let mut got = Vec::new();
    g.run_until(TIMEOUT, |_| {
        drain(&mut h, &mut got);
        got.len() == 14
    });
    g.vmm.write32(BASE + reg::STATUS, 0);
    assert!(!g.dev.lock().unwrap().is_activated());
    g.run_until(TIMEOUT, |_| drain(&mut h, &mut got));
    assert_eq!(g.metrics().active_connections, 0);
    // Host clients can still connect; they wait for the driver.
    let _pending = host_connect(&g, b"CONNECT 1234\n");
    g.pump_wait(10);
    assert_eq!(g.metrics().active_connections, 1);
}
