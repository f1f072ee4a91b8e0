#!/usr/bin/env bash
# Builds the network test initramfs: tests/images/net-guest as /init (see
# tests/images/build-test-initramfs.sh). Prints the initramfs path.
exec "$(dirname "${BASH_SOURCE[0]}")/../build-test-initramfs.sh" net-guest
