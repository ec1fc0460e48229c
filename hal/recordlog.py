"""Append-only, checksummed record log on one flash partition.

Layout. Each erase block is a *segment*. Like UBI, a segment carries two
headers: an erase-count header written right after every erase (so wear
survives reboots), and a use header written when the segment is opened for
records (its serial orders segments; its first_seq says which record it
starts with). Records follow, 8-byte aligned, never crossing a segment:

    EC header   0..15   b"EKEC" ver pad3 erase_count:u32 crc32:u32
    use header 16..47   b"EKSG" ver pad3 serial:u64 first_seq:u64 rsvd:u32 crc32:u32
    record     48..     magic:u16 flags:u8 rsvd:u8 length:u32 seq:u64 crc32:u32 payload pad

A record's CRC-32 covers its header and payload. Record ids (``seq``) are
dense and strictly increasing from 1.

Durability. ``append``/``append_many`` write, then sync (ioctl SYNC =
fdatasync); only then do the records become visible to readers. A batch
is atomic within a segment: every record but the batch's last carries the
CONTINUES flag, and recovery drops an unfinished batch. A power cut at any
byte of a write therefore leaves exactly the previously committed records.
After any I/O error the log refuses further writes until it is reopened,
since what reached the flash is then unknown.

Recovery (``open``) scans every segment: records up to the first invalid
one are kept; a torn tail is expected after a power cut. A checksum failure
followed by valid committed records, or a gap between segments, is damage,
not a torn write: ``LogCorruptError`` names the segment, offset and the
records it would lose, and nothing is silently dropped. ``salvage=True``
opens such a log read-only with only the records before the damage, so the
layer above can say what the damage cost (the ledger names the block).

Space. ``release(before_seq)`` erases the segments holding only records
older than ``before_seq`` (the compaction step behind a snapshot); the
``compactor`` hook is called when appends run out of free segments, and may
use ``reserve_segments`` kept back for it to write its snapshot. A full
partition refuses the write with ``PartitionFullError`` and changes nothing.
"""

from __future__ import annotations

import struct
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from hal.blockdev import (
    ERASED,
    IOCTL_BLOCK_COUNT,
    IOCTL_BLOCK_ERASE,
    IOCTL_BLOCK_SIZE,
    IOCTL_SYNC,
    BlockDevice,
)

FORMAT_VERSION = 1
ALIGN = 8

_EC = struct.Struct("<4sB3xI")  # + crc32
_EC_MAGIC = b"EKEC"
EC_SIZE = _EC.size + 4  # 16
_USE = struct.Struct("<4sB3xQQI")  # + crc32
_USE_MAGIC = b"EKSG"
USE_OFFSET = EC_SIZE
USE_SIZE = _USE.size + 4  # 32
DATA_START = USE_OFFSET + USE_SIZE  # 48

_REC = struct.Struct("<HBBIQ")  # + crc32
REC_MAGIC = 0x4B52  # "RK"
REC_HEADER = _REC.size + 4  # 20
_REC_MAGIC_BYTES = REC_MAGIC.to_bytes(2, "little")
FLAG_CONTINUES = 0x01  # more records of the same atomic batch follow
_KNOWN_FLAGS = FLAG_CONTINUES
_ERASED_HEADER = bytes([ERASED]) * REC_HEADER

MIN_SEGMENTS = 2  # one being written, one to move to


class LogError(Exception):
    """Base of the record log's errors."""


class PartitionFullError(LogError):
    """No free segment is left for the write; nothing was written."""


class RecordTooLargeError(LogError, ValueError):
    """A payload that can never fit one segment."""


class LogFailedError(LogError):
    """An earlier write failed part-way; reopen the log to recover a known state."""


class LogCorruptError(LogError):
    """Committed records are unreadable: damage, not a torn write."""


@dataclass(frozen=True)
class Damage:
    segment: int
    offset: int
    expected_seq: int
    detail: str


