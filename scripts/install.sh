#!/usr/bin/env bash
# Installs kestrel where containerd finds it:
#   $PREFIX/bin/containerd-shim-kestrel-v2   (on containerd's PATH: runtime io.containerd.kestrel.v2)
#   $PREFIX/bin/kestrel                      (the CLI)
#   $PREFIX/share/kestrel/{vmlinux,bzImage,initramfs.cpio}   (the guest assets)
# PREFIX defaults to /usr/local. Installs only what kestrel needs at run time
# (install-deps.sh --runtime); building is a separate step, scripts/build.sh, which may
# run on another machine with the same $KESTREL_CACHE layout.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
PREFIX="${PREFIX:-/usr/local}"

for f in "$CARGO_TARGET_DIR/release/containerd-shim-kestrel-v2" "$CARGO_TARGET_DIR/release/kestrel" \
         "$KESTREL_ASSETS/vmlinux" "$KESTREL_ASSETS/bzImage" "$KESTREL_ASSETS/initramfs.cpio"; do
  if [ ! -e "$f" ]; then
    echo "install: $f is missing: build kestrel first with scripts/build.sh" >&2
    exit 1
  fi
done
scripts/install-deps.sh --runtime

install -d "$PREFIX/bin" "$PREFIX/share/kestrel"
install -m 0755 "$CARGO_TARGET_DIR/release/containerd-shim-kestrel-v2" "$PREFIX/bin/"
install -m 0755 "$CARGO_TARGET_DIR/release/kestrel" "$PREFIX/bin/"
for a in vmlinux bzImage initramfs.cpio; do
  install -m 0644 "$(readlink -f "$KESTREL_ASSETS/$a")" "$PREFIX/share/kestrel/$a"
done
echo "install: $PREFIX/bin/containerd-shim-kestrel-v2, $PREFIX/bin/kestrel, $PREFIX/share/kestrel/" >&2

echo "install: ctr run --runtime io.containerd.kestrel.v2 IMAGE ID [CMD] runs a container (or a /disk/ VM image) in a microVM; for Kubernetes add deploy/containerd/config-v2.toml (containerd 1.6/1.7) or config-v3.toml (2.x) to /etc/containerd/config.toml, restart containerd, kubectl apply -f deploy/runtimeclass.yaml" >&2
