"""Flash block devices with MicroPython's ``os.AbstractBlockDev`` shape.

The same three calls MicroPython's filesystems use (``readblocks``,
``writeblocks``, ``ioctl``), so storage code written against them can move
between a flash image file on the host, a device node on the terminal
(``/dev/mmcblk0``, ``/dev/vda`` under QEMU) and emulated flash in tests.

As with littlefs on MicroPython, a *block* here is the erase unit: the
extended interface reads and programs any byte range inside the device
(``offset`` given), and ``ioctl(BLOCK_ERASE, n)`` erases block ``n`` to
0xFF. ``writeblocks`` without ``offset`` is the simple interface: whole
blocks, erased first.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hal.board import Flash

# ioctl operations, numbered as MicroPython's os.AbstractBlockDev documents them.
IOCTL_INIT = 1
IOCTL_DEINIT = 2
IOCTL_SYNC = 3
IOCTL_BLOCK_COUNT = 4
IOCTL_BLOCK_SIZE = 5
IOCTL_BLOCK_ERASE = 6

ERASED = 0xFF  # NOR/NAND flash reads all ones after an erase


class FlashError(OSError):
    """The flash device refused an operation (out of range, short I/O, closed)."""


class BlockDevice(Protocol):
    """What storage code may call: MicroPython's block device protocol."""

    def readblocks(self, block_num: int, buf: bytearray | memoryview,
                   offset: int | None = None) -> None: ...

    def writeblocks(self, block_num: int, buf: bytes | bytearray | memoryview,
                    offset: int | None = None) -> None: ...

    def ioctl(self, op: int, arg: int) -> int | None: ...


@dataclass(frozen=True)
class DeviceCounters:
    """I/O and wear figures of one device since it was opened."""

    bytes_read: int
    bytes_written: int
    erases: int
    syncs: int
    max_erase_count: int


