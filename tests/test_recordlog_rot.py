"""Bit rot in the newest record is not a power cut: the record log tells them apart.

A power cut leaves a write's bytes programmed up to the cut and the rest
erased (emulator/flash.py); rot changes a byte of a record that was
complete. Recovery must drop the first and report the second, never drop a
committed record or serve it with other content.
"""

from __future__ import annotations

import copy
import hashlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.keystore.store import KeyStore, StoreCorruptError
from agent.ledger.block import endorse, genesis, with_endorsements
from agent.ledger.chain import Chain, ChainCorruptError, open_chain
from agent.ledger.identity import TerminalIdentity
from agent.ledger.rules import propose_block
from agent.ledger.tx import TxBuilder
from emulator.flash import PowerCut, PowerCutDevice, RamBlockDevice
from hal.blockdev import ERASED
from hal.recordlog import (
    END,
    REC_HEADER,
    REC_OVERHEAD,
    LogCorruptError,
    LogError,
    LogFailedError,
    RecordLog,
    _sound_header_length,
    crc8,
    encode_records,
)

EMULATED = bool(os.environ.get("EDGEKEY_EMULATED"))
SEG = 4096
SEGMENTS = 6
MASKS = (0x01, 0xFF)


def payload(i: int, n: int = 200) -> bytes:
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n]


def log_with(batches: list[list[bytes]], segments: int = SEGMENTS) -> RamBlockDevice:
    """A RAM flash holding ``batches``, each written as one group commit."""
    dev = RamBlockDevice(SEG, segments)
    log = RecordLog(dev)
    for batch in batches:
        log.append_many(batch)
    return dev


def contents(dev: RamBlockDevice, **kw: bool) -> list[tuple[int, bytes]]:
    return list(RecordLog(dev, **kw).records())


def extents(dev: RamBlockDevice, seqs: range) -> list[tuple[int, int, int]]:
    """(seq, first, end) flash offsets of each record's header, payload and END."""
    log = RecordLog(dev)
    out = []
    for seq in seqs:
        seg, pos = log._locate(seq)  # test-only peek at where a record sits
        start = seg.block * SEG + pos
        out.append((seq, start, start + REC_OVERHEAD + len(log.read(seq))))
    return out


def flip_outcomes(dev: RamBlockDevice, newest: range) -> dict[str, int]:
    """Flip every byte of the ``newest`` records with each mask; classify each reopen.

    "reported": LogCorruptError naming the flipped record, and salvage keeps
    exactly the records before the newest batch. "kept": only an END turned
    into exactly 0xFF may do neither, and then the record must be served
    with its exact payload. Anything else fails the test at once.
    """
    before = [r for r in contents(dev) if r[0] < newest.start]
    everything = contents(dev)
    counts = {"reported": 0, "kept": 0}
    for seq, start, end in extents(dev, newest):
        for pos in range(start, end):
            for mask in MASKS:
                victim = copy.deepcopy(dev)
                victim.data[pos] ^= mask
                where = f"record {seq} byte {pos - start} ^ {mask:#04x}"
                try:
                    got = contents(victim)
                except LogCorruptError as exc:
                    assert f"record {seq} at offset" in str(exc), where
                    assert contents(victim, salvage=True) == before, where
                    counts["reported"] += 1
                    continue
                assert pos == end - 1 and victim.data[pos] == ERASED, f"{where}: not reported"
                assert got == everything, f"{where}: kept with other content"
                counts["kept"] += 1
    return counts


# ------------------------------------------------ (1) every byte, every mask

def test_every_flip_of_the_newest_single_record_is_reported():
    dev = log_with([[payload(i)] for i in range(7)])
    counts = flip_outcomes(dev, range(7, 8))
    total = (REC_OVERHEAD + 200) * len(MASKS)
    assert counts == {"reported": total, "kept": 0}  # 100 %: END = 0x01 never reads 0xFF


