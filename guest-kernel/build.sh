#!/usr/bin/env bash
# Build kestrel's guest kernel from Debian's linux-source-6.1 package.
#
#   guest-kernel/build.sh            -> prints the output directory on stdout
#
# Output (cached outside the clone):
#   ${KESTREL_CACHE:-$HOME/.cache/kestrel}/kernel-<hash>/{vmlinux,bzImage,config}
# where <hash> = sha256 over config.fragment, patches/*.patch, this script and the
# linux-source package version. A cache hit costs nothing (no extraction, no make).
#
# Steps: extract /usr/src/linux-source-6.1.tar.xz (once per source version and patch
# set, into ${KESTREL_CACHE}/build/), apply patches/*.patch with `patch -p1`,
# `make tinyconfig`, merge config.fragment with scripts/kconfig/merge_config.sh (-n:
# symbols the fragment newly exposes default to "no", keeping the kernel tiny),
# `make vmlinux bzImage`, then check that every line of the fragment made it into the
# final .config (a dependency can silently drop an option).
#
# Environment:
#   KESTREL_CACHE        cache root (default $HOME/.cache/kestrel)
#   KESTREL_JOBS         make -j (default: nproc)
#   KESTREL_VERBOSE=1    show make's output instead of logging it to build.log
#   KESTREL_LINUX_TARBALL  source tarball (default /usr/src/linux-source-6.1.tar.xz)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/config.fragment"
tarball="${KESTREL_LINUX_TARBALL:-/usr/src/linux-source-6.1.tar.xz}"
cache="${KESTREL_CACHE:-$HOME/.cache/kestrel}"
jobs="${KESTREL_JOBS:-$(nproc)}"

step() { printf 'guest-kernel: %s\n' "$*" >&2; }
die() { printf 'guest-kernel: error: %s\n' "$*" >&2; exit 1; }

[[ -f "$tarball" ]] || die "$tarball not found; install it with: apt-get install linux-source-6.1"
for tool in make gcc patch bc flex bison lz4 xz sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' not found; see REQUIRED_PACKAGES in scripts/build-guest.sh"
done

# Source version: the Debian package version when installed, else the tarball's digest.
if version="$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null)" && [[ -n "$version" ]]; then
    version="linux-source-6.1 $version"
else
    version="tarball $(sha256sum "$tarball" | cut -d' ' -f1)"
fi

shopt -s nullglob
patches=("$here"/patches/*.patch)
shopt -u nullglob

hash="$(
    {
        printf 'version %s\n' "$version"
        for f in "$fragment" "${patches[@]}" "$here/build.sh"; do
            printf '%s %s\n' "$(basename "$f")" "$(sha256sum <"$f" | cut -d' ' -f1)"
        done
    } | sha256sum | cut -c1-16
)"
out="$cache/kernel-$hash"

if [[ -f "$out/vmlinux" && -f "$out/bzImage" ]]; then
    step "cached: $out"
    printf '%s\n' "$out"
    exit 0
fi

mkdir -p "$cache/build"
# One kernel build at a time per cache (builds are heavy and share the source tree).
exec 9>"$cache/build/.lock"
step "waiting for the build lock $cache/build/.lock"
flock 9

# The tree is reused across builds while the source version and the patch set stay the
# same, so a fragment change only recompiles what changed.
patch_id="$(
    {
        printf 'version %s\n' "$version"
        for f in "${patches[@]}"; do sha256sum <"$f"; done
    } | sha256sum | cut -c1-16
)"
tree="$cache/build/linux-6.1"
if [[ "$(cat "$tree/.kestrel-source" 2>/dev/null || true)" != "$patch_id" ]]; then
    step "[1/5] extracting $tarball into $tree"
    rm -rf "$tree" "$tree.tmp"
    mkdir -p "$tree.tmp"
    tar -xf "$tarball" -C "$tree.tmp" --strip-components=1
    step "[2/5] applying ${#patches[@]} patches"
    for p in "${patches[@]}"; do
        step "      $(basename "$p")"
        patch -d "$tree.tmp" -p1 --batch --quiet <"$p" || die "patch $(basename "$p") does not apply"
    done
    printf '%s\n' "$patch_id" >"$tree.tmp/.kestrel-source"
    mv "$tree.tmp" "$tree"
else
    step "[1/5] reusing source tree $tree"
    step "[2/5] patches already applied"
fi

log="$tree/build.log"
: >"$log"
run() {
    if [[ "${KESTREL_VERBOSE:-0}" == 1 ]]; then
        "$@" >&2
    elif ! "$@" >>"$log" 2>&1; then
        tail -n 60 "$log" >&2
        die "'$*' failed; full log: $log"
    fi
}

export ARCH=x86_64
step "[3/5] configuring: tinyconfig + $(basename "$fragment")"
run make -C "$tree" tinyconfig
# merge_config.sh works in the current directory (.config, scripts/, Makefile).
(cd "$tree" && run scripts/kconfig/merge_config.sh -n .config "$fragment")

# Every line of the fragment must be in the final .config as written.
missing=()
while IFS= read -r line; do
    if [[ "$line" =~ ^CONFIG_([A-Za-z0-9_]+)= ]]; then
        grep -qxF -- "$line" "$tree/.config" || missing+=("$line (got: $(grep -E "^(# )?CONFIG_${BASH_REMATCH[1]}[= ]" "$tree/.config" || echo unset))")
    elif [[ "$line" =~ ^#\ CONFIG_([A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        if grep -qE "^CONFIG_${BASH_REMATCH[1]}=" "$tree/.config"; then
            missing+=("$line (got: $(grep -E "^CONFIG_${BASH_REMATCH[1]}=" "$tree/.config"))")
        fi
    fi
done <"$fragment"
if ((${#missing[@]})); then
    printf 'guest-kernel: error: %d fragment option(s) did not end up in .config (dependency dropped?):\n' "${#missing[@]}" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
fi

step "[4/5] make -j$jobs vmlinux bzImage (log: $log)"
start=$SECONDS
run make -C "$tree" -j"$jobs" vmlinux bzImage
step "      built in $((SECONDS - start)) s"

step "[5/5] installing into $out"
rm -rf "$out.tmp"
mkdir -p "$out.tmp"
cp "$tree/vmlinux" "$out.tmp/vmlinux"
cp "$tree/arch/x86/boot/bzImage" "$out.tmp/bzImage"
cp "$tree/.config" "$out.tmp/config"
printf '%s\n' "$version" >"$out.tmp/source-version"
rm -rf "$out"
mv "$out.tmp" "$out"
step "done: $out"
printf '%s\n' "$out"
