"""A partition made by the test itself: two of five terminals cut off the WAN, then healed.

``edgekey fleet up --netns`` puts each terminal (agent and etcd member) in
its own network namespace on one bridge; ``fleet partition`` takes the
veth links of ecd-02 (which hosts an etcd voting member) and ecd-04 down.
Injected: the cut, for about six seconds, while every meter keeps rotating.

What must hold: the minority side commits nothing (its heights never pass
the highest height ordered before the cut, and while they stay where they
were no meter homed there hears an acknowledgement) while the
majority side keeps committing; after ``fleet heal`` the minority catches
up, and once the meters stop all five chains have one full-state digest and
every acknowledged key version is on the chain. ``fleet down`` removes the
namespaces. Skipped where namespaces cannot be made (not root).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from fleetprobe import (
    acked,
    console_json,
    consoles,
    converged,
    down,
    edgekey,
    heights,
    wait,
)

from emulator.netns import available
from tools.console_client import ConsoleClient

pytestmark = [pytest.mark.host_only,
              pytest.mark.skipif(not available(), reason="network namespaces need root")]

MINORITY = ("ecd-02", "ecd-04")


def test_the_minority_side_commits_nothing_and_everything_converges_after_healing(
        tmp_path: Path):
    d = tmp_path / "fp"
    fleet: dict = {}
    try:
        r = edgekey("fleet", "up", "--terminals", "5", "--meters", "20", "--dir", str(d),
                    "--netns", "--reading-every", "0", "--rotate-every", "1.5",
                    "--start-spread", "1")
        assert r.returncode == 0, r.stdout + r.stderr
        fleet = json.loads((d / "fleet.json").read_text())
        wait(lambda: len(acked(d)) == 20, 60, "every meter registered")
        assert edgekey("fleet", "partition", "--dir", str(d), *MINORITY).returncode == 0
        time.sleep(1.0)  # what was already committed may still be acknowledged
        cut_heights = heights(fleet)
        cut_acked = acked(d, MINORITY)
        time.sleep(6.0)
        during = heights(fleet)
        # Survives: nothing committed on the minority side. A minority terminal that lagged
        # at the cut may still apply blocks the majority had ordered before it (its etcd
        # member or its watch had them), never one above the highest height at the cut.
        ordered_before = max(cut_heights.values())
        for t in MINORITY:
            assert cut_heights[t] <= during[t] <= ordered_before, (t, cut_heights, during)
        if all(during[t] == cut_heights[t] for t in MINORITY):
            assert acked(d, MINORITY) == cut_acked  # and no meter there heard a new ACK
        majority = [t for t in during if t not in MINORITY]
        assert min(during[t] - cut_heights[t] for t in majority) > 3, (cut_heights, during)
        with ConsoleClient(consoles(fleet)[MINORITY[0]]) as c:
            assert console_json(c, "status")["synced"] is False  # and it says so
        assert edgekey("fleet", "heal", "--dir", str(d), *MINORITY).returncode == 0
        wait(lambda: min(heights(fleet)[t] for t in MINORITY) > max(during.values()), 60,
             "the minority to catch up")
        converged(fleet, d, "ecd-00")
    finally:
        fleet = down(d, fleet)
    tag = fleet["netns"]["tag"]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in left
