"""Model-based: random key operations with reboots at random points reach the model's state.

Five terminals run the node core (emulator/localfleet.py); ecd-00 and
ecd-01 home meters. Hypothesis draws a sequence of meter and operator
operations (register, rotate, revoke, reading, migrate), each cut short,
at a random message of its way through the network, by a reboot of ecd-00
(everything it knows read back from flash; what was in flight lost). The
meter then does what a meter does: it sends the same request again until
it is answered. A model written from the paper's lifecycle rules alone
(not from agent/ledger) predicts every answer and every meter's entry; at
the end the digest of the model's state (``state.state_digest`` over the
model's values) must equal every terminal's chain, and ecd-00's key store
must hold exactly the keys the model homes there.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.keystore.material import fingerprint
from agent.keystore.store import MeterStatus as StoreStatus
from agent.ledger.codec import ZERO_HASH
from agent.ledger.state import MeterEntry, MeterStatus, state_digest
from agent.node import events as ev
from agent.node.actions import Acknowledge, Nak, Refuse
from emulator.flash import RamBlockDevice
from emulator.localfleet import LocalFleet
from emulator.meter_keys import MeterKeys
from emulator.provision import provision

T0 = 1_700_000_000_000
METERS = [bytes([0x31, n]) * 3 for n in range(4)]
FLEET = provision(5, METERS, timestamp_ms=T0, seed=b"model")
HOMES = ("ecd-00", "ecd-01")
SEG, SEGMENTS = 8192, 48
EMULATED = bool(os.environ.get("EDGEKEY_EMULATED"))
TOTALS = {"examples": 0, "operations": 0, "acknowledged": 0, "refused": 0, "reboots": 0,
          "reboots_mid_operation": 0, "retries": 0, "blocks": 0}


@dataclass
class ModelMeter:
    status: MeterStatus
    key_version: int
    fingerprint: bytes
    home: str
    counter: int
    height: int


class Model:
    """The lifecycle as the paper states it (section 2.2.1 steps 1-4, section 2.1)."""

    def __init__(self) -> None:
        self.meters: dict[bytes, ModelMeter] = {}
        self.height = 0

    def expect(self, op: str, m: bytes, arg: str | None) -> bool:
        """Whether the operation should be acknowledged."""
        cur = self.meters.get(m)
        live = cur is not None and cur.status is MeterStatus.LIVE
        if op == "register":
            return not live
        if op == "migrate":
            return live
        return live  # rotate, revoke, reading

    def commit(self, op: str, m: bytes, meter: MeterKeys, arg: str | None) -> int | None:
        """Apply an acknowledged operation; the height it committed at (None: no block)."""
        cur = self.meters.get(m)
        if op == "reading" or (op == "migrate" and cur is not None and cur.home == arg):
            return None
        self.height += 1
        h = self.height
        if op == "register":
            assert arg is not None
            self.meters[m] = ModelMeter(MeterStatus.LIVE, meter.key_version,
                                        fingerprint(meter.key), arg, meter.counter, h)
        elif op == "rotate":
            assert cur is not None
            self.meters[m] = replace(cur, key_version=meter.key_version,
                                     fingerprint=fingerprint(meter.key), counter=meter.counter,
                                     height=h)
        elif op == "revoke":
            assert cur is not None
            self.meters[m] = replace(cur, status=MeterStatus.REVOKED, fingerprint=ZERO_HASH,
                                     counter=meter.counter, height=h)
        else:  # migrate: the new home, the same key, the chain's counter moves on by one
            assert cur is not None and arg is not None
            self.meters[m] = replace(cur, home=arg, counter=cur.counter + 1, height=h)
        return h

    def digest(self, tip, genesis_hash: bytes) -> bytes:  # type: ignore[no-untyped-def]
        entries = ((m, MeterEntry(e.status, e.key_version, e.fingerprint, e.home, e.counter,
                                  e.height, 0)) for m, e in sorted(self.meters.items()))
        founders = ((t.terminal_id, t.public_bytes(), 0, None) for t in FLEET.identities)
        return state_digest(entries, founders, tip, genesis_hash)


class World:
    def __init__(self) -> None:
        self.ram = (RamBlockDevice(SEG, SEGMENTS), RamBlockDevice(SEG, SEGMENTS))
        self.fleet = LocalFleet(FLEET, self.ram, hashlib.sha256(b"ecd-00 key").digest(),
                                ram_segments=SEGMENTS)
        self.fleet.found()
        self.meters = {m: MeterKeys(m, FLEET.factory_keys[m], random.Random(m).randbytes)
                       for m in METERS}
        self.model = Model()
        self.request_ids = 10_000

    def reboot(self) -> None:
        self.fleet.reboot(self.ram)
        TOTALS["reboots"] += 1

    def request(self, op: str, m: bytes, arg: str | None) -> ev.Event:
        meter = self.meters[m]
        if op == "register":
            return meter.register()
        if op == "rotate":
            return meter.rotate()
        if op == "revoke":
            return meter.revoke()
        if op == "reading":
            return meter.reading(b"kWh %d" % meter.reading_counter)
        self.request_ids += 1
        return ev.MigrateRequest(m, self.request_ids, arg or "")

    def run(self, op: str, m: bytes, arg: str | None, cut_after: int | None) -> None:
        """One operation to its home, a reboot after ``cut_after`` messages, retries."""
        cur = self.model.meters.get(m)
        home = arg if op == "register" else (cur.home if cur is not None else "ecd-00")
        if op == "migrate":
            arg = "ecd-01" if home == "ecd-00" else "ecd-00"
        if op in ("rotate", "revoke", "reading") and self.meters[m].key is None:
            return  # the meter holds no key: it has nothing to send
        expected = self.model.expect(op, m, arg)
        event = self.request(op, m, arg)
        net = self.fleet.net
        start = len(net.replies[home])
        net.post(home, event)
        if cut_after is not None and home == "ecd-00":
            settled = net.run_some(cut_after)
            self.reboot()
            TOTALS["reboots_mid_operation"] += not settled
        net.run()
        reply = self._reply(home, start, event)
        for _ in range(5):
            if reply is not None and not (isinstance(reply, Refuse)
                                          and reply.reason is Nak.REPLAYED and op != "reading"
                                          and expected):
                break
            # unanswered (lost in the reboot), or the chain's counter moved on: send again
            TOTALS["retries"] += 1
            if reply is not None:
                self.meters[m].heard(event, reply)
                event = self.request(op, m, arg)
            start = len(net.replies[home])
            net.post(home, event)
            net.run()
            reply = self._reply(home, start, event)
        assert reply is not None, f"{op} of {m.hex()} never answered"
        TOTALS["operations"] += 1
        if op != "migrate":
            self.meters[m].heard(event, reply)
        if not expected:
            assert isinstance(reply, Refuse), (op, reply)
            TOTALS["refused"] += 1
            return
        assert isinstance(reply, Acknowledge), (op, m.hex(), reply)
        TOTALS["acknowledged"] += 1
        height = self.model.commit(op, m, self.meters[m], arg)
        if height is not None:
            assert reply.height == height, (op, reply, height)

    def _reply(self, home: str, start: int, event: ev.Event) -> Acknowledge | Refuse | None:
        got = [r for r in self.fleet.net.replies[home][start:]
               if isinstance(r, Acknowledge | Refuse) and r.request_id == event.request_id]
        assert len(got) <= 1, got
        return got[0] if got else None

    def check(self) -> None:
        net = self.fleet.net
        assert net.ordering.head_height == self.model.height  # no lost and no extra blocks
        TOTALS["blocks"] += self.model.height
        tip = self.fleet.ecd.chain.state.tip
        want = self.model.digest(tip, FLEET.genesis_hash)
        for t in net.terminals.values():
            assert t.chain.state.tip == tip
            assert t.chain.state_digest() == want, t.id
        ecd = self.fleet.ecd
        assert ecd.chain.verify(deep=True).height == self.model.height
        for m, e in self.model.meters.items():
            held = ecd.keys.status(m) is StoreStatus.LIVE
            if e.status is MeterStatus.LIVE and e.home == "ecd-00":
                assert held and fingerprint(ecd.keys.get(m)) == e.fingerprint, m.hex()
                assert ecd.keys.versions(m)[-1] == e.key_version
            else:
                assert not held, (m.hex(), e)  # revoked or homed elsewhere: erased here
        assert ecd.node.pending_keys == set() and ecd.node.inflight == 0


OPERATIONS = st.tuples(
    st.sampled_from(["register", "register", "rotate", "rotate", "revoke", "reading",
                     "migrate"]),
    st.sampled_from(METERS),
    st.sampled_from(HOMES),
    st.one_of(st.none(), st.integers(0, 16)),  # a reboot after that many messages
)


@settings(max_examples=20 if EMULATED else 100)
@given(st.lists(OPERATIONS, min_size=4, max_size=16 if EMULATED else 30))
def test_random_operations_with_reboots_reach_the_models_state(steps):
    world = World()
    TOTALS["examples"] += 1
    for op, m, home, cut in steps:
        world.run(op, m, home, cut)
    world.reboot()  # and once more at the end: the state is read back whole
    world.fleet.net.run()
    world.check()


@pytest.fixture(scope="module", autouse=True)
def report_totals():
    yield
    print("\nmodel-based test: " + ", ".join(f"{k} {v}" for k, v in TOTALS.items()))
