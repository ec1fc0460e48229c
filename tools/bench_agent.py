"""``edgekey bench agent``: the running agent, measured from outside its process.

Figures (JSON + table):
- register-to-acknowledgement latency, p50/p99, through the emulated PLC
  channel at 25 and 128 KByte/s: registrations offered open-loop (Poisson
  arrivals that do not wait for answers), timed from each arrival to the
  meter's authenticated ACK;
- operations per second one terminal commits with 300 meters (rotations
  offered open-loop at rising rates straight over a pty, so the agent and
  not the channel is the limit), with p50/p99 latency at each rate;
- console round trip (``ledger height``), p50/p99;
- boot time to console-ready with 10^4 and 10^6 meters on the chain;
- agent RSS and CPU, idle and under load (from /proc/PID).

``--arm`` runs the agent under qemu-arm-static (Debian's armhf python3 and
its numpy and cryptography); the driver, channel and meters stay on the host.
"""

from __future__ import annotations

import heapq
import json
import os
import platform
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
import tty
from pathlib import Path
from typing import Any

from agent import meterproto as mp
from emulator.agent_harness import ROOT, AgentProc, TestMeter
from hal.dlt698 import NEED_DATA, Frame, FrameDecoder
from tools.report import quantile

ARM_PYTHON = [str(ROOT / "emulator/qemu/arm-python.sh")]
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------- measuring

