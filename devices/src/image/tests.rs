//! Converter tests: images built by a small QCOW2 writer below (every refusal), and images
//! made by `qemu-img` cross-checked against `qemu-img convert -O raw`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use vmm_sys_util::tempdir::TempDir;

use super::convert::{convert, ConvertError, ConvertStats};
use super::qcow2::Qcow2Error;
use super::{detect_format, ImageFormat};

const MIB: u64 = 1 << 20;

/// Deterministic pseudo-random bytes.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Compressible, text-like bytes.
fn text_bytes(len: usize) -> Vec<u8> {
    let words = [
        "kestrel ", "microvm ", "qcow2 ", "cluster ", "sparse ", "overlay ", "base\n",
    ];
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0usize;
    while out.len() < len {
        out.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// A virtual disk with data, zero runs, text and scattered writes.
fn disk_contents(size: usize) -> Vec<u8> {
    let mut d = vec![0u8; size];
    let q = size / 8;
    d[..q].copy_from_slice(&random_bytes(1, q));
    d[2 * q..3 * q].copy_from_slice(&text_bytes(q));
    // A cluster of random data with a zero 4 KiB block in its middle.
    d[4 * q + 8192..4 * q + 8192 + 4096].copy_from_slice(&random_bytes(2, 4096));
    for (i, off) in (5 * q..7 * q).step_by(200_003).enumerate() {
        let n = (100 + i * 37).min(size - off);
        d[off..off + n].copy_from_slice(&random_bytes(i as u64 + 3, n));
    }
    // The very last bytes, to catch short last clusters.
    let tail = size - 3;
    d[tail..].copy_from_slice(b"end");
    d
}

// ---------------------------------------------------------------------------------------
// A small QCOW2 writer.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Comp {
    None,
    Deflate,
    Zstd,
}

#[derive(Clone, Copy)]
struct Opts {
    version: u32,
    cluster_bits: u32,
    comp: Comp,
    /// v3: write all-zero clusters as zero-flag entries with a preallocated offset.
    zero_alloc: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            version: 3,
            cluster_bits: 16,
            comp: Comp::None,
            zero_alloc: false,
        }
    }
}

