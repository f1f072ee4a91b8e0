#!/usr/bin/env bash
# Builds kestrel's containerDisk test image (KubeVirt layout: the disk at /disk/disk.qcow2):
#
#   tests/images/build-containerdisk.sh [OUT_DIR]
#
# 1. vm-init: static release build of tests/images/vm-init (glibc, crt-static; the same
#    flags and target dir as scripts/build-guest.sh uses for kestrel-agent);
# 2. rootfs.ext4: a 32 MiB ext4 made with `mkfs.ext4 -d` (no root, no loop device):
#    /sbin/init = vm-init, empty /proc /sys /dev /etc/cloud /var/lib/vm-init /tmp /mnt;
# 3. disk.qcow2: `qemu-img convert -O qcow2` of it;
# 4. kestrel-test-vmdisk.tar: OCI archive `localhost/kestrel-test-vmdisk:1` holding
#    /disk/disk.qcow2 (tests/images/mkoci.py); `ctr image import` names it by itself.
#
# Outputs are cached in ${KESTREL_CACHE:-$HOME/.cache/kestrel}/images/vmdisk-<hash>/,
# keyed by the vm-init binary, this script and mkoci.py; a second run only re-checks the
# cargo build. With OUT_DIR the outputs are also copied there. Prints the paths on stdout
# (archive first, then disk.qcow2, rootfs.ext4, vm-init); progress goes to stderr.
#
# Needs: cargo (x86_64-unknown-linux-gnu target), e2fsprogs, qemu-utils, python3.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${KESTREL_CACHE:-$HOME/.cache/kestrel}"
target_dir="${CARGO_TARGET_DIR:-$repo/target}/guest"
name="localhost/kestrel-test-vmdisk:1"

step() { printf 'build-containerdisk: %s\n' "$*" >&2; }
die() { printf 'build-containerdisk: error: %s\n' "$*" >&2; exit 1; }

(($# <= 1)) || die "usage: $0 [OUT_DIR]"
for tool in cargo mkfs.ext4 e2fsck qemu-img python3 readelf; do
    command -v "$tool" >/dev/null || die "$tool not found (scripts/install-deps.sh installs it)"
done

step "vm-init (static release build of tests/images/vm-init)"
(
    cd "$repo"
    RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
        CARGO_PROFILE_RELEASE_STRIP=symbols \
        CARGO_PROFILE_RELEASE_OPT_LEVEL=s \
        CARGO_PROFILE_RELEASE_LTO=fat \
        CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
        cargo build --release --quiet -p kestrel-test-vm-init \
        --target x86_64-unknown-linux-gnu --target-dir "$target_dir"
)
vm_init="$target_dir/x86_64-unknown-linux-gnu/release/vm-init"
if readelf -lW "$vm_init" | grep -q 'INTERP'; then
    die "$vm_init is dynamically linked; it must be static to run as /sbin/init"
fi

key="$(cat "$vm_init" "${BASH_SOURCE[0]}" "$here/mkoci.py" | sha256sum | cut -c1-16)"
dir="$cache/images/vmdisk-$key"
if [[ ! -f "$dir/kestrel-test-vmdisk.tar" ]]; then
    mkdir -p "$cache/images"
    tmp="$(mktemp -d "$cache/images/.vmdisk-$key.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT

    step "rootfs.ext4 (mkfs.ext4 -d, 32 MiB)"
    root="$tmp/root"
    mkdir -p "$root"/{sbin,proc,sys,dev,etc/cloud,var/lib/vm-init,tmp,mnt}
    chmod 1777 "$root/tmp"
    install -m 0755 "$vm_init" "$root/sbin/init"
    # Fixed UUID and hash seed: the same inputs give the same file system.
    uuid=6b657374-7265-6c2d-7465-737464697368
    mkfs.ext4 -q -F -L kestrel-test -U "$uuid" -E "root_owner=0:0,hash_seed=$uuid" \
        -d "$root" "$tmp/rootfs.ext4" 32M >&2
    e2fsck -fn "$tmp/rootfs.ext4" >&2 || die "e2fsck found errors in the new file system"

    step "disk.qcow2 (qemu-img convert -O qcow2)"
    qemu-img convert -f raw -O qcow2 "$tmp/rootfs.ext4" "$tmp/disk.qcow2"
    qemu-img check -q "$tmp/disk.qcow2" || die "qemu-img check failed"

    step "kestrel-test-vmdisk.tar ($name)"
    python3 "$here/mkoci.py" --name "$name" --file "$tmp/disk.qcow2=/disk/disk.qcow2" \
        "$tmp/kestrel-test-vmdisk.tar"

    cp "$vm_init" "$tmp/vm-init"
    rm -rf "$root"
    chmod 0755 "$tmp"
    rm -rf "$dir"
    mv -T "$tmp" "$dir"
    trap - EXIT
else
    step "cached: $dir"
fi

outputs=(kestrel-test-vmdisk.tar disk.qcow2 rootfs.ext4 vm-init)
if (($# == 1)); then
    mkdir -p "$1"
    for f in "${outputs[@]}"; do
        cp --sparse=always "$dir/$f" "$1/$f"
    done
    dir="$(cd "$1" && pwd)"
fi
for f in "${outputs[@]}"; do
    printf '%s\n' "$dir/$f"
done
