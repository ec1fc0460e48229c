"""The inter-terminal wire format: messages, their payload codec, and framing. No sockets.

Sans-I/O in the h11 manner: ``FrameEncoder.encode(message)`` gives bytes to
write, ``FrameDecoder.feed(bytes)`` gives the messages they complete, and
whatever carries the bytes (``peers.py`` over TLS, a test over a list) stays
outside. Payload fields reuse the ledger's primitives (``agent/ledger/codec``
Reader/Writer, the block and transaction codecs), so every value has one
encoding and the decoder refuses every other byte string.

Frame (big-endian)::

    frame := magic "EK" version:u8 type:u8 seq:u64 length:u32 payload[length]

``seq`` starts at 1 on each connection and goes up by one per frame: TLS
already stops an outsider from replaying or reordering records, so a seq out
of step means a sender bug or a proxy splicing streams, and the decoder
refuses it rather than guess. ``length`` is capped at ``MAX_PAYLOAD``
(etcd's 1.5 MiB request limit; the largest block, about 322 KiB, fits) and
checked as soon as the header is in, so a peer cannot make a terminal buffer
more than one header and one maximal payload per connection.

Payloads (``enc`` of each field; ``tid`` and ``mid`` are codec.py's
terminal and meter ids, ``b16`` a u16 length then bytes, ``s8`` a u8 length
then UTF-8)::

    1  Hello             tid boot_nonce:8 fleet:s8(1..64)
    2  EndorseRequest    block                              (block.py)
    3  Endorsement       height:u64 block_hash:32 tid signature:64
    4  EndorsementRefused height:u64 block_hash:32 reason:u16
    5  ForwardTxs        count:u16(1..1024) tx*count         (tx.py)
    6  ForwardRefused    tx_id:32 reason:u16 height:u64
    7  KeyHandover       mid key_version:u32(>=1) envelope:b16(1..4096)
    8  KeyAck            mid key_version:u32(>=1)
    9  QueryForward      query_id:u64 mid requester:tid origin:tid
                         hops:u8(0..16) tid*hops deadline_ms:u64
    10 QueryAnswer       query_id:u64 status:u8 key_version:u32 height:u64
                         envelope:b16(0..4096) detail:s8(0..200 bytes)
    11 SnapshotRequest   height:u64
    12 SnapshotChunk     height:u64 index:u32 count:u32 data:len32(0..1 MiB)
    13 Ping / 14 Pong    nonce:u64
    15 StationQuery      request_id:u64 mid                 (station -> terminal)
    16 StationRevoke     request_id:u64 mid                 (station -> terminal)
    17 StationReply      request_id:u64 ok:u8(0,1) nak:u8 ledger_reason:u16
                         height:u64 detail:s8(0..200 bytes) (terminal -> station)
    18 StationAnswer     request_id:u64 status:u8 key_version:u32 height:u64
                         envelope:b16(0..4096) proof:len32(0..256 KiB)
                         detail:s8(0..200 bytes)            (terminal -> station)
    19 StationReadings   request_id:u64 mid                 (station -> terminal)
    20 ReadingsAnswer    request_id:u64 count:u16(0..64)
                         (key_version:u32 counter:u64 sealed:b16(1..1024))*count
                                                            (terminal -> station)
    21 Relayed           seq:u64 hops:u8(2..16) tid*hops
                         inner_type:u8(2..8) inner:len32 signature:64
    22 StationMigrate    request_id:u64 mid new_home:tid    (station -> terminal)
    23 StationPlacement  request_id:u64                     (station -> terminal)
    24 PlacementAnswer   request_id:u64 site_x_dm:u32 site_y_dm:u32 capacity:u16
                         count:u16(0..4096) mid*count
                         events:u8(0..32) (kind:u8 t_ms:u64 mid terminal:s8)*events
                                                            (terminal -> station)

The master station speaks 15-18 with a terminal (a StationQuery is answered
with a StationAnswer: the key sealed to the station and the record proof of
the meter's newest record, agent/ledger/proof.py); a terminal speaks them
only to it.

A Relayed frame carries one of the endorsement and hand-over messages (2-8)
hop by hop along ``path`` (origin first, destination last, no terminal
twice): relays pass ``inner`` on undecoded; the destination decodes it and
checks ``signature``, the origin's Ed25519 signature of ``relayed_signed``
(everything before it, under a domain prefix), so no relay can forge,
alter, re-route or re-address what it carries (agent/net/overlay.py).

Reason codes (4, 6) are carried as any u16, so a newer peer's code passes
through; the receiver maps the ones it knows with ``agent.ledger.rules.Reason``.

Errors: bytes from the peer that are not a valid frame raise ``WireError``
(a ``RemoteProtocolError``) with a ``WireFault`` reason, for the connection
to count and close; a message our own code built wrong raises
``WireValueError`` (a ``LocalProtocolError``) when it is made or encoded.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from agent.ledger.block import (
    MAX_TXS_PER_BLOCK,
    Block,
    Endorsement,
    encode_block,
    read_endorsements,
    read_header,
)
from agent.ledger.codec import HASH_LEN, SIGNATURE_LEN, Reader, Writer
from agent.ledger.tx import Transaction, encode_tx, read_tx
from hal.errors import LocalProtocolError, RemoteProtocolError
from hal.ids import check_meter_id, check_terminal_id

WIRE_VERSION = 1
MAGIC = b"EK"
_HEADER = struct.Struct(">2sBBQI")
HEADER_LEN = _HEADER.size  # 16

MAX_PAYLOAD = 1_572_864  # etcd's default --max-request-bytes (1.5 MiB)
MAX_ENVELOPE = 4096
MAX_DETAIL_BYTES = 200
MAX_FLEET_BYTES = 64
MAX_PATH_HOPS = 16
MAX_PROOF = 256 * 1024  # a record proof: tx, header, up to 1024 endorsements, audit path
MAX_READINGS = 64  # readings of one meter in one ReadingsAnswer
MAX_SEALED = 1024  # one sealed reading (agent/node/reading.py: 512 B of data at most)
MAX_FORWARD_TXS = MAX_TXS_PER_BLOCK
MAX_CHUNK_DATA = 1024 * 1024
MAX_PLACED = 4096  # meters one terminal reports homed on it (a board's capacity is far less)
MAX_PLACEMENT_EVENTS = 32
MAX_SITE_DM = 10**9  # a site's coordinate in decimetres: up to 100,000 km
BOOT_NONCE_LEN = 8

U8_MAX = 2**8 - 1
U16_MAX = 2**16 - 1
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


class MsgType(enum.IntEnum):
    """Frame type codes: stable on the wire, never reused."""

    HELLO = 1
    ENDORSE_REQUEST = 2
    ENDORSEMENT = 3
    ENDORSEMENT_REFUSED = 4
    FORWARD_TXS = 5
    FORWARD_REFUSED = 6
    KEY_HANDOVER = 7
    KEY_ACK = 8
    QUERY_FORWARD = 9
    QUERY_ANSWER = 10
    SNAPSHOT_REQUEST = 11
    SNAPSHOT_CHUNK = 12
    PING = 13
    PONG = 14
    STATION_QUERY = 15
    STATION_REVOKE = 16
    STATION_REPLY = 17
    STATION_ANSWER = 18
    STATION_READINGS = 19
    READINGS_ANSWER = 20
    RELAYED = 21
    STATION_MIGRATE = 22
    STATION_PLACEMENT = 23
    PLACEMENT_ANSWER = 24

    @property
    def label(self) -> str:
        """The name counters use (``sent.endorse_request``)."""
        return self.name.lower()


class WireFault(enum.StrEnum):
    """Why bytes from a peer were refused; the values name the counters."""

    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    UNKNOWN_TYPE = "unknown_type"
    OVERSIZE = "oversize"
    BAD_SEQ = "bad_seq"
    BAD_FIELD = "bad_field"
    TRAILING_BYTES = "trailing_bytes"


class WireError(RemoteProtocolError):
    """The peer sent bytes that are not a valid frame: count ``reason``, close the connection.

    ``messages`` holds the valid messages the same ``feed`` decoded before the
    fault, in order, so a caller can still act on them.
    """

    def __init__(self, reason: WireFault, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail
        self.messages: tuple[Message, ...] = ()


class WireValueError(LocalProtocolError, ValueError):
    """Our own code built a message from bad fields, or one too large to frame."""


# ------------------------------------------------------------------ field checks

def _is_int(value: object, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _is_bytes(value: object, lo: int, hi: int) -> bool:
    return isinstance(value, bytes) and lo <= len(value) <= hi


def _fail(message: object, field: str, problem: str) -> WireValueError:
    return WireValueError(f"{type(message).__name__}.{field}: {problem}")


def _need_int(message: object, field: str, lo: int, hi: int) -> None:
    if not _is_int(getattr(message, field), lo, hi):
        raise _fail(message, field, f"must be an int in {lo}..{hi}")


def _need_bytes(message: object, field: str, lo: int, hi: int) -> None:
    if not _is_bytes(getattr(message, field), lo, hi):
        raise _fail(message, field, f"must be {lo}..{hi} bytes" if lo != hi else
                    f"must be {lo} bytes")


def _need_tid(message: object, field: str, value: object | None = None) -> None:
    why = check_terminal_id(getattr(message, field) if value is None else value)
    if why is not None:
        raise _fail(message, field, why)


def _need_mid(message: object, field: str) -> None:
    why = check_meter_id(getattr(message, field))
    if why is not None:
        raise _fail(message, field, why)


def _need_text(message: object, field: str, lo: int, hi: int) -> None:
    value = getattr(message, field)
    if not isinstance(value, str):
        raise _fail(message, field, "must be a str")
    try:
        n = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate has no UTF-8 form
        raise _fail(message, field, "not encodable as UTF-8") from None
    if not lo <= n <= hi:
        raise _fail(message, field, f"must be {lo}..{hi} UTF-8 bytes, got {n}")


# ------------------------------------------------------------- length prefixes

def _write_b16(w: Writer, value: bytes) -> None:
    w.u16(len(value))
    w.raw(value)


def _read_b16(r: Reader, field: str, lo: int, hi: int) -> bytes:
    at = r.offset
    n = r.u16(field)
    if not lo <= n <= hi:
        raise r.fail(field, f"length {n} outside {lo}..{hi}", at)
    return r.fixed(field, n)


def _write_s8(w: Writer, value: str) -> None:
    w.short_bytes(value.encode("utf-8"), U8_MAX)


def _read_s8(r: Reader, field: str, lo: int, hi: int) -> str:
    at = r.offset
    raw = r.short_bytes(field, lo, hi)
    try:
        return raw.decode("utf-8")  # strict: no overlong forms, no surrogates
    except UnicodeDecodeError:
        raise r.fail(field, "not valid UTF-8", at) from None


# ------------------------------------------------------------------- messages

@dataclass(frozen=True, slots=True)
class Hello:
    """First message each way: who the sender says it is (checked against its certificate)."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    terminal_id: str
    boot_nonce: bytes
    fleet: str

    def __post_init__(self) -> None:
        _need_tid(self, "terminal_id")
        _need_bytes(self, "boot_nonce", BOOT_NONCE_LEN, BOOT_NONCE_LEN)
        _need_text(self, "fleet", 1, MAX_FLEET_BYTES)

    def _write(self, w: Writer) -> None:
        w.terminal_id(self.terminal_id)
        w.fixed(self.boot_nonce, BOOT_NONCE_LEN)
        _write_s8(w, self.fleet)

    @classmethod
    def _read(cls, r: Reader) -> Hello:
        return cls(r.terminal_id("terminal_id"), r.fixed("boot_nonce", BOOT_NONCE_LEN),
                   _read_s8(r, "fleet", 1, MAX_FLEET_BYTES))


