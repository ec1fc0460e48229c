"""A terminal's Ed25519 identity (RFC 8032), through ``cryptography``.

Everything the ledger signs starts with a domain prefix, so a signature made
for one purpose can never be replayed as another: a transaction signature is
over ``DOMAIN_TX + encoding``, an endorsement over ``DOMAIN_ENDORSE +
header_hash``. The prefixes are applied in ``tx.py`` and ``block.py``; this
module signs and checks bytes.

Ed25519 signing is deterministic (RFC 8032 section 5.1.6) and OpenSSL
rejects non-canonical S (section 5.1.7 step 1), so one message has one
signature per key: transaction ids that include the signature are stable.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.ledger.codec import PUBLIC_KEY_LEN, SIGNATURE_LEN
from hal.ids import TerminalId

DOMAIN_TX = b"edgekey/tx/v1"
DOMAIN_ENDORSE = b"edgekey/endorse/v1"

SEED_LEN = 32  # an Ed25519 private key is its 32-byte seed (RFC 8032 section 5.1.5)


class TerminalIdentity:
    """A terminal id and its private key; hands out signatures, never the key."""

    __slots__ = ("_key", "_public", "terminal_id")

    def __init__(self, terminal_id: str, private_key: Ed25519PrivateKey) -> None:
        self.terminal_id = TerminalId(terminal_id)  # TerminalIdError (a ValueError) if not one
        self._key = private_key
        self._public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls, terminal_id: str) -> TerminalIdentity:
        """A fresh key from the OS entropy source (OpenSSL's RAND)."""
        return cls(terminal_id, Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, terminal_id: str, seed: bytes) -> TerminalIdentity:
        """A key from its 32-byte seed: for keys kept in the key store, and fixed test keys."""
        if len(seed) != SEED_LEN:
            raise ValueError(f"an Ed25519 seed is {SEED_LEN} bytes, got {len(seed)}")
        return cls(terminal_id, Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data`` (callers add the domain prefix)."""
        return self._key.sign(bytes(data))

    def public_bytes(self) -> bytes:
        """The 32-byte raw public key, as carried by TERMINAL_ADD."""
        return self._public

    def __repr__(self) -> str:
        return f"TerminalIdentity({self.terminal_id!r}, public={self._public.hex()[:16]}...)"


def load_public_key(public_bytes: bytes) -> Ed25519PublicKey | None:
    """The key object for raw bytes, or None when they are not a 32-byte key."""
    if not isinstance(public_bytes, bytes | bytearray) or len(public_bytes) != PUBLIC_KEY_LEN:
        return None
    try:
        return Ed25519PublicKey.from_public_bytes(bytes(public_bytes))
    except ValueError:
        return None


def verify_signature(public: bytes | Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is ``public``'s signature of ``data``; never raises on garbage.

    ``public`` may be the raw 32 bytes or an already loaded key (the ledger
    state keeps loaded keys so a block's checks do not re-parse them).
    """
    key = public if isinstance(public, Ed25519PublicKey) else load_public_key(public)
    if key is None:
        return False
    if not isinstance(signature, bytes | bytearray) or len(signature) != SIGNATURE_LEN:
        return False
    if not isinstance(data, bytes | bytearray | memoryview):
        return False
    try:
        key.verify(bytes(signature), bytes(data))
    except (InvalidSignature, ValueError):
        return False
    return True
