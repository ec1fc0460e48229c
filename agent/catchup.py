"""Catch-up past what etcd still keeps: a peer's snapshot, checked against a checkpoint.

etcd keeps the fleet's blocks from the checkpoint before the newest on
(agent/net/ordering.py ``retain_from``); a terminal that was down longer
finds the heights it needs gone. It then:

1. takes the lowest checkpoint block C it can see (a block at height c whose
   CHECKPOINT names the digest of the state at c-1);
2. asks peers, one at a time, for their snapshot at c-1 (``SnapshotRequest``;
   every terminal seals one on flash as it applies a checkpoint block) and
   reassembles the chunks (bounded: ``MAX_SNAPSHOT_BYTES``);
3. believes the snapshot only if the state it rebuilds has height c-1 and
   the whole-state digest the checkpoint names, and block C itself is valid
   on that state (a majority of endorsements of the membership in force)
   *and* is endorsed by a majority of the membership this terminal already
   knows from its own chain: the anchor, so a peer cannot bring a made-up
   membership along with a made-up state. Never the peer's word;
4. adopts it (``Chain.adopt``, re-sealed by this terminal) and reboots, so
   the key store is reconciled with the new state; the ordering then goes
   on from c.

A peer that answers late, wrongly or not at all is skipped for the next.

``snapshot_chunks`` is the serving side: a sealed snapshot's records as
wire chunks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.ledger import snapshot as snap_codec
from agent.ledger.block import Block, header_hash, verify_endorsement
from agent.ledger.chain import REC_SNAP_END, REC_SNAP_METER, REC_SNAP_START, Chain
from agent.ledger.codec import DecodeError
from agent.ledger.errors import ChainCorruptError
from agent.ledger.rules import checkpoint_of, validate_block
from agent.ledger.state import LedgerState
from agent.net.wire import MAX_CHUNK_DATA, SnapshotChunk, SnapshotRequest

log = logging.getLogger("edgekey.catchup")

MAX_SNAPSHOT_BYTES = 256 << 20  # about 10^6 meters
ASK_TIMEOUT_S = 10.0

Send = Callable[[str, object], None]


def encode_records(records: Sequence[bytes]) -> bytes:
    return b"".join(len(r).to_bytes(4, "big") + r for r in records)


def decode_records(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        if i + 4 > len(data):
            raise ValueError("a snapshot record's length is cut off")
        n = int.from_bytes(data[i:i + 4], "big")
        if i + 4 + n > len(data):
            raise ValueError("a snapshot record is cut off")
        out.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return out


def snapshot_chunks(chain: Chain, height: int) -> list[SnapshotChunk]:
    """This terminal's sealed snapshot at ``height`` as chunks; [] when it has none there."""
    found = chain.snapshot_records()
    if found is None or found[0] != height:
        return []
    data = encode_records(found[1])
    pieces = [data[i:i + MAX_CHUNK_DATA] for i in range(0, len(data), MAX_CHUNK_DATA)] or [b""]
    return [SnapshotChunk(height, i, len(pieces), p) for i, p in enumerate(pieces)]


class _Signer:
    def __init__(self, public: bytes):
        self._public = public

    def public_bytes(self) -> bytes:
        return self._public


def rebuild(records: Sequence[bytes], signer_public: bytes) -> LedgerState:
    """The state a snapshot's records describe (ChainCorruptError when they do not hold)."""
    if len(records) < 2 or records[0][:1] != bytes([REC_SNAP_START]) or \
            records[-1][:1] != bytes([REC_SNAP_END]):
        raise ChainCorruptError(-1, -1, "a snapshot is S, M..., E records")
    reader = snap_codec.SnapshotReader(0, records[0][1:], _Signer(signer_public), True)
    for i, payload in enumerate(records[1:-1], start=1):
        if payload[:1] != bytes([REC_SNAP_METER]):
            raise ChainCorruptError(reader.height, i, "a snapshot record is not M")
        reader.meter(i, payload[1:])
    return reader.end(len(records) - 1, records[-1][1:])


def judge(snapshot: LedgerState, checkpoint_block: Block, anchor: LedgerState, *,
          require_pow: int = 0) -> str | None:
    """Why ``snapshot`` is not the state ``checkpoint_block`` vouches for, or None when it is."""
    cp = checkpoint_of(checkpoint_block)
    c = checkpoint_block.header.height
    if cp is None or cp.counter != c - 1:
        return "the block carries no checkpoint of its parent"
    if snapshot.tip is None or snapshot.tip.height != c - 1:
        return f"the snapshot is at {snapshot.tip.height if snapshot.tip else None}, not {c - 1}"
    if snapshot.digest() != cp.fingerprint:
        return "the snapshot's state digest is not the one the checkpoint names"
    verdict = validate_block(snapshot, checkpoint_block, require_pow=require_pow,
                             genesis_hash=anchor.genesis_hash)
    if not verdict.block_ok:
        reason = verdict.block_reason.name if verdict.block_reason else "?"
        return f"the checkpoint block does not validate on the snapshot: {reason}"
    block_hash = header_hash(checkpoint_block.header)
    signed = set()
    for e in checkpoint_block.endorsements:
        info = anchor.terminal(e.terminal_id)
        if info is not None and info.active and verify_endorsement(info.verifier, e, block_hash):
            signed.add(e.terminal_id)
    if 2 * len(signed) <= anchor.active_count:
        return (f"the checkpoint block is endorsed by {len(signed)} of the "
                f"{anchor.active_count} terminals this one knows: not a majority of them")
    return None


@dataclass
class CatchUp:
    """One catch-up in progress: the checkpoint block, the peers to ask, chunks so far."""

    block: Block
    peers: list[str]
    asked: str | None = None
    deadline: float = 0.0
    chunks: dict[int, bytes] = field(default_factory=dict)
    count: int = 0
    refusals: list[str] = field(default_factory=list)

    @property
    def height(self) -> int:
        return self.block.header.height - 1

    def next_peer(self, now: float, send: Send) -> bool:
        """Ask the next peer; False when none is left."""
        if not self.peers:
            self.asked = None
            return False
        self.asked = self.peers.pop(0)
        self.deadline = now + ASK_TIMEOUT_S
        self.chunks, self.count = {}, 0
        send(self.asked, SnapshotRequest(self.height))
        return True

    def chunk(self, peer: str, m: SnapshotChunk) -> bytes | None:
        """Take a chunk from the peer asked; the whole snapshot once every chunk is in."""
        if peer != self.asked or m.height != self.height:
            return None
        if self.count and m.count != self.count:
            raise ValueError("the chunk count changed mid-snapshot")
        if m.count * MAX_CHUNK_DATA > MAX_SNAPSHOT_BYTES + MAX_CHUNK_DATA:
            raise ValueError(f"a snapshot of {m.count} chunks is over the limit")
        self.count = m.count
        self.chunks[m.index] = m.data
        if len(self.chunks) < self.count:
            return None
        return b"".join(self.chunks[i] for i in range(self.count))


def open_snapshot(data: bytes, signer_public: bytes) -> tuple[list[bytes], LedgerState]:
    """Records and rebuilt state of a reassembled snapshot (ValueError/ChainCorruptError)."""
    records = decode_records(data)
    try:
        return records, rebuild(records, signer_public)
    except DecodeError as exc:
        raise ValueError(f"snapshot does not decode: {exc}") from exc
