"""Key queries (paper, section 2.2.1, step 2): four distinct answers from the index, not a scan.

- LOCAL: the meter is live and homed here; this terminal's key store holds
  the key, whose fingerprint must equal the chain's (a mismatch is a fault of
  this terminal, never answered with the wrong key).
- REMOTE: live and homed on another terminal; the network layer forwards the
  request there ("held by terminal X").
- REVOKED: the newest record is a revoke (the paper's empty key).
- UNKNOWN: no record of the meter on the chain.

The chain entry comes from RAM (O(1)); the newest record, when asked for,
is one flash read by its record id.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from agent.ledger.chain import Chain, Record
from agent.ledger.state import MeterStatus


class Answer(enum.Enum):
    LOCAL = "local"
    REMOTE = "remote"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


class KeyMismatchError(Exception):
    """The key store's key is not the one the chain records for the meter."""


@dataclass(frozen=True)
class QueryResult:
    answer: Answer
    meter_id: bytes
    home: str | None = None  # the terminal holding the key (LOCAL: this one)
    key_version: int | None = None
    fingerprint: bytes | None = None
    height: int | None = None  # block of the newest record
    record: Record | None = None  # the newest record itself, when asked for
    key: bytes | None = None  # LOCAL only, when a key source was given


KeySource = Callable[[bytes, int], bytes]  # (meter id, version) -> key, e.g. KeyStore.get


def query(chain: Chain, meter_id: bytes, self_id: str, *, with_record: bool = False,
          key_source: KeySource | None = None,
          fingerprint: Callable[[bytes], bytes] | None = None) -> QueryResult:
    """Answer a query for ``meter_id`` on the terminal ``self_id``.

    ``key_source`` and ``fingerprint`` (both or neither) fetch and check the
    key for a LOCAL answer: the key is returned only when its fingerprint is
    the chain's.
    """
    entry = chain.entry(meter_id)
    if entry is None:
        return QueryResult(Answer.UNKNOWN, meter_id)
    record = chain.newest_record(meter_id) if with_record else None
    if entry.status is MeterStatus.REVOKED:
        return QueryResult(Answer.REVOKED, meter_id, entry.home, entry.key_version, None,
                           entry.height, record)
    answer = Answer.LOCAL if entry.home == self_id else Answer.REMOTE
    key = None
    if answer is Answer.LOCAL and key_source is not None:
        if fingerprint is None:
            raise ValueError("a key source needs the fingerprint function to check it")
        key = key_source(meter_id, entry.key_version)
        if fingerprint(key) != entry.fingerprint:
            raise KeyMismatchError(f"meter {meter_id.hex()} version {entry.key_version}: the key "
                                   "store's key does not match the chain's fingerprint")
    return QueryResult(answer, meter_id, entry.home, entry.key_version, entry.fingerprint,
                       entry.height, record, key)
