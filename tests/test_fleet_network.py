"""Five terminals on etcd from the command line: power cuts, a forged block, one chain.

``edgekey fleet up --terminals 5`` starts three etcd voting members (hosted
by ecd-00..02), five agents with their PLC channels and emulated meters.
Injected, in this order, with a fixed seed:

1. two rounds of power cuts (``fleet kill``: SIGKILL of a terminal's agent
   and its etcd member) of a random minority of the terminals at random
   moments while the meters rotate their keys, each restarted
   (``fleet start``) a moment later;
2. the etcd leader's process SIGKILLed alone (its terminal's agent keeps
   running, its client and watch fail over), then a follower's; each
   restarted while the meters keep rotating;
3. with the meters stopped, a block written straight into etcd by ecd-04's
   certificate: signed by ecd-04 but endorsed by nobody.

What must survive: every terminal refuses the forged block and counts it;
the meters, restarted, still commit past it; once the meters stop, all five
chains have the same full-state digest; every key version a meter had
acknowledged is on the chain and its home holds its key; a key fetched
from another terminal (a remote query) opens and matches the chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.keystore.material import fingerprint
from agent.ledger.block import build_block, encode_block
from agent.ledger.identity import TerminalIdentity
from agent.ledger.tx import TxBuilder
from agent.net.etcd import EtcdClient
from agent.net.ordering import chain_key
from tools.console_client import ConsoleClient

pytestmark = pytest.mark.host_only

ROOT = Path(__file__).resolve().parents[1]
TERMINALS = 5
METERS = 25
SEED = 7


def edgekey(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, OSError):
        return False


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _acked(d: Path) -> dict[str, tuple[int, str]]:
    """Each meter's acknowledged key version and key, from the emulated meters' state."""
    out = {}
    for f in sorted(d.glob("ecd-*.meter-state/*.json")):
        s = json.loads(f.read_text())
        if s.get("key_version"):
            out[f.stem] = (int(s["key_version"]), s["key"])
    return out


def _json(c: ConsoleClient, cmd: str) -> dict:
    r = c.run(f"{cmd} --json")
    assert r.ok, (cmd, r)
    return json.loads(r.body.splitlines()[-1])


def _consoles(fleet: dict) -> dict[str, str]:
    return {t["id"]: t["console"] for t in fleet["terminals"]}


def _heights(fleet: dict) -> dict[str, int]:
    out = {}
    for tid, url in _consoles(fleet).items():
        with ConsoleClient(url, timeout=5.0) as c:
            out[tid] = _json(c, "ledger height")["height"]
    return out


def _identity(tid: str) -> TerminalIdentity:
    """ecd-04's identity as tools/fleet.py derives it from the seed (the attacker holds it)."""
    seed = hashlib.sha256(f"edgekey fleet {SEED} identity {tid}".encode()).digest()
    return TerminalIdentity.from_seed(tid, seed)