struct Built {
    bytes: Vec<u8>,
    l1_offset: u64,
    /// Host offset of the L2 entry of every written guest cluster.
    l2_entry_at: Vec<(u64, u64)>,
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn deflate_raw(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn build_qcow2(o: Opts, disk: &[u8]) -> Built {
    let cs = 1usize << o.cluster_bits;
    let size = disk.len() as u64;
    let l2_entries = cs / 8;
    let coverage = (cs * l2_entries) as u64;
    let l1_size = size.div_ceil(coverage) as usize;
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    // cluster 0 header, 1 refcount table, then the L1 table.
    let l1_offset = 2 * cs as u64;
    let mut img = vec![0u8; (2 + l1_clusters) * cs];
    let header_len: u32 = if o.comp == Comp::Zstd { 112 } else { 104 };
    img[..4].copy_from_slice(b"QFI\xfb");
    put32(&mut img, 4, o.version);
    put32(&mut img, 20, o.cluster_bits);
    put64(&mut img, 24, size);
    put32(&mut img, 36, l1_size as u32);
    put64(&mut img, 40, l1_offset);
    put64(&mut img, 48, cs as u64);
    put32(&mut img, 56, 1);
    if o.version == 3 {
        let incompat = if o.comp == Comp::Zstd { 1 << 3 } else { 0 };
        put64(&mut img, 72, incompat);
        put32(&mut img, 96, 4);
        put32(&mut img, 100, header_len);
        if o.comp == Comp::Zstd {
            img[104] = 1;
        }
    }
    let mut l2_tables: Vec<Option<u64>> = vec![None; l1_size];
    let mut l2_entry_at = Vec::new();
    // Compressed data is packed at byte granularity, as qemu does.
    let mut comp_cursor: Option<u64> = None;
    for (ci, chunk) in disk.chunks(cs).enumerate() {
        let zero = chunk.iter().all(|&b| b == 0);
        if zero && !(o.zero_alloc && ci % 2 == 0) {
            continue;
        }
        let l1i = ci / l2_entries;
        let l2_off = *l2_tables[l1i].get_or_insert_with(|| {
            let off = (img.len() as u64).div_ceil(cs as u64) * cs as u64;
            img.resize(off as usize + cs, 0);
            put64(&mut img, l1_offset as usize + l1i * 8, off | 1 << 63);
            comp_cursor = None;
            off
        });
        let entry_at = l2_off + ((ci % l2_entries) * 8) as u64;
        let mut full = chunk.to_vec();
        full.resize(cs, 0);
        let compressed = match o.comp {
            Comp::None => None,
            Comp::Deflate => Some(deflate_raw(&full)),
            Comp::Zstd => Some(zstd::bulk::compress(&full, 3).unwrap()),
        }
        .filter(|c| c.len() < cs && !zero);
        let entry = if zero {
            let off = img.len() as u64;
            img.resize(img.len() + cs, 0xee);
            comp_cursor = None;
            off | 1 | 1 << 63
        } else if let Some(c) = compressed {
            let off = comp_cursor.unwrap_or(img.len() as u64);
            img.resize(off as usize, 0);
            img.extend_from_slice(&c);
            comp_cursor = Some(img.len() as u64);
            let sectors = ((off % 512) + c.len() as u64).div_ceil(512);
            let x = 62 - (o.cluster_bits - 8);
            off | (sectors - 1) << x | 1 << 62
        } else {
            let off = (img.len() as u64).div_ceil(cs as u64) * cs as u64;
            img.resize(off as usize, 0);
            img.extend_from_slice(&full);
            comp_cursor = None;
            off | 1 << 63
        };
        put64(&mut img, entry_at as usize, entry);
        l2_entry_at.push((ci as u64, entry_at));
    }
    Built {
        bytes: img,
        l1_offset,
        l2_entry_at,
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------

struct Work {
    dir: TempDir,
}

impl Work {
    fn new() -> Self {
        Work {
            dir: TempDir::new_with_prefix("/tmp/kestrel-image").unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.as_path().join(name)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, bytes).unwrap();
        p
    }
}

fn convert_path(input: &Path, output: &Path) -> Result<ConvertStats, ConvertError> {
    let inp = File::open(input).unwrap();
    let fmt = detect_format(&inp).unwrap();
    let out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(output)
        .unwrap();
    let mut last = (0, 0);
    let r = convert(&inp, fmt, &out, &Default::default(), &mut |done, total| {
        assert!(done >= last.0 && done <= total, "{done} {total} {last:?}");
        last = (done, total);
    });
    if let Ok(s) = &r {
        assert_eq!(last, (s.virtual_size, s.virtual_size));
    }
    r
}

fn convert_bytes(img: &[u8]) -> Result<Vec<u8>, ConvertError> {
    let w = Work::new();
    let input = w.write("in.qcow2", img);
    let output = w.path("out.raw");
    convert_path(&input, &output).map(|_| fs::read(&output).unwrap())
}

fn refused(img: &[u8]) -> Qcow2Error {
    match convert_bytes(img) {
        Err(ConvertError::Qcow2(e)) => e,
        other => panic!("expected a QCOW2 refusal, got {:?}", other.map(|v| v.len())),
    }
}

// ---------------------------------------------------------------------------------------
// Conversions of images from the writer.
// ---------------------------------------------------------------------------------------

#[test]
fn empty_image_is_all_holes() {
    let w = Work::new();
    let b = build_qcow2(Opts::default(), &vec![0u8; 64 << 20]);
    let input = w.write("empty.qcow2", &b.bytes);
    let output = w.path("empty.raw");
    let stats = convert_path(&input, &output).unwrap();
    assert_eq!(stats.format, ImageFormat::Qcow2);
    assert_eq!(stats.virtual_size, 64 << 20);
    assert_eq!(stats.bytes_written, 0);
    let m = fs::metadata(&output).unwrap();
    assert_eq!(m.len(), 64 << 20);
    assert_eq!(m.blocks(), 0);
}

#[test]
fn data_clusters_every_cluster_size_and_version() {
    let disk = disk_contents(3 * MIB as usize + 1536);
    for version in [2, 3] {
        for cluster_bits in [9, 12, 16, 21] {
            let b = build_qcow2(
                Opts {
                    version,
                    cluster_bits,
                    ..Opts::default()
                },
                &disk,
            );
            let out = convert_bytes(&b.bytes).unwrap();
            assert!(out == disk, "v{version} cluster_bits {cluster_bits}");
        }
    }
}

#[test]
fn compressed_clusters_deflate_and_zstd() {
    let disk = disk_contents(2 * MIB as usize);
    for (comp, version) in [(Comp::Deflate, 2), (Comp::Deflate, 3), (Comp::Zstd, 3)] {
        for cluster_bits in [9, 16] {
            let b = build_qcow2(
                Opts {
                    version,
                    cluster_bits,
                    comp,
                    ..Opts::default()
                },
                &disk,
            );
            let out = convert_bytes(&b.bytes).unwrap();
            assert!(out == disk, "v{version} cluster_bits {cluster_bits}");
        }
    }
}

#[test]
fn zero_flag_clusters_read_as_zero() {
    let disk = disk_contents(MIB as usize);
    let b = build_qcow2(
        Opts {
            zero_alloc: true,
            ..Opts::default()
        },
        &disk,
    );
    assert_eq!(convert_bytes(&b.bytes).unwrap(), disk);
}

#[test]
fn many_l2_tables_and_l1_chunks() {
    // 512-byte clusters: one L2 table maps 32 KiB, so 160 MiB needs 5120 L1 entries,
    // more than one L1 read; data lands in the first and the last tables.
    let size = 160 * MIB as usize;
    let w = Work::new();
    let mut disk = vec![0u8; size];
    disk[..100_000].copy_from_slice(&random_bytes(9, 100_000));
    disk[size - 70_000..].copy_from_slice(&random_bytes(10, 70_000));
    let b = build_qcow2(
        Opts {
            cluster_bits: 9,
            ..Opts::default()
        },
        &disk,
    );
    let input = w.write("many.qcow2", &b.bytes);
    let output = w.path("many.raw");
    let stats = convert_path(&input, &output).unwrap();
    // Whole 512-byte clusters are pushed; all-zero 4 KiB blocks are skipped.
    assert_eq!(
        stats.bytes_written,
        100_000u64.div_ceil(512) * 512 + 70_000u64.div_ceil(512) * 512
    );
    assert!(fs::read(&output).unwrap() == disk);
    assert!(fs::metadata(&output).unwrap().blocks() * 512 < 2 * MIB);
}

#[test]
fn raw_input_is_copied_sparsely() {
    let w = Work::new();
    let path = w.path("in.raw");
    let f = File::create(&path).unwrap();
    f.set_len(32 * MIB).unwrap();
    f.write_all_at(&random_bytes(4, 10_000), 5 * MIB + 3)
        .unwrap();
    // Explicit zeroes, written as data: must become holes too.
    f.write_all_at(&vec![0u8; 2 * MIB as usize], 10 * MIB)
        .unwrap();
    f.write_all_at(b"tail", 32 * MIB - 4).unwrap();
    drop(f);
    let output = w.path("out.raw");
    let stats = convert_path(&path, &output).unwrap();
    assert_eq!(stats.format, ImageFormat::Raw);
    assert_eq!(fs::read(&output).unwrap(), fs::read(&path).unwrap());
    assert!(stats.bytes_written <= 3 * 4096 + 4096);
    assert!(fs::metadata(&output).unwrap().blocks() * 512 < MIB);
}

// ---------------------------------------------------------------------------------------
// Refusals.
// ---------------------------------------------------------------------------------------

fn valid() -> Built {
    build_qcow2(Opts::default(), &disk_contents(MIB as usize))
}

fn patched(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = valid().bytes;
    f(&mut b);
    b
}

#[test]
fn refuses_backing_file_without_opening_it() {
    let img = patched(|b| {
        let name = b"/etc/shadow";
        b[512..512 + name.len()].copy_from_slice(name);
        put64(b, 8, 512);
        put32(b, 16, name.len() as u32);
    });
    assert!(matches!(refused(&img), Qcow2Error::BackingFile));
    // A backing-format extension without a backing file is unused, as in qemu.
    let img = patched(|b| {
        put32(b, 104, 0xe279_2aca);
        put32(b, 108, 3);
        b[112..115].copy_from_slice(b"raw");
    });
    assert_eq!(
        convert_bytes(&img).unwrap(),
        convert_bytes(&valid().bytes).unwrap()
    );
}

#[test]
fn refuses_external_data_file_and_encryption() {
    let img = patched(|b| put64(b, 72, 1 << 2));
    assert!(matches!(refused(&img), Qcow2Error::ExternalDataFile));
    let img = patched(|b| {
        put32(b, 104, 0x4441_5441);
        put32(b, 108, 8);
    });
    assert!(matches!(refused(&img), Qcow2Error::ExternalDataFile));
    for method in [1, 2] {
        let img = patched(|b| put32(b, 32, method));
        assert!(matches!(refused(&img), Qcow2Error::Encrypted));
    }
    let img = patched(|b| {
        put32(b, 104, 0x0537_be77);
        put32(b, 108, 16);
    });
    assert!(matches!(refused(&img), Qcow2Error::Encrypted));
}

#[test]
fn refuses_feature_bits_and_versions() {
    let img = patched(|b| put64(b, 72, 1 << 9));
    assert!(matches!(
        refused(&img),
        Qcow2Error::UnknownIncompatibleFeatures(0x200)
    ));
    let img = patched(|b| put64(b, 72, 1 << 1));
    assert!(matches!(refused(&img), Qcow2Error::MarkedCorrupt));
    let img = patched(|b| put64(b, 72, 1 << 4));
    assert!(matches!(refused(&img), Qcow2Error::ExtendedL2));
    for v in [1, 4] {
        let img = patched(|b| put32(b, 4, v));
        assert!(matches!(refused(&img), Qcow2Error::UnsupportedVersion(x) if x == v));
    }
    let img = patched(|b| {
        put64(b, 72, 1 << 3);
        put32(b, 100, 112);
        b[104] = 7;
    });
    assert!(matches!(
        refused(&img),
        Qcow2Error::UnsupportedCompression(7)
    ));
    // The dirty bit only concerns refcounts, which are never read: accepted.
    let img = patched(|b| put64(b, 72, 1));
    assert_eq!(convert_bytes(&img).unwrap(), disk_contents(MIB as usize));
}

#[test]
fn refuses_out_of_bounds_header_values() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("cluster_bits 8", patched(|b| put32(b, 20, 8))),
        ("cluster_bits 22", patched(|b| put32(b, 20, 22))),
        ("cluster_bits huge", patched(|b| put32(b, 20, u32::MAX))),
        ("size > 16 TiB", patched(|b| put64(b, 24, (16 << 40) + 1))),
        ("size u64::MAX", patched(|b| put64(b, 24, u64::MAX))),
        ("L1 too small", patched(|b| put32(b, 36, 0))),
        ("L1 too large", patched(|b| put32(b, 36, u32::MAX))),
        ("L1 unaligned", patched(|b| put64(b, 40, 2 * 65536 + 8))),
        ("L1 past EOF", patched(|b| put64(b, 40, 1 << 40))),
        (
            "L1 offset overflows",
            patched(|b| put64(b, 40, u64::MAX - 65535)),
        ),
        ("refcount table huge", patched(|b| put32(b, 56, u32::MAX))),
        ("refcount table unaligned", patched(|b| put64(b, 48, 100))),
        (
            "refcount table past EOF",
            patched(|b| put64(b, 48, 1 << 40)),
        ),
        ("too many snapshots", patched(|b| put32(b, 60, 1 << 20))),
        ("header length short", patched(|b| put32(b, 100, 72))),
        ("header length unaligned", patched(|b| put32(b, 100, 105))),
        (
            "extension overruns",
            patched(|b| {
                put32(b, 104, 0x1234_5678);
                put32(b, 108, 0xffff_fff0);
            }),
        ),
    ];
    for (what, img) in cases {
        match convert_bytes(&img) {
            Err(ConvertError::Qcow2(Qcow2Error::InvalidHeader(msg))) => {
                assert!(!msg.is_empty(), "{what}")
            }
            other => panic!("{what}: {:?}", other.map(|v| v.len())),
        }
    }
    // A truncated file.
    assert!(matches!(refused(b"QFI\xfb\0\0"), Qcow2Error::Truncated));
}

#[test]
fn header_refusal_happens_before_the_output_is_touched() {
    let w = Work::new();
    let input = w.write("big.qcow2", &patched(|b| put64(b, 24, u64::MAX)));
    let output = w.write("out.raw", b"untouched");
    assert!(convert_path(&input, &output).is_err());
    assert_eq!(fs::read(&output).unwrap(), b"untouched");
}

#[test]
fn bad_table_entry_is_found_before_the_output_is_touched() {
    // The bad entry is in the last L2 table of a multi-table image.
    let mut disk = disk_contents(4 * MIB as usize);
    disk[4 * MIB as usize - 100..].fill(0x77);
    let b = build_qcow2(
        Opts {
            cluster_bits: 12,
            ..Opts::default()
        },
        &disk,
    );
    let (_, last_entry) = *b.l2_entry_at.last().unwrap();
    let mut img = b.bytes.clone();
    put64(&mut img, last_entry as usize, (1u64 << 50) | 1 << 63);
    let w = Work::new();
    let input = w.write("bad.qcow2", &img);
    let output = w.write("out.raw", b"untouched");
    assert!(matches!(
        convert_path(&input, &output),
        Err(ConvertError::Qcow2(Qcow2Error::InvalidEntry(_)))
    ));
    assert_eq!(fs::read(&output).unwrap(), b"untouched");
}

#[test]
fn refuses_bad_table_entries() {
    let b = valid();
    let l1 = b.l1_offset as usize;
    let l1_entry = u64::from_be_bytes(b.bytes[l1..l1 + 8].try_into().unwrap());
    let (_, entry_at) = b.l2_entry_at[0];
    let entry_at = entry_at as usize;
    let l2_entry = u64::from_be_bytes(b.bytes[entry_at..entry_at + 8].try_into().unwrap());
    let len = b.bytes.len() as u64;
    let cases: Vec<(&str, usize, u64)> = vec![
        ("L2 unaligned", l1, l1_entry + 512),
        ("L2 past EOF", l1, (len + 65536) & !65535),
        ("data unaligned", entry_at, l2_entry + 512),
        ("data reserved bits", entry_at, l2_entry | 2),
        (
            "data past EOF",
            entry_at,
            ((len + 65536) & !65535) | 1 << 63,
        ),
        ("compressed past EOF", entry_at, (len + 10) | 1 << 62),
    ];
    for (what, at, value) in cases {
        let mut img = b.bytes.clone();
        put64(&mut img, at, value);
        assert!(
            matches!(refused(&img), Qcow2Error::InvalidEntry(_)),
            "{what}"
        );
    }
}

#[test]
fn refuses_compressed_clusters_of_the_wrong_size() {
    // A deflate stream of two clusters behind a compressed entry: a bomb.
    let b = valid();
    let (_, entry_at) = b.l2_entry_at[0];
    for (what, plain_len) in [("bomb", 2 * 65536), ("short", 65536 - 1)] {
        let mut img = b.bytes.clone();
        let c = deflate_raw(&vec![0x41; plain_len]);
        let off = img.len() as u64;
        img.extend_from_slice(&c);
        let sectors = (c.len() as u64).div_ceil(512);
        put64(
            &mut img,
            entry_at as usize,
            off | (sectors - 1) << 54 | 1 << 62,
        );
        assert!(
            matches!(refused(&img), Qcow2Error::BadCompressedCluster { .. }),
            "{what}"
        );
    }
    // Garbage instead of deflate data.
    let mut img = b.bytes.clone();
    let off = img.len() as u64;
    img.extend_from_slice(&[0xff; 1024]);
    put64(&mut img, entry_at as usize, off | 1 << 54 | 1 << 62);
    assert!(matches!(
        refused(&img),
        Qcow2Error::Decompress { .. } | Qcow2Error::BadCompressedCluster { .. }
    ));
    // The same for zstd.
    let zb = build_qcow2(
        Opts {
            comp: Comp::Zstd,
            ..Opts::default()
        },
        &disk_contents(MIB as usize),
    );
    let (_, entry_at) = zb.l2_entry_at[0];
    let mut img = zb.bytes.clone();
    let c = zstd::bulk::compress(&vec![0x41; 4 * 65536], 3).unwrap();
    let off = img.len() as u64;
    img.extend_from_slice(&c);
    let sectors = (c.len() as u64).div_ceil(512);
    put64(
        &mut img,
        entry_at as usize,
        off | (sectors - 1) << 54 | 1 << 62,
    );
    assert!(matches!(
        refused(&img),
        Qcow2Error::BadCompressedCluster { .. } | Qcow2Error::Decompress { .. }
    ));
}

#[test]
fn errors_name_the_cause_once() {
    let e = ConvertError::Qcow2(Qcow2Error::BackingFile);
    assert_eq!(e.to_string(), "the QCOW2 input is refused or unreadable");
    let source = std::error::Error::source(&e).unwrap().to_string();
    assert_eq!(source, "QCOW2 images with a backing file are refused");
}

// ---------------------------------------------------------------------------------------
// Cross-checks with qemu-img.
// ---------------------------------------------------------------------------------------

fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        kestrel_test_support::skip("qemu-img not installed");
    }
    ok
}

