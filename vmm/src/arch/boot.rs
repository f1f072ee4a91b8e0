//! Putting a kernel, its initramfs and command line into guest memory, and the boot
//! structures that tell the kernel where everything is (PVH start info or the Linux zero
//! page, the e820 map, the MP table).
//!
//! Runs once on the caller's thread while the VM is built.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    ram_regions, CMDLINE_ADDR, CMDLINE_MAX_SIZE, EBDA_START, HIMEM_START, MMIO_GAP_START,
    PVH_INFO_ADDR, PVH_MEMMAP_ADDR, ZERO_PAGE_ADDR,
};
use super::mptable;
use super::regs::EntryProtocol;

const PVH_MODLIST_ADDR: u64 = 0x6100;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// The 64-bit entry point of a bzImage is 0x200 past the protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

/// Errors loading the guest's boot payload.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {0}")]
    OpenKernel(PathBuf, #[source] std::io::Error),
    #[error("{0} is not a kernel kestrel can boot (expected an ELF vmlinux or a bzImage)")]
    NotAKernel(PathBuf),
    #[error("cannot load kernel {0}")]
    LoadKernel(PathBuf, #[source] linux_loader::loader::Error),
    #[error("cannot open initramfs {0}")]
    OpenInitrd(PathBuf, #[source] std::io::Error),
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot read initramfs {0}")]
    ReadInitrd(PathBuf, #[source] vm_memory::GuestMemoryError),
    #[error("kernel command line is {0} bytes; the limit is {max}", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write the {0} into guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
    #[error("cannot build the MP table")]
    MpTable(#[source] mptable::MpTableError),
}

/// Where the kernel was loaded and how to enter it.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    pub entry: u64,
    pub protocol: EntryProtocol,
    /// The end of the loaded image (the initramfs goes above it).
    pub end: u64,
    /// The bzImage's setup header, copied into the zero page.
    pub setup_header: Option<setup_header>,
}

/// Kernel image formats we recognise by their magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

fn detect(file: &mut File) -> std::io::Result<Option<KernelFormat>> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))?;
    let n = file.read(&mut head)?;
    let head = head.get(..n).unwrap_or(&[]);
    if head.starts_with(b"\x7fELF") {
        return Ok(Some(KernelFormat::Elf));
    }
    if head.get(0x202..0x206) == Some(b"HdrS") {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

/// Loads the kernel at `path`. An ELF with a PVH note is entered through PVH; other ELF
/// images and bzImages through the 64-bit Linux boot protocol.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|e| BootError::OpenKernel(path.into(), e))?;
    let format = detect(&mut file).map_err(|e| BootError::OpenKernel(path.into(), e))?;
    let load_err = |e| BootError::LoadKernel(path.into(), e);
    match format {
        Some(KernelFormat::Elf) => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let (entry, protocol) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (addr.raw_value(), EntryProtocol::Pvh),
                _ => (r.kernel_load.raw_value(), EntryProtocol::Linux64),
            };
            Ok(LoadedKernel {
                entry,
                protocol,
                end: r.kernel_end,
                setup_header: None,
            })
        }
        Some(KernelFormat::BzImage) => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            Ok(LoadedKernel {
                entry: r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
                protocol: EntryProtocol::Linux64,
                end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
        None => Err(BootError::NotAKernel(path.into())),
    }
}

/// Where the initramfs sits in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdLocation {
    pub addr: u64,
    pub size: u64,
}

/// Copies the initramfs to the highest page-aligned address below `limit` (the end of low
/// RAM, or the kernel's `initrd_addr_max`) that stays above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<InitrdLocation, BootError> {
    let mut file = File::open(path).map_err(|e| BootError::OpenInitrd(path.into(), e))?;
    let size = file
        .metadata()
        .map_err(|e| BootError::OpenInitrd(path.into(), e))?
        .len();
    let too_big = || BootError::InitrdTooBig {
        path: path.into(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !(PAGE_SIZE - 1);
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_big());
    }
    let len = usize::try_from(size).map_err(|_| too_big())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| BootError::ReadInitrd(path.into(), e))?;
    Ok(InitrdLocation { addr, size })
}

