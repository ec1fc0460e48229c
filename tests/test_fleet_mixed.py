"""A mixed fleet: one terminal's agent on emulated ARM among host ones, on etcd, as one ledger.

Run with ``--target qemu`` (``make test-agent-qemu``, after the ARM tier built the root
filesystem): ``fleet up --arm ecd-02`` starts ecd-02's agent as Debian's armhf python3
under qemu-arm-static. What must hold: it is the emulated interpreter; every meter
registers, ecd-02's too, through the endorsements of both kinds of terminal; the ARM
terminal's RSS stays far inside the board's 512 MB; all chains end at one digest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fleetprobe import acked, console_json, consoles, converged, down, edgekey, wait

from tools.console_client import ConsoleClient

pytestmark = pytest.mark.host_only


def test_an_arm_terminal_among_host_ones_keeps_one_ledger(tmp_path: Path, pytestconfig,
                                                           request) -> None:
    if pytestconfig.getoption("--target") != "qemu":
        pytest.skip("the mixed fleet runs with --target qemu (make test-agent-qemu)")
    request.getfixturevalue("agent_python")  # the board's 512 MB around the ARM agent
    d = tmp_path / "fx"
    fleet: dict = {}
    try:
        r = edgekey("fleet", "up", "--terminals", "3", "--meters", "15", "--dir", str(d),
                    "--arm", "ecd-02", "--reading-every", "0", "--rotate-every", "4",
                    "--start-spread", "1", timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        fleet = json.loads((d / "fleet.json").read_text())
        arm = next(t for t in fleet["terminals"] if t["id"] == "ecd-02")
        pid = arm["processes"]["agent"]["pid"]
        assert os.readlink(f"/proc/{pid}/exe").endswith("qemu-arm-static")
        with open(f"/proc/{pid}/cgroup") as f:
            memory = next(x.split(":", 2)[2].strip() for x in f if x.split(":")[1] == "memory")
        if "edgekey-arm-" in memory:  # where memory cgroups exist, the limit is the board's
            limit = Path(f"/sys/fs/cgroup/memory{memory}/memory.limit_in_bytes")
            assert int(limit.read_text()) == 512 * 2**20
        wait(lambda: len(acked(d)) == 15, 120, "every meter registered, ecd-02's too")
        with ConsoleClient(consoles(fleet)["ecd-02"], timeout=30) as c:
            mem = console_json(c, "mem")
            assert mem["rss_bytes"] < 512 * 2**20 // 4, mem  # far inside the board's RAM
            assert console_json(c, "status")["synced"] is True
        converged(fleet, d, "ecd-02")
    finally:
        down(d, fleet)
