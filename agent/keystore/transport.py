"""Key export wrapped to an authorised requester's X25519 public key.

A meter key leaves its home terminal only inside an envelope that one
requester (the master station or another terminal) can open. The scheme is
ECIES-shaped, the same steps as HPKE's base mode (RFC 9180 4.1, 5.1):

- a fresh ephemeral X25519 key pair (RFC 7748 5) agrees a shared secret with
  the requester's public key;
- HKDF-SHA256 (RFC 5869) with a random 16-byte salt derives a 32-byte
  AES-256-GCM key and its 12-byte nonce (fresh per envelope, so the nonce is
  never reused under one key); info binds the label
  b"edgekey/key-transport/v1", the meter id, key version, requester id and
  both public keys (RFC 9180 binds the KEM context the same way);
- AES-256-GCM seals the key with the whole envelope header (the same
  binding, plus the salt) as associated data.

Envelope v1, little-endian, one encoding per value (lengths exact, reserved
bytes zero, no trailing bytes):

    magic b"EKTE" | version u8 | meter id length u8 (1..16) |
    requester id length u8 (1..32) | reserved u8 = 0 | key version u32 |
    meter id | requester id | recipient public key 32 | ephemeral public key 32 |
    salt 16 | sealed key 48 (32 key + 16 GCM tag)

The recipient's public key travels in clear so a terminal holding the wrong
private key says WRONG_RECIPIENT instead of TAMPERED.

Authorisation is the caller's explicit ``AllowList`` (requester id ->
X25519 public key); sealing to anyone else raises ``NotAuthorisedError``.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.keystore.material import KEY_BYTES, Entropy, check_key
from hal.errors import RemoteProtocolError
from hal.ids import METER_ID_MAX, METER_ID_MIN, TERMINAL_ID_MAX, MeterId

TRANSPORT_LABEL = b"edgekey/key-transport/v1"
MAGIC = b"EKTE"
ENVELOPE_VERSION = 1
# A requester is a terminal (its id's cap) or the master station, whose id is
# opaque bytes under the same cap: not a TerminalId, so only the length is checked.
MAX_REQUESTER_ID = TERMINAL_ID_MAX
PUBLIC_BYTES = 32  # X25519, RFC 7748 5
SALT_BYTES = 16
NONCE_BYTES = 12  # AES-GCM's 96-bit IV
TAG_BYTES = 16
SEALED_BYTES = KEY_BYTES + TAG_BYTES
MAX_KEY_VERSION = 0xFFFF_FFFF

_HEAD = struct.Struct("<4sBBBBI")  # magic, version, meter id len, requester id len, rsvd, key ver
_FIXED_TAIL = 2 * PUBLIC_BYTES + SALT_BYTES + SEALED_BYTES
MIN_ENVELOPE = _HEAD.size + 1 + 1 + _FIXED_TAIL
MAX_ENVELOPE = _HEAD.size + METER_ID_MAX + MAX_REQUESTER_ID + _FIXED_TAIL


class TransportFault(enum.Enum):
    """Why an envelope was refused."""

    BAD_ENCODING = "bad encoding"
    WRONG_RECIPIENT = "sealed to another recipient"
    BINDING_MISMATCH = "meter, key version or requester differ from what was asked for"
    TAMPERED = "authentication failed: the envelope was altered"


class TransportError(RemoteProtocolError):
    """An envelope that cannot be opened, with the reason (``fault``): the sender's doing.

    A ValueError (through RemoteProtocolError), as it always was.
    """

    def __init__(self, fault: TransportFault, detail: str = ""):
        self.fault = fault
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"key envelope refused: {fault.value}{suffix}")


class NotAuthorisedError(PermissionError):
    """The requester is not on the allow-list: no key is exported to it."""


def public_bytes(key: X25519PublicKey | X25519PrivateKey) -> bytes:
    """The 32-byte raw form of an X25519 public key (or of a private key's public half)."""
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _check_requester_id(value: bytes) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise TypeError(f"requester id must be bytes, not {type(value).__name__}")
    if not 1 <= len(value) <= MAX_REQUESTER_ID:
        raise ValueError(f"requester id must be 1..{MAX_REQUESTER_ID} bytes, got {len(value)}")
    return bytes(value)


def _check_version(version: int) -> int:
    if not isinstance(version, int) or isinstance(version, bool):
        raise TypeError(f"key version must be an int, not {type(version).__name__}")
    if not 0 <= version <= MAX_KEY_VERSION:
        raise ValueError(f"key version {version} is outside 0..{MAX_KEY_VERSION}")
    return version


class AllowList:
    """Who may receive exported keys: requester id -> X25519 public key, given by the caller."""

    def __init__(self, entries: Mapping[bytes, X25519PublicKey | bytes]):
        self._keys: dict[bytes, X25519PublicKey] = {}
        for rid, key in entries.items():
            rid = _check_requester_id(rid)
            if isinstance(key, bytes | bytearray):
                if len(key) != PUBLIC_BYTES:
                    raise ValueError(f"public key of {rid!r} must be {PUBLIC_BYTES} bytes")
                key = X25519PublicKey.from_public_bytes(bytes(key))
            if not isinstance(key, X25519PublicKey):
                raise TypeError(f"public key of {rid!r} must be X25519, not {type(key).__name__}")
            self._keys[rid] = key

    def public_key(self, requester_id: bytes) -> X25519PublicKey:
        try:
            return self._keys[bytes(requester_id)]
        except KeyError:
            raise NotAuthorisedError(
                f"requester {bytes(requester_id)!r} is not on the export allow-list") from None

    def __contains__(self, requester_id: object) -> bool:
        return isinstance(requester_id, bytes) and requester_id in self._keys

    def __iter__(self) -> Iterator[bytes]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True)
