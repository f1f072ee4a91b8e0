#!/usr/bin/env bash
# Builds the plain busybox OCI image `localhost/busybox:1` (docs/containerd.md §2) used by
# the fixture's sanity tests with runc, and as a "not a containerDisk" image:
#
#   tests/images/build-busybox.sh [OUT_DIR]
#
# Rootfs: Debian's busybox-static as /bin/busybox plus a symlink per applet (made from
# `busybox --list-full`, so no chroot and no root needed), /etc/passwd and /etc/group
# with root, empty /proc /sys /dev /tmp /root /run /var. Cmd ["/bin/sh"]. The same root is
# also `localhost/pause:1` (pause.tar), the CRI sandbox image of the test containerd: a
# shell that sleeps until TERM or INT (what runc pods run as their pause process).
#
# Cached in ${KESTREL_CACHE:-$HOME/.cache/kestrel}/images/busybox-<hash>/ keyed by the
# busybox binary, this script and mkoci.py; with OUT_DIR the archive is also copied there.
# Prints the archives' paths on stdout: busybox.tar, then pause.tar.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${KESTREL_CACHE:-$HOME/.cache/kestrel}"
busybox="${BUSYBOX:-/bin/busybox}"
name="localhost/busybox:1"

step() { printf 'build-busybox: %s\n' "$*" >&2; }
die() { printf 'build-busybox: error: %s\n' "$*" >&2; exit 1; }

(($# <= 1)) || die "usage: $0 [OUT_DIR]"
[[ -x "$busybox" ]] || die "$busybox not found (apt-get install busybox-static)"
if readelf -lW "$busybox" | grep -q 'INTERP'; then
    die "$busybox is dynamically linked; install busybox-static"
fi
command -v python3 >/dev/null || die "python3 not found"

key="$(cat "$busybox" "${BASH_SOURCE[0]}" "$here/mkoci.py" | sha256sum | cut -c1-16)"
dir="$cache/images/busybox-$key"
if [[ ! -f "$dir/busybox.tar" || ! -f "$dir/pause.tar" ]]; then
    mkdir -p "$cache/images"
    tmp="$(mktemp -d "$cache/images/.busybox-$key.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    step "rootfs from $busybox"
    root="$tmp/root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,run,var}
    chmod 1777 "$root/tmp"
    install -m 0755 "$busybox" "$root/bin/busybox"
    "$busybox" --list-full | while read -r applet; do
        [[ "$applet" == bin/busybox ]] && continue
        mkdir -p "$root/$(dirname "$applet")"
        ln -sf /bin/busybox "$root/$applet"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
    echo 'root:x:0:' >"$root/etc/group"
    step "busybox.tar ($name)"
    python3 "$here/mkoci.py" --name "$name" --cmd /bin/sh "$root" "$tmp/busybox.tar"
    step "pause.tar (localhost/pause:1)"
    python3 "$here/mkoci.py" --name localhost/pause:1 \
        --entrypoint '["/bin/sh","-c","trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]' \
        "$root" "$tmp/pause.tar"
    rm -rf "$root"
    chmod 0755 "$tmp"
    rm -rf "$dir"
    mv -T "$tmp" "$dir"
    trap - EXIT
else
    step "cached: $dir"
fi

if (($# == 1)); then
    mkdir -p "$1"
    cp "$dir/busybox.tar" "$dir/pause.tar" "$1/"
    dir="$(cd "$1" && pwd)"
fi
printf '%s\n' "$dir/busybox.tar" "$dir/pause.tar"
