"""Membership at run time: terminals retired and added through the ledger, as the utility orders.

Five terminals on etcd, the meters rotating. Injected, in order:

1. ``member retire ecd-04`` on ecd-00's console without the utility's word:
   the endorsers refuse it (MEMBER_NOT_AUTHORISED), as they would a
   compromised member's attempt to vote an honest one out;
2. ``fleet retire ecd-04``: the utility's newer provisioning withdraws it,
   is published through etcd, and the retire commits;
3. ``fleet retire ecd-02`` (ecd-02 hosts an etcd voting member);
4. ``fleet add --etcd-member``: a new terminal, ecd-05, provisioned with its
   own etcd member (replacing ecd-02's), published, TERMINAL_ADD committed,
   the member announced to etcd, the agent started from a blank image.

What must hold: each change commits (endorsed by the majority in force) and
every chain lists it; the retired terminal's meters are refused and its
peer links cut; the fleet goes on committing with the majority of the
terminals left; etcd's membership loses ecd-02's member and gains ecd-05's;
ecd-05 catches up from etcd and endorses; all chains (the retired
terminals still follow) end with one full-state digest.
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
        # 1. Injected: a retire the utility never ordered.
        with ConsoleClient(urls["ecd-00"], timeout=30) as c:
            r = c.run("member retire ecd-04")
            assert r.code == "EPERM" and "member_not_authorised" in r.reason, r
            assert console_json(c, "member list")["active"] == 5
        # 2. The utility withdraws ecd-04; published through etcd; the retire commits.
        r = edgekey("fleet", "retire", "--dir", str(d), "ecd-04")
        assert r.returncode == 0 and "retired at height" in r.stdout, r.stdout + r.stderr
        with ConsoleClient(urls["ecd-00"], timeout=30) as c:
            assert c.run("member retire ecd-04").code == "EINVAL"  # not active any more
            assert console_json(c, "net")["network"]["provisioning.updated"] == 1
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
        cut = 0
        for t in ("ecd-00", "ecd-01", "ecd-02", "ecd-03"):  # its links: refused as not a member
            with ConsoleClient(urls[t]) as c:
                cut += console_json(c, "net")["transport"].get("refused.not_member", 0)
        assert cut >= 1
        wait(lambda: min(h for t, h in heights(fleet).items() if t != "ecd-04")
             > max(before.values()) + 3, 30, "the four to commit without ecd-04")

        tls = d / "tls"
        with EtcdClient(fleet["etcd"]["endpoints"], ca=str(tls / "ca.crt"),
                        cert=str(tls / "ecd-00.crt"), key=str(tls / "ecd-00.key")) as etcd:
            assert len(etcd.member_list()) == 3
            # 3. ecd-02, an etcd voting host, withdrawn and retired.
            r = edgekey("fleet", "retire", "--dir", str(d), "ecd-02")
            assert r.returncode == 0 and "(3 active)" in r.stdout, r.stdout + r.stderr
            wait(lambda: len(etcd.member_list()) == 2, 30, "ecd-02's etcd member to go")
            names = sorted(m["name"] for m in etcd.member_list())
        assert names == ["m0", "m1"]
        before = heights(fleet)
        wait(lambda: min(h for t, h in heights(fleet).items() if t in ("ecd-00", "ecd-01",
                                                                       "ecd-03"))
             > max(before.values()) + 3, 30, "the three to commit")

        # 4. A new terminal with an etcd member of its own, in ecd-02's place.
        with ConsoleClient(urls["ecd-01"], timeout=30) as c:
            assert c.run("member add ecd-05").code == "ENOENT"  # not provisioned yet
        r = edgekey("fleet", "add", "--dir", str(d), "--etcd-member", timeout=240)
        assert r.returncode == 0 and "ecd-05: added at height" in r.stdout, r.stdout + r.stderr
        assert "(4 active)" in r.stdout, r.stdout
        fleet = json.loads((d / "fleet.json").read_text())
        urls = consoles(fleet)
        with EtcdClient(fleet["etcd"]["endpoints"], ca=str(tls / "ca.crt"),
                        cert=str(tls / "ecd-00.crt"), key=str(tls / "ecd-00.key")) as etcd:
            wait(lambda: sorted(m["name"] for m in etcd.member_list()) == ["m0", "m1", "m3"],
                 30, "ecd-05's etcd member (m3: m2 left with ecd-02) to join")
        with ConsoleClient(urls["ecd-05"], timeout=10) as c:
            wait(lambda: console_json(c, "status")["synced"], 60, "ecd-05 to catch up")
            assert console_json(c, "member list")["active"] == 4
        before = heights(fleet)
        live = ("ecd-00", "ecd-01", "ecd-03", "ecd-05")
        wait(lambda: min(h for t, h in heights(fleet).items() if t in live)
             > max(before.values()) + 3, 30, "the four to commit with ecd-05")
        with ConsoleClient(urls["ecd-00"], timeout=10) as c:  # may fail over to m3 too
            assert fleet["etcd"]["members"]["ecd-05"]["client"] in console_json(
                c, "net")["etcd_endpoints"]
        with ConsoleClient(urls["ecd-05"], timeout=10) as c:
            signed = console_json(c, "net")["endorsing"].get("endorse.signed", 0)
        assert signed > 0, "ecd-05 endorses the blocks after its own"
        r = edgekey("fleet", "status", "--dir", str(d))  # ecd-02's etcd left with it: not DOWN
        assert r.returncode == 0 and "left etcd (retired)" in r.stdout, r.stdout
        converged(fleet, d, "ecd-00")
    finally:
        fleet = down(d, fleet)
