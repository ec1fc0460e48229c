"""The journal partition: a bounded ring of log lines and the reading-counter ceilings.

Two kinds of record share one record log (``hal/recordlog.py``):

- ``L`` + a batch of structured log lines (JSON, one per line), written at
  most once a second or every ``LOG_BATCH`` lines, so logging costs one
  flash write per batch, not per line. The newest ``RING_LINES`` lines are
  also kept in RAM for the console's ``log -n``.
- ``C`` + meter id length | meter id | ceiling (u64): readings of a meter
  are accepted only above its ceiling after a reboot. A ceiling is written
  ``COUNTER_RESERVE`` ahead of the counter that crossed the last one (the
  invocation-counter reservation DLMS/COSEM implementations use), so one
  flash write covers that many readings and a power cut can never make a
  replayed reading acceptable.

The ring stays bounded: once the log fills ``COMPACT_FRACTION`` of the
partition, every ceiling is rewritten as one ``K`` record and the segments
before it are released; old log lines go with them.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterator

from hal.blockdev import BlockDevice
from hal.recordlog import RecordLog

LOG_BATCH = 64  # lines per flash write at most
RING_LINES = 1000  # lines the console can show (log -n), kept in RAM
COUNTER_RESERVE = 1024  # readings one ceiling record covers
# The ring's size in erase blocks (8 MiB of 128 KiB blocks): enough for days of
# log lines, small enough that boot reads it in well under a second.
RING_SEGMENTS = 64
COMPACT_FRACTION = 0.75  # of the partition, when it is smaller than RING_SEGMENTS
MAX_LINE_BYTES = 2048  # a longer line is cut: a log line is never a data dump
_U64 = struct.Struct(">Q")


class Journal:
    """The journal partition of one terminal (module docstring)."""

    def __init__(self, device: BlockDevice):
        self.log = RecordLog(device)
        self.ring: deque[str] = deque(maxlen=RING_LINES)
        self.ceilings: dict[bytes, int] = {}
        self._batch: list[bytes] = []
        self.lines_written = 0
        self.ceiling_writes = 0
        self.compactions = 0
        for _seq, payload in self.log.records():
            tag, body = payload[:1], payload[1:]
            if tag == b"L":
                self.ring.extend(body.decode("utf-8", "replace").splitlines())
            elif tag in (b"C", b"K"):
                for meter_id, ceiling in _decode_ceilings(body):
                    self.ceilings[meter_id] = max(ceiling, self.ceilings.get(meter_id, 0))

    # -- log lines

    def line(self, text: str) -> None:
        """One log line: kept in RAM now, on flash at the next ``flush``."""
        raw = text.encode("utf-8", "replace")[:MAX_LINE_BYTES]
        self.ring.append(raw.decode("utf-8", "replace"))
        self._batch.append(raw)
        if len(self._batch) >= LOG_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._batch:
            return
        self._append(b"L" + b"\n".join(self._batch))
        self.lines_written += len(self._batch)
        self._batch.clear()

    def tail(self, n: int) -> list[str]:
        return list(self.ring)[-n:] if n > 0 else []

    # -- reading counters

    def ceiling(self, meter_id: bytes) -> int:
        return self.ceilings.get(meter_id, 0)

    def accepted(self, meter_id: bytes, counter: int) -> bool:
        """A reading with ``counter`` was accepted; True when that took a flash write."""
        if counter < self.ceilings.get(meter_id, 0):
            return False
        ceiling = counter + COUNTER_RESERVE
        self._append(b"C" + _encode_ceiling(meter_id, ceiling))
        self.ceilings[meter_id] = ceiling
        self.ceiling_writes += 1
        return True

    # -- the ring's bound

    def _append(self, payload: bytes) -> None:
        st = self.log.stats()
        if st.used_segments >= min(RING_SEGMENTS, COMPACT_FRACTION * st.segments):
            self._compact()
        self.log.append(payload)

    def _compact(self) -> None:
        records, current = [], bytearray(b"K")
        for m, c in self.ceilings.items():
            entry = _encode_ceiling(m, c)
            if len(current) + len(entry) > self.log.max_payload:
                records.append(bytes(current))
                current = bytearray(b"K")
            current += entry
        seqs = self.log.append_many([*records, bytes(current)])
        self.log.release(seqs[0])
        self.compactions += 1

    def stats(self) -> dict[str, int]:
        st = self.log.stats()
        return {"segments": st.segments, "used_segments": st.used_segments,
                "lines_written": self.lines_written, "ceiling_writes": self.ceiling_writes,
                "compactions": self.compactions, "meters": len(self.ceilings)}


def _encode_ceiling(meter_id: bytes, ceiling: int) -> bytes:
    return bytes((len(meter_id),)) + meter_id + _U64.pack(ceiling)


def _decode_ceilings(body: bytes) -> Iterator[tuple[bytes, int]]:
    pos = 0
    while pos < len(body):
        n = body[pos]
        end = pos + 1 + n + _U64.size
        if n == 0 or end > len(body):
            return  # a cut record cannot happen (records are atomic); stop, never guess
        yield body[pos + 1:pos + 1 + n], _U64.unpack_from(body, pos + 1 + n)[0]
        pos = end
