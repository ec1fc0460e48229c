"""DL/T 698.45 link frames on the meter's side: encode, and a streaming decoder.

The same frame as ``hal/dlt698.py`` (the terminal's codec), in the subset of
Python that MicroPython runs, so the code can move onto a meter's MCU: no
dataclasses, enums or typing at run time, no ``del`` on bytearray slices,
``int.to_bytes`` with positional arguments only::

    0x68 | L (2, LE) | C | AF | SA (1..16) | CA | HCS (2) | APDU | FCS (2) | 0x16
           `------------ HCS covers L..CA --'
           `------------ FCS covers L..APDU ------------------'

``encode_frame`` gives the bytes ``hal.dlt698.encode_frame`` gives for the same
fields. ``FrameDecoder`` follows the terminal's decoder event for event: 0xFE
wake-up bytes skipped, the header checked by HCS before the body is awaited,
a bad candidate costs only its start byte and the hunt for the next 0x68
resumes right after it, reason codes as ``hal.dlt698.Reason``. Its buffer is
bounded: ``feed`` takes input one ``max_frame_bytes`` slice at a time and
drains it, so it never holds more than two frames' worth of bytes.
"""

START = 0x68
END = 0x16
WAKE_UP = 0xFE

L_LENGTH_MASK = 0x3FFF  # L bits 0-13: the length from L through FCS
L_UNIT_KIB = 0x4000  # L bit 14: length in kilobytes, refused (no meter frame needs it)
L_RESERVED = 0x8000  # L bit 15: reserved, must be 0

C_DIR = 0x80  # 1: the server (the meter) sent it
C_PRM = 0x40  # 1: the initiating station sent it
C_FRAGMENT = 0x20
C_RESERVED = 0x10
C_SCRAMBLED = 0x08
C_FUNCTION = 0x07
FUNCTION_LINK_MANAGEMENT = 1
FUNCTION_USER_DATA = 3  # the meter protocol's APDUs travel in user-data frames
FUNCTION_CODES = (FUNCTION_LINK_MANAGEMENT, FUNCTION_USER_DATA)  # the others are reserved

ADDRESS_SINGLE = 0  # AF bits 6-7; wildcard 1, group 2, broadcast 3
MAX_LOGICAL_ADDRESS = 3  # AF bits 4-5
MIN_SA_BYTES = 1  # AF bits 0-3 hold the SA length minus one
MAX_SA_BYTES = 16

L_OVERHEAD = 9  # L counts L 2, C 1, AF 1, CA 1, HCS 2, FCS 2 besides SA and APDU
HEADER_OVERHEAD = 8  # start 1, L 2, C 1, AF 1, CA 1, HCS 2: the header besides SA
MIN_L = L_OVERHEAD + MIN_SA_BYTES
MIN_FRAME_BYTES = MIN_L + 2
MAX_FRAME_BYTES = L_LENGTH_MASK + 2
# The terminal's default cap (hal.dlt698.DEFAULT_MAX_FRAME_BYTES, the board files'
# hplc link): a meter request is at most 554 + 26 bytes, well inside it.
DEFAULT_MAX_FRAME_BYTES = 2048

# Rejection reasons: hal.dlt698.Reason's codes, edgekey's own (not the standard's).
GARBAGE = 1
BAD_LENGTH = 2
OVERSIZE = 3
UNSUPPORTED_LENGTH_UNIT = 4
BAD_ADDRESS = 5
BAD_HCS = 6
BAD_CONTROL = 7
BAD_FCS = 8
BAD_END = 9
TRUNCATED = 10
REASON_NAMES = {
    GARBAGE: "GARBAGE", BAD_LENGTH: "BAD_LENGTH", OVERSIZE: "OVERSIZE",
    UNSUPPORTED_LENGTH_UNIT: "UNSUPPORTED_LENGTH_UNIT", BAD_ADDRESS: "BAD_ADDRESS",
    BAD_HCS: "BAD_HCS", BAD_CONTROL: "BAD_CONTROL", BAD_FCS: "BAD_FCS", BAD_END: "BAD_END",
    TRUNCATED: "TRUNCATED",
}


# ---------------------------------------------------------------- CRC-16/X.25

def _crc_table() -> list[int]:
    """The reflected CRC-16 table for poly 0x1021 (reflected 0x8408), one entry per byte."""
    table = []
    for b in range(256):
        crc = b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc16_x25(data: bytes | bytearray, start: int = 0, end: int = -1) -> int:
    """CRC-16/X.25 of ``data[start:end]`` (end -1: to the end), without copying the slice.

    Width 16, poly 0x1021 reflected, init and xorout 0xFFFF (the CRC catalogue's
    CRC-16/IBM-SDLC; check value 0x906E). A table loop: the MCU has no C helper.
    """
    if end < 0:
        end = len(data)
    table = _CRC_TABLE
    crc = 0xFFFF
    for i in range(start, end):
        crc = (crc >> 8) ^ table[(crc ^ data[i]) & 0xFF]
    return crc ^ 0xFFFF


