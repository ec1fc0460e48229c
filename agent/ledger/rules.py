"""The ledger's validation rules: a block in, a verdict with reason codes out.

Two phases, as in execute-order-validate (Hyperledger Fabric), but with
the parent fixed when a block is endorsed:

- ``check_proposal`` is what an endorser runs before it signs: every rule
  but the quorum, including the home terminal's check of a rotation proof
  it holds (``attest_proof``). It is the only place that oracle is asked.
- ``validate_block`` is what every terminal runs as it applies an ordered
  block, live or at a reboot's replay: every rule, the quorum included, and
  no oracle that depends on what a terminal holds off the chain, so a live
  append and a replay always reach the same state.

A block carries only valid transactions. A transaction fault (replayed
counter, stale version, wrong home, ...) rejects the whole block with
``INVALID_TX``; the verdict still names each transaction's code, so a
proposer drops the bad ones and proposes again. Fabric records invalid
transactions because its endorsements are not tied to a parent and
conflicts appear at ordering; here an endorsement signs one header over one
parent, so validity is settled when it is signed. It also means an
endorsed transaction is an applied one: a record proof (proof.py) shown to
the master station can only be for a record the ledger applied, never for
a transaction a block merely carried.

Quorum (paper, section 2.2.1: "more than 50 % of the ECDs"): a block needs
valid endorsements from more than half of the terminals active at its
parent, counting distinct active endorsers; the proposer's own counts. A
duplicate endorser, a never-known endorser or a bad endorsement signature
rejects the block (the proposer should have checked what it collected); a
retired terminal's valid endorsement is carried but not counted.

Lifecycle (paper, section 2.2.1, steps 1-4; section 2.1 for migration):

- REGISTER: the meter is unknown, or was revoked (a new key line: version
  and counter above the last); proposed by the home it names.
- ROTATE: the meter is LIVE; version = current + 1; counter above the last;
  a non-zero proof digest; a fingerprint other than the current key's (no
  rotation back to the key in force); proposed by the meter's home, naming it.
- REVOKE: the meter is LIVE; version = the current one; counter above the
  last; proposed by the home. An operator's revoke (a stolen key) also goes
  through the home terminal, which proposes it with a zero proof.
- MIGRATE: the meter is LIVE; the new home is another active terminal and,
  with a placement oracle, the one placement chose; version and fingerprint
  restate the current key; counter above the last; proposed by the old home,
  or by the new one only when the old home is retired or the placement
  oracle names the new one: no terminal takes another's meter.
- TERMINAL_ADD / TERMINAL_RETIRE: take effect from the next block, so the
  quorum and the proposers of a block never depend on the block itself.
  Ids and keys are never reused; at least one terminal stays active.
- CHECKPOINT: at most one per block, proposed by the block's proposer; its
  height is the parent's and its digest the parent state's (``digest()``),
  which every validator computes itself. It changes no state.

The genesis block (height 0 on an empty state) is accepted when it is
self-consistent: only TERMINAL_ADD transactions, all valid, proposed by one
of the founders they name, endorsed by more than half of them. Any fault in
it rejects it as a whole. A terminal knows its fleet's genesis hash from
provisioning (``genesis_hash``) and refuses any other: a chain grown from
another genesis is another fleet's, however well it is signed.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.ledger.block import (
    MAX_ENDORSEMENTS,
    MAX_TXS_PER_BLOCK,
    Block,
    Endorsement,
    build_block,
    check_pow,
    decode_block,
    endorsement_payload,
    header_hash,
)
from agent.ledger.codec import SIGNATURE_LEN, ZERO_HASH, DecodeError, VersionError
from agent.ledger.identity import DOMAIN_TX, TerminalIdentity, verify_signature
from agent.ledger.merkle import merkle_root
from agent.ledger.state import (
    MAX_ACTIVE_TERMINALS,
    MAX_TERMINAL_IDS,
    LedgerState,
    MeterEntry,
    MeterStatus,
    Tip,
)
from agent.ledger.tx import Transaction, TxKind, encode_tx

# How far ahead of its own clock an endorser accepts a proposal's stamp. The
# rules at commit bound a stamp only by its parent's (they must be the same
# at every replay, so no clock), which lets a block stamped far ahead hold the
# chain back until then, or for ever at 2^64-1 ms. The endorsers, who do have
# a clock, refuse it: 10 minutes covers an unsynchronised terminal's drift.
MAX_CLOCK_SKEW_MS = 10 * 60 * 1000

PlacementOracle = Callable[[bytes], str | None]
ProofAttestor = Callable[[Transaction], bool]
MemberAuthority = Callable[[Transaction], bool]  # may this membership change be made?


class Reason(enum.IntEnum):
    """Why a block or a transaction was refused. The numbers are stable wire codes."""

    # block level
    BAD_ENCODING = 1
    WRONG_VERSION = 2
    WRONG_HEIGHT = 3
    WRONG_PREV_HASH = 4
    WRONG_MERKLE_ROOT = 5
    BAD_POW = 6
    TIMESTAMP_NOT_MONOTONIC = 7
    BLOCK_TOO_LARGE = 8
    TOO_FEW_ENDORSEMENTS = 9
    DUPLICATE_ENDORSER = 10
    UNKNOWN_ENDORSER = 11
    BAD_ENDORSEMENT_SIGNATURE = 12
    BAD_GENESIS = 13  # a genesis holding other than TERMINAL_ADD transactions, or none
    INVALID_TX = 14  # a transaction of the block is invalid (tx_codes says which and why)
    FOREIGN_GENESIS = 15  # a valid genesis, but not the one this terminal was provisioned with
    TIMESTAMP_IN_FUTURE = 16  # stamped beyond the endorser's clock + MAX_CLOCK_SKEW_MS
    # block or transaction level (the block's proposer / a transaction's proposer)
    UNKNOWN_PROPOSER = 20
    RETIRED_PROPOSER = 21
    # transaction level
    BAD_TX_SIGNATURE = 30
    DUPLICATE_TX = 31  # twice in one block; across blocks the counters and ids catch replays
    REGISTER_LIVE_METER = 32
    UNKNOWN_METER = 33
    STALE_VERSION = 34
    REPLAYED_COUNTER = 35
    BAD_PROOF = 36
    REVOKED_METER = 37
    WRONG_HOME = 38
    MIGRATE_NOT_PLACEMENT_HOME = 39
    MIGRATE_SAME_HOME = 40
    TERMINAL_EXISTS = 41  # the id, or the public key, is or was a member's
    UNKNOWN_TERMINAL = 42  # not an active terminal (or already leaving in this block)
    TERMINAL_KEY_MISMATCH = 43  # a retire naming a key the terminal does not hold
    LAST_TERMINAL = 44  # a retire that would leave no active terminal
    TOO_MANY_TERMINALS = 45
    KEY_REUSED = 46  # a rotation to the key already in force
    BAD_CHECKPOINT = 47  # not the parent's height and state digest, not the block's proposer
    MEMBER_NOT_AUTHORISED = 48  # a membership change the utility's provisioning does not order


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of ``validate_block``: block-level result and one code per transaction."""

    block_ok: bool
    block_reason: Reason | None
    tx_codes: tuple[Reason | None, ...]

    @property
    def valid_txs(self) -> int:
        return sum(1 for c in self.tx_codes if c is None) if self.block_ok else 0


