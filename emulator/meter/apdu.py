"""The meter protocol's APDUs on the meter's side (README, "Meter protocol"), MicroPython subset.

The same bytes as ``agent/meterproto.py`` (the terminal's codec), in the
subset of Python MicroPython runs; all integers big-endian::

    request := version 1 | service 1 | request id 4 | counter 8 | body
    answer  := version 1 | ACK/NAK 1 | request id 4 | service 1 | rest
    ACK rest := key version 4 | value 8 | MAC 16
    NAK rest := reason 1 | counter 8 | home length 1 | home (ASCII)

No crypto here: the ACK's MAC is HMAC-SHA256 (first 16 bytes) under the key
in force after the operation over ``ack_mac_message``; the caller passes the
HMAC function in (``check_ack``), so the platform supplies the primitive.
Requests are encoded for the meter to send; ``decode_request`` and the
answer encoders are the terminal's side, for tests and for a fake terminal.
"""

import struct

from .frame import REASON_NAMES as LINK_REASON_NAMES

try:  # noqa: SIM105 (MicroPython has no contextlib): typing is for the type checker only
    from typing import Callable  # noqa: UP035 (MicroPython has no collections.abc)
except ImportError:
    pass

VERSION = 1

REGISTER = 0x01
ROTATE = 0x02
REVOKE = 0x03
READING = 0x04
SERVICE_NAMES = {REGISTER: "register", ROTATE: "rotate", REVOKE: "revoke", READING: "reading"}

ACK = 0x81
NAK = 0x82

_HEAD = ">BBIQ"  # version, service, request id, counter
_ANSWER_HEAD = ">BBIB"  # version, ACK/NAK, request id, service answered
_ACK_REST = ">IQ"  # key version in force, value
_NAK_REST = ">BQB"  # reason, counter, home length
HEAD_BYTES = 14
ANSWER_HEAD_BYTES = 7
ACK_MACED_BYTES = 19  # the head the MAC covers: APDU bytes 0..18
MAC_BYTES = 16  # HMAC-SHA256 truncated, as DLMS/COSEM truncates its GMAC tags
ACK_BYTES = ACK_MACED_BYTES + MAC_BYTES
NAK_FIXED_BYTES = 17
ACK_LABEL = b"edgekey/ack/v1"
READING_LABEL = b"edgekey/reading/v1"

KEY_BYTES = 32  # AES-256
PROOF_BYTES = 40  # a 32-byte key AES-key-wrapped (RFC 3394 2.2.1: n blocks wrap to n + 1)
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_READING_BYTES = 512
SEALED_MIN = NONCE_BYTES + TAG_BYTES
SEALED_MAX = SEALED_MIN + MAX_READING_BYTES
MAX_HOME_BYTES = 32  # a terminal id's limit (hal.ids.TERMINAL_ID_MAX)
MAX_U32 = 0xFFFFFFFF
MAX_U64 = 0xFFFFFFFFFFFFFFFF

# NAK reasons: 1-17 the node core's (agent.node.actions.Nak), 32-35 the codec's,
# 64 + hal.dlt698.Reason the link layer's.
BAD_REQUEST = 1
BAD_PROOF = 2
KEY_REUSED = 3
UNKNOWN_METER = 4
NOT_HOME = 5
REVOKED = 6
REPLAYED = 7
STALE_VERSION = 8
BUSY = 9
TIMEOUT = 10
LEDGER_REFUSED = 11
NO_FACTORY_KEY = 12
STORE_FAILED = 13
OVERLOADED = 14
KEY_PENDING = 15
BAD_READING = 16
REPLAYED_READING = 17
BAD_APDU = 32
UNKNOWN_SERVICE = 33
NOT_A_REQUEST = 34
BAD_ADDRESS = 35
LINK_REASON_BASE = 64
REASON_NAMES = {
    BAD_REQUEST: "BAD_REQUEST", BAD_PROOF: "BAD_PROOF", KEY_REUSED: "KEY_REUSED",
    UNKNOWN_METER: "UNKNOWN_METER", NOT_HOME: "NOT_HOME", REVOKED: "REVOKED",
    REPLAYED: "REPLAYED", STALE_VERSION: "STALE_VERSION", BUSY: "BUSY", TIMEOUT: "TIMEOUT",
    LEDGER_REFUSED: "LEDGER_REFUSED", NO_FACTORY_KEY: "NO_FACTORY_KEY",
    STORE_FAILED: "STORE_FAILED", OVERLOADED: "OVERLOADED", KEY_PENDING: "KEY_PENDING",
    BAD_READING: "BAD_READING", REPLAYED_READING: "REPLAYED_READING", BAD_APDU: "BAD_APDU",
    UNKNOWN_SERVICE: "UNKNOWN_SERVICE", NOT_A_REQUEST: "NOT_A_REQUEST",
    BAD_ADDRESS: "BAD_ADDRESS",
}


def reason_name(reason: int) -> str:
    """A NAK reason's name for counters and logs, as the terminal counts them (LINK_BAD_FCS)."""
    name = REASON_NAMES.get(reason)
    if name is not None:
        return name
    link = LINK_REASON_NAMES.get(reason - LINK_REASON_BASE)
    if link is not None:
        return "LINK_" + link
    return f"REASON_{reason}"


