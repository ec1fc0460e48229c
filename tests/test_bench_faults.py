"""``edgekey bench faults`` on a small fleet: a power cut and a terminal kept down until etcd
dropped its blocks; no acknowledged operation lost, one chain, a snapshot adopted, the JSON
and the table written, and no process of the fleet left running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import fault_schedule as fs
from tools.cli import main
from tools.fleet_probe import alive, all_pids, load, marked_pids

pytestmark = pytest.mark.host_only

IDS = [f"ecd-{i:02d}" for i in range(13)]
MEMBERS = {"ecd-00", "ecd-01", "ecd-02"}


def test_the_schedule_is_the_seeds_and_never_cuts_a_majority():
    faults, kept = fs.draw(IDS, MEMBERS, ops=10_000, power_cuts=3, etcd_kills=True,
                           kept_down=True, seed=4)
    again = fs.draw(IDS, MEMBERS, ops=10_000, power_cuts=3, etcd_kills=True, kept_down=True,
                    seed=4)
    assert [f.to_json() for f in faults] == [f.to_json() for f in again[0]]
    assert kept is not None and kept.planned[0] not in MEMBERS
    kinds = [f.kind for f in faults]
    assert sorted(kinds) == sorted([fs.POWER_CUT] * 3 + [fs.ETCD_LEADER, fs.ETCD_FOLLOWER])
    assert kinds.index(fs.ETCD_LEADER) < kinds.index(fs.ETCD_FOLLOWER)
    assert [f.at_ops for f in faults] == sorted(f.at_ops for f in faults)
    for seed in range(50):
        faults, kept = fs.draw(IDS, MEMBERS, ops=10_000, power_cuts=3, etcd_kills=True,
                               kept_down=True, seed=seed)
        assert kept is not None
        for f in faults:
            if f.kind == fs.POWER_CUT:
                assert 1 <= len(f.planned) <= fs.minority(13) == 6
                assert kept.planned[0] not in f.planned
                assert MEMBERS - set(f.planned)  # an etcd member stays up


def test_a_small_fleet_loses_no_acknowledged_operation(tmp_path: Path, capsys):
    d = tmp_path / "fleet"
    out = tmp_path / "faults.json"
    status = main(["bench", "faults", "--terminals", "5", "--meters", "25", "--ops", "400",
                   "--rotate-every", "0.5", "--checkpoint-every", "20", "--power-cuts", "1",
                   "--no-etcd-kills", "--seed", "3", "--dir", str(d), "--out", str(out)])
    table = capsys.readouterr().out
    try:
        r = json.loads(out.read_text())
        assert status == 0, r["failures"]
        assert r["failures"] == [] and "result" in table and "PASS" in table
        assert "catch-up by snapshot" in table and "acknowledged operations lost" in table
        assert r["acked_lost"] == 0 and r["ops"]["during_run"] >= 400
        assert r["digests"]["equal"] and len(set(r["heights"].values())) == 1
        kinds = [f["kind"] for f in r["schedule"]]
        assert sorted(kinds) == [fs.KEPT_DOWN, fs.POWER_CUT]
        assert all(f["recovered_s"] is not None for f in r["schedule"])
        c = r["snapshot_catchup"]
        assert c["adopted"] >= 1 and c["checkpoints_passed"] >= 2
        assert c["terminal"] not in r["fleet"]["etcd_members"]
    finally:
        assert not marked_pids(d)
        assert not [p for p in all_pids(load(d)) if alive(p)]
