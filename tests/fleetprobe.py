"""What the fleet tests share: the CLI, the consoles, the meters' state, waiting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tools.console_client import ConsoleClient

ROOT = Path(__file__).resolve().parents[1]


def edgekey(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, OSError):
        return False


def wait(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def acked(d: Path, terminals: tuple[str, ...] | None = None) -> dict[str, tuple[int, str]]:
    """Each meter's acknowledged key version and key, from the emulated meters' state."""
    out = {}
    for f in sorted(d.glob("ecd-*.meter-state/*.json")):
        if terminals is not None and f.parent.name.split(".")[0] not in terminals:
            continue
        s = json.loads(f.read_text())
        if s.get("key_version"):
            out[f.stem] = (int(s["key_version"]), s["key"])
    return out


def console_json(c: ConsoleClient, cmd: str) -> dict:
    r = c.run(f"{cmd} --json")
    assert r.ok, (cmd, r)
    return json.loads(r.body.splitlines()[-1])


def consoles(fleet: dict) -> dict[str, str]:
    return {t["id"]: t["console"] for t in fleet["terminals"]}


def heights(fleet: dict) -> dict[str, int]:
    out = {}
    for tid, url in consoles(fleet).items():
        with ConsoleClient(url, timeout=5.0) as c:
            out[tid] = console_json(c, "ledger height")["height"]
    return out


def stop_meters(fleet: dict) -> None:
    """SIGTERM every emulated meter process (they save their state) and wait for them."""
    for t in fleet["terminals"]:
        pid = t["processes"]["meters"].get("pid")
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
    wait(lambda: not any(alive(t["processes"]["meters"].get("pid"))
                         for t in fleet["terminals"]), 20, "the meters to stop")


def digests(fleet: dict) -> dict[str, str]:
    out = {}
    for tid, url in consoles(fleet).items():
        with ConsoleClient(url, timeout=30.0) as c:
            out[tid] = console_json(c, "ledger verify")["state_digest"]
    return out


def all_pids(fleet: dict) -> list[int]:
    return [p["pid"] for t in fleet.get("terminals", []) for p in t["processes"].values()
            if p.get("pid")]


def converged(fleet: dict, d: Path, asked_at: str) -> None:
    """The meters stop; every chain reaches one height and one full-state digest; every key
    version a meter had acknowledged is on the chain (one ahead at most: a rotation that
    committed while its ACK was cut off by the stop), as ``asked_at`` reads it."""
    stop_meters(fleet)
    wait(lambda: len(set(heights(fleet).values())) == 1, 60, "equal heights")
    found = digests(fleet)
    assert len(set(found.values())) == 1, found
    with ConsoleClient(consoles(fleet)[asked_at]) as c:
        for m, (version, _key) in acked(d).items():
            got = console_json(c, f"keys get {m}")
            assert version <= got["key_version"] <= version + 1, (m, version, got)


def down(d: Path, fleet: dict) -> dict:
    """``fleet down`` (whatever state the test left) and the fleet it read; no process left."""
    if (d / "fleet.json").exists():
        fleet = json.loads((d / "fleet.json").read_text())
        edgekey("fleet", "down", "--dir", str(d))
    assert not [p for p in all_pids(fleet) if alive(p)]
    return fleet
