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

# With no arguments, tests/ is cut into EDGEKEY_ARM_SHARDS shards (default: the CPU
# count, at most 4) run side by side, each its own emulated pytest: qemu-user runs one
# guest thread at a time and an emulated process cannot start ARM children (no binfmt),
# so pytest-xdist cannot spread the tier. Files go to shards by size, largest first, each
# to the lightest shard. Each shard's output is printed whole when it ends.
shards=${EDGEKEY_ARM_SHARDS:-$(nproc)}
[ "$shards" -gt 4 ] && shards=4
status=0
if [ $# -gt 0 ] || [ "$shards" -le 1 ]; then
    timeout --foreground -k 30 "${EDGEKEY_ARM_TIMEOUT:-3600}" \
        "${arm_python[@]}" -m pytest -q -p no:cacheprovider --basetemp="$scratch/pytest" \
        -m "not host_only" "$@" || status=$?
else
    mapfile -t groups < <(ls -S tests/test_*.py | awk -v n="$shards" '
        { best = 0; for (i = 1; i < n; i++) if (load[i] < load[best]) best = i
          cmd = "stat -c %s " $0; cmd | getline size; close(cmd)
          load[best] += size; files[best] = files[best] " " $0 }
        END { for (i = 0; i < n; i++) print files[i] }')
    pids=()
    for i in "${!groups[@]}"; do
        # shellcheck disable=SC2086  # the group is a list of file names without spaces
        timeout --foreground -k 30 "${EDGEKEY_ARM_TIMEOUT:-3600}" \
            "${arm_python[@]}" -m pytest -q -p no:cacheprovider \
            --basetemp="$scratch/pytest-$i" -m "not host_only" ${groups[$i]} \
            > "$scratch/shard-$i.log" 2>&1 &
        pids+=($!)
    done
    collected=0
    for i in "${!pids[@]}"; do
        rc=0
        wait "${pids[$i]}" || rc=$?
        echo "--- ARM shard $((i + 1))/${#pids[@]} (exit $rc) ---"
        cat "$scratch/shard-$i.log"
        case $rc in
            0) collected=1 ;;
            5) ;;  # a shard of host_only files only: no tests for ARM there
            *) [ "$status" -eq 0 ] && status=$rc ;;
        esac
    done
    [ "$status" -eq 0 ] && [ "$collected" -eq 0 ] && status=5
fi

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
