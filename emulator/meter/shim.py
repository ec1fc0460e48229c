"""The CPython platform under an emulated meter: ``cryptography``, ``hmac``, the OS's randomness.

``emulator/meter/meter.py`` runs on MicroPython and so imports no crypto;
this ``Shim`` gives it the primitives the terminal checks against (the same
calls ``agent/keystore/material.py`` and ``agent/node/reading.py`` make).
A seeded shim (``seed``) draws keys and nonces from a deterministic stream
instead, so a test or an emulation run can be repeated; never on a meter.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from emulator.meter.meter import Shim

log = logging.getLogger("emulator.meter")


class CPythonShim(Shim):
    """AES key wrap and AES-GCM from ``cryptography``, HMAC-SHA256 from the stdlib.

    ``seed``: None takes randomness from ``os.urandom``; an int makes it a
    SHA-256 counter stream over the seed (repeatable, for tests and runs).
    """

    def __init__(self, seed: int | None = None, answers: Any = None):
        self._seed = None if seed is None else hashlib.sha256(b"edgekey/meter-shim/%d" % seed)
        self.answers = answers  # a text file: one JSON line per answer (``answered``)
        self._drawn = 0
        self._t0 = time.monotonic()

    def key_wrap(self, kek: bytes, key: bytes) -> bytes:
        return aes_key_wrap(kek, key)

    def gcm_seal(self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return AESGCM(key).encrypt(nonce, plaintext, aad)

    def hmac_sha256(self, key: bytes, msg: bytes) -> bytes:
        return hmac.new(key, msg, hashlib.sha256).digest()

    def sha256(self, data: bytes) -> bytes:
        return hashlib.sha256(data).digest()

    def random_bytes(self, n: int) -> bytes:
        if self._seed is None:
            return os.urandom(n)
        out = bytearray()
        while len(out) < n:
            block = self._seed.copy()
            block.update(self._drawn.to_bytes(8, "big"))
            self._drawn += 1
            out += block.digest()
        return bytes(out[:n])

    def ticks_ms(self) -> int:
        """Milliseconds since this shim was made (monotonic, never wraps)."""
        return int((time.monotonic() - self._t0) * 1000)

    def answered(self, meter_id: bytes, service: str, outcome: str, latency_ms: int) -> None:
        if self.answers is not None:
            self.answers.write(json.dumps({"t": round(time.time(), 3), "meter": meter_id.hex(),
                                           "op": service, "outcome": outcome,
                                           "latency_ms": latency_ms}) + "\n")

    def log(self, meter_id: bytes, event: str, detail: str) -> None:
        log.info("meter %s %s: %s", meter_id.hex(), event, detail)
