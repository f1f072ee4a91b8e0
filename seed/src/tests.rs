//! Unit tests: the text of meta-data and user-data, validation, and the FAT image read
//! back by an independent little FAT12 reader.

use super::*;

fn seed(env: &[(&str, &str)]) -> Seed {
    Seed {
        instance_id: "i-0123abcd".into(),
        hostname: "web-0.example".into(),
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        extra_user_data: None,
        network_config: None,
    }
}

// ---------------------------------------------------------------- text

#[test]
fn meta_data_text() {
    assert_eq!(
        meta_data(&seed(&[])).unwrap(),
        "instance-id: \"i-0123abcd\"\nlocal-hostname: \"web-0.example\"\n"
    );
}

#[test]
fn user_data_text_exact() {
    let s = seed(&[("PATH", "/usr/bin:/bin"), ("GREETING", "hi # there: \"x\"")]);
    assert_eq!(
        user_data(&s).unwrap(),
        "#cloud-config\n\
         # kestrel: the container environment, one NAME=VALUE line each\n\
         write_files:\n  \
         - path: /etc/cloud/environment\n    \
         content: |+\n      \
         PATH=/usr/bin:/bin\n      \
         GREETING=hi # there: \"x\"\n    \
         permissions: '0644'\n"
    );
    assert_eq!(
        environment_file(&s).unwrap(),
        "PATH=/usr/bin:/bin\nGREETING=hi # there: \"x\"\n"
    );
}

#[test]
fn user_data_empty_environment() {
    let ud = user_data(&seed(&[])).unwrap();
    assert!(
        ud.ends_with("    content: |+\n    permissions: '0644'\n"),
        "{ud}"
    );
    assert_eq!(extract_environment(&ud).unwrap(), "");
}

#[test]
fn tricky_values_round_trip_through_the_six_space_rule() {
    let env = [
        ("QUOTES", "'single' \"double\" `back`"),
        ("COLON", "a: b"),
        ("HASH", "#not a comment"),
        ("BACKSLASH", "C:\\path\\n"),
        ("MULTI", "line one\n  indented two\n\nfour"),
        ("TRAILING_NL", "x\n"),
        ("TWO_TRAILING_NL", "y\n\n"),
        ("ONLY_SPACES", "   "),
        ("TAB", "\tlead\ttab"),
        (
            "UNICODE",
            "h\u{e9}llo \u{2603} \u{1F600} \u{4E2D}\u{6587} \u{FEFF}",
        ),
        ("EMPTY", ""),
        ("YAML_LOOKALIKE", "--- ... - [a] {b} &c *d !e |f >g %h @i"),
        ("_under_score1", "1"),
    ];
    let s = seed(&env);
    let ud = user_data(&s).unwrap();
    let expected = environment_file(&s).unwrap();
    assert_eq!(extract_environment(&ud).unwrap(), expected);
    // Every environment line is indented; the block ends at `permissions`.
    let block: Vec<&str> = ud
        .split('\n')
        .skip_while(|l| *l != CONTENT_LINE)
        .skip(1)
        .take_while(|l| !l.starts_with("    permissions"))
        .collect();
    assert!(block.iter().all(|l| l.starts_with(CONTENT_INDENT)));
    assert_eq!(block.len(), expected.split_terminator('\n').count());
}

#[test]
fn invalid_names_are_refused_by_name() {
    for bad in ["", "1X", "A-B", "A B", "A=B", "\u{e9}T\u{e9}", "X\n"] {
        let err = user_data(&seed(&[("OK", "1"), (bad, "v")])).unwrap_err();
        assert!(
            matches!(&err, SeedError::InvalidEnvName { key } if key == bad),
            "{err}"
        );
        assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
    }
}

#[test]
fn unrepresentable_values_are_refused() {
    for (bad, what) in [
        ("a\rb", "U+000D"),
        ("nul\0", "U+0000"),
        ("bell\u{7}", "U+0007"),
        ("del\u{7F}", "U+007F"),
        ("nel\u{85}", "U+0085"),
        ("c1\u{9B}", "U+009B"),
        ("ls\u{2028}", "U+2028"),
        ("ps\u{2029}", "U+2029"),
        ("x MiMe-VeRsIoN: 1.0", "MIME-Version:"),
    ] {
        let err = user_data(&seed(&[("KEY", bad)])).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, SeedError::InvalidEnvValue { ref key, .. } if key == "KEY"));
        assert!(msg.contains("KEY") && msg.contains(what), "{msg}");
    }
}

