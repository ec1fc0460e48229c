"""Link driver: DL/T 698.45 frames over any pyserial port, opened by URL.

A UART (``/dev/ttyS1``), a pty slave, ``socket://host:port`` (an emulated
PLC channel) and ``loop://`` all go through ``serial.serial_for_url``, so the
driver code is the same on the terminal, under QEMU and on the host
(DESIGN: "Drivers are pyserial"). Framing is ``hal/dlt698.py``'s sans-I/O
codec; this module only moves bytes, keeps time and counts.

- ``recv_frame`` feeds the decoder from the port; rejected bytes are counted,
  never raised. When a partial frame sits in the decoder and the line stays
  quiet for ``idle_gap_s``, the decoder is told (``FrameDecoder.line_idle``),
  so a frame cut off mid-way cannot hold back the frames behind it.
- ``request`` sends, waits for the matching reply, and resends up to
  ``retries`` times.
- With ``pace_bytes_per_s > 0`` writes go through a token bucket, for
  channels with no line rate of their own (a virtio console, loop://,
  socket://). Its clock and sleep are injectable so tests need not wait.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import serial

from hal import board
from hal.dlt698 import (
    DEFAULT_MAX_FRAME_BYTES,
    MAX_FRAME_BYTES,
    MIN_FRAME_BYTES,
    NEED_DATA,
    Frame,
    FrameDecoder,
    Reason,
    encode_frame,
    is_response_to,
)

DEFAULT_BAUD = 115200  # the board files' UART rate
DEFAULT_TIMEOUT_S = 1.0  # hal.board.Link's default timeout_ms
DEFAULT_RETRIES = 2  # a request goes out at most three times
# Bytes taken from the port per read once data is flowing: small enough that
# the decoder never holds much beyond one frame, large enough for one read
# per typical frame (the paper's 360-byte meter packets).
READ_CHUNK = 1024
# Quiet time after which a partial frame counts as cut off. Well above the
# 16 ms latency timer of USB-serial adapters and a few character times at
# 9600 baud; a sender that pauses longer in the middle of a frame loses it.
DEFAULT_IDLE_GAP_S = 0.1
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


class LinkClosedError(LinkError):
    """The link was used after close()."""


@dataclass(frozen=True)
class LinkCounters:
    """A snapshot of a link's counters since it was opened."""

    bytes_tx: int
    bytes_rx: int
    frames_tx: int
    frames_rx: int
    rejects: dict[Reason, int]  # decoder rejects per reason (events, GARBAGE runs included)
    garbage_bytes: int
    timeouts: int  # receive waits that ended without a frame
    retries: int  # request resends
    unmatched: int  # frames request() received that did not answer its request


class TokenBucket:
    """Pacing arithmetic, clock-free: in any interval of d seconds at most
    ``burst + rate * d`` bytes are released."""

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


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LinkConfigError(message)


