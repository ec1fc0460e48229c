#!/usr/bin/env bash
# The emulated-ARM test tier: the project's tests, from this checkout's source,
# run by Debian bookworm's armhf python3 under qemu-arm-static (user mode).
#
#   emulator/qemu/run-arm-tests.sh [pytest args...]     # default: all of tests/
#
# Tests marked host_only (desk tools, subprocesses, the host kernel) are
# deselected. EDGEKEY_EMULATED=qemu-user tells tests/conftest.py to use the
# smaller hypothesis profile. EDGEKEY_ARM_TIMEOUT (seconds, default 3600)
# bounds the whole pytest run. Exit status is pytest's, except that "no tests
# collected" (5) is reported and turned into 1.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
checkout=$(cd "$here/../.." && pwd -P)

scratch=$checkout/.cache/arm-tmp
rm -rf "$scratch"
arm_python=(env EDGEKEY_ARM_SCRATCH="$scratch" bash "$here/arm-python.sh")

cd "$checkout"
timeout --foreground -k 10 300 "${arm_python[@]}" -c '
import platform, sys
from importlib.metadata import version
print("emulated platform: %s, python %s, numpy %s, cryptography %s, pyserial %s, pytest %s, hypothesis %s"
      % (platform.machine(), platform.python_version(), version("numpy"), version("cryptography"),
         version("pyserial"), version("pytest"), version("hypothesis")))
' || { echo "run-arm-tests: the emulated python3 did not start" >&2; exit 1; }

status=0
timeout --foreground -k 30 "${EDGEKEY_ARM_TIMEOUT:-3600}" \
    "${arm_python[@]}" -m pytest -q -p no:cacheprovider --basetemp="$scratch/pytest" \
    -m "not host_only" "$@" || status=$?

case $status in
    5)  echo "run-arm-tests: FAILED: pytest collected no tests under emulated ARM" \
             "(args: ${*:-tests/ by default}); an empty ARM tier is not a pass" >&2
        exit 1 ;;
    124) echo "run-arm-tests: FAILED: timed out after ${EDGEKEY_ARM_TIMEOUT:-3600} s" \
              "(raise EDGEKEY_ARM_TIMEOUT)" >&2 ;;
    137) echo "run-arm-tests: FAILED: pytest was killed (SIGKILL: out of memory," \
              "or the timeout's kill after ${EDGEKEY_ARM_TIMEOUT:-3600} s)" >&2 ;;
esac
exit "$status"