#[test]
fn instance_id_and_hostname_are_validated() {
    for id in ["", ".hidden", "a/b", "a b", "x\"y", &"a".repeat(256)] {
        let s = Seed {
            instance_id: id.to_owned(),
            ..seed(&[])
        };
        assert!(
            matches!(meta_data(&s), Err(SeedError::InvalidInstanceId { .. })),
            "{id}"
        );
    }
    for host in [
        "",
        "-a",
        "a-",
        "a..b",
        "a_b",
        "h\u{e9}",
        &"a".repeat(64),
        "a.b.",
    ] {
        let s = Seed {
            hostname: host.to_owned(),
            ..seed(&[])
        };
        assert!(
            matches!(meta_data(&s), Err(SeedError::InvalidHostname { .. })),
            "{host}"
        );
    }
    let ok = Seed {
        instance_id: "0f3c2a9e-7b1d-4c52-9d0e-3a1b2c3d4e5f:pod_1.x".into(),
        hostname: "A1.b-2.c".into(),
        ..seed(&[])
    };
    meta_data(&ok).unwrap();
}

#[test]
fn yaml_quoting() {
    assert_eq!(yaml_quoted("a\"b\\c\nd\te"), r#""a\"b\\c\nd\te""#);
    assert_eq!(
        yaml_quoted("\u{1}\u{85}\u{FEFF}"),
        r#""\U00000001\U00000085\U0000FEFF""#
    );
    assert_eq!(yaml_quoted("h\u{e9}"), "\"h\u{e9}\"");
}

#[test]
fn base64_matches_rfc4648_vectors() {
    for (plain, enc) in [
        ("", ""),
        ("f", "Zg==\n"),
        ("fo", "Zm8=\n"),
        ("foo", "Zm9v\n"),
        ("foob", "Zm9vYg==\n"),
        ("fooba", "Zm9vYmE=\n"),
        ("foobar", "Zm9vYmFy\n"),
    ] {
        assert_eq!(base64_lines(plain.as_bytes()), enc);
    }
    let long = base64_lines(&[0xFF; 100]);
    let lines: Vec<&str> = long.split_terminator('\n').collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0].len(), 76);
    assert!(lines[0].chars().all(|c| c == '/'));
}

#[test]
fn multipart_user_data_layout() {
    let mut s = seed(&[("A", "1")]);
    s.extra_user_data = Some("#!/bin/sh\necho kestrel-seed-0\n".into());
    let ud = user_data(&s).unwrap();
    // The extra data mentions kestrel-seed-0, so the boundary moves on.
    assert!(ud.starts_with(
        "Content-Type: multipart/mixed; boundary=\"kestrel-seed-1\"\nMIME-Version: 1.0\n\n--kestrel-seed-1\n"
    ));
    assert!(ud.ends_with("\n--kestrel-seed-1--\n"));
    assert_eq!(ud.matches("--kestrel-seed-1\n").count(), 2);
    assert!(ud.contains("Content-Type: text/plain; charset=\"utf-8\""));
    assert!(ud.contains(&base64_lines(b"#!/bin/sh\necho kestrel-seed-0\n")));
    let ours = cloud_config(&environment_file(&s).unwrap(), true);
    assert!(ours.contains("merge_how:\n"));
    assert!(ud.contains(&base64_lines(ours.as_bytes())));
    // Empty extra user data is no extra user data.
    s.extra_user_data = Some(String::new());
    assert!(user_data(&s).unwrap().starts_with("#cloud-config\n"));
    // A MIME entity is embedded verbatim.
    s.extra_user_data = Some("Content-Type: text/x-shellscript\n\n#!/bin/sh\ntrue".into());
    let ud = user_data(&s).unwrap();
    assert!(ud.contains(
        "--kestrel-seed-0\nContent-Type: text/x-shellscript\n\n#!/bin/sh\ntrue\n--kestrel-seed-0\n"
    ));
}

// ---------------------------------------------------------------- FAT reader

/// What the boot sector says.
#[derive(Debug)]
struct Bpb {
    bytes_per_sector: usize,
    sectors_per_cluster: usize,
    reserved: usize,
    fats: usize,
    root_entries: usize,
    total_sectors: usize,
    media: u8,
    fat_sectors: usize,
    label: [u8; 11],
    serial: u32,
    fs_type: [u8; 8],
}

fn le16(b: &[u8], off: usize) -> usize {
    usize::from(u16::from_le_bytes([b[off], b[off + 1]]))
}