class Link:
    """Frames over one open pyserial port. ``open_link`` is the usual way in.

    One thread drives a link (the agent's node loop); it holds no locks.
    """

    def __init__(self, port: Any, *, url: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                 pace_bytes_per_s: int = 0, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 idle_gap_s: float = DEFAULT_IDLE_GAP_S, pace_burst_bytes: int | None = None,
                 clock: Clock = time.monotonic, sleep: Sleep = time.sleep):
        _check(timeout_s > 0, f"{url}: timeout_s must be > 0, got {timeout_s}")
        _check(idle_gap_s > 0, f"{url}: idle_gap_s must be > 0, got {idle_gap_s}")
        _check(pace_bytes_per_s >= 0,
               f"{url}: pace_bytes_per_s must be >= 0, got {pace_bytes_per_s}")
        _check(MIN_FRAME_BYTES <= max_frame_bytes <= MAX_FRAME_BYTES,
               f"{url}: max_frame_bytes {max_frame_bytes} outside "
               f"[{MIN_FRAME_BYTES}, {MAX_FRAME_BYTES}]")
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
            burst = pace_burst_bytes or max(PACE_MIN_BURST_BYTES,
                                            int(pace_bytes_per_s * PACE_BURST_S))
            self.pace_burst_bytes = burst
            self._bucket = TokenBucket(pace_bytes_per_s, burst, clock())
        self._decoder = FrameDecoder(max_frame_bytes)
        self._port_timeout: float | None = None
        self._bytes_tx = self._bytes_rx = self._frames_tx = self._frames_rx = 0
        self._timeouts = self._retries = self._unmatched = 0

    # -- sending

    def send_frame(self, frame: Frame) -> int:
        """Encode and write one frame, paced if configured; the number of bytes written."""
        self._check_open()
        data = encode_frame(frame, self.max_frame_bytes)  # LocalFrameError: the caller's fault
        self._write(data)
        self._frames_tx += 1
        return len(data)

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
        self._bytes_tx += len(data)

    # -- receiving

    def recv_frame(self, timeout: float | None = None) -> Frame:
        """The next good frame; LinkTimeout after ``timeout`` s (default: the link's)."""
        self._check_open()
        wait = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            frame = self._next_frame()
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._timeouts += 1
                raise LinkTimeout(f"{self.url}: no frame within {wait:.3f} s")
            partial = self._decoder.buffered > 0  # drained, so only an incomplete frame is held
            read_s = min(remaining, self.idle_gap_s) if partial else remaining
            data = self._read(read_s)
            if data:
                self._bytes_rx += len(data)
                self._decoder.receive_data(data)
            elif partial and read_s >= self.idle_gap_s:
                self._decoder.line_idle()

    def _next_frame(self) -> Frame | None:
        """Drain decoder events up to the first frame; rejects are counted by the decoder."""
        while True:
            event = self._decoder.next_event()
            if event is NEED_DATA:
                return None
            if isinstance(event, Frame):
                self._frames_rx += 1
                return event

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

    # -- request and reply

    def request(self, frame: Frame, *, retries: int = DEFAULT_RETRIES,
                timeout: float | None = None,
                match: Callable[[Frame, Frame], bool] = is_response_to) -> Frame:
        """Send ``frame`` and return the first frame ``match`` accepts as its reply.

        Each attempt waits ``timeout`` s (default: the link's); after a silent
        attempt the frame is sent again, up to ``retries`` more times. Frames
        that do not match (our own echo, another meter's report) are counted
        as unmatched and dropped. LinkTimeout when every attempt stayed silent.
        """
        if retries < 0:
            raise LinkConfigError(f"retries must be >= 0, got {retries}")
        wait = self.timeout_s if timeout is None else timeout
        for attempt in range(retries + 1):
            if attempt:
                self._retries += 1
            self.send_frame(frame)
            deadline = time.monotonic() + wait
            while True:
                try:
                    reply = self.recv_frame(timeout=max(0.0, deadline - time.monotonic()))
                except LinkTimeout:
                    break
                if match(frame, reply):
                    return reply
                self._unmatched += 1
        raise LinkTimeout(f"{self.url}: no reply after {retries + 1} attempt(s) of {wait:.3f} s")

    # -- bookkeeping

    def counters(self) -> LinkCounters:
        """A snapshot of the counters."""
        d = self._decoder
        return LinkCounters(bytes_tx=self._bytes_tx, bytes_rx=self._bytes_rx,
                            frames_tx=self._frames_tx, frames_rx=self._frames_rx,
                            rejects=dict(d.rejects), garbage_bytes=d.garbage_bytes,
                            timeouts=self._timeouts, retries=self._retries,
                            unmatched=self._unmatched)

    @property
    def is_open(self) -> bool:
        return bool(self.port.is_open)

    def close(self) -> None:
        """Close the port; safe to call twice."""
        if self.port.is_open:
            self.port.close()

    def _check_open(self) -> None:
        if not self.port.is_open:
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
    try:
        port = serial.serial_for_url(url, baudrate=baud, timeout=timeout_s,
                                     write_timeout=write_timeout, exclusive=True)
    except (OSError, ValueError, serial.SerialException) as exc:
        raise LinkOpenError(url, str(exc) or type(exc).__name__) from exc
    try:
        return Link(port, url=url, timeout_s=timeout_s, pace_bytes_per_s=pace_bytes_per_s,
                    max_frame_bytes=max_frame_bytes, idle_gap_s=idle_gap_s, clock=clock,
                    sleep=sleep)
    except LinkError:
        port.close()
        raise
