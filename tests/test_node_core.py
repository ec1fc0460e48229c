"""The node core's data path and the ledger defects it closes, each with what it injected.

A fleet of five terminals on RAM flash (emulator/localfleet.py): ecd-00's
two partitions sit behind power-cut devices so a test can cut the power at
one exact point of the data path, then boot ecd-00 again from what reached
its flash.
"""

from __future__ import annotations

import itertools
import random

import pytest

from agent.keystore.material import fingerprint, make_rotation_proof, new_key
from agent.keystore.store import MeterStatus as StoreStatus
from agent.ledger.block import (
    endorse,
    genesis,
    header_hash,
    leading_zero_bits,
    with_endorsements,
)
from agent.ledger.chain import BlockRejected, Chain, ChainCorruptError, ForeignChainError
from agent.ledger.identity import TerminalIdentity
from agent.ledger.proof import check_record_proof, record_proof
from agent.ledger.rules import Reason, propose_block
from agent.ledger.snapshot import SnapshotSize
from agent.ledger.state import MeterStatus
from agent.ledger.tx import TxBuilder, TxKind, make_tx, rotation_proof_digest
from agent.node import events as ev
from agent.node.actions import Acknowledge, Nak, Refuse, RefuseEndorsement, SendEndorsement
from agent.node.errors import LocalProtocolError
from agent.node.opstate import OpState, check_transition
from agent.node.reading import seal_reading
from agent.terminal import Terminal
from emulator.flash import PowerCut, PowerCutDevice, RamBlockDevice
from emulator.localfleet import LocalFleet
from emulator.meter_keys import MeterKeys
from emulator.provision import provision
from hal.board import Ledger
from hal.recordlog import RecordLog, record_size

T0 = 1_700_000_000_000
SEG, SEGMENTS = 8192, 64


def meter(n: int) -> bytes:
    return (200000 + n).to_bytes(6, "big")


METERS = [meter(n) for n in range(1, 9)]
FLEET = provision(5, METERS, timestamp_ms=T0, seed=b"node core")
DEVICE_KEY = bytes(range(32))


class Power:
    """ecd-00's flash: two partitions on RAM, behind one supply that can be cut."""

    def __init__(self) -> None:
        self.ram = (RamBlockDevice(SEG, SEGMENTS), RamBlockDevice(SEG, SEGMENTS))
        self.on()

    def on(self) -> tuple[PowerCutDevice, PowerCutDevice]:
        self.devs = (PowerCutDevice(self.ram[0]), PowerCutDevice(self.ram[1]))
        return self.devs

    def cut_now(self) -> None:
        """Every write from here on fails, on both partitions (one supply)."""
        for d in self.devs:
            d.budget = d.written


class Fleet(LocalFleet):
    def __init__(self) -> None:
        self.power = Power()
        super().__init__(FLEET, self.power.devs, DEVICE_KEY)
        self.found()
        self.meters = {m: MeterKeys(m, FLEET.factory_keys[m], random.Random(m).randbytes)
                       for m in METERS}

    def send(self, event: ev.Event, home: str = "ecd-00") -> Acknowledge | Refuse:
        reply = self.request(event, home)
        m = self.meters.get(event.meter_id)
        if m is not None:
            m.heard(event, reply)
        return reply

    def power_cycle(self) -> Terminal:
        return self.reboot(self.power.on())

    def cut_after_next_append(self) -> None:
        """The power fails right after ecd-00's next block is durable, before anything else."""
        chain = self.ecd.chain
        append = chain.append

        def append_then_cut(block):  # type: ignore[no-untyped-def]
            changes = append(block)
            self.power.cut_now()
            chain.append = append  # type: ignore[method-assign]
            return changes

        chain.append = append_then_cut  # type: ignore[method-assign]


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


def ack(reply: Acknowledge | Refuse) -> Acknowledge:
    assert isinstance(reply, Acknowledge), reply
    return reply


def held_key(t: Terminal, m: bytes) -> bytes | None:
    return t.keys.get(m) if t.keys.status(m) is StoreStatus.LIVE else None


