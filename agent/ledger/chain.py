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
snapshot's records are checked against its digest and its signature by this
terminal's own key (``verify(deep=True)`` also re-checks every carried
transaction's signature against the snapshot's membership).

Queries are O(1): the state's meter entry carries the record id of the
meter's newest record. ``scan_newest_record`` is the paper's method (read
back from the tail), kept as the baseline the benchmark compares against.
"""

from __future__ import annotations

import contextlib
import hashlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from agent.ledger.block import Block, decode_head, encode_head
from agent.ledger.codec import (
    HASH_LEN,
    PUBLIC_KEY_LEN,
    SIGNATURE_LEN,
    TERMINAL_ID_MAX,
    DecodeError,
    Reader,
    Writer,
)
from agent.ledger.identity import TerminalIdentity, verify_signature
from agent.ledger.proof import RecordProof, record_proof
from agent.ledger.rules import (
    Changes,
    PlacementOracle,
    ProofAttestor,
    Reason,
    Verdict,
    apply_block,
    validate_block,
)
from agent.ledger.state import LedgerState, MeterEntry, MeterStatus, Tip
from agent.ledger.tx import (
    MAX_TX_BYTES,
    METER_ID_MAX,
    METER_ID_MIN,
    Transaction,
    decode_tx,
    encode_tx,
    signing_payload,
)
from hal.blockdev import BlockDevice
from hal.recordlog import (
    ALIGN,
    REC_HEADER,
    LogCorruptError,
    LogFailedError,
    PartitionFullError,
    RecordLog,
)

REC_TX = 0x54  # "T"
REC_HEAD = 0x48  # "H"
REC_SNAP_START = 0x53  # "S"
REC_SNAP_METER = 0x4D  # "M"
REC_SNAP_END = 0x45  # "E"

SNAPSHOT_VERSION = 1
DOMAIN_SNAPSHOT = b"edgekey/snapshot/v1"
_NO_HEIGHT = 2**64 - 1  # "not retired" in a snapshot's membership list

# Snapshot when the free space left would not hold one more snapshot plus
# this many erase blocks for the next block (a block's records take at most
# three: 1024 transactions of 225 bytes plus a head record). A snapshot needs
# the whole live state written before the old records can be released, so
# taking it as late as this makes snapshots as rare as the partition allows.
SNAPSHOT_HEADROOM_SEGMENTS = 4
# A snapshot meter record without its ids and transaction: kind, the two id
# length bytes, status, version, fingerprint, counter, height, tx index.
_SNAP_METER_FIXED = 1 + 2 + 1 + 4 + HASH_LEN + 8 + 8 + 2


class LedgerError(Exception):
    """Base of the chain store's errors."""


class BlockRejected(LedgerError):
    """A block failed validation as a whole; nothing of it was written."""

    def __init__(self, height: int, reason: Reason):
        super().__init__(f"block {height} rejected: {reason.name}")
        self.height = height
        self.reason = reason


class ChainCorruptError(LedgerError):
    """What is on flash is not a valid chain; ``height`` is the first bad block."""

    def __init__(self, height: int, seq: int, detail: str):
        super().__init__(f"chain damaged at height {height} (record {seq}): {detail}")
        self.height = height
        self.seq = seq
        self.detail = detail


class LedgerFullError(LedgerError):
    """The live state no longer fits a snapshot in the ledger partition."""


