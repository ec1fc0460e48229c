"""What happens to a terminal: the node core's inputs, one frozen value each.

Meter requests arrive decoded from DL/T 698.45 frames (the runtime owns
the link), peer messages decoded from the network, ordered blocks after the
runtime appended them to flash, action results after the runtime carried
them out. Every event reaches ``Node.handle`` with the time it happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from agent.ledger.block import Block, Endorsement
from agent.ledger.rules import Changes, Reason
from agent.ledger.tx import Transaction


class Time(NamedTuple):
    """When an event is handled: monotonic seconds for timeouts, wall ms for block stamps."""

    mono: float
    wall_ms: int


# ------------------------------------------------------------ meter requests

@dataclass(frozen=True, slots=True)
class RegisterRequest:
    """A meter's first key (or a new key line after a revoke), wrapped under its factory key.

    ``wrapped_key`` is the new key AES-key-wrapped (RFC 3394) under the
    factory key the utility's provisioning gave this home terminal.
    """

    meter_id: bytes
    request_id: int
    counter: int
    key_version: int
    wrapped_key: bytes


@dataclass(frozen=True, slots=True)
class RotateRequest:
    """The paper's update: the new key wrapped under the current one."""

    meter_id: bytes
    request_id: int
    counter: int
    proof: bytes


@dataclass(frozen=True, slots=True)
class RevokeRequest:
    """The meter's empty-key request, proved under its current key (material.py)."""

    meter_id: bytes
    request_id: int
    counter: int
    proof: bytes


@dataclass(frozen=True, slots=True)
class ReadingRequest:
    """A meter reading sealed under the meter's current key (AES-GCM, see reading.py)."""

    meter_id: bytes
    request_id: int
    counter: int  # the meter's invocation counter for readings
    sealed: bytes  # nonce 12 | ciphertext | tag 16


MeterRequest = RegisterRequest | RotateRequest | RevokeRequest | ReadingRequest


# --------------------------------------------------------- operator requests

@dataclass(frozen=True, slots=True)
class OperatorRevoke:
    """An operator's revoke (a stolen meter): proposed by the home with a zero proof."""

    meter_id: bytes
    request_id: int


@dataclass(frozen=True, slots=True)
class MigrateRequest:
    """Re-home a meter this terminal holds (placement's decision or the station's re-plan)."""

    meter_id: bytes
    request_id: int
    new_home: str


@dataclass(frozen=True, slots=True)
class AddRequest:
    """An operator adds ``terminal`` with Ed25519 key ``public_key`` (TERMINAL_ADD).

    It counts from the next block: the majority is of the larger membership,
    and its endorsements and messages are accepted. The utility must have
    ordered it (its provisioning lists the terminal with that key), or the
    endorsers refuse it (``NodeConfig.authorise_member``)."""

    terminal: str
    public_key: bytes
    request_id: int


@dataclass(frozen=True, slots=True)
class RetireRequest:
    """An operator retires ``terminal`` from the membership (TERMINAL_RETIRE on the chain).

    From the next block its endorsements no longer count, the majority is of
    the terminals left, and its messages are refused; its meters are taken
    over by their new homes (MIGRATE by the new home is allowed once the old
    one is retired)."""

    terminal: str
    request_id: int


@dataclass(frozen=True, slots=True)
class QueryRequest:
    """Where is the meter's key, and which is it (paper, section 2.2.1, step 2)."""

    meter_id: bytes
    request_id: int


# -------------------------------------------------------------- from peers

@dataclass(frozen=True, slots=True)
class EndorseRequest:
    """A peer proposes ``block`` and asks this terminal to endorse it."""

    peer: str
    block: Block


@dataclass(frozen=True, slots=True)
class EndorsementReceived:
    """A peer signed the block this terminal proposed at ``height``."""

    peer: str
    height: int
    block_hash: bytes
    endorsement: Endorsement


@dataclass(frozen=True, slots=True)
class EndorsementRefused:
    """A peer would not sign this terminal's proposal; ``reason`` is its rule's code."""

    peer: str
    height: int
    block_hash: bytes
    reason: Reason


@dataclass(frozen=True, slots=True)
class TxsForwarded:
    """A peer's checked, signed transactions for the block this terminal proposes next."""

    peer: str
    txs: tuple[Transaction, ...]


@dataclass(frozen=True, slots=True)
class ForwardRefused:
    """The proposer dropped a transaction this terminal forwarded: ``reason`` at its ``height``."""

    peer: str
    tx_id: bytes
    reason: Reason
    height: int


@dataclass(frozen=True, slots=True)
class KeyReceived:
    """A meter's key handed over by its old home, opened by the runtime (transport.py)."""

    peer: str
    meter_id: bytes
    key_version: int
    key: bytes

    def __repr__(self) -> str:  # never print key material
        return (f"KeyReceived(peer={self.peer!r}, meter_id={self.meter_id.hex()}, "
                f"key_version={self.key_version})")


@dataclass(frozen=True, slots=True)
class KeyAcknowledged:
    """The new home stored the key this terminal handed over: this copy may go."""

    peer: str
    meter_id: bytes
    key_version: int


# ------------------------------------------------------ from the ordering

@dataclass(frozen=True, slots=True)
class ProposerChanged:
    """The fleet's block proposer, elected through the ordering (None: every terminal proposes).

    One proposer batches every terminal's operations into its blocks, so no
    endorsement round is lost to a race for the head; the others forward.
    """

    proposer: str | None


@dataclass(frozen=True, slots=True)
class BlockCommitted:
    """An ordered block the runtime validated and appended to flash (``Chain.append``)."""

    block: Block
    changes: Changes


@dataclass(frozen=True, slots=True)
class BlockRefused:
    """The block this terminal submitted did not commit (lost the head, or refused)."""

    height: int
    block_hash: bytes
    detail: str


# ---------------------------------------------------- results of actions

@dataclass(frozen=True, slots=True)
class KeyStored:
    meter_id: bytes
    key_version: int


@dataclass(frozen=True, slots=True)
class KeyErased:
    meter_id: bytes


@dataclass(frozen=True, slots=True)
class EffectFailed:
    """A key-store action failed (flash full, I/O error); ``detail`` says how."""

    meter_id: bytes
    detail: str


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: timeouts, batching."""


Event = (RegisterRequest | RotateRequest | RevokeRequest | ReadingRequest | OperatorRevoke
         | MigrateRequest | RetireRequest | AddRequest | QueryRequest | EndorseRequest
         | EndorsementReceived
         | EndorsementRefused | TxsForwarded | ForwardRefused | ProposerChanged | KeyReceived
         | KeyAcknowledged | BlockCommitted | BlockRefused
         | KeyStored | KeyErased | EffectFailed | Tick)