@dataclass(frozen=True, slots=True)
class MeterChange:
    tx_index: int
    kind: TxKind
    meter_id: bytes
    entry: MeterEntry


@dataclass(frozen=True, slots=True)
class TerminalChange:
    tx_index: int
    kind: TxKind
    terminal_id: str


@dataclass(frozen=True, slots=True)
class Changes:
    """What ``apply_block`` changed: what the meter index and the node need to know."""

    height: int
    block_hash: bytes
    meters: tuple[MeterChange, ...]
    terminals: tuple[TerminalChange, ...]


def _reject(reason: Reason) -> Verdict:
    return Verdict(False, reason, ())


# ------------------------------------------------------------ membership view

@dataclass(frozen=True, slots=True)
class _Member:
    verifier: Ed25519PublicKey
    active: bool


def _state_member(state: LedgerState) -> Callable[[str], _Member | None]:
    def lookup(terminal_id: str) -> _Member | None:
        info = state.terminal(terminal_id)
        return None if info is None else _Member(info.verifier, info.active)
    return lookup


def _check_endorsements(endorsements: Sequence[Endorsement], block_hash: bytes,
                        member: Callable[[str], _Member | None],
                        active_count: int, *, quorum: bool = True) -> Reason | None:
    """Distinct known endorsers, all signatures valid, active ones > half of active_count.

    Without ``quorum`` (a proposal being endorsed) the count is not checked.
    """
    seen: set[str] = set()
    found: list[tuple[Endorsement, _Member]] = []
    for e in endorsements:
        if e.terminal_id in seen:
            return Reason.DUPLICATE_ENDORSER
        seen.add(e.terminal_id)
        m = member(e.terminal_id)
        if m is None:
            return Reason.UNKNOWN_ENDORSER
        found.append((e, m))
    payload = endorsement_payload(block_hash)
    counted = 0
    for e, m in found:
        if not verify_signature(m.verifier, e.signature, payload):
            return Reason.BAD_ENDORSEMENT_SIGNATURE
        counted += m.active
    if quorum and 2 * counted <= active_count:
        return Reason.TOO_FEW_ENDORSEMENTS
    return None


