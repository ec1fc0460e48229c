"""The chain on flash: append, boot replay, O(1) index, snapshots, tamper and power-cut recovery."""

from __future__ import annotations

import copy
import hashlib
import os
import zlib
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ledger.block import Block, endorse, genesis, with_endorsements
from agent.ledger.chain import (
    REC_HEAD,
    REC_TX,
    BlockRejected,
    Chain,
    ChainCorruptError,
    open_chain,
    scan_newest_record,
)
from agent.ledger.codec import DecodeError
from agent.ledger.identity import TerminalIdentity
from agent.ledger.proof import check_record_proof, decode_record_proof, encode_record_proof
from agent.ledger.rules import Reason, propose_block
from agent.ledger.snapshot import decode_meter, encode_meter
from agent.ledger.state import MeterStatus
from agent.ledger.tx import Transaction, TxBuilder, rotation_proof_digest
from emulator.flash import PowerCut, PowerCutDevice, RamBlockDevice
from hal.ids import MeterId, TerminalId
from hal.recordlog import _REC, REC_HEADER, REC_MAGIC, LogFailedError, RecordLog

# Cut points per power-cut test: fewer under qemu-user, which runs ~8x slower.
CUTS = 16 if os.environ.get("EDGEKEY_EMULATED") else 50

SEG = 8192  # small erase blocks so tests cross segments and fill the partition quickly
SEGMENTS = 48
T0 = 1_700_000_000_000

IDS = [TerminalIdentity.from_seed(f"ecd-{i}", hashlib.sha256(b"seed%d" % i).digest())
       for i in range(5)]
BUILDERS = [TxBuilder(i) for i in IDS]


def fp(n: int) -> bytes:
    return hashlib.sha256(b"key%d" % n).digest()


def meter(n: int) -> bytes:
    return b"M%05d" % n


class Net:
    """Five terminals' proposer side: builds endorsed blocks on a chain's tip."""

    def __init__(self, chain: Chain):
        self.chain = chain
        self.clock = T0

    def block(self, txs: Sequence[Transaction], proposer: int = 0) -> Block:
        self.clock += 1000
        block = propose_block(self.chain.state, IDS[proposer], txs, timestamp_ms=self.clock)
        return with_endorsements(block, [endorse(i, block.header) for i in IDS[:3]])

    def commit(self, txs: Sequence[Transaction], proposer: int = 0) -> None:
        self.chain.append(self.block(txs, proposer))


def new_chain(dev: RamBlockDevice | PowerCutDevice, **kw: object) -> Chain:
    chain = Chain(RecordLog(dev), IDS[0], **kw)  # type: ignore[arg-type]
    if chain.height is None:
        chain.append(genesis(IDS[0], [(i.terminal_id, i.public_bytes()) for i in IDS],
                             timestamp_ms=T0, endorsers=IDS[:3]))
    return chain


def lifecycle(net: Net) -> None:
    """Register 10 meters at two homes, rotate, revoke, register again, migrate."""
    a, b = BUILDERS[0], BUILDERS[1]
    net.commit([a.register(meter(i), key_version=1, fingerprint=fp(i), counter=1)
                for i in range(6)])
    net.commit([b.register(meter(i), key_version=1, fingerprint=fp(i), counter=1)
                for i in range(6, 10)], proposer=1)
    net.commit([a.rotate(meter(0), key_version=2, fingerprint=fp(100),
                         proof=rotation_proof_digest(b"w" * 40), counter=2)])
    net.commit([a.revoke(meter(1), key_version=1, counter=2)])
    net.commit([a.register(meter(1), key_version=2, fingerprint=fp(101), counter=3)])
    net.commit([a.migrate(meter(2), new_home="ecd-1", key_version=1, fingerprint=fp(2),
                          counter=2)])
    net.commit([a.revoke(meter(3), key_version=1, counter=2)])


def state_view(chain: Chain) -> dict[bytes, tuple]:
    out = {}
    for i in range(12):
        e = chain.entry(meter(i))
        if e is not None:
            out[meter(i)] = (e.status, e.key_version, e.fingerprint, e.home, e.counter,
                             e.height, e.tx_index)
    return out


