"""A meter re-homed at run time: MIGRATE through the majority, its key handed over wrapped.

Three terminals on etcd, routed by the greedy over the WAN mesh. Injected:
``keys migrate`` of a meter from its home to another terminal; then requests
that must be refused (to itself, a meter homed elsewhere, an unknown one);
the migrated meter, told NOT_HOME by its old home, moved to its new one
(``fleet meters settle``); the station's view of each terminal's placement
and a re-plan of the area; then three new meters join (``fleet meters
join``) and two of them leave.
What must hold: the MIGRATE commits on every chain; the new home holds the
key at the version the chain records and the old home lets it go once the
hand-over is acknowledged; the refusals name their reason and change
nothing; the settled meter rotates at its new home; the re-plan's moves all
commit, no terminal over its capacity, and a second re-plan finds nothing
to move; the joined meters register where their terminal's placement homes
them, and the ones that left are revoked and stay so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fleetprobe import console_json, consoles, converged, down, edgekey, wait

from tools.console_client import ConsoleClient

pytestmark = pytest.mark.host_only


def test_a_migrated_meter_s_key_moves_to_its_new_home(tmp_path: Path) -> None:
    d = tmp_path / "fmig"
    fleet: dict = {}
    try:
        r = edgekey("fleet", "up", "--terminals", "3", "--meters", "12", "--dir", str(d),
                    "--reading-every", "0", "--rotate-every", "3", "--start-spread", "1")
        assert r.returncode == 0, r.stdout + r.stderr
        fleet = json.loads((d / "fleet.json").read_text())
        urls = consoles(fleet)

        def held(tid: str) -> list[str]:
            with ConsoleClient(urls[tid], timeout=20) as c:
                return [k["meter"] for k in console_json(c, "keys list")]

        wait(lambda: len(held("ecd-00")) > 0, 60, "a meter registered at ecd-00")
        meter = sorted(held("ecd-00"))[0]
        with ConsoleClient(urls["ecd-00"], timeout=30) as c:
            for _ in range(10):  # the meter rotates every 3 s: BUSY while one is in flight
                r = c.run(f"keys migrate {meter} ecd-01 --json")
                if r.ok:
                    break
                assert r.code == "EAGAIN", r
                time.sleep(0.5)
            moved = json.loads(r.body.splitlines()[-1])
            assert moved["from"] == "ecd-00" and moved["to"] == "ecd-01" and moved["height"] > 0
            # refused, and nothing changes: to itself, not held here, unknown
            assert c.run(f"keys migrate {meter} ecd-00").code != "OK"
            assert c.run("keys migrate 0000deadbeef ecd-02").code != "OK"

        def at_new_home() -> bool:
            with ConsoleClient(urls["ecd-01"], timeout=20) as c:
                got = console_json(c, f"keys get {meter}")
            return got["home"] == "ecd-01" and bool(got["key_held_here"])

        wait(at_new_home, 60, "the key held at ecd-01 under the chain's fingerprint")
        wait(lambda: meter not in held("ecd-00"), 60, "the old home to let the key go")
        with ConsoleClient(urls["ecd-01"], timeout=20) as c:
            after = console_json(c, f"keys get {meter}")
            assert after["key_version"] == moved["key_version"]  # the same key, re-homed
        # Its next rotation asks ecd-00, which answers NOT_HOME naming ecd-01: the meter stops;
        # settle moves it (with its state) onto ecd-01's channel, where it rotates again.

        def stopped() -> bool:
            stats = json.loads((d / "ecd-00.meter-stats.json").read_text())["per_meter"]
            return bool(stats[meter]["stopped"]) and stats[meter]["home"] == "ecd-01"

        wait(stopped, 30, "the migrated meter told NOT_HOME by its old home")
        r = edgekey("fleet", "meters", "settle", "--dir", str(d))
        assert r.returncode == 0 and f"meter {meter}  from ecd-00  to ecd-01" in r.stdout, r

        def rotates_at_new_home() -> bool:
            path = d / "ecd-01.meter-answers.jsonl"
            return any(a["meter"] == meter and a["op"] == "rotate" and a["outcome"] == "ACK"
                       for a in map(json.loads, path.read_text().splitlines()))

        wait(rotates_at_new_home, 30, "the moved meter rotating at ecd-01")
        # The station hears each terminal's placement, then re-plans the area: the
        # capacitated assignment to the terminals' sites, its moves committed as MIGRATEs
        # through their homes, in waves that never put a terminal over its capacity.
        r = edgekey("station", "--dir", str(d), "--json", "place")
        assert r.returncode == 0, r.stdout + r.stderr
        placed = {x["terminal"]: x for x in map(json.loads, r.stdout.splitlines())}
        assert meter in placed["ecd-01"]["meters"] and meter not in placed["ecd-00"]["meters"]
        r = edgekey("station", "--dir", str(d), "--json", "replan", "ecd-00", "ecd-01",
                    "ecd-02")
        assert r.returncode == 0, r.stdout + r.stderr
        plan = json.loads(r.stdout)
        assert plan["planned"] == len(plan["moves"]) and not plan["not_placed"]
        assert all(m["ok"] for m in plan["moves"])
        assert all(plan["loads_after"][t] <= plan["capacity"][t] for t in plan["capacity"])
        for m in plan["moves"]:  # each committed: the chain homes the meter where planned
            with ConsoleClient(urls[m["to"]], timeout=20) as c:
                assert console_json(c, f"keys get {m['meter']}")["home"] == m["to"]
        r = edgekey("station", "--dir", str(d), "--json", "replan", "ecd-00", "ecd-01",
                    "ecd-02")
        assert r.returncode == 0 and json.loads(r.stdout)["planned"] == 0  # nothing left
        time.sleep(4)  # the moved meters hear NOT_HOME at their next rotation
        edgekey("fleet", "meters", "settle", "--dir", str(d))
            # the new home may hand it on; ecd-02 now refuses to move a meter it does not hold
        with ConsoleClient(urls["ecd-02"], timeout=30) as c:
            assert c.run(f"keys migrate {meter} ecd-00").code != "OK"
        # Meters join: provisioned, published, put on the channel of the terminal that
        # hears them, which homes them by its placement replica; then two of them leave.
        r = edgekey("fleet", "meters", "join", "3", "--dir", str(d))
        assert r.returncode == 0, r.stdout + r.stderr
        joined = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("id ")]
        assert len(joined) == 3

        def registered() -> set[str]:
            found = set()
            for path in d.glob("*.meter-answers.jsonl"):
                for line in path.read_text().splitlines():
                    a = json.loads(line)
                    if a["op"] == "register" and a["outcome"] == "ACK":
                        found.add(a["meter"])
            return found

        wait(lambda: set(joined) <= registered(), 60, "the new meters registered")
        r = edgekey("fleet", "meters", "leave", *joined[:2], "--dir", str(d))
        assert r.returncode == 0 and r.stdout.count("revoked True") == 2, r.stdout + r.stderr
        fleet = json.loads((d / "fleet.json").read_text())
        with ConsoleClient(urls["ecd-02"], timeout=20) as c:
            for m in joined[:2]:
                assert console_json(c, f"keys get {m}")["answer"] == "revoked"
            place = console_json(c, "place")
            assert "decisions" in place and "medoid_site_xy" in place
        converged(fleet, d, "ecd-00")
    finally:
        down(d, fleet)
