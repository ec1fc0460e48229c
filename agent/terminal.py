"""One terminal's runtime around its node core: flash in, node core, flash and peers out.

    flash partitions (hal) -> Chain + KeyStore -> Node (agent/node) -> actions
      key-store actions: carried out here, results fed back as events
      everything else (meter replies, peer messages, blocks for ordering):
      returned to the caller, which owns the links and the network

``Terminal`` does the I/O the node core may not: it appends ordered blocks
to the chain (``deliver``), commits and erases keys, wraps a hand-over key
to its new home. It holds no policy of its own; the agent process and the
emulated networks (emulator/localnet.py) drive it the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.keystore.material import Entropy
from agent.keystore.store import KeyStore, KeyStoreError
from agent.keystore.transport import AllowList, open_envelope
from agent.ledger.block import Block, header_hash
from agent.ledger.chain import BlockRejected, Chain, LedgerError, open_chain
from agent.ledger.identity import TerminalIdentity
from agent.ledger.repair import Repair, repair_chain
from agent.node import events as ev
from agent.node.actions import Action, EraseKey, Log, SendKey, StoreKey
from agent.node.core import Node, NodeConfig
from hal.blockdev import BlockDevice, open_partition
from hal.board import Flash

log = logging.getLogger("edgekey.terminal")

Clock = Callable[[], ev.Time]


class Terminal:
    """A terminal's chain, key store and node core on its flash (module docstring)."""

    def __init__(self, config: NodeConfig, *, ledger: BlockDevice | Chain, keystore: BlockDevice,
                 device_key: bytes, clock: Clock, entropy: Entropy = os.urandom,
                 transport_key: X25519PrivateKey | None = None,
                 peers: AllowList | None = None):
        self.config = config
        self.identity: TerminalIdentity = config.identity
        self.id = config.identity.terminal_id
        self.clock = clock
        # A Chain already opened by open_node_chain (the agent looks at it before anything
        # writes), or the ledger partition to open it on.
        self.chain = ledger if isinstance(ledger, Chain) else open_node_chain(config, ledger)
        self.keys = KeyStore(keystore, device_key, entropy=entropy)
        self.transport_key = transport_key
        self.peers = peers
        self.node = Node(config, self.chain.state, self.keys)
        self.refused_blocks = 0
        self.last_refusal = ""  # the rule the newest refused ordered block broke
        self.boot_actions = self._carry_out(self.node.boot(clock()))

    # ------------------------------------------------------------ driving

    def feed(self, event: ev.Event) -> list[Action]:
        """One event into the node core; the actions meant for the outside, in order."""
        return self._carry_out(self.node.handle(event, self.clock()))

    def feed_many(self, events: list[ev.Event]) -> list[Action]:
        """Events that arrived together (``Node.handle_many``: they share one round)."""
        return self._carry_out(self.node.handle_many(events, self.clock()))

    def deliver(self, block: Block) -> list[Action]:
        """An ordered block: append it to flash (validating it), then tell the node core."""
        try:
            changes = self.chain.append(block)
        except BlockRejected as exc:
            # An ordered block this terminal's rules refuse: a faulty majority or a bug.
            # It is not applied here; the node core hears that its own block failed.
            self.refused_blocks += 1
            self.last_refusal = exc.reason.name
            log.warning("terminal %s: ordered block refused: %s", self.id, exc)
            return self.feed(ev.BlockRefused(block.header.height, header_hash(block.header),
                                             str(exc)))
        return self.feed(ev.BlockCommitted(block, changes))

    def export_key(self, action: SendKey) -> bytes:
        """The hand-over envelope of ``action``: the key wrapped to the new home's public key."""
        if self.peers is None:
            raise LedgerError("this terminal has no peer transport keys to hand a key over")
        return self.keys.export(action.meter_id, action.peer.encode(), self.peers,
                                action.key_version)

    def open_key(self, peer: str, meter_id: bytes, key_version: int, envelope: bytes
                 ) -> ev.KeyReceived:
        """A hand-over envelope from ``peer`` opened with this terminal's transport key."""
        if self.transport_key is None:
            raise LedgerError("this terminal has no transport key to receive a key")
        key = open_envelope(self.transport_key, envelope, meter_id=meter_id,
                            key_version=key_version, requester_id=self.id.encode())
        return ev.KeyReceived(peer, meter_id, key_version, key)

    # ------------------------------------------------------------ effects

    def _carry_out(self, actions: list[Action]) -> list[Action]:
        """Do the key-store actions (feeding their results back); return the rest."""
        outward: list[Action] = []
        todo = list(actions)
        while todo:
            action = todo.pop(0)
            result: ev.Event | None = None
            if isinstance(action, StoreKey):
                p = action.prepared
                try:
                    self.keys.commit_key(p)
                    result = ev.KeyStored(p.meter_id, p.version)
                except (KeyStoreError, OSError) as exc:
                    result = ev.EffectFailed(p.meter_id, f"{type(exc).__name__}: {exc}")
            elif isinstance(action, EraseKey):
                try:
                    self.keys.destroy(action.meter_id)
                    result = ev.KeyErased(action.meter_id)
                except (KeyStoreError, OSError) as exc:
                    result = ev.EffectFailed(action.meter_id, f"{type(exc).__name__}: {exc}")
            elif isinstance(action, Log):
                log.info("%s %s %s", self.id, action.event,
                         " ".join(f"{k}={v}" for k, v in action.fields))
            else:
                outward.append(action)
            if result is not None:
                todo[:0] = self.node.handle(result, self.clock())
        return outward


def open_node_chain(config: NodeConfig, ledger: BlockDevice) -> Chain:
    """The chain on the ledger partition under the node's rules (its PoW, placement, genesis)."""
    return open_chain(ledger, config.identity, require_pow=config.pow_difficulty,
                      placement_home=config.placement_home, genesis_hash=config.genesis_hash)


def repair_node_chain(config: NodeConfig, ledger: BlockDevice) -> tuple[Chain, Repair]:
    """The damaged ledger partition cut back to the blocks before the damage, under the node's
    rules (agent/ledger/repair.py): for a fleet terminal, whose fleet gives the rest back."""
    return repair_chain(ledger, config.identity, require_pow=config.pow_difficulty,
                        placement_home=config.placement_home, genesis_hash=config.genesis_hash)


def board_partitions(device: BlockDevice, flash: Flash) -> tuple[BlockDevice, BlockDevice]:
    """The ``ledger`` and ``keystore`` partitions of a board's flash on ``device``."""
    return open_partition(device, flash, "ledger"), open_partition(device, flash, "keystore")
