#!/bin/sh
# Installs kestrel on a Kubernetes node, or removes it (what deploy/kestrel-deploy.yaml and
# deploy/kestrel-cleanup.yaml run in a privileged pod with the host's / at $HOST_ROOT):
#
#   kestrel-deploy.sh install     # shim + guest assets into /opt/kestrel, links where
#                                 # containerd and the shim look, the `kestrel` runtime
#                                 # handler in containerd's config, containerd restarted
#   kestrel-deploy.sh uninstall   # all of that undone (the config as it was before)
#
# Environment: HOST_ROOT (default /host), KESTREL_ARTIFACTS (default /kestrel: bin/ and
# share/kestrel/ of the image, containerd/config-v{2,3}.toml), CONTAINERD_CONFIG (default
# /etc/containerd/config.toml on the host), NO_RESTART=1 (do not restart containerd).
# POSIX sh: the installer image is busybox.
set -eu

HOST_ROOT="${HOST_ROOT:-/host}"
ARTIFACTS="${KESTREL_ARTIFACTS:-/kestrel}"
CONFIG="$HOST_ROOT${CONTAINERD_CONFIG:-/etc/containerd/config.toml}"
OPT="$HOST_ROOT/opt/kestrel"
SHIM_LINK="$HOST_ROOT/usr/local/bin/containerd-shim-kestrel-v2"
ASSETS_LINK="$HOST_ROOT/usr/local/share/kestrel"
BEGIN="# BEGIN kestrel runtime (kestrel-deploy.sh)"
END="# END kestrel runtime"

say() { printf 'kestrel-deploy: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

restart_containerd() {
    if [ "${NO_RESTART:-0}" = 1 ]; then
        say "not restarting containerd (NO_RESTART=1)"
        return
    fi
    say "restarting containerd"
    nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart containerd \
        || die "cannot restart containerd (systemctl restart containerd on the node)"
}

# The snippet for the config's version: 3 for containerd 2.x, else 2.
snippet() {
    if [ -f "$CONFIG" ] && grep -Eq '^[[:space:]]*version[[:space:]]*=[[:space:]]*3' "$CONFIG"; then
        cat "$ARTIFACTS/containerd/config-v3.toml"
    else
        cat "$ARTIFACTS/containerd/config-v2.toml"
    fi
}

# Removes the marked block (and the blank line before it) from the config.
strip_config() {
    [ -f "$CONFIG" ] || return 0
    grep -qF "$BEGIN" "$CONFIG" || return 0
    tmp="$CONFIG.kestrel-tmp"
    awk -v b="$BEGIN" -v e="$END" '
        $0 == b { skip = 1; if (held > 0) held--; next }
        skip { if ($0 == e) skip = 0; next }
        $0 == "" { held++; next }
        { while (held > 0) { print ""; held-- } print }
        END { while (held > 0) { print ""; held-- } }
    ' "$CONFIG" >"$tmp"
    cat "$tmp" >"$CONFIG"
    rm -f "$tmp"
}

install_kestrel() {
    [ -x "$ARTIFACTS/bin/containerd-shim-kestrel-v2" ] || die "$ARTIFACTS/bin/containerd-shim-kestrel-v2 missing"
    for a in bzImage initramfs.cpio; do
        [ -f "$ARTIFACTS/share/kestrel/$a" ] || die "$ARTIFACTS/share/kestrel/$a missing"
    done
    for link in "$SHIM_LINK" "$ASSETS_LINK"; do
        if [ -e "$link" ] && [ ! -L "$link" ]; then
            die "$link exists and is not kestrel-deploy's link (kestrel installed by hand? remove it first)"
        fi
    done
    [ -e /dev/kvm ] || [ -e "$HOST_ROOT/dev/kvm" ] || say "warning: the node has no /dev/kvm: kestrel pods cannot start here"
    say "installing into /opt/kestrel"
    mkdir -p "$OPT/bin" "$OPT/share/kestrel" "$(dirname "$SHIM_LINK")" "$(dirname "$ASSETS_LINK")"
    # New files beside the old, then renamed: a running shim keeps its binary.
    cp "$ARTIFACTS/bin/containerd-shim-kestrel-v2" "$OPT/bin/.containerd-shim-kestrel-v2.new"
    chmod 0755 "$OPT/bin/.containerd-shim-kestrel-v2.new"
    mv -f "$OPT/bin/.containerd-shim-kestrel-v2.new" "$OPT/bin/containerd-shim-kestrel-v2"
    for a in "$ARTIFACTS"/share/kestrel/*; do
        cp "$a" "$OPT/share/kestrel/.new"
        mv -f "$OPT/share/kestrel/.new" "$OPT/share/kestrel/$(basename "$a")"
    done
    ln -sfn /opt/kestrel/bin/containerd-shim-kestrel-v2 "$SHIM_LINK"
    ln -sfn /opt/kestrel/share/kestrel "$ASSETS_LINK"
    say "registering the kestrel runtime handler in ${CONTAINERD_CONFIG:-/etc/containerd/config.toml}"
    mkdir -p "$(dirname "$CONFIG")"
    strip_config
    if [ ! -s "$CONFIG" ]; then
        printf 'version = 2\n' >"$CONFIG"
    fi
    { printf '\n%s\n' "$BEGIN"; snippet; printf '%s\n' "$END"; } >>"$CONFIG"
    restart_containerd
    say "installed: RuntimeClass handler kestrel (deploy/runtimeclass.yaml)"
}

uninstall_kestrel() {
    say "removing the kestrel runtime handler"
    strip_config
    [ -L "$SHIM_LINK" ] && [ "$(readlink "$SHIM_LINK")" = /opt/kestrel/bin/containerd-shim-kestrel-v2 ] && rm -f "$SHIM_LINK"
    [ -L "$ASSETS_LINK" ] && [ "$(readlink "$ASSETS_LINK")" = /opt/kestrel/share/kestrel ] && rm -f "$ASSETS_LINK"
    rm -rf "$OPT"
    restart_containerd
    say "uninstalled"
}

case "${1:-}" in
    install) install_kestrel ;;
    uninstall) uninstall_kestrel ;;
    *) die "usage: $0 install|uninstall" ;;
esac
