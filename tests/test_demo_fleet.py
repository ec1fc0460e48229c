"""The demo's last step, the running agent, as ``make demo`` runs it: it must keep working.

``tools.demo.fleet_step`` builds its ``fleet up`` from the command line's own
parser, starts a fleet of one with 20 emulated meters, talks to its
console, kills the agent, restarts it and checks every meter's key; it
raises on any failure and leaves no process behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleetprobe import alive, all_pids

from tools.demo import fleet_step

pytestmark = pytest.mark.host_only


def test_the_demos_fleet_step_runs_and_stops_everything(tmp_path: Path, capsys):
    fleet_step(tmp_path, "host")
    out = capsys.readouterr().out
    assert "ledger verify: OK" in out and "20/20 meters at or past" in out, out[-3000:]
    fleet = json.loads((tmp_path / "fleet" / "fleet.json").read_text())
    assert not [p for p in all_pids(fleet) if alive(p)]