def _tx_ids(block: Block) -> tuple[list[bytes], list[bytes]]:
    encodings = [encode_tx(tx) for tx in block.txs]
    return encodings, [hashlib.sha256(e).digest() for e in encodings]


def _header_checks(block: Block, ids: list[bytes], require_pow: int) -> Reason | None:
    h = block.header
    if h.tx_count != len(block.txs) or h.merkle_root != merkle_root(ids):
        return Reason.WRONG_MERKLE_ROOT
    if h.difficulty < require_pow or not check_pow(h):
        return Reason.BAD_POW
    return None


def _tx_signature_ok(verifier: Ed25519PublicKey, encoding: bytes) -> bool:
    return verify_signature(verifier, encoding[-SIGNATURE_LEN:],
                            DOMAIN_TX + encoding[:-SIGNATURE_LEN])


# ------------------------------------------------------------------- effects

def _meter_effect(tx: Transaction, current: MeterEntry | None, height: int,
                  index: int) -> MeterEntry:
    """The meter's entry after a valid ``tx`` (shared by validation and apply)."""
    if tx.kind is TxKind.REGISTER or tx.kind is TxKind.ROTATE:
        return MeterEntry(MeterStatus.LIVE, tx.key_version, tx.fingerprint, tx.home, tx.counter,
                          height, index)
    assert current is not None
    if tx.kind is TxKind.REVOKE:
        return MeterEntry(MeterStatus.REVOKED, current.key_version, ZERO_HASH, current.home,
                          tx.counter, height, index)
    # MIGRATE: same key, new home
    return MeterEntry(MeterStatus.LIVE, current.key_version, current.fingerprint, tx.home,
                      tx.counter, height, index)


class _Pending:
    """The state as changed by a block's earlier valid transactions (O(txs) overlay)."""

    __slots__ = ("add_keys", "adds", "meters", "retires", "state")

    def __init__(self, state: LedgerState) -> None:
        self.state = state
        self.meters: dict[bytes, MeterEntry] = {}
        self.adds: set[str] = set()
        self.add_keys: set[bytes] = set()
        self.retires: set[str] = set()

    def meter(self, meter_id: bytes) -> MeterEntry | None:
        if meter_id in self.meters:
            return self.meters[meter_id]
        return self.state.meter(meter_id)

    def stays_active(self, terminal_id: str) -> bool:
        """Active now and not retiring in this block: fit to be a meter's home."""
        return self.state.is_active(terminal_id) and terminal_id not in self.retires

    def active_after(self) -> int:
        return self.state.active_count + len(self.adds) - len(self.retires)


