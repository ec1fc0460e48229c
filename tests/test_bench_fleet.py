"""``edgekey bench fleet`` on a tiny fleet: it completes, its JSON holds what the table shows,
every answered rotation is ACKed, the catch-up reaches the last height, and no process it
started outlives it, also when a phase fails."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tools import bench_fleet
from tools.cli import main

pytestmark = pytest.mark.host_only

TINY = ["--terminals", "3", "--meters", "30", "--etcd-members", "1", "--rates", "20",
        "--max-rate", "20", "--seconds", "3", "--catchup-blocks", "50", "--seed", "5",
        "--no-progress"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _pids(processes: dict[str, Any]) -> list[int]:
    agents = [p for pids in processes["agents"].values() for p in pids]
    return agents + list(processes["etcd"].values())


def test_a_tiny_fleet_run_completes_and_leaves_nothing_behind(tmp_path: Path, capsys):
    out = tmp_path / "fleet.json"
    assert main(["bench", "fleet", *TINY, "--work", str(tmp_path / "fleet"),
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "paper (chain-building time)" in table and "catch-up of 50 missed blocks" in table
    r = json.loads(out.read_text())
    assert {"parameters", "machine", "fleet", "setup", "idle", "rates", "saturation", "catchup",
            "paper", "processes"} <= set(r)
    assert r["machine"]["cpus"] == os.cpu_count()
    assert r["paper"]["table1_chain_building_ms"]["50"] == 61.23
    assert r["setup"]["registration"]["registered"] == 30

    (row,) = r["rates"]
    assert row["offered_per_s"] == 20 and row["paper_chain_building_ms"] is None
    assert row["committed"] > 0 and row["committed_per_s"] > 0
    assert set(row["naks"]) <= {"BUSY"} and row["bad_acks"] == 0
    answered = row["sent"] - row["timeouts"]
    assert row["committed"] == answered - row["naks"].get("BUSY", 0)
    assert row["arrivals"] == row["sent"] + row["skipped_busy"]
    for key in ("p50_ms", "p99_ms", "mean_ms"):
        assert row["latency"][key] > 0
    assert row["cpu"]["agents_ms_per_op"] > 0 and row["bytes_out"]["per_op"] > 0
    assert set(row["cpu"]["per_terminal_s"]) == {"ecd-00", "ecd-01", "ecd-02"}
    assert row["blocks"] > 0 and row["txs_per_block"] >= 1
    assert row["proposer"] in {"ecd-00", "ecd-01", "ecd-02"}
    assert row["bytes_out"]["proposer_per_op"] > 0 and row["cpu"]["proposer_ms_per_op"] > 0

    c = r["catchup"]
    assert c["to_height"] == c["from_height"] + 50
    assert c["restarted"]["height"] >= c["to_height"]
    assert c["restarted"]["longest_console_answer_s"] > 0
    assert c["restarted"]["terminal"] != "ecd-00" and c["restarted"]["missed"] == 50
    assert len(r["processes"]["agents"][c["restarted"]["terminal"]]) == 2  # started again
    assert set(c["running"]["applied_s"]) == {"ecd-00", "ecd-01", "ecd-02"} - {
        c["restarted"]["terminal"]}

    pids = _pids(r["processes"])
    assert len(pids) == 3 + 1 + 1
    assert not [p for p in pids if _alive(p)]


def test_a_failing_phase_still_stops_every_process(tmp_path: Path, monkeypatch):
    seen: dict[str, Any] = {}

    def broken(fleet: bench_fleet.Fleet) -> dict[str, Any]:
        seen.update(fleet.processes())
        raise RuntimeError("injected")

    monkeypatch.setattr(bench_fleet, "_idle", broken)
    with pytest.raises(RuntimeError, match="injected"):
        bench_fleet.run(terminals=2, meters=10, etcd_members=1, rates=(20.0,), seconds=1,
                        catchup_blocks=0, progress=False, work=str(tmp_path / "fleet"))
    pids = _pids(seen)
    assert len(pids) == 3
    assert not [p for p in pids if _alive(p)]