# ---------------------------------------------- the key store's commit protocol

@pytest.mark.parametrize("op", ["register", "rotate", "revoke", "migrate"])
def test_a_power_cut_between_the_chain_append_and_the_key_store_loses_nothing(fleet, op):
    """Injected: the supply fails right after the block is durable on ecd-00's ledger
    partition, before its key-store write (or erase, or hand-over read).

    Survives: the committed block; at boot the key store is reconciled with
    the chain (a revoked key is erased, a migrated one handed over again, a
    missing one marked pending) and the meter's retry of its very request
    completes it: no key lost, none orphaned, nothing acknowledged early.
    """
    m = fleet.meters[meter(1)]
    if op != "register":
        ack(fleet.send(m.register()))
    before_key = m.key
    request = {"register": lambda: m.register(), "rotate": lambda: m.rotate(),
               "revoke": lambda: m.revoke(),
               "migrate": lambda: ev.MigrateRequest(meter(1), 999, "ecd-01")}[op]()
    fleet.cut_after_next_append()
    reply = fleet.send(request)
    height = fleet.ecd.chain.height
    if op == "migrate":  # answered from the chain; the hand-over failed to read the key
        assert isinstance(reply, Acknowledge)
    else:
        assert isinstance(reply, Refuse) and reply.reason is Nak.STORE_FAILED, reply
    with pytest.raises(PowerCut):
        fleet.power.devs[1].writeblocks(0, b"x", 0)

    ecd = fleet.power_cycle()
    assert ecd.chain.height == height  # the committed block survived
    entry = ecd.chain.entry(meter(1))
    new_home = fleet.terminal("ecd-01")
    if op == "revoke":
        assert entry.status is MeterStatus.REVOKED
        assert ecd.keys.status(meter(1)) is StoreStatus.DESTROYED  # erased at boot
        assert ack(fleet.send(request)).op.value == "revoke"  # the retry is answered
    elif op == "migrate":
        fleet.net.run()  # the boot's hand-over goes out again
        assert entry.home == "ecd-01" and held_key(new_home, meter(1)) == before_key
        assert ecd.keys.status(meter(1)) is StoreStatus.DESTROYED  # erased after the ack
    else:
        assert meter(1) in ecd.node.pending_keys  # the chain names a key not held yet
        assert ecd.keys.versions(meter(1)) == (() if op == "register" else (1,))
        done = ack(fleet.send(request))  # the meter retries: same counter, same wrap
        assert done.key_version == entry.key_version and ecd.chain.height == height
        assert fingerprint(held_key(ecd, meter(1))) == entry.fingerprint
        assert ecd.node.pending_keys == set()
    assert ecd.chain.verify(deep=True).height == height


def test_a_round_that_never_gets_a_majority_writes_no_key_and_times_out(fleet):
    """Injected: three of the five terminals are cut off, so no rotation can be endorsed.

    Survives: the key store as it was (the prepared key never written), the
    chain as it was; the meter gets TIMEOUT after the bounded rounds and its
    old key still answers. Before, the key store wrote the new key first.
    """
    m = fleet.meters[meter(1)]
    ack(fleet.send(m.register()))
    old, height = m.key, fleet.ecd.chain.height
    fleet.net.offline |= {"ecd-02", "ecd-03", "ecd-04"}
    request = m.rotate()
    assert fleet.net.send("ecd-00", request) == []  # proposed, waiting for endorsements
    for _ in range(10):
        fleet.clock.advance(fleet.ecd.config.round_timeout_s)
        replies = fleet.net.send("ecd-00", ev.Tick())
        if replies:
            break
    assert [(r.reason, r.request_id) for r in replies] == [(Nak.TIMEOUT, request.request_id)]
    assert fleet.ecd.keys.versions(meter(1)) == (1,) and held_key(fleet.ecd, meter(1)) == old
    assert fleet.ecd.chain.height == height and fleet.ecd.node.inflight == 0
    assert fleet.ecd.node.counters["rounds.failed"] == fleet.ecd.config.max_rounds


