"""The node core's event handler under hypothesis: any event, any order, any network.

The requirement: "any event order, duplicated, dropped or reordered peer
messages, any bytes: a typed error or a refusal with a reason, never a
crash, never a committed record lost, never a key-store effect without a
commit". Two levels:

- One ``Node`` (agent/node/core.py) over a chain with a genesis and a few
  meters, fed straight into ``handle``: every event type with garbage field
  values (ids of any length, huge and negative numbers, random proofs, keys
  and sealed readings, blocks of valid pieces at wrong heights and hashes,
  endorsements with random signatures), mixed with the genuine requests,
  endorsements, commits and key-store results a run brings, in any order and
  at any time (time going backwards too). The test is the node's runtime, a
  careless one: blocks really are appended before ``BlockCommitted``, but
  key-store actions are carried out late, out of order or not at all, and
  results arrive for nothing asked. ``handle`` must never raise, never write
  the chain or the key store itself, and every effect it asks for must agree
  with the chain; at the end every request is answered and the store squares
  with the chain (at once, or after a reboot's reconcile where the flash
  failed or lied).
- A fleet of 3 or 5 terminals on RAM flash over a hostile ``LocalNet``: per
  peer message (endorsement traffic, ordered blocks, key hand-overs)
  hypothesis delivers it, drops it, delivers it twice or holds it back and
  releases it later out of order, and it chooses when the clock moves and
  the timers tick. Every key-store write is checked against that terminal's
  chain as it happens. Then the network settles (no more losses, every
  timeout passed), every terminal reboots from its flash, and the terminals
  that hold every block must agree with the ordering and hold exactly the
  keys the chain homes on them; every request had exactly one answer.

Both run under the profile conftest.py loads (derandomized; fewer examples
under emulated ARM). ``TOTALS`` counts what ran (shown with ``-s``).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.keystore.material import (
    fingerprint,
    make_revocation_proof,
    make_rotation_proof,
)
from agent.keystore.store import KeyStore, KeyStoreError, PreparedKey
from agent.keystore.store import MeterStatus as StoreStatus
from agent.ledger.block import (
    Block,
    Endorsement,
    build_block,
    endorse,
    header_hash,
    with_endorsements,
)
from agent.ledger.chain import BlockRejected, open_chain
from agent.ledger.codec import ZERO_HASH
from agent.ledger.identity import TerminalIdentity
from agent.ledger.rules import (
    Reason,
    apply_block,
    propose_block,
    validate_block,
)
from agent.ledger.state import LedgerState, MeterStatus
from agent.ledger.tx import Transaction, TxBuilder, TxKind, make_tx, rotation_proof_digest
from agent.node import events as ev
from agent.node.actions import (
    AcceptReading,
    Acknowledge,
    AcknowledgeKey,
    Action,
    AnswerQuery,
    EraseKey,
    Log,
    Nak,
    Op,
    Refuse,
    RefuseEndorsement,
    RequestEndorsements,
    SendEndorsement,
    SendKey,
    StoreKey,
    SubmitBlock,
)
from agent.node.core import Node, NodeConfig
from agent.node.errors import LocalProtocolError
from agent.node.reading import seal_reading
from agent.terminal import Terminal
from emulator.flash import RamBlockDevice
from emulator.localfleet import ManualClock
from emulator.localnet import LocalNet
from emulator.meter_keys import MeterKeys
from emulator.provision import Provisioning, provision

T0 = 1_700_000_000_000
U32 = 2**32 - 1
U64 = 2**64 - 1
SEG, SEGMENTS = 8192, 64  # RAM flash per partition: 512 KiB
EMULATED = bool(os.environ.get("EDGEKEY_EMULATED"))

DIRECT_EVENTS = 24 if EMULATED else 48
NETWORK_STEPS = 12 if EMULATED else 24

TOTALS: Counter[str] = Counter()

# The active profile's budget (conftest.py), scaled down: each example runs a
# whole event sequence or a whole fleet.
DIRECT = settings(max_examples=max(5, settings.default.max_examples // 8))  # per meter
NETWORK = settings(max_examples=max(8, settings.default.max_examples // 2))

ACTION_TYPES = (Acknowledge, Refuse, AcceptReading, AnswerQuery, RequestEndorsements,
                SendEndorsement, RefuseEndorsement, SubmitBlock, StoreKey, EraseKey, SendKey,
                AcknowledgeKey, Log)
REQUEST_OPS: dict[type, Op] = {
    ev.RegisterRequest: Op.REGISTER, ev.RotateRequest: Op.ROTATE, ev.RevokeRequest: Op.REVOKE,
    ev.ReadingRequest: Op.READING, ev.OperatorRevoke: Op.REVOKE, ev.MigrateRequest: Op.MIGRATE,
    ev.QueryRequest: Op.QUERY}
OP_KINDS = {Op.REGISTER: TxKind.REGISTER, Op.ROTATE: TxKind.ROTATE, Op.REVOKE: TxKind.REVOKE,
            Op.MIGRATE: TxKind.MIGRATE}


def meter(n: int) -> bytes:
    return (400000 + n).to_bytes(6, "big")


def request_key(event: ev.Event) -> tuple[bytes, int, Op]:
    """What identifies a request to the node: its meter, request id and operation."""
    return (event.meter_id, event.request_id, REQUEST_OPS[type(event)])  # type: ignore[union-attr]


def reply_key(a: Acknowledge | Refuse | AnswerQuery) -> tuple[bytes, int, Op]:
    return (a.meter_id, a.request_id, Op.QUERY if isinstance(a, AnswerQuery) else a.op)


def store_view(keys: KeyStore) -> tuple[tuple[bytes, tuple[int, ...]], ...]:
    return tuple(sorted((m, keys.versions(m)) for m in keys.live_meters()))


# ======================================================== fleets on RAM flash

class AuditedKeys:
    """A terminal's key store that checks each write against the terminal's chain first.

    "Never a key-store effect without a commit": a key is stored only as the
    version and fingerprint the chain homes here, erased only when the chain
    says revoked or homed elsewhere (or never heard of: an orphan at boot),
    exported only to the home the chain names.
    """

    def __init__(self, store: KeyStore, terminal: AuditedTerminal):
        self._store = store
        self._terminal = terminal

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def _fault(self, what: str) -> None:
        self._terminal.faults.append(f"{self._terminal.id}: {what}")

    def commit_key(self, prepared: PreparedKey) -> bool:
        e = self._terminal.chain.entry(prepared.meter_id)
        if not (e is not None and e.status is MeterStatus.LIVE and e.home == self._terminal.id
                and e.key_version == prepared.version
                and e.fingerprint == fingerprint(prepared.key)):
            self._fault(f"stored {prepared} while the chain says {e}")
        return self._store.commit_key(prepared)

    def destroy(self, meter_id: bytes) -> None:
        e = self._terminal.chain.entry(meter_id)
        if e is not None and e.status is MeterStatus.LIVE and e.home == self._terminal.id:
            self._fault(f"erased {meter_id.hex()} while the chain homes it here: {e}")
        self._store.destroy(meter_id)

    def export(self, meter_id: bytes, requester_id: bytes, allow_list: object,
               version: int | None = None) -> bytes:
        e = self._terminal.chain.entry(meter_id)
        if not (e is not None and e.status is MeterStatus.LIVE
                and e.home.encode() == requester_id and e.key_version == version):
            self._fault(f"handed {meter_id.hex()} v{version} to {requester_id!r}; chain: {e}")
        return self._store.export(meter_id, requester_id, allow_list, version)  # type: ignore[arg-type]


class AuditedTerminal(Terminal):
    """A Terminal whose key store is an AuditedKeys from the first write (boot included)."""

    def __init__(self, *args: object, faults: list[str], **kw: object):
        self.faults = faults
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    @property  # type: ignore[override]
    def keys(self) -> KeyStore:
        return self._audited  # type: ignore[return-value]

    @keys.setter
    def keys(self, store: KeyStore) -> None:
        self._audited = AuditedKeys(store, self)

    @property
    def store(self) -> KeyStore:
        """The key store itself, for the checks."""
        return self._audited._store


@cache
def provisioned(n: int) -> Provisioning:
    return provision(n, [meter(i) for i in range(1, 13)], timestamp_ms=T0,
                     seed=b"node properties %d" % n)


class RamFleet:
    """The provisioned terminals, each on two RAM partitions, one clock, one net."""

    def __init__(self, n: int, net: Callable[[list[Terminal]], LocalNet] = LocalNet):
        self.fleet = provisioned(n)
        self.clock = ManualClock(T0)
        self.peers = self.fleet.peers()
        self.faults: list[str] = []
        self.flash = {i.terminal_id: (RamBlockDevice(SEG, SEGMENTS), RamBlockDevice(SEG, SEGMENTS))
                      for i in self.fleet.identities}
        self.boots: Counter[str] = Counter()
        self.net = net([self.boot(tid) for tid in self.flash])

    def boot(self, tid: str) -> AuditedTerminal:
        """``tid`` powers on over its flash (a fresh entropy stream every boot)."""
        self.boots[tid] += 1
        ledger, keystore = self.flash[tid]
        return AuditedTerminal(self.fleet.config(tid), ledger=ledger, keystore=keystore,
                               device_key=hashlib.sha256(tid.encode()).digest(),
                               clock=self.clock,
                               entropy=random.Random(f"{tid} boot {self.boots[tid]}").randbytes,
                               transport_key=self.fleet.transport[tid], peers=self.peers,
                               faults=self.faults)

    def found(self) -> None:
        self.net.found(self.fleet.genesis)

    def terminal(self, tid: str) -> AuditedTerminal:
        return self.net.terminals[tid]  # type: ignore[return-value]

    def reply(self, home: str, event: ev.Event) -> Acknowledge | Refuse:
        got = [r for r in self.net.send(home, event)
               if isinstance(r, Acknowledge | Refuse) and reply_key(r) == request_key(event)]
        assert len(got) == 1, got
        return got[0]


# ======================================================= one node, fed directly

HOME, HOME2, REMOTE, REVOKED, MAX_COUNTER, MAX_VERSION, MIGRATED, NEW = (
    meter(n) for n in range(1, 9))
KNOWN = (HOME, HOME2, REMOTE, REVOKED, MAX_COUNTER, MAX_VERSION, MIGRATED, NEW)
SELF = "ecd-00"


@dataclass
class NodeWorld:
    """ecd-00's flash as three terminals left it, and the meters that made it so."""

    fleet: RamFleet
    config: NodeConfig
    identities: tuple[TerminalIdentity, ...]
    meters: dict[bytes, MeterKeys]
    committed: dict[bytes, ev.Event]  # each meter's last committed request (to send again)

    def flash_copy(self) -> tuple[RamBlockDevice, RamBlockDevice]:
        copies = []
        for dev in self.fleet.flash[SELF]:
            copy = RamBlockDevice(SEG, SEGMENTS)
            copy.data[:] = dev.data
            copies.append(copy)
        return copies[0], copies[1]


