//! `net-guest`: PID 1 of kestrel's network test initramfs (`tests/images/net-guest/`).
//!
//! Packed alone into an initramfs by `rootfs/mkinitramfs.sh` (see `build.sh` here), it
//! turns a kestrel microVM with a virtio-net interface and a vsock device into a network
//! peer for `tests/integration/tests/network.rs` and `benches/src/bin/net-throughput.rs`:
//!
//! 1. mounts `/proc`, `/sys`, `/dev` (already mounted is fine);
//! 2. reads its parameters from `/proc/cmdline` (dotted parameters never reach init's
//!    argv or environment) and configures `lo` and `eth0` with ioctls: the address comes
//!    from `net_guest.addr=A.B.C.D/PREFIX` or, failing that, from the kernel's own
//!    `ip=CLIENT:SERVER:GATEWAY:NETMASK:HOST:DEVICE:AUTOCONF` syntax (the guest kernel
//!    has no `CONFIG_IP_PNP`, so net-guest applies it itself; if the kernel did configure
//!    eth0, setting the same address again is harmless). Prints `net-guest: eth0 A/P`;
//! 3. listens, each service on its own thread, one thread per connection:
//!
//!    | port            | service |
//!    |-----------------|---------|
//!    | TCP 7000, vsock 5000 | **echo**: writes back everything it reads; at EOF half-closes |
//!    | TCP 7002, vsock 5003 | **source**: reads one line `<n>\n`, sends `n` pattern bytes, closes (without reading anything else: a peer still writing sees the guest close mid-stream) |
//!    | TCP 7003, vsock 5004 | **sink**: reads to EOF, answers `<count> <sha256hex>\n`, closes |
//!    | vsock 5002      | **control**: a line `quit` ends the VM with status 0 (0 → I/O port 0x444 through `/dev/port`, reboot as fallback) |
//!
//!    and prints `net-guest: ready`;
//! 4. once, as a client (two threads): connects to the host over TCP
//!    (`net_guest.host=`, default the `ip=` gateway or server, else 10.0.2.1; port 7001)
//!    and over vsock (CID 2, port 5001), retrying for a minute; sends
//!    `net_guest.bytes=N` (default 1 MiB; 0 skips the clients) pattern bytes, half-closes,
//!    reads the echo to EOF and prints `net-guest: sent tcp <n> sha256=<hex>` and
//!    `net-guest: echoed tcp <m> sha256=<hex>` (same for `vsock`), or
//!    `net-guest: error: …`;
//! 5. runs until the control port says `quit` (or the VM is killed).
//!
//! The pattern: byte `i` of a stream is `((i as u32) * 2654435761) >> 24` xor
//! `(i >> 32)`, truncated to a byte ([`fill_pattern`]); hosts regenerate it to check a
//! source's bytes.
//!
//! Every system call costs milliseconds on kvm_pvm hosts (docs/kvm-pvm.md): all data moves
//! through 256 KiB buffers and the console gets whole lines.

mod sha256;

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha256::Sha256;

/// kestrel's exit port: the byte written is the VM's exit status.
const EXIT_PORT: u64 = 0x444;
/// Size of every data buffer.
const BUF: usize = 256 * 1024;
/// The host's vsock CID.
const HOST_CID: u32 = 2;

const TCP_ECHO: u16 = 7000;
const TCP_HOST_ECHO: u16 = 7001;
const TCP_SOURCE: u16 = 7002;
const TCP_SINK: u16 = 7003;
const VSOCK_ECHO: u32 = 5000;
const VSOCK_HOST_ECHO: u32 = 5001;
const VSOCK_CONTROL: u32 = 5002;
const VSOCK_SOURCE: u32 = 5003;
const VSOCK_SINK: u32 = 5004;

/// How long the one-shot clients keep retrying to reach the host.
const CLIENT_RETRY: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Console

static CONSOLE: Mutex<Option<File>> = Mutex::new(None);

/// Prints one line (a `\n` is added) on the console with a single write. Uses stdout;
/// if that fails (see docs/kvm-pvm.md, "write(1) to /dev/console"), `/dev/kmsg`.
fn say(text: &str) {
    let line = format!("net-guest: {text}\n");
    let mut guard = match CONSOLE.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(kmsg) = guard.as_mut() {
        let _ = kmsg.write_all(line.as_bytes());
        return;
    }
    let mut stdout = io::stdout().lock();
    if stdout
        .write_all(line.as_bytes())
        .and_then(|()| stdout.flush())
        .is_ok()
    {
        return;
    }
    if let Ok(mut kmsg) = OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = kmsg.write_all(line.as_bytes());
        *guard = Some(kmsg);
    }
}

