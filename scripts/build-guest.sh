#!/usr/bin/env bash
# Builds kestrel's guest assets and installs them where kestrel looks for them:
#
#   ${KESTREL_ASSETS:-$HOME/.cache/kestrel/assets}/vmlinux         ELF kernel, PVH entry
#   ${KESTREL_ASSETS:-$HOME/.cache/kestrel/assets}/bzImage         same kernel, bzImage
#   ${KESTREL_ASSETS:-$HOME/.cache/kestrel/assets}/initramfs.cpio  the agent as /init
#
# The kernel comes from guest-kernel/build.sh (cached by content hash: ~7 minutes with
# 2 cores the first time, nothing afterwards); the agent is a static release build of
# rootfs/agent; the initramfs is packed by rootfs/mkinitramfs.sh. Prints the three paths
# on stdout, progress on stderr.
#
# Debian 12 packages this needs (CI installs them with apt-get install -y):
REQUIRED_PACKAGES="linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev cpio lz4 xz-utils"
# (lz4: the bzImage is LZ4-compressed, the cheapest decompressor to run emulated.)
# Plus a Rust toolchain with the x86_64-unknown-linux-gnu target (glibc, static via
# crt-static; glibc's static libraries come with build-essential's libc6-dev).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${KESTREL_CACHE:-$HOME/.cache/kestrel}"
assets="${KESTREL_ASSETS:-$cache/assets}"
target_dir="${CARGO_TARGET_DIR:-$repo/target}/guest"

step() { printf 'build-guest: %s\n' "$*" >&2; }
die() { printf 'build-guest: error: %s\n' "$*" >&2; exit 1; }

missing=()
for p in $REQUIRED_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]} == 0)) || die "missing Debian packages: ${missing[*]} (apt-get install -y $REQUIRED_PACKAGES)"
command -v cargo >/dev/null || die "cargo not found; install Rust (https://rustup.rs)"

step "kernel (guest-kernel/build.sh)"
kernel_dir="$("$repo/guest-kernel/build.sh")"

step "agent (static release build of rootfs/agent)"
# --target keeps RUSTFLAGS off build scripts and puts the static build apart from host
# builds; its own target dir avoids waiting on the workspace's build lock.
(
    cd "$repo"
    RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
        CARGO_PROFILE_RELEASE_STRIP=symbols \
        CARGO_PROFILE_RELEASE_OPT_LEVEL=s \
        CARGO_PROFILE_RELEASE_LTO=fat \
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
        cargo build --release --quiet -p kestrel-agent \
        --target x86_64-unknown-linux-gnu --target-dir "$target_dir"
)
agent="$target_dir/x86_64-unknown-linux-gnu/release/kestrel-agent"
if readelf -lW "$agent" | grep -q 'INTERP'; then
    die "$agent is dynamically linked; it must be static to run as /init"
fi

step "initramfs (rootfs/mkinitramfs.sh)"
mkdir -p "$assets"
"$repo/rootfs/mkinitramfs.sh" "$agent" "$assets/initramfs.cpio.tmp"
mv "$assets/initramfs.cpio.tmp" "$assets/initramfs.cpio"

for f in vmlinux bzImage; do
    ln -sfn "$kernel_dir/$f" "$assets/$f.tmp"
    mv -T "$assets/$f.tmp" "$assets/$f"
done

step "installed in $assets (kernel: $kernel_dir)"
for f in vmlinux bzImage initramfs.cpio; do
    printf '%s\n' "$assets/$f"
done
