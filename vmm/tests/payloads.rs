//! Layer-2 tests: the VMM with tiny guest payloads (tests/payloads/*.S, assembled here with
//! the system's `cc` and `ld`). Each boots in milliseconds, even under kvm_pvm.
//!
//! Without a usable /dev/kvm every test prints `skipped: <reason>` and returns.

// Test code: a failed setup step should panic with its cause.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::PathBuf;
use std::sync::mpsc;

use std::time::{Duration, Instant};

use devices::disk::{check_range, DiskBackend, DiskError, IoBufs};
use vmm::{start_vm, DiskConfig, VmAction, VmConfig, VmExit};

fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm not usable: {e}")),
    }
}

macro_rules! require_kvm {
    () => {
        if let Some(why) = kvm_unavailable() {
            kestrel_test_support::skip(why);
            return;
        }
    };
}

#[path = "payloads/assemble.rs"]
mod assemble;
use assemble::payload;

fn payload_dir() -> PathBuf {
    assemble::out_dir()
}

#[path = "payloads/console.rs"]
mod console;
use console::Console;

struct Outcome {
    exit: VmExit,
    console: String,
    boot_time: Option<Duration>,
}

fn config(kernel: PathBuf, console: &Console) -> VmConfig {
    let mut c = VmConfig::new(kernel);
    c.console_out = Box::new(console.clone());
    c.cmdline = String::new();
    c
}

/// Boots `cfg`, stopping the VM if it has not ended within 30 s (so a broken VMM fails
/// the test instead of hanging it).
fn boot(mut cfg: VmConfig, console: &Console) -> Outcome {
    let (tx, rx) = mpsc::channel();
    cfg.on_boot = Some(Box::new(move |d| {
        let _ = tx.send(d);
    }));
    let handle = start_vm(cfg).expect("VM starts");
    let control = handle.control();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(30));
        control.send(VmAction::Stop, Box::new(|_| {}));
    });
    let exit = handle.wait();
    drop(watchdog);
    Outcome {
        exit,
        console: console.text(),
        boot_time: rx.try_recv().ok(),
    }
}

fn boot_payload(name: &str, cmdline: &str, vcpus: u8, memory_mib: u64) -> Outcome {
    let console = Console::default();
    let mut cfg = config(payload(name), &console);
    cfg.cmdline = cmdline.into();
    cfg.vcpus = vcpus;
    cfg.memory_mib = memory_mib;
    boot(cfg, &console)
}

#[test]
fn prints_on_com1_reports_boot_time_and_exits_with_status() {
    require_kvm!();
    let o = boot_payload("hello", "", 1, 128);
    assert_eq!(o.console, "hello from the payload\n");
    assert_eq!(o.exit, VmExit::Exited(42));
    assert_eq!(o.exit.status(), 42);
    assert!(o.boot_time.is_some(), "the boot timer fired");
}

/// `cmdline` as the guest sees it: on kvm_pvm hosts the VMM appends its quirk parameters.
fn guest_cmdline(cmdline: &str) -> String {
    if vmm::arch::cpuid::host_is_kvm_pvm() {
        format!("{cmdline} {}", vmm::arch::cpuid::PVM_KERNEL_PARAMS)
    } else {
        cmdline.to_string()
    }
}

fn field<'a>(console: &'a str, key: &str) -> Vec<&'a str> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix(key))
        .collect()
}

#[test]
fn pvh_boot_info_as_the_guest_sees_it() {
    require_kvm!();
    let console = Console::default();
    let initrd = payload_dir().join("initrd-bytes");
    std::fs::write(&initrd, b"INITRD-CONTENT").unwrap();
    let mut cfg = config(payload("bootinfo"), &console);
    cfg.cmdline = "root=/dev/vda quiet".into();
    cfg.memory_mib = 64;
    cfg.initrd = Some(initrd);
    let o = boot(cfg, &console);
    assert_eq!(o.exit, VmExit::Exited(0), "{}", o.console);
    assert_eq!(field(&o.console, "magic="), ["336ec578"]);
    assert_eq!(
        field(&o.console, "cmdline="),
        [guest_cmdline("root=/dev/vda quiet")]
    );
    assert_eq!(field(&o.console, "memmap="), ["00000002"]);
    assert_eq!(
        field(&o.console, "entry="),
        [
            "0000000000000000 000000000009fc00 00000001",
            "0000000000100000 0000000003f00000 00000001"
        ]
    );
    // One module: the initramfs, page-aligned at the top of RAM, 14 bytes, "INIT".
    assert_eq!(
        field(&o.console, "modules="),
        ["00000001 03fff000 0000000e 54494e49"]
    );
    assert_eq!(
        field(&o.console, "mptable="),
        ["5f504d5f"],
        "MP floating pointer at the EBDA"
    );
}