// ---------------------------------------------------------------------------------------
// System calls std does not offer

mod sys {
    use std::ffi::CStr;
    use std::io;
    use std::net::Ipv4Addr;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// `mount(2)` without data.
    pub fn mount(
        source: &CStr,
        target: &CStr,
        fstype: &CStr,
        flags: libc::c_ulong,
    ) -> io::Result<()> {
        // SAFETY: all pointers come from live `CStr`s; a null `data` is allowed.
        check(unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                flags,
                std::ptr::null(),
            )
        })
        .map(drop)
    }

    /// `reboot(RB_AUTOBOOT)`; only returns on failure.
    pub fn reboot() -> io::Error {
        // SAFETY: reboot(2) takes no pointers.
        unsafe { libc::reboot(libc::RB_AUTOBOOT) };
        io::Error::last_os_error()
    }

    /// `shutdown(fd, SHUT_WR)`.
    pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
        // SAFETY: shutdown(2) takes no pointers; a stale fd only yields EBADF.
        check(unsafe { libc::shutdown(fd, libc::SHUT_WR) }).map(drop)
    }

    fn socket(domain: libc::c_int, ty: libc::c_int) -> io::Result<OwnedFd> {
        // SAFETY: socket(2) takes no pointers; on success we own the new descriptor.
        let fd = check(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
        // SAFETY: sockaddr_vm is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = cid;
        addr.svm_port = port;
        addr
    }

    const VM_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

    /// A listening AF_VSOCK stream socket on `port` (any CID).
    pub fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
        let fd = socket(libc::AF_VSOCK, libc::SOCK_STREAM)?;
        let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
        // SAFETY: `addr` is a valid sockaddr_vm of VM_LEN bytes, alive for the call.
        check(unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), VM_LEN) })?;
        // SAFETY: listen(2) takes no pointers.
        check(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
        Ok(fd)
    }

    /// A connected AF_VSOCK stream socket to `cid:port`.
    pub fn vsock_connect(cid: u32, port: u32) -> io::Result<OwnedFd> {
        let fd = socket(libc::AF_VSOCK, libc::SOCK_STREAM)?;
        let addr = vsock_addr(cid, port);
        // SAFETY: `addr` is a valid sockaddr_vm of VM_LEN bytes, alive for the call.
        check(unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), VM_LEN) })?;
        Ok(fd)
    }

    /// `accept4(fd)`, retrying on EINTR.
    pub fn accept(fd: RawFd) -> io::Result<OwnedFd> {
        loop {
            // SAFETY: null address pointers are allowed (the peer address is not wanted).
            let rc = unsafe {
                libc::accept4(
                    fd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            match check(rc) {
                // SAFETY: `rc` is a new descriptor returned by accept4(2), owned by nobody.
                Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn ifreq(name: &str) -> io::Result<libc::ifreq> {
        // SAFETY: ifreq is plain data; all-zero is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        if name.len() >= req.ifr_name.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "interface name too long",
            ));
        }
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        Ok(req)
    }

    fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
        // SAFETY: sockaddr_in is plain data; all-zero is valid.
        let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from_ne_bytes(addr.octets());
        // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data; the kernel
        // reads ifr_addr as a sockaddr_in for AF_INET.
        unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
    }

    fn ioctl(fd: &OwnedFd, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
        // SAFETY: every request used here (SIOC[GS]IF*) takes a `struct ifreq`, which `req` is.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), request, req as *mut libc::ifreq) }).map(drop)
    }

    /// Sets `name`'s IPv4 address and netmask (when given) and brings it up.
    pub fn configure_interface(name: &str, addr: Option<(Ipv4Addr, Ipv4Addr)>) -> io::Result<()> {
        let fd = socket(libc::AF_INET, libc::SOCK_DGRAM)?;
        if let Some((addr, mask)) = addr {
            let mut req = ifreq(name)?;
            req.ifr_ifru.ifru_addr = sockaddr_in(addr);
            ioctl(&fd, libc::SIOCSIFADDR, &mut req)?;
            let mut req = ifreq(name)?;
            req.ifr_ifru.ifru_netmask = sockaddr_in(mask);
            ioctl(&fd, libc::SIOCSIFNETMASK, &mut req)?;
        }
        let mut req = ifreq(name)?;
        ioctl(&fd, libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        ioctl(&fd, libc::SIOCSIFFLAGS, &mut req)
    }
}

// ---------------------------------------------------------------------------------------
// Parameters

/// What net-guest reads from `/proc/cmdline`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Params {
    /// eth0's address and netmask.
    addr: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Where the one-shot TCP client connects.
    host: Ipv4Addr,
    /// Bytes each one-shot client sends (0: no clients).
    bytes: u64,
}