def _check_meter_tx(tx: Transaction, view: _Pending, placement_home: PlacementOracle | None,
                    attest_proof: ProofAttestor | None) -> Reason | None:
    cur = view.meter(tx.meter_id)
    if tx.kind is TxKind.REGISTER:
        if cur is not None and cur.status is MeterStatus.LIVE:
            return Reason.REGISTER_LIVE_METER
        if tx.home != tx.proposer:
            return Reason.WRONG_HOME
        if not view.stays_active(tx.home):
            return Reason.UNKNOWN_TERMINAL
        if cur is not None:  # revoked: a new key line continues the counter and the versions
            if tx.counter <= cur.counter:
                return Reason.REPLAYED_COUNTER
            if tx.key_version <= cur.key_version:
                return Reason.STALE_VERSION
        return None
    if cur is None:
        return Reason.UNKNOWN_METER
    if cur.status is MeterStatus.REVOKED:
        return Reason.REVOKED_METER
    if tx.kind is TxKind.MIGRATE:
        if tx.home == cur.home:
            return Reason.MIGRATE_SAME_HOME
        placed = None if placement_home is None else placement_home(tx.meter_id)
        # The old home gives the meter away; the new one may take it only from
        # a retired home or where placement names it: no terminal takes another's.
        if tx.proposer != cur.home and (
                tx.proposer != tx.home
                or (view.state.is_active(cur.home) and placed != tx.home)):
            return Reason.WRONG_HOME
        if not view.stays_active(tx.home):
            return Reason.UNKNOWN_TERMINAL
        if placement_home is not None and placed != tx.home:
            return Reason.MIGRATE_NOT_PLACEMENT_HOME
        if tx.counter <= cur.counter:
            return Reason.REPLAYED_COUNTER
        if tx.key_version != cur.key_version or tx.fingerprint != cur.fingerprint:
            return Reason.STALE_VERSION
        return None
    # ROTATE and REVOKE: the meter's home proposes, naming itself
    if tx.proposer != cur.home or tx.home != cur.home:
        return Reason.WRONG_HOME
    if tx.counter <= cur.counter:
        return Reason.REPLAYED_COUNTER
    if tx.kind is TxKind.ROTATE:
        if tx.key_version != cur.key_version + 1:
            return Reason.STALE_VERSION
        if tx.proof == ZERO_HASH:
            return Reason.BAD_PROOF
        if tx.fingerprint == cur.fingerprint:
            return Reason.KEY_REUSED
    elif tx.key_version != cur.key_version:
        return Reason.STALE_VERSION
    if tx.proof != ZERO_HASH and attest_proof is not None and not attest_proof(tx):
        return Reason.BAD_PROOF
    return None


def _check_membership_tx(tx: Transaction, view: _Pending) -> Reason | None:
    state = view.state
    if tx.kind is TxKind.TERMINAL_ADD:
        if (state.terminal(tx.terminal) is not None or tx.terminal in view.adds
                or state.key_in_use(tx.public_key) or tx.public_key in view.add_keys):
            return Reason.TERMINAL_EXISTS
        if (view.active_after() >= MAX_ACTIVE_TERMINALS
                or state.terminal_count + len(view.adds) >= MAX_TERMINAL_IDS):
            return Reason.TOO_MANY_TERMINALS
        return None
    info = state.terminal(tx.terminal)
    if info is None or not info.active or tx.terminal in view.retires:
        return Reason.UNKNOWN_TERMINAL
    if tx.public_key != info.public_key:
        return Reason.TERMINAL_KEY_MISMATCH
    if view.active_after() <= 1:
        return Reason.LAST_TERMINAL
    return None


