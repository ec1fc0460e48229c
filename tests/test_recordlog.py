"""The record log: durability, power cuts at every byte, damage, capacity, wear."""

from __future__ import annotations

import contextlib
import copy
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emulator.flash import PowerCut, PowerCutDevice, RamBlockDevice
from hal.recordlog import (
    DATA_START,
    EC_SIZE,
    END,
    REC_HEADER,
    REC_OVERHEAD,
    USE_OFFSET,
    LogCorruptError,
    LogFailedError,
    LogFormatError,
    PartitionFullError,
    RecordLog,
    RecordTooLargeError,
    record_size,
)

SEG = 4096
SEGMENTS = 8
PAYLOAD = 256  # the size the ledger benchmark uses


def payload(i: int, n: int = PAYLOAD) -> bytes:
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n]


def contents(dev) -> list[tuple[int, bytes]]:
    return list(RecordLog(dev).records())


def filled(records: int, segments: int = SEGMENTS) -> RamBlockDevice:
    dev = RamBlockDevice(SEG, segments)
    log = RecordLog(dev)
    log.erase_dirty()
    for i in range(records):
        log.append(payload(i))
    return dev


def bytes_written_by(dev: RamBlockDevice, op) -> int:
    probe = PowerCutDevice(copy.deepcopy(dev))
    op(RecordLog(probe))
    return probe.written


def cut_and_recover(dev: RamBlockDevice, op, budget: int) -> RamBlockDevice:
    """Run ``op`` on a copy of ``dev`` with power cut after ``budget`` bytes."""
    victim = copy.deepcopy(dev)
    log = RecordLog(PowerCutDevice(victim, budget))
    with pytest.raises(PowerCut):
        op(log)
    with pytest.raises((PowerCut, LogFailedError)):
        log.append(b"after the cut")
    return victim


# ----------------------------------------------------------------- basics

def test_appended_records_read_back_by_id_and_in_order_after_reopen():
    dev = filled(40)
    log = RecordLog(dev)
    assert log.report.records == 40 and not log.report.torn_tail
    assert (log.first_seq, log.next_seq, len(log)) == (1, 41, 40)
    assert [s for s, _ in log.records()] == list(range(1, 41))
    for i in (0, 13, 39):
        assert log.read(i + 1) == payload(i)
    assert [p for _, p in log.records(start=38)] == [payload(37), payload(38), payload(39)]
    assert log.report.dirty_segments == 0


def test_read_of_an_unknown_id_names_the_range_held():
    log = RecordLog(filled(3))
    for bad in (0, 4, -1):
        with pytest.raises(KeyError, match=r"1\.\.3"):
            log.read(bad)


def test_an_empty_log_starts_at_record_one_and_survives_reopen():
    dev = RamBlockDevice(SEG, SEGMENTS, fill=0x00)  # a fresh sparse image reads zeros
    log = RecordLog(dev)
    assert (len(log), log.next_seq, log.report.dirty_segments) == (0, 1, SEGMENTS)
    assert log.append(b"") == 1
    assert RecordLog(dev).read(1) == b""


def test_a_record_larger_than_an_erase_block_is_refused_and_nothing_is_written():
    dev = filled(2)
    log = RecordLog(dev)
    before = bytes(dev.data)
    with pytest.raises(RecordTooLargeError, match="exceeds"):
        log.append(b"x" * (log.max_payload + 1))
    assert bytes(dev.data) == before
    assert log.append(b"x" * log.max_payload) == 3
    assert RecordLog(dev).read(3) == b"x" * log.max_payload


def test_a_batch_is_visible_only_after_its_single_sync():
    dev = RamBlockDevice(SEG, SEGMENTS)
    log = RecordLog(dev)
    syncs = dev.counters().syncs
    ids = log.append_many(payload(i) for i in range(30))  # spans three segments
    assert ids == list(range(1, 31))
    assert dev.counters().syncs == syncs + 1
    assert [p for _, p in RecordLog(dev).records()] == [payload(i) for i in range(30)]


# ------------------------------------------------------------- power cuts

