#!/usr/bin/env bash
# kestrel's test command: installs what is missing, builds the guest assets (cached),
# checks formatting and lints, and runs every test layer (device logic, tiny-payload VMM
# tests, real Linux boots, CLI, containerd, CRI), then each fuzz target for
# $KESTREL_FUZZ_SECONDS (20) seconds (scripts/fuzz.sh), and prints the reliability
# campaign's figures of this run. Tests that need /dev/kvm print "skipped: <reason>" on
# hosts without it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

scripts/install-deps.sh
scripts/build-guest.sh >/dev/null
echo "== cargo fmt --check" >&2
cargo fmt --all --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo build (the shim the containerd tests run)" >&2
# cargo test does not build another package's binaries: build the shim now, and point the
# tests at it so they never pick up a stale one.
cargo build --quiet -p kestrel-shim
export KESTREL_SHIM="$CARGO_TARGET_DIR/debug/containerd-shim-kestrel-v2"
# The reliability campaign's tests and fuzz.sh append their figures here
# (kestrel_test_support::campaign); printed at the end, they are this run's.
KESTREL_CAMPAIGN_REPORT="$(mktemp)"
export KESTREL_CAMPAIGN_REPORT
trap 'rm -f "$KESTREL_CAMPAIGN_REPORT"' EXIT
echo "== cargo test" >&2
cargo test --workspace "$@"
echo "== fuzz (each target ${KESTREL_FUZZ_SECONDS:-20} s)" >&2
scripts/fuzz.sh "${KESTREL_FUZZ_SECONDS:-20}"
echo "== reliability campaign: this run's figures" >&2
cat "$KESTREL_CAMPAIGN_REPORT" >&2
