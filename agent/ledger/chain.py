"""The chain on flash: blocks appended through the HAL record log, checked at boot.

Records (one flash record each, first byte names the kind):

    T  a transaction of the block whose head follows        b"T" + encode_tx
    H  a block's head: header + endorsements                b"H" + encode_head
    S  snapshot start: anchor (height, hash, time), membership
    M  snapshot meter: one meter's entry + its newest transaction
    E  snapshot end: record count, digest of S and every M, own signature

A block is written as ``[T..., H]`` in one group commit. The head goes last
because the record log's batches are atomic only within an erase block: a
power cut can keep a prefix of a long block's records, never its head
without all its transactions. Transactions not followed by their head are
an unfinished write and are skipped at boot (counted as ``orphans``).

Snapshots are the paper's "head blocks are no longer maintained": when the
free space falls below what a snapshot needs, the whole live state (every
meter's newest entry and record, the membership, the tip) is written after
the tip, sealed by an E record, and everything before it is released. Boot
then reads the last complete snapshot and replays only the blocks after it.
A snapshot is contiguous: any other record before its E abandons it, and a
torn one (no E) is ignored, so a power cut during a snapshot costs nothing.

Boot and ``verify`` replay every block after the snapshot through
``rules.validate_block`` (hash links, Merkle roots, signatures, quorum,
lifecycle) and stop at the first bad height with ``ChainCorruptError``. The
snapshot's records (snapshot.py) are checked against its digest and its
signature by this terminal's own key (``verify(deep=True)`` also re-checks
every carried transaction's signature against the snapshot's membership).
``append`` runs the very same rules as the replay, with no oracle of what
a terminal holds off the chain (rules.py), so the state a live append
reaches is the state a reboot reaches; ``verify`` compares the two by the
digest of the whole state, meters and membership, not only the tip.

A terminal is provisioned with its fleet's genesis hash: a chain whose
block 0 is another is refused (``ForeignChainError``), at boot and at
append, however well it is signed.

Queries are O(1): the state's meter entry carries the record id of the
meter's newest record. ``scan_newest_record`` is the paper's method (read
back from the tail), kept as the baseline the benchmark compares against.
"""

from __future__ import annotations

import contextlib
import logging
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from agent.ledger import snapshot as snap_codec
from agent.ledger.block import Block, decode_head, encode_head
from agent.ledger.codec import DecodeError
from agent.ledger.errors import (
    BlockRejected,
    ChainCorruptError,
    ForeignChainError,
    LedgerError,
    LedgerFullError,
)
from agent.ledger.identity import TerminalIdentity
from agent.ledger.proof import RecordProof, record_proof
from agent.ledger.rules import (
    Changes,
    PlacementOracle,
    Verdict,
    apply_block,
    checkpoint_of,
    validate_block,
)
from agent.ledger.state import LedgerState, MeterEntry
from agent.ledger.tx import Transaction, decode_tx, encode_tx
from hal.blockdev import BlockDevice
from hal.recordlog import LogCorruptError, LogError, LogFailedError, PartitionFullError, RecordLog

log = logging.getLogger(__name__)

REC_TX = 0x54  # "T"
REC_HEAD = 0x48  # "H"
REC_SNAP_START = 0x53  # "S"
REC_SNAP_METER = 0x4D  # "M"
REC_SNAP_END = 0x45  # "E"

# Snapshot when the free space left would not hold one more snapshot plus
# this many erase blocks for the next block (a block's records take at most
# three: 1024 transactions of 225 bytes plus a head record). A snapshot needs
# the whole live state written before the old records can be released, so
# taking it as late as this makes snapshots as rare as the partition allows.
SNAPSHOT_HEADROOM_SEGMENTS = 4


@dataclass(frozen=True)
class BootReport:
    """What opening (or verifying) the chain found."""

    height: int | None  # tip height, None for an empty chain
    blocks_replayed: int
    txs_replayed: int
    orphans: int  # transactions of an unfinished block write, skipped
    snapshot_height: int | None  # anchor of the snapshot the state started from
    snapshot_meters: int
    abandoned_snapshots: int  # started but never sealed (power cut), ignored
    superseded: int  # records before the snapshot, left in its erase block


