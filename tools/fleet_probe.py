"""A running fleet read from outside: the CLI, the consoles, the meters' state, waiting.

What the fleet tests and ``edgekey bench faults`` share: they drive a fleet
``edgekey fleet up`` started (through the CLI, as an operator would) and
judge it only by what it shows, the consoles and the emulated meters'
files (``DIR/ecd-NN.meter-state/<meter>.json``: what each meter had
acknowledged). A failed wait or check raises ``ProbeError``, an
``AssertionError``, so a test reports it as a failed check.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tools.console_client import ConsoleClient, ConsoleError
from tools.fleet import PROCESS_MARK

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_TIMEOUT_S = 5.0
VERIFY_TIMEOUT_S = 30.0  # ``ledger verify`` re-reads the whole chain
METERS_STOP_S = 20.0


class ProbeError(AssertionError):
    """The fleet did not do what a probe waited for or checked."""


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


def wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.25)
    raise ProbeError(f"timed out after {timeout:.0f} s waiting for {what}")


def load(d: Path) -> dict:
    """``DIR/fleet.json`` as it is now (``fleet start`` rewrites it with the new pids)."""
    return json.loads((d / "fleet.json").read_text())


def meter_states(d: Path, terminals: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Each emulated meter's saved state (``Meter.state()``), by meter id."""
    out = {}
    for f in sorted(d.glob("ecd-*.meter-state/*.json")):
        if terminals is not None and f.parent.name.split(".")[0] not in terminals:
            continue
        try:
            out[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError):  # replaced while read: the meter is saving it
            continue
    return out


def acked(d: Path, terminals: tuple[str, ...] | None = None) -> dict[str, tuple[int, str]]:
    """Each meter's acknowledged key version and key, from the emulated meters' state."""
    return {m: (int(s["key_version"]), s["key"]) for m, s in meter_states(d, terminals).items()
            if s.get("key_version")}


def console_json(c: ConsoleClient, cmd: str) -> dict:
    r = c.run(f"{cmd} --json")
    if not r.ok:
        raise ProbeError(f"{cmd}: {r}")
    return json.loads(r.body.splitlines()[-1])


def consoles(fleet: dict) -> dict[str, str]:
    return {t["id"]: t["console"] for t in fleet["terminals"]}


def _each(fleet: dict, cmd: str, name: str, timeout: float) -> dict:
    """One field of ``cmd``'s answer on every terminal's console."""
    out = {}
    for tid, url in consoles(fleet).items():
        with ConsoleClient(url, timeout=timeout) as c:
            out[tid] = console_json(c, cmd)[name]
    return out


def heights(fleet: dict, timeout: float = CONSOLE_TIMEOUT_S) -> dict[str, int]:
    return _each(fleet, "ledger height", "height", timeout)


def statuses(fleet: dict, timeout: float = CONSOLE_TIMEOUT_S) -> dict[str, dict | None]:
    """Every terminal's ``status``, None for one whose console does not answer (down, or
    rebooting): for watching a fleet while faults come and go."""
    out: dict[str, dict | None] = {}
    for tid, url in consoles(fleet).items():
        try:
            with ConsoleClient(url, timeout=timeout) as c:
                out[tid] = console_json(c, "status")
        except (ConsoleError, OSError, ValueError, ProbeError):
            out[tid] = None
    return out


def stop_meters(fleet: dict, timeout: float = METERS_STOP_S) -> None:
    """SIGTERM every emulated meter process (they save their state) and wait for them."""
    for t in fleet["terminals"]:
        pid = t["processes"].get("meters", {}).get("pid")
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
    wait(lambda: not any(alive(t["processes"].get("meters", {}).get("pid"))
                         for t in fleet["terminals"]), timeout, "the meters to stop")


def digests(fleet: dict, timeout: float = VERIFY_TIMEOUT_S) -> dict[str, str]:
    return _each(fleet, "ledger verify", "state_digest", timeout)


def all_pids(fleet: dict) -> list[int]:
    return [p["pid"] for t in fleet.get("terminals", []) for p in t["processes"].values()
            if p.get("pid")]


def marked_pids(d: Path) -> list[int]:
    """Every running process of the fleet in ``d``, by the mark ``tools.fleet`` puts in its
    children's environment: also those a ``fleet up`` or ``start`` cut short started
    without writing them to ``fleet.json``."""
    mark = f"{PROCESS_MARK}={d.resolve()}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if mark in env and alive(int(entry)):
            out.append(int(entry))
    return out


@dataclass
class AckedCheck:
    """Every acknowledged key version against the chain, as the meters' homes read it."""

    meters: int = 0
    # meter -> why its acknowledged version is not intact: the chain is behind it (or has
    # no such meter), the key on the chain is another than the meter's, or its home does
    # not hold the key it acknowledged
    lost: dict[str, str] = field(default_factory=dict)
    one_ahead: int = 0  # a rotation that committed with its ACK cut off
    # of those, the home does not hold the new key yet: the meter still has it in its
    # operation out and hands it over again when it re-sends (agent/node/reconcile.py)
    pending_at_home: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.lost


