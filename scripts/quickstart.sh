#!/usr/bin/env bash
# From a fresh Debian 12 machine to a container and a VM image in microVMs through
# containerd:
#  1. installs the Debian packages kestrel's build and tests need (containerd among them;
#     scripts/install-deps.sh);
#  2. builds kestrel (scripts/build.sh; the guest kernel build takes ~7 minutes the first
#     time and is cached) and installs it (scripts/install.sh);
#  3. starts a private containerd (its own root, state and socket under
#     $KESTREL_CACHE/quickstart; the system's containerd, if any, is untouched);
#  4. builds two small images locally and imports them: busybox (an ordinary OCI image)
#     and a containerDisk (an ext4 disk with a tiny static init, as QCOW2 at
#     /disk/disk.qcow2, KubeVirt's layout);
#  5. runs the container in a microVM:
#       ctr run --rm --runtime io.containerd.kestrel.v2 localhost/busybox:1 kestrel-quickstart echo hi
#     (its process runs inside the VM, under kestrel's guest agent);
#  6. runs the VM image: ctr run --rm --runtime io.containerd.kestrel.v2 --env GREETING=hello ...
#     (the VM's serial console is the container's output; the environment reaches the
#     guest through a cloud-init NoCloud seed).
# containerd is stopped when this script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

scripts/install-deps.sh
scripts/build.sh
scripts/install.sh >/dev/null
busybox_tar=$(tests/images/build-busybox.sh | head -n1)
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

ctr image import "$busybox_tar" >/dev/null
ctr image import "$image_tar" >/dev/null
for id in kestrel-quickstart kestrel-quickstart-vm; do
  ctr task rm -f "$id" >/dev/null 2>&1 || true
  ctr container rm "$id" >/dev/null 2>&1 || true
done
echo "quickstart: ctr run --rm --runtime io.containerd.kestrel.v2 localhost/busybox:1 kestrel-quickstart echo hi" >&2
ctr run --rm --runtime io.containerd.kestrel.v2 localhost/busybox:1 kestrel-quickstart echo hi
echo "quickstart: ctr run --rm --runtime io.containerd.kestrel.v2 --env GREETING=hello localhost/kestrel-test-vmdisk:1 kestrel-quickstart-vm" >&2
ctr run --rm --runtime io.containerd.kestrel.v2 --env GREETING=hello \
  localhost/kestrel-test-vmdisk:1 kestrel-quickstart-vm
