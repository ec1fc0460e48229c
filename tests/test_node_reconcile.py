"""Boot reconcile when the chain is behind the key store: a repaired ledger partition.

A fleet terminal whose ledger was cut back to the blocks before a damaged
record (agent/ledger/repair.py) boots with a key store holding the keys of
the blocks after it. Reconcile must keep those keys (not erase them as
orphans, not hand them over on a stale home) until the blocks come back;
then every key a meter was acknowledged for is held at its home and matches
the chain. RAM flash, one process (emulator/localfleet.py).
"""

from __future__ import annotations

import random

import pytest

from agent.keystore.material import fingerprint
from agent.keystore.store import MeterStatus as StoreStatus
from agent.ledger.chain import REC_HEAD, ChainCorruptError
from agent.ledger.state import LedgerState, MeterEntry, MeterStatus
from agent.node import events as ev
from agent.node.actions import Acknowledge, Refuse, SendKey
from agent.node.reconcile import reconcile
from agent.terminal import Terminal, open_node_chain, repair_node_chain
from emulator.flash import RamBlockDevice
from emulator.localfleet import LocalFleet
from emulator.meter_keys import MeterKeys
from emulator.provision import provision
from hal.recordlog import REC_HEADER, RecordLog

T0 = 1_700_000_000_000
SEG, SEGMENTS = 8192, 64
DEVICE_KEY = bytes(range(32))


def meter(n: int) -> bytes:
    return (300000 + n).to_bytes(6, "big")


# ------------------------------------------------------------ the plan, case by case

class _Keys:
    """The key store's read side (the node's KeyPort) over fixed versions."""

    def __init__(self, held: dict[bytes, tuple[int, ...]]):
        self.held = held

    def live_meters(self) -> list[bytes]:
        return [m for m, v in self.held.items() if v]

    def versions(self, meter_id: bytes) -> tuple[int, ...]:
        return self.held.get(meter_id, ())

    def status(self, meter_id: bytes) -> StoreStatus:
        return StoreStatus.LIVE if self.held.get(meter_id) else StoreStatus.UNKNOWN


def _state(entries: dict[bytes, tuple[MeterStatus, int, str]]) -> LedgerState:
    state = LedgerState()
    for tid in ("ecd-00", "ecd-01"):
        state.add_terminal(tid, FLEET.identity(tid).public_bytes(), 0)
    for m, (status, version, home) in entries.items():
        state.put_meter(m, MeterEntry(status, version, b"\x01" * 32, home, 1, 1, 0))
    return state


LIVE, REVOKED = MeterStatus.LIVE, MeterStatus.REVOKED


@pytest.mark.parametrize(("chain", "held", "plan"), [
    (None, (1,), "ahead"),  # registered by a block still to come: not an orphan to erase
    ((LIVE, 1, "ecd-00"), (1, 2), "ahead"),  # rotated by a block still to come
    ((REVOKED, 1, "ecd-00"), (2,), "ahead"),  # registered again (a new key line) after it
    ((LIVE, 1, "ecd-01"), (2,), "ahead"),  # migrated here and rotated, still to come
    ((REVOKED, 1, "ecd-00"), (1,), "erase"),  # a committed revoke not carried out yet
    ((LIVE, 1, "ecd-01"), (1,), "hand_over"),  # a committed migration not carried out yet
    ((LIVE, 2, "ecd-00"), (1,), "pending"),  # a committed rotation whose key is not stored
    ((LIVE, 1, "ecd-00"), (), "pending"),
    ((LIVE, 1, "ecd-00"), (1,), None),
])
def test_a_key_ahead_of_the_chain_is_kept_and_what_the_chain_committed_is_carried_out(
        chain, held, plan):
    m = meter(1)
    got = reconcile(_state({} if chain is None else {m: chain}), _Keys({m: held}), "ecd-00")
    found = {name for name in ("erase", "ahead", "pending")
             if m in getattr(got, name)} | {"hand_over" for x in got.hand_over if x[0] == m}
    assert found == ({plan} if plan else set())


# ------------------------------------------------ a repaired terminal in its fleet

METERS = [meter(n) for n in range(1, 7)]
FLEET = provision(3, METERS, timestamp_ms=T0, seed=b"repair keys")


