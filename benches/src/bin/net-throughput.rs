//! `net-throughput`: TCP throughput over virtio-net and over vsock, kestrel beside qemu's
//! userspace virtio-net (`-M microvm`, `vhost=off`), measured in one run.
//!
//! ```text
//! cargo run --release -p kestrel-benches --bin net-throughput -- [--bytes N] [--runs R]
//!     [--kestrel PATH] [--qemu PATH] [--assets DIR]
//! ```
//!
//! 1. Builds the release `kestrel` and the network test initramfs
//!    (`tests/images/net-guest/build.sh`: `net-guest` as /init, see its docs for the
//!    services), and makes a network namespace `kestrel-bench-net-<pid>` (deleted at the
//!    end, also on panic) in which everything below happens; no packet leaves the host.
//! 2. **kestrel**: `kestrel run --kernel vmlinux --initrd <net-guest> --net tap=tapk
//!    --vsock cid=3,socket=…`, 1 vCPU, 128 MiB. Once `net-guest: ready` is on the
//!    console: TCP guest→host (the guest's *source* on 7002 sends N bytes), TCP
//!    host→guest (the *sink* on 7003 reads N bytes and answers with the count), then the
//!    same over vsock (ports 5003 and 5004 through the hybrid Unix socket). Each is timed
//!    from the request to the last byte (source) or to the sink's answer, R times; then
//!    `quit` on the control port ends the VM.
//! 3. **qemu** (if installed): the same kernel, initramfs and command line under
//!    `qemu-system-x86_64 -M microvm -enable-kvm -cpu host,-arch-capabilities` with
//!    `-netdev tap,ifname=tapq,vhost=off -device virtio-net-device`, the same TCP
//!    measurements. qemu has no userspace vsock without vhost, so vsock is compared with
//!    the host's own loopback TCP (the ceiling any vsock bridge to Unix sockets can reach).
//! 4. Prints MB/s (10^6 bytes/s; medians when R > 1) and the ratios kestrel/qemu (target:
//!    ≥ 1.0) and kestrel vsock/loopback.
//!
//! Sizes: on kvm_pvm hosts guest kernel code is emulated (docs/kvm-pvm.md) and a guest TCP
//! stream moves ~0.1–0.5 MB/s, so N defaults to 4 MiB there (1 GiB elsewhere); R defaults
//! to 1 (3 elsewhere). The loopback ceiling always moves at least 512 MiB.
//!
//! On a kvm_pvm host both VMMs' guests get `noxsave clearcpuid=…` (kestrel adds it by
//! itself; qemu gets it on its command line, the same string as
//! `vmm::arch::cpuid::PVM_KERNEL_PARAMS`).
//!
//! Needs root, `ip`, /dev/net/tun and /dev/kvm; exits non-zero only when kestrel itself
//! could not be measured.

// A bench tool, not product code: an `expect("what")` on a harness invariant is clearer
// than plumbing errors, and the measurement path returns errors with context anyway.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kestrel_benches::{
    build_kestrel, own_target_dir, qemu_linux_args, version_line, which, workspace_root, HostFacts,
    Summary, Table, GUEST_CMDLINE,
};

const USAGE: &str =
    "usage: net-throughput [--bytes N] [--runs R] [--kestrel PATH] [--qemu PATH] [--assets DIR]
  --bytes N       bytes per transfer (default 4 MiB on kvm_pvm hosts, 1 GiB elsewhere)
  --runs R        transfers per direction and VMM (default 1 on kvm_pvm hosts, 3 elsewhere)
  --kestrel PATH  measure this kestrel binary instead of building the release one
  --qemu PATH     the baseline (default: qemu-system-x86_64 on $PATH)
  --assets DIR    where vmlinux is (default: $KESTREL_ASSETS, ~/.cache/kestrel/assets)";

/// kestrel's default guest command line plus the guest's address (what net-guest reads).
fn cmdline() -> String {
    format!("{GUEST_CMDLINE} ip=10.0.2.2::10.0.2.1:255.255.255.0::eth0:off net_guest.bytes=0")
}

const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const TCP_SOURCE: u16 = 7002;
const TCP_SINK: u16 = 7003;
const VSOCK_SOURCE: u32 = 5003;
const VSOCK_SINK: u32 = 5004;
const VSOCK_CONTROL: u32 = 5002;
const BUF: usize = 256 * 1024;
/// Boot, each transfer and the exit give up after this long.
const DEADLINE: Duration = Duration::from_secs(600);

