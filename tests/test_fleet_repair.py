"""A terminal whose ledger partition has a damaged block is repaired from its fleet.

Three terminals on etcd, fifteen meters registering and rotating. Injected:
ecd-01 is power-cut (``fleet kill``) and one bit of an early block's head
record is flipped in its flash image (the ledger partition found through the
board's flash map, the record through the record log); then it is started
again. In the second test etcd has meanwhile dropped the blocks after the
damage (a checkpoint every few blocks), so they come back by snapshot.

What must hold: ecd-01 boots (no refusal, no ``--format``); its log and its
console's ``net`` say it repaired the ledger, the height kept and the records
given up; it never says it is current while its chain is below where the
fleet was; it catches up (from etcd, or by a peer's snapshot checked against
a checkpoint, and a reboot); once the meters stop, the three chains have one
full-state digest and every key version a meter was acknowledged for is on
the chain and held at its home. No process is left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleetprobe import (
    check_acked,
    console_json,
    consoles,
    converged,
    down,
    edgekey,
    etcd_dropped_below,
    heights,
    load,
    wait,
)

from agent.ledger.block import decode_head
from agent.ledger.chain import REC_HEAD, REC_SNAP_END
from hal.blockdev import FileBlockDevice, open_partition
from hal.board import board_path, load_board
from hal.recordlog import REC_HEADER, RecordLog
from tools.console_client import ConsoleClient, ConsoleError

pytestmark = pytest.mark.host_only

VICTIM = "ecd-01"
DAMAGED = 2  # the block whose head is flipped (from etcd): blocks 0..1 are kept
EVERY = 4  # a checkpoint every 4 blocks: etcd drops blocks soon after (by snapshot)


def _up(d: Path, *extra: str) -> dict:
    r = edgekey("fleet", "up", "--terminals", "3", "--meters", "15", "--dir", str(d),
                "--reading-every", "0", "--rotate-every", "3", "--start-spread", "1", *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    return load(d)


def _flip_block_head(fleet: dict, tid: str, height: int | None = None) -> int:
    """One bit of block ``height``'s head record in ``tid``'s flash image (the agent is
    down); None: the first block after the newest snapshot on it. Returns the height."""
    t = next(t for t in fleet["terminals"] if t["id"] == tid)
    fl = load_board(board_path(fleet["board"])).flash
    with FileBlockDevice(t["flash"], fl.erase_block_bytes) as dev:
        log = RecordLog(open_partition(dev, fl, "ledger"))
        found: dict[int, int] = {}  # height -> record id of its head
        for s, p in log.records():
            if p[:1] == bytes([REC_SNAP_END]):
                found.clear()
            elif p[:1] == bytes([REC_HEAD]):
                found[decode_head(p[1:])[0].height] = s
        height = min(found) if height is None else height
        seg, pos = log._locate(found[height])  # test-only peek at where a record sits
    offset = fl.partition("ledger").offset_bytes + seg.block * fl.erase_block_bytes + pos
    with open(t["flash"], "r+b") as f:
        f.seek(offset + REC_HEADER + 9)
        b = f.read(1)
        f.seek(offset + REC_HEADER + 9)
        f.write(bytes([b[0] ^ 0x01]))
    return height


def _heights(fleet: dict, ids: set[str]) -> dict[str, int]:
    """Heights of the terminals ``ids``; {} while a console is slow to answer."""
    some = {**fleet, "terminals": [t for t in fleet["terminals"] if t["id"] in ids]}
    try:
        return heights(some, timeout=20)
    except (ConsoleError, OSError, ValueError, AssertionError):
        return {}


def _fleet_height(fleet: dict) -> int:
    """Where the fleet is without the victim: a height the victim must reach to be current."""
    others = {t["id"] for t in fleet["terminals"]} - {VICTIM}
    found: list[dict[str, int]] = []
    wait(lambda: found.append(_heights(fleet, others)) or found[-1], 60,
         "the other consoles to answer")
    return max(found[-1].values())


def _status(url: str) -> dict | None:
    try:
        with ConsoleClient(url, timeout=5) as c:  # a console that does not answer is retried
            return console_json(c, "status")
    except (ConsoleError, OSError, ValueError, AssertionError):
        return None  # rebooting after a snapshot


def _events(log: Path, name: str) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == name:
            out.append(record)
    return out


def _start_repaired(d: Path, damaged: int, was_at: int, *, by_snapshot: bool) -> dict:
    """Start the victim again; it must repair, say so, catch up and converge."""
    r = edgekey("fleet", "start", "--dir", str(d), VICTIM)
    assert r.returncode == 0, r.stdout + r.stderr
    fleet = load(d)
    t = next(t for t in fleet["terminals"] if t["id"] == VICTIM)
    log = Path(t["log"])
    repaired = _events(log, "agent.ledger_repaired")
    assert len(repaired) == 1, log.read_text()[-3000:]
    assert repaired[0]["height"] == damaged - 1 and repaired[0]["records_lost"] >= 2, repaired
    url = consoles(fleet)[VICTIM]
    if not by_snapshot:  # after a snapshot's reboot the next boot has nothing to repair
        with ConsoleClient(url, timeout=10) as c:
            net = console_json(c, "net")["network"]
        assert net["ledger.repaired"] == 1, net
        assert net["ledger.repaired.height"] == damaged - 1, net
        assert net["ledger.repaired.records_lost"] >= 2, net

    def current() -> bool:  # never current while below where the fleet was
        st = _status(url)
        if st is not None and st["synced"]:
            assert st["height"] >= was_at, st
        return bool(st and st["synced"])

    if by_snapshot:
        wait(lambda: _events(log, "agent.caught_up_by_snapshot"), 60,
             f"{VICTIM} to adopt a snapshot")
    wait(current, 60, f"{VICTIM} to be current")
    if not by_snapshot:
        assert not _events(log, "agent.caught_up_by_snapshot")  # etcd had every block
    converged(fleet, d, VICTIM)
    found = check_acked(fleet, d)
    assert found.ok and found.meters >= 10, found
    return fleet


def test_a_damaged_block_is_fetched_again_from_etcd(tmp_path: Path):
    d = tmp_path / "fr"
    fleet: dict = {}
    try:
        fleet = _up(d)
        wait(lambda: _heights(fleet, {VICTIM}).get(VICTIM, 0) > DAMAGED + 3, 60,
             "blocks after the one to damage")
        assert edgekey("fleet", "kill", "--dir", str(d), VICTIM).returncode == 0
        was_at = _fleet_height(fleet)
        damaged = _flip_block_head(fleet, VICTIM, DAMAGED)
        fleet = _start_repaired(d, damaged, was_at, by_snapshot=False)
    finally:
        fleet = down(d, fleet)


def test_a_damaged_block_etcd_no_longer_has_comes_back_by_snapshot(tmp_path: Path):
    d = tmp_path / "fs"
    fleet: dict = {}
    try:
        fleet = _up(d, "--checkpoint-every", str(EVERY))
        wait(lambda: _heights(fleet, {VICTIM}).get(VICTIM, 0) > 2 * EVERY, 60,
             "blocks on the victim's flash after two checkpoints")
        assert edgekey("fleet", "kill", "--dir", str(d), VICTIM).returncode == 0
        was_at = _fleet_height(fleet)
        damaged = _flip_block_head(fleet, VICTIM)  # what a snapshot released stays released
        # the victim's etcd member went down with it: a read while the others elect a
        # leader is "not yet", not a failure
        wait(lambda: etcd_dropped_below(d, fleet, damaged + 1), 60,
             "etcd to drop the blocks after the damage")
        fleet = _start_repaired(d, damaged, was_at, by_snapshot=True)
    finally:
        fleet = down(d, fleet)