class Envelope:
    """One exported key as it travels; ``sealed`` is AES-256-GCM ciphertext and tag."""

    meter_id: bytes
    key_version: int
    requester_id: bytes
    recipient_public: bytes
    ephemeral_public: bytes
    salt: bytes
    sealed: bytes

    def __post_init__(self) -> None:
        MeterId(self.meter_id)  # MeterIdError (a ValueError) if it is not one
        _check_version(self.key_version)
        _check_requester_id(self.requester_id)
        for name, size in (("recipient_public", PUBLIC_BYTES), ("ephemeral_public", PUBLIC_BYTES),
                           ("salt", SALT_BYTES), ("sealed", SEALED_BYTES)):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise ValueError(f"envelope {name} must be {size} bytes")

    def header(self) -> bytes:
        """Everything before the sealed key: the binding, authenticated as associated data."""
        return b"".join((
            _HEAD.pack(MAGIC, ENVELOPE_VERSION, len(self.meter_id), len(self.requester_id), 0,
                       self.key_version),
            self.meter_id, self.requester_id, self.recipient_public, self.ephemeral_public,
            self.salt))


def encode_envelope(env: Envelope) -> bytes:
    return env.header() + env.sealed


def decode_envelope(data: bytes) -> Envelope:
    """The envelope in ``data``; TransportError(BAD_ENCODING) naming the field otherwise."""
    data = bytes(data)

    def bad(field: str, offset: int, why: str) -> TransportError:
        return TransportError(TransportFault.BAD_ENCODING, f"{field} at byte {offset}: {why}")

    if len(data) < _HEAD.size:
        raise bad("header", 0, f"{len(data)} bytes, need at least {_HEAD.size}")
    magic, version, mlen, rlen, rsvd, key_version = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise bad("magic", 0, f"{magic!r} is not {MAGIC!r}")
    if version != ENVELOPE_VERSION:
        raise bad("version", 4, f"{version} is not {ENVELOPE_VERSION}")
    if not METER_ID_MIN <= mlen <= METER_ID_MAX:
        raise bad("meter id length", 5, f"{mlen} outside {METER_ID_MIN}..{METER_ID_MAX}")
    if not 1 <= rlen <= MAX_REQUESTER_ID:
        raise bad("requester id length", 6, f"{rlen} outside 1..{MAX_REQUESTER_ID}")
    if rsvd:
        raise bad("reserved", 7, "must be zero")
    expected = _HEAD.size + mlen + rlen + _FIXED_TAIL
    if len(data) != expected:
        raise bad("length", len(data), f"envelope is {len(data)} bytes, its header says "
                                       f"{expected}")
    fields = []
    pos = _HEAD.size
    for size in (mlen, rlen, PUBLIC_BYTES, PUBLIC_BYTES, SALT_BYTES, SEALED_BYTES):
        fields.append(data[pos:pos + size])
        pos += size
    mid, rid, recipient, ephemeral, salt, sealed = fields
    return Envelope(MeterId(mid), key_version, rid, recipient, ephemeral, salt, sealed)