struct Options {
    bytes: Option<u64>,
    runs: Option<usize>,
    kestrel: Option<PathBuf>,
    qemu: Option<PathBuf>,
    assets: Option<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        bytes: None,
        runs: None,
        kestrel: None,
        qemu: None,
        assets: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--bytes" => {
                let v = value()?;
                o.bytes = Some(v.parse().map_err(|_| format!("--bytes {v:?}"))?);
            }
            "--runs" => {
                let v = value()?;
                o.runs = Some(
                    v.parse::<usize>()
                        .map_err(|_| format!("--runs {v:?}"))?
                        .max(1),
                );
            }
            "--kestrel" => o.kestrel = Some(value()?.into()),
            "--qemu" => o.qemu = Some(value()?.into()),
            "--assets" => o.assets = Some(value()?.into()),
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------
// Namespace and VM

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace, deleted on drop.
struct NetNs(String);

impl NetNs {
    fn create() -> Result<NetNs, String> {
        let name = format!("kestrel-bench-net-{}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = NetNs(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"])?;
        let f = File::open(format!("/run/netns/{}", ns.0)).map_err(|e| e.to_string())?;
        // SAFETY: setns(2) with a descriptor we own; changes only this thread's namespace
        // (and that of threads and children it creates afterwards).
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", io::Error::last_os_error()));
        }
        Ok(ns)
    }

    /// A fresh tap `name` with 10.0.2.1/24 (after removing the previous VMM's tap).
    fn tap(&self, name: &str, previous: Option<&str>) -> Result<(), String> {
        if let Some(p) = previous {
            let _ = ip(&["-n", &self.0, "link", "del", p]);
        }
        ip(&["-n", &self.0, "tuntap", "add", "dev", name, "mode", "tap"])?;
        ip(&["-n", &self.0, "addr", "add", "10.0.2.1/24", "dev", name])?;
        ip(&["-n", &self.0, "link", "set", name, "up"])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

type Console = Arc<(Mutex<String>, Condvar)>;

/// A VMM child with its console collected; killed on drop unless it has exited.
struct Vm {
    child: Child,
    console: Console,
    stderr: PathBuf,
}

impl Vm {
    fn spawn(mut cmd: Command, stderr: PathBuf) -> Result<Vm, String> {
        let err = File::create(&stderr).map_err(|e| e.to_string())?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn {cmd:?}: {e}"))?;
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
        Ok(Vm {
            child,
            console,
            stderr,
        })
    }

    fn tail(&self) -> String {
        let console = self.console.0.lock().unwrap().clone();
        let lines: Vec<&str> = console.lines().collect();
        let start = lines.len().saturating_sub(15);
        format!(
            "console tail:\n{}\nstderr: {}",
            lines.get(start..).unwrap_or_default().join("\n"),
            std::fs::read_to_string(&self.stderr)
                .unwrap_or_default()
                .trim()
        )
    }

    fn wait_ready(&mut self) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            {
                let (text, cv) = &*self.console;
                let guard = text.lock().unwrap();
                if guard.contains("net-guest: ready") {
                    return Ok(start.elapsed());
                }
                if guard.contains("net-guest: error:") {
                    drop(guard);
                    return Err(format!("the guest failed\n{}", self.tail()));
                }
                let _ = cv.wait_timeout(guard, Duration::from_millis(500)).unwrap();
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                return Err(format!("exited ({s}) before ready\n{}", self.tail()));
            }
            if start.elapsed() > DEADLINE {
                return Err(format!("not ready after {DEADLINE:?}\n{}", self.tail()));
            }
        }
    }

    /// CPU seconds (user + system) per thread of the VMM process, by thread name.
    fn thread_cpu(&self) -> Vec<(String, f64)> {
        // SAFETY: sysconf(2) takes no pointers.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let dir = format!("/proc/{}/task", self.child.id());
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "tid (comm) state ..." — comm may hold spaces; fields after ')' are fixed.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = stat.get(open + 1..close).unwrap_or_default().to_owned();
            let fields: Vec<&str> = stat
                .get(close + 2..)
                .unwrap_or_default()
                .split(' ')
                .collect();
            // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after state.
            let ticks = |i: usize| {
                fields
                    .get(i)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            out.push((comm, (ticks(11) + ticks(12)) / hz));
        }
        out
    }

    fn wait_exit(&mut self) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
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
// Transfers

fn set_timeouts(s: &impl AsRawFd, t: Duration) {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: setsockopt(2) reads a `timeval` of the given size from a live local.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
    }
}