fn qemu_img(args: &[&str]) {
    // qemu-img times LUKS key derivation by CPU time and, on a loaded machine, can fail
    // with "Unable to get accurate CPU usage"; that is test setup, so try it again.
    let mut last = String::new();
    for _ in 0..5 {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        if out.status.success() {
            return;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        if !last.contains("Unable to get accurate CPU usage") {
            break;
        }
    }
    panic!("qemu-img {args:?}: {last}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn qemu_img_images_convert_identically() {
    if !have_qemu_img() {
        return;
    }
    let w = Work::new();
    let disk = disk_contents(24 * MIB as usize + 512);
    let raw_in = w.write("src.raw", &disk);
    let variants: &[(&str, &[&str])] = &[
        ("v2", &["-o", "compat=0.10"]),
        ("v3", &["-o", "compat=1.1"]),
        ("v2-zlib", &["-c", "-o", "compat=0.10"]),
        ("v3-zlib", &["-c", "-o", "compat=1.1"]),
        ("v3-zlib-4k", &["-c", "-o", "compat=1.1,cluster_size=4096"]),
        ("v3-2m", &["-o", "compat=1.1,cluster_size=2M"]),
        ("v3-zstd", &["-c", "-o", "compat=1.1,compression_type=zstd"]),
    ];
    for (name, opts) in variants {
        let q = w.path(&format!("{name}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&raw_in), s(&q)]);
        qemu_img(&args);
        let theirs = w.path(&format!("{name}.qemu.raw"));
        qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(&q), s(&theirs)]);
        let ours = w.path(&format!("{name}.ours.raw"));
        let stats = convert_path(&q, &ours).unwrap();
        assert_eq!(stats.format, ImageFormat::Qcow2);
        assert_eq!(stats.virtual_size, disk.len() as u64);
        let (a, b) = (fs::read(&ours).unwrap(), fs::read(&theirs).unwrap());
        assert!(a == b, "{name}: output differs from qemu-img's");
        assert!(a == disk, "{name}: output differs from the source");
        // Our output is at least as sparse as qemu-img's.
        let (ma, mb) = (fs::metadata(&ours).unwrap(), fs::metadata(&theirs).unwrap());
        assert!(
            ma.blocks() <= mb.blocks() + 8,
            "{name}: {} vs {}",
            ma.blocks(),
            mb.blocks()
        );
        fs::remove_file(&ours).unwrap();
        fs::remove_file(&theirs).unwrap();
    }
}

#[test]
fn qemu_img_empty_and_mostly_empty_images_stay_sparse() {
    if !have_qemu_img() {
        return;
    }
    let w = Work::new();
    for compat in ["0.10", "1.1"] {
        let q = w.path(&format!("empty-{compat}.qcow2"));
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat}"),
            s(&q),
            "1G",
        ]);
        let out = w.path(&format!("empty-{compat}.raw"));
        let stats = convert_path(&q, &out).unwrap();
        assert_eq!(stats.virtual_size, 1 << 30);
        assert_eq!(stats.bytes_written, 0);
        let m = fs::metadata(&out).unwrap();
        assert_eq!(m.len(), 1 << 30);
        assert_eq!(m.blocks(), 0);
    }
    // 1 GiB with 1 MiB of data: allocated size well under the virtual size.
    let raw = w.path("sparse-src.raw");
    let f = File::create(&raw).unwrap();
    f.set_len(1 << 30).unwrap();
    f.write_all_at(&random_bytes(5, MIB as usize), 300 * MIB)
        .unwrap();
    drop(f);
    let q = w.path("sparse.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)]);
    let out = w.path("sparse.raw");
    convert_path(&q, &out).unwrap();
    let blocks = fs::metadata(&out).unwrap().blocks() * 512;
    assert!(blocks <= 2 * MIB, "{blocks} bytes allocated");
    let theirs = w.path("sparse.qemu.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(&q), s(&theirs)]);
    assert!(fs::read(&out).unwrap() == fs::read(&theirs).unwrap());
}

#[test]
fn qemu_img_hostile_images_are_refused() {
    if !have_qemu_img() {
        return;
    }
    let w = Work::new();
    let backed = w.path("backed.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/etc/shadow",
        "-F",
        "raw",
        s(&backed),
        "1M",
    ]);
    assert!(matches!(
        convert_path(&backed, &w.path("o1")),
        Err(ConvertError::Qcow2(Qcow2Error::BackingFile))
    ));
    let data_file = w.path("data.raw");
    let ext = w.path("external.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&data_file)),
        s(&ext),
        "1M",
    ]);
    assert!(matches!(
        convert_path(&ext, &w.path("o2")),
        Err(ConvertError::Qcow2(Qcow2Error::ExternalDataFile))
    ));
    let enc = w.path("enc.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=password",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        s(&enc),
        "1M",
    ]);
    assert!(matches!(
        convert_path(&enc, &w.path("o3")),
        Err(ConvertError::Qcow2(Qcow2Error::Encrypted))
    ));
    let luks = w.path("luks.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=password",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100",
        s(&luks),
        "1M",
    ]);
    assert!(matches!(
        convert_path(&luks, &w.path("o4")),
        Err(ConvertError::Qcow2(Qcow2Error::Encrypted))
    ));
}