fn parse_bpb(img: &[u8]) -> Bpb {
    assert_eq!(&img[510..512], &[0x55, 0xAA], "boot signature");
    assert_eq!(img[0], 0xEB, "jump");
    assert_eq!(img[38], 0x29, "extended boot signature");
    Bpb {
        bytes_per_sector: le16(img, 11),
        sectors_per_cluster: usize::from(img[13]),
        reserved: le16(img, 14),
        fats: usize::from(img[16]),
        root_entries: le16(img, 17),
        total_sectors: le16(img, 19),
        media: img[21],
        fat_sectors: le16(img, 22),
        serial: u32::from_le_bytes(img[39..43].try_into().unwrap()),
        label: img[43..54].try_into().unwrap(),
        fs_type: img[54..62].try_into().unwrap(),
    }
}

fn fat12_get(fat: &[u8], cluster: usize) -> u16 {
    let v = u16::from_le_bytes([fat[cluster * 3 / 2], fat[cluster * 3 / 2 + 1]]);
    if cluster % 2 == 0 {
        v & 0xFFF
    } else {
        v >> 4
    }
}

#[derive(Debug, PartialEq)]
struct Entry {
    long_name: Option<String>,
    short_name: [u8; 11],
    attr: u8,
    cluster: usize,
    size: usize,
}

/// Reads the root directory, checking every LFN sequence (ordinals, checksum, padding).
fn read_root(img: &[u8], bpb: &Bpb) -> Vec<Entry> {
    let start = (bpb.reserved + bpb.fats * bpb.fat_sectors) * bpb.bytes_per_sector;
    let mut out = Vec::new();
    let mut lfn: Vec<[u8; 32]> = Vec::new();
    for i in 0..bpb.root_entries {
        let e: [u8; 32] = img[start + i * 32..start + i * 32 + 32].try_into().unwrap();
        if e[0] == 0 {
            assert!(lfn.is_empty(), "dangling LFN entries");
            // Everything after the end marker is zero too.
            assert!(img[start + i * 32..start + bpb.root_entries * 32]
                .iter()
                .all(|&b| b == 0));
            break;
        }
        if e[11] == fat::ATTR_LFN {
            lfn.push(e);
            continue;
        }
        let short_name: [u8; 11] = e[..11].try_into().unwrap();
        let long_name = if lfn.is_empty() {
            None
        } else {
            let n = lfn.len();
            assert_eq!(
                usize::from(lfn[0][0]),
                0x40 | n,
                "first LFN entry: last ordinal"
            );
            let mut units = Vec::new();
            for (k, l) in lfn.iter().rev().enumerate() {
                assert_eq!(usize::from(l[0] & 0x3F), k + 1, "ordinal");
                assert_eq!(l[13], fat::lfn_checksum(&short_name), "LFN checksum");
                assert_eq!(l[12], 0, "LFN type");
                assert_eq!(le16(l, 26), 0, "LFN cluster");
                for off in [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30] {
                    units.push(u16::from_le_bytes([l[off], l[off + 1]]));
                }
            }
            let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
            assert!(units[end.min(units.len())..]
                .iter()
                .skip(1)
                .all(|&u| u == 0xFFFF));
            lfn.clear();
            Some(String::from_utf16(&units[..end]).unwrap())
        };
        out.push(Entry {
            long_name,
            short_name,
            attr: e[11],
            cluster: le16(&e, 26),
            size: u32::from_le_bytes(e[28..32].try_into().unwrap()) as usize,
        });
    }
    out
}

/// Follows a cluster chain and returns the file's bytes; marks clusters as used.
fn read_file(img: &[u8], bpb: &Bpb, fat: &[u8], e: &Entry, used: &mut [bool]) -> Vec<u8> {
    let cluster_bytes = bpb.sectors_per_cluster * bpb.bytes_per_sector;
    let root_sectors = (bpb.root_entries * 32).div_ceil(bpb.bytes_per_sector);
    let data_start =
        (bpb.reserved + bpb.fats * bpb.fat_sectors + root_sectors) * bpb.bytes_per_sector;
    let mut out = Vec::new();
    let mut c = e.cluster;
    if e.size == 0 {
        assert_eq!(c, 0);
        return out;
    }
    loop {
        assert!(c >= 2 && c < used.len(), "cluster {c} out of range");
        assert!(!used[c], "cluster {c} used twice");
        used[c] = true;
        let off = data_start + (c - 2) * cluster_bytes;
        out.extend_from_slice(&img[off..off + cluster_bytes]);
        let next = fat12_get(fat, c);
        if next >= 0xFF8 {
            break;
        }
        c = usize::from(next);
    }
    assert_eq!(
        out.len(),
        e.size.div_ceil(cluster_bytes) * cluster_bytes,
        "chain length"
    );
    assert!(out[e.size..].iter().all(|&b| b == 0), "slack is zero");
    out.truncate(e.size);
    out
}

