"""A terminal kept down until etcd no longer has its blocks, then restarted: catch-up by checkpoint.

Five terminals on etcd, a checkpoint every 20 blocks, the meters rotating.
Injected: ecd-04 (no etcd member) is power-cut and kept down until the
proposer has deleted the blocks after its tip from etcd and compacted etcd
(checked directly in etcd); then it is started again.

What must survive: ecd-04 finds the gap, takes a peer's snapshot checked
against the newest checkpoint, adopts it and reboots (its log says so), and
follows the fleet again; once the meters stop all five chains have one
full-state digest and every acknowledged key version is on the chain.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleetprobe import (
    acked,
    alive,
    console_json,
    consoles,
    converged,
    down,
    edgekey,
    etcd_dropped_below,
    heights,
    wait,
)

from tools.console_client import ConsoleClient, ConsoleTimeout

pytestmark = pytest.mark.host_only

EVERY = 20


def test_a_terminal_behind_the_retained_blocks_catches_up_from_a_checked_snapshot(
        tmp_path: Path):
    d = tmp_path / "fc"
    fleet: dict = {}
    try:
        r = edgekey("fleet", "up", "--terminals", "5", "--meters", "20", "--dir", str(d),
                    "--checkpoint-every", str(EVERY), "--reading-every", "0",
                    "--rotate-every", "1", "--start-spread", "1")
        assert r.returncode == 0, r.stdout + r.stderr
        fleet = json.loads((d / "fleet.json").read_text())
        wait(lambda: len(acked(d)) >= 16, 60, "the meters registered")
        assert edgekey("fleet", "kill", "--dir", str(d), "ecd-04").returncode == 0
        down_at = max(h for t, h in heights_up(fleet).items())
        wait(lambda: etcd_dropped_below(d, fleet, down_at + 2), 90,
             "etcd to drop the blocks after ecd-04's tip")
        r = edgekey("fleet", "start", "--dir", str(d), "ecd-04")
        assert r.returncode == 0, r.stdout + r.stderr
        fleet = json.loads((d / "fleet.json").read_text())
        log = Path(next(t for t in fleet["terminals"] if t["id"] == "ecd-04")["log"])
        wait(lambda: "agent.caught_up_by_snapshot" in log.read_text(), 60,
             "ecd-04 to adopt a snapshot")

        def current() -> bool:  # the agent reboots after adopting: its console comes back
            try:
                with ConsoleClient(consoles(fleet)["ecd-04"], timeout=5) as c:
                    return bool(console_json(c, "status")["synced"])
            except (ConsoleTimeout, OSError):
                return False

        wait(current, 60, "ecd-04 to be current")
        converged(fleet, d, "ecd-04")
    finally:
        fleet = down(d, fleet)


def heights_up(fleet: dict) -> dict[str, int]:
    """Heights of the terminals whose agent is running."""
    up = {t["id"] for t in fleet["terminals"] if alive(t["processes"]["agent"].get("pid"))}
    return {t: h for t, h in heights({**fleet, "terminals": [
        x for x in fleet["terminals"] if x["id"] in up]}).items()}
