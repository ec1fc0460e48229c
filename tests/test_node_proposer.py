"""One elected proposer batching every terminal's operations (the etcd ordering's mode).

The node core in a 5-terminal ``LocalNet``: the ordering names a proposer,
the others forward their checked transactions to it, and its blocks carry
them all. What is checked: no block is proposed by anyone else, one block
carries several homes' transactions, no round is lost to a race, every
request is acknowledged at its home; a proposer that goes silent is
replaced and what was forwarded to it reaches the new one; a refusal judged
on an older chain is not taken as final; an equivocating home's two signed
transactions are kept as evidence.
"""

from __future__ import annotations

import random
from collections import Counter

from agent.keystore.material import fingerprint, new_key
from agent.ledger.block import header_hash
from agent.ledger.identity import TerminalIdentity
from agent.ledger.rules import Reason, propose_block
from agent.ledger.tx import TxBuilder, tx_id
from agent.node import events as ev
from agent.node.actions import Acknowledge, Nak, Refuse, RefuseEndorsement, SendEndorsement
from emulator.flash import RamBlockDevice
from emulator.localfleet import LocalFleet
from emulator.meter_keys import MeterKeys
from emulator.provision import provision

T0 = 1_700_000_000_000
METERS = [(500000 + i).to_bytes(6, "big") for i in range(20)]


def fleet5() -> LocalFleet:
    fleet = LocalFleet(provision(5, METERS, timestamp_ms=T0, seed=b"proposer"),
                       (RamBlockDevice(8192, 64), RamBlockDevice(8192, 64)), b"k" * 32)
    fleet.found()
    return fleet


def meter_keys(fleet: LocalFleet) -> dict[bytes, MeterKeys]:
    fk = fleet.fleet.factory_keys
    return {m: MeterKeys(m, fk[m], random.Random(m).randbytes) for m in METERS}


def homes(i: int) -> str:
    return f"ecd-{i % 4 + 1:02d}"  # ecd-01..04: never the proposer ecd-00


def burst(fleet: LocalFleet, keys: dict[bytes, MeterKeys]) -> dict[bytes, Acknowledge | Refuse]:
    """Every meter registers at its home at once; the network runs after all are posted."""
    net = fleet.net
    start = {t: len(net.replies[t]) for t in net.terminals}
    asked = {}
    for i, m in enumerate(METERS):
        event = keys[m].register()
        asked[m] = (homes(i), event)
        net.post(homes(i), event)
    net.run()
    for _ in range(4):  # let the endorsement and ordering timers work
        fleet.clock.advance(0.5)
        net.tick_all()
    answers = {}
    for m, (home, event) in asked.items():
        replies = [r for r in net.replies[home][start[home]:]
                   if isinstance(r, Acknowledge | Refuse) and r.meter_id == m
                   and r.request_id == event.request_id]
        assert len(replies) == 1, (m.hex(), replies)
        answers[m] = replies[0]
        keys[m].heard(event, replies[0])
    return answers


def test_the_proposer_batches_every_homes_operations_and_no_round_is_lost():
    fleet = fleet5()
    fleet.net.elect("ecd-00")
    fleet.net.run()
    answers = burst(fleet, meter_keys(fleet))
    assert all(isinstance(a, Acknowledge) for a in answers.values()), answers
    blocks = fleet.net.ordering.blocks[1:]
    assert {b.header.proposer for b in blocks} == {"ecd-00"}
    assert max(len({tx.proposer for tx in b.txs}) for b in blocks) >= 2
    assert sum(len(b.txs) for b in blocks) == len(METERS)
    nodes = [t.node for t in fleet.net.terminals.values()]
    assert sum(n.counters.get("rounds.lost", 0) for n in nodes) == 0
    assert sum(n.counters.get("forwarded", 0) for n in nodes) == len(METERS)
    assert fleet.net.ordering.refused == 0
    digests = {t.chain.state_digest() for t in fleet.net.terminals.values()}
    assert len(digests) == 1


def test_forwards_to_a_silent_proposer_go_to_the_next_one():
    fleet = fleet5()
    net = fleet.net
    net.elect("ecd-00")
    net.run()
    keys = meter_keys(fleet)
    net.offline.add("ecd-00")  # the proposer dies: what is forwarded to it is lost
    pending = []
    for i, m in enumerate(METERS[:8]):
        event = keys[m].register()
        pending.append((homes(i), m, event))
        net.post(homes(i), event)
    net.run()
    assert not any(isinstance(r, Acknowledge) for t in net.terminals for r in net.replies[t])
    net.elect("ecd-03")  # its lease ran out; the ordering names another
    net.run()
    for _ in range(4):
        fleet.clock.advance(0.5)
        net.tick_all()
    for home, m, event in pending:
        replies = [r for r in net.replies[home] if getattr(r, "request_id", None) ==
                   event.request_id and r.meter_id == m]
        assert len(replies) == 1 and isinstance(replies[0], Acknowledge), replies
    assert {b.header.proposer for b in net.ordering.blocks[1:]} == {"ecd-03"}
    n = net.terminals["ecd-01"].node
    assert n.counters["proposer.changes"] == 2


