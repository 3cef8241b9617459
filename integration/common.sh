# Shared by the integration scripts: the cache of Debian roots, and skip/pass/fail reporting.
CACHE=${AUTOSLEEPD_IT_CACHE:-/var/cache/autosleepd-it}
MIRROR=${AUTOSLEEPD_IT_MIRROR:-http://deb.debian.org/debian}
ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT_DIR/.venv}

say()  { printf '[%s] %s\n' "$PART" "$*"; }
skip() { say "SKIP: $*"; exit 77; }
fail() { say "FAIL: $*"; exit 1; }
need() { command -v "$1" >/dev/null || skip "$1 is not installed ($2)"; }

# debootstrap NAME VARIANT ("" for Debian's default) PACKAGES into $CACHE/NAME, once; later
# runs reuse it. Sets ROOTFS (not echoed: a failure here must end the script, not a subshell).
debian_root() {
    local name=$1 variant=$2 include=$3 dir=$CACHE/$1
    if [ ! -x "$dir/usr/bin/python3" ]; then
        need debootstrap "apt-get install debootstrap"
        mkdir -p "$CACHE"
        rm -rf "$dir.tmp"
        say "debootstrap $name (bookworm, $include): a few minutes, once"
        debootstrap ${variant:+--variant=$variant} --include="$include" bookworm "$dir.tmp" "$MIRROR" \
            > "$CACHE/$name.log" 2>&1 || fail "debootstrap $name failed: see $CACHE/$name.log"
        rm -rf "$dir.tmp"/var/cache/apt/archives/*.deb "$dir.tmp"/var/lib/apt/lists/*
        mv "$dir.tmp" "$dir"
    fi
    ROOTFS=$dir
}

# autosleepd and its dependencies as wheels (built here, where PyPI is reachable), for
# installs inside a root or an image that cannot reach it. Sets WHEELS.
wheelhouse() {
    WHEELS=$CACHE/wheels
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    "$VENV/bin/python" -m pip wheel -q --disable-pip-version-check "$ROOT_DIR" 'setuptools>=68' \
        -w "$WHEELS" >/dev/null 2>&1 || fail "pip wheel failed"
}