def proc_sample(pid: int) -> tuple[float, int]:
    """(CPU seconds used so far, RSS bytes) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return cpu, rss


def _pct(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    return {"n": len(samples), "p50_ms": quantile(samples, 0.5) * 1e3,
            "p99_ms": quantile(samples, 0.99) * 1e3, "max_ms": max(samples) * 1e3}


class OpenLoop:
    """Meters on one link fd, requests offered at Poisson arrival times, answers timed.

    A meter has one request in flight (the protocol); arrivals for a busy
    meter wait in that meter's queue and their latency counts from the
    arrival, so a slow agent shows as latency, not as a lower offered rate.
    """

    def __init__(self, meters: list[TestMeter], fd: int):
        self.meters = {m.meter_id: m for m in meters}
        self.fd = fd
        self.decoder = FrameDecoder()
        self.busy: dict[bytes, tuple[float, object]] = {}
        self.waiting: dict[bytes, list[tuple[float, object]]] = {m: [] for m in self.meters}
        self.latencies: list[float] = []
        self.naks: dict[int, int] = {}
        self.done = 0
        self.last_ack = 0.0  # when the last ACK came: the rate ends there, not at a drain timeout

    def _send(self, meter_id: bytes, arrival: float, event: object) -> None:
        m = self.meters[meter_id]
        m.send_raw(m.frame(mp.encode_request(event)))  # type: ignore[arg-type]
        self.busy[meter_id] = (arrival, event)

    def offer(self, meter_id: bytes, arrival: float, make: Any) -> None:
        if meter_id in self.busy:
            self.waiting[meter_id].append((arrival, make))
        else:
            self._send(meter_id, arrival, make())

    def pump(self, until: float) -> None:
        while True:
            wait = until - time.monotonic()
            if wait <= 0:
                return
            r, _, _ = select.select([self.fd], [], [], wait)
            if not r:
                return
            self.decoder.receive_data(os.read(self.fd, 65536))
            while (e := self.decoder.next_event()) is not NEED_DATA:
                if isinstance(e, Frame):
                    self._answer(bytes(e.server.address), mp.decode_answer(e.apdu))

    def _answer(self, meter_id: bytes, a: mp.AckAnswer | mp.NakAnswer) -> None:
        if meter_id not in self.busy:
            return
        arrival, event = self.busy.pop(meter_id)
        self.meters[meter_id].take(event, a)
        if isinstance(a, mp.AckAnswer):
            self.last_ack = time.monotonic()
            self.latencies.append(self.last_ack - arrival)
            self.done += 1
        else:
            self.naks[a.reason] = self.naks.get(a.reason, 0) + 1
        if self.waiting[meter_id]:
            arrival, make = self.waiting[meter_id].pop(0)
            self._send(meter_id, arrival, make())

    def run(self, arrivals: list[tuple[float, bytes, Any]], drain_s: float) -> float:
        """Offer ``arrivals`` (offset s, meter, make-request); the time the offering took."""
        t0 = time.monotonic()
        heap = [(t0 + off, i, mid, make) for i, (off, mid, make) in enumerate(arrivals)]
        heapq.heapify(heap)
        while heap:
            at, _i, mid, make = heap[0]
            if at <= time.monotonic():
                heapq.heappop(heap)
                self.offer(mid, at, make)
                continue
            self.pump(at)
        offered = time.monotonic() - t0
        end = time.monotonic() + drain_s
        while (self.busy or any(self.waiting.values())) and time.monotonic() < end:
            self.pump(min(end, time.monotonic() + 0.05))
        return offered


def poisson(rate: float, n: int, rng: random.Random) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def _rotation(m: TestMeter) -> Any:
    return lambda: m.keys.rotate()


def _registration(m: TestMeter) -> Any:
    return lambda: m.keys.register()


# ------------------------------------------------------------ scenarios

def _open_pty_end(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    return fd


def channel_latency(work: Path, rate_kbyte_s: float, *, meters: int, offered_per_s: float,
                    python: list[str], seed: int) -> dict[str, Any]:
    """Registrations of ``meters`` meters over an emulated channel at ``rate_kbyte_s``."""
    d = work / f"channel-{rate_kbyte_s:g}"
    d.mkdir(parents=True)
    term, met = d / "plc-terminal", d / "plc-meters"
    ready = d / "ready.json"
    chan = subprocess.Popen([sys.executable, "-m", "emulator.plc", "--terminal-end",
                             f"pty:{term}", "--meter-end", f"pty:{met}", "--board", "host",
                             "--rate-kbyte-s", str(rate_kbyte_s), "--seed", str(seed),
                             "--stats", str(d / "stats.json"), "--ready", str(ready)],
                            cwd=ROOT, stderr=open(d / "channel.log", "wb"))  # noqa: SIM115
    agent = None
    fd = None
    try:
        _wait_file(ready, chan)
        agent = AgentProc(d, meters=meters, seed=seed, hplc=str(term), python=python)
        agent.start("--format")
        fd = _open_pty_end(str(met))
        ms = [TestMeter(agent, i, seed=seed, link_fd=fd) for i in range(meters)]
        loop = OpenLoop(ms, fd)
        rng = random.Random(seed)
        times = poisson(offered_per_s, meters, rng)
        order = list(range(meters))
        rng.shuffle(order)
        offered = loop.run([(t, ms[i].meter_id, _registration(ms[i]))
                            for t, i in zip(times, order, strict=True)], drain_s=60)
        stats = json.loads((d / "stats.json").read_text()) if (d / "stats.json").exists() else {}
        return {"rate_kbyte_s": rate_kbyte_s, "meters": meters, "offered_per_s": offered_per_s,
                "offered_s": offered, "acked": loop.done, "naks": loop.naks,
                "latency": _pct(loop.latencies), "channel_latency_ms": 20.0,
                "channel_stats": stats}
    finally:
        if fd is not None:
            os.close(fd)
        if agent is not None:
            agent.close()
        _stop(chan)


def throughput(work: Path, *, meters: int, rates: list[float], seconds: float,
               python: list[str], seed: int) -> dict[str, Any]:
    """Rotations offered open-loop at each rate to ``meters`` registered meters."""
    d = work / "throughput"
    d.mkdir(parents=True)
    agent = AgentProc(d, meters=meters, seed=seed, python=python)
    try:
        agent.start("--format")
        ms = [TestMeter(agent, i, seed=seed) for i in range(meters)]
        reg = OpenLoop(ms, agent.link_m)
        reg.run([(i * 0.002, m.meter_id, _registration(m)) for i, m in enumerate(ms)], 120)
        assert agent.proc is not None
        cpu0, _ = proc_sample(agent.proc.pid)
        t0 = time.monotonic()
        time.sleep(3.0)
        cpu1, rss_idle = proc_sample(agent.proc.pid)
        idle = {"cpu_percent": 100 * (cpu1 - cpu0) / (time.monotonic() - t0),
                "rss_mib": rss_idle / (1 << 20)}
        rng = random.Random(seed)
        steps = []
        for rate in rates:
            n = int(rate * seconds)
            times = poisson(rate, n, rng)
            loop = OpenLoop(ms, agent.link_m)
            cpu0, _ = proc_sample(agent.proc.pid)
            t0 = time.monotonic()
            picks = [ms[rng.randrange(meters)] for _ in times]
            loop.run([(t, m.meter_id, _rotation(m)) for t, m in zip(times, picks, strict=True)],
                     30)
            elapsed = time.monotonic() - t0
            cpu1, rss = proc_sample(agent.proc.pid)
            busy = max(loop.last_ack - t0, 1e-9)
            steps.append({"offered_per_s": rate, "committed": loop.done, "offered": n,
                          "committed_per_s": loop.done / busy, "naks": loop.naks,
                          "unanswered": n - loop.done - sum(loop.naks.values()),
                          "latency": _pct(loop.latencies),
                          "cpu_percent": 100 * (cpu1 - cpu0) / elapsed,
                          "rss_mib": rss / (1 << 20)})
        height = agent.console_json("ledger height")["height"]
        rtts = []
        for _ in range(200):
            t = time.monotonic()
            agent.console("ledger height")
            rtts.append(time.monotonic() - t)
        return {"meters": meters, "seconds_per_rate": seconds, "steps": steps, "idle": idle,
                "height": height, "console_rtt": _pct(rtts)}
    finally:
        agent.close()


def boot_time(work: Path, meters: int, *, python: list[str], seed: int) -> dict[str, Any]:
    """Time from process start to the console's first OK with ``meters`` on the chain."""
    d = work / f"boot-{meters}"
    d.mkdir(parents=True)
    agent = AgentProc(d, meters=4, seed=seed, python=python)
    try:
        built = lay_chain(agent, meters)
        t0 = time.monotonic()
        refused = None
        try:
            agent.start()
        except RuntimeError:
            err = agent.stderr().splitlines()
            lines = [x for x in err if "refused to start" in x]
            refused = lines[-1] if lines else f"the agent exited: {err[-1] if err else '?'}"
            if "RAM" not in refused:
                return {"meters": meters, "refused": refused, "build": built}
            # What it would take: the same image under the same board with a raised budget.
            agent.board = str(_board_with_budget(d, agent.board, RAISED_BUDGET_MIB))
            t0 = time.monotonic()
            agent.start()
        body, status = agent.console("status")
        ready_s = time.monotonic() - t0
        assert status == "OK", body
        assert agent.proc is not None
        _cpu, rss = proc_sample(agent.proc.pid)
        st = agent.console_json("status")
        out = {"meters": meters, "console_ready_s": ready_s, "agent_boot_s": st["boot_s"],
               "height": st["height"], "rss_mib": rss / (1 << 20), "build": built}
        if refused is not None:
            out.update(refused=refused, budget_mib=RAISED_BUDGET_MIB)
        return out
    finally:
        agent.close()


