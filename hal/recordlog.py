"""Append-only, checksummed record log on one flash partition.

Layout (format 2). Each erase block is a *segment*. Like UBI, a segment
carries two headers: an erase-count header written right after every erase
(so wear survives reboots), and a use header written when the segment is
opened for records (its serial orders segments; its first_seq says which
record it starts with). Records follow, 8-byte aligned, never crossing a
segment:

    EC header   0..15   b"EKEC" ver pad3 erase_count:u32 crc32:u32
    use header 16..47   b"EKSG" ver pad3 serial:u64 first_seq:u64 rsvd:u32 crc32:u32
    record     48..     magic:u16 flags:u8 hcrc:u8 length:u32 seq:u64 crc32:u32
                        payload END pad

``hcrc`` is a CRC-8 (polynomial 0x07) over magic, flags, length and seq: it
catches every single-byte error in them, so a record's length can be
trusted without its payload. ``crc32`` covers the 16 header bytes before it
and the payload. END is the byte 0x01, the last byte a record's write
programs (the pad stays erased): a record takes REC_OVERHEAD = 21 bytes
besides its payload, then padding. Record ids (``seq``) are dense and
strictly increasing from 1.

Durability. ``append``/``append_many`` write, then sync (ioctl SYNC =
fdatasync); only then do the records become visible to readers. A batch
is atomic within a segment: every record but the batch's last carries the
CONTINUES flag, and recovery drops an unfinished batch. A power cut at any
byte of a write therefore leaves exactly the previously committed records.
After any I/O error the log refuses further writes until it is reopened,
since what reached the flash is then unknown.

Torn write or bit rot. The power-cut model (emulator/flash.py emulates it)
is sequential programming within a write: bytes are programmed whole and in
address order, and a cut leaves every byte after the last one programmed
erased (0xFF). A complete record always ends in a programmed END, so at the
first record of a segment that is not intact (CRC-32 and END in place),
recovery compares the last programmed byte of the rest of the segment with
where the record would end:

  - header fails its check (hcrc, magic, flags, bounds): torn if nothing is
    programmed past the header's 20 bytes; rot otherwise. Stray bytes where
    no record began (both magic bytes erased) lose no record: the segment
    is closed to writes and, unless an intact record follows, nothing is
    reported.
  - header sound: its length places END. Torn if END and all after it are
    erased; rot if anything from END on is programmed (a CRC-32 failure
    with END written, a wrong END value, bytes after an erased END).

A torn tail was never acknowledged and is dropped; rot is damage (below).
One fault at a time is assumed, with one exception: damage in a segment
the log has since moved past costs nothing and is not reported. The next
segment starting at the first id the damage would lose says the writer
went on without those records: after a power cut (rot in a torn tail,
whose records were never committed), or after ``discard_damage`` gave them
up (below).
hcrc is consulted only for a record whose CRC-32 fails: on an intact record
the CRC-32 covers it already, so boot checks nothing more per record than
its END byte.

One state cannot be told apart: a record complete but for an erased END is
what a cut before a write's last byte leaves, and what rot turning END into
0xFF leaves. It is read as the cut, so that a record is visible only once
its last byte is on flash and a power cut at any byte leaves exactly the
committed records; keeping it instead would bring back at boot a write that
was cut and never acknowledged. Only the log's newest record is exposed to
this (elsewhere the records after it, or the next segment's first id, show
the loss), and END = 0x01 is seven bit errors away from 0xFF: no single-bit
error or inverted byte turns it into 0xFF, so every other rot of a complete
record is reported. Real flash programs in pages: a cut that leaves garbage
after the last byte it wrote breaks the model and reads as damage, from
which ``salvage`` recovers exactly the committed records.

Recovery (``open``) scans every segment: records up to the first invalid
one are kept, and a torn tail is expected after a power cut. Rot, a record
failing its check before intact ones, or a gap between segments is damage:
``LogCorruptError`` names the segment, the offset, the record and the
records it would lose, and nothing is silently dropped. ``salvage=True``
opens such a log read-only with only the committed records before the
damage, so the layer above can say what the damage cost (the ledger names
the block; ``report.records_lost`` counts the ids given up).

Discarding damage (``discard_damage``, on a salvaged log) is for a layer
that can get the lost records back elsewhere (the ledger, from its fleet).
It erases the segments holding only records past the damage, then opens a
segment starting at the first id lost, which the next recovery reads as the
log having moved past the damaged records; the segment holding the damage
keeps the records before it and is released later like any old segment. A
power cut before that segment header is on flash leaves the damage as it
was (what was erased held nothing kept), to be salvaged the same way again;
after it, the log opens with the records before the damage.

A segment header of another format version is refused with
``LogFormatError``, not taken for free space that ``erase_dirty`` would
erase.

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

FORMAT_VERSION = 2  # 2: header check byte and END marker in every record
ALIGN = 8

_EC = struct.Struct("<4sB3xI")  # + crc32
_EC_MAGIC = b"EKEC"
EC_SIZE = _EC.size + 4  # 16
_USE = struct.Struct("<4sB3xQQI")  # + crc32
_USE_MAGIC = b"EKSG"
USE_OFFSET = EC_SIZE
USE_SIZE = _USE.size + 4  # 32
DATA_START = USE_OFFSET + USE_SIZE  # 48

_REC = struct.Struct("<HBBIQ")  # magic, flags, hcrc, length, seq; + crc32
_HCRC_TAIL = struct.Struct("<IQ")  # what hcrc covers after magic and flags: length, seq
REC_MAGIC = 0x4B52  # "RK"
REC_HEADER = _REC.size + 4  # 20: the payload starts here
END = 0x01  # a record's last byte; far from ERASED (see the module docstring)
REC_OVERHEAD = REC_HEADER + 1  # 21: header and END
_REC_MAGIC_BYTES = REC_MAGIC.to_bytes(2, "little")
FLAG_CONTINUES = 0x01  # more records of the same atomic batch follow
_KNOWN_FLAGS = FLAG_CONTINUES
_ERASED_BYTE = bytes([ERASED])
_ERASED_PAD = _ERASED_BYTE * ALIGN

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


class LogFormatError(LogError):
    """The partition holds a record log of another format version; nothing was changed."""


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
    # salvage: ids from the first damaged record to the newest one recovery saw (at least
    # the records the damage costs; 0 without damage)
    records_lost: int = 0


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


def _crc8_table(poly: int) -> bytes:
    table = bytearray(256)
    for b in range(256):
        c = b
        for _ in range(8):
            c = ((c << 1) ^ poly) & 0xFF if c & 0x80 else (c << 1) & 0xFF
        table[b] = c
    return bytes(table)


_CRC8 = _crc8_table(0x07)


def crc8(data: bytes | bytearray | memoryview) -> int:
    """CRC-8, polynomial 0x07 (SMBus): detects every burst of up to 8 bits: any one-byte error."""
    c = 0
    for b in data:
        c = _CRC8[c ^ b]
    return c


_CRC8_AFTER_MAGIC = crc8(_REC_MAGIC_BYTES)


def _header_check(flags: int, length: int, seq: int) -> int:
    """hcrc: the CRC-8 of magic, flags, length, seq (the constant magic's part precomputed)."""
    c = _CRC8[_CRC8_AFTER_MAGIC ^ flags]
    for b in _HCRC_TAIL.pack(length, seq):
        c = _CRC8[c ^ b]
    return c


def record_size(payload_len: int) -> int:
    """Flash bytes one record of ``payload_len`` takes: header, payload, END and padding."""
    n = REC_OVERHEAD + payload_len
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


def _other_format(raw: bytes | bytearray) -> int | None:
    """Version of a sound EC or use header (magic and CRC hold) of another format, if any."""
    for off, head, magic in ((0, _EC, _EC_MAGIC), (USE_OFFSET, _USE, _USE_MAGIC)):
        end = off + head.size
        if (raw[off:off + 4] == magic and raw[off + 4] != FORMAT_VERSION
                and _crc(raw[off:end]) == int.from_bytes(raw[end:end + 4], "little")):
            return raw[off + 4]
    return None


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
        flags, seq = FLAG_CONTINUES if i < last else 0, first_seq + i
        head = _REC.pack(REC_MAGIC, flags, _header_check(flags, len(p), seq), len(p), seq)
        out += head
        out += zlib.crc32(p, zlib.crc32(head)).to_bytes(4, "little")
        out += p
        out.append(END)
        if i < last:  # the final pad stays erased: the write ends with its END
            out += _ERASED_PAD[:_pad(REC_OVERHEAD + len(p))]
    return bytes(out)


def _parse_record(buf: bytes | memoryview, pos: int, limit: int) -> tuple[int, int, int] | None:
    """(seq, flags, payload length) of a record at ``pos`` whose CRC-32 holds, else None.

    Neither hcrc nor END is read: the CRC-32 vouches for the header, and
    END only tells recovery that a write finished (see ``_scan_segment``).
    """
    if pos + REC_HEADER > limit:
        return None
    magic, flags, _hcrc, length, seq = _REC.unpack_from(buf, pos)
    if magic != REC_MAGIC or flags & ~_KNOWN_FLAGS or pos + REC_HEADER + length > limit:
        return None
    body = pos + REC_HEADER
    stored = int.from_bytes(buf[body - 4:body], "little")
    if zlib.crc32(buf[body:body + length], zlib.crc32(buf[pos:body - 4])) != stored:
        return None
    return seq, flags, length


def _intact_record(buf: memoryview, pos: int, limit: int) -> tuple[int, int, int] | None:
    """Like ``_parse_record``, and the record's END is in place: a finished write."""
    rec = _parse_record(buf, pos, limit)
    if rec is None:
        return None
    end = pos + REC_HEADER + rec[2]
    return rec if end < limit and buf[end] == END else None


def _sound_header_length(buf: memoryview, pos: int, limit: int) -> int | None:
    """Payload length of the header at ``pos`` if the header passes its own check (hcrc)."""
    if pos + REC_HEADER > limit:
        return None
    magic, flags, hcrc, length, seq = _REC.unpack_from(buf, pos)
    if (magic != REC_MAGIC or flags & ~_KNOWN_FLAGS or pos + REC_OVERHEAD + length > limit
            or _header_check(flags, length, seq) != hcrc):
        return None
    return length


def _last_programmed(buf: memoryview, start: int) -> int:
    """Offset of the last byte at or after ``start`` that is not erased; -1 if none is."""
    n = len(bytes(buf[start:]).rstrip(_ERASED_BYTE))
    return start + n - 1 if n else -1


def _rot(buf: memoryview, pos: int, limit: int, tail: int) -> str | None:
    """Why the first record at ``pos`` that is not intact is bit rot; None for a torn write.

    ``tail`` is the last programmed byte from ``pos`` on. Under sequential
    programming a cut leaves everything after its last byte erased, and a
    finished record ends in END, so programmed bytes past where the cut
    must have been mean the record was complete (module docstring).
    """
    length = _sound_header_length(buf, pos, limit)
    if length is None:
        if tail < pos + REC_HEADER or buf[pos] == buf[pos + 1] == ERASED:
            return None  # cut inside the header, or no record began here
        return (f"fails its check (header) while the segment is programmed up to offset "
                f"{tail}: bit rot, not a torn write")
    end = pos + REC_HEADER + length
    if tail < end:
        return None  # cut before END: the write never finished
    if _parse_record(buf, pos, limit) is None:
        return (f"fails its check (CRC-32) though the segment is programmed through its end "
                f"at offset {end}: bit rot, not a torn write")
    if buf[end] != ERASED:
        return f"fails its check: its end marker reads {buf[end]:#04x}, not {END:#04x}: bit rot"
    return f"fails its check: its end marker is erased, yet the segment is programmed up to {tail}"


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
        self.max_payload = self.segment_bytes - DATA_START - REC_OVERHEAD
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
        self._highest_seen = 0  # newest record id recovery saw, damaged or not
        self._discard: list[int] = []  # salvage: segments holding only records past the damage
        self._cut_inside = False  # salvage: intact records follow the cut in a kept segment
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
            if (ec is None or use is None) and (other := _other_format(head)) is not None:
                raise LogFormatError(
                    f"segment {block} holds record-log format {other}, this build reads format "
                    f"{FORMAT_VERSION}; nothing was changed (boot the firmware that wrote it, "
                    "or erase the partition to start afresh)")
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
        passed: Damage | None = None
        for i, (serial, block, first_seq) in enumerate(used):
            # damage in a segment costs nothing if the log moved on past it: the next segment
            # starting at the first id it would lose shows those records were given up (a torn
            # write of an earlier boot, or discard_damage)
            if passed is not None and first_seq != passed.expected_seq:
                damage.append(passed)
            if first_seq != expected:
                damage.append(Damage(block, USE_OFFSET, expected,
                                     f"segment starts at record {first_seq}, expected {expected}"))
            seg, seg_dropped, clean_end, passed = self._scan_segment(block, serial, first_seq)
            dropped += seg_dropped
            torn_tail = not clean_end and i == len(used) - 1
            expected = seg.last_seq + 1
            self._segments.append(seg)
            self._next_serial = serial + 1
        if passed is not None:
            damage.append(passed)
        lost = 0
        if damage:
            lines = "; ".join(f"segment {d.segment} offset {d.offset}: {d.detail} "
                              f"(committed records from {d.expected_seq} on would be lost)"
                              for d in damage)
            if not self._salvage:
                raise LogCorruptError(f"record log damaged: {lines}")
            cut = min(d.expected_seq for d in damage)
            lost = max(self._highest_seen, expected - 1) - cut + 1
            expected = self._keep_before(cut)
            self._failed = True  # read-only: what follows the damage is unknown
        self._firsts = [s.first_seq for s in self._segments]
        self._next_seq = expected
        return RecoveryReport(
            records=self._next_seq - self.first_seq, first_seq=self.first_seq,
            next_seq=self._next_seq, used_segments=len(self._segments),
            free_segments=len(self._free), dirty_segments=len(self._dirty),
            torn_tail=torn_tail, dropped_batch_records=dropped, damage=tuple(damage),
            records_lost=max(0, lost))

    def _keep_before(self, cut: int) -> int:
        """Salvage: keep only the records before ``cut``; returns the next id."""
        kept: list[_Segment] = []
        for i, seg in enumerate(self._segments):
            if seg.first_seq >= cut:
                self._discard = [s.block for s in self._segments[i:]]
                break
            if len(seg.offsets) > cut - seg.first_seq:
                self._cut_inside = True
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

    def _scan_segment(self, block: int, serial: int, first_seq: int
                      ) -> tuple[_Segment, int, bool, Damage | None]:
        """Index one used segment: (segment, records of an unfinished batch dropped, clean end,
        damage found in it).

        Records are kept up to the first one that is not intact; what lies
        from there to the segment's end is a torn write or rot (``_rot``).
        The damage is judged by the caller against the next segment: it
        costs nothing if that one starts at the first id it would lose.
        """
        seg = _Segment(block, serial, first_seq)
        limit = self.segment_bytes
        buf = memoryview(self._read(block, 0, limit))
        pos, committed, in_order = DATA_START, 0, True
        found: Damage | None = None
        later: int | None = None  # an intact record after the one failing its check
        while (rec := _parse_record(buf, pos, limit)) is not None:
            seq, flags, length = rec
            end = pos + REC_HEADER + length
            if end >= limit or buf[end] != END:
                break
            if seq != first_seq + len(seg.offsets):
                found = Damage(block, pos, first_seq + committed,
                               f"record {seq} out of order, record "
                               f"{first_seq + len(seg.offsets)} expected")
                in_order = False
                break
            seg.offsets.append(pos)
            if not flags & FLAG_CONTINUES:
                committed = len(seg.offsets)
            pos += record_size(length)
        seg.write_pos = pos
        tail = _last_programmed(buf, pos)
        clean_end = tail < 0
        if not clean_end:
            seg.sealed = True  # never program over what is there
        seen = first_seq + len(seg.offsets) - 1  # the newest intact id, before any drop
        if not clean_end and in_order:
            rot = _rot(buf, pos, limit, tail)
            where = f"record {first_seq + len(seg.offsets)} at offset {pos}"
            # committed records from the unfinished batch's start are lost
            later = _find_valid_record(buf, pos + ALIGN, limit)
            if later is not None:  # never a torn tail: a cut is the last write to a segment
                found = Damage(block, pos, first_seq + committed, (
                    f"{where} {rot}; record {later} after it is intact" if rot else
                    f"{where} fails its check while record {later} after it is intact"))
            elif rot is not None:
                found = Damage(block, pos, first_seq + committed, f"{where} {rot}")
        if found is not None:  # the failing record's id, or the newest intact one after it
            after = 0 if later is None else _newest_valid_record(buf, pos + ALIGN, limit)
            seen = max(seen + 1, after)
        self._highest_seen = max(self._highest_seen, seen)
        dropped = len(seg.offsets) - committed
        if dropped:  # an unfinished batch was never acknowledged: drop it
            del seg.offsets[committed:]
            seg.sealed = True
        return seg, dropped, clean_end and not dropped, found

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
        if pos + REC_OVERHEAD + length > self.segment_bytes:
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

    def discard_damage(self) -> int:
        """Give up the records a salvaged log lost and make it writable again (module
        docstring); returns the segments erased.

        Nothing is written when the damage cannot be put behind the log this
        way (intact records follow the cut in a segment that is kept): that
        raises LogError first.
        """
        if not self._salvage or not self.report.damage:
            raise LogError("only a log opened with salvage=True over damage has any to discard")
        if self._cut_inside:
            raise LogError("intact records follow the damage inside a segment the log keeps; "
                           "a new segment cannot put them behind it")
        damaged_free = {d.segment for d in self.report.damage if d.segment in self._free}
        erase = sorted({*self._discard, *damaged_free})
        if not erase and not self._free:
            raise PartitionFullError("no free segment to start past the damage in")
        try:
            for block in erase:  # hold nothing kept: a cut here leaves the same damage
                self._erase(block)
                self._free.add(block)
            if erase:
                self.device.ioctl(IOCTL_SYNC, 0)
            seg = self._open_segment(self._next_seq)  # from here the log is past the damage
            self.device.ioctl(IOCTL_SYNC, 0)
        except BaseException:
            self._failed = True
            raise
        self._discard = []
        self._segments.append(seg)
        self._firsts.append(seg.first_seq)
        self._salvage = self._failed = False
        return len(erase)

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
            tail_free = max(0, self.segment_bytes - tail.write_pos - REC_OVERHEAD)
        usable = max(0, len(self._free) - self.reserve)
        wear = self._erase_counts
        return LogStats(
            records=len(self), first_seq=self.first_seq, next_seq=self._next_seq,
            segment_bytes=self.segment_bytes, segments=self.segment_count,
            used_segments=len(self._segments), free_segments=len(self._free),
            payload_bytes_free=tail_free + usable * self.max_payload,
            erase_min=min(wear), erase_max=max(wear), erase_mean=sum(wear) / len(wear),
            index_bytes=sum(s.offsets.buffer_info()[1] * s.offsets.itemsize
                            for s in self._segments))


def _newest_valid_record(buf: memoryview, start: int, limit: int) -> int:
    """Highest seq of the intact records at aligned offsets from ``start`` (0: none)."""
    raw = bytes(buf)
    newest, pos = 0, raw.find(_REC_MAGIC_BYTES, start)
    while pos >= 0:
        if pos % ALIGN == 0 and (rec := _intact_record(buf, pos, limit)) is not None:
            newest = max(newest, rec[0])
            pos = raw.find(_REC_MAGIC_BYTES, pos + record_size(rec[2]))
        else:
            pos = raw.find(_REC_MAGIC_BYTES, pos + 1)
    return newest


def _find_valid_record(buf: memoryview, start: int, limit: int) -> int | None:
    """Seq of the first intact record at an aligned offset from ``start``, if any."""
    raw = bytes(buf)
    magic = _REC_MAGIC_BYTES
    pos = raw.find(magic, start)
    while pos >= 0:
        if pos % ALIGN == 0 and (rec := _intact_record(buf, pos, limit)) is not None:
            return rec[0]
        pos = raw.find(magic, pos + 1)
    return None