def _record(tx: Transaction, view: _Pending, height: int, index: int) -> None:
    """Fold a valid transaction into the overlay."""
    if tx.kind.is_meter:
        view.meters[tx.meter_id] = _meter_effect(tx, view.meter(tx.meter_id), height, index)
    elif tx.kind is TxKind.TERMINAL_ADD:
        view.adds.add(tx.terminal)
        view.add_keys.add(tx.public_key)
    else:
        view.retires.add(tx.terminal)


# ---------------------------------------------------------------- validation

def validate_block(state: LedgerState, block: Block, *,
                   placement_home: PlacementOracle | None = None, require_pow: int = 0,
                   genesis_hash: bytes | None = None) -> Verdict:
    """Check ordered ``block`` as the next block on ``state``; pure, ``state`` is not changed.

    ``require_pow``: the least PoW difficulty this chain demands (the paper
    uses 8). ``placement_home(meter_id)``: where placement homes a meter, for
    MIGRATE; it must be a function of chain data. ``genesis_hash``: the
    fleet's genesis from provisioning (None: accept any self-consistent one).
    """
    return _verdict(state, block, placement_home, require_pow, genesis_hash, None, quorum=True)


def check_proposal(state: LedgerState, block: Block, *,
                   placement_home: PlacementOracle | None = None, require_pow: int = 0,
                   genesis_hash: bytes | None = None,
                   attest_proof: ProofAttestor | None = None,
                   authorise_member: MemberAuthority | None = None,
                   now_ms: int | None = None) -> Verdict:
    """What an endorser checks before it signs: every rule but the quorum.

    ``attest_proof(tx)``: False when this terminal holds the rotation proof
    behind a non-zero ``tx.proof`` and it does not hold (the home's check).
    ``authorise_member(tx)``: False when the utility has not ordered this
    TERMINAL_ADD or TERMINAL_RETIRE (the endorser's signed provisioning does
    not list the terminal with that key, or does not withdraw it): without
    it any one member could vote sockpuppets in, or honest members out.
    ``now_ms``: the endorser's wall clock; a stamp beyond it by more than
    MAX_CLOCK_SKEW_MS is refused (TIMESTAMP_IN_FUTURE). Endorsements already
    on the block are checked, not counted.
    """
    if now_ms is not None and block.header.timestamp_ms > now_ms + MAX_CLOCK_SKEW_MS:
        return _reject(Reason.TIMESTAMP_IN_FUTURE)
    return _verdict(state, block, placement_home, require_pow, genesis_hash, attest_proof,
                    quorum=False, authorise_member=authorise_member)


