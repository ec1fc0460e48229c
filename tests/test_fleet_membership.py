"""Retiring terminals from a running fleet: through the ledger, and out of etcd's membership.

Five terminals on etcd, the meters rotating. Injected: ``member retire
ecd-04`` on ecd-00's console, then ``member retire ecd-02`` (ecd-02 hosts an
etcd voting member).

What must hold: each retire commits (endorsed by the majority in force) and
every chain lists the terminal as retired; the retired terminal's meters
are refused (it can no longer propose) and its peer links are refused by
the others; the fleet goes on committing with the majority of the terminals
left; etcd's membership loses ecd-02's member; all five chains (the retired
terminals still follow the chain) end with one full-state digest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleetprobe import console_json, consoles, converged, down, edgekey, heights, wait

from agent.net.etcd import EtcdClient
from tools.console_client import ConsoleClient

pytestmark = pytest.mark.host_only


def _naks(d: Path, tid: str) -> dict[str, int]:
    path = d / f"{tid}.meter-stats.json"
    if not path.exists():  # the meters write their counters a moment after they start
        return {}
    return json.loads(path.read_text()).get("naks", {})


def test_retired_terminals_stop_counting_and_leave_etcd(tmp_path: Path):
    d = tmp_path / "fm"
    fleet: dict = {}
    try:
        r = edgekey("fleet", "up", "--terminals", "5", "--meters", "20", "--dir", str(d),
                    "--reading-every", "0", "--rotate-every", "1", "--start-spread", "1")
        assert r.returncode == 0, r.stdout + r.stderr
        fleet = json.loads((d / "fleet.json").read_text())
        urls = consoles(fleet)
        with ConsoleClient(urls["ecd-00"], timeout=30) as c:
            got = console_json(c, "member retire ecd-04")
            assert got["terminal"] == "ecd-04" and got["active"] == 4 and got["height"] > 0
            assert c.run("member retire ecd-04").code == "EINVAL"  # not active any more
        for url in urls.values():
            with ConsoleClient(url) as c:
                wait(lambda c=c: console_json(c, "member list")["active"] == 4, 20,
                     "every chain to list ecd-04 as retired")
        before = heights(fleet)
        wait(lambda: any(k.startswith("LEDGER_REFUSED") or k == "11" for k in
                         _naks(d, "ecd-04")), 30, "ecd-04's meters to be refused")
        with ConsoleClient(urls["ecd-00"]) as c:
            net = console_json(c, "net")
            assert not net["peers"].get("ecd-04", {}).get("connected"), net["peers"]
        wait(lambda: min(h for t, h in heights(fleet).items() if t != "ecd-04")
             > max(before.values()) + 3, 30, "the four to commit without ecd-04")

        tls = d / "tls"
        with EtcdClient(fleet["etcd"]["endpoints"], ca=str(tls / "ca.crt"),
                        cert=str(tls / "ecd-00.crt"), key=str(tls / "ecd-00.key")) as etcd:
            assert len(etcd.member_list()) == 3
            with ConsoleClient(urls["ecd-00"], timeout=30) as c:
                assert console_json(c, "member retire ecd-02")["active"] == 3
            wait(lambda: len(etcd.member_list()) == 2, 30, "ecd-02's etcd member to go")
            names = sorted(m["name"] for m in etcd.member_list())
        assert names == ["m0", "m1"]
        before = heights(fleet)
        wait(lambda: min(h for t, h in heights(fleet).items() if t in ("ecd-00", "ecd-01",
                                                                       "ecd-03"))
             > max(before.values()) + 3, 30, "the three to commit")
        converged(fleet, d, "ecd-00")
    finally:
        fleet = down(d, fleet)
