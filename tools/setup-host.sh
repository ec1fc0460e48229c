#!/usr/bin/env bash
# Install the Debian packages the project needs on a fresh Debian bookworm
# machine (run as root). Does nothing when everything is already there.
#   python3-venv       the virtual environment under .venv
#   qemu-user-static   runs the armhf tests (emulator/qemu/)
#   mmdebstrap         builds the armhf root filesystem
#   socat              joins two pty endpoints for link tests and demos (the console cable)
#   nodejs npm         run the meter code's checks: pyright against micropython-unix-stubs and
#                      MicroPython's WebAssembly port (tools/setup-micropython.sh)
#   etcd-server        the fleet's ordering (etcd 3.4); etcd-client (etcdctl) for diagnostics
#   rauc squashfs-tools  signed A/B update bundles (edgekey image build, edgekey flash install)
#   qemu-system-arm kmod cpio  the system-mode board (edgekey board build|boot): the armmp
#                      kernel's module index (depmod) and the initramfs archive
set -euo pipefail
need=()
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v qemu-arm-static >/dev/null || need+=(qemu-user-static)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v socat >/dev/null || need+=(socat)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v rauc >/dev/null || need+=(rauc)
command -v mksquashfs >/dev/null || need+=(squashfs-tools)
command -v dbus-daemon >/dev/null || need+=(dbus)
command -v losetup >/dev/null || need+=(mount)
command -v qemu-system-arm >/dev/null || need+=(qemu-system-arm)
command -v depmod >/dev/null || need+=(kmod)
command -v cpio >/dev/null || need+=(cpio)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-host: missing Debian packages: ${need[*]}; run 'sudo apt-get install ${need[*]}'" >&2
    exit 1
fi
echo "setup-host: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
