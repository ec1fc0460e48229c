"""The life of one key operation as an explicit state machine (h11's _state.py habit).

    RECEIVED -> CHECKED -> PROPOSED -> ENDORSED -> ORDERED -> VALIDATED
             -> APPLIED -> ACKNOWLEDGED

or REFUSED from any state before APPLIED. CHECKED: the home checked what
the meter sent (the key store prepared the key, writing nothing) and built
the signed transaction. PROPOSED: in a block sent for endorsement. ENDORSED:
more than half of the terminals signed. ORDERED: submitted to the ordering
service. VALIDATED: the block came back ordered and passed every rule as it
was appended to flash. APPLIED: the ledger state changed and the key-store
effect was asked for. ACKNOWLEDGED: the effect is durable and the meter was
told. A round that fails (timeout, lost head) takes PROPOSED/ENDORSED/ORDERED
back to CHECKED for another round, so every step is bounded by a timeout
and a round count.
"""

from __future__ import annotations

import enum

from agent.node.errors import LocalProtocolError


class OpState(enum.Enum):
    RECEIVED = "received"
    CHECKED = "checked"
    PROPOSED = "proposed"
    ENDORSED = "endorsed"
    ORDERED = "ordered"
    VALIDATED = "validated"
    APPLIED = "applied"
    ACKNOWLEDGED = "acknowledged"
    REFUSED = "refused"


S = OpState
_NEXT: dict[OpState, frozenset[OpState]] = {
    S.RECEIVED: frozenset({S.CHECKED, S.APPLIED, S.REFUSED}),  # APPLIED: a committed retry
    S.CHECKED: frozenset({S.PROPOSED, S.VALIDATED, S.REFUSED}),  # VALIDATED: in another's block
    S.PROPOSED: frozenset({S.ENDORSED, S.CHECKED, S.VALIDATED, S.REFUSED}),
    S.ENDORSED: frozenset({S.ORDERED, S.CHECKED, S.REFUSED}),
    S.ORDERED: frozenset({S.VALIDATED, S.CHECKED, S.REFUSED}),
    S.VALIDATED: frozenset({S.APPLIED}),
    S.APPLIED: frozenset({S.ACKNOWLEDGED, S.REFUSED}),  # REFUSED: the key store failed
    S.ACKNOWLEDGED: frozenset(),
    S.REFUSED: frozenset(),
}
FINAL = frozenset({S.ACKNOWLEDGED, S.REFUSED})


def check_transition(old: OpState, new: OpState) -> None:
    """LocalProtocolError unless ``old -> new`` is a step of the machine above."""
    if new not in _NEXT[old]:
        raise LocalProtocolError(f"an operation cannot go from {old.value} to {new.value}")