@cache
def node_world() -> NodeWorld:
    """Meters live on ecd-00 (one at the last counter, one at the last key version), one
    homed on ecd-01, one revoked, one migrated away, one never registered."""
    fleet = RamFleet(3)
    fleet.found()
    fk = fleet.fleet.factory_keys
    meters = {m: MeterKeys(m, fk[m], random.Random(m).randbytes) for m in KNOWN}
    committed: dict[bytes, ev.Event] = {}

    def run(m: bytes, event: ev.Event, home: str = SELF) -> None:
        reply = fleet.reply(home, event)
        assert isinstance(reply, Acknowledge), reply
        meters[m].heard(event, reply)
        committed[m] = event

    run(HOME, meters[HOME].register())
    run(HOME, meters[HOME].rotate())
    run(HOME2, meters[HOME2].register())
    run(REMOTE, meters[REMOTE].register(), "ecd-01")
    run(REVOKED, meters[REVOKED].register())
    run(REVOKED, meters[REVOKED].revoke())
    meters[MAX_COUNTER].counter = U64 - 1
    run(MAX_COUNTER, meters[MAX_COUNTER].register())
    meters[MAX_VERSION].key_version = U32 - 1
    run(MAX_VERSION, meters[MAX_VERSION].register())
    run(MIGRATED, meters[MIGRATED].register())
    run(MIGRATED, ev.MigrateRequest(MIGRATED, 9_000, "ecd-01"))
    assert fleet.faults == []
    return NodeWorld(fleet, fleet.terminal(SELF).config, tuple(fleet.fleet.identities), meters,
                     committed)


