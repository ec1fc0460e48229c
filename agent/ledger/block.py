"""Blocks: header, endorsements, body; their encodings, the PoW seal and the genesis block.

The header is the paper's (section 2.2.1: version, previous block hash,
timestamp, nonce, Merkle root of the body) plus what a permissioned chain
needs: height, proposer, the PoW difficulty it claims, and the number of
transactions (the tree size an inclusion proof is checked against).

Merkle leaves are the transactions' ids (SHA-256 of each full encoding,
signature included; ``tx.tx_id``), so a stored transaction record plus its
audit path and the header prove its inclusion (merkle.py), and the root
commits to every signature in the body.

An endorsement is a terminal's Ed25519 signature over
``DOMAIN_ENDORSE + header_hash``: its confirmation of the block (the paper's
"more than 50 % of the ECDs"). Endorsements sit outside the header (they
sign it), sorted by (terminal id, signature) so the list has one encoding.

Layout (big-endian, codec.py)::

    header       := version:u8 height:u64 prev_hash:32 timestamp_ms:u64
                    merkle_root:32 tx_count:u16 proposer:tid difficulty:u8 nonce:u64
    endorsements := count:u16 (terminal:tid signature:64)*
    block        := header endorsements tx*tx_count     (tx: tx.py)
    head record  := header endorsements                 (stored apart from the txs)

The nonce is last, so sealing hashes a fixed prefix once and only the nonce
per try. Storage writes one record for the head and one per transaction;
the caps below keep each within one 128 KiB erase block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.ledger.codec import (
    FORMAT_VERSION,
    HASH_LEN,
    SIGNATURE_LEN,
    ZERO_HASH,
    LedgerValueError,
    Reader,
    Writer,
)
from agent.ledger.identity import DOMAIN_ENDORSE, TerminalIdentity, verify_signature
from agent.ledger.merkle import merkle_root
from agent.ledger.tx import MAX_TX_BYTES, Transaction, TxBuilder, encode_tx, read_tx, tx_id
from hal.ids import TERMINAL_ID_MAX, check_terminal_id
from hal.recordlog import DATA_START, REC_OVERHEAD

BLOCK_VERSION = FORMAT_VERSION

U64_MAX = 2**64 - 1

# Transactions per block. Every one costs an Ed25519 verification at every
# terminal, so the cap bounds the CPU one block takes on the 700 MHz board;
# the paper's 300 meters still rotate in one block, and it fits the u16 tx_count.
MAX_TXS_PER_BLOCK = 1024

# Endorsements per block: one per terminal at most (a duplicate is refused),
# so this is also the membership cap the rules enforce. 1024 endorsements of
# at most 97 bytes keep the head record within one erase block (below).
MAX_ENDORSEMENTS = 1024

# The record log's largest record: a 128 KiB erase block less its segment
# headers and one record's header and end marker (hal/recordlog.py max_payload).
FLASH_RECORD_MAX = 128 * 1024 - DATA_START - REC_OVERHEAD

MAX_HEADER_BYTES = 1 + 8 + HASH_LEN + 8 + HASH_LEN + 2 + (1 + TERMINAL_ID_MAX) + 1 + 8  # 125
MAX_ENDORSEMENT_BYTES = 1 + TERMINAL_ID_MAX + SIGNATURE_LEN  # 97
MAX_HEAD_BYTES = MAX_HEADER_BYTES + 2 + MAX_ENDORSEMENTS * MAX_ENDORSEMENT_BYTES  # 99455

# A whole block, as the ordering service carries it: about 322 KiB, well under
# etcd's default 1.5 MiB request limit (--max-request-bytes).
MAX_BLOCK_BYTES = MAX_HEAD_BYTES + MAX_TXS_PER_BLOCK * MAX_TX_BYTES

# Sealing tries 2^difficulty nonces on average: past 32 that is hours on the
# terminal. The paper uses 8.
MAX_SEAL_DIFFICULTY = 32
PAPER_DIFFICULTY = 8

def _u64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64_MAX


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """What endorsers sign (through its hash) and PoW seals."""

    height: int
    prev_hash: bytes
    timestamp_ms: int
    merkle_root: bytes
    tx_count: int
    proposer: str
    difficulty: int = 0
    nonce: int = 0
    version: int = BLOCK_VERSION

    def __post_init__(self) -> None:
        if self.version != BLOCK_VERSION:
            raise LedgerValueError(f"header version: unsupported {self.version!r}")
        for name in ("height", "timestamp_ms", "nonce"):
            if not _u64(getattr(self, name)):
                raise LedgerValueError(f"header {name}: must be a u64")
        for name in ("prev_hash", "merkle_root"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != HASH_LEN:
                raise LedgerValueError(f"header {name}: must be {HASH_LEN} bytes")
        if not isinstance(self.tx_count, int) or not 0 <= self.tx_count <= MAX_TXS_PER_BLOCK:
            raise LedgerValueError(f"header tx_count: must be 0..{MAX_TXS_PER_BLOCK}")
        why = check_terminal_id(self.proposer)
        if why is not None:
            raise LedgerValueError(f"header proposer: {why}")
        if not isinstance(self.difficulty, int) or not 0 <= self.difficulty <= 255:
            raise LedgerValueError("header difficulty: must be a u8")


@dataclass(frozen=True, slots=True)
class Endorsement:
    """``terminal_id``'s signature over DOMAIN_ENDORSE + header_hash."""

    terminal_id: str
    signature: bytes

    def __post_init__(self) -> None:
        why = check_terminal_id(self.terminal_id)
        if why is not None:
            raise LedgerValueError(f"endorsement terminal_id: {why}")
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_LEN:
            raise LedgerValueError(f"endorsement signature: must be {SIGNATURE_LEN} bytes")


