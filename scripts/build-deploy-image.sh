#!/usr/bin/env bash
# Builds the installer image of deploy/kestrel-deploy.yaml as an OCI archive, without
# docker (tests/images/mkoci.py):
#
#   scripts/build-deploy-image.sh [NAME]     # NAME defaults to localhost/kestrel-deploy:<git rev>
#
# The image: Debian's static busybox (/bin/sh and the few tools the script uses), the
# release shim in /kestrel/bin, the guest kernel and initramfs in /kestrel/share/kestrel,
# the containerd snippets in /kestrel/containerd and /kestrel/kestrel-deploy.sh. Push it
# to your registry (e.g. `ctr image import` then `ctr image push`, or
# `skopeo copy oci-archive:<archive> docker://<registry>/kestrel-deploy:<tag>`) and set
# that name in deploy/kestrel-deploy.yaml and deploy/kestrel-cleanup.yaml.
# Prints the archive's path.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
name="${1:-localhost/kestrel-deploy:$(git rev-parse --short HEAD 2>/dev/null || echo dev)}"
busybox=/bin/busybox
[[ -x "$busybox" ]] || { echo "build-deploy-image: $busybox missing (apt-get install busybox-static)" >&2; exit 1; }

scripts/build-guest.sh >/dev/null
echo "build-deploy-image: building the shim (release)" >&2
cargo build --release --quiet -p kestrel-shim

out="$KESTREL_CACHE/deploy"
mkdir -p "$out"
root="$(mktemp -d "$out/.root.XXXXXX")"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,tmp,kestrel/bin,kestrel/share/kestrel,kestrel/containerd}
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in sh cat cp mv ln mkdir rm grep awk printf chmod readlink dirname basename sleep nsenter; do
    ln -s busybox "$root/bin/$applet"
done
install -m 0755 "$CARGO_TARGET_DIR/release/containerd-shim-kestrel-v2" "$root/kestrel/bin/"
for a in bzImage initramfs.cpio; do
    install -m 0644 "$(readlink -f "$KESTREL_ASSETS/$a")" "$root/kestrel/share/kestrel/$a"
done
install -m 0644 deploy/containerd/config-v2.toml deploy/containerd/config-v3.toml "$root/kestrel/containerd/"
install -m 0755 deploy/kestrel-deploy.sh "$root/kestrel/kestrel-deploy.sh"
archive="$out/kestrel-deploy.tar"
python3 tests/images/mkoci.py --name "$name" --env PATH=/bin \
    --cmd '["/kestrel/kestrel-deploy.sh","install"]' "$root" "$archive" >&2
printf '%s\n' "$archive"
