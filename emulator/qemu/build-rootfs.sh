#!/usr/bin/env bash
# Build (or reuse) the armhf Debian bookworm root filesystem that the
# emulated-ARM test tier runs in: Debian's own armhf python3, cryptography,
# numpy, pyserial, pytest and hypothesis, the terminal's real builds.
#
#   emulator/qemu/build-rootfs.sh [--board] [DIR]
#
# --board adds what the system-mode board boots (build-board.sh): Debian's
# armmp kernel and its modules, busybox-static for the initramfs and init,
# rauc and dbus for signed A/B updates on the terminal, util-linux's losetup.
#
# Without DIR the root filesystem is cached outside the checkout, so it
# survives between CI runs made from fresh clones:
#   ${EDGEKEY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgekey}/armhf-rootfs-<key>
# where <key> hashes the package list and this script, so changing either
# builds a new one. A build goes into a temporary directory next to the target
# and is renamed into place only once it has passed a smoke test under
# qemu-arm-static, so an interrupted build is never mistaken for a good one.
# The last line on stdout is the path of the root filesystem; all progress
# goes to stderr.
#
# Recipe: ../shared/notes/qemu-armhf.md. Needs mmdebstrap, qemu-user-static
# (tools/setup-host.sh installs them), run as root. Never adds armhf to the
# host's dpkg architectures.
set -euo pipefail

SUITE=bookworm
PACKAGES=(python3 python3-cryptography python3-numpy python3-serial python3-pytest
          python3-hypothesis python3-tqdm python3-etcd3gw etcd-server)
BOARD_PACKAGES=(linux-image-armmp busybox-static rauc dbus mount)
STAMP_REL=etc/edgekey-rootfs   # inside the rootfs: marks a finished build

