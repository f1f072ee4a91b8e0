//! Layer 3: our guest kernel and agent, booted for real. About a minute per boot on a
//! kvm_pvm host (guest kernel code is emulated there), milliseconds on hardware KVM, so
//! each boot checks several things at once.
//!
//! Needs the assets from `scripts/build-guest.sh`; without /dev/kvm the tests print
//! `skipped: <reason>`.

// Test code: a failed setup step should panic with its cause.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{self, Write};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use vmm::{assets, start_vm, VmAction, VmConfig, VmExit};

/// A boot that has not finished after this long is stopped and fails the test.
const BOOT_DEADLINE: Duration = Duration::from_secs(600);

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Boot {
    exit: VmExit,
    console: String,
    boot_time: Option<Duration>,
}

fn boot_linux(kernel_name: &'static str, vcpus: u8, memory_mib: u64) -> Option<Boot> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        kestrel_test_support::skip(format!("/dev/kvm not usable: {e}"));
        return None;
    }
    let kernel =
        assets::default_asset(kernel_name).expect("guest kernel built (scripts/build-guest.sh)");
    let initrd =
        assets::default_asset(assets::INITRD).expect("initramfs built (scripts/build-guest.sh)");
    let console = Console::default();
    let mut cfg = VmConfig::new(kernel);
    cfg.initrd = Some(initrd);
    cfg.vcpus = vcpus;
    cfg.memory_mib = memory_mib;
    cfg.console_out = Box::new(console.clone());
    let (tx, rx) = mpsc::channel();
    cfg.on_boot = Some(Box::new(move |d| {
        let _ = tx.send(d);
    }));
    let handle = start_vm(cfg).expect("the VM starts");
    let control = handle.control();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(BOOT_DEADLINE).is_err() {
            control.send(VmAction::Stop, Box::new(|_| {}));
        }
    });
    let exit = handle.wait();
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    let console = String::from_utf8_lossy(&console.0.lock().unwrap()).into_owned();
    Some(Boot {
        exit,
        console,
        boot_time: rx.try_recv().ok(),
    })
}

/// The agent's report: (cpus, memory_kib).
fn agent_report(console: &str) -> (u32, u64) {
    let line = console
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("kestrel-agent: cpus="))
        .unwrap_or_else(|| panic!("no agent report on the console:\n{console}"));
    let (cpus, mem) = line.split_once(" memory_kib=").expect("agent line format");
    (cpus.parse().unwrap(), mem.parse().unwrap())
}

fn check_boot(b: &Boot, vcpus: u32, memory_mib: u64) {
    assert_eq!(b.exit, VmExit::Exited(0), "console:\n{}", b.console);
    assert!(
        b.console.contains("Run /init as init process"),
        "{}",
        b.console
    );
    let (cpus, mem_kib) = agent_report(&b.console);
    assert_eq!(cpus, vcpus, "online CPUs");
    // MemTotal is what is left after the kernel's own reservations.
    assert!(
        mem_kib <= memory_mib * 1024 && mem_kib > memory_mib * 1024 / 2,
        "MemTotal {mem_kib} KiB for {memory_mib} MiB"
    );
    let t = b.boot_time.expect("the agent wrote the boot timer");
    println!(
        "{vcpus} vCPU(s), {memory_mib} MiB: guest user space after {:.1} s",
        t.as_secs_f64()
    );
}

#[test]
fn pvh_vmlinux_boots_to_the_agent_with_1_vcpu() {
    if let Some(b) = boot_linux(assets::KERNEL, 1, 128) {
        check_boot(&b, 1, 128);
    }
}

#[test]
fn pvh_vmlinux_boots_to_the_agent_with_2_vcpus() {
    if let Some(b) = boot_linux(assets::KERNEL, 2, 192) {
        check_boot(&b, 2, 192);
    }
}
