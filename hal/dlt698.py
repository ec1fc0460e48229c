"""DL/T 698.45 link-layer frames: a sans-I/O codec (the h11 shape).

Bytes go in with ``FrameDecoder.receive_data``; ``next_event`` hands back a
``Frame``, a ``Rejected`` (a candidate or a run of bytes that was thrown away,
with a reason code fit for a negative acknowledgement) or ``NEED_DATA``.
``encode_frame`` turns a ``Frame`` into bytes. No sockets, clocks or threads:
``hal/link.py`` does the I/O, so the same code runs on the host, under QEMU
and on the terminal.

The frame, as the link layer of DL/T 698.45 lays it out::

    0x68 | L (2, LE) | C | AF | SA (1..16) | CA | HCS (2) | APDU | FCS (2) | 0x16
           `------------ HCS covers L..CA --'
           `------------ FCS covers L..APDU ------------------'

- L: bits 0-13 the frame length counted from L through FCS (start and end
  bytes excluded); bit 14 the unit (1 = kilobytes, refused here); bit 15
  reserved, must be 0.
- C: bit 7 DIR (0 client sent it, 1 server sent it), bit 6 PRM (1 the
  initiating station sent it, 0 the responding station), bit 5 fragment flag,
  bit 4 reserved, bit 3 scrambling-code flag, bits 0-2 function code
  (1 link management, 3 user data; the others are reserved).
- AF, the server address flag: bits 0-3 the SA length minus 1, bits 4-5 the
  logical address, bits 6-7 the address type (0 single, 1 wildcard, 2 group,
  3 broadcast). SA follows in transmission order, then the client address CA.
- HCS and FCS: CRC-16/X.25 (``hal/crc16.py``), low byte first.
- Senders may put 0xFE wake-up bytes before a frame; they are skipped silently.

SA is the meter's id: a decoded frame's ``ServerAddress.address`` is a
``hal.ids.MeterId``, and the 1..16-byte limit is that type's. Errors say whose
fault they are (``hal.errors``): ``LocalFrameError`` is a LocalProtocolError;
bytes from the line never raise, so there is no remote error class.

What the decoder promises (the DESIGN "Bad input" rule):
- It never raises on received bytes and never blocks: bad input becomes a
  ``Rejected`` event and a counter.
- The header is checked by HCS as soon as its bytes are present, before the
  body is awaited, so a corrupted L cannot make it wait for bytes that never
  come. A header that passes HCS by chance (one in 65536) can still make it
  wait; ``line_idle`` lets the I/O layer end that wait when the line goes quiet.
- On a bad candidate it drops only the candidate's 0x68 and hunts for the
  next 0x68, so a valid frame after garbage or inside a corrupted frame's
  bytes is still found. The rest of a corrupted frame is then reported as
  GARBAGE when the next start byte shows up.
- Once drained to ``NEED_DATA`` it holds fewer than ``max_frame_bytes``
  bytes: an incomplete candidate at most. Garbage is counted, not kept.
- The events do not depend on how the bytes were split into chunks.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from hal.crc16 import crc16_x25
from hal.errors import LocalProtocolError
from hal.ids import METER_ID_MAX, METER_ID_MIN, MeterId, MeterIdError

# ---------------------------------------------------------------- limits
START = 0x68
END = 0x16
WAKE_UP = 0xFE  # preamble byte senders may put before a frame

L_LENGTH_MASK = 0x3FFF  # L bits 0-13: the length
L_UNIT_KIB = 0x4000  # L bit 14: length in kilobytes; no meter frame needs it, so refused
L_RESERVED = 0x8000  # L bit 15: reserved, must be 0

C_DIR = 0x80
C_PRM = 0x40
C_FRAGMENT = 0x20
C_RESERVED = 0x10
C_SCRAMBLED = 0x08
C_FUNCTION = 0x07

MIN_SA_BYTES = METER_ID_MIN  # AF bits 0-3 hold length-1, so 1..16: a meter id's limits
MAX_SA_BYTES = METER_ID_MAX
MAX_LOGICAL_ADDRESS = 3  # AF bits 4-5

# Bytes L counts besides SA and APDU: L 2, C 1, AF 1, CA 1, HCS 2, FCS 2.
L_OVERHEAD = 9
# Bytes from the start byte through HCS, besides SA: start 1, L 2, C 1, AF 1, CA 1, HCS 2.
HEADER_OVERHEAD = 8
MIN_L = L_OVERHEAD + MIN_SA_BYTES  # 10: one-byte SA, empty APDU
MIN_FRAME_BYTES = MIN_L + 2  # 12 on the wire, with start and end bytes
MAX_L = L_LENGTH_MASK  # the 14-bit length field's ceiling
MAX_FRAME_BYTES = MAX_L + 2  # 16385 on the wire
# Default cap on a whole frame (start through end byte). It bounds what the
# decoder holds while a frame is incomplete (h11 caps an incomplete event at
# 16 KiB for the same reason). 2048 matches the board files' hplc link and
# stays well inside the 8 KiB HPLC modem buffer; boards set their own.
DEFAULT_MAX_FRAME_BYTES = 2048


class LocalFrameError(LocalProtocolError, ValueError):
    """Our caller asked for something that cannot be encoded: the caller's fault."""


