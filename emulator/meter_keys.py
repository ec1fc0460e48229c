"""The key side of an emulated meter: what a meter sends for register, rotate, revoke, readings.

A meter keeps its factory key, its current key and version, and two
counters: one for key operations (it becomes the ledger's per-meter
counter, so a replayed request is refused by the chain's rule) and one for
readings (the invocation counter). Requests are the node core's events;
the DL/T 698.45 framing around them belongs to the link layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from agent.keystore.material import (
    Entropy,
    make_revocation_proof,
    make_rotation_proof,
    new_key,
)
from agent.node import events as ev
from agent.node.actions import Acknowledge, Nak, Refuse
from agent.node.reading import seal_reading


@dataclass
class MeterKeys:
    """One meter's keys and counters (``entropy`` fixed in tests for repeatable keys)."""

    meter_id: bytes
    factory_key: bytes
    entropy: Entropy = os.urandom
    key: bytes | None = None
    key_version: int = 0
    counter: int = 0
    reading_counter: int = 0
    requests: int = 0
    pending: bytes | None = field(default=None, repr=False)  # a new key not yet acknowledged

    def _next(self) -> tuple[int, int]:
        self.counter += 1
        self.requests += 1
        return self.requests, self.counter

    def register(self) -> ev.RegisterRequest:
        """First registration, or a new key line after a revoke: the key under the factory key."""
        self.pending = new_key(self.entropy)
        rid, counter = self._next()
        return ev.RegisterRequest(self.meter_id, rid, counter, self.key_version + 1,
                                  make_rotation_proof(self.factory_key, self.pending))

    def rotate(self) -> ev.RotateRequest:
        if self.key is None:
            raise ValueError("a meter without a key registers first")
        self.pending = new_key(self.entropy)
        rid, counter = self._next()
        return ev.RotateRequest(self.meter_id, rid, counter,
                                make_rotation_proof(self.key, self.pending))

    def revoke(self) -> ev.RevokeRequest:
        if self.key is None:
            raise ValueError("a meter without a key has nothing to revoke")
        rid, counter = self._next()
        return ev.RevokeRequest(self.meter_id, rid, counter, make_revocation_proof(self.key))

    def reading(self, data: bytes) -> ev.ReadingRequest:
        if self.key is None:
            raise ValueError("a meter without a key cannot seal a reading")
        self.reading_counter += 1
        self.requests += 1
        sealed = seal_reading(self.key, self.entropy(12), data, meter_id=self.meter_id,
                              key_version=self.key_version, counter=self.reading_counter)
        return ev.ReadingRequest(self.meter_id, self.requests, self.reading_counter, sealed)

    def acknowledged(self, key_version: int) -> None:
        """The home acknowledged a register or rotate: the new key is in force."""
        if self.pending is not None:
            self.key, self.pending = self.pending, None
        self.key_version = key_version

    def heard(self, request: ev.Event, reply: Acknowledge | Refuse) -> None:
        """Take the home's answer to ``request``: a new key, a revoke, or a counter to skip to."""
        if isinstance(reply, Acknowledge):
            if isinstance(request, ev.RevokeRequest):
                self.revoked()
            elif isinstance(request, ev.RegisterRequest | ev.RotateRequest):
                self.acknowledged(reply.key_version)
        elif isinstance(reply, Refuse) and reply.reason is Nak.REPLAYED and reply.counter:
            self.resync(reply.counter)

    def resync(self, counter_in_force: int) -> None:
        """A REPLAYED refusal names the chain's counter (a migration consumed one): go above it."""
        self.counter = max(self.counter, counter_in_force)
        self.pending = None

    def revoked(self) -> None:
        self.key, self.pending = None, None