class ApduError(ValueError):
    """An APDU that cannot be read; ``code`` is the NAK reason, ``request_id`` and
    ``service`` what could be read (0 when not)."""

    def __init__(self, code: int, detail: str, request_id: int = 0, service: int = 0) -> None:
        super().__init__(detail)
        self.code = code
        self.request_id = request_id
        self.service = service


def _check_u(value: int, limit: int, what: str) -> None:
    if not 0 <= value <= limit:
        raise ValueError(f"{what} {value} out of range")


# ---------------------------------------------------------------- requests

def encode_request(service: int, request_id: int, counter: int, body: bytes) -> bytes:
    """A request APDU: the head, then ``body`` as the service lays it out."""
    if service not in SERVICE_NAMES:
        raise ValueError(f"unknown service {service}")
    _check_u(request_id, MAX_U32, "request id")
    _check_u(counter, MAX_U64, "counter")
    return struct.pack(_HEAD, VERSION, service, request_id, counter) + body


def encode_register(request_id: int, counter: int, key_version: int, wrapped_key: bytes) -> bytes:
    """REGISTER: the key version and the new key wrapped under the factory key (58 bytes)."""
    if len(wrapped_key) != PROOF_BYTES:
        raise ValueError(f"wrapped key of {len(wrapped_key)} bytes")
    if not 1 <= key_version <= MAX_U32:
        raise ValueError(f"key version {key_version} out of range")
    return encode_request(REGISTER, request_id, counter,
                          key_version.to_bytes(4, "big") + wrapped_key)


def encode_rotate(request_id: int, counter: int, proof: bytes) -> bytes:
    """ROTATE: the new key wrapped under the current key (54 bytes)."""
    if len(proof) != PROOF_BYTES:
        raise ValueError(f"rotation proof of {len(proof)} bytes")
    return encode_request(ROTATE, request_id, counter, proof)


def encode_revoke(request_id: int, counter: int, proof: bytes) -> bytes:
    """REVOKE: the revocation marker wrapped under the current key (54 bytes)."""
    if len(proof) != PROOF_BYTES:
        raise ValueError(f"revocation proof of {len(proof)} bytes")
    return encode_request(REVOKE, request_id, counter, proof)


def encode_reading(request_id: int, counter: int, sealed: bytes) -> bytes:
    """READING: the sealed reading, nonce | ciphertext | tag (42..554 bytes)."""
    if not SEALED_MIN <= len(sealed) <= SEALED_MAX:
        raise ValueError(f"sealed reading of {len(sealed)} bytes")
    return encode_request(READING, request_id, counter, sealed)


def reading_aad(meter_id: bytes, key_version: int, counter: int) -> bytes:
    """The reading's AES-GCM AAD: label | len8 meter id | meter id | key version 4 | counter 8."""
    return (READING_LABEL + len(meter_id).to_bytes(1, "big") + meter_id
            + key_version.to_bytes(4, "big") + counter.to_bytes(8, "big"))


class Request:
    """A decoded request: ``key_version`` is REGISTER's (0 for the others), ``body`` the
    wrapped key, proof or sealed reading."""

    __slots__ = ("body", "counter", "key_version", "request_id", "service")

    def __init__(self, service: int, request_id: int, counter: int, key_version: int,
                 body: bytes) -> None:
        self.service = service
        self.request_id = request_id
        self.counter = counter
        self.key_version = key_version
        self.body = body


def decode_request(apdu: bytes) -> Request:
    """A request APDU, checked as the terminal checks it; ApduError with its NAK code."""
    apdu = bytes(apdu)
    if len(apdu) < HEAD_BYTES:
        rid = int.from_bytes(apdu[2:6], "big") if len(apdu) >= 6 else 0
        raise ApduError(BAD_APDU, f"APDU of {len(apdu)} bytes", rid,
                        apdu[1] if len(apdu) > 1 else 0)
    version, service, rid, counter = struct.unpack_from(_HEAD, apdu, 0)
    if service in (ACK, NAK):
        raise ApduError(NOT_A_REQUEST, "an answer where a request belongs", rid, service)
    if version != VERSION:
        raise ApduError(BAD_APDU, f"version {version}", rid, service)
    if service not in SERVICE_NAMES:
        raise ApduError(UNKNOWN_SERVICE, f"unknown service 0x{service:02x}", rid, service)
    body = apdu[HEAD_BYTES:]
    if service == READING:
        if not SEALED_MIN <= len(body) <= SEALED_MAX:
            raise ApduError(BAD_APDU, f"sealed reading of {len(body)} bytes", rid, service)
        return Request(service, rid, counter, 0, body)
    want = PROOF_BYTES + 4 if service == REGISTER else PROOF_BYTES
    if len(body) != want:
        raise ApduError(BAD_APDU, f"body of {len(body)} bytes, expected {want}",
                        rid, service)
    if service == REGISTER:
        return Request(service, rid, counter, int.from_bytes(body[:4], "big"), body[4:])
    return Request(service, rid, counter, 0, body)


