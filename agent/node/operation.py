"""One key operation in flight: what was asked, what was checked, where it stands."""

from __future__ import annotations

from dataclasses import dataclass

from agent.keystore.store import PreparedKey
from agent.ledger.tx import Transaction
from agent.node.actions import Op
from agent.node.opstate import OpState, check_transition


@dataclass(slots=True, eq=False)
class Operation:
    """A request taken by this terminal, walking opstate's machine."""

    op: Op
    meter_id: bytes
    request_id: int
    deadline: float  # monotonic time by which it is answered, whatever happens
    state: OpState = OpState.RECEIVED
    tx: Transaction | None = None
    tx_id: bytes = b""
    prepared: PreparedKey | None = None  # the key to store once committed (register, rotate)
    key_version: int = 0
    height: int | None = None  # where it committed
    rounds: int = 0  # endorsement rounds that failed so far
    submitted: bool = False  # a block holding it went to the ordering (it may still commit)
    sent_height: int = -1  # the tip it was forwarded on (to the proposer)
    forward_due: float = 0.0  # when a forward without its block counts as a failed round

    def advance(self, new: OpState) -> None:
        check_transition(self.state, new)
        self.state = new
