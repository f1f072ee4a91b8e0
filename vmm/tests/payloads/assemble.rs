//! Assembles the tiny test payloads in this directory (shared by the `vmm`, `kestrel` and
//! integration test suites through `#[path]`). Needs the system's `cc`, `ld` and `objcopy`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Where payload sources live: `vmm/tests/payloads` of the workspace that holds the
/// crate being tested.
fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|d| d.join("vmm/tests/payloads"))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| panic!("no vmm/tests/payloads above {}", env!("CARGO_MANIFEST_DIR")))
}

fn run_tool(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The directory payloads are built into (per test crate).
pub fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("payloads");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The newest modification time among the payload sources (a payload includes others).
fn newest_source(src: &Path) -> std::time::SystemTime {
    std::fs::read_dir(src)
        .unwrap()
        .flatten()
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()
        .unwrap_or(std::time::SystemTime::UNIX_EPOCH)
}

/// Builds payload `name`: an ELF with a PVH note, or a flat bzImage for `bzimage`. A
/// payload older than any source is built again (the output directory outlives checkouts).
pub fn payload(name: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let src = source_dir();
    let obj = out_dir().join(format!("{name}.o"));
    let out = out_dir().join(name);
    let built = std::fs::metadata(&out).and_then(|m| m.modified());
    if built.is_ok_and(|t| t >= newest_source(&src)) {
        return out;
    }
    run_tool(
        Command::new("cc")
            .arg("-c")
            .arg("-o")
            .arg(&obj)
            .arg(src.join(format!("{name}.S"))),
    );
    if name == "bzimage" {
        run_tool(
            Command::new("objcopy")
                .args(["-O", "binary", "-j", ".text"])
                .arg(&obj)
                .arg(&out),
        );
    } else {
        run_tool(
            Command::new("ld")
                .args(["-m", "elf_x86_64", "-T"])
                .arg(src.join("payload.ld"))
                .arg("-o")
                .arg(&out)
                .arg(&obj),
        );
    }
    out
}
