#!/usr/bin/env bash
# Packs kestrel's guest agent into an uncompressed initramfs (newc cpio).
#
#   rootfs/mkinitramfs.sh AGENT_BINARY OUTPUT.cpio
#
# Contents: /init (the agent), /dev/console (char 5,1), /dev/null (char 1,3), and empty
# /dev /proc /sys /tmp. Device nodes are written straight into the archive, so no root
# and no mknod are needed. The output is deterministic (mtime 0, uid/gid 0).
#
# Uncompressed on purpose: the guest kernel unpacks the archive in emulated kernel code on
# kvm_pvm hosts (docs/kvm-pvm.md), where inflating even 1 MB takes minutes.
set -euo pipefail

die() { printf 'mkinitramfs: error: %s\n' "$*" >&2; exit 1; }

[[ $# -eq 2 ]] || die "usage: $0 AGENT_BINARY OUTPUT.cpio"
agent="$1"
output="$2"
[[ -f "$agent" ]] || die "$agent: no such file"

tmp="$(mktemp "$output.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
exec 3>"$tmp"

ino=100
offset=0

# pad TO: zero bytes up to the next multiple of 4 of the archive offset.
pad() {
    local n=$(((4 - offset % 4) % 4))
    if ((n)); then
        head -c "$n" /dev/zero >&3
        offset=$((offset + n))
    fi
}

# entry NAME MODE NLINK SIZE RDEVMAJOR RDEVMINOR [DATA_FILE]
entry() {
    local name="$1" mode="$2" nlink="$3" size="$4" major="$5" minor="$6" data="${7:-}"
    local namesize=$((${#name} + 1))
    # magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    # rdevmajor, rdevminor, namesize, check
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$ino" "$mode" 0 0 "$nlink" 0 "$size" 0 0 "$major" "$minor" "$namesize" 0 >&3
    printf '%s\0' "$name" >&3
    offset=$((offset + 110 + namesize))
    pad
    if [[ -n "$data" ]]; then
        cat -- "$data" >&3
        offset=$((offset + size))
        pad
    fi
    ino=$((ino + 1))
}

S_IFDIR=$((0040000))
S_IFCHR=$((0020000))
S_IFREG=$((0100000))

entry dev "$((S_IFDIR | 0755))" 2 0 0 0
entry dev/console "$((S_IFCHR | 0600))" 1 0 5 1
entry dev/null "$((S_IFCHR | 0666))" 1 0 1 3
entry proc "$((S_IFDIR | 0755))" 2 0 0 0
entry sys "$((S_IFDIR | 0755))" 2 0 0 0
entry tmp "$((S_IFDIR | 01777))" 2 0 0 0
entry init "$((S_IFREG | 0755))" 1 "$(stat -c %s -- "$agent")" 0 0 "$agent"
ino=0
entry 'TRAILER!!!' 0 1 0 0 0
# The kernel accepts any length; pad to 512 bytes like cpio(1) does.
n=$(((512 - offset % 512) % 512))
((n)) && head -c "$n" /dev/zero >&3
exec 3>&-

chmod 0644 "$tmp"
mv "$tmp" "$output"
trap - EXIT