# ------------------------------------------------- endorsement and proofs

def forged_rotate_block(fleet: Fleet):  # type: ignore[no-untyped-def]
    """ecd-02 (faulty) proposes a ROTATE of ecd-01's meter, signed by itself."""
    ack(fleet.send(fleet.meters[meter(2)].register(), home="ecd-01"))
    state = fleet.ecd.chain.state
    entry = state.meter(meter(2))
    evil = FLEET.identity("ecd-02")
    tx = make_tx(evil, TxKind.ROTATE, meter_id=meter(2), key_version=entry.key_version + 1,
                 fingerprint=fingerprint(new_key()), home="ecd-01",
                 proof=rotation_proof_digest(b"x" * 40), counter=entry.counter + 1)
    return propose_block(state, evil, [tx], timestamp_ms=T0 + 5_000), evil


def test_an_endorser_never_signs_a_block_holding_a_forged_transaction(fleet):
    """Injected: a block whose ROTATE is signed by a terminal that is not the meter's home.

    Before, tx-level faults did not stop a block, so honest endorsers signed it
    and the master station accepted the forged key record with a majority of
    endorsements. Survives: every honest endorser refuses (INVALID_TX), the
    forger's own signature is no majority, so no proof of it checks out.
    """
    block, evil = forged_rotate_block(fleet)
    answers = [fleet.terminal(t).feed(ev.EndorseRequest("ecd-02", block))
               for t in ("ecd-00", "ecd-01", "ecd-03", "ecd-04")]
    assert all(len(a) == 1 and isinstance(a[0], RefuseEndorsement)
               and a[0].reason is Reason.INVALID_TX for a in answers)
    lone = with_endorsements(block, [endorse(evil, block.header)])
    keys = {t.terminal_id: t.public_bytes() for t in FLEET.identities}
    assert "not a majority" in check_record_proof(record_proof(lone, 0), keys)
    # even a majority of stolen endorsement keys cannot put it on an honest chain
    stolen = with_endorsements(block, [endorse(FLEET.identities[i], block.header)
                                       for i in (0, 1, 2)])
    with pytest.raises(BlockRejected) as info:
        fleet.ecd.chain.append(stolen)
    assert info.value.reason is Reason.INVALID_TX and info.value.tx_codes == (Reason.WRONG_HOME,)


def test_a_replayed_transaction_gets_no_endorsement_and_no_block(fleet):
    """Injected: the meter's committed REGISTER, proposed again in a new block."""
    ack(fleet.send(fleet.meters[meter(3)].register()))
    chain = fleet.ecd.chain
    old = chain.newest_record(meter(3)).tx
    again = propose_block(chain.state, FLEET.identity("ecd-00"), [old], timestamp_ms=T0 + 6_000)
    refused = fleet.terminal("ecd-01").feed(ev.EndorseRequest("ecd-00", again))
    assert [(type(a), a.reason) for a in refused] == [(RefuseEndorsement, Reason.INVALID_TX)]
    assert chain.record_proof(meter(3)).header.height == 1  # its one proof is its own block


def test_an_endorser_signs_a_valid_proposal_once_per_meter_version(fleet):
    """Injected: two different ROTATEs of one meter to version 2 asked of the same endorser."""
    ack(fleet.send(fleet.meters[meter(4)].register(), home="ecd-01"))
    state, home = fleet.ecd.chain.state, FLEET.identity("ecd-01")
    builder = TxBuilder(home)

    def rotation(n: int):  # type: ignore[no-untyped-def]
        tx = builder.rotate(meter(4), key_version=2, fingerprint=fingerprint(bytes([n]) * 32),
                            proof=rotation_proof_digest(bytes([n]) * 40), counter=5)
        return propose_block(state, home, [tx], timestamp_ms=T0 + 5_000 + n)

    endorser = fleet.terminal("ecd-03")
    first = endorser.feed(ev.EndorseRequest("ecd-01", rotation(1)))
    assert [type(a) for a in first] == [SendEndorsement]
    assert endorser.feed(ev.EndorseRequest("ecd-01", rotation(1)))[0].__class__ is \
        SendEndorsement  # the same one again is fine
    second = endorser.feed(ev.EndorseRequest("ecd-01", rotation(2)))
    assert [(type(a), a.reason) for a in second] == [(RefuseEndorsement, Reason.DUPLICATE_TX)]