class Probe:
    """One Node over a copy of ecd-00's flash, and a runtime around it that misbehaves.

    The probe is the node's runtime, as agent/terminal.py is, except that it
    carries the key-store actions out only when hypothesis says so (late,
    out of order, or failing instead), and it also makes up results for
    actions never asked for. Commits are real: a block is appended to the
    chain (``Chain.append``, which validates it) before ``BlockCommitted``, or
    refused (``BlockRefused``), as ``Terminal.deliver`` does. ``handle`` itself
    must change neither the chain nor the key store.
    """

    def __init__(self, world: NodeWorld, focus: bytes = HOME):
        self.world = world
        self.focus = focus  # the meter most events are about
        ledger, keystore = world.flash_copy()
        config = world.config
        self.chain = open_chain(ledger, config.identity, require_pow=config.pow_difficulty,
                                placement_home=config.placement_home,
                                genesis_hash=config.genesis_hash)
        self.keys = KeyStore(keystore, hashlib.sha256(SELF.encode()).digest(),
                             entropy=random.Random(b"probe").randbytes)
        self.node = Node(config, self.chain.state, self.keys)
        assert all(isinstance(a, Log) for a in self.node.boot(ev.Time(0.0, T0)))
        self.known = {fingerprint(k): k for mk in world.meters.values()  # keys by fingerprint
                      for k in (mk.key, mk.pending) if k is not None}
        self.known[fingerprint(self.keys.get(HOME, 1))] = self.keys.get(HOME, 1)
        self.mono = 0.0
        self.high = 0.0  # the latest monotonic time handed to the node
        self.outstanding: dict[tuple[bytes, int, Op], ev.Event] = {}
        self.submitted: Block | None = None  # the node's newest endorsed block
        self.proposal: Block | None = None  # the node's newest block sent for endorsement
        self.effects: list[StoreKey | EraseKey] = []  # asked for, not carried out yet
        self.handovers: set[tuple[str, bytes, int]] = set()  # SendKey not acknowledged yet
        self.readings: dict[tuple[bytes, int, int], bytes] = {}  # genuine sealed readings
        self.carried: ev.Event | None = None  # the result carry_out just made
        self.tainted: set[bytes] = set()  # meters with a made-up or failed key-store result
        self.events = 0

    @property
    def state(self) -> LedgerState:
        return self.chain.state

    def key_of(self, m: bytes) -> bytes | None:
        """The meter's key in force, if the test knows it."""
        e = self.state.meter(m)
        return None if e is None else self.known.get(e.fingerprint)

    # ------------------------------------------------------------ driving

    def feed(self, event: ev.Event, at: ev.Time) -> list[Action]:
        self.high = max(self.high, at.mono)
        if type(event) in REQUEST_OPS:
            self.outstanding.setdefault(request_key(event), event)
        if isinstance(event, ev.KeyStored | ev.KeyErased | ev.EffectFailed) and (
                event is not self.carried or isinstance(event, ev.EffectFailed)):
            self.tainted.add(event.meter_id)
        digest, view = self.state.digest(), store_view(self.keys)
        actions = self.node.handle(event, at)  # anything raised fails the property
        assert self.state.digest() == digest, "the node changed the chain"
        assert store_view(self.keys) == view, "the node wrote the key store"
        self.events += 1
        self.check(event, actions)
        return actions

    def append(self, block: Block) -> ev.Event:
        """``Terminal.deliver``: the block on the chain, then BlockCommitted; or BlockRefused."""
        try:
            return ev.BlockCommitted(block, self.chain.append(block))
        except BlockRejected as exc:
            return ev.BlockRefused(block.header.height, header_hash(block.header), str(exc))

    def carry_out(self, a: StoreKey | EraseKey, *, fail: bool = False) -> ev.Event:
        """``Terminal._carry_out`` for one key-store action (or a flash that fails it)."""
        self.effects.remove(a)
        m = a.prepared.meter_id if isinstance(a, StoreKey) else a.meter_id
        result: ev.Event
        try:
            if fail:
                raise OSError("flash write failed")
            if isinstance(a, StoreKey):
                self.keys.commit_key(a.prepared)
                result = ev.KeyStored(m, a.prepared.version)
            else:
                self.keys.destroy(m)
                result = ev.KeyErased(m)
        except (KeyStoreError, OSError) as exc:
            result = ev.EffectFailed(m, f"{type(exc).__name__}: {exc}")
        self.carried = result
        return result

    def settle(self) -> None:
        """Every key-store action carried out, every timeout passed: all answered, all squared."""
        for _ in range(16):
            if not self.effects:
                break
            self.feed(self.carry_out(self.effects[0]), self.later(1.0))
        for _ in range(2):
            self.feed(ev.Tick(), self.later(self.node.config.op_timeout_s * 10))
        assert not self.effects
        assert self.outstanding == {}, f"never answered: {list(self.outstanding)}"
        assert self.node.inflight == 0
        for m in self.state.meter_ids():
            if m not in self.tainted:  # a lying or failing flash is for the reboot to square
                self.check_keys(m)
        self.check_reboot()

    def later(self, seconds: float) -> ev.Time:
        self.mono = self.high + seconds
        return ev.Time(self.mono, T0 + int(self.mono * 1000))

    # ------------------------------------------------------------- checks

    def check(self, event: ev.Event, actions: list[Action]) -> None:
        for a in actions:
            assert isinstance(a, ACTION_TYPES), a
        for i, a in enumerate(actions):
            if isinstance(a, Acknowledge | Refuse | AnswerQuery):
                asked = self.outstanding.pop(reply_key(a), None)
                assert asked is not None, f"{a} answers no request in flight"
                if isinstance(a, Acknowledge):
                    self.check_ack(a, asked, actions[:i])
            elif isinstance(a, AcceptReading):
                plain = self.readings.get((a.meter_id, a.request_id, a.counter))
                assert plain == a.plaintext, f"accepted a reading never sealed: {a}"
            elif isinstance(a, StoreKey | EraseKey | SendKey):
                self.check_effect(event, a)
            elif isinstance(a, RequestEndorsements):
                self.proposal = a.block
            elif isinstance(a, SubmitBlock):
                self.submitted = a.block
        if isinstance(event, ev.BlockCommitted):
            self.check_commit_carried_out(event, actions)
        for a in actions:
            if isinstance(a, SendKey):
                self.handovers.add((a.peer, a.meter_id, a.key_version))
            elif isinstance(a, EraseKey):
                self.handovers = {h for h in self.handovers if h[1] != a.meter_id}
            if isinstance(a, StoreKey | EraseKey):
                self.effects.append(a)

    def check_ack(self, a: Acknowledge, asked: ev.Event, before: list[Action]) -> None:
        """An operation is acknowledged only once its block is on the chain."""
        if a.op is Op.READING:
            assert any(isinstance(b, AcceptReading) and b.request_id == a.request_id
                       for b in before), a
            return
        assert a.height is not None and 0 < a.height <= (self.chain.height or 0), a
        txs = [tx for tx in self.chain.block(a.height).txs
               if tx.meter_id == a.meter_id and tx.key_version == a.key_version]
        if isinstance(asked, ev.MigrateRequest):  # moved there, or already there
            assert any(tx.home == asked.new_home and tx.kind is not TxKind.REVOKE
                       for tx in txs), (a, asked, txs)
        else:
            assert any(tx.kind is OP_KINDS[a.op] for tx in txs), (a, asked, txs)

    def check_effect(self, event: ev.Event, a: StoreKey | EraseKey | SendKey) -> None:
        """Never a key-store effect without a commit: each must agree with the chain."""
        m = a.prepared.meter_id if isinstance(a, StoreKey) else a.meter_id
        e = self.state.meter(m)
        where = f"{a} after {event!r}; the chain says {e}"
        assert e is not None, where
        if isinstance(a, StoreKey):
            p = a.prepared
            assert (e.status, e.home, e.key_version, e.fingerprint) == (
                MeterStatus.LIVE, SELF, p.version, fingerprint(p.key)), where
        elif isinstance(a, EraseKey):
            handed = (isinstance(event, ev.KeyAcknowledged) and e.home == event.peer
                      and (event.peer, m, event.key_version) in self.handovers)
            assert e.status is MeterStatus.REVOKED or handed, where
        else:  # handed over: as a committed block says, or again for one already under way
            assert (e.status, e.home, e.key_version) == (
                MeterStatus.LIVE, a.peer, a.key_version), where
            named = isinstance(event, ev.BlockCommitted) and any(
                c.meter_id == m for c in event.changes.meters)
            assert named or (a.peer, m, a.key_version) in self.handovers, where

    def check_commit_carried_out(self, event: ev.BlockCommitted, actions: list[Action]) -> None:
        """A committed change to a key held here gets its effect: no committed record lost."""
        for c in event.changes.meters:
            m, e = c.meter_id, c.entry
            held = self.keys.status(m) is StoreStatus.LIVE
            if e.status is MeterStatus.REVOKED and held:
                assert EraseKey(m) in actions, f"committed revoke of {m.hex()} left its key"
            elif e.home != SELF and held:
                assert SendKey(e.home, m, e.key_version) in actions, \
                    f"committed migration of {m.hex()} to {e.home} hands nothing over"
            elif e.status is MeterStatus.LIVE and e.home == SELF \
                    and e.key_version not in self.keys.versions(m):
                stored = [a for a in actions if isinstance(a, StoreKey)
                          and a.prepared.meter_id == m and a.prepared.version == e.key_version]
                assert stored or m in self.node.pending_keys, \
                    f"committed key of {m.hex()} neither stored nor marked pending"

    def check_keys(self, m: bytes) -> None:
        """After settling: the store holds exactly what the chain homes here."""
        e = self.state.meter(m)
        assert e is not None
        held = self.keys.status(m) is StoreStatus.LIVE
        if e.status is MeterStatus.LIVE and e.home == SELF:
            if m not in self.node.pending_keys:
                assert held and self.keys.versions(m)[-1] == e.key_version, (m.hex(), e)
                assert fingerprint(self.keys.get(m, e.key_version)) == e.fingerprint
        elif held:  # revoked, or homed elsewhere and its hand-over not acknowledged yet
            assert e.status is MeterStatus.LIVE, f"revoked {m.hex()} still held: {e}"
            assert (e.home, m, e.key_version) in self.handovers, (m.hex(), e)

    def check_reboot(self) -> None:
        """The node boots again over what is on flash: reconcile squares the store with the
        chain, and nothing stored is ahead of the chain or disagrees with its fingerprint."""
        node = Node(self.world.config, self.state, self.keys)
        actions = node.boot(self.later(1.0))
        handing = {a.meter_id for a in actions if isinstance(a, SendKey)}
        for a in actions:
            assert isinstance(a, EraseKey | SendKey | Log), a
            if isinstance(a, EraseKey):
                self.keys.destroy(a.meter_id)
        for m in {*self.state.meter_ids(), *self.keys.live_meters()}:
            e = self.state.meter(m)
            versions = self.keys.versions(m) if self.keys.status(m) is StoreStatus.LIVE else ()
            if e is None or e.status is MeterStatus.REVOKED:
                assert not versions, f"{m.hex()} held after boot; the chain says {e}"
            elif e.home != SELF:
                assert not versions or m in handing, (m.hex(), e, versions)
            elif versions and versions[-1] == e.key_version:
                assert fingerprint(self.keys.get(m, e.key_version)) == e.fingerprint, e
            else:
                assert not versions or versions[-1] < e.key_version, \
                    f"{m.hex()}: the store is ahead of the chain: {versions}, {e}"
                assert m in node.pending_keys, (m.hex(), e, versions)


