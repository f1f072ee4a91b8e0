#!/usr/bin/env bash
# Installs the Debian packages kestrel needs, by purpose:
#   --runtime   what kestrel needs on a node at run time (scripts/install.sh uses this)
#   --build     that, plus what building kestrel and its guest kernel needs (scripts/build.sh)
#   (default)   that, plus what the tests need (scripts/test.sh)
#   --benches   that, plus the benchmarks' baselines (qemu)
# Does nothing (and needs no network) when they are all present. Never installs a package
# that changes how the host boots: the seed cross-checks need Debian's cloud-init, whose
# package enables boot-time units, so its .deb is unpacked under $KESTREL_CACHE/cloud-init
# instead of installed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

mode="${1:-tests}"
case "$mode" in
  --runtime) mode=runtime ;;
  --build) mode=build ;;
  --benches) mode=benches ;;
  tests|--tests) mode=tests ;;
  *) echo "usage: $0 [--runtime|--build|--tests|--benches]" >&2; exit 2 ;;
esac

# Run time: mke2fs builds a container's root disk from its image.
PACKAGES=(e2fsprogs)
if [ "$mode" != runtime ]; then
  PACKAGES+=(
    # the guest kernel (guest-kernel/build.sh: LZ4-compressed) and its initramfs
    build-essential bc bison flex libelf-dev libssl-dev cpio linux-source-6.1 lz4 xz-utils
  )
fi
if [ "$mode" = tests ] || [ "$mode" = benches ]; then
  PACKAGES+=(
    # payload assembly uses cc/ld/objcopy (binutils); image cross-checks use qemu-img
    binutils qemu-utils python3
    strace time  # the hostile-image corpus: files each conversion opens, its peak memory
    containerd runc containernetworking-plugins busybox-static dosfstools  # containerd tests, tests/images
    protobuf-compiler iproute2  # the CRI tests' client (k8s-cri builds its protos), pod network checks
    mtools fusefat  # seed/ (fusefat: hosts whose kernel has no vfat): cross-checks of the NoCloud seed with mtools and Debian's cloud-init
    # cloud-init's Python dependencies (cloud-init itself is unpacked, below)
    python3-configobj python3-jinja2 python3-jsonpatch python3-jsonschema python3-netifaces
    python3-oauthlib python3-requests python3-serial python3-yaml
  )
fi
if [ "$mode" = benches ]; then
  PACKAGES+=(qemu-system-x86)  # the benches' qemu microvm baseline
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
fi
updated=""
apt_update() {
  if [ -z "$updated" ]; then
    $SUDO apt-get update -qq
    updated=1
  fi
}

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -ne 0 ]; then
  if [ -n "$SUDO" ] && ! command -v sudo >/dev/null; then
    echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}" >&2
  apt_update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# cargo-fuzz for scripts/fuzz.sh, built once from crates.io into the cache.
if [ "$mode" = tests ] && [ ! -x "$KESTREL_CACHE/tools/bin/cargo-fuzz" ]; then
  echo "install-deps: building cargo-fuzz into $KESTREL_CACHE/tools" >&2
  cargo install --quiet --locked cargo-fuzz --version 0.13.2 \
    --root "$KESTREL_CACHE/tools" --target-dir "$KESTREL_CACHE/tools/build"
fi

# Debian's cloud-init, unpacked (not installed) for seed/tests/cross_check.rs.
if [ "$mode" = tests ] || [ "$mode" = benches ]; then
  ci="$KESTREL_CACHE/cloud-init"
  if [ ! -x "$ci/usr/bin/cloud-init" ]; then
    echo "install-deps: unpacking Debian's cloud-init into $ci (not installed)" >&2
    apt_update
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq cloud-init 2>/dev/null)
    rm -rf "$ci.new"
    dpkg-deb -x "$tmp"/cloud-init_*.deb "$ci.new"
    rm -rf "$tmp" "$ci"
    mv "$ci.new" "$ci"
  fi
fi
