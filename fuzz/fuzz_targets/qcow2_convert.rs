//! Fuzzes the QCOW2 converter end to end: the input bytes are an image file (header,
//! extensions, L1/L2 and refcount tables, compressed clusters); `convert` must refuse it
//! or write a raw output, never panic, within a second and with the work bounded by the
//! input's size. Input and output live in /dev/shm. `cargo fuzz run qcow2_convert` from
//! the repository root.

#![no_main]

use std::io::Write;
use std::time::Duration;

use devices::image::convert::{convert, Limits};
use devices::image::ImageFormat;
use libfuzzer_sys::fuzz_target;

fn scratch(tag: &str) -> std::fs::File {
    let path = format!("/dev/shm/kestrel-fuzz-{}-{tag}", std::process::id());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    // Unlinked at once: the fds are all the run needs, and nothing is left behind.
    std::fs::remove_file(&path).unwrap();
    f
}

fuzz_target!(|input: &[u8]| {
    let mut image = scratch("in");
    image.write_all(input).unwrap();
    let output = scratch("out");
    let limits = Limits {
        timeout: Some(Duration::from_secs(1)),
        cancel: None,
    };
    let _ = convert(&image, ImageFormat::Qcow2, &output, &limits, &mut |_, _| {});
});