@dataclass(frozen=True, slots=True)
class EndorseRequest:
    """A proposed block, sent to an endorser."""

    TYPE: ClassVar[MsgType] = MsgType.ENDORSE_REQUEST
    block: Block

    def __post_init__(self) -> None:
        if not isinstance(self.block, Block):
            raise _fail(self, "block", "must be a Block")
        if self.block.header.tx_count != len(self.block.txs):
            raise _fail(self, "block", f"header says {self.block.header.tx_count} txs, the "
                                       f"body has {len(self.block.txs)}")

    def _write(self, w: Writer) -> None:
        w.raw(encode_block(self.block))

    @classmethod
    def _read(cls, r: Reader) -> EndorseRequest:
        header = read_header(r)
        endorsements = read_endorsements(r)
        txs = tuple(read_tx(r, f"tx[{i}]") for i in range(header.tx_count))
        return cls(Block(header, txs, endorsements))


@dataclass(frozen=True, slots=True)
class EndorsementMsg:
    """An endorser's signature over the block ``block_hash`` at ``height``."""

    TYPE: ClassVar[MsgType] = MsgType.ENDORSEMENT
    height: int
    block_hash: bytes
    endorsement: Endorsement

    def __post_init__(self) -> None:
        _need_int(self, "height", 0, U64_MAX)
        _need_bytes(self, "block_hash", HASH_LEN, HASH_LEN)
        if not isinstance(self.endorsement, Endorsement):
            raise _fail(self, "endorsement", "must be an Endorsement")

    def _write(self, w: Writer) -> None:
        w.u64(self.height)
        w.fixed(self.block_hash, HASH_LEN)
        w.terminal_id(self.endorsement.terminal_id)
        w.fixed(self.endorsement.signature, SIGNATURE_LEN)

    @classmethod
    def _read(cls, r: Reader) -> EndorsementMsg:
        height = r.u64("height")
        block_hash = r.fixed("block_hash", HASH_LEN)
        tid = r.terminal_id("endorsement.terminal_id")
        return cls(height, block_hash, Endorsement(tid, r.fixed("endorsement.signature",
                                                                  SIGNATURE_LEN)))