/// (long name, contents) of each file.
type Files = Vec<(String, Vec<u8>)>;

/// Parses the whole image; returns the BPB, the root directory and the files.
fn read_image(img: &[u8]) -> (Bpb, Vec<Entry>, Files) {
    let bpb = parse_bpb(img);
    assert_eq!(img.len(), bpb.total_sectors * bpb.bytes_per_sector);
    let fat_len = bpb.fat_sectors * bpb.bytes_per_sector;
    let fat0 = &img[bpb.reserved * 512..bpb.reserved * 512 + fat_len];
    let fat1 = &img[bpb.reserved * 512 + fat_len..bpb.reserved * 512 + 2 * fat_len];
    assert_eq!(fat0, fat1, "both FAT copies agree");
    assert_eq!(fat12_get(fat0, 0), 0xF00 | u16::from(bpb.media));
    assert_eq!(fat12_get(fat0, 1), 0xFFF);
    let root_sectors = (bpb.root_entries * 32).div_ceil(bpb.bytes_per_sector);
    let data_sectors = bpb.total_sectors - bpb.reserved - bpb.fats * bpb.fat_sectors - root_sectors;
    let clusters = data_sectors / bpb.sectors_per_cluster;
    assert!(clusters < 4085, "FAT12 by cluster count");
    assert!((clusters + 2) * 3 / 2 <= fat_len, "FAT maps every cluster");
    let entries = read_root(img, &bpb);
    let mut used = vec![false; clusters + 2];
    let files = entries
        .iter()
        .filter(|e| e.attr & fat::ATTR_VOLUME_ID == 0)
        .map(|e| {
            (
                e.long_name.clone().unwrap(),
                read_file(img, &bpb, fat0, e, &mut used),
            )
        })
        .collect();
    // No cluster is allocated without belonging to a file.
    for (c, &u) in used.iter().enumerate().skip(2) {
        assert_eq!(fat12_get(fat0, c) != 0, u, "cluster {c} allocation");
    }
    (bpb, entries, files)
}

// ---------------------------------------------------------------- FAT tests

#[test]
fn geometry_is_fat12_and_fills_the_image() {
    let g = fat::GEOMETRY;
    assert_eq!(g.fat_sectors, 3);
    assert_eq!(g.root_dir_sectors, 32);
    assert_eq!(g.first_data_sector, 1 + 2 * 3 + 32);
    assert_eq!(g.clusters, 1014);
    assert_eq!(SEED_CAPACITY, 1014 * 2048);
    assert_eq!(IMAGE_SIZE, 2 * 1024 * 1024);
}

#[test]
fn lfn_checksum_known_value() {
    // The rule: rotate the 8-bit sum right by one, then add the next name byte.
    let reference = |name: &[u8; 11]| {
        name.iter()
            .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b))
    };
    for name in [b"META-D~1   ", b"USER-D~1   ", b"A          ", &[0xFF; 11]] {
        assert_eq!(fat::lfn_checksum(name), reference(name));
    }
    assert_eq!(fat::lfn_checksum(&[0; 11]), 0);
    // Computed independently (Python): 'A' (0x41) then ten spaces (0x20).
    assert_eq!(fat::lfn_checksum(b"A          "), 0x80);
}

#[test]
fn fat12_packing() {
    let mut fat = vec![0u8; 6];
    for (c, v) in [(0u32, 0xABC), (1, 0x123), (2, 0xFFF), (3, 0x004)] {
        fat::fat12_set(&mut fat, c, v).unwrap();
    }
    assert_eq!(fat, [0xBC, 0x3A, 0x12, 0xFF, 0x4F, 0x00]);
    assert_eq!(fat12_get(&fat, 0), 0xABC);
    assert_eq!(fat12_get(&fat, 1), 0x123);
    assert_eq!(fat12_get(&fat, 2), 0xFFF);
    assert_eq!(fat12_get(&fat, 3), 0x004);
    assert!(fat::fat12_set(&mut fat, 4, 1).is_err());
}

