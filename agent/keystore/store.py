"""The meter key store: keys encrypted at rest in a record log on the keystore partition.

Keys never touch flash in clear (DESIGN.md, "Storage on flash"). Every record
is one RecordLog record (hal/recordlog.py: checksummed, durable on return, a
torn write recovers the previous state) whose payload is:

    format u8 = 1 | kind u8 | meter id length u8 | version u32 | meter id |
    nonce 12 | AES-256-GCM(device key, plaintext, AAD)

with AAD = b"edgekey/keystore/v1" + the header and meter id before the
nonce, so a ciphertext cannot be moved to another meter, version or kind.
Kinds: KEY (plaintext: the 32-byte key), TOMBSTONE (the meter was revoked:
every version destroyed), RETIRE (versions below ``version`` dropped),
KEYCHECK (empty plaintext: its tag proves the device key on open), FILLER
(format and kind bytes, then zeros; unauthenticated padding that closes a
segment before a compaction). Random 96-bit nonces: fine for far fewer than
2^32 records under one device key (NIST SP 800-38D 8.3).

Index. Opening scans the log once (O(records), headers only, no
decryption) into RAM: meter id -> {version: record id}; lookups are O(1)
and cost one flash read and one AES-GCM decryption.

Versions. A meter's first version (new, or after a destroy) may be any u32:
the ledger numbers key lines, and a migrated meter arrives with its current
version. After that each put must be newest + 1 (the paper's update step).
Older versions stay readable until ``retire``.

Commit protocol (DESIGN.md, data path: nothing is written to the key store,
and nothing erased, for an operation that has not committed). ``prepare_*``
checks what a meter sent (unwraps a rotation proof under the newest key,
refuses a key the meter held before) and returns a ``PreparedKey``, writing
nothing; ``commit_key`` stores it once the ledger block has committed, and
is idempotent (a retry after a reboot, or a block delivered twice, is a
no-op); a prepared key that never commits is simply dropped. ``destroy``
and ``hand_over`` are called only for a committed REVOKE or MIGRATE.

Compaction. RecordLog.release frees only whole oldest segments, never the
open one. A compaction therefore (1) closes the open segment with a FILLER
record that fills it exactly, (2) copies every live record older than the
boundary to the tail, oldest first, in chunks, releasing the segments
behind the copies after each chunk, (3) releases everything before the
boundary: every old segment is erased. Copies are verbatim (same nonce and
ciphertext), so replaying a log holding both the original and its copy
gives the same index: a power cut anywhere leaves a consistent store.
Live records: the key check, live KEY versions, TOMBSTONEs of destroyed
meters. RETIREs need no copy: they affect only older records, which a
release erases first.

Destruction (the paper's revoke). ``destroy`` writes the TOMBSTONE, then
compacts up to just past the segment holding the meter's newest record
(all its other records are older), falling back to a whole compaction when
that segment is the open one; the meter's ciphertext is then erased from
flash, not merely hidden. If power fails in between, the next open sees
records that a TOMBSTONE kills still on flash and finishes the purge.

Space. Before each write the store keeps HEADROOM_SEGMENTS free segments;
below that it compacts, and if the live set still leaves less it refuses
puts with StoreFullError (RecordLog's PartitionFullError is never
reached); retire and destroy shrink the live set and still run, so a full
store can always revoke. The live set may use up to the partition minus
the headroom; near that limit compactions run often (each copies the
live set).
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.keystore.material import (
    KEY_BYTES,
    BadProofError,
    Entropy,
    ProofFault,
    check_key,
    fingerprint,
    open_rotation_proof,
)
from agent.keystore.transport import AllowList, seal_envelope
from hal.blockdev import BlockDevice, open_partition
from hal.board import Flash
from hal.ids import METER_ID_MAX, METER_ID_MIN, MeterId
from hal.recordlog import (
    DATA_START,
    LogCorruptError,
    LogStats,
    PartitionFullError,
    RecordLog,
    RecoveryReport,
    record_size,
)

PARTITION = "keystore"
FORMAT_VERSION = 1
STORE_LABEL = b"edgekey/keystore/v1"
DEVICE_KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # AES-GCM's 96-bit IV
TAG_BYTES = 16
MAX_VERSION = 0xFFFF_FFFF  # u32, as on the ledger

_HEAD = struct.Struct("<BBBI")  # format, kind, meter id length, version
_FILLER_MIN = 2  # format and kind bytes

# Free segments kept before every write: one the write may open, two that a
# compaction's copies may fill before the first old segment is released,
# one spare for a compaction redone after a power cut left copies behind.
HEADROOM_SEGMENTS = 4
# Copies are written in chunks of a quarter segment, releasing behind each:
# bounds the RAM a compaction holds and how far copies run ahead of releases.
_CHUNK_DIVISOR = 4


class Kind(enum.IntEnum):
    KEY = 1
    TOMBSTONE = 2
    RETIRE = 3
    KEYCHECK = 4
    FILLER = 5


_SEALED_BYTES = {Kind.KEY: KEY_BYTES + TAG_BYTES, Kind.TOMBSTONE: TAG_BYTES,
                 Kind.RETIRE: TAG_BYTES, Kind.KEYCHECK: TAG_BYTES}


class MeterStatus(enum.Enum):
    UNKNOWN = "unknown"  # never held here, or its records were released
    LIVE = "live"
    DESTROYED = "destroyed"  # not held here: revoked or handed over, every ciphertext erased


class KeyStoreError(Exception):
    """Base of the key store's errors."""