@dataclass(frozen=True, slots=True)
class EndorsementRefusedMsg:
    """An endorser's refusal of a proposal, with its ``Reason`` code."""

    TYPE: ClassVar[MsgType] = MsgType.ENDORSEMENT_REFUSED
    height: int
    block_hash: bytes
    reason: int

    def __post_init__(self) -> None:
        _need_int(self, "height", 0, U64_MAX)
        _need_bytes(self, "block_hash", HASH_LEN, HASH_LEN)
        _need_int(self, "reason", 0, U16_MAX)

    def _write(self, w: Writer) -> None:
        w.u64(self.height)
        w.fixed(self.block_hash, HASH_LEN)
        w.u16(self.reason)

    @classmethod
    def _read(cls, r: Reader) -> EndorsementRefusedMsg:
        return cls(r.u64("height"), r.fixed("block_hash", HASH_LEN), r.u16("reason"))


@dataclass(frozen=True, slots=True)
class ForwardTxs:
    """Signed transactions for the proposer's next block."""

    TYPE: ClassVar[MsgType] = MsgType.FORWARD_TXS
    txs: tuple[Transaction, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "txs", tuple(self.txs))
        if not 1 <= len(self.txs) <= MAX_FORWARD_TXS:
            raise _fail(self, "txs", f"must hold 1..{MAX_FORWARD_TXS} transactions, got "
                                     f"{len(self.txs)}")
        for i, tx in enumerate(self.txs):
            if not isinstance(tx, Transaction) or not tx.is_signed:
                raise _fail(self, f"txs[{i}]", "must be a signed Transaction")

    def _write(self, w: Writer) -> None:
        w.u16(len(self.txs))
        for tx in self.txs:
            w.raw(encode_tx(tx))

    @classmethod
    def _read(cls, r: Reader) -> ForwardTxs:
        at = r.offset
        count = r.u16("count")
        if not 1 <= count <= MAX_FORWARD_TXS:
            raise r.fail("count", f"{count} outside 1..{MAX_FORWARD_TXS}", at)
        return cls(tuple(read_tx(r, f"tx[{i}]") for i in range(count)))


@dataclass(frozen=True, slots=True)
class ForwardRefused:
    """The proposer would not take transaction ``tx_id`` (``reason``) at ``height``."""

    TYPE: ClassVar[MsgType] = MsgType.FORWARD_REFUSED
    tx_id: bytes
    reason: int
    height: int

    def __post_init__(self) -> None:
        _need_bytes(self, "tx_id", HASH_LEN, HASH_LEN)
        _need_int(self, "reason", 0, U16_MAX)
        _need_int(self, "height", 0, U64_MAX)

    def _write(self, w: Writer) -> None:
        w.fixed(self.tx_id, HASH_LEN)
        w.u16(self.reason)
        w.u64(self.height)

    @classmethod
    def _read(cls, r: Reader) -> ForwardRefused:
        return cls(r.fixed("tx_id", HASH_LEN), r.u16("reason"), r.u64("height"))


@dataclass(frozen=True, slots=True)
class KeyHandover:
    """A meter's key, sealed to the new home (keystore/transport.py envelope)."""

    TYPE: ClassVar[MsgType] = MsgType.KEY_HANDOVER
    meter_id: bytes
    key_version: int
    envelope: bytes

    def __post_init__(self) -> None:
        _need_mid(self, "meter_id")
        _need_int(self, "key_version", 1, U32_MAX)
        _need_bytes(self, "envelope", 1, MAX_ENVELOPE)

    def _write(self, w: Writer) -> None:
        w.meter_id(self.meter_id)
        w.u32(self.key_version)
        _write_b16(w, self.envelope)

    @classmethod
    def _read(cls, r: Reader) -> KeyHandover:
        return cls(r.meter_id("meter_id"), _read_key_version(r),
                   _read_b16(r, "envelope", 1, MAX_ENVELOPE))


def _read_key_version(r: Reader) -> int:
    at = r.offset
    version = r.u32("key_version")
    if version == 0:
        raise r.fail("key_version", "0 means no key", at)
    return version


