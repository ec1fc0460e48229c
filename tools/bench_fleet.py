"""``edgekey bench fleet``: a fleet of terminals on etcd, measured from outside, beside Table 1.

Set-up: ``tools.provision_cmd.provision_fleet`` makes N terminals (default 13, the
paper's N) with the etcd members hosted by the first ones; the members and
the N agents start on this machine. No PLC channel and no emulated meter
process: the bench speaks for every meter itself, on each agent's hplc link
over a pty (``FleetAgent``: ``AgentProc``'s plumbing for one terminal of a
fleet), with ``TestMeter``'s frames and ACK checks.

Figures (JSON + table):

- every meter registered at its home first (the set-up's time and answers);
- for each offered rate: rotations offered open-loop, Poisson arrivals with
  a fixed seed over all meters uniformly, each sent at its arrival time to
  the meter's home whatever the answers so far. A meter has one request at
  a time, so an arrival for a meter still waiting is skipped and counted
  (``skipped_busy``): by Little's law, 300 meters at a latency L cannot
  offer more than 300/L requests a second, and a slow fleet shows as fewer
  requests sent, not as a queue. Per rate: committed ops/s (ACKs over the
  time to the last one), latency from arrival to the authenticated ACK
  (p50/p99/mean), NAKs by reason, timeouts (no answer after the drain),
  agents' CPU seconds per committed op (all agents, and per terminal),
  bytes the terminals sent each other per committed op (``net``'s
  transport ``bytes_out``; etcd's own traffic is not in it), the etcd
  members' CPU, blocks committed and transactions per block; beside them,
  the paper's chain-building time of Table 1 at the same lambda. Rates go
  on past the given ones by ``--step`` until the fleet saturates (committed
  below 80 % of offered, or p99 over 10 s) or ``--max-rate``;
- catch-up: with no meter load, one terminal that hosts no etcd member is
  stopped (SIGTERM), the bench writes ``--catchup-blocks`` valid blocks into
  etcd as candidates at the next heights (registers of fresh meter ids
  proposed and signed by the first terminal's identity, endorsed by a
  majority of the fleet's identities, which ``tools.provision_cmd`` derives from
  the seed), the running terminals apply them, then the stopped one starts
  again and is timed until its ledger reaches the last height.

Every process started (etcd members, agents) is stopped on every path,
Ctrl-C and SIGTERM included: SIGTERM, then SIGKILL after a timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import meterproto as mp
from agent.node.actions import Nak
from emulator.agent_harness import ROOT, AgentProc, TestMeter
from hal.dlt698 import NEED_DATA, Frame, FrameDecoder
from tools import fleet as fleet_tools
from tools import provision_cmd
from tools.bench_agent import _pct, _registration, _rotation, poisson, proc_sample
from tools.paper import PAPER_TABLE1
from tools.signals import sigterm_unwinds

DEFAULT_RATES = (50.0, 100.0, 150.0, 200.0)
RATE_STEP = 100.0
MAX_RATE = 1000.0
SATURATED_FRACTION = 0.8  # committed below this share of the offered rate: saturated
SATURATED_P99_S = 10.0
DRAIN_S = 10.0
REGISTER_RATE = 50.0  # registrations per second offered during set-up
REGISTER_ROUNDS = 4
READY_TIMEOUT_S = 120.0
SYNC_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
IDLE_S = 3.0
CATCHUP_POLL_S = 0.2  # the restarted terminal's console, while it catches up
RUNNING_POLL_S = 1.0  # the running terminals', while the bench writes (lighter on the writer)
TAIL_MAX = 200  # `ledger tail` rows read at once (the shell cuts a reply at 64 KiB)
CATCHUP_METER = b"\xbe"  # fresh meter ids of the catch-up blocks: 0xbe + 5 bytes
UNCERTAIN = {Nak.TIMEOUT, Nak.BAD_PROOF, Nak.STALE_VERSION, Nak.KEY_PENDING}


# ------------------------------------------------------------------ plumbing

class FleetAgent(AgentProc):
    """One terminal of a provisioned fleet on two ptys (console, hplc link).

    ``AgentProc`` provisions a fleet of one; this takes a terminal of a fleet
    ``provision_fleet`` made and keeps the rest of its plumbing (console,
    ``wait_ready``, ``stop``, ``close``), starting the agent with the fleet's
    TLS material in a session of its own so a Ctrl-C reaches only the bench.
    """

    def __init__(self, directory: Path, terminal: dict[str, Any], *, board: str,
                 python: list[str], log_level: str, agent_args: tuple[str, ...] = ()):
        self.id: str = terminal["id"]
        self.agent_args = agent_args  # on every start (routing method, emulated WAN)
        self.attach(directory, terminal, board=board, python=python)
        self.log_level = log_level
        self.pids: list[int] = []
        self.stderr_path = directory / f"{self.id}.agent.log"
        self._console_buf = bytearray()
        self._stderr_mark = 0

    def args(self, *, board: str | None = None, extra: tuple[str, ...] = ()) -> list[str]:
        return [*self.python, "-m", "agent", "--board", board or self.board, "--node", self.id,
                "--flash", str(self.image), "--trust", str(self.dir / "utility.pub"),
                "--device-key", self.device_key, "--tls-dir", str(self.dir / "tls"),
                "--log-level", self.log_level, "--links", f"console={self.console_path}",
                f"hplc={self.link_path}", *self.agent_args, *extra]

    def launch(self, *extra: str) -> None:
        """Start the agent; ``wait_ready`` waits for it."""
        self._stderr_mark = len(self.stderr())
        with open(self.stderr_path, "ab") as log:
            self.proc = subprocess.Popen(self.args(extra=extra), cwd=ROOT,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        self.pids.append(self.proc.pid)
        self._console_buf.clear()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def json(self, line: str, timeout: float = 20.0) -> Any:
        """A console command's ``--json`` answer (``console_json`` with a timeout)."""
        body, status = self.console(line + " --json", timeout=timeout)
        if status != "OK":
            raise RuntimeError(f"{self.id}: {line}: {status} {body}")
        return json.loads(body.strip().splitlines()[-1])


