#!/usr/bin/env bash
# Builds what scripts/install.sh installs: the release `kestrel` and
# `containerd-shim-kestrel-v2` binaries and the guest assets (kernel cached under
# $KESTREL_CACHE). Installs the build's Debian packages first (install-deps.sh --build);
# none of them is needed on a node that only runs kestrel.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

scripts/install-deps.sh --build
scripts/build-guest.sh >/dev/null
echo "build: kestrel and containerd-shim-kestrel-v2 (release)" >&2
cargo build --release --quiet -p kestrel -p kestrel-shim
echo "build: $CARGO_TARGET_DIR/release/{kestrel,containerd-shim-kestrel-v2}, $KESTREL_ASSETS/" >&2
