"""An HPLC channel without I/O: what the line does to the bytes, as a function of time.

The h11 shape (``hal/linksession.py`` has it too): no sockets, clocks or
threads. The caller passes the time (``now``, seconds of any monotonic clock)
into every call, so the channel process and the tests with a fake clock run
the same code.

One ``OneWayChannel`` is one direction of the line. Its modem is frame
oriented, as an HPLC modem is: it cuts the byte stream it is handed into
*units* (``Splitter``) and sends each unit whole:

- a DL/T 698.45 frame (0x68, L, ..., 0x16; the whole frame is L + 2 bytes) is
  one unit once all its bytes arrived. The modem trusts L: it checks no HCS or
  FCS, that is the far end's decoder's job;
- each byte that cannot start a frame (anything but 0x68, 0xFE wake-up bytes
  included) is a garbage unit of its own;
- a frame candidate whose L is below the minimal frame's, or whose frame
  could never fit the modem buffer whole, is a garbage unit of its 0x68 alone,
  and the bytes after it are cut afresh, so a bad length never stalls the line;
- an incomplete frame waits at most ``idle_gap_s`` of line silence and then
  goes out as it is (a truncated unit), as a real modem flushes on a gap.

A unit enters the modem buffer when it is complete. If it does not fit beside
the bytes still waiting to be serialised it is dropped whole and counted: the
modem drops on overflow, it never pushes back. Otherwise it is serialised
after the unit before it at ``rate_bytes_per_s`` and arrives ``latency_s``
later:

    delivered_at = max(arrived_at, previous unit's serialisation end)
                   + len / rate_bytes_per_s + latency_s

so units are delivered in order. A unit occupies the buffer until its last
byte is serialised. On the line a unit is lost whole with probability
``frame_loss`` (it still took its airtime) and each bit of a delivered unit is
flipped with probability ``bit_error_rate``. Every random draw is made when a
unit is accepted, in unit order, from one ``random.Random`` per direction, so
the output depends only on the units and their times, never on how the input
was chunked or how often the caller pulls.

``Channel`` holds the two directions of one line: ``to_terminal`` (meters to
the terminal) and ``to_meters``.
"""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from dataclasses import dataclass

from hal.dlt698 import L_LENGTH_MASK, MIN_FRAME_BYTES, MIN_L, START
from hal.errors import LocalProtocolError
from hal.require import require_int, require_real

# Line silence after which an incomplete frame goes out as it is: 100 ms is
# several frame times even at the slowest HPLC rate (a 2 KiB frame takes
# 80 ms at 25 KByte/s), so a frame still arriving over a UART is not cut, and
# a stuck candidate costs the far end one reply timeout at most.
DEFAULT_IDLE_GAP_S = 0.1
# Bytes of L and the start byte the splitter needs to read a frame's length.
_LENGTH_PREFIX = 3
_BITS_PER_BYTE = 8


class ChannelError(LocalProtocolError, ValueError):
    """The caller's fault: a parameter out of range, or time going backwards."""


class UnitKind(enum.Enum):
    """What the modem made of a run of bytes."""

    FRAME = "frame"  # a whole frame by its L field
    GARBAGE = "garbage"  # one byte that cannot start a frame, or a candidate's 0x68
    TRUNCATED = "truncated"  # an incomplete frame flushed by the idle gap


@dataclass(frozen=True)
class Unit:
    """One unit as the modem took it in."""

    kind: UnitKind
    data: bytes


@dataclass(frozen=True)
class Delivery:
    """One accepted unit's fate: when it left the line and what came out.

    ``data`` is None for a unit lost on the line; otherwise it has the unit's
    length, with ``bits_flipped`` bits inverted.
    """

    unit: Unit
    arrived_at: float
    delivered_at: float
    data: bytes | None
    bits_flipped: int


@dataclass(frozen=True)
class ChannelParams:
    """One direction's figures; both directions of a ``Channel`` share them."""

    rate_bytes_per_s: float  # serialisation rate; a board's [plc] rate times 1024
    latency_s: float = 0.0  # propagation and modem latency, added to every unit
    bit_error_rate: float = 0.0  # probability each delivered bit is flipped
    frame_loss: float = 0.0  # probability a whole unit is lost on the line
    buffer_bytes: int = 8192  # the modem buffer: accepted but not yet serialised
    seed: int = 1
    idle_gap_s: float = DEFAULT_IDLE_GAP_S

    def __post_init__(self) -> None:
        def real(name: str, **bounds: float) -> None:
            value = require_real(name, getattr(self, name), error=ChannelError, **bounds)
            object.__setattr__(self, name, value)

        real("rate_bytes_per_s", above=0)
        real("latency_s", min=0)
        real("bit_error_rate", min=0, max=1)
        real("frame_loss", min=0, max=1)
        real("idle_gap_s", above=0)
        # The smallest frame must fit, or no frame could ever cross the line.
        object.__setattr__(self, "buffer_bytes", require_int(
            "buffer_bytes", self.buffer_bytes, min=MIN_FRAME_BYTES, error=ChannelError))
        object.__setattr__(self, "seed", require_int("seed", self.seed, error=ChannelError))


