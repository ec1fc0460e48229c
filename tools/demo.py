"""``edgekey demo``: one terminal's hardware layer and node core at work, end to end.

The HAL, the node core and the placement core, for real: the board file is
validated and the agent's RAM budget enforced; a flash image of the board's
size gets a ledger record log, a power cut is injected in the middle of a
write and the boot-time recovery scan shows that every committed record
survived; DL/T 698.45 frames cross the board's meter link (paced to the HPLC
rate) with garbage and a corrupted frame on the line; one terminal then runs
the key lifecycle on the same image through the node core, one of five
terminals endorsing each other's blocks (its chain in the ledger partition,
its keys encrypted in the keystore partition: register, rotate, export,
migrate, revoke, a snapshot, a reboot); the paper's 300-meter layout is
planned (Figures 4 and 5 beside the paper's variances) and meters then join
and leave through the terminal's re-homing core, which answers with the
migrations the ledger will have to confirm; last, the running agent: a
fleet of one (``edgekey fleet up``) with 20 emulated meters on a PLC
channel, its console, a kill -9 and the restart that loses nothing; then the
fleet on etcd with the master station (``network_step``), the greedy router
beside shortest paths over emulated WAN links (``routing_step``), and the
report of the run: ``OUT/report.html`` with its PNGs, ``report.md`` and the
record they are drawn from, ``run.json`` (tools/demo_record.py collects it,
tools/demo_report.py draws it).
"""

from __future__ import annotations

import hashlib
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.keystore.material import make_rotation_proof, new_key
from agent.keystore.transport import NotAuthorisedError, open_envelope, public_bytes
from agent.ledger.chain import scan_newest_record
from agent.ledger.query import Answer, QueryResult
from agent.node import events as ev
from agent.node.actions import Acknowledge, Refuse
from agent.terminal import board_partitions
from emulator.flash import PowerCut, PowerCutDevice
from emulator.localfleet import LocalFleet
from emulator.meter_keys import MeterKeys
from emulator.provision import provision
from hal.blockdev import FileBlockDevice, open_partition
from hal.board import board_path, load_board
from hal.devicekey import load_device_key
from hal.dlt698 import Control, Frame, FunctionCode, ServerAddress, encode_frame
from hal.link import open_link
from hal.ram import RamBudget
from hal.recordlog import RecordLog
from tools import demo_record
from tools.flash_tool import create, info_lines
from tools.report import write_json

RECORDS = 2000
RECORD_BYTES = 256
FRAMES = 40
APDU_BYTES = 360  # the paper's meter packet size
TERMINALS = 5
METERS = 12
MASTER_ID = b"master-station"


def _say(step: str) -> None:
    print(f"\n== {step}")