def test_no_terminal_takes_another_terminals_meter(fleet):
    """Injected: ecd-02 proposes MIGRATE of ecd-01's live meter to itself.

    Before, the new home could propose a migration of any live meter and
    so take its key hand-over. Survives: the meter stays with ecd-01.
    """
    ack(fleet.send(fleet.meters[meter(5)].register(), home="ecd-01"))
    refused = fleet.send(ev.MigrateRequest(meter(5), 50, "ecd-02"), home="ecd-02")
    assert isinstance(refused, Refuse) and (refused.reason, refused.home) == \
        (Nak.NOT_HOME, "ecd-01")
    state = fleet.ecd.chain.state
    entry = state.meter(meter(5))
    grab = TxBuilder(FLEET.identity("ecd-02")).migrate(
        meter(5), new_home="ecd-02", key_version=1, fingerprint=entry.fingerprint,
        counter=entry.counter + 1)
    block = propose_block(state, FLEET.identity("ecd-02"), [grab], timestamp_ms=T0 + 5_000)
    refusal = fleet.terminal("ecd-00").feed(ev.EndorseRequest("ecd-02", block))
    assert refusal[0].reason is Reason.INVALID_TX
    assert fleet.ecd.chain.entry(meter(5)).home == "ecd-01"


# ------------------------------------------------------------- genesis pin

def test_a_terminal_refuses_a_chain_grown_from_another_fleets_genesis():
    """Injected: ecd-00's flash holds the chain of another fleet (same ids, other keys)."""
    other = provision(5, METERS, timestamp_ms=T0, seed=b"another fleet")
    ledger = RamBlockDevice(SEG, SEGMENTS)
    chain = Chain(RecordLog(ledger), other.identities[0], genesis_hash=other.genesis_hash)
    chain.append(other.genesis)
    with pytest.raises(ForeignChainError):
        Chain(RecordLog(ledger), FLEET.identities[0], genesis_hash=FLEET.genesis_hash)
    fresh = Chain(RecordLog(RamBlockDevice(SEG, SEGMENTS)), FLEET.identities[0],
                  genesis_hash=FLEET.genesis_hash)
    with pytest.raises(BlockRejected) as info:
        fresh.append(other.genesis)
    assert info.value.reason is Reason.FOREIGN_GENESIS and fresh.height is None


def test_a_snapshot_carries_the_genesis_so_a_snapshot_boot_still_checks_it(fleet):
    ack(fleet.send(fleet.meters[meter(1)].register()))
    fleet.ecd.chain.snapshot()
    ledger = fleet.power.ram[0]
    assert Chain(RecordLog(ledger), FLEET.identities[0],
                 genesis_hash=FLEET.genesis_hash).report.snapshot_height == 1
    wrong = provision(5, [], timestamp_ms=T0, seed=b"x").genesis_hash
    with pytest.raises(ForeignChainError):
        Chain(RecordLog(ledger), FLEET.identities[0], genesis_hash=wrong)


# ------------------------------------------------------------------ chain

def test_verify_compares_the_whole_state_not_only_the_tip(fleet):
    """Injected: one meter's entry in RAM changed (its fingerprint), the tip left alone.

    Before, verify() compared tips only and passed.
    """
    ack(fleet.send(fleet.meters[meter(1)].register()))
    chain = fleet.ecd.chain
    assert chain.verify().height == chain.height
    entry = chain.state.meter(meter(1))
    chain.state.put_meter(meter(1), entry._replace(fingerprint=bytes(32)))
    with pytest.raises(ChainCorruptError, match="another state"):
        chain.verify()


