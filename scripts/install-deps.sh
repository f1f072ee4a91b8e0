#!/usr/bin/env bash
# Installs the Debian packages kestrel needs to build its guest and run its tests; with
# --benches also the benchmarks' baselines (qemu). Does nothing (and needs no network) when
# they are all present.
set -euo pipefail

PACKAGES=(
  # guest kernel (guest-kernel/build.sh) and initramfs
  build-essential bc bison flex libelf-dev libssl-dev cpio linux-source-6.1
  # tests: payload assembly uses cc/ld/objcopy (binutils); image cross-checks use qemu-img
  binutils qemu-utils python3 lz4
  strace time  # the hostile-image corpus: files each conversion opens, its peak memory
  containerd runc containernetworking-plugins busybox-static e2fsprogs dosfstools  # containerd tests, tests/images
  protobuf-compiler iproute2  # the CRI tests' client (k8s-cri builds its protos), pod network checks
  mtools cloud-init  # seed/: cross-checks of the NoCloud seed with mtools and Debian's cloud-init
)
if [ "${1:-}" = "--benches" ]; then
  PACKAGES+=(qemu-system-x86)  # the benches' qemu microvm baseline
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
echo "install-deps: installing ${missing[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