@pytest.fixture
def dev() -> RamBlockDevice:
    return RamBlockDevice(SEG, SEGMENTS)


# ---------------------------------------------------------------- lifecycle

def test_lifecycle_is_kept_on_flash_and_reread_identically_at_boot(dev):
    chain = new_chain(dev)
    lifecycle(Net(chain))
    before = state_view(chain)
    assert before[meter(0)][:2] == (MeterStatus.LIVE, 2)
    assert before[meter(1)][:2] == (MeterStatus.LIVE, 2)
    assert before[meter(2)][3] == "ecd-1"
    assert before[meter(3)][0] == MeterStatus.REVOKED
    again = Chain(RecordLog(dev), IDS[0])
    assert state_view(again) == before
    assert again.state.tip == chain.state.tip
    assert again.report.blocks_replayed == 8 and again.report.orphans == 0


def test_index_answers_match_the_papers_tail_scan(dev):
    chain = new_chain(dev)
    lifecycle(Net(chain))
    for i in range(10):
        rec = chain.newest_record(meter(i))
        assert rec is not None
        assert rec.tx == scan_newest_record(chain.log, meter(i))
        assert (rec.height, rec.tx_index) == (chain.entry(meter(i)).height,
                                              chain.entry(meter(i)).tx_index)
    assert chain.newest_record(b"nobody") is None
    assert scan_newest_record(chain.log, b"nobody") is None


def test_whole_block_and_head_read_back_from_flash(dev):
    chain = new_chain(dev)
    net = Net(chain)
    block = net.block([BUILDERS[0].register(meter(i), key_version=1, fingerprint=fp(i),
                                            counter=1) for i in range(3)])
    chain.append(block)
    assert chain.block(1) == block
    assert chain.head(1).header == block.header
    with pytest.raises(KeyError):
        chain.head(7)


def test_rejected_block_writes_nothing(dev):
    chain = new_chain(dev)
    net = Net(chain)
    block = net.block([BUILDERS[0].register(meter(1), key_version=1, fingerprint=fp(1),
                                            counter=1)])
    thin = Block(block.header, block.txs, block.endorsements[:2])  # 2 of 5: no majority
    before = chain.log.next_seq
    with pytest.raises(BlockRejected) as info:
        chain.append(thin)
    assert info.value.reason is Reason.TOO_FEW_ENDORSEMENTS
    assert chain.log.next_seq == before and chain.height == 0


def test_a_block_with_an_invalid_transaction_is_refused_and_nothing_is_written(dev):
    """Injected: a ROTATE replaying the committed counter, in a majority-endorsed block.

    Before, the block was stored with the transaction marked invalid (and the
    paper's tail scan returned it as the meter's newest record). Survives:
    the chain, the index and the scan exactly as before the block.
    """
    chain = new_chain(dev)
    net = Net(chain)
    a = BUILDERS[0]
    net.commit([a.register(meter(1), key_version=1, fingerprint=fp(1), counter=5)])
    replay = a.rotate(meter(1), key_version=2, fingerprint=fp(9),
                      proof=rotation_proof_digest(b"p" * 40), counter=5)  # counter replayed
    seq, digest = chain.log.next_seq, chain.state_digest()
    with pytest.raises(BlockRejected) as info:
        chain.append(net.block([replay]))
    assert info.value.reason is Reason.INVALID_TX
    assert info.value.tx_codes == (Reason.REPLAYED_COUNTER,)
    assert (chain.log.next_seq, chain.state_digest()) == (seq, digest)
    again = Chain(RecordLog(dev), IDS[0])
    assert again.newest_record(meter(1)).tx.key_version == 1
    assert scan_newest_record(again.log, meter(1)).key_version == 1


# ---------------------------------------------------------------- snapshots

