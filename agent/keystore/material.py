"""Meter key material: data keys, fingerprints and rotation proofs (paper, section 2.2.1).

A meter's data key is a 32-byte AES-256-GCM key. What leaves the home
terminal about it is never the key:

- ``fingerprint(key)``: SHA-256 over a domain label and the key; the ledger
  records it (agent/ledger uses exactly this construction).
- a rotation proof: the paper's "update" step has the meter send its new key
  "signed with the old one"; here the new key is wrapped under the old with
  AES key wrap (RFC 3394), whose integrity check (RFC 3394 2.2.3) proves the
  sender held the old key. The chain carries only ``proof_digest(proof)``:
  anyone with a stolen old key could unwrap the new key from the proof itself.
- revocation is the paper's "empty key": no new key material at all. A meter
  that revokes its own key proves possession of the old key by wrapping a
  fixed, public marker instead of a key (``make_revocation_proof``).

Pure functions: bytes in, bytes out; randomness comes from an injected
``entropy`` callable (``os.urandom`` by default) so tests are repeatable.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from agent.ledger.tx import rotation_proof_digest

Entropy = Callable[[int], bytes]

KEY_BYTES = 32  # AES-256
PROOF_BYTES = KEY_BYTES + 8  # RFC 3394 2.2.1: n 64-bit blocks wrap to n + 1
DIGEST_BYTES = 32  # SHA-256

FINGERPRINT_LABEL = b"edgekey/key-fingerprint/v1"
_REVOCATION_LABEL = b"edgekey/revocation/v1"


class ProofFault(enum.Enum):
    """Why a rotation proof was refused."""

    WRONG_LENGTH = "wrong length"
    UNWRAP_FAILED = "integrity check failed: wrong old key or tampered proof"
    REVOCATION = "the proof revokes the key; it carries no new key"
    KEY_UNCHANGED = "the new key equals the old key"
    KEY_REUSED = "the new key is one this meter held before"


class BadProofError(ValueError):
    """A rotation proof that does not open under the old key to a new key."""

    def __init__(self, fault: ProofFault, detail: str = ""):
        self.fault = fault
        super().__init__(f"bad rotation proof: {fault.value}" + (f" ({detail})" if detail else ""))


def _sha256(*parts: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    for p in parts:
        h.update(p)
    return h.finalize()


# The "empty key" (paper, revoke): a public constant, so it can never be a meter's key.
REVOCATION_MARKER = _sha256(_REVOCATION_LABEL)


def check_key(key: bytes, what: str = "key") -> bytes:
    """``key`` as bytes if it is a 32-byte data key; raises ValueError otherwise."""
    if not isinstance(key, bytes | bytearray | memoryview):
        raise TypeError(f"{what} must be bytes, not {type(key).__name__}")
    key = bytes(key)
    if len(key) != KEY_BYTES:
        raise ValueError(f"{what} must be {KEY_BYTES} bytes, got {len(key)}")
    return key


def new_key(entropy: Entropy = os.urandom) -> bytes:
    """A fresh AES-256-GCM data key from ``entropy`` (the terminal's CSPRNG by default)."""
    key = entropy(KEY_BYTES)
    if len(key) != KEY_BYTES:
        raise ValueError(f"entropy source returned {len(key)} bytes, asked for {KEY_BYTES}")
    if key == REVOCATION_MARKER:  # probability 2^-256; refuse rather than reason about it
        raise ValueError("entropy source returned the revocation marker")
    return bytes(key)


def fingerprint(key: bytes) -> bytes:
    """SHA-256(b"edgekey/key-fingerprint/v1" + key): names a key on the chain without it."""
    return _sha256(FINGERPRINT_LABEL, check_key(key))


def make_rotation_proof(old_key: bytes, new_key: bytes) -> bytes:
    """The new key wrapped under the old one (RFC 3394 2.2.1); 40 bytes."""
    old, new = check_key(old_key, "old key"), check_key(new_key, "new key")
    if old == new:
        raise ValueError("a rotation must change the key")
    if new == REVOCATION_MARKER:
        raise ValueError("the revocation marker cannot be a key; use make_revocation_proof")
    return aes_key_wrap(old, new)


def make_revocation_proof(old_key: bytes) -> bytes:
    """The paper's "empty key" for the update path: the marker wrapped under the old key."""
    return aes_key_wrap(check_key(old_key, "old key"), REVOCATION_MARKER)


def _unwrap(old_key: bytes, proof: bytes) -> bytes:
    old = check_key(old_key, "old key")
    if len(proof) != PROOF_BYTES:
        raise BadProofError(ProofFault.WRONG_LENGTH, f"{len(proof)} bytes, expected {PROOF_BYTES}")
    try:
        return aes_key_unwrap(old, bytes(proof))
    except InvalidUnwrap:
        raise BadProofError(ProofFault.UNWRAP_FAILED) from None


def open_rotation_proof(old_key: bytes, proof: bytes) -> bytes:
    """The new key inside ``proof``; BadProofError if it does not open under ``old_key``.

    RFC 3394's check cannot tell a wrong old key from a tampered proof, so
    both are UNWRAP_FAILED. A valid revocation proof is refused here too:
    it holds no key.
    """
    new = _unwrap(old_key, proof)
    if new == REVOCATION_MARKER:
        raise BadProofError(ProofFault.REVOCATION)
    if new == bytes(old_key):
        raise BadProofError(ProofFault.KEY_UNCHANGED)
    return new


def is_revocation_proof(old_key: bytes, proof: bytes) -> bool:
    """True only for the revocation marker wrapped under ``old_key``; never raises on the proof."""
    try:
        return _unwrap(old_key, proof) == REVOCATION_MARKER
    except BadProofError:
        return False


def proof_digest(proof: bytes) -> bytes:
    """What the ledger carries for the proof: the chain's own construction (ledger/tx.py)."""
    return rotation_proof_digest(bytes(proof))
