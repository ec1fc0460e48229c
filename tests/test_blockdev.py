"""Block devices: image files, partitions of a board's flash, MicroPython's protocol."""

from __future__ import annotations

import os

import pytest

from emulator.flash import RamBlockDevice
from hal.blockdev import (
    ERASED,
    IOCTL_BLOCK_COUNT,
    IOCTL_BLOCK_ERASE,
    IOCTL_BLOCK_SIZE,
    IOCTL_SYNC,
    FileBlockDevice,
    FlashError,
    PartitionDevice,
    open_partition,
)
from hal.board import board_path, load_board
from hal.recordlog import RecordLog

BS = 4096


def test_a_new_image_is_sparse_and_answers_the_ioctls(tmp_path):
    img = tmp_path / "flash.img"
    with FileBlockDevice.create_image(img, 64 * 1024 * 1024, BS) as dev:
        assert dev.ioctl(IOCTL_BLOCK_COUNT, 0) == 16384
        assert dev.ioctl(IOCTL_BLOCK_SIZE, 0) == BS
        assert dev.ioctl(99, 0) is None  # unknown ops answer None, as in MicroPython
    assert os.stat(img).st_blocks * 512 < 1024 * 1024


def test_extended_writes_read_back_at_any_offset_and_persist(tmp_path):
    img = tmp_path / "flash.img"
    with FileBlockDevice.create_image(img, 16 * BS, BS) as dev:
        dev.writeblocks(3, b"hello", 100)
        dev.ioctl(IOCTL_SYNC, 0)
    with FileBlockDevice(img, BS) as dev:
        buf = bytearray(5)
        dev.readblocks(3, buf, 100)
        assert buf == b"hello"
        c = dev.counters()
        assert (c.bytes_read, c.bytes_written) == (5, 0)


def test_erase_sets_a_block_to_ones_and_counts_wear(tmp_path):
    with FileBlockDevice.create_image(tmp_path / "f.img", 4 * BS, BS) as dev:
        dev.writeblocks(1, b"\x00" * 10, 0)
        dev.ioctl(IOCTL_BLOCK_ERASE, 1)
        dev.ioctl(IOCTL_BLOCK_ERASE, 1)
        buf = bytearray(BS)
        dev.readblocks(1, buf)
        assert buf == bytes([ERASED]) * BS
        assert dev.erase_count(1) == 2 and dev.counters().max_erase_count == 2


def test_the_simple_interface_erases_whole_blocks_before_writing():
    dev = RamBlockDevice(BS, 4, fill=0x00)
    dev.writeblocks(2, b"\x5a" * BS)
    assert dev.erase_count(2) == 1
    with pytest.raises(FlashError, match="whole blocks"):
        dev.writeblocks(0, b"short")


@pytest.mark.parametrize(("block", "offset", "length"), [(4, 0, 1), (3, BS - 2, 3), (-1, 0, 1)])
def test_access_outside_the_device_is_refused(block, offset, length):
    dev = RamBlockDevice(BS, 4)
    with pytest.raises(FlashError, match="outside"):
        dev.readblocks(block, bytearray(length), offset)
    with pytest.raises(FlashError, match="outside"):
        dev.writeblocks(block, b"x" * length, offset)


def test_an_image_smaller_than_asked_is_refused_with_its_size(tmp_path):
    img = tmp_path / "small.img"
    img.write_bytes(b"\xff" * BS)
    with pytest.raises(FlashError, match=f"holds {BS} bytes"):
        FileBlockDevice(img, BS, block_count=2)
    with pytest.raises(FlashError, match="cannot open"):
        FileBlockDevice(tmp_path / "missing.img", BS)


def test_a_partition_is_a_window_that_cannot_reach_its_neighbours():
    dev = RamBlockDevice(BS, 10)
    part = PartitionDevice(dev, 4, 3, "ledger")
    part.writeblocks(0, b"abc", 10)
    assert dev.data[4 * BS + 10:4 * BS + 13] == b"abc"
    assert part.ioctl(IOCTL_BLOCK_COUNT, 0) == 3
    with pytest.raises(FlashError, match="ledger"):
        part.writeblocks(3, b"x", 0)
    with pytest.raises(FlashError, match="ledger"):
        part.ioctl(IOCTL_BLOCK_ERASE, 3)
    with pytest.raises(FlashError, match="do not fit"):
        PartitionDevice(dev, 8, 3, "too-big")


def test_the_boards_ledger_partition_on_a_sparse_image_holds_a_record_log(tmp_path):
    board = load_board(board_path("host"))
    fl = board.flash
    img = tmp_path / "host.img"
    with FileBlockDevice.create_image(img, fl.size_bytes, fl.erase_block_bytes) as dev:
        ledger = open_partition(dev, fl, "ledger")
        keystore = open_partition(dev, fl, "keystore")
        log = RecordLog(ledger)
        assert log.segment_count == fl.partition("ledger").size_bytes // fl.erase_block_bytes
        ids = log.append_many([b"block %d" % i for i in range(100)])
        RecordLog(keystore).append(b"other partition")
    with FileBlockDevice(img, fl.erase_block_bytes) as dev:
        log = RecordLog(open_partition(dev, fl, "ledger"))
        assert [log.read(i) for i in ids[:2]] == [b"block 0", b"block 1"]
        assert len(RecordLog(open_partition(dev, fl, "keystore"))) == 1
    with FileBlockDevice(img, 4096) as dev, pytest.raises(FlashError, match="erase block"):
        open_partition(dev, fl, "ledger")