def test_every_flip_of_any_record_of_the_newest_batch_is_reported():
    sizes = [0, 1, 37, 200, 8]  # the empty payload puts the CRC right before END
    dev = log_with([[payload(i)] for i in range(3)] + [[payload(10 + n, n) for n in sizes]])
    counts = flip_outcomes(dev, range(4, 9))
    total = sum(REC_OVERHEAD + n for n in sizes) * len(MASKS)
    assert counts == {"reported": total, "kept": 0}


def test_the_header_check_catches_every_single_byte_error_in_the_header():
    """Exhaustive over the 16 bytes before the CRC-32 and every error value: what lets a
    failing record's length be trusted, so that rot of its length never reads as a cut."""
    head = encode_records([payload(1, 300)], 0x0102_0304_0506)[:16]
    covered = head[:3] + head[4:]  # magic, flags, length, seq
    assert head[3] == crc8(covered)
    buf = memoryview(bytearray(head + bytes(REC_OVERHEAD - 16 + 300)))
    assert _sound_header_length(buf, 0, len(buf)) == 300
    for i in range(16):
        for e in range(1, 256):
            buf[i] ^= e
            assert _sound_header_length(buf, 0, len(buf)) is None, (i, e)
            buf[i] ^= e


# ---------------------------- the one state a cut and rot share, and stray bits

def test_an_erased_end_of_the_newest_record_reads_as_a_cut_at_its_last_byte():
    """Injected: END of the newest record set to 0xFF (seven bit errors from END = 0x01).

    This is byte for byte what a power cut before the write's last byte
    leaves, so it is read as that cut: the record (never acknowledged, for
    the cut) is dropped and the previous records survive. Not reached by
    a single-bit error or an inverted byte; behind a full segment it is a
    gap and reported (test_recordlog.py).
    """
    dev = log_with([[payload(i)] for i in range(4)])
    before = contents(dev)[:-1]
    (_, _, end), = extents(dev, range(4, 5))
    assert dev.data[end - 1] == END
    dev.data[end - 1] = ERASED
    log = RecordLog(dev)
    assert list(log.records()) == before and log.report.torn_tail and not log.report.damage


def test_stray_bits_in_erased_space_after_the_newest_record_lose_nothing_and_raise_nothing():
    dev = log_with([[payload(i)] for i in range(4)])
    expected = contents(dev)
    (_, _, end), = extents(dev, range(4, 5))
    spots = [*range(end, end + 3 * REC_HEADER), end + 700, SEG - 1]  # pad, next header, far
    for pos in spots:
        for mask in MASKS:
            victim = copy.deepcopy(dev)
            victim.data[pos] ^= mask
            log = RecordLog(victim)
            assert list(log.records()) == expected, (pos - end, mask)
            log.append(b"written elsewhere")  # never over the stray byte
            assert contents(victim)[:-1] == expected


def test_rot_in_a_torn_tail_the_log_has_moved_past_costs_nothing():
    """Injected: a power cut 100 bytes into an append's payload, then that torn record's END
    byte programmed, as rot of the dead tail might. Survives: once the log has moved on (the
    next segment starts at the torn record's id, so it never was committed), every record
    and no report. Before that, a cut and rot in one tail are two faults, and reported."""
    dev = log_with([[payload(i)] for i in range(5)])
    seg = RecordLog(dev)._segments[-1]
    end = seg.block * SEG + seg.write_pos + REC_HEADER + 200
    with pytest.raises(PowerCut):
        RecordLog(PowerCutDevice(dev, REC_HEADER + 100)).append(payload(99))
    expected = contents(dev)
    moved_on = copy.deepcopy(dev)
    RecordLog(moved_on).append(b"after the cut")
    for victim in (dev, moved_on):
        assert victim.data[end] == ERASED
        victim.data[end] = END
    with pytest.raises(LogCorruptError, match="record 6 at offset"):
        RecordLog(dev)
    assert contents(moved_on) == [*expected, (6, b"after the cut")]


# -------------------------------- (2) power cuts: no false corruption report

