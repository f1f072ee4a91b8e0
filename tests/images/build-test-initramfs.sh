#!/usr/bin/env bash
# Builds a test initramfs whose /init is one of the static test guests in tests/images:
#
#   tests/images/build-test-initramfs.sh NAME     (crate tests/images/NAME, package
#                                                   kestrel-test-NAME, binary NAME)
#
# 1. NAME: static release build (glibc, crt-static; the same flags and target dir as
#    scripts/build-guest.sh uses for kestrel-agent);
# 2. initramfs.cpio: rootfs/mkinitramfs.sh NAME initramfs.cpio (uncompressed).
#
# Cached in ${KESTREL_CACHE:-$HOME/.cache/kestrel}/images/NAME-<hash>/, keyed by the
# binary, this script and mkinitramfs.sh; a second run only re-checks the cargo build.
# Prints the initramfs path on stdout; progress goes to stderr.
set -euo pipefail

name="${1:?usage: build-test-initramfs.sh NAME (a crate in tests/images/NAME)}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${KESTREL_CACHE:-$HOME/.cache/kestrel}"
target_dir="${CARGO_TARGET_DIR:-$repo/target}/guest"

step() { printf '%s: %s\n' "$name" "$*" >&2; }
die() { printf '%s: error: %s\n' "$name" "$*" >&2; exit 1; }

command -v cargo >/dev/null || die "cargo not found"

step "static release build of tests/images/$name"
(
    cd "$repo"
    RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
        CARGO_PROFILE_RELEASE_STRIP=symbols \
        CARGO_PROFILE_RELEASE_OPT_LEVEL=s \
        CARGO_PROFILE_RELEASE_LTO=fat \
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
        cargo build --release --quiet -p kestrel-test-$name \
        --target x86_64-unknown-linux-gnu --target-dir "$target_dir"
)
bin="$target_dir/x86_64-unknown-linux-gnu/release/$name"
if readelf -lW "$bin" | grep -q 'INTERP'; then
    die "$bin is dynamically linked; it must be static to run as /init"
fi

key="$(cat "$bin" "${BASH_SOURCE[0]}" "$repo/rootfs/mkinitramfs.sh" | sha256sum | cut -c1-16)"
dir="$cache/images/$name-$key"
if [[ ! -f "$dir/initramfs.cpio" ]]; then
    mkdir -p "$dir"
    step "initramfs (rootfs/mkinitramfs.sh)"
    "$repo/rootfs/mkinitramfs.sh" "$bin" "$dir/initramfs.cpio.tmp"
    mv "$dir/initramfs.cpio.tmp" "$dir/initramfs.cpio"
else
    step "cached: $dir"
fi
printf '%s\n' "$dir/initramfs.cpio"
