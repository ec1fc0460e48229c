"""Meter readings sealed under the meter's current key: AES-GCM with an invocation counter.

    sealed := nonce 12 | AES-256-GCM(key, reading, AAD) (ciphertext | tag 16)
    AAD    := b"edgekey/reading/v1" | len8 meter id | meter id | key version u32 | counter u64

The AAD binds a reading to its meter, the key version and the counter, so
a reading replayed (counter not above the last), sealed under a superseded
key or tampered with is caught (DLMS/COSEM's invocation counter, IEC
62056-5-3 9.2.7). Pure functions: the node core keeps the counters.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

READING_LABEL = b"edgekey/reading/v1"
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_READING_BYTES = 512  # a DL/T 698.45 APDU of meter data fits well inside


class BadReading(ValueError):
    """The sealed reading does not open: wrong key, meter, version or counter, or tampered."""


def reading_aad(meter_id: bytes, key_version: int, counter: int) -> bytes:
    return (READING_LABEL + len(meter_id).to_bytes(1, "big") + meter_id
            + key_version.to_bytes(4, "big") + counter.to_bytes(8, "big"))


def seal_reading(key: bytes, nonce: bytes, reading: bytes, *, meter_id: bytes,
                 key_version: int, counter: int) -> bytes:
    """What a meter sends (the meter side of the emulator calls this)."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    if len(reading) > MAX_READING_BYTES:
        raise ValueError(f"a reading is at most {MAX_READING_BYTES} bytes")
    return nonce + AESGCM(key).encrypt(nonce, reading,
                                       reading_aad(meter_id, key_version, counter))


def open_reading(key: bytes, sealed: bytes, *, meter_id: bytes, key_version: int,
                 counter: int) -> bytes:
    """The reading, or BadReading."""
    if not NONCE_BYTES + TAG_BYTES <= len(sealed) <= NONCE_BYTES + TAG_BYTES + MAX_READING_BYTES:
        raise BadReading(f"sealed reading of {len(sealed)} bytes")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:],
                                   reading_aad(meter_id, key_version, counter))
    except InvalidTag:
        raise BadReading("does not authenticate under the meter's current key") from None
