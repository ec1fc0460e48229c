"""``python -m emulator.meter``: a bank of emulated meters on one link (CPython runner).

    python -m emulator.meter --link socket://127.0.0.1:7000 --meters ecd-00.meters.json \\
        --state out/meters --stats out/meters/stats.json

The link is opened with ``serial.serial_for_url(url, baudrate=115200,
timeout=0)``: a pty, a UART, or ``socket://host:port`` (an emulated PLC
channel). One thread; a ``selectors`` loop sleeps until the port is
readable (or writable with frames waiting), the next meter deadline, the
next stats write or a signal, never polling in a busy loop. A port that
fails (EIO, the peer closed) is closed and the URL opened again with
backoff (0.5 s doubling to 10 s): the channel process may restart. Frames
due while the link is down are dropped and counted, and the meters resend
as they would on a silent line.

Files:
- ``--meters``: a JSON list of ``{"id": hex, "factory_key": hex}``, one per
  meter (other keys ignored); the format the fleet writes for a terminal.
- ``--state DIR``: one ``<id hex>.json`` per meter, ``Meter.state()``: written
  atomically (temp file, fsync, ``os.replace``, fsync of the folder) when a
  key operation starts, after every acknowledged operation, and at exit;
  read at start, so a restarted process goes on with its keys and counters.
- ``--stats FILE``: every counter as JSON, rewritten atomically once a second
  and at exit.

SIGTERM and SIGINT save the state and the stats and exit 0. Keys and nonces
come from ``os.urandom``; ``--seed`` fixes only the start spread and the
retry jitter (a seeded key stream would repeat keys after a restart).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import selectors
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import serial

from emulator.meter import frame as meter_frame
from emulator.meter.apdu import SERVICE_NAMES
from emulator.meter.meter import DEFAULT_CA, Meter, MeterBank
from emulator.meter.shim import CPythonShim

log = logging.getLogger("emulator.meter")

BAUDRATE = 115200
READ_CHUNK = 4096
WRITE_CHUNK = 4096  # the Linux tty layer's buffer; larger writes only come back partial
STATS_EVERY_MS = 1000
REOPEN_FIRST_S = 0.5
REOPEN_MAX_S = 10.0
# A frame's bytes arrive within a few ms at 115200 baud; a candidate still
# incomplete after this long is cut off (hal.dlt698 TRUNCATED), not awaited.
LINE_IDLE_MS = 200


class UsageError(Exception):
    """A bad option or input file: reported with exit status 2."""


def _byte(text: str) -> int:
    value = int(text, 0)
    if not 0 <= value <= 0xFF:
        raise argparse.ArgumentTypeError(f"{text} is not one byte")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds >= 0")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m emulator.meter",
                                description="Emulated meters on one DL/T 698.45 link.")
    p.add_argument("--link", required=True,
                   help="pyserial URL: a pty or UART path, or socket://127.0.0.1:PORT")
    p.add_argument("--meters", required=True, type=Path,
                   help='JSON list of {"id": hex, "factory_key": hex}')
    p.add_argument("--state", type=Path, help="folder of per-meter state files")
    p.add_argument("--stats", type=Path, help="JSON file of all counters, rewritten every second")
    p.add_argument("--answers", type=Path,
                   help="append one JSON line per answer (time, meter, op, outcome, latency)")
    p.add_argument("--reading-every", type=_seconds, default=60.0, metavar="S",
                   help="seconds between readings, 0 never (default 60)")
    p.add_argument("--rotate-every", type=_seconds, default=3600.0, metavar="S",
                   help="seconds between key rotations, 0 never (default 3600)")
    p.add_argument("--start-spread", type=_seconds, default=0.0, metavar="S",
                   help="meters start registering spread over S seconds (default 0)")
    p.add_argument("--timeout", type=_seconds, default=5.0, metavar="S",
                   help="seconds to wait for an answer before resending (default 5)")
    p.add_argument("--retries", type=int, default=3, metavar="N",
                   help="resends with the same request id before giving up (default 3)")
    p.add_argument("--retry-later", type=_seconds, default=30.0, metavar="S",
                   help="seconds before a new series after giving up or BUSY (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seeds the start spread and jitter")
    p.add_argument("--ca", type=_byte, default=DEFAULT_CA, metavar="BYTE",
                   help="the terminal's client address (default 0x01)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    if args.retries < 0:
        p.error("--retries must be >= 0")
    return args


# ---------------------------------------------------------------- files

def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` so that a crash leaves the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_meters(path: Path) -> list[tuple[bytes, bytes]]:
    """The meters file as (id, factory key) pairs; UsageError saying what is wrong."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: {exc}") from None
    if not isinstance(doc, list) or not doc:
        raise UsageError(f"{path}: expected a non-empty JSON list of meters")
    out: list[tuple[bytes, bytes]] = []
    seen: set[bytes] = set()
    for i, entry in enumerate(doc):
        try:
            meter_id = bytes.fromhex(entry["id"])
            factory_key = bytes.fromhex(entry["factory_key"])
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise UsageError(f"{path}: meter {i}: needs hex 'id' and 'factory_key' "
                             f"({type(exc).__name__}: {exc})") from None
        if not 1 <= len(meter_id) <= 16 or len(factory_key) != 32:
            raise UsageError(f"{path}: meter {i}: id must be 1..16 bytes and the factory key 32")
        if meter_id in seen:
            raise UsageError(f"{path}: meter {entry['id']} listed twice")
        seen.add(meter_id)
        out.append((meter_id, factory_key))
    return out