def _every_cut_recovers_previous_state(dev: RamBlockDevice, op, step_over: int = 0) -> int:
    """Cut ``op`` at every byte (erases sampled every ``step_over`` bytes when given)."""
    expected = contents(dev)
    total = bytes_written_by(dev, op)
    cuts = list(range(total))
    if step_over:
        cuts = sorted(set(range(0, SEG, step_over)) | set(range(SEG, total)))
    for cut in cuts:
        victim = cut_and_recover(dev, op, cut)
        got = contents(victim)
        assert got == expected, f"cut after {cut} of {total} bytes lost or invented records"
        # the recovered log takes new writes, which survive a further reopen
        log = RecordLog(victim)
        seq = log.append(b"next")
        assert contents(victim) == [*expected, (seq, b"next")]
    return len(cuts)


def test_power_cut_at_every_byte_of_an_append_recovers_the_previous_state_exactly():
    dev = filled(5)  # the append lands in the open segment
    n = _every_cut_recovers_previous_state(dev, lambda log: log.append(payload(99)))
    assert n == REC_OVERHEAD + PAYLOAD  # header, payload, END: the cut at END included


def test_power_cut_at_every_byte_of_an_append_opening_a_new_segment():
    per_seg = (SEG - DATA_START) // record_size(PAYLOAD)
    dev = filled(per_seg)  # the open segment is full: the next append opens a fresh one
    n = _every_cut_recovers_previous_state(dev, lambda log: log.append(payload(99)))
    assert n == 32 + REC_OVERHEAD + PAYLOAD  # use header + record


def test_power_cut_anywhere_in_an_append_that_must_erase_first():
    dev = RamBlockDevice(SEG, 3, fill=0x00)  # unformatted: every segment needs an erase
    log = RecordLog(dev)
    log.append(payload(1))
    n = _every_cut_recovers_previous_state(
        dev, lambda log: log.append(b"y" * (log.max_payload)), step_over=61)
    assert n > EC_SIZE + 32 + 256


def test_power_cut_at_every_byte_of_a_batch_keeps_none_of_it():
    dev = filled(2)
    batch = [payload(50 + i, 40) for i in range(5)]  # fits the open segment
    _every_cut_recovers_previous_state(dev, lambda log: log.append_many(batch))


def test_power_cut_during_release_loses_no_live_record():
    dev = filled(40)
    live_from = 30
    expected = [r for r in contents(dev) if r[0] >= live_from]
    total = bytes_written_by(dev, lambda log: log.release(live_from))
    assert total > 0
    for cut in range(0, total, 37):
        victim = cut_and_recover(dev, lambda log: log.release(live_from), cut)
        got = contents(victim)
        assert got[-len(expected):] == expected
        assert [s for s, _ in got] == list(range(got[0][0], 41))  # dense, no holes


def test_after_a_failed_write_the_log_refuses_writes_until_reopened():
    dev = filled(3)
    log = RecordLog(PowerCutDevice(dev, budget=10))
    with pytest.raises(PowerCut):
        log.append(b"z" * 100)
    with pytest.raises(LogFailedError, match="reopen"):
        log.append(b"z")
    with pytest.raises(LogFailedError):
        log.release(2)


# ------------------------------------------------------------- bit flips

def _last_record_extent(dev: RamBlockDevice) -> tuple[int, int]:
    """Flash span of the newest record: header, payload and END."""
    log = RecordLog(dev)
    seg = log._segments[-1]
    start = seg.block * SEG + seg.offsets[-1]
    return start, start + REC_OVERHEAD + len(log.read(log.next_seq - 1))


def test_a_flipped_byte_anywhere_in_the_last_record_is_damage_and_salvage_keeps_the_rest():
    """Injected: each byte of the newest record (a committed append) flipped with three masks.

    Survives: open names record 6 as damaged, never drops it as a torn write;
    salvage serves the five records before it. (tests/test_recordlog_rot.py
    covers batches, cuts and the END byte further.)
    """
    dev = filled(6)
    expected = contents(dev)[:-1]
    start, end = _last_record_extent(dev)
    for pos in range(start, end):
        for mask in (0x01, 0x80, 0xFF):
            victim = copy.deepcopy(dev)
            victim.data[pos] ^= mask
            with pytest.raises(LogCorruptError, match=r"record 6 at offset"):
                RecordLog(victim)
            salvaged = RecordLog(victim, salvage=True)
            assert list(salvaged.records()) == expected, f"flip {mask:#x} at byte {pos - start}"


