"""One DL/T 698.45 link's protocol state, without I/O (the h11 shape).

A ``LinkSession`` owns a ``FrameDecoder``, the requests waiting for their
reply (each with its deadline and the resends it has left) and the
inter-frame idle gap. It has no port, no clock and no thread: the caller
reads and writes the bytes and passes the time (``now``, seconds of any
monotonic clock) to every call, so the same code serves the blocking
``hal.link.Link``, the one-thread ``hal.pump.Pump`` and tests with a fake
clock.

- Bytes in: ``receive_data(data, now)``; ``receive_data(b"", now)`` says the
  peer closed its end (h11's convention).
- Events out: ``next_event()`` / ``events()``: ``FrameReceived``, ``Reply``,
  ``Rejected``, ``Resend``, ``Timeout``.
- Frames out: ``send(frame)`` for unsolicited frames (a reply, a report),
  ``send_request(frame, now, ...)`` for a frame that wants a reply; the bytes
  to write come from ``data_to_send()``.
- Time: ``tick(now)`` resends, times out and ends an idle partial frame;
  ``next_deadline()`` says when it next needs to be called.

Received bytes are parsed as they arrive, so a reply is matched at the
``now`` it was received even when ``tick`` for a later time follows.

A DL/T 698.45 link-layer frame carries no request number (the APDU's PIID
does; this layer does not parse APDUs), so a frame answers a pending request
when ``match(request, frame)`` accepts it, by default
``hal.dlt698.is_response_to`` (opposite DIR and PRM, same addresses). When
several pending requests accept the same frame, the oldest gets it. A frame
that answers none is a ``FrameReceived`` event, never dropped for being
unsolicited: a meter's report or a master station's command must reach the
node.

Rejected byte runs are events, not exceptions (DESIGN "Bad input": the node
answers a negative acknowledgement with the reason code and carries on).
Exceptions say whose fault a refused call is, as h11's do:
``LocalProtocolError`` (our caller misused the session) and
``RemoteProtocolError`` (the peer made the call impossible: it closed the
link). Both are ``SessionError``s and subclass the firmware-wide
``hal.errors`` types of the same names.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NewType

from hal import errors
from hal.dlt698 import (
    DEFAULT_MAX_FRAME_BYTES,
    MAX_FRAME_BYTES,
    MIN_FRAME_BYTES,
    NEED_DATA,
    Frame,
    FrameDecoder,
    Reason,
    ServerAddress,
    encode_frame,
    is_response_to,
)
from hal.dlt698 import Rejected as DecoderRejected
from hal.require import require_real

# ---------------------------------------------------------------- limits
DEFAULT_TIMEOUT_S = 1.0  # hal.board.Link's default timeout_ms
DEFAULT_RETRIES = 2  # a request goes out at most three times
# Quiet time after which a partial frame counts as cut off. Well above the
# 16 ms latency timer of USB-serial adapters and a few character times at
# 9600 baud; a sender that pauses longer in the middle of a frame loses it.
DEFAULT_IDLE_GAP_S = 0.1
# Bytes an I/O layer takes from a port per read once data is flowing: small
# enough that the decoder never holds much beyond one frame, large enough for
# one read per typical frame (the paper's 360-byte meter packets).
READ_CHUNK = 1024
# Requests waiting for a reply on one link. The paper caps a terminal's
# cluster at 25 meters; one request in flight per meter, with room to spare.
# Each pending request holds its encoded frame for resends, so the cap bounds
# memory too. Exceeding it is a LocalProtocolError: the caller chose to send,
# and nothing is lost by telling it to wait for a Reply or a Timeout.
MAX_PENDING_REQUESTS = 32
# Resends one request may ask for: past a handful, a resend only adds load
# to a channel that is failing.
MAX_RETRIES = 8
# Received events (FrameReceived, Rejected) queued and not yet taken, by
# default. Every byte received yields at most one event (a rejected start
# byte, a garbage run of at least one byte, a frame of at least 12), and a
# drained decoder holds less than one frame, so a caller that takes the events
# after every read of up to READ_CHUNK + 1 bytes never reaches this. Beyond it
# a received event is dropped and counted (``events_dropped``), not raised:
# the bytes come from the peer, and a noisy line must neither grow our memory
# nor stop the node (DESIGN "Bad input"). Rejects stay counted per reason
# either way. Reply, Resend and Timeout are never dropped: at most retries + 1
# of them per request, and send_request refuses to start a request while the
# queue is full, so the queue never holds more than
# max_events + MAX_PENDING_REQUESTS * (MAX_RETRIES + 1) events.
def default_max_events(max_frame_bytes: int) -> int:
    """The received-event cap for a session of ``max_frame_bytes`` frames (see above)."""
    return READ_CHUNK + 1 + max_frame_bytes


# Bytes of frames queued by send()/send_request() and not yet taken by
# data_to_send(). A writer this far behind the line is stuck; the caller gets
# a LocalProtocolError instead of the session buffering without end. Room for
# four maximal frames. Resends are not refused: their number is bounded by
# MAX_PENDING_REQUESTS.
MAX_OUTBOX_BYTES = 4 * MAX_FRAME_BYTES

# Why a byte run was thrown away, for logs and negative acknowledgements.
REASON_DETAIL: dict[Reason, str] = {
    Reason.GARBAGE: "bytes before a start byte",
    Reason.BAD_LENGTH: "L shorter than the minimal frame, or its reserved bit 15 set",
    Reason.OVERSIZE: "L says more than max_frame_bytes",
    Reason.UNSUPPORTED_LENGTH_UNIT: "L bit 14 set: length in kilobytes",
    Reason.BAD_ADDRESS: "the SA length AF declares does not fit inside L",
    Reason.BAD_HCS: "header check sequence mismatch",
    Reason.BAD_CONTROL: "reserved C bit 4 set, or a reserved function code",
    Reason.BAD_FCS: "frame check sequence mismatch",
    Reason.BAD_END: "the byte after FCS is not 0x16",
    Reason.TRUNCATED: "the line went idle before the frame was complete",
}

RequestId = NewType("RequestId", int)
Match = Callable[[Frame, Frame], bool]


class SessionError(Exception):
    """A call the session refused."""


class LocalProtocolError(SessionError, errors.LocalProtocolError):
    """Our caller misused the session: an unknown request id, a call after
    close(), time going backwards, a limit exceeded by its own sends."""


class RemoteProtocolError(SessionError, errors.RemoteProtocolError):
    """The peer made the call impossible: it closed the link (end of stream).

    A ValueError too, as every ``hal.errors.RemoteProtocolError`` is.
    """


# ---------------------------------------------------------------- events

@dataclass(frozen=True)
class FrameReceived:
    """A good frame that answers no pending request: unsolicited, or late."""

    frame: Frame


@dataclass(frozen=True)
class Reply:
    """``frame`` answers the pending request ``request_id``, which is now done."""

    request_id: RequestId
    frame: Frame


@dataclass(frozen=True)
class Rejected:
    """``length`` received bytes were thrown away for ``reason`` (the code a
    negative acknowledgement carries); ``detail`` says it in words."""

    reason: Reason
    detail: str
    length: int
    # The SA and CA of a frame whose header checked before its body failed
    # (hal.dlt698.Rejected.source): where a negative acknowledgement can go.
    source: tuple[ServerAddress, int] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Resend:
    """Request ``request_id`` got no reply in time and went out again; ``attempt``
    counts its sends, this one included (2 for the first resend)."""

    request_id: RequestId
    attempt: int


@dataclass(frozen=True)
class Timeout:
    """Request ``request_id`` got no reply to any of its ``attempts`` sends; it is done."""

    request_id: RequestId
    attempts: int


Event = FrameReceived | Reply | Rejected | Resend | Timeout


@dataclass(frozen=True)
class LinkCounters:
    """A snapshot of a link's counters since it was opened.

    ``agent.routing.live.LinkSample.from_counters`` reads bytes, frames,
    retries and timeouts; the fields after ``unmatched`` have defaults so
    older callers that build one keep working.
    """

    bytes_tx: int  # bytes handed out for writing
    bytes_rx: int
    frames_tx: int  # frames queued for sending, resends included
    frames_rx: int  # good frames decoded
    rejects: dict[Reason, int]  # decoder rejects per reason (events, GARBAGE runs included)
    garbage_bytes: int
    timeouts: int  # request attempts that expired unanswered (Link adds recv_frame waits)
    retries: int  # request resends
    unmatched: int  # frames that arrived while requests were pending and answered none
    replies: int = 0  # frames matched to a pending request
    requests_failed: int = 0  # requests that got no reply to any attempt (Timeout events)
    events_dropped: int = 0  # received events dropped because the event queue was full


@dataclass
class _Pending:
    frame: Frame
    data: bytes
    match: Match
    timeout_s: float
    deadline: float
    retries_left: int
    attempts: int = 1


@dataclass
class _Counts:
    bytes_tx: int = 0
    bytes_rx: int = 0
    frames_tx: int = 0
    timeouts: int = 0
    retries: int = 0
    unmatched: int = 0
    replies: int = 0
    requests_failed: int = 0
    events_dropped: int = 0


def _positive_time(name: str, value: float) -> None:
    require_real(name, value, above=0, error=LocalProtocolError)  # seconds, finite


class LinkSession:
    """The protocol state of one link; see the module docstring."""

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 idle_gap_s: float = DEFAULT_IDLE_GAP_S,
                 max_pending: int = MAX_PENDING_REQUESTS, max_events: int | None = None):
        if not MIN_FRAME_BYTES <= max_frame_bytes <= MAX_FRAME_BYTES:
            raise LocalProtocolError(f"max_frame_bytes {max_frame_bytes} outside "
                                     f"[{MIN_FRAME_BYTES}, {MAX_FRAME_BYTES}]")
        _positive_time("idle_gap_s", idle_gap_s)
        if not 1 <= max_pending <= MAX_PENDING_REQUESTS:
            raise LocalProtocolError(f"max_pending must be 1..{MAX_PENDING_REQUESTS}, "
                                     f"got {max_pending}")
        if max_events is None:
            max_events = default_max_events(max_frame_bytes)
        if max_events < 1:
            raise LocalProtocolError(f"max_events must be >= 1, got {max_events}")
        self.max_frame_bytes = max_frame_bytes
        self.idle_gap_s = float(idle_gap_s)
        self.max_pending = max_pending
        self.max_events = max_events
        self._decoder = FrameDecoder(max_frame_bytes)
        self._pending: dict[RequestId, _Pending] = {}  # in send order: oldest first
        self._events: deque[Event] = deque()
        self._outbox = bytearray()
        self._next_id = 1
        self._now = -math.inf  # the latest time a caller passed
        self._last_rx = -math.inf  # when bytes last arrived
        self._peer_closed = False
        self._closed = False
        self._n = _Counts()

    # -- state

    @property
    def closed(self) -> bool:
        """close() was called."""
        return self._closed

    @property
    def peer_closed(self) -> bool:
        """The peer ended the stream (``receive_data(b"", now)``)."""
        return self._peer_closed

    @property
    def pending(self) -> tuple[RequestId, ...]:
        """The requests waiting for a reply, oldest first."""
        return tuple(self._pending)

    @property
    def outbox_bytes(self) -> int:
        """Bytes waiting for ``data_to_send``."""
        return len(self._outbox)

    @property
    def queued_events(self) -> int:
        """Events waiting for ``next_event``."""
        return len(self._events)

    def close(self) -> None:
        """End the session: pending requests are dropped, queued bytes discarded.

        Events already queued can still be taken; every other call then
        raises LocalProtocolError. Safe to call twice.
        """
        self._closed = True
        self._pending.clear()
        self._outbox.clear()

    # -- receiving

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Bytes the port delivered at ``now``; ``b""`` when the peer closed its end.

        The bytes are parsed at once, so each frame is matched against the
        requests pending at ``now``. At end of stream a partial frame is
        released (TRUNCATED) and pending requests get no more resends: they
        time out at their deadlines.
        """
        self._advance(now, "receive_data")
        if not data:
            if not self._peer_closed:
                self._peer_closed = True
                for p in self._pending.values():
                    p.retries_left = 0
                self._decoder.line_idle()
                self._drain_decoder()
            return
        if self._peer_closed:
            raise LocalProtocolError("receive_data after the end of stream")
        self._n.bytes_rx += len(data)
        self._last_rx = now
        self._decoder.receive_data(data)
        self._drain_decoder()

    def next_event(self) -> Event | None:
        """The oldest event not yet taken, or None."""
        return self._events.popleft() if self._events else None

    def events(self) -> Iterator[Event]:
        """Every queued event, oldest first, taking each."""
        while self._events:
            yield self._events.popleft()

    def _drain_decoder(self) -> None:
        while True:
            event = self._decoder.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, DecoderRejected):
                self._queue_received(Rejected(event.reason, REASON_DETAIL[event.reason],
                                              event.discarded, event.source))
            else:
                self._frame_in(event)

    def _frame_in(self, frame: Frame) -> None:
        for rid, p in self._pending.items():
            if p.match(p.frame, frame):
                del self._pending[rid]
                self._n.replies += 1
                self._events.append(Reply(rid, frame))  # never dropped: one per request
                return
        if self._pending:
            self._n.unmatched += 1
        self._queue_received(FrameReceived(frame))

    def _queue_received(self, event: FrameReceived | Rejected) -> None:
        if len(self._events) >= self.max_events:
            self._n.events_dropped += 1
            return
        self._events.append(event)

    # -- sending

    def send(self, frame: Frame) -> int:
        """Queue an unsolicited frame (a reply, a report); the bytes it takes.

        LocalFrameError (hal.dlt698) if it cannot be encoded, LocalProtocolError
        if the outbox is full or the session closed, RemoteProtocolError once
        the peer closed the link.
        """
        self._check_sendable()
        data = encode_frame(frame, self.max_frame_bytes)
        self._check_outbox(len(data))
        self._queue_out(data)
        return len(data)

    def send_request(self, frame: Frame, now: float, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                     retries: int = DEFAULT_RETRIES, match: Match = is_response_to) -> RequestId:
        """Queue ``frame`` and wait for the first frame ``match`` accepts as its reply.

        Each attempt waits ``timeout_s`` from when ``tick`` sent it (the
        first from ``now``); a silent attempt is resent up to ``retries``
        times, then the request ends with a Timeout event. The bytes come out
        of ``data_to_send``.
        """
        self._advance(now, "send_request")
        self._check_sendable()
        _positive_time("timeout_s", timeout_s)
        if isinstance(retries, bool) or not isinstance(retries, int) \
                or not 0 <= retries <= MAX_RETRIES:
            raise LocalProtocolError(f"retries must be 0..{MAX_RETRIES}, got {retries!r}")
        if len(self._pending) >= self.max_pending:
            raise LocalProtocolError(f"{len(self._pending)} requests already pending "
                                     f"(max {self.max_pending}): wait for a Reply or Timeout")
        if len(self._events) >= self.max_events:
            raise LocalProtocolError(f"{len(self._events)} events not taken: "
                                     f"take them with next_event() first")
        data = encode_frame(frame, self.max_frame_bytes)
        self._check_outbox(len(data))
        rid = RequestId(self._next_id)
        self._next_id += 1
        self._pending[rid] = _Pending(frame, data, match, float(timeout_s), now + timeout_s,
                                      retries)
        self._queue_out(data)
        return rid

    def cancel(self, request_id: RequestId) -> None:
        """Stop waiting for ``request_id``'s reply; a late reply is then a FrameReceived."""
        self._check_open()
        if request_id not in self._pending:
            raise LocalProtocolError(f"no pending request {request_id!r}")
        del self._pending[request_id]

    def data_to_send(self, limit: int | None = None) -> bytes:
        """Take up to ``limit`` (default: all) queued bytes for the port."""
        self._check_open()
        if limit is not None and limit < 1:
            raise LocalProtocolError(f"limit must be >= 1, got {limit}")
        n = len(self._outbox) if limit is None else min(limit, len(self._outbox))
        data = bytes(self._outbox[:n])
        del self._outbox[:n]
        self._n.bytes_tx += n
        return data

    def _check_sendable(self) -> None:
        self._check_open()
        if self._peer_closed:
            raise RemoteProtocolError("the peer closed the link")

    def _check_outbox(self, n: int) -> None:
        if len(self._outbox) + n > MAX_OUTBOX_BYTES:
            raise LocalProtocolError(f"outbox holds {len(self._outbox)} bytes; {n} more would "
                                     f"pass {MAX_OUTBOX_BYTES}: write data_to_send() first")

    def _queue_out(self, data: bytes) -> None:
        self._outbox += data
        self._n.frames_tx += 1

    # -- time

    def tick(self, now: float) -> None:
        """Run the timers due at ``now``: resends, timeouts, the idle gap."""
        self._advance(now, "tick")
        if self._decoder.buffered and now - self._last_rx >= self.idle_gap_s:
            self._decoder.line_idle()  # a frame cut off must not hold back the ones behind it
            self._drain_decoder()
        due = sorted((p.deadline, rid) for rid, p in self._pending.items() if now >= p.deadline)
        for _, rid in due:
            p = self._pending[rid]
            self._n.timeouts += 1
            if p.retries_left > 0:
                p.retries_left -= 1
                p.attempts += 1
                p.deadline = now + p.timeout_s
                self._n.retries += 1
                self._queue_out(p.data)
                self._events.append(Resend(rid, p.attempts))
            else:
                del self._pending[rid]
                self._n.requests_failed += 1
                self._events.append(Timeout(rid, p.attempts))

    def next_deadline(self) -> float | None:
        """When ``tick`` next has work (a request's deadline, the idle gap), or None."""
        times = [p.deadline for p in self._pending.values()]
        if self._decoder.buffered:
            times.append(self._last_rx + self.idle_gap_s)
        return min(times) if times else None

    def _advance(self, now: float, what: str) -> None:
        self._check_open()
        if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
            raise LocalProtocolError(f"{what}: now must be a finite number of seconds, "
                                     f"got {now!r}")
        if now < self._now:
            raise LocalProtocolError(f"{what}: time went backwards ({now!r} after {self._now!r})")
        self._now = now

    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError("the session is closed")

    # -- bookkeeping

    def counters(self) -> LinkCounters:
        """A snapshot of the counters."""
        n, d = self._n, self._decoder
        return LinkCounters(bytes_tx=n.bytes_tx, bytes_rx=n.bytes_rx, frames_tx=n.frames_tx,
                            frames_rx=d.frames, rejects=dict(d.rejects),
                            garbage_bytes=d.garbage_bytes, timeouts=n.timeouts,
                            retries=n.retries, unmatched=n.unmatched, replies=n.replies,
                            requests_failed=n.requests_failed,
                            events_dropped=n.events_dropped)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "peer closed" if self._peer_closed else "open"
        return (f"<LinkSession {state}, {len(self._pending)} pending, "
                f"{len(self._events)} events, {len(self._outbox)} bytes out>")