def test_a_refusal_judged_on_an_older_chain_sends_the_transaction_again():
    fleet = fleet5()
    net = fleet.net
    net.elect("ecd-00")
    net.run()
    keys = meter_keys(fleet)
    home = net.terminals["ecd-01"]
    event = keys[METERS[0]].register()
    net.offline.add("ecd-00")
    net.post("ecd-01", event)
    net.run()  # forwarded, lost
    op = home.node._ops[METERS[0]]
    # the proposer answers from a chain one block behind the one the origin built it on
    actions = home.feed(ev.ForwardRefused("ecd-00", op.tx_id, Reason.UNKNOWN_METER,
                                          op.sent_height - 1))
    assert not any(isinstance(a, Refuse) for a in actions)
    assert op.rounds == 1 and home.node._forwarded[op.tx_id] is op  # forwarded again
    # judged at the origin's own height: final, with the ledger's reason
    actions = home.feed(ev.ForwardRefused("ecd-00", op.tx_id, Reason.UNKNOWN_METER,
                                          op.sent_height))
    refusals = [a for a in actions if isinstance(a, Refuse)]
    assert len(refusals) == 1 and refusals[0].reason is Nak.UNKNOWN_METER
    # and from a terminal that is not the proposer: ignored
    event2 = keys[METERS[1]].register()
    net.post("ecd-01", event2)
    net.run()
    op2 = home.node._ops[METERS[1]]
    actions = home.feed(ev.ForwardRefused("ecd-02", op2.tx_id, Reason.UNKNOWN_METER, 10**6))
    assert not any(isinstance(a, Refuse) for a in actions)
    assert home.node.counters["forward.stray_refusal"] == 1


def test_a_proposer_refuses_transactions_a_peer_did_not_sign():
    fleet = fleet5()
    net = fleet.net
    net.elect("ecd-00")
    net.run()
    proposer = net.terminals["ecd-00"]
    tx = TxBuilder(fleet.fleet.identity("ecd-02")).register(
        METERS[0], key_version=1, fingerprint=fingerprint(new_key()), counter=1)
    actions = proposer.feed(ev.TxsForwarded("ecd-01", (tx,)))  # ecd-01 relays ecd-02's tx
    assert [type(a).__name__ for a in actions] == ["RefuseForwarded"]
    assert actions[0].reason is Reason.UNKNOWN_PROPOSER and actions[0].tx_id == tx_id(tx)


def test_an_equivocating_home_is_caught_with_both_signed_transactions():
    fleet = fleet5()
    endorser = fleet.net.terminals["ecd-04"]
    cheat = fleet.fleet.identity("ecd-01")
    b = TxBuilder(cheat)
    first = b.register(METERS[0], key_version=1, fingerprint=fingerprint(new_key()), counter=1)
    second = b.register(METERS[0], key_version=1, fingerprint=fingerprint(new_key()), counter=1)
    state = endorser.chain.state
    clock = fleet.clock()
    one = propose_block(state, cheat, [first], timestamp_ms=clock.wall_ms)
    two = propose_block(state, cheat, [second], timestamp_ms=clock.wall_ms + 1)
    a1 = endorser.feed(ev.EndorseRequest("ecd-01", one))
    a2 = endorser.feed(ev.EndorseRequest("ecd-01", two))
    assert [type(a) for a in a1] == [SendEndorsement]
    kinds = Counter(type(a).__name__ for a in a2)
    assert kinds == {"RefuseEndorsement": 1}
    refusal = next(a for a in a2 if isinstance(a, RefuseEndorsement))
    assert refusal.reason is Reason.DUPLICATE_TX and refusal.block_hash == header_hash(two.header)
    (found,) = endorser.node.evidence
    assert (found.signer, found.meter_id, found.key_version) == ("ecd-01", METERS[0], 1)
    assert {tx_id(found.first), tx_id(found.second)} == {tx_id(first), tx_id(second)}
    # both are the signer's own signatures: anyone can check them against its public key
    assert found.first.signature and found.second.signature
    assert endorser.node.counters["evidence.equivocation"] == 1


def test_a_retired_terminal_stops_counting_and_its_requests_are_refused():
    fleet = fleet5()
    net = fleet.net
    net.elect("ecd-00")
    net.run()
    (ack,) = [r for r in net.send("ecd-01", ev.RetireRequest("ecd-04", 1 << 62))
              if r.request_id == 1 << 62]
    assert isinstance(ack, Acknowledge) and ack.op.name == "RETIRE" and ack.height
    for t in net.terminals.values():  # every chain: four active, the majority is three
        assert t.chain.state.active_count == 4 and not t.chain.state.is_active("ecd-04")
    keys = meter_keys(fleet)
    (nak,) = net.send("ecd-04", keys[METERS[0]].register())
    assert isinstance(nak, Refuse) and nak.reason is Nak.LEDGER_REFUSED
    assert nak.ledger_reason is Reason.RETIRED_PROPOSER
    # what it still forwards is refused by the proposer; the fleet commits without it
    tx = TxBuilder(fleet.fleet.identity("ecd-04")).register(
        METERS[1], key_version=1, fingerprint=fingerprint(new_key()), counter=1)
    (refusal,) = net.terminals["ecd-00"].feed(ev.TxsForwarded("ecd-04", (tx,)))
    assert refusal.reason is Reason.UNKNOWN_PROPOSER
    event = keys[METERS[2]].register()
    (ok,) = [r for r in net.send("ecd-02", event) if r.request_id == event.request_id]
    assert isinstance(ok, Acknowledge)
    again = net.send("ecd-01", ev.RetireRequest("ecd-04", (1 << 62) + 1))
    assert again[0].reason is Nak.BAD_REQUEST  # no longer an active terminal


