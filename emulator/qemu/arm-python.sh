#!/usr/bin/env bash
# Run this checkout's code with Debian bookworm's armhf python3 under
# qemu-arm-static (user mode): the terminal's interpreter and its own builds
# of numpy, cryptography and pyserial, on the host.
#
#   emulator/qemu/arm-python.sh [python args...]   e.g. -m tools.cli bench hal --size-mib 64
#
# Builds or reuses the cached root filesystem (build-rootfs.sh). Sets
# PYTHONPATH to the checkout, EDGEKEY_EMULATED=qemu-user, and scratch space
# in .cache/arm-tmp (TMPDIR), since qemu -L serves any absolute path that
# exists inside the root filesystem (such as /tmp) from there.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
checkout=$(cd "$here/../.." && pwd -P)

rootfs=$(bash "$here/build-rootfs.sh" | tail -n1)
[ -x "$rootfs/usr/bin/python3" ] || { echo "arm-python: no python3 in '$rootfs'" >&2; exit 1; }

scratch=${EDGEKEY_ARM_SCRATCH:-$checkout/.cache/arm-tmp}
for p in "$checkout" "$scratch"; do
    if [ -e "$rootfs$p" ]; then
        echo "arm-python: $p also exists inside $rootfs; qemu -L would redirect it" >&2
        exit 1
    fi
done
mkdir -p "$scratch/tmp"

# Nothing of the host's Python setup leaks into the emulated interpreter.
unset_python_vars=()
for v in $(compgen -e | grep '^PYTHON' || true); do unset_python_vars+=(-u "$v"); done

# The board's RAM as a hard limit (EDGEKEY_ARM_MEM_LIMIT, e.g. 512M): qemu-user ignores
# RLIMIT_AS and ulimit -v stops it from starting (../shared/notes/qemu-armhf.md), so the
# emulated process goes into a memory cgroup (v1) of its own under ours, and is OOM-killed
# past the limit. Empty ones left by earlier runs are removed first; the test session
# removes its own at the end (tests/conftest.py). Without a writable memory cgroup the
# limit is not applied and a line says so; the tests then check RSS themselves.
if [ -n "${EDGEKEY_ARM_MEM_LIMIT:-}" ]; then
    own=$(grep -E '^[0-9]+:memory:' /proc/self/cgroup | cut -d: -f3 || true)
    base=/sys/fs/cgroup/memory${own%/}
    if [ -n "$own" ] && [ -w "$base" ]; then
        for old in "$base"/edgekey-arm-*; do
            [ -d "$old" ] && [ -z "$(cat "$old/cgroup.procs" 2>/dev/null)" ] \
                && rmdir "$old" 2>/dev/null || true
        done
        cg=$base/edgekey-arm-$$
        mkdir -p "$cg"
        echo "$EDGEKEY_ARM_MEM_LIMIT" > "$cg/memory.limit_in_bytes"
        echo $$ > "$cg/cgroup.procs"
    else
        echo "arm-python: no writable memory cgroup: $EDGEKEY_ARM_MEM_LIMIT not enforced" >&2
    fi
fi

cd "$checkout"
exec env "${unset_python_vars[@]}" \
    PYTHONPATH="$checkout" PYTHONNOUSERSITE=1 PYTHONUTF8=1 LC_ALL=C.UTF-8 \
    TMPDIR="$scratch/tmp" HYPOTHESIS_STORAGE_DIRECTORY="$checkout/.cache/arm-hypothesis" \
    EDGEKEY_EMULATED=qemu-user \
    qemu-arm-static -L "$rootfs" "$rootfs/usr/bin/python3" "$@"