class UnknownKeyError(KeyStoreError, KeyError):
    """The store holds no such meter, or no such live version of it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class KeyDestroyedError(KeyStoreError):
    """The meter was revoked; its keys are destroyed."""


class VersionError(KeyStoreError, ValueError):
    """A put whose version is not the meter's next one, or a retire of the newest."""


class DeviceKeyError(KeyStoreError):
    """The device key does not open this store (another device's store, or a wrong key)."""


class StoreCorruptError(KeyStoreError):
    """A record on flash does not decode or authenticate: damage, not a wrong device key."""


class StoreFullError(KeyStoreError):
    """The live set leaves no room for the write even after compaction; nothing was written."""


class KeyConflictError(KeyStoreError):
    """A commit names a version this store holds with another key: never overwritten."""


@dataclass(frozen=True)
class PreparedKey:
    """A checked key waiting for its ledger block: nothing of it is on flash yet."""

    meter_id: bytes
    version: int
    key: bytes

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.key)

    def __repr__(self) -> str:  # never print key material
        return f"PreparedKey(meter_id={self.meter_id.hex()}, version={self.version})"


# ------------------------------------------------------------------ records

@dataclass(frozen=True)
class StoredRecord:
    """One key-store record as it sits in a RecordLog payload."""

    kind: Kind
    meter_id: bytes  # a MeterId; empty for KEYCHECK and FILLER
    version: int  # KEY: its version; TOMBSTONE: newest destroyed; RETIRE: first kept
    nonce: bytes  # empty for FILLER
    sealed: bytes  # ciphertext and tag; FILLER: zero padding

    def header(self) -> bytes:
        if self.kind is Kind.FILLER:
            return bytes((FORMAT_VERSION, Kind.FILLER))
        return _HEAD.pack(FORMAT_VERSION, self.kind, len(self.meter_id), self.version) + \
            self.meter_id

    def aad(self) -> bytes:
        """Associated data binding the ciphertext to format, kind, meter id and version."""
        return STORE_LABEL + self.header()


def _check_version(version: int) -> int:
    if not isinstance(version, int) or isinstance(version, bool):
        raise TypeError(f"key version must be an int, not {type(version).__name__}")
    if not 0 <= version <= MAX_VERSION:
        raise ValueError(f"key version {version} is outside 0..{MAX_VERSION}")
    return version


def record_payload_size(kind: Kind, meter_id_len: int) -> int:
    """Payload bytes of a sealed record (not FILLER)."""
    return _HEAD.size + meter_id_len + NONCE_BYTES + _SEALED_BYTES[kind]


def encode_record(rec: StoredRecord) -> bytes:
    return rec.header() + rec.nonce + rec.sealed