def test_a_flipped_byte_in_an_earlier_record_is_damage_not_a_torn_tail():
    dev = filled(6)
    log = RecordLog(dev)
    pos = log._segments[0].block * SEG + log._segments[0].offsets[2] + REC_HEADER + 7
    dev.data[pos] ^= 0x04
    with pytest.raises(LogCorruptError, match=r"record 4 .*intact|from 3 on"):
        RecordLog(dev)


def test_salvage_opens_a_damaged_log_read_only_with_the_records_before_the_damage():
    dev = filled(30)  # three segments; damage the third record of the first
    log = RecordLog(dev)
    pos = log._segments[0].block * SEG + log._segments[0].offsets[2] + REC_HEADER + 7
    dev.data[pos] ^= 0x04
    salvaged = RecordLog(dev, salvage=True)
    assert [p for _, p in salvaged.records()] == [payload(0), payload(1)]
    assert salvaged.next_seq == 3 and salvaged.report.damage
    before = bytes(dev.data)
    with pytest.raises(LogFailedError):
        salvaged.append(b"no writes after damage")
    assert bytes(dev.data) == before


def test_a_lost_record_at_the_end_of_a_full_segment_is_reported_as_a_gap():
    """Injected: the END byte of the last record of a full segment erased to 0xFF, which on
    its own reads as a write cut at its last byte. Survives: the next segment starts one
    record later, and that gap is reported."""
    dev = filled(30)  # three segments, 14 records each but the last
    log = RecordLog(dev)
    first = log._segments[0]
    end = first.block * SEG + first.offsets[-1] + REC_HEADER + PAYLOAD
    assert dev.data[end] == END
    dev.data[end] = 0xFF
    with pytest.raises(LogCorruptError, match="starts at record 15, expected 14"):
        RecordLog(dev)
    dev.data[end] = END ^ 0x10  # any other value is rot of that record itself
    with pytest.raises(LogCorruptError, match=r"record 14 at offset \d+ fails its check: its end"):
        RecordLog(dev)


def test_a_damaged_use_header_over_live_records_is_reported():
    dev = filled(30)
    log = RecordLog(dev)
    block = log._segments[0].block
    dev.data[block * SEG + USE_OFFSET + 9] ^= 0x01  # inside the serial
    with pytest.raises(LogCorruptError, match="use header"):
        RecordLog(dev)


def test_a_damaged_erase_count_header_keeps_the_records_and_takes_the_mean_wear():
    dev = filled(30)
    dev.data[0] ^= 0xFF
    log = RecordLog(dev)
    assert len(log) == 30


def test_a_log_of_another_format_version_is_refused_not_taken_for_free_space():
    """Injected: segment 1's erase-count header rewritten as format 1 wrote it (valid CRC).

    Survives: open raises LogFormatError naming the segment and both versions;
    nothing is erased (taking the segments for free space would erase them).
    """
    dev = filled(20)
    head = struct.pack("<4sB3xI", b"EKEC", 1, 3)
    dev.data[SEG:SEG + EC_SIZE] = head + zlib.crc32(head).to_bytes(4, "little")
    before = bytes(dev.data)
    with pytest.raises(LogFormatError, match=r"segment 1 holds record-log format 1, .* format 2"):
        RecordLog(dev)
    assert bytes(dev.data) == before


@given(st.binary(min_size=1, max_size=SEG), st.integers(0, SEG * 3 - 1))
def test_garbage_anywhere_on_flash_opens_cleanly_or_raises_a_corruption_error(junk, where):
    dev = filled(20, segments=4)
    dev.data[where:where + len(junk)] = junk[: len(dev.data) - where]
    try:
        log = RecordLog(dev)
    except LogCorruptError:
        return
    for seq, data in log.records():
        assert log.read(seq) == data


