"""Catch-up by checkpoint, in one process: a snapshot served, judged, adopted; lies refused.

A 5-terminal LocalFleet proposes a CHECKPOINT every 3rd block; each
terminal seals a snapshot of the state a checkpoint digests as it applies
the block. A terminal holding only the genesis takes ecd-01's snapshot in
wire chunks, checks it against the checkpoint block and adopts it: the
same full-state digest, also after reopening its flash. Refused, with the
reason: a snapshot with one meter's entry changed (re-sealed by the lying
peer, so only the checkpoint catches it), a snapshot of another height, a
checkpoint block not endorsed by a majority of the membership the
catching-up terminal knows.
"""

from __future__ import annotations

import random

import pytest

from agent.catchup import (
    CatchUp,
    decode_records,
    encode_records,
    judge,
    open_snapshot,
    snapshot_chunks,
)
from agent.ledger import snapshot as snap_codec
from agent.ledger.block import Block
from agent.ledger.chain import REC_SNAP_END, REC_SNAP_METER
from agent.ledger.rules import apply_block, checkpoint_of, validate_block
from agent.ledger.state import LedgerState
from agent.node.actions import Acknowledge
from agent.terminal import open_node_chain
from emulator.flash import RamBlockDevice
from emulator.localfleet import LocalFleet
from emulator.meter_keys import MeterKeys
from emulator.provision import provision

T0 = 1_700_000_000_000
METERS = [(700000 + i).to_bytes(6, "big") for i in range(8)]


@pytest.fixture(scope="module")
def fleet() -> LocalFleet:
    f = LocalFleet(provision(5, METERS, timestamp_ms=T0, seed=b"catch-up"),
                   (RamBlockDevice(8192, 64), RamBlockDevice(8192, 64)), b"c" * 32,
                   checkpoint_every=3)
    f.found()
    fk = f.fleet.factory_keys
    for i, m in enumerate(METERS):
        keys = MeterKeys(m, fk[m], random.Random(m).randbytes)
        assert isinstance(f.request(keys.register(), f"ecd-{i % 5:02d}"), Acknowledge)
    return f


def checkpoint_block(fleet: LocalFleet):
    blocks = [b for b in fleet.net.ordering.blocks if checkpoint_of(b) is not None]
    assert blocks, "no checkpoint was proposed"
    return blocks[-1]


def fresh_chain(fleet: LocalFleet, tid: str = "ecd-04"):
    """``tid``'s chain on new flash, holding only the genesis (a terminal that was away)."""
    device = RamBlockDevice(8192, 64)
    chain = open_node_chain(fleet.fleet.config(tid), device)
    chain.append(fleet.fleet.genesis)
    return chain, device


def served(fleet: LocalFleet, peer: str, height: int) -> bytes:
    cu = CatchUp(checkpoint_block(fleet), [peer])
    sent = []
    cu.next_peer(0.0, lambda to, m: sent.append((to, m)))
    assert sent[0][1].height == height
    data = None
    for chunk in snapshot_chunks(fleet.terminal(peer).chain, height):
        data = cu.chunk(peer, chunk)
    assert data is not None
    return data


def test_a_snapshot_checked_against_the_checkpoint_is_adopted_and_survives_a_reboot(fleet):
    block = checkpoint_block(fleet)
    height = block.header.height - 1
    data = served(fleet, "ecd-01", height)
    chain, device = fresh_chain(fleet)
    records, state = open_snapshot(data, fleet.fleet.identity("ecd-01").public_bytes())
    assert judge(state, block, chain.state) is None
    chain.adopt(records, state)
    assert chain.height == height
    assert chain.append(block).height == block.header.height  # the ordering goes on from it
    want = LedgerState()
    for b in fleet.net.ordering.blocks[:block.header.height + 1]:
        apply_block(want, b, validate_block(want, b))
    assert chain.state_digest() == want.digest()
    again = open_node_chain(fleet.fleet.config("ecd-04"), device)  # power off and on
    assert again.state_digest() == want.digest() and again.height == block.header.height


def test_a_snapshot_with_one_entry_changed_is_refused_even_resealed_by_the_liar(fleet):
    block = checkpoint_block(fleet)
    height = block.header.height - 1
    records = decode_records(served(fleet, "ecd-02", height))
    liar = fleet.fleet.identity("ecd-02")
    i = next(i for i, r in enumerate(records) if r[0] == REC_SNAP_METER)
    meter = bytearray(records[i])
    # id len8 | id | status u8 | key version u32: one version up, then re-sealed by the liar
    id_len = meter[1]
    meter[2 + id_len + 4] += 1
    records[i] = bytes(meter)
    digest = snap_codec.new_digest(records[0][1:])
    for r in records[1:-1]:
        digest.update(r[1:])
    count = sum(1 for r in records if r[0] == REC_SNAP_METER)
    records[-1] = bytes([REC_SNAP_END]) + snap_codec.encode_end(count, digest.digest(), liar)
    chain, _ = fresh_chain(fleet)
    _, state = open_snapshot(encode_records(records), liar.public_bytes())  # reads fine
    why = judge(state, block, chain.state)
    assert why == "the snapshot's state digest is not the one the checkpoint names"


def test_a_snapshot_of_another_height_is_refused(fleet):
    block = checkpoint_block(fleet)
    data = served(fleet, "ecd-03", block.header.height - 1)
    _, state = open_snapshot(data, fleet.fleet.identity("ecd-03").public_bytes())
    earlier = next(b for b in fleet.net.ordering.blocks
                   if checkpoint_of(b) is not None and b.header.height < block.header.height)
    chain, _ = fresh_chain(fleet)
    assert "not" in judge(state, earlier, chain.state)


def test_a_checkpoint_without_a_majority_of_the_known_membership_is_refused(fleet):
    block = checkpoint_block(fleet)
    _, state = open_snapshot(served(fleet, "ecd-01", block.header.height - 1),
                             fleet.fleet.identity("ecd-01").public_bytes())
    chain, _ = fresh_chain(fleet)
    thin = Block(block.header, block.txs, block.endorsements[:2])  # 2 of 5 signed it
    assert judge(state, thin, chain.state) == \
        "the checkpoint block does not validate on the snapshot: TOO_FEW_ENDORSEMENTS"
    # A membership made up along with the state: the terminal's own chain is the anchor,
    # and the fleet it knows (here another fleet's genesis) did not sign the checkpoint.
    other = provision(5, METERS, timestamp_ms=T0, seed=b"another fleet")
    stranger = LedgerState()
    apply_block(stranger, other.genesis, validate_block(stranger, other.genesis))
    why = judge(state, block, stranger)
    assert why is not None and "not a majority of them" in why


def test_a_peer_without_that_snapshot_serves_nothing(fleet):
    assert snapshot_chunks(fleet.terminal("ecd-01").chain, 1) == []