@dataclass(frozen=True, slots=True)
class KeyAck:
    """The new home stored ``meter_id``'s key ``key_version``: the old home may erase it."""

    TYPE: ClassVar[MsgType] = MsgType.KEY_ACK
    meter_id: bytes
    key_version: int

    def __post_init__(self) -> None:
        _need_mid(self, "meter_id")
        _need_int(self, "key_version", 1, U32_MAX)

    def _write(self, w: Writer) -> None:
        w.meter_id(self.meter_id)
        w.u32(self.key_version)

    @classmethod
    def _read(cls, r: Reader) -> KeyAck:
        return cls(r.meter_id("meter_id"), _read_key_version(r))


@dataclass(frozen=True, slots=True)
class QueryForward:
    """A key query on its way to the meter's home; ``path`` is the terminals it crossed."""

    TYPE: ClassVar[MsgType] = MsgType.QUERY_FORWARD
    query_id: int
    meter_id: bytes
    requester: str
    origin: str
    path: tuple[str, ...]
    deadline_ms: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", tuple(self.path))
        _need_int(self, "query_id", 0, U64_MAX)
        _need_mid(self, "meter_id")
        _need_tid(self, "requester")
        _need_tid(self, "origin")
        if len(self.path) > MAX_PATH_HOPS:
            raise _fail(self, "path", f"{len(self.path)} hops over the cap of {MAX_PATH_HOPS}")
        for hop in self.path:
            _need_tid(self, "path", hop)
        _need_int(self, "deadline_ms", 0, U64_MAX)

    def _write(self, w: Writer) -> None:
        w.u64(self.query_id)
        w.meter_id(self.meter_id)
        w.terminal_id(self.requester)
        w.terminal_id(self.origin)
        w.u8(len(self.path))
        for hop in self.path:
            w.terminal_id(hop)
        w.u64(self.deadline_ms)

    @classmethod
    def _read(cls, r: Reader) -> QueryForward:
        query_id = r.u64("query_id")
        meter_id = r.meter_id("meter_id")
        requester = r.terminal_id("requester")
        origin = r.terminal_id("origin")
        at = r.offset
        hops = r.u8("path.hops")
        if hops > MAX_PATH_HOPS:
            raise r.fail("path.hops", f"{hops} over the cap of {MAX_PATH_HOPS}", at)
        path = tuple(r.terminal_id(f"path[{i}]") for i in range(hops))
        return cls(query_id, meter_id, requester, origin, path, r.u64("deadline_ms"))


@dataclass(frozen=True, slots=True)
class QueryAnswer:
    """The home's answer to query ``query_id``: a status, the key sealed to the requester."""

    TYPE: ClassVar[MsgType] = MsgType.QUERY_ANSWER
    query_id: int
    status: int
    key_version: int
    height: int
    envelope: bytes
    detail: str

    def __post_init__(self) -> None:
        _need_int(self, "query_id", 0, U64_MAX)
        _need_int(self, "status", 0, U8_MAX)
        _need_int(self, "key_version", 0, U32_MAX)
        _need_int(self, "height", 0, U64_MAX)
        _need_bytes(self, "envelope", 0, MAX_ENVELOPE)
        _need_text(self, "detail", 0, MAX_DETAIL_BYTES)

    def _write(self, w: Writer) -> None:
        w.u64(self.query_id)
        w.u8(self.status)
        w.u32(self.key_version)
        w.u64(self.height)
        _write_b16(w, self.envelope)
        _write_s8(w, self.detail)

    @classmethod
    def _read(cls, r: Reader) -> QueryAnswer:
        return cls(r.u64("query_id"), r.u8("status"), r.u32("key_version"), r.u64("height"),
                   _read_b16(r, "envelope", 0, MAX_ENVELOPE),
                   _read_s8(r, "detail", 0, MAX_DETAIL_BYTES))


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """Ask a peer for its state snapshot at ``height``."""

    TYPE: ClassVar[MsgType] = MsgType.SNAPSHOT_REQUEST
    height: int

    def __post_init__(self) -> None:
        _need_int(self, "height", 0, U64_MAX)

    def _write(self, w: Writer) -> None:
        w.u64(self.height)

    @classmethod
    def _read(cls, r: Reader) -> SnapshotRequest:
        return cls(r.u64("height"))


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """Piece ``index`` of ``count`` of the snapshot at ``height``."""

    TYPE: ClassVar[MsgType] = MsgType.SNAPSHOT_CHUNK
    height: int
    index: int
    count: int
    data: bytes

    def __post_init__(self) -> None:
        _need_int(self, "height", 0, U64_MAX)
        _need_int(self, "count", 1, U32_MAX)
        _need_int(self, "index", 0, U32_MAX)
        if self.index >= self.count:
            raise _fail(self, "index", f"{self.index} not below count {self.count}")
        _need_bytes(self, "data", 0, MAX_CHUNK_DATA)

    def _write(self, w: Writer) -> None:
        w.u64(self.height)
        w.u32(self.index)
        w.u32(self.count)
        w.u32(len(self.data))
        w.raw(self.data)

    @classmethod
    def _read(cls, r: Reader) -> SnapshotChunk:
        height = r.u64("height")
        at = r.offset
        index = r.u32("index")
        count = r.u32("count")
        if not index < count:
            raise r.fail("index", f"{index} not below count {count}", at)
        at = r.offset
        n = r.u32("data.length")
        if n > MAX_CHUNK_DATA:
            raise r.fail("data.length", f"{n} over the cap of {MAX_CHUNK_DATA}", at)
        return cls(height, index, count, r.fixed("data", n))