def _verdict(state: LedgerState, block: Block, placement_home: PlacementOracle | None,
             require_pow: int, genesis_hash: bytes | None, attest_proof: ProofAttestor | None,
             *, quorum: bool, authorise_member: MemberAuthority | None = None) -> Verdict:
    if len(block.txs) > MAX_TXS_PER_BLOCK or len(block.endorsements) > MAX_ENDORSEMENTS:
        return _reject(Reason.BLOCK_TOO_LARGE)
    tip = state.tip
    if tip is None:
        verdict = _validate_genesis(block, require_pow, quorum)
        if (verdict.block_ok and genesis_hash is not None
                and header_hash(block.header) != genesis_hash):
            return _reject(Reason.FOREIGN_GENESIS)
        return verdict
    h = block.header
    if h.height != tip.height + 1:
        return _reject(Reason.WRONG_HEIGHT)
    if h.prev_hash != tip.block_hash:
        return _reject(Reason.WRONG_PREV_HASH)
    if h.timestamp_ms <= tip.timestamp_ms:
        return _reject(Reason.TIMESTAMP_NOT_MONOTONIC)
    proposer = state.terminal(h.proposer)
    if proposer is None:
        return _reject(Reason.UNKNOWN_PROPOSER)
    if not proposer.active:
        return _reject(Reason.RETIRED_PROPOSER)
    encodings, ids = _tx_ids(block)
    bad = _header_checks(block, ids, require_pow)
    if bad is None:
        bad = _check_endorsements(block.endorsements, header_hash(h), _state_member(state),
                                  state.active_count, quorum=quorum)
    if bad is not None:
        return _reject(bad)

    view = _Pending(state)
    seen: set[bytes] = set()
    codes: list[Reason | None] = []
    checkpoints = 0
    for index, (tx, encoding, tid) in enumerate(zip(block.txs, encodings, ids, strict=True)):
        if tx.kind is TxKind.CHECKPOINT:
            checkpoints += 1
            code = _check_checkpoint(tx, h.proposer, state, checkpoints, tid in seen)
            if code is None and not _tx_signature_ok(proposer.verifier, encoding):
                code = Reason.BAD_TX_SIGNATURE
            seen.add(tid)
            codes.append(code)
            continue
        code = _check_tx(tx, encoding, tid, seen, view, placement_home, attest_proof)
        if code is None and tx.kind.is_member and authorise_member is not None \
                and not authorise_member(tx):
            code = Reason.MEMBER_NOT_AUTHORISED
        seen.add(tid)
        if code is None:
            _record(tx, view, h.height, index)
        codes.append(code)
    if any(c is not None for c in codes):
        return Verdict(False, Reason.INVALID_TX, tuple(codes))
    return Verdict(True, None, tuple(codes))


def _check_tx(tx: Transaction, encoding: bytes, tid: bytes, seen: set[bytes], view: _Pending,
              placement_home: PlacementOracle | None,
              attest_proof: ProofAttestor | None) -> Reason | None:
    if tid in seen:
        return Reason.DUPLICATE_TX
    info = view.state.terminal(tx.proposer)
    if info is None:
        return Reason.UNKNOWN_PROPOSER
    if not info.active:
        return Reason.RETIRED_PROPOSER
    if not _tx_signature_ok(info.verifier, encoding):
        return Reason.BAD_TX_SIGNATURE
    if tx.kind.is_meter:
        return _check_meter_tx(tx, view, placement_home, attest_proof)
    return _check_membership_tx(tx, view)


def _check_checkpoint(tx: Transaction, proposer: str, state: LedgerState, nth: int,
                      duplicate: bool) -> Reason | None:
    """A checkpoint names the parent's height and whole-state digest, once, by the proposer."""
    if duplicate:
        return Reason.DUPLICATE_TX
    tip = state.tip
    if nth > 1 or tx.proposer != proposer or tip is None or tx.counter != tip.height:
        return Reason.BAD_CHECKPOINT
    if tx.fingerprint != state.digest():
        return Reason.BAD_CHECKPOINT
    return None


def checkpoint_of(block: Block) -> Transaction | None:
    """The block's CHECKPOINT transaction, if it carries one."""
    return next((tx for tx in block.txs if tx.kind is TxKind.CHECKPOINT), None)


def _validate_genesis(block: Block, require_pow: int, quorum: bool) -> Verdict:
    h = block.header
    if h.height != 0:
        return _reject(Reason.WRONG_HEIGHT)
    if h.prev_hash != ZERO_HASH:
        return _reject(Reason.WRONG_PREV_HASH)
    if not block.txs or any(tx.kind is not TxKind.TERMINAL_ADD for tx in block.txs):
        return _reject(Reason.BAD_GENESIS)
    encodings, ids = _tx_ids(block)
    if len(set(ids)) != len(ids):
        return _reject(Reason.DUPLICATE_TX)
    founders: dict[str, _Member] = {}
    keys: set[bytes] = set()
    for tx in block.txs:
        if tx.terminal in founders or tx.public_key in keys:
            return _reject(Reason.TERMINAL_EXISTS)
        founders[tx.terminal] = _Member(Ed25519PublicKey.from_public_bytes(tx.public_key), True)
        keys.add(tx.public_key)
    if h.proposer not in founders:
        return _reject(Reason.UNKNOWN_PROPOSER)
    for tx, encoding in zip(block.txs, encodings, strict=True):
        if tx.proposer not in founders:
            return _reject(Reason.UNKNOWN_PROPOSER)
        if not _tx_signature_ok(founders[tx.proposer].verifier, encoding):
            return _reject(Reason.BAD_TX_SIGNATURE)
    bad = _header_checks(block, ids, require_pow)
    if bad is None:
        bad = _check_endorsements(block.endorsements, header_hash(h), founders.get,
                                  len(founders), quorum=quorum)
    if bad is not None:
        return _reject(bad)
    return Verdict(True, None, (None,) * len(block.txs))


