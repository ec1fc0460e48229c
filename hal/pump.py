"""One thread serves many links: a ``selectors`` loop over pyserial ports.

Each registered link is a pyserial port (``serial.serial_for_url``) and its
sans-I/O ``LinkSession`` (``hal/linksession.py``). ``Pump.run_once(timeout)``
waits until a port is readable, a paced write may go out, a session's timer
is due or ``timeout`` passed, whichever comes first; reads what is ready,
hands it to the sessions with the clock's time, writes their outboxes, runs
their timers and returns the events produced as ``(link name, event)``
pairs. It sleeps in ``select`` between those moments: no busy loop (DESIGN:
700 MHz, "no busy loops"). The clock is injectable, so tests drive timers
with a fake one while the ports stay real.

Other file descriptors (the console's, network sockets) join the same
selector with ``add_fd(fileobj, events, callback)``: the callback gets the
ready mask, and the agent keeps one loop for everything.

The pump owns a registered port's timeouts: it sets ``timeout`` to 0 and,
where the port has a file descriptor, ``write_timeout`` to 0, so pyserial
reads and writes only what the kernel has ready (a write may be partial;
the rest goes out when the fd is writable again). Writes go out one chunk
per readiness: a pyserial port with ``write_timeout`` 0 spins on EAGAIN, so
the pump only writes after ``select`` said the fd can take bytes.

Ports without a file descriptor (pyserial's ``loop://``, whose ``fileno``
raises) cannot be selected on. They are polled on every pass instead, and
while one is registered the pump wakes at least every ``POLL_INTERVAL_S``;
their writes block for up to the port's own ``write_timeout`` (loop://
refuses a write timeout of 0). They are for tests and emulation; hardware
UARTs, ptys and ``socket://`` have a descriptor.

Pacing (``pace_bytes_per_s``) is ``hal.link.TokenBucket``: the pump takes at
most one bucket depth of bytes from a session at a time and holds them back
until the bucket allows them, sleeping in ``select`` meanwhile.

A port that fails (read or write error, a peer that hung up) produces a
``LinkDown`` event; its session is told the stream ended (its pending
requests time out at their deadlines, with no more resends) and the pump
stops reading and writing it. Closing the port stays with whoever opened it.
"""

from __future__ import annotations

import io
import queue
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import serial

from hal.link import TokenBucket, default_pace_burst
from hal.linksession import READ_CHUNK, Event, LinkSession, LocalProtocolError

# How often ports without a file descriptor are polled: 20 ms, below one
# 360-byte frame's time at 115200 baud (31 ms), so they add less than a frame
# of latency, and 50 wake-ups a second at most.
POLL_INTERVAL_S = 0.02
# Bytes offered to a port in one write when unpaced: the Linux tty layer's
# 4 KiB buffer; larger writes would only come back partial.
WRITE_CHUNK = 4096

Clock = Callable[[], float]
FdCallback = Callable[[int], None]


class PumpError(LocalProtocolError):
    """The caller misused the pump: a name registered twice, an unknown name,
    nothing to wait for."""


@dataclass(frozen=True)
class LinkDown:
    """The link's port failed (``detail`` says how); the pump no longer serves it."""

    detail: str


PumpEvent = Event | LinkDown


@dataclass(eq=False)
class _Link:
    name: str
    port: Any
    session: LinkSession
    fd: int | None
    bucket: TokenBucket | None
    chunk: bytes = b""  # taken from the session (and reserved from the bucket), not yet written
    not_before: float = 0.0  # when the bucket lets ``chunk`` go
    mask: int = selectors.EVENT_READ  # what the selector watches for
    down: bool = False
    notices: list[LinkDown] = field(default_factory=list)

    def active(self) -> bool:
        return not self.down and not self.session.closed


