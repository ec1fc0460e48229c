"""Provisioning updates through etcd: the utility's signed file, in parts, under the fleet prefix.

    provisioning/<issued_ms, 16 hex>/<index, 4 hex>-<count, 4 hex>   one part of the file

Why etcd: every terminal already watches the fleet prefix (agent/net/ordering.py)
and reads it whole at each resync, so an update the utility (or its master
station) writes there reaches every running terminal within a watch event,
and a terminal that was down finds it at its next resync; nothing else to
run or to poll. Parts, because etcd refuses a request over 1.5 MiB by
default and a provisioning file for 10^4 meters is about 3.3 MB.

The parts carry no trust of their own: anyone with a fleet certificate can
write under the prefix. The assembled file is believed only once the
utility's signature checks under the terminal's trusted key and
``provisioning.check_update`` accepts it against the one in force (the
agent does both); a bad part just makes an issue that never assembles or
does not verify, which is counted and ignored.

Sans-I/O: ``parts`` makes the (key, value) pairs to write; ``Assembler``
takes (key, value) pairs as they are seen and returns each newer complete
file once. Memory is bounded: at most ``MAX_ISSUES`` issues are kept in
parts, their total at most ``MAX_FILE_BYTES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PART_BYTES = 512 * 1024
MAX_FILE_BYTES = 4 << 20  # agent.provisioning.MAX_FILE_BYTES
MAX_PARTS = -(-MAX_FILE_BYTES // PART_BYTES)
MAX_ISSUES = 4
SUBDIR = b"provisioning/"


def feed_prefix(fleet_prefix: bytes) -> bytes:
    """Where the parts live under ``/edgekey/<fleet>/``."""
    return fleet_prefix + SUBDIR


def parts(fleet_prefix: bytes, issued_ms: int, data: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs that carry ``data``, the signed file issued at ``issued_ms``."""
    if not 0 < len(data) <= MAX_FILE_BYTES:
        raise ValueError(f"a provisioning file of {len(data)} bytes (1..{MAX_FILE_BYTES})")
    if not 0 <= issued_ms < 1 << 64:
        raise ValueError("issued_ms must fit 64 bits")
    chunks = [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)]
    head = feed_prefix(fleet_prefix) + f"{issued_ms:016x}/".encode()
    return [(head + f"{i:04x}-{len(chunks):04x}".encode(), c) for i, c in enumerate(chunks)]


def parse_key(fleet_prefix: bytes, key: bytes) -> tuple[int, int, int] | None:
    """(issued_ms, index, count) of a part's key; None for any other key or a malformed one."""
    head = feed_prefix(fleet_prefix)
    if not key.startswith(head):
        return None
    rest = key[len(head):]
    if len(rest) != 16 + 1 + 4 + 1 + 4 or rest[16:17] != b"/" or rest[21:22] != b"-":
        return None
    try:
        issued, index, count = int(rest[:16], 16), int(rest[17:21], 16), int(rest[22:], 16)
    except ValueError:
        return None
    if not 0 <= index < count <= MAX_PARTS:
        return None
    return issued, index, count


@dataclass
class _Issue:
    count: int
    chunks: dict[int, bytes] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks.values())


class Assembler:
    """Parts in, each newer complete file out once (module docstring)."""

    def __init__(self, fleet_prefix: bytes, newer_than: int = -1):
        self.fleet_prefix = fleet_prefix
        self.newer_than = newer_than  # the issue in force: nothing at or below it is kept
        self.counts: dict[str, int] = {}
        self._issues: dict[int, _Issue] = {}

    def is_part(self, key: bytes) -> bool:
        return key.startswith(feed_prefix(self.fleet_prefix))

    def feed(self, key: bytes, value: bytes) -> tuple[int, bytes] | None:
        """A part seen in etcd; (issued_ms, file) when it completes an issue newer than any
        given out before, else None."""
        parsed = parse_key(self.fleet_prefix, key)
        if parsed is None:
            self._count("malformed")
            return None
        issued, index, count = parsed
        if issued <= self.newer_than:
            self._count("stale")
            return None
        issue = self._issues.get(issued)
        if issue is None:
            if len(self._issues) >= MAX_ISSUES:  # forget the oldest incomplete issue
                del self._issues[min(self._issues)]
                self._count("evicted")
            issue = self._issues[issued] = _Issue(count)
        if issue.count != count or len(value) > PART_BYTES:
            self._count("malformed")
            return None
        issue.chunks[index] = value
        if sum(i.size for i in self._issues.values()) > MAX_FILE_BYTES * MAX_ISSUES:
            del self._issues[issued]
            self._count("oversize")
            return None
        if len(issue.chunks) < count:
            return None
        data = b"".join(issue.chunks[i] for i in range(count))
        del self._issues[issued]  # one that does not verify must not hide a real older one
        self._count("assembled")
        return issued, data

    def accepted(self, issued_ms: int) -> None:
        """The agent believed the file of ``issued_ms``: older issues are of no more use."""
        self.newer_than = max(self.newer_than, issued_ms)
        for old in [i for i in self._issues if i <= self.newer_than]:
            del self._issues[old]

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
