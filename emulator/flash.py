"""Emulated flash for tests and demos: RAM-backed, with injectable power cuts.

A power cut is what the record log must survive: ``PowerCutDevice`` lets
the first ``budget`` bytes of writes and erases reach the medium, applies a
cut write only up to the cut byte (the rest of the range keeps its old
contents), and then fails every operation, as a terminal does when the
supply drops mid-write.
"""

from __future__ import annotations

from hal.blockdev import (
    ERASED,
    IOCTL_BLOCK_ERASE,
    IOCTL_BLOCK_SIZE,
    IOCTL_SYNC,
    BlockDevice,
    _CountingDevice,
)


class RamBlockDevice(_CountingDevice):
    """Flash in a bytearray; starts erased (0xFF) unless given a fill byte."""

    def __init__(self, block_size: int, block_count: int, fill: int = ERASED):
        super().__init__(block_size, block_count)
        self.data = bytearray([fill]) * (block_size * block_count)

    def _pread(self, pos: int, buf: bytearray | memoryview) -> None:
        buf[:] = self.data[pos:pos + len(buf)]

    def _pwrite(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        self.data[pos:pos + len(data)] = data

    def _sync(self) -> None:
        pass


class PowerCut(OSError):
    """Raised by a PowerCutDevice once its write budget is spent."""


class PowerCutDevice:
    """Wraps a device; writes and erases stop dead after ``budget`` bytes (None: never)."""

    def __init__(self, inner: BlockDevice, budget: int | None = None):
        self.inner = inner
        self.budget = budget
        self.written = 0  # bytes of writes and erases that reached the medium
        self.dead = False

    def _spend(self, n: int) -> int:
        """How many of the next ``n`` bytes reach the medium."""
        if self.dead:
            raise PowerCut("power is off")
        if self.budget is None:
            self.written += n
            return n
        allowed = max(0, min(n, self.budget - self.written))
        self.written += allowed
        return allowed

    def readblocks(self, block_num: int, buf: bytearray | memoryview,
                   offset: int | None = None) -> None:
        if self.dead:
            raise PowerCut("power is off")
        self.inner.readblocks(block_num, buf, offset)

    def writeblocks(self, block_num: int, buf: bytes | bytearray | memoryview,
                    offset: int | None = None) -> None:
        allowed = self._spend(len(buf))
        if allowed:
            self.inner.writeblocks(block_num, bytes(buf[:allowed]), offset or 0)
        if allowed < len(buf):
            self.dead = True
            raise PowerCut(f"power cut after {allowed} of {len(buf)} bytes")

    def ioctl(self, op: int, arg: int) -> int | None:
        if op == IOCTL_BLOCK_ERASE:
            size = self.inner.ioctl(IOCTL_BLOCK_SIZE, 0) or 0
            allowed = self._spend(size)
            if allowed < size:  # a cut erase: a prefix of the block reads erased
                self.dead = True
                if allowed:
                    self.inner.writeblocks(arg, bytes([ERASED]) * allowed, 0)
                raise PowerCut(f"power cut during erase of block {arg}")
            return self.inner.ioctl(op, arg)
        if self.dead and op == IOCTL_SYNC:
            raise PowerCut("power is off")
        return self.inner.ioctl(op, arg)
