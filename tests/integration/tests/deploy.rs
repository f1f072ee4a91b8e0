//! deploy/kestrel-deploy.sh, the DaemonSet installer, against a stand-in for the node's
//! root: install puts the shim and assets in /opt/kestrel, links them where containerd and
//! the shim look and registers the runtime handler once (twice = once); uninstall leaves
//! the node as it was. Run with the busybox sh of the installer image.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    kestrel_integration_tests::workspace_root()
}

/// A fake node root and installer image contents; returns (host, artifacts).
fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let host = dir.join("host");
    let art = dir.join("kestrel");
    fs::create_dir_all(art.join("bin")).unwrap();
    fs::create_dir_all(art.join("share/kestrel")).unwrap();
    fs::create_dir_all(art.join("containerd")).unwrap();
    fs::write(art.join("bin/containerd-shim-kestrel-v2"), b"#!/bin/sh\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(
        art.join("bin/containerd-shim-kestrel-v2"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    fs::write(art.join("share/kestrel/bzImage"), b"kernel").unwrap();
    fs::write(art.join("share/kestrel/initramfs.cpio"), b"initrd").unwrap();
    for v in ["config-v2.toml", "config-v3.toml"] {
        fs::copy(
            root().join("deploy/containerd").join(v),
            art.join("containerd").join(v),
        )
        .unwrap();
    }
    fs::create_dir_all(host.join("etc/containerd")).unwrap();
    (host, art)
}

/// Runs the installer with the busybox sh of its image (or the system's sh).
fn deploy(host: &Path, art: &Path, action: &str) -> std::process::Output {
    let mut cmd = if Path::new("/bin/busybox").exists() {
        let mut c = Command::new("/bin/busybox");
        c.arg("sh");
        c
    } else {
        Command::new("sh")
    };
    cmd.arg(root().join("deploy/kestrel-deploy.sh"))
        .arg(action)
        .env("HOST_ROOT", host)
        .env("KESTREL_ARTIFACTS", art)
        .env("NO_RESTART", "1")
        .output()
        .unwrap()
}

/// [`deploy`], which must succeed; returns its log.
fn run(host: &Path, art: &Path, action: &str) -> String {
    let out = deploy(host, art, action);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{action}: {log}");
    log
}

#[test]
fn install_twice_then_uninstall_leaves_the_node_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (host, art) = fixture(dir.path());
    let config = host.join("etc/containerd/config.toml");
    let before = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"pause:3.6\"\n\n\n# end\n";
    fs::write(&config, before).unwrap();

    run(&host, &art, "install");
    let log = run(&host, &art, "install");
    assert!(log.contains("installed"), "{log}");
    let text = fs::read_to_string(&config).unwrap();
    assert_eq!(
        text.matches("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kestrel]")
            .count(),
        1,
        "{text}"
    );
    assert!(text.starts_with(before), "{text}");
    assert!(
        text.contains("runtime_type = \"io.containerd.kestrel.v2\""),
        "{text}"
    );
    assert_eq!(
        fs::read_link(host.join("usr/local/bin/containerd-shim-kestrel-v2")).unwrap(),
        Path::new("/opt/kestrel/bin/containerd-shim-kestrel-v2")
    );
    assert_eq!(
        fs::read_link(host.join("usr/local/share/kestrel")).unwrap(),
        Path::new("/opt/kestrel/share/kestrel")
    );
    assert_eq!(
        fs::read(host.join("opt/kestrel/share/kestrel/bzImage")).unwrap(),
        b"kernel"
    );

    run(&host, &art, "uninstall");
    assert_eq!(fs::read_to_string(&config).unwrap(), before);
    assert!(!host.join("opt/kestrel").exists());
    assert!(fs::symlink_metadata(host.join("usr/local/bin/containerd-shim-kestrel-v2")).is_err());
    assert!(fs::symlink_metadata(host.join("usr/local/share/kestrel")).is_err());
}

#[test]
fn containerd_2_gets_the_version_3_table_and_a_missing_config_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let (host, art) = fixture(dir.path());
    let config = host.join("etc/containerd/config.toml");
    fs::write(&config, "version = 3\n").unwrap();
    run(&host, &art, "install");
    let text = fs::read_to_string(&config).unwrap();
    assert!(
        text.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.kestrel]"),
        "{text}"
    );
    run(&host, &art, "uninstall");
    assert_eq!(fs::read_to_string(&config).unwrap(), "version = 3\n");

    fs::remove_file(&config).unwrap();
    run(&host, &art, "install");
    let text = fs::read_to_string(&config).unwrap();
    assert!(text.starts_with("version = 2\n"), "{text}");
    assert!(
        text.contains("grpc.v1.cri\".containerd.runtimes.kestrel]"),
        "{text}"
    );
}

#[test]
fn missing_artifacts_are_refused_and_a_hand_install_is_not_touched() {
    let dir = tempfile::tempdir().unwrap();
    let (host, art) = fixture(dir.path());
    // kestrel installed by hand (scripts/install.sh): a real directory of assets.
    fs::create_dir_all(host.join("usr/local/share/kestrel")).unwrap();
    let out = deploy(&host, &art, "install");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not kestrel-deploy's link"));
    assert!(host.join("usr/local/share/kestrel").is_dir());
    assert!(
        !host.join("opt/kestrel").exists(),
        "nothing is installed half-way"
    );
    fs::remove_dir(host.join("usr/local/share/kestrel")).unwrap();
    fs::remove_file(art.join("share/kestrel/bzImage")).unwrap();
    let out = deploy(&host, &art, "install");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bzImage missing"));
}