def _derive(shared: bytes, env: Envelope) -> tuple[AESGCM, bytes, bytes]:
    """(cipher, nonce, associated data) for ``env`` from the X25519 shared secret."""
    header = env.header()
    info = TRANSPORT_LABEL + header[:-SALT_BYTES]  # binding + both public keys
    okm = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES + NONCE_BYTES, salt=env.salt,
               info=info).derive(shared)
    return AESGCM(okm[:KEY_BYTES]), okm[KEY_BYTES:], TRANSPORT_LABEL + header


def seal_envelope(key: bytes, *, meter_id: bytes, key_version: int, requester_id: bytes,
                  allow_list: AllowList, entropy: Entropy = os.urandom) -> bytes:
    """``key`` wrapped to ``requester_id``'s public key; NotAuthorisedError if not allowed."""
    key = check_key(key)
    recipient = allow_list.public_key(requester_id)
    ephemeral = X25519PrivateKey.from_private_bytes(_take(entropy, PUBLIC_BYTES))
    salt = _take(entropy, SALT_BYTES)
    env = Envelope(MeterId(meter_id), key_version, bytes(requester_id), public_bytes(recipient),
                   public_bytes(ephemeral), salt, bytes(SEALED_BYTES))
    cipher, nonce, aad = _derive(ephemeral.exchange(recipient), env)
    sealed = cipher.encrypt(nonce, key, aad)
    return env.header() + sealed


def open_envelope(private_key: X25519PrivateKey, envelope: bytes, *, meter_id: bytes,
                  key_version: int, requester_id: bytes) -> bytes:
    """The key inside ``envelope``, if it was sealed to ``private_key`` for what was asked.

    Checks in order: encoding (BAD_ENCODING), recipient (WRONG_RECIPIENT),
    binding against the expected meter, version and requester
    (BINDING_MISMATCH), then authentication (TAMPERED).
    """
    env = decode_envelope(envelope)
    if env.recipient_public != public_bytes(private_key):
        raise TransportError(TransportFault.WRONG_RECIPIENT)
    asked = (MeterId(meter_id), key_version, bytes(requester_id))
    got = (env.meter_id, env.key_version, env.requester_id)
    if got != asked:
        names = ("meter id", "key version", "requester id")
        detail = ", ".join(f"{n} {g!r} not {a!r}" for n, g, a in zip(names, got, asked, strict=True)
                           if g != a)
        raise TransportError(TransportFault.BINDING_MISMATCH, detail)
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(env.ephemeral_public))
    except ValueError:  # a low-order point gives the all-zero secret (RFC 7748 6.1)
        raise TransportError(TransportFault.TAMPERED,
                             "ephemeral key is a low-order point") from None
    cipher, nonce, aad = _derive(shared, env)
    try:
        return cipher.decrypt(nonce, env.sealed, aad)
    except InvalidTag:
        raise TransportError(TransportFault.TAMPERED) from None


def _take(entropy: Entropy, n: int) -> bytes:
    out = entropy(n)
    if len(out) != n:
        raise ValueError(f"entropy source returned {len(out)} bytes, asked for {n}")
    return bytes(out)
