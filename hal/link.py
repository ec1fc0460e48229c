"""Link driver: DL/T 698.45 frames over any pyserial port, opened by URL.

A UART (``/dev/ttyS1``), a pty slave, ``socket://host:port`` (an emulated
PLC channel) and ``loop://`` all go through ``serial.serial_for_url``, so the
driver code is the same on the terminal, under QEMU and on the host
(DESIGN: "Drivers are pyserial"). The protocol state (framing, matching
replies to requests, resends, timeouts, the idle gap) is
``hal/linksession.py``'s sans-I/O ``LinkSession``; ``Link`` is its blocking
wrapper for one thread driving one link. ``hal/pump.py`` drives many
sessions from one thread instead.

- ``recv_frame`` waits for the next good frame; rejected byte runs are
  counted and kept for ``rejected()``, never raised. ``recv_event`` returns
  them as they come (``Rejected`` with its reason code, for a negative
  acknowledgement). When a partial frame sits in the decoder and the line
  stays quiet for ``idle_gap_s``, the session releases it
  (``FrameDecoder.line_idle``), so a frame cut off mid-way cannot hold back
  the frames behind it.
- ``request`` sends, waits for the matching reply, and resends up to
  ``retries`` times. Frames that arrive meanwhile and answer something else
  stay queued for the next ``recv_frame``.
- With ``pace_bytes_per_s > 0`` writes go through a token bucket, for
  channels with no line rate of their own (a virtio console, loop://,
  socket://). Its clock and sleep are injectable so tests need not wait.
  Receive waits use the real monotonic clock: the port blocks in real time.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

import serial

from hal import board
from hal.dlt698 import DEFAULT_MAX_FRAME_BYTES, Frame, is_response_to
from hal.linksession import (
    DEFAULT_IDLE_GAP_S,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    MAX_RETRIES,
    READ_CHUNK,
    FrameReceived,
    LinkCounters,
    LinkSession,
    LocalProtocolError,
    Rejected,
    Reply,
    Timeout,
    default_max_events,
)

__all__ = [
    "DEFAULT_BAUD", "DEFAULT_IDLE_GAP_S", "DEFAULT_RETRIES", "DEFAULT_TIMEOUT_S", "READ_CHUNK",
    "Link", "LinkClosedError", "LinkConfigError", "LinkCounters", "LinkError", "LinkIOError",
    "LinkOpenError", "LinkTimeout", "TokenBucket", "default_pace_burst", "open_link", "open_port",
]

DEFAULT_BAUD = 115200  # the board files' UART rate
# Token bucket depth when pacing: 2 ms of line time, at least 16 bytes. Small,
# so even a short run of writes keeps to the rate; large enough that a 128 KiB/s
# channel sleeps at most about 500 times a second.
PACE_BURST_S = 0.002
PACE_MIN_BURST_BYTES = 16

Clock = Callable[[], float]
Sleep = Callable[[float], None]


class LinkError(Exception):
    """Anything that went wrong on a link."""


class LinkConfigError(LinkError, ValueError):
    """A link parameter is out of range."""


class LinkOpenError(LinkError):
    """The URL could not be opened; ``url`` and ``reason`` say which and why."""

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = reason
        super().__init__(f"cannot open link {url!r}: {reason}")


class LinkTimeout(LinkError):
    """No frame (or no matching reply) arrived in time."""


class LinkIOError(LinkError):
    """The port failed while reading or writing (unplugged, peer gone, write stuck)."""


class LinkClosedError(LinkError, LocalProtocolError):
    """The link was used after close()."""


class TokenBucket:
    """Pacing arithmetic, clock-free: in any interval of d seconds at most
    ``burst + rate * d`` bytes are released. Pacing is I/O timing, so it lives
    with the drivers: ``Link`` sleeps on it, ``hal.pump`` holds writes back."""

    def __init__(self, rate: float, burst: int, now: float):
        if rate <= 0 or burst < 1:
            raise LinkConfigError(f"token bucket needs rate > 0 and burst >= 1, "
                                  f"got {rate}, {burst}")
        self.rate = float(rate)
        self.burst = burst
        self._tokens = float(burst)
        self._t = now

    def reserve(self, n: int, now: float) -> float:
        """Take ``n`` (<= burst) bytes' worth of tokens; seconds to wait before sending them."""
        if not 0 < n <= self.burst:
            raise ValueError(f"reserve {n} bytes: must be 1..{self.burst}")
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._t) * self.rate)
        self._t = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