# ------------------------------------------------------- garbage and genuine

ANY_INT = st.one_of(st.integers(-3, 40), st.sampled_from([U32, U32 + 1, U64, U64 + 1, -U64]),
                    st.integers())
ANY_BYTES = st.one_of(st.binary(max_size=64), st.binary(min_size=40, max_size=40),
                      st.binary(min_size=32, max_size=32))
HASH = st.binary(min_size=32, max_size=32)
KEYS = st.binary(min_size=32, max_size=32)
METER_IDS = st.one_of(st.sampled_from(KNOWN), st.binary(max_size=24),
                      st.binary(min_size=1, max_size=16))
KNOWN_IDS = st.sampled_from(KNOWN)
VALID_METER_IDS = st.one_of(st.sampled_from(KNOWN), st.binary(min_size=1, max_size=16))
TEXT = st.text(max_size=40)
OUTSIDER = TerminalIdentity.from_seed("ecd-77", hashlib.sha256(b"outsider").digest())


def peers(world: NodeWorld) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from([i.terminal_id for i in world.identities]),
                     st.sampled_from(["ecd-77", "", "ecd-00 "]), TEXT)


def signers(world: NodeWorld) -> st.SearchStrategy[TerminalIdentity]:
    return st.sampled_from([*world.identities, OUTSIDER])


def near(value: int, lo: int, hi: int) -> st.SearchStrategy[int]:
    """``value``, a number either side of it, or anywhere in lo..hi."""
    return st.one_of(st.just(min(hi, max(lo, value))),
                     st.integers(-2, 2).map(lambda d: min(hi, max(lo, value + d))),
                     st.integers(lo, hi))


def about(probe: Probe, others: st.SearchStrategy[bytes] = KNOWN_IDS
          ) -> st.SearchStrategy[bytes]:
    """A meter id: mostly the probe's focus."""
    return st.one_of(st.just(probe.focus), st.just(probe.focus), others)


@st.composite
def garbage_tx(draw: st.DrawFn, world: NodeWorld, probe: Probe) -> Transaction:
    """A signed transaction of valid pieces: any kind, meter, version, counter and proposer."""
    ident = draw(signers(world))
    kind = draw(st.sampled_from(list(TxKind)))
    if kind is TxKind.CHECKPOINT:  # of any height and digest, the parent's now and then
        tip = probe.state.tip
        height = draw(st.one_of(st.just(tip.height if tip else 0), st.integers(0, U64)))
        digest = draw(st.one_of(st.just(probe.state.digest()),
                                HASH.filter(lambda h: h != ZERO_HASH)))
        return make_tx(ident, kind, counter=height, fingerprint=digest)
    if not kind.is_meter:
        other = draw(signers(world))
        return make_tx(ident, kind, terminal=other.terminal_id,
                       public_key=draw(st.one_of(st.just(other.public_bytes()), HASH)))
    m = draw(about(probe, VALID_METER_IDS))
    e = probe.state.meter(m)
    version = draw(near(e.key_version if e else 1, 1, U32))
    counter = draw(near(e.counter if e else 0, 0, U64))
    fp = ZERO_HASH if kind is TxKind.REVOKE else draw(HASH.filter(lambda h: h != ZERO_HASH))
    proof = draw(HASH) if kind in (TxKind.ROTATE, TxKind.REVOKE) else ZERO_HASH
    home = draw(st.sampled_from([i.terminal_id for i in world.identities] + ["ecd-77"]))
    return make_tx(ident, kind, meter_id=m, key_version=version, fingerprint=fp, home=home,
                   proof=proof, counter=counter)


@st.composite
def garbage_block(draw: st.DrawFn, world: NodeWorld, probe: Probe) -> Block:
    """A block of valid pieces at any height, parent and time, endorsed by anyone."""
    tip = probe.state.tip
    assert tip is not None
    own = probe.proposal
    if own is not None and draw(st.booleans()):
        block = own
    else:
        proposer = draw(signers(world))
        height = draw(st.one_of(st.just(tip.height + 1),
                                st.sampled_from([0, tip.height, tip.height + 2]),
                                st.integers(0, U64)))
        prev = draw(st.one_of(st.just(tip.block_hash), HASH))
        stamp = draw(st.one_of(st.just(min(U64, tip.timestamp_ms + 1000)), st.integers(0, U64)))
        txs = draw(st.lists(garbage_tx(world, probe), max_size=3))
        block = build_block(proposer, height=height, prev_hash=prev, timestamp_ms=stamp, txs=txs)
        if draw(st.integers(0, 4)) == 0:  # a header that does not match its body
            block = Block(replace(block.header, merkle_root=draw(HASH),
                                  tx_count=draw(st.integers(0, 1024))), block.txs)
    endorsers = draw(st.lists(signers(world), max_size=4, unique_by=lambda i: i.terminal_id))
    forged = draw(st.lists(st.builds(Endorsement, st.sampled_from(
        [i.terminal_id for i in world.identities]), st.binary(min_size=64, max_size=64)),
        max_size=2))
    return with_endorsements(Block(block.header, block.txs),
                             [*(endorse(i, block.header) for i in endorsers), *forged])


@st.composite
def genuine_request(draw: st.DrawFn, world: NodeWorld, probe: Probe) -> ev.Event:
    """What a meter (or operator) could really send: proofs under the real keys, counters
    about the chain's, and the requests that already committed, sent again."""
    m = draw(about(probe))
    mk, e = world.meters[m], probe.state.meter(m)
    rid = draw(st.one_of(st.integers(1, 6), st.integers(0, U64)))
    counter = draw(near(e.counter if e else 0, 0, U64))
    kind = draw(st.sampled_from(["register", "rotate", "rotate", "revoke", "reading", "retry",
                                 "operator", "migrate", "query"]))
    key = probe.key_of(m)
    if kind == "retry" and m in world.committed:
        return replace(world.committed[m], request_id=rid)  # type: ignore[type-var]
    if kind == "rotate" and key is not None:
        new = draw(st.one_of(st.sampled_from(sorted(probe.known.values())), KEYS))
        if new == key:
            new = bytes([key[0] ^ 1]) + key[1:]
        probe.known[fingerprint(new)] = new
        return ev.RotateRequest(m, rid, counter, make_rotation_proof(key, new))
    if kind == "revoke" and key is not None:
        return ev.RevokeRequest(m, rid, counter, make_revocation_proof(key))
    if kind == "reading" and key is not None and e is not None:
        data = draw(st.binary(max_size=24))
        rc = draw(st.integers(0, 8))
        version = draw(near(e.key_version, 0, U32))
        sealed = seal_reading(key, draw(st.binary(min_size=12, max_size=12)), data,
                              meter_id=m, key_version=version, counter=rc)
        probe.readings[(m, rid, rc)] = data
        return ev.ReadingRequest(m, rid, rc, sealed)
    if kind == "operator":
        return ev.OperatorRevoke(m, rid)
    if kind == "migrate":
        return ev.MigrateRequest(m, rid, draw(peers(world)))
    if kind == "query":
        return ev.QueryRequest(m, rid)
    version = draw(near(e.key_version + 1 if e else 1, 0, U32 + 1))
    new = draw(KEYS)
    probe.known[fingerprint(new)] = new
    return ev.RegisterRequest(m, rid, counter, version, make_rotation_proof(mk.factory_key, new))