def _cut_at_every_byte(dev: RamBlockDevice, batch: list[bytes]) -> PowerCutDevice:
    """Cut ``batch``'s append after each of its bytes; every reopen holds the records before.

    Returns the probe that wrote the whole batch (its ``written`` counts the bytes).
    """
    expected = contents(dev)
    probe = PowerCutDevice(copy.deepcopy(dev))
    RecordLog(probe).append_many(batch)
    for cut in range(probe.written):
        victim = copy.deepcopy(dev)
        log = RecordLog(PowerCutDevice(victim, cut))
        with pytest.raises(PowerCut):
            log.append_many(batch)
        with pytest.raises((PowerCut, LogFailedError)):
            log.append(b"after the cut")
        assert contents(victim) == expected, f"cut after {cut} of {probe.written} bytes"
    ids = RecordLog(victim).append_many(batch)  # the log recovered last takes the batch again
    assert contents(victim) == [*expected, *zip(ids, batch, strict=True)]
    return probe


def test_a_power_cut_at_every_byte_of_the_newest_append_recovers_the_committed_records():
    dev = log_with([[payload(i)] for i in range(5)])
    probe = _cut_at_every_byte(dev, [payload(99)])
    assert probe.written == REC_OVERHEAD + 200  # the cut before END included


def test_a_power_cut_at_every_byte_of_a_batch_opening_a_segment_recovers_the_committed():
    dev = log_with([[payload(i)] for i in range(18)])  # 18 records of 224 bytes fill a segment
    batch = [payload(50 + n, n) for n in (0, 90, 300, 5)]
    probe = _cut_at_every_byte(dev, batch)
    assert RecordLog(probe)._segments[-1].first_seq == 19  # the batch opened a new segment


# ------------------------------------------ (3) what the fix changes, in one test

def test_rot_in_the_newest_records_payload_is_reported_not_dropped():
    """Injected: one bit flipped (0x01) in payload byte 100 of record 6, the newest record,
    an append acknowledged (synced) before the reopen; nothing else changed.

    Before the fix, recovery took this for a torn write and opened with
    records 1..5 as if record 6 had never been written. Survives now: open
    raises LogCorruptError naming record 6; salvage serves records 1..5 byte
    for byte, read-only.
    """
    dev = RamBlockDevice(SEG, SEGMENTS)
    log = RecordLog(dev)
    for i in range(6):
        log.append(payload(i))
    seg, pos = log._locate(6)
    dev.data[seg.block * SEG + pos + REC_HEADER + 100] ^= 0x01
    with pytest.raises(LogCorruptError, match="record 6"):
        RecordLog(dev)
    salvaged = RecordLog(dev, salvage=True)
    assert list(salvaged.records()) == [(i + 1, payload(i)) for i in range(6 - 1)]


# --------------------------------------------------------- (4) the property

_batches = st.lists(st.lists(st.binary(max_size=300), min_size=1, max_size=5),
                    min_size=1, max_size=6)


def _newest_chunk_start(dev: RamBlockDevice | PowerCutDevice, batch_start: int) -> int:
    """First id of the newest atomic chunk: a batch is split where it crosses a segment."""
    return max(batch_start, RecordLog(dev)._segments[-1].first_seq)


@settings(max_examples=25 if EMULATED else 120)
@given(_batches, st.lists(st.binary(max_size=300), min_size=1, max_size=5),
       st.one_of(st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True)),
                 st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True),
                           st.integers(1, 255))))