#[test]
fn image_structure_reads_back() {
    let s = seed(&[("A", "1"), ("UNICODE", "\u{2603}\u{1F600}")]);
    let img = build_seed_image(&s).unwrap();
    assert_eq!(img.len() as u64, IMAGE_SIZE);
    let (bpb, entries, files) = read_image(&img);
    assert_eq!(bpb.bytes_per_sector, 512);
    assert_eq!(bpb.sectors_per_cluster, 4);
    assert_eq!(bpb.reserved, 1);
    assert_eq!(bpb.fats, 2);
    assert_eq!(bpb.root_entries, 512);
    assert_eq!(bpb.total_sectors, 4096);
    assert_eq!(bpb.media, 0xF8);
    assert_eq!(bpb.fat_sectors, 3);
    assert_eq!(&bpb.label, b"CIDATA     ");
    assert_eq!(&bpb.fs_type, b"FAT12   ");
    assert_eq!(bpb.serial, fnv1a(b"i-0123abcd"));

    // Volume label entry first, then each file's LFN entry + 8.3 entry.
    assert_eq!(entries.len(), 3);
    assert_eq!(
        entries[0],
        Entry {
            long_name: None,
            short_name: *b"CIDATA     ",
            attr: fat::ATTR_VOLUME_ID,
            cluster: 0,
            size: 0
        }
    );
    assert_eq!(&entries[1].short_name, b"META-D~1   ");
    assert_eq!(&entries[2].short_name, b"USER-D~1   ");
    assert_eq!(entries[1].cluster, 2);
    assert_eq!(entries[2].cluster, 3);
    assert!(entries[1..].iter().all(|e| e.attr == fat::ATTR_ARCHIVE));

    assert_eq!(
        files,
        vec![
            ("meta-data".to_owned(), meta_data(&s).unwrap().into_bytes()),
            ("user-data".to_owned(), user_data(&s).unwrap().into_bytes()),
        ]
    );
    // Deterministic.
    assert_eq!(build_seed_image(&s).unwrap(), img);
}

#[test]
fn multi_cluster_files_chain_and_capacity_is_enforced() {
    // ~1.5 MB of environment: user-data spans hundreds of clusters.
    let big = "v".repeat(1000);
    let env: Vec<(String, String)> = (0..1500).map(|i| (format!("K{i}"), big.clone())).collect();
    let s = Seed { env, ..seed(&[]) };
    let img = build_seed_image(&s).unwrap();
    let (_, entries, files) = read_image(&img);
    assert!(entries[2].size > 1_500_000);
    assert_eq!(files[1].1, user_data(&s).unwrap().into_bytes());

    let env: Vec<(String, String)> = (0..2100).map(|i| (format!("K{i}"), big.clone())).collect();
    let err = build_seed_image(&Seed { env, ..seed(&[]) }).unwrap_err();
    assert!(matches!(err, SeedError::TooLarge { capacity, .. } if capacity == SEED_CAPACITY));
    assert!(err.to_string().contains("too large"), "{err}");
}

#[test]
fn short_names_and_lfn_entries() {
    let taken = [*b"META-D~1   "];
    let (n, exact) = fat::short_name_for_tests("meta-data", &taken);
    assert_eq!((&n, exact), (b"META-D~2   ", false));
    let (n, exact) = fat::short_name_for_tests("README.TXT", &[]);
    assert_eq!((&n, exact), (b"README  TXT", true));
    let (n, exact) = fat::short_name_for_tests("a-very-long.name.json", &[]);
    assert_eq!((&n, exact), (b"A-VERY~1JSO", false));
}

#[test]
fn write_is_atomic_and_leaves_no_temporary_files() {
    let dir = std::env::temp_dir().join(format!("kestrel-seed-unit-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("seed.img");
    fs::write(&path, b"old").unwrap();

    // A refused seed leaves the old file alone.
    let bad = seed(&[("1BAD", "x")]);
    assert!(write_seed_image(&bad, &path).is_err());
    assert_eq!(fs::read(&path).unwrap(), b"old");

    let good = seed(&[("A", "1")]);
    write_seed_image(&good, &path).unwrap();
    assert_eq!(fs::read(&path).unwrap(), build_seed_image(&good).unwrap());
    let names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("seed.img")]);

    // An unwritable destination reports the path and keeps the cause as source.
    let err = write_seed_image(&good, &dir.join("missing/seed.img")).unwrap_err();
    assert!(matches!(err, SeedError::Io { .. }));
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(std::error::Error::source(&err).is_some());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn network_config_is_a_third_file() {
    let net =
        "version: 2\nethernets:\n  pod:\n    match:\n      macaddress: \"0a:58:0a:58:00:07\"\n";
    let s = Seed {
        network_config: Some(net.to_string()),
        ..seed(&[("A", "b")])
    };
    let img = build_seed_image(&s).unwrap();
    let (_, _, files) = read_image(&img);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["meta-data", "user-data", "network-config"]);
    assert_eq!(files[2].1, net.as_bytes());
    let without = build_seed_image(&seed(&[("A", "b")])).unwrap();
    assert_eq!(read_image(&without).2.len(), 2);
}