@st.composite
def garbage_request(draw: st.DrawFn, world: NodeWorld, probe: Probe) -> ev.Event:
    m, rid = draw(about(probe, METER_IDS)), draw(ANY_INT)
    return draw(st.one_of(
        st.builds(ev.RegisterRequest, st.just(m), st.just(rid), ANY_INT, ANY_INT, ANY_BYTES),
        st.builds(ev.RotateRequest, st.just(m), st.just(rid), ANY_INT, ANY_BYTES),
        st.builds(ev.RevokeRequest, st.just(m), st.just(rid), ANY_INT, ANY_BYTES),
        st.builds(ev.ReadingRequest, st.just(m), st.just(rid), ANY_INT, ANY_BYTES),
        st.builds(ev.OperatorRevoke, st.just(m), st.just(rid)),
        st.builds(ev.MigrateRequest, st.just(m), st.just(rid), peers(world)),
        st.builds(ev.QueryRequest, st.just(m), st.just(rid))))


@st.composite
def peer_message(draw: st.DrawFn, world: NodeWorld, probe: Probe) -> ev.Event:
    """Endorsement traffic and key hand-overs: about the node's own block, or about nothing."""
    own = probe.proposal
    peer = draw(peers(world))
    height, block_hash = draw(ANY_INT), draw(HASH)
    if own is not None and draw(st.booleans()):
        height, block_hash = own.header.height, header_hash(own.header)
    choice = draw(st.integers(0, 5))
    if choice == 0:
        sender = peer if draw(st.booleans()) else draw(signers(world)).terminal_id
        return ev.EndorseRequest(sender, draw(garbage_block(world, probe)))
    if choice == 1:
        signer = draw(signers(world))
        if own is not None and draw(st.booleans()):
            endorsement = endorse(signer, own.header)
            peer = signer.terminal_id if draw(st.booleans()) else peer
        else:
            endorsement = Endorsement(signer.terminal_id, draw(st.binary(min_size=64,
                                                                         max_size=64)))
        return ev.EndorsementReceived(peer, height, block_hash, endorsement)
    if choice == 2:
        return ev.EndorsementRefused(peer, height, block_hash, draw(st.sampled_from(Reason)))
    m = draw(about(probe, METER_IDS))
    e = probe.state.meter(m)
    version = draw(near(e.key_version, 0, U32)) if e else draw(ANY_INT)
    if choice == 3:  # a hand-over: the key in force, another known key, or any bytes
        real = probe.key_of(m)
        key = draw(st.one_of(st.sampled_from(sorted(probe.known.values())), ANY_BYTES))
        if real is not None and draw(st.booleans()):
            key = real
        return ev.KeyReceived(peer, m, version, key)
    if choice == 4 and probe.handovers and draw(st.booleans()):
        p, m, v = draw(st.sampled_from(sorted(probe.handovers)))
        return ev.KeyAcknowledged(p, m, v)
    return ev.KeyAcknowledged(peer, m, version)


@st.composite
def forged_tx(draw: st.DrawFn, world: NodeWorld, probe: Probe) -> Transaction | None:
    """A transaction valid on the chain now, from any terminal (ecd-00's own included: one
    a reboot made it forget): a register, rotation, migration or revoke."""
    m = draw(about(probe))
    e = probe.state.meter(m)
    ids = {i.terminal_id: i for i in world.identities}
    builder = TxBuilder(ids[e.home] if e is not None else draw(st.sampled_from(world.identities)))
    counter = (e.counter if e is not None else 0) + 1
    if counter > U64:
        return None
    key = draw(st.one_of(st.sampled_from(sorted(probe.known.values())), KEYS))
    probe.known[fingerprint(key)] = key
    if e is None or e.status is MeterStatus.REVOKED:
        version = e.key_version + 1 if e is not None else 1
        if version > U32:
            return None
        return builder.register(m, key_version=version, fingerprint=fingerprint(key),
                                counter=counter)
    what = draw(st.sampled_from(["rotate", "migrate", "revoke"]))
    if what == "rotate" and e.key_version < U32 and fingerprint(key) != e.fingerprint:
        return builder.rotate(m, key_version=e.key_version + 1, fingerprint=fingerprint(key),
                              proof=rotation_proof_digest(key), counter=counter)
    if what == "migrate":
        home = draw(st.sampled_from([i for i in ids if i != e.home]))
        return builder.migrate(m, new_home=home, key_version=e.key_version,
                               fingerprint=e.fingerprint, counter=counter)
    return builder.revoke(m, key_version=e.key_version, counter=counter,
                          proof=draw(st.sampled_from([ZERO_HASH, rotation_proof_digest(key)])))


