"""Terminals together in one process: endorsement traffic, ordering and key hand-overs.

What stands in for the WAN and etcd until the network issue replaces them:
every message a terminal's node core sends goes into one FIFO and is
delivered in order, so a run is deterministic. The ordering accepts one
block per height, the first endorsed one that extends the current head
(the compare-and-swap etcd will do), and delivers it to every terminal,
which validates and appends it to its own flash. Terminals can be cut off
(``offline``): messages to and from them are dropped, as a dead link would.

Replies meant for meters and operators (acknowledgements, refusals,
answers, readings) are collected per terminal for the caller to read.

``elect`` names the fleet's block proposer, as the etcd ordering's lease
election does: every terminal hears ``ProposerChanged``, the others forward
their transactions to it (``ForwardTxs``). Until then every terminal
proposes its own blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.keystore.store import KeyStoreError
from agent.ledger.block import Block, header_hash
from agent.node import events as ev
from agent.node.actions import (
    AcceptReading,
    Acknowledge,
    AcknowledgeKey,
    Action,
    AnswerQuery,
    ForwardTxs,
    Refuse,
    RefuseEndorsement,
    RefuseForwarded,
    RequestEndorsements,
    SendEndorsement,
    SendKey,
    SubmitBlock,
)
from agent.terminal import Terminal

Reply = Acknowledge | Refuse | AnswerQuery | AcceptReading
ORDERING = "(ordering)"  # the sender of ordered blocks, never offline


@dataclass
class Ordering:
    """One winner per height: the head only moves by a block that extends it."""

    head_height: int = -1
    head_hash: bytes = b""
    blocks: list[Block] = field(default_factory=list)
    refused: int = 0

    def offer(self, block: Block) -> bool:
        h = block.header
        if h.height != self.head_height + 1 or (self.blocks and h.prev_hash != self.head_hash):
            self.refused += 1
            return False
        self.head_height, self.head_hash = h.height, header_hash(h)
        self.blocks.append(block)
        return True


class LocalNet:
    """Terminals by id, and the queue of what travels between them (module docstring)."""

    def __init__(self, terminals: Iterable[Terminal], *, tick: Callable[[], None] | None = None):
        self.terminals = {t.id: t for t in terminals}
        self.ordering = Ordering()
        self.offline: set[str] = set()
        self.replies: dict[str, list[Reply]] = {t: [] for t in self.terminals}
        self.delivered = 0  # messages handed to a terminal
        self.dropped = 0  # messages to or from an offline terminal
        self._queue: deque[tuple[str, ev.Event | Block]] = deque()
        self._tick = tick
        self.proposer: str | None = None
        for t in self.terminals.values():
            heights = t.chain.height
            if heights is not None and heights > self.ordering.head_height:
                self.ordering.head_height = heights
                self.ordering.head_hash = t.chain.state.tip.block_hash  # type: ignore[union-attr]
            self._route(t.id, t.boot_actions)

    def found(self, genesis: Block) -> None:
        """Provisioning: the fleet's genesis on every terminal's flash."""
        if not self.ordering.offer(genesis):
            raise ValueError("the ordering already has a genesis")
        for t in self.terminals.values():
            self._route(t.id, t.deliver(genesis))
        self.run()
        refused = [t.id for t in self.terminals.values() if t.chain.height != 0]
        if refused:
            raise ValueError(f"the genesis was refused by {', '.join(refused)}")

    def send(self, terminal_id: str, event: ev.Event) -> list[Reply]:
        """``event`` to a terminal; run until nothing moves; that terminal's new replies."""
        start = len(self.replies[terminal_id])
        self._queue.append((terminal_id, event))
        self.run()
        return self.replies[terminal_id][start:]

    def replace(self, terminal: Terminal) -> None:
        """A terminal rebooted: the same id, a new runtime; what is queued for it still arrives."""
        self.terminals[terminal.id] = terminal
        self._route(terminal.id, terminal.boot_actions)
        if self.proposer is not None:  # it learns the proposer from the ordering, as at boot
            self._queue.append((terminal.id, ev.ProposerChanged(self.proposer)))

    def elect(self, proposer: str | None) -> None:
        """The ordering names ``proposer`` (None: everyone proposes); every terminal hears it."""
        self.proposer = proposer
        for tid in self.terminals:
            self._to(ORDERING, tid, ev.ProposerChanged(proposer))

    def post(self, terminal_id: str, event: ev.Event) -> None:
        """Queue ``event`` for a terminal without running the network."""
        self._queue.append((terminal_id, event))

    def run(self, limit: int = 1_000_000) -> None:
        """Deliver queued messages in order until none is left (``limit`` bounds a loop)."""
        if not self.run_some(limit):
            raise RuntimeError(f"the network did not settle within {limit} messages")

    def run_some(self, n: int) -> bool:
        """Deliver at most ``n`` queued messages; True when the queue is empty."""
        for _ in range(n):
            if not self._queue:
                return True
            to, item = self._queue.popleft()
            if to in self.offline:
                self.dropped += 1
                continue
            self.delivered += 1
            t = self.terminals[to]
            actions = t.deliver(item) if isinstance(item, Block) else t.feed(item)
            self._route(to, actions)
            if self._tick is not None:
                self._tick()
        return not self._queue

    def tick_all(self) -> None:
        """A timer tick on every terminal that is up (timeouts, batching)."""
        for tid in self.terminals:
            if tid not in self.offline:
                self._queue.append((tid, ev.Tick()))
        self.run()

    # ------------------------------------------------------------- routing

    def _to(self, sender: str, to: str, item: ev.Event | Block) -> None:
        if sender in self.offline or to not in self.terminals:
            self.dropped += 1
            return
        self._queue.append((to, item))

    def _route(self, sender: str, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Acknowledge | Refuse | AnswerQuery | AcceptReading):
                self.replies[sender].append(a)
            elif isinstance(a, RequestEndorsements):
                for peer in a.peers:
                    self._to(sender, peer, ev.EndorseRequest(sender, a.block))
            elif isinstance(a, SendEndorsement):
                self._to(sender, a.peer, ev.EndorsementReceived(sender, a.height, a.block_hash,
                                                                a.endorsement))
            elif isinstance(a, RefuseEndorsement):
                self._to(sender, a.peer, ev.EndorsementRefused(sender, a.height, a.block_hash,
                                                               a.reason))
            elif isinstance(a, ForwardTxs):
                self._to(sender, a.peer, ev.TxsForwarded(sender, a.txs))
            elif isinstance(a, RefuseForwarded):
                self._to(sender, a.peer, ev.ForwardRefused(sender, a.tx_id, a.reason, a.height))
            elif isinstance(a, SubmitBlock):
                self._order(sender, a.block)
            elif isinstance(a, SendKey):
                try:
                    envelope = self.terminals[sender].export_key(a)
                except (KeyStoreError, OSError):  # the key could not be read: nothing sent
                    self.dropped += 1
                    continue
                if a.peer in self.terminals and a.peer not in self.offline:
                    received = self.terminals[a.peer].open_key(sender, a.meter_id,
                                                               a.key_version, envelope)
                    self._to(sender, a.peer, received)
                else:
                    self.dropped += 1
            elif isinstance(a, AcknowledgeKey):
                self._to(sender, a.peer, ev.KeyAcknowledged(sender, a.meter_id, a.key_version))
            else:
                raise TypeError(f"no route for {type(a).__name__}")

    def _order(self, sender: str, block: Block) -> None:
        if sender in self.offline:
            self.dropped += 1
            return
        if not self.ordering.offer(block):
            self._queue.append((sender, ev.BlockRefused(block.header.height,
                                                        header_hash(block.header),
                                                        "the head moved: another block won")))
            return
        for tid in self.terminals:  # the ordering service delivers, whoever submitted
            self._to(ORDERING, tid, block)
