"""The emulated PLC channel as a process: ``python -m emulator.plc``.

It joins two ends with ``emulator.plc.model.Channel``: the terminal end
(where a terminal agent opens its ``hplc`` link) and the meter end (where the
emulated meters talk). Each end is opened by its clients exactly like a UART,
through ``serial.serial_for_url``:

- ``pty:PATH``: a pseudo-terminal. The process keeps its own descriptor of
  the slave open, so a client may close and reopen PATH without the master
  ever seeing EIO or a hang-up; PATH is a symlink to the slave's device.
- ``socket`` or ``socket:PORT``: a TCP listener on 127.0.0.1 (port 0, the
  default, picks a free one) for pyserial's ``socket://`` handler. One client
  at a time: a second connection while one is up is closed at once; after a
  disconnect the next one is accepted. Bytes for an end with no client are
  dropped and counted, as on a line nobody listens to.

One thread, one ``selectors`` loop: it sleeps until a descriptor is ready,
the model's next deadline or the next stats write, whichever comes first.
``--ready FILE`` is written once both ends listen: ``{"pid", "terminal",
"meters"}`` with the URLs to open. ``--stats FILE`` holds both directions'
counters, the ends' counters and the uptime, rewritten once a second and at
exit. SIGTERM or SIGINT: final stats, the symlinks and the ready file
removed, exit 0. An end that cannot be opened: one line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import selectors
import signal
import socket
import sys
import time
import tty
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from emulator.plc.model import Channel, ChannelError, ChannelParams
from hal.board import BoardConfigError, board_path, load_board

PROG = "python -m emulator.plc"
LOOPBACK = "127.0.0.1"  # emulation never listens beyond this host
KBYTE = 1024  # the paper's KByte/s, as the board files give the PLC rate
# How often the stats file is rewritten: often enough to watch a run, rare
# enough that an idle channel wakes once a second and no more.
STATS_INTERVAL_S = 1.0
# One read per ready descriptor: the Linux tty layer's 4 KiB buffer.
READ_CHUNK = 4096
# Bytes held for an end that cannot take them yet (a slow client, a pty no
# one has open): eight maximal 2 KiB link frames, a second of the slowest
# line rate. Beyond it bytes are dropped and counted, as a UART overruns.
OUTBOX_LIMIT = 16 * KBYTE
# Pending connections the kernel may hold while one client is served; they
# are accepted and closed (one client at a time), so a short queue does.
LISTEN_BACKLOG = 4
DEFAULT_LATENCY_MS = 20.0
DEFAULT_SEED = 1

Clock = Callable[[], float]


class EndError(Exception):
    """An end could not be opened; the message is the one line the user sees."""


@dataclass(frozen=True)
class EndSpec:
    """What ``--terminal-end`` / ``--meter-end`` asked for."""

    kind: str  # "pty" or "socket"
    path: str = ""  # pty: the symlink clients open
    port: int = 0  # socket: 0 = a free port


def parse_end(text: str) -> EndSpec:
    """``pty:PATH``, ``socket`` or ``socket:PORT``; argparse's type for the end options."""
    kind, sep, rest = text.partition(":")
    if kind == "pty" and sep and rest:
        return EndSpec("pty", path=rest)
    if kind == "socket":
        if not sep:
            return EndSpec("socket")
        if rest.isdigit() and 0 <= int(rest) <= 0xFFFF:
            return EndSpec("socket", port=int(rest))
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be an integer in 0..65535")
    raise argparse.ArgumentTypeError(f"{text!r}: expected pty:PATH, socket or socket:PORT")