def default_pace_burst(pace_bytes_per_s: float) -> int:
    """The token bucket depth for a paced channel: PACE_BURST_S of line time."""
    return max(PACE_MIN_BURST_BYTES, int(pace_bytes_per_s * PACE_BURST_S))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LinkConfigError(message)


class Link:
    """Frames over one open pyserial port, blocking. ``open_link`` is the usual way in.

    One thread drives a link (the agent's node loop); it holds no locks.
    """

    def __init__(self, port: Any, *, url: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                 pace_bytes_per_s: int = 0, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 idle_gap_s: float = DEFAULT_IDLE_GAP_S, pace_burst_bytes: int | None = None,
                 clock: Clock = time.monotonic, sleep: Sleep = time.sleep):
        _check(timeout_s > 0, f"{url}: timeout_s must be > 0, got {timeout_s}")
        _check(pace_bytes_per_s >= 0,
               f"{url}: pace_bytes_per_s must be >= 0, got {pace_bytes_per_s}")
        try:  # the session checks max_frame_bytes and idle_gap_s
            self._session = LinkSession(max_frame_bytes=max_frame_bytes, idle_gap_s=idle_gap_s)
        except LocalProtocolError as exc:
            raise LinkConfigError(f"{url}: {exc}") from None
        self.port = port
        self.url = url
        self.timeout_s = timeout_s
        self.idle_gap_s = idle_gap_s
        self.max_frame_bytes = max_frame_bytes
        self.pace_bytes_per_s = pace_bytes_per_s
        self._clock = clock
        self._sleep = sleep
        self._bucket: TokenBucket | None = None
        self.pace_burst_bytes = 0
        if pace_bytes_per_s > 0:
            burst = pace_burst_bytes or default_pace_burst(pace_bytes_per_s)
            self.pace_burst_bytes = burst
            self._bucket = TokenBucket(pace_bytes_per_s, burst, clock())
        # Received events taken from the session by request() that were not its
        # reply, kept in order for recv_frame/recv_event; and the rejects
        # recv_frame skipped, for rejected(). Same bound and drop rule as the
        # session's own queue.
        self._max_held = default_max_events(max_frame_bytes)
        self._held: deque[FrameReceived | Rejected] = deque()
        self._skipped: deque[Rejected] = deque()
        self._port_timeout: float | None = None
        self._recv_timeouts = self._dropped = 0

    @property
    def session(self) -> LinkSession:
        """The protocol state this link drives (read its counters, its pending requests)."""
        return self._session

    # -- sending

    def send_frame(self, frame: Frame) -> int:
        """Encode and write one frame, paced if configured; the number of bytes written."""
        self._check_open()
        size = self._session.send(frame)  # LocalFrameError: the caller's fault
        self._flush()
        return size

    def _flush(self) -> None:
        """Write everything the session has queued (a frame, a resend)."""
        data = self._session.data_to_send()
        if data:
            self._write(data)

    def _write(self, data: bytes) -> None:
        bucket = self._bucket
        if bucket is None:
            self._port_write(data)
            return
        for pos in range(0, len(data), bucket.burst):
            chunk = data[pos:pos + bucket.burst]
            wait = bucket.reserve(len(chunk), self._clock())
            if wait > 0:
                self._sleep(wait)
            self._port_write(chunk)

    def _port_write(self, data: bytes) -> None:
        try:
            self.port.write(data)
        except (OSError, serial.SerialException, queue.Full) as exc:  # loop:// leaks queue.Full
            raise LinkIOError(f"{self.url}: write of {len(data)} bytes failed: "
                              f"{exc or type(exc).__name__}") from exc

    # -- receiving

    def recv_frame(self, timeout: float | None = None) -> Frame:
        """The next good frame; LinkTimeout after ``timeout`` s (default: the link's).

        Rejected byte runs on the way are counted and kept for ``rejected()``.
        """
        while True:
            event = self._recv(timeout)
            if isinstance(event, FrameReceived):
                return event.frame
            self._keep(self._skipped, event)

    def recv_event(self, timeout: float | None = None) -> FrameReceived | Rejected:
        """The next received event, a rejected byte run included; LinkTimeout as recv_frame."""
        return self._recv(timeout)

    def rejected(self) -> list[Rejected]:
        """Take the rejects ``recv_frame`` skipped since the last call, oldest first."""
        out = list(self._skipped)
        self._skipped.clear()
        return out

    def _recv(self, timeout: float | None) -> FrameReceived | Rejected:
        self._check_open()
        wait = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            event = self._held.popleft() if self._held else self._session.next_event()
            if isinstance(event, FrameReceived | Rejected):
                return event
            if event is not None:
                continue  # left by a request() that raised: nobody waits for it now
            if deadline - time.monotonic() <= 0:
                self._recv_timeouts += 1
                raise LinkTimeout(f"{self.url}: no frame within {wait:.3f} s")
            self._step(deadline)

    def _step(self, until: float) -> None:
        """Read until ``until`` or the session's next deadline, whichever comes first;
        hand the bytes and the time to the session, write what it queued."""
        now = time.monotonic()
        due = self._session.next_deadline()
        end = until if due is None else min(until, due)
        if math.isinf(end):  # nothing bounds the wait: read for the link's timeout
            end = now + self.timeout_s
        data = self._read(max(0.0, end - now))
        now = time.monotonic()
        if data:
            self._session.receive_data(data, now)
        self._session.tick(now)
        self._flush()

    def _read(self, timeout: float) -> bytes:
        """Wait up to ``timeout`` s for a byte, then take what else is already there."""
        try:
            self._set_port_timeout(timeout)
            first = self.port.read(1)
            if not first:
                return b""
            self._set_port_timeout(0)
            return first + self.port.read(READ_CHUNK)
        except (OSError, serial.SerialException) as exc:
            raise LinkIOError(f"{self.url}: read failed: {exc}") from exc

    def _set_port_timeout(self, timeout: float) -> None:
        if timeout != self._port_timeout:  # posix ports re-read termios on every change
            self.port.timeout = timeout
            self._port_timeout = timeout

    def _keep(self, where: deque[Any], event: FrameReceived | Rejected) -> None:
        if len(where) >= self._max_held:
            self._dropped += 1
        else:
            where.append(event)

    # -- request and reply

    def request(self, frame: Frame, *, retries: int = DEFAULT_RETRIES,
                timeout: float | None = None,
                match: Callable[[Frame, Frame], bool] = is_response_to) -> Frame:
        """Send ``frame`` and return the first frame ``match`` accepts as its reply.

        Each attempt waits ``timeout`` s (default: the link's); after a silent
        attempt the frame is sent again, up to ``retries`` more times. Frames
        that do not match (our own echo, another meter's report) are counted
        as unmatched and stay queued for ``recv_frame``. LinkTimeout when every
        attempt stayed silent.
        """
        if not 0 <= retries <= MAX_RETRIES:
            raise LinkConfigError(f"retries must be 0..{MAX_RETRIES}, got {retries}")
        self._check_open()
        wait = self.timeout_s if timeout is None else timeout
        _check(wait > 0, f"{self.url}: timeout must be > 0, got {wait}")
        session = self._session
        for event in session.events():  # older than anything the request brings
            if isinstance(event, FrameReceived | Rejected):
                self._keep(self._held, event)
        rid = session.send_request(frame, time.monotonic(), timeout_s=wait, retries=retries,
                                   match=match)
        try:
            self._flush()
            while True:
                event = session.next_event()
                if event is None:
                    self._step(math.inf)  # the request's deadline bounds the wait
                elif isinstance(event, Reply) and event.request_id == rid:
                    return event.frame
                elif isinstance(event, Timeout) and event.request_id == rid:
                    raise LinkTimeout(f"{self.url}: no reply after {retries + 1} attempt(s) "
                                      f"of {wait:.3f} s")
                elif isinstance(event, FrameReceived | Rejected):
                    self._keep(self._held, event)
        finally:
            if rid in session.pending:  # left by an exception: stop its resends
                session.cancel(rid)

    # -- bookkeeping

    def counters(self) -> LinkCounters:
        """A snapshot of the counters; ``timeouts`` also counts recv_frame waits that expired."""
        c = self._session.counters()
        return dataclasses.replace(c, timeouts=c.timeouts + self._recv_timeouts,
                                   events_dropped=c.events_dropped + self._dropped)

    @property
    def is_open(self) -> bool:
        return bool(self.port.is_open)

    def close(self) -> None:
        """Close the port; safe to call twice."""
        self._session.close()
        if self.port.is_open:
            self.port.close()

    def _check_open(self) -> None:
        if not self.port.is_open or self._session.closed:
            raise LinkClosedError(f"{self.url}: link is closed")

    def __enter__(self) -> Link:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<Link {self.url} {state}>"