class _CountingDevice:
    """Range checks, counters and the simple-interface erase, shared by every device."""

    def __init__(self, block_size: int, block_count: int):
        if block_size <= 0 or block_count <= 0:
            raise ValueError(f"bad geometry: {block_count} blocks of {block_size} bytes")
        self.block_size = block_size
        self.block_count = block_count
        self._erase_counts = array("I", bytes(4 * block_count))
        self._read = self._written = self._erases = self._syncs = 0

    @property
    def size_bytes(self) -> int:
        return self.block_size * self.block_count

    def _span(self, block_num: int, length: int, offset: int | None) -> int:
        pos = block_num * self.block_size + (offset or 0)
        if block_num < 0 or (offset or 0) < 0 or pos + length > self.size_bytes:
            raise FlashError(f"access of {length} bytes at block {block_num} offset {offset} "
                             f"is outside the device ({self.block_count} x {self.block_size})")
        return pos

    def readblocks(self, block_num: int, buf: bytearray | memoryview,
                   offset: int | None = None) -> None:
        pos = self._span(block_num, len(buf), offset)
        self._pread(pos, buf)
        self._read += len(buf)

    def writeblocks(self, block_num: int, buf: bytes | bytearray | memoryview,
                    offset: int | None = None) -> None:
        if offset is None:
            if len(buf) % self.block_size:
                raise FlashError(f"simple-interface write of {len(buf)} bytes is not whole "
                                 f"blocks of {self.block_size}")
            for i in range(len(buf) // self.block_size):
                self.ioctl(IOCTL_BLOCK_ERASE, block_num + i)
        pos = self._span(block_num, len(buf), offset)
        self._pwrite(pos, buf)
        self._written += len(buf)

    def ioctl(self, op: int, arg: int) -> int | None:
        if op in (IOCTL_INIT, IOCTL_DEINIT):
            return 0
        if op == IOCTL_SYNC:
            self._sync()
            self._syncs += 1
            return 0
        if op == IOCTL_BLOCK_COUNT:
            return self.block_count
        if op == IOCTL_BLOCK_SIZE:
            return self.block_size
        if op == IOCTL_BLOCK_ERASE:
            pos = self._span(arg, self.block_size, 0)
            self._pwrite(pos, bytes([ERASED]) * self.block_size)
            self._erase_counts[arg] += 1
            self._erases += 1
            return 0
        return None  # unknown operations answer None, as MicroPython's devices do

    def counters(self) -> DeviceCounters:
        return DeviceCounters(self._read, self._written, self._erases, self._syncs,
                              max(self._erase_counts))

    def erase_count(self, block_num: int) -> int:
        """Erases of one block since this device was opened (persistent wear is the log's)."""
        return self._erase_counts[block_num]

    # the medium: subclasses implement these three
    def _pread(self, pos: int, buf: bytearray | memoryview) -> None:
        raise NotImplementedError

    def _pwrite(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def _sync(self) -> None:
        raise NotImplementedError


class FileBlockDevice(_CountingDevice):
    """Flash behind a file: an image file (sparse) or a device node such as /dev/mmcblk0."""

    def __init__(self, path: str | Path, block_size: int, block_count: int | None = None):
        self.path = str(path)
        try:
            self._fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise FlashError(exc.errno, f"cannot open flash {self.path}: {exc.strerror}") from exc
        size = os.lseek(self._fd, 0, os.SEEK_END)
        count = size // block_size if block_count is None else block_count
        if count * block_size > size or count == 0:
            os.close(self._fd)
            raise FlashError(f"flash {self.path} holds {size} bytes, less than "
                             f"{max(count, 1)} blocks of {block_size}")
        super().__init__(block_size, count)

    @classmethod
    def create_image(cls, path: str | Path, size_bytes: int, block_size: int) -> FileBlockDevice:
        """A new sparse image file of the flash's size (reads as zeros until written)."""
        with open(path, "xb") as f:
            f.truncate(size_bytes)
        return cls(path, block_size)

    def _pread(self, pos: int, buf: bytearray | memoryview) -> None:
        got = os.preadv(self._fd, [buf], pos)
        if got != len(buf):
            raise FlashError(f"short read of {got}/{len(buf)} bytes at {pos} in {self.path}")

    def _pwrite(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, pos)
            view, pos = view[n:], pos + n

    def _sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileBlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PartitionDevice:
    """A window of whole erase blocks on another device: one board partition."""

    def __init__(self, device: BlockDevice, first_block: int, block_count: int, name: str = ""):
        total = device.ioctl(IOCTL_BLOCK_COUNT, 0) or 0
        if first_block < 0 or block_count <= 0 or first_block + block_count > total:
            raise FlashError(f"partition {name!r} blocks {first_block}..{first_block + block_count}"
                             f" do not fit a device of {total} blocks")
        self.device = device
        self.first_block = first_block
        self.block_count = block_count
        self.block_size = device.ioctl(IOCTL_BLOCK_SIZE, 0) or 0
        self.name = name

    def _check(self, block_num: int, length: int, offset: int | None) -> None:
        end = block_num * self.block_size + (offset or 0) + length
        if block_num < 0 or end > self.block_count * self.block_size:
            raise FlashError(f"access of {length} bytes at block {block_num} is outside "
                             f"partition {self.name!r} ({self.block_count} blocks)")

    def readblocks(self, block_num: int, buf: bytearray | memoryview,
                   offset: int | None = None) -> None:
        self._check(block_num, len(buf), offset)
        self.device.readblocks(self.first_block + block_num, buf, offset)

    def writeblocks(self, block_num: int, buf: bytes | bytearray | memoryview,
                    offset: int | None = None) -> None:
        self._check(block_num, len(buf), offset)
        self.device.writeblocks(self.first_block + block_num, buf, offset)

    def ioctl(self, op: int, arg: int) -> int | None:
        if op == IOCTL_BLOCK_COUNT:
            return self.block_count
        if op == IOCTL_BLOCK_ERASE:
            if not 0 <= arg < self.block_count:
                raise FlashError(f"erase of block {arg} outside partition {self.name!r}")
            return self.device.ioctl(op, self.first_block + arg)
        return self.device.ioctl(op, arg)


def open_partition(device: BlockDevice, flash: Flash, name: str) -> PartitionDevice:
    """The named partition of a board's flash on ``device`` (whose blocks are erase blocks)."""
    part = flash.partition(name)
    bs = device.ioctl(IOCTL_BLOCK_SIZE, 0) or 0
    if bs != flash.erase_block_bytes:
        raise FlashError(f"device block size {bs} is not the board's erase block "
                         f"{flash.erase_block_bytes}")
    return PartitionDevice(device, part.offset_bytes // bs, part.size_bytes // bs, name)
