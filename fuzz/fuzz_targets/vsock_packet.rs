//! Fuzzes vsock packet parsing: TX packets (header, then data, device-readable) against
//! the limits the device uses, and RX buffers. A parsed packet's data only names guest
//! memory and is as long as its header says. Input: see `common/chain.rs`; the last byte's
//! low bit picks TX or RX. `cargo fuzz run vsock_packet` from the repository root.

#![no_main]

use devices::virtio::vsock::packet::{parse_rx, parse_tx, TxLimits};
use libfuzzer_sys::fuzz_target;

#[path = "common/chain.rs"]
mod chain;

fuzz_target!(|input: &[u8]| {
    let rx = input.last().is_some_and(|b| b & 1 == 1);
    chain::with_chain(input, |c| {
        if rx {
            let _ = parse_rx(c, 16);
            return;
        }
        let limits = TxLimits {
            guest_cid: 3,
            max_pkt_len: 64 << 10,
            max_descriptors: 16,
        };
        if let Ok(p) = parse_tx(c, &limits) {
            let len: u64 = p.data.iter().map(|s| u64::from(s.len)).sum();
            assert_eq!(len, u64::from(p.hdr.len));
        }
    });
});
