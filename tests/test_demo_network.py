"""The demo's fleet on etcd with the master station, routing and the report, as ``--quick``.

``tools.demo.network_step`` at 5 terminals and 40 meters: every meter
registered; the station's keys through the home and through another
terminal with their proofs checked; readings opened end to end; a revoke
redirected to the home; 4 meters joining and 2 leaving; three terminals
killed and restarted; one digest on every chain. Then ``routing_step`` (the
greedy beside shortest paths, measured from traffic) and the report drawn
from the run's record. Each raises on any failure and leaves no process
behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleetprobe import alive, all_pids

from tools import demo_report
from tools.demo import network_step, routing_step

pytestmark = pytest.mark.host_only


def test_the_demos_fleet_routing_and_report_run_and_stop_everything(tmp_path: Path, capsys):
    run: dict = {"params": {"terminals": 5, "meters": 40, "quick": True}}
    try:
        network_step(tmp_path, "host", terminals=5, meters=40, run=run, joins=4, leaves=2)
    finally:
        out = capsys.readouterr().out
        fleet = json.loads((tmp_path / "network" / "fleet.json").read_text())
        assert not [p for p in all_pids(fleet) if alive(p)]
    assert out.count("proof checked") == 6, out[-3000:]
    assert "opened end to end with the meter's key v" in out and " BAD" not in out, out[-3000:]
    assert "its key is now REVOKED" in out and "one full-state digest" in out, out[-3000:]
    # the record: measured in this run
    assert run["joins"]["provisioned"] == 4 and sum(run["joins"]["answers"].values()) >= 4
    assert sum(1 for x in run["joins"]["left"] if x["revoked"]) == 2
    assert len(run["kills"]) == 3 and all("synced_s" in k for k in run["kills"])
    assert run["outcomes"]["committed"].get("register", 0) >= 44
    assert run["commits"] and all(c["latency_ms"] >= 0 for c in run["commits"])
    assert len(run["placement"]["terminals"]) == 5 and run["placement"]["links"]
    assert {r["terminal"] for r in run["resources"]} == {f"ecd-0{i}" for i in range(5)}

    routing_step(run, terminals=5, meters=40, rate=20.0, seconds=6.0)
    assert set(run["routing"]) == {"greedy", "shortest"}
    for method in run["routing"].values():
        assert method["links"] and method["load_balance_degree"] is not None
        assert method["commit_p50_ms"] > 0 and method["committed_per_s"] > 10
    run.pop("t0_wall", None)
    written = demo_report.render(run, tmp_path / "report")
    html = written["html"].read_text()
    for png in ("placement", "latency_timeline", "routing_links", "resources"):
        assert written[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"{png}.png" in html
    assert "paper" in html and written["md"].exists()