def test_an_append_whose_snapshot_fails_still_commits_the_block(fleet, monkeypatch):
    """Injected: the snapshot after a durable block fails (an I/O error on the way).

    Before, the error escaped append() although the block was on flash, so a
    caller would retry a committed block. Survives: append returns the
    block's changes, the warning is kept, the block is there at reboot.
    """
    chain = fleet.ecd.chain

    def failing_snapshot() -> int:
        raise OSError("flash write failed")

    monkeypatch.setattr(chain, "snapshot", failing_snapshot)
    monkeypatch.setattr(chain, "snapshot_headroom", 10**12)  # every append wants one
    reply = ack(fleet.send(fleet.meters[meter(1)].register()))
    assert reply.height == chain.height == 1
    assert "snapshot abandoned" in chain.space_warning
    assert fleet.power_cycle().chain.entry(meter(1)).key_version == 1


def test_the_snapshot_size_account_never_undershoots_for_mixed_id_lengths():
    """Injected: 60 meters with 16-byte ids homed at a 32-char terminal, 6 with 1-byte ids
    at a 1-char one, the short ones rotated 198 times. Before, the account took the mean
    length of every transaction ever seen, which these rotations pull about 77 bytes a
    meter below the newest records' mean: the estimate undershot by some 4.6 kB."""
    names = ["a", "t" * 32, "mid-size-terminal"]
    ids = [TerminalIdentity.from_seed(n, bytes([i]) * 32) for i, n in enumerate(names)]
    chain = Chain(RecordLog(RamBlockDevice(SEG, 256)), ids[0])
    chain.append(genesis(ids[0], [(i.terminal_id, i.public_bytes()) for i in ids],
                         timestamp_ms=T0, endorsers=ids[:2]))
    rng = random.Random(5)
    long_ids = [bytes([i]) * 16 for i in range(60)]
    short_ids = [bytes([i]) for i in range(6)]
    now = T0

    def commit(txs: list) -> None:  # type: ignore[type-arg]
        nonlocal now
        now += 1000
        block = propose_block(chain.state, ids[0], txs, timestamp_ms=now)
        chain.append(with_endorsements(block, [endorse(i, block.header) for i in ids[:2]]))

    homes = {mid: ids[1] for mid in long_ids} | {mid: ids[0] for mid in short_ids}
    for n, mid in enumerate(long_ids + short_ids):
        commit([TxBuilder(homes[mid]).register(mid, key_version=1, counter=1,
                                               fingerprint=bytes([n + 1]) * 32)])
    for round_ in range(2, 200):
        mid = rng.choice(short_ids)
        entry = chain.entry(mid)
        commit([TxBuilder(homes[mid]).rotate(mid, key_version=entry.key_version + 1,
                                             fingerprint=bytes([round_]) * 31 + b"\x01",
                                             proof=rotation_proof_digest(bytes(40)),
                                             counter=entry.counter + 1)])
    estimate = chain.snapshot_bytes()
    start = chain.log.next_seq
    chain.snapshot()
    written = sum(record_size(len(p)) for _, p in chain.log.records(start))
    assert estimate >= written, (estimate, written)
    assert estimate <= 1.6 * written + 2 * SEG  # an upper bound, not a wild one
    assert isinstance(chain.size, SnapshotSize)


# ------------------------------------------------------------- readings

