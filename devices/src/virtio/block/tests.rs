//! Driver-harness tests of virtio-blk.