@st.composite
def ordering_event(draw: st.DrawFn, world: NodeWorld, probe: Probe) -> ev.Event:
    """The ordering's news: the node's own block, another terminal's block, or a refusal."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        own = probe.proposal
        if own is not None and draw(st.booleans()):
            height, block_hash = own.header.height, header_hash(own.header)
        else:
            height, block_hash = draw(ANY_INT), draw(st.binary(max_size=40))
        return ev.BlockRefused(height, block_hash, draw(TEXT))
    if choice == 1 and (probe.submitted or probe.proposal) is not None:
        return probe.append(probe.submitted or probe.proposal)  # type: ignore[arg-type]
    txs = [tx for tx in draw(st.lists(forged_tx(world, probe), min_size=1, max_size=3))
           if tx is not None]
    txs = list({tx.meter_id: tx for tx in txs}.values())
    if probe.state.tip.timestamp_ms >= U64:  # type: ignore[union-attr]
        return ev.Tick()  # no block can follow one stamped at the end of time
    proposer = draw(st.sampled_from(world.identities))
    stamp = draw(st.one_of(st.just(T0 + int(probe.high * 1000)), st.sampled_from([0, U64])))
    block = propose_block(probe.state, proposer, txs, timestamp_ms=stamp)
    endorsers = world.identities[:2] if draw(st.integers(0, 5)) else world.identities[:1]
    return probe.append(with_endorsements(block, [endorse(i, block.header) for i in endorsers]))


@st.composite
def store_result(draw: st.DrawFn, probe: Probe) -> ev.Event:
    """A key-store action carried out (or failed) now, or a result of nothing asked for."""
    if probe.effects and draw(st.integers(0, 3)):
        a = draw(st.sampled_from(probe.effects))
        return probe.carry_out(a, fail=draw(st.integers(0, 4)) == 0)
    m = draw(about(probe, METER_IDS))
    return draw(st.one_of(st.builds(ev.KeyStored, st.just(m), ANY_INT),
                          st.builds(ev.KeyErased, st.just(m)),
                          st.builds(ev.EffectFailed, st.just(m), TEXT)))


def draw_event(data: st.DataObject, world: NodeWorld, probe: Probe) -> ev.Event:
    kind = data.draw(st.sampled_from(["genuine", "genuine", "garbage", "peer", "peer",
                                      "ordering", "result", "result", "tick"]), label="kind")
    if kind == "genuine":
        return data.draw(genuine_request(world, probe))
    if kind == "garbage":
        return data.draw(garbage_request(world, probe))
    if kind == "peer":
        return data.draw(peer_message(world, probe))
    if kind == "ordering":
        return data.draw(ordering_event(world, probe))
    if kind == "result":
        return data.draw(store_result(probe))
    return ev.Tick()


def draw_time(data: st.DataObject, probe: Probe) -> ev.Time:
    """Time moves on by any amount, stands still or runs backwards."""
    probe.mono += data.draw(st.one_of(
        st.sampled_from([0.0, 0.5, 2.5, 6.0, 31.0]),
        st.floats(-40, 40, allow_nan=False), st.sampled_from([1e6, -1e6])), label="dt")
    wall = data.draw(st.one_of(st.none(), st.integers(0, U64)), label="wall")
    if wall is None:
        wall = min(U64, max(0, T0 + int(probe.mono * 1000)))
    return ev.Time(probe.mono, wall)


@pytest.mark.parametrize("focus", KNOWN, ids=["home", "home2", "remote", "revoked",
                                               "max_counter", "max_version", "migrated", "new"])
@DIRECT
@given(data=st.data())
def test_any_events_fed_to_a_node_are_answered_or_refused_and_nothing_uncommitted_is_kept(
        focus, data):
    """handle() never raises; every action is an Action; every request is answered exactly
    once; acknowledgements and key-store effects follow commits, every committed effect is
    asked for; handle() writes neither the chain nor the key store."""
    world = node_world()
    probe = Probe(world, focus)
    for _ in range(data.draw(st.integers(1, DIRECT_EVENTS), label="events")):
        event = draw_event(data, world, probe)
        probe.feed(event, draw_time(data, probe))
    probe.settle()
    TOTALS["direct examples"] += 1
    TOTALS["direct events"] += probe.events
    TOTALS["direct blocks"] += (probe.chain.height or 0) - world.fleet.net.ordering.head_height


def test_what_is_not_an_event_is_the_callers_error():
    node = Probe(node_world()).node
    for thing in (None, b"\x68\x00", "tick", ev.Time(0.0, T0), Acknowledge(HOME, 1, Op.QUERY, 1)):
        with pytest.raises(LocalProtocolError):
            node.handle(thing, ev.Time(0.0, T0))  # type: ignore[arg-type]


# ============================================================ hostile network

HOSTILE_METERS = [meter(n) for n in range(9, 13)]
FATES = ("deliver",) * 5 + ("drop", "duplicate", "hold", "hold")
BLOCK_FATES = ("deliver",) * 8 + ("drop", "duplicate", "hold", "hold")  # a lost block: behind
PEER_MESSAGES = (ev.EndorseRequest, ev.EndorsementReceived, ev.EndorsementRefused,
                 ev.TxsForwarded, ev.ForwardRefused,
                 ev.KeyReceived, ev.KeyAcknowledged, ev.BlockRefused, Block)


@dataclass(frozen=True)
class Again:
    """A message delivered once more (a duplicate, or one held back): its fate is settled."""

    item: ev.Event | Block


class HostileNet(LocalNet):
    """LocalNet whose peer messages each meet a fate ``choose`` picks from FATES.

    Meter and operator requests and timer ticks always arrive (their links
    are not this test's subject); everything between terminals, and from
    the ordering, may be dropped, duplicated, or held back and released
    later behind newer messages.
    """

    def __init__(self, terminals: Iterable[Terminal], choose: Callable[[Sequence[str]], str]):
        self.choose = choose
        self.hostile = False
        self.held: list[tuple[str, ev.Event | Block]] = []
        self.fates: Counter[str] = Counter()
        super().__init__(terminals)

    def run_some(self, n: int) -> bool:
        for _ in range(n):
            if not self._queue:
                return True
            to, item = self._queue.popleft()
            if isinstance(item, Again):
                item = item.item
            elif self.hostile and isinstance(item, PEER_MESSAGES):
                fate = self.choose(BLOCK_FATES if isinstance(item, Block) else FATES)
                self.fates[fate] += 1
                if fate == "drop":
                    self.dropped += 1
                    continue
                if fate == "hold":
                    self.held.append((to, item))
                    continue
                if fate == "duplicate":
                    self._queue.append((to, Again(item)))  # type: ignore[arg-type]
            self._deliver(to, item)
        return not self._queue

    def _deliver(self, to: str, item: ev.Event | Block) -> None:
        """LocalNet's delivery of one message."""
        if to in self.offline:
            self.dropped += 1
            return
        self.delivered += 1
        t = self.terminals[to]
        self._route(to, t.deliver(item) if isinstance(item, Block) else t.feed(item))

    def release(self, newest_first: bool) -> None:
        """The held messages go out now, behind whatever is queued."""
        held, self.held = self.held, []
        for to, item in reversed(held) if newest_first else held:
            self._queue.append((to, Again(item)))  # type: ignore[arg-type]


@dataclass
class Asked:
    terminal: str
    event: ev.Event
    replies: list[Acknowledge | Refuse | AnswerQuery] = field(default_factory=list)


@dataclass
class Meter:
    """A meter as it behaves: one request at a time, the same one again after a timeout."""

    keys: MeterKeys
    home: str
    waiting: Asked | None = None
    retry: ev.Event | None = None

    def next_request(self, wish: str) -> ev.Event:
        k = self.keys
        if self.retry is not None:  # the same request again, under a new request id
            k.requests += 1
            event, self.retry = replace(self.retry, request_id=k.requests), None  # type: ignore[type-var]
            return event
        if k.key is None:
            return k.register()
        if wish == "revoke":
            return k.revoke()
        if wish == "reading":
            return k.reading(b"kWh %d" % k.reading_counter)
        return k.rotate()

    def heard(self, event: ev.Event, reply: Acknowledge | Refuse) -> None:
        self.waiting = None
        self.keys.heard(event, reply)
        if isinstance(reply, Refuse):
            if reply.reason is Nak.NOT_HOME and reply.home:
                self.home, self.retry = reply.home, event
            elif reply.reason in (Nak.TIMEOUT, Nak.BUSY, Nak.OVERLOADED, Nak.KEY_PENDING,
                                  Nak.STORE_FAILED):
                self.retry = event
            elif reply.reason is Nak.REVOKED:
                self.keys.revoked()


class HostileRun:
    """A fleet on a hostile network, its meters, and every request and answer."""

    def __init__(self, n: int, choose: Callable[[Sequence[str]], str], homes: Sequence[int]):
        self.fleet = RamFleet(n, lambda ts: HostileNet(ts, choose))
        self.fleet.found()
        self.ids = [i.terminal_id for i in self.fleet.fleet.identities]
        fk = self.fleet.fleet.factory_keys
        self.meters = {m: Meter(MeterKeys(m, fk[m], random.Random(m).randbytes),
                                self.ids[h % n]) for m, h in zip(HOSTILE_METERS, homes,
                                                                  strict=False)}
        self.asked: dict[tuple[str, bytes, int, Op], Asked] = {}
        self.seen = {t: 0 for t in self.ids}
        self.operator_ids = 10**6
        self.counters: Counter[str] = Counter()
        self.fleet.net.hostile = True  # type: ignore[attr-defined]

    @property
    def net(self) -> HostileNet:
        return self.fleet.net  # type: ignore[return-value]

    def ask(self, terminal: str, event: ev.Event) -> Asked:
        key = (terminal, *request_key(event))
        asked = self.asked.setdefault(key, Asked(terminal, event))
        self.net.post(terminal, event)
        self.net.run()
        self.collect()
        return asked

    def collect(self) -> None:
        for tid in self.ids:
            new = self.net.replies[tid][self.seen[tid]:]
            self.seen[tid] += len(new)
            for r in new:
                if isinstance(r, AcceptReading):
                    continue
                asked = self.asked.get((tid, *reply_key(r)))
                assert asked is not None, f"{tid} answered what nobody asked: {r}"
                asked.replies.append(r)
                m = self.meters.get(r.meter_id)
                if (m is not None and isinstance(r, Acknowledge | Refuse)
                        and m.waiting is asked):
                    m.heard(asked.event, r)

    def home_now(self, m: bytes) -> str:
        """Where the most advanced chain homes the meter (the meter's belief if nowhere)."""
        best = max(self.net.terminals.values(), key=lambda t: t.chain.height or 0)
        e = best.chain.entry(m)
        return e.home if e is not None else self.meters[m].home

    # ------------------------------------------------------------ steps

    def meter_step(self, m: bytes, wish: str) -> None:
        meter = self.meters[m]
        if meter.waiting is not None:  # no answer yet: the meter sends the same frame again
            self.ask(meter.waiting.terminal, meter.waiting.event)
            TOTALS["network resends"] += 1
            return
        event = meter.next_request(wish)
        meter.waiting = Asked(meter.home, event)
        self.asked[(meter.home, *request_key(event))] = meter.waiting
        self.ask(meter.home, event)

    def operator_step(self, m: bytes, what: str, to: int) -> None:
        self.operator_ids += 1
        rid = self.operator_ids
        event: ev.Event
        if what == "migrate":
            event = ev.MigrateRequest(m, rid, self.ids[to % len(self.ids)])
        elif what == "revoke":
            event = ev.OperatorRevoke(m, rid)
        else:
            event = ev.QueryRequest(m, rid)
        self.ask(self.home_now(m), event)

    def elect(self, index: int) -> None:
        """The ordering names a proposer (-1: none); the election itself is not lost."""
        proposer = None if index < 0 else self.ids[index % len(self.ids)]
        self.net.elect(proposer)
        self.net.run()
        self.collect()
        TOTALS["network elections"] += 1

    def wait(self, seconds: float) -> None:
        self.fleet.clock.advance(seconds)
        self.net.tick_all()
        self.collect()

    def settle(self) -> None:
        """No more losses: what was held goes out, then every timeout passes."""
        net = self.net
        net.hostile = False
        net.release(newest_first=False)
        net.run()
        for _ in range(10):
            self.wait(self.fleet.fleet.config(self.ids[0]).op_timeout_s + 1)
            if all(t.node.inflight == 0 for t in net.terminals.values()) and not net.held:
                break
        assert all(t.node.inflight == 0 for t in net.terminals.values())
        self.collect()

    def meters_retry(self) -> None:
        """Each meter told to try again (timeout, busy, not home) does, once, on a quiet
        network: a request that committed unseen is answered from the chain."""
        for m, meter in self.meters.items():
            if meter.retry is not None:
                self.meter_step(m, "rotate")
                TOTALS["network retries"] += 1
        self.settle()

    def reboot_all(self) -> None:
        """Every terminal powers off and on: what it knows is read back from its flash."""
        self.count()
        digests = {tid: t.chain.state_digest() for tid, t in self.net.terminals.items()}
        for tid in self.ids:
            self.net.replace(self.fleet.boot(tid))
        for tid, t in self.net.terminals.items():
            assert t.chain.state_digest() == digests[tid], f"{tid} lost a committed block"
        self.net.run()
        self.settle()

    def count(self) -> None:
        for t in self.net.terminals.values():
            for name in ("late_commit", "rounds.lost", "rounds.failed", "committed_retry",
                         "forwarded", "rounds.foreign_txs", "rounds.yielded",
                         "handover.refused", "duplicate_request", "endorse.refused"):
                self.counters[name] += t.node.counters.get(name, 0)

    # ------------------------------------------------------------ checks

    def reference(self) -> LedgerState:
        """The chain the ordering accepted, applied from the genesis on a fresh state."""
        state = LedgerState()
        for block in self.net.ordering.blocks:
            verdict = validate_block(state, block, genesis_hash=self.fleet.fleet.genesis_hash)
            assert verdict.block_ok, (block.header.height, verdict)
            apply_block(state, block, verdict)
        return state

    def current(self, ref: LedgerState) -> list[AuditedTerminal]:
        """The terminals that hold every block the ordering accepted."""
        return [t for t in self.net.terminals.values()  # type: ignore[misc]
                if t.chain.state.tip == ref.tip]

    def check(self, *, after_reboot: bool) -> None:
        assert self.fleet.faults == [], self.fleet.faults
        blocks = self.net.ordering.blocks
        ref = self.reference()
        current = self.current(ref)
        for t in current:
            assert t.chain.state_digest() == ref.digest(), t.id
            for block in blocks:
                assert t.chain.head(block.header.height).header == block.header, t.id
        for asked in self.asked.values():
            assert len(asked.replies) == 1, (asked.terminal, asked.event, asked.replies)
            reply = asked.replies[0]
            if isinstance(reply, Acknowledge) and reply.op in OP_KINDS:
                self.check_ack(reply, asked.event)
        ids = set(ref.meter_ids())
        for t in current:
            for m in t.store.live_meters():
                assert m in ids, f"{t.id} holds {m.hex()}, which no block names"
        for m in ids:
            self.check_keys(ref, m, current, after_reboot=after_reboot)
        TOTALS["network blocks"] += len(blocks) - 1
        TOTALS["network terminals behind"] += len(self.ids) - len(current)

    def check_ack(self, reply: Acknowledge, event: ev.Event) -> None:
        """No acknowledgement for an operation whose block did not commit."""
        blocks = self.net.ordering.blocks
        assert reply.height is not None and 0 < reply.height < len(blocks), reply
        txs = [tx for tx in blocks[reply.height].txs
               if tx.meter_id == reply.meter_id and tx.key_version == reply.key_version]
        if isinstance(event, ev.MigrateRequest):  # moved there, or already there
            assert any(tx.home == event.new_home and tx.kind is not TxKind.REVOKE
                       for tx in txs), (reply, event, txs)
        else:
            assert any(tx.kind is OP_KINDS[reply.op] for tx in txs), (reply, event, txs)

    def check_keys(self, ref: LedgerState, m: bytes, current: list[AuditedTerminal], *,
                   after_reboot: bool) -> None:
        """The home holds exactly the chain's key; nobody else holds one (hand-overs aside)."""
        e = ref.meter(m)
        assert e is not None
        for t in current:
            store = t.store
            held = store.status(m) is StoreStatus.LIVE
            if e.status is MeterStatus.LIVE and e.home == t.id:
                if m in t.node.pending_keys:
                    others = [o.id for o in current if o is not t
                              and e.key_version in o.store.versions(m)]
                    assert not (after_reboot and others), \
                        f"{m.hex()} pending at {t.id} after a reboot; {others} hold it"
                    TOTALS["network keys pending at home"] += 1
                    continue
                assert held and store.versions(m)[-1] == e.key_version, \
                    (t.id, m.hex(), store.versions(m), e)
                assert fingerprint(store.get(m, e.key_version)) == e.fingerprint, (t.id, e)
            elif held:
                assert e.status is MeterStatus.LIVE, f"{t.id} holds revoked {m.hex()}: {e}"
                # homed elsewhere: only while its hand-over is unacknowledged, because a
                # message was lost or (after the reboot re-sent it) the new home lacks the
                # block that homes it there: this net has no catch-up of missed blocks
                assert t.node._handovers.get(m) == (e.home, e.key_version), (t.id, e)
                assert not after_reboot or e.home not in {c.id for c in current}, \
                    f"{t.id} holds {m.hex()} homed on {e.home} after reboot"
                TOTALS["network hand-overs outstanding"] += 1


HOSTILE_STEP = st.one_of(
    st.tuples(st.just("meter"), st.sampled_from(HOSTILE_METERS),
              st.sampled_from(["rotate", "rotate", "revoke", "reading"])),
    st.tuples(st.just("operator"), st.sampled_from(HOSTILE_METERS),
              st.sampled_from(["migrate", "migrate", "revoke", "query"]), st.integers(0, 4)),
    st.tuples(st.just("wait"), st.sampled_from([0.5, 1.5, 2.5, 5.5, 31.0])),
    st.tuples(st.just("release"), st.booleans()),
    st.tuples(st.just("elect"), st.integers(-1, 4)),
)


@NETWORK
@given(st.data())
def test_a_fleet_on_a_hostile_network_agrees_and_keeps_exactly_the_committed_keys(data):
    """Dropped, duplicated and reordered peer messages, any clock: after the network settles
    and every terminal reboots, the terminals holding every block have one state, every
    committed block, exactly the keys the chain homes on them; one answer per request."""
    n = data.draw(st.sampled_from([3, 5]), label="terminals")
    homes = data.draw(st.lists(st.integers(0, n - 1), min_size=len(HOSTILE_METERS),
                               max_size=len(HOSTILE_METERS)), label="homes")
    run = HostileRun(n, lambda options: data.draw(st.sampled_from(options)), homes)
    # One elected proposer that the others forward to (the etcd ordering's way), or none
    # (each terminal proposes its own): both, and a change of proposer at any step.
    first = data.draw(st.integers(-1, n - 1), label="proposer")
    run.elect(first)
    for _ in range(data.draw(st.integers(1, NETWORK_STEPS), label="steps")):
        step = data.draw(HOSTILE_STEP, label="step")
        if step[0] == "meter":
            run.meter_step(step[1], step[2])
        elif step[0] == "operator":
            run.operator_step(step[1], step[2], step[3])
        elif step[0] == "wait":
            run.wait(step[1])
        elif step[0] == "elect":
            run.elect(step[1])
        else:
            run.net.release(step[1])
            run.net.run()
            run.collect()
    run.settle()
    run.check(after_reboot=False)
    run.meters_retry()
    run.check(after_reboot=False)
    run.reboot_all()
    run.check(after_reboot=True)
    run.count()
    TOTALS["network examples"] += 1
    TOTALS["network requests"] += len(run.asked)
    TOTALS["network messages"] += run.net.delivered
    for fate, count in run.net.fates.items():
        TOTALS[f"network {fate}"] += count
    for name, count in run.counters.items():
        TOTALS[f"network node {name}"] += count


# ============================================ the defects found, minimal

# Each of these failed against the node core as first written (the properties
# above found them; 2d771be closed them): kept as the minimal examples.

def committed(probe: Probe, proposer: TerminalIdentity, *txs: Transaction,
              stamp: int | None = None) -> ev.Event:
    """Another terminal's block of ``txs``, endorsed by a majority and appended."""
    tip = probe.state.tip
    assert tip is not None
    block = propose_block(probe.state, proposer, txs,
                          timestamp_ms=tip.timestamp_ms + 1000 if stamp is None else stamp)
    ids = probe.world.identities
    event = probe.append(with_endorsements(block, [endorse(i, block.header) for i in ids[:2]]))
    assert isinstance(event, ev.BlockCommitted), event
    return event


def at(mono: float) -> ev.Time:
    return ev.Time(mono, T0 + int(mono * 1000))


@pytest.mark.parametrize("event", [ev.OperatorRevoke(MAX_COUNTER, 1),
                                     ev.MigrateRequest(MAX_COUNTER, 1, "ecd-01")],
                         ids=["operator-revoke", "migrate"])
def test_an_operation_on_a_meter_at_the_last_counter_is_refused_not_raised(event):
    """The chain's counter is 2^64-1: the next operation has no counter left."""
    probe = Probe(node_world(), MAX_COUNTER)
    replies = [a for a in probe.feed(event, at(0.0)) if isinstance(a, Acknowledge | Refuse)]
    assert [type(r) for r in replies] == [Refuse], replies


def test_a_rotation_past_the_last_key_version_is_refused_not_raised():
    """The meter's key is version 2^32-1 and it sends a good rotation proof."""
    probe = Probe(node_world(), MAX_VERSION)
    e = probe.state.meter(MAX_VERSION)
    key = probe.key_of(MAX_VERSION)
    assert e is not None and key is not None
    rotate = ev.RotateRequest(MAX_VERSION, 1, e.counter + 1,
                              make_rotation_proof(key, bytes(range(32))))
    replies = [a for a in probe.feed(rotate, at(0.0)) if isinstance(a, Acknowledge | Refuse)]
    assert [type(r) for r in replies] == [Refuse], replies


@pytest.mark.parametrize("key", [b"", b"\x01" * 16, b"\x02" * 33])
def test_a_handed_over_key_of_the_wrong_length_is_refused_not_raised(key):
    """KeyReceived for a meter homed here, at the chain's version, with no 32-byte key."""
    probe = Probe(node_world(), HOME)
    e = probe.state.meter(HOME)
    assert e is not None
    actions = probe.feed(ev.KeyReceived("ecd-01", HOME, e.key_version, key), at(0.0))
    assert not [a for a in actions if isinstance(a, StoreKey | AcknowledgeKey)], actions


def test_a_revoke_committed_without_its_operation_here_still_erases_the_key():
    """ecd-00's own revoke of HOME commits in a block it no longer tracks (a reboot or a
    timeout forgot the operation): the revoked meter's key must still go."""
    probe = Probe(node_world(), HOME)
    e = probe.state.meter(HOME)
    assert e is not None
    revoke = TxBuilder(probe.world.identities[0]).revoke(
        HOME, key_version=e.key_version, counter=e.counter + 1)
    actions = probe.feed(committed(probe, probe.world.identities[1], revoke), at(0.0))
    assert EraseKey(HOME) in actions, actions


def test_a_revoke_of_a_meter_whose_hand_over_is_unacknowledged_erases_the_copy():
    """HOME2 migrated to ecd-01, whose acknowledgement was lost, so ecd-00 still holds its
    copy; then ecd-01 revokes it. ecd-00 must erase the copy, not hand a revoked key over."""
    probe = Probe(node_world(), HOME2)
    ids = probe.world.identities
    e = probe.state.meter(HOME2)
    assert e is not None
    migrate = TxBuilder(ids[0]).migrate(HOME2, new_home="ecd-01", key_version=e.key_version,
                                        fingerprint=e.fingerprint, counter=e.counter + 1)
    handed = probe.feed(committed(probe, ids[0], migrate), at(0.0))
    assert SendKey("ecd-01", HOME2, e.key_version) in handed
    revoke = TxBuilder(ids[1]).revoke(HOME2, key_version=e.key_version, counter=e.counter + 2)
    actions = probe.feed(committed(probe, ids[1], revoke), at(1.0))
    assert not [a for a in actions if isinstance(a, SendKey)], actions
    assert EraseKey(HOME2) in actions, actions


def test_a_rotation_that_commits_after_its_operation_timed_out_still_stores_its_key():
    """Round 1 is endorsed and submitted; its block is slow to come back, so the order
    timeout starts round 2, which the peers refuse (they have the block), and so does round
    3: the meter is told TIMEOUT. Then round 1's block arrives: the key it names was
    prepared here, and the ``_late`` table exists to store it (core.py, MAX_LATE)."""
    probe = Probe(node_world(), HOME)
    ids = probe.world.identities
    e = probe.state.meter(HOME)
    key = probe.key_of(HOME)
    assert e is not None and key is not None
    new = bytes(range(32))
    probe.feed(ev.RotateRequest(HOME, 50, e.counter + 1, make_rotation_proof(key, new)), at(0))
    first = probe.proposal
    assert first is not None
    h = first.header
    probe.feed(ev.EndorsementReceived("ecd-01", h.height, header_hash(h), endorse(ids[1], h)),
               at(0.1))
    submitted = probe.submitted
    assert submitted is not None
    probe.feed(ev.Tick(), at(6.0))  # the order timeout: round 2
    refusals: list[Action] = []
    for n in range(2):  # rounds 2 and 3, refused by both peers
        h = probe.proposal.header  # type: ignore[union-attr]
        for peer in ("ecd-01", "ecd-02"):
            refusals += probe.feed(ev.EndorsementRefused(peer, h.height, header_hash(h),
                                                         Reason.WRONG_HEIGHT), at(6.1 + n))
    assert [(type(a), a.reason) for a in refusals if isinstance(a, Refuse)] == [
        (Refuse, Nak.TIMEOUT)]
    actions = probe.feed(probe.append(submitted), at(9.0))
    assert [a for a in actions if isinstance(a, StoreKey)
            and a.prepared.version == e.key_version + 1 and a.prepared.key == new], actions


def test_a_block_stamped_at_the_end_of_time_does_not_break_the_next_proposal():
    """A block stamped 2^64-1 ms (a clock gone wrong) commits: endorsers now refuse such a
    stamp, but the commit rules bound it only by its parent's. The next request here needs a
    block stamped after it: the node must answer it, not raise."""
    probe = Probe(node_world(), HOME)
    ids = probe.world.identities
    register = TxBuilder(ids[1]).register(NEW, key_version=1, fingerprint=fingerprint(bytes(32)),
                                          counter=1)
    probe.feed(committed(probe, ids[1], register, stamp=U64), at(0.0))
    e = probe.state.meter(HOME)
    key = probe.key_of(HOME)
    assert e is not None and key is not None
    probe.feed(ev.RotateRequest(HOME, 51, e.counter + 1, make_rotation_proof(key, bytes(32))),
               at(1.0))
    probe.settle()


@pytest.fixture(scope="module", autouse=True)
def report_totals():
    yield
    print("\nnode properties: " + ", ".join(f"{k} {v}" for k, v in sorted(TOTALS.items())))