def test_five_terminals_survive_power_cuts_and_refuse_a_forged_block(tmp_path: Path):
    d = tmp_path / "f5"
    fleet: dict = {}
    rng = random.Random(SEED)
    try:
        r = edgekey("fleet", "up", "--terminals", str(TERMINALS), "--meters", str(METERS),
                    "--dir", str(d), "--seed", str(SEED), "--reading-every", "0",
                    "--rotate-every", "2", "--start-spread", "1")
        assert r.returncode == 0, r.stdout + r.stderr
        fleet = json.loads((d / "fleet.json").read_text())
        assert sum(1 for t in fleet["terminals"] if t.get("etcd")) == 3
        _wait(lambda: len(_acked(d)) == METERS, 60, "every meter registered")

        # 1. Injected: power cuts of a random minority at random moments, twice.
        injected = []
        for _ in range(2):
            victims = rng.sample([t["id"] for t in fleet["terminals"]], rng.randint(1, 2))
            time.sleep(rng.uniform(0.5, 2.0))
            for v in victims:
                assert edgekey("fleet", "kill", "--dir", str(d), v).returncode == 0
            injected.append(victims)
            time.sleep(rng.uniform(1.0, 3.0))
            for v in victims:
                r = edgekey("fleet", "start", "--dir", str(d), v)
                assert r.returncode == 0, r.stdout + r.stderr
        fleet = json.loads((d / "fleet.json").read_text())
        before = sum(v for v, _ in _acked(d).values())
        _wait(lambda: sum(v for v, _ in _acked(d).values()) > before + 10, 60,
              "rotations after the power cuts")

        # 2. Injected: the etcd leader killed alone, then a follower; each restarted.
        tls = d / "tls"
        hosts = {t["etcd"]["name"]: t for t in fleet["terminals"] if t.get("etcd")}
        for role in ("leader", "follower"):
            with EtcdClient(fleet["etcd"]["endpoints"], ca=str(tls / "ca.crt"),
                            cert=str(tls / "ecd-00.crt"), key=str(tls / "ecd-00.key")) as etcd:
                st = etcd.status()
                names = {m["id"]: m["name"] for m in etcd.member_list()}
            leader = names[st["leader"]]
            name = leader if role == "leader" else sorted(set(hosts) - {leader})[0]
            host = hosts[name]
            os.kill(host["processes"]["etcd"]["pid"], signal.SIGKILL)
            injected.append([f"etcd {role} {name} ({host['id']})"])
            before = sum(v for v, _ in _acked(d).values())
            _wait(lambda b=before: sum(v for v, _ in _acked(d).values()) > b + 5, 60,
                  f"rotations with the etcd {role} down")
            r = edgekey("fleet", "start", "--dir", str(d), host["id"])
            assert r.returncode == 0, r.stdout + r.stderr
            fleet = json.loads((d / "fleet.json").read_text())
            hosts = {t["etcd"]["name"]: t for t in fleet["terminals"] if t.get("etcd")}

        # 3. Injected: the meters stop; a block nobody endorsed goes straight into etcd.
        def stop_meters() -> None:
            for t in fleet["terminals"]:
                pid = t["processes"]["meters"].get("pid")
                if _alive(pid):
                    os.kill(pid, signal.SIGTERM)
            _wait(lambda: not any(_alive(t["processes"]["meters"].get("pid"))
                                  for t in fleet["terminals"]), 20, "the meters to stop")

        stop_meters()
        _wait(lambda: len(set(_heights(fleet).values())) == 1, 30, "equal heights")
        tip = next(iter(_heights(fleet).values()))
        with ConsoleClient(_consoles(fleet)["ecd-00"]) as c:
            tip_hash = bytes.fromhex(_json(c, "status")["tip"])
        cheat = _identity("ecd-04")
        assert cheat.public_bytes().hex() in (d / "provisioning.json").read_text()
        tx = TxBuilder(cheat).register(b"\x99" * 6, key_version=1,
                                       fingerprint=hashlib.sha256(b"k").digest(), counter=1)
        forged = build_block(cheat, height=tip + 1, prev_hash=tip_hash,
                             timestamp_ms=int(time.time() * 1000), txs=[tx])
        with EtcdClient(fleet["etcd"]["endpoints"], ca=str(tls / "ca.crt"),
                        cert=str(tls / "ecd-04.crt"), key=str(tls / "ecd-04.key")) as etcd:
            key = chain_key(f"/edgekey/{d.name}/".encode(), tip + 1, "ecd-04-forged")
            assert etcd.create(key, encode_block(forged))

        def all_refused() -> bool:
            for url in _consoles(fleet).values():
                with ConsoleClient(url, timeout=5.0) as c:
                    if _json(c, "net")["network"].get("candidates.refused", 0) < 1:
                        return False
            return True

        _wait(all_refused, 20, "every terminal to refuse the forged block")
        assert set(_heights(fleet).values()) == {tip}  # nothing applied it

        # Survives: the fleet commits past the forged candidate once the meters run again.
        for t in fleet["terminals"]:
            assert edgekey("fleet", "start", "--dir", str(d), t["id"]).returncode == 0
        fleet = json.loads((d / "fleet.json").read_text())
        _wait(lambda: min(_heights(fleet).values()) > tip + 2, 60, "blocks past the forgery")
        stop_meters()
        _wait(lambda: len(set(_heights(fleet).values())) == 1, 30, "equal heights again")

        # Survives: one chain, and every acknowledged operation with its key at its home.
        digests = {}
        for tid, url in _consoles(fleet).items():
            with ConsoleClient(url, timeout=30.0) as c:
                digests[tid] = _json(c, "ledger verify")["state_digest"]
        assert len(set(digests.values())) == 1, digests
        acked = _acked(d)
        assert len(acked) == METERS
        with ConsoleClient(_consoles(fleet)["ecd-00"]) as c:
            homes = {m: _json(c, f"keys get {m}") for m in acked}
        for m, (version, key) in acked.items():
            got = homes[m]
            # the chain may be one ahead: a rotation committed, its ACK cut off by the stop
            assert version <= got["key_version"] <= version + 1, (m, version, got, injected)
            if got["key_version"] == version:
                assert got["fingerprint"] == fingerprint(bytes.fromhex(key)).hex(), (m, got)
            with ConsoleClient(_consoles(fleet)[got["home"]]) as c:
                assert _json(c, f"keys get {m}")["key_held_here"], (m, got)
        # A remote key query: ecd-00 fetches keys homed elsewhere, wrapped to itself.
        remote = [m for m, got in homes.items() if got["home"] != "ecd-00"][:3]
        assert remote
        with ConsoleClient(_consoles(fleet)["ecd-00"]) as c:
            for m in remote:
                got = _json(c, f"keys fetch {m}")
                assert got["matches_chain"] and got["path"] == ["ecd-00", homes[m]["home"]]
                assert got["key_version"] == homes[m]["key_version"]
            assert c.run("keys fetch 0000deadbeef").code == "ENOENT"
    finally:
        if (d / "fleet.json").exists():
            fleet = json.loads((d / "fleet.json").read_text())
            edgekey("fleet", "down", "--dir", str(d))
    pids = [p.get("pid") for t in fleet.get("terminals", []) for p in t["processes"].values()]
    assert not [p for p in pids if _alive(p)]