// ---------------------------------------------------------------------------------------
// Work bounded by the input, limits, inputs and sizes.
// ---------------------------------------------------------------------------------------

fn be64_at(img: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(img[at as usize..at as usize + 8].try_into().unwrap())
}

fn invalid_entry(img: &[u8]) -> String {
    match refused(img) {
        Qcow2Error::InvalidEntry(m) => m,
        other => panic!("expected an invalid entry, got {other:?}"),
    }
}

#[test]
fn a_cluster_used_twice_is_refused() {
    // Several L2 tables and many data clusters (4 KiB clusters, 4 MiB of disk).
    let disk = random_bytes(9, 4 * MIB as usize);
    let b = build_qcow2(
        Opts {
            cluster_bits: 12,
            ..Opts::default()
        },
        &disk,
    );
    let l1 = b.l1_offset;
    let (_, first) = b.l2_entry_at[0];
    let (_, second) = b.l2_entry_at[1];
    let data0 = be64_at(&b.bytes, first);

    // Two guest clusters naming one host cluster (the amplification of a 16 TiB "disk"
    // described by a few MiB).
    let mut img = b.bytes.clone();
    put64(&mut img, second as usize, data0);
    assert!(invalid_entry(&img).contains("also used"), "data twice");

    // Two L1 entries naming one L2 table.
    let mut img = b.bytes.clone();
    let l2a = be64_at(&img, l1);
    put64(&mut img, l1 as usize + 8, l2a);
    assert!(invalid_entry(&img).contains("L2 table"), "L2 twice");

    // A data cluster that is the L1 table, the refcount table or its own L2 table.
    for target in [l1, 4096, be64_at(&b.bytes, l1) & 0x00ff_ffff_ffff_fe00] {
        let mut img = b.bytes.clone();
        put64(&mut img, first as usize, target | 1 << 63);
        assert!(
            invalid_entry(&img).contains("also used"),
            "data at {target:#x}"
        );
    }

    // An L1 table overlapping the refcount table (at 4096).
    let mut img = b.bytes.clone();
    put64(&mut img, 40, 4096);
    assert!(matches!(refused(&img), Qcow2Error::InvalidEntry(_)));
}