fn prefix_mask(prefix: u32) -> Option<Ipv4Addr> {
    match prefix {
        0 => Some(Ipv4Addr::UNSPECIFIED),
        1..=32 => Some(Ipv4Addr::from(u32::MAX << (32 - prefix))),
        _ => None,
    }
}

/// Parses a kernel command line; unknown or malformed parameters are ignored (and
/// reported by [`main`] through the resulting defaults).
fn parse_cmdline(cmdline: &str) -> Params {
    let mut addr = None;
    let mut ip_addr = None;
    let mut ip_host = None;
    let mut host = None;
    let mut bytes = 1 << 20;
    for word in cmdline.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "net_guest.addr" => {
                let parsed = value
                    .split_once('/')
                    .and_then(|(a, p)| Some((a.parse().ok()?, prefix_mask(p.parse().ok()?)?)));
                addr = parsed.or(addr);
            }
            "net_guest.host" => host = value.parse().ok().or(host),
            "net_guest.bytes" => bytes = value.parse().unwrap_or(bytes),
            "ip" => {
                // ip=client:server:gateway:netmask:hostname:device:autoconf
                let f: Vec<&str> = value.split(':').collect();
                let field = |i: usize| f.get(i).and_then(|s| s.parse::<Ipv4Addr>().ok());
                if let Some(client) = field(0) {
                    let mask = field(3).unwrap_or(Ipv4Addr::new(255, 255, 255, 0));
                    ip_addr = Some((client, mask));
                }
                ip_host = field(2).or_else(|| field(1));
            }
            _ => {}
        }
    }
    Params {
        addr: addr.or(ip_addr),
        host: host.or(ip_host).unwrap_or(Ipv4Addr::new(10, 0, 2, 1)),
        bytes,
    }
}

// ---------------------------------------------------------------------------------------
// Data

/// Fills `buf` with the pattern bytes at stream offsets `offset..offset + buf.len()`.
fn fill_pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in (offset..).zip(buf.iter_mut()) {
        *b = ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8 ^ (i >> 32) as u8;
    }
}

/// Sends `n` pattern bytes; returns their SHA-256.
fn send_pattern(out: &mut impl Write, n: u64) -> io::Result<String> {
    let mut buf = vec![0u8; BUF];
    let mut sha = Sha256::default();
    let mut sent = 0u64;
    while sent < n {
        let len = usize::try_from(n - sent).map_or(BUF, |r| r.min(BUF));
        let chunk = buf.get_mut(..len).unwrap_or_default();
        fill_pattern(sent, chunk);
        sha.update(chunk);
        out.write_all(chunk)?;
        sent += len as u64;
    }
    Ok(sha.hex())
}

/// Reads to EOF; returns (bytes, SHA-256).
fn drain(input: &mut impl Read) -> io::Result<(u64, String)> {
    let mut buf = vec![0u8; BUF];
    let mut sha = Sha256::default();
    let mut total = 0u64;
    loop {
        match input.read(&mut buf) {
            Ok(0) => return Ok((total, sha.hex())),
            Ok(n) => {
                sha.update(buf.get(..n).unwrap_or_default());
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads one line (at most 64 bytes, a byte at a time: the peer may send more after it).
fn read_line(input: &mut impl Read) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        if input.read(&mut byte)? == 0 {
            break;
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).trim().to_owned())
}

// ---------------------------------------------------------------------------------------
// Services

#[derive(Clone, Copy, Debug)]
enum Service {
    Echo,
    Source,
    Sink,
    Control,
}

/// One accepted connection, TCP or vsock, as a file.
fn serve(service: Service, mut conn: File, ports: &File) -> io::Result<()> {
    match service {
        Service::Echo => {
            let mut buf = vec![0u8; BUF];
            loop {
                let n = match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                conn.write_all(buf.get(..n).unwrap_or_default())?;
            }
            sys::shutdown_write(conn.as_raw_fd())
        }
        Service::Source => {
            let line = read_line(&mut conn)?;
            let n: u64 = line.parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("source: bad count {line:?}"),
                )
            })?;
            send_pattern(&mut conn, n).map(drop)
        }
        Service::Sink => {
            let (n, sha) = drain(&mut conn)?;
            conn.write_all(format!("{n} {sha}\n").as_bytes())
        }
        Service::Control => {
            let line = read_line(&mut conn)?;
            if line == "quit" {
                say("quit");
                end_vm(ports, 0);
            }
            conn.write_all(b"unknown command\n")
        }
    }
}