log() { echo "build-rootfs: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in mmdebstrap qemu-arm-static flock sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found (run tools/setup-host.sh as root)"
done

flavour=armhf-rootfs
if [ "${1:-}" = "--board" ]; then
    shift
    flavour=armhf-board-rootfs
    PACKAGES+=("${BOARD_PACKAGES[@]}")
fi

self="${BASH_SOURCE[0]}"
key=$( { printf '%s\n' "$SUITE" "${PACKAGES[@]}"; cat "$self"; } | sha256sum | cut -c1-12)

if [ $# -gt 1 ]; then
    echo "usage: $0 [--board] [DIR]" >&2
    exit 2
fi
if [ $# -eq 1 ]; then
    dest=$1
else
    cache=${EDGEKEY_CACHE:-${XDG_CACHE_HOME:-${HOME:?is unset: set EDGEKEY_CACHE}/.cache}/edgekey}
    dest=$cache/$flavour-$key
fi
parent=$(dirname "$dest")
mkdir -p "$parent"
parent=$(cd "$parent" && pwd -P)
dest=$parent/$(basename "$dest")

is_ours() { [ -f "$1/$STAMP_REL" ] && [ "$(head -n1 "$1/$STAMP_REL")" = "key=$key" ]; }

if is_ours "$dest"; then
    log "cached: $dest"
    echo "$dest"
    exit 0
fi

# One build at a time per cache directory; under the lock any temporary
# directory left behind is from a build that died, and can go.
exec 9>"$parent/.$flavour.lock"
flock 9
if is_ours "$dest"; then         # someone else finished it while we waited
    log "cached: $dest"
    echo "$dest"
    exit 0
fi
rm -rf --one-file-system "$parent"/."$flavour"-*.tmp.*
if [ -e "$dest" ] && ! [ -f "$dest/$STAMP_REL" ]; then
    die "$dest exists and is not a root filesystem built by this script; remove it or pick another DIR"
fi

work=$(mktemp -d "$parent/.$flavour-$key.tmp.XXXXXX")
cleanup() { rm -rf --one-file-system "$work"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
rootfs=$work/rootfs
mkdir "$rootfs"

# --- apt sources: the host's Debian mirror without the security suite ------
# (bookworm-security's armhf index is broken on the machines we run on).
# Falls back to deb.debian.org when the host has no usable bookworm sources
# (another release, or none at all). EDGEKEY_ARMHF_MIRROR=URL forces a mirror.
deb822=/etc/apt/sources.list.d/debian.sources
oneline=/etc/apt/sources.list
sources=
if [ -n "${EDGEKEY_ARMHF_MIRROR:-}" ]; then
    log "mirror from EDGEKEY_ARMHF_MIRROR: $EDGEKEY_ARMHF_MIRROR"
elif [ -s "$deb822" ]; then
    sources=$work/armhf.sources
    # Drop every paragraph naming the security suite, and any Architectures
    # restriction (it would hide the armhf indices).
    awk 'BEGIN{RS="";ORS="\n\n"} !/security/' "$deb822" \
        | grep -v -i '^Architectures:' > "$sources" || true
elif [ -s "$oneline" ]; then
    sources=$work/armhf.list
    # Old one-line format: keep binary "deb" lines, drop security and any
    # [arch=...] option.
    grep -E '^[[:space:]]*deb[[:space:]]' "$oneline" | grep -v security \
        | sed -E 's/arch=[^][:space:]]*[[:space:]]*//' > "$sources" || true
fi
if [ -n "$sources" ] && ! grep -q -w "$SUITE" "$sources"; then
    log "no $SUITE entry in the host's apt sources; using deb.debian.org"
    sources=
elif [ -z "$sources" ] && [ -z "${EDGEKEY_ARMHF_MIRROR:-}" ]; then
    log "neither $deb822 nor $oneline found; using deb.debian.org"
fi
if [ -n "$sources" ]; then
    mirrors=("$sources")
else
    m=${EDGEKEY_ARMHF_MIRROR:-http://deb.debian.org/debian}
    mirrors=("deb $m $SUITE main" "deb $m $SUITE-updates main")
fi

log "building armhf $SUITE root filesystem (key $key) in $work"
t0=$SECONDS
# Nothing runs inside the target (extract variant), so no /proc, /sys or /dev
# mounts into it: none to leak if the build is killed, none needing mount
# privileges in a container.
if ! mmdebstrap --quiet --variant=extract --arch=armhf --skip=chroot/mount \
        --include="$(IFS=,; echo "${PACKAGES[*]}")" \
        "$SUITE" "$rootfs" "${mirrors[@]}" >&2; then
    die "mmdebstrap failed (apt sources used: ${mirrors[*]})"
fi

# An empty /dev, so that qemu -L serves the host's /dev: the device nodes
# mmdebstrap creates do not all work outside a devpts mount (its ptmx fails
# with ENODEV, and os.openpty with it: pty links need the host's).
find "$rootfs/dev" -xdev -mindepth 1 -delete

# --- what the extract variant's skipped maintainer scripts would have done --
# numpy finds BLAS/LAPACK through the alternatives links.
lib=$rootfs/usr/lib/arm-linux-gnueabihf
[ -e "$lib/blas/libblas.so.3" ] || die "no $lib/blas/libblas.so.3 in the root filesystem"
[ -e "$lib/lapack/liblapack.so.3" ] || die "no $lib/lapack/liblapack.so.3 in the root filesystem"
ln -sf blas/libblas.so.3 "$lib/libblas.so.3"
ln -sf lapack/liblapack.so.3 "$lib/liblapack.so.3"

# Byte-compile once, else every emulated import compiles again. The host's
# Debian python3 is the same 3.11 (same magic number) and 10x faster than the
# emulated one; call it by its path, another python may be first on PATH.
pylib=$(cd "$rootfs/usr/lib" && ls -d python3.[0-9]* | sort -V | tail -n1)
pyver=${pylib#python}
compile_dirs=("$rootfs/usr/lib/$pylib" "$rootfs/usr/lib/python3/dist-packages")
if [ -x /usr/bin/python3 ] && [ "$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$pyver" ]; then
    /usr/bin/python3 -m compileall -q -j0 -s "$rootfs" -p / "${compile_dirs[@]}" >/dev/null \
        || die "byte-compiling with /usr/bin/python3 failed"
else
    log "host /usr/bin/python3 is not $pyver: byte-compiling under emulation (slower)"
    qemu-arm-static -L "$rootfs" "$rootfs/usr/bin/python3" -m compileall -q \
        -s "$rootfs" -p / "${compile_dirs[@]}" >/dev/null \
        || die "byte-compiling under emulation failed"
fi

# --- smoke test: only a root filesystem that runs goes into the cache ------
# (-I: ignore PYTHON* variables, the user site and the current directory)
if ! timeout 300 qemu-arm-static -L "$rootfs" "$rootfs/usr/bin/python3" -I -c '
import platform, sys
import numpy, cryptography, serial, pytest, hypothesis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
assert platform.machine().startswith("armv7"), platform.machine()
a = numpy.array([[2.0, 1.0], [1.0, 3.0]])
assert abs(numpy.linalg.det(a) - 5.0) < 1e-9          # LAPACK
k = Ed25519PrivateKey.generate()
k.public_key().verify(k.sign(b"x"), b"x")             # OpenSSL
import os
master, slave = os.openpty()                          # the host /dev/ptmx
os.write(master, b"ping\n"); assert os.read(slave, 5) == b"ping\n"
' >&2; then
    die "smoke test of the new root filesystem failed under qemu-arm-static"
fi

printf 'key=%s\nsuite=%s\npackages=%s\nbuilt=%s\n' "$key" "$SUITE" "${PACKAGES[*]}" \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$rootfs/$STAMP_REL"

# --- into place: one rename(2) on the same filesystem ----------------------
if [ -e "$dest" ]; then          # an older build of ours at an explicit DIR
    old=$work/old
    mv -T "$dest" "$old"
fi
mv -T "$rootfs" "$dest"
log "built $dest in $((SECONDS - t0)) s ($(du -sh "$dest" | cut -f1))"
echo "$dest"