def _terminate(procs: list[subprocess.Popen[bytes]], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to every process still running, then SIGKILL whatever outlives ``timeout``."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _stop_etcd(pids: list[int], mark: str) -> None:
    """The etcd members ``tools.fleet`` started: SIGTERM, then SIGKILL after a timeout."""
    live = [p for p in pids if fleet_tools._alive(p, mark)]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    fleet_tools._wait_gone(live, STOP_TIMEOUT_S, mark)
    for p in live:
        if fleet_tools._alive(p, mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    fleet_tools._wait_gone(live, STOP_TIMEOUT_S, mark)


def _bar(total: int, desc: str, enabled: bool, unit: str = "req") -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        class _Null:
            n = 0

            def update(self, n: int = 1) -> None: ...
            def set_postfix_str(self, s: str) -> None: ...
            def close(self) -> None: ...
        return _Null()
    return tqdm(total=total, desc=desc, unit=unit, mininterval=0.5, leave=False)


# ------------------------------------------------------------------- meters

@dataclass
class Tally:
    """One phase's requests: offered, sent, skipped, answered, and how fast."""

    arrivals: int = 0
    sent: int = 0
    skipped_busy: int = 0
    acked: int = 0
    naks: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    outstanding: int = 0
    answered_late: int = 0  # after the phase's drain (counted nowhere else)
    bad_acks: int = 0
    t0: float = 0.0
    offered_s: float = 0.0
    last_ack: float = 0.0
    closed: bool = False


class FleetLoop:
    """Meters on their homes' hplc links, requests sent at their arrival times (open loop).

    One request per meter at a time: an arrival for a meter still waiting
    for its answer, or whose last answer left its key in doubt (a TIMEOUT
    may still commit), is skipped and counted. Doubtful meters are squared
    with the chain between phases (``resync``).
    """

    def __init__(self, meters: dict[bytes, TestMeter], homes: dict[bytes, FleetAgent]):
        self.meters = meters
        self.homes = homes
        self.fds = sorted({a.link_m for a in homes.values()})
        self.decoders = {fd: FrameDecoder() for fd in self.fds}
        self.busy: dict[bytes, tuple[float, object, Tally]] = {}
        self.uncertain: set[bytes] = set()
        self.undecodable = 0

    def offer(self, meter_id: bytes, at: float, make: Any, tally: Tally) -> None:
        tally.arrivals += 1
        if meter_id in self.busy or meter_id in self.uncertain:
            tally.skipped_busy += 1
            return
        m = self.meters[meter_id]
        event = make()
        m.send_raw(m.frame(mp.encode_request(event)))
        self.busy[meter_id] = (at, event, tally)
        tally.sent += 1
        tally.outstanding += 1

    def pump(self, until: float) -> None:
        while True:
            wait = until - time.monotonic()
            if wait <= 0:
                return
            ready, _, _ = select.select(self.fds, [], [], wait)
            if not ready:
                return
            for fd in ready:
                decoder = self.decoders[fd]
                decoder.receive_data(os.read(fd, 65536))
                while (e := decoder.next_event()) is not NEED_DATA:
                    if not isinstance(e, Frame):
                        continue
                    try:
                        answer = mp.decode_answer(e.apdu)
                    except ValueError:
                        self.undecodable += 1
                        continue
                    self._answer(bytes(e.server.address), answer)

    def _answer(self, meter_id: bytes, a: mp.AckAnswer | mp.NakAnswer) -> None:
        entry = self.busy.pop(meter_id, None)
        if entry is None:
            return
        arrival, event, tally = entry
        tally.outstanding -= 1
        now = time.monotonic()
        try:
            self.meters[meter_id].take(event, a)
        except AssertionError:  # an ACK that does not authenticate under the new key
            tally.bad_acks += 1
            self.uncertain.add(meter_id)
            return
        if tally.closed:
            tally.answered_late += 1
        elif isinstance(a, mp.AckAnswer):
            tally.acked += 1
            tally.latencies.append(now - arrival)
            tally.last_ack = now
        else:
            tally.naks[a.reason] += 1
        if isinstance(a, mp.NakAnswer) and a.reason in UNCERTAIN:
            self.uncertain.add(meter_id)

    def run(self, arrivals: list[tuple[float, bytes, Any]], tally: Tally, drain_s: float,
            bar: Any) -> None:
        """Offer ``arrivals`` (offset s, meter, make-request) in order, then drain."""
        t0 = tally.t0 = time.monotonic()
        i = 0
        while i < len(arrivals):
            offset, meter_id, make = arrivals[i]
            at = t0 + offset
            if at <= time.monotonic():
                self.offer(meter_id, at, make, tally)
                bar.update(1)
                i += 1
                continue
            self.pump(at)
        tally.offered_s = time.monotonic() - t0
        end = time.monotonic() + drain_s
        while tally.outstanding and time.monotonic() < end:
            self.pump(min(end, time.monotonic() + 0.05))
            bar.set_postfix_str(f"draining, {tally.outstanding} outstanding")
        tally.closed = True

    def quiesce(self, timeout: float) -> None:
        """Pump until no request of any phase is outstanding (the agents answer every one
        by their operation timeout), or ``timeout``."""
        end = time.monotonic() + timeout
        while self.busy and time.monotonic() < end:
            self.pump(min(end, time.monotonic() + 0.05))

    def resync(self) -> dict[str, int]:
        """Square every doubtful meter with the chain at its home (``keys get``)."""
        from agent.keystore.material import fingerprint

        out = Counter[str]()
        for meter_id in sorted(self.uncertain - set(self.busy)):
            keys = self.meters[meter_id].keys
            body, status = self.homes[meter_id].console(f"keys get {meter_id.hex()} --json")
            if status == "OK":
                got = json.loads(body.strip().splitlines()[-1])
                if (keys.pending is not None and got["key_version"] == keys.key_version + 1
                        and got["fingerprint"] == fingerprint(keys.pending).hex()):
                    keys.acknowledged(got["key_version"])
                    out["committed_after_all"] += 1
                elif got["key_version"] == keys.key_version:
                    out["not_committed"] += 1
                else:
                    out["lost"] += 1  # the chain holds a key this meter no longer has
                    continue
            else:
                out["not_on_chain"] += 1
            self.uncertain.discard(meter_id)
        return dict(out)


def _nak_names(naks: Counter[int]) -> dict[str, int]:
    out = {}
    for code, n in sorted(naks.items()):
        try:
            out[Nak(code).name] = n
        except ValueError:
            out[f"code_{code}"] = n
    return out


def _latency(samples: list[float]) -> dict[str, float]:
    out = _pct(samples)
    if samples:
        out["mean_ms"] = sum(samples) / len(samples) * 1e3
    return out


# --------------------------------------------------------------- the fleet

class Fleet:
    """The provisioned fleet's processes: etcd members and agents, stopped by ``close``."""

    def __init__(self, directory: Path, *, terminals: int, meters: int, etcd_members: int,
                 seed: int, python: list[str], log_level: str,
                 agent_args: tuple[str, ...] = ()):
        self.dir = directory
        self.seed = seed
        self.desc = provision_cmd.provision_fleet(directory, terminals=terminals, meters=meters,
                                                board_name="host", seed=seed,
                                                etcd_members=etcd_members)
        self.name = directory.name
        self.members = self.desc["etcd"]["members"]
        self.agents = [FleetAgent(directory, t, board=self.desc["board"], python=python,
                                  log_level=log_level, agent_args=agent_args)
                       for t in self.desc["terminals"]]
        self.by_id = {a.id: a for a in self.agents}
        for t in self.desc["terminals"]:
            if t.get("etcd"):
                t["processes"] = {"etcd": {"cmd": fleet_tools._etcd_command(
                    directory, t["id"], t["etcd"], self.members), "wait": []}}
            else:
                t["processes"] = {}

    def etcd_pids(self) -> dict[str, int]:
        return {t["id"]: t["processes"]["etcd"]["pid"] for t in self.desc["terminals"]
                if t["processes"].get("etcd", {}).get("pid")}

    def start_etcd(self) -> None:
        fleet_tools._start_etcd(self.dir, self.desc, [t["id"] for t in self.desc["terminals"]])

    def start_agents(self, progress: bool) -> None:
        bar = _bar(len(self.agents), "agents", progress, unit="terminal")
        for a in self.agents:
            a.launch("--format")
        for a in self.agents:
            a.wait_ready(READY_TIMEOUT_S)
            bar.update(1)
        bar.close()

    def wait_synced(self, agents: list[FleetAgent] | None = None) -> str:
        """Until every agent says it is current and all name the same proposer; its id."""
        agents = agents or self.agents
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while True:
            status = [a.json("status") for a in agents]
            proposers = {s["proposer"] for s in status}
            if all(s["synced"] for s in status) and len(proposers) == 1 and None not in proposers:
                return str(proposers.pop())
            if time.monotonic() > deadline:
                raise RuntimeError(f"the fleet did not settle in {SYNC_TIMEOUT_S:.0f} s: " +
                                   ", ".join(f"{s['node']} synced={s['synced']} proposer="
                                             f"{s['proposer']}" for s in status))
            time.sleep(0.5)

    def processes(self) -> dict[str, Any]:
        return {"agents": {a.id: list(a.pids) for a in self.agents}, "etcd": self.etcd_pids()}

    def close(self) -> None:
        try:
            _terminate([a.proc for a in self.agents if a.proc is not None])
        finally:
            for a in self.agents:
                a.close()
            _stop_etcd(list(self.etcd_pids().values()), fleet_tools._mark(self.dir))


def _meters(fleet: Fleet) -> tuple[dict[bytes, TestMeter], dict[bytes, FleetAgent]]:
    meters: dict[bytes, TestMeter] = {}
    homes: dict[bytes, FleetAgent] = {}
    for k, a in enumerate(fleet.agents):
        for i in range(len(a.meters)):
            m = TestMeter(a, i, seed=fleet.seed * 1000 + k)
            meters[m.meter_id] = m
            homes[m.meter_id] = a
    return meters, homes


def _register(loop: FleetLoop, drain_s: float, progress: bool) -> dict[str, Any]:
    """Every meter registered at its home, in rounds until all are (or REGISTER_ROUNDS)."""
    t0 = time.monotonic()
    tallies = []
    todo = sorted(loop.meters)
    for _ in range(REGISTER_ROUNDS):
        if not todo:
            break
        tally = Tally()
        bar = _bar(len(todo), "register", progress)
        loop.run([(i / REGISTER_RATE, mid, _registration(loop.meters[mid]))
                  for i, mid in enumerate(todo)], tally, max(drain_s, 30.0), bar)
        bar.close()
        loop.quiesce(40.0)
        loop.resync()
        tallies.append(tally)
        todo = [m for m in todo if loop.meters[m].keys.key is None]
    first = tallies[0] if tallies else Tally()
    return {"meters": len(loop.meters), "registered": len(loop.meters) - len(todo),
            "seconds": time.monotonic() - t0, "rounds": len(tallies),
            "offered_per_s": REGISTER_RATE, "first_round": {
                "acked": first.acked, "naks": _nak_names(first.naks),
                "timeouts": first.outstanding, "latency": _latency(first.latencies)}}


def _cpu(fleet: Fleet, agents: list[FleetAgent]) -> dict[str, Any]:
    """CPU seconds so far: each agent, each etcd member, this driver; and the time."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": {a.id: proc_sample(a.pid)[0] for a in agents},
            "etcd_cpu": {t: proc_sample(p)[0] for t, p in fleet.etcd_pids().items()},
            "driver_cpu": ru.ru_utime + ru.ru_stime, "t": time.monotonic()}


def _counters(agents: list[FleetAgent]) -> dict[str, Any]:
    """Bytes each terminal sent its peers so far, and the first terminal's height."""
    nets = {a.id: a.json("net") for a in agents}
    return {"bytes_out": {t: int(n["transport"].get("bytes_out", 0)) for t, n in nets.items()},
            "peer_bytes_out": {t: {p: int(s.get("bytes_out", 0)) for p, s in n["peers"].items()}
                               for t, n in nets.items()},
            "proposer": nets[agents[0].id]["proposer"],
            "height": int(agents[0].json("ledger height")["height"])}


def _idle(fleet: Fleet) -> dict[str, Any]:
    a = _cpu(fleet, fleet.agents)
    time.sleep(IDLE_S)
    b = _cpu(fleet, fleet.agents)
    dt = b["t"] - a["t"]
    return {"seconds": dt,
            "agents_cpu_percent": 100 * sum(b["cpu"][t] - a["cpu"][t] for t in a["cpu"]) / dt,
            "etcd_cpu_percent": 100 * sum(b["etcd_cpu"][t] - a["etcd_cpu"][t]
                                          for t in a["etcd_cpu"]) / dt}


def _txs_per_block(agent: FleetAgent, blocks: int) -> tuple[float | None, int]:
    """Mean transactions of the newest ``blocks`` blocks (at most TAIL_MAX read)."""
    n = min(blocks, TAIL_MAX)
    if n <= 0:
        return None, 0
    rows = agent.json(f"ledger tail -n {n}")
    return (sum(r["txs"] for r in rows) / len(rows) if rows else None), len(rows)


def _rate(fleet: Fleet, loop: FleetLoop, rate: float, seconds: float, drain_s: float,
          rng: random.Random, progress: bool) -> tuple[dict[str, Any], Tally]:
    ids = sorted(m for m in loop.meters if loop.meters[m].keys.key is not None)
    times = poisson(rate, round(rate * seconds), rng)
    picks = [ids[rng.randrange(len(ids))] for _ in times]
    arrivals = [(t, mid, _rotation(loop.meters[mid])) for t, mid in zip(times, picks,
                                                                         strict=True)]
    before = _counters(fleet.agents) | _cpu(fleet, fleet.agents)
    tally = Tally()
    bar = _bar(len(arrivals), f"{rate:g}/s", progress)
    loop.run(arrivals, tally, drain_s, bar)
    bar.close()
    after = _cpu(fleet, fleet.agents)  # the window ends here, before the console reads
    after |= _counters(fleet.agents)
    tables = {a.id: a.json("route") for a in fleet.agents}
    hops = [len(path) - 1 for t in tables.values() for path in t.get("paths", {}).values()]
    routing = {"method": next(iter(tables.values())).get("method"),
               "mean_hops": sum(hops) / len(hops) if hops else None,
               "max_hops": max(hops, default=None),
               "mesh": sorted({lk["link"] for t in tables.values() for lk in t.get("links", [])}),
               "relayed": {t: tb.get("overlay", {}) for t, tb in tables.items()}}
    blocks = after["height"] - before["height"]
    mean_txs, sampled = _txs_per_block(fleet.agents[0], blocks)
    acked = tally.acked
    # ACKs over the window: the offered seconds, or up to the last ACK when that is later
    window_s = max(seconds, tally.last_ack - tally.t0)
    committed_per_s = acked / window_s
    n_term = len(fleet.agents)
    cpu = {t: after["cpu"][t] - before["cpu"][t] for t in before["cpu"]}
    etcd = {t: after["etcd_cpu"][t] - before["etcd_cpu"][t] for t in before["etcd_cpu"]}
    sent_bytes = {t: after["bytes_out"][t] - before["bytes_out"][t] for t in before["bytes_out"]}
    link_bytes: Counter[str] = Counter()  # both directions of each terminal pair that talked
    for t, peers in after["peer_bytes_out"].items():
        for p, n in peers.items():
            sent = n - before["peer_bytes_out"].get(t, {}).get(p, 0)
            if sent > 0:
                link_bytes["|".join(sorted((t, p)))] += sent
    elapsed = after["t"] - before["t"]
    per_op = (lambda x: x / acked) if acked else (lambda x: None)
    lat = _latency(tally.latencies)
    proposer = before["proposer"] if before["proposer"] == after["proposer"] else None
    paper = PAPER_TABLE1.get(int(rate)) if float(rate).is_integer() else None
    saturated = (committed_per_s < SATURATED_FRACTION * rate
                 or lat.get("p99_ms", 0.0) > SATURATED_P99_S * 1e3)
    row = {
        "offered_per_s": rate, "seconds": seconds, "arrivals": tally.arrivals,
        "sent": tally.sent, "sent_per_s": tally.sent / max(tally.offered_s, 1e-9),
        "skipped_busy": tally.skipped_busy, "committed": acked,
        "committed_per_s": committed_per_s, "window_s": window_s, "latency": lat,
        "naks": _nak_names(tally.naks), "timeouts": tally.outstanding,
        "bad_acks": tally.bad_acks,
        "paper_chain_building_ms": paper[0] if paper else None,
        "blocks": blocks, "txs_per_block": mean_txs, "blocks_sampled": sampled,
        "acks_per_block": acked / blocks if blocks else None,
        "measured_s": elapsed, "proposer": proposer,
        "cpu": {
            "proposer_ms_per_op": None if not (acked and proposer) else 1e3 * cpu[proposer]
            / acked,
            "agents_s": sum(cpu.values()), "per_terminal_s": cpu,
            "agents_percent": 100 * sum(cpu.values()) / elapsed,
            "agents_ms_per_op": None if not acked else 1e3 * sum(cpu.values()) / acked,
            "terminal_ms_per_op": None if not acked else 1e3 * sum(cpu.values()) / acked / n_term,
            "etcd_s": sum(etcd.values()), "etcd_per_member_s": etcd,
            "etcd_percent": 100 * sum(etcd.values()) / elapsed,
            "etcd_ms_per_op": None if not acked else 1e3 * sum(etcd.values()) / acked,
            "driver_percent": 100 * (after["driver_cpu"] - before["driver_cpu"]) / elapsed},
        "bytes_out": {
            "total": sum(sent_bytes.values()), "per_terminal": sent_bytes,
            "per_op": per_op(sum(sent_bytes.values())),
            "per_op_per_terminal": None if not acked else sum(sent_bytes.values()) / acked
            / n_term,
            "proposer_per_op": None if not (acked and proposer) else sent_bytes[proposer]
            / acked,
            "per_link": dict(sorted(link_bytes.items()))},
        "saturated": saturated,
        "routing": routing,
    }
    return row, tally


# ----------------------------------------------------------------- catch-up

def _catchup_chain(fleet: Fleet, tip: dict[str, Any], blocks: int, txs_per_block: int,
                   proposer: str, progress: bool) -> list[tuple[int, bytes, bytes]]:
    """``blocks`` valid blocks on the fleet's tip: (height, header hash, encoding) each.

    The fleet's membership is its genesis (no terminal joined or retired) and
    the blocks register fresh meter ids only, so a ``LedgerState`` of the
    genesis moved to the fleet's tip judges them as every terminal will.
    """
    from agent import provisioning as prov
    from agent.ledger.block import encode_block, endorse, header_hash, with_endorsements
    from agent.ledger.identity import TerminalIdentity
    from agent.ledger.rules import apply_block, propose_block, validate_block
    from agent.ledger.state import LedgerState, Tip
    from agent.ledger.tx import TxBuilder
    from hal.board import board_path, load_board

    d = fleet.dir
    p = prov.verify((d / "provisioning.json").read_bytes(),
                    bytes.fromhex((d / "utility.pub").read_text().strip()))
    pow_difficulty = load_board(board_path(fleet.desc["board"])).ledger.pow_difficulty
    ids = [a.id for a in fleet.agents]
    identities = {t: TerminalIdentity.from_seed(t, provision_cmd.derive(fleet.seed,
                                                                       f"identity {t}"))
                  for t in ids}
    me = identities[proposer]
    endorsers = [me, *(identities[t] for t in ids if t != proposer)][:len(ids) // 2 + 1]
    state = LedgerState()
    apply_block(state, p.genesis, validate_block(state, p.genesis))
    state.advance_tip(Tip(tip["height"], bytes.fromhex(tip["hash"]), tip["timestamp_ms"]))
    genesis_hash = state.genesis_hash
    builder = TxBuilder(me)
    out = []
    n = 0
    bar = _bar(blocks, "catch-up blocks", progress, unit="block")
    for _ in range(blocks):
        txs = []
        for _ in range(txs_per_block):
            meter_id = CATCHUP_METER + n.to_bytes(5, "big")
            txs.append(builder.register(meter_id, key_version=1, counter=1,
                                        fingerprint=hashlib.sha256(meter_id).digest()))
            n += 1
        block = propose_block(state, me, txs, timestamp_ms=int(time.time() * 1000),
                              difficulty=pow_difficulty)
        block = with_endorsements(block, [endorse(e, block.header) for e in endorsers])
        verdict = validate_block(state, block, require_pow=pow_difficulty,
                                 genesis_hash=genesis_hash)
        if not verdict.block_ok:
            raise RuntimeError(f"catch-up block {block.header.height} is invalid: "
                               f"{verdict.block_reason} {verdict.tx_codes}")
        apply_block(state, block, verdict)
        out.append((block.header.height, header_hash(block.header), encode_block(block)))
        bar.update(1)
    bar.close()
    return out


class _HeightWatch:
    """When each running terminal's ledger first reached ``target``: one thread per
    terminal polls its console, so a busy terminal does not delay the others' readings."""

    def __init__(self, agents: list[FleetAgent], target: int, timeout: float):
        self.target = target
        self.deadline = time.monotonic() + timeout
        self.reached: dict[str, float] = {}
        self.heights: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._poll, args=(a,), daemon=True,
                                         name=f"bench-height-{a.id}") for a in agents]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))

    def _poll(self, agent: FleetAgent) -> None:
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                h = int(agent.json("ledger height", timeout=120.0)["height"])
                self.heights[agent.id] = h
                if h >= self.target:
                    self.reached[agent.id] = time.monotonic()
                    return
                self.stop.wait(RUNNING_POLL_S)
        except Exception as exc:  # reported by the caller
            self.errors[agent.id] = f"{type(exc).__name__}: {exc}"