class Fleet(LocalFleet):
    """Three terminals; ecd-00's partitions on RAM flash the test can damage."""

    def __init__(self) -> None:
        self.flash = (RamBlockDevice(SEG, SEGMENTS), RamBlockDevice(SEG, SEGMENTS))
        super().__init__(FLEET, self.flash, DEVICE_KEY)
        self.found()
        self.meters = {m: MeterKeys(m, FLEET.factory_keys[m], random.Random(m).randbytes)
                       for m in METERS}
        self.operator = 1 << 40

    def send(self, event: ev.Event, home: str = "ecd-00") -> Acknowledge | Refuse:
        reply = self.request(event, home)
        m = self.meters.get(event.meter_id)
        if m is not None:
            m.heard(event, reply)
        assert isinstance(reply, Acknowledge), reply
        return reply

    def migrate(self, m: bytes, old: str, new: str) -> None:
        self.operator += 1
        self.send(ev.MigrateRequest(m, self.operator, new), home=old)
        self.net.run()

    def boot_on(self, chain_or_flash: object, label: str) -> Terminal:
        """ecd-00 powers on over its flash (or a chain already opened on it)."""
        t = Terminal(FLEET.config("ecd-00"), ledger=chain_or_flash,  # type: ignore[arg-type]
                     keystore=self.flash[1], device_key=DEVICE_KEY, clock=self.clock,
                     transport_key=FLEET.transport["ecd-00"], peers=self.peers,
                     entropy=random.Random(label).randbytes)
        self.net.replace(t)
        return t

    def give_back(self, t: Terminal, upto: int | None = None) -> None:
        """The blocks ``t`` lacks, from the ordering (as etcd keeps them), up to ``upto``."""
        blocks = self.net.ordering.blocks
        for block in blocks[(t.chain.height or 0) + 1:None if upto is None else upto + 1]:
            self.net.post(t.id, block)  # type: ignore[arg-type]
        self.net.run()


def held(t: Terminal) -> dict[bytes, tuple[int, ...]]:
    return {m: t.keys.versions(m) for m in t.keys.live_meters()}


def test_keys_of_blocks_lost_to_a_repair_are_kept_and_match_the_chain_once_they_are_back():
    """Injected: ecd-00's ledger loses, to a flipped byte in a block head, every block after
    the first registration; those blocks registered, rotated, revoked and registered again,
    and migrated meters to and from ecd-00, whose key store holds the result.

    Survives: booted on the repaired chain, ecd-00 erases no key and hands none over; it
    reboots half-way through getting the blocks back and still keeps them; once every
    block is back its chain has the fleet's digest and every key a meter was acknowledged
    for is held at the home the chain names, with the chain's fingerprint.
    """
    fleet = Fleet()
    keys = fleet.meters
    fleet.send(keys[meter(1)].register())
    kept = fleet.ecd.chain.height
    for n in (2, 3, 5):
        fleet.send(keys[meter(n)].register())
    fleet.send(keys[meter(1)].rotate())
    fleet.send(keys[meter(3)].revoke())
    fleet.send(keys[meter(3)].register())  # a new key line
    fleet.send(keys[meter(4)].register(), home="ecd-01")
    fleet.migrate(meter(4), "ecd-01", "ecd-00")  # handed over into ecd-00's store
    fleet.migrate(meter(5), "ecd-00", "ecd-01")  # handed over out of it
    early = keys[meter(4)].rotate()  # REPLAYED: the migration took a counter; it skips it
    keys[meter(4)].heard(early, fleet.request(early, "ecd-00"))
    fleet.send(keys[meter(4)].rotate())
    tip = fleet.ecd.chain.height
    assert tip > kept + 5
    before = held(fleet.ecd)
    assert set(before) == {meter(1), meter(2), meter(3), meter(4)}

    ledger = fleet.flash[0]
    first_lost = [s for s, p in RecordLog(ledger).records() if p[0] == REC_HEAD][kept + 1]
    seg, pos = RecordLog(ledger)._locate(first_lost)  # test-only peek
    ledger.data[seg.block * SEG + pos + REC_HEADER + 9] ^= 0x01
    with pytest.raises(ChainCorruptError):
        open_node_chain(FLEET.config("ecd-00"), ledger)
    chain, repair = repair_node_chain(FLEET.config("ecd-00"), ledger)
    assert repair.height == kept == chain.height

    t = fleet.boot_on(chain, "after the repair")
    assert not [a for a in t.boot_actions if isinstance(a, SendKey)]
    assert held(t) == before  # nothing erased: each key's block is still to come
    assert not t.node.pending_keys

    fleet.give_back(t, upto=kept + 3)  # part of the way, then a reboot over the same flash
    t = fleet.boot_on(ledger, "half-way")
    assert kept < t.chain.height < tip and held(t) == before
    fleet.give_back(t)

    assert t.chain.height == tip
    assert t.chain.state_digest() == fleet.terminal("ecd-01").chain.state_digest()
    for m, mk in keys.items():
        entry = t.chain.entry(m)
        if mk.key is None:
            continue
        home = fleet.terminal(entry.home)
        assert entry.status is MeterStatus.LIVE and entry.key_version == mk.key_version
        assert fingerprint(home.keys.get(m, entry.key_version)) == entry.fingerprint
        assert entry.fingerprint == fingerprint(mk.key)
    assert t.keys.status(meter(5)) is StoreStatus.DESTROYED  # handed over, as the chain says
    assert not t.node.pending_keys
    again = fleet.boot_on(ledger, "caught up")
    assert held(again) == held(t) and not again.node.pending_keys