class Splitter:
    """Cuts a byte stream into units, as the modem does; no time, no randomness.

    The units do not depend on how the stream is chunked: ``feed`` returns
    every unit complete so far and holds at most one incomplete frame
    candidate (fewer than ``max_unit_bytes`` bytes), which ``flush`` ends.
    """

    def __init__(self, max_unit_bytes: int) -> None:
        self.max_unit_bytes = require_int("max_unit_bytes", max_unit_bytes,
                                          min=MIN_FRAME_BYTES, error=ChannelError)
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of the incomplete frame candidate held back."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Unit]:
        """Take ``data`` in; the units it completed, in order."""
        buf = self._buf
        buf += data
        units: list[Unit] = []
        pos, end = 0, len(buf)
        while pos < end:
            if buf[pos] != START:
                stop = buf.find(START, pos)
                stop = end if stop < 0 else stop
                units.extend(Unit(UnitKind.GARBAGE, bytes((b,))) for b in buf[pos:stop])
                pos = stop
                continue
            if end - pos < _LENGTH_PREFIX:
                break
            length = (buf[pos + 1] | buf[pos + 2] << 8) & L_LENGTH_MASK
            total = length + 2  # L counts from L through FCS; start and end bytes besides
            if length < MIN_L or total > self.max_unit_bytes:
                units.append(Unit(UnitKind.GARBAGE, bytes((START,))))
                pos += 1
                continue
            if end - pos < total:
                break
            units.append(Unit(UnitKind.FRAME, bytes(buf[pos:pos + total])))
            pos += total
        del buf[:pos]
        return units

    def flush(self) -> Unit | None:
        """The incomplete candidate as a truncated unit, or None if nothing is held."""
        if not self._buf:
            return None
        unit = Unit(UnitKind.TRUNCATED, bytes(self._buf))
        self._buf.clear()
        return unit


# Counters every direction reports (``OneWayChannel.counters``). Conservation,
# at any time: bytes_in == bytes_out + bytes_lost + bytes_dropped_overflow
# + bytes_in_flight + pending_bytes; units_in == units_out + units_lost
# + units_dropped_overflow + units_in_flight; frames likewise.
COUNTER_NAMES = (
    "bytes_in", "bytes_out", "bytes_lost", "bytes_dropped_overflow", "bytes_in_flight",
    "pending_bytes",
    "units_in", "units_out", "units_lost", "units_dropped_overflow", "units_in_flight",
    "frames_in", "frames_out", "frames_lost", "frames_dropped_overflow", "frames_in_flight",
    "frames_corrupted", "garbage_units_in", "truncated_units_in",
    "bits_flipped", "buffered_bytes", "max_buffered_bytes",
)
_KIND_COUNTER = {UnitKind.FRAME: "frames_in", UnitKind.GARBAGE: "garbage_units_in",
                 UnitKind.TRUNCATED: "truncated_units_in"}