def decode_record(payload: bytes) -> StoredRecord:
    """The record in a log payload; StoreCorruptError naming the field otherwise."""
    data = bytes(payload)

    def bad(field: str, offset: int, why: str) -> StoreCorruptError:
        return StoreCorruptError(f"key-store record: {field} at byte {offset}: {why}")

    if len(data) < _FILLER_MIN:
        raise bad("header", 0, f"{len(data)} bytes")
    if data[0] != FORMAT_VERSION:
        raise bad("format", 0, f"{data[0]} is not {FORMAT_VERSION}")
    try:
        kind = Kind(data[1])
    except ValueError:
        raise bad("kind", 1, f"unknown kind {data[1]}") from None
    if kind is Kind.FILLER:
        pad = data[_FILLER_MIN:]
        if pad.count(0) != len(pad):
            raise bad("filler", _FILLER_MIN, "padding is not zeros")
        return StoredRecord(kind, b"", 0, b"", pad)
    if len(data) < _HEAD.size:
        raise bad("header", 0, f"{len(data)} bytes, need {_HEAD.size}")
    _, _, mlen, version = _HEAD.unpack_from(data)
    if kind is Kind.KEYCHECK:
        if mlen or version:
            raise bad("key check", 2, "meter id length and version must be zero")
    elif not METER_ID_MIN <= mlen <= METER_ID_MAX:
        raise bad("meter id length", 2, f"{mlen} outside {METER_ID_MIN}..{METER_ID_MAX}")
    size = record_payload_size(kind, mlen)
    if len(data) != size:
        raise bad("length", len(data), f"{kind.name} record is {len(data)} bytes, expected {size}")
    pos = _HEAD.size
    mid = MeterId(data[pos:pos + mlen]) if mlen else b""  # the length was checked above
    nonce = data[pos + mlen:pos + mlen + NONCE_BYTES]
    return StoredRecord(kind, mid, version, nonce, data[pos + mlen + NONCE_BYTES:])


def filler_record(payload_len: int) -> bytes:
    """A FILLER payload of exactly ``payload_len`` bytes (at least 2)."""
    if payload_len < _FILLER_MIN:
        raise ValueError(f"a filler record needs at least {_FILLER_MIN} bytes")
    return bytes((FORMAT_VERSION, Kind.FILLER)) + bytes(payload_len - _FILLER_MIN)


# -------------------------------------------------------------------- store

class _Meter:
    """Index entry: live versions -> record id; tomb_seq > 0 when destroyed."""

    __slots__ = ("tomb_seq", "versions")

    def __init__(self) -> None:
        self.versions: dict[int, int] = {}
        self.tomb_seq = 0


@dataclass(frozen=True)
class OpenReport:
    """What opening the store found and did."""

    records_scanned: int
    live_meters: int
    destroyed_meters: int
    created: bool  # an empty partition: the key check was written
    purge_finished: bool  # a destroy cut short by power loss was completed
    log: RecoveryReport


@dataclass(frozen=True)
class StoreStats:
    live_meters: int
    destroyed_meters: int
    live_versions: int
    live_bytes: int  # flash bytes the live records take (what a compaction copies)
    compactions: int  # since open
    log: LogStats


