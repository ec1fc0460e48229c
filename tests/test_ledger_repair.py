"""A damaged ledger partition cut back to the blocks before the damage (agent/ledger/repair.py).

RAM flash only (no etcd, no processes): the fleet's copy of the blocks is the
list the test appended, given back as etcd would give them. Each test says
what it injected and what survived.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass

import pytest

from agent.ledger.block import Block, endorse, genesis, header_hash, with_endorsements
from agent.ledger.chain import REC_HEAD, REC_SNAP_METER, Chain, ChainCorruptError, open_chain
from agent.ledger.identity import TerminalIdentity
from agent.ledger.repair import RepairRefused, repair_chain
from agent.ledger.rules import propose_block
from agent.ledger.tx import TxBuilder, rotation_proof_digest
from emulator.flash import PowerCut, PowerCutDevice, RamBlockDevice
from hal.blockdev import IOCTL_BLOCK_ERASE
from hal.recordlog import REC_HEADER, REC_OVERHEAD, RecordLog

EMULATED = bool(os.environ.get("EDGEKEY_EMULATED"))
SEG = 4096  # small erase blocks: a few dozen blocks span several segments
SEGMENTS = 24
T0 = 1_700_000_000_000
IDS = [TerminalIdentity.from_seed(f"ecd-{i:02d}", hashlib.sha256(b"repair %d" % i).digest())
       for i in range(3)]
GENESIS = genesis(IDS[0], [(i.terminal_id, i.public_bytes()) for i in IDS], timestamp_ms=T0,
                  endorsers=IDS[:2])
PIN = header_hash(GENESIS.header)


def meter(n: int) -> bytes:
    return b"M%05d" % n


@dataclass
class Fleet:
    """One terminal's flash and the fleet's copy of its blocks: what etcd gives back."""

    dev: RamBlockDevice
    blocks: list[Block]  # genesis first
    digests: list[bytes]  # the state's digest at each height

    def boot(self, dev: RamBlockDevice | None = None) -> Chain:
        return open_chain(self.dev if dev is None else dev, IDS[0], genesis_hash=PIN)


def grown(heights: int, *, snapshot_at: int | None = None) -> Fleet:
    """A chain of ``heights`` blocks after genesis: two meters registered in each block, one
    registered earlier rotated; a snapshot after block ``snapshot_at``."""
    dev = RamBlockDevice(SEG, SEGMENTS)
    chain = Chain(RecordLog(dev), IDS[0], genesis_hash=PIN)
    chain.append(GENESIS)
    fleet = Fleet(dev, [GENESIS], [chain.state_digest()])
    b = TxBuilder(IDS[0])
    for h in range(1, heights + 1):
        txs = [b.register(meter(2 * h + k), key_version=1,
                          fingerprint=hashlib.sha256(b"k%d" % (2 * h + k)).digest(), counter=1)
               for k in range(2)]
        if h > 1:
            m = 2 * (h - 1)
            txs.append(b.rotate(meter(m), key_version=2, fingerprint=hashlib.sha256(
                b"r%d" % m).digest(), proof=rotation_proof_digest(b"%d" % m), counter=2))
        block = propose_block(chain.state, IDS[0], txs, timestamp_ms=T0 + 1000 * h)
        block = with_endorsements(block, [endorse(i, block.header) for i in IDS[:2]])
        chain.append(block)
        fleet.blocks.append(block)
        fleet.digests.append(chain.state_digest())
        if h == snapshot_at:
            chain.snapshot()
    return fleet


def span(dev: RamBlockDevice, seq: int) -> range:
    """Where record ``seq`` sits on the RAM flash: header, payload and END."""
    log = RecordLog(dev)
    seg, pos = log._locate(seq)  # test-only peek at where a record sits
    start = seg.block * SEG + pos
    return range(start, start + REC_OVERHEAD + len(log.read(seq)))


def heads(dev: RamBlockDevice) -> list[int]:
    """Record ids of the block heads on flash, oldest first."""
    return [seq for seq, p in RecordLog(dev).records() if p[0] == REC_HEAD]


def refill(chain: Chain, fleet: Fleet) -> None:
    """The blocks after the kept tip come back from the fleet, validated as they are appended."""
    assert chain.height is not None
    for block in fleet.blocks[chain.height + 1:]:
        chain.append(block)


def repaired(dev: RamBlockDevice | PowerCutDevice) -> Chain:
    return repair_chain(dev, IDS[0], genesis_hash=PIN)[0]


# ------------------------------------------------------------------ what is kept

def test_every_flipped_byte_of_the_newest_block_costs_that_block_only():
    """Injected: each byte of the newest block's head record XORed with 0x01 and with 0xFF
    (every 5th byte under qemu-user), one at a time.

    Survives: the repair keeps blocks 0..1, whose state has the digest the chain had at 1;
    the log opens without complaint; the block, given back, goes on again. Sampled (every
    16th byte): boot refused the damage at height 2 before, and boots at 2 with the
    original digest after.
    """
    fleet = grown(2)
    record = span(fleet.dev, heads(fleet.dev)[-1])
    for pos in record[::5 if EMULATED else 1]:
        for mask in (0x01, 0xFF):
            victim = copy.deepcopy(fleet.dev)
            victim.data[pos] ^= mask
            where = f"byte {pos - record.start} ^ {mask:#04x}"
            sampled = (pos - record.start) % 16 == 0 and mask == 0x01
            if sampled:
                with pytest.raises(ChainCorruptError) as refused:
                    fleet.boot(victim)
                assert refused.value.height == 2, where
            chain, repair = repair_chain(victim, IDS[0], genesis_hash=PIN)
            assert (chain.height, repair.height) == (1, 1), where
            assert chain.state_digest() == fleet.digests[1], where
            assert repair.records_lost == len(fleet.blocks[2].txs) + 1, where  # T..., H
            assert not RecordLog(victim).report.damage, where
            refill(chain, fleet)
            assert chain.state_digest() == fleet.digests[2], where
            if sampled:
                assert fleet.boot(victim).state_digest() == fleet.digests[2], where


def test_a_flip_in_a_middle_block_keeps_the_blocks_before_it_and_the_fleet_refills_the_rest():
    """Injected: one bit of a block head in the first erase block, with intact records after
    it there and in later erase blocks.

    Survives: the blocks before it (the state digest at that height), the genesis pin; the
    erase blocks holding only later records are erased; the damaged record stays on flash
    behind the log, which now opens without complaint; the blocks given back bring the chain
    to the original digest, across a reboot and a deep verify; a second flip, earlier, is
    repaired the same way.
    """
    fleet = grown(30)
    log = RecordLog(fleet.dev)
    assert log.stats().used_segments >= 3
    first_segment = [s for s in heads(fleet.dev) if s <= log._segments[0].last_seq]
    victim_seq = first_segment[len(first_segment) // 2]
    height = heads(fleet.dev).index(victim_seq)
    victim = copy.deepcopy(fleet.dev)
    pos = span(fleet.dev, victim_seq).start + REC_HEADER + 11
    victim.data[pos] ^= 0x01

    chain, repair = repair_chain(victim, IDS[0], genesis_hash=PIN)
    assert chain.height == height - 1 and chain.state_digest() == fleet.digests[height - 1]
    assert chain.state.genesis_hash == PIN
    assert repair.segments_erased >= 2 and f"record {victim_seq}" in repair.damage
    assert victim.data[pos] != fleet.dev.data[pos]  # still there, behind the log
    assert not RecordLog(victim).report.damage
    refill(chain, fleet)
    again = fleet.boot(victim)
    assert again.state_digest() == fleet.digests[-1] == chain.state_digest()
    assert again.verify(deep=True).height == 30

    earlier = heads(victim)[height // 2]
    victim.data[span(victim, earlier).start + REC_HEADER + 5] ^= 0x80
    with pytest.raises(ChainCorruptError):
        fleet.boot(victim)
    chain, repair = repair_chain(victim, IDS[0], genesis_hash=PIN)
    assert chain.state_digest() == fleet.digests[repair.height]
    refill(chain, fleet)
    assert fleet.boot(victim).state_digest() == fleet.digests[-1]


def test_a_flip_after_a_snapshot_keeps_the_snapshot_and_the_blocks_after_it():
    """Injected: one byte of the newest block head, the chain holding a snapshot at 8 and
    blocks after it. Survives: the repaired chain starts from the snapshot and replays the
    blocks after it up to the damage, at the original digest."""
    fleet = grown(12, snapshot_at=8)
    victim = copy.deepcopy(fleet.dev)
    victim.data[span(fleet.dev, heads(fleet.dev)[-1]).start + 3] ^= 0xFF
    chain = repaired(victim)
    assert chain.report.snapshot_height == 8 and chain.height == 11
    assert chain.state_digest() == fleet.digests[11]
    refill(chain, fleet)
    assert fleet.boot(victim).state_digest() == fleet.digests[12]


# ------------------------------------------------------------------- power cuts

class _Ops:
    """A device that notes how many bytes each write and erase takes (PowerCutDevice's
    budget counts the same), to cut the power at the edges of each step."""

    def __init__(self, inner: RamBlockDevice):
        self.inner, self.ops = inner, []

    def readblocks(self, block, buf, offset=None):  # type: ignore[no-untyped-def]
        self.inner.readblocks(block, buf, offset)

    def writeblocks(self, block, buf, offset=None):  # type: ignore[no-untyped-def]
        self.ops.append(len(buf))
        self.inner.writeblocks(block, buf, offset)

    def ioctl(self, op, arg):  # type: ignore[no-untyped-def]
        if op == IOCTL_BLOCK_ERASE:
            self.ops.append(SEG)
        return self.inner.ioctl(op, arg)


def test_a_power_cut_at_any_step_of_the_repair_leaves_an_image_that_boots_or_repairs_again():
    """Injected: a flip in a middle block (erase blocks to drop after it), then power lost
    during the repair: at every byte of the new segment's header (the write that puts the
    damage behind the log; under qemu-user as below), and at the first, second, middle and
    last byte of every erase and erase-count header before it.

    Survives, at every cut: the next boot finds the damage again and repairs it, on the
    same blocks before the damage, at the same digest, from the same genesis; never a
    blank partition. Without a cut the next boot opens the chain at once.
    """
    fleet = grown(30)
    victim_seq = heads(fleet.dev)[4]
    damaged = copy.deepcopy(fleet.dev)
    damaged.data[span(fleet.dev, victim_seq).start + REC_HEADER + 11] ^= 0x01
    probe = _Ops(copy.deepcopy(damaged))
    repair_chain(probe, IDS[0], genesis_hash=PIN)  # type: ignore[arg-type]
    assert sum(1 for n in probe.ops if n == SEG) >= 2  # erases, then small writes
    cuts: set[int] = set()
    at = 0
    for i, n in enumerate(probe.ops):
        last = i == len(probe.ops) - 1
        cuts |= set(range(at, at + n)) if last and not EMULATED else {at, at + 1, at + n // 2,
                                                                      at + n - 1}
        at += n
    outcomes = set()
    for budget in [*sorted(cuts), at]:
        victim = copy.deepcopy(damaged)
        try:
            repair_chain(PowerCutDevice(victim, budget), IDS[0], genesis_hash=PIN)
            assert budget == at
        except PowerCut:
            assert budget < at
        try:
            chain = fleet.boot(victim)
            outcomes.add("boots")
        except ChainCorruptError:
            chain = repaired(victim)
            outcomes.add("repaired again")
        assert RecordLog(victim).stats().used_segments > 0, budget
        assert chain.height == 3 and chain.state_digest() == fleet.digests[3], budget
        assert chain.state.genesis_hash == PIN, budget
        assert (budget == at) == ("boots" in outcomes), budget
    assert outcomes == {"boots", "repaired again"}
    refill(chain, fleet)
    assert fleet.boot(victim).state_digest() == fleet.digests[-1]


# ------------------------------------------------------- what is refused, untouched

def _untouched_refusal(dev: RamBlockDevice, match: str, **rules: object) -> None:
    before = bytes(dev.data)
    with pytest.raises(RepairRefused, match=match):
        repair_chain(dev, IDS[0], **{"genesis_hash": PIN, **rules})  # type: ignore[arg-type]
    assert bytes(dev.data) == before


def test_damage_in_the_genesis_is_refused_and_nothing_is_written():
    fleet = grown(3)
    fleet.dev.data[span(fleet.dev, 1).start + REC_HEADER + 2] ^= 0x01
    _untouched_refusal(fleet.dev, "genesis itself is lost")


def test_a_chain_grown_from_another_genesis_is_refused_and_nothing_is_written():
    fleet = grown(3)
    fleet.dev.data[span(fleet.dev, heads(fleet.dev)[-1]).start + 1] ^= 0x01
    _untouched_refusal(fleet.dev, "do not verify", genesis_hash=b"\x07" * 32)


def test_an_intact_log_whose_chain_does_not_verify_is_not_cut():
    """Injected: a record with a sound checksum holding no valid block head. That is not
    flash damage a repair may cut away: refused, nothing written."""
    fleet = grown(3)
    RecordLog(fleet.dev).append(bytes([REC_HEAD]) + b"not a head")
    with pytest.raises(ChainCorruptError):
        fleet.boot()
    _untouched_refusal(fleet.dev, "finds no damaged record")


def test_damage_in_the_snapshot_standing_for_released_blocks_is_refused():
    """Injected: one byte of a snapshot meter record, the blocks before the snapshot
    released. Nothing before the damage verifies on its own: refused, nothing written."""
    fleet = grown(40, snapshot_at=38)
    log = RecordLog(fleet.dev)
    assert log.first_seq > 1  # the oldest blocks were released behind the snapshot
    seq = next(s for s, p in log.records() if p[0] == REC_SNAP_METER)
    fleet.dev.data[span(fleet.dev, seq).start + REC_HEADER + 4] ^= 0x01
    _untouched_refusal(fleet.dev, "do not verify")