# ---------------------------------------------------------------- frames

def control_byte(from_server: bool, initiator: bool, function: int = FUNCTION_USER_DATA,
                 fragmented: bool = False, scrambled: bool = False) -> int:
    """The control byte C: DIR, PRM, fragment and scrambling flags, function code."""
    if function not in FUNCTION_CODES:
        raise ValueError(f"function code {function} is reserved")
    c = function
    if from_server:
        c |= C_DIR
    if initiator:
        c |= C_PRM
    if fragmented:
        c |= C_FRAGMENT
    if scrambled:
        c |= C_SCRAMBLED
    return c


class Frame:
    """One decoded frame: C, the server address (the meter id), the client address CA, APDU."""

    __slots__ = ("address", "address_type", "apdu", "client", "control", "logical")

    def __init__(self, address: bytes, client: int, apdu: bytes, control: int,
                 address_type: int = ADDRESS_SINGLE, logical: int = 0) -> None:
        self.address = address
        self.client = client
        self.apdu = apdu
        self.control = control
        self.address_type = address_type
        self.logical = logical

    @property
    def from_server(self) -> bool:
        return bool(self.control & C_DIR)

    @property
    def initiator(self) -> bool:
        return bool(self.control & C_PRM)

    @property
    def function(self) -> int:
        return self.control & C_FUNCTION

    def __repr__(self) -> str:
        return (f"Frame(address={self.address.hex()}, client={self.client}, "
                f"control=0x{self.control:02x}, apdu={len(self.apdu)} bytes)")


