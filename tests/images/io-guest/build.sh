#!/usr/bin/env bash
# Builds the block-throughput test initramfs: tests/images/io-guest as /init (see
# tests/images/build-test-initramfs.sh). Prints the initramfs path.
exec "$(dirname "${BASH_SOURCE[0]}")/../build-test-initramfs.sh" io-guest