def _fileno(port: Any) -> int | None:
    try:
        fd = port.fileno()
    except (AttributeError, io.UnsupportedOperation, OSError, ValueError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


_PORT_ERRORS = (OSError, serial.SerialException, queue.Full)  # loop:// leaks queue.Full


class Pump:
    """A selector, the links and the descriptors registered with it; see the module docstring."""

    def __init__(self, *, clock: Clock = time.monotonic,
                 selector: selectors.BaseSelector | None = None):
        self._clock = clock
        self._selector = selector if selector is not None else selectors.DefaultSelector()
        self._links: dict[str, _Link] = {}
        self._closed = False

    # -- registration

    def add_link(self, name: str, port: Any, session: LinkSession | None = None, *,
                 pace_bytes_per_s: float = 0, pace_burst_bytes: int | None = None) -> LinkSession:
        """Serve ``port`` (an open pyserial port) under ``name``; its session (a new one
        with the defaults unless given), to send on and to read counters from."""
        self._check_open()
        if name in self._links:
            raise PumpError(f"link {name!r} is already registered")
        if pace_bytes_per_s < 0:
            raise PumpError(f"{name}: pace_bytes_per_s must be >= 0, got {pace_bytes_per_s}")
        session = session if session is not None else LinkSession()
        bucket = None
        if pace_bytes_per_s > 0:
            bucket = TokenBucket(pace_bytes_per_s,
                                 pace_burst_bytes or default_pace_burst(pace_bytes_per_s),
                                 self._clock())
        fd = _fileno(port)
        entry = _Link(name, port, session, fd, bucket)
        if fd is not None:
            try:
                self._selector.register(fd, selectors.EVENT_READ, entry)
            except (KeyError, ValueError) as exc:
                raise PumpError(f"{name}: cannot watch fd {fd}: {exc}") from exc
        try:
            port.timeout = 0
            if fd is not None:
                port.write_timeout = 0
        except Exception:
            if fd is not None:
                self._selector.unregister(fd)
            raise
        self._links[name] = entry
        return session

    def remove_link(self, name: str) -> LinkSession:
        """Stop serving ``name``; its session. The port stays open: its owner closes it."""
        entry = self._entry(name)
        del self._links[name]
        self._unregister(entry)
        return entry.session

    def session(self, name: str) -> LinkSession:
        """The session of link ``name``."""
        return self._entry(name).session

    @property
    def links(self) -> tuple[str, ...]:
        """The registered links' names, in registration order."""
        return tuple(self._links)

    def add_fd(self, fileobj: Any, events: int, callback: FdCallback) -> None:
        """Watch ``fileobj`` (a socket, an fd) for ``events`` (selectors.EVENT_READ/WRITE);
        ``run_once`` calls ``callback(ready_mask)`` when it is ready."""
        self._check_open()
        try:
            self._selector.register(fileobj, events, callback)
        except (KeyError, ValueError) as exc:
            raise PumpError(f"cannot watch {fileobj!r}: {exc}") from exc

    def modify_fd(self, fileobj: Any, events: int, callback: FdCallback) -> None:
        """Change what ``fileobj`` is watched for, or its callback."""
        self._check_open()
        key = self._fd_key(fileobj)
        self._selector.modify(key.fileobj, events, callback)

    def remove_fd(self, fileobj: Any) -> None:
        """Stop watching ``fileobj``; closing it stays with its owner."""
        self._check_open()
        key = self._fd_key(fileobj)
        self._selector.unregister(key.fileobj)

    def _fd_key(self, fileobj: Any) -> selectors.SelectorKey:
        try:
            key = self._selector.get_key(fileobj)
        except (KeyError, ValueError) as exc:
            raise PumpError(f"{fileobj!r} is not watched") from exc
        if isinstance(key.data, _Link):
            raise PumpError(f"{fileobj!r} is link {key.data.name!r}'s port: use remove_link")
        return key

    def _entry(self, name: str) -> _Link:
        self._check_open()
        try:
            return self._links[name]
        except KeyError:
            raise PumpError(f"no link {name!r}") from None

    def _unregister(self, entry: _Link) -> None:
        if entry.fd is not None and entry.fd in self._selector.get_map():
            self._selector.unregister(entry.fd)

    # -- the loop

    def run_once(self, timeout: float | None = None) -> list[tuple[str, PumpEvent]]:
        """One pass: wait (at most ``timeout`` s; None: until something is due), do the
        I/O that is ready, run the timers; the events produced, link by link."""
        self._check_open()
        if timeout is not None and timeout < 0:
            raise PumpError(f"timeout must be >= 0 or None, got {timeout}")
        now = self._clock()
        # Bytes that arrived while the caller worked go in before the timers run: a frame
        # whose rest sits unread in the kernel must not be cut off by its idle gap.
        self._read_ready(now)
        self._tick(now)  # timers that fell due while the caller worked
        self._fill(now)
        self._write_fdless(now)
        wait = self._wait(timeout, now)
        self._watch(now)
        ready = self._selector.select(wait)
        now = self._clock()
        for key, mask in ready:
            data = key.data
            if isinstance(data, _Link):
                if self._links.get(data.name) is data and data.active():
                    if mask & selectors.EVENT_READ:
                        self._read(data, now)
                    if mask & selectors.EVENT_WRITE and data.active():
                        self._write(data, now)
            elif self._selector.get_map().get(key.fd) is key:  # not removed by a callback
                data(mask)
        for entry in self._links.values():
            if entry.fd is None and entry.active():
                self._read(entry, now)
        self._tick(now)
        self._fill(now)
        self._write_fdless(now)
        return self._collect()

    def _read_ready(self, now: float) -> None:
        for key, mask in self._selector.select(0):
            data = key.data
            if (isinstance(data, _Link) and mask & selectors.EVENT_READ
                    and self._links.get(data.name) is data and data.active()):
                self._read(data, now)

    def next_deadline(self) -> float | None:
        """The earliest time a session's timer or a paced write held back is due, or None."""
        return self._deadline(self._clock())

    def _deadline(self, now: float) -> float | None:
        times: list[float] = []
        for entry in self._links.values():
            if entry.session.closed:
                continue
            due = entry.session.next_deadline()  # a down link's requests still run out
            if due is not None:
                times.append(due)
            # A chunk the bucket already allows waits for writability, not for a time.
            if entry.active() and entry.chunk and entry.not_before > now:
                times.append(entry.not_before)
        return min(times) if times else None

    def _wait(self, timeout: float | None, now: float) -> float | None:
        waits = [] if timeout is None else [timeout]
        due = self._deadline(now)
        if due is not None:
            waits.append(due - now)
        if any(e.fd is None and e.active() for e in self._links.values()):
            waits.append(POLL_INTERVAL_S)
        if not waits:
            if not self._selector.get_map():
                raise PumpError("run_once(None) with nothing registered would sleep forever")
            return None
        return max(0.0, min(waits))

    def _watch(self, now: float) -> None:
        """Watch for writability only where a chunk may go out now: an fd that is
        always writable must not wake the loop while the bucket says wait."""
        for entry in self._links.values():
            if entry.fd is None:
                continue
            if not entry.active():  # its session was closed under it: stop watching
                self._unregister(entry)
                continue
            mask = selectors.EVENT_READ
            if entry.chunk and entry.not_before <= now:
                mask |= selectors.EVENT_WRITE
            if mask != entry.mask:
                self._selector.modify(entry.fd, mask, entry)
                entry.mask = mask

    def _tick(self, now: float) -> None:
        for entry in self._links.values():
            if not entry.session.closed:
                entry.session.tick(now)

    def _fill(self, now: float) -> None:
        """Give each idle writer its next chunk from the session, reserved from the bucket."""
        for entry in self._links.values():
            if entry.chunk or not entry.active() or not entry.session.outbox_bytes:
                continue
            bucket = entry.bucket
            entry.chunk = entry.session.data_to_send(bucket.burst if bucket else WRITE_CHUNK)
            entry.not_before = now + (bucket.reserve(len(entry.chunk), now) if bucket else 0.0)

    def _write_fdless(self, now: float) -> None:
        for entry in self._links.values():
            if entry.fd is None and entry.active():
                self._write(entry, now)

    def _read(self, entry: _Link, now: float) -> None:
        try:
            if entry.fd is None:
                waiting = entry.port.in_waiting
                data = entry.port.read(min(waiting, READ_CHUNK)) if waiting else b""
            else:
                data = entry.port.read(READ_CHUNK)
        except _PORT_ERRORS as exc:
            self._down(entry, f"read failed: {exc or type(exc).__name__}", now)
            return
        if data:
            entry.session.receive_data(data, now)

    def _write(self, entry: _Link, now: float) -> None:
        if not entry.chunk or entry.not_before > now:
            return
        try:
            n = entry.port.write(entry.chunk)
        except _PORT_ERRORS as exc:
            self._down(entry, f"write of {len(entry.chunk)} bytes failed: "
                              f"{exc or type(exc).__name__}", now)
            return
        entry.chunk = entry.chunk[len(entry.chunk) if n is None else n:]

    def _down(self, entry: _Link, detail: str, now: float) -> None:
        entry.down = True
        entry.chunk = b""
        self._unregister(entry)
        if not entry.session.closed:
            entry.session.receive_data(b"", now)  # end of stream: no more resends
        entry.notices.append(LinkDown(detail))

    def _collect(self) -> list[tuple[str, PumpEvent]]:
        out: list[tuple[str, PumpEvent]] = []
        for name, entry in self._links.items():
            out.extend((name, event) for event in entry.session.events())
            out.extend((name, notice) for notice in entry.notices)
            entry.notices.clear()
        return out

    # -- lifetime

    def close(self) -> None:
        """Stop serving everything and close the selector; ports and fds stay open."""
        if not self._closed:
            self._closed = True
            self._links.clear()
            self._selector.close()

    def _check_open(self) -> None:
        if self._closed:
            raise PumpError("the pump is closed")

    def __enter__(self) -> Pump:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