@dataclass(frozen=True, slots=True)
class Ping:
    """Liveness probe; the peer answers Pong with the same nonce (gives the RTT)."""

    TYPE: ClassVar[MsgType] = MsgType.PING
    nonce: int

    def __post_init__(self) -> None:
        _need_int(self, "nonce", 0, U64_MAX)

    def _write(self, w: Writer) -> None:
        w.u64(self.nonce)

    @classmethod
    def _read(cls, r: Reader) -> Ping:
        return cls(r.u64("nonce"))


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to Ping ``nonce``."""

    TYPE: ClassVar[MsgType] = MsgType.PONG
    nonce: int

    def __post_init__(self) -> None:
        _need_int(self, "nonce", 0, U64_MAX)

    def _write(self, w: Writer) -> None:
        w.u64(self.nonce)

    @classmethod
    def _read(cls, r: Reader) -> Pong:
        return cls(r.u64("nonce"))


@dataclass(frozen=True, slots=True)
class _StationAsk:
    """What the station's requests share: its request id and the meter asked about."""

    TYPE: ClassVar[MsgType]
    request_id: int
    meter_id: bytes

    def __post_init__(self) -> None:
        _need_int(self, "request_id", 0, U64_MAX)
        _need_mid(self, "meter_id")

    def _write(self, w: Writer) -> None:
        w.u64(self.request_id)
        w.meter_id(self.meter_id)

    @classmethod
    def _read(cls, r: Reader) -> Self:
        return cls(r.u64("request_id"), r.meter_id("meter_id"))


@dataclass(frozen=True, slots=True)
class StationQuery(_StationAsk):
    """The master station asks this terminal for ``meter_id``'s key, wrapped to the station;
    answered with a StationAnswer of ``request_id`` (from the holder, forwarded if need be)."""

    TYPE: ClassVar[MsgType] = MsgType.STATION_QUERY


@dataclass(frozen=True, slots=True)
class StationRevoke(_StationAsk):
    """The master station orders ``meter_id``'s key revoked, through its home terminal."""

    TYPE: ClassVar[MsgType] = MsgType.STATION_REVOKE


@dataclass(frozen=True, slots=True)
class StationMigrate:
    """The master station orders ``meter_id`` re-homed at ``new_home`` (an area re-plan),
    through its home terminal; answered with a StationReply once committed or refused."""

    TYPE: ClassVar[MsgType] = MsgType.STATION_MIGRATE
    request_id: int
    meter_id: bytes
    new_home: str

    def __post_init__(self) -> None:
        _need_int(self, "request_id", 0, U64_MAX)
        _need_mid(self, "meter_id")
        _need_tid(self, "new_home")

    def _write(self, w: Writer) -> None:
        w.u64(self.request_id)
        w.meter_id(self.meter_id)
        w.terminal_id(self.new_home)

    @classmethod
    def _read(cls, r: Reader) -> StationMigrate:
        return cls(r.u64("request_id"), r.meter_id("meter_id"), r.terminal_id("new_home"))


@dataclass(frozen=True, slots=True)
class StationPlacement:
    """The master station asks a terminal for its placement: answered with PlacementAnswer."""

    TYPE: ClassVar[MsgType] = MsgType.STATION_PLACEMENT
    request_id: int

    def __post_init__(self) -> None:
        _need_int(self, "request_id", 0, U64_MAX)

    def _write(self, w: Writer) -> None:
        w.u64(self.request_id)

    @classmethod
    def _read(cls, r: Reader) -> StationPlacement:
        return cls(r.u64("request_id"))


class PlacementEvent(enum.IntEnum):
    """What a terminal's placement raised (agent/rehoming.py); stable wire codes."""

    SITE_MOVED = 1  # its site (the medoid of its meters) moved; ``terminal`` is itself
    REPLAN_NEEDED = 2  # a join had no bounded repair; ``terminal`` the nearest of the area
    ASSIGNED_ELSEWHERE = 3  # a joining meter was sent to ``terminal``
    MIGRATE = 4  # it moved one of its meters to ``terminal`` to make room


@dataclass(frozen=True, slots=True)
class PlacementAnswer:
    """A terminal's placement for the station: its site (the medoid, in decimetres), its
    capacity, the meters the chain homes on it, and what its placement raised lately
    (``events``: (kind, time in ms since the epoch, meter, terminal), oldest first)."""

    TYPE: ClassVar[MsgType] = MsgType.PLACEMENT_ANSWER
    request_id: int
    site_x_dm: int
    site_y_dm: int
    capacity: int
    meters: tuple[bytes, ...]
    events: tuple[tuple[int, int, bytes, str], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "meters", tuple(self.meters))
        object.__setattr__(self, "events", tuple(tuple(e) for e in self.events))
        _need_int(self, "request_id", 0, U64_MAX)
        _need_int(self, "site_x_dm", 0, MAX_SITE_DM)
        _need_int(self, "site_y_dm", 0, MAX_SITE_DM)
        _need_int(self, "capacity", 0, U16_MAX)
        if len(self.meters) > MAX_PLACED:
            raise _fail(self, "meters", f"{len(self.meters)} over the cap of {MAX_PLACED}")
        for m in self.meters:
            why = check_meter_id(m)
            if why is not None:
                raise _fail(self, "meters", why)
        if len(self.events) > MAX_PLACEMENT_EVENTS:
            raise _fail(self, "events", f"{len(self.events)} over the cap of "
                                        f"{MAX_PLACEMENT_EVENTS}")
        for e in self.events:
            if len(e) != 4 or e[0] not in PlacementEvent._value2member_map_ or \
                    not _is_int(e[1], 0, U64_MAX) or check_meter_id(e[2]) is not None or \
                    not isinstance(e[3], str) or not e[3] or len(e[3].encode()) > U8_MAX:
                raise _fail(self, "events", f"bad event {e!r:.80}")

    def _write(self, w: Writer) -> None:
        w.u64(self.request_id)
        w.u32(self.site_x_dm)
        w.u32(self.site_y_dm)
        w.u16(self.capacity)
        w.u16(len(self.meters))
        for m in self.meters:
            w.meter_id(m)
        w.u8(len(self.events))
        for kind, t_ms, m, terminal in self.events:
            w.u8(kind)
            w.u64(t_ms)
            w.meter_id(m)
            _write_s8(w, terminal)

    @classmethod
    def _read(cls, r: Reader) -> PlacementAnswer:
        request_id = r.u64("request_id")
        xs = []
        for name in ("site_x_dm", "site_y_dm"):
            at = r.offset
            v = r.u32(name)
            if v > MAX_SITE_DM:
                raise r.fail(name, f"{v} over {MAX_SITE_DM}", at)
            xs.append(v)
        capacity = r.u16("capacity")
        at = r.offset
        n = r.u16("meters.count")
        if n > MAX_PLACED:
            raise r.fail("meters.count", f"{n} over the cap of {MAX_PLACED}", at)
        meters = tuple(r.meter_id(f"meters[{i}]") for i in range(n))
        at = r.offset
        k = r.u8("events.count")
        if k > MAX_PLACEMENT_EVENTS:
            raise r.fail("events.count", f"{k} over the cap of {MAX_PLACEMENT_EVENTS}", at)
        events = []
        for i in range(k):
            at = r.offset
            kind = r.u8(f"events[{i}].kind")
            if kind not in PlacementEvent._value2member_map_:
                raise r.fail(f"events[{i}].kind", f"unknown kind {kind}", at)
            events.append((kind, r.u64(f"events[{i}].t_ms"), r.meter_id(f"events[{i}].meter"),
                           _read_s8(r, f"events[{i}].terminal", 1, U8_MAX)))
        return cls(request_id, xs[0], xs[1], capacity, meters, tuple(events))


