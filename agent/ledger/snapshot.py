"""The snapshot codec: the live state written after the tip, read back at boot.

A snapshot is three kinds of chain record (the chain tags them S, M, E):

    S  start: version u8, anchor height u64, hash 32, time u64, genesis hash 32,
       terminals u16 x (id, public key 32, added u64, retired u64 | 2^64-1),
       meter count u64
    M  one meter: id len8, status u8, version u32, fingerprint 32, home tid,
       counter u64, height u64, tx index u16, its newest transaction (encode_tx)
    E  end: meter count u64, SHA-256 over DOMAIN_SNAPSHOT + S + every M,
       this terminal's Ed25519 signature over DOMAIN_SNAPSHOT + count + digest

``SnapshotReader`` rebuilds a ``LedgerState`` from them, checking the
digest and the signature; ``SnapshotSize`` keeps a running upper bound of
the flash a snapshot of the current state needs, so deciding when to take
one costs nothing per block.
"""

from __future__ import annotations

import hashlib

from agent.ledger.codec import (
    HASH_LEN,
    PUBLIC_KEY_LEN,
    SIGNATURE_LEN,
    ZERO_HASH,
    DecodeError,
    Reader,
    Writer,
)
from agent.ledger.errors import ChainCorruptError
from agent.ledger.identity import TerminalIdentity, verify_signature
from agent.ledger.state import LedgerState, MeterEntry, MeterStatus, Tip
from agent.ledger.tx import Transaction, decode_tx, encode_tx, signing_payload
from hal.ids import METER_ID_MAX, METER_ID_MIN, TERMINAL_ID_MAX
from hal.recordlog import ALIGN, record_size

SNAPSHOT_VERSION = 2  # 2: the start record names the genesis
DOMAIN_SNAPSHOT = b"edgekey/snapshot/v1"
_NO_HEIGHT = 2**64 - 1  # "not retired" in a snapshot's membership list

# Bytes of one M record's payload (tag included) besides its ids, from the
# layout above and tx.py's: the tag; the entry's id and home length bytes,
# status, version, fingerprint, counter, height, tx index; the carried
# transaction's version, kind, three id length bytes, key version,
# fingerprint, proof, counter and signature. Its meter id and home each
# appear twice (entry and transaction: a meter's newest transaction always
# names its current home), the transaction's proposer once.
SNAP_METER_BASE = 1 + (2 + 1 + 4 + HASH_LEN + 8 + 8 + 2) + (2 + 3 + 4 + HASH_LEN + HASH_LEN
                                                           + 8 + SIGNATURE_LEN)
# A terminal in the start record, at most; the start record's fixed part; the end record.
_SNAP_TERMINAL_MAX = 1 + TERMINAL_ID_MAX + PUBLIC_KEY_LEN + 8 + 8
_SNAP_START_FIXED = 1 + 1 + 8 + HASH_LEN + 8 + HASH_LEN + 2 + 8
_SNAP_END = 1 + 8 + HASH_LEN + SIGNATURE_LEN
# The largest M record: both ids at their caps.
SNAP_METER_MAX = SNAP_METER_BASE + 2 * METER_ID_MAX + 3 * TERMINAL_ID_MAX


def encode_start(state: LedgerState) -> bytes:
    tip = state.tip
    assert tip is not None
    w = Writer()
    w.u8(SNAPSHOT_VERSION)
    w.u64(tip.height)
    w.raw(tip.block_hash)
    w.u64(tip.timestamp_ms)
    w.raw(state.genesis_hash or ZERO_HASH)
    terminals = state.terminals_in_order()
    w.u16(len(terminals))
    for info in terminals:
        w.terminal_id(info.terminal_id)
        w.raw(info.public_key)
        w.u64(info.added_height)
        w.u64(_NO_HEIGHT if info.retired_height is None else info.retired_height)
    w.u64(state.meter_count)
    return w.getvalue()


def encode_meter(meter_id: bytes, entry: MeterEntry, tx: Transaction) -> bytes:
    w = Writer()
    w.meter_id(meter_id)
    w.u8(int(entry.status))
    w.u32(entry.key_version)
    w.raw(entry.fingerprint)
    w.terminal_id(entry.home)
    w.u64(entry.counter)
    w.u64(entry.height)
    w.u16(entry.tx_index)
    w.raw(encode_tx(tx))
    return w.getvalue()


def decode_meter(body: bytes) -> tuple[bytes, MeterEntry, Transaction]:
    """A meter record's id (a MeterId), entry and transaction, or DecodeError naming the field."""
    meter_id, entry, raw_tx = decode_entry(body)
    tx = decode_tx(raw_tx)
    if tx.meter_id != meter_id:
        raise DecodeError("snapshot.tx", 0, "the carried record names another meter")
    return tx.meter_id, entry, tx