def open_link(url_or_config: str | board.Link, *, baud: int | None = None,
              timeout_s: float | None = None, pace_bytes_per_s: int | None = None,
              max_frame_bytes: int | None = None, idle_gap_s: float = DEFAULT_IDLE_GAP_S,
              clock: Clock = time.monotonic, sleep: Sleep = time.sleep) -> Link:
    """Open a link by URL, or from a board file's link config; explicit arguments override it.

    Raises LinkOpenError naming the URL when pyserial cannot open it, and
    LinkConfigError for out-of-range numbers.
    """
    if isinstance(url_or_config, board.Link):
        cfg = url_or_config
        url = cfg.url
        baud = cfg.baud if baud is None else baud
        timeout_s = cfg.timeout_ms / 1000 if timeout_s is None else timeout_s
        pace_bytes_per_s = cfg.pace_bytes_per_s if pace_bytes_per_s is None else pace_bytes_per_s
        max_frame_bytes = cfg.max_frame_bytes if max_frame_bytes is None else max_frame_bytes
    else:
        url = url_or_config
    baud = DEFAULT_BAUD if baud is None else baud
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    pace_bytes_per_s = 0 if pace_bytes_per_s is None else pace_bytes_per_s
    max_frame_bytes = DEFAULT_MAX_FRAME_BYTES if max_frame_bytes is None else max_frame_bytes
    _check(isinstance(url, str) and bool(url.strip()), f"link URL must be a non-empty string, "
                                                       f"got {url!r}")
    _check(baud > 0, f"{url}: baud must be > 0, got {baud}")
    _check(timeout_s > 0, f"{url}: timeout_s must be > 0, got {timeout_s}")
    # Writes get the receive timeout plus the time a maximal frame takes at the
    # line rate (10 bits a byte): a stuck port raises instead of hanging, and
    # loop://, which refuses writes it estimates to outlast write_timeout, accepts every frame.
    write_timeout = timeout_s + 10 * max_frame_bytes / baud
    port = open_port(url, baud=baud, timeout=timeout_s, write_timeout=write_timeout)
    try:
        return Link(port, url=url, timeout_s=timeout_s, pace_bytes_per_s=pace_bytes_per_s,
                    max_frame_bytes=max_frame_bytes, idle_gap_s=idle_gap_s, clock=clock,
                    sleep=sleep)
    except LinkError:
        port.close()
        raise


def open_port(url: str, *, baud: int = DEFAULT_BAUD, timeout: float | None = 0,
              write_timeout: float | None = None) -> Any:
    """A raw pyserial port by URL (the console, a link the pump serves), opened exclusively.

    LinkOpenError names the URL when pyserial cannot open it.
    """
    try:
        return serial.serial_for_url(url, baudrate=baud, timeout=timeout,
                                     write_timeout=write_timeout, exclusive=True)
    except (OSError, ValueError, serial.SerialException) as exc:
        raise LinkOpenError(url, str(exc) or type(exc).__name__) from exc
