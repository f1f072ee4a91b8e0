//! `kestrel convert` against a generated corpus of malformed QCOW2 images (issue 11):
//! backing and data files at host paths, encryption, unknown features, huge sizes and
//! tables, tables past the end, overlapping and self-referencing tables, refcount
//! oddities, compression bombs, truncated streams, header extensions of every length,
//! truncation at every region and seeded random flips of the header and tables.
//!
//! Each case runs the real binary under `strace` and must either be refused (status 125,
//! one line on stderr, nothing left in the output directory) or convert byte-identically
//! to `qemu-img convert -O raw`; with no crash, no stall (60 s), peak memory at most
//! 256 MiB and no file opened but the input, the output's directory and the loader's
//! files. The last line printed is the campaign's figure (cases, refused, converted,
//! peak memory, time). Needs qemu-img and strace (`scripts/install-deps.sh`), else
//! `skipped: …`.

// Test code: a failed setup step should panic with its cause.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
/// Peak memory allowed to one conversion (with strace, which is small, in the figure).
const MAX_RSS_KIB: i64 = 256 << 10;
const CASE_TIMEOUT: Duration = Duration::from_secs(60);

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Deterministic pseudo-random numbers.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// A qemu-made image and where its tables are.
struct Base {
    name: &'static str,
    bytes: Vec<u8>,
    cluster: u64,
    l1: u64,
    reftable: u64,
    /// Host offsets of the L2 tables, in guest order.
    l2: Vec<u64>,
    /// Host offsets of allocated L2 entries, in guest order.
    entries: Vec<u64>,
}

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

impl Base {
    fn parse(name: &'static str, bytes: Vec<u8>) -> Base {
        let cluster = 1u64 << u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        let l1 = get64(&bytes, 40);
        let l1_size = u32::from_be_bytes(bytes[36..40].try_into().unwrap()) as u64;
        let reftable = get64(&bytes, 48);
        let mut l2 = Vec::new();
        let mut entries = Vec::new();
        for i in 0..l1_size {
            let t = get64(&bytes, (l1 + i * 8) as usize) & OFFSET_MASK;
            if t == 0 {
                continue;
            }
            l2.push(t);
            for j in 0..cluster / 8 {
                let at = t + j * 8;
                if get64(&bytes, at as usize) != 0 {
                    entries.push(at);
                }
            }
        }
        assert!(!l2.is_empty() && !entries.is_empty(), "{name}: no tables");
        Base {
            name,
            bytes,
            cluster,
            l1,
            reftable,
            l2,
            entries,
        }
    }

    fn patched(&self, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut b = self.bytes.clone();
        f(&mut b);
        b
    }
}

/// A disk with random data, text, zero runs and a tail.
fn disk_contents(size: usize) -> Vec<u8> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut d = vec![0u8; size];
    for (i, chunk) in d.chunks_mut(64 << 10).enumerate() {
        match i % 4 {
            0 => chunk.iter_mut().for_each(|b| *b = rng.next() as u8),
            1 => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"kestrel qcow2 "[j % 14]),
            2 => {}
            _ => chunk[..100].fill(0x5a),
        }
    }
    d
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img").args(args).output().unwrap()
}

fn make_bases(dir: &Path) -> Vec<Base> {
    let raw = dir.join("base.raw");
    fs::write(&raw, disk_contents(4 * MIB)).unwrap();
    let mut bases = Vec::new();
    for (name, opts, compress) in [
        ("v3-64k", "compat=1.1,cluster_size=65536", false),
        ("v3-4k-zlib", "compat=1.1,cluster_size=4096", true),
        ("v2-512", "compat=0.10,cluster_size=512", false),
    ] {
        let out = dir.join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", opts];
        if compress {
            args.push("-c");
        }
        args.extend([raw.to_str().unwrap(), out.to_str().unwrap()]);
        let o = qemu_img(&args);
        assert!(o.status.success(), "{name}: {o:?}");
        bases.push(Base::parse(name, fs::read(&out).unwrap()));
    }
    bases
}

