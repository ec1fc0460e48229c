"""The ledger's one binary layout: big-endian fixed-width fields, short length prefixes.

Every hash and signature in the ledger covers these bytes, so each value has
exactly one encoding and the decoder refuses every other byte string:
integers are fixed width (no varints, so no overlong forms), lengths are
one byte with a named cap, identifiers use a closed alphabet, and trailing
bytes are an error. A refusal is a ``DecodeError`` (a ``ValueError`` and
``hal.errors.RemoteProtocolError``: the bytes came from outside) that names
the field and the byte offset where it starts, the way the frame codec
(``hal/dlt698.py``) names a rejected frame's reason. A value our own code
built wrong is a ``LedgerValueError`` (a ``ValueError`` and
``LocalProtocolError``). Meter and terminal ids, their limits and checks are
``hal/ids.py``'s; decoded ids are ``MeterId`` / ``TerminalId`` instances.

``Writer`` and ``Reader`` are deliberately small: the record layouts live in
``tx.py`` and ``block.py``, next to the values they encode.
"""

from __future__ import annotations

import struct

from hal.errors import LocalProtocolError, RemoteProtocolError
from hal.ids import (
    METER_ID_MAX,
    METER_ID_MIN,
    TERMINAL_ID_ALPHABET,
    TERMINAL_ID_MAX,
    TERMINAL_ID_MIN,
    MeterId,
    TerminalId,
    TerminalIdError,
    require_meter_id,
    require_terminal_id,
)
from hal.ids import check_terminal_id as check_terminal_id  # re-exported for older callers

FORMAT_VERSION = 1  # the layout version every record of this module's era starts with

HASH_LEN = 32  # SHA-256
SIGNATURE_LEN = 64  # Ed25519 (RFC 8032 section 5.1.6)
PUBLIC_KEY_LEN = 32  # Ed25519 (RFC 8032 section 5.1.5)
ZERO_HASH = bytes(HASH_LEN)

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class LedgerValueError(LocalProtocolError, ValueError):
    """Our own code built a ledger value (transaction, header, endorsement) from bad fields."""


class DecodeError(RemoteProtocolError):
    """Bytes that are not the one canonical encoding of a ledger value (a ValueError).

    ``field`` names what was being read (``"tx[3].counter"``), ``offset`` is
    the byte where that field starts in the outermost buffer.
    """

    def __init__(self, field: str, offset: int, problem: str) -> None:
        super().__init__(f"{field} at byte {offset}: {problem}")
        self.field = field
        self.offset = offset
        self.problem = problem


class VersionError(DecodeError):
    """A version byte this code does not read: a newer (or foreign) format, not corruption."""


class Writer:
    """Appends fields; ``getvalue()`` returns the encoding."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> None:
        self._parts.append(_U8.pack(value))

    def u16(self, value: int) -> None:
        self._parts.append(_U16.pack(value))

    def u32(self, value: int) -> None:
        self._parts.append(_U32.pack(value))

    def u64(self, value: int) -> None:
        self._parts.append(_U64.pack(value))

    def fixed(self, value: bytes, length: int) -> None:
        if len(value) != length:
            raise ValueError(f"expected {length} bytes, got {len(value)}")
        self._parts.append(bytes(value))

    def short_bytes(self, value: bytes, cap: int) -> None:
        """One length byte, then the bytes (``cap`` <= 255)."""
        if len(value) > cap:
            raise ValueError(f"{len(value)} bytes over the cap of {cap}")
        self._parts.append(_U8.pack(len(value)))
        self._parts.append(bytes(value))

    def terminal_id(self, value: str) -> None:
        """One length byte, then the id; TerminalIdError (a ValueError) for a bad one."""
        require_terminal_id(value)  # checks without copying: encoders run several times a tx
        self.short_bytes(value.encode("ascii"), TERMINAL_ID_MAX)

    def meter_id(self, value: bytes) -> None:
        """One length byte, then the id; MeterIdError (a ValueError) for a bad one."""
        require_meter_id(value)
        self.short_bytes(value, METER_ID_MAX)

    def raw(self, value: bytes) -> None:
        """An already canonical encoding (a nested record)."""
        self._parts.append(bytes(value))

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads fields in order; every read names its field for the error."""

    __slots__ = ("_base", "_data", "_pos")

    def __init__(self, data: bytes, base: int = 0) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"expected bytes, got {type(data).__name__}")
        self._data = bytes(data)
        self._pos = 0
        self._base = base  # offset of data[0] in the outermost buffer, for messages

    @property
    def offset(self) -> int:
        """Position in the outermost buffer."""
        return self._base + self._pos

    def fail(self, field: str, problem: str, at: int | None = None) -> DecodeError:
        return DecodeError(field, self.offset if at is None else at, problem)

    def _take(self, field: str, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise self.fail(field, f"truncated: needs {n} bytes, {len(self._data) - self._pos} "
                                   f"left")
        out = self._data[self._pos:end]
        self._pos = end
        return out

    def u8(self, field: str) -> int:
        return int(self._take(field, 1)[0])

    def u16(self, field: str) -> int:
        return int(_U16.unpack(self._take(field, 2))[0])

    def u32(self, field: str) -> int:
        return int(_U32.unpack(self._take(field, 4))[0])

    def u64(self, field: str) -> int:
        return int(_U64.unpack(self._take(field, 8))[0])

    def fixed(self, field: str, length: int) -> bytes:
        return self._take(field, length)

    def short_bytes(self, field: str, lo: int, hi: int) -> bytes:
        """Length byte in ``lo..hi``, then that many bytes."""
        at = self.offset
        n = self.u8(field)
        if not lo <= n <= hi:
            raise self.fail(field, f"length {n} outside {lo}..{hi}", at)
        return self._take(field, n)

    def terminal_id(self, field: str) -> TerminalId:
        at = self.offset
        raw = self.short_bytes(field, TERMINAL_ID_MIN, TERMINAL_ID_MAX)
        try:
            return TerminalId.from_ascii(raw)
        except TerminalIdError:
            raise self.fail(field, f"characters outside [{TERMINAL_ID_ALPHABET}]", at) from None

    def meter_id(self, field: str) -> MeterId:
        """Length byte in METER_ID_MIN..METER_ID_MAX, then the id."""
        return MeterId(self.short_bytes(field, METER_ID_MIN, METER_ID_MAX))

    def version(self, field: str, expected: int) -> int:
        at = self.offset
        v = self.u8(field)
        if v != expected:
            raise VersionError(field, at, f"unsupported version {v} (this code reads {expected})")
        return v

    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self._data) - self._pos

    def done(self, what: str) -> None:
        """No trailing bytes: one value, one encoding."""
        if self._pos != len(self._data):
            raise self.fail(what, f"{len(self._data) - self._pos} trailing bytes")