@dataclass(frozen=True)
class RecoveryReport:
    """What ``open`` found on the flash."""

    records: int
    first_seq: int
    next_seq: int
    used_segments: int
    free_segments: int
    dirty_segments: int
    torn_tail: bool
    dropped_batch_records: int
    damage: tuple[Damage, ...] = ()


@dataclass(frozen=True)
class LogStats:
    records: int
    first_seq: int
    next_seq: int
    segment_bytes: int
    segments: int
    used_segments: int
    free_segments: int
    payload_bytes_free: int
    erase_min: int
    erase_max: int
    erase_mean: float
    index_bytes: int  # RAM the record-id index takes: 4 bytes a record, plus segments


@dataclass
class _Segment:
    block: int
    serial: int
    first_seq: int
    offsets: array = field(default_factory=lambda: array("I"))
    write_pos: int = DATA_START
    sealed: bool = False  # garbage after write_pos: never write here again

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.offsets) - 1


def _crc(*parts: bytes | bytearray | memoryview) -> int:
    c = 0
    for p in parts:
        c = zlib.crc32(p, c)
    return c


def _pad(n: int) -> int:
    return -n % ALIGN


def record_size(payload_len: int) -> int:
    """Flash bytes one record of ``payload_len`` takes, header and padding included."""
    n = REC_HEADER + payload_len
    return n + _pad(n)


def _encode_ec(erase_count: int) -> bytes:
    head = _EC.pack(_EC_MAGIC, FORMAT_VERSION, erase_count)
    return head + _crc(head).to_bytes(4, "little")


def _decode_ec(raw: bytes | memoryview) -> int | None:
    magic, ver, count = _EC.unpack_from(raw)
    ok = magic == _EC_MAGIC and ver == FORMAT_VERSION
    if ok and _crc(raw[:_EC.size]) == int.from_bytes(raw[_EC.size:EC_SIZE], "little"):
        return count
    return None


def _encode_use(serial: int, first_seq: int) -> bytes:
    head = _USE.pack(_USE_MAGIC, FORMAT_VERSION, serial, first_seq, 0)
    return head + _crc(head).to_bytes(4, "little")


def _decode_use(raw: bytes | memoryview) -> tuple[int, int] | None:
    magic, ver, serial, first_seq, rsvd = _USE.unpack_from(raw, USE_OFFSET)
    end = USE_OFFSET + _USE.size
    stored = int.from_bytes(raw[end:end + 4], "little")
    if (magic == _USE_MAGIC and ver == FORMAT_VERSION and rsvd == 0 and first_seq >= 1
            and _crc(raw[USE_OFFSET:end]) == stored):
        return serial, first_seq
    return None


def encode_records(payloads: Sequence[bytes], first_seq: int) -> bytes:
    """One atomic batch as it lands on flash (every record but the last marked CONTINUES)."""
    out = bytearray()
    last = len(payloads) - 1
    for i, p in enumerate(payloads):
        head = _REC.pack(REC_MAGIC, FLAG_CONTINUES if i < last else 0, 0, len(p), first_seq + i)
        out += head
        out += zlib.crc32(p, zlib.crc32(head)).to_bytes(4, "little")
        out += p
        if i < last:  # the final pad stays erased: the write ends at the last meaningful byte
            out += bytes([ERASED]) * _pad(REC_HEADER + len(p))
    return bytes(out)


def _parse_record(buf: bytes | memoryview, pos: int, limit: int) -> tuple[int, int, int] | None:
    """(seq, flags, payload length) of a valid record at ``pos``, else None."""
    if pos + REC_HEADER > limit:
        return None
    magic, flags, rsvd, length, seq = _REC.unpack_from(buf, pos)
    if magic != REC_MAGIC or rsvd or flags & ~_KNOWN_FLAGS or pos + REC_HEADER + length > limit:
        return None
    body = pos + REC_HEADER
    stored = int.from_bytes(buf[body - 4:body], "little")
    if zlib.crc32(buf[body:body + length], zlib.crc32(buf[pos:body - 4])) != stored:
        return None
    return seq, flags, length


