"""The meter table in RAM: every meter's packed entry in about 95 bytes, not 190.

A ``dict`` of ``bytes`` id -> packed ``bytes`` entry costs about 190 bytes a
meter on CPython 3.11 (two objects of 48 and 112 bytes and the dict's slot),
so 10^6 meters would not fit the agent's 192 MiB budget. Here there are no
per-meter objects: meters sit in buckets, each one ``bytearray`` of fixed-size
records::

    record := id length (1) | id, zero-padded to 16 | packed entry (entry_size)

The bucket is chosen by CRC-32 of the id (deterministic, so the same table
iterates in the same order in every process); a lookup finds the 17-byte key
with ``bytearray.find`` (C speed) and accepts only a match that starts a
record. The bucket count doubles once buckets hold 16 records on average, so
a bucket stays near 1 KB and an update moves at most that much.

Reads hand back plain ``bytes``; the table never changes while it is
iterated (the caller's contract, as for a dict).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

ID_MAX = 16  # hal.ids.METER_ID_MAX: the DL/T 698.45 server address
KEY_BYTES = 1 + ID_MAX
GROW_AT = 16  # records a bucket holds on average before the buckets double
INITIAL_BUCKETS = 16


def _key(meter_id: bytes) -> bytes:
    n = len(meter_id)
    if not 1 <= n <= ID_MAX:
        raise ValueError(f"a meter id is 1..{ID_MAX} bytes, got {n}")
    return bytes((n,)) + meter_id + bytes(ID_MAX - n)


class MeterTable:
    """Meter id -> packed entry of ``entry_size`` bytes (module docstring)."""

    __slots__ = ("_buckets", "_count", "_entry_size", "_mask", "_record")

    def __init__(self, entry_size: int) -> None:
        self._entry_size = entry_size
        self._record = KEY_BYTES + entry_size
        self._buckets = [bytearray() for _ in range(INITIAL_BUCKETS)]
        self._mask = INITIAL_BUCKETS - 1
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def _find(self, bucket: bytearray, key: bytes) -> int:
        pos = bucket.find(key)
        while pos >= 0 and pos % self._record:
            pos = bucket.find(key, pos + 1)
        return pos

    def get(self, meter_id: bytes) -> bytes | None:
        if not 1 <= len(meter_id) <= ID_MAX:
            return None  # not a meter id, so not in the table (a dict's get would say so)
        key = _key(meter_id)
        bucket = self._buckets[zlib.crc32(key) & self._mask]
        pos = self._find(bucket, key)
        if pos < 0:
            return None
        return bytes(bucket[pos + KEY_BYTES:pos + self._record])

    def __contains__(self, meter_id: bytes) -> bool:
        if not 1 <= len(meter_id) <= ID_MAX:
            return False
        key = _key(meter_id)
        return self._find(self._buckets[zlib.crc32(key) & self._mask], key) >= 0

    def put(self, meter_id: bytes, entry: bytes) -> None:
        if len(entry) != self._entry_size:
            raise ValueError(f"an entry is {self._entry_size} bytes, got {len(entry)}")
        key = _key(meter_id)
        bucket = self._buckets[zlib.crc32(key) & self._mask]
        pos = self._find(bucket, key)
        if pos >= 0:
            bucket[pos + KEY_BYTES:pos + self._record] = entry
            return
        bucket += key
        bucket += entry
        self._count += 1
        if self._count > GROW_AT * len(self._buckets):
            self._grow()

    def discard(self, meter_id: bytes) -> bool:
        """Remove the meter; False when it was not there."""
        if not 1 <= len(meter_id) <= ID_MAX:
            return False
        key = _key(meter_id)
        bucket = self._buckets[zlib.crc32(key) & self._mask]
        pos = self._find(bucket, key)
        if pos < 0:
            return False
        del bucket[pos:pos + self._record]
        self._count -= 1
        return True

    def _grow(self) -> None:
        size = 2 * len(self._buckets)
        mask = size - 1
        fresh = [bytearray() for _ in range(size)]
        rec = self._record
        for bucket in self._buckets:
            for pos in range(0, len(bucket), rec):
                key = bytes(bucket[pos:pos + KEY_BYTES])
                fresh[zlib.crc32(key) & mask] += bucket[pos:pos + rec]
        self._buckets, self._mask = fresh, mask

    def __iter__(self) -> Iterator[bytes]:
        """Every meter id (plain bytes), bucket by bucket."""
        rec = self._record
        for bucket in self._buckets:
            for pos in range(0, len(bucket), rec):
                yield bytes(bucket[pos + 1:pos + 1 + bucket[pos]])

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        rec = self._record
        for bucket in self._buckets:
            for pos in range(0, len(bucket), rec):
                yield (bytes(bucket[pos + 1:pos + 1 + bucket[pos]]),
                       bytes(bucket[pos + KEY_BYTES:pos + rec]))


class MeterSet:
    """A set of meter ids at 17 bytes each (a ``MeterTable`` of empty entries), for sets that
    can hold every meter of the chain, such as the keys a terminal still has to receive."""

    __slots__ = ("_table",)

    def __init__(self, meter_ids: Iterable[bytes] = ()) -> None:
        self._table = MeterTable(0)
        for m in meter_ids:
            self.add(m)

    def add(self, meter_id: bytes) -> None:
        self._table.put(meter_id, b"")

    def discard(self, meter_id: bytes) -> None:
        self._table.discard(meter_id)

    def __contains__(self, meter_id: object) -> bool:
        return isinstance(meter_id, bytes | bytearray) and bytes(meter_id) in self._table

    def __len__(self) -> int:
        return len(self._table)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._table)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MeterSet):
            return set(self) == set(other)
        if isinstance(other, set | frozenset):
            return set(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like set

    def __repr__(self) -> str:
        return f"MeterSet({len(self)} meters)"