#[test]
fn memory_above_the_mmio_gap_is_mapped_above_4g() {
    require_kvm!();
    let o = boot_payload("bootinfo", "big", 1, 4096);
    assert_eq!(o.exit, VmExit::Exited(0), "{}", o.console);
    assert_eq!(
        field(&o.console, "entry="),
        [
            "0000000000000000 000000000009fc00 00000001",
            "0000000000100000 00000000cff00000 00000001",
            "0000000100000000 0000000030000000 00000001"
        ]
    );
    assert_eq!(field(&o.console, "modules="), ["00000000"]);
}

#[test]
fn all_vcpus_start_1_2_and_8() {
    require_kvm!();
    for n in [1u8, 2, 8] {
        let o = boot_payload("smp", &n.to_string(), n, 128);
        assert_eq!(o.exit, VmExit::Exited(0), "{}", o.console);
        assert_eq!(
            field(&o.console, "cpus="),
            [format!("{n:08x}")],
            "{n} vCPUs"
        );
    }
}

#[test]
fn unclaimed_mmio_reads_all_ones_and_writes_are_ignored() {
    require_kvm!();
    let o = boot_payload("mmio", "", 1, 128);
    assert_eq!(o.exit, VmExit::Exited(0));
    assert_eq!(field(&o.console, "mmio="), ["ffffffff"]);
}

#[test]
fn i8042_reset_ends_the_vm() {
    require_kvm!();
    let o = boot_payload("reset", "", 1, 128);
    assert_eq!(o.console, "resetting\n");
    assert_eq!(o.exit, VmExit::Reset);
}

#[test]
fn triple_fault_ends_the_vm() {
    require_kvm!();
    let o = boot_payload("triple", "", 1, 128);
    assert_eq!(o.console, "faulting\n");
    assert_eq!(o.exit, VmExit::TripleFault);
    assert_eq!(o.exit.status(), 125);
}

#[test]
fn linux_64bit_protocol_elf_and_bzimage() {
    require_kvm!();
    for name in ["long64", "bzimage"] {
        let o = boot_payload(name, "console=ttyS0 x", 1, 128);
        assert_eq!(o.exit, VmExit::Exited(7), "{name}: {}", o.console);
        assert_eq!(
            o.console,
            format!(
                "boot_flag=0000aa55 header=53726448 e820=00000002 ramdisk_size=00000000 cmdline={}\n",
                guest_cmdline("console=ttyS0 x")
            ),
            "{name}"
        );
    }
}

#[test]
fn host_stops_a_halted_guest_without_waiting() {
    require_kvm!();
    for vcpus in [1u8, 4] {
        let console = Console::default();
        let mut cfg = config(payload("halt"), &console);
        cfg.vcpus = vcpus;
        let handle = start_vm(cfg).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !console.text().contains("halting") {
            assert!(Instant::now() < deadline, "payload never ran");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Ctrl-Alt-Del is delivered (the payload ignores it), then Stop ends the VM.
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        handle.control().send(
            VmAction::CtrlAltDel,
            Box::new(move |r| t.send(r.is_ok()).unwrap()),
        );
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true));
        handle.control().send(
            VmAction::Stop,
            Box::new(move |r| tx.send(r.is_ok()).unwrap()),
        );
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true));
        let control = handle.control();
        assert_eq!(handle.wait(), VmExit::Stopped);
        // After the VM is gone, actions fail cleanly instead of hanging.
        let (tx, rx) = mpsc::channel();
        control.send(
            VmAction::Stop,
            Box::new(move |r| tx.send(r.is_err()).unwrap()),
        );
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(true));
    }
}