def test_a_cut_or_a_flip_never_loses_or_changes_a_committed_record_silently(
        committed, last, fault):
    """Injected: random batches, then a power cut at a random byte of one more batch, or,
    with that batch committed, one byte anywhere in the written records XORed with a random
    mask. Survives: after a cut the records before it (and the whole chunks of a batch that
    crossed a segment before the cut); after a flip every committed record intact, or
    LogCorruptError with salvage serving an intact prefix. The one exception is the state a
    cut and rot share: the newest END turned into 0xFF reads as a cut at that last byte.
    """
    dev = log_with(committed, segments=8)
    before = contents(dev)
    first = len(before) + 1
    if fault[0] == "cut":
        probe = PowerCutDevice(copy.deepcopy(dev))
        RecordLog(probe).append_many(last)
        chunks = last[:_newest_chunk_start(probe, first) - first]  # written before the last
        victim = copy.deepcopy(dev)
        with pytest.raises(PowerCut):
            RecordLog(PowerCutDevice(victim, int(fault[1] * probe.written))).append_many(last)
        written_first = [*before, *zip(range(first, first + len(chunks)), chunks, strict=True)]
        assert contents(victim) in (before, written_first)
        return
    RecordLog(dev).append_many(last)
    everything = contents(dev)
    chunk_start = _newest_chunk_start(dev, first)
    records = extents(dev, range(1, len(everything) + 1))
    spans = [p for _, start, end in records for p in range(start, end)]
    pos = spans[int(fault[1] * len(spans))]
    dev.data[pos] ^= fault[2]
    try:
        got = contents(dev)
    except LogCorruptError:
        kept = contents(dev, salvage=True)
        assert kept == everything[:len(kept)]
        return
    if pos == records[-1][2] - 1 and dev.data[pos] == ERASED:
        assert got == everything[:chunk_start - 1]  # read as cut at its last byte
    else:
        assert got == everything


# ------------------------------------------ through the chain and the key store

IDS = [TerminalIdentity.from_seed(f"rot-{i}", hashlib.sha256(b"rot%d" % i).digest())
       for i in range(3)]
T0 = 1_700_000_000_000


def _chain_with_blocks(dev: RamBlockDevice, blocks: int) -> Chain:
    chain = Chain(RecordLog(dev), IDS[0])
    chain.append(genesis(IDS[0], [(i.terminal_id, i.public_bytes()) for i in IDS],
                         timestamp_ms=T0, endorsers=IDS[:2]))
    builder = TxBuilder(IDS[0])
    for h in range(1, blocks + 1):
        txs = [builder.register(b"M%04d" % (10 * h + k), key_version=1,
                                fingerprint=hashlib.sha256(b"k%d" % (10 * h + k)).digest(),
                                counter=1) for k in range(2)]
        block = propose_block(chain.state, IDS[0], txs, timestamp_ms=T0 + 1000 * h)
        chain.append(with_endorsements(block, [endorse(i, block.header) for i in IDS[:2]]))
    return chain


def _newest_record_bytes(dev: RamBlockDevice) -> range:
    log = RecordLog(dev)
    (_, start, end), = extents(dev, range(log.next_seq - 1, log.next_seq))
    return range(start, end)


def test_rot_in_the_newest_block_is_reported_by_the_chain_with_its_height():
    """Injected: one byte of the newest block's head record (its last record) XORed with
    0x01, at sampled positions across header, body, CRC and END. Before the fix the chain
    booted one block short, the endorsed block 3 gone. Survives: open_chain raises
    ChainCorruptError at height 3."""
    dev = RamBlockDevice(8192, 16)
    chain = _chain_with_blocks(dev, 3)
    assert chain.height == 3
    span = _newest_record_bytes(dev)
    step = 13 if EMULATED else 3
    for pos in sorted({*span[::step], *span[:REC_HEADER], span[-1]}):
        victim = copy.deepcopy(dev)
        victim.data[pos] ^= 0x01
        with pytest.raises(ChainCorruptError) as info:
            open_chain(victim, IDS[0])
        assert info.value.height == 3, pos - span.start
    assert open_chain(dev, IDS[0]).height == 3


