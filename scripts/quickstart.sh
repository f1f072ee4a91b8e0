#!/usr/bin/env bash
# From a fresh Debian 12 machine to a VM image running through containerd:
#  1. installs the Debian packages kestrel needs (containerd among them);
#  2. builds and installs kestrel (scripts/install.sh; the guest kernel build takes ~7
#     minutes the first time and is cached);
#  3. starts a private containerd (its own root, state and socket under
#     $KESTREL_CACHE/quickstart; the system's containerd, if any, is untouched);
#  4. builds a small containerDisk image locally (an ext4 disk with a tiny static init,
#     as QCOW2 at /disk/disk.qcow2, KubeVirt's layout) and imports it;
#  5. runs it: ctr run --rm --runtime io.containerd.kestrel.v2 --env GREETING=hello ...
# The VM's serial console is the container's output; the environment reaches the guest
# through a cloud-init NoCloud seed. containerd is stopped when this script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

scripts/install.sh >/dev/null
image_tar=$(tests/images/build-containerdisk.sh | head -n 1)

W="$KESTREL_CACHE/quickstart"
rm -rf "$W/state"
mkdir -p "$W/root" "$W/state"
cat > "$W/config.toml" <<CONF
version = 2
root = "$W/root"
state = "$W/state"
[grpc]
  address = "$W/containerd.sock"
[ttrpc]
  address = "$W/containerd.sock.ttrpc"
CONF
containerd --config "$W/config.toml" > "$W/containerd.log" 2>&1 &
ctd=$!
trap 'kill $ctd 2>/dev/null; wait $ctd 2>/dev/null || true' EXIT
for _ in $(seq 50); do ctr -a "$W/containerd.sock" version >/dev/null 2>&1 && break; sleep 0.2; done
ctr() { command ctr -a "$W/containerd.sock" "$@"; }

ctr image import "$image_tar" >/dev/null
ctr task rm -f kestrel-quickstart >/dev/null 2>&1 || true
ctr container rm kestrel-quickstart >/dev/null 2>&1 || true
echo "quickstart: ctr run --rm --runtime io.containerd.kestrel.v2 --env GREETING=hello localhost/kestrel-test-vmdisk:1 kestrel-quickstart" >&2
ctr run --rm --runtime io.containerd.kestrel.v2 --env GREETING=hello \
  localhost/kestrel-test-vmdisk:1 kestrel-quickstart