fn start_err(cfg: VmConfig) -> String {
    match start_vm(cfg) {
        Ok(h) => {
            h.control().send(VmAction::Stop, Box::new(|_| {}));
            h.wait();
            panic!("the VM started");
        }
        Err(e) => vmm::error_chain(&e),
    }
}

#[test]
fn bad_input_is_refused_with_what_and_where() {
    require_kvm!();
    let console = Console::default();
    let dir = payload_dir();
    let script = dir.join("not-a-kernel.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let err = start_err(config(script.clone(), &console));
    assert!(err.contains("not-a-kernel.sh is not a kernel"), "{err}");
    let err = start_err(config(dir.join("missing-vmlinux"), &console));
    assert!(err.contains("missing-vmlinux does not exist"), "{err}");

    let mut c = config(payload("hello"), &console);
    c.vcpus = 0;
    assert!(start_err(c).contains("at least 1 vCPU"));
    let mut c = config(payload("hello"), &console);
    c.vcpus = 255;
    assert!(start_err(c).contains("255 vCPUs asked"));
    let mut c = config(payload("hello"), &console);
    c.memory_mib = 0;
    assert!(start_err(c).contains("0 MiB asked"));
    let mut c = config(payload("hello"), &console);
    c.memory_mib = 1 << 30;
    assert!(start_err(c).contains("MiB of guest memory asked; this host has"));
    let mut c = config(payload("hello"), &console);
    c.initrd = Some(dir.join("missing-initrd"));
    assert!(start_err(c).contains("missing-initrd does not exist"));
    let mut c = config(payload("hello"), &console);
    c.cmdline = "x".repeat(4000);
    let expected = format!(
        "command line is {} bytes",
        guest_cmdline(&"x".repeat(4000)).len()
    );
    assert!(start_err(c).contains(&expected));
    let mut c = config(payload("hello"), &console);
    let big = dir.join("big-initrd");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    c.initrd = Some(big);
    c.memory_mib = 32;
    assert!(start_err(c).contains("does not fit in guest memory"));
}

/// An in-memory disk for wiring tests.
struct MemDisk(Vec<u8>);

impl DiskBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_vectored_at(&mut self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), DiskError> {
        check_range(offset, bufs.len(), self.size())?;
        bufs.copy_from(&self.0[offset as usize..(offset + bufs.len()) as usize]);
        Ok(())
    }
    fn write_vectored_at(&mut self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), DiskError> {
        check_range(offset, bufs.len(), self.size())?;
        bufs.copy_to(&mut self.0[offset as usize..(offset + bufs.len()) as usize]);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        check_range(offset, len, self.size())?;
        self.0[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

#[test]
fn virtio_block_devices_are_on_the_mmio_bus_and_the_command_line() {
    require_kvm!();
    let console = Console::default();
    let mut cfg = config(payload("virtio"), &console);
    cfg.cmdline = "console=ttyS0".into();
    for (sectors, serial) in [(8u64, "first"), (2048, "second")] {
        cfg.disks.push(DiskConfig {
            backend: Box::new(MemDisk(vec![0; sectors as usize * 512])),
            serial: Some(serial.into()),
        });
    }
    let o = boot(cfg, &console);
    assert_eq!(o.exit, VmExit::Exited(0), "{}", o.console);
    // "virt" magic, version 2, device id 2 (block), capacity in 512-byte sectors.
    assert_eq!(
        field(&o.console, "dev="),
        [
            "74726976 00000002 00000002 00000008",
            "74726976 00000002 00000002 00000800"
        ]
    );
    assert_eq!(
        field(&o.console, "cmdline="),
        [guest_cmdline(
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        )]
    );
}

#[test]
fn cpuid_topology_as_the_guest_sees_it() {
    require_kvm!();
    for vcpus in [1u8, 3] {
        let o = boot_payload("cpuid", "", vcpus, 128);
        assert_eq!(o.exit, VmExit::Exited(0), "{}", o.console);
        let leaf1 = field(&o.console, "leaf1=");
        let ebx = u32::from_str_radix(leaf1[0].split(' ').nth(1).unwrap(), 16).unwrap();
        assert_eq!(ebx >> 24, 0, "the boot CPU's APIC id");
        assert_eq!(
            (ebx >> 16) & 0xff,
            u32::from(vcpus),
            "logical processor count"
        );
    }
}
