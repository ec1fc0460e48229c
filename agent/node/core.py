"""The node core: one terminal's data path as events in, actions out (h11-shaped).

    meter request -> check (key store prepares, writes nothing) -> signed tx
      -> block proposed, endorsed by more than half of the terminals
      -> submitted for ordering -> ordered block validated and appended
         (by the runtime, ``Chain.append``) -> BlockCommitted
      -> key-store effect from the committed block (StoreKey / EraseKey /
         SendKey) -> its result -> the meter's acknowledgement

No sockets, files, clocks or threads: the runtime moves bytes and feeds
``handle(event, at)``. The core reads two ports and writes neither: the
ledger state in RAM (the chain's ``LedgerState``, changed only by
``Chain.append``) and the key store's read-and-check calls
(``prepare_key``, ``prepare_rotation``, ``get``), which write nothing.
Every write is an action.

Bounded: at most ``max_inflight`` operations, one block in flight, every
operation answered by its deadline (endorsement rounds time out and are
retried ``max_rounds`` times), conflict and reading-counter tables capped.

One proposer at a time (``ProposerChanged``, elected through the ordering):
a terminal that is not the proposer forwards its checked transactions to it
(``ForwardTxs``) and the proposer puts every terminal's transactions into its
blocks, so terminals do not race for the head and no endorsement round is
lost to a race. Until a proposer is named (or in a fleet of one) every
terminal proposes its own blocks. A forwarded transaction is tracked by its
origin like its own round: committed (its block arrives), refused by the
proposer (``ForwardRefused``, final only once the origin's chain has reached
the height the proposer judged it at), or timed out and forwarded again.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.keystore.material import (
    KEY_BYTES,
    BadProofError,
    ProofFault,
    fingerprint,
    is_revocation_proof,
    open_rotation_proof,
)
from agent.keystore.store import (
    KeyStoreError,
    PreparedKey,
    VersionError,
)
from agent.keystore.store import (
    MeterStatus as StoreStatus,
)
from agent.ledger.block import Block, endorse, header_hash, verify_endorsement, with_endorsements
from agent.ledger.codec import ZERO_HASH
from agent.ledger.identity import TerminalIdentity
from agent.ledger.metertable import MeterSet
from agent.ledger.rules import (
    MemberAuthority,
    PlacementOracle,
    Reason,
    check_proposal,
    propose_block,
)
from agent.ledger.state import LedgerState, MeterEntry, MeterStatus
from agent.ledger.tx import (
    U32_MAX,
    U64_MAX,
    Transaction,
    TxBuilder,
    TxKind,
    rotation_proof_digest,
    tx_id,
)
from agent.node import events as ev
from agent.node.actions import (
    AcceptReading,
    Acknowledge,
    AcknowledgeKey,
    Action,
    AnswerQuery,
    EraseKey,
    ForwardTxs,
    Log,
    Nak,
    Op,
    Refuse,
    RefuseForwarded,
    RequestEndorsements,
    SendEndorsement,
    SendKey,
    StoreKey,
    SubmitBlock,
)
from agent.node.endorser import Evidence, SignedGuard, answer_proposal
from agent.node.errors import LocalProtocolError
from agent.node.operation import Operation
from agent.node.opstate import OpState
from agent.node.reading import BadReading, open_reading
from hal.ids import check_meter_id

# Operations in flight at once: a terminal homes a few hundred meters (the
# paper's 25 per cluster, up to about 1000 on a PL terminal), so a burst of
# every meter re-keying at once still fits.
DEFAULT_MAX_INFLIGHT = 4096
# Keys of operations whose round timed out after submission: the block may
# still commit later, and its key-store effect must still happen.
MAX_LATE = 1024
# Meters whose reading counter is tracked (those homed here).
MAX_READING_COUNTERS = 1 << 20
# Other terminals' transactions waiting for the proposer's next round: four
# full blocks; beyond that a forward is refused OVERLOADED and its origin retries.
MAX_FOREIGN = 4096
# The operation table's key of a membership request (meter ids are never this long).
MEMBER_KEY = b"\x00member/"
# A proposal this many blocks beyond the next height is held (not refused) until the
# blocks before it arrive; at most one per proposer, MAX_HELD in all.
HOLD_AHEAD = 2
MAX_HELD = 64
# Transactions per ForwardTxs: one full block.
MAX_TXS_PER_MESSAGE = 1024
# Equivocation evidence kept for the console and the station (newest kept).
MAX_EVIDENCE = 64


class KeyPort(Protocol):
    """The key store's read-and-check side, as the core uses it (KeyStore satisfies it)."""

    def status(self, meter_id: bytes) -> StoreStatus: ...
    def versions(self, meter_id: bytes) -> tuple[int, ...]: ...
    def get(self, meter_id: bytes, version: int | None = None) -> bytes: ...
    def prepare_key(self, meter_id: bytes, version: int, key: bytes) -> PreparedKey: ...
    def prepare_rotation(self, meter_id: bytes, proof: bytes) -> PreparedKey: ...
    def live_meters(self) -> list[bytes]: ...


FactoryKeys = Callable[[bytes], "bytes | None"]  # meter id -> factory key (provisioning)
# A meter joining (a REGISTER of a meter not live on the chain): None admits it here, else
# (Nak.NOT_HOME, detail, the home placement names) or (Nak.BUSY, detail, None) refuses it.
JoinCheck = Callable[[bytes], "tuple[Nak, str, str | None] | None"]


@dataclass(frozen=True)
class NodeConfig:
    """A terminal's node settings: its identity, the board's [ledger] section, its limits."""

    identity: TerminalIdentity
    txs_per_block: int = 1000  # board [ledger] txs_per_block
    pow_difficulty: int = 0  # board [ledger] pow_difficulty
    genesis_hash: bytes | None = None  # the fleet's block 0, from provisioning
    placement_home: PlacementOracle | None = None
    factory_key: FactoryKeys | None = None
    # The highest reading counter already used, for a meter whose counter this
    # node has not seen since boot (agent/journal.py's persisted ceiling): a
    # reading at or below it is a replay. None: -1, nothing used.
    reading_floor: Callable[[bytes], int] | None = None
    round_timeout_s: float = 2.0  # endorsements of one round
    order_timeout_s: float = 5.0  # an endorsed block back from the ordering
    op_timeout_s: float = 30.0  # any operation, from request to answer
    handover_resend_s: float = 5.0  # a handed-over key not yet acknowledged goes again
    max_rounds: int = 3
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    # A proposer puts a CHECKPOINT (the parent state's digest) in every block at a height
    # that is a multiple of this (board [ledger] checkpoint_every); 0: never.
    checkpoint_every: int = 0
    # Whether the utility ordered a membership change (TERMINAL_ADD of a terminal its signed
    # provisioning lists with that key; TERMINAL_RETIRE of one it withdrew). None: any.
    authorise_member: MemberAuthority | None = None
    # Medoid reassignment (agent/rehoming.py): whether a joining meter is homed here now.
    admit_join: JoinCheck | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.txs_per_block <= 1024:
            raise LocalProtocolError("txs_per_block must be 1..1024")
        for name in ("round_timeout_s", "order_timeout_s", "op_timeout_s", "handover_resend_s"):
            if not getattr(self, name) > 0:
                raise LocalProtocolError(f"{name} must be positive")
        if self.max_rounds < 1 or self.max_inflight < 1:
            raise LocalProtocolError("max_rounds and max_inflight must be at least 1")
        if self.checkpoint_every < 0:
            raise LocalProtocolError("checkpoint_every must be 0 (never) or positive")