@dataclass(frozen=True, slots=True)
class StationReply:
    """The terminal's answer to a station order: committed at ``height``, or refused with
    the node core's ``nak`` (agent.node.actions.Nak) and the ledger's reason (0: none)."""

    TYPE: ClassVar[MsgType] = MsgType.STATION_REPLY
    request_id: int
    ok: bool
    nak: int
    ledger_reason: int
    height: int
    detail: str

    def __post_init__(self) -> None:
        _need_int(self, "request_id", 0, U64_MAX)
        if not isinstance(self.ok, bool):
            raise _fail(self, "ok", "not a bool")
        _need_int(self, "nak", 0, U8_MAX)
        _need_int(self, "ledger_reason", 0, U16_MAX)
        _need_int(self, "height", 0, U64_MAX)
        _need_text(self, "detail", 0, MAX_DETAIL_BYTES)

    def _write(self, w: Writer) -> None:
        w.u64(self.request_id)
        w.u8(int(self.ok))
        w.u8(self.nak)
        w.u16(self.ledger_reason)
        w.u64(self.height)
        _write_s8(w, self.detail)

    @classmethod
    def _read(cls, r: Reader) -> StationReply:
        request_id = r.u64("request_id")
        at = r.offset
        ok = r.u8("ok")
        if ok > 1:
            raise r.fail("ok", f"{ok} is not 0 or 1", at)
        return cls(request_id, bool(ok), r.u8("nak"), r.u16("ledger_reason"), r.u64("height"),
                   _read_s8(r, "detail", 0, MAX_DETAIL_BYTES))


@dataclass(frozen=True, slots=True)
class StationAnswer:
    """The answer to a StationQuery: a QueryAnswer's fields for the station, and the record
    proof of the meter's newest record (empty when the chain here no longer holds it)."""

    TYPE: ClassVar[MsgType] = MsgType.STATION_ANSWER
    request_id: int
    status: int
    key_version: int
    height: int
    envelope: bytes
    proof: bytes
    detail: str

    def __post_init__(self) -> None:
        _need_int(self, "request_id", 0, U64_MAX)
        _need_int(self, "status", 0, U8_MAX)
        _need_int(self, "key_version", 0, U32_MAX)
        _need_int(self, "height", 0, U64_MAX)
        _need_bytes(self, "envelope", 0, MAX_ENVELOPE)
        _need_bytes(self, "proof", 0, MAX_PROOF)
        _need_text(self, "detail", 0, MAX_DETAIL_BYTES)

    def _write(self, w: Writer) -> None:
        w.u64(self.request_id)
        w.u8(self.status)
        w.u32(self.key_version)
        w.u64(self.height)
        _write_b16(w, self.envelope)
        w.u32(len(self.proof))
        w.raw(self.proof)
        _write_s8(w, self.detail)

    @classmethod
    def _read(cls, r: Reader) -> StationAnswer:
        request_id, status = r.u64("request_id"), r.u8("status")
        key_version, height = r.u32("key_version"), r.u64("height")
        envelope = _read_b16(r, "envelope", 0, MAX_ENVELOPE)
        at = r.offset
        n = r.u32("proof.length")
        if n > MAX_PROOF:
            raise r.fail("proof.length", f"{n} over the cap of {MAX_PROOF}", at)
        proof = r.fixed("proof", n)
        return cls(request_id, status, key_version, height, envelope, proof,
                   _read_s8(r, "detail", 0, MAX_DETAIL_BYTES))


@dataclass(frozen=True, slots=True)
class StationReadings(_StationAsk):
    """The master station asks the meter's home for the newest readings it accepted."""

    TYPE: ClassVar[MsgType] = MsgType.STATION_READINGS


@dataclass(frozen=True, slots=True)
class ReadingsAnswer:
    """The newest readings of one meter as its meter sealed them: (key version, counter,
    sealed), oldest first; the station opens them with its own copy of the key."""

    TYPE: ClassVar[MsgType] = MsgType.READINGS_ANSWER
    request_id: int
    readings: tuple[tuple[int, int, bytes], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "readings", tuple(tuple(x) for x in self.readings))
        _need_int(self, "request_id", 0, U64_MAX)
        if len(self.readings) > MAX_READINGS:
            raise _fail(self, "readings", f"{len(self.readings)} over the cap of {MAX_READINGS}")
        for item in self.readings:
            if len(item) != 3 or not _is_int(item[0], 0, U32_MAX) or \
                    not _is_int(item[1], 0, U64_MAX) or not _is_bytes(item[2], 1, MAX_SEALED):
                raise _fail(self, "readings", f"bad reading {item!r:.80}")

    def _write(self, w: Writer) -> None:
        w.u64(self.request_id)
        w.u16(len(self.readings))
        for version, counter, sealed in self.readings:
            w.u32(version)
            w.u64(counter)
            _write_b16(w, sealed)

    @classmethod
    def _read(cls, r: Reader) -> ReadingsAnswer:
        request_id = r.u64("request_id")
        at = r.offset
        n = r.u16("readings.count")
        if n > MAX_READINGS:
            raise r.fail("readings.count", f"{n} over the cap of {MAX_READINGS}", at)
        return cls(request_id, tuple((r.u32("key_version"), r.u64("counter"),
                                      _read_b16(r, "sealed", 1, MAX_SEALED))
                                     for _ in range(n)))