def test_readings_are_accepted_once_under_the_key_in_force(fleet):
    """Injected: a replayed reading, one sealed under the superseded key, a tampered one."""
    m = fleet.meters[meter(6)]
    ack(fleet.send(m.register()))
    reading = m.reading(b"kWh 1234.5")
    assert ack(fleet.send(reading)).op.value == "reading"
    accepted = [r for r in fleet.net.replies["ecd-00"] if type(r).__name__ == "AcceptReading"]
    assert accepted[-1].plaintext == b"kWh 1234.5"
    replay = ev.ReadingRequest(meter(6), 7000, reading.counter, reading.sealed)
    assert fleet.send(replay).reason is Nak.REPLAYED_READING
    old_key = m.key
    ack(fleet.send(m.rotate()))
    stale = seal_reading(old_key, b"n" * 12, b"kWh 1", meter_id=meter(6), key_version=2,
                         counter=m.reading_counter + 1)
    assert fleet.send(ev.ReadingRequest(meter(6), 7001, m.reading_counter + 1, stale)).reason \
        is Nak.BAD_READING
    good = m.reading(b"kWh 2")
    tampered = ev.ReadingRequest(meter(6), 7002, good.counter,
                                 good.sealed[:-1] + bytes([good.sealed[-1] ^ 1]))
    assert fleet.send(tampered).reason is Nak.BAD_READING
    assert ack(fleet.send(good)).key_version == 2


# ------------------------------------------------------------ state machine

def test_an_operation_only_takes_the_steps_of_its_state_machine():
    path = [OpState.RECEIVED, OpState.CHECKED, OpState.PROPOSED, OpState.ENDORSED,
            OpState.ORDERED, OpState.VALIDATED, OpState.APPLIED, OpState.ACKNOWLEDGED]
    for a, b in itertools.pairwise(path):
        check_transition(a, b)
    for a, b in [(OpState.RECEIVED, OpState.ORDERED), (OpState.ACKNOWLEDGED, OpState.REFUSED),
                 (OpState.REFUSED, OpState.CHECKED), (OpState.VALIDATED, OpState.REFUSED),
                 (OpState.APPLIED, OpState.CHECKED)]:
        with pytest.raises(LocalProtocolError):
            check_transition(a, b)


def test_the_node_refuses_what_is_not_an_event(fleet):
    with pytest.raises(LocalProtocolError):
        fleet.ecd.node.handle("rotate please", ev.Time(0.0, T0))  # type: ignore[arg-type]


def test_a_wrapped_key_under_another_factory_key_is_refused(fleet):
    """Injected: a meter that was not provisioned for this fleet (unknown factory key)."""
    stranger = MeterKeys(meter(7), new_key(), random.Random(1).randbytes)
    reply = fleet.send(stranger.register())
    assert reply.reason is Nak.BAD_PROOF
    unprovisioned = ev.RegisterRequest(b"\x09" * 6, 1, 1, 1,
                                       make_rotation_proof(new_key(), new_key()))
    assert fleet.send(unprovisioned).reason is Nak.NO_FACTORY_KEY
    assert fleet.ecd.chain.height == 0 and header_hash(FLEET.genesis.header) == \
        FLEET.genesis_hash


# ------------------------------------------------------- the board's [ledger]

def test_the_boards_ledger_section_sets_the_seal_and_the_batch():
    """A board asking for the paper's PoW (8 bits) and at most two transactions a block:
    the proposer seals and batches by it, and every chain demands the seal."""
    board_ledger = Ledger(pow_difficulty=8, txs_per_block=2)
    unsealed_fleet = LocalFleet(FLEET, (RamBlockDevice(SEG, SEGMENTS),
                                        RamBlockDevice(SEG, SEGMENTS)), DEVICE_KEY,
                                ledger=board_ledger)
    with pytest.raises(ValueError, match="genesis was refused"):
        unsealed_fleet.found()  # a genesis without the seal the board demands
    sealed = provision(5, METERS, timestamp_ms=T0, seed=b"node core", difficulty=8)
    fleet = LocalFleet(sealed, (RamBlockDevice(SEG, SEGMENTS), RamBlockDevice(SEG, SEGMENTS)),
                       DEVICE_KEY, ledger=board_ledger)
    fleet.found()
    assert fleet.ecd.chain.require_pow == 8
    meters = [MeterKeys(m, sealed.factory_keys[m], random.Random(m).randbytes)
              for m in METERS[:5]]
    requests = [m.register() for m in meters]
    for r in requests:
        fleet.net.post("ecd-00", r)  # a burst: they arrive before the first block commits
    fleet.net.run()
    acks = [r for r in fleet.net.replies["ecd-00"] if isinstance(r, Acknowledge)]
    assert sorted(a.request_id for a in acks) == sorted(r.request_id for r in requests)
    blocks = fleet.net.ordering.blocks[1:]
    assert [len(b.txs) for b in blocks] == [1, 2, 2]  # the first alone, then batches of two
    assert all(b.header.difficulty == 8 and leading_zero_bits(header_hash(b.header)) >= 8
               for b in blocks)
    unsealed = propose_block(fleet.ecd.chain.state, sealed.identity("ecd-00"), [],
                             timestamp_ms=T0 + 7_000)
    with pytest.raises(BlockRejected) as info:
        fleet.ecd.chain.append(with_endorsements(unsealed, [
            endorse(sealed.identities[i], unsealed.header) for i in range(3)]))
    assert info.value.reason is Reason.BAD_POW