fn deflate_raw(data: &[u8]) -> Vec<u8> {
    use flate2::write::DeflateEncoder;
    let mut e = DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A compressed L2 entry for `len` bytes at `offset` with `cluster_bits`.
fn compressed_entry(offset: u64, len: u64, cluster_bits: u32) -> u64 {
    let x = 62 - (cluster_bits - 8);
    let sectors = ((offset % 512) + len).div_ceil(512).max(1);
    offset | (sectors - 1) << x | 1 << 62
}

/// Appends `data` at a fresh cluster and returns its offset.
fn append_cluster(b: &mut Vec<u8>, cluster: u64, data: &[u8]) -> u64 {
    let off = (b.len() as u64).div_ceil(cluster) * cluster;
    b.resize(off as usize, 0);
    b.extend_from_slice(data);
    off
}

/// Calls `add(name, bytes)` for every case, one at a time (the test process stays small,
/// and its size at spawn counts in the children's peak memory).
fn corpus(bases: &[Base], add: &mut dyn FnMut(String, Vec<u8>)) {
    for base in bases {
        let n = base.name;
        let cs = base.cluster;
        let cbits = cs.trailing_zeros();
        let len = base.bytes.len() as u64;
        let past_eof = len.div_ceil(cs) * cs + 16 * cs;
        let e0 = base.entries[0];
        let e1 = base.entries[1];
        let d0 = get64(&base.bytes, e0 as usize);
        let v3 = u32::from_be_bytes(base.bytes[4..8].try_into().unwrap()) == 3;
        let hlen = if v3 {
            u32::from_be_bytes(base.bytes[100..104].try_into().unwrap()) as usize
        } else {
            72
        };

        // The base itself: converts identically.
        add(format!("{n}/valid"), base.bytes.clone());

        // Backing files naming host paths, and a backing format alone.
        for path in [
            "/etc/shadow",
            "/dev/sda",
            "../../../../etc/passwd",
            "nbd://x",
        ] {
            add(
                format!("{n}/backing {path}"),
                base.patched(|b| {
                    let at = hlen + 64;
                    b[at..at + path.len()].copy_from_slice(path.as_bytes());
                    put64(b, 8, at as u64);
                    put32(b, 16, path.len() as u32);
                }),
            );
        }
        if v3 {
            // External data file: the bit, then the bit with its name extension.
            add(
                format!("{n}/data-file bit"),
                base.patched(|b| b[79] |= 1 << 2),
            );
            add(
                format!("{n}/data-file extension"),
                base.patched(|b| {
                    b[79] |= 1 << 2;
                    put32(b, hlen, 0x4441_5441);
                    put32(b, hlen + 4, 11);
                    b[hlen + 8..hlen + 19].copy_from_slice(b"/etc/shadow");
                    put32(b, hlen + 24, 0);
                }),
            );
        }
        // Encryption: AES, LUKS, a crypto header extension.
        for method in [1u32, 2, 3, 0xffff_ffff] {
            add(
                format!("{n}/crypt method {method}"),
                base.patched(|b| put32(b, 32, method)),
            );
        }
        if v3 {
            add(
                format!("{n}/crypto header extension"),
                base.patched(|b| {
                    put32(b, hlen, 0x0537_be77);
                    put32(b, hlen + 4, 16);
                    put64(b, hlen + 8, 2 * cs);
                    put64(b, hlen + 16, cs);
                    put32(b, hlen + 24, 0);
                }),
            );
            // Incompatible feature bits: known-but-refused and unknown.
            for bit in [1u32, 4, 5, 6, 17, 31, 32, 47, 63] {
                add(
                    format!("{n}/incompatible bit {bit}"),
                    base.patched(|b| {
                        let v = get64(b, 72) | 1u64 << bit;
                        put64(b, 72, v)
                    }),
                );
            }
            // Compatible and autoclear bits are ignorable.
            add(
                format!("{n}/compatible bits"),
                base.patched(|b| put64(b, 80, u64::MAX)),
            );
            add(
                format!("{n}/autoclear bits"),
                base.patched(|b| put64(b, 88, u64::MAX)),
            );
            for order in [0u32, 3, 6, 7, 64] {
                add(
                    format!("{n}/refcount order {order}"),
                    base.patched(|b| put32(b, 96, order)),
                );
            }
            for l in [0u32, 72, 100, 105, 4096, 0x7fff_fff8, u32::MAX] {
                add(
                    format!("{n}/header length {l}"),
                    base.patched(|b| put32(b, 100, l)),
                );
            }
            // Header extensions of many lengths and kinds.
            for (ty, ext_len) in [
                (0x1234_5678u32, 0u32),
                (0x1234_5678, 1),
                (0x1234_5678, 7),
                (0x1234_5678, 8),
                (0x1234_5678, cs as u32 - hlen as u32 - 8),
                (0x1234_5678, cs as u32),
                (0x1234_5678, u32::MAX),
                (0x6803_f857, 48), // feature name table
                (0x2375_2d6b, 0),  // bitmaps
                (0xe279_2aca, 3),  // backing format alone
            ] {
                add(
                    format!("{n}/extension {ty:#x} len {ext_len}"),
                    base.patched(|b| {
                        put32(b, hlen, ty);
                        put32(b, hlen + 4, ext_len);
                        let end = (hlen + 8 + ext_len as usize).min(b.len());
                        let body_end = end.min(cs as usize);
                        if body_end > hlen + 8 {
                            b[hlen + 8..body_end].fill(b'r');
                        }
                        let next = hlen + 8 + ((ext_len as usize + 7) & !7);
                        if next + 8 <= cs as usize {
                            put32(b, next, 0);
                        }
                    }),
                );
            }
            add(
                format!("{n}/many extensions"),
                base.patched(|b| {
                    let mut at = hlen;
                    while at + 16 <= cs as usize && at + 16 <= 4096 {
                        put32(b, at, 0x1111_0000 + at as u32);
                        put32(b, at + 4, 8);
                        at += 16;
                    }
                }),
            );
        }
        add(format!("{n}/version 1"), base.patched(|b| put32(b, 4, 1)));
        add(format!("{n}/version 4"), base.patched(|b| put32(b, 4, 4)));

        // Sizes.
        for (what, size) in [
            ("zero", 0u64),
            ("odd", 4 * MIB as u64 - 100),
            ("16 TiB + 1", (16u64 << 40) + 512),
            ("2^63", 1 << 63),
            ("u64::MAX", u64::MAX),
            ("larger than the L1 maps", 64 * MIB as u64),
        ] {
            add(
                format!("{n}/virtual size {what}"),
                base.patched(|b| put64(b, 24, size)),
            );
        }
        for bits in [0u32, 8, 22, 31, 63, u32::MAX] {
            add(
                format!("{n}/cluster bits {bits}"),
                base.patched(|b| put32(b, 20, bits)),
            );
        }
        for l1_size in [0u32, 0x0400_0000, u32::MAX] {
            add(
                format!("{n}/l1 size {l1_size}"),
                base.patched(|b| put32(b, 36, l1_size)),
            );
        }
        for clusters in [0u32, 0x0100_0000, u32::MAX] {
            add(
                format!("{n}/refcount table clusters {clusters}"),
                base.patched(|b| put32(b, 56, clusters)),
            );
        }
        add(
            format!("{n}/snapshots huge"),
            base.patched(|b| {
                put32(b, 60, u32::MAX);
                put64(b, 64, cs);
            }),
        );
        add(
            format!("{n}/snapshots past eof"),
            base.patched(|b| {
                put32(b, 60, 1);
                put64(b, 64, past_eof);
            }),
        );

        // Tables past the end of the file or unaligned.
        add(
            format!("{n}/l1 past eof"),
            base.patched(|b| put64(b, 40, past_eof)),
        );
        add(
            format!("{n}/l1 unaligned"),
            base.patched(|b| put64(b, 40, base.l1 + 8)),
        );
        add(
            format!("{n}/reftable past eof"),
            base.patched(|b| put64(b, 48, past_eof)),
        );
        add(
            format!("{n}/l2 past eof"),
            base.patched(|b| put64(b, base.l1 as usize, past_eof | 1 << 63)),
        );
        add(
            format!("{n}/data past eof"),
            base.patched(|b| put64(b, e0 as usize, past_eof | 1 << 63)),
        );
        add(
            format!("{n}/compressed past eof"),
            base.patched(|b| put64(b, e0 as usize, compressed_entry(past_eof, 100, cbits))),
        );
        add(
            format!("{n}/l2 entry reserved bits"),
            base.patched(|b| put64(b, e0 as usize, d0 | 1 << 57)),
        );
        add(
            format!("{n}/l2 entry unaligned"),
            base.patched(|b| put64(b, e0 as usize, ((d0 & OFFSET_MASK) + 512) | (1 << 63))),
        );

        // Overlapping and self-referencing tables.
        add(
            format!("{n}/l1 is the header"),
            base.patched(|b| put64(b, 40, 0)),
        );
        add(
            format!("{n}/l1 is the reftable"),
            base.patched(|b| put64(b, 40, base.reftable)),
        );
        add(
            format!("{n}/l2 is the l1"),
            base.patched(|b| put64(b, base.l1 as usize, base.l1 | 1 << 63)),
        );
        add(
            format!("{n}/l2 is the header"),
            base.patched(|b| put64(b, base.l1 as usize, cs | 1 << 63)),
        );
        add(
            format!("{n}/data is its l2"),
            base.patched(|b| put64(b, e0 as usize, base.l2[0] | 1 << 63)),
        );
        add(
            format!("{n}/data is the l1"),
            base.patched(|b| put64(b, e0 as usize, base.l1 | 1 << 63)),
        );
        add(
            format!("{n}/data is the reftable"),
            base.patched(|b| put64(b, e0 as usize, base.reftable | 1 << 63)),
        );
        add(
            format!("{n}/two entries one cluster"),
            base.patched(|b| put64(b, e1 as usize, d0)),
        );
        // Amplification: every L1 entry names the first L2 table, whose entries all
        // name one cluster; a few KiB claiming 16 TiB.
        add(
            format!("{n}/amplification"),
            base.patched(|b| {
                let bits = cbits;
                let coverage = cs * (cs / 8);
                let size = (16u64 << 40).min(coverage * (32 << 20) / 8);
                let l1_entries = size.div_ceil(coverage);
                let l1_bytes = l1_entries * 8;
                let l2 = append_cluster(b, cs, &vec![0u8; cs as usize]);
                let data = append_cluster(b, cs, &vec![0xa5u8; cs as usize]);
                for j in 0..cs / 8 {
                    put64(b, (l2 + j * 8) as usize, data | 1 << 63);
                }
                let mut l1 = vec![0u8; l1_bytes.div_ceil(cs) as usize * cs as usize];
                for i in 0..l1_entries as usize {
                    put64(&mut l1, i * 8, l2 | 1 << 63);
                }
                let l1_at = append_cluster(b, cs, &l1);
                put64(b, 24, size);
                put32(b, 20, bits);
                put32(b, 36, l1_entries as u32);
                put64(b, 40, l1_at);
            }),
        );

        // Refcount oddities (refcounts are never consulted: these convert).
        add(
            format!("{n}/reftable zeroed"),
            base.patched(|b| {
                let at = base.reftable as usize;
                b[at..at + cs as usize].fill(0)
            }),
        );
        add(
            format!("{n}/refblock is itself"),
            base.patched(|b| {
                let at = base.reftable as usize;
                put64(b, at, base.reftable)
            }),
        );
        if v3 {
            add(format!("{n}/dirty bit"), base.patched(|b| b[79] |= 1));
        }

        // Compression bombs and truncated streams.
        let bomb = deflate_raw(&vec![0u8; 64 * cs as usize]);
        let short = deflate_raw(&vec![1u8; cs as usize / 2]);
        let long = deflate_raw(&vec![1u8; cs as usize + 1]);
        let exact = deflate_raw(&vec![7u8; cs as usize]);
        for (what, stream) in [
            ("bomb", bomb.clone()),
            ("short", short),
            ("long", long),
            ("truncated", exact[..exact.len() / 2].to_vec()),
            ("garbage", vec![0xffu8; 64]),
            ("exact", exact.clone()),
        ] {
            add(
                format!("{n}/compressed {what}"),
                base.patched(|b| {
                    let off = append_cluster(b, cs, &stream);
                    put64(
                        b,
                        e0 as usize,
                        compressed_entry(off, stream.len() as u64, cbits),
                    );
                }),
            );
        }
        add(
            format!("{n}/compressed stream cut by eof"),
            base.patched(|b| {
                let off = append_cluster(b, cs, &exact[..exact.len() / 2]);
                put64(
                    b,
                    e0 as usize,
                    compressed_entry(off, exact.len() as u64, cbits),
                );
            }),
        );
        add(
            format!("{n}/compressed streams overlap"),
            base.patched(|b| {
                let off = append_cluster(b, cs, &exact);
                let e = compressed_entry(off, exact.len() as u64, cbits);
                for &at in &base.entries {
                    put64(b, at as usize, e);
                }
            }),
        );
        if v3 {
            add(
                format!("{n}/zstd window bomb"),
                base.patched(|b| {
                    b[79] |= 1 << 3;
                    if hlen < 112 {
                        put32(b, 100, 112);
                    }
                    b[104] = 1;
                    // A zstd frame header asking for a 2 GiB window.
                    let frame = [0x28u8, 0xb5, 0x2f, 0xfd, 0x00, 0xf8, 0, 0, 0, 0];
                    let off = append_cluster(b, cs, &frame);
                    put64(
                        b,
                        e0 as usize,
                        compressed_entry(off, frame.len() as u64, cbits),
                    );
                }),
            );
            add(
                format!("{n}/compression type 2"),
                base.patched(|b| {
                    b[79] |= 1 << 3;
                    put32(b, 100, 112);
                    b[104] = 2;
                }),
            );
        }

        // Truncation at every region.
        let mut cuts: Vec<u64> = vec![0, 3, 4, 8, 71, 72, 103, 104, hlen as u64 + 4];
        cuts.extend([
            base.reftable,
            base.reftable + 8,
            base.l1,
            base.l1 + 4,
            base.l2[0],
            base.l2[0] + cs / 2,
            d0 & OFFSET_MASK,
            (d0 & OFFSET_MASK) + cs / 2,
            len - 1,
        ]);
        cuts.sort();
        cuts.dedup();
        for cut in cuts.into_iter().filter(|&c| c < len) {
            add(
                format!("{n}/truncated at {cut}"),
                base.bytes[..cut as usize].to_vec(),
            );
        }

        // Seeded random flips: of the header, then of the tables.
        let mut rng = Rng(0x1234_5678 ^ cs);
        for i in 0..12 {
            let mut b = base.bytes.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(hlen as u64 + 8) as usize;
                b[at] ^= 1 << rng.below(8);
            }
            add(format!("{n}/header flip {i}"), b);
        }
        for i in 0..8 {
            let mut b = base.bytes.clone();
            for _ in 0..1 + rng.below(4) {
                let table = [base.l1, base.l2[0], base.reftable][rng.below(3) as usize];
                let at = (table + rng.below(64)) as usize;
                b[at] ^= 1 << rng.below(8);
            }
            add(format!("{n}/table flip {i}"), b);
        }
    }
}

