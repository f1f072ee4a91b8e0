#!/usr/bin/env bash
# From a fresh machine to a booted microVM: installs the Debian packages kestrel needs,
# builds the guest kernel (cached, ~7 minutes the first time) and initramfs, builds
# kestrel, and boots the default guest. Extra arguments go to `kestrel run`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

scripts/install-deps.sh
scripts/build-guest.sh >&2
cargo build --release --quiet -p kestrel
exec "$CARGO_TARGET_DIR/release/kestrel" run "$@"