def test_a_lost_hand_over_is_sent_again_until_the_new_home_acknowledges(fleet):
    """Injected: the new home is cut off while the migration's key hand-over goes out.

    Before, a lost hand-over waited for the old home's next reboot; the new
    home had no key for its meter. Survives: the key, sent again on a tick
    once the link is back, stored by the new home; the copy here then erased.
    """
    m = fleet.meters[meter(8)]
    ack(fleet.send(m.register()))
    key = m.key
    fleet.net.offline.add("ecd-01")
    fleet.net.post("ecd-00", ev.MigrateRequest(meter(8), 880, "ecd-01"))
    fleet.net.run()
    fleet.net.offline.discard("ecd-01")
    fleet.clock.advance(1.0)
    assert fleet.net.send("ecd-00", ev.Tick()) == []  # not due yet
    assert fleet.ecd.keys.status(meter(8)) is StoreStatus.LIVE
    # ecd-01 missed the block while cut off: give it the ordered blocks it lacks
    new_home = fleet.terminal("ecd-01")
    for block in fleet.net.ordering.blocks[new_home.chain.height + 1:]:
        new_home.deliver(block)
    assert new_home.keys.status(meter(8)) is not StoreStatus.LIVE
    fleet.clock.advance(fleet.ecd.config.handover_resend_s)
    fleet.net.send("ecd-00", ev.Tick())
    assert held_key(new_home, meter(8)) == key
    assert fleet.ecd.keys.status(meter(8)) is StoreStatus.DESTROYED
    assert fleet.ecd.node.counters["handover.resent"] == 1


# ------------------------------------------------------- medoid reassignment

def test_a_join_the_placement_refuses_writes_nothing_and_names_the_home(fleet):
    """Injected: the placement check (``NodeConfig.admit_join``) sends one joining meter to
    another terminal and asks another to wait while room is made. Survives: both refused
    with those reasons, no key prepared, no block; a third meter it admits registers."""
    import dataclasses

    verdicts = {METERS[0]: (Nak.NOT_HOME, "placement homes it at ecd-03", "ecd-03"),
                METERS[1]: (Nak.BUSY, "making room: 1 meters move to neighbours first", None)}
    node = fleet.ecd.node
    node.config = dataclasses.replace(node.config, admit_join=verdicts.get)
    elsewhere = fleet.send(fleet.meters[METERS[0]].register())
    assert isinstance(elsewhere, Refuse) and elsewhere.reason is Nak.NOT_HOME
    assert elsewhere.home == "ecd-03" and "placement" in elsewhere.detail
    waiting = fleet.send(fleet.meters[METERS[1]].register())
    assert isinstance(waiting, Refuse) and waiting.reason is Nak.BUSY and waiting.home is None
    assert fleet.ecd.chain.height == 0
    assert held_key(fleet.ecd, METERS[0]) is None and held_key(fleet.ecd, METERS[1]) is None
    ack(fleet.send(fleet.meters[METERS[2]].register()))
    assert fleet.ecd.chain.state.meter(METERS[2]) is not None