/// What one run of `kestrel convert` did.
struct Run {
    status: std::process::ExitStatus,
    stderr: String,
    max_rss_kib: i64,
    opened: Vec<String>,
    elapsed: Duration,
}

/// Runs `kestrel convert` under strace under GNU time: the peak memory time reports is
/// strace's or the converter's, both forked from small processes (a child forked from this
/// test process would start at its size).
fn run_convert(kestrel: &Path, input: &Path, output: &Path, trace: &Path) -> Run {
    let started = Instant::now();
    let rss_file = trace.with_extension("rss");
    let mut child = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss_file)
        .arg("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=open,openat,openat2,creat,link,linkat",
        ])
        .arg("-o")
        .arg(trace)
        .arg(kestrel)
        .arg("convert")
        .arg(input)
        .arg(output)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap_or_default();
            // Progress lines are not errors.
            if !line.starts_with("converting:") {
                s.push_str(&line);
                s.push('\n');
            }
        }
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > CASE_TIMEOUT {
            let _ = child.kill();
            panic!("{}: no answer within {CASE_TIMEOUT:?}", input.display());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    // GNU time exits with its child's status; the last line of its file is %M.
    let max_rss_kib = fs::read_to_string(&rss_file)
        .unwrap_or_default()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(i64::MAX);
    let trace_text = fs::read_to_string(trace).unwrap_or_default();
    let opened = trace_text
        .lines()
        .filter(|l| !l.contains("= -1 "))
        .filter_map(|l| l.split('"').nth(1).map(str::to_string))
        .collect();
    Run {
        status,
        stderr: reader.join().unwrap(),
        max_rss_kib,
        opened,
        elapsed: started.elapsed(),
    }
}

