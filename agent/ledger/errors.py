"""The chain store's errors, shared by the chain and its snapshot codec."""

from __future__ import annotations

from agent.ledger.rules import Reason


class LedgerError(Exception):
    """Base of the chain store's errors."""


class BlockRejected(LedgerError):
    """A block failed validation as a whole; nothing of it was written."""

    def __init__(self, height: int, reason: Reason, tx_codes: tuple[Reason | None, ...] = ()):
        bad = [f"tx {i}: {c.name}" for i, c in enumerate(tx_codes) if c is not None]
        super().__init__(f"block {height} rejected: {reason.name}"
                         + (f" ({', '.join(bad)})" if bad else ""))
        self.height = height
        self.reason = reason
        self.tx_codes = tx_codes


class ChainCorruptError(LedgerError):
    """What is on flash is not a valid chain; ``height`` is the first bad block."""

    def __init__(self, height: int, seq: int, detail: str):
        super().__init__(f"chain damaged at height {height} (record {seq}): {detail}")
        self.height = height
        self.seq = seq
        self.detail = detail


class ForeignChainError(ChainCorruptError):
    """The chain on flash grew from another genesis than the one provisioned."""


class LedgerFullError(LedgerError):
    """The live state no longer fits a snapshot in the ledger partition."""
