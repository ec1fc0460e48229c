"""The demo's fleet on etcd with the master station, as ``make demo --quick`` runs it.

``tools.demo.network_step`` at 5 terminals and 40 meters: every meter
registered; the station's keys through the home and through another
terminal with their proofs checked; readings opened end to end; a revoke
redirected to the home; three terminals killed and restarted; one digest on
every chain. It raises on any failure and leaves no process behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleetprobe import alive, all_pids

from tools.demo import network_step

pytestmark = pytest.mark.host_only


def test_the_demos_network_step_runs_and_stops_everything(tmp_path: Path, capsys):
    try:
        network_step(tmp_path, "host", terminals=5, meters=40)
    finally:
        out = capsys.readouterr().out
        fleet = json.loads((tmp_path / "network" / "fleet.json").read_text())
        assert not [p for p in all_pids(fleet) if alive(p)]
    assert out.count("proof checked") == 6, out[-3000:]
    assert "opened end to end with the meter's key v" in out and " BAD" not in out, out[-3000:]
    assert "its key is now REVOKED" in out and "one full-state digest" in out, out[-3000:]