/// Files the loader and std open in every run.
fn is_runtime_file(p: &str) -> bool {
    p == "/etc/ld.so.cache"
        || p == "/proc/self/maps"
        || p.starts_with("/lib/x86_64-linux-gnu/")
        || p.starts_with("/usr/lib/x86_64-linux-gnu/")
        || p.starts_with("/proc/self/fd/")
}

#[test]
fn hostile_qcow2_corpus_is_refused_or_converted_like_qemu() {
    if !have("qemu-img") || !have("strace") || !Path::new("/usr/bin/time").exists() {
        kestrel_test_support::skip(
            "qemu-img, strace or GNU time is not installed (scripts/install-deps.sh)",
        );
        return;
    }
    let kestrel = PathBuf::from(env!("CARGO_BIN_EXE_kestrel"));
    let work = tempfile::Builder::new()
        .prefix("kestrel-hostile")
        .tempdir_in("/var/tmp")
        .unwrap();
    let bases = make_bases(work.path());
    let mut cases: Vec<(String, PathBuf)> = Vec::new();
    corpus(&bases, &mut |name, bytes| {
        let case_dir = work.path().join(format!("case-{}", cases.len()));
        fs::create_dir(&case_dir).unwrap();
        let input = case_dir.join("in.qcow2");
        fs::write(&input, bytes).unwrap();
        cases.push((name, input));
    });
    drop(bases);
    assert!(cases.len() >= 100, "only {} cases", cases.len());

    let started = Instant::now();
    let (mut refused, mut converted, mut peak) = (0, 0, 0i64);
    let mut failures = Vec::new();
    for (name, input) in &cases {
        let case_dir = input.parent().unwrap();
        let input = input.as_path();
        let qcow2 = fs::read(input).unwrap().starts_with(b"QFI\xfb");
        let out_dir = case_dir.join("out");
        fs::create_dir(&out_dir).unwrap();
        let output = out_dir.join("disk.raw");
        let run = run_convert(&kestrel, input, &output, &case_dir.join("trace"));
        peak = peak.max(run.max_rss_kib);
        let mut fail = |why: String| failures.push(format!("{name}: {why}"));

        if run.max_rss_kib > MAX_RSS_KIB {
            fail(format!("peak memory {} KiB", run.max_rss_kib));
        }
        let out_dir_s = out_dir.to_str().unwrap();
        for p in &run.opened {
            let allowed = p == input.to_str().unwrap()
                || p == out_dir_s
                || p == output.to_str().unwrap()
                || p.starts_with(&format!("{out_dir_s}/.kestrel-"))
                || p == kestrel.to_str().unwrap()
                || is_runtime_file(p);
            if !allowed {
                fail(format!("opened {p}"));
            }
        }
        let left: Vec<_> = fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        match run.status.code() {
            Some(0) => {
                converted += 1;
                if left != ["disk.raw"] {
                    fail(format!("output directory holds {left:?}"));
                }
                let theirs = case_dir.join("qemu.raw");
                // Without the magic, the input is a raw disk to both.
                let q = qemu_img(&[
                    "convert",
                    "-f",
                    if qcow2 { "qcow2" } else { "raw" },
                    "-O",
                    "raw",
                    input.to_str().unwrap(),
                    theirs.to_str().unwrap(),
                ]);
                if !q.status.success() {
                    fail(format!(
                        "converted ({}), but qemu-img refuses it: {}",
                        run.stderr.trim(),
                        String::from_utf8_lossy(&q.stderr).trim()
                    ));
                } else if fs::read(&output).unwrap() != fs::read(&theirs).unwrap() {
                    fail("output differs from qemu-img's".into());
                }
            }
            Some(125) => {
                refused += 1;
                let lines: Vec<_> = run.stderr.lines().collect();
                if lines.len() != 1 || !lines[0].starts_with("kestrel: error: cannot convert") {
                    fail(format!("refusal is not one line: {:?}", run.stderr));
                }
                if !left.is_empty() {
                    fail(format!("refused, but left {left:?}"));
                }
            }
            other => fail(format!(
                "exit {other:?} (signal {:?}): {}",
                run.status.signal(),
                run.stderr
            )),
        }
        if std::env::var_os("KESTREL_HOSTILE_VERBOSE").is_some() {
            eprintln!(
                "{name}: {:?} {:.0} ms {} KiB {}",
                run.status.code(),
                run.elapsed.as_secs_f64() * 1000.0,
                run.max_rss_kib,
                run.stderr.trim()
            );
        }
        let _ = fs::remove_dir_all(case_dir);
    }
    kestrel_test_support::campaign(format_args!(
        "hostile QCOW2 corpus: {} cases, {refused} refused, {converted} converted like qemu-img, \
         {} failures, peak memory {:.1} MiB, {:.1} s",
        cases.len(),
        failures.len(),
        peak as f64 / 1024.0,
        started.elapsed().as_secs_f64()
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_killed_conversion_leaves_nothing() {
    // 256 MiB of data converts for long enough to be killed mid-way.
    let kestrel = PathBuf::from(env!("CARGO_BIN_EXE_kestrel"));
    let work = tempfile::Builder::new()
        .prefix("kestrel-kill")
        .tempdir_in("/var/tmp")
        .unwrap();
    let input = work.path().join("big.raw");
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 | 1).collect();
    {
        let mut f = fs::File::create(&input).unwrap();
        for _ in 0..256 {
            f.write_all(&chunk).unwrap();
        }
    }
    let out_dir = work.path().join("out");
    for signal in [libc::SIGKILL, libc::SIGTERM, libc::SIGINT] {
        fs::create_dir_all(&out_dir).unwrap();
        let mut child = Command::new(&kestrel)
            .arg("convert")
            .arg(&input)
            .arg(out_dir.join("disk.raw"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The first progress line says the output exists and is being written.
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        assert!(first.starts_with("converting:"), "{first}");
        // SAFETY: the child is ours and has not been waited for.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(signal), "killed mid-way");
        let left: Vec<_> = fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "signal {signal}: left {left:?}");
        fs::remove_dir_all(&out_dir).unwrap();
    }
}