def etcd_dropped_below(d: Path, fleet: dict, height: int) -> bool:
    """Whether etcd holds no candidate block below ``height`` any more (the proposer's
    retention deleted them). False while etcd does not answer: a member killed with its
    terminal, a leader being elected."""
    from agent.net.etcd import EtcdClient, EtcdError
    from agent.net.ordering import chain_key

    tls = d / "tls"
    first = fleet["terminals"][0]["id"]  # any terminal's certificate opens etcd
    prefix = f"/edgekey/{d.name}/".encode()
    try:
        with EtcdClient(fleet["etcd"]["endpoints"], ca=str(tls / "ca.crt"),
                        cert=str(tls / f"{first}.crt"), key=str(tls / f"{first}.key"),
                        timeout_s=5.0) as etcd:
            return not etcd.range(chain_key(prefix, 0, ""), chain_key(prefix, height, ""),
                                  limit=1).kvs
    except EtcdError:
        return False


def check_acked(fleet: dict, d: Path, timeout: float = CONSOLE_TIMEOUT_S) -> AckedCheck:
    """Each meter's acknowledged (version, key) on the chain at its home, the key held there.

    The chain may be one version ahead of the meter (a rotation committed while its ACK
    was lost): then the key on the chain is the one the meter's operation out proposes;
    when they agree, the fingerprint on the chain is the meter's key's."""
    from agent.keystore.material import fingerprint

    states = meter_states(d)
    done = {m: (int(s["key_version"]), s["key"]) for m, s in states.items()
            if s.get("key_version")}
    out = AckedCheck(meters=len(done))
    urls = consoles(fleet)
    planned = {m["id"]: t["id"] for t in fleet["terminals"]
               for m in json.loads(Path(t["meters_file"]).read_text())}
    by_home: dict[str, list[str]] = {}
    for m in done:
        by_home.setdefault(planned.get(m, next(iter(urls))), []).append(m)
    answers: dict[str, dict] = {}
    for home, ms in sorted(by_home.items()):
        with ConsoleClient(urls[home], timeout=timeout) as c:
            for m in ms:
                r = c.run(f"keys get {m} --json")
                answers[m] = json.loads(r.body.splitlines()[-1]) if r.ok else {"error": str(r)}
    for m, got in list(answers.items()):  # rehomed since it was planned: ask the real home
        if got.get("home") not in (None, planned.get(m)) and got["home"] in urls:
            with ConsoleClient(urls[got["home"]], timeout=timeout) as c:
                answers[m] = console_json(c, f"keys get {m}")
    for m, (version, key) in done.items():
        got = answers[m]
        chain = got.get("key_version")
        op = states[m].get("op") or {}
        if chain is None:
            out.lost[m] = f"not on the chain: {got.get('error', got)}"
        elif not version <= chain <= version + 1:
            out.lost[m] = f"acknowledged v{version}, the chain has v{chain}"
        elif chain == version and got["fingerprint"] != fingerprint(bytes.fromhex(key)).hex():
            out.lost[m] = f"v{version} on the chain is another key"
        elif chain == version:
            if not got.get("key_held_here"):
                out.lost[m] = f"its home {got.get('home')} does not hold v{chain}"
        elif got.get("key_held_here"):
            out.one_ahead += 1
        elif op.get("new_key") and got["fingerprint"] == fingerprint(
                bytes.fromhex(op["new_key"])).hex():
            out.one_ahead += 1
            out.pending_at_home.append(m)
        else:
            out.lost[m] = (f"v{chain} on the chain is held neither by its home "
                           f"{got.get('home')} nor by the meter")
    return out


def converged(fleet: dict, d: Path, asked_at: str) -> None:
    """The meters stop; every chain reaches one height and one full-state digest; every key
    version a meter had acknowledged is on the chain (one ahead at most: a rotation that
    committed while its ACK was cut off by the stop), as ``asked_at`` reads it."""
    stop_meters(fleet)
    deadline = time.monotonic() + 60
    while True:  # digests are compared only at one height, the same before and after reading
        wait(lambda: len(set(heights(fleet).values())) == 1, 60, "equal heights")
        before = heights(fleet)
        found = digests(fleet)
        if heights(fleet) == before:
            break
        if time.monotonic() > deadline:  # an operation still in flight kept committing
            raise ProbeError(f"the chains never stood still: {before} then {heights(fleet)}")
        time.sleep(1.0)
    if len(set(found.values())) != 1:
        raise ProbeError(f"the chains differ at height {next(iter(before.values()))}: {found}")
    with ConsoleClient(consoles(fleet)[asked_at]) as c:
        for m, (version, _key) in acked(d).items():
            got = console_json(c, f"keys get {m}")
            if not version <= got["key_version"] <= version + 1:
                raise ProbeError(f"{m}: acknowledged v{version}, {asked_at} has {got}")


def down(d: Path, fleet: dict) -> dict:
    """``fleet down`` (whatever state the test left) and the fleet it read; no process left."""
    if (d / "fleet.json").exists():
        fleet = load(d)
        edgekey("fleet", "down", "--dir", str(d))
    left = [p for p in all_pids(fleet) if alive(p)]
    if left:
        raise ProbeError(f"still running after fleet down: {left}")
    return fleet
