"""What the node core asks its runtime to do, one frozen value each.

The runtime carries actions out in the order given and reports the results
of key-store actions back as events (``KeyStored``, ``KeyErased``,
``EffectFailed``), so a meter is acknowledged only once its key is durable.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.keystore.store import PreparedKey
from agent.ledger.block import Block, Endorsement
from agent.ledger.rules import Reason
from agent.ledger.tx import Transaction


class Nak(enum.IntEnum):
    """Why a meter's (or an operator's) request was refused. Stable wire codes."""

    BAD_REQUEST = 1  # a field out of range, or a request this terminal cannot take
    BAD_PROOF = 2  # the wrap does not open under the key in force (or the factory key)
    KEY_REUSED = 3  # the new key is one this meter held before
    UNKNOWN_METER = 4
    NOT_HOME = 5  # the meter is homed on another terminal (``home`` names it)
    REVOKED = 6
    REPLAYED = 7  # the counter is not above the chain's (``counter`` gives the one in force)
    STALE_VERSION = 8
    BUSY = 9  # another operation of this meter is in flight
    TIMEOUT = 10  # no majority endorsed it, or the ordering did not return it, in time
    LEDGER_REFUSED = 11  # the ledger's rules refused it (``ledger_reason``)
    NO_FACTORY_KEY = 12  # no provisioning record for this meter
    STORE_FAILED = 13  # the key store could not keep the key (full, flash error)
    OVERLOADED = 14  # the bounded queue of operations is full
    KEY_PENDING = 15  # the chain holds a newer key this terminal has not received yet
    BAD_READING = 16  # the reading does not authenticate under the key in force
    REPLAYED_READING = 17  # the reading's invocation counter is not above the last one


class Op(enum.Enum):
    """What a reply answers."""

    REGISTER = "register"
    ROTATE = "rotate"
    REVOKE = "revoke"
    MIGRATE = "migrate"
    READING = "reading"
    QUERY = "query"
    RETIRE = "retire"  # a terminal leaves the membership (an operator's request)
    ADD = "add"  # a terminal joins the membership (an operator's request)


@dataclass(frozen=True, slots=True)
class Acknowledge:
    """The operation is done: committed at ``height`` and its key-store effect durable."""

    meter_id: bytes
    request_id: int
    op: Op
    key_version: int
    height: int | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    """A negative acknowledgement with its reason code (and what helps the requester)."""

    meter_id: bytes
    request_id: int
    op: Op
    reason: Nak
    detail: str = ""
    ledger_reason: Reason | None = None
    home: str | None = None
    counter: int | None = None


@dataclass(frozen=True, slots=True)
class AcceptReading:
    """A reading that authenticated under the meter's current key; ``sealed`` is what the
    meter sent, kept for the master station to open end to end with its own copy of the
    key (``key_version``)."""

    meter_id: bytes
    request_id: int
    counter: int
    plaintext: bytes
    key_version: int = 0
    sealed: bytes = b""


@dataclass(frozen=True, slots=True)
class AnswerQuery:
    """The index's answer (agent/ledger/query.py's four kinds); no key material here."""

    meter_id: bytes
    request_id: int
    answer: str  # "local", "remote", "revoked", "unknown"
    home: str | None = None
    key_version: int | None = None
    fingerprint: bytes | None = None
    height: int | None = None


@dataclass(frozen=True, slots=True)
class RequestEndorsements:
    """Send ``block`` to ``peers`` for their endorsement (along the router's paths)."""

    block: Block
    peers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SendEndorsement:
    peer: str
    height: int
    block_hash: bytes
    endorsement: Endorsement


@dataclass(frozen=True, slots=True)
class RefuseEndorsement:
    peer: str
    height: int
    block_hash: bytes
    reason: Reason


@dataclass(frozen=True, slots=True)
class ForwardTxs:
    """Send checked transactions to the fleet's proposer for its next block."""

    peer: str
    txs: tuple[Transaction, ...]


@dataclass(frozen=True, slots=True)
class RefuseForwarded:
    """Tell ``peer`` its forwarded transaction will not be proposed: ``reason`` at ``height``."""

    peer: str
    tx_id: bytes
    reason: Reason
    height: int


@dataclass(frozen=True, slots=True)
class SubmitBlock:
    """A block endorsed by a majority: to the ordering service (one winner per height)."""

    block: Block


@dataclass(frozen=True, slots=True)
class StoreKey:
    """Commit a prepared key to the key store (``KeyStore.commit_key``): its block committed."""

    prepared: PreparedKey


@dataclass(frozen=True, slots=True)
class EraseKey:
    """Erase every version of the meter here (``KeyStore.destroy``): revoked or handed over."""

    meter_id: bytes


@dataclass(frozen=True, slots=True)
class SendKey:
    """Hand the meter's key over to its new home, wrapped to it (``KeyStore.export``)."""

    peer: str
    meter_id: bytes
    key_version: int


@dataclass(frozen=True, slots=True)
class AcknowledgeKey:
    """Tell the old home its key is stored here."""

    peer: str
    meter_id: bytes
    key_version: int


@dataclass(frozen=True, slots=True)
class Log:
    """One structured event for the log: ``event`` names it, ``fields`` says what."""

    event: str
    fields: tuple[tuple[str, object], ...] = ()


Action = (Acknowledge | Refuse | AcceptReading | AnswerQuery | RequestEndorsements
          | SendEndorsement | RefuseEndorsement | ForwardTxs | RefuseForwarded | SubmitBlock
          | StoreKey | EraseKey | SendKey
          | AcknowledgeKey | Log)