def test_rot_in_a_meters_newest_key_record_is_an_error_not_the_superseded_key():
    """Injected: one byte of the key store's newest record (meter 7's version 2) XORed with
    0x01, at every position. Before the fix get() returned version 1's key as the newest.
    Survives: opening the store raises StoreCorruptError."""
    dk = bytes(range(32))
    dev = RamBlockDevice(SEG, 8)
    store = KeyStore(dev, dk, entropy=random.Random(3).randbytes)
    old, new = hashlib.sha256(b"v1").digest(), hashlib.sha256(b"v2").digest()
    store.put(b"meter-7", 1, old)
    store.put(b"meter-7", 2, new)
    for pos in _newest_record_bytes(dev):
        victim = copy.deepcopy(dev)
        victim.data[pos] ^= 0x01
        with pytest.raises(StoreCorruptError, match="damaged"):
            KeyStore(victim, dk).get(b"meter-7")
    assert KeyStore(dev, dk).get(b"meter-7") == new


# --------------------------------------------- (5) giving the damage up: discard_damage

def _bytes_of_each_write(dev: RamBlockDevice, op) -> list[int]:  # type: ignore[no-untyped-def]
    """Bytes each write and erase of ``op`` takes, in order (as PowerCutDevice counts them)."""
    sizes: list[int] = []
    probe = PowerCutDevice(copy.deepcopy(dev))
    write, ioctl = probe.writeblocks, probe.ioctl

    def counted_write(block, buf, offset=None):  # type: ignore[no-untyped-def]
        sizes.append(len(buf))
        write(block, buf, offset)

    def counted_ioctl(op_, arg):  # type: ignore[no-untyped-def]
        before = probe.written
        result = ioctl(op_, arg)
        if probe.written > before:
            sizes.append(probe.written - before)
        return result

    probe.writeblocks, probe.ioctl = counted_write, counted_ioctl  # type: ignore[method-assign]
    op(RecordLog(probe, salvage=True))
    return sizes


def test_discarded_damage_stays_behind_the_log_and_a_cut_in_the_discard_keeps_the_rest():
    """Injected: one bit of record 4 of 40 (three segments), then power lost during
    discard_damage: at every byte of its small writes (erase-count headers, the new segment's
    header) and at the edges and middle of its erases.

    Survives, at every cut: records 1..3, behind the same damage (salvaged the same way again)
    or in a log that opens; after the whole discard, appends go on from record 4 and the log
    reopens without a report, the damaged byte still on flash. Salvage counted the 37 ids it
    gave up.
    """
    dev = log_with([[payload(i)] for i in range(40)], segments=SEGMENTS)
    kept = contents(dev)[:3]
    (_, start, _), = extents(dev, range(4, 5))
    rotten = start + REC_HEADER + 50
    dev.data[rotten] ^= 0x01
    flipped = dev.data[rotten]
    salvaged = RecordLog(copy.deepcopy(dev), salvage=True)
    assert salvaged.report.records_lost == 37 and salvaged.next_seq == 4
    sizes = _bytes_of_each_write(dev, RecordLog.discard_damage)
    cuts, at = set(), 0
    for n in sizes:
        cuts |= set(range(at, at + n)) if n < SEG else {at, at + 1, at + n // 2, at + n - 1}
        at += n
    for budget in sorted(cuts):
        victim = copy.deepcopy(dev)
        with pytest.raises(PowerCut):
            RecordLog(PowerCutDevice(victim, budget), salvage=True).discard_damage()
        try:
            assert contents(victim) == kept, budget
        except LogCorruptError:
            assert contents(victim, salvage=True) == kept, budget
    log = RecordLog(dev, salvage=True)
    assert log.discard_damage() == 2  # the two segments holding only records past it
    assert log.append(b"refetched") == 4
    assert contents(dev) == [*kept, (4, b"refetched")] and not RecordLog(dev).report.damage
    assert dev.data[rotten] == flipped  # the damage is still on flash, behind the log


def test_discard_is_refused_without_damage_and_writes_nothing():
    dev = log_with([[payload(i)] for i in range(5)])
    before = bytes(dev.data)
    for log in (RecordLog(dev), RecordLog(dev, salvage=True)):
        with pytest.raises(LogError, match="salvage"):
            log.discard_damage()
    assert bytes(dev.data) == before