def decode_entry(body: bytes) -> tuple[bytes, MeterEntry, bytes]:
    """A meter record's id and entry; its transaction left encoded (boot's fast path).

    The id stays plain bytes: it goes straight into the state's table, which
    keeps plain bytes (state.py), so a MeterId here would be made only to be
    copied back, once per meter at boot.
    """
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


def encode_end(count: int, digest: bytes, identity: TerminalIdentity) -> bytes:
    w = Writer()
    w.u64(count)
    w.raw(digest)
    w.raw(identity.sign(_end_payload(count, digest)))
    return w.getvalue()


def _end_payload(count: int, digest: bytes) -> bytes:
    return DOMAIN_SNAPSHOT + count.to_bytes(8, "big") + digest


def new_digest(start: bytes) -> hashlib._Hash:
    """The running digest a snapshot's end record seals, started on its start record."""
    digest = hashlib.sha256(DOMAIN_SNAPSHOT)
    digest.update(start)
    return digest


class SnapshotReader:
    """Rebuilds a state from one snapshot's records, checking its digest and signature."""

    def __init__(self, seq: int, body: bytes, identity: TerminalIdentity, deep: bool):
        self.start_seq = seq
        self.identity = identity
        self.deep = deep
        self.digest = new_digest(body)
        self.state = LedgerState()
        try:
            r = Reader(body)
            if r.u8("snapshot.version") != SNAPSHOT_VERSION:
                raise DecodeError("snapshot.version", 0, "unknown snapshot version")
            height = r.u64("snapshot.height")
            block_hash = r.fixed("snapshot.hash", HASH_LEN)
            timestamp = r.u64("snapshot.timestamp")
            genesis = r.fixed("snapshot.genesis", HASH_LEN)
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
        self.state.genesis_hash = None if genesis == ZERO_HASH else genesis
        self.height = height

    def meter(self, seq: int, body: bytes) -> tuple[bytes, str]:
        """Check and restore one meter; (meter id, home) for the size account."""
        self.digest.update(body)
        try:
            meter_id, entry, _ = decode_entry(body)
            self.state.put_meter(meter_id, entry._replace(seq=seq))
            # The transaction is covered by the digest the end record signs; boot
            # leaves it encoded, ``verify(deep=True)`` decodes and checks it.
            tx = decode_meter(body)[2] if self.deep else None
        except (DecodeError, ValueError, KeyError) as exc:
            raise ChainCorruptError(self.height, seq, f"snapshot record: {exc}") from exc
        if tx is not None:
            info = self.state.terminal(tx.proposer)
            if info is None or not verify_signature(info.public_key, tx.signature,
                                                    signing_payload(tx)):
                raise ChainCorruptError(entry.height, seq, "a carried transaction's signature "
                                        "does not verify")
        return meter_id, entry.home

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
                                _end_payload(count, digest)):
            raise ChainCorruptError(self.height, seq, "snapshot is not signed by this terminal")
        return self.state


class SnapshotSize:
    """Running upper bound of a snapshot's flash size, so the trigger costs O(1) per change.

    Exact for the ids of every meter (tracked as they change home); the
    carried transaction's proposer is counted at the longest terminal id, and
    each record at its largest padding: the bound never undershoots whatever
    mix of id lengths the meters have, and is tight when ids share a length.
    """

    __slots__ = ("id_bytes",)

    def __init__(self) -> None:
        self.id_bytes = 0  # sum over meters of 2 * (len(meter id) + len(home))

    def reset(self) -> None:
        self.id_bytes = 0

    def add(self, meter_id: bytes, home: str) -> None:
        self.id_bytes += 2 * (len(meter_id) + len(home))

    def change(self, old: MeterEntry | None, meter_id: bytes, home: str) -> None:
        if old is None:
            self.add(meter_id, home)
        else:
            self.id_bytes += 2 * (len(home) - len(old.home))

    def estimate(self, state: LedgerState, segment_bytes: int) -> int:
        """Bytes of records a snapshot of ``state`` takes on a log of ``segment_bytes`` blocks."""
        terminals = state.terminals_in_order()
        longest = max((len(t.terminal_id) for t in terminals), default=TERMINAL_ID_MAX)
        overhead = record_size(0) + ALIGN - 1  # header, end marker and padding, at most
        meters = state.meter_count
        raw = (meters * (SNAP_METER_BASE + longest + overhead) + self.id_bytes
               + _SNAP_START_FIXED + len(terminals) * _SNAP_TERMINAL_MAX + overhead
               + _SNAP_END + overhead)
        # records never cross an erase block: each block's tail may stay unused
        per_block = max(1, segment_bytes - record_size(0) - 64)
        return raw + (raw // per_block + 2) * (SNAP_METER_MAX + overhead)