# ---------------------------------------------------------------- the runner

class Runner:
    """The meters, the link and the files; ``run`` until a signal."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        # line-buffered: a line is whole on disk once written, even if the process is killed
        answers = None if args.answers is None else open(  # noqa: SIM115 (closed at exit)
            args.answers, "a", buffering=1, encoding="utf-8")
        self.shim = CPythonShim(answers=answers)
        self._t0 = time.monotonic()
        rng = random.Random(args.seed)
        self.bank = MeterBank(args.ca)
        self.loaded = 0
        if args.state is not None:
            args.state.mkdir(parents=True, exist_ok=True)
        for meter_id, factory_key in load_meters(args.meters):
            start_ms = int(rng.uniform(0, args.start_spread) * 1000) if args.start_spread else 0
            self.bank.add(self._meter(meter_id, factory_key, start_ms))
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.port: Any = None
        self._fd: int | None = None
        self._mask = 0
        self._outbox = bytearray()
        self._reopen_at = 0.0
        self._backoff = REOPEN_FIRST_S
        self._last_rx_ms = 0
        self._idle_told = True
        self.stopping = False
        self.link = {"url": args.link, "up": False, "opens": 0, "open_failures": 0,
                     "downs": 0, "bytes_in": 0, "bytes_out": 0, "frames_out": 0,
                     "frames_dropped": 0, "bytes_dropped": 0}

    def now_ms(self) -> int:
        return int((time.monotonic() - self._t0) * 1000)

    def _meter(self, meter_id: bytes, factory_key: bytes, start_ms: int) -> Meter:
        a = self.args
        config = {"ca": a.ca, "reading_every_s": a.reading_every, "rotate_every_s": a.rotate_every,
                  "timeout_s": a.timeout, "retries": a.retries, "retry_later_s": a.retry_later,
                  "start_ms": start_ms}
        path = self._state_path(meter_id)
        if path is not None and path.exists():
            try:
                state = json.loads(path.read_text())
                meter = Meter.from_state(state, self.shim, **config)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"{path}: unreadable meter state: {exc}") from None
            if meter.meter_id != meter_id or meter.factory_key != factory_key:
                raise UsageError(f"{path}: the state's meter id or factory key differs from "
                                 f"{self.args.meters}'s")
            self.loaded += 1
            return meter
        return Meter(meter_id, factory_key, self.shim, **config)

    def _state_path(self, meter_id: bytes) -> Path | None:
        return None if self.args.state is None else self.args.state / f"{meter_id.hex()}.json"

    # -- signals

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True

    # -- the link

    def _open(self) -> None:
        try:
            port = serial.serial_for_url(self.args.link, baudrate=BAUDRATE, timeout=0)
        except (serial.SerialException, OSError, ValueError) as exc:
            self.link["open_failures"] += 1
            if self.link["open_failures"] == 1 or self._backoff >= REOPEN_MAX_S:
                log.warning("link %s: cannot open: %s", self.args.link, exc)
            self._reopen_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, REOPEN_MAX_S)
            return
        try:
            fd = port.fileno()
            port.write_timeout = 0
        except Exception as exc:
            port.close()
            raise UsageError(f"link {self.args.link}: no file descriptor to select on "
                             f"({exc}); use a pty, a UART or socket://") from None
        self.port, self._fd, self._mask = port, fd, selectors.EVENT_READ
        self.selector.register(fd, self._mask, "port")
        self._backoff = REOPEN_FIRST_S
        self.link["opens"] += 1
        self.link["up"] = True
        log.info("link %s open (%d meters)", self.args.link, len(self.bank.meters))

    def _down(self, why: str) -> None:
        log.warning("link %s down: %s; reopening", self.args.link, why)
        if self._fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self._fd)
        with contextlib.suppress(Exception):
            self.port.close()
        self.port, self._fd = None, None
        self.link["downs"] += 1
        self.link["up"] = False
        self.link["bytes_dropped"] += len(self._outbox)
        self._outbox.clear()
        self._reopen_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, REOPEN_MAX_S)

    def _read(self, now: int) -> None:
        try:
            data = self.port.read(READ_CHUNK)
        except (serial.SerialException, OSError) as exc:
            self._down(str(exc) or type(exc).__name__)
            return
        if data:
            self.link["bytes_in"] += len(data)
            self._last_rx_ms = now
            self._idle_told = False
            self.bank.feed(data, now)

    def _write(self) -> None:
        try:
            n = self.port.write(bytes(self._outbox[:WRITE_CHUNK]))
        except (serial.SerialException, OSError) as exc:
            self._down(f"write: {exc or type(exc).__name__}")
            return
        n = n or 0
        self.link["bytes_out"] += n
        del self._outbox[:n]

    def _watch(self) -> None:
        if self._fd is None:
            return
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._outbox else 0)
        if mask != self._mask:
            self.selector.modify(self._fd, mask, "port")
            self._mask = mask

    # -- the loop

    def run(self) -> None:
        next_stats = 0
        while not self.stopping:
            if self.port is None and time.monotonic() >= self._reopen_at:
                self._open()
            now = self.now_ms()
            for frame in self.bank.poll(now):
                if self.port is None:
                    self.link["frames_dropped"] += 1
                else:
                    self._outbox += frame
                    self.link["frames_out"] += 1
            self._persist_dirty()
            if now >= next_stats:
                self.write_stats()
                next_stats = now + STATS_EVERY_MS
            self._watch()
            ready = self.selector.select(self._wait_s(now, next_stats))
            now = self.now_ms()
            for key, mask in ready:
                if key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        while self._wake_r.recv(256):
                            pass
                elif key.data == "port" and self.port is not None:
                    if mask & selectors.EVENT_READ:
                        self._read(now)
                    if mask & selectors.EVENT_WRITE and self.port is not None and self._outbox:
                        self._write()
            if not self._idle_told and now - self._last_rx_ms >= LINE_IDLE_MS:
                self._idle_told = True
                if self.bank.decoder.buffered:
                    self.bank.line_idle(now)

    def _wait_s(self, now: int, next_stats: int) -> float:
        due = [next_stats]
        deadline = self.bank.next_deadline_ms()
        if deadline is not None:
            due.append(deadline)
        if not self._idle_told:
            due.append(self._last_rx_ms + LINE_IDLE_MS)
        wait = max(0, min(due) - now) / 1000
        if self.port is None:
            wait = min(wait, max(0.0, self._reopen_at - time.monotonic()))
        return wait

    # -- persistence

    def _persist_dirty(self) -> None:
        for meter in self.bank.meters.values():
            if meter.dirty:
                self.save(meter)

    def save(self, meter: Meter) -> None:
        meter.dirty = False
        path = self._state_path(meter.meter_id)
        if path is not None:
            write_json_atomic(path, meter.state())

    def save_all(self) -> None:
        for meter in self.bank.meters.values():
            self.save(meter)

    def stats(self) -> dict[str, Any]:
        meters = {}
        totals: dict[str, int] = {}
        naks: dict[str, int] = {}
        for meter in self.bank.meters.values():
            for name, n in meter.counters.items():
                totals[name] = totals.get(name, 0) + n
            for name, n in meter.naks.items():
                naks[name] = naks.get(name, 0) + n
            op = meter.op
            meters[meter.meter_id.hex()] = {
                "key_version": meter.key_version, "has_key": meter.key is not None,
                "counter": meter.counter, "reading_counter": meter.reading_counter,
                "request_id": meter.request_id, "home": meter.home, "stopped": meter.stopped,
                "in_flight": None if op is None else SERVICE_NAMES.get(op.service),
                "counters": dict(meter.counters), "naks": dict(meter.naks),
            }
        decoder = self.bank.decoder
        return {
            "wall_time": time.time(), "uptime_ms": self.now_ms(), "pid": os.getpid(),
            "meters": len(meters), "loaded_from_state": self.loaded,
            "registered": sum(1 for m in self.bank.meters.values() if m.key is not None),
            "link": dict(self.link), "bank": dict(self.bank.counters),
            "decoder": {"frames": decoder.frames, "garbage_bytes": decoder.garbage_bytes,
                        "wake_up_bytes": decoder.wake_up_bytes,
                        "rejects": {meter_frame.REASON_NAMES.get(r, str(r)): n
                                    for r, n in decoder.rejects.items()}},
            "totals": totals, "naks": naks, "per_meter": meters,
        }

    def write_stats(self) -> None:
        if self.args.stats is not None:
            write_json_atomic(self.args.stats, self.stats())

    def close(self) -> None:
        if self.port is not None:
            with contextlib.suppress(Exception):
                self.port.close()
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()
        if self.shim.answers is not None:
            self.shim.answers.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        runner = Runner(args)
    except UsageError as exc:
        print(f"emulator.meter: {exc}", file=sys.stderr)
        return 2
    runner.install_signals()
    log.info("%d meters (%d from state), link %s", len(runner.bank.meters), runner.loaded,
             args.link)
    try:
        runner.run()
    except UsageError as exc:
        print(f"emulator.meter: {exc}", file=sys.stderr)
        return 2
    finally:
        runner.save_all()
        runner.write_stats()
        runner.close()
    log.info("stopped: state and stats saved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