def _endorsement_key(e: Endorsement) -> tuple[str, bytes]:
    return (e.terminal_id, e.signature)  # ascii ids: str order is byte order


@dataclass(frozen=True, slots=True)
class Block:
    """A header, its signed transactions and its endorsements (kept sorted)."""

    header: BlockHeader
    txs: tuple[Transaction, ...] = ()
    endorsements: tuple[Endorsement, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "txs", tuple(self.txs))
        for i, tx in enumerate(self.txs):
            if not isinstance(tx, Transaction) or not tx.is_signed:
                raise LedgerValueError(f"block tx[{i}]: must be a signed Transaction")
        for e in self.endorsements:
            if not isinstance(e, Endorsement):
                raise LedgerValueError("block endorsements: must be Endorsement values")
        object.__setattr__(self, "endorsements",
                           tuple(sorted(self.endorsements, key=_endorsement_key)))


# ------------------------------------------------------------------ encoding

def _write_header(w: Writer, h: BlockHeader) -> None:
    w.u8(h.version)
    w.u64(h.height)
    w.fixed(h.prev_hash, HASH_LEN)
    w.u64(h.timestamp_ms)
    w.fixed(h.merkle_root, HASH_LEN)
    w.u16(h.tx_count)
    w.terminal_id(h.proposer)
    w.u8(h.difficulty)
    w.u64(h.nonce)


def encode_header(header: BlockHeader) -> bytes:
    w = Writer()
    _write_header(w, header)
    return w.getvalue()


def header_hash(header: BlockHeader) -> bytes:
    """SHA-256 of the encoded header: the block's id, the next block's prev_hash."""
    return hashlib.sha256(encode_header(header)).digest()


