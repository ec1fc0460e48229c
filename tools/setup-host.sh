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
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-host: missing Debian packages: ${need[*]}; run 'sudo apt-get install ${need[*]}'" >&2
    exit 1
fi
echo "setup-host: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