class OneWayChannel:
    """One direction of the line; see the module docstring.

    ``push(data, now)`` hands it bytes, ``pull(now)`` takes what has arrived
    at the far end by ``now``, ``next_deadline()`` says when that changes
    next without a push. ``now`` never goes backwards.
    """

    def __init__(self, params: ChannelParams, *, seed: int | None = None) -> None:
        if not isinstance(params, ChannelParams):
            raise ChannelError(f"params must be ChannelParams, got {type(params).__name__}")
        self.params = params
        seed = params.seed if seed is None else require_int("seed", seed, error=ChannelError)
        self._rng = random.Random(seed)
        self._splitter = Splitter(params.buffer_bytes)
        self._now = -math.inf
        self._last_rx = -math.inf  # when the last byte arrived: the idle gap counts from it
        self._queued: deque[tuple[float, int]] = deque()  # (serialisation end, bytes), in order
        self._buffered = 0
        self._line_free_at = -math.inf  # the previous unit's serialisation end
        self._flight: deque[Delivery] = deque()  # accepted, not yet delivered, in order
        self._c = dict.fromkeys(COUNTER_NAMES, 0)
        # Bits still to pass before the next flip: one geometric draw per flip
        # instead of one per bit (128 KByte/s is a million bits a second).
        self._clean_bits = self._clean_run() if params.bit_error_rate > 0 else 0

    # ------------------------------------------------------------ the API

    def push(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Bytes handed to the modem at ``now``."""
        self._advance(now, "push")
        if not data:
            return
        self._c["bytes_in"] += len(data)
        self._last_rx = now
        for unit in self._splitter.feed(data):
            self._accept(unit, now)

    def pull_deliveries(self, now: float) -> list[Delivery]:
        """Every unit whose delivery time has come by ``now``, lost ones included, in order."""
        self._advance(now, "pull")
        out: list[Delivery] = []
        c = self._c
        while self._flight and self._flight[0].delivered_at <= now:
            d = self._flight.popleft()
            n = len(d.unit.data)
            is_frame = d.unit.kind is UnitKind.FRAME
            c["units_in_flight"] -= 1
            c["bytes_in_flight"] -= n
            c["frames_in_flight"] -= is_frame
            if d.data is None:
                c["units_lost"] += 1
                c["bytes_lost"] += n
                c["frames_lost"] += is_frame
            else:
                c["units_out"] += 1
                c["bytes_out"] += n
                c["frames_out"] += is_frame
                c["frames_corrupted"] += is_frame and d.bits_flipped > 0
                c["bits_flipped"] += d.bits_flipped
            out.append(d)
        return out

    def pull(self, now: float) -> bytes:
        """The bytes that reached the far end by ``now`` (lost units leave nothing)."""
        return b"".join(d.data for d in self.pull_deliveries(now) if d.data is not None)

    def next_deadline(self) -> float | None:
        """When ``pull`` next has something, or the idle gap ends a candidate; None: never."""
        times = []
        if self._flight:
            times.append(self._flight[0].delivered_at)
        if self._splitter.pending:
            times.append(self._last_rx + self.params.idle_gap_s)
        return min(times) if times else None

    def counters(self) -> dict[str, int]:
        """The counters (``COUNTER_NAMES``) as of the last call's ``now``."""
        c = dict(self._c)
        c["pending_bytes"] = self._splitter.pending
        c["buffered_bytes"] = self._buffered
        return c

    # ------------------------------------------------------------ inside

    def _advance(self, now: float, what: str) -> None:
        now = require_real("now", now, error=ChannelError)
        if now < self._now:
            raise ChannelError(f"{what}: time went backwards ({now!r} after {self._now!r})")
        self._now = now
        quiet_since = self._last_rx + self.params.idle_gap_s
        if self._splitter.pending and quiet_since <= now:
            unit = self._splitter.flush()
            assert unit is not None
            self._accept(unit, quiet_since)  # it left when the gap ended, not when we looked
        self._drain_buffer(now)

    def _drain_buffer(self, now: float) -> None:
        """Forget the units whose last byte has been serialised by ``now``."""
        while self._queued and self._queued[0][0] <= now:
            self._buffered -= self._queued.popleft()[1]

    def _accept(self, unit: Unit, at: float) -> None:
        p, c = self.params, self._c
        n = len(unit.data)
        is_frame = unit.kind is UnitKind.FRAME
        c["units_in"] += 1
        c[_KIND_COUNTER[unit.kind]] += 1
        self._drain_buffer(at)
        if self._buffered + n > p.buffer_bytes:
            c["units_dropped_overflow"] += 1
            c["bytes_dropped_overflow"] += n
            c["frames_dropped_overflow"] += is_frame
            return
        sent_at = max(at, self._line_free_at) + n / p.rate_bytes_per_s
        self._line_free_at = sent_at
        self._queued.append((sent_at, n))
        self._buffered += n
        c["max_buffered_bytes"] = max(c["max_buffered_bytes"], self._buffered)
        if p.frame_loss > 0 and self._rng.random() < p.frame_loss:
            data, flipped = None, 0
        else:
            data, flipped = self._corrupt(unit.data)
        self._flight.append(Delivery(unit, at, sent_at + p.latency_s, data, flipped))
        c["units_in_flight"] += 1
        c["bytes_in_flight"] += n
        c["frames_in_flight"] += is_frame

    def _clean_run(self) -> int:
        """Bits before the next flip: geometric with the bit error rate."""
        p = self.params.bit_error_rate
        if p >= 1:
            return 0
        u = 1.0 - self._rng.random()  # (0, 1]: log is finite
        return int(math.log(u) / math.log1p(-p))

    def _corrupt(self, data: bytes) -> tuple[bytes, int]:
        """``data`` with the bit errors the line puts on it; bits go out LSB first, as on a UART."""
        if self.params.bit_error_rate <= 0:
            return data, 0
        nbits = len(data) * _BITS_PER_BYTE
        pos = self._clean_bits
        if pos >= nbits:
            self._clean_bits = pos - nbits
            return data, 0
        out = bytearray(data)
        flipped = 0
        while pos < nbits:
            out[pos >> 3] ^= 1 << (pos & 7)
            flipped += 1
            pos += 1 + self._clean_run()
        self._clean_bits = pos - nbits
        return bytes(out), flipped


class Channel:
    """Both directions of one line. The directions draw from their own generators,
    seeded ``seed`` (to the terminal) and ``seed + 1`` (to the meters), so a
    lossy line does not lose a request and its reply in lockstep."""

    def __init__(self, params: ChannelParams) -> None:
        if not isinstance(params, ChannelParams):
            raise ChannelError(f"params must be ChannelParams, got {type(params).__name__}")
        self.params = params
        self.to_terminal = OneWayChannel(params, seed=params.seed)
        self.to_meters = OneWayChannel(params, seed=params.seed + 1)

    def next_deadline(self) -> float | None:
        """The sooner of the two directions' deadlines, or None."""
        times = [t for t in (self.to_terminal.next_deadline(), self.to_meters.next_deadline())
                 if t is not None]
        return min(times) if times else None

    def counters(self) -> dict[str, dict[str, int]]:
        """Each direction's counters, keyed ``to_terminal`` and ``to_meters``."""
        return {"to_terminal": self.to_terminal.counters(),
                "to_meters": self.to_meters.counters()}