#[test]
fn overlapping_compressed_clusters_are_refused() {
    // Every compressed entry names the first one's data: each alone is fine, but together
    // they decompress more bytes than the file has.
    let disk = text_bytes(2 * MIB as usize);
    let b = build_qcow2(
        Opts {
            cluster_bits: 12,
            comp: Comp::Deflate,
            ..Opts::default()
        },
        &disk,
    );
    let (_, first) = b.l2_entry_at[0];
    let entry = be64_at(&b.bytes, first);
    let mut img = b.bytes.clone();
    for &(_, at) in &b.l2_entry_at {
        put64(&mut img, at as usize, entry);
    }
    // Only the first stream is left in the file: a few KiB that claim 2 MiB of data.
    let x = 62 - (12 - 8);
    let start = entry & ((1 << x) - 1);
    let sectors = ((entry >> x) & ((1 << (12 - 8)) - 1)) + 1;
    img.truncate(((start & !511) + sectors * 512) as usize);
    let msg = invalid_entry(&img);
    assert!(msg.contains("compressed clusters overlap"), "{msg}");
    // The same image with its entries as built converts.
    assert_eq!(convert_bytes(&b.bytes).unwrap(), disk);
}

#[test]
fn limits_stop_a_conversion() {
    use super::convert::Limits;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let w = Work::new();
    let input = w.write("in.qcow2", &valid().bytes);
    let run = |limits: &Limits| {
        let inp = File::open(&input).unwrap();
        let out = File::create(w.path("out.raw")).unwrap();
        convert(&inp, ImageFormat::Qcow2, &out, limits, &mut |_, _| {})
    };
    let cancelled = Limits {
        cancel: Some(Arc::new(AtomicBool::new(true))),
        ..Limits::default()
    };
    assert!(matches!(run(&cancelled), Err(ConvertError::Cancelled)));
    let expired = Limits {
        timeout: Some(std::time::Duration::ZERO),
        ..Limits::default()
    };
    assert!(matches!(run(&expired), Err(ConvertError::TimedOut(_))));
    assert!(run(&Limits::default()).is_ok());
}

