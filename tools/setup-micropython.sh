#!/usr/bin/env bash
# Install the tools the MicroPython checks of the emulated meter need
# (tests/test_meter_micropython.py), idempotently, under one cache folder:
#
#   ${EDGEKEY_CACHE:-$HOME/.cache/edgekey}/micropython/
#     node_modules/   npm: pyright (node-based; the PyPI wrapper may download node)
#                     and @micropython/micropython-webassembly-pyscript (real
#                     MicroPython compiled to WebAssembly, run under Node)
#     stubs-venv/     micropython-unix-stubs: loose top-level .pyi files
#                     (time.pyi, hashlib.pyi, ...), so never in the project's venv
#     pyrightconfig.json  pyright against the stubs alone, for a check by hand:
#                     node_modules/.bin/pyright -p pyrightconfig.json emulator/meter/meter.py
#     .installed      stamp naming the pinned versions; a changed pin reinstalls
#
# Needs node and npm (Debian: nodejs npm) and python3 -m venv. Prints the
# folder on stdout when done.
set -euo pipefail

PYRIGHT_VERSION=1.1.414
MICROPYTHON_VERSION=1.27.0
UNIX_STUBS_VERSION=1.29.0.post1
STDLIB_STUBS_VERSION=1.29.0.post2

dest=${EDGEKEY_CACHE:-$HOME/.cache/edgekey}/micropython
stamp=$dest/.installed
want="pyright $PYRIGHT_VERSION micropython $MICROPYTHON_VERSION"
want+=" micropython-unix-stubs $UNIX_STUBS_VERSION micropython-stdlib-stubs $STDLIB_STUBS_VERSION"

ready() {
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && [ -x "$dest/node_modules/.bin/pyright" ] && [ -x "$dest/stubs-venv/bin/python" ] \
        && [ -f "$dest/pyrightconfig.json" ]
}
if ready; then
    echo "$dest"
    exit 0
fi

for tool in node npm python3; do
    command -v "$tool" >/dev/null || {
        echo "setup-micropython: $tool not found (Debian: apt-get install nodejs npm python3-venv)" >&2
        exit 1
    }
done

mkdir -p "$dest"
exec 9>"$dest/.lock"
flock 9  # two test runs setting up at once would interleave npm installs
if ready; then  # another run finished the install while this one waited
    echo "$dest"
    exit 0
fi
rm -f "$stamp"
echo "setup-micropython: installing $want into $dest" >&2

cd "$dest"
[ -f package.json ] || printf '{"name": "edgekey-micropython-tools", "private": true}\n' >package.json
npm install --no-audit --no-fund --loglevel=error --save-exact \
    "pyright@$PYRIGHT_VERSION" \
    "@micropython/micropython-webassembly-pyscript@$MICROPYTHON_VERSION" >&2

rm -rf stubs-venv
python3 -m venv stubs-venv
stubs-venv/bin/python -m pip install -q --disable-pip-version-check \
    "micropython-unix-stubs==$UNIX_STUBS_VERSION" \
    "micropython-stdlib-stubs==$STDLIB_STUBS_VERSION" >&2

# pyright against the stubs only: typeshedPath replaces CPython's standard library
# with MicroPython's, and the venv (not the interpreter on PATH) gives the search path.
site=$(stubs-venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cat >pyrightconfig.json <<JSON
{
  "typeshedPath": "$site",
  "venvPath": "$dest",
  "venv": "stubs-venv",
  "pythonVersion": "3.11",
  "typeCheckingMode": "standard",
  "reportMissingModuleSource": "none"
}
JSON

echo "$want" >"$stamp"
echo "$dest"
