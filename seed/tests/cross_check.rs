//! Cross-checks of the seed image against the outside world: dosfstools (`fsck.vfat`),
//! mtools, util-linux (`blkid`, loop mounts) and Debian's real cloud-init, whose NoCloud
//! datasource reads the seed and whose `write_files` writes the environment file into a
//! scratch root.
//!
//! Each test prints `skipped: <reason>` and passes when a tool is missing
//! (`scripts/install-deps.sh` installs them, and unpacks cloud-init) or, for loop mounts,
//! when not root or no loop device can be set up; with `KESTREL_REQUIRE_KVM=1` (CI) a
//! skip fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kestrel_seed::{
    build_seed_image, environment_file, meta_data, user_data, write_seed_image, Seed,
};

/// The packages that provide everything used here.
const PACKAGES: &str = "scripts/install-deps.sh";

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The tools, or `None` after printing the skip message.
fn tools<const N: usize>(names: [&str; N]) -> Option<[PathBuf; N]> {
    let found = names.map(find_tool);
    let missing: Vec<&str> = names
        .iter()
        .zip(&found)
        .filter(|(_, p)| p.is_none())
        .map(|(n, _)| *n)
        .collect();
    if !missing.is_empty() {
        kestrel_test_support::skip(format!("{} not installed ({PACKAGES})", missing.join(", ")));
        return None;
    }
    Some(found.map(Option::unwrap_or_default))
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kestrel-seed-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Values that stress YAML: quotes, colons, comments, backslashes, line feeds, blank
/// lines, trailing line feeds, tabs, leading spaces, Unicode (BMP and astral), markers.
fn tricky_env() -> Vec<(String, String)> {
    [
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
        ("QUOTES", "'single' \"double\" `back` $HOME ${X}"),
        ("COLON", "key: value"),
        ("HASH", "#not a comment # either"),
        ("BACKSLASH", "C:\\temp\\new \\n \\\\"),
        ("MULTI", "line one\n  indented two\n\nfour after a blank"),
        ("TRAILING_NL", "ends with a line feed\n"),
        ("TWO_TRAILING_NL", "two\n\n"),
        ("ONLY_SPACES", "   "),
        ("TAB", "\tlead\ttab\t"),
        (
            "UNICODE",
            "h\u{e9}llo \u{2603} \u{1F600} \u{4E2D}\u{6587} \u{FEFF}bom \u{A0}nbsp",
        ),
        ("EMPTY", ""),
        (
            "YAML_LOOKALIKE",
            "--- ... - [a] {b} &c *d !e |f >g %h @i ? j",
        ),
        ("DOCUMENT_END", "\n...\n---\n"),
        ("CONTENT_LIKE", "\n    permissions: '0600'\n    content: |+"),
        ("PATH", "duplicate keys are kept in order"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

fn tricky_seed() -> Seed {
    Seed {
        instance_id: "0f3c2a9e-7b1d-4c52-9d0e-3a1b2c3d4e5f".into(),
        hostname: "vm-0.kestrel.test".into(),
        env: tricky_env(),
        extra_user_data: None,
        network_config: None,
    }
}

fn big_seed() -> Seed {
    let value = "0123456789".repeat(100);
    Seed {
        env: (0..1800)
            .map(|i| (format!("VAR_{i}"), value.clone()))
            .collect(),
        ..tricky_seed()
    }
}

fn empty_seed() -> Seed {
    Seed {
        env: Vec::new(),
        ..tricky_seed()
    }
}

fn image(dir: &Path, name: &str, seed: &Seed) -> PathBuf {
    let path = dir.join(name);
    write_seed_image(seed, &path).unwrap();
    path
}

#[test]
fn fsck_vfat_reports_clean() {
    let Some([fsck]) = tools(["fsck.vfat"]) else {
        return;
    };
    let dir = scratch("fsck");
    for (name, seed) in [
        ("tricky", tricky_seed()),
        ("big", big_seed()),
        ("empty", empty_seed()),
    ] {
        let img = image(&dir, &format!("{name}.img"), &seed);
        let out = run(Command::new(&fsck).args(["-n", "-v"]).arg(&img));
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        println!("{name}: {text}");
        assert!(text.contains("2 FATs, 12 bit entries"), "{text}");
        assert!(text.contains("1014 data clusters"), "{text}");
        for bad in [
            "differ",
            "wrong",
            "Invalid",
            "invalid",
            "Bad",
            "Free cluster",
            "orphan",
            "Leaving",
        ] {
            assert!(!text.contains(bad), "fsck.vfat complained ({bad}): {text}");
        }
        // A clean read-only check does not change the file.
        assert_eq!(fs::read(&img).unwrap(), build_seed_image(&seed).unwrap());
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mtools_read_back_names_label_and_exact_bytes() {
    let Some([mdir, mtype, mlabel]) = tools(["mdir", "mtype", "mlabel"]) else {
        return;
    };
    let dir = scratch("mtools");
    for (name, seed) in [("tricky", tricky_seed()), ("big", big_seed())] {
        let img = image(&dir, &format!("{name}.img"), &seed);
        let listing = run(Command::new(&mdir).arg("-i").arg(&img).arg("::"));
        let listing = String::from_utf8_lossy(&listing.stdout);
        println!("{listing}");
        assert!(listing.contains("Volume in drive : is CIDATA"), "{listing}");
        assert!(
            listing.contains("meta-data") && listing.contains("user-data"),
            "{listing}"
        );
        assert!(listing.contains("2 files"), "{listing}");

        let label = run(Command::new(&mlabel)
            .arg("-s")
            .arg("-i")
            .arg(&img)
            .arg("::"));
        assert_eq!(
            String::from_utf8_lossy(&label.stdout).trim(),
            "Volume label is CIDATA"
        );

        let cat = |file: &str| {
            run(Command::new(&mtype)
                .arg("-i")
                .arg(&img)
                .arg(format!("::{file}")))
            .stdout
        };
        assert_eq!(cat("meta-data"), meta_data(&seed).unwrap().into_bytes());
        assert_eq!(cat("user-data"), user_data(&seed).unwrap().into_bytes());
        // Short aliases resolve to the same files.
        assert_eq!(cat("META-D~1"), meta_data(&seed).unwrap().into_bytes());
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn blkid_sees_vfat_labelled_cidata() {
    let Some([blkid]) = tools(["blkid"]) else {
        return;
    };
    let dir = scratch("blkid");
    let img = image(&dir, "seed.img", &tricky_seed());
    let out = run(Command::new(&blkid).args(["-p", "-o", "export"]).arg(&img));
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(text.lines().any(|l| l == "TYPE=vfat"), "{text}");
    assert!(text.lines().any(|l| l == "LABEL=CIDATA"), "{text}");
    assert!(text.lines().any(|l| l == "VERSION=FAT12"), "{text}");
    fs::remove_dir_all(&dir).unwrap();
}

/// Drives cloud-init 22.x's own code: `DataSourceNoCloud.get_data()` (from a seed
/// directory, or by scanning block devices for the `cidata` label and mounting them),
/// `Init.update()`/`consume_data()` (user-data processing, MIME splitting, part handlers,
/// cloud-config merging) and `cc_write_files.write_files()` with each path moved under a
/// scratch root.
const HARNESS: &str = r#"
import copy, os, shutil, sys
from cloudinit import stages, util
from cloudinit.sources import DataSourceNoCloud as nc
from cloudinit.config import cc_write_files

mode, work = sys.argv[1], sys.argv[2]
if mode == "device-fuse":
    # The host kernel has no vfat: cloud-init's mounts go through fusefat instead.
    import subprocess, tempfile
    def fuse_mount_cb(device, callback, data=None, mtype=None, update_env_for_mount=None, log_error=True):
        with tempfile.TemporaryDirectory() as tmpd:
            subprocess.run(["fusefat", "-o", "ro", device, tmpd], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                return callback(tmpd) if data is None else callback(tmpd, data)
            finally:
                subprocess.run(["fusermount", "-u", tmpd], check=True)
    util.mount_cb = fuse_mount_cb
    mode = "device"

root = os.path.join(work, "root")
CFG = {
    "system_info": {
        "distro": "debian",
        "paths": {"cloud_dir": os.path.join(work, "cloud"), "run_dir": os.path.join(work, "run")},
    },
    "datasource_list": ["NoCloud"],
    "datasource": {"NoCloud": {"fs_label": "cidata" if mode == "device" else None}},
}


class ScratchInit(stages.Init):
    # Init re-reads its configuration after every reset; always give it ours, so that
    # nothing is ever read from or written to /var/lib/cloud or /run/cloud-init.
    def _read_cfg(self, extra_fns):
        return copy.deepcopy(CFG)


init = ScratchInit(ds_deps=[])
init.initialize()
paths = init.paths
ds = nc.DataSourceNoCloud(init.cfg, init.distro, paths)
if not ds.get_data():
    sys.exit("NoCloud found no seed")
init.datasource = ds
paths.datasource = ds
init.instancify()
init.update()
init.consume_data()
paths = init.paths
assert paths.cloud_dir.startswith(work), paths.cloud_dir
cfg = util.load_yaml(util.load_file(paths.get_ipath_cur("cloud_config")))
files = [dict(f) for f in cfg.get("write_files", []) if not f.get("defer")]
for f in files:
    f["path"] = root + f["path"]
cc_write_files.write_files("write_files", files, "root:root")
scripts = paths.get_ipath_cur("scripts")
if os.path.isdir(scripts):
    for name in sorted(os.listdir(scripts)):
        os.makedirs(os.path.join(root, "scripts"), exist_ok=True)
        shutil.copy(os.path.join(scripts, name), os.path.join(root, "scripts", name))
print("instance-id=" + ds.metadata["instance-id"])
print("local-hostname=" + ds.metadata["local-hostname"])
print("seed=" + ds.seed)
print("keys=" + ",".join(sorted(cfg)))
print("write_files=" + ",".join(f["path"][len(root):] for f in files))
"#;

/// Debian's cloud-init, unpacked (not installed: its package enables units that run at
/// the host's next boot) by `scripts/install-deps.sh` under `$KESTREL_CACHE/cloud-init`
/// (or `$KESTREL_CLOUD_INIT`), run from there with the harness written out.
struct CloudInit {
    python: PathBuf,
    /// Its `dist-packages`, for `PYTHONPATH`.
    packages: PathBuf,
    /// Its `cloud-init` script.
    bin: PathBuf,
    harness: PathBuf,
}

impl CloudInit {
    /// The interpreter, seeing the unpacked cloud-init first.
    fn python(&self) -> Command {
        let mut c = Command::new(&self.python);
        c.env("PYTHONPATH", &self.packages);
        c
    }
}

fn cloud_init(dir: &Path) -> Option<CloudInit> {
    let root = std::env::var_os("KESTREL_CLOUD_INIT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("KESTREL_CACHE").map(|c| Path::new(&c).join("cloud-init")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/kestrel/cloud-init"))
        })
        .unwrap_or_default();
    let bin = root.join("usr/bin/cloud-init");
    if !bin.is_file() {
        kestrel_test_support::skip(format!(
            "Debian's cloud-init is not unpacked at {} (scripts/install-deps.sh)",
            root.display()
        ));
        return None;
    }
    let script = fs::read_to_string(&bin).unwrap_or_default();
    let python = script
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("#!"))
        .map(|l| PathBuf::from(l.split_whitespace().next().unwrap_or_default()))
        .filter(|p| p.is_file());
    let Some(python) = python else {
        kestrel_test_support::skip(format!(
            "cannot find the python interpreter of {}",
            bin.display()
        ));
        return None;
    };
    let harness = dir.join("harness.py");
    fs::write(&harness, HARNESS).unwrap();
    Some(CloudInit {
        python,
        packages: root.join("usr/lib/python3/dist-packages"),
        bin,
        harness,
    })
}

/// Runs the harness; returns its `key=value` report.
fn run_harness(ci: &CloudInit, mode: &str, work: &Path) -> Vec<(String, String)> {
    let out = run(ci.python().arg(&ci.harness).arg(mode).arg(work));
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn report<'a>(r: &'a [(String, String)], key: &str) -> &'a str {
    r.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {r:?}"))
}

/// Copies the two seed files out of the image with mtools into `<work>/cloud/seed/nocloud`.
fn seed_dir_from_image(mcopy: &Path, img: &Path, work: &Path) -> PathBuf {
    let seed_dir = work.join("cloud/seed/nocloud");
    fs::create_dir_all(&seed_dir).unwrap();
    for name in ["meta-data", "user-data"] {
        run(Command::new(mcopy)
            .arg("-n")
            .arg("-i")
            .arg(img)
            .arg(format!("::{name}"))
            .arg(seed_dir.join(name)));
    }
    seed_dir
}

fn assert_environment_written(root: &Path, seed: &Seed) {
    let path = root.join("etc/cloud/environment");
    let written = fs::read(&path).unwrap();
    let expected = environment_file(seed).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&written),
        expected,
        "cloud-init wrote something else"
    );
    assert_eq!(written, expected.as_bytes());
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o644, "mode {mode:o}");
}

#[test]
fn cloud_init_nocloud_reads_seed_and_writes_environment() {
    let dir = scratch("cloud-init");
    let Some(ci) = cloud_init(&dir) else {
        return;
    };
    let Some([mcopy]) = tools(["mcopy"]) else {
        return;
    };
    for (name, seed) in [
        ("tricky", tricky_seed()),
        ("empty", empty_seed()),
        ("big", big_seed()),
    ] {
        let work = dir.join(name);
        fs::create_dir_all(&work).unwrap();
        let img = image(&work, "seed.img", &seed);
        let seed_dir = seed_dir_from_image(&mcopy, &img, &work);

        // cloud-init's schema validator accepts the user-data as it is.
        let schema = run(ci
            .python()
            .arg(&ci.bin)
            .args(["schema", "--config-file"])
            .arg(seed_dir.join("user-data")));
        let schema = String::from_utf8_lossy(&schema.stdout);
        assert!(schema.contains("Valid cloud-config"), "{schema}");

        let r = run_harness(&ci, "dir", &work);
        println!("{name}: {r:?}");
        assert_eq!(report(&r, "instance-id"), seed.instance_id);
        assert_eq!(report(&r, "local-hostname"), seed.hostname);
        assert_eq!(report(&r, "seed"), seed_dir.to_string_lossy());
        assert_eq!(report(&r, "write_files"), "/etc/cloud/environment");
        assert_environment_written(&work.join("root"), &seed);
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cloud_init_merges_extra_user_data() {
    let dir = scratch("cloud-init-extra");
    let Some(ci) = cloud_init(&dir) else {
        return;
    };
    let Some([mcopy]) = tools(["mcopy"]) else {
        return;
    };
    let extra_config = "#cloud-config\n\
        runcmd:\n  - [echo, \"h\u{e9}llo\"]\n\
        write_files:\n  - path: /etc/extra\n    content: \"extra \u{2603}\\n\"\n\
        \x20 - path: /etc/cloud/environment\n    content: \"overwritten by kestrel\\n\"\n";
    let extra_script = "#!/bin/sh\necho \"h\u{e9}llo from the extra script\"\n";
    let extra_mime = "Content-Type: multipart/mixed; boundary=\"inner\"\nMIME-Version: 1.0\n\n\
        --inner\nContent-Type: text/x-shellscript\n\n#!/bin/sh\necho inner\n\
        --inner--\n";
    for (name, extra) in [
        ("config", extra_config),
        ("script", extra_script),
        ("mime", extra_mime),
    ] {
        let seed = Seed {
            extra_user_data: Some(extra.to_owned()),
            network_config: None,
            ..tricky_seed()
        };
        let work = dir.join(name);
        fs::create_dir_all(&work).unwrap();
        let img = image(&work, "seed.img", &seed);
        seed_dir_from_image(&mcopy, &img, &work);
        let r = run_harness(&ci, "dir", &work);
        println!("{name}: {r:?}");
        let root = work.join("root");
        assert_eq!(report(&r, "instance-id"), seed.instance_id);
        // Ours comes last and wins, Unicode intact despite the MIME detour.
        assert_environment_written(&root, &seed);
        match name {
            "config" => {
                assert_eq!(
                    report(&r, "write_files"),
                    "/etc/extra,/etc/cloud/environment,/etc/cloud/environment"
                );
                assert!(
                    report(&r, "keys").split(',').any(|k| k == "runcmd"),
                    "{r:?}"
                );
                assert_eq!(
                    fs::read_to_string(root.join("etc/extra")).unwrap(),
                    "extra \u{2603}\n"
                );
            }
            "script" => {
                let scripts: Vec<String> = fs::read_dir(root.join("scripts"))
                    .unwrap()
                    .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
                    .collect();
                assert_eq!(scripts, vec![extra_script.to_owned()]);
            }
            _ => {
                let scripts: Vec<String> = fs::read_dir(root.join("scripts"))
                    .unwrap()
                    .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
                    .collect();
                assert_eq!(scripts, vec!["#!/bin/sh\necho inner".to_owned()]);
            }
        }
    }
    fs::remove_dir_all(&dir).unwrap();
}

/// Detaches a loop device and unmounts on drop.
struct Cleanup {
    losetup: PathBuf,
    loop_dev: Option<String>,
    mount_point: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mp) = self.mount_point.take() {
            let _ = Command::new("umount").arg(&mp).status();
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = Command::new(&self.losetup).arg("-d").arg(dev).status();
        }
    }
}

#[test]
fn loop_mount_and_cloud_init_device_scan() {
    let Some([mount, losetup]) = tools(["mount", "losetup"]) else {
        return;
    };
    let uid = fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false);
    if !uid {
        kestrel_test_support::skip("loop mounts need root");
        return;
    }
    let dir = scratch("loop");
    let seed = tricky_seed();
    let img = image(&dir, "seed.img", &seed);
    let mut cleanup = Cleanup {
        losetup: losetup.clone(),
        loop_dev: None,
        mount_point: None,
    };

    // 1. The kernel's vfat driver (or, on a host kernel built without one, the FUSE FAT
    //    driver fusefat): names, contents, read-only.
    let kernel_vfat = fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().last() == Some("vfat"));
    let mp = dir.join("mnt");
    fs::create_dir_all(&mp).unwrap();
    let out = if kernel_vfat {
        Command::new(&mount)
            .args(["-o", "loop,ro", "-t", "vfat"])
            .arg(&img)
            .arg(&mp)
            .output()
            .unwrap()
    } else {
        let Some([fusefat]) = tools(["fusefat"]) else {
            return;
        };
        Command::new(fusefat)
            .args(["-o", "ro"])
            .arg(&img)
            .arg(&mp)
            .output()
            .unwrap()
    };
    if !out.status.success() {
        kestrel_test_support::skip(format!(
            "loop devices unavailable (mount -o loop,ro: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
        drop(cleanup);
        fs::remove_dir_all(&dir).unwrap();
        return;
    }
    cleanup.mount_point = Some(mp.clone());
    let names: BTreeSet<String> = fs::read_dir(&mp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        // fusefat lists the volume label's entry as an empty file.
        .filter(|n| kernel_vfat || n != "CIDATA")
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["meta-data".to_owned(), "user-data".to_owned()])
    );
    assert_eq!(
        fs::read_to_string(mp.join("meta-data")).unwrap(),
        meta_data(&seed).unwrap()
    );
    assert_eq!(
        fs::read_to_string(mp.join("user-data")).unwrap(),
        user_data(&seed).unwrap()
    );
    drop(cleanup);

    // 2. cloud-init finds the device by its label (blkid), mounts it itself and uses it.
    let Some(ci) = cloud_init(&dir) else {
        fs::remove_dir_all(&dir).unwrap();
        return;
    };
    let out = run(Command::new(&losetup)
        .args(["--find", "--show", "--read-only"])
        .arg(&img));
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let cleanup = Cleanup {
        losetup,
        loop_dev: Some(dev.clone()),
        mount_point: None,
    };
    let work = dir.join("work");
    fs::create_dir_all(&work).unwrap();
    let r = run_harness(
        &ci,
        if kernel_vfat { "device" } else { "device-fuse" },
        &work,
    );
    drop(cleanup);
    println!("device: {r:?}");
    assert_eq!(report(&r, "seed"), dev);
    assert_eq!(report(&r, "instance-id"), seed.instance_id);
    assert_eq!(report(&r, "local-hostname"), seed.hostname);
    assert_environment_written(&work.join("root"), &seed);
    fs::remove_dir_all(&dir).unwrap();
}

/// The shell one-liner of the crate documentation extracts the environment file exactly,
/// even when values look like the surrounding YAML.
#[test]
fn documented_sed_one_liner_extracts_the_environment() {
    let Some([sed]) = tools(["sed"]) else {
        return;
    };
    let dir = scratch("sed");
    for seed in [tricky_seed(), empty_seed(), big_seed()] {
        let path = dir.join("user-data");
        fs::write(&path, user_data(&seed).unwrap()).unwrap();
        let out = run(Command::new(&sed)
            .arg("-n")
            .arg("/^    content: |+$/,/^    permissions:/{//!s/^      //p}")
            .arg(&path));
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            environment_file(&seed).unwrap()
        );
    }
    fs::remove_dir_all(&dir).unwrap();
}