# What a Relayed frame may carry: the messages between terminals that name no path of their own.
RELAYABLE = (MsgType.ENDORSE_REQUEST, MsgType.ENDORSEMENT, MsgType.ENDORSEMENT_REFUSED,
             MsgType.FORWARD_TXS, MsgType.FORWARD_REFUSED, MsgType.KEY_HANDOVER,
             MsgType.KEY_ACK)
RELAYED_DOMAIN = b"edgekey relayed v1\x00"


@dataclass(frozen=True, slots=True)
class Relayed:
    """A terminal-to-terminal message on its way along ``path``, signed by its origin."""

    TYPE: ClassVar[MsgType] = MsgType.RELAYED
    seq: int
    path: tuple[str, ...]  # origin ... destination
    inner_type: int
    inner: bytes
    signature: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", tuple(self.path))
        _need_int(self, "seq", 0, U64_MAX)
        if not 2 <= len(self.path) <= MAX_PATH_HOPS:
            raise _fail(self, "path", f"{len(self.path)} terminals, need 2..{MAX_PATH_HOPS}")
        for hop in self.path:
            _need_tid(self, "path", hop)
        if len(set(self.path)) != len(self.path):
            raise _fail(self, "path", "a terminal twice on one path")
        if self.inner_type not in RELAYABLE:
            raise _fail(self, "inner_type", f"{self.inner_type!r} is not a relayable type")
        _need_bytes(self, "inner", 0, MAX_PAYLOAD - 512)
        _need_bytes(self, "signature", SIGNATURE_LEN, SIGNATURE_LEN)

    @property
    def origin(self) -> str:
        return self.path[0]

    @property
    def dst(self) -> str:
        return self.path[-1]

    def _write_signed(self, w: Writer) -> None:
        w.u64(self.seq)
        w.u8(len(self.path))
        for hop in self.path:
            w.terminal_id(hop)
        w.u8(self.inner_type)
        w.u32(len(self.inner))
        w.raw(self.inner)

    def _write(self, w: Writer) -> None:
        self._write_signed(w)
        w.fixed(self.signature, SIGNATURE_LEN)

    @classmethod
    def _read(cls, r: Reader) -> Relayed:
        seq = r.u64("seq")
        at = r.offset
        hops = r.u8("path.hops")
        if not 2 <= hops <= MAX_PATH_HOPS:
            raise r.fail("path.hops", f"{hops} outside 2..{MAX_PATH_HOPS}", at)
        path = tuple(r.terminal_id(f"path[{i}]") for i in range(hops))
        if len(set(path)) != hops:
            raise r.fail("path", "a terminal twice on one path", at)
        at = r.offset
        inner_type = r.u8("inner_type")
        if inner_type not in RELAYABLE:
            raise r.fail("inner_type", f"{inner_type} is not a relayable type", at)
        at = r.offset
        n = r.u32("inner.length")
        if n > MAX_PAYLOAD - 512:
            raise r.fail("inner.length", f"{n} over the cap of {MAX_PAYLOAD - 512}", at)
        inner = r.fixed("inner", n)
        return cls(seq, path, inner_type, inner, r.fixed("signature", SIGNATURE_LEN))


def relayed_signed(seq: int, path: tuple[str, ...], inner_type: int, inner: bytes) -> bytes:
    """The bytes a Relayed frame's origin signs: domain, seq, path, inner type and payload."""
    w = Writer()
    w.raw(RELAYED_DOMAIN)
    Relayed(seq, path, inner_type, inner, bytes(SIGNATURE_LEN))._write_signed(w)
    return w.getvalue()


Message = (Hello | EndorseRequest | EndorsementMsg | EndorsementRefusedMsg | ForwardTxs
           | ForwardRefused | KeyHandover | KeyAck | QueryForward | QueryAnswer
           | SnapshotRequest | SnapshotChunk | Ping | Pong | StationQuery | StationRevoke
           | StationReply | StationAnswer | StationReadings | ReadingsAnswer | Relayed
           | StationMigrate | StationPlacement | PlacementAnswer)

MESSAGE_CLASSES: dict[MsgType, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, EndorseRequest, EndorsementMsg, EndorsementRefusedMsg,
                              ForwardTxs, ForwardRefused, KeyHandover, KeyAck, QueryForward,
                              QueryAnswer, SnapshotRequest, SnapshotChunk, Ping, Pong,
                              StationQuery, StationRevoke, StationReply, StationAnswer,
                              StationReadings, ReadingsAnswer, Relayed, StationMigrate,
                              StationPlacement, PlacementAnswer)
}

# What the master station may send a terminal, and what a terminal may send the station
# besides the control messages (agent/network.py refuses anything else across the line).
FROM_STATION = (StationQuery, StationRevoke, StationReadings, StationMigrate, StationPlacement)
TO_STATION = (StationAnswer, StationReply, ReadingsAnswer, PlacementAnswer)


# -------------------------------------------------------------------- payloads

def encode_message(message: Message) -> bytes:
    """The payload of ``message`` (without the frame header)."""
    if type(message) not in MESSAGE_CLASSES.values():
        raise WireValueError(f"not a wire message: {type(message).__name__}")
    w = Writer()
    try:
        message._write(w)
    except (ValueError, TypeError) as exc:  # a field mutated past its checks
        raise WireValueError(f"{type(message).__name__}: {exc}") from exc
    return w.getvalue()