def _read_header(r: Reader) -> BlockHeader:
    version = r.version("header.version", BLOCK_VERSION)
    height = r.u64("header.height")
    prev_hash = r.fixed("header.prev_hash", HASH_LEN)
    timestamp_ms = r.u64("header.timestamp_ms")
    root = r.fixed("header.merkle_root", HASH_LEN)
    at = r.offset
    tx_count = r.u16("header.tx_count")
    if tx_count > MAX_TXS_PER_BLOCK:
        raise r.fail("header.tx_count", f"{tx_count} over the cap of {MAX_TXS_PER_BLOCK}", at)
    proposer = r.terminal_id("header.proposer")
    difficulty = r.u8("header.difficulty")
    nonce = r.u64("header.nonce")
    return BlockHeader(height, prev_hash, timestamp_ms, root, tx_count, proposer,
                       difficulty, nonce, version)


def decode_header(data: bytes) -> BlockHeader:
    r = Reader(data)
    h = _read_header(r)
    r.done("header")
    return h


def _write_endorsements(w: Writer, endorsements: Sequence[Endorsement]) -> None:
    if len(endorsements) > MAX_ENDORSEMENTS:
        raise ValueError(f"{len(endorsements)} endorsements over the cap of {MAX_ENDORSEMENTS}")
    w.u16(len(endorsements))
    for e in sorted(endorsements, key=_endorsement_key):
        w.terminal_id(e.terminal_id)
        w.fixed(e.signature, SIGNATURE_LEN)


def encode_endorsements(endorsements: Sequence[Endorsement]) -> bytes:
    """The endorsement list in canonical (sorted) order."""
    w = Writer()
    _write_endorsements(w, endorsements)
    return w.getvalue()


def _read_endorsements(r: Reader) -> tuple[Endorsement, ...]:
    at = r.offset
    count = r.u16("endorsements.count")
    if count > MAX_ENDORSEMENTS:
        raise r.fail("endorsements.count", f"{count} over the cap of {MAX_ENDORSEMENTS}", at)
    out: list[Endorsement] = []
    previous: tuple[str, bytes] | None = None
    for i in range(count):
        at = r.offset
        tid = r.terminal_id(f"endorsements[{i}].terminal_id")
        sig = r.fixed(f"endorsements[{i}].signature", SIGNATURE_LEN)
        key = (tid, sig)
        if previous is not None and key < previous:
            raise r.fail(f"endorsements[{i}]", "not in canonical (terminal id, signature) "
                                               "order", at)
        previous = key
        out.append(Endorsement(tid, sig))
    return tuple(out)


def read_header(r: Reader) -> BlockHeader:
    """A header at ``r``'s position (for records that nest one)."""
    return _read_header(r)


def read_endorsements(r: Reader) -> tuple[Endorsement, ...]:
    """An endorsement list at ``r``'s position (for records that nest one)."""
    return _read_endorsements(r)


def decode_endorsements(data: bytes) -> tuple[Endorsement, ...]:
    r = Reader(data)
    out = _read_endorsements(r)
    r.done("endorsements")
    return out


def encode_head(block: Block) -> bytes:
    """Header + endorsements: the one flash record that stands for a block's head."""
    w = Writer()
    _write_header(w, block.header)
    _write_endorsements(w, block.endorsements)
    return w.getvalue()


def decode_head(data: bytes) -> tuple[BlockHeader, tuple[Endorsement, ...]]:
    r = Reader(data)
    header = _read_header(r)
    endorsements = _read_endorsements(r)
    r.done("head")
    return header, endorsements


def encode_block(block: Block) -> bytes:
    """The whole block, as it is ordered and broadcast."""
    if block.header.tx_count != len(block.txs):
        raise ValueError(f"header says {block.header.tx_count} txs, the body has "
                         f"{len(block.txs)}")
    w = Writer()
    _write_header(w, block.header)
    _write_endorsements(w, block.endorsements)
    for tx in block.txs:
        w.raw(encode_tx(tx))
    return w.getvalue()


def decode_block(data: bytes) -> Block:
    """The block ``data`` encodes, or DecodeError (field and offset named)."""
    r = Reader(data)
    header = _read_header(r)
    endorsements = _read_endorsements(r)
    txs = tuple(read_tx(r, f"tx[{i}]") for i in range(header.tx_count))
    r.done("block")
    return Block(header, txs, endorsements)


