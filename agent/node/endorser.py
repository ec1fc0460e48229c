"""The endorser's side of a round: check a peer's proposal, sign it or say why not.

An endorser runs ``rules.check_proposal`` against its own ledger state, with
its own clock (a stamp far ahead is refused) and the home's proof oracle,
and signs only if every rule but the quorum holds. It never signs two
different operations for one meter and key version while neither has
committed (``SignedGuard``): a proposer that equivocates gets one signature
from it, not two. When both operations carry the same home's signature, the
two signed transactions are kept as ``Evidence`` of that home's
equivocation: proof anyone can check against the home's public key.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from agent.ledger.block import Block, endorse, header_hash
from agent.ledger.identity import TerminalIdentity
from agent.ledger.rules import (
    MemberAuthority,
    PlacementOracle,
    ProofAttestor,
    Reason,
    check_proposal,
)
from agent.ledger.state import LedgerState
from agent.ledger.tx import Transaction, tx_id
from agent.node.actions import RefuseEndorsement, SendEndorsement

# Signatures remembered, one per (meter, version): a block holds at most 1024
# transactions, so this spans 16 full blocks in flight, far more than one
# proposer keeps; the oldest are forgotten first.
MAX_SIGNED_GUARD = 16384


@dataclass(frozen=True, slots=True)
class Evidence:
    """Two different operations on one meter and key version, both signed by ``signer``."""

    signer: str
    meter_id: bytes
    key_version: int
    height: int  # of the second proposal
    first: Transaction
    second: Transaction


class SignedGuard:
    """What this terminal signed, per (meter, key version), until a block at that height commits."""

    def __init__(self) -> None:
        self._signed: OrderedDict[tuple[bytes, int], tuple[bytes, int, Transaction]] = \
            OrderedDict()
        self._evidence: list[Evidence] = []

    def conflict(self, block: Block) -> Reason | None:
        """DUPLICATE_TX if ``block`` holds another operation on a meter and version signed."""
        height = block.header.height
        for tx in block.txs:
            if tx.kind.is_meter:
                seen = self._signed.get((tx.meter_id, tx.key_version))
                if seen is not None and seen[0] != tx_id(tx) and seen[1] >= height:
                    if seen[2].proposer == tx.proposer:
                        self._evidence.append(Evidence(tx.proposer, tx.meter_id, tx.key_version,
                                                       height, seen[2], tx))
                    return Reason.DUPLICATE_TX
        return None

    def take_evidence(self) -> list[Evidence]:
        """Evidence found since the last call."""
        found, self._evidence = self._evidence, []
        return found

    def record(self, block: Block) -> None:
        for tx in block.txs:
            if tx.kind.is_meter:
                key = (tx.meter_id, tx.key_version)
                self._signed[key] = (tx_id(tx), block.header.height, tx)
                self._signed.move_to_end(key)
        while len(self._signed) > MAX_SIGNED_GUARD:
            self._signed.popitem(last=False)

    def committed(self, height: int) -> None:
        """A block at ``height`` committed: what was signed up to it cannot conflict any more."""
        for key in [k for k, (_, h, _) in self._signed.items() if h <= height]:
            del self._signed[key]


def answer_proposal(ledger: LedgerState, identity: TerminalIdentity, guard: SignedGuard,
                    peer: str, block: Block, *, now_ms: int,
                    placement_home: PlacementOracle | None, require_pow: int,
                    genesis_hash: bytes | None, attest_proof: ProofAttestor,
                    authorise_member: MemberAuthority | None = None
                    ) -> SendEndorsement | RefuseEndorsement:
    """Sign ``peer``'s proposal ``block``, or refuse it with the rule's reason."""
    h = block.header
    block_hash = header_hash(h)
    if h.proposer != peer:
        return RefuseEndorsement(peer, h.height, block_hash, Reason.UNKNOWN_PROPOSER)
    verdict = check_proposal(ledger, block, placement_home=placement_home,
                             require_pow=require_pow, genesis_hash=genesis_hash,
                             attest_proof=attest_proof, authorise_member=authorise_member,
                             now_ms=now_ms)
    reason = verdict.block_reason if not verdict.block_ok else guard.conflict(block)
    if reason is not None:
        return RefuseEndorsement(peer, h.height, block_hash, reason)
    guard.record(block)
    return SendEndorsement(peer, h.height, block_hash, endorse(identity, h))