/// Accepts forever on `listener`, one thread per connection.
fn accept_loop(name: String, service: Service, listener: OwnedFd, ports: &'static File) {
    loop {
        match sys::accept(listener.as_raw_fd()) {
            Ok(fd) => {
                let conn = File::from(fd);
                let conn_name = name.clone();
                let spawned = std::thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn(move || {
                        if let Err(e) = serve(service, conn, ports) {
                            // A peer closing mid-stream is part of the tests; say so, once.
                            say(&format!("{conn_name}: connection ended: {e}"));
                        }
                    });
                if let Err(e) = spawned {
                    say(&format!("error: {name}: spawn: {e}"));
                }
            }
            Err(e) => {
                say(&format!("error: {name}: accept: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// One-shot clients

/// Calls `connect` until it succeeds or [`CLIENT_RETRY`] has passed (the host's listener
/// or the link may not be up yet).
fn connect_with_retry<T>(connect: impl Fn() -> io::Result<T>) -> io::Result<T> {
    let start = Instant::now();
    loop {
        match connect() {
            Ok(t) => return Ok(t),
            Err(_) if start.elapsed() < CLIENT_RETRY => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sends `n` pattern bytes on `conn` from a second thread while reading the echo back.
fn client(kind: &str, conn: File, n: u64) -> io::Result<()> {
    let mut writer = conn.try_clone()?;
    let sender = std::thread::spawn(move || -> io::Result<String> {
        let sha = send_pattern(&mut writer, n)?;
        sys::shutdown_write(writer.as_raw_fd())?;
        Ok(sha)
    });
    let mut reader = conn;
    let echoed = drain(&mut reader);
    let sent = sender
        .join()
        .map_err(|_| io::Error::other("sender thread panicked"))??;
    say(&format!("sent {kind} {n} sha256={sent}"));
    let (m, sha) = echoed?;
    say(&format!("echoed {kind} {m} sha256={sha}"));
    Ok(())
}

fn run_clients(params: &Params) -> Vec<std::thread::JoinHandle<()>> {
    let n = params.bytes;
    let host = params.host;
    let tcp = std::thread::spawn(move || {
        let addr = SocketAddrV4::new(host, TCP_HOST_ECHO);
        let result = connect_with_retry(|| TcpStream::connect(addr))
            .and_then(|s| client("tcp", File::from(OwnedFd::from(s)), n));
        if let Err(e) = result {
            say(&format!("error: tcp client to {addr}: {e}"));
        }
    });
    let vsock = std::thread::spawn(move || {
        let result = connect_with_retry(|| sys::vsock_connect(HOST_CID, VSOCK_HOST_ECHO))
            .and_then(|fd| client("vsock", File::from(fd), n));
        if let Err(e) = result {
            say(&format!(
                "error: vsock client to {HOST_CID}:{VSOCK_HOST_ECHO}: {e}"
            ));
        }
    });
    vec![tcp, vsock]
}

// ---------------------------------------------------------------------------------------
// Start and end

/// Ends the VM with `status` through the exit port, else by rebooting.
fn end_vm(ports: &File, status: u8) -> ! {
    // The tty sends asynchronously: let the console's last lines leave the guest first.
    let _ = rustix::termios::tcdrain(io::stdout());
    if let Err(e) = ports.write_at(&[status], EXIT_PORT) {
        say(&format!("error: write port {EXIT_PORT:#x}: {e}"));
    }
    let e = sys::reboot();
    say(&format!("error: reboot: {e}"));
    std::process::exit(i32::from(status))
}

const MOUNTS: [(&CStr, &CStr, &CStr, libc::c_ulong); 3] = [
    (
        c"proc",
        c"/proc",
        c"proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    (
        c"sysfs",
        c"/sys",
        c"sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    (c"devtmpfs", c"/dev", c"devtmpfs", libc::MS_NOSUID),
];

fn listen_tcp(port: u16) -> io::Result<OwnedFd> {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).map(OwnedFd::from)
}

fn fail(ports: Option<&File>, what: &str, e: &io::Error) -> ! {
    say(&format!("error: {what}: {e}"));
    match ports {
        Some(p) => end_vm(p, 1),
        None => {
            let e = sys::reboot();
            say(&format!("error: reboot: {e}"));
            std::process::exit(1)
        }
    }
}

fn main() {
    for (source, target, fstype, flags) in MOUNTS {
        match sys::mount(source, target, fstype, flags) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => fail(None, &format!("mount {}", target.to_string_lossy()), &e),
        }
    }
    let ports: &'static File = match OpenOptions::new().write(true).open("/dev/port") {
        Ok(f) => Box::leak(Box::new(f)),
        Err(e) => fail(None, "open /dev/port", &e),
    };
    let cmdline = std::fs::read_to_string("/proc/cmdline")
        .unwrap_or_else(|e| fail(Some(ports), "read /proc/cmdline", &e));
    let params = parse_cmdline(&cmdline);

    if let Err(e) = sys::configure_interface("lo", None) {
        fail(Some(ports), "configure lo", &e);
    }
    match params.addr {
        Some((addr, mask)) => {
            if let Err(e) = sys::configure_interface("eth0", Some((addr, mask))) {
                fail(Some(ports), "configure eth0", &e);
            }
            let prefix = u32::from(mask).leading_ones();
            say(&format!("eth0 {addr}/{prefix}, host {}", params.host));
        }
        None => say("eth0 not configured: no net_guest.addr= or ip= on the command line"),
    }

    let mut services: Vec<(String, Service, io::Result<OwnedFd>)> = Vec::new();
    for (port, service) in [
        (TCP_ECHO, Service::Echo),
        (TCP_SOURCE, Service::Source),
        (TCP_SINK, Service::Sink),
    ] {
        services.push((format!("tcp {port}"), service, listen_tcp(port)));
    }
    for (port, service) in [
        (VSOCK_ECHO, Service::Echo),
        (VSOCK_CONTROL, Service::Control),
        (VSOCK_SOURCE, Service::Source),
        (VSOCK_SINK, Service::Sink),
    ] {
        services.push((format!("vsock {port}"), service, sys::vsock_listen(port)));
    }
    let mut control = None;
    for (name, service, listener) in services {
        let listener =
            listener.unwrap_or_else(|e| fail(Some(ports), &format!("listen {name}"), &e));
        let thread = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || accept_loop(name, service, listener, ports));
        match thread {
            Ok(t) if matches!(service, Service::Control) => control = Some(t),
            Ok(_) => {}
            Err(e) => fail(Some(ports), "spawn a server thread", &e),
        }
    }
    say("ready");

    if params.bytes > 0 {
        for client in run_clients(&params) {
            let _ = client.join();
        }
    }
    if let Some(control) = control {
        let _ = control.join();
    }
    // The control thread never returns; should it, end the VM as a failure.
    end_vm(ports, 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_parsing() {
        let p = parse_cmdline(
            "console=ttyS0 ip=10.0.2.2::10.0.2.1:255.255.255.0::eth0:off net_guest.bytes=42",
        );
        assert_eq!(
            p.addr,
            Some((Ipv4Addr::new(10, 0, 2, 2), Ipv4Addr::new(255, 255, 255, 0)))
        );
        assert_eq!(p.host, Ipv4Addr::new(10, 0, 2, 1));
        assert_eq!(p.bytes, 42);
        let p = parse_cmdline(
            "net_guest.addr=192.168.5.7/16 net_guest.host=192.168.0.1 ip=10.0.2.2:::::eth0:off",
        );
        assert_eq!(
            p.addr,
            Some((Ipv4Addr::new(192, 168, 5, 7), Ipv4Addr::new(255, 255, 0, 0)))
        );
        assert_eq!(p.host, Ipv4Addr::new(192, 168, 0, 1));
        assert_eq!(p.bytes, 1 << 20);
        let p = parse_cmdline("net_guest.addr=bogus");
        assert_eq!(p.addr, None);
        assert_eq!(p.host, Ipv4Addr::new(10, 0, 2, 1));
    }

    #[test]
    fn pattern_is_offset_based() {
        let mut whole = vec![0u8; 1000];
        fill_pattern(5, &mut whole);
        let mut part = vec![0u8; 10];
        fill_pattern(105, &mut part);
        assert_eq!(&whole[100..110], &part[..]);
        assert_ne!(whole[0], whole[1]);
    }
}
