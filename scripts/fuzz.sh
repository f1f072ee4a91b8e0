#!/usr/bin/env bash
# Runs kestrel's fuzz targets (fuzz/: cargo-fuzz + libFuzzer) for a bounded time:
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     (default: 20 s each, every target)
#
# Each target starts from its seed corpus in the repo (fuzz/corpus/<target>),
# copied into a scratch directory that collects what libFuzzer finds, so the repo is never
# written. A crash fails the run; libFuzzer leaves the input under
# fuzz/artifacts/<target>/ (`cargo fuzz run <target> <that file>` replays it). The long runs are the same command with a larger SECONDS.
#
# Built with the stable toolchain: RUSTC_BOOTSTRAP=1 lets it take the -Z flags libFuzzer's
# instrumentation needs (a fresh machine here gets no nightly), without a sanitizer (the
# targets are safe Rust: bounds, and with -a overflow, are checked by the language), with
# debug assertions on. cargo-fuzz comes from scripts/install-deps.sh (into the cache).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

secs="${1:-20}"
shift || true
export PATH="$KESTREL_CACHE/tools/bin:$PATH"
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$KESTREL_CACHE/fuzz-target"
command -v cargo-fuzz >/dev/null || {
  echo "fuzz: cargo-fuzz missing (scripts/install-deps.sh builds it)" >&2
  exit 1
}
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi
for t in "${targets[@]}"; do
  work="$(mktemp -d)"
  mkdir "$work/corpus"
  log="$work/fuzz.log"
  if ! cargo fuzz run --sanitizer none -O -a "$t" "$work/corpus" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz: $t FAILED (input under fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  runs="$(grep -Eo 'Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1)"
  line="fuzz: $t: ${runs:-?}s, 0 crashes, corpus $(ls "$work/corpus" | wc -l) new + $(ls "fuzz/corpus/$t" | wc -l) seeds"
  echo "$line"
  # The test command's campaign report (scripts/test.sh).
  if [ -n "${KESTREL_CAMPAIGN_REPORT:-}" ]; then echo "$line" >>"$KESTREL_CAMPAIGN_REPORT"; fi
  rm -rf "$work"
done