@dataclass(frozen=True)
class Record:
    """A meter's newest record as stored: the transaction and where it sits."""

    seq: int
    height: int
    tx_index: int
    tx: Transaction


def _tag(kind: int, body: bytes) -> bytes:
    return bytes((kind,)) + body


class Chain:
    """The chain of one terminal: a ``LedgerState`` in RAM over a ``RecordLog`` on flash.

    ``identity`` is this terminal's own key: it signs the snapshots it
    writes and checks them at boot. ``require_pow`` (the board's
    ``[ledger] pow_difficulty``), ``placement_home`` and ``genesis_hash`` (the
    fleet's block 0, from provisioning; None accepts the first genesis
    appended) are the chain's rules and must be the same at every boot.
    """

    def __init__(self, log: RecordLog, identity: TerminalIdentity, *, require_pow: int = 0,
                 placement_home: PlacementOracle | None = None,
                 genesis_hash: bytes | None = None,
                 snapshot_headroom: int | None = None):
        self.log = log
        self.identity = identity
        self.require_pow = require_pow
        self.placement_home = placement_home
        self.genesis_hash = genesis_hash
        self.snapshot_headroom = (SNAPSHOT_HEADROOM_SEGMENTS * log.segment_bytes
                                  if snapshot_headroom is None else snapshot_headroom)
        self.state = LedgerState()
        self._heads = array("Q")  # height - _base -> record id of that block's H record
        self._base = 0  # height of _heads[0]
        self.snapshots_written = 0
        self._snapshot_start: int | None = None
        self.space_warning: str | None = None  # set while the live state cannot be snapshot
        self.size = snap_codec.SnapshotSize()
        self.report = self._replay(self.state, deep=False)
        self._check_genesis(self.state)
        self._release_before_snapshot()

    # ------------------------------------------------------------- appending

    def check(self, block: Block) -> Verdict:
        """The verdict ``append`` would act on; nothing is written."""
        return validate_block(self.state, block, placement_home=self.placement_home,
                              require_pow=self.require_pow, genesis_hash=self.genesis_hash)

    def append(self, block: Block) -> Changes:
        """Validate, write durably, then apply ``block``; BlockRejected writes nothing.

        Once the block is durable this never raises: a snapshot that fails
        after it is abandoned with a warning (``space_warning``).
        """
        verdict = self.check(block)
        if not verdict.block_ok:
            assert verdict.block_reason is not None
            raise BlockRejected(block.header.height, verdict.block_reason, verdict.tx_codes)
        if checkpoint_of(block) is not None:
            # The state the checkpoint digests, sealed on flash before the block goes on:
            # what this terminal serves to one catching up from it (snapshot_records).
            try:
                self.snapshot()
            except (LedgerError, LogError, OSError) as exc:
                self.space_warning = f"checkpoint snapshot abandoned: {exc}"
                log.warning("ledger: %s", self.space_warning)
        payloads = [_tag(REC_TX, encode_tx(tx)) for tx in block.txs]
        payloads.append(_tag(REC_HEAD, encode_head(block)))
        try:
            seqs = self.log.append_many(payloads)
        except PartitionFullError as exc:
            raise LedgerFullError(f"block {block.header.height} not written: {exc}"
                                  + (f" ({self.space_warning})" if self.space_warning else "")
                                  ) from exc
        changes = _fold(self.state, block, verdict, seqs[0], self.size)
        if not self._heads:
            self._base = block.header.height
        self._heads.append(seqs[-1])
        self._maybe_snapshot()
        return changes

    # ---------------------------------------------------------------- reading

    @property
    def height(self) -> int | None:
        tip = self.state.tip
        return None if tip is None else tip.height

    def entry(self, meter_id: bytes) -> MeterEntry | None:
        """The meter's current entry (status, version, fingerprint, home): O(1), no flash."""
        return self.state.meter(meter_id)

    def newest_record(self, meter_id: bytes) -> Record | None:
        """The meter's newest record read from flash by its id: O(1)."""
        entry = self.state.meter(meter_id)
        if entry is None:
            return None
        tx = _record_tx(self.log.read(entry.seq))
        if tx is None:
            raise ChainCorruptError(entry.height, entry.seq, "the index points at no transaction")
        if tx.meter_id != meter_id:
            raise ChainCorruptError(entry.height, entry.seq, "the indexed record names another "
                                    "meter")
        return Record(entry.seq, entry.height, entry.tx_index, tx)

    def head(self, height: int) -> Block:
        """The header and endorsements of a block still on flash (no transactions)."""
        k = height - self._base
        if not 0 <= k < len(self._heads):
            raise KeyError(f"block {height} is not on flash (kept: {self._base}.."
                           f"{self._base + len(self._heads) - 1})")
        header, endorsements = decode_head(self.log.read(self._heads[k])[1:])
        return Block(header, (), endorsements)

    def block(self, height: int) -> Block:
        """A whole block still on flash, transactions read back from their records."""
        k = height - self._base
        head = self.head(height)
        first = self._heads[k] - head.header.tx_count
        txs = tuple(decode_tx(self.log.read(s)[1:]) for s in range(first, self._heads[k]))
        return Block(head.header, txs, head.endorsements)

    def record_proof(self, meter_id: bytes) -> RecordProof | None:
        """The meter's newest record with its block head and audit path (proof.py).

        None for an unknown meter. A record carried by a snapshot has no block
        on flash any more: LookupError says so (the snapshot vouches for it).
        """
        record = self.newest_record(meter_id)
        if record is None:
            return None
        if record.height < self._base:
            raise LookupError(f"meter {meter_id.hex()}: its record of block {record.height} was "
                              "compacted into a snapshot; its block is no longer kept")
        return record_proof(self.block(record.height), record.tx_index)

    # ------------------------------------------------------------- snapshots

    def snapshot_bytes(self) -> int:
        """Flash a snapshot of the current state takes, at most (snapshot.SnapshotSize)."""
        return self.size.estimate(self.state, self.log.segment_bytes)

    def state_digest(self) -> bytes:
        """Digest of the whole state in RAM (state.state_digest): what ``verify`` compares."""
        return self.state.digest()

    def _maybe_snapshot(self) -> None:
        """Snapshot when the free space would soon not hold one; never fails the append.

        When the live state no longer fits, or the snapshot fails on the way
        (the partition filling early, a flash error), it is abandoned: the
        warning is kept, the block already appended stays committed, and an
        append that finally finds the partition full raises LedgerFullError,
        having written nothing. An abandoned snapshot on flash has no end
        record, so boot ignores it.
        """
        need = self.snapshot_bytes() + self.snapshot_headroom
        if self.log.stats().payload_bytes_free >= need:
            return
        try:
            self.snapshot()
            self.space_warning = None
        except (LedgerError, LogError, OSError) as exc:
            self.space_warning = f"snapshot abandoned: {exc}"
            log.warning("ledger: %s", self.space_warning)

    def snapshot(self) -> int:
        """Write the live state after the tip, seal it, release what it supersedes.

        Returns the number of erase blocks freed. Raises LedgerFullError when
        the live state itself would not fit beside the rest of the chain.
        """
        tip = self.state.tip
        if tip is None:
            return 0
        needed = self.snapshot_bytes()
        if self.log.stats().payload_bytes_free < needed:
            raise LedgerFullError(f"a snapshot of {self.state.meter_count} meters needs about "
                                  f"{needed} bytes, the ledger partition has "
                                  f"{self.log.stats().payload_bytes_free} free")
        start = snap_codec.encode_start(self.state)
        digest = snap_codec.new_digest(start)
        batch = [_tag(REC_SNAP_START, start)]
        moved: list[tuple[bytes, MeterEntry, int]] = []
        start_seq = first_seq = self.log.next_seq
        for meter_id, entry in self._meters():
            record = self.newest_record(meter_id)
            assert record is not None
            body = snap_codec.encode_meter(meter_id, entry, record.tx)
            digest.update(body)
            batch.append(_tag(REC_SNAP_METER, body))
            moved.append((meter_id, entry, first_seq + len(batch) - 1))
            if len(batch) >= 4096:  # bound RAM: write in group commits
                self.log.append_many(batch)
                first_seq = self.log.next_seq
                batch = []
        count = self.state.meter_count
        end = snap_codec.encode_end(count, digest.digest(), self.identity)
        batch.append(_tag(REC_SNAP_END, end))
        self.log.append_many(batch)
        for meter_id, entry, seq in moved:
            self.state.put_meter(meter_id, entry._replace(seq=seq))
        self._heads = array("Q")
        self._base = tip.height + 1
        self._snapshot_start = start_seq
        self.snapshots_written += 1
        return self.log.release(start_seq)

    def snapshot_records(self) -> tuple[int, list[bytes]] | None:
        """The newest sealed snapshot on flash as (its height, its S, M... and E records), to
        hand to a peer catching up; None when there is none."""
        start = self._snapshot_start
        if start is None:
            return None
        records: list[bytes] = []
        height = -1
        for _seq, payload in self.log.records(start):
            kind = payload[0] if payload else -1
            if kind == REC_SNAP_START:
                if records:
                    break
                height = int.from_bytes(payload[2:10], "big")  # version u8, height u64
            elif kind not in (REC_SNAP_METER, REC_SNAP_END):
                break
            records.append(payload)
            if kind == REC_SNAP_END:
                return height, records
        return None

    def adopt(self, records: list[bytes], restored: LedgerState) -> LedgerState:
        """Take a peer's snapshot as this chain's state: ``restored`` is what its S, M...,
        E ``records`` rebuild (agent/catchup.py checked it against a checkpoint a majority
        endorsed). Written to flash re-sealed by this terminal, older records released; the
        terminal reboots afterwards so the key store is reconciled with the new state."""
        self._check_genesis(restored)
        count = restored.meter_count
        digest = snap_codec.new_digest(records[0][1:])
        for payload in records[1:-1]:
            digest.update(payload[1:])
        end = snap_codec.encode_end(count, digest.digest(), self.identity)
        start_seq = self.log.next_seq
        seqs = self.log.append_many([*records[:-1], _tag(REC_SNAP_END, end)])
        for meter_id, seq in zip((snap_codec.decode_entry(p[1:])[0] for p in records[1:-1]),
                                 seqs[1:-1], strict=True):
            entry = restored.meter(meter_id)
            assert entry is not None
            restored.put_meter(meter_id, entry._replace(seq=seq))
        self.state.replace_with(restored)
        self._heads = array("Q")
        self._base = (restored.tip.height + 1) if restored.tip else 0
        self._snapshot_start = start_seq
        self.snapshots_written += 1
        self.log.release(start_seq)
        return self.state

    def _meters(self) -> Iterator[tuple[bytes, MeterEntry]]:
        for meter_id in list(self.state.meter_ids()):
            entry = self.state.meter(meter_id)
            assert entry is not None
            yield meter_id, entry

    def _release_before_snapshot(self) -> None:
        """A power cut between sealing a snapshot and releasing: release now."""
        start = self._snapshot_start
        if start is not None and start > self.log.first_seq:
            with contextlib.suppress(LogFailedError):  # a salvaged log is read-only
                self.log.release(start)

    # ------------------------------------------------------------ boot/verify

    def verify(self, *, deep: bool = True) -> BootReport:
        """Re-read the whole chain from flash into a fresh state and compare with ours.

        The comparison is of the whole state's digest (every meter, the
        membership, the tip, the genesis), not of the tip alone.
        """
        fresh = LedgerState()
        report = self._replay(fresh, deep=deep, keep=False)
        self._check_genesis(fresh)
        if fresh.digest() != self.state.digest():
            theirs = fresh.tip
            height = -1 if theirs is None else theirs.height
            raise ChainCorruptError(height, self.log.next_seq - 1,
                                    f"flash replays to another state (tip {theirs}) than RAM "
                                    f"holds (tip {self.state.tip})")
        return report

    def _check_genesis(self, state: LedgerState) -> None:
        """Refuse a chain grown from another genesis than the provisioned one."""
        if self.genesis_hash is None or state.genesis_hash is None:
            return
        if state.genesis_hash != self.genesis_hash:
            raise ForeignChainError(0, self.log.first_seq,
                                    f"the chain grew from genesis {state.genesis_hash.hex()}, "
                                    f"this terminal belongs to {self.genesis_hash.hex()}")

    def _replay(self, state: LedgerState, *, deep: bool, keep: bool = True) -> BootReport:
        """Scan every record: snapshots restore, blocks are validated and applied."""
        size = self.size if keep else snap_codec.SnapshotSize()
        pending: list[int] = []  # record ids of T records waiting for their head
        pending_txs: list[bytes] = []
        snap: snap_codec.SnapshotReader | None = None
        blocks = txs = orphans = abandoned = 0
        snapshot_height: int | None = None
        snapshot_meters = 0
        heads = array("Q")
        base = 0
        self._snapshot_start = None
        try:
            start = self._last_sealed_snapshot()
            if start is None and self.log.first_seq > 1:
                raise ChainCorruptError(0, self.log.first_seq, "the oldest blocks were released "
                                        "but no snapshot stands for them")
            # Records before the last snapshot are superseded by it (a power cut
            # before their release, or neighbours of it in its erase block).
            superseded = 0 if start is None else start - self.log.first_seq
            for seq, payload in self.log.records(start):
                kind = payload[0] if payload else -1
                body = payload[1:]
                if snap is not None and kind not in (REC_SNAP_METER, REC_SNAP_END):
                    snap, abandoned = None, abandoned + 1
                if kind == REC_TX:
                    pending.append(seq)
                    pending_txs.append(body)
                elif kind == REC_HEAD:
                    height = _next_height(state)
                    block, first = self._assemble(seq, body, pending, pending_txs, height)
                    orphans += len(pending) - block.header.tx_count
                    pending, pending_txs = [], []
                    verdict = validate_block(state, block, placement_home=self.placement_home,
                                             require_pow=self.require_pow)
                    if not verdict.block_ok:
                        assert verdict.block_reason is not None
                        raise ChainCorruptError(height, seq, verdict.block_reason.name)
                    _fold(state, block, verdict, first, size)
                    if not heads:
                        base = height
                    heads.append(seq)
                    blocks += 1
                    txs += len(block.txs)
                elif kind == REC_SNAP_START:
                    orphans += len(pending)
                    pending, pending_txs = [], []
                    snap = snap_codec.SnapshotReader(seq, body, self.identity, deep)
                    size.reset()
                elif kind == REC_SNAP_METER and snap is not None:
                    size.add(*snap.meter(seq, body))
                elif kind == REC_SNAP_END and snap is not None:
                    restored = snap.end(seq, body)
                    state.replace_with(restored)
                    snapshot_height = restored.tip.height if restored.tip else None
                    snapshot_meters = restored.meter_count
                    heads, base = array("Q"), (snapshot_height or 0) + 1
                    self._snapshot_start = snap.start_seq
                    snap = None
                else:
                    height = _next_height(state)
                    raise ChainCorruptError(height, seq, f"unknown record kind {kind!r}")
        except LogCorruptError as exc:
            height = _next_height(state)
            raise ChainCorruptError(height, -1, f"flash record damaged: {exc}") from exc
        if snap is not None:
            abandoned += 1
        orphans += len(pending)
        if keep:
            self._heads, self._base = heads, base
        tip = state.tip
        return BootReport(height=None if tip is None else tip.height, blocks_replayed=blocks,
                          txs_replayed=txs, orphans=orphans,
                          snapshot_height=snapshot_height, snapshot_meters=snapshot_meters,
                          abandoned_snapshots=abandoned, superseded=superseded)

    def _last_sealed_snapshot(self) -> int | None:
        """Record id of the newest S whose M records run unbroken to an E (not yet checked)."""
        found: int | None = None
        open_at: int | None = None
        for seq, payload in self.log.records():
            kind = payload[0] if payload else -1
            if kind == REC_SNAP_START:
                open_at = seq
            elif kind == REC_SNAP_END and open_at is not None:
                found, open_at = open_at, None
            elif kind != REC_SNAP_METER:
                open_at = None
        return found

    @staticmethod
    def _assemble(seq: int, body: bytes, pending: list[int], pending_txs: list[bytes],
                  height: int) -> tuple[Block, int]:
        """The block a head record closes: its tx_count transactions right before it."""
        try:
            header, endorsements = decode_head(body)
        except DecodeError as exc:
            raise ChainCorruptError(height, seq, f"block head does not decode: {exc}") from exc
        n = header.tx_count
        first = seq - n
        if len(pending) < n or (n and pending[-n] != first):
            raise ChainCorruptError(height, seq, f"the head names {n} transactions, "
                                    f"{len(pending)} precede it")
        try:
            txs = tuple(decode_tx(raw) for raw in pending_txs[len(pending_txs) - n:])
        except DecodeError as exc:
            raise ChainCorruptError(height, seq, f"a transaction does not decode: {exc}") from exc
        return Block(header, txs, endorsements), first


