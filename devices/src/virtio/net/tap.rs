//! A Linux tap interface in `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` mode: every read and write
//! is one Ethernet frame preceded by a 12-byte `virtio_net_hdr_v1`, so frames pass between
//! the guest's queues and the tap without translation.
//!
//! Headers are little-endian (virtio 1.x) and so is the tap's default on the x86_64 hosts
//! kestrel runs on; a big-endian host would need `TUNSETVNETLE`.
//!
//! The only `unsafe` of the `devices` crate lives here (the tun ioctls, `if_nametoindex`,
//! and `setns` in the tests); every block carries a `// SAFETY:` comment.
//!
//! # Network namespaces and who deletes the interface
//!
//! A tap fd is bound to the network namespace of the thread that **opened `/dev/net/tun`**,
//! whatever namespace later uses it. The shim therefore opens the tap with its thread in the
//! pod's namespace (`setns`), or opens it there earlier and passes the fd to
//! [`Tap::from_fd`]. The fd may then be used from any thread (the VMM thread reads and
//! writes it).
//!
//! - [`Tap::open`] attaches to an **existing** interface (normally a persistent tap that the
//!   shim's networking code or CNI created). Whoever created it deletes it; dropping the
//!   `Tap` only detaches.
//! - [`Tap::create`] makes a **new, non-persistent** interface; the kernel deletes it when
//!   its last fd closes, i.e. when the `Tap` (and the device owning it) is dropped.
//! - [`Tap::from_fd`] adopts an fd that is already attached; the interface's lifetime is the
//!   creator's business as above (non-persistent: gone with the last fd).
//!
//! Runs on the thread that builds the device (opening) and on the **VMM thread** (reads,
//! writes, `TUNSETOFFLOAD` when the guest activates the device).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::backend::NetBackend;
use super::VNET_HDR_LEN;