# ------------------------------------------------------------- PoW and body

def body_root(txs: Iterable[Transaction]) -> bytes:
    """The Merkle root over the transactions' ids (RFC 6962 MTH)."""
    return merkle_root([tx_id(tx) for tx in txs])


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def check_pow(header: BlockHeader) -> bool:
    """The header's hash has at least ``difficulty`` leading zero bits (0: no seal)."""
    if header.difficulty == 0:
        return True
    return leading_zero_bits(header_hash(header)) >= header.difficulty


def seal(header: BlockHeader, difficulty: int = PAPER_DIFFICULTY) -> BlockHeader:
    """``header`` with ``difficulty`` set and the lowest nonce from 0 that meets it."""
    if not isinstance(difficulty, int) or not 0 <= difficulty <= MAX_SEAL_DIFFICULTY:
        raise ValueError(f"difficulty must be 0..{MAX_SEAL_DIFFICULTY}")
    unsealed = replace(header, difficulty=difficulty, nonce=0)
    if difficulty == 0:
        return unsealed
    prefix = hashlib.sha256(encode_header(unsealed)[:-8])
    limit = 1 << (256 - difficulty)  # hash < limit <=> >= difficulty leading zeros
    nonce = 0
    while True:  # 2^-difficulty success per try: 2^32 tries at most on average
        h = prefix.copy()
        h.update(nonce.to_bytes(8, "big"))
        if int.from_bytes(h.digest(), "big") < limit:
            return replace(unsealed, nonce=nonce)
        nonce += 1


# ------------------------------------------------------------- endorsements

def endorsement_payload(block_hash: bytes) -> bytes:
    return DOMAIN_ENDORSE + block_hash


def endorse(identity: TerminalIdentity, header: BlockHeader) -> Endorsement:
    """``identity``'s confirmation of ``header``."""
    return Endorsement(identity.terminal_id,
                       identity.sign(endorsement_payload(header_hash(header))))


def verify_endorsement(public_key: bytes | Ed25519PublicKey, endorsement: Endorsement,
                       block_hash: bytes) -> bool:
    """True when ``endorsement`` is ``public_key``'s signature of the block ``block_hash``."""
    return verify_signature(public_key, endorsement.signature, endorsement_payload(block_hash))


def with_endorsements(block: Block, endorsements: Iterable[Endorsement]) -> Block:
    """``block`` with ``endorsements`` added (kept sorted)."""
    return Block(block.header, block.txs, (*block.endorsements, *endorsements))


def build_block(proposer: TerminalIdentity, *, height: int, prev_hash: bytes,
                timestamp_ms: int, txs: Sequence[Transaction], difficulty: int = 0) -> Block:
    """An unendorsed block over ``txs``, sealed when ``difficulty`` > 0."""
    header = BlockHeader(height, prev_hash, timestamp_ms, body_root(txs), len(txs),
                         proposer.terminal_id)
    return Block(seal(header, difficulty) if difficulty else header, tuple(txs))


def genesis(proposer: TerminalIdentity, members: Sequence[tuple[str, bytes]], *,
            timestamp_ms: int, endorsers: Iterable[TerminalIdentity] = (),
            difficulty: int = 0) -> Block:
    """Block 0: one TERMINAL_ADD per founding terminal, proposed by one of them.

    ``members`` are (terminal id, Ed25519 public key) pairs; the founders in
    ``endorsers`` endorse it (the rules want more than half of the founders).
    """
    builder = TxBuilder(proposer)
    txs = [builder.add_terminal(tid, pk) for tid, pk in members]
    block = build_block(proposer, height=0, prev_hash=ZERO_HASH, timestamp_ms=timestamp_ms,
                        txs=txs, difficulty=difficulty)
    return with_endorsements(block, [endorse(e, block.header) for e in endorsers])