@dataclass(frozen=True)
class BootReport:
    """What opening (or verifying) the chain found."""

    height: int | None  # tip height, None for an empty chain
    blocks_replayed: int
    txs_replayed: int
    invalid_txs: int  # recorded in blocks but not applied (their reason codes)
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
    writes and checks them at boot. ``require_pow`` and ``placement_home``
    are the chain's rules and must be the same at every boot (see rules.py).
    """

    def __init__(self, log: RecordLog, identity: TerminalIdentity, *, require_pow: int = 0,
                 placement_home: PlacementOracle | None = None,
                 snapshot_headroom: int | None = None):
        self.log = log
        self.identity = identity
        self.require_pow = require_pow
        self.placement_home = placement_home
        self.snapshot_headroom = (SNAPSHOT_HEADROOM_SEGMENTS * log.segment_bytes
                                  if snapshot_headroom is None else snapshot_headroom)
        self.state = LedgerState()
        self._heads = array("Q")  # height - _base -> record id of that block's H record
        self._base = 0  # height of _heads[0]
        self.snapshots_written = 0
        self._snapshot_start: int | None = None
        self.space_warning: str | None = None  # set while the live state cannot be snapshot
        self.size = _SnapshotSize()
        self.report = self._replay(self.state, deep=False)
        self._release_before_snapshot()

    # ------------------------------------------------------------- appending

    def check(self, block: Block, attest_proof: ProofAttestor | None = None) -> Verdict:
        """The verdict ``append`` would act on; nothing is written."""
        return validate_block(self.state, block, placement_home=self.placement_home,
                              require_pow=self.require_pow, attest_proof=attest_proof)

    def append(self, block: Block, attest_proof: ProofAttestor | None = None) -> Changes:
        """Validate, write durably, then apply ``block``; BlockRejected writes nothing."""
        verdict = self.check(block, attest_proof)
        if not verdict.block_ok:
            assert verdict.block_reason is not None
            raise BlockRejected(block.header.height, verdict.block_reason)
        payloads = [_tag(REC_TX, encode_tx(tx)) for tx in block.txs]
        payloads.append(_tag(REC_HEAD, encode_head(block)))
        try:
            seqs = self.log.append_many(payloads)
        except PartitionFullError as exc:
            raise LedgerFullError(f"block {block.header.height} not written: {exc}"
                                  + (f" ({self.space_warning})" if self.space_warning else "")
                                  ) from exc
        changes = _fold(self.state, block, verdict, seqs[0], self.size,
                        [len(p) - 1 for p in payloads[:-1]])
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
        """Flash a snapshot of the current state takes (within about 1 %; see _SnapshotSize)."""
        return self.size.estimate(self.state)

    def _maybe_snapshot(self) -> None:
        """Snapshot when the free space would soon not hold one; never fails the append.

        When the live state no longer fits, the warning is kept and the append
        that finally finds the partition full raises LedgerFullError, having
        written nothing.
        """
        need = self.snapshot_bytes() + self.snapshot_headroom
        if self.log.stats().payload_bytes_free >= need:
            return
        try:
            self.snapshot()
            self.space_warning = None
        except LedgerFullError as exc:
            self.space_warning = str(exc)

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
        start = _encode_snap_start(self.state)
        digest = hashlib.sha256(DOMAIN_SNAPSHOT)
        digest.update(start)
        batch = [_tag(REC_SNAP_START, start)]
        moved: list[tuple[bytes, MeterEntry, int]] = []
        start_seq = first_seq = self.log.next_seq
        for meter_id, entry in self._meters():
            record = self.newest_record(meter_id)
            assert record is not None
            body = _encode_snap_meter(meter_id, entry, record.tx)
            digest.update(body)
            batch.append(_tag(REC_SNAP_METER, body))
            moved.append((meter_id, entry, first_seq + len(batch) - 1))
            if len(batch) >= 4096:  # bound RAM: write in group commits
                self.log.append_many(batch)
                first_seq = self.log.next_seq
                batch = []
        count = self.state.meter_count
        end = _encode_snap_end(count, digest.digest(), self.identity)
        batch.append(_tag(REC_SNAP_END, end))
        self.log.append_many(batch)
        for meter_id, entry, seq in moved:
            self.state.put_meter(meter_id, entry._replace(seq=seq))
        self._heads = array("Q")
        self._base = tip.height + 1
        self._snapshot_start = start_seq
        self.snapshots_written += 1
        return self.log.release(start_seq)

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
        """Re-read the whole chain from flash into a fresh state and compare with ours."""
        fresh = LedgerState()
        report = self._replay(fresh, deep=deep, keep=False)
        mine, theirs = self.state.tip, fresh.tip
        if mine != theirs:
            height = -1 if theirs is None else theirs.height
            raise ChainCorruptError(height, self.log.next_seq - 1,
                                    f"flash replays to tip {theirs}, RAM holds {mine}")
        return report

    def _replay(self, state: LedgerState, *, deep: bool, keep: bool = True) -> BootReport:
        """Scan every record: snapshots restore, blocks are validated and applied."""
        size = self.size if keep else _SnapshotSize()
        pending: list[int] = []  # record ids of T records waiting for their head
        pending_txs: list[bytes] = []
        snap: _SnapshotReader | None = None
        blocks = txs = invalid = orphans = abandoned = 0
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
                    lengths = [len(t) for t in pending_txs[len(pending_txs) - len(block.txs):]]
                    orphans += len(pending) - block.header.tx_count
                    pending, pending_txs = [], []
                    verdict = validate_block(state, block, placement_home=self.placement_home,
                                             require_pow=self.require_pow)
                    if not verdict.block_ok:
                        assert verdict.block_reason is not None
                        raise ChainCorruptError(height, seq, verdict.block_reason.name)
                    _fold(state, block, verdict, first, size, lengths)
                    if not heads:
                        base = height
                    heads.append(seq)
                    blocks += 1
                    txs += len(block.txs)
                    invalid += len(block.txs) - verdict.valid_txs
                elif kind == REC_SNAP_START:
                    orphans += len(pending)
                    pending, pending_txs = [], []
                    snap = _SnapshotReader(seq, body, self.identity, deep)
                    size.reset()
                elif kind == REC_SNAP_METER and snap is not None:
                    size.add_carried(*snap.meter(seq, body))
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
                          txs_replayed=txs, invalid_txs=invalid, orphans=orphans,
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


class _SnapshotSize:
    """Running account of a snapshot's flash size, so the trigger costs O(txs) per block.

    Exact for the id fields (each meter's id and home are tracked as they
    change); the transactions are counted at the mean length of the meter
    transactions seen (their lengths differ only by id lengths).
    """

    __slots__ = ("id_bytes", "tx_bytes", "tx_count")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.id_bytes = self.tx_bytes = self.tx_count = 0

    def add_carried(self, meter_id: bytes, home: str, tx_len: int) -> None:
        self.id_bytes += len(meter_id) + len(home)
        self.tx_bytes += tx_len
        self.tx_count += 1

    def change(self, old: MeterEntry | None, meter_id: bytes, home: str, tx_len: int) -> None:
        if old is None:
            self.id_bytes += len(meter_id) + len(home)
        else:
            self.id_bytes += len(home) - len(old.home)
        self.tx_bytes += tx_len
        self.tx_count += 1

    def estimate(self, state: LedgerState) -> int:
        meters = state.meter_count
        mean_tx = self.tx_bytes / self.tx_count if self.tx_count else MAX_TX_BYTES
        per_meter = _SNAP_METER_FIXED + mean_tx + REC_HEADER + ALIGN - 1
        per_terminal = 1 + TERMINAL_ID_MAX + PUBLIC_KEY_LEN + 16 + REC_HEADER
        return int(meters * per_meter + self.id_bytes
                   + state.terminal_count * per_terminal + 256)  # + the end record


def _fold(state: LedgerState, block: Block, verdict: Verdict, first_seq: int,
          size: _SnapshotSize, tx_lengths: list[int]) -> Changes:
    """Apply an accepted block and point each changed meter at its record on flash."""
    olds = {tx.meter_id: state.meter(tx.meter_id) for tx, code
            in zip(block.txs, verdict.tx_codes, strict=True)
            if code is None and tx.kind.is_meter}
    changes = apply_block(state, block, verdict)
    for change in changes.meters:
        state.put_meter(change.meter_id, change.entry._replace(seq=first_seq + change.tx_index))
        size.change(olds.get(change.meter_id), change.meter_id, change.entry.home,
                    tx_lengths[change.tx_index])
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


def scan_newest_record(log: RecordLog, meter_id: bytes) -> Transaction | None:
    """The paper's query (section 2.2.1, step 2): read back from the tail to the meter's record.

    O(records behind it): the baseline the index is measured against. It
    reads what is stored, so it also sees transactions a block marked
    invalid; the index does not (see rules.py).
    """
    for seq in range(log.next_seq - 1, log.first_seq - 1, -1):
        tx = _record_tx(log.read(seq))
        if tx is not None and tx.meter_id == meter_id:
            return tx
    return None


def _record_tx(payload: bytes) -> Transaction | None:
    """The transaction a stored record holds (a block's T or a snapshot's M), else None."""
    kind = payload[0] if payload else -1
    if kind == REC_TX:
        return decode_tx(payload[1:])
    if kind == REC_SNAP_METER:
        return _decode_snap_meter(payload[1:])[2]
    return None


# ------------------------------------------------------------- snapshot codec

def _encode_snap_start(state: LedgerState) -> bytes:
    tip = state.tip
    assert tip is not None
    w = Writer()
    w.u8(SNAPSHOT_VERSION)
    w.u64(tip.height)
    w.raw(tip.block_hash)
    w.u64(tip.timestamp_ms)
    terminals = state.terminals_in_order()
    w.u16(len(terminals))
    for info in terminals:
        w.terminal_id(info.terminal_id)
        w.raw(info.public_key)
        w.u64(info.added_height)
        w.u64(_NO_HEIGHT if info.retired_height is None else info.retired_height)
    w.u64(state.meter_count)
    return w.getvalue()


def _encode_snap_meter(meter_id: bytes, entry: MeterEntry, tx: Transaction) -> bytes:
    w = Writer()
    w.short_bytes(meter_id, METER_ID_MAX)
    w.u8(int(entry.status))
    w.u32(entry.key_version)
    w.raw(entry.fingerprint)
    w.terminal_id(entry.home)
    w.u64(entry.counter)
    w.u64(entry.height)
    w.u16(entry.tx_index)
    w.raw(encode_tx(tx))
    return w.getvalue()


def _decode_snap_meter(body: bytes) -> tuple[bytes, MeterEntry, Transaction]:
    meter_id, entry, raw_tx = _decode_snap_entry(body)
    tx = decode_tx(raw_tx)
    if tx.meter_id != meter_id:
        raise DecodeError("snapshot.tx", 0, "the carried record names another meter")
    return meter_id, entry, tx


def _decode_snap_entry(body: bytes) -> tuple[bytes, MeterEntry, bytes]:
    """A snapshot record's meter id and entry; its transaction left encoded (boot's fast path)."""
    r = Reader(body)
    meter_id = r.short_bytes("snapshot.meter_id", METER_ID_MIN, METER_ID_MAX)
    status = r.u8("snapshot.status")
    if status not in (MeterStatus.LIVE, MeterStatus.REVOKED):
        raise DecodeError("snapshot.status", 0, f"unknown meter status {status}")
    version = r.u32("snapshot.key_version")
    fingerprint = r.fixed("snapshot.fingerprint", HASH_LEN)
    home = r.terminal_id("snapshot.home")
    counter = r.u64("snapshot.counter")
    height = r.u64("snapshot.height")
    index = r.u16("snapshot.tx_index")
    raw_tx = r.fixed("snapshot.tx", r.remaining())
    return meter_id, MeterEntry(MeterStatus(status), version, fingerprint, home, counter,
                                height, index), raw_tx


def _encode_snap_end(count: int, digest: bytes, identity: TerminalIdentity) -> bytes:
    w = Writer()
    w.u64(count)
    w.raw(digest)
    w.raw(identity.sign(DOMAIN_SNAPSHOT + count.to_bytes(8, "big") + digest))
    return w.getvalue()


class _SnapshotReader:
    """Rebuilds a state from one snapshot's records, checking its digest and signature."""

    def __init__(self, seq: int, body: bytes, identity: TerminalIdentity, deep: bool):
        self.start_seq = seq
        self.identity = identity
        self.deep = deep
        self.digest = hashlib.sha256(DOMAIN_SNAPSHOT)
        self.digest.update(body)
        self.state = LedgerState()
        try:
            r = Reader(body)
            if r.u8("snapshot.version") != SNAPSHOT_VERSION:
                raise DecodeError("snapshot.version", 0, "unknown snapshot version")
            height = r.u64("snapshot.height")
            block_hash = r.fixed("snapshot.hash", HASH_LEN)
            timestamp = r.u64("snapshot.timestamp")
            for _ in range(r.u16("snapshot.terminals")):
                tid = r.terminal_id("snapshot.terminal")
                key = r.fixed("snapshot.public_key", PUBLIC_KEY_LEN)
                added = r.u64("snapshot.added")
                retired = r.u64("snapshot.retired")
                self.state.add_terminal(tid, key, added)
                if retired != _NO_HEIGHT:
                    self.state.retire_terminal(tid, retired)
            self.expected = r.u64("snapshot.meters")
            r.done("snapshot")
        except (DecodeError, ValueError) as exc:
            raise ChainCorruptError(-1, seq, f"snapshot start does not decode: {exc}") from exc
        self.state.advance_tip(Tip(height, block_hash, timestamp))
        self.height = height

    def meter(self, seq: int, body: bytes) -> tuple[bytes, str, int]:
        """Check and restore one meter; (meter id, home, tx length) for the size account."""
        self.digest.update(body)
        try:
            meter_id, entry, raw_tx = _decode_snap_entry(body)
            self.state.put_meter(meter_id, entry._replace(seq=seq))
            # The transaction is covered by the digest the end record signs; boot
            # leaves it encoded, ``verify(deep=True)`` decodes and checks it.
            tx = _decode_snap_meter(body)[2] if self.deep else None
        except (DecodeError, ValueError, KeyError) as exc:
            raise ChainCorruptError(self.height, seq, f"snapshot record: {exc}") from exc
        if tx is not None:
            info = self.state.terminal(tx.proposer)
            if info is None or not verify_signature(info.public_key, tx.signature,
                                                    signing_payload(tx)):
                raise ChainCorruptError(entry.height, seq, "a carried transaction's signature "
                                        "does not verify")
        return meter_id, entry.home, len(raw_tx)

    def end(self, seq: int, body: bytes) -> LedgerState:
        try:
            r = Reader(body)
            count = r.u64("snapshot.count")
            digest = r.fixed("snapshot.digest", HASH_LEN)
            signature = r.fixed("snapshot.signature", SIGNATURE_LEN)
            r.done("snapshot end")
        except DecodeError as exc:
            raise ChainCorruptError(self.height, seq, f"snapshot end: {exc}") from exc
        if count != self.expected or count != self.state.meter_count:
            raise ChainCorruptError(self.height, seq, f"snapshot holds "
                                    f"{self.state.meter_count} meters, says {count}")
        if digest != self.digest.digest():
            raise ChainCorruptError(self.height, seq, "snapshot records do not match its digest")
        if not verify_signature(self.identity.public_bytes(), signature,
                                DOMAIN_SNAPSHOT + count.to_bytes(8, "big") + digest):
            raise ChainCorruptError(self.height, seq, "snapshot is not signed by this terminal")
        return self.state