# ---------------------------------------------------------------- answers

def ack_mac_message(meter_id: bytes, head: bytes) -> bytes:
    """What the ACK's MAC covers: label | len8 meter id | meter id | APDU bytes 0..18."""
    return ACK_LABEL + len(meter_id).to_bytes(1, "big") + meter_id + head


def equal(a: bytes, b: bytes) -> bool:
    """Compare two MACs in time independent of where they differ (no hmac.compare_digest)."""
    if len(a) != len(b):
        return False
    diff = 0
    for i in range(len(a)):
        diff |= a[i] ^ b[i]
    return diff == 0


class Ack:
    """An acknowledgement: ``value`` is the committing block's height, or the accepted
    reading counter; ``head`` is what the MAC covers."""

    __slots__ = ("head", "key_version", "mac", "request_id", "service", "value")

    def __init__(self, request_id: int, service: int, key_version: int, value: int,
                 mac: bytes, head: bytes) -> None:
        self.request_id = request_id
        self.service = service
        self.key_version = key_version
        self.value = value
        self.mac = mac
        self.head = head


class Nak:
    """A negative acknowledgement: ``counter`` the one in force for REPLAYED and
    REPLAYED_READING, ``home`` the meter's home terminal for NOT_HOME."""

    __slots__ = ("counter", "home", "reason", "request_id", "service")

    def __init__(self, request_id: int, service: int, reason: int, counter: int,
                 home: str) -> None:
        self.request_id = request_id
        self.service = service
        self.reason = reason
        self.counter = counter
        self.home = home


def _ascii(data: bytes) -> str:
    for b in data:
        if b > 0x7F:
            raise ApduError(BAD_APDU, "home id is not ASCII")
    return data.decode("ascii")


def decode_answer(apdu: bytes) -> Ack | Nak:
    """A terminal's answer APDU; ApduError (code BAD_APDU) when it is not one."""
    apdu = bytes(apdu)
    if len(apdu) < ANSWER_HEAD_BYTES:
        raise ApduError(BAD_APDU, f"answer of {len(apdu)} bytes")
    version, kind, rid, service = struct.unpack_from(_ANSWER_HEAD, apdu, 0)
    if version != VERSION:
        raise ApduError(BAD_APDU, f"answer version {version}", rid, service)
    if kind == ACK:
        if len(apdu) != ACK_BYTES:
            raise ApduError(BAD_APDU, f"ACK of {len(apdu)} bytes", rid, service)
        key_version, value = struct.unpack_from(_ACK_REST, apdu, ANSWER_HEAD_BYTES)
        return Ack(rid, service, key_version, value, apdu[ACK_MACED_BYTES:],
                   apdu[:ACK_MACED_BYTES])
    if kind == NAK:
        if len(apdu) < NAK_FIXED_BYTES:
            raise ApduError(BAD_APDU, f"NAK of {len(apdu)} bytes", rid, service)
        reason, counter, n = struct.unpack_from(_NAK_REST, apdu, ANSWER_HEAD_BYTES)
        home = apdu[NAK_FIXED_BYTES:]
        if len(home) != n or n > MAX_HOME_BYTES:
            raise ApduError(BAD_APDU, "NAK home field does not match its length", rid, service)
        return Nak(rid, service, reason, counter, _ascii(home))
    raise ApduError(BAD_APDU, f"answer kind 0x{kind:02x}", rid, service)


def check_ack(ack: Ack, meter_id: bytes, key: bytes,
              hmac_sha256: Callable[[bytes, bytes], bytes]) -> bool:
    """Whether the ACK's MAC checks under ``key``; ``hmac_sha256(key, msg)`` is the platform's."""
    return equal(ack.mac, hmac_sha256(key, ack_mac_message(meter_id, ack.head))[:MAC_BYTES])


def encode_ack(meter_id: bytes, request_id: int, service: int, key_version: int, value: int,
               key: bytes, hmac_sha256: Callable[[bytes, bytes], bytes]) -> bytes:
    """An acknowledgement MAC'd under ``key`` (the terminal's side; tests and fakes)."""
    _check_u(request_id, MAX_U32, "request id")
    _check_u(key_version, MAX_U32, "key version")
    _check_u(value, MAX_U64, "value")
    head = (struct.pack(_ANSWER_HEAD, VERSION, ACK, request_id, service)
            + struct.pack(_ACK_REST, key_version, value))
    return head + hmac_sha256(key, ack_mac_message(meter_id, head))[:MAC_BYTES]


def encode_nak(request_id: int, service: int, reason: int, counter: int = 0,
               home: str = "") -> bytes:
    """A negative acknowledgement (the terminal's side; tests and fakes)."""
    home_b = home.encode("ascii")
    if len(home_b) > MAX_HOME_BYTES:
        raise ValueError(f"home id of {len(home_b)} bytes")
    return (struct.pack(_ANSWER_HEAD, VERSION, NAK, request_id, service)
            + struct.pack(_NAK_REST, reason, counter, len(home_b)) + home_b)
