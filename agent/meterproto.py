"""The meter protocol's application layer: APDUs inside DL/T 698.45 frames (sans-I/O).

The byte layouts are the README's "Meter protocol" section; in short::

    request := version 1 | service 1 | request id 4 | counter 8 | body
    answer  := version 1 | ACK/NAK 1 | request id 4 | service 1 | rest

Requests decode to the node core's events (``agent/node/events.py``);
the node's answers (``Acknowledge``, ``Refuse``, ``AcceptReading``) encode
to ACK and NAK APDUs. An ACK is authenticated under the key in force after
the operation (HMAC-SHA256, first 16 bytes), so a meter switches keys only
on a genuine acknowledgement. Bytes from the line never raise anything but
``ApduError``, which carries the reason code its NAK sends back. The
emulated meter's own codec (``emulator/meter/apdu.py``, the MicroPython
subset) is checked against this one byte for byte.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass

from agent.keystore.material import PROOF_BYTES
from agent.node import events as ev
from agent.node.reading import MAX_READING_BYTES, NONCE_BYTES, TAG_BYTES
from hal.errors import RemoteProtocolError
from hal.ids import TERMINAL_ID_MAX

VERSION = 1
HEAD = struct.Struct(">BBIQ")  # version, service, request id, counter
ANSWER_HEAD = struct.Struct(">BBIB")  # version, ACK/NAK, request id, service answered
ACK_REST = struct.Struct(">IQ")  # key version, value
NAK_REST = struct.Struct(">BQB")  # reason, counter, home length
MAC_BYTES = 16  # HMAC-SHA256 truncated, as DLMS/COSEM truncates its GMAC tags to 12..16
ACK_LABEL = b"edgekey/ack/v1"
KEY_VERSION_BYTES = 4
ACK = 0x81
NAK = 0x82
MAX_U32 = 0xFFFFFFFF
MAX_U64 = 0xFFFFFFFFFFFFFFFF
# The largest APDU either side sends: a READING with the biggest sealed reading.
MAX_APDU_BYTES = HEAD.size + NONCE_BYTES + MAX_READING_BYTES + TAG_BYTES


class Service(enum.IntEnum):
    """What a meter asks for (the request's byte 1)."""

    REGISTER = 0x01
    ROTATE = 0x02
    REVOKE = 0x03
    READING = 0x04


class Fault(enum.IntEnum):
    """The codec's own NAK reason codes (the node core's are ``Nak`` 1..17)."""

    BAD_APDU = 32  # wrong length or version
    UNKNOWN_SERVICE = 33
    NOT_A_REQUEST = 34  # an answer's direction, or an answer APDU where a request belongs
    BAD_ADDRESS = 35  # SA not a single address, or a CA that is not this terminal's


LINK_REASON_BASE = 64  # NAK reason = 64 + hal.dlt698.Reason for a frame the link layer refused

_FIXED_BODY = {
    Service.REGISTER: KEY_VERSION_BYTES + PROOF_BYTES,
    Service.ROTATE: PROOF_BYTES,
    Service.REVOKE: PROOF_BYTES,
}
_SEALED_MIN = NONCE_BYTES + TAG_BYTES
_SEALED_MAX = _SEALED_MIN + MAX_READING_BYTES


class ApduError(RemoteProtocolError):
    """A request APDU that cannot be taken; its NAK carries ``code``.

    ``request_id`` and ``service`` are what could be read (0 when not), so
    the NAK names the request the meter will recognise.
    """

    def __init__(self, code: int, detail: str, *, request_id: int = 0, service: int = 0):
        super().__init__(detail)
        self.code = code
        self.request_id = request_id
        self.service = service


MeterRequest = ev.RegisterRequest | ev.RotateRequest | ev.RevokeRequest | ev.ReadingRequest


def decode_request(meter_id: bytes, apdu: bytes) -> MeterRequest:
    """A meter's request APDU as the node core's event; ApduError when it is not one."""
    apdu = bytes(apdu)
    if len(apdu) < HEAD.size:
        rid = int.from_bytes(apdu[2:6], "big") if len(apdu) >= 6 else 0
        raise ApduError(Fault.BAD_APDU, f"APDU of {len(apdu)} bytes, shorter than the "
                        f"{HEAD.size}-byte request head", request_id=rid,
                        service=apdu[1] if len(apdu) > 1 else 0)
    version, service, rid, counter = HEAD.unpack_from(apdu)
    if service in (ACK, NAK):
        raise ApduError(Fault.NOT_A_REQUEST, "an answer APDU where a request belongs",
                        request_id=rid, service=service)
    if version != VERSION:
        raise ApduError(Fault.BAD_APDU, f"version {version}, expected {VERSION}",
                        request_id=rid, service=service)
    try:
        svc = Service(service)
    except ValueError:
        raise ApduError(Fault.UNKNOWN_SERVICE, f"unknown service 0x{service:02x}",
                        request_id=rid, service=service) from None
    body = apdu[HEAD.size:]
    if svc is Service.READING:
        if not _SEALED_MIN <= len(body) <= _SEALED_MAX:
            raise ApduError(Fault.BAD_APDU, f"sealed reading of {len(body)} bytes outside "
                            f"{_SEALED_MIN}..{_SEALED_MAX}", request_id=rid, service=service)
        return ev.ReadingRequest(meter_id, rid, counter, body)
    if len(body) != _FIXED_BODY[svc]:
        raise ApduError(Fault.BAD_APDU, f"{svc.name} body of {len(body)} bytes, expected "
                        f"{_FIXED_BODY[svc]}", request_id=rid, service=service)
    if svc is Service.REGISTER:
        version_ = int.from_bytes(body[:KEY_VERSION_BYTES], "big")
        return ev.RegisterRequest(meter_id, rid, counter, version_, body[KEY_VERSION_BYTES:])
    if svc is Service.ROTATE:
        return ev.RotateRequest(meter_id, rid, counter, body)
    return ev.RevokeRequest(meter_id, rid, counter, body)


def encode_request(request: MeterRequest) -> bytes:
    """The APDU a meter sends for ``request`` (the emulator and the benches use it)."""
    if isinstance(request, ev.RegisterRequest):
        svc, body = Service.REGISTER, request.key_version.to_bytes(4, "big") + request.wrapped_key
    elif isinstance(request, ev.RotateRequest):
        svc, body = Service.ROTATE, request.proof
    elif isinstance(request, ev.RevokeRequest):
        svc, body = Service.REVOKE, request.proof
    else:
        svc, body = Service.READING, request.sealed
    return HEAD.pack(VERSION, svc, request.request_id, request.counter) + body


_SERVICE_OF: dict[type, Service] = {
    ev.RegisterRequest: Service.REGISTER,
    ev.RotateRequest: Service.ROTATE,
    ev.RevokeRequest: Service.REVOKE,
    ev.ReadingRequest: Service.READING,
}


def service_of(request: MeterRequest) -> Service:
    return _SERVICE_OF[type(request)]


def ack_mac(key: bytes, meter_id: bytes, head: bytes) -> bytes:
    """The ACK's MAC: HMAC-SHA256 under the key in force, over label, meter id and head."""
    msg = ACK_LABEL + len(meter_id).to_bytes(1, "big") + meter_id + head
    return hmac.new(key, msg, hashlib.sha256).digest()[:MAC_BYTES]


def encode_ack(meter_id: bytes, request_id: int, service: Service, key_version: int,
               value: int, key: bytes) -> bytes:
    """An acknowledgement, authenticated under ``key`` (the key in force after the op)."""
    head = (ANSWER_HEAD.pack(VERSION, ACK, request_id, service)
            + ACK_REST.pack(key_version, value))
    return head + ack_mac(key, meter_id, head)


def encode_nak(request_id: int, service: int, reason: int, *, counter: int = 0,
               home: str = "") -> bytes:
    """A negative acknowledgement with its reason code."""
    home_b = home.encode("ascii")
    if len(home_b) > TERMINAL_ID_MAX:
        raise ValueError(f"home id of {len(home_b)} bytes")
    return (ANSWER_HEAD.pack(VERSION, NAK, request_id, service)
            + NAK_REST.pack(reason, counter, len(home_b)) + home_b)


@dataclass(frozen=True, slots=True)
class AckAnswer:
    request_id: int
    service: int
    key_version: int
    value: int
    mac: bytes
    head: bytes  # the MAC'd bytes

    def authentic(self, key: bytes, meter_id: bytes) -> bool:
        return hmac.compare_digest(self.mac, ack_mac(key, meter_id, self.head))


@dataclass(frozen=True, slots=True)
class NakAnswer:
    request_id: int
    service: int
    reason: int
    counter: int
    home: str


def decode_answer(apdu: bytes) -> AckAnswer | NakAnswer:
    """A terminal's answer APDU (what a meter reads); RemoteProtocolError when it is not one."""
    apdu = bytes(apdu)
    if len(apdu) < ANSWER_HEAD.size:
        raise RemoteProtocolError(f"answer of {len(apdu)} bytes")
    version, kind, rid, service = ANSWER_HEAD.unpack_from(apdu)
    if version != VERSION:
        raise RemoteProtocolError(f"answer version {version}")
    rest = apdu[ANSWER_HEAD.size:]
    if kind == ACK:
        if len(rest) != ACK_REST.size + MAC_BYTES:
            raise RemoteProtocolError(f"ACK of {len(apdu)} bytes")
        key_version, value = ACK_REST.unpack_from(rest)
        cut = ANSWER_HEAD.size + ACK_REST.size
        return AckAnswer(rid, service, key_version, value, apdu[cut:], apdu[:cut])
    if kind == NAK:
        if len(rest) < NAK_REST.size:
            raise RemoteProtocolError(f"NAK of {len(apdu)} bytes")
        reason, counter, n = NAK_REST.unpack_from(rest)
        home = rest[NAK_REST.size:]
        if len(home) != n or n > TERMINAL_ID_MAX or not home.isascii():
            raise RemoteProtocolError("NAK home field does not match its length")
        return NakAnswer(rid, service, reason, counter, home.decode("ascii"))
    raise RemoteProtocolError(f"answer kind 0x{kind:02x}")