def _next_height(state: LedgerState) -> int:
    """The height the next block on ``state`` must have (0: genesis)."""
    return 0 if state.tip is None else state.tip.height + 1


def _fold(state: LedgerState, block: Block, verdict: Verdict, first_seq: int,
          size: snap_codec.SnapshotSize) -> Changes:
    """Apply an accepted block and point each changed meter at its record on flash."""
    olds = {tx.meter_id: state.meter(tx.meter_id) for tx in block.txs if tx.kind.is_meter}
    changes = apply_block(state, block, verdict)
    for change in changes.meters:
        state.put_meter(change.meter_id, change.entry._replace(seq=first_seq + change.tx_index))
        size.change(olds.get(change.meter_id), change.meter_id, change.entry.home)
        olds[change.meter_id] = change.entry
    return changes


def open_chain(device: BlockDevice, identity: TerminalIdentity, **rules: object) -> Chain:
    """Boot: open the ledger partition's log and replay the chain on it.

    Damage the record log finds (a checksum failing before intact records)
    is reported as ChainCorruptError naming the first block it breaks: the
    records before it are replayed read-only to find that height.
    """
    try:
        log = RecordLog(device)
    except LogCorruptError as exc:
        salvaged = Chain(RecordLog(device, salvage=True), identity, **rules)  # type: ignore[arg-type]
        height = 0 if salvaged.height is None else salvaged.height + 1
        raise ChainCorruptError(height, salvaged.log.next_seq, str(exc)) from exc
    return Chain(log, identity, **rules)  # type: ignore[arg-type]


def scan_records(log: RecordLog, meter_id: bytes, *, limit: int | None = None
                 ) -> Iterator[tuple[int, Transaction]]:
    """The meter's records on flash, newest first, as (record id, transaction): read back
    from the tail, at most ``limit`` records (None: to the oldest kept)."""
    stop = log.first_seq - 1 if limit is None else max(log.first_seq, log.next_seq - limit) - 1
    for seq in range(log.next_seq - 1, stop, -1):
        tx = _record_tx(log.read(seq))
        if tx is not None and tx.meter_id == meter_id:
            yield seq, tx


def scan_newest_record(log: RecordLog, meter_id: bytes) -> Transaction | None:
    """The paper's query (section 2.2.1, step 2): read back from the tail to the meter's record.

    O(records behind it): the baseline the index is measured against.
    """
    for _seq, tx in scan_records(log, meter_id):
        return tx
    return None


def _record_tx(payload: bytes) -> Transaction | None:
    """The transaction a stored record holds (a block's T or a snapshot's M), else None."""
    kind = payload[0] if payload else -1
    if kind == REC_TX:
        return decode_tx(payload[1:])
    if kind == REC_SNAP_METER:
        return snap_codec.decode_meter(payload[1:])[2]
    return None