class FunctionCode(enum.IntEnum):
    """C bits 0-2; the other values are reserved."""

    LINK_MANAGEMENT = 1  # log in, heartbeat, log out
    USER_DATA = 3  # application connection management and data exchange


class AddressType(enum.IntEnum):
    """AF bits 6-7."""

    SINGLE = 0
    WILDCARD = 1
    GROUP = 2
    BROADCAST = 3


class Reason(enum.IntEnum):
    """Why bytes were thrown away; the code a negative acknowledgement carries.

    These are edgekey's codes, not values defined by DL/T 698.45.
    """

    GARBAGE = 1  # bytes before a start byte (wake-up 0xFE bytes excluded)
    BAD_LENGTH = 2  # L shorter than the minimal frame, or its reserved bit 15 set
    OVERSIZE = 3  # L says more than max_frame_bytes
    UNSUPPORTED_LENGTH_UNIT = 4  # L bit 14: length in kilobytes
    BAD_ADDRESS = 5  # the SA length AF declares does not fit inside L
    BAD_HCS = 6  # header check sequence mismatch
    BAD_CONTROL = 7  # reserved C bit 4 set, or a reserved function code
    BAD_FCS = 8  # frame check sequence mismatch
    BAD_END = 9  # the byte after FCS is not 0x16
    TRUNCATED = 10  # the line went idle (line_idle) before the candidate was complete


@dataclass(frozen=True)
class Control:
    """The control byte C."""

    function: FunctionCode
    from_server: bool = False  # DIR
    initiator: bool = True  # PRM
    fragmented: bool = False  # fragment flag: the APDU is one fragment
    scrambled: bool = False  # scrambling-code flag; the codec does not unscramble

    def to_byte(self) -> int:
        """C as transmitted; raises LocalFrameError for a reserved function code."""
        if self.function not in _FUNCTION_CODES:
            raise LocalFrameError(f"function code {self.function!r} is reserved")
        return ((C_DIR if self.from_server else 0) | (C_PRM if self.initiator else 0)
                | (C_FRAGMENT if self.fragmented else 0) | (C_SCRAMBLED if self.scrambled else 0)
                | int(self.function))

    @classmethod
    def from_byte(cls, c: int) -> Control:
        """Read C; the caller has checked the function code and reserved bit."""
        return cls(function=FunctionCode(c & C_FUNCTION), from_server=bool(c & C_DIR),
                   initiator=bool(c & C_PRM), fragmented=bool(c & C_FRAGMENT),
                   scrambled=bool(c & C_SCRAMBLED))


_FUNCTION_CODES = frozenset(int(f) for f in FunctionCode)


@dataclass(frozen=True)
class ServerAddress:
    """SA with its AF flags; ``address`` holds the SA bytes in transmission order.

    The address is the meter's id: a MeterId when decoded; encoding checks it as one.
    """

    address: bytes
    type: AddressType = AddressType.SINGLE
    logical: int = 0


@dataclass(frozen=True)
class Frame:
    """One link-layer frame: the decoder's output and the encoder's input."""

    control: Control
    server: ServerAddress
    client: int  # CA, one byte
    apdu: bytes = b""


@dataclass(frozen=True)
class Rejected:
    """``discarded`` bytes were thrown away for ``reason``.

    For a bad candidate that is its start byte alone: the decoder then hunts
    for the next start byte in the bytes that follow.
    """

    reason: Reason
    discarded: int
    # Where the frame came from, when its header passed HCS before the body
    # failed (BAD_FCS, BAD_END, TRUNCATED after the header): the SA and CA a
    # negative acknowledgement can be sent back to. None otherwise.
    source: tuple[ServerAddress, int] | None = field(default=None, compare=False)


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Literal[_Sentinel.NEED_DATA] = _Sentinel.NEED_DATA
Event = Frame | Rejected | Literal[_Sentinel.NEED_DATA]