def test_snapshots_keep_a_small_partition_from_filling():
    """Rotations far beyond the partition's size: snapshots release the superseded records."""
    dev = RamBlockDevice(SEG, 20)
    chain = new_chain(dev)
    net = Net(chain)
    a = BUILDERS[0]
    net.commit([a.register(meter(i), key_version=1, fingerprint=fp(i), counter=1)
                for i in range(8)])
    version = 1
    for _ in range(300):
        version += 1
        net.commit([a.rotate(meter(i), key_version=version, fingerprint=fp(1000 * version + i),
                             proof=rotation_proof_digest(b"%d" % version), counter=version)
                    for i in range(8)])
    written = chain.log.next_seq
    assert chain.snapshots_written >= 2
    assert written * 190 > 2 * SEG * 20  # twice was written than the partition holds
    view = state_view(chain)
    again = Chain(RecordLog(dev), IDS[0])
    assert state_view(again) == view
    assert again.report.snapshot_height is not None
    assert again.report.blocks_replayed < 300
    for i in range(8):
        assert again.newest_record(meter(i)).tx.key_version == version
        assert again.newest_record(meter(i)).tx == scan_newest_record(again.log, meter(i))
    assert again.verify(deep=True).height == chain.height


def test_blocks_after_a_snapshot_extend_it_across_reboots(dev):
    chain = new_chain(dev)
    net = Net(chain)
    lifecycle(net)
    chain.snapshot()
    net.commit([BUILDERS[0].rotate(meter(0), key_version=3, fingerprint=fp(300),
                                   proof=rotation_proof_digest(b"x"), counter=3)])
    again = Chain(RecordLog(dev), IDS[0])
    assert again.report.snapshot_height == 7 and again.report.blocks_replayed == 1
    assert state_view(again) == state_view(chain)
    Net(again).commit([BUILDERS[0].rotate(meter(0), key_version=4, fingerprint=fp(400),
                                          proof=rotation_proof_digest(b"y"), counter=4)])
    assert Chain(RecordLog(dev), IDS[0]).entry(meter(0)).key_version == 4


def test_what_boot_reads_back_keeps_plain_ids_in_the_table_and_typed_ids_in_records(dev):
    chain = new_chain(dev)
    lifecycle(Net(chain))
    chain.snapshot()
    again = Chain(RecordLog(dev), IDS[0])
    assert {type(m) for m in again.state.meter_ids()} == {bytes}  # RAM per meter (state.py)
    record = again.newest_record(meter(0))
    assert type(record.tx.meter_id) is MeterId and type(record.tx.proposer) is TerminalId
    entry = again.entry(meter(0))
    meter_id, back, tx = decode_meter(encode_meter(meter(0), entry, record.tx))
    assert tx == record.tx
    assert type(meter_id) is MeterId and meter_id == meter(0) and back == entry._replace(seq=0)


def test_a_snapshot_signed_by_another_terminal_is_refused(dev):
    chain = new_chain(dev)
    lifecycle(Net(chain))
    chain.snapshot()
    with pytest.raises(ChainCorruptError, match="not signed by this terminal"):
        Chain(RecordLog(dev), IDS[1])


# ------------------------------------------------------------------- tamper

def _record_location(log: RecordLog, seq: int) -> tuple[int, int]:
    seg, pos = log._locate(seq)  # test-only peek at where a record sits on flash
    return seg.block, pos


def _rewrite_record(dev: RamBlockDevice, log: RecordLog, seq: int, payload: bytes) -> None:
    """Replace a record's payload (same length) with a valid CRC: a forger, not bit rot."""
    block, pos = _record_location(log, seq)
    head = bytearray(REC_HEADER)
    dev.readblocks(block, head, pos)
    flags = head[2]  # keep the batch's CONTINUES bit
    header = _REC.pack(REC_MAGIC, flags, 0, len(payload), seq)
    crc = zlib.crc32(payload, zlib.crc32(header)).to_bytes(4, "little")
    dev.writeblocks(block, header + crc + payload, pos)