@dataclass(slots=True, eq=False)
class _Foreign:
    """Another terminal's transaction waiting for (or in) this proposer's round."""

    peer: str
    tx: Transaction
    deadline: float  # its origin has timed it out by then
    rounds: int = 0  # rounds of this proposer it failed in


@dataclass(slots=True, eq=False)
class _Round:
    """The one block this terminal has proposed and not yet seen committed."""

    block: Block
    block_hash: bytes
    ops: list[Operation]
    foreign: list[_Foreign]
    endorsements: dict[str, object]
    refused: set[str]
    deadline: float
    submitted: bool = False


class Node:
    """One terminal's node core (module docstring). ``ledger`` is read, never written."""

    def __init__(self, config: NodeConfig, ledger: LedgerState, keys: KeyPort):
        self.config = config
        self.identity = config.identity
        self.self_id = config.identity.terminal_id
        self.ledger = ledger
        self.keys = keys
        self.builder = TxBuilder(config.identity)
        self._ops: dict[bytes, Operation] = {}  # meter id -> its operation in flight
        self._by_tx: dict[bytes, Operation] = {}  # tx id -> operation (checked and later)
        self._queue: list[Operation] = []  # checked, waiting for a round
        self._round: _Round | None = None
        self._late: OrderedDict[bytes, Operation] = OrderedDict()
        self._guard = SignedGuard()
        self._handovers: dict[bytes, tuple[str, int]] = {}  # meter -> (new home, version)
        self._handover_due: dict[bytes, float] = {}  # meter -> when to send its key again
        self._receiving: dict[bytes, str] = {}  # meter -> old home whose key we stored
        self._reading_counters: OrderedDict[bytes, int] = OrderedDict()
        self.proposer: str | None = None  # None: every terminal proposes its own blocks
        self._forwarded: dict[bytes, Operation] = {}  # tx id -> own op sent to the proposer
        self._foreign: OrderedDict[bytes, _Foreign] = OrderedDict()
        self._deferred: dict[bytes, tuple[int, Reason]] = {}  # tx id -> proposer's refusal
        self.evidence: deque[Evidence] = deque(maxlen=MAX_EVIDENCE)
        # peer -> a proposal one or two blocks ahead of this chain, and until when it is kept
        self._held_proposals: dict[str, tuple[ev.EndorseRequest, float]] = {}
        # Chain names a key this store lacks: as many as the meters homed here, so 17 bytes each.
        self.pending_keys = MeterSet()
        self.counters: dict[str, int] = {}

    # ================================================================ entry

    def handle(self, event: ev.Event, at: ev.Time) -> list[Action]:
        """Take one event; return what the runtime must do, in order."""
        return self.handle_many((event,), at)

    def handle_many(self, events: Sequence[ev.Event], at: ev.Time) -> list[Action]:
        """Take events that arrived together (one read of a link) and then start one round,
        so requests that came at once share a block instead of taking one each."""
        out: list[Action] = []
        for event in events:
            handler = _HANDLERS.get(type(event))
            if handler is None:
                raise LocalProtocolError(f"not a node event: {type(event).__name__}")
            self._count(f"event.{type(event).__name__}")
            handler(self, event, at, out)
        self._expire(at, out)
        self._start_round(at, out)
        return out

    def boot(self, at: ev.Time) -> list[Action]:
        """Reconcile the key store with the chain after a (re)boot; see reconcile.py."""
        from agent.node.reconcile import reconcile  # reconcile uses this module's types
        out: list[Action] = []
        plan = reconcile(self.ledger, self.keys, self.self_id)
        self.pending_keys = plan.pending
        for meter_id, home, version in plan.hand_over:
            self._handovers[meter_id] = (home, version)
            out.append(SendKey(home, meter_id, version))
        out.extend(EraseKey(m) for m in plan.erase)
        out.append(Log("node.reconciled", (("erase", len(plan.erase)),
                                           ("hand_over", len(plan.hand_over)),
                                           ("pending", len(plan.pending)),
                                           ("ahead", len(plan.ahead)))))
        for meter_id in plan.ahead:
            out.append(Log("keystore.ahead_of_chain", (("meter", meter_id.hex()),)))
        return out

    @property
    def inflight(self) -> int:
        return len(self._ops)

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # ====================================================== meter requests

    def _refuse(self, out: list[Action], op: Op, meter_id: bytes, request_id: int, reason: Nak,
                detail: str = "", **extra: object) -> None:
        self._count(f"refused.{reason.name}")
        out.append(Refuse(meter_id, request_id, op, reason, detail, **extra))  # type: ignore[arg-type]

    def _admit(self, op: Op, meter_id: bytes, request_id: int, counter: int | None,
               at: ev.Time, out: list[Action]) -> Operation | None:
        """Field and capacity checks shared by every request; the new operation, or None."""
        if not (check_meter_id(meter_id) is None
                and isinstance(request_id, int) and 0 <= request_id <= U64_MAX
                and (counter is None or (isinstance(counter, int) and 0 <= counter <= U64_MAX))):
            self._refuse(out, op, bytes(meter_id) if isinstance(meter_id, bytes) else b"",
                         request_id if isinstance(request_id, int) else 0, Nak.BAD_REQUEST,
                         "meter id, request id or counter out of range")
            return None
        busy = self._ops.get(meter_id)
        if busy is not None:
            if busy.request_id == request_id and busy.op is op:
                self._count("duplicate_request")  # a resent request: its answer will come
            else:
                self._refuse(out, op, meter_id, request_id, Nak.BUSY,
                             f"{busy.op.value} {busy.request_id} in flight")
            return None
        if len(self._ops) >= self.config.max_inflight:
            self._refuse(out, op, meter_id, request_id, Nak.OVERLOADED,
                         f"{len(self._ops)} operations in flight")
            return None
        return Operation(op, meter_id, request_id, at.mono + self.config.op_timeout_s)

    def _home_entry(self, op: Op, meter_id: bytes, request_id: int,
                    out: list[Action]) -> MeterEntry | None:
        """The meter's entry if it is live and homed here; otherwise refuse and None."""
        entry = self.ledger.meter(meter_id)
        if entry is None:
            self._refuse(out, op, meter_id, request_id, Nak.UNKNOWN_METER)
        elif entry.status is MeterStatus.REVOKED:
            self._refuse(out, op, meter_id, request_id, Nak.REVOKED, counter=entry.counter)
        elif entry.home != self.self_id:
            self._refuse(out, op, meter_id, request_id, Nak.NOT_HOME, home=entry.home)
        else:
            return entry
        return None

    def _on_register(self, e: ev.RegisterRequest, at: ev.Time, out: list[Action]) -> None:
        op = self._admit(Op.REGISTER, e.meter_id, e.request_id, e.counter, at, out)
        if op is None:
            return
        if not (isinstance(e.key_version, int) and 1 <= e.key_version <= U32_MAX):
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.BAD_REQUEST,
                                "key version must be 1..2^32-1")
        factory = self.config.factory_key(e.meter_id) if self.config.factory_key else None
        if factory is None:
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.NO_FACTORY_KEY)
        try:
            key = open_rotation_proof(factory, e.wrapped_key)
        except BadProofError as exc:
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.BAD_PROOF, str(exc))
        entry = self.ledger.meter(e.meter_id)
        if entry is not None and entry.status is MeterStatus.LIVE:
            if entry.home != self.self_id:
                return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.NOT_HOME,
                                    home=entry.home)
            if (entry.counter, entry.key_version, entry.fingerprint) == \
                    (e.counter, e.key_version, fingerprint(key)):
                return self._committed_retry(op, PreparedKey(e.meter_id, e.key_version, key),
                                             entry, out)
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.LEDGER_REFUSED,
                                "the meter is live", ledger_reason=Reason.REGISTER_LIVE_METER)
        if entry is not None:  # revoked: a new key line above the last
            if e.counter <= entry.counter:
                return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.REPLAYED,
                                    counter=entry.counter)
            if e.key_version <= entry.key_version:
                return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.STALE_VERSION,
                                    f"above {entry.key_version}")
        verdict = self.config.admit_join(e.meter_id) if self.config.admit_join else None
        if verdict is not None:
            nak, detail, home = verdict
            return self._refuse(out, op.op, e.meter_id, e.request_id, nak, detail,
                                **({"home": home} if home else {}))
        prepared = self._prepare(op, out, lambda: self.keys.prepare_key(e.meter_id,
                                                                        e.key_version, key))
        if prepared is None:
            return
        tx = self.builder.register(e.meter_id, key_version=e.key_version,
                                   fingerprint=prepared.fingerprint, counter=e.counter)
        self._enqueue(op, tx, prepared)

    def _on_rotate(self, e: ev.RotateRequest, at: ev.Time, out: list[Action]) -> None:
        op = self._admit(Op.ROTATE, e.meter_id, e.request_id, e.counter, at, out)
        if op is None:
            return
        entry = self._home_entry(op.op, e.meter_id, e.request_id, out)
        if entry is None:
            return
        held = self._held_versions(e.meter_id)
        if e.counter <= entry.counter:
            if e.counter == entry.counter and entry.key_version - 1 in held:
                # the rotation committed before a reboot or a lost acknowledgement
                try:
                    key = open_rotation_proof(self.keys.get(e.meter_id, entry.key_version - 1),
                                              e.proof)
                except (BadProofError, KeyStoreError):
                    key = b""
                if key and fingerprint(key) == entry.fingerprint:
                    return self._committed_retry(
                        op, PreparedKey(e.meter_id, entry.key_version, key), entry, out)
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.REPLAYED,
                                counter=entry.counter)
        if entry.key_version not in held:
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.KEY_PENDING,
                                f"version {entry.key_version} not received yet")
        if entry.key_version >= U32_MAX:
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.STALE_VERSION,
                                "the meter's key versions are exhausted: revoke and register")
        prepared = self._prepare(op, out, lambda: self.keys.prepare_rotation(e.meter_id, e.proof))
        if prepared is None:
            return
        if prepared.version != entry.key_version + 1:
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.STALE_VERSION,
                                f"the store holds {prepared.version - 1}, the chain "
                                f"{entry.key_version}")
        tx = self.builder.rotate(e.meter_id, key_version=prepared.version,
                                 fingerprint=prepared.fingerprint,
                                 proof=rotation_proof_digest(e.proof), counter=e.counter)
        self._enqueue(op, tx, prepared)

    def _on_revoke(self, e: ev.RevokeRequest, at: ev.Time, out: list[Action]) -> None:
        op = self._admit(Op.REVOKE, e.meter_id, e.request_id, e.counter, at, out)
        if op is None:
            return
        entry = self.ledger.meter(e.meter_id)
        if (entry is not None and entry.status is MeterStatus.REVOKED
                and entry.home == self.self_id and entry.counter == e.counter):
            return self._committed_retry(op, None, entry, out)  # the revoke committed
        entry = self._home_entry(op.op, e.meter_id, e.request_id, out)
        if entry is None:
            return
        if e.counter <= entry.counter:
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.REPLAYED,
                                counter=entry.counter)
        if entry.key_version not in self._held_versions(e.meter_id):
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.KEY_PENDING)
        if not is_revocation_proof(self.keys.get(e.meter_id, entry.key_version), e.proof):
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.BAD_PROOF,
                                "not the empty key under the key in force")
        tx = self.builder.revoke(e.meter_id, key_version=entry.key_version, counter=e.counter,
                                 proof=rotation_proof_digest(e.proof))
        self._enqueue(op, tx, None)

    def _on_operator_revoke(self, e: ev.OperatorRevoke, at: ev.Time, out: list[Action]) -> None:
        op = self._admit(Op.REVOKE, e.meter_id, e.request_id, None, at, out)
        if op is None:
            return
        entry = self.ledger.meter(e.meter_id)
        if entry is not None and entry.status is MeterStatus.REVOKED:
            # already revoked (this request committed before a reboot, or another did)
            out.append(Acknowledge(e.meter_id, e.request_id, Op.REVOKE, entry.key_version,
                                   entry.height))
            return
        entry = self._home_entry(op.op, e.meter_id, e.request_id, out)
        if entry is None or self._counter_exhausted(op, entry, out):
            return
        tx = self.builder.revoke(e.meter_id, key_version=entry.key_version,
                                 counter=entry.counter + 1, proof=ZERO_HASH)
        self._enqueue(op, tx, None)

    def _on_migrate(self, e: ev.MigrateRequest, at: ev.Time, out: list[Action]) -> None:
        op = self._admit(Op.MIGRATE, e.meter_id, e.request_id, None, at, out)
        if op is None:
            return
        entry = self.ledger.meter(e.meter_id)
        if entry is not None and entry.status is MeterStatus.LIVE and entry.home == e.new_home:
            # already homed there (this request committed before a reboot, or nothing to do)
            out.append(Acknowledge(e.meter_id, e.request_id, Op.MIGRATE, entry.key_version,
                                   entry.height))
            return
        entry = self._home_entry(op.op, e.meter_id, e.request_id, out)
        if entry is None:
            return
        if self._counter_exhausted(op, entry, out):
            return
        if e.new_home == self.self_id or not self.ledger.is_active(e.new_home):
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.BAD_REQUEST,
                                f"{e.new_home!r} is not another active terminal")
        if entry.key_version not in self._held_versions(e.meter_id):
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.KEY_PENDING)
        tx = self.builder.migrate(e.meter_id, new_home=e.new_home, key_version=entry.key_version,
                                  fingerprint=entry.fingerprint, counter=entry.counter + 1)
        self._enqueue(op, tx, None)

    def _on_retire(self, e: ev.RetireRequest, at: ev.Time, out: list[Action]) -> None:
        info = self.ledger.terminal(e.terminal) if isinstance(e.terminal, str) else None
        if info is None or not info.active:
            why = f"{e.terminal!r} is not an active terminal"
        elif self.ledger.active_count <= 1:
            why = Reason.LAST_TERMINAL
        else:
            why = None
        self._member_request(Op.RETIRE, e.terminal, e.request_id, at, out, why, lambda: (
            self.builder.retire_terminal(e.terminal, info.public_key)))  # type: ignore[union-attr]

    def _on_add(self, e: ev.AddRequest, at: ev.Time, out: list[Action]) -> None:
        ok_key = isinstance(e.public_key, bytes) and len(e.public_key) == 32
        if not isinstance(e.terminal, str) or not ok_key:
            why: str | Reason | None = "a terminal id and a 32-byte public key"
        elif self.ledger.terminal(e.terminal) is not None or self.ledger.key_in_use(e.public_key):
            why = Reason.TERMINAL_EXISTS
        else:
            why = None
        self._member_request(Op.ADD, e.terminal, e.request_id, at, out, why, lambda: (
            self.builder.add_terminal(e.terminal, e.public_key)))

    def _member_request(self, op_kind: Op, terminal: object, request_id: object, at: ev.Time,
                        out: list[Action], why: str | Reason | None,
                        build: Callable[[], Transaction]) -> None:
        """An operator's membership change: refused with ``why`` (a ledger reason, or a bad
        request), refused when the utility has not ordered it, or proposed like any
        operation and answered once it commits."""
        key = MEMBER_KEY + str(terminal).encode("ascii", "replace")[:32]
        if not (isinstance(request_id, int) and 0 <= request_id <= U64_MAX):
            return self._refuse(out, op_kind, key, 0, Nak.BAD_REQUEST, "request id")
        if isinstance(why, Reason):
            return self._refuse(out, op_kind, key, request_id, Nak.LEDGER_REFUSED, why.name,
                                ledger_reason=why)
        if why is not None:
            return self._refuse(out, op_kind, key, request_id, Nak.BAD_REQUEST, why)
        busy = self._ops.get(key)
        if busy is not None:
            if busy.request_id != request_id:
                self._refuse(out, op_kind, key, request_id, Nak.BUSY,
                             f"{busy.op.value} {busy.request_id} in flight")
            return
        if len(self._ops) >= self.config.max_inflight:
            return self._refuse(out, op_kind, key, request_id, Nak.OVERLOADED)
        tx = build()
        authorise = self.config.authorise_member
        if authorise is not None and not authorise(tx):
            return self._refuse(out, op_kind, key, request_id, Nak.LEDGER_REFUSED,
                                "not ordered by the utility's provisioning",
                                ledger_reason=Reason.MEMBER_NOT_AUTHORISED)
        op = Operation(op_kind, key, request_id, at.mono + self.config.op_timeout_s)
        self._enqueue(op, tx, None)

    def _on_reading(self, e: ev.ReadingRequest, at: ev.Time, out: list[Action]) -> None:
        op = self._admit(Op.READING, e.meter_id, e.request_id, e.counter, at, out)
        if op is None:
            return
        entry = self._home_entry(op.op, e.meter_id, e.request_id, out)
        if entry is None:
            return
        last = self._reading_counters.get(e.meter_id)
        if last is None:
            floor = self.config.reading_floor
            last = -1 if floor is None else floor(e.meter_id)
        if e.counter <= last:
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.REPLAYED_READING,
                                counter=last)
        if entry.key_version not in self._held_versions(e.meter_id):
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.KEY_PENDING)
        try:
            plain = open_reading(self.keys.get(e.meter_id, entry.key_version), e.sealed,
                                 meter_id=e.meter_id, key_version=entry.key_version,
                                 counter=e.counter)
        except BadReading as exc:
            return self._refuse(out, op.op, e.meter_id, e.request_id, Nak.BAD_READING, str(exc))
        self._reading_counters[e.meter_id] = e.counter
        self._reading_counters.move_to_end(e.meter_id)
        while len(self._reading_counters) > MAX_READING_COUNTERS:
            self._reading_counters.popitem(last=False)
        out.append(AcceptReading(e.meter_id, e.request_id, e.counter, plain,
                                 entry.key_version, e.sealed))
        out.append(Acknowledge(e.meter_id, e.request_id, Op.READING, entry.key_version))

    def _on_query(self, e: ev.QueryRequest, at: ev.Time, out: list[Action]) -> None:
        entry = self.ledger.meter(e.meter_id) if isinstance(e.meter_id, bytes) else None
        if entry is None:
            out.append(AnswerQuery(e.meter_id, e.request_id, "unknown"))
        elif entry.status is MeterStatus.REVOKED:
            out.append(AnswerQuery(e.meter_id, e.request_id, "revoked", entry.home,
                                   entry.key_version, None, entry.height))
        else:
            answer = "local" if entry.home == self.self_id else "remote"
            out.append(AnswerQuery(e.meter_id, e.request_id, answer, entry.home,
                                   entry.key_version, entry.fingerprint, entry.height))

    # ------------------------------------------------------------ helpers

    def _counter_exhausted(self, op: Operation, entry: MeterEntry, out: list[Action]) -> bool:
        """An operation that takes the chain's counter + 1 has none left at 2^64-1."""
        if entry.counter < U64_MAX:
            return False
        self._refuse(out, op.op, op.meter_id, op.request_id, Nak.REPLAYED,
                     "the meter's counter is exhausted", counter=entry.counter)
        return True

    def _held_versions(self, meter_id: bytes) -> tuple[int, ...]:
        return self.keys.versions(meter_id) if self.keys.status(meter_id) is \
            StoreStatus.LIVE else ()

    def _prepare(self, op: Operation, out: list[Action],
                 prepare: Callable[[], PreparedKey]) -> PreparedKey | None:
        try:
            return prepare()
        except BadProofError as exc:
            reason = Nak.KEY_REUSED if exc.fault is ProofFault.KEY_REUSED else Nak.BAD_PROOF
            self._refuse(out, op.op, op.meter_id, op.request_id, reason, str(exc))
        except VersionError as exc:
            self._refuse(out, op.op, op.meter_id, op.request_id, Nak.STALE_VERSION, str(exc))
        except KeyStoreError as exc:
            self._refuse(out, op.op, op.meter_id, op.request_id, Nak.KEY_PENDING, str(exc))
        return None

    def _enqueue(self, op: Operation, tx: Transaction, prepared: PreparedKey | None) -> None:
        op.tx, op.tx_id, op.prepared, op.key_version = tx, tx_id(tx), prepared, tx.key_version
        op.advance(OpState.CHECKED)
        self._ops[op.meter_id] = op
        self._by_tx[op.tx_id] = op
        self._queue.append(op)

    def _committed_retry(self, op: Operation, prepared: PreparedKey | None, entry: MeterEntry,
                         out: list[Action]) -> None:
        """A request whose operation already committed: finish its key-store effect, answer."""
        self._count("committed_retry")
        op.key_version, op.height, op.prepared = entry.key_version, entry.height, prepared
        op.advance(OpState.APPLIED)
        self._ops[op.meter_id] = op
        if prepared is not None:
            if prepared.version in self._held_versions(op.meter_id):
                return self._acknowledge(op, out)
            out.append(StoreKey(prepared))
        elif self.keys.status(op.meter_id) is StoreStatus.LIVE:
            out.append(EraseKey(op.meter_id))
        else:
            self._acknowledge(op, out)

    def _acknowledge(self, op: Operation, out: list[Action]) -> None:
        op.advance(OpState.ACKNOWLEDGED)
        self._forget(op)
        self._count(f"acknowledged.{op.op.value}")
        out.append(Acknowledge(op.meter_id, op.request_id, op.op, op.key_version, op.height))

    def _fail(self, op: Operation, out: list[Action], reason: Nak, detail: str = "",
              ledger_reason: Reason | None = None) -> None:
        op.advance(OpState.REFUSED)
        self._forget(op)
        self._refuse(out, op.op, op.meter_id, op.request_id, reason, detail,
                     ledger_reason=ledger_reason)

    def _forget(self, op: Operation) -> None:
        if self._ops.get(op.meter_id) is op:
            del self._ops[op.meter_id]
        self._by_tx.pop(op.tx_id, None)
        self._forwarded.pop(op.tx_id, None)
        self._deferred.pop(op.tx_id, None)
        if op in self._queue:
            self._queue.remove(op)

    # ============================================================ proposing

    def _attest(self, tx: Transaction) -> bool:
        """The home's check of a proof it holds: only its own checked operations pass."""
        if tx.proposer != self.self_id or tx.proof == ZERO_HASH:
            return True
        op = self._by_tx.get(tx_id(tx))
        return op is not None and op.tx == tx

    def _majority(self, signers: int) -> bool:
        return 2 * signers > self.ledger.active_count

    def _proposing(self) -> bool:
        return self.proposer is None or self.proposer == self.self_id

    def _start_round(self, at: ev.Time, out: list[Action]) -> None:
        if self.ledger.tip is None or not (self._queue or self._foreign):
            return
        if not self._proposing():
            self._foreign.clear()  # forwarded here by mistake or before a change: origins resend
            return self._forward(at, out)
        if self._round is not None:
            return
        if self.ledger.tip.timestamp_ms >= U64_MAX:  # no later stamp exists: the chain is closed
            for op in list(self._queue):
                self._fail(op, out, Nak.LEDGER_REFUSED, "the chain's tip is stamped at the "
                           "last millisecond; no block can follow it",
                           Reason.TIMESTAMP_NOT_MONOTONIC)
            self._refuse_foreign(list(self._foreign), Reason.TIMESTAMP_NOT_MONOTONIC, out)
            return
        if not self.ledger.is_active(self.self_id):
            self._fail_queue(out)
            self._refuse_foreign(list(self._foreign), Reason.RETIRED_PROPOSER, out)
            return
        checkpoint = self._checkpoint()
        while self._queue or self._foreign:
            ops, foreign = self._pick(1 if checkpoint else 0)
            head = [checkpoint] if checkpoint else []
            txs = head + [op.tx for op in ops] + [f.tx for f in foreign]
            block = propose_block(self.ledger, self.identity, txs,  # type: ignore[arg-type]
                                  timestamp_ms=at.wall_ms, difficulty=self.config.pow_difficulty)
            verdict = check_proposal(self.ledger, block, placement_home=self.config.placement_home,
                                     require_pow=self.config.pow_difficulty,
                                     genesis_hash=self.config.genesis_hash,
                                     attest_proof=self._attest,
                                     authorise_member=self.config.authorise_member)
            if verdict.block_ok:
                break
            ids = [tx_id(f.tx) for f in foreign]
            if verdict.block_reason is not Reason.INVALID_TX:  # nothing of these can pass
                for op in ops:
                    self._fail(op, out, Nak.LEDGER_REFUSED, "", verdict.block_reason)
                self._refuse_foreign(ids, verdict.block_reason, out)  # type: ignore[arg-type]
                continue
            codes = verdict.tx_codes[len(head):]
            if head and verdict.tx_codes[0] is not None:  # our own digest refused: a bug
                self._count("checkpoint.refused")
                checkpoint = None
            for op, code in zip(ops, codes[:len(ops)], strict=True):
                if code is not None:
                    self._fail(op, out, _nak_for(code), code.name, code)
            for tid, code in zip(ids, codes[len(ops):], strict=True):
                if code is not None:
                    self._refuse_foreign([tid], code, out)
        else:
            return
        own = endorse(self.identity, block.header)
        rnd = _Round(block, header_hash(block.header), ops, foreign, {self.self_id: own}, set(),
                     at.mono + self.config.round_timeout_s)
        for op in ops:
            self._queue.remove(op)
            op.advance(OpState.PROPOSED)
        for f in foreign:
            del self._foreign[tx_id(f.tx)]
        self._round = rnd
        self._count("rounds")
        if foreign:
            self._count("rounds.foreign_txs", len(foreign))
        peers = tuple(t for t in self.ledger.active_terminals() if t != self.self_id)
        if self._majority(1):
            self._submit(rnd, at, out)
        else:
            out.append(RequestEndorsements(block, peers))

    def _checkpoint(self) -> Transaction | None:
        """The CHECKPOINT for the next block, when its height is due one (the parent's digest)."""
        every, tip = self.config.checkpoint_every, self.ledger.tip
        if not every or tip is None or (tip.height + 1) % every:
            return None
        self._count("checkpoints")
        return self.builder.checkpoint(tip.height, self.ledger.digest())

    def _pick(self, reserved: int = 0) -> tuple[list[Operation], list[_Foreign]]:
        """The next block's share: own operations and forwarded ones, neither starving the other."""
        limit = max(1, self.config.txs_per_block - reserved)
        foreign = list(self._foreign.values())
        n_own = min(len(self._queue), max(limit - len(foreign), limit // 2 or 1))
        n_foreign = max(0, min(len(foreign), limit - n_own))
        return self._queue[:n_own], foreign[:n_foreign]

    def _refuse_foreign(self, ids: Sequence[bytes], reason: Reason, out: list[Action]) -> None:
        height = self.ledger.tip.height if self.ledger.tip is not None else -1
        for tid in ids:
            item = self._foreign.pop(tid, None)
            if item is not None:
                self._count(f"forward.refused.{reason.name}")
                out.append(RefuseForwarded(item.peer, tid, reason, height))

    def _fail_queue(self, out: list[Action]) -> None:
        for op in list(self._queue):
            self._fail(op, out, Nak.LEDGER_REFUSED, "this terminal is not an active member",
                       Reason.RETIRED_PROPOSER)

    def _forward(self, at: ev.Time, out: list[Action]) -> None:
        """Not the proposer: send the checked operations to the one that is."""
        if not self.ledger.is_active(self.self_id):
            return self._fail_queue(out)
        if not self._queue:
            return
        tip = self.ledger.tip.height  # type: ignore[union-attr]
        due = at.mono + self.config.round_timeout_s + self.config.order_timeout_s
        ops, self._queue = self._queue, []
        for op in ops:
            op.advance(OpState.PROPOSED)
            op.submitted = True  # the proposer may commit it whenever: its effect must follow
            op.sent_height, op.forward_due = tip, due
            self._forwarded[op.tx_id] = op
        self._count("forwarded", len(ops))
        for i in range(0, len(ops), MAX_TXS_PER_MESSAGE):
            out.append(ForwardTxs(self.proposer,  # type: ignore[arg-type]
                                  tuple(op.tx for op in ops[i:i + MAX_TXS_PER_MESSAGE])))  # type: ignore[misc]

    def _submit(self, rnd: _Round, at: ev.Time, out: list[Action]) -> None:
        for op in rnd.ops:
            op.advance(OpState.ENDORSED)
            op.advance(OpState.ORDERED)
            op.submitted = True
        rnd.submitted = True
        rnd.deadline = at.mono + self.config.order_timeout_s
        out.append(SubmitBlock(with_endorsements(rnd.block, rnd.endorsements.values())))  # type: ignore[arg-type]

    def _on_endorsement(self, e: ev.EndorsementReceived, at: ev.Time, out: list[Action]) -> None:
        rnd = self._round
        if rnd is None or rnd.submitted or (e.height, e.block_hash) != \
                (rnd.block.header.height, rnd.block_hash):
            self._count("endorsement.stale")
            return
        info = self.ledger.terminal(e.peer)
        if (info is None or not info.active or e.endorsement.terminal_id != e.peer
                or not verify_endorsement(info.verifier, e.endorsement, rnd.block_hash)):
            self._count("endorsement.bad")
            out.append(Log("endorsement.bad", (("peer", e.peer), ("height", e.height))))
            return
        rnd.endorsements[e.peer] = e.endorsement
        if self._majority(len(rnd.endorsements)):
            self._submit(rnd, at, out)

    def _on_endorsement_refused(self, e: ev.EndorsementRefused, at: ev.Time,
                                out: list[Action]) -> None:
        rnd = self._round
        if rnd is None or rnd.submitted or (e.height, e.block_hash) != \
                (rnd.block.header.height, rnd.block_hash):
            return
        out.append(Log("endorsement.refused", (("peer", e.peer), ("height", e.height),
                                               ("reason", e.reason.name))))
        rnd.refused.add(e.peer)
        possible = self.ledger.active_count - len(rnd.refused)
        if not self._majority(possible):
            self._retry_round(rnd, at, out, f"refused by {sorted(rnd.refused)}")

    def _retry_round(self, rnd: _Round, at: ev.Time, out: list[Action], why: str) -> None:
        """The round failed: its operations go back to CHECKED for another, or time out."""
        self._round = None
        self._count("rounds.failed")
        self._requeue_foreign(rnd.foreign, at, set(), failed=True)
        for op in rnd.ops:
            op.rounds += 1
            if op.rounds >= self.config.max_rounds or at.mono >= op.deadline:
                if op.submitted:  # a block of an earlier round may still commit
                    self._keep_late(op)
                self._fail(op, out, Nak.TIMEOUT, f"after {op.rounds} rounds: {why}")
                continue
            op.advance(OpState.CHECKED)
            self._queue.append(op)

    def _requeue_foreign(self, items: list[_Foreign], at: ev.Time, carried: set[bytes], *,
                         failed: bool) -> None:
        """Forwarded transactions of a failed or lost round wait for the next, until they expire
        or have failed ``max_rounds`` rounds here (their origins time them out and resend)."""
        if not self._proposing():
            return  # the new proposer gets them from their origins
        for f in items:
            tid = tx_id(f.tx)
            f.rounds += failed
            if tid in carried:
                continue
            if (at.mono >= f.deadline or f.rounds >= self.config.max_rounds
                    or len(self._foreign) >= MAX_FOREIGN):
                self._count("forward.dropped")
                continue
            self._foreign[tid] = f

    def _keep_late(self, op: Operation) -> None:
        """A submitted block may still commit: keep what its key-store effect needs."""
        if op.prepared is None or op.op is Op.MIGRATE:
            return
        self._late[op.tx_id] = op
        while len(self._late) > MAX_LATE:
            self._late.popitem(last=False)

    # ============================================================ endorsing

    def _on_endorse_request(self, e: ev.EndorseRequest, at: ev.Time, out: list[Action]) -> None:
        tip = self.ledger.tip
        height = e.block.header.height if isinstance(e.block, Block) else -1
        if tip is not None and tip.height + 1 < height <= tip.height + 1 + HOLD_AHEAD \
                and isinstance(e.peer, str) and len(self._held_proposals) < MAX_HELD:
            # The proposer is a block or two ahead of this terminal: that block is on its
            # way here through the ordering. Answer once it is applied instead of refusing
            # WRONG_HEIGHT, which would cost the proposer its round.
            self._held_proposals[e.peer] = (e, at.mono + self.config.round_timeout_s)
            self._count("endorse.held")
            return
        answer = answer_proposal(self.ledger, self.identity, self._guard, e.peer, e.block,
                                 now_ms=at.wall_ms, placement_home=self.config.placement_home,
                                 require_pow=self.config.pow_difficulty,
                                 genesis_hash=self.config.genesis_hash, attest_proof=self._attest,
                                 authorise_member=self.config.authorise_member)
        signed = isinstance(answer, SendEndorsement)
        self._count("endorse.signed" if signed else "endorse.refused")
        for found in self._guard.take_evidence():
            self.evidence.append(found)
            self._count("evidence.equivocation")
            out.append(Log("equivocation", (("signer", found.signer),
                                            ("meter", found.meter_id.hex()),
                                            ("version", found.key_version),
                                            ("height", found.height))))
        out.append(answer)

    # ============================================================ committing

    def _on_block(self, e: ev.BlockCommitted, at: ev.Time, out: list[Action]) -> None:
        block, changes = e.block, e.changes
        height = changes.height
        self._guard.committed(height)
        ids = [tx_id(tx) for tx in block.txs]
        rnd = self._round
        if rnd is not None and rnd.block.header.height <= height:
            self._round = None
            if changes.block_hash != rnd.block_hash:  # another terminal's block took the height
                self._count("rounds.lost")
                carried = set(ids)
                for op in rnd.ops:
                    if op.tx_id not in carried:  # back for the next round, re-checked there
                        op.advance(OpState.CHECKED)
                        self._queue.append(op)
                self._requeue_foreign(rnd.foreign, at, carried, failed=False)
        for tid in ids:
            self._foreign.pop(tid, None)  # carried by this block, whoever proposed it
        by_index = {c.tx_index: c for c in changes.meters}
        for index, (tx, tid) in enumerate(zip(block.txs, ids, strict=True)):
            change = by_index.get(index)
            if change is None:
                member_op = self._by_tx.get(tid) if tx.kind.is_member else None
                if member_op is not None:  # a membership request of ours committed
                    self._applied(member_op, height, out)
                continue
            op = self._by_tx.get(tid)
            late = self._late.pop(tid, None)
            if op is not None:
                self._applied(op, height, out)
            elif late is not None and late.prepared is not None:
                self._count("late_commit")  # its meter was told TIMEOUT; its key still goes in
                out.append(StoreKey(late.prepared))
            else:
                self._others_change(tx, change.entry, out)
        if self._deferred:
            self._settle_refusals(height, out)
        if self._held_proposals:
            self._release_held(at, out)
        # Only this block's meters can have stopped being pending: O(block), not O(pending).
        for change in changes.meters:
            meter_id = change.meter_id
            if meter_id in self.pending_keys and (
                    (entry := self.ledger.meter(meter_id)) is None
                    or entry.status is not MeterStatus.LIVE or entry.home != self.self_id):
                self.pending_keys.discard(meter_id)

    def _applied(self, op: Operation, height: int, out: list[Action]) -> None:
        if op in self._queue:
            self._queue.remove(op)  # carried by another terminal's block
        self._forwarded.pop(op.tx_id, None)
        self._deferred.pop(op.tx_id, None)
        op.advance(OpState.VALIDATED)
        op.advance(OpState.APPLIED)
        op.height = height
        if op.tx is not None and op.tx.kind.is_member:
            self._acknowledge(op, out)  # the membership changed with the block: nothing to store
        elif op.tx is not None and op.tx.kind is TxKind.MIGRATE:
            self._handovers[op.meter_id] = (op.tx.home, op.key_version)
            out.append(SendKey(op.tx.home, op.meter_id, op.key_version))
            self._acknowledge(op, out)
        elif op.prepared is not None:
            out.append(StoreKey(op.prepared))
        else:  # revoke
            out.append(EraseKey(op.meter_id))

    def _others_change(self, tx: Transaction, entry: MeterEntry, out: list[Action]) -> None:
        """A committed change with no operation of ours behind it: square the key store with it.

        The operation may be another terminal's, or ours forgotten (a reboot, a
        timeout): either way the chain says what this terminal must hold. A key
        above the entry's version is ahead of the chain (a repaired chain getting
        its blocks back, reconcile.py): a later block committed it, so it is
        neither erased nor handed over on this one.
        """
        mid = tx.meter_id
        held = self.keys.status(mid) is StoreStatus.LIVE and \
            max(self.keys.versions(mid), default=0) <= entry.key_version
        if entry.status is MeterStatus.REVOKED:
            self._handovers.pop(mid, None)  # a revoked key is handed to nobody
            self._handover_due.pop(mid, None)
            if held:
                out.append(EraseKey(mid))
        elif entry.home != self.self_id:
            if held:
                self._handovers[mid] = (entry.home, entry.key_version)
                out.append(SendKey(entry.home, mid, entry.key_version))
        else:
            # Homed here (again): a hand-over of it still in flight is void, and its key stays.
            if self._handovers.pop(mid, None) is not None:
                self._count("handover.void")
            self._handover_due.pop(mid, None)
            if entry.key_version not in self._held_versions(mid):
                self.pending_keys.add(mid)  # from the old home (KeyReceived) or the retry

    def _on_block_refused(self, e: ev.BlockRefused, at: ev.Time, out: list[Action]) -> None:
        rnd = self._round
        if rnd is not None and rnd.submitted and (e.height, e.block_hash) == \
                (rnd.block.header.height, rnd.block_hash):
            self._retry_round(rnd, at, out, e.detail)

    def _release_held(self, at: ev.Time, out: list[Action]) -> None:
        """Proposals held for a block this terminal lacked: answer the ones it can now."""
        tip = self.ledger.tip
        for peer, (e, until) in list(self._held_proposals.items()):
            h = e.block.header.height
            if tip is None or h <= tip.height + 1 or at.mono >= until:
                del self._held_proposals[peer]
                if tip is not None and h == tip.height + 1 and at.mono < until:
                    self._on_endorse_request(e, at, out)
                else:
                    self._count("endorse.held_dropped")  # stale: its round is over

    # ========================================================= forwarding

    def _on_proposer_changed(self, e: ev.ProposerChanged, at: ev.Time,
                             out: list[Action]) -> None:
        if e.proposer == self.proposer:
            return
        out.append(Log("node.proposer", (("proposer", e.proposer), ("was", self.proposer))))
        self._count("proposer.changes")
        self.proposer = e.proposer
        # What went to the old proposer goes to the new one (or into this terminal's own
        # round). If the old one's block still commits, the transaction is applied from it
        # and the copy the new proposer holds is refused there as a replay.
        for op in list(self._forwarded.values()):
            del self._forwarded[op.tx_id]
            op.advance(OpState.CHECKED)
            self._queue.append(op)
        rnd = self._round
        if rnd is not None and not rnd.submitted and not self._proposing():
            self._round = None  # not endorsed yet: its operations are forwarded instead
            self._count("rounds.yielded")
            for op in rnd.ops:
                op.advance(OpState.CHECKED)
                self._queue.append(op)
        if not self._proposing():
            self._foreign.clear()

    def _on_txs_forwarded(self, e: ev.TxsForwarded, at: ev.Time, out: list[Action]) -> None:
        height = self.ledger.tip.height if self.ledger.tip is not None else -1
        info = self.ledger.terminal(e.peer)
        for tx in e.txs:
            tid = tx_id(tx)
            if info is None or not info.active or tx.proposer != e.peer:
                # only a member forwards, and only what it signed itself
                self._count("forward.refused.UNKNOWN_PROPOSER")
                out.append(RefuseForwarded(e.peer, tid, Reason.UNKNOWN_PROPOSER, height))
            elif not self._proposing():
                self._count("forward.not_proposer")  # the origin re-forwards on the change
            elif tid in self._foreign or (self._round is not None and any(
                    tx_id(f.tx) == tid for f in self._round.foreign)):
                self._count("forward.duplicate")
            elif len(self._foreign) >= MAX_FOREIGN:
                self._count("forward.overloaded")  # its origin times the round out and resends
            else:
                self._foreign[tid] = _Foreign(e.peer, tx, at.mono + self.config.op_timeout_s)
                self._count("forward.accepted")

    def _on_forward_refused(self, e: ev.ForwardRefused, at: ev.Time, out: list[Action]) -> None:
        op = self._forwarded.get(e.tx_id)
        if op is None or e.peer != self.proposer:
            self._count("forward.stray_refusal")
            return
        tip = self.ledger.tip.height if self.ledger.tip is not None else -1
        if e.height < op.sent_height:  # judged on an older chain than the one it was built on
            del self._forwarded[e.tx_id]
            op.rounds += 1
            if op.rounds >= self.config.max_rounds or at.mono >= op.deadline:
                self._keep_late(op)
                return self._fail(op, out, Nak.TIMEOUT, f"the proposer {e.peer} lags behind")
            op.advance(OpState.CHECKED)
            self._queue.append(op)
        elif e.height > tip:
            self._deferred[e.tx_id] = (e.height, e.reason)  # our chain may yet carry it
        else:
            self._fail(op, out, _nak_for(e.reason), f"{e.reason.name} at the proposer",
                       e.reason)

    def _settle_refusals(self, height: int, out: list[Action]) -> None:
        """Refusals judged at a height this chain has now reached, their operation not applied."""
        for tid, (at_height, reason) in list(self._deferred.items()):
            if at_height <= height:
                del self._deferred[tid]
                op = self._forwarded.get(tid)
                if op is not None:
                    self._fail(op, out, _nak_for(reason), f"{reason.name} at the proposer",
                               reason)

    # ======================================================= key handovers

    def _on_key_received(self, e: ev.KeyReceived, at: ev.Time, out: list[Action]) -> None:
        entry = self.ledger.meter(e.meter_id)
        if (entry is None or entry.status is not MeterStatus.LIVE or entry.home != self.self_id
                or entry.key_version != e.key_version or not isinstance(e.key, bytes)
                or len(e.key) != KEY_BYTES or fingerprint(e.key) != entry.fingerprint):
            self._count("handover.refused")
            out.append(Log("handover.refused", (("peer", e.peer), ("meter", e.meter_id.hex()))))
            return
        if e.key_version in self._held_versions(e.meter_id):
            out.append(AcknowledgeKey(e.peer, e.meter_id, e.key_version))
            return
        self._receiving[e.meter_id] = e.peer
        out.append(StoreKey(PreparedKey(e.meter_id, e.key_version, e.key)))

    def _on_key_acknowledged(self, e: ev.KeyAcknowledged, at: ev.Time, out: list[Action]) -> None:
        entry = self.ledger.meter(e.meter_id)
        if (self._handovers.get(e.meter_id) != (e.peer, e.key_version) or entry is None
                or entry.home != e.peer):  # erase only a key the chain has moved to the peer
            self._count("handover.stray_ack")
            return
        del self._handovers[e.meter_id]
        self._handover_due.pop(e.meter_id, None)
        out.append(EraseKey(e.meter_id))

    # ================================================== key-store results

    def _on_key_stored(self, e: ev.KeyStored, at: ev.Time, out: list[Action]) -> None:
        entry = self.ledger.meter(e.meter_id)
        if entry is not None and entry.key_version == e.key_version:
            self.pending_keys.discard(e.meter_id)  # the chain's key, not an older one
        peer = self._receiving.pop(e.meter_id, None)
        if peer is not None:
            out.append(AcknowledgeKey(peer, e.meter_id, e.key_version))
        op = self._ops.get(e.meter_id)
        if op is not None and op.state is OpState.APPLIED and op.key_version == e.key_version:
            self._acknowledge(op, out)

    def _on_key_erased(self, e: ev.KeyErased, at: ev.Time, out: list[Action]) -> None:
        op = self._ops.get(e.meter_id)
        if op is not None and op.state is OpState.APPLIED and op.op is Op.REVOKE:
            self._acknowledge(op, out)

    def _on_effect_failed(self, e: ev.EffectFailed, at: ev.Time, out: list[Action]) -> None:
        out.append(Log("keystore.failed", (("meter", e.meter_id.hex()), ("detail", e.detail))))
        self._receiving.pop(e.meter_id, None)
        op = self._ops.get(e.meter_id)
        if op is not None and op.state is OpState.APPLIED:
            self.pending_keys.add(e.meter_id)
            self._fail(op, out, Nak.STORE_FAILED, e.detail)

    # ================================================================ time

    def _on_tick(self, e: ev.Tick, at: ev.Time, out: list[Action]) -> None:
        pass  # _expire and _start_round run after every event

    def _expire(self, at: ev.Time, out: list[Action]) -> None:
        if self._held_proposals:
            self._release_held(at, out)
        for mid, (home, version) in self._handovers.items():  # lost hand-overs go again
            due = self._handover_due.setdefault(mid, at.mono + self.config.handover_resend_s)
            if at.mono >= due:
                self._count("handover.resent")
                self._handover_due[mid] = at.mono + self.config.handover_resend_s
                out.append(SendKey(home, mid, version))
        rnd = self._round
        if rnd is not None and at.mono >= rnd.deadline:
            self._retry_round(rnd, at, out, "endorsements" if not rnd.submitted else "ordering")
        for op in [o for o in self._queue if at.mono >= o.deadline]:
            self._fail(op, out, Nak.TIMEOUT, "not proposed in time")
        for op in [o for o in self._forwarded.values() if at.mono >= o.forward_due]:
            del self._forwarded[op.tx_id]
            self._deferred.pop(op.tx_id, None)
            op.rounds += 1
            if op.rounds >= self.config.max_rounds or at.mono >= op.deadline:
                self._keep_late(op)
                self._fail(op, out, Nak.TIMEOUT, f"after {op.rounds} forwards to {self.proposer}")
                continue
            op.advance(OpState.CHECKED)
            self._queue.append(op)
        for tid in [t for t, f in self._foreign.items() if at.mono >= f.deadline]:
            del self._foreign[tid]  # its origin has timed it out by now

def _nak_for(code: Reason) -> Nak:
    """The meter-facing reason for a ledger rule's code."""
    return {Reason.REPLAYED_COUNTER: Nak.REPLAYED, Reason.STALE_VERSION: Nak.STALE_VERSION,
            Reason.BAD_PROOF: Nak.BAD_PROOF, Reason.KEY_REUSED: Nak.KEY_REUSED,
            Reason.UNKNOWN_METER: Nak.UNKNOWN_METER, Reason.REVOKED_METER: Nak.REVOKED,
            Reason.WRONG_HOME: Nak.NOT_HOME}.get(code, Nak.LEDGER_REFUSED)


_HANDLERS: dict[type, Callable[..., None]] = {
    ev.RegisterRequest: Node._on_register,
    ev.RotateRequest: Node._on_rotate,
    ev.RevokeRequest: Node._on_revoke,
    ev.ReadingRequest: Node._on_reading,
    ev.OperatorRevoke: Node._on_operator_revoke,
    ev.MigrateRequest: Node._on_migrate,
    ev.RetireRequest: Node._on_retire,
    ev.AddRequest: Node._on_add,
    ev.QueryRequest: Node._on_query,
    ev.EndorseRequest: Node._on_endorse_request,
    ev.EndorsementReceived: Node._on_endorsement,
    ev.EndorsementRefused: Node._on_endorsement_refused,
    ev.TxsForwarded: Node._on_txs_forwarded,
    ev.ForwardRefused: Node._on_forward_refused,
    ev.ProposerChanged: Node._on_proposer_changed,
    ev.KeyReceived: Node._on_key_received,
    ev.KeyAcknowledged: Node._on_key_acknowledged,
    ev.BlockCommitted: Node._on_block,
    ev.BlockRefused: Node._on_block_refused,
    ev.KeyStored: Node._on_key_stored,
    ev.KeyErased: Node._on_key_erased,
    ev.EffectFailed: Node._on_effect_failed,
    ev.Tick: Node._on_tick,
}