/// A source: asks for `n` bytes, reads them to EOF. Returns MB/s.
fn from_source<S: Read + Write + AsRawFd>(mut s: S, n: u64) -> io::Result<f64> {
    set_timeouts(&s, DEADLINE);
    let start = Instant::now();
    s.write_all(format!("{n}\n").as_bytes())?;
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf)? {
            0 => break,
            k => total += k as u64,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if total != n {
        return Err(io::Error::other(format!("got {total} of {n} bytes")));
    }
    Ok(n as f64 / secs / 1e6)
}

/// A sink: sends `n` bytes, half-closes, waits for the count. Returns MB/s.
fn to_sink<S: Read + Write + AsRawFd>(
    mut s: S,
    n: u64,
    shut: impl Fn(&S) -> io::Result<()>,
) -> io::Result<f64> {
    set_timeouts(&s, DEADLINE);
    let buf = vec![0x5au8; BUF];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < n {
        let len = (n - sent).min(BUF as u64) as usize;
        s.write_all(buf.get(..len).unwrap_or_default())?;
        sent += len as u64;
    }
    shut(&s)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let secs = start.elapsed().as_secs_f64();
    let count = answer.split_whitespace().next().unwrap_or_default();
    if count != n.to_string() {
        return Err(io::Error::other(format!(
            "the sink answered {answer:?} for {n} bytes"
        )));
    }
    Ok(n as f64 / secs / 1e6)
}

fn tcp(port: u16) -> io::Result<TcpStream> {
    TcpStream::connect_timeout(
        &SocketAddrV4::new(GUEST_IP, port).into(),
        Duration::from_secs(60),
    )
}

fn vsock(socket: &Path, port: u32) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(socket)?;
    set_timeouts(&s, Duration::from_secs(60));
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte)? == 1 && byte != *b"\n" {
        line.extend_from_slice(&byte);
    }
    if !line.starts_with(b"OK ") {
        return Err(io::Error::other(format!(
            "CONNECT {port}: {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    Ok(s)
}

/// What one VMM achieved: MB/s samples per measurement.
#[derive(Default)]
struct Rates {
    tcp_g2h: Vec<f64>,
    tcp_h2g: Vec<f64>,
    vsock_g2h: Vec<f64>,
    vsock_h2g: Vec<f64>,
}

fn measure(
    name: &str,
    rates: &mut Rates,
    vsock_socket: Option<&Path>,
    n: u64,
    runs: usize,
) -> Result<(), String> {
    let e = |what: &str| {
        let what = what.to_owned();
        move |err: io::Error| format!("{name} {what}: {err}")
    };
    for run in 1..=runs {
        let r = tcp(TCP_SOURCE)
            .and_then(|s| from_source(s, n))
            .map_err(e("tcp guest→host"))?;
        println!("  {name} run {run}: tcp guest→host {r:.2} MB/s");
        rates.tcp_g2h.push(r);
        let r = tcp(TCP_SINK)
            .and_then(|s| to_sink(s, n, |s| s.shutdown(Shutdown::Write)))
            .map_err(e("tcp host→guest"))?;
        println!("  {name} run {run}: tcp host→guest {r:.2} MB/s");
        rates.tcp_h2g.push(r);
        if let Some(sock) = vsock_socket {
            let r = vsock(sock, VSOCK_SOURCE)
                .and_then(|s| from_source(s, n))
                .map_err(e("vsock guest→host"))?;
            println!("  {name} run {run}: vsock guest→host {r:.2} MB/s");
            rates.vsock_g2h.push(r);
            let r = vsock(sock, VSOCK_SINK)
                .and_then(|s| to_sink(s, n, |s| s.shutdown(Shutdown::Write)))
                .map_err(e("vsock host→guest"))?;
            println!("  {name} run {run}: vsock host→guest {r:.2} MB/s");
            rates.vsock_h2g.push(r);
        }
    }
    Ok(())
}

/// The host's loopback TCP, both directions, `n` bytes: (send-from-server MB/s,
/// send-from-client MB/s) medians of `runs`.
fn loopback(n: u64, runs: usize) -> io::Result<(Vec<f64>, Vec<f64>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    // The server plays net-guest's source and sink on alternate connections.
    std::thread::spawn(move || {
        for (i, conn) in listener.incoming().enumerate() {
            let Ok(mut c) = conn else { return };
            let mut buf = vec![0x5au8; BUF];
            if i % 2 == 0 {
                let mut line = [0u8; 32];
                let k = c.read(&mut line).unwrap_or(0);
                let want: u64 = String::from_utf8_lossy(line.get(..k).unwrap_or_default())
                    .trim()
                    .parse()
                    .unwrap_or(0);
                let mut sent = 0;
                while sent < want {
                    let len = (want - sent).min(BUF as u64) as usize;
                    if c.write_all(buf.get(..len).unwrap_or_default()).is_err() {
                        break;
                    }
                    sent += len as u64;
                }
            } else {
                let mut total = 0u64;
                while let Ok(k) = c.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    total += k as u64;
                }
                let _ = c.write_all(format!("{total} -\n").as_bytes());
            }
        }
    });
    let (mut from, mut to) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        from.push(from_source(TcpStream::connect(addr)?, n)?);
        to.push(to_sink(TcpStream::connect(addr)?, n, |s| {
            s.shutdown(Shutdown::Write)
        })?);
    }
    Ok((from, to))
}

// ---------------------------------------------------------------------------------------
// Main

fn assets_dir(opts: &Options) -> PathBuf {
    opts.assets
        .clone()
        .or_else(|| std::env::var_os("KESTREL_ASSETS").map(PathBuf::from))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/kestrel/assets")
        })
}

