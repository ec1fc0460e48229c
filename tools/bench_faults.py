"""``edgekey bench faults``: a whole fleet under power cuts and etcd failures, judged by its meters.

Set-up: ``edgekey fleet up`` (13 terminals, 300 emulated meters on their PLC
channels, 3 etcd members, a checkpoint every ``--checkpoint-every`` blocks);
every meter registers, then rotates its key every ``--rotate-every``
seconds and keeps on disk what was acknowledged (tools/fleet_probe.py).

While the meters work towards ``--ops`` acknowledged key operations,
the faults of tools/fault_schedule.py are injected at their moments, from
outside, as the CLI's operator would: ``fleet kill`` (SIGKILL of a
terminal's agent and etcd member) of random minorities, each powered on
again (``fleet start``) after a few seconds; the etcd leader's process
alone SIGKILLed, then a follower's, each started again; one terminal that
hosts no etcd member
kept down until etcd holds none of the blocks after its tip (the proposer
deletes what is below the checkpoint before the newest and compacts), then
started: it can only come back by a peer's snapshot checked against the
checkpoint, which its console's journal and ``net`` counters confirm.

Then the meters stop and, once every height is equal: the full-state digest
of all chains must be one; every acknowledged (meter, key version) must be
on the chain (the chain one version ahead at most: a rotation may commit
with its ACK cut off), with the meter's key when the versions agree, and
held by its home. Any failed check is named in ``failures`` and the
command exits 1.

Figures (JSON + table): the schedule as injected (what, which terminal, at
which second, down for how long, how long until every running terminal was
current again), operations acknowledged and ops/s, the meters' NAKs by
reason, acknowledged operations lost, the digests, convergence after the
last restart and after the meters stopped, the snapshot catch-up (blocks
behind, seconds, snapshots adopted), wall time.

Every process of the fleet is stopped on every path (Ctrl-C and SIGTERM
too): ``fleet down``, then whatever still carries the fleet's mark.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tools import fault_schedule as fs
from tools import fleet as fleet_tools
from tools import fleet_probe as probe
from tools.bench_fleet import _bar
from tools.console_client import ConsoleClient, ConsoleError
from tools.signals import sigterm_unwinds

TICK_S = 0.5
UP_TIMEOUT_S = 900.0  # fleet up of 13 terminals on a loaded 2-core machine
CLI_TIMEOUT_S = 300.0
STALL_S = 180.0  # no operation acknowledged for this long: the run ends and says so
COMPACTED_TIMEOUT_S = 900.0
CURRENT_TIMEOUT_S = 300.0
EQUAL_TIMEOUT_S = 300.0
JOIN_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
JOURNAL_LINES = 200  # `log -n`: the shell cuts a reply at 64 KiB
ADOPTED_EVENT = "agent.caught_up_by_snapshot"


class _Stopped(Exception):
    """The run is ending (a failure elsewhere, Ctrl-C): a fault track returns."""


class FaultError(Exception):
    """A fault could not be injected or undone as planned."""


# ---------------------------------------------------------------- the fleet

class Ctl:
    """The fleet's CLI, one call at a time: ``fleet start`` rewrites fleet.json whole."""

    def __init__(self, directory: Path, stop: threading.Event):
        self.dir = directory
        self.stop = stop
        self.lock = threading.Lock()
        self.kill_lock = threading.Lock()
        self.child: subprocess.Popen[str] | None = None

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> None:
        """``edgekey fleet CMD --dir DIR ARGS`` in a session of its own (Ctrl-C is ours)."""
        cmd, *rest = args
        with self.lock:
            if self.stop.is_set() and cmd != "down":
                raise _Stopped
            self.child = subprocess.Popen(
                [sys.executable, "-m", "tools.cli", "fleet", cmd, "--dir", str(self.dir), *rest],
                cwd=probe.ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                out, _ = self.child.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.child.kill()
                out, _ = self.child.communicate()
                raise FaultError(f"fleet {cmd} {' '.join(rest)}: no end after {timeout:.0f} s: "
                                 f"{out.strip()[-300:]}") from None
            except BaseException:  # Ctrl-C, SIGTERM: the call ends with us
                self.child.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.child.wait(STOP_TIMEOUT_S)
                raise
            finally:
                code, self.child = self.child.returncode, None
            if code != 0 and self.stop.is_set() and cmd != "down":
                raise _Stopped  # cut short by abort()
            if code != 0:
                raise FaultError(f"fleet {cmd} {' '.join(rest)} exited {code}: "
                                 f"{out.strip()[-300:]}")

    def kill(self, tid: str) -> None:
        """``fleet kill`` in this process: at once, while a ``start`` may be running."""
        with self.kill_lock, contextlib.redirect_stdout(io.StringIO()):
            if fleet_tools.kill(self.dir, tid) != 0:
                raise FaultError(f"fleet kill {tid} failed")

    def abort(self) -> None:
        child = self.child
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                child.terminate()


class Consoles:
    """The terminals' consoles, one client at a time on each (a pty has one reader)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.locks: dict[str, threading.Lock] = {}
        self.guard = threading.Lock()

    def json(self, tid: str, cmd: str, timeout: float = probe.CONSOLE_TIMEOUT_S) -> Any:
        """``cmd --json`` on ``tid``'s console; None when it does not answer."""
        with self.guard:
            lock = self.locks.setdefault(tid, threading.Lock())
        url = self.dir / f"{tid}.console"
        with lock:
            try:
                with ConsoleClient(str(url), timeout=timeout) as c:
                    r = c.run(f"{cmd} --json")
                    return json.loads(r.body.splitlines()[-1]) if r.ok else None
            except (ConsoleError, OSError, ValueError, IndexError):
                return None


# ------------------------------------------------------------------- the run

def _until(predicate: Callable[[], object], timeout: float, what: str, every: float = TICK_S,
           pause: Callable[[float], object] = time.sleep) -> float:
    """Seconds until ``predicate``; FaultError after ``timeout``."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise FaultError(f"timed out after {timeout:.0f} s waiting for {what}")
        pause(every)
    return time.monotonic() - t0


class FaultRun:
    """The fleet while the meters work and the fault tracks inject (two threads)."""

    def __init__(self, directory: Path, ids: list[str], members: dict[str, str], seed: int,
                 checkpoint_every: int):
        self.dir = directory
        self.checkpoint_every = checkpoint_every
        self.ids = ids
        self.members = members  # host terminal -> etcd member name
        self.seed = seed
        self.stop = threading.Event()
        self.ctl = Ctl(directory, self.stop)
        self.consoles = Consoles(directory)
        self.down: set[str] = set()
        self.down_lock = threading.Lock()
        self.failures: list[str] = []
        self.base = 0  # operations acknowledged when the load began (fleet up's meters)
        self.ops = 0  # since then
        self.t0 = time.monotonic()
        self.catchup: dict[str, Any] = {}
        self.etcd_killed: list[str] = []  # members, in the order their processes were killed
        self.threads: list[threading.Thread] = []

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def fail(self, why: str) -> None:
        self.failures.append(why)
        self.stop.set()

    def pause(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise _Stopped

    def until(self, predicate: Callable[[], object], timeout: float, what: str,
              every: float = TICK_S) -> float:
        return _until(predicate, timeout, what, every, self.pause)

    def wait_ops(self, n: int) -> None:
        while self.ops < n:
            self.pause(TICK_S)

    # -- tracks

    def start_tracks(self, faults: list[fs.Fault], kept: fs.Fault | None) -> None:
        self.threads = [threading.Thread(target=self._track, args=(self._in_order, faults),
                                         name="faults", daemon=True)]
        if kept is not None:
            self.threads.append(threading.Thread(target=self._track, args=(self._kept, kept),
                                                 name="kept-down", daemon=True))
        for t in self.threads:
            t.start()

    def tracks_done(self) -> bool:
        return not any(t.is_alive() for t in self.threads)

    def join(self) -> None:
        end = time.monotonic() + JOIN_TIMEOUT_S
        for t in self.threads:
            t.join(max(0.1, end - time.monotonic()))

    def _track(self, body: Callable[[Any], None], arg: Any) -> None:
        try:
            body(arg)
        except _Stopped:
            pass
        except Exception as exc:  # a track's failure ends the run and is reported
            self.fail(f"{threading.current_thread().name}: {type(exc).__name__}: {exc}")

    def _in_order(self, faults: list[fs.Fault]) -> None:
        for f in faults:
            self.wait_ops(f.at_ops)
            if f.kind == fs.POWER_CUT:
                self._power_cut(f)
            else:
                self._etcd_kill(f)

    def _claim(self, wanted: list[str], trim: bool) -> list[str]:
        """Terminals to take down now without leaving a minority up: ``wanted`` cut to what
        is left (``trim``), or all of it once enough are back."""
        while True:
            with self.down_lock:
                room = fs.minority(len(self.ids)) - len(self.down)
                if room >= len(wanted) or (trim and room >= 1):
                    got = wanted[:max(room, 0)]
                    self.down |= set(got)
                    return got
            self.pause(TICK_S)

    def _power_cut(self, f: fs.Fault) -> None:
        victims = self._claim(f.planned, trim=True)
        if len(victims) < len(f.planned):
            f.note = (f"trimmed from {len(f.planned)}: "
                      f"{', '.join(sorted(self.down - set(victims)))} already down")
        f.terminals, f.ops_at_injection, f.injected_s = victims, self.ops, self.now()
        for v in victims:
            self.ctl.kill(v)
        self.pause(f.down_s)
        on = self._power_on(f)
        for v in victims:
            self.ctl.cli("start", v)
        self._restarted(f, victims, on)

    def _etcd_kill(self, f: fs.Fault) -> None:
        from agent.net.etcd import EtcdClient, EtcdError

        fleet = probe.load(self.dir)
        hosts = {t["etcd"]["name"]: t for t in fleet["terminals"] if t.get("etcd")}
        tls = self.dir / "tls"
        first = fleet["terminals"][0]["id"]
        leader = None
        t0 = time.monotonic()
        while leader is None:
            try:
                with EtcdClient(fleet["etcd"]["endpoints"], ca=str(tls / "ca.crt"),
                                cert=str(tls / f"{first}.crt"), key=str(tls / f"{first}.key"),
                                timeout_s=2.0) as etcd:
                    names = {m["id"]: m["name"] for m in etcd.member_list()}
                    leader = names.get(etcd.status()["leader"]) or None
            except EtcdError:
                pass
            if leader is None:
                if time.monotonic() - t0 > CURRENT_TIMEOUT_S:
                    raise FaultError("etcd has no leader to kill")
                self.pause(1.0)
        name = leader
        if f.kind == fs.ETCD_FOLLOWER:  # one not killed before (the old leader may follow now)
            followers = sorted(set(hosts) - {leader})
            fresh = [m for m in followers if m not in self.etcd_killed] or followers
            name = fresh[self.seed % len(fresh)]
        self.etcd_killed.append(name)
        host = hosts[name]
        proc = host["processes"]["etcd"]
        f.terminals, f.member = [host["id"]], name
        f.ops_at_injection, f.injected_s = self.ops, self.now()
        with self.ctl.kill_lock:
            mark = fleet_tools._mark(self.dir)
            if not fleet_tools._alive(proc.get("pid"), mark):
                raise FaultError(f"etcd member {name} of {host['id']} is not running")
            os.kill(proc["pid"], signal.SIGKILL)
            fleet_tools._wait_gone([proc["pid"]], STOP_TIMEOUT_S, mark)
        self.pause(f.down_s)
        on = self._power_on(f)
        self.ctl.cli("start", host["id"])
        self._restarted(f, [host["id"]], on)

    def _power_on(self, f: fs.Fault) -> float:
        """The moment ``fleet start`` is issued: the end of the down time."""
        f.restarted_s = self.now()
        assert f.injected_s is not None
        f.down_for_s = round(f.restarted_s - f.injected_s, 2)
        return time.monotonic()

    def _restarted(self, f: fs.Fault, back: list[str], on: float) -> None:
        f.start_s = round(time.monotonic() - on, 2)
        with self.down_lock:
            self.down -= set(back)
        self._current()
        f.recovered_s = round(time.monotonic() - on, 2)

    def _running(self) -> list[str]:
        with self.down_lock:
            return [t for t in self.ids if t not in self.down]

    def _heights(self, ids: list[str]) -> dict[str, int]:
        out = {}
        for t in ids:
            st = self.consoles.json(t, "status")
            if st is not None:
                out[t] = int(st["height"] or 0)
        return out

    def _current(self) -> float:
        """Seconds until every running terminal says it is current at the height the fleet
        had when asked first."""
        target = max(self._heights(self._running()).values(), default=0)

        def current() -> bool:
            for t in self._running():
                st = self.consoles.json(t, "status")
                if st is None or not st["synced"] or int(st["height"] or 0) < target:
                    return False
            return True

        return self.until(current, CURRENT_TIMEOUT_S, "every running terminal to be current")

    def _kept(self, f: fs.Fault) -> None:
        """Down until etcd holds none of the blocks after its tip, then back by a snapshot."""

        v = f.planned[0]
        self.wait_ops(f.at_ops)
        self._claim([v], trim=False)
        f.terminals, f.ops_at_injection, f.injected_s = [v], self.ops, self.now()
        self.ctl.kill(v)
        # The others' heights now bound the tip it went down with from above.
        upper = max(self._heights(self._running()).values(), default=0)
        c = self.catchup
        c.update(terminal=v, fleet_height_at_kill=upper)
        fleet = probe.load(self.dir)
        c["compacted_after_s"] = round(self.until(
            lambda: probe.etcd_dropped_below(self.dir, fleet, upper + 2), COMPACTED_TIMEOUT_S,
            f"etcd to drop the blocks after {v}'s tip", every=2.0), 2)
        target = c["fleet_height_at_start"] = max(self._heights(self._running()).values(),
                                                  default=0)
        t_start = self._power_on(f)
        self.ctl.cli("start", v)
        c["ready_s"] = f.start_s = round(time.monotonic() - t_start, 2)
        with self.down_lock:
            self.down.discard(v)
        seen: dict[str, int] = {}
        c["net_counters_seen"] = seen  # the most seen: its counters start again at a reboot

        def caught_up() -> bool:
            net = self.consoles.json(v, "net")
            if net is not None:
                for k, n in net["network"].items():
                    if k.startswith(("catchup.", "gap.", "snapshot.")):
                        seen[k] = max(seen.get(k, 0), int(n))
            st = self.consoles.json(v, "status")
            if st is None:
                return False
            height = int(st["height"] or 0)
            # Its first answer: the tip it went down with (the blocks after it are gone).
            c.setdefault("height_at_restart", height)
            return bool(st["synced"]) and height >= target

        try:
            self.until(caught_up, CURRENT_TIMEOUT_S, f"{v} to catch up to height {target}",
                       every=0.25)
        finally:
            tip = c.get("height_at_restart", upper)
            c["blocks_behind"] = target - tip
            c["checkpoints_passed"] = target // self.checkpoint_every - tip // \
                self.checkpoint_every
        c["caught_up_s"] = f.recovered_s = round(time.monotonic() - t_start, 2)
        journal = self.consoles.json(v, f"log -n {JOURNAL_LINES}")
        adopted = [e for e in journal or [] if isinstance(e, dict)
                   and e.get("event") == ADOPTED_EVENT]
        log = self.dir / f"{v}.agent.log"
        in_file = log.read_text().count(ADOPTED_EVENT) if log.exists() else 0
        served = {}
        for t in self._running():
            net = self.consoles.json(t, "net") if t != v else None
            if net is not None and net["network"].get("snapshot.served"):
                served[t] = int(net["network"]["snapshot.served"])
        c.update({
            # the counters start again at the reboot that follows adopting: the console's
            # journal (on flash) keeps the event; the log file is the fallback
            "adopted": len(adopted) if journal is not None else in_file,
            "adopted_source": "console journal" if journal is not None else "log file",
            "adopted_heights": [e.get("height") for e in adopted],
            "adopted_in_log_file": in_file, "snapshot_served_by": served})


# --------------------------------------------------------------------- steps

def ops_acked(directory: Path) -> int:
    """Registers and rotations acknowledged: each adds one to a meter's key version."""
    return sum(v for v, _ in probe.acked(directory).values())


def meter_stats(directory: Path) -> tuple[dict[str, int], dict[str, int]]:
    """The meters' NAKs by reason and their counters, summed over the terminals."""
    naks: dict[str, int] = {}
    totals: dict[str, int] = {}
    for f in sorted(directory.glob("ecd-*.meter-stats.json")):
        s = json.loads(f.read_text())
        for into, part in ((naks, s.get("naks", {})), (totals, s.get("totals", {}))):
            for k, n in part.items():
                into[k] = into.get(k, 0) + int(n)
    return dict(sorted(naks.items())), dict(sorted(totals.items()))


def _reap(directory: Path) -> list[int]:
    """Whatever still carries the fleet's mark after ``fleet down``: SIGTERM, then SIGKILL."""
    left = probe.marked_pids(directory)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        fleet_tools._wait_gone(left, STOP_TIMEOUT_S)
        left = [p for p in left if probe.alive(p)]
    return left


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """SIGTERM ignored while the fleet is being stopped: a second one must not cut it short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _load(run: FaultRun, ops: int, bar: Any) -> None:
    """The main thread: count acknowledged operations until the target and the tracks are
    done, or the run stalls or fails."""
    last, last_at = -1, time.monotonic()
    while True:
        run.ops = ops_acked(run.dir) - run.base
        bar.update(max(0, min(run.ops, ops) - bar.n))
        if run.ops > last:
            last, last_at = run.ops, time.monotonic()
        with run.down_lock:
            down = sorted(run.down)
        bar.set_postfix_str(f"down: {' '.join(down) or '-'}")
        if run.stop.is_set() or (run.ops >= ops and run.tracks_done()):
            return
        if time.monotonic() - last_at > STALL_S:
            run.fail(f"no key operation acknowledged for {STALL_S:.0f} s (at {run.ops}); "
                     f"down: {', '.join(down) or 'none'}")
            return
        time.sleep(TICK_S)


def _judge(run: FaultRun, fleet: dict, result: dict[str, Any]) -> None:
    """Meters stopped: equal heights, one digest, every acknowledged operation intact."""
    probe.stop_meters(fleet, timeout=60.0)
    result["ops"]["run_s"] = round(time.monotonic() - run.t0, 2)
    t0 = time.monotonic()
    heights: dict[str, int] = {}

    def equal() -> bool:
        heights.clear()
        heights.update(run._heights(run.ids))
        return len(heights) == len(run.ids) and len(set(heights.values())) == 1

    try:
        _until(equal, EQUAL_TIMEOUT_S, "equal heights")
        result["convergence"]["equal_heights_after_meters_stopped_s"] = round(
            time.monotonic() - t0, 2)
    except FaultError as exc:
        run.failures.append(f"{exc}: {heights}")
    result["heights"] = dict(heights)
    found = {t: (run.consoles.json(t, "ledger verify", timeout=120.0) or {}).get("state_digest")
             for t in run.ids}
    distinct = sorted({d for d in found.values() if d}, key=str)
    result["digests"] = {"equal": len(distinct) == 1 and None not in found.values(),
                         "digest": distinct[0] if len(distinct) == 1 else None,
                         "by_terminal": found}
    if not result["digests"]["equal"]:
        run.failures.append(f"the full-state digests differ: {found}")
    check = probe.check_acked(fleet, run.dir, timeout=30.0)
    result["acked_lost"] = len(check.lost)
    result["lost"] = dict(sorted(check.lost.items())[:50])
    result["ops"]["meters_acked"] = check.meters
    result["ops"]["chain_one_ahead"] = check.one_ahead
    result["ops"]["pending_at_home"] = sorted(check.pending_at_home)
    if check.lost:
        run.failures.append(f"{len(check.lost)} acknowledged operation(s) lost, e.g. "
                            + "; ".join(f"{m}: {w}" for m, w in list(check.lost.items())[:3]))


def _bench(d: Path, result: dict[str, Any], failures: list[str], ctl: list[Ctl],
           runs: list[FaultRun]) -> None:
    """Up, load and faults, judgement: into ``result``; what failed into ``failures``.
    ``ctl`` and ``runs`` hand the CLI and the run to ``run``'s clean-up as they appear."""
    p = result["parameters"]
    ctl.append(Ctl(d, threading.Event()))
    t0 = time.monotonic()
    ctl[0].cli("up", "--terminals", str(p["terminals"]), "--meters", str(p["meters"]),
               "--seed", str(p["seed"]), "--reading-every", "0", "--rotate-every",
               str(p["rotate_every_s"]), "--start-spread", str(p["start_spread_s"]),
               "--checkpoint-every", str(p["checkpoint_every"]),
               "--etcd-members", str(p["etcd_members"]), timeout=UP_TIMEOUT_S)
    result["up_s"] = round(time.monotonic() - t0, 2)
    fleet = probe.load(d)
    ids = [t["id"] for t in fleet["terminals"]]
    members = {t["id"]: t["etcd"]["name"] for t in fleet["terminals"] if t.get("etcd")}
    faults, kept = fs.draw(ids, set(members), ops=p["ops"], power_cuts=p["power_cuts"],
                           etcd_kills=p["etcd_kills"], kept_down=True, seed=p["seed"])
    result["fleet"] = {"etcd_members": members, "kept_down": kept.planned[0] if kept else None}
    fr = FaultRun(d, ids, members, p["seed"], p["checkpoint_every"])
    fr.failures = failures
    runs.append(fr)
    fr.base = ops_at_up = ops_acked(d)
    fr.start_tracks(faults, kept)
    bar = _bar(p["ops"], "key operations acknowledged", result["progress"], unit="op")
    try:
        _load(fr, p["ops"], bar)
    finally:
        bar.close()
    fr.stop.set()
    fr.join()
    done = [*faults, *([kept] if kept else [])]
    result["schedule"] = sorted((f.to_json() for f in done),
                                key=lambda f: (f["injected_s"] is None, f["injected_s"] or 0.0))
    missing = [f.kind for f in done if f.recovered_s is None]
    if missing and not failures:
        failures.append(f"faults not injected or not recovered: {', '.join(missing)}")
    last = max((f for f in done if f.restarted_s is not None),
               key=lambda f: f.restarted_s or 0.0, default=None)
    result["convergence"] = {
        "last_restart": None if last is None else
        {"kind": last.kind, "terminals": last.terminals, "at_s": last.restarted_s},
        "after_last_restart_s": None if last is None else last.recovered_s}
    result["snapshot_catchup"] = fr.catchup or None
    if kept is not None and fr.catchup.get("caught_up_s") and fr.catchup["adopted"] < 1:
        failures.append(f"{kept.planned[0]} came back without adopting a snapshot")
    result["ops"] = {"target": p["ops"], "at_fleet_up": ops_at_up}
    _judge(fr, probe.load(d), result)
    o = result["ops"]
    o["acknowledged"] = acked_end = ops_acked(d)  # the meters saved their state at exit
    o["during_run"] = acked_end - ops_at_up
    o["registrations"] = o["meters_acked"]
    o["rotations"] = acked_end - o["meters_acked"]
    o["per_s"] = round(o["during_run"] / o["run_s"], 2) if o["run_s"] else None
    if o["during_run"] < p["ops"]:
        failures.append(f"only {o['during_run']} of {p['ops']} operations acknowledged")
    result["naks"], result["meter_counters"] = meter_stats(d)


def run(*, terminals: int = 13, meters: int = 300, ops: int = 10_000, rotate_every: float = 3.0,
        checkpoint_every: int = 200, power_cuts: int = 3, etcd_kills: bool = True,
        seed: int = 1, directory: str | None = None, progress: bool = False) -> dict[str, Any]:
    """The bench; ``result["failures"]`` names every check that failed (empty: all held)."""
    if terminals < 3:
        raise ValueError("the faults need at least 3 terminals (a minority to cut)")
    wall0 = time.monotonic()
    if directory is not None:
        d = Path(directory)
        if (d / "fleet.json").exists():
            raise ValueError(f"--dir {d} already holds a fleet (a fleet is provisioned once)")
        scratch = None
    else:
        scratch = Path(tempfile.mkdtemp(prefix="bench-faults-"))
        d = scratch / "fleet"
    d.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "parameters": {"terminals": terminals, "meters": meters, "ops": ops,
                       "rotate_every_s": rotate_every,
                       "offered_ops_per_s": meters / rotate_every,
                       "checkpoint_every": checkpoint_every, "power_cuts": power_cuts,
                       "etcd_kills": etcd_kills, "seed": seed, "etcd_members": 3,
                       "board": "host", "reading_every_s": 0, "start_spread_s": 1.0,
                       "minority": fs.minority(terminals)},
        "machine": {"arch": platform.machine(), "python": platform.python_version(),
                    "platform": platform.platform(), "cpus": os.cpu_count()},
        "dir": str(d) if scratch is None else None, "progress": progress}
    failures: list[str] = []
    ctl: list[Ctl] = []
    runs: list[FaultRun] = []
    try:
        with sigterm_unwinds():
            try:
                _bench(d, result, failures, ctl, runs)
            except (FaultError, probe.ProbeError, ConsoleError, OSError, ValueError,
                    KeyError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
            return result
    finally:
        with _shielded():
            for fr in runs:
                fr.stop.set()
                fr.ctl.abort()
                fr.join()
            for c in ctl:
                c.abort()
            if (d / "fleet.json").exists():
                with contextlib.suppress(FaultError, OSError):
                    Ctl(d, threading.Event()).cli("down", timeout=CLI_TIMEOUT_S)
            left = _reap(d)
            if left:
                failures.append(f"processes outlived fleet down (killed): {left}")
            del result["progress"]
            result["failures"] = failures
            result["wall_s"] = round(time.monotonic() - wall0, 2)
            if scratch is not None:
                if failures:
                    result["dir"] = str(d)  # kept: its logs say what went wrong
                else:
                    shutil.rmtree(scratch, ignore_errors=True)


# -------------------------------------------------------------------- table

def _naks(naks: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in naks.items()) or "none"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _fault_row(f: dict[str, Any]) -> tuple[str, str]:
    at = f"@ {_s(f['injected_s'])}, op {f['ops_at_injection']}"
    back = (f"down {_s(f['down_for_s'])}; after power-on consoles up in {_s(f['start_s'])}, "
            f"every running terminal current in {_s(f['recovered_s'])}")
    if f["kind"] == fs.POWER_CUT:
        return (f"power cut {at}", f"{', '.join(f['terminals'])} killed; {back}"
                + (f" ({f['note']})" if f["note"] else ""))
    if f["kind"] in (fs.ETCD_LEADER, fs.ETCD_FOLLOWER):
        role = "leader" if f["kind"] == fs.ETCD_LEADER else "follower"
        return (f"etcd {role} killed {at}", f"member {f['member']} of {', '.join(f['terminals'])}"
                f"; {back}")
    return (f"kept down {at}", f"{', '.join(f['terminals'])} down {_s(f['down_for_s'])}, "
            "until etcd dropped the blocks after its tip")


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    p = r["parameters"]
    out: list[tuple[str, str]] = [
        ("fleet", f"{p['terminals']} terminals, {p['meters']} meters rotating every "
                  f"{p['rotate_every_s']:g} s ({p['offered_ops_per_s']:.0f} ops/s offered), "
                  f"{p['etcd_members']} etcd members, checkpoint every {p['checkpoint_every']} "
                  f"blocks, {r['machine']['cpus']} CPUs; fleet up in {_s(r.get('up_s'))}")]
    o = r.get("ops")
    if o:
        out.append(("key operations acknowledged",
                    f"{o['during_run']:,} under faults ({o['target']:,} wanted) in "
                    f"{_s(o['run_s'])}: {o['per_s'] or 0:.1f} ops/s; {o['acknowledged']:,} in "
                    f"all ({o['registrations']} registers, {o['rotations']:,} rotations)"))
        out.append(("meters' NAKs", _naks(r.get("naks", {}))))
    for f in r.get("schedule", []):
        out.append(_fault_row(f))
    c = r.get("snapshot_catchup")
    if c:
        out.append((f"catch-up by snapshot ({c['terminal']})",
                    f"{c.get('blocks_behind')} blocks behind (down at "
                    f"{c.get('height_at_restart')}, fleet at {c.get('fleet_height_at_start')}), "
                    "etcd compacted past it after "
                    f"{_s(c.get('compacted_after_s'))} ({c.get('checkpoints_passed')} "
                    f"checkpoints); current {_s(c.get('caught_up_s'))} after power-on; "
                    f"snapshots adopted {c.get('adopted', 0)} (served by "
                    f"{', '.join(c.get('snapshot_served_by', {})) or '?'}); net counters seen "
                    f"{c.get('net_counters_seen', {})}"))
    if "acked_lost" in r:
        out.append(("acknowledged operations lost",
                    f"{r['acked_lost']} ({r['ops']['meters_acked']} meters checked at their "
                    f"homes; chain one version ahead of {r['ops']['chain_one_ahead']}: ACK cut "
                    f"off; of those, new key still with the meter for "
                    f"{len(r['ops']['pending_at_home'])})"))
    dg = r.get("digests")
    if dg:
        hs = set(r.get("heights", {}).values())
        out.append(("full-state digests",
                    f"all {p['terminals']} identical ({dg['digest'][:16]}...) at height "
                    f"{hs.pop() if len(hs) == 1 else '?'}" if dg["equal"] else
                    f"DIFFER: {len({v for v in dg['by_terminal'].values()})} distinct"))
    cv = r.get("convergence")
    if cv:
        out.append(("convergence", f"every terminal current {_s(cv['after_last_restart_s'])} "
                                   "after the last power-on; equal heights "
                                   f"{_s(cv.get('equal_heights_after_meters_stopped_s'))} "
                                   "after the meters stopped"))
    out.append(("wall time", _s(r.get("wall_s"))))
    out.append(("result", "PASS" if not r["failures"] else "FAIL: " + "; ".join(r["failures"])))
    return out
