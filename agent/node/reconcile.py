"""Boot: bring the key store in line with the chain, which is the truth.

The key store is written only from committed blocks, after the chain's
append is durable, so after a power cut the store can only be *behind* the
chain: a committed key not yet stored (the meter's retry of its request, or
the old home's hand-over, supplies it), a REVOKE committed but its key not
yet erased (erase now), a MIGRATE away committed but its key not yet handed
over (hand it over again; erase once the new home acknowledges).

The store is *ahead* of the chain in one case: a fleet terminal whose
ledger partition was repaired (agent/ledger/repair.py) boots on the blocks
before the damage, and its key store still holds the keys committed by the
blocks after it, which the fleet gives back. Such a key (a meter the chain
does not know, or a version above the chain's, whatever the chain's entry
says now) is kept and reported, neither erased nor handed over nor served
(queries check fingerprints); each block that comes back squares its meters
with the store as any committed block does (``Node._others_change``). The
version tells it apart from a committed revoke or migration not carried
out yet, which name the version the store holds. A key the chain never
committed cannot come from the protocol (keys are stored only after their
block), so a key of a meter the chain does not know is taken for one whose
block is still to come, never erased.

O(meters on the chain) once per boot; nothing here writes: the result is a
plan the node core turns into actions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.keystore.store import MeterStatus as StoreStatus
from agent.ledger.metertable import MeterSet
from agent.ledger.state import LedgerState, MeterStatus

if TYPE_CHECKING:
    from agent.node.core import KeyPort


@dataclass
class Reconciliation:
    erase: list[bytes] = field(default_factory=list)  # committed revokes
    hand_over: list[tuple[bytes, str, int]] = field(default_factory=list)  # (meter, home, v)
    # chain's key not held here yet: up to every meter homed here, so 17 bytes each
    pending: MeterSet = field(default_factory=MeterSet)
    ahead: list[bytes] = field(default_factory=list)  # store newer than chain: kept, unserved


def reconcile(ledger: LedgerState, keys: KeyPort, self_id: str) -> Reconciliation:
    """What to do so the key store holds exactly the keys the chain homes here."""
    plan = Reconciliation()
    for meter_id in keys.live_meters():
        entry = ledger.meter(meter_id)
        newest = max(keys.versions(meter_id), default=0)
        if entry is None or newest > entry.key_version:
            plan.ahead.append(meter_id)  # committed by a block this chain has yet to get back
        elif entry.status is MeterStatus.REVOKED:
            plan.erase.append(meter_id)
        elif entry.home != self_id:
            plan.hand_over.append((meter_id, entry.home, entry.key_version))
        elif newest < entry.key_version:
            plan.pending.add(meter_id)
    for meter_id in ledger.meter_ids():
        entry = ledger.meter(meter_id)
        if (entry is not None and entry.status is MeterStatus.LIVE and entry.home == self_id
                and keys.status(meter_id) is not StoreStatus.LIVE):
            plan.pending.add(meter_id)
    return plan