fn net_guest_initramfs(target_dir: &Path) -> Result<PathBuf, String> {
    let script = workspace_root().join("tests/images/net-guest/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("CARGO_TARGET_DIR", target_dir)
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .ok_or_else(|| "build.sh printed no initramfs".into())
}

/// Prints the CPU seconds each VMM thread spent during the measurements (same-named
/// threads summed): where a VMM's time goes when the guest is the bottleneck.
fn print_cpu(name: &str, before: &[(String, f64)], after: &[(String, f64)]) {
    let total = |v: &[(String, f64)], comm: &str| {
        v.iter()
            .filter(|(c, _)| c == comm)
            .map(|(_, s)| s)
            .sum::<f64>()
    };
    let mut names: Vec<&String> = after.iter().map(|(c, _)| c).collect();
    names.sort();
    names.dedup();
    let parts: Vec<String> = names
        .iter()
        .map(|c| format!("{c} {:.1} s", total(after, c) - total(before, c)))
        .collect();
    println!(
        "  {name} CPU during the transfers, by thread: {}",
        parts.join(", ")
    );
}

fn fmt(s: Option<Summary>) -> String {
    match s {
        Some(s) if s.n > 1 => format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max),
        Some(s) => format!("{:.2}", s.median),
        None => "-".into(),
    }
}

fn ratio(a: Option<Summary>, b: Option<Summary>) -> String {
    kestrel_benches::ratio(a, b)
}