class KeyStore:
    """Meter keys at rest on one partition, encrypted under the device key (module doc)."""

    def __init__(self, device: BlockDevice, device_key: bytes, *,
                 entropy: Entropy = os.urandom):
        if not isinstance(device_key, bytes | bytearray) or len(device_key) != DEVICE_KEY_BYTES:
            raise ValueError(f"the device key must be {DEVICE_KEY_BYTES} bytes")
        self._aead = AESGCM(bytes(device_key))
        self._entropy = entropy
        self._index: dict[bytes, _Meter] = {}
        self._keycheck_seq = 0
        self._live_bytes = 0
        self.compactions = 0
        try:
            self._log = RecordLog(device)
        except LogCorruptError as exc:
            raise StoreCorruptError(f"key-store partition damaged: {exc}") from exc
        self._seg_bytes = self._log.segment_bytes
        # records per segment, at most: sealed records are >= a key check's size, and a
        # filler only ever ends a segment (a wrong bound costs a fallback, never a key)
        smallest = record_size(record_payload_size(Kind.KEYCHECK, 0))
        self._per_segment = (self._seg_bytes - DATA_START) // smallest + 1
        self._chunk_bytes = (self._seg_bytes - DATA_START) // _CHUNK_DIVISOR
        scanned, purge_below = self._replay()
        self._log.erase_dirty()  # a power cut mid-erase can leave old bytes in a free segment
        created = self._keycheck_seq == 0
        if created:
            rec = self._seal(Kind.KEYCHECK, b"", 0, b"")
            self._keycheck_seq = self._log.append(encode_record(rec))
            self._live_bytes += record_size(len(encode_record(rec)))
        if purge_below:
            self._purge(purge_below)
        destroyed = sum(1 for m in self._index.values() if m.tomb_seq)
        self.report = OpenReport(scanned, len(self._index) - destroyed, destroyed, created,
                                 bool(purge_below), self._log.report)

    @classmethod
    def on_board(cls, device: BlockDevice, flash: Flash, device_key: bytes, *,
                 entropy: Entropy = os.urandom) -> KeyStore:
        """The store on the board's ``keystore`` partition of ``device``."""
        return cls(open_partition(device, flash, PARTITION), device_key, entropy=entropy)

    # ------------------------------------------------------------ opening

    @property
    def log(self) -> RecordLog:
        """The record log under the store, for flash reports (use, wear); read it, never write."""
        return self._log

    def _replay(self) -> tuple[int, int]:
        """Rebuild the index from the log: (records scanned, newest record a tombstone kills).

        Only headers are parsed; the key check, then every TOMBSTONE and
        RETIRE (rare), are authenticated once the whole log is read.
        """
        to_verify: list[tuple[int, StoredRecord]] = []
        last_key: dict[bytes, int] = {}  # meter -> its newest KEY record so far
        keycheck: StoredRecord | None = None
        killed = 0
        scanned = 0
        try:
            for seq, payload in self._log.records():
                scanned += 1
                try:
                    rec = decode_record(payload)
                except StoreCorruptError as exc:
                    raise StoreCorruptError(f"record {seq}: {exc}") from None
                kind, mid = rec.kind, rec.meter_id
                if kind is Kind.KEY:
                    m = self._index.get(mid)
                    if m is None:
                        m = self._index[mid] = _Meter()
                    m.tomb_seq = 0
                    m.versions[rec.version] = seq
                    last_key[mid] = seq
                elif kind is Kind.TOMBSTONE:
                    m = self._index.get(mid)
                    if m is None:
                        m = self._index[mid] = _Meter()
                    m.versions = {}
                    m.tomb_seq = seq
                    killed = max(killed, last_key.pop(mid, 0))
                    to_verify.append((seq, rec))
                elif kind is Kind.RETIRE:
                    # the versions it keeps may sit after it: copies of them moved forward
                    m = self._index.get(mid)
                    if m is not None and not m.tomb_seq:
                        m.versions = {v: s for v, s in m.versions.items() if v >= rec.version}
                    to_verify.append((seq, rec))
                elif kind is Kind.KEYCHECK:
                    keycheck, self._keycheck_seq = rec, seq
        except LogCorruptError as exc:
            raise StoreCorruptError(f"key-store partition damaged: {exc}") from exc
        empty = [mid for mid, m in self._index.items() if not m.versions and not m.tomb_seq]
        if empty:  # a retire never drops a meter's newest version: it must still be on flash
            raise StoreCorruptError(f"meter {empty[0].hex()} has no live version left on flash "
                                    f"({len(empty)} meter(s) so)")
        if keycheck is None:
            if scanned:
                raise StoreCorruptError(f"the key-store partition holds {scanned} records but "
                                        "no key-check record")
            return 0, 0
        try:
            self._aead.decrypt(keycheck.nonce, keycheck.sealed, keycheck.aad())
        except InvalidTag:
            raise DeviceKeyError(
                f"the device key does not open this key store (key-check record "
                f"{self._keycheck_seq}): it belongs to another device or the key is wrong"
            ) from None
        for seq, rec in to_verify:
            self._open_sealed(seq, rec)
        self._live_bytes = record_size(len(encode_record(keycheck)))
        for mid, m in self._index.items():
            self._live_bytes += self._entry_bytes(mid, m)
        return scanned, killed

    @staticmethod
    def _entry_bytes(mid: bytes, m: _Meter) -> int:
        if m.tomb_seq:
            return record_size(record_payload_size(Kind.TOMBSTONE, len(mid)))
        return len(m.versions) * record_size(record_payload_size(Kind.KEY, len(mid)))

    # -------------------------------------------------------------- crypto

    def _seal(self, kind: Kind, mid: bytes, version: int, plaintext: bytes) -> StoredRecord:
        nonce = self._entropy(NONCE_BYTES)
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"entropy source returned {len(nonce)} bytes, asked for "
                             f"{NONCE_BYTES}")
        rec = StoredRecord(kind, mid, version, bytes(nonce), b"")
        return StoredRecord(kind, mid, version, rec.nonce,
                            self._aead.encrypt(rec.nonce, plaintext, rec.aad()))

    def _open_sealed(self, seq: int, rec: StoredRecord) -> bytes:
        try:
            return self._aead.decrypt(rec.nonce, rec.sealed, rec.aad())
        except InvalidTag:
            raise StoreCorruptError(f"record {seq} ({rec.kind.name}) fails authentication "
                                    "under the device key") from None

    # ------------------------------------------------------------- lookups

    def _entry(self, meter_id: bytes) -> _Meter:
        mid = MeterId(meter_id)
        m = self._index.get(mid)
        if m is None:
            raise UnknownKeyError(f"no key of meter {mid.hex()} is held here")
        if m.tomb_seq:
            raise KeyDestroyedError(f"meter {mid.hex()} was revoked; its keys are destroyed")
        return m

    def status(self, meter_id: bytes) -> MeterStatus:
        m = self._index.get(MeterId(meter_id))
        if m is None:
            return MeterStatus.UNKNOWN
        return MeterStatus.DESTROYED if m.tomb_seq else MeterStatus.LIVE

    def versions(self, meter_id: bytes) -> tuple[int, ...]:
        """The meter's live versions, oldest first; empty unless its status is LIVE."""
        m = self._index.get(MeterId(meter_id))
        return tuple(sorted(m.versions)) if m is not None else ()

    def newest(self, meter_id: bytes) -> int:
        return max(self._entry(meter_id).versions)

    def live_meters(self) -> list[bytes]:
        return [mid for mid, m in self._index.items() if not m.tomb_seq]

    def get(self, meter_id: bytes, version: int | None = None) -> bytes:
        """The key of ``meter_id`` (its newest live version unless ``version`` is given)."""
        m = self._entry(meter_id)
        mid = MeterId(meter_id)
        v = max(m.versions) if version is None else _check_version(version)
        seq = m.versions.get(v)
        if seq is None:
            raise UnknownKeyError(f"meter {mid.hex()} has no live version {v} "
                                  f"(holds {sorted(m.versions)})")
        try:
            rec = decode_record(self._log.read(seq))
        except (LogCorruptError, StoreCorruptError) as exc:
            raise StoreCorruptError(f"record {seq} of meter {mid.hex()}: {exc}") from exc
        if (rec.kind, rec.meter_id, rec.version) != (Kind.KEY, mid, v):
            raise StoreCorruptError(f"record {seq} is not version {v} of meter {mid.hex()}")
        return self._open_sealed(seq, rec)

    def export(self, meter_id: bytes, requester_id: bytes, allow_list: AllowList,
               version: int | None = None) -> bytes:
        """The key wrapped to an allowed requester (transport.py); NotAuthorisedError otherwise."""
        allow_list.public_key(requester_id)  # refuse before decrypting anything
        v = self.newest(meter_id) if version is None else version
        key = self.get(meter_id, v)
        return seal_envelope(key, meter_id=MeterId(meter_id), key_version=v,
                             requester_id=bytes(requester_id), allow_list=allow_list,
                             entropy=self._entropy)

    # -------------------------------------------------------------- writes

    def _checked_next(self, meter_id: bytes, version: int, key: bytes
                      ) -> tuple[MeterId, bytes, _Meter | None]:
        """Validate the id, version and key; VersionError unless ``version`` comes next."""
        mid = MeterId(meter_id)
        _check_version(version)
        key = check_key(key)
        m = self._index.get(mid)
        if m is not None and not m.tomb_seq:
            newest = max(m.versions)
            if version != newest + 1:
                raise VersionError(f"meter {mid.hex()} holds versions up to {newest}; "
                                   f"the next is {newest + 1}, not {version}")
        return mid, key, m

    def prepare_key(self, meter_id: bytes, version: int, key: bytes) -> PreparedKey:
        """Check that ``key`` may become ``version`` of the meter; writes nothing.

        VersionError unless ``version`` is the next one (any version for a
        meter not held); BadProofError(KEY_REUSED) for a key it held before.
        """
        mid, key, m = self._checked_next(meter_id, version, key)
        if m is not None and not m.tomb_seq and any(self.get(mid, v) == key for v in m.versions):
            raise BadProofError(ProofFault.KEY_REUSED, f"meter {mid.hex()}")
        return PreparedKey(mid, version, key)

    def prepare_rotation(self, meter_id: bytes, proof: bytes) -> PreparedKey:
        """The paper's update, checked: open ``proof`` under the newest key; writes nothing.

        BadProofError (material.py) when the proof does not open, or opens
        to a key the meter held before.
        """
        version = self.newest(meter_id)
        new = open_rotation_proof(self.get(meter_id, version), proof)
        return self.prepare_key(meter_id, version + 1, new)

    def commit_key(self, prepared: PreparedKey) -> bool:
        """Store a prepared key once its block has committed; False when already stored.

        Idempotent: the same version with the same key is a no-op;
        KeyConflictError for the same version with another key.
        """
        m = self._index.get(prepared.meter_id)
        if m is not None and prepared.version in m.versions:
            if self.get(prepared.meter_id, prepared.version) != prepared.key:
                raise KeyConflictError(f"meter {prepared.meter_id.hex()} version "
                                       f"{prepared.version} is held with another key")
            return False
        self.put(prepared.meter_id, prepared.version, prepared.key)
        return True

    def put(self, meter_id: bytes, version: int, key: bytes) -> None:
        """Store ``key`` as ``version`` of the meter; durable when this returns.

        The node stores keys through ``commit_key``; this is the raw write.
        """
        mid, key, m = self._checked_next(meter_id, version, key)
        rec = self._seal(Kind.KEY, mid, version, key)
        self._make_room()
        seq = self._log.append(encode_record(rec))
        if m is None:
            m = self._index[mid] = _Meter()
        self._live_bytes -= self._entry_bytes(mid, m) if m.tomb_seq else 0
        m.tomb_seq = 0
        m.versions[version] = seq
        self._live_bytes += record_size(record_payload_size(Kind.KEY, len(mid)))

    def retire(self, meter_id: bytes, keep_from: int) -> int:
        """Drop the versions older than ``keep_from``; returns how many were dropped.

        Their ciphertext leaves flash at a later compaction (``destroy`` erases at once).
        """
        m = self._entry(meter_id)
        mid = MeterId(meter_id)
        newest = max(m.versions)
        if _check_version(keep_from) > newest:
            raise VersionError(f"retiring below {keep_from} would drop the newest version "
                               f"{newest} of meter {mid.hex()}")
        dropped = [v for v in m.versions if v < keep_from]
        if not dropped:
            return 0
        rec = self._seal(Kind.RETIRE, mid, keep_from, b"")
        self._make_room(grows=False)
        self._log.append(encode_record(rec))
        for v in dropped:
            del m.versions[v]
        self._live_bytes -= len(dropped) * record_size(record_payload_size(Kind.KEY, len(mid)))
        return len(dropped)

    def destroy(self, meter_id: bytes) -> None:
        """Revoke: erase every version's ciphertext from flash, leave a tombstone.

        Idempotent on a meter already destroyed; UnknownKeyError for one never held.
        """
        mid = MeterId(meter_id)
        m = self._index.get(mid)
        if m is None:
            raise UnknownKeyError(f"no key of meter {mid.hex()} is held here")
        if m.tomb_seq:
            return
        rec = self._seal(Kind.TOMBSTONE, mid, max(m.versions), b"")
        self._make_room(grows=False)
        newest_record = max(m.versions.values())  # every record of the meter is this or older
        seq = self._log.append(encode_record(rec))
        self._live_bytes -= self._entry_bytes(mid, m)
        m.versions = {}
        m.tomb_seq = seq
        self._live_bytes += self._entry_bytes(mid, m)
        self._purge(newest_record)

    def hand_over(self, meter_id: bytes) -> None:
        """After a migration the new home holds the key: erase this copy as a revoke does.

        The store keeps no reason (DESTROYED means "no key here"); the chain
        says whether the meter was revoked or moved.
        """
        self.destroy(meter_id)

    # ---------------------------------------------------------- compaction

    def _make_room(self, *, grows: bool = True) -> None:
        """Keep HEADROOM_SEGMENTS free before a write; StoreFullError if the live set forbids.

        Writes that shrink the live set (retire, destroy) proceed on the
        headroom itself: a full store must still be able to revoke.
        """
        if self._log.stats().free_segments >= HEADROOM_SEGMENTS:
            return
        self._compact_all()
        free = self._log.stats().free_segments
        if free < HEADROOM_SEGMENTS and grows:
            raise StoreFullError(
                f"key store full: {self._live_bytes} bytes of live records leave {free} free "
                f"erase blocks after compaction, {HEADROOM_SEGMENTS} are needed; retire old "
                "versions or destroy revoked meters")

    def _tail_room(self) -> int:
        """Payload bytes the open segment still takes (0 if none, sealed or full).

        Derived from LogStats: payload_bytes_free is the tail's room plus
        max_payload for every free segment (no reserve: no compactor hook).
        """
        st = self._log.stats()
        usable = max(0, st.free_segments - self._log.reserve)
        return st.payload_bytes_free - usable * self._log.max_payload

    def _compact_all(self) -> None:
        """Close the open segment, copy the live set forward, erase every older segment."""
        room = self._tail_room()
        if room > 0:  # fills the segment to its last byte: the next record opens a new one
            self._log.append(filler_record(room))
        boundary = self._log.next_seq
        self._compact(boundary)
        if self._log.first_seq != boundary:
            raise KeyStoreError(f"compaction left records {self._log.first_seq}..{boundary - 1} "
                                "on flash; the open segment was not closed")

    def _compact(self, boundary: int) -> None:
        """Copy live records older than ``boundary`` to the tail; release what is behind them."""
        owners: dict[int, tuple[bytes, int]] = {}  # record id -> (meter, version or -1: tomb)
        if self._keycheck_seq < boundary:
            owners[self._keycheck_seq] = (b"", -1)
        for mid, m in self._index.items():
            if m.tomb_seq:
                if m.tomb_seq < boundary:
                    owners[m.tomb_seq] = (mid, -1)
                continue
            for v, s in m.versions.items():
                if s < boundary:
                    owners[s] = (mid, v)
        todo = sorted(owners)
        self.compactions += 1
        i = 0
        while i < len(todo):
            chunk: list[tuple[int, bytes]] = []
            size = 0
            while i < len(todo) and size < self._chunk_bytes:
                payload = self._log.read(todo[i])
                chunk.append((todo[i], payload))
                size += record_size(len(payload))
                i += 1
            try:
                new_ids = self._log.append_many(p for _, p in chunk)
            except PartitionFullError as exc:  # refused before writing: the store is intact
                raise StoreFullError(f"key store full during compaction: {exc}") from exc
            for (old, _), new in zip(chunk, new_ids, strict=True):
                self._moved(owners[old], new)
            self._log.release(todo[i] if i < len(todo) else boundary)
        self._log.release(boundary)

    def _moved(self, owner: tuple[bytes, int], new_seq: int) -> None:
        mid, v = owner
        if not mid:
            self._keycheck_seq = new_seq
        elif v < 0:
            self._index[mid].tomb_seq = new_seq
        else:
            self._index[mid].versions[v] = new_seq

    def _purge(self, newest_killed: int) -> None:
        """Erase every segment holding records up to ``newest_killed`` (after a TOMBSTONE).

        First only the prefix up to one segment's worth of records past it;
        if that left the record on flash (it sits in the open segment), the
        whole log is compacted.
        """
        boundary = newest_killed + self._per_segment + 1  # past the end of its segment
        if boundary < self._log.next_seq:
            self._compact(boundary)
            if self._log.first_seq > newest_killed:
                return
        self._compact_all()  # the record sits in the open segment: close it first

    # --------------------------------------------------------------- stats

    def stats(self) -> StoreStats:
        destroyed = sum(1 for m in self._index.values() if m.tomb_seq)
        return StoreStats(
            live_meters=len(self._index) - destroyed, destroyed_meters=destroyed,
            live_versions=sum(len(m.versions) for m in self._index.values()),
            live_bytes=self._live_bytes, compactions=self.compactions, log=self._log.stats())