def test_a_flipped_byte_in_a_stored_transaction_names_its_height(dev):
    chain = new_chain(dev)
    lifecycle(Net(chain))
    seq = chain.entry(meter(0)).seq  # the rotate in block 3
    block, pos = _record_location(chain.log, seq)
    buf = bytearray(1)
    dev.readblocks(block, buf, pos + REC_HEADER + 20)
    dev.writeblocks(block, bytes([buf[0] ^ 0x01]), pos + REC_HEADER + 20)
    with pytest.raises(ChainCorruptError) as info:
        open_chain(dev, IDS[0])
    assert info.value.height == 3 and "fails its check" in info.value.detail


def test_a_forged_transaction_with_a_valid_checksum_fails_the_merkle_root(dev):
    chain = new_chain(dev)
    lifecycle(Net(chain))
    seq = chain.entry(meter(0)).seq
    payload = bytearray(chain.log.read(seq))
    assert payload[0] == REC_TX
    payload[-70] ^= 0x40  # inside the signed body
    _rewrite_record(dev, chain.log, seq, bytes(payload))
    with pytest.raises(ChainCorruptError) as info:
        Chain(RecordLog(dev), IDS[0])
    assert info.value.height == 3
    with pytest.raises(ChainCorruptError):
        chain.verify()


def test_a_forged_head_breaks_the_hash_link_at_the_next_height(dev):
    chain = new_chain(dev)
    lifecycle(Net(chain))
    seq = chain._heads[4 - chain._base]
    payload = bytearray(chain.log.read(seq))
    assert payload[0] == REC_HEAD
    payload[20] ^= 0x01  # inside the parent hash of block 4
    _rewrite_record(dev, chain.log, seq, bytes(payload))
    with pytest.raises(ChainCorruptError) as info:
        Chain(RecordLog(dev), IDS[0])
    assert info.value.height == 4


def test_a_tampered_snapshot_record_is_caught_by_its_digest(dev):
    chain = new_chain(dev)
    lifecycle(Net(chain))
    chain.snapshot()
    seq = chain.entry(meter(5)).seq
    payload = bytearray(chain.log.read(seq))
    payload[-1] ^= 0x01
    _rewrite_record(dev, chain.log, seq, bytes(payload))
    with pytest.raises(ChainCorruptError, match=r"digest|signature|decode"):
        Chain(RecordLog(dev), IDS[0])


# ---------------------------------------------------------------- power cut

def _bytes_written(dev: RamBlockDevice, op) -> int:
    probe = PowerCutDevice(copy.deepcopy(dev))
    op(Chain(RecordLog(probe), IDS[0]))
    return probe.written