def _create(etcd: Any, key: bytes, data: bytes) -> None:
    """One candidate into etcd, retried across a failover (a True create may come back False
    after a retry: then the value read back must be ours)."""
    from agent.net.etcd import EtcdError

    for attempt in range(4):
        try:
            if etcd.create(key, data):
                return
            value, _, _ = etcd.get(key)
            if value == data:
                return
            raise RuntimeError(f"etcd already holds another value at {key!r}")
        except EtcdError:
            if attempt == 3:
                raise
            time.sleep(0.5)


def _catchup(fleet: Fleet, blocks: int, txs_per_block: int, fleet_proposer: str,
             progress: bool) -> dict[str, Any]:
    from agent.net.etcd import EtcdClient
    from agent.net.ordering import chain_key

    first = fleet.agents[0]
    victims = [a for a in reversed(fleet.agents[1:])
               if a.id not in fleet.members and a.id != fleet_proposer]
    victims = victims or [a for a in reversed(fleet.agents[1:]) if a.id != fleet_proposer]
    if not victims:
        raise RuntimeError("catch-up needs a terminal besides the first and the proposer")
    victim = victims[0]
    running = [a for a in fleet.agents if a is not victim]
    victim.stop()
    _equal_heights(running, 60.0)
    stopped_at = int(running[0].json("ledger height")["height"])
    tip = first.json("ledger tail -n 1")[0]
    t0 = time.monotonic()
    chain = _catchup_chain(fleet, tip, blocks, txs_per_block, first.id, progress)
    build_s = time.monotonic() - t0
    target = chain[-1][0]
    tls = fleet.dir / "tls"
    prefix = f"/edgekey/{fleet.name}/".encode()
    watch = _HeightWatch(running, target, timeout=max(300.0, blocks / 5))
    bar = _bar(len(chain), "etcd writes", progress, unit="block")
    with EtcdClient(fleet.desc["etcd"]["endpoints"], ca=str(tls / "ca.crt"),
                    cert=str(tls / f"{first.id}.crt"), key=str(tls / f"{first.id}.key"),
                    timeout_s=5.0) as etcd:
        w0 = time.monotonic()
        watch.start()
        for height, block_hash, data in chain:
            _create(etcd, chain_key(prefix, height, f"{first.id}-{block_hash[:8].hex()}"), data)
            bar.update(1)
        write_s = time.monotonic() - w0
    bar.close()
    bar = _bar(len(running), "running terminals at the last height", progress, unit="terminal")
    try:
        while watch.alive():
            watch.join(1.0)
            bar.update(len(watch.reached) - bar.n)
    finally:
        watch.stop.set()
    bar.close()
    if watch.errors or len(watch.reached) < len(running):
        raise RuntimeError(f"the running terminals did not all reach height {target}: "
                           f"{watch.heights} {watch.errors}")
    applied = {t: at - w0 for t, at in watch.reached.items()}

    # The stopped terminal starts again: from its start to the last height.
    bar = _bar(target - stopped_at, f"{victim.id} catching up", progress, unit="block")
    t_start = time.monotonic()
    victim.launch()
    victim.wait_ready(READY_TIMEOUT_S)
    ready_s = time.monotonic() - t_start
    deadline = t_start + max(600.0, blocks / 2)
    height = stopped_at
    longest = 0.0  # the longest a console answer took while it caught up
    while True:
        asked = time.monotonic()
        height = int(victim.json("ledger height", timeout=600.0)["height"])
        longest = max(longest, time.monotonic() - asked)
        bar.update(max(0, height - stopped_at - bar.n))
        if height >= target:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{victim.id} reached {height} of {target} by the deadline")
        time.sleep(CATCHUP_POLL_S)
    caught_up_s = time.monotonic() - t_start
    bar.close()
    missed = target - stopped_at
    slowest = max(applied.values())
    return {"blocks": blocks, "txs_per_block": txs_per_block, "from_height": stopped_at,
            "to_height": target, "proposer_identity": first.id,
            "endorsements_per_block": len(fleet.agents) // 2 + 1,
            "build_s": build_s, "write_s": write_s, "writes_per_s": len(chain) / write_s,
            "running": {"terminals": len(running), "applied_s": applied,
                        "slowest_s": slowest, "blocks_per_s": missed / slowest},
            "restarted": {"terminal": victim.id, "missed": missed, "ready_s": ready_s,
                          "caught_up_s": caught_up_s, "blocks_per_s": missed / caught_up_s,
                          "height": height, "longest_console_answer_s": longest}}