#[test]
fn inputs_that_are_not_files_are_refused_without_blocking() {
    let w = Work::new();
    let fifo = w.path("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (path, kind) in [
        (fifo.as_path(), "FIFO"),
        (w.dir.as_path(), "directory"),
        (Path::new("/dev/null"), "character device"),
    ] {
        // open_input returns at once, even for a FIFO with no writer.
        let file = super::open_input(path).unwrap();
        let out = File::create(w.path("out.raw")).unwrap();
        let err = convert(
            &file,
            ImageFormat::Raw,
            &out,
            &Default::default(),
            &mut |_, _| {},
        )
        .unwrap_err();
        let msg = crate::error_chain(&err);
        assert!(msg.contains(kind), "{path:?}: {msg}");
    }
}

#[test]
fn odd_sizes_are_rounded_as_qemu_does() {
    // QCOW2: down to whole sectors; raw: up, with zeroes.
    let mut img = valid().bytes;
    let size = be64_at(&img, 24);
    put64(&mut img, 24, size - 100);
    assert_eq!(convert_bytes(&img).unwrap().len() as u64, size - 512);
    let w = Work::new();
    let input = w.write("odd.raw", &[7u8; 1000]);
    let out = w.path("odd.out");
    convert_path(&input, &out).unwrap();
    let mut expect = vec![7u8; 1000];
    expect.resize(1024, 0);
    assert_eq!(fs::read(&out).unwrap(), expect);
}

#[test]
fn a_full_filesystem_is_found_before_writing() {
    // Asking the check for more than any filesystem has.
    let w = Work::new();
    let out = File::create(w.path("out.raw")).unwrap();
    let err = super::convert::check_space(&out, u64::MAX).unwrap_err();
    assert!(matches!(err, ConvertError::NoSpace { .. }), "{err:?}");
    assert!(err.to_string().contains("bytes free"), "{err}");
}