def _check_max_frame_bytes(max_frame_bytes: int) -> None:
    if not MIN_FRAME_BYTES <= max_frame_bytes <= MAX_FRAME_BYTES:
        raise LocalFrameError(f"max_frame_bytes {max_frame_bytes} outside "
                              f"[{MIN_FRAME_BYTES}, {MAX_FRAME_BYTES}]")


# ---------------------------------------------------------------- encoding

def encode_frame(frame: Frame, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """The frame's bytes, start through end byte; LocalFrameError if it cannot be sent."""
    _check_max_frame_bytes(max_frame_bytes)
    c = frame.control.to_byte()
    sa = frame.server
    try:
        address = MeterId(sa.address)
    except MeterIdError as exc:
        raise LocalFrameError(f"server address: {exc} (AF holds the length minus one)") from None
    if sa.type not in _ADDRESS_TYPES:
        raise LocalFrameError(f"address type {sa.type!r} is not one of {list(AddressType)}")
    if not (isinstance(sa.logical, int) and 0 <= sa.logical <= MAX_LOGICAL_ADDRESS):
        raise LocalFrameError(f"logical address {sa.logical!r} outside 0..{MAX_LOGICAL_ADDRESS}")
    if not (isinstance(frame.client, int) and 0 <= frame.client <= 0xFF):
        raise LocalFrameError(f"client address {frame.client!r} is not one byte")
    if not isinstance(frame.apdu, bytes | bytearray):
        raise LocalFrameError(f"apdu must be bytes, got {type(frame.apdu).__name__}")
    length = L_OVERHEAD + len(address) + len(frame.apdu)
    if length + 2 > max_frame_bytes:
        raise LocalFrameError(f"frame of {length + 2} bytes (apdu {len(frame.apdu)}) exceeds "
                              f"max_frame_bytes {max_frame_bytes}")
    af = (int(sa.type) << 6) | (sa.logical << 4) | (len(address) - 1)
    out = bytearray((START, length & 0xFF, length >> 8, c, af))
    out += address
    out.append(frame.client)
    out += crc16_x25(out[1:]).to_bytes(2, "little")  # HCS over L..CA
    out += frame.apdu
    out += crc16_x25(out[1:]).to_bytes(2, "little")  # FCS over L..APDU
    out.append(END)
    return bytes(out)


_ADDRESS_TYPES = frozenset(int(t) for t in AddressType)


def is_response_to(request: Frame, reply: Frame) -> bool:
    """Whether ``reply`` answers ``request``: opposite DIR and PRM, same CA, same SA if single.

    A wildcard, group or broadcast request is answered by a meter naming its
    own address, so only a single-address request pins the SA.
    """
    rc, pc = request.control, reply.control
    if pc.from_server == rc.from_server or pc.initiator == rc.initiator:
        return False
    if reply.client != request.client:
        return False
    if request.server.type == AddressType.SINGLE:
        return reply.server.address == request.server.address
    return True


# ---------------------------------------------------------------- decoding

class FrameDecoder:
    """Bytes in (``receive_data``), events out (``next_event``); one per link direction.

    Counters: ``frames`` decoded, ``rejects`` per Reason (events), ``garbage_bytes``,
    ``wake_up_bytes`` skipped.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        _check_max_frame_bytes(max_frame_bytes)
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._garbage_run = 0  # garbage seen since the last start byte, not yet reported
        self._wake_run = 0  # trailing 0xFE bytes: wake-up if a start byte follows, else garbage
        self._header_ok = False  # the candidate at the head passed HCS and the C checks
        self._idle_mark: int | None = None  # bytes buffered when the line went idle
        self.frames = 0
        self.rejects: dict[Reason, int] = dict.fromkeys(Reason, 0)
        self.garbage_bytes = 0
        self.wake_up_bytes = 0

    @property
    def buffered(self) -> int:
        """Bytes held: an incomplete candidate, or input not yet parsed."""
        return len(self._buf)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; parse them with ``next_event``."""
        self._buf += data

    def line_idle(self) -> None:
        """Tell the decoder the line went quiet: a candidate that needs more than
        the bytes received so far is rejected as TRUNCATED instead of awaited.

        The I/O layer calls this after an inter-frame gap; it is how a header
        that passed HCS by chance, or a frame cut off mid-way, stops holding
        back the frames behind it.
        """
        self._idle_mark = len(self._buf) if self._buf else None

    def next_event(self) -> Event:
        """The next Frame or Rejected, or NEED_DATA when the buffered bytes are used up."""
        self._skip_to_start()
        if not self._buf:
            return NEED_DATA
        if self._garbage_run:
            return self._report_garbage()
        return self._parse_candidate()

    def events(self) -> Iterator[Frame | Rejected]:
        """Every event the buffered bytes give, up to NEED_DATA."""
        while True:
            event = self.next_event()
            if event is NEED_DATA:
                return
            yield event

    # -- hunting for a start byte

    def _skip_to_start(self) -> None:
        """Drop the bytes before the next start byte, counting them as garbage or wake-up."""
        buf = self._buf
        i = buf.find(START)
        n = len(buf) if i < 0 else i
        if n:
            seg = buf[:n]
            kept = len(seg.rstrip(b"\xfe"))
            if kept:  # a non-0xFE byte: any 0xFE run before it was not a wake-up
                garbage = self._wake_run + kept
                self._wake_run = n - kept
            else:
                garbage = 0
                self._wake_run += n
            self._garbage_run += garbage
            self.garbage_bytes += garbage
            self._consume(n)
        if i >= 0:  # the 0xFE bytes just before a start byte were its wake-up
            self.wake_up_bytes += self._wake_run
            self._wake_run = 0

    def _report_garbage(self) -> Rejected:
        n, self._garbage_run = self._garbage_run, 0
        self.rejects[Reason.GARBAGE] += 1
        return Rejected(Reason.GARBAGE, n)

    # -- one candidate at the head of the buffer

    def _parse_candidate(self) -> Event:
        buf = self._buf
        if len(buf) < 3:
            return self._need(3)
        l_field = buf[1] | (buf[2] << 8)
        if l_field & L_RESERVED:
            return self._reject(Reason.BAD_LENGTH)
        if l_field & L_UNIT_KIB:
            return self._reject(Reason.UNSUPPORTED_LENGTH_UNIT)
        length = l_field & L_LENGTH_MASK
        if length < MIN_L:
            return self._reject(Reason.BAD_LENGTH)
        total = length + 2
        if total > self.max_frame_bytes:
            return self._reject(Reason.OVERSIZE)
        if len(buf) < 5:
            return self._need(5)
        sa_len = (buf[4] & 0x0F) + 1
        if length < L_OVERHEAD + sa_len:
            return self._reject(Reason.BAD_ADDRESS)
        header = HEADER_OVERHEAD + sa_len
        if not self._header_ok:
            # Check the header before awaiting the body, so a corrupted L is
            # caught by HCS instead of being waited for.
            if len(buf) < header:
                return self._need(header)
            hcs = buf[header - 2] | (buf[header - 1] << 8)
            if crc16_x25(buf[1:header - 2]) != hcs:
                return self._reject(Reason.BAD_HCS)
            c = buf[3]
            if c & C_RESERVED or (c & C_FUNCTION) not in _FUNCTION_CODES:
                return self._reject(Reason.BAD_CONTROL)
            self._header_ok = True
        af = buf[4]
        server = ServerAddress(address=MeterId(buf[5:5 + sa_len]), type=AddressType(af >> 6),
                               logical=(af >> 4) & MAX_LOGICAL_ADDRESS)
        source = (server, buf[5 + sa_len])
        if len(buf) < total:
            return self._need(total, source)
        fcs = buf[total - 3] | (buf[total - 2] << 8)
        if crc16_x25(buf[1:total - 3]) != fcs:
            return self._reject(Reason.BAD_FCS, source)
        if buf[total - 1] != END:
            return self._reject(Reason.BAD_END, source)
        frame = Frame(
            control=Control.from_byte(buf[3]),
            server=server,
            client=source[1],
            apdu=bytes(buf[header:total - 3]),
        )
        self._consume(total)
        self.frames += 1
        return frame

    def _need(self, n: int, source: tuple[ServerAddress, int] | None = None) -> Event:
        """NEED_DATA, unless the line went idle before the candidate's ``n`` bytes came."""
        if self._idle_mark is not None and n > self._idle_mark:
            return self._reject(Reason.TRUNCATED, source)
        return NEED_DATA

    def _reject(self, reason: Reason, source: tuple[ServerAddress, int] | None = None
                ) -> Rejected:
        """Drop the candidate's start byte only; the hunt resumes right after it."""
        self._consume(1)
        self.rejects[reason] += 1
        return Rejected(reason, 1, source)

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        self._header_ok = False
        if self._idle_mark is not None:
            self._idle_mark -= n
            if self._idle_mark <= 0:
                self._idle_mark = None
