"""A fleet of one from the command line: up, console, meters at work, kill -9, restart, down.

The whole path a user takes: ``edgekey fleet up --terminals 1 --meters 20``
provisions and starts the agent, the PLC channel, the console cable and the
emulated meters; every console command answers; the meters register, rotate
and report readings; the agent is killed with SIGKILL and ``fleet up``
restarts it; every operation a meter had acknowledged is still on the
chain with its key in the store; ``fleet down`` leaves no process behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fleetprobe import ROOT, alive, edgekey, wait

from tools.console_client import ConsoleClient

pytestmark = pytest.mark.host_only

COMMANDS = ["help", "status", "board", "keys list", "ledger height", "ledger tail -n 3",
            "ledger verify", "ledger block 0", "meters", "place", "route", "flash", "mem",
            "log -n 5"]


def _pids(fleet: dict) -> list[int]:
    return [p["pid"] for t in fleet["terminals"] for p in t["processes"].values()]


def _acked(directory: Path) -> dict[str, int]:
    """Each meter's newest acknowledged key version, from the emulated meters' state files."""
    out = {}
    for f in sorted((directory / "ecd-00.meter-state").glob("*.json")):
        state = json.loads(f.read_text())
        if state.get("key_version"):
            out[f.stem] = int(state["key_version"])
    return out


def test_fleet_of_one_up_console_meters_kill_restart_down(tmp_path: Path):
    d = tmp_path / "fleet"
    fleet: dict = {}
    try:
        r = edgekey("fleet", "up", "--terminals", "1", "--meters", "20", "--dir", str(d),
                    "--reading-every", "1", "--rotate-every", "2", "--start-spread", "1")
        assert r.returncode == 0, r.stdout + r.stderr
        fleet = json.loads((d / "fleet.json").read_text())
        t = fleet["terminals"][0]
        assert {"id", "pid", "console", "flash", "log"} <= set(t)
        assert edgekey("fleet", "status", "--dir", str(d)).returncode == 0
        with ConsoleClient(t["console"]) as c:
            for cmd in COMMANDS:
                res = c.run(cmd)
                assert res.ok, (cmd, res)
            assert not c.run("keys get zz").ok
            assert c.run("route").body.startswith("no other terminals")
            # the meters register, rotate and report readings
            wait(lambda: len(_acked(d)) == 20, 60, "20 registrations")
            wait(lambda: sum(_acked(d).values()) > 25, 60, "rotations")
            counts = json.loads(c.run("meters --json").body.splitlines()[-1])
            assert sum(m["readings"] for m in counts["meters"].values()) > 0
        r = subprocess.run([sys.executable, "-m", "tools.cli", "console", t["console"], "-c",
                            "ledger height", "-c", "bogus"], cwd=ROOT, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 1  # the last command's status
        # Injected: SIGKILL of the agent while the meters keep rotating.
        os.kill(t["pid"], 9)
        wait(lambda: not alive(t["pid"]), 10, "the agent to die")
        before = _acked(d)
        assert edgekey("fleet", "status", "--dir", str(d)).returncode == 1
        r = edgekey("fleet", "up", "--dir", str(d))
        assert r.returncode == 0, r.stdout + r.stderr
        fleet = json.loads((d / "fleet.json").read_text())
        t = fleet["terminals"][0]
        with ConsoleClient(t["console"]) as c:
            assert c.run("ledger verify").ok
            for meter, version in before.items():
                got = json.loads(c.run(f"keys get {meter} --json").body.splitlines()[-1])
                # Survives: every acknowledged version, with its key in the store.
                assert got["key_version"] >= version and got["key_held_here"], (meter, got)
        assert edgekey("fleet", "status", "--dir", str(d)).returncode == 0
    finally:
        if (d / "fleet.json").exists():
            fleet = json.loads((d / "fleet.json").read_text())
            edgekey("fleet", "down", "--dir", str(d))
    assert fleet and not [p for p in _pids(fleet) if alive(p)]
