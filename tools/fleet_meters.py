"""``edgekey fleet meters join|leave|settle``: meters arriving and departing in a running fleet.

join N   the utility provisions N new meters (positions in the area, each
         factory key sealed to the terminal nearest it, whose PLC hears it),
         publishes the newer provisioning and waits until every terminal has
         it in force; the meters then appear on their terminal's PLC channel
         (its emulated meter process restarts with them) and ask it to
         register them. The terminal decides (agent/rehoming.py): register
         here, make room by migrating its own meters first (the meter is told
         BUSY and retries), NOT_HOME naming the terminal placement homes it
         at, or a re-plan.
leave ID the meters are taken off their channel (the emulated process
         restarts without them), then revoked through their home by the
         master station, so they cannot register again by themselves.
settle   a meter whose key a MIGRATE moved to another terminal is told
         NOT_HOME by its old one and stops; settle moves it, with its state,
         onto its new home's channel, as a technician re-pairs a meter to
         the concentrator it now belongs to.

Each step prints what it did and returns it, for the demo's report.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from tools import fleet as fleet_tools
from tools.provision_cmd import add_meters

STOP_S = 10.0


def _meters_file(t: dict) -> list[dict]:
    return json.loads(Path(t["meters_file"]).read_text())


def _write_meters(t: dict, rows: list[dict]) -> None:
    path = Path(t["meters_file"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    t["meters"] = len(rows)


def _restart_meters(directory: Path, fleet: dict, t: dict) -> None:
    """Stop the terminal's emulated meters (they save their state) and start them again with
    the meters file as it is now; a terminal left with none runs no meter process."""
    mark = fleet_tools._mark(directory)
    proc = t["processes"].get("meters")
    if proc is not None and fleet_tools._alive(proc.get("pid"), mark):
        os.kill(proc["pid"], signal.SIGTERM)
        fleet_tools._wait_gone([proc["pid"]], STOP_S, mark)
    if t["meters"] == 0:
        return
    if proc is None:  # it had none: build its command like fleet up does
        procs = fleet_tools._commands(directory, t, fleet_tools.argparse.Namespace(
            **fleet["options"]), fleet["board"], fleet["etcd"]["members"],
            fleet_tools._plan(fleet))
        proc = t["processes"]["meters"] = procs["meters"]
    fleet_tools._start(proc, directory, f"{t['id']}.meters")


def join(directory: Path, count: int) -> list[dict]:
    """Provision ``count`` meters, publish, put them on their terminals' channels."""
    fleet = fleet_tools.load_fleet(directory)
    running = fleet_tools._running(fleet, directory)
    if not running:
        raise RuntimeError("no terminal is running for meters to join")
    new = add_meters(directory, count)
    fleet_tools._published(directory, fleet, running)
    by_id = {t["id"]: t for t in fleet["terminals"]}
    for home in sorted({m["home"] for m in new}):
        t = by_id[home]
        rows = _meters_file(t) + [{"id": m["id"], "factory_key": m["factory_key"]}
                                  for m in new if m["home"] == home]
        _write_meters(t, rows)
        _restart_meters(directory, fleet, t)
    fleet_tools._write(directory, fleet)
    return [{k: m[k] for k in ("id", "home", "xy")} for m in new]


def leave(directory: Path, meter_ids: list[str]) -> list[dict]:
    """Take meters off their channels, then revoke them through their homes (the station)."""
    from tools import station

    fleet = fleet_tools.load_fleet(directory)
    sf = station.Fleet.load(directory)
    out = []
    touched, where = {}, {}
    for t in fleet["terminals"]:
        rows = _meters_file(t)
        keep = [r for r in rows if r["id"] not in meter_ids]
        if len(keep) != len(rows):
            _write_meters(t, keep)
            touched[t["id"]] = t
            where.update({r["id"]: t["id"] for r in rows if r["id"] in meter_ids})
    for t in touched.values():
        _restart_meters(directory, fleet, t)
    fleet_tools._write(directory, fleet)
    for m in meter_ids:
        if m not in where:
            raise RuntimeError(f"meter {m} is on no terminal's channel")
        got = station.revoke(sf, bytes.fromhex(m), where[m])
        out.append({"meter": m, "revoked": got.get("ok", False), "home": got.get("via"),
                    "height": got.get("height"), "reason": got.get("reason")})
    return out


def settle(directory: Path) -> list[dict]:
    """Move every meter its old home stopped with NOT_HOME (a migrated key) to its new one."""
    fleet = fleet_tools.load_fleet(directory)
    by_id = {t["id"]: t for t in fleet["terminals"]}
    moves = []
    for t in fleet["terminals"]:
        path = directory / f"{t['id']}.meter-stats.json"
        if not path.exists():
            continue
        stats = json.loads(path.read_text())["per_meter"]
        for m, st in stats.items():
            home = st.get("home")
            if st.get("stopped") and st.get("has_key") and home in by_id and home != t["id"]:
                moves.append((m, t["id"], home))
    if not moves:
        return []
    for m, old, new in moves:
        rows = _meters_file(by_id[old])
        row = next(r for r in rows if r["id"] == m)
        _write_meters(by_id[old], [r for r in rows if r["id"] != m])
        _write_meters(by_id[new], [*_meters_file(by_id[new]), row])
    for tid in sorted({old for _, old, _ in moves}):  # they save their meters' state first
        _restart_meters(directory, fleet, by_id[tid])
    for m, old, new in moves:  # the meter takes its state (key, counters) along
        src = directory / f"{old}.meter-state" / f"{m}.json"
        dst_dir = directory / f"{new}.meter-state"
        dst_dir.mkdir(exist_ok=True)
        state = json.loads(src.read_text())
        state["stopped"], state["home"] = 0, new
        (dst_dir / f"{m}.json").write_text(json.dumps(state))
        src.unlink()
    for tid in sorted({new for _, _, new in moves}):
        _restart_meters(directory, fleet, by_id[tid])
    fleet_tools._write(directory, fleet)
    return [{"meter": m, "from": old, "to": new, "t": time.time()} for m, old, new in moves]


def print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print("  ".join(f"{k} {v}" for k, v in r.items()))


