"""``edgekey provision``: a fleet made on the desk, then amended as a utility amends it.

No process is started. Checked: ``new`` makes what a fleet needs (signed
provisioning, CA and certificates for terminals, etcd members and the
station, images holding the provisioning); ``add`` and ``retire`` give newer
files that a running terminal would take (``check_update`` against the one
before) and that authorise exactly the change made; the new terminal's
image holds the new file; what ``add`` refuses it refuses clearly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleetprobe import edgekey

from agent import provisioning as prov
from agent.ledger.identity import TerminalIdentity
from agent.ledger.tx import TxBuilder
from agent.net.pki import common_name
from hal.blockdev import FileBlockDevice, open_partition
from hal.board import board_path, load_board
from tools.provision_cmd import derive

pytestmark = pytest.mark.host_only


def _provisioning(d: Path) -> prov.Provisioning:
    trusted = bytes.fromhex((d / "utility.pub").read_text().strip())
    return prov.verify((d / "provisioning.json").read_bytes(), trusted)


def test_new_then_add_and_retire_give_amendments_a_running_terminal_takes(tmp_path: Path):
    d = tmp_path / "pf"
    r = edgekey("provision", "new", "--dir", str(d), "--terminals", "3", "--meters", "6",
                "--seed", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    first = _provisioning(d)
    assert [t.terminal_id for t in first.terminals] == ["ecd-00", "ecd-01", "ecd-02"]
    assert first.network is not None and len(first.network.members) == 3
    for name in ("ca", "ecd-00", "ecd-02", "m0", "m2", "station"):
        assert (d / "tls" / f"{name}.crt").exists(), name
    assert common_name((d / "tls" / "station.crt").read_bytes()) == "station"
    fleet = json.loads((d / "fleet.json").read_text())
    assert "options" not in fleet  # provisioned, never started: fleet up starts it
    assert edgekey("provision", "new", "--dir", str(d)).returncode == 2  # never over a fleet

    r = edgekey("provision", "add", "--dir", str(d), "--etcd-member")
    assert r.returncode == 0 and "ecd-03: provisioned" in r.stdout, r.stdout + r.stderr
    second = _provisioning(d)
    prov.check_update(first, second)
    assert second.network is not None and second.network.members["ecd-03"]["name"] == "m3"
    assert len(second.network.etcd) == 4 and "ecd-03" in second.network.peers
    new_key = TerminalIdentity.from_seed("ecd-03", derive(5, "identity ecd-03")).public_bytes()
    builder = TxBuilder(TerminalIdentity.from_seed("ecd-00", derive(5, "identity ecd-00")))
    assert second.authorises(builder.add_terminal("ecd-03", new_key))
    assert not first.authorises(builder.add_terminal("ecd-03", new_key))
    board = load_board(board_path("host"))
    with FileBlockDevice(d / "ecd-03.img", board.flash.erase_block_bytes) as dev:
        raw, _sealed = prov.load(open_partition(dev, board.flash, "config"))
    assert raw == (d / "provisioning.json").read_bytes()
    entry = json.loads((d / "fleet.json").read_text())["terminals"][-1]
    assert entry["id"] == "ecd-03" and entry["meters"] == 0 and entry["etcd"]["name"] == "m3"

    r = edgekey("provision", "retire", "--dir", str(d), "ecd-01")
    assert r.returncode == 0, r.stdout + r.stderr
    third = _provisioning(d)
    prov.check_update(second, third)
    assert third.retired == {"ecd-01"}
    pub = TerminalIdentity.from_seed("ecd-01", derive(5, "identity ecd-01")).public_bytes()
    assert third.authorises(builder.retire_terminal("ecd-01", pub))
    assert not second.authorises(builder.retire_terminal("ecd-01", pub))
    r = edgekey("provision", "retire", "--dir", str(d), "ecd-09")
    assert r.returncode != 0 and "no terminal 'ecd-09'" in r.stderr


def test_add_refuses_a_fleet_of_one(tmp_path: Path):
    d = tmp_path / "solo"
    assert edgekey("provision", "new", "--dir", str(d), "--meters", "2").returncode == 0
    r = edgekey("provision", "add", "--dir", str(d))
    assert r.returncode != 0 and "no network to join" in r.stderr