def test_a_terminal_the_utility_provisioned_is_added_and_one_it_did_not_is_refused():
    """Injected: an operator adds ecd-05, which the utility's provisioning lists (the
    ``authorise_member`` oracle says so), then ecd-06, which it does not; and ecd-00,
    as a compromised member would, proposes a block adding a sockpuppet of its own."""
    ordered = {"ecd-05": TerminalIdentity.from_seed("ecd-05", b"5" * 32).public_bytes()}
    fleet = LocalFleet(provision(5, METERS, timestamp_ms=T0, seed=b"proposer"),
                       (RamBlockDevice(8192, 64), RamBlockDevice(8192, 64)), b"k" * 32,
                       authorise_member=lambda tx: ordered.get(tx.terminal) == tx.public_key)
    fleet.found()
    net = fleet.net
    net.elect("ecd-00")
    net.run()
    (ack,) = [r for r in net.send("ecd-01", ev.AddRequest("ecd-05", ordered["ecd-05"], 7))
              if r.request_id == 7]
    assert isinstance(ack, Acknowledge) and ack.op.name == "ADD" and ack.height
    for t in net.terminals.values():  # every chain: six members, the majority is four
        assert t.chain.state.active_count == 6 and t.chain.state.is_active("ecd-05")
    stranger = TerminalIdentity.from_seed("ecd-06", b"6" * 32).public_bytes()
    (nak,) = net.send("ecd-01", ev.AddRequest("ecd-06", stranger, 8))
    assert nak.reason is Nak.LEDGER_REFUSED and nak.ledger_reason is Reason.MEMBER_NOT_AUTHORISED
    (dup,) = net.send("ecd-02", ev.AddRequest("ecd-05", ordered["ecd-05"], 9))
    assert dup.ledger_reason is Reason.TERMINAL_EXISTS
    tip = net.terminals["ecd-00"].chain.state
    puppet = propose_block(tip, fleet.fleet.identity("ecd-00"), [TxBuilder(
        fleet.fleet.identity("ecd-00")).add_terminal("ecd-06", stranger)],
        timestamp_ms=tip.tip.timestamp_ms + 1)  # type: ignore[union-attr]
    for tid in ("ecd-01", "ecd-02", "ecd-03", "ecd-04"):
        (refusal,) = net.terminals[tid].feed(ev.EndorseRequest("ecd-00", puppet))
        assert isinstance(refusal, RefuseEndorsement)
        assert refusal.reason is Reason.INVALID_TX, refusal
    assert net.terminals["ecd-01"].node.counters["endorse.refused"] >= 1
    # the fleet of six still commits with its five running members (four are a majority)
    keys = meter_keys(fleet)
    event = keys[METERS[2]].register()
    (ok,) = [r for r in net.send("ecd-02", event) if r.request_id == event.request_id]
    assert isinstance(ok, Acknowledge)


def test_an_endorser_a_block_behind_holds_the_proposal_and_signs_once_it_catches_up():
    fleet = fleet5()
    net = fleet.net
    keys = meter_keys(fleet)
    slow = net.terminals["ecd-04"]
    net.offline.add("ecd-04")  # it misses block 1
    event = keys[METERS[0]].register()
    net.send("ecd-01", event)
    for _ in range(3):
        fleet.clock.advance(0.5)
        net.tick_all()
    block1 = net.ordering.blocks[1]
    net.offline.discard("ecd-04")
    # the proposer of block 2 asks ecd-04, still at height 0
    proposer = fleet.fleet.identity("ecd-02")
    state = net.terminals["ecd-02"].chain.state
    tx = TxBuilder(proposer).register(METERS[1], key_version=1,
                                      fingerprint=fingerprint(new_key()), counter=1)
    block2 = propose_block(state, proposer, [tx], timestamp_ms=fleet.clock().wall_ms + 5)
    assert slow.feed(ev.EndorseRequest("ecd-02", block2)) == []  # held, not refused
    assert slow.node.counters["endorse.held"] == 1
    answers = slow.deliver(block1)  # block 1 arrives through the ordering
    signed = [a for a in answers if isinstance(a, SendEndorsement)]
    assert len(signed) == 1 and signed[0].height == 2 and signed[0].peer == "ecd-02"
    assert not any(isinstance(a, RefuseEndorsement) for a in answers)