fn run(opts: &Options) -> Result<bool, String> {
    let host = HostFacts::probe();
    println!("kestrel net-throughput bench");
    println!("{}", host.describe());
    for (ok, what) in [
        (Path::new("/dev/net/tun").exists(), "/dev/net/tun"),
        (which("ip").is_some(), "ip (iproute2)"),
        (Path::new("/dev/kvm").exists(), "/dev/kvm"),
    ] {
        if !ok {
            return Err(format!("{what} is missing"));
        }
    }
    let n = opts
        .bytes
        .unwrap_or(if host.kvm_pvm { 4 << 20 } else { 1 << 30 });
    let runs = opts.runs.unwrap_or(if host.kvm_pvm { 1 } else { 3 });
    let target_dir = own_target_dir().map_err(|e| e.to_string())?;
    let work = target_dir.join("kestrel-benches").join("net-throughput");
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let kestrel = match &opts.kestrel {
        Some(k) => k.clone(),
        None => build_kestrel(&target_dir).map_err(|e| format!("building kestrel: {e}"))?,
    };
    let initramfs = net_guest_initramfs(&target_dir)?;
    let vmlinux = assets_dir(opts).join("vmlinux");
    if !vmlinux.is_file() {
        return Err(format!(
            "{} missing (scripts/build-guest.sh)",
            vmlinux.display()
        ));
    }
    let qemu = opts
        .qemu
        .clone()
        .or_else(|| which("qemu-system-x86_64"))
        .filter(|q| q.is_file());
    println!("kestrel: {}", kestrel.display());
    match &qemu {
        Some(q) => println!("baseline: {} ({})", q.display(), version_line(q)),
        None => println!("skipped baseline: qemu-system-x86_64 not installed"),
    }
    println!(
        "kernel {}, initramfs {}, {n} bytes per transfer, {runs} run(s) per direction",
        vmlinux.display(),
        initramfs.display()
    );
    let ns = NetNs::create()?;

    // kestrel
    ns.tap("tapk", None)?;
    let socket = work.join(format!("v-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0])
        .arg(&kestrel)
        .arg("run")
        .arg("--kernel")
        .arg(&vmlinux)
        .arg("--initrd")
        .arg(&initramfs)
        .args(["--cmdline", &cmdline(), "--net", "tap=tapk", "--vsock"])
        .arg(format!("cid=3,socket={}", socket.display()));
    let mut vm = Vm::spawn(cmd, work.join("kestrel.stderr"))?;
    let ready = vm.wait_ready().map_err(|e| format!("kestrel: {e}"))?;
    println!("kestrel guest ready after {:.1} s", ready.as_secs_f64());
    let mut k = Rates::default();
    let before = vm.thread_cpu();
    measure("kestrel", &mut k, Some(&socket), n, runs)
        .map_err(|e| format!("{e}\n{}", vm.tail()))?;
    print_cpu("kestrel", &before, &vm.thread_cpu());
    if let Ok(mut c) = vsock(&socket, VSOCK_CONTROL) {
        let _ = c.write_all(b"quit\n");
    }
    let status = vm.wait_exit();
    println!("kestrel exit status {status:?}");
    drop(vm);
    let _ = std::fs::remove_file(&socket);

    // qemu
    let mut q = Rates::default();
    if let Some(qemu) = &qemu {
        ns.tap("tapq", Some("tapk"))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.0])
            .arg(qemu)
            .args(qemu_linux_args(
                "",
                host.kvm_pvm,
                &vmlinux,
                &initramfs,
                &cmdline(),
            ))
            .args([
                "-netdev",
                "tap,id=n0,ifname=tapq,script=no,downscript=no,vhost=off",
                "-device",
                "virtio-net-device,netdev=n0",
            ]);
        match Vm::spawn(cmd, work.join("qemu.stderr")) {
            Ok(mut vm) => match vm.wait_ready() {
                Ok(ready) => {
                    println!("qemu guest ready after {:.1} s", ready.as_secs_f64());
                    let before = vm.thread_cpu();
                    if let Err(e) = measure("qemu", &mut q, None, n, runs) {
                        println!("qemu: {e}\n{}", vm.tail());
                    }
                    print_cpu("qemu", &before, &vm.thread_cpu());
                    // No vsock to send `quit` on: qemu is killed on drop.
                }
                Err(e) => println!("qemu: {e}"),
            },
            Err(e) => println!("qemu: {e}"),
        }
    }

    let loop_n = n.max(512 << 20);
    let (lo_from, lo_to) = loopback(loop_n, runs.max(3)).map_err(|e| format!("loopback: {e}"))?;

    let s = |v: &[f64]| Summary::of(v);
    let mut t = Table::new(&[
        "MB/s",
        "kestrel",
        "qemu (userspace virtio-net)",
        "kestrel/qemu",
    ]);
    t.row(vec![
        "TCP over virtio-net, guest→host".into(),
        fmt(s(&k.tcp_g2h)),
        fmt(s(&q.tcp_g2h)),
        ratio(s(&k.tcp_g2h), s(&q.tcp_g2h)),
    ]);
    t.row(vec![
        "TCP over virtio-net, host→guest".into(),
        fmt(s(&k.tcp_h2g)),
        fmt(s(&q.tcp_h2g)),
        ratio(s(&k.tcp_h2g), s(&q.tcp_h2g)),
    ]);
    println!();
    print!("{}", t.render());
    let mut t = Table::new(&[
        "MB/s",
        "kestrel vsock",
        "host loopback TCP",
        "vsock/loopback",
    ]);
    t.row(vec![
        "guest→host".into(),
        fmt(s(&k.vsock_g2h)),
        fmt(s(&lo_from)),
        ratio(s(&k.vsock_g2h), s(&lo_from)),
    ]);
    t.row(vec![
        "host→guest".into(),
        fmt(s(&k.vsock_h2g)),
        fmt(s(&lo_to)),
        ratio(s(&k.vsock_h2g), s(&lo_to)),
    ]);
    println!();
    print!("{}", t.render());
    for (what, a, b) in [
        ("guest→host", s(&k.tcp_g2h), s(&q.tcp_g2h)),
        ("host→guest", s(&k.tcp_h2g), s(&q.tcp_h2g)),
    ] {
        if let (Some(a), Some(b)) = (a, b) {
            let verdict = if a.median >= b.median { "PASS" } else { "MISS" };
            println!(
                "target net {what} ≥ 1.0× qemu: {verdict} ({:.2})",
                a.median / b.median
            );
        }
    }
    println!(
        "\nloopback moved {loop_n} bytes per transfer; all numbers were measured in this run. \
         loadavg at end: {}",
        HostFacts::probe().loadavg
    );
    Ok(!k.tcp_g2h.is_empty())
}

fn main() -> ExitCode {
    kestrel_benches::bench_main(
        "net-throughput",
        USAGE,
        "no valid kestrel run; see the failures above",
        parse_args,
        run,
    )
}