def test_power_cut_during_a_block_append_keeps_the_chain(dev):
    """Injected: power lost after k bytes of a two-segment block write: CUTS (50; 16
    emulated) evenly spread k and every k of the last 16 bytes (the head record's end;
    the record log's own tests cut at every byte).

    Survives: the reopened chain holds exactly the blocks before it or the
    whole new block, never part of it, and accepts the block again.
    """
    chain = new_chain(dev)
    lifecycle(Net(chain))
    tip = chain.state.tip
    view = state_view(chain)
    big = Net(chain)
    big.clock = chain.state.tip.timestamp_ms
    block = big.block([BUILDERS[0].register(meter(100 + i), key_version=1, fingerprint=fp(i),
                                            counter=1) for i in range(40)])  # > one segment
    total = _bytes_written(dev, lambda c: c.append(block))
    assert total > SEG
    outcomes = set()
    for budget in sorted(set(range(0, total, total // CUTS)) | set(range(total - 16, total))):
        victim = copy.deepcopy(dev)
        cut = Chain(RecordLog(PowerCutDevice(victim, budget)), IDS[0])
        with pytest.raises((PowerCut, LogFailedError)):
            cut.append(block)
        after = Chain(RecordLog(victim), IDS[0])
        if after.state.tip == tip:
            assert state_view(after) == view
            after.append(block)
            outcomes.add("before")
        else:
            assert after.height == tip.height + 1
            outcomes.add("after")
        assert after.entry(meter(139)).key_version == 1
    assert outcomes == {"before"}  # every cut falls before the write completed


def test_power_cut_during_a_snapshot_loses_nothing(dev):
    """Injected: power lost at CUTS evenly spread bytes of a snapshot write and its release.

    Survives: the reopened chain has the same state either from the blocks
    (snapshot torn: abandoned) or from the sealed snapshot.
    """
    chain = new_chain(dev)
    lifecycle(Net(chain))
    view = state_view(chain)
    total = _bytes_written(dev, lambda c: c.snapshot())
    for budget in range(0, total, max(1, total // CUTS)):
        victim = copy.deepcopy(dev)
        cut = Chain(RecordLog(PowerCutDevice(victim, budget)), IDS[0])
        with pytest.raises((PowerCut, LogFailedError)):
            cut.snapshot()
        after = Chain(RecordLog(victim), IDS[0])
        assert state_view(after) == view
        assert after.state.tip == chain.state.tip


# -------------------------------------------------- record proofs, bad input

TERMINAL_KEYS = {i.terminal_id: i.public_bytes() for i in IDS}


def test_every_newest_record_proves_itself_to_the_master_station(dev):
    chain = new_chain(dev)
    lifecycle(Net(chain))
    for i in range(10):
        proof = chain.record_proof(meter(i))
        assert check_record_proof(proof, TERMINAL_KEYS) is None
        assert decode_record_proof(encode_record_proof(proof)) == proof
    assert chain.record_proof(b"nobody") is None


def test_a_record_proof_fails_for_a_forged_tx_a_wrong_index_or_too_few_endorsers(dev):
    chain = new_chain(dev)
    net = Net(chain)
    net.commit([BUILDERS[0].register(meter(i), key_version=1, fingerprint=fp(i), counter=1)
                for i in range(5)])
    proof = chain.record_proof(meter(3))
    forged = BUILDERS[0].register(meter(3), key_version=1, fingerprint=fp(99), counter=1)
    assert "Merkle" in check_record_proof(replace(proof, tx=forged), TERMINAL_KEYS)
    assert "Merkle" in check_record_proof(replace(proof, tx_index=2), TERMINAL_KEYS)
    unsigned = replace(proof, tx=replace(proof.tx, counter=2))
    assert "signature" in check_record_proof(unsigned, TERMINAL_KEYS)
    thin = replace(proof, endorsements=proof.endorsements[:2])
    assert "majority" in check_record_proof(thin, TERMINAL_KEYS)
    # a stranger's key set: the endorsers are not its terminals
    assert check_record_proof(proof, {"ecd-0": IDS[0].public_bytes(),
                                      "other-1": IDS[1].public_bytes(),
                                      "other-2": IDS[2].public_bytes()}) is not None


def test_a_compacted_record_has_no_block_proof_any_more(dev):
    chain = new_chain(dev)
    lifecycle(Net(chain))
    chain.snapshot()
    with pytest.raises(LookupError, match="snapshot"):
        chain.record_proof(meter(0))


@given(st.binary(max_size=600))
def test_record_proof_decoder_takes_any_bytes(data):
    try:
        proof = decode_record_proof(data)
    except DecodeError:
        return
    assert encode_record_proof(proof) == data


@given(st.binary(max_size=400))
def test_snapshot_record_decoder_takes_any_bytes(data):
    try:
        meter_id, entry, tx = decode_meter(data)
    except DecodeError:
        return
    assert encode_meter(meter_id, entry, tx) == data


@settings(max_examples=60 if not os.environ.get("EDGEKEY_EMULATED") else 15)
@given(st.binary(min_size=0, max_size=300))
def test_any_record_appended_to_the_chain_opens_or_is_named_as_damage(junk):
    """Injected: one arbitrary record after a valid chain. Survives: every block before it."""
    dev = RamBlockDevice(SEG, 8)
    chain = new_chain(dev)
    Net(chain).commit([BUILDERS[0].register(meter(1), key_version=1, fingerprint=fp(1),
                                            counter=1)])
    tip = chain.state.tip
    chain.log.append(junk)
    try:
        again = Chain(RecordLog(dev), IDS[0])
    except ChainCorruptError as exc:
        assert exc.height >= tip.height  # never blames a block that is intact
        return
    assert again.state.tip == tip and again.entry(meter(1)).key_version == 1