def encode_frame(address: bytes, client: int, apdu: bytes, control: int,
                 address_type: int = ADDRESS_SINGLE, logical: int = 0,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """The frame's bytes, start through end byte; ValueError for fields that cannot be sent.

    ``control`` is C as ``control_byte`` builds it (reserved bit clear, function 1 or 3).
    """
    if not MIN_SA_BYTES <= len(address) <= MAX_SA_BYTES:
        raise ValueError(f"server address of {len(address)} bytes, not "
                         f"{MIN_SA_BYTES}..{MAX_SA_BYTES}")
    if not 0 <= control <= 0xFF or control & C_RESERVED or \
            (control & C_FUNCTION) not in FUNCTION_CODES:
        raise ValueError(f"control byte 0x{control:x} is reserved or out of range")
    if not 0 <= address_type <= 3 or not 0 <= logical <= MAX_LOGICAL_ADDRESS:
        raise ValueError(f"address type {address_type} / logical address {logical} out of range")
    if not 0 <= client <= 0xFF:
        raise ValueError(f"client address {client} is not one byte")
    length = L_OVERHEAD + len(address) + len(apdu)
    if length + 2 > max_frame_bytes:
        raise ValueError(f"frame of {length + 2} bytes exceeds {max_frame_bytes}")
    out = bytearray(5)
    out[0] = START
    out[1] = length & 0xFF
    out[2] = length >> 8
    out[3] = control
    out[4] = (address_type << 6) | (logical << 4) | (len(address) - 1)
    out += address
    out.append(client)
    hcs = crc16_x25(out, 1)
    out.append(hcs & 0xFF)
    out.append(hcs >> 8)
    out += apdu
    fcs = crc16_x25(out, 1)
    out.append(fcs & 0xFF)
    out.append(fcs >> 8)
    out.append(END)
    return bytes(out)


class Rejected:
    """``discarded`` bytes were thrown away for ``reason`` (a code above)."""

    __slots__ = ("discarded", "reason")

    def __init__(self, reason: int, discarded: int) -> None:
        self.reason = reason
        self.discarded = discarded

    def __repr__(self) -> str:
        return f"Rejected({REASON_NAMES.get(self.reason, str(self.reason))}, {self.discarded})"


class FrameDecoder:
    """Bytes in, frames out, for one direction of a link; never raises on received bytes.

    ``feed(data)`` returns the complete frames in ``data`` and what came before;
    ``receive_data`` plus ``next_event`` is the step-by-step form (an event is a
    Frame, a Rejected, or None for "need more bytes"). Counters: ``frames``,
    ``rejects`` (reason code -> events), ``garbage_bytes``, ``wake_up_bytes``.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if not MIN_FRAME_BYTES <= max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes {max_frame_bytes} outside "
                             f"{MIN_FRAME_BYTES}..{MAX_FRAME_BYTES}")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._garbage_run = 0  # garbage since the last start byte, not yet reported
        self._wake_run = 0  # trailing 0xFE bytes: wake-up if a start byte follows
        self._header_ok = False  # the candidate at the head passed HCS and the C checks
        self._idle_mark = -1  # bytes buffered when the line went idle; -1: not idle
        self.frames = 0
        self.rejects: dict[int, int] = {}
        self.garbage_bytes = 0
        self.wake_up_bytes = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray) -> list[Frame]:
        """Take ``data`` and return the frames it completes (rejects are only counted).

        ``feed(b"")`` after ``line_idle`` drains what the idle line made final.
        """
        frames = []
        step = self.max_frame_bytes
        for at in range(0, len(data), step):
            self._buf += data[at:at + step]
            self._drain(frames)
        if not data:  # after line_idle: what the idle mark now rejects
            self._drain(frames)
        return frames

    def _drain(self, frames: list[Frame]) -> None:
        while True:
            event = self.next_event()
            if event is None:
                return
            if isinstance(event, Frame):
                frames.append(event)

    def receive_data(self, data: bytes | bytearray) -> None:
        """Append received bytes; ``next_event`` parses them. The caller drains, or uses feed."""
        self._buf += data

    def line_idle(self) -> None:
        """The line went quiet: a candidate still short of bytes is rejected as TRUNCATED."""
        self._idle_mark = len(self._buf) if self._buf else -1

    def next_event(self) -> Frame | Rejected | None:
        """The next Frame or Rejected, or None when the buffered bytes are used up."""
        self._skip_to_start()
        if not self._buf:
            return None
        if self._garbage_run:
            n = self._garbage_run
            self._garbage_run = 0
            self._count(GARBAGE)
            return Rejected(GARBAGE, n)
        return self._parse_candidate()

    # -- hunting for a start byte

    def _skip_to_start(self) -> None:
        buf = self._buf
        i = buf.find(b"\x68")
        n = len(buf) if i < 0 else i
        if n:
            kept = len(bytes(buf[:n]).rstrip(b"\xfe"))
            if kept:  # a byte other than 0xFE: any 0xFE run before it was no wake-up
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

    # -- one candidate at the head of the buffer

    def _parse_candidate(self) -> Frame | Rejected | None:
        buf = self._buf
        if len(buf) < 3:
            return self._need(3)
        l_field = buf[1] | (buf[2] << 8)
        if l_field & L_RESERVED:
            return self._reject(BAD_LENGTH)
        if l_field & L_UNIT_KIB:
            return self._reject(UNSUPPORTED_LENGTH_UNIT)
        length = l_field & L_LENGTH_MASK
        if length < MIN_L:
            return self._reject(BAD_LENGTH)
        total = length + 2
        if total > self.max_frame_bytes:
            return self._reject(OVERSIZE)
        if len(buf) < 5:
            return self._need(5)
        sa_len = (buf[4] & 0x0F) + 1
        if length < L_OVERHEAD + sa_len:
            return self._reject(BAD_ADDRESS)
        header = HEADER_OVERHEAD + sa_len
        if not self._header_ok:
            # HCS before the body is awaited: a corrupted L is caught, not waited for.
            if len(buf) < header:
                return self._need(header)
            if crc16_x25(buf, 1, header - 2) != buf[header - 2] | (buf[header - 1] << 8):
                return self._reject(BAD_HCS)
            c = buf[3]
            if c & C_RESERVED or (c & C_FUNCTION) not in FUNCTION_CODES:
                return self._reject(BAD_CONTROL)
            self._header_ok = True
        if len(buf) < total:
            return self._need(total)
        if crc16_x25(buf, 1, total - 3) != buf[total - 3] | (buf[total - 2] << 8):
            return self._reject(BAD_FCS)
        if buf[total - 1] != END:
            return self._reject(BAD_END)
        af = buf[4]
        frame = Frame(bytes(buf[5:5 + sa_len]), buf[5 + sa_len], bytes(buf[header:total - 3]),
                      buf[3], af >> 6, (af >> 4) & MAX_LOGICAL_ADDRESS)
        self._consume(total)
        self.frames += 1
        return frame

    def _need(self, n: int) -> Rejected | None:
        if self._idle_mark >= 0 and n > self._idle_mark:
            return self._reject(TRUNCATED)
        return None

    def _reject(self, reason: int) -> Rejected:
        """Drop the candidate's start byte only; the hunt resumes right after it."""
        self._consume(1)
        self._count(reason)
        return Rejected(reason, 1)

    def _count(self, reason: int) -> None:
        self.rejects[reason] = self.rejects.get(reason, 0) + 1

    def _consume(self, n: int) -> None:
        self._buf[0:n] = b""  # MicroPython's bytearray has slice assignment, not slice del
        self._header_ok = False
        if self._idle_mark >= 0:
            self._idle_mark -= n
            if self._idle_mark <= 0:
                self._idle_mark = -1
