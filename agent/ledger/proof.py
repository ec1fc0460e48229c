"""One key record, checkable without the chain: the master station's view.

A ``RecordProof`` carries a transaction, the head of the block that holds it
(header + endorsements) and the transaction's RFC 6962 audit path to the
header's Merkle root. Whoever knows the terminals' public keys checks:

1. the transaction's own signature (its proposer);
2. its inclusion: leaf = tx id, index and tree size (the header's
   ``tx_count``) under the header's ``merkle_root`` (RFC 9162 2.1.3.2);
3. the block's endorsements: more than half of the given terminals signed
   this header (paper, section 2.2.1).

It shows the record was committed; that it is still the meter's *newest*
record needs the chain (or a fresher proof).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.ledger.block import (
    Block,
    BlockHeader,
    Endorsement,
    encode_endorsements,
    encode_header,
    header_hash,
    read_endorsements,
    read_header,
    verify_endorsement,
)
from agent.ledger.codec import HASH_LEN, DecodeError, Reader, Writer
from agent.ledger.merkle import inclusion_proof, leaf_hash, verify_inclusion
from agent.ledger.tx import Transaction, encode_tx, read_tx, tx_id, verify_tx

PROOF_VERSION = 1
MAX_PATH = 64  # a tree of 2^64 leaves; blocks hold at most 1024 (10 levels)


@dataclass(frozen=True)
class RecordProof:
    tx: Transaction
    header: BlockHeader
    endorsements: tuple[Endorsement, ...]
    tx_index: int
    path: tuple[bytes, ...]


def record_proof(block: Block, tx_index: int) -> RecordProof:
    """The proof of ``block.txs[tx_index]``."""
    ids = [tx_id(tx) for tx in block.txs]
    return RecordProof(block.txs[tx_index], block.header, block.endorsements, tx_index,
                       inclusion_proof(ids, tx_index))


def check_record_proof(proof: RecordProof, terminals: Mapping[str, bytes]) -> str | None:
    """None when the proof holds against ``terminals`` (id -> Ed25519 key); else the reason."""
    proposer = terminals.get(proof.tx.proposer)
    if proposer is None or not verify_tx(proposer, proof.tx):
        return "transaction signature"
    if not verify_inclusion(leaf_hash(tx_id(proof.tx)), proof.tx_index, proof.header.tx_count,
                            proof.path, proof.header.merkle_root):
        return "not in the block (Merkle audit path)"
    digest = header_hash(proof.header)
    signers = {e.terminal_id for e in proof.endorsements
               if e.terminal_id in terminals
               and verify_endorsement(terminals[e.terminal_id], e, digest)}
    if len(signers) * 2 <= len(terminals):
        return f"endorsed by {len(signers)} of {len(terminals)} terminals, not a majority"
    return None


def encode_record_proof(proof: RecordProof) -> bytes:
    w = Writer()
    w.u8(PROOF_VERSION)
    w.raw(encode_tx(proof.tx))
    w.raw(encode_header(proof.header))
    w.raw(encode_endorsements(proof.endorsements))
    w.u16(proof.tx_index)
    w.u8(len(proof.path))
    for node in proof.path:
        w.fixed(node, HASH_LEN)
    return w.getvalue()


def decode_record_proof(data: bytes) -> RecordProof:
    """The proof ``data`` encodes, or DecodeError naming the field."""
    r = Reader(data)
    r.version("proof.version", PROOF_VERSION)
    tx = read_tx(r, "proof.tx")
    header = read_header(r)
    endorsements = read_endorsements(r)
    index = r.u16("proof.tx_index")
    n = r.u8("proof.path")
    if n > MAX_PATH:
        raise DecodeError("proof.path", r.offset - 1, f"{n} nodes over the cap of {MAX_PATH}")
    path = tuple(r.fixed("proof.path", HASH_LEN) for _ in range(n))
    r.done("proof")
    return RecordProof(tx, header, endorsements, index, path)