def write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` so a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------ ends

class End:
    """One side of the channel: bytes its client wrote come out of ``on_ready``'s
    reads; ``send`` queues bytes for the client and writes what the kernel takes."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.url = ""
        self.outbox = bytearray()
        self.stats = {"bytes_read": 0, "bytes_written": 0, "bytes_dropped": 0}
        self._sel: selectors.BaseSelector | None = None
        self.received: Callable[[bytes], None] = lambda data: None

    def register(self, sel: selectors.BaseSelector, received: Callable[[bytes], None]) -> None:
        self._sel = sel
        self.received = received

    def send(self, data: bytes) -> None:
        """Queue ``data`` for the client, dropping what the outbox cannot hold."""
        if not data:
            return
        room = OUTBOX_LIMIT - len(self.outbox)
        if room < len(data):
            self.stats["bytes_dropped"] += len(data) - max(room, 0)
            data = data[:max(room, 0)]
        self.outbox += data
        self._flush()

    def _flush(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "outbox_bytes": len(self.outbox), **self.stats}


class PtyEnd(End):
    """A pty whose slave the process holds open; PATH is a symlink to the slave."""

    def __init__(self, role: str, path: str) -> None:
        super().__init__(role)
        self.path = Path(os.path.abspath(path))  # the ready file's URL works from any cwd
        self._link_made = False
        self._writing = False  # EVENT_WRITE registered: the outbox waits for the kernel
        self.device = ""
        self.master, self.slave = os.openpty()
        try:
            tty.setraw(self.slave)  # bytes pass untouched: no echo, no line editing
            os.set_blocking(self.master, False)
            self.device = os.ttyname(self.slave)
            if self.path.is_symlink() or not self.path.exists():
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                os.symlink(self.device, tmp)
                os.replace(tmp, self.path)  # a stale link from an earlier run is replaced
            else:
                raise OSError(errno.EEXIST, "exists and is not a symlink")
        except OSError as exc:
            self.close()
            raise EndError(f"cannot open the {role} end pty:{path}: "
                           f"{exc.strerror or exc}") from exc
        self._link_made = True
        self.url = str(self.path)

    def register(self, sel: selectors.BaseSelector, received: Callable[[bytes], None]) -> None:
        super().register(sel, received)
        sel.register(self.master, selectors.EVENT_READ, self._on_ready)

    def _on_ready(self, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = os.read(self.master, READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                data = b""
            except OSError:  # EIO cannot come while the slave is held; count nothing
                data = b""
            if data:
                self.stats["bytes_read"] += len(data)
                self.received(data)
        if mask & selectors.EVENT_WRITE:
            self._flush()

    def _flush(self) -> None:
        if self.outbox:
            try:
                n = os.write(self.master, self.outbox[:READ_CHUNK])
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self.stats["bytes_dropped"] += len(self.outbox)
                n = len(self.outbox)
            else:
                self.stats["bytes_written"] += n
            del self.outbox[:n]
        self._want_write(bool(self.outbox))

    def _want_write(self, want: bool) -> None:
        if self._sel is not None and want != self._writing:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self._sel.modify(self.master, events, self._on_ready)
            self._writing = want

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": self.device}

    def close(self) -> None:
        if self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self.master)
        if self._link_made:
            # Only our own link: a later run may have pointed PATH elsewhere.
            with contextlib.suppress(OSError):
                if os.readlink(self.path) == self.device:
                    self.path.unlink()
            self._link_made = False
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.master = self.slave = -1


class SocketEnd(End):
    """A loopback TCP listener serving one client at a time."""

    def __init__(self, role: str, port: int) -> None:
        super().__init__(role)
        self.client: socket.socket | None = None
        self.stats.update(connections=0, connections_refused=0, disconnects=0)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((LOOPBACK, port))
            self.listener.listen(LISTEN_BACKLOG)
            self.listener.setblocking(False)
        except OSError as exc:
            self.listener.close()
            raise EndError(f"cannot listen on {LOOPBACK}:{port} for the {role} end: "
                           f"{exc.strerror or exc}") from exc
        self.port = self.listener.getsockname()[1]
        self.url = f"socket://{LOOPBACK}:{self.port}"
        self._writing = False

    def register(self, sel: selectors.BaseSelector, received: Callable[[bytes], None]) -> None:
        super().register(sel, received)
        sel.register(self.listener, selectors.EVENT_READ, self._on_accept)

    def send(self, data: bytes) -> None:
        if self.client is None:
            self.stats["bytes_dropped"] += len(data)
            return
        super().send(data)

    def _on_accept(self, mask: int) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        if self.client is not None and self._client_alive():
            conn.close()
            self.stats["connections_refused"] += 1
            return
        self._drop_client()
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a frame is not held back
        self.client = conn
        self._writing = False
        self.stats["connections"] += 1
        assert self._sel is not None
        self._sel.register(conn, selectors.EVENT_READ, self._on_client)

    def _client_alive(self) -> bool:
        """False once the client hung up: a reconnect may beat us to its EOF."""
        assert self.client is not None
        try:
            return self.client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False

    def _on_client(self, mask: int) -> None:
        if mask & selectors.EVENT_READ and self.client is not None:
            try:
                data = self.client.recv(READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop_client()
                return
            self.stats["bytes_read"] += len(data)
            self.received(data)
        if mask & selectors.EVENT_WRITE:
            self._flush()

    def _flush(self) -> None:
        if self.client is None:
            return
        if self.outbox:
            try:
                n = self.client.send(self.outbox)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._drop_client()
                return
            self.stats["bytes_written"] += n
            del self.outbox[:n]
        want = bool(self.outbox)
        if self._sel is not None and want != self._writing:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self._sel.modify(self.client, events, self._on_client)
            self._writing = want

    def _drop_client(self) -> None:
        if self.client is None:
            return
        if self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self.client)
        self.client.close()
        self.client = None
        self.stats["disconnects"] += 1
        self.stats["bytes_dropped"] += len(self.outbox)
        self.outbox.clear()

    def close(self) -> None:
        self._drop_client()
        if self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self.listener)
        self.listener.close()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "connected": self.client is not None}


def open_end(role: str, spec: EndSpec) -> End:
    """The end ``spec`` asks for; EndError if it cannot be opened."""
    if spec.kind == "pty":
        return PtyEnd(role, spec.path)
    return SocketEnd(role, spec.port)


# ------------------------------------------------------------------ the loop

class Server:
    """The channel between its two ends, served from one selector."""

    def __init__(self, channel: Channel, terminal: End, meters: End, *,
                 stats_path: Path | None, clock: Clock = time.monotonic) -> None:
        self.channel = channel
        self.terminal = terminal
        self.meters = meters
        self.stats_path = stats_path
        self.clock = clock
        self.started = clock()
        self.stop = False
        self.sel = selectors.DefaultSelector()
        terminal.register(self.sel, lambda data: channel.to_meters.push(data, self.clock()))
        meters.register(self.sel, lambda data: channel.to_terminal.push(data, self.clock()))
        # Signals arrive through a pipe the selector watches, so a stop
        # request ends the wait at once rather than at the next deadline.
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w)
        self._old_handlers = {s: signal.signal(s, self._on_signal)
                              for s in (signal.SIGTERM, signal.SIGINT)}

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop = True

    def _on_wake(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self._wake_r, 64):
                pass

    def run(self) -> None:
        """Serve until a stop signal; stats on the way in, every second and on the way out."""
        next_stats = self.started
        while not self.stop:
            now = self.clock()
            if now >= next_stats:
                self.write_stats(final=False)
                next_stats = now + STATS_INTERVAL_S
            wake = next_stats
            deadline = self.channel.next_deadline()
            if deadline is not None:
                wake = min(wake, deadline)
            for key, mask in self.sel.select(max(0.0, wake - now)):
                key.data(mask)
            now = self.clock()
            self.terminal.send(self.channel.to_terminal.pull(now))
            self.meters.send(self.channel.to_meters.pull(now))

    def snapshot(self, *, final: bool) -> dict[str, Any]:
        """What the stats file holds."""
        return {
            "pid": os.getpid(),
            "uptime_s": round(self.clock() - self.started, 3),
            "final": final,
            "params": asdict(self.channel.params),
            **self.channel.counters(),
            "ends": {"terminal": self.terminal.describe(), "meters": self.meters.describe()},
        }

    def write_stats(self, *, final: bool) -> None:
        if self.stats_path is not None:
            write_json_atomic(self.stats_path, self.snapshot(final=final))

    def close(self) -> None:
        for s, handler in self._old_handlers.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self._old_wakeup_fd)
        self.sel.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


# ------------------------------------------------------------------ command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Emulated HPLC channel between a terminal's hplc link and "
                               "emulated meters; each end opens with serial.serial_for_url.")
    p.add_argument("--terminal-end", type=parse_end, required=True, metavar="SPEC",
                   help="where the terminal connects: pty:PATH, socket or socket:PORT")
    p.add_argument("--meter-end", type=parse_end, required=True, metavar="SPEC",
                   help="where the meters connect: pty:PATH, socket or socket:PORT")
    p.add_argument("--board", default="host",
                   help="board name or file giving the PLC rate range and modem buffer "
                        "(default: host)")
    p.add_argument("--rate-kbyte-s", type=float, metavar="R",
                   help="line rate in KByte/s (1024 bytes); default the board's maximum")
    p.add_argument("--latency-ms", type=float, default=DEFAULT_LATENCY_MS,
                   help=f"latency added to every unit (default {DEFAULT_LATENCY_MS:g})")
    p.add_argument("--ber", type=float, default=0.0, help="bit error rate (default 0)")
    p.add_argument("--loss", type=float, default=0.0,
                   help="probability a whole unit is lost (default 0)")
    p.add_argument("--buffer-bytes", type=int, metavar="N",
                   help="modem buffer; default the board's modem_buffer_bytes")
    p.add_argument("--idle-gap-ms", type=float, default=None, metavar="MS",
                   help="line silence after which an incomplete frame goes out (default 100)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of the loss and bit-error draws (default {DEFAULT_SEED})")
    p.add_argument("--stats", type=Path, metavar="FILE",
                   help="JSON counters, rewritten once a second and at exit")
    p.add_argument("--ready", type=Path, metavar="FILE",
                   help="JSON {pid, terminal, meters} written once both ends listen")
    return p


def params_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ChannelParams:
    """The channel's figures: the options, checked against the board's PLC range."""
    try:
        board = load_board(board_path(args.board))
    except BoardConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    plc = board.plc
    rate = plc.rate_max_kbyte_s if args.rate_kbyte_s is None else args.rate_kbyte_s
    if not plc.rate_min_kbyte_s <= rate <= plc.rate_max_kbyte_s:
        parser.error(f"--rate-kbyte-s {rate:g} is outside board {board.name}'s PLC range "
                     f"{plc.rate_min_kbyte_s}..{plc.rate_max_kbyte_s} KByte/s")
    extra = {} if args.idle_gap_ms is None else {"idle_gap_s": args.idle_gap_ms / 1000}
    try:
        return ChannelParams(
            rate_bytes_per_s=rate * KBYTE, latency_s=args.latency_ms / 1000,
            bit_error_rate=args.ber, frame_loss=args.loss,
            buffer_bytes=plc.modem_buffer_bytes if args.buffer_bytes is None
            else args.buffer_bytes, seed=args.seed, **extra)
    except ChannelError as exc:
        option = {"latency_s": "--latency-ms", "bit_error_rate": "--ber",
                  "frame_loss": "--loss", "buffer_bytes": "--buffer-bytes",
                  "idle_gap_s": "--idle-gap-ms"}
        name = str(exc).split(" ", 1)[0]
        parser.error(f"{option.get(name, name)}: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.terminal_end.kind == args.meter_end.kind == "pty"
            and os.path.abspath(args.terminal_end.path) == os.path.abspath(args.meter_end.path)):
        parser.error("--terminal-end and --meter-end name the same pty path")
    params = params_from_args(parser, args)
    ends: list[End] = []
    server: Server | None = None
    try:
        try:
            ends.append(open_end("terminal", args.terminal_end))
            ends.append(open_end("meters", args.meter_end))
        except EndError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 1
        terminal, meters = ends
        server = Server(Channel(params), terminal, meters, stats_path=args.stats)
        if args.ready is not None:
            write_json_atomic(args.ready, {"pid": os.getpid(), "terminal": terminal.url,
                                           "meters": meters.url})
        server.run()
        server.write_stats(final=True)
        return 0
    finally:
        for end in ends:
            end.close()
        if server is not None:
            server.close()
            if args.ready is not None:
                _remove_own_ready(args.ready)


def _remove_own_ready(path: Path) -> None:
    """The ready file says the ends listen; once they do not, it goes (if it is still ours)."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()


if __name__ == "__main__":
    sys.exit(main())
