"""Meter and terminal ids: the one definition of each, with its limits and its checks.

A meter's id is its DL/T 698.45 server address (SA): 1..16 bytes, since the
address flag AF holds the SA length minus one in bits 0-3. The ledger, the
key store, the key transport and the frame codec all name a meter by it.

A terminal's id is a short ASCII name (``ecd-07``, ``pl.north.3``).

``MeterId`` and ``TerminalId`` subclass ``bytes`` and ``str``: they are dict
keys, hash and compare equal to the plain values, and encode as before, so
code that holds plain values keeps working. The constructor enforces the
rules, so an instance in hand is valid; a bad value raises ``MeterIdError``
or ``TerminalIdError`` (ValueErrors, and LocalProtocolErrors: whoever builds
an id from a bad value is our own code; a decoder turns bad wire bytes into
its own RemoteProtocolError before it gets here). Code that reports a
problem instead of raising asks ``check_meter_id`` / ``check_terminal_id``;
code that only checks a value it will not keep (an encoder) calls
``require_meter_id`` / ``require_terminal_id``, which raise as the
constructors do without making a copy.

RAM: an instance costs more than the plain value (sys.getsizeof on CPython
3.11: a 6-byte MeterId 55 bytes against 39, since a subclass instance
carries the GC header; a 6-character TerminalId 103 against 55), so a table
of 10^6 meters keeps plain bytes as its keys (agent/ledger/state.py).
"""

from __future__ import annotations

import re

from hal.errors import LocalProtocolError

# DL/T 698.45 AF bits 0-3 hold the server address length minus one.
METER_ID_MIN = 1
METER_ID_MAX = 16

# Terminal ids are readable on the serial console, in logs and in board
# configs, and at most 32 bytes so an endorsement (id + 64-byte signature)
# stays under 100 bytes and a block's endorsement list fits one flash record
# (agent/ledger/block.py).
TERMINAL_ID_MIN = 1
TERMINAL_ID_MAX = 32
TERMINAL_ID_ALPHABET = "A-Za-z0-9._-"
_TERMINAL_ID = re.compile(f"[{TERMINAL_ID_ALPHABET}]+")  # explicit ranges: ASCII only
_TERMINAL_ID_ASCII = re.compile(
    f"[{TERMINAL_ID_ALPHABET}]{{{TERMINAL_ID_MIN},{TERMINAL_ID_MAX}}}".encode("ascii"))


class MeterIdError(LocalProtocolError, ValueError):
    """A value that is not a meter id; the message says which rule it breaks."""


class MeterIdTypeError(MeterIdError, TypeError):
    """Not bytes at all (a TypeError too, as the key store's check raised before)."""


class TerminalIdError(LocalProtocolError, ValueError):
    """A value that is not a terminal id; the message says which rule it breaks."""


class TerminalIdTypeError(TerminalIdError, TypeError):
    """Not a str at all."""


def check_meter_id(value: object) -> str | None:
    """Why ``value`` is not a meter id, or None when it is one (bytes only: ids are values)."""
    if type(value) is MeterId:
        return None  # checked when it was made
    if not isinstance(value, bytes):
        return f"must be bytes, got {type(value).__name__}"
    if not METER_ID_MIN <= len(value) <= METER_ID_MAX:
        return f"must be {METER_ID_MIN}..{METER_ID_MAX} bytes, got {len(value)}"
    return None


def check_terminal_id(value: object) -> str | None:
    """Why ``value`` is not a terminal id, or None when it is one."""
    if type(value) is TerminalId:
        return None  # checked when it was made
    if not isinstance(value, str):
        return "not a string"
    if not TERMINAL_ID_MIN <= len(value) <= TERMINAL_ID_MAX:
        return f"length {len(value)} outside {TERMINAL_ID_MIN}..{TERMINAL_ID_MAX}"
    if _TERMINAL_ID.fullmatch(value) is None:
        return f"characters outside [{TERMINAL_ID_ALPHABET}]"
    return None


def require_meter_id(value: object) -> None:
    """MeterIdError (MeterIdTypeError for a non-bytes) unless ``value`` is a meter id."""
    why = check_meter_id(value)
    if why is not None:
        error = MeterIdError if isinstance(value, bytes) else MeterIdTypeError
        raise error(f"meter id {value!r}: {why}")


def require_terminal_id(value: object) -> None:
    """TerminalIdError (TerminalIdTypeError for a non-str) unless ``value`` is a terminal id."""
    why = check_terminal_id(value)
    if why is not None:
        error = TerminalIdError if isinstance(value, str) else TerminalIdTypeError
        raise error(f"terminal id {value!r}: {why}")


class MeterId(bytes):
    """A meter's id (its DL/T 698.45 server address), checked when made; shown in hex."""

    __slots__ = ()

    def __new__(cls, value: bytes | bytearray) -> MeterId:
        if type(value) is bytes and METER_ID_MIN <= len(value) <= METER_ID_MAX:
            return bytes.__new__(cls, value)  # the decoders' case, checked inline
        if type(value) is cls:
            return value  # checked when it was made
        if isinstance(value, bytearray):
            value = bytes(value)
        require_meter_id(value)
        return bytes.__new__(cls, value)

    def __repr__(self) -> str:
        return f"MeterId.fromhex({self.hex()!r})"

    def __str__(self) -> str:
        return self.hex()


class TerminalId(str):
    """A terminal's id, checked when made."""

    __slots__ = ()

    def __new__(cls, value: str) -> TerminalId:
        if type(value) is cls:
            return value  # checked when it was made
        require_terminal_id(value)
        return str.__new__(cls, value)

    @classmethod
    def from_ascii(cls, raw: bytes) -> TerminalId:
        """The id ``raw`` spells in ASCII: a decoder's path, one check on the bytes."""
        if _TERMINAL_ID_ASCII.fullmatch(raw) is None:  # the length is in the pattern
            raise TerminalIdError(f"terminal id {raw!r}: not {TERMINAL_ID_MIN}.."
                                  f"{TERMINAL_ID_MAX} characters of [{TERMINAL_ID_ALPHABET}]")
        return str.__new__(cls, raw.decode("ascii"))


__all__ = [
    "METER_ID_MAX",
    "METER_ID_MIN",
    "TERMINAL_ID_ALPHABET",
    "TERMINAL_ID_MAX",
    "TERMINAL_ID_MIN",
    "MeterId",
    "MeterIdError",
    "MeterIdTypeError",
    "TerminalId",
    "TerminalIdError",
    "TerminalIdTypeError",
    "check_meter_id",
    "check_terminal_id",
    "require_meter_id",
    "require_terminal_id",
]