class RecordLog:
    """The append-only record log of one partition (see the module docstring)."""

    def __init__(self, device: BlockDevice, *,
                 compactor: Callable[[RecordLog], None] | None = None,
                 reserve_segments: int = 1, salvage: bool = False):
        self.device = device
        self.segment_bytes = device.ioctl(IOCTL_BLOCK_SIZE, 0) or 0
        self.segment_count = device.ioctl(IOCTL_BLOCK_COUNT, 0) or 0
        if self.segment_count < MIN_SEGMENTS + reserve_segments:
            raise LogError(f"a record log needs at least {MIN_SEGMENTS + reserve_segments} "
                           f"erase blocks, the partition has {self.segment_count}")
        if self.segment_bytes < DATA_START + record_size(1) or self.segment_bytes % ALIGN:
            raise LogError(f"erase block of {self.segment_bytes} bytes is too small")
        self.max_payload = self.segment_bytes - DATA_START - REC_HEADER
        self.compactor = compactor
        self.reserve = reserve_segments if compactor else 0
        self._compacting = False
        self._failed = False
        self._segments: list[_Segment] = []  # used, in serial order
        self._firsts: list[int] = []  # first_seq of each used segment, for bisect
        self._erase_counts = array("I", bytes(4 * self.segment_count))
        self._free: set[int] = set()
        self._dirty: set[int] = set()  # free but must be erased before use
        self._next_seq = 1
        self._next_serial = 1
        self._salvage = salvage
        self.report = self._recover()

    # ------------------------------------------------------------ recovery

    def _read(self, block: int, offset: int, n: int) -> bytearray:
        buf = bytearray(n)
        self.device.readblocks(block, buf, offset)
        return buf

    def _recover(self) -> RecoveryReport:
        used: list[tuple[int, int, int]] = []
        known_wear: list[int] = []
        unknown_wear: list[int] = []
        damage: list[Damage] = []
        for block in range(self.segment_count):
            head = self._read(block, 0, DATA_START + REC_HEADER)
            ec = _decode_ec(head)
            use = _decode_use(head)
            if ec is None:
                unknown_wear.append(block)
            else:
                self._erase_counts[block] = ec
                known_wear.append(ec)
            if use is not None:
                used.append((use[0], block, use[1]))
            else:
                self._free.add(block)
                if ec is None or any(b != ERASED for b in head[USE_OFFSET:DATA_START]):
                    self._dirty.add(block)
                if ec is not None:  # an interrupted erase leaves no valid EC header
                    self._check_unused(block, head, damage)
        # a lost erase count (power cut between erase and EC write) takes the mean, as UBI does
        mean = round(sum(known_wear) / len(known_wear)) if known_wear else 0
        for block in unknown_wear:
            self._erase_counts[block] = mean

        used.sort()
        torn_tail = False
        dropped = 0
        expected = used[0][2] if used else 1
        for i, (serial, block, first_seq) in enumerate(used):
            if first_seq != expected:
                damage.append(Damage(block, USE_OFFSET, expected,
                                     f"segment starts at record {first_seq}, expected {expected}"))
            seg, seg_dropped, clean_end = self._scan_segment(block, serial, first_seq, damage)
            dropped += seg_dropped
            torn_tail = not clean_end and i == len(used) - 1
            expected = seg.last_seq + 1
            self._segments.append(seg)
            self._next_serial = serial + 1
        if damage:
            lines = "; ".join(f"segment {d.segment} offset {d.offset}: {d.detail} "
                              f"(committed records from {d.expected_seq} on would be lost)"
                              for d in damage)
            if not self._salvage:
                raise LogCorruptError(f"record log damaged: {lines}")
            expected = self._keep_before(min(d.expected_seq for d in damage))
            self._failed = True  # read-only: what follows the damage is unknown
        self._firsts = [s.first_seq for s in self._segments]
        self._next_seq = expected
        return RecoveryReport(
            records=self._next_seq - self.first_seq, first_seq=self.first_seq,
            next_seq=self._next_seq, used_segments=len(self._segments),
            free_segments=len(self._free), dirty_segments=len(self._dirty),
            torn_tail=torn_tail, dropped_batch_records=dropped, damage=tuple(damage))

    def _keep_before(self, cut: int) -> int:
        """Salvage: keep only the records before ``cut``; returns the next id."""
        kept: list[_Segment] = []
        for seg in self._segments:
            if seg.first_seq >= cut:
                break
            del seg.offsets[cut - seg.first_seq:]
            kept.append(seg)
        self._segments = kept
        return kept[-1].last_seq + 1 if kept else cut

    def _check_unused(self, block: int, head: bytearray, damage: list[Damage]) -> None:
        """A segment with a valid EC but no valid use header must hold no valid record.

        Records are written only after the use header, and erasing wipes the
        EC header first, so a valid record below a valid EC header and a
        broken use header means the use header was damaged, not torn.
        """
        if head[DATA_START:DATA_START + 2] != _REC_MAGIC_BYTES:
            return
        buf = memoryview(self._read(block, 0, self.segment_bytes))
        seq = _find_valid_record(buf, DATA_START, self.segment_bytes)
        if seq is not None:
            damage.append(Damage(block, USE_OFFSET, seq,
                                 f"segment holds record {seq} but its use header is damaged"))

    def _scan_segment(self, block: int, serial: int, first_seq: int,
                      damage: list[Damage]) -> tuple[_Segment, int, bool]:
        """Index one used segment: (segment, records of an unfinished batch dropped, clean end)."""
        seg = _Segment(block, serial, first_seq)
        buf = memoryview(self._read(block, 0, self.segment_bytes))
        pos, committed = DATA_START, 0
        while (rec := _parse_record(buf, pos, self.segment_bytes)) is not None:
            seq, flags, length = rec
            if seq != first_seq + len(seg.offsets):
                damage.append(Damage(block, pos, first_seq + len(seg.offsets),
                                     f"record {seq} out of order"))
                break
            seg.offsets.append(pos)
            if not flags & FLAG_CONTINUES:
                committed = len(seg.offsets)
            pos += record_size(length)
        seg.write_pos = pos
        clean_end = all(b == ERASED for b in buf[pos:pos + REC_HEADER])
        if not clean_end:
            seg.sealed = True
            later = _find_valid_record(buf, pos + ALIGN, self.segment_bytes)
            if later is not None:
                damage.append(Damage(block, pos, first_seq + len(seg.offsets),
                                     f"record at offset {pos} fails its check while record "
                                     f"{later} after it is intact"))
        dropped = len(seg.offsets) - committed
        if dropped:  # an unfinished batch was never acknowledged: drop it
            del seg.offsets[committed:]
            seg.sealed = True
        return seg, dropped, clean_end and not dropped

    # ------------------------------------------------------------- reading

    @property
    def first_seq(self) -> int:
        """Oldest readable record id (== next_seq when the log is empty)."""
        for seg in self._segments:
            if seg.offsets:
                return seg.first_seq
        return self._next_seq

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def __len__(self) -> int:
        return self._next_seq - self.first_seq

    def _locate(self, seq: int) -> tuple[_Segment, int]:
        i = bisect_right(self._firsts, seq) - 1
        if i >= 0:
            seg = self._segments[i]
            k = seq - seg.first_seq
            if 0 <= k < len(seg.offsets):
                return seg, seg.offsets[k]
        raise KeyError(f"no record {seq} (the log holds {self.first_seq}..{self._next_seq - 1})")

    def read(self, seq: int) -> bytes:
        """The payload of record ``seq``, checked against its CRC again."""
        seg, pos = self._locate(seq)
        head = self._read(seg.block, pos, REC_HEADER)
        length = _REC.unpack_from(head)[3]
        if pos + REC_HEADER + length > self.segment_bytes:
            raise LogCorruptError(f"record {seq} header changed on flash (segment {seg.block})")
        raw = head + self._read(seg.block, pos + REC_HEADER, length)
        rec = _parse_record(raw, 0, len(raw))
        if rec is None or rec[0] != seq:
            raise LogCorruptError(f"record {seq} fails its check (segment {seg.block} "
                                  f"offset {pos})")
        return bytes(raw[REC_HEADER:])

    def records(self, start: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(seq, payload) in order from ``start``, one flash read per segment."""
        start = self.first_seq if start is None else max(start, self.first_seq)
        for seg in list(self._segments):
            if seg.last_seq < start:
                continue
            buf = memoryview(self._read(seg.block, 0, self.segment_bytes))
            for k in range(max(0, start - seg.first_seq), len(seg.offsets)):
                pos, seq = seg.offsets[k], seg.first_seq + k
                rec = _parse_record(buf, pos, self.segment_bytes)
                if rec is None or rec[0] != seq:
                    raise LogCorruptError(f"record {seq} fails its check (segment {seg.block} "
                                          f"offset {pos})")
                body = pos + REC_HEADER
                yield seq, bytes(buf[body:body + rec[2]])

    # ------------------------------------------------------------- writing

    def append(self, payload: bytes) -> int:
        """Write one record and sync; returns its id once it is durable."""
        return self.append_many([payload])[0]

    def append_many(self, payloads: Iterable[bytes]) -> list[int]:
        """Group commit: write all, sync once; atomic within each segment-sized chunk.

        A batch longer than the rest of a segment is split at segment
        boundaries; each chunk is atomic, and a power cut can keep a prefix
        of the chunks, never part of one.
        """
        if self._failed:
            raise LogFailedError("an earlier write failed; reopen the log to recover")
        items = [bytes(p) for p in payloads]
        for p in items:
            if len(p) > self.max_payload:
                raise RecordTooLargeError(f"record of {len(p)} bytes exceeds the largest that "
                                          f"fits one erase block ({self.max_payload})")
        if not items:
            return []
        chunks = self._chunks(items)
        self._ensure_free(sum(1 for seg, _ in chunks if seg is None))
        first = seq = self._next_seq
        staged: list[tuple[_Segment, list[int], int]] = []
        try:
            for target, chunk in chunks:
                seg = target or self._open_segment(seq)
                offsets, pos = [], seg.write_pos
                for p in chunk:
                    offsets.append(pos)
                    pos += record_size(len(p))
                self.device.writeblocks(seg.block, encode_records(chunk, seq), seg.write_pos)
                staged.append((seg, offsets, pos))
                seq += len(chunk)
            self.device.ioctl(IOCTL_SYNC, 0)
        except BaseException:
            self._failed = True
            raise
        for seg, offsets, pos in staged:  # visible only now, after the sync
            if not self._segments or self._segments[-1] is not seg:
                self._segments.append(seg)
                self._firsts.append(seg.first_seq)
            seg.offsets.extend(offsets)
            seg.write_pos = pos
        self._next_seq = seq
        return list(range(first, seq))

    def _chunks(self, items: list[bytes]) -> list[tuple[_Segment | None, list[bytes]]]:
        """Split a batch at segment boundaries; None stands for a segment still to open."""
        tail = self._segments[-1] if self._segments else None
        target = tail if tail is not None and not tail.sealed else None
        pos = target.write_pos if target is not None else self.segment_bytes
        chunks: list[tuple[_Segment | None, list[bytes]]] = []
        chunk: list[bytes] = []
        for p in items:
            size = record_size(len(p))
            if pos + size > self.segment_bytes:
                if chunk:
                    chunks.append((target, chunk))
                target, chunk, pos = None, [], DATA_START
            chunk.append(p)
            pos += size
        chunks.append((target, chunk))
        return chunks

    def _ensure_free(self, needed: int) -> None:
        """Free segments for a write, asking the compactor once; raises before writing."""
        if needed == 0:
            return
        reserve = 0 if self._compacting else self.reserve
        if len(self._free) - reserve < needed and self.compactor and not self._compacting:
            self._compacting = True
            try:
                self.compactor(self)
            finally:
                self._compacting = False
        if len(self._free) - reserve < needed:
            raise PartitionFullError(
                f"partition full: the write needs {needed} fresh erase block(s), "
                f"{len(self._free)} free ({reserve} kept for compaction); "
                "release old records (snapshot and compact) to make room")

    def _open_segment(self, first_seq: int) -> _Segment:
        """Take the least-worn free segment (ties: the next after the tail), write its header."""
        last = self._segments[-1].block if self._segments else -1
        n = self.segment_count
        block = min(self._free, key=lambda b: (self._erase_counts[b], (b - last - 1) % n))
        if block in self._dirty:
            self._erase(block)
        self._free.discard(block)
        serial = self._next_serial
        self._next_serial += 1
        self.device.writeblocks(block, _encode_use(serial, first_seq), USE_OFFSET)
        return _Segment(block, serial, first_seq)

    def _erase(self, block: int) -> None:
        self.device.ioctl(IOCTL_BLOCK_ERASE, block)
        count = self._erase_counts[block] + 1
        self.device.writeblocks(block, _encode_ec(count), 0)
        self._erase_counts[block] = count
        self._dirty.discard(block)

    def erase_dirty(self) -> int:
        """Erase every free segment that needs it, ahead of demand (formatting, idle time).

        Appends then open segments with a single header write. Returns how
        many segments were erased.
        """
        if self._failed:
            raise LogFailedError("an earlier write failed; reopen the log to recover")
        dirty = sorted(self._dirty)
        try:
            for block in dirty:
                self._erase(block)
            if dirty:
                self.device.ioctl(IOCTL_SYNC, 0)
        except BaseException:
            self._failed = True
            raise
        return len(dirty)

    # ---------------------------------------------------------- compaction

    def release(self, before_seq: int) -> int:
        """Erase every segment, but the tail, whose records are all older than ``before_seq``.

        The compaction step behind a snapshot. Whole segments are freed:
        records of a partly released segment stay readable until the rest
        of it is released too. Returns the number of segments freed.
        """
        if self._failed:
            raise LogFailedError("an earlier write failed; reopen the log to recover")
        freed = 0
        try:
            while len(self._segments) > 1 and self._segments[0].last_seq < before_seq:
                seg = self._segments[0]
                self._erase(seg.block)
                self._segments.pop(0)
                self._firsts.pop(0)
                self._free.add(seg.block)
                freed += 1
            if freed:
                self.device.ioctl(IOCTL_SYNC, 0)
        except BaseException:
            self._failed = True
            raise
        return freed

    # --------------------------------------------------------------- stats

    def erase_counts(self) -> list[int]:
        """Lifetime erases of every segment, as kept in the EC headers."""
        return list(self._erase_counts)

    def stats(self) -> LogStats:
        tail = self._segments[-1] if self._segments else None
        tail_free = 0
        if tail is not None and not tail.sealed:
            tail_free = max(0, self.segment_bytes - tail.write_pos - REC_HEADER)
        usable = max(0, len(self._free) - self.reserve)
        wear = self._erase_counts
        return LogStats(
            records=len(self), first_seq=self.first_seq, next_seq=self._next_seq,
            segment_bytes=self.segment_bytes, segments=self.segment_count,
            used_segments=len(self._segments), free_segments=len(self._free),
            payload_bytes_free=tail_free + usable * (self.segment_bytes - DATA_START - REC_HEADER),
            erase_min=min(wear), erase_max=max(wear), erase_mean=sum(wear) / len(wear),
            index_bytes=sum(s.offsets.buffer_info()[1] * s.offsets.itemsize
                            for s in self._segments))


def _find_valid_record(buf: memoryview, start: int, limit: int) -> int | None:
    """Seq of the first valid record at an aligned offset from ``start``, if any."""
    raw = bytes(buf)
    magic = _REC_MAGIC_BYTES
    pos = raw.find(magic, start)
    while pos >= 0:
        if pos % ALIGN == 0 and (rec := _parse_record(buf, pos, limit)) is not None:
            return rec[0]
        pos = raw.find(magic, pos + 1)
    return None