def _record(i: int) -> bytes:
    """A deterministic 256-byte record whose contents can be checked after recovery."""
    return hashlib.sha256(i.to_bytes(8, "little")).digest() * (RECORD_BYTES // 32)


def flash_step(image: Path, board_name: str) -> None:
    board = load_board(board_path(board_name))
    if image.exists():
        image.unlink()
    create(image, board)
    fl = board.flash
    with FileBlockDevice(image, fl.erase_block_bytes) as dev:
        ledger = open_partition(dev, fl, "ledger")
        log = RecordLog(ledger)
        print(f"ledger partition: {ledger.block_count} erase blocks of "
              f"{fl.erase_block_kib} KiB; fresh image, {log.report.dirty_segments} to erase")
        t0 = time.perf_counter()
        for start in range(0, RECORDS, 100):
            log.append_many(_record(i) for i in range(start, start + 100))
        dt = time.perf_counter() - t0
        print(f"appended {RECORDS} records of {RECORD_BYTES} bytes in {RECORDS // 100} group "
              f"commits: {dt * 1e3:.0f} ms")
        cut = PowerCutDevice(ledger, budget=150)
        try:
            RecordLog(cut).append(b"this write loses power after 150 bytes" * 7)
        except PowerCut as exc:
            print(f"injected: {exc} while appending record {RECORDS + 1}")
    with FileBlockDevice(image, fl.erase_block_bytes) as dev:
        t0 = time.perf_counter()
        log = RecordLog(open_partition(dev, fl, "ledger"))
        dt = time.perf_counter() - t0
        rep = log.report
        intact = all(payload == _record(seq - 1) for seq, payload in log.records())
        print(f"reboot: recovery scan {dt * 1e3:.0f} ms, records {rep.first_seq}..."
              f"{rep.next_seq - 1}, torn tail {'found and dropped' if rep.torn_tail else 'none'};"
              f" every committed record intact: {intact}")
        if not intact or len(log) != RECORDS:
            raise SystemExit("demo: recovery lost committed records")
        seq = log.append(b"first record after the power cut")
        print(f"the log takes writes again: record {seq} appended")
    print("\n".join(info_lines(image, board)))


def _frame(i: int) -> Frame:
    meter = (100000 + i).to_bytes(6, "big")
    return Frame(Control(FunctionCode.USER_DATA, from_server=True, initiator=False),
                 ServerAddress(meter), client=0x10,
                 apdu=hashlib.sha256(meter).digest() * (APDU_BYTES // 32) + b"\x00" * 8)


def link_step(board_name: str) -> None:
    board = load_board(board_path(board_name))
    cfg = board.link("hplc")
    with open_link(cfg) as link:
        print(f"hplc link {cfg.url}: paced to {cfg.pace_bytes_per_s or 'hardware'} bytes/s, "
              f"frames up to {cfg.max_frame_bytes} bytes")
        t0 = time.perf_counter()
        sent, got = [], []
        for i in range(FRAMES):
            frame = _frame(i)
            if i % 10 == 3:
                link.port.write(b"\x00\x13noise on the line\x68\x68")
            if i % 10 == 7:  # a frame hit by interference: one APDU byte flipped
                raw = bytearray(encode_frame(frame))
                raw[40] ^= 0x20
                link.port.write(bytes(raw))
                continue
            link.send_frame(frame)  # loop:// holds 4 KiB: take each frame off the line
            sent.append(frame)
            got.append(link.recv_frame())
        dt = time.perf_counter() - t0
        c = link.counters()
        print(f"{len(got)} of {FRAMES} frames delivered intact in {dt * 1e3:.0f} ms "
              f"({c.bytes_tx / dt / 1024:.0f} KiB/s); all match what was sent: {got == sent}")
        rejects = ", ".join(f"{r.name} x{n}" for r, n in sorted(c.rejects.items()) if n)
        print(f"counters: tx {c.bytes_tx} B / {c.frames_tx} frames, rx {c.bytes_rx} B / "
              f"{c.frames_rx} frames; rejected: {rejects}")
        if got != sent:
            raise SystemExit("demo: the link delivered frames that were not sent")


def _said(op: str, meter_id: bytes, got: QueryResult, note: str = "") -> None:
    answer = got.answer.value
    if got.answer is Answer.REMOTE:
        answer += f" (held by {got.home})"
    elif got.answer is Answer.LOCAL and got.key is not None:
        answer += " (key store's key matches the chain's fingerprint)"
    print(f"  {op:<9} meter {meter_id.hex()} v{got.key_version}  block {got.height:>2}  "
          f"-> {answer}{note}")


def _reply(fleet: LocalFleet, m: MeterKeys, request: ev.Event, home: str) -> Acknowledge:
    """Send a meter's request through the node core; the demo stops on a refusal."""
    reply = fleet.request(request, home)
    if not isinstance(reply, Acknowledge):
        raise SystemExit(f"demo: {type(request).__name__} of {m.meter_id.hex()} refused: "
                         f"{reply.reason.name} {reply.detail}")
    m.heard(request, reply)
    return reply


def lifecycle_step(image: Path, board_name: str) -> None:
    """Register, rotate, export, migrate, revoke and re-register meter keys; reboot ecd-00.

    Five terminals run the node core (agent/node) over an in-process network
    and ordering; ecd-00 keeps its chain and keys on the image, the others on
    RAM flash. Meters (emulator/meter_keys.py) send requests; every key
    operation is checked by its home, endorsed by a majority, ordered,
    validated and appended by every terminal, and only then stored or
    erased in the home's key store (DESIGN.md, data path).
    """
    board = load_board(board_path(board_name))
    image.unlink()  # the flash step's test records are not chain records: a fresh image
    create(image, board)
    device_key = load_device_key(image.with_name("device.key"), create=True)
    meters = [bytes.fromhex(f"{100000 + i:012d}") for i in range(METERS)]  # BCD addresses
    fleet_keys = provision(TERMINALS, meters, timestamp_ms=time.time_ns() // 1_000_000,
                           difficulty=board.ledger.pow_difficulty)
    master = X25519PrivateKey.generate()
    dev = FileBlockDevice(image, board.flash.erase_block_bytes)
    fleet = LocalFleet(fleet_keys, board_partitions(dev, board.flash), device_key, seeded=False,
                       extra_peers={MASTER_ID: public_bytes(master)},
                       ledger=board.ledger)
    fleet.found()
    me = fleet.first
    quorum = TERMINALS // 2 + 1
    print(f"fresh image (the flash step's records are not chain records); {me} of {TERMINALS} "
          f"terminals: genesis {fleet_keys.genesis_hash.hex()[:16]} pinned by provisioning, "
          f"endorsed by {quorum} of {TERMINALS}; {METERS} meters homed round-robin; PoW "
          f"difficulty {board.ledger.pow_difficulty}, up to {board.ledger.txs_per_block} "
          "transactions a block")
    ids = [t.terminal_id for t in fleet_keys.identities]
    keys = {m: MeterKeys(m, fleet_keys.factory_keys[m]) for m in meters}
    home = {m: ids[i % TERMINALS] for i, m in enumerate(meters)}
    for m in meters:
        _reply(fleet, keys[m], keys[m].register(), home[m])
        _said("register", m, fleet.answer(m))

    local = [m for m in meters if home[m] == me]
    rotated, migrated, revoked = local[0], local[-1], local[1]
    _reply(fleet, keys[rotated], keys[rotated].rotate(), me)
    _said("rotate", rotated, fleet.answer(rotated))
    tip = fleet.ecd.chain.height
    forged = ev.RotateRequest(rotated, 10_000, keys[rotated].counter + 1,
                              make_rotation_proof(new_key(), new_key()))
    refused = fleet.request(forged, me)
    if not isinstance(refused, Refuse) or fleet.ecd.chain.height != tip:
        raise SystemExit("demo: a rotation proof under a wrong key was accepted")
    print(f"  rotate    meter {rotated.hex()} refused: {refused.reason.name} ({refused.detail}); "
          f"no transaction proposed, tip still block {fleet.ecd.chain.height}")

    got = fleet.answer(rotated)
    envelope = fleet.ecd.keys.export(rotated, MASTER_ID, fleet.peers)
    opened = open_envelope(master, envelope, meter_id=rotated, key_version=got.key_version,
                           requester_id=MASTER_ID)
    try:
        fleet.ecd.keys.export(rotated, b"intruder", fleet.peers)
        stranger = "exported (wrong)"
    except NotAuthorisedError:
        stranger = "refused"
    print(f"  export    meter {rotated.hex()} v{got.key_version} -> {MASTER_ID.decode()}: "
          f"{len(envelope)}-byte envelope opens to the same key: "
          f"{'yes' if opened == got.key else 'no'}; an unknown requester: {stranger}")

    moved = fleet.request(ev.MigrateRequest(migrated, 10_001, ids[1]), me)
    if not isinstance(moved, Acknowledge):
        raise SystemExit(f"demo: the migration was refused: {moved}")
    held = fleet.answer(migrated, ids[1]).key == keys[migrated].key
    _said("migrate", migrated, fleet.answer(migrated),
          f"; key handed over to {ids[1]}, which answers local with it: "
          f"{'yes' if held else 'no'}; copy here: {fleet.ecd.keys.status(migrated).value}")

    _reply(fleet, keys[revoked], keys[revoked].revoke(), me)
    _said("revoke", revoked, fleet.answer(revoked),
          f"; key store: {fleet.ecd.keys.status(revoked).value}")

    freed = fleet.ecd.chain.snapshot()
    print(f"  snapshot  at block {fleet.ecd.chain.height}: {fleet.ecd.chain.state.meter_count} "
          f"meters, {freed} erase blocks released")
    _reply(fleet, keys[revoked], keys[revoked].register(), me)
    _said("register", revoked, fleet.answer(revoked), " (a new key line after the revoke)")

    asked = [*meters, bytes.fromhex(f"{100000 + METERS:012d}")]  # the last was never registered
    before = {m: fleet.answer(m) for m in asked}
    chain = fleet.ecd.chain
    records, snapshots, height, digest = (chain.log.stats().records, chain.snapshots_written,
                                          chain.height, chain.state_digest())
    messages = fleet.net.delivered
    dev.close()
    dev = FileBlockDevice(image, board.flash.erase_block_bytes)
    ecd = fleet.reboot(board_partitions(dev, board.flash))
    rep = ecd.chain.report
    after = {m: fleet.answer(m) for m in asked}
    deep = ecd.chain.verify(deep=True)
    scan_agrees = all(scan_newest_record(ecd.chain.log, m) == (a.record.tx if a.record else None)
                      for m, a in after.items())
    counts = {a: sum(r.answer is a for r in after.values()) for a in Answer}
    print(f"  reboot    chain from the snapshot at block {rep.snapshot_height} "
          f"+ {rep.blocks_replayed} block(s) replayed; key store {ecd.keys.report.live_meters} "
          f"live, {ecd.keys.report.destroyed_meters} destroyed, reconciled with the chain "
          f"({len(ecd.node.pending_keys)} pending); verify(deep) to block {deep.height}, "
          f"state digest {'equal' if ecd.chain.state_digest() == digest else 'DIFFERS'}")
    print(f"summary: {height + 1} blocks (tip {height}), {records} chain records on flash, "
          f"{snapshots} snapshot(s), {ecd.keys.stats().log.records} key-store records; answers "
          + ", ".join(f"{a.value} {n}" for a, n in counts.items())
          + f"; after reboot identical: {'yes' if after == before else 'no'}; "
          f"tail scan agrees: {'yes' if scan_agrees else 'no'}; {messages} messages between "
          "the terminals")
    dev.close()
    if after != before or not scan_agrees or ecd.chain.state_digest() != digest:
        raise SystemExit("demo: the answers changed across a reboot")


def _lift_data_limit() -> None:
    """In a desk child: back to the hard RLIMIT_DATA (the budget lowered only the soft one)."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))


def placement_step(out: Path) -> None:
    """Plan the paper's layout (Figures 4-5), then re-home meters joining and leaving."""
    from agent.placement.place import place
    from agent.placement.rehome import Migrate, Placement, ReplanNeeded, SiteMoved
    from tools import meters_gen

    # The planner is desk work (scipy, scikit-learn, matplotlib): its own process,
    # outside the terminal's RAM budget this process keeps.
    cmd = [sys.executable, "-m", "tools.cli", "plan", "--out", str(out / "plan"),
           "--no-progress"]
    if subprocess.run(cmd, check=False, preexec_fn=_lift_data_limit).returncode:
        raise SystemExit("demo: edgekey plan failed")
    pts = meters_gen.generate("clustered", seed=0)
    p = place(pts, cap=25, seed=0)
    ids = [f"M{i:04d}" for i in range(len(pts))]
    placed = Placement.from_assignment(ids, pts, p.assign, p.centres, cap=25)
    rng = np.random.default_rng(1)
    joined = migrations = replans = moved = 0
    for i in range(20):  # new meters in the busiest terminal's village
        busiest = int(np.argmax(placed.arrays().loads))
        xy = placed.site(busiest) + rng.normal(0.0, 60.0, 2)
        events = placed.join(f"N{i:03d}", xy)
        migrations += sum(isinstance(e, Migrate) for e in events)
        replans += sum(isinstance(e, ReplanNeeded) for e in events)
        moved += sum(isinstance(e, SiteMoved) for e in events)
        joined += not any(isinstance(e, ReplanNeeded) for e in events)
    for meter in ids[:10]:
        moved += sum(isinstance(e, SiteMoved) for e in placed.leave(meter))
    placed.check()
    m = placed.metrics()
    print(f"terminal-side re-homing: 20 meters join next to the busiest terminal: {joined} "
          f"homed, {migrations} existing meters migrated (ledger migrate operations), "
          f"{replans} re-plans requested; 10 meters leave; {moved} site advisories; "
          f"now {m.meters} meters on {m.terminals} terminals, max load {m.max_load} (cap 25)")


FLEET_SHOW = ("status", "ledger tail -n 3", "keys history 000000000001", "place", "route",
              "flash", "mem", "log -n 2")


def fleet_step(out: Path, board_name: str) -> None:
    """The running agent: a fleet of one up, its console, meters at work, kill -9, restart."""
    import argparse
    import json
    import os
    import signal

    from tools import fleet
    from tools.console_client import ConsoleClient

    d = out / "fleet"
    if (d / "fleet.json").exists():
        fleet.down(d)
    import shutil
    shutil.rmtree(d, ignore_errors=True)
    parser = argparse.ArgumentParser(prog="edgekey")  # the command line's own defaults
    fleet.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fleet", "up", "--dir", str(d), "--terminals", "1", "--meters",
                              "20", "--board", board_name, "--reading-every", "1",
                              "--rotate-every", "3", "--start-spread", "1"])
    try:
        if fleet.up(args) != 0:
            raise RuntimeError("edgekey fleet up failed")
        t = json.loads((d / "fleet.json").read_text())["terminals"][0]
        time.sleep(3)  # the meters register, read and rotate
        with ConsoleClient(t["console"]) as c:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until every meter has its key (a slow box)
                seen = json.loads(c.run("meters --json").body.splitlines()[-1])["meters"]
                if len(seen) >= 20 and all(m["acks"] for m in seen.values()):
                    break
                time.sleep(0.5)
            for cmd in FLEET_SHOW:
                r = c.run(cmd)
                print(f"edgekey:~$ {cmd}\n{r.body}\n{r.status}")
            meters = json.loads(c.run("meters --json").body.splitlines()[-1])["meters"]
            before = {m: json.loads(c.run(f"keys get {m} --json").body.splitlines()[-1])
                      for m in meters}
        acks = sum(m["acks"] for m in meters.values())
        readings = sum(m["readings"] for m in meters.values())
        print(f"{len(meters)} meters over the PLC channel: {acks} acknowledgements, "
              f"{readings} readings accepted")
        print(f"kill -9 {t['pid']} (the agent, meters still rotating), then fleet up again")
        os.kill(t["pid"], signal.SIGKILL)
        time.sleep(0.5)
        if fleet.up(args) != 0:
            raise RuntimeError("the restart failed")
        t = json.loads((d / "fleet.json").read_text())["terminals"][0]
        with ConsoleClient(t["console"]) as c:
            print(f"ledger verify: {c.run('ledger verify').status}")
            kept = 0
            for m, got in before.items():
                now = json.loads(c.run(f"keys get {m} --json").body.splitlines()[-1])
                kept += now["key_version"] >= got["key_version"] and now["key_held_here"]
        print(f"after the restart: {kept}/{len(before)} meters at or past the key version "
              "they had, each key in the store")
    finally:
        if (d / "fleet.json").exists():
            fleet.down(d)


def network_step(out: Path, board_name: str, *, terminals: int = 13, meters: int = 300,
                 seed: int = 1, run: dict | None = None, joins: int = 20,
                 leaves: int = 10) -> dict:
    """The fleet on etcd with the master station: every meter registered at its home; keys
    fetched by the station through their home and through another terminal (forwarded),
    each with its record proof checked; readings opened end to end; a revoke through the
    home; three terminals killed mid-stream and restarted; one chain everywhere."""
    import argparse
    import random
    import shutil

    from tools import fleet, fleet_meters, station
    from tools import fleet_probe as probe
    from tools.console_client import ConsoleClient

    run = {} if run is None else run
    t0_wall = run.setdefault("t0_wall", time.time())

    def since() -> float:
        return round(time.time() - t0_wall, 3)

    def station_call(what: str, call: Any, meter: str, via: str, home: str) -> dict:
        t = time.monotonic()
        got = call()
        run.setdefault("station", []).append(
            {"what": what, "meter": meter, "via": via, "home": home,
             "status": got.get("status", "OK" if got.get("height") else "?"),
             "proof": got.get("proof", "-"), "ms": round(1e3 * (time.monotonic() - t), 1)})
        return got

    d = out / "network"
    if (d / "fleet.json").exists():
        fleet.down(d)
    shutil.rmtree(d, ignore_errors=True)
    parser = argparse.ArgumentParser(prog="edgekey")
    fleet.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fleet", "up", "--dir", str(d), "--terminals", str(terminals),
                              "--meters", str(meters), "--board", board_name, "--seed",
                              str(seed), "--reading-every", "4", "--rotate-every", "8",
                              "--start-spread", "3"])
    rng = random.Random(seed)
    try:
        t0 = time.monotonic()
        if fleet.up(args) != 0:
            raise RuntimeError("edgekey fleet up failed")
        fl = probe.load(d)
        run["placement"] = demo_record.placement(d)
        probe.wait(lambda: len(probe.acked(d)) == meters, 120, "every meter registered")
        voting = sum(1 for t in fl["terminals"] if t.get("etcd"))
        st = probe.statuses(fl)
        print(f"{terminals} terminals ({voting} hosting etcd voting members), {meters} meters "
              f"registered {time.monotonic() - t0:.0f} s after fleet up; proposer "
              f"{next(iter(st.values()))['proposer']}, heights "
              f"{sorted({x['height'] for x in st.values() if x})}")
        done = probe.acked(d)
        urls = probe.consoles(fl)
        with ConsoleClient(urls["ecd-00"]) as c:
            picks = sorted(done)[:: max(1, len(done) // 3)][:3]
            homes = {m: probe.console_json(c, f"keys get {m}")["home"] for m in picks}
        sf = station.Fleet.load(d)
        _say("the master station: keys through any terminal, proofs, readings, a revoke")
        for m in picks:
            other = next(t for t in sorted(urls) if t != homes[m])
            for via in (homes[m], other):
                got = station_call("key", lambda m=m, via=via: station.fetch_key(
                    sf, bytes.fromhex(m), via), m, via, homes[m])
                kind = "its home" if via == homes[m] else f"{via}, forwarded to {homes[m]}"
                print(f"station key {m} via {kind}: {got['status']} v{got['key_version']} "
                      f"height {got['height']}, proof {got.get('proof')}, fingerprint "
                      f"{got.get('fingerprint', '')[:16]}")
                if got["status"] != "OK" or got.get("proof") != "checked":
                    raise RuntimeError(f"the station's key query failed: {got}")
        read = picks[0]
        probe.wait(lambda: len(station.fetch_readings(sf, bytes.fromhex(read), homes[read])
                               .get("readings", [])) >= 2, 30, "readings at the home")
        got = station.fetch_readings(sf, bytes.fromhex(read), homes[read])
        tally = Counter(r["status"] for r in got["readings"])
        print(f"station readings {read}: {len(got['readings'])} opened end to end with the "
              f"meter's key v{got['key_version']}: {tally['ok']} ok"
              + (f", {tally['stale']} sealed under another version (the meter rotated)"
                 if tally["stale"] else "") + (f", {tally['bad']} BAD" if tally["bad"] else ""))
        if tally["bad"] or not tally["ok"]:
            raise RuntimeError(f"the readings did not open: {got}")
        victim = picks[-1]
        not_home = next(t for t in sorted(urls) if t != homes[victim])
        got = station_call("revoke", lambda: station.revoke(sf, bytes.fromhex(victim),
                                                            not_home),
                           victim, not_home, homes[victim])
        print(f"station revoke {victim} asked of {not_home}: redirected to {got['via']}, "
              f"committed at height {got['height']}; its key is now "
              f"{station.fetch_key(sf, bytes.fromhex(victim), not_home)['status']}")
        _say(f"meters join and leave: {joins} new meters homed by their terminal's placement, "
             f"{leaves} taken away and revoked")
        join_t = since()
        joined = fleet_meters.join(d, joins)
        print(f"{len(joined)} meters provisioned and published; on the channels of "
              + ", ".join(f"{t} ({n})" for t, n in sorted(Counter(
                  m["home"] for m in joined).items())))
        new_ids = {m["id"] for m in joined}

        def settled() -> bool:
            fleet_meters.settle(d)  # a meter whose key migrated follows it
            answers = demo_record.answers(d, t0_wall)
            done = {a["meter"] for a in answers if a["op"] == "register"
                    and a["outcome"] in ("ACK", "NOT_HOME")}
            return new_ids <= done

        probe.wait(settled, 90, "the new meters answered")
        answers = [a for a in demo_record.answers(d, t0_wall) if a["meter"] in new_ids
                   and a["op"] == "register"]
        outcome = Counter(a["outcome"] for a in answers)
        gone = sorted(set(probe.acked(d)) - new_ids - set(picks))[:leaves]
        left = fleet_meters.leave(d, gone)
        print(f"joins answered: {dict(outcome)}; {sum(1 for x in left if x['revoked'])} of "
              f"{len(left)} leaving meters revoked through their homes")
        time.sleep(6)  # the terminals' placement follows the chain every 5 s
        events = demo_record.placement_events(d, t0_wall)
        run["migrations"] = events["migrations"]
        run["site_moves"] = [e for e in events["site_moves"] if e["t_s"] >= join_t]
        run["replans"] = events["replans"]
        run["joins"] = {"provisioned": len(joined), "answers": dict(outcome),
                        "placed_elsewhere": events["elsewhere"], "left": left}
        print(f"placement: {len(run['migrations'])} migrations committed to make room, "
              f"{len(run['site_moves'])} site moves (medoids), {len(run['replans'])} re-plans "
              f"needed, {len(events['elsewhere'])} joins sent to another terminal")
        _say("three terminals killed (kill -9, agent and etcd member) mid-stream, restarted")
        victims = sorted(rng.sample(sorted(urls), 3))
        run["resources"] = demo_record.resources(probe.load(d), load_board(
            board_path(board_name)).ram.agent_budget_mib)  # before the kills: whole lives
        kills = {v: {"terminal": v, "killed_s": since()} for v in victims}
        for v in victims:
            fleet.kill(d, v)
        time.sleep(3)
        for v in victims:
            if fleet.start(d, v) != 0:
                raise RuntimeError(f"{v} did not start again")
            kills[v]["restarted_s"] = since()
        fl = probe.load(d)

        def synced_now() -> bool:
            st = probe.statuses(fl)
            for v in victims:
                if st.get(v) and st[v]["synced"] and "synced_s" not in kills[v]:
                    kills[v]["synced_s"] = since()
            return all(x and x["synced"] for x in st.values())

        probe.wait(synced_now, 90, "every terminal current again")
        run["kills"] = list(kills.values())
        probe.converged(fl, d, "ecd-00")
        found = probe.digests(fl)
        heights = probe.heights(fl)
        print(f"meters stopped: {len(found)} chains at height {max(heights.values())}, one "
              f"full-state digest {next(iter(found.values()))[:16]}...; every acknowledged "
              f"key version on the chain")
        run["chains"] = {"terminals": len(found), "height": max(heights.values()),
                         "digest": next(iter(found.values())), "identical": True}
    finally:
        if (d / "fleet.json").exists():
            fleet.down(d)
        if d.exists():
            run["commits"], run["outcomes"] = demo_record.commits_and_outcomes(
                demo_record.answers(d, t0_wall))
    return run


def routing_step(run: dict, *, terminals: int, meters: int, rate: float, seconds: float,
                 seed: int = 1) -> None:
    """The same fleet and load routed by the greedy (eq. 9) and by shortest paths, over WAN
    links emulated at the paper's 25 Mbit/s: per-link load, eq. 8 and commit latency, each
    measured from the terminals' own traffic counters."""
    from tools import bench_live_routing

    result = bench_live_routing.run(methods=("greedy", "shortest"), wan_rates=(25.0,),
                                    terminals=terminals, meters=meters, rate=rate,
                                    seconds=seconds, seed=seed, progress=True)
    for r in result["runs"]:
        print(f"{r['method']:>8}: eq. 8 of the measured idle bandwidth "
              f"{r['load_balance_degree']:.4g} (bit/s)^2, busiest link "
              f"{100 * r['busiest_link_utilisation']:.2f} % of 25 Mbit/s, paths "
              f"{r['mean_hops']:.2f} hops on average; commits p50 {r['commit_p50_ms']:.0f} ms, "
              f"p99 {r['commit_p99_ms']:.0f} ms")
    run["routing"] = demo_record.routing(result)


def run(out: str, board: str = "host", *, quick: bool = False) -> int:
    """The whole demo; SIGTERM unwinds like Ctrl-C, so every step's fleet is stopped."""
    from tools.signals import sigterm_unwinds

    with sigterm_unwinds():
        return _run(out, board, quick=quick)


def _run(out: str, board: str, *, quick: bool) -> int:
    b = load_board(board_path(board))
    _say(f"board {b.name}: {b.source}")
    print(f"{b.cpu.arch} {b.cpu.cores}x{b.cpu.mhz} MHz, RAM {b.ram.total_mib} MiB, "
          f"flash {b.flash.size_mib} MiB in {len(b.flash.partitions)} partitions, "
          f"links {', '.join(sorted(b.links))}")
    budget = RamBudget.from_board(b)
    limit = budget.enforce()
    print(f"RAM budget {b.ram.agent_budget_mib} MiB enforced "
          f"({'RLIMIT_DATA' if limit.effective else 'watchdog only'}); {budget.check()}")
    _say("flash: ledger record log, power cut, recovery")
    flash_step(Path(out) / "flash.img", board)
    _say("meter link: DL/T 698.45 frames over the board's hplc link")
    link_step(board)
    _say("key lifecycle through the node core: ecd-00's chain and key store on the flash image")
    lifecycle_step(Path(out) / "flash.img", board)
    _say("placement: the paper's layout planned, then meters join and leave")
    placement_step(Path(out))
    _say("the running agent: a fleet of one with 20 emulated meters over a PLC channel")
    fleet_step(Path(out), board)
    n, m = (5, 40) if quick else (13, 300)
    record: dict = {"params": {"terminals": n, "meters": m, "board": board, "seed": 1,
                               "route_method": "greedy", "quick": quick,
                               "reading_every_s": 4, "rotate_every_s": 8},
                    "paper": demo_record.PAPER, "t0_wall": time.time()}
    t0 = time.monotonic()
    _say(f"terminals together on etcd: {n} agents, {m} emulated meters, the master station")
    network_step(Path(out), board, terminals=n, meters=m, run=record,
                 joins=4 if quick else 20, leaves=2 if quick else 10)
    _say("routing: the greedy beside shortest paths, same fleet and load, measured from traffic")
    routing_step(record, terminals=n, meters=m, rate=20.0 if quick else 100.0,
                 seconds=8.0 if quick else 20.0)
    record["wall_s"] = round(time.monotonic() - t0, 1)
    _say("the report")
    record.pop("t0_wall", None)
    from tools import demo_report

    write_json(record, Path(out) / "run.json")
    written = demo_report.render(record, Path(out))
    print(f"report: {written.get('html', Path(out) / 'report.html')} (and report.md, "
          f"{sum(1 for k in written if str(written[k]).endswith('.png'))} figures); the run's "
          f"record: {Path(out) / 'run.json'}")
    _say("RAM at the end")
    print(budget.check())
    return 0
