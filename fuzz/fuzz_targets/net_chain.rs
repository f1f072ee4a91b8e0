//! Fuzzes virtio-net chain parsing: TX chains (header + frame, device-readable) and RX
//! buffers (device-writable), from arbitrary descriptor tables over arbitrary memory. A
//! parsed chain only names guest memory. Input: see `common/chain.rs`; the last byte's low
//! bit picks TX or RX. `cargo fuzz run net_chain` from the repository root.

#![no_main]

use devices::virtio::net::chain::{parse_rx, parse_tx};
use libfuzzer_sys::fuzz_target;

#[path = "common/chain.rs"]
mod chain;

fuzz_target!(|input: &[u8]| {
    let rx = input.last().is_some_and(|b| b & 1 == 1);
    chain::with_chain(input, |c| {
        let segments = if rx {
            parse_rx(c, 16).map(|b| b.segments).ok()
        } else {
            parse_tx(c, 16, 65_562).map(|f| f.segments).ok()
        };
        for s in segments.unwrap_or_default() {
            assert!(s.addr.0 + u64::from(s.len) <= chain::MEM_SIZE as u64);
        }
    });
});
