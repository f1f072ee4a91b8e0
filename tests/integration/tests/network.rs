//! Layer 3, networking: one real Linux boot of `kestrel run` with a virtio-net interface on
//! a tap and a vsock device, checked from the host side, all inside a network namespace the
//! test makes for itself (`kestrel-net-<pid>`, deleted on drop, also on panic) — no packet
//! leaves this machine.
//!
//! The guest is `tests/images/net-guest` as /init of its own initramfs (built by
//! `tests/images/net-guest/build.sh`). One boot checks, in order:
//!
//! 1. the guest's one-shot clients: guest→host TCP echo (host listens on 10.0.2.1:7001) and
//!    guest→host vsock echo (host listens on `<socket>_5001`), the SHA-256 the guest sent,
//!    the host received and the guest got back all equal;
//! 2. host→guest ICMP echo (3 pings through a raw socket: the host may have no `ping`);
//! 3. host→guest TCP echo on 7000 of `KESTREL_NET_TEST_TCP_BYTES` bytes, intact;
//! 4. RX after a flood: UDP datagrams blasted at the guest while a TCP echo is running
//!    (that echo must still be intact), then a ping and a small echo still work;
//! 5. vsock: host-initiated echo on 5000 (`CONNECT 5000`) of `KESTREL_NET_TEST_VSOCK_BYTES`;
//!    16 streams at once of `KESTREL_NET_TEST_STREAM_BYTES` each; the host closing
//!    mid-stream (then an echo still works); the guest closing mid-stream (source port
//!    5003: the guest sends what was asked and closes while the host keeps writing — the
//!    host must get exactly those bytes, then EOF, and its writes must fail rather than
//!    hang); `CONNECT` to a port nobody listens on is refused (closed, no `OK`);
//! 6. `quit` on the guest's control port 5002 ends the VM with status 0.
//!
//! Sizes: on kvm_pvm hosts every guest kernel instruction is emulated (docs/kvm-pvm.md);
//! measured there (2 busy cores): TCP host→guest ~0.15 MB/s, vsock ~0.35–0.45 MB/s. So the
//! defaults are 2 MiB (TCP), 4 MiB (vsock) and 16 × 64 KiB (streams) on kvm_pvm hosts, and
//! 1 GiB, 16 MiB and 16 × 1 MiB elsewhere; the environment variables above override them.
//!
//! Host side: the test thread itself joins the namespace (`setns(CLONE_NEWNET)` affects the
//! calling thread only, and threads it spawns inherit it), so its sockets live there; the
//! VM runs as `ip netns exec NS <target>/debug/kestrel run …`.
//!
//! Without /dev/kvm, /dev/net/tun, `ip` or root the test prints `skipped: <reason>`.

// Test code: a failed setup step should panic with its cause.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kestrel_integration_tests::target_dir;
use sha2::{Digest, Sha256};

/// Every wait of the test (boot, a transfer, the exit) gives up after this long.
const DEADLINE: Duration = Duration::from_secs(600);
/// Read/write timeout on every host socket: a hang fails the test instead of blocking it.
const IO_TIMEOUT: Duration = Duration::from_secs(300);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const GUEST_CID: u32 = 3;
const BUF: usize = 256 * 1024;

// ---------------------------------------------------------------------------------------
// Environment

fn kvm_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

fn size_from_env(name: &str, pvm_default: u64, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a byte count")),
        Err(_) if kvm_pvm() => pvm_default,
        Err(_) => default,
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Why this host cannot run the test, if it cannot.
fn skip_reason() -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("/dev/kvm not usable: {e}"));
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun missing".into());
    }
    if which("ip").is_none() {
        return Some("`ip` (iproute2) not installed".into());
    }
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (network namespaces and taps need CAP_NET_ADMIN)".into());
    }
    None
}