# ------------------------------------------------------ capacity and wear

def test_a_full_partition_refuses_the_write_and_keeps_every_record():
    dev = RamBlockDevice(SEG, 4)
    log = RecordLog(dev)
    n = 0
    with pytest.raises(PartitionFullError, match="partition full"):
        while True:
            log.append(payload(n))
            n += 1
    per_seg = (SEG - DATA_START) // record_size(PAYLOAD)
    assert n == 4 * per_seg
    before = bytes(dev.data)
    with pytest.raises(PartitionFullError):
        log.append_many([b"a", b"b" * 4000])
    assert bytes(dev.data) == before
    assert [p for _, p in RecordLog(dev).records()] == [payload(i) for i in range(n)]


def test_release_frees_whole_segments_and_records_before_them_are_gone():
    dev = filled(40)  # 14 records per segment: segments hold 1-14, 15-28, 29-40
    log = RecordLog(dev)
    assert log.release(20) == 1
    assert log.first_seq == 15
    with pytest.raises(KeyError):
        log.read(14)
    assert log.read(15) == payload(14)
    reopened = RecordLog(dev)
    assert (reopened.first_seq, reopened.next_seq) == (15, 41)


def test_release_never_frees_the_open_segment_so_ids_never_restart():
    dev = filled(40)
    log = RecordLog(dev)
    log.release(10_000)
    assert log.next_seq == 41 and log.first_seq == 29
    assert RecordLog(dev).append(b"n") == 41


def test_the_compactor_hook_keeps_a_ring_running_with_even_wear():
    dev = RamBlockDevice(SEG, 6)
    calls = []

    def compact(log: RecordLog) -> None:
        calls.append(log.next_seq)
        log.append(b"snapshot at %d" % log.next_seq)  # may use the reserved segment
        log.release(log.next_seq - 20)

    log = RecordLog(dev, compactor=compact, reserve_segments=1)
    for i in range(600):
        log.append(payload(i))
    assert calls, "the hook was never called"
    log = RecordLog(dev, compactor=compact)
    assert log.read(log.next_seq - 1) == payload(599)
    assert len(log) >= 20 and log.next_seq == 601 + len(calls)  # 600 records + snapshots
    assert any(p.startswith(b"snapshot at") for _, p in log.records())
    wear = log.erase_counts()
    assert max(wear) - min(wear) <= 2, wear


def test_without_room_after_compaction_the_write_is_refused():
    dev = RamBlockDevice(SEG, 4)
    log = RecordLog(dev, compactor=lambda log: None, reserve_segments=1)
    with pytest.raises(PartitionFullError, match="kept for compaction"):
        for i in range(1000):
            log.append(payload(i))
    assert len(RecordLog(dev)) == len(log)


def test_erase_counts_persist_across_reopen():
    dev = filled(40)
    log = RecordLog(dev)
    log.release(30)
    counts = log.erase_counts()
    assert sum(counts) > 0
    assert RecordLog(dev).erase_counts() == counts
    stats = RecordLog(dev).stats()
    assert stats.erase_max == max(counts) and stats.records == 12


@given(st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(0, 600)),
    st.tuples(st.just("batch"), st.lists(st.integers(0, 300), min_size=1, max_size=12)),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("reopen"), st.just(0)),
), max_size=30))
def test_the_log_matches_a_list_model_under_any_sequence_of_operations(ops):
    dev = RamBlockDevice(SEG, 6)
    log = RecordLog(dev)
    model: dict[int, bytes] = {}
    for op, arg in ops:
        if op == "append":
            data = payload(len(model), arg)
            with contextlib.suppress(PartitionFullError):
                model[log.append(data)] = data
        elif op == "batch":
            datas = [payload(i, n) for i, n in enumerate(arg)]
            with contextlib.suppress(PartitionFullError):
                model.update(zip(log.append_many(datas), datas, strict=True))
        elif op == "release":
            log.release(log.first_seq + arg)
            model = {s: d for s, d in model.items() if s >= log.first_seq}
        else:
            log = RecordLog(dev)
        assert dict(log.records()) == model
