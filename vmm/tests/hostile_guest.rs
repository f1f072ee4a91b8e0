//! Layer 2: hostile guests. `tests/payloads/storm.S` storms every virtio-mmio window (a
//! disk, a tap-backed NIC, vsock, rng) and the I/O ports with seeded garbage: random
//! register writes and reads, devices set up with random features and queue sizes and
//! addresses, pages of looping, out-of-range, huge, zero-length and indirect descriptor
//! chains with available indexes anywhere, notification bursts and interrupt
//! acknowledgements. The VMM must never panic, must end the VM as the guest asks, must
//! answer Stop while a storm goes on, must keep a second VM beside it unaffected, and must
//! keep its guest-triggered warnings rate-limited.
//!
//! Without a usable /dev/kvm (or /dev/net/tun) every test prints `skipped: <reason>`.

// Test code: a failed setup step should panic with its cause.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use devices::disk::raw::RawFile;
use vmm::{start_vm, DiskConfig, NetConfig, TapSource, VmAction, VmConfig, VmExit, VsockConfig};

#[path = "payloads/assemble.rs"]
mod assemble;

/// How many seeded storms the first test runs.
const SEEDS: u32 = 4;

fn unavailable() -> Option<String> {
    for dev in ["/dev/kvm", "/dev/net/tun"] {
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
            return Some(format!("{dev} not usable: {e}"));
        }
    }
    None
}

macro_rules! require_devices {
    () => {
        if let Some(why) = unavailable() {
            kestrel_test_support::skip(why);
            return;
        }
    };
}

/// Counts warnings and errors by module, and panics anywhere in the process.
struct Counter {
    by_target: Mutex<BTreeMap<String, u64>>,
}

impl log::Log for Counter {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            *self
                .by_target
                .lock()
                .unwrap()
                .entry(r.target().to_string())
                .or_default() += 1;
        }
    }
    fn flush(&self) {}
}

static PANICS: AtomicU64 = AtomicU64::new(0);

fn counter() -> &'static Counter {
    static COUNTER: OnceLock<&'static Counter> = OnceLock::new();
    COUNTER.get_or_init(|| {
        let c: &'static Counter = Box::leak(Box::new(Counter {
            by_target: Mutex::new(BTreeMap::new()),
        }));
        log::set_logger(c).unwrap();
        log::set_max_level(log::LevelFilter::Warn);
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
        c
    })
}

#[path = "payloads/console.rs"]
mod console;
use console::Console;

static TAPS: AtomicU64 = AtomicU64::new(0);

/// A VM with every kind of device, running `payload` with `cmdline`.
fn config(dir: &Path, payload: PathBuf, cmdline: &str, console: &Console) -> VmConfig {
    let n = TAPS.fetch_add(1, Ordering::SeqCst);
    let disk = dir.join(format!("disk{n}.raw"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let mut c = VmConfig::new(payload);
    c.cmdline = cmdline.to_string();
    c.memory_mib = 64;
    c.console_out = Box::new(console.clone());
    c.on_boot = Some(Box::new(|_| {}));
    c.disks.push(DiskConfig {
        backend: Box::new(RawFile::open(&disk, false).unwrap()),
        serial: Some("storm".into()),
    });
    c.nets.push(NetConfig {
        tap: TapSource::Create(format!("kst{}x{n}", std::process::id() % 100_000)),
        mac: None,
        dhcp: None,
    });
    c.vsock = Some(VsockConfig {
        cid: 3,
        socket: dir.join(format!("vsock{n}")),
    });
    c.rng = true;
    c
}

/// Waits for a VM's end at most `limit`.
fn wait(handle: vmm::VmmHandle, limit: Duration) -> Option<VmExit> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(handle.wait());
    });
    rx.recv_timeout(limit).ok()
}

fn tempdir() -> vmm_sys_util::tempdir::TempDir {
    vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/kestrel-storm").unwrap()
}

#[test]
fn seeded_storms_end_as_the_guest_asks_beside_an_unaffected_vm() {
    require_devices!();
    let counter = counter();
    let dir = tempdir();
    let storm = assemble::payload("storm");
    let hello = assemble::payload("hello");
    let started = Instant::now();
    // Guest-triggered logging is rate-limited: each of a storm VM's 8 limiters (4 virtio-mmio
    // transports, 4 devices) logs at most 10 lines per 5 s window, plus one saying how many
    // it suppressed; the VM beside it logs nothing.
    let mut bound = 0;
    for seed in 1..=SEEDS {
        let storm_started = Instant::now();
        let console = Console::default();
        let quiet = Console::default();
        let vm = start_vm(config(
            dir.as_path(),
            storm.clone(),
            &format!("count seed={seed}"),
            &console,
        ))
        .unwrap();
        // A second VM, started while the storm runs, must boot and exit as always.
        let other = start_vm(config(dir.as_path(), hello.clone(), "hello", &quiet)).unwrap();
        let other_exit = wait(other, Duration::from_secs(60));
        let exit = wait(vm, Duration::from_secs(600));
        bound += 8 * 11 * ((storm_started.elapsed().as_secs_f64() / 5.0).ceil() as u64 + 1);
        let text = console.text();
        assert_eq!(
            exit,
            Some(VmExit::Exited(7)),
            "storm {seed}: console head:\n{}",
            text.chars().take(2000).collect::<String>()
        );
        assert!(text.contains("storm done"), "storm {seed}: {text}");
        assert_eq!(other_exit, Some(VmExit::Exited(42)), "beside storm {seed}");
        assert!(
            quiet.text().contains("hello from the payload"),
            "beside storm {seed}: {}",
            quiet.text()
        );
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a thread panicked");
    let logged = counter.by_target.lock().unwrap().clone();
    let total: u64 = logged.values().sum();
    kestrel_test_support::campaign(format_args!(
        "hostile guests: {SEEDS} storms of 4000 rounds in {secs:.1} s, 0 panics, every VM beside one exited 42; {total} warnings/errors logged (bound {bound}): {logged:?}"
    ));
    assert!(
        total <= bound,
        "{total} lines logged in {secs:.1} s (bound {bound}): {logged:?}"
    );
}

#[test]
fn a_guest_storming_forever_is_stopped_by_the_host() {
    require_devices!();
    counter();
    let dir = tempdir();
    let console = Console::default();
    let vm = start_vm(config(
        dir.as_path(),
        assemble::payload("storm"),
        "storm! seed=11",
        &console,
    ))
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let (tx, rx) = mpsc::channel();
    let asked = Instant::now();
    vm.control().send(
        VmAction::Stop,
        Box::new(move |r| {
            let _ = tx.send(r.is_ok());
        }),
    );
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)),
        Ok(true),
        "Stop was not answered"
    );
    let exit = wait(vm, Duration::from_secs(10));
    assert_eq!(exit, Some(VmExit::Stopped), "console: {}", console.text());
    kestrel_test_support::campaign(format_args!(
        "hostile guests: an endless storm stopped {:.0} ms after Stop",
        asked.elapsed().as_secs_f64() * 1000.0
    ));
    assert!(console.text().starts_with("storm"), "{}", console.text());
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a thread panicked");
}