/// `<target>/debug/kestrel`: the grandparent of this test binary (`<target>/debug/deps/…`).
fn kestrel_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in <target>/<profile>/deps");
    let kestrel = dir.join("kestrel");
    assert!(
        kestrel.is_file(),
        "{} is missing: build it first (`cargo build -p kestrel`; `cargo test --workspace` builds it)",
        kestrel.display()
    );
    kestrel
}

/// The net-guest initramfs, built (or found in the cache) by its build script.
fn net_guest_initramfs() -> PathBuf {
    let script =
        kestrel_integration_tests::workspace_root().join("tests/images/net-guest/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(PathBuf::from);
    path.filter(|p| p.is_file())
        .expect("build.sh printed the initramfs path")
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

// ---------------------------------------------------------------------------------------
// Guards: namespace, temporary directory, VM

/// A network namespace with `tap0` = 10.0.2.1/24; deleted on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn create() -> NetNs {
        let name = format!("kestrel-net-{}", std::process::id());
        // A leftover from a killed run with a recycled pid: remove it first.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        let n = ns.name.as_str();
        run(Command::new("ip").args(["-n", n, "link", "set", "lo", "up"]));
        run(Command::new("ip").args(["-n", n, "tuntap", "add", "dev", "tap0", "mode", "tap"]));
        run(Command::new("ip").args(["-n", n, "addr", "add", "10.0.2.1/24", "dev", "tap0"]));
        run(Command::new("ip").args(["-n", n, "link", "set", "tap0", "up"]));
        ns
    }

    /// Moves the calling thread (and threads it spawns later) into the namespace.
    fn enter_this_thread(&self) {
        let f = File::open(format!("/run/netns/{}", self.name)).expect("open /run/netns/<ns>");
        // SAFETY: setns(2) takes a descriptor we own and a flag; it only changes this
        // thread's network namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("kestrel-net-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the temporary directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The console so far, and a signal for every new line.
type Console = Arc<(Mutex<String>, Condvar)>;

/// The `kestrel run` child; killed on drop unless it has exited.
struct Vm {
    child: Child,
    console: Console,
    stderr: PathBuf,
}

impl Vm {
    fn start(ns: &NetNs, initramfs: &Path, socket: &Path, cmdline: &str, stderr: PathBuf) -> Vm {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(kestrel_binary())
            .arg("run")
            .arg("--initrd")
            .arg(initramfs)
            .args(["--cmdline", cmdline, "--net", "tap=tap0", "--vsock"])
            .arg(format!("cid={GUEST_CID},socket={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).expect("create the stderr file"))
            .spawn()
            .expect("spawn ip netns exec … kestrel run");
        let console: Console = Arc::default();
        let stdout = child.stdout.take().expect("piped stdout");
        let sink = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let (text, cv) = &*sink;
                let mut text = text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
                cv.notify_all();
            }
        });
        Vm {
            child,
            console,
            stderr,
        }
    }

    fn console(&self) -> String {
        self.console.0.lock().unwrap().clone()
    }

    /// Console and stderr, for failure messages.
    fn report(&self) -> String {
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!(
            "--- console ---\n{}--- kestrel stderr ---\n{stderr}",
            self.console()
        )
    }

    /// Waits for a console line starting with `prefix`; returns the rest of it.
    fn wait_line(&mut self, prefix: &str) -> String {
        let start = Instant::now();
        let (text, cv) = &*self.console;
        let mut guard = text.lock().unwrap();
        loop {
            if let Some(rest) = guard.lines().find_map(|l| l.strip_prefix(prefix)) {
                return rest.to_owned();
            }
            let error = guard
                .lines()
                .find(|l| l.starts_with("net-guest: error:"))
                .map(str::to_owned);
            drop(guard);
            if let Some(error) = error {
                panic!("the guest failed: {error}\n{}", self.report());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "kestrel exited ({status}) before {prefix:?}\n{}",
                    self.report()
                );
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no {prefix:?} after {DEADLINE:?}\n{}",
                self.report()
            );
            guard = text.lock().unwrap();
            guard = cv
                .wait_timeout(guard, Duration::from_millis(500))
                .unwrap()
                .0;
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Data and streams

/// net-guest's pattern (tests/images/net-guest/src/main.rs, `fill_pattern`).
fn fill_pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in (offset..).zip(buf.iter_mut()) {
        *b = ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8 ^ (i >> 32) as u8;
    }
}

fn pattern_sha(n: u64) -> String {
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let mut done = 0;
    while done < n {
        let len = (n - done).min(BUF as u64) as usize;
        fill_pattern(done, &mut buf[..len]);
        sha.update(&buf[..len]);
        done += len as u64;
    }
    hex(&sha.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A host-side stream: TCP, or the Unix socket of a vsock connection.
trait Duplex: Read + Write + Send + Sized + 'static {
    fn dup(&self) -> io::Result<Self>;
    fn shut(&self, how: Shutdown) -> io::Result<()>;
    fn timeouts(&self, t: Duration) -> io::Result<()>;
}

impl Duplex for TcpStream {
    fn dup(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }
    fn timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl Duplex for UnixStream {
    fn dup(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }
    fn timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

/// Sends `n` pattern bytes from a second thread, half-closes, reads to EOF. Returns
/// (sent sha, received bytes, received sha).
fn echo_roundtrip<S: Duplex>(stream: S, n: u64) -> io::Result<(String, u64, String)> {
    stream.timeouts(IO_TIMEOUT)?;
    let mut writer = stream.dup()?;
    let sender = std::thread::spawn(move || -> io::Result<String> {
        let mut sha = Sha256::new();
        let mut buf = vec![0u8; BUF];
        let mut done = 0u64;
        while done < n {
            let len = (n - done).min(BUF as u64) as usize;
            fill_pattern(done, &mut buf[..len]);
            sha.update(&buf[..len]);
            writer.write_all(&buf[..len])?;
            done += len as u64;
        }
        writer.shut(Shutdown::Write)?;
        Ok(hex(&sha.finalize()))
    });
    let mut reader = stream;
    let received = drain(&mut reader);
    let sent = sender.join().expect("sender thread")?;
    let (m, sha) = received?;
    Ok((sent, m, sha))
}

/// Reads to EOF: (bytes, sha).
fn drain(r: &mut impl Read) -> io::Result<(u64, String)> {
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok((total, hex(&sha.finalize()))),
            Ok(k) => {
                sha.update(&buf[..k]);
                total += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Checks an echo of `n` bytes, printing the rate.
fn check_echo<S: Duplex>(what: &str, stream: S, n: u64) {
    let start = Instant::now();
    let (sent, m, got) = echo_roundtrip(stream, n).unwrap_or_else(|e| panic!("{what}: {e}"));
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(m, n, "{what}: echoed byte count");
    assert_eq!(got, sent, "{what}: echoed data differ");
    println!(
        "{what}: {n} bytes each way intact in {secs:.1} s ({:.2} MB/s each way)",
        n as f64 / secs / 1e6
    );
}

/// Connects to the guest's vsock `port` through the hybrid socket; `Ok(None)` when the
/// device closed the connection without `OK` (nobody listens on `port`).
fn vsock_connect(socket: &Path, port: u32) -> io::Result<Option<UnixStream>> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Err(io::Error::other(format!("EOF after {line:?}"))),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && line.is_empty() => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    if !line.starts_with("OK ") {
        return Err(io::Error::other(format!(
            "CONNECT {port} answered {line:?}"
        )));
    }
    Ok(Some(s))
}

fn vsock_open(socket: &Path, port: u32) -> UnixStream {
    vsock_connect(socket, port)
        .unwrap_or_else(|e| panic!("vsock CONNECT {port}: {e}"))
        .unwrap_or_else(|| panic!("vsock CONNECT {port} refused"))
}

fn tcp_open(port: u16) -> TcpStream {
    TcpStream::connect_timeout(
        &SocketAddrV4::new(GUEST_IP, port).into(),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("connect {GUEST_IP}:{port}: {e}"))
}

// ---------------------------------------------------------------------------------------
// Host-side echo servers for the guest's one-shot clients

/// Echoes every connection accepted on `listener`; reports (bytes, sha) of each.
fn host_echo_server<L: Send + 'static, S: Duplex>(
    listener: L,
    accept: fn(&L) -> io::Result<S>,
    report: mpsc::Sender<io::Result<(u64, String)>>,
) {
    std::thread::spawn(move || loop {
        let Ok(mut conn) = accept(&listener) else {
            return;
        };
        let report = report.clone();
        std::thread::spawn(move || {
            let result = (|| {
                conn.timeouts(IO_TIMEOUT)?;
                let mut sha = Sha256::new();
                let mut buf = vec![0u8; BUF];
                let mut total = 0u64;
                loop {
                    let k = conn.read(&mut buf)?;
                    if k == 0 {
                        break;
                    }
                    sha.update(&buf[..k]);
                    total += k as u64;
                    conn.write_all(&buf[..k])?;
                }
                conn.shut(Shutdown::Write)?;
                Ok((total, hex(&sha.finalize())))
            })();
            let _ = report.send(result);
        });
    });
}

/// The guest's `sent`/`echoed` lines for `kind`, checked against the host's record.
fn check_guest_client(
    vm: &mut Vm,
    kind: &str,
    host: &mpsc::Receiver<io::Result<(u64, String)>>,
    n: u64,
) {
    let sent = vm.wait_line(&format!("net-guest: sent {kind} "));
    let echoed = vm.wait_line(&format!("net-guest: echoed {kind} "));
    let (host_n, host_sha) = host
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("the host's {kind} echo server saw no connection"))
        .unwrap_or_else(|e| panic!("the host's {kind} echo server: {e}"));
    let expected = format!("{n} sha256={}", pattern_sha(n));
    assert_eq!(sent, expected, "guest {kind} client: what it sent");
    assert_eq!(
        format!("{host_n} sha256={host_sha}"),
        expected,
        "{kind}: what the host received"
    );
    assert_eq!(echoed, expected, "guest {kind} client: what came back");
    println!("guest→host {kind} echo: {n} bytes intact both ways");
}

// ---------------------------------------------------------------------------------------
// ICMP echo through a raw socket

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `count` ICMP echo requests to `dst`; returns how many were answered (each waited
/// for up to `timeout`).
fn ping(dst: Ipv4Addr, count: u16, timeout: Duration) -> u16 {
    // SAFETY: socket(2) takes no pointers; the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    assert!(fd >= 0, "raw ICMP socket: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let sock = UdpSocket::from(unsafe { OwnedFd::from_raw_fd(fd) });
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    sock.connect(SocketAddrV4::new(dst, 0)).unwrap();
    let id = (std::process::id() & 0xffff) as u16;
    let mut answered = 0;
    for seq in 1..=count {
        let mut req = vec![8u8, 0, 0, 0];
        req.extend_from_slice(&id.to_be_bytes());
        req.extend_from_slice(&seq.to_be_bytes());
        req.extend_from_slice(b"kestrel network test ping payload");
        let sum = checksum(&req);
        req[2..4].copy_from_slice(&sum.to_be_bytes());
        let sent_at = Instant::now();
        sock.send(&req).expect("send ICMP echo request");
        let mut buf = [0u8; 1500];
        while sent_at.elapsed() < timeout {
            let Ok(k) = sock.recv(&mut buf) else { continue };
            let ihl = usize::from(buf[0] & 0xf) * 4;
            let icmp = &buf[ihl.min(k)..k];
            if icmp.len() >= 8
                && icmp[0] == 0
                && icmp[4..6] == id.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
            {
                println!(
                    "ping {dst}: seq {seq} answered in {:.1} ms",
                    sent_at.elapsed().as_secs_f64() * 1e3
                );
                answered += 1;
                break;
            }
        }
    }
    answered
}

// ---------------------------------------------------------------------------------------
// The test

#[test]
fn tcp_udp_icmp_and_vsock_through_one_linux_boot() {
    if let Some(reason) = skip_reason() {
        kestrel_test_support::skip(reason);
        return;
    }
    let tcp_bytes = size_from_env("KESTREL_NET_TEST_TCP_BYTES", 2 << 20, 1 << 30);
    let vsock_bytes = size_from_env("KESTREL_NET_TEST_VSOCK_BYTES", 4 << 20, 16 << 20);
    let stream_bytes = size_from_env("KESTREL_NET_TEST_STREAM_BYTES", 64 << 10, 1 << 20);
    let flood_packets = size_from_env("KESTREL_NET_TEST_FLOOD_PACKETS", 20_000, 200_000);
    println!(
        "sizes: tcp {tcp_bytes}, vsock {vsock_bytes}, streams 16 x {stream_bytes}, flood {flood_packets} datagrams{}",
        if kvm_pvm() { " (kvm_pvm host)" } else { "" }
    );
    let initramfs = net_guest_initramfs();
    let _ = kestrel_binary();
    let tmp = TempDir::new();
    let socket = tmp.0.join("v.sock");
    let ns = NetNs::create();
    ns.enter_this_thread();

    // The guest's one-shot clients connect right after boot: listen first.
    let (tcp_tx, tcp_rx) = mpsc::channel();
    let tcp_listener =
        TcpListener::bind(SocketAddrV4::new(HOST_IP, 7001)).expect("listen on 10.0.2.1:7001");
    host_echo_server(
        tcp_listener,
        |l: &TcpListener| l.accept().map(|(s, _)| s),
        tcp_tx,
    );
    let (vsock_tx, vsock_rx) = mpsc::channel();
    let unix_listener =
        UnixListener::bind(tmp.0.join("v.sock_5001")).expect("listen on v.sock_5001");
    host_echo_server(
        unix_listener,
        |l: &UnixListener| l.accept().map(|(s, _)| s),
        vsock_tx,
    );

    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd nomodule tsc=reliable \
         ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off net_guest.bytes={tcp_bytes}"
    );
    let boot = Instant::now();
    let mut vm = Vm::start(
        &ns,
        &initramfs,
        &socket,
        &cmdline,
        tmp.0.join("kestrel.stderr"),
    );
    vm.wait_line("net-guest: ready");
    println!(
        "guest ready {:.1} s after spawn",
        boot.elapsed().as_secs_f64()
    );

    // 1. guest-initiated (already under way)
    let start = Instant::now();
    check_guest_client(&mut vm, "tcp", &tcp_rx, tcp_bytes);
    check_guest_client(&mut vm, "vsock", &vsock_rx, tcp_bytes);
    println!(
        "guest clients done in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // 2. ping
    assert_eq!(
        ping(GUEST_IP, 3, Duration::from_secs(30)),
        3,
        "ping {GUEST_IP}\n{}",
        vm.report()
    );

    // 3. host→guest TCP echo
    check_echo("host→guest tcp echo", tcp_open(7000), tcp_bytes);

    // 4. flood UDP at the guest while it echoes over TCP, then check it still answers
    let busy_bytes = (tcp_bytes / 2).max(64 << 10);
    let busy = std::thread::spawn(move || echo_roundtrip(tcp_open(7000), busy_bytes));
    let flood = UdpSocket::bind("10.0.2.1:0").unwrap();
    flood.set_nonblocking(true).unwrap();
    let datagram = [0x5au8; 1400];
    let (mut sent, mut dropped) = (0u64, 0u64);
    let flood_start = Instant::now();
    for _ in 0..flood_packets {
        match flood.send_to(&datagram, SocketAddrV4::new(GUEST_IP, 9)) {
            Ok(_) => sent += 1,
            Err(_) => dropped += 1,
        }
    }
    println!(
        "flood: {sent} datagrams of 1400 bytes sent, {dropped} refused by the host stack, in {:.2} s",
        flood_start.elapsed().as_secs_f64()
    );
    let (s, m, got) = busy
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("tcp echo during the flood: {e}\n{}", vm.report()));
    assert_eq!((m, &got), (busy_bytes, &s), "tcp echo during the flood");
    assert!(
        ping(GUEST_IP, 1, Duration::from_secs(30)) == 1,
        "no ping answer after the flood\n{}",
        vm.report()
    );
    check_echo("tcp echo after the flood", tcp_open(7000), 64 << 10);

    // 5. vsock
    check_echo(
        "host→guest vsock echo",
        vsock_open(&socket, 5000),
        vsock_bytes,
    );

    let start = Instant::now();
    let streams: Vec<_> = (0..16)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || echo_roundtrip(vsock_open(&socket, 5000), stream_bytes))
        })
        .collect();
    for (i, t) in streams.into_iter().enumerate() {
        let (s, m, got) = t
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("vsock stream {i}: {e}"));
        assert_eq!((m, &got), (stream_bytes, &s), "vsock stream {i}");
    }
    println!(
        "16 vsock streams x {stream_bytes} bytes echoed intact in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // the host closes mid-stream: write part of a transfer, close without reading
    {
        let mut s = vsock_open(&socket, 5000);
        let mut buf = vec![0u8; 128 << 10];
        fill_pattern(0, &mut buf);
        s.write_all(&buf).unwrap();
        drop(s);
    }
    check_echo(
        "vsock echo after a host close mid-stream",
        vsock_open(&socket, 5000),
        64 << 10,
    );

    // the guest closes mid-stream: source sends `asked` bytes and closes while we write
    {
        let asked: u64 = 256 << 10;
        let mut s = vsock_open(&socket, 5003);
        s.timeouts(Duration::from_secs(120)).unwrap();
        s.write_all(format!("{asked}\n").as_bytes()).unwrap();
        let mut writer = s.try_clone().unwrap();
        let junk = std::thread::spawn(move || {
            let buf = vec![0xa5u8; 64 << 10];
            let mut total = 0u64;
            loop {
                match writer.write(&buf) {
                    Ok(k) => total += k as u64,
                    Err(e) => return (total, e),
                }
            }
        });
        let (m, got) =
            drain(&mut s).unwrap_or_else(|e| panic!("vsock source read: {e}\n{}", vm.report()));
        assert_eq!(m, asked, "bytes from the guest before it closed");
        assert_eq!(
            got,
            pattern_sha(asked),
            "data from the guest before it closed"
        );
        let (written, e) = junk.join().unwrap();
        assert!(
            !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
            "after the guest closed, the host's write blocked instead of failing ({written} bytes written)"
        );
        println!("guest close mid-stream: {m} bytes then EOF; host writes failed after {written} bytes: {e}");
    }
    check_echo(
        "vsock echo after a guest close mid-stream",
        vsock_open(&socket, 5000),
        64 << 10,
    );

    // nobody listens on 6000
    let start = Instant::now();
    match vsock_connect(&socket, 6000) {
        Ok(None) => println!(
            "CONNECT 6000 refused (closed, no OK) in {:.0} ms",
            start.elapsed().as_secs_f64() * 1e3
        ),
        Ok(Some(_)) => panic!("CONNECT 6000 answered OK though nobody listens"),
        Err(e) => panic!("CONNECT 6000: {e}"),
    }

    // 6. quit
    let mut control = vsock_open(&socket, 5002);
    control.write_all(b"quit\n").unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = vm.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the VM did not exit after quit\n{}",
            vm.report()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        status.code(),
        Some(0),
        "kestrel's exit status\n{}",
        vm.report()
    );
    println!(
        "VM exited with status 0, {:.1} s after spawn",
        boot.elapsed().as_secs_f64()
    );
}