/// Writes the NUL-terminated command line at [`CMDLINE_ADDR`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| BootError::Write("command line", e))
}

/// The guest's RAM as e820 ranges: base memory below the EBDA, then everything from 1 MiB.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for (start, len) in ram_regions(mem_size) {
        let start_hi = start.max(HIMEM_START);
        let end = start + len;
        if end > start_hi {
            map.push((start_hi, end - start_hi));
        }
    }
    map
}

/// The top of RAM below the MMIO gap: the initramfs limit.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// Writes the boot information the kernel reads: PVH start info or the zero page, and the
/// MP table.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdLocation>,
    mem_size: u64,
    num_cpus: u8,
) -> Result<(), BootError> {
    let table = mptable::build(EBDA_START, num_cpus).map_err(BootError::MpTable)?;
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(|e| BootError::Write("MP table", e))?;
    let e820 = e820_map(mem_size);
    match kernel.protocol {
        EntryProtocol::Pvh => write_pvh_info(mem, &e820, initrd),
        EntryProtocol::Linux64 => write_zero_page(mem, kernel, &e820, cmdline_len, initrd),
    }
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    e820: &[(u64, u64)],
    initrd: Option<InitrdLocation>,
) -> Result<(), BootError> {
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    for (i, &(addr, size)) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr,
            size,
            type_: E820_RAM,
            reserved: 0,
        };
        let at = PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(|e| BootError::Write("PVH memory map", e))?;
    }
    if let Some(rd) = initrd {
        let module = hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(|e| BootError::Write("PVH module list", e))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
        .map_err(|e| BootError::Write("PVH start info", e))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    e820: &[(u64, u64)],
    cmdline_len: usize,
    initrd: Option<InitrdLocation>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.hdr.ramdisk_size = rd.size as u32;
    }
    for (slot, &(addr, size)) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| BootError::Write("zero page", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn e820_skips_the_legacy_hole_and_the_mmio_gap() {
        assert_eq!(
            e820_map(128 << 20),
            vec![(0, EBDA_START), (HIMEM_START, (128 << 20) - HIMEM_START)]
        );
        let big = e820_map(5 << 30);
        assert_eq!(big.len(), 3);
        assert_eq!(big[2], (1 << 32, (5 << 30) - MMIO_GAP_START));
    }

    #[test]
    fn rejects_a_file_that_is_not_a_kernel() {
        let dir = std::env::temp_dir().join(format!("kestrel-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("notakernel");
        std::fs::File::create(&p)
            .unwrap()
            .write_all(b"#!/bin/sh\necho hi\n")
            .unwrap();
        let err = load_kernel(&mem(1 << 20), &p).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel(_)), "{err}");
        let err = load_kernel(&mem(1 << 20), &dir.join("missing")).unwrap_err();
        assert!(matches!(err, BootError::OpenKernel(..)), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let dir = std::env::temp_dir().join(format!("kestrel-initrd-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("initrd");
        std::fs::write(&p, vec![7u8; 5000]).unwrap();
        let m = mem(16 << 20);
        let loc = load_initrd(&m, &p, 2 << 20, 16 << 20).unwrap();
        assert_eq!(loc.size, 5000);
        assert_eq!(loc.addr % PAGE_SIZE, 0);
        assert!(loc.addr + 5000 <= 16 << 20);
        assert_eq!(m.read_obj::<u8>(GuestAddress(loc.addr + 4999)).unwrap(), 7);
        let err = load_initrd(&m, &p, (16 << 20) - 4096, 16 << 20).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooBig { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cmdline_limits() {
        let m = mem(1 << 20);
        write_cmdline(&m, "console=ttyS0").unwrap();
        assert!(matches!(
            write_cmdline(&m, &"x".repeat(3000)),
            Err(BootError::CmdlineTooLong(3000))
        ));
        assert!(matches!(
            write_cmdline(&m, "a\0b"),
            Err(BootError::CmdlineNul)
        ));
    }
}