def _equal_heights(agents: list[FleetAgent], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        heights = {a.id: int(a.json("ledger height")["height"]) for a in agents}
        if len(set(heights.values())) == 1:
            return next(iter(heights.values()))
        if time.monotonic() > deadline:
            raise RuntimeError(f"heights still differ after {timeout:.0f} s: {heights}")
        time.sleep(0.5)


# ---------------------------------------------------------------------- run

def run(*, terminals: int = 13, meters: int = 300, etcd_members: int = 3,
        rates: tuple[float, ...] = DEFAULT_RATES, step: float = RATE_STEP,
        max_rate: float = MAX_RATE, seconds: float = 20.0, drain_s: float = DRAIN_S,
        catchup_blocks: int = 10_000, catchup_txs: int = 1, seed: int = 1,
        work: str | None = None, log_level: str = "info",
        progress: bool = True, agent_args: tuple[str, ...] = ()) -> dict[str, Any]:
    if terminals < 2:
        raise ValueError("a fleet benchmark needs at least 2 terminals")
    if work is not None:
        directory = Path(work)
        if directory.exists() and any(directory.iterdir()):
            raise ValueError(f"--work {directory} is not empty (a fleet is provisioned once)")
        directory.mkdir(parents=True, exist_ok=True)
        scratch = None
    else:
        scratch = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
        directory = scratch / "fleet"
    params = {"terminals": terminals, "meters": meters, "etcd_members": etcd_members,
              "rates": list(rates), "step": step, "max_rate": max_rate, "seconds": seconds,
              "drain_s": drain_s, "catchup_blocks": catchup_blocks,
              "catchup_txs_per_block": catchup_txs, "seed": seed, "board": "host",
              "log_level": log_level, "saturation": {"committed_below_fraction":
                                                     SATURATED_FRACTION,
                                                     "p99_over_s": SATURATED_P99_S},
              "register_offered_per_s": REGISTER_RATE, "agent_args": list(agent_args)}
    result: dict[str, Any] = {
        "parameters": params,
        "machine": {"arch": platform.machine(), "python": platform.python_version(),
                    "platform": platform.platform(), "cpus": os.cpu_count()},
        "paper": {"table1_chain_building_ms": {str(k): v[0] for k, v in PAPER_TABLE1.items()},
                  "terminals": 13},
        "work": str(directory) if scratch is None else None,
    }
    fleet: Fleet | None = None
    try:
        with sigterm_unwinds():
            t0 = time.monotonic()
            fleet = Fleet(directory, terminals=terminals, meters=meters,
                          etcd_members=etcd_members, seed=seed, python=[sys.executable],
                          log_level=log_level, agent_args=agent_args)
            setup: dict[str, Any] = {"provision_s": time.monotonic() - t0}
            t0 = time.monotonic()
            fleet.start_etcd()
            setup["etcd_start_s"] = time.monotonic() - t0
            t0 = time.monotonic()
            fleet.start_agents(progress)
            setup["agents_start_s"] = time.monotonic() - t0
            proposer = fleet.wait_synced()
            setup["synced_s"] = time.monotonic() - t0
            result["fleet"] = {"name": fleet.name, "proposer": proposer,
                               "terminals": [{"id": a.id, "meters": len(a.meters),
                                              "etcd_member": fleet.members.get(a.id, {})
                                              .get("name")} for a in fleet.agents]}
            result["setup"] = setup
            ms, homes = _meters(fleet)
            loop = FleetLoop(ms, homes)
            setup["registration"] = _register(loop, drain_s, progress)
            result["idle"] = _idle(fleet)
            rng = random.Random(seed)
            queue = list(rates)
            steps: list[tuple[dict[str, Any], Tally]] = []
            result["rates"] = []
            i = 0
            while i < len(queue):
                row, tally = _rate(fleet, loop, queue[i], seconds, drain_s, rng, progress)
                loop.quiesce(1.0)
                row["resync"] = loop.resync()
                steps.append((row, tally))
                result["rates"].append(row)
                if row["saturated"]:
                    break
                if i == len(queue) - 1 and queue[i] + step <= max_rate:
                    queue.append(queue[i] + step)
                i += 1
            result["saturation"] = {"saturated_at": next(
                (r["offered_per_s"] for r in result["rates"] if r["saturated"]), None),
                "highest_committed_per_s": max((r["committed_per_s"] for r in result["rates"]),
                                               default=0.0)}
            loop.quiesce(40.0)
            for row, tally in steps:
                row["answered_after_drain"] = tally.answered_late
            result["proposer_after_load"] = fleet.wait_synced()
            result["catchup"] = (_catchup(fleet, catchup_blocks, catchup_txs,
                                          result["proposer_after_load"], progress)
                                 if catchup_blocks > 0 else None)
            result["undecodable_frames"] = loop.undecodable
            return result
    finally:
        if fleet is not None:
            result["processes"] = fleet.processes()
            fleet.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


# -------------------------------------------------------------------- table

def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _bytes(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} B"


def _naks(naks: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in naks.items()) or "none"


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    p = r["parameters"]
    f = r["fleet"]
    out: list[tuple[str, str]] = [
        ("fleet", f"{p['terminals']} terminals, {p['meters']} meters, {p['etcd_members']} etcd "
                  f"members, proposer {f['proposer']}, {r['machine']['cpus']} CPUs")]
    reg = r["setup"]["registration"]
    lat = reg["first_round"]["latency"]
    out.append((f"register {reg['meters']} meters ({reg['offered_per_s']:g}/s, set-up)",
                f"{reg['registered']}/{reg['meters']} in {reg['seconds']:.1f} s, p50 "
                f"{lat.get('p50_ms', 0):.0f} ms, p99 {lat.get('p99_ms', 0):.0f} ms, NAKs "
                f"{_naks(reg['first_round']['naks'])}"))
    idle = r["idle"]
    out.append(("fleet idle", f"agents CPU {idle['agents_cpu_percent']:.1f} %, etcd CPU "
                              f"{idle['etcd_cpu_percent']:.1f} %"))
    for s in r["rates"]:
        lat = s["latency"]
        label = f"rotations offered {s['offered_per_s']:g}/s"
        paper = s["paper_chain_building_ms"]
        out.append((label, f"committed {s['committed_per_s']:.1f}/s, p50 "
                           f"{lat.get('p50_ms', 0):.0f} ms, p99 {lat.get('p99_ms', 0):.0f} ms, "
                           f"mean {lat.get('mean_ms', 0):.0f} ms | paper (chain-building time) "
                           + (f"{paper:.2f} ms" if paper is not None else "-")
                           + ("  SATURATED" if s["saturated"] else "")))
        out.append((f"  {s['offered_per_s']:g}/s answers",
                    f"{s['committed']} ACKed of {s['sent']} sent ({s['arrivals']} arrivals, "
                    f"{s['skipped_busy']} skipped busy), NAKs {_naks(s['naks'])}, timeouts "
                    f"{s['timeouts']}"))
        c, b = s["cpu"], s["bytes_out"]
        out.append((f"  {s['offered_per_s']:g}/s CPU per committed op",
                    f"{_ms(c['agents_ms_per_op'])} all agents ({_ms(c['terminal_ms_per_op'])}"
                    f" a terminal, proposer {s['proposer'] or '?'} "
                    f"{_ms(c['proposer_ms_per_op'])}), etcd {_ms(c['etcd_ms_per_op'])}"))
        out.append((f"  {s['offered_per_s']:g}/s bytes sent per committed op",
                    "-" if b["per_op"] is None else
                    f"{b['per_op']:.0f} B all terminals ({b['per_op_per_terminal']:.0f} B a "
                    f"terminal, proposer {_bytes(b['proposer_per_op'])})"))
        tpb = s["txs_per_block"]
        out.append((f"  {s['offered_per_s']:g}/s blocks and load",
                    f"{s['blocks']} blocks, {'-' if tpb is None else f'{tpb:.1f}'} txs/block; "
                    f"CPU agents {c['agents_percent']:.0f} %, etcd {c['etcd_percent']:.0f} %, "
                    f"driver {c['driver_percent']:.0f} %"))
    c = r.get("catchup")
    if c:
        run_ = c["running"]
        re = c["restarted"]
        out.append((f"catch-up, {c['blocks']:,} blocks into etcd",
                    f"written in {c['write_s']:.1f} s ({c['writes_per_s']:.0f}/s); "
                    f"{run_['terminals']} running terminals applied them within "
                    f"{run_['slowest_s']:.1f} s ({run_['blocks_per_s']:.0f} blocks/s)"))
        out.append((f"catch-up of {re['missed']:,} missed blocks ({re['terminal']} restarted)",
                    f"{re['caught_up_s']:.1f} s from start ({re['blocks_per_s']:.0f} blocks/s; "
                    f"console ready after {re['ready_s']:.1f} s, then silent for up to "
                    f"{re['longest_console_answer_s']:.1f} s)"))
    return out
