# Sourced by kestrel's scripts: shared build locations outside the clone, so a fresh clone
# on a warm machine reuses the compiled crates and the cached guest kernel.
export KESTREL_CACHE="${KESTREL_CACHE:-$HOME/.cache/kestrel}"
export KESTREL_ASSETS="${KESTREL_ASSETS:-$KESTREL_CACHE/assets}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KESTREL_CACHE/target}"
