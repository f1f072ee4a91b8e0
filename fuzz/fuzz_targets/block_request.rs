//! Fuzzes virtio-blk request parsing: arbitrary descriptor tables (loops, bad indices,
//! indirect tables, any direction and length) over guest memory filled with arbitrary bytes.
//!
//! Input: see `common/chain.rs`.
//! `cargo fuzz run block_request` from the repository root.

#![no_main]

use devices::virtio::block::request::{parse, RequestLimits};
use libfuzzer_sys::fuzz_target;

#[path = "common/chain.rs"]
mod chain;

fuzz_target!(|input: &[u8]| {
    chain::with_chain(input, |descs| {
        let limits = RequestLimits {
            capacity: 1 << 12,
            max_data_descriptors: 8,
            max_discard_segments: 4,
            max_discard_sectors: 64,
            max_write_zeroes_segments: 2,
            max_write_zeroes_sectors: 64,
        };
        match parse(descs, &limits) {
            Ok(req) => {
                // A parsed request only points into guest memory.
                assert!(req.status.0 < chain::MEM_SIZE as u64);
            }
            Err(rejected) => {
                let _ = rejected.error.status();
            }
        }
    });
});
