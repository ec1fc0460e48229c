#!/usr/bin/env bash
# Build (or reuse) the system-mode board: what qemu-system-arm -M virt boots.
#
#   emulator/qemu/build-board.sh [DIR]
#
# Out of the armhf board root filesystem (build-rootfs.sh --board: Debian's
# armmp kernel, python3, numpy, cryptography, pyserial, etcd, rauc, busybox):
#   vmlinuz          Debian's linux-image-armmp kernel
#   initrd.cpio.gz   busybox-static, the kernel modules for virtio disks and
#                    consoles, ext4, loop and squashfs, and /init (board/init)
#   system.ext4      the terminal's operating system, mounted read-only:
#                    the root filesystem without kernel modules and docs, busybox
#                    init (board/inittab), the boot stage that chooses the A/B slot
#                    and the agent's supervisor (board/), and the bootloader's own
#                    copy of hal/ (the A/B boot state, hal/bootstate.py) with the
#                    board configs. The agent itself is not here: it runs from the
#                    A/B slot (an appfs image of `edgekey image build`).
# Cached like the root filesystem, under a key that hashes the root
# filesystem's, this script, board/, hal/ and board_configs/. A build goes to a
# temporary directory renamed into place when whole. The last line on stdout
# is the directory; progress goes to stderr.
set -euo pipefail

log() { echo "build-board: $*" >&2; }
die() { log "error: $*"; exit 1; }
for tool in mke2fs cpio gzip modinfo depmod sha256sum flock; do
    command -v "$tool" >/dev/null || die "$tool not found (run tools/setup-host.sh as root)"
done

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
checkout=$(cd "$here/../.." && pwd -P)
rootfs=$(bash "$here/build-rootfs.sh" --board | tail -n1)
MODULES=(virtio_mmio virtio_blk virtio_console crc32c_generic ext4 loop squashfs 9pnet_virtio 9p)

key=$( { basename "$rootfs"; printf '%s\n' "${MODULES[@]}"; cat "${BASH_SOURCE[0]}";
         cd "$checkout" && find emulator/qemu/board hal board_configs -type f -name '*[!c]' \
             -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs cat; } | sha256sum | cut -c1-12)
if [ $# -eq 1 ]; then
    dest=$1
else
    cache=${EDGEKEY_CACHE:-${XDG_CACHE_HOME:-${HOME:?is unset: set EDGEKEY_CACHE}/.cache}/edgekey}
    dest=$cache/board-$key
fi
mkdir -p "$(dirname "$dest")"
parent=$(cd "$(dirname "$dest")" && pwd -P)
dest=$parent/$(basename "$dest")
if [ -f "$dest/key" ] && [ "$(cat "$dest/key")" = "$key" ]; then
    log "cached: $dest"
    echo "$dest"
    exit 0
fi
exec 9>"$parent/.board.lock"
flock 9
if [ -f "$dest/key" ] && [ "$(cat "$dest/key")" = "$key" ]; then
    echo "$dest"
    exit 0
fi
rm -rf --one-file-system "$parent"/.board-*.tmp.*
work=$(mktemp -d "$parent/.board-$key.tmp.XXXXXX")
trap 'rm -rf --one-file-system "$work"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
t0=$SECONDS

kver=$(ls "$rootfs/lib/modules" | sort -V | tail -n1)
[ -f "$rootfs/boot/vmlinuz-$kver" ] || die "no kernel vmlinuz-$kver in $rootfs/boot"
cp "$rootfs/boot/vmlinuz-$kver" "$work/vmlinuz"

# --- the initramfs: busybox, the modules and their dependencies, /init ---------
ird=$work/initramfs
mkdir -p "$ird/bin" "$ird/etc" "$ird/lib/modules/$kver"
cp "$rootfs/bin/busybox" "$ird/bin/busybox"
moddir=$rootfs/lib/modules/$kver
declare -A seen=()
want=("${MODULES[@]}")
while [ ${#want[@]} -gt 0 ]; do
    m=${want[0]}; want=("${want[@]:1}")
    [ -n "${seen[$m]:-}" ] && continue
    seen[$m]=1
    f=$(find "$moddir" -name "$m.ko" -print -quit)
    [ -n "$f" ] || die "module $m not found under $moddir"
    rel=${f#"$moddir"/}
    mkdir -p "$ird/lib/modules/$kver/$(dirname "$rel")"
    cp "$f" "$ird/lib/modules/$kver/$rel"
    IFS=, read -r -a deps <<<"$(modinfo -F depends "$f")"
    want+=("${deps[@]}")
done
cp "$moddir/modules.builtin" "$moddir/modules.order" "$ird/lib/modules/$kver/"
depmod -b "$ird" "$kver"
printf '%s\n' "${MODULES[@]}" > "$ird/etc/modules"
install -m 0755 "$here/board/init" "$ird/init"
(cd "$ird" && find . | LC_ALL=C sort | cpio --quiet -o -H newc --reproducible) | gzip -9n > "$work/initrd.cpio.gz"

# --- the system disk ----------------------------------------------------------
sysd=$work/system
# hard links into the cached root filesystem: new files only are written below
cp -al "$rootfs" "$sysd"
rm -rf "$sysd/boot" "$sysd/lib/modules" "$sysd/usr/share/doc" "$sysd/usr/share/man" \
       "$sysd/usr/share/locale" "$sysd/etc/edgekey-rootfs"
mkdir -p "$sysd/sbin" "$sysd/opt/edgekey" "$sysd/run" "$sysd/tmp" "$sysd/proc" "$sysd/sys" \
         "$sysd/dev" "$sysd/mnt/update"
ln -sf /bin/busybox "$sysd/sbin/init"
ln -sf /bin/busybox "$sysd/bin/sh"
rm -f "$sysd/etc/inittab" "$sysd/etc/passwd" "$sysd/etc/group"
# The accounts base-passwd's maintainer script would have made (the extract variant runs
# none): D-Bus and GLib look root up by name.
printf 'root:x:0:0:root:/root:/bin/sh\nmessagebus:x:100:101::/nonexistent:/usr/sbin/nologin\n' \
    > "$sysd/etc/passwd"
printf 'root:x:0:\nmessagebus:x:101:\n' > "$sysd/etc/group"
cp "$here/board/inittab" "$sysd/etc/inittab"
boot=$sysd/usr/lib/edgekey-boot
mkdir -p "$boot"
install -m 0755 "$here/board/rcS" "$here/board/rauc-service" "$boot/"
cp "$here/board/bootstage.py" "$here/board/supervise.py" "$here/board/dbus.conf" "$boot/"
(cd "$checkout" && tar cf - --exclude=__pycache__ hal board_configs) | tar xf - -C "$boot"
/usr/bin/python3 -m compileall -q -s "$sysd" -p / "$boot" >/dev/null || die "byte-compiling the boot stage failed"
size_mib=$(( $(du -sm "$sysd" | cut -f1) * 5 / 4 + 32 ))
mke2fs -q -t ext4 -L edgekey-system -E root_owner=0:0 -d "$sysd" "$work/system.ext4" "${size_mib}M" \
    || die "mke2fs of the system disk failed"
rm -rf --one-file-system "$sysd" "$ird"

echo "$key" > "$work/key"
echo "kernel=$kver rootfs=$(basename "$rootfs")" > "$work/built"
[ -e "$dest" ] && rm -rf --one-file-system "$dest"
mv -T "$work" "$dest"
trap - EXIT
log "built $dest in $((SECONDS - t0)) s (system disk ${size_mib} MiB, initrd $(du -h "$dest/initrd.cpio.gz" | cut -f1))"
echo "$dest"