def validate_block_bytes(state: LedgerState, data: bytes, *,
                         placement_home: PlacementOracle | None = None, require_pow: int = 0,
                         genesis_hash: bytes | None = None) -> tuple[Block | None, Verdict]:
    """Decode then validate: an undecodable block is BAD_ENCODING (WRONG_VERSION for a version)."""
    try:
        block = decode_block(data)
    except VersionError:
        return None, _reject(Reason.WRONG_VERSION)
    except DecodeError:
        return None, _reject(Reason.BAD_ENCODING)
    return block, validate_block(state, block, placement_home=placement_home,
                                 require_pow=require_pow, genesis_hash=genesis_hash)


# --------------------------------------------------------------------- apply

def apply_block(state: LedgerState, block: Block, verdict: Verdict) -> Changes:
    """Apply an accepted block's valid transactions to ``state``: O(txs).

    ``verdict`` must be ``validate_block``'s for this block on this state.
    """
    if not verdict.block_ok:
        raise ValueError(f"a rejected block ({verdict.block_reason}) is not applied")
    if len(verdict.tx_codes) != len(block.txs):
        raise ValueError("the verdict is for another block: transaction count differs")
    h = block.header
    block_hash = header_hash(h)
    tip = state.tip
    expected = (0, ZERO_HASH) if tip is None else (tip.height + 1, tip.block_hash)
    if (h.height, h.prev_hash) != expected:
        raise ValueError("the block does not extend this state's tip")
    meters: list[MeterChange] = []
    terminals: list[TerminalChange] = []
    for index, tx in enumerate(block.txs):  # an accepted block holds only valid transactions
        if tx.kind.is_meter:
            entry = _meter_effect(tx, state.meter(tx.meter_id), h.height, index)
            state.put_meter(tx.meter_id, entry)
            meters.append(MeterChange(index, tx.kind, tx.meter_id, entry))
        elif tx.kind is TxKind.CHECKPOINT:
            continue  # a digest of the parent state: nothing changes
        else:
            if tx.kind is TxKind.TERMINAL_ADD:
                state.add_terminal(tx.terminal, tx.public_key, h.height)
            else:
                state.retire_terminal(tx.terminal, h.height)
            terminals.append(TerminalChange(index, tx.kind, tx.terminal))
    state.advance_tip(Tip(h.height, block_hash, h.timestamp_ms))
    if h.height == 0:
        state.genesis_hash = block_hash
    return Changes(h.height, block_hash, tuple(meters), tuple(terminals))


def propose_block(state: LedgerState, proposer: TerminalIdentity, txs: Sequence[Transaction], *,
                  timestamp_ms: int, difficulty: int = 0) -> Block:
    """An unendorsed block on ``state``'s tip; the timestamp is kept above the parent's."""
    tip = state.tip
    if tip is None:
        raise ValueError("an empty state takes a genesis block (block.genesis)")
    return build_block(proposer, height=tip.height + 1, prev_hash=tip.block_hash,
                       timestamp_ms=max(timestamp_ms, tip.timestamp_ms + 1), txs=txs,
                       difficulty=difficulty)