RAISED_BUDGET_MIB = 320  # what a 10^6-meter index needs today, on the 512 MiB board


def _board_with_budget(d: Path, board: str, budget_mib: int) -> Path:
    """The board file with its agent RAM budget raised (same name, so the image's
    provisioning still matches): for measuring what a refused boot would take."""
    import re

    from hal.board import board_path
    text = board_path(board).read_text()
    path = d / f"{Path(board).stem}-budget-{budget_mib}.toml"
    path.write_text(re.sub(r"(?m)^agent_budget_mib = \d+", f"agent_budget_mib = {budget_mib}",
                           text))
    return path


def lay_chain(agent: AgentProc, meters: int, per_block: int = 1000) -> dict[str, Any]:
    """``meters`` registrations on the image's ledger, as the terminal itself would commit
    them (its identity signs and endorses), before the agent first boots on it."""
    from agent import provisioning as prov
    from agent.ledger.block import endorse, header_hash, with_endorsements
    from agent.ledger.chain import open_chain
    from agent.ledger.rules import propose_block
    from agent.ledger.tx import TxBuilder
    from hal.blockdev import FileBlockDevice, open_partition
    from hal.board import board_path, load_board
    from hal.devicekey import load_device_key
    from tools.bench_ledger import _progress

    fl = load_board(board_path(agent.board)).flash
    t0 = time.monotonic()
    with FileBlockDevice(agent.image, fl.erase_block_bytes) as dev:
        raw, sealed = prov.load(open_partition(dev, fl, "config"))
        p = prov.verify(raw, bytes.fromhex((agent.dir / "utility.pub").read_text().strip()))
        me = prov.open_secrets(load_device_key(agent.device_key), sealed).identity
        chain = open_chain(open_partition(dev, fl, "ledger"), me,
                           genesis_hash=header_hash(p.genesis.header))
        chain.append(p.genesis)
        builder = TxBuilder(me)
        clock = p.genesis.header.timestamp_ms
        bar = _progress(meters, f"chain of {meters:,}", False)
        for start in range(0, meters, per_block):
            txs = [builder.register(b"\xbe" + n.to_bytes(5, "big"), key_version=1,
                                    fingerprint=(n + 1).to_bytes(32, "big"), counter=1)
                   for n in range(start, min(meters, start + per_block))]
            clock += 1
            block = propose_block(chain.state, me, txs, timestamp_ms=clock)
            chain.append(with_endorsements(block, [endorse(me, block.header)]))
            bar.update(len(txs))
        bar.close()
        laid = time.monotonic() - t0
        # A terminal in service boots from its newest snapshot (the paper's "head blocks
        # are no longer maintained"), not from a replay of every block since genesis.
        chain.snapshot()
        height = chain.height
    return {"seconds": laid, "snapshot_s": time.monotonic() - t0 - laid, "height": height,
            "txs_per_block": per_block}


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"{proc.args} did not get ready")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(*, meters: int = 300, latency_meters: int = 100, offered_per_s: float = 20.0,
        rates: tuple[float, ...] = (50, 100, 200, 400, 800, 1600), seconds: float = 4.0,
        boot_sizes: tuple[int, ...] = (10_000, 100_000, 500_000, 1_000_000), arm: bool = False,
        channel_rates: tuple[float, ...] = (25, 128), seed: int = 1,
        workdir: str | None = None) -> dict[str, Any]:
    python = ARM_PYTHON if arm else [sys.executable]
    work = Path(tempfile.mkdtemp(prefix="bench-agent-", dir=workdir))
    try:
        result: dict[str, Any] = {
            "machine": {"arch": "armv7l (qemu-arm-static)" if arm else platform.machine(),
                        "python": platform.python_version(), "cpus": os.cpu_count()},
            "channels": [channel_latency(work, r, meters=latency_meters,
                                         offered_per_s=offered_per_s, python=python, seed=seed)
                         for r in channel_rates],
            "throughput": throughput(work, meters=meters, rates=list(rates), seconds=seconds,
                                     python=python, seed=seed),
            "boot": [boot_time(work, n, python=python, seed=seed) for n in boot_sizes],
        }
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for c in r["channels"]:
        lat = c["latency"]
        out.append((f"register->ACK, {c['rate_kbyte_s']:g} KByte/s channel",
                    f"p50 {lat.get('p50_ms', 0):.1f} ms, p99 {lat.get('p99_ms', 0):.1f} ms "
                    f"({c['acked']}/{c['meters']} acked, {c['offered_per_s']:g}/s offered)"))
    t = r["throughput"]
    for s in t["steps"]:
        lat = s["latency"]
        out.append((f"rotations offered {s['offered_per_s']:g}/s ({t['meters']} meters)",
                    f"committed {s['committed_per_s']:.0f}/s, p50 {lat.get('p50_ms', 0):.1f} ms"
                    f", p99 {lat.get('p99_ms', 0):.1f} ms, CPU {s['cpu_percent']:.0f} %, "
                    f"RSS {s['rss_mib']:.0f} MiB"))
    out.append(("agent idle", f"CPU {t['idle']['cpu_percent']:.1f} %, "
                              f"RSS {t['idle']['rss_mib']:.0f} MiB"))
    c = t["console_rtt"]
    out.append(("console round trip (ledger height)",
                f"p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms"))
    for b in r["boot"]:
        if "refused" in b and "console_ready_s" not in b:
            out.append((f"boot, {b['meters']:,} meters on the chain", b["refused"]))
            continue
        if "refused" in b:
            out.append((f"boot, {b['meters']:,} meters, board budget", "refused: the meter "
                        "index does not fit the board's agent RAM budget"))
            out.append((f"boot to console-ready, {b['meters']:,} meters, budget raised to "
                        f"{b['budget_mib']} MiB", f"{b['console_ready_s']:.2f} s (agent boot "
                        f"{b['agent_boot_s']:.2f} s), RSS {b['rss_mib']:.0f} MiB"))
            continue
        out.append((f"boot to console-ready, {b['meters']:,} meters on the chain",
                    f"{b['console_ready_s']:.2f} s (agent boot {b['agent_boot_s']:.2f} s), "
                    f"RSS {b['rss_mib']:.0f} MiB"))
    return out