def decode_message(msg_type: int, payload: bytes) -> Message:
    """The message of type ``msg_type`` that ``payload`` encodes, or WireError."""
    try:
        cls = MESSAGE_CLASSES[MsgType(msg_type)]
    except ValueError:
        raise WireError(WireFault.UNKNOWN_TYPE, f"type {msg_type}") from None
    r = Reader(payload)
    try:
        message = cls._read(r)
    except ValueError as exc:  # DecodeError, and the values' own checks (LedgerValueError...)
        raise WireError(WireFault.BAD_FIELD, f"{cls.__name__}: {exc}") from None
    if r.remaining():
        raise WireError(WireFault.TRAILING_BYTES,
                        f"{cls.__name__}: {r.remaining()} bytes after the message")
    return message


# --------------------------------------------------------------------- framing

class FrameEncoder:
    """Frames messages for one direction of one connection, numbering them from 1."""

    __slots__ = ("_next_seq",)

    def __init__(self) -> None:
        self._next_seq = 1

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def encode(self, message: Message) -> bytes:
        """The frame carrying ``message``."""
        return self.frame(message.TYPE, encode_message(message))

    def frame(self, msg_type: int, payload: bytes) -> bytes:
        """A frame around an already encoded payload (a queue encodes once, frames later)."""
        if msg_type not in MESSAGE_CLASSES:
            raise WireValueError(f"unknown message type {msg_type}")
        if len(payload) > MAX_PAYLOAD:
            raise WireValueError(f"payload of {len(payload)} bytes over MAX_PAYLOAD "
                                 f"({MAX_PAYLOAD})")
        if self._next_seq > U64_MAX:
            raise WireValueError("sequence numbers exhausted: open a new connection")
        seq = self._next_seq
        self._next_seq += 1
        return _HEADER.pack(MAGIC, WIRE_VERSION, msg_type, seq, len(payload)) + payload


class FrameDecoder:
    """Turns one connection's byte stream into messages; see the module docstring.

    A fault is final: the decoder raises it again on every later ``feed``,
    since nothing after a bad frame can be trusted to be in step.
    """

    __slots__ = ("_buf", "_error", "_expect_seq", "_length", "_type")

    def __init__(self) -> None:
        self._buf = bytearray()  # the header being read, then the payload being read
        self._type: int | None = None  # set once a header is complete
        self._length = 0
        self._expect_seq = 1
        self._error: WireError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (never more than one header or MAX_PAYLOAD)."""
        return len(self._buf)

    @property
    def expected_seq(self) -> int:
        return self._expect_seq

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """The messages ``data`` completes, in order; WireError on the first bad byte."""
        if self._error is not None:
            raise WireError(self._error.reason, f"decoder already failed: {self._error.detail}")
        out: list[Message] = []
        view = memoryview(data).cast("B")
        pos, end = 0, len(view)
        try:
            while True:
                if self._type is None:
                    take = min(HEADER_LEN - len(self._buf), end - pos)
                    if take:
                        self._buf += view[pos:pos + take]
                        pos += take
                        self._check_header()
                    if len(self._buf) < HEADER_LEN:
                        break
                    self._start_payload()
                take = min(self._length - len(self._buf), end - pos)
                if take:
                    self._buf += view[pos:pos + take]
                    pos += take
                if len(self._buf) < self._length:
                    break
                msg_type, payload = self._type, bytes(self._buf)
                self._type = None
                self._buf.clear()
                out.append(decode_message(msg_type, payload))
        except WireError as exc:
            exc.messages = tuple(out)
            self._error = exc
            self._buf.clear()
            raise
        return out

    def _check_header(self) -> None:
        """Check each header field as soon as its bytes are in: refuse early, buffer nothing."""
        buf = self._buf
        n = len(buf)
        if buf[:min(n, 2)] != MAGIC[:min(n, 2)]:
            raise WireError(WireFault.BAD_MAGIC, f"{bytes(buf[:2])!r}")
        if n >= 3 and buf[2] != WIRE_VERSION:
            raise WireError(WireFault.BAD_VERSION, f"version {buf[2]} (this code reads "
                                                   f"{WIRE_VERSION})")
        if n >= 4 and buf[3] not in MESSAGE_CLASSES:
            raise WireError(WireFault.UNKNOWN_TYPE, f"type {buf[3]}")
        if n >= 12:
            seq = int.from_bytes(buf[4:12], "big")
            if seq != self._expect_seq:
                raise WireError(WireFault.BAD_SEQ, f"seq {seq}, expected {self._expect_seq}")
        if n >= HEADER_LEN:
            length = int.from_bytes(buf[12:16], "big")
            if length > MAX_PAYLOAD:
                raise WireError(WireFault.OVERSIZE, f"payload of {length} bytes over "
                                                    f"{MAX_PAYLOAD}")

    def _start_payload(self) -> None:
        _, _, msg_type, _, length = _HEADER.unpack(self._buf)
        self._type = msg_type
        self._length = length
        self._expect_seq += 1
        self._buf.clear()


__all__ = [
    "BOOT_NONCE_LEN",
    "HEADER_LEN",
    "MAGIC",
    "MAX_CHUNK_DATA",
    "MAX_DETAIL_BYTES",
    "MAX_ENVELOPE",
    "MAX_FLEET_BYTES",
    "MAX_FORWARD_TXS",
    "MAX_PATH_HOPS",
    "MAX_PAYLOAD",
    "MESSAGE_CLASSES",
    "WIRE_VERSION",
    "EndorseRequest",
    "EndorsementMsg",
    "EndorsementRefusedMsg",
    "ForwardRefused",
    "ForwardTxs",
    "FrameDecoder",
    "FrameEncoder",
    "Hello",
    "KeyAck",
    "KeyHandover",
    "Message",
    "MsgType",
    "Ping",
    "Pong",
    "QueryAnswer",
    "QueryForward",
    "SnapshotChunk",
    "SnapshotRequest",
    "WireError",
    "WireFault",
    "WireValueError",
    "decode_message",
    "encode_message",
]