const TUN_PATH: &str = "/dev/net/tun";
/// IFNAMSIZ: names are at most 15 bytes plus the NUL.
const IFNAMSIZ: usize = libc::IFNAMSIZ;

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {name:?} is empty, longer than 15 bytes or contains a NUL or '/'")]
    InvalidName { name: String },
    #[error("no network interface named {name:?} in this network namespace")]
    NotFound { name: String },
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("TUNSETIFF {name:?} failed")]
    SetIff {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TUNGETIFF failed: the fd is not an attached tun/tap")]
    GetIff(#[source] io::Error),
    #[error("the fd is a tun/tap with flags {flags:#x}, not IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")]
    WrongMode { flags: u16 },
    #[error("cannot make the tap nonblocking")]
    NonBlocking(#[source] io::Error),
    #[error("TUNSETVNETHDRSZ failed")]
    SetVnetHdrSize(#[source] io::Error),
    #[error("TUNSETOFFLOAD {flags:#x} failed")]
    SetOffload {
        flags: u32,
        #[source]
        source: io::Error,
    },
}

/// An open tap interface. Reads and writes are nonblocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

const MODE: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// A zeroed `struct ifreq` carrying `name` (already validated).
fn ifreq_with_name(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data (a name array and a union of integers, sockaddrs and
    // a pointer); all-zero bytes are a valid value of each of them.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

/// The NUL-terminated name the kernel put into `req`.
fn name_of(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty() && name.len() < IFNAMSIZ && !name.contains(['\0', '/']);
    if ok {
        Ok(())
    } else {
        Err(TapError::InvalidName {
            name: name.to_owned(),
        })
    }
}

/// Whether an interface called `name` exists in the calling thread's network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(c_name) = CString::new(name) else {
        return false;
    };
    // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call; the function
    // only reads it and returns 0 when there is no such interface.
    unsafe { libc::if_nametoindex(c_name.as_ptr()) != 0 }
}

/// `ioctl(fd, request, arg)` for requests whose argument is a pointer to `T`.
///
/// # Safety
///
/// `request` must be a tun ioctl whose argument is a `T` the kernel reads or writes in place,
/// and `T` must have the layout that ioctl expects.
unsafe fn ioctl_ptr<T>(fd: &impl AsRawFd, request: libc::Ioctl, arg: &mut T) -> io::Result<()> {
    // SAFETY: the caller guarantees that `request` takes a pointer to a `T`; `arg` is a live,
    // exclusive reference for the whole call, and the fd is open.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(arg)) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Attaches to the existing tap `name` in the calling thread's network namespace.
    /// Fails with [`TapError::NotFound`] rather than creating one.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        // TUNSETIFF would create a missing interface; look first. A tap deleted between the
        // check and the ioctl is recreated as a non-persistent one that goes away with us.
        if !interface_exists(name) {
            return Err(TapError::NotFound {
                name: name.to_owned(),
            });
        }
        Tap::attach(name, 0)
    }

    /// Creates a new non-persistent tap `name` (a `%d` in the name lets the kernel pick a
    /// number; [`Tap::name`] tells the result). Fails if the interface already exists. The
    /// kernel deletes it when the `Tap` is dropped. Needs CAP_NET_ADMIN.
    pub fn create(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        Tap::attach(name, libc::IFF_TUN_EXCL)
    }

    fn attach(name: &str, extra_flags: libc::c_int) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let mut req = ifreq_with_name(name);
        // The flags are a 16-bit field; IFF_TUN_EXCL (0x8000) is its sign bit.
        req.ifr_ifru.ifru_flags = (MODE | extra_flags) as u16 as libc::c_short;
        // SAFETY: TUNSETIFF takes a `struct ifreq`, which `req` is; the fd is /dev/net/tun.
        unsafe { ioctl_ptr(&file, libc::TUNSETIFF, &mut req) }.map_err(|source| {
            TapError::SetIff {
                name: name.to_owned(),
                source,
            }
        })?;
        let tap = Tap {
            file,
            name: name_of(&req),
        };
        tap.configure()?;
        Ok(tap)
    }

    /// Adopts `fd`, a `/dev/net/tun` fd already attached to a tap with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (opened by the shim inside the pod's namespace,
    /// for instance). Makes it nonblocking and sets the header size.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let file = File::from(fd);
        let mut req = ifreq_with_name("");
        // SAFETY: TUNGETIFF fills a `struct ifreq`, which `req` is. On an fd that is not a
        // tun fd the ioctl fails (ENOTTY/EBADFD) without touching `req`.
        unsafe { ioctl_ptr(&file, libc::TUNGETIFF, &mut req) }.map_err(TapError::GetIff)?;
        // SAFETY: TUNGETIFF wrote `ifru_flags`; every bit pattern is a valid c_short.
        let flags = unsafe { req.ifr_ifru.ifru_flags } as u16;
        let want = MODE as u16;
        if flags & want != want {
            return Err(TapError::WrongMode { flags });
        }
        let tap = Tap {
            file,
            name: name_of(&req),
        };
        tap.set_nonblocking()?;
        tap.configure()?;
        Ok(tap)
    }

    /// Header size and no offloads until a guest acknowledges some.
    fn configure(&self) -> Result<(), TapError> {
        let mut size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads a `c_int`, which `size` is; the fd is a tun fd.
        unsafe { ioctl_ptr(&self.file, libc::TUNSETVNETHDRSZ, &mut size) }
            .map_err(TapError::SetVnetHdrSize)?;
        self.set_offload(0)
    }

    fn set_nonblocking(&self) -> Result<(), TapError> {
        let fd = self.file.as_raw_fd();
        // SAFETY: F_GETFL on an open fd takes no argument and only returns the flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(TapError::NonBlocking(io::Error::last_os_error()));
        }
        if flags & libc::O_NONBLOCK != 0 {
            return Ok(());
        }
        // SAFETY: F_SETFL on an open fd takes an int of file status flags.
        let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
        if ret < 0 {
            return Err(TapError::NonBlocking(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The tap's fd, for [`Tap::from_fd`] elsewhere (a tap created in a pod's namespace,
    /// handed to the VM's builder).
    pub fn into_fd(self) -> OwnedFd {
        self.file.into()
    }

    /// The interface name (as the kernel reports it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `TUNSETOFFLOAD`: the `TUN_F_*` offloads the reader (the guest) accepts, i.e. which
    /// partial-checksum and GSO frames the kernel may hand us. See
    /// [`tap_offload_flags`](super::device::tap_offload_flags).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // TUNSETOFFLOAD takes its argument by value, not through a pointer.
        // SAFETY: the fd is a tun fd; the ioctl reads no memory.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(TapError::SetOffload {
                flags,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags).map_err(io::Error::other)
    }
}

/// A network namespace made for a test, deleted on drop, and a way to run code in it.
#[cfg(test)]
pub(crate) mod test_netns {
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// `ip netns add kestrel-test-<pid>-<n>`; `ip netns del` on drop.
    pub struct TestNetns {
        pub name: String,
    }

    fn ip(args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    impl TestNetns {
        /// A fresh namespace, or why one cannot be made here (the caller prints
        /// `skipped: <reason>`).
        pub fn new() -> Result<TestNetns, String> {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            if !std::path::Path::new("/dev/net/tun").exists() {
                return Err("/dev/net/tun is missing".into());
            }
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let name = format!("kestrel-test-{}-{n}", std::process::id());
            ip(&["netns", "add", &name])
                .map_err(|e| format!("no CAP_NET_ADMIN or no ip netns ({e})"))?;
            Ok(TestNetns { name })
        }

        /// Runs an `ip` command inside the namespace (`ip -n <ns> ...`).
        pub fn ip(&self, args: &[&str]) {
            let mut all = vec!["-n", self.name.as_str()];
            all.extend_from_slice(args);
            if let Err(e) = ip(&all) {
                panic!("{e}");
            }
        }

        /// Runs `f` on a new thread that has joined the namespace; fds it opens (a tap, a
        /// socket) stay bound to the namespace wherever they are used afterwards.
        pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
            let path = format!("/var/run/netns/{}", self.name);
            std::thread::spawn(move || {
                let ns = File::open(&path).unwrap();
                // SAFETY: `ns` is an open network-namespace file; setns only changes this
                // (short-lived, test-only) thread's namespace.
                let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = ip(&["netns", "del", &self.name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::test_netns::TestNetns;
    use super::*;

    #[test]
    fn names_are_validated_without_privileges() {
        for bad in ["", "0123456789abcdef", "a/b", "a\0b"] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::InvalidName { .. })),
                "{bad:?}"
            );
            assert!(matches!(
                Tap::create(bad),
                Err(TapError::InvalidName { .. })
            ));
        }
        assert!(check_name("0123456789abcde").is_ok());
        // A name that does not exist is not created by `open`.
        assert!(matches!(
            Tap::open("kestrel-nope0"),
            Err(TapError::NotFound { .. })
        ));
    }

    #[test]
    fn from_fd_refuses_what_is_not_a_tap() {
        let f = File::open("/dev/null").unwrap();
        assert!(matches!(
            Tap::from_fd(OwnedFd::from(f)),
            Err(TapError::GetIff(_))
        ));
    }

    /// A broadcast ARP request "who has 10.77.0.1, tell 10.77.0.2" from 02:00:00:00:00:02.
    pub(crate) fn arp_request() -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        f.extend_from_slice(&[0x08, 0x06]); // ARP
        f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 10, 77, 0, 2]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 77, 0, 1]);
        f
    }

    #[test]
    fn real_tap_in_a_private_netns() {
        let ns = match TestNetns::new() {
            Ok(ns) => ns,
            Err(reason) => {
                kestrel_test_support::skip(reason);
                return;
            }
        };
        // Created in the namespace: never visible (or routed) outside it.
        let mut tap = ns.run(|| Tap::create("kt%d")).unwrap();
        assert!(tap.name().starts_with("kt"), "{}", tap.name());
        // Creating it again fails; `open` of a missing name does not create it.
        let name = tap.name().to_owned();
        let again = name.clone();
        assert!(matches!(
            ns.run(move || Tap::create(&again)),
            Err(TapError::SetIff { .. })
        ));
        assert!(matches!(
            ns.run(|| Tap::open("kt-missing")),
            Err(TapError::NotFound { .. })
        ));
        // Every offload combination the device maps to is accepted.
        use libc::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO};
        for flags in [
            0,
            TUN_F_CSUM,
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO,
        ] {
            tap.set_offload(flags).unwrap();
        }
        assert!(matches!(
            tap.set_offload(0x8000_0000),
            Err(TapError::SetOffload { .. })
        ));
        tap.set_offload(0).unwrap();

        ns.ip(&["link", "set", &name, "up"]);
        ns.ip(&["addr", "add", "10.77.0.1/24", "dev", &name]);

        let mut buf = vec![0u8; 65_600];
        // The guest side asks for 10.77.0.1; the namespace's kernel answers on the tap.
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend_from_slice(&arp_request());
        assert_eq!(tap.write_frame(&frame).unwrap(), frame.len());
        let deadline = Instant::now() + Duration::from_secs(5);
        let reply = loop {
            match tap.read_frame(&mut buf) {
                Ok(n) => {
                    let f = &buf[VNET_HDR_LEN..n];
                    // ARP reply (opcode 2) to our MAC.
                    if f.len() >= 22 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                        break f.to_vec();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no ARP reply from the tap");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("tap read: {e}"),
            }
        };
        assert_eq!(&reply[..6], &[0x02, 0, 0, 0, 0, 0x02]);
        assert_eq!(&reply[28..32], &[10, 77, 0, 1]);

        // A duplicate of the fd, adopted as the shim would pass one in.
        let fd = OwnedFd::from(tap.file.try_clone().unwrap());
        let adopted = Tap::from_fd(fd).unwrap();
        assert_eq!(adopted.name(), name);

        // A persistent tap made by `ip tuntap` is attached with `open` and survives us.
        ns.ip(&["tuntap", "add", "ktp0", "mode", "tap", "vnet_hdr"]);
        let persistent = ns.run(|| Tap::open("ktp0")).unwrap();
        assert_eq!(persistent.name(), "ktp0");
        drop(persistent);
        ns.ip(&["link", "show", "ktp0"]);
    }
}
