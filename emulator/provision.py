"""What a utility provisions for a fleet: identities, transport keys, factory keys, genesis.

In the field these come from the utility's provisioning system (a signed
file per terminal, the issue of the running agent); here they are made in
one place, deterministically from a seed when one is given, so tests and
the demo build the same fleet every run.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.keystore.transport import AllowList, public_bytes
from agent.ledger.block import Block, genesis, header_hash
from agent.ledger.identity import TerminalIdentity
from agent.node.core import NodeConfig
from hal.board import Ledger


def _derive(seed: bytes | None, label: str) -> bytes:
    return os.urandom(32) if seed is None else hashlib.sha256(seed + label.encode()).digest()


@dataclass
class Provisioning:
    """One fleet's secrets and its genesis (never written to a chain: keys stay here)."""

    identities: list[TerminalIdentity]
    transport: dict[str, X25519PrivateKey]
    factory_keys: dict[bytes, bytes]  # meter id -> the factory key its home was given
    genesis: Block

    @property
    def genesis_hash(self) -> bytes:
        return header_hash(self.genesis.header)

    def identity(self, terminal_id: str) -> TerminalIdentity:
        return next(i for i in self.identities if i.terminal_id == terminal_id)

    def peers(self, extra: Mapping[bytes, bytes] | None = None) -> AllowList:
        """Who a terminal may wrap a key to: every terminal's transport key, plus ``extra``."""
        entries = {tid.encode(): public_bytes(k) for tid, k in self.transport.items()}
        entries.update(extra or {})
        return AllowList(entries)

    def config(self, terminal_id: str, ledger: Ledger | None = None,
               **settings: object) -> NodeConfig:
        """The node settings of one terminal: its identity, the fleet's genesis and factory keys,
        and the board's ``[ledger]`` section (PoW difficulty, transactions per block)."""
        if ledger is not None:
            settings = {"pow_difficulty": ledger.pow_difficulty,
                        "txs_per_block": ledger.txs_per_block, **settings}
        return NodeConfig(self.identity(terminal_id), genesis_hash=self.genesis_hash,
                          factory_key=self.factory_keys.get, **settings)  # type: ignore[arg-type]


def provision(terminals: int, meters: Iterable[bytes], *, timestamp_ms: int,
              seed: bytes | None = None, prefix: str = "ecd-",
              difficulty: int = 0) -> Provisioning:
    """A fleet of ``terminals`` (ids ``ecd-00``...) and the factory keys of ``meters``.

    The genesis names every terminal, is sealed at the board's PoW
    ``difficulty`` and endorsed by a bare majority of them.
    """
    ids = [TerminalIdentity.from_seed(f"{prefix}{i:02d}", _derive(seed, f"terminal {i}"))
           for i in range(terminals)]
    transport = {t.terminal_id: X25519PrivateKey.from_private_bytes(
        _derive(seed, f"transport {t.terminal_id}")) for t in ids}
    factory = {bytes(m): _derive(seed, f"factory {bytes(m).hex()}") for m in meters}
    quorum = terminals // 2 + 1
    block = genesis(ids[0], [(t.terminal_id, t.public_bytes()) for t in ids],
                    timestamp_ms=timestamp_ms, endorsers=ids[:quorum], difficulty=difficulty)
    return Provisioning(ids, transport, factory, block)
