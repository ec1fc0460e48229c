"""Ledger rules: the key lifecycle end to end, every rejection reason, quorum boundaries."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

import pytest

from agent.ledger import rules
from agent.ledger.block import (
    MAX_ENDORSEMENTS,
    MAX_TXS_PER_BLOCK,
    Block,
    Endorsement,
    build_block,
    check_pow,
    encode_block,
    endorse,
    genesis,
    header_hash,
    seal,
    with_endorsements,
)
from agent.ledger.codec import ZERO_HASH, LedgerValueError
from agent.ledger.identity import TerminalIdentity
from agent.ledger.rules import (
    Reason,
    Verdict,
    apply_block,
    check_proposal,
    propose_block,
    validate_block,
    validate_block_bytes,
)
from agent.ledger.state import LedgerState, MeterEntry, MeterStatus
from agent.ledger.tx import (
    Transaction,
    TxBuilder,
    TxKind,
    decode_tx,
    encode_tx,
    make_tx,
    rotation_proof_digest,
    tx_id,
)


def ident(name: str) -> TerminalIdentity:
    return TerminalIdentity.from_seed(name, hashlib.sha256(b"test-key/" + name.encode()).digest())


T = [ident(f"ecd-{i:02d}") for i in range(7)]  # T[0..4] found the chain; T[5], T[6] join later
MEMBERS = [(t.terminal_id, t.public_bytes()) for t in T[:5]]
GENESIS = genesis(T[0], MEMBERS, timestamp_ms=1_000, endorsers=T[:3])
OUTSIDER = ident("outsider")
B = [TxBuilder(t) for t in T]
METER = b"\x00\x00\x12\x34\x56\x78"


def fp(n: int) -> bytes:
    return hashlib.sha256(b"edgekey/key-fingerprint/v1" + bytes([n]) * 16).digest()


def proof(n: int) -> bytes:
    return rotation_proof_digest(b"wrapped-key/" + bytes([n]))


def fresh() -> LedgerState:
    state = LedgerState()
    apply_block(state, GENESIS, validate_block(state, GENESIS))
    return state


def make_block(state: LedgerState, txs: Sequence[Transaction], *,
               proposer: TerminalIdentity = T[0],
               endorsers: Sequence[TerminalIdentity] = tuple(T[:3]),
               difficulty: int = 0) -> Block:
    assert state.tip is not None
    block = propose_block(state, proposer, txs, timestamp_ms=state.tip.timestamp_ms + 1_000,
                          difficulty=difficulty)
    return with_endorsements(block, [endorse(e, block.header) for e in endorsers])


def commit(state: LedgerState, txs: Sequence[Transaction], **kw: object) -> Verdict:
    """Validate and apply; the block must be accepted."""
    block = make_block(state, txs, **kw)  # type: ignore[arg-type]
    verdict = validate_block(state, block)
    assert verdict.block_ok, verdict
    apply_block(state, block, verdict)
    return verdict


def codes(state: LedgerState, txs: Sequence[Transaction], **kw: object) -> tuple:
    """The transaction codes an endorser's check gives a block of ``txs`` (nothing applied).

    A block with any invalid transaction is refused whole (INVALID_TX), at
    endorsement and at commit alike; without the endorse-time oracle the
    ordered block gets the same codes.
    """
    oracles = {k: kw.pop(k) for k in ("placement_home", "attest_proof", "authorise_member")
               if k in kw}
    block = make_block(state, txs, **kw)  # type: ignore[arg-type]
    verdict = check_proposal(state, block, **oracles)  # type: ignore[arg-type]
    assert verdict.block_ok == all(c is None for c in verdict.tx_codes), verdict
    if not verdict.block_ok:
        assert verdict.block_reason is Reason.INVALID_TX, verdict
    if "attest_proof" not in oracles and "authorise_member" not in oracles:
        assert validate_block(state, block, **oracles) == verdict  # type: ignore[arg-type]
    return verdict.tx_codes


def block_reason(state: LedgerState, block: Block, **kw: object) -> Reason | None:
    verdict = validate_block(state, block, **kw)  # type: ignore[arg-type]
    assert not verdict.block_ok and verdict.tx_codes == ()
    return verdict.block_reason


def live_meter(state: LedgerState, home: int = 1, version: int = 1, counter: int = 1) -> None:
    commit(state, [B[home].register(METER, key_version=version, fingerprint=fp(version),
                                    counter=counter)])


def revoked_meter(state: LedgerState) -> None:
    live_meter(state)
    commit(state, [B[1].revoke(METER, key_version=1, counter=2)])


# --------------------------------------------------------------- lifecycle


def test_lifecycle_register_rotate_rotate_revoke_register_again_migrate() -> None:
    state = fresh()
    assert state.active_terminals() == tuple(t.terminal_id for t in T[:5])
    assert (state.tip.height, state.tip.block_hash) == (0, header_hash(GENESIS.header))

    steps = [
        B[1].register(METER, key_version=1, fingerprint=fp(1), counter=10),
        B[1].rotate(METER, key_version=2, fingerprint=fp(2), proof=proof(2), counter=11),
        B[1].rotate(METER, key_version=3, fingerprint=fp(3), proof=proof(3), counter=12),
        B[1].revoke(METER, key_version=3, counter=13),
        B[2].register(METER, key_version=4, fingerprint=fp(4), counter=14),
        B[3].migrate(METER, new_home="ecd-03", key_version=4, fingerprint=fp(4), counter=15),
    ]
    expected = [
        (MeterStatus.LIVE, 1, fp(1), "ecd-01"),
        (MeterStatus.LIVE, 2, fp(2), "ecd-01"),
        (MeterStatus.LIVE, 3, fp(3), "ecd-01"),
        (MeterStatus.REVOKED, 3, ZERO_HASH, "ecd-01"),
        (MeterStatus.LIVE, 4, fp(4), "ecd-02"),
        (MeterStatus.LIVE, 4, fp(4), "ecd-03"),
    ]
    replica = fresh()  # a second terminal applying the same blocks

    def placement(meter_id: bytes) -> str:
        return "ecd-03"

    for height, (tx, want) in enumerate(zip(steps, expected, strict=True), start=1):
        block = make_block(state, [tx])
        verdict = validate_block(state, block, placement_home=placement)
        assert verdict == Verdict(True, None, (None,))
        changes = apply_block(state, block, verdict)
        entry = MeterEntry(*want, counter=10 + height - 1, height=height, tx_index=0)
        assert state.meter(METER) == entry
        assert [(c.tx_index, c.kind, c.meter_id, c.entry) for c in changes.meters] == \
            [(0, tx.kind, METER, entry)]
        assert (changes.height, changes.block_hash) == (height, header_hash(block.header))
        replica_verdict = validate_block(replica, block, placement_home=placement)
        assert replica_verdict == verdict
        apply_block(replica, block, replica_verdict)
        assert replica.meter(METER) == entry and replica.tip == state.tip
    assert state.meter_count == 1


def test_transactions_in_one_block_see_the_earlier_valid_ones() -> None:
    state = fresh()
    reg = B[1].register(METER, key_version=1, fingerprint=fp(1), counter=1)
    rot = B[1].rotate(METER, key_version=2, fingerprint=fp(2), proof=proof(2), counter=2)
    assert codes(state, [rot, reg]) == (Reason.UNKNOWN_METER, None)
    assert codes(state, [reg, rot]) == (None, None)
    commit(state, [reg, rot])
    assert state.meter(METER).key_version == 2


def test_a_block_holding_an_invalid_transaction_is_refused_whole() -> None:
    """Injected: a replayed ROTATE beside a valid REGISTER, endorsed by a majority.

    Before, the block committed with the ROTATE marked invalid, so an
    endorsed block carried a transaction the ledger never applied. Now the
    block is refused as a whole and the verdict names the bad transaction,
    so a proposer drops it and proposes again; nothing is applied.
    """
    state = fresh()
    live_meter(state, counter=5)
    stale = B[1].rotate(METER, key_version=2, fingerprint=fp(2), proof=proof(2), counter=5)
    other = b"\x00\x00\x00\x00\x00\x09"
    fresh_reg = B[2].register(other, key_version=1, fingerprint=fp(9), counter=1)
    block = make_block(state, [stale, fresh_reg])
    before = state.digest()
    verdict = validate_block(state, block)
    assert verdict == Verdict(False, Reason.INVALID_TX, (Reason.REPLAYED_COUNTER, None))
    assert verdict.valid_txs == 0
    with pytest.raises(ValueError):
        apply_block(state, block, verdict)
    assert state.digest() == before and state.meter(other) is None
    commit(state, [fresh_reg])  # the valid one alone commits
    assert state.meter(other).key_version == 1 and state.meter(METER).key_version == 1


def test_validate_block_does_not_change_the_state() -> None:
    state = fresh()
    live_meter(state)
    before = (state.tip, state.meter(METER), state.active_terminals(), state.meter_count)
    txs = [B[1].rotate(METER, key_version=2, fingerprint=fp(2), proof=proof(2), counter=2),
           B[0].retire_terminal("ecd-04", T[4].public_bytes()),
           B[0].add_terminal("ecd-05", T[5].public_bytes())]
    block = make_block(state, txs)
    first = validate_block(state, block)
    assert first == validate_block(state, block) == Verdict(True, None, (None, None, None))
    assert (state.tip, state.meter(METER), state.active_terminals(), state.meter_count) == before


def test_proposed_timestamp_stays_above_the_parent() -> None:
    state = fresh()
    block = propose_block(state, T[0], [], timestamp_ms=5)  # a clock behind the chain
    assert block.header.timestamp_ms == state.tip.timestamp_ms + 1
    with pytest.raises(ValueError, match="genesis"):
        propose_block(LedgerState(), T[0], [], timestamp_ms=5)


def test_pow_sealed_blocks_pass_when_the_chain_demands_pow() -> None:
    state = fresh()
    block = make_block(state, [], difficulty=8)
    assert validate_block(state, block, require_pow=8).block_ok


# ----------------------------------------------------------------- quorum


def _founded_by(n: int) -> LedgerState:
    state = LedgerState()
    g = genesis(T[0], [(t.terminal_id, t.public_bytes()) for t in T[:n]], timestamp_ms=1,
                endorsers=T[:n])
    apply_block(state, g, validate_block(state, g))
    return state


def test_two_of_four_endorsements_are_too_few() -> None:
    state = _founded_by(4)
    assert block_reason(state, make_block(state, [], endorsers=T[:2])) == \
        Reason.TOO_FEW_ENDORSEMENTS


def test_three_of_four_endorsements_are_enough() -> None:
    state = _founded_by(4)
    assert validate_block(state, make_block(state, [], endorsers=T[1:4])).block_ok


def test_three_of_five_endorsements_are_enough() -> None:
    state = fresh()
    assert validate_block(state, make_block(state, [], endorsers=[T[0], T[3], T[4]])).block_ok


def test_two_of_five_endorsements_are_too_few() -> None:
    state = fresh()
    assert block_reason(state, make_block(state, [], endorsers=T[3:5])) == \
        Reason.TOO_FEW_ENDORSEMENTS


def test_a_retired_terminals_endorsement_does_not_count() -> None:
    state = fresh()
    commit(state, [B[0].retire_terminal("ecd-04", T[4].public_bytes())])
    assert state.active_count == 4
    with_retired = make_block(state, [], endorsers=[T[0], T[1], T[4]])
    assert block_reason(state, with_retired) == Reason.TOO_FEW_ENDORSEMENTS
    assert validate_block(state, make_block(state, [], endorsers=T[:3])).block_ok


def test_membership_changes_take_effect_from_the_next_block() -> None:
    state = fresh()
    add = B[0].add_terminal("ecd-05", T[5].public_bytes())
    early = B[5].register(METER, key_version=1, fingerprint=fp(1), counter=1)
    assert codes(state, [add, early]) == (None, Reason.UNKNOWN_PROPOSER)
    assert block_reason(state, make_block(state, [add], endorsers=[T[0], T[1], T[5]])) == \
        Reason.UNKNOWN_ENDORSER
    commit(state, [add])
    assert state.active_count == 6 and state.terminal("ecd-05").added_height == 1
    # now 6 active: 3 are not more than half, 4 are
    assert block_reason(state, make_block(state, [early], endorsers=T[:3])) == \
        Reason.TOO_FEW_ENDORSEMENTS
    assert codes(state, [early], proposer=T[5], endorsers=T[2:6]) == (None,)


def test_a_retiring_terminal_still_acts_within_its_retire_block() -> None:
    state = fresh()
    retire = B[0].retire_terminal("ecd-04", T[4].public_bytes())
    reg = B[4].register(METER, key_version=1, fingerprint=fp(1), counter=1)
    assert codes(state, [retire, reg]) == (None, Reason.UNKNOWN_TERMINAL)  # not a home any more
    add_by_leaving = B[4].add_terminal("ecd-06", T[6].public_bytes())
    assert codes(state, [retire, add_by_leaving]) == (None, None)
    commit(state, [retire])
    assert state.terminal("ecd-04").retired_height == 1 and not state.is_active("ecd-04")


# ------------------------------------------------------- block-level reasons


def test_undecodable_block_bytes_are_rejected_as_bad_encoding() -> None:
    state = fresh()
    data = encode_block(make_block(state, []))
    block, verdict = validate_block_bytes(state, data + b"\x00")
    assert block is None and verdict.block_reason is Reason.BAD_ENCODING
    assert validate_block_bytes(state, b"")[1].block_reason is Reason.BAD_ENCODING


def test_block_of_another_version_is_rejected_as_wrong_version() -> None:
    state = fresh()
    data = encode_block(make_block(state, []))
    assert validate_block_bytes(state, b"\x02" + data[1:])[1].block_reason is Reason.WRONG_VERSION


def test_tx_of_another_version_inside_a_block_is_rejected_as_wrong_version() -> None:
    state = fresh()
    tx = B[1].register(METER, key_version=1, fingerprint=fp(1), counter=1)
    block = make_block(state, [tx])
    data = bytearray(encode_block(block))
    tx_at = len(data) - len(encode_tx(tx))  # the body's only tx is last
    assert data[tx_at] == 1
    data[tx_at] = 2
    assert validate_block_bytes(state, bytes(data))[1].block_reason is Reason.WRONG_VERSION


def test_block_at_the_wrong_height_is_rejected() -> None:
    state = fresh()
    block = build_block(T[0], height=2, prev_hash=state.tip.block_hash, timestamp_ms=5_000,
                        txs=[])
    block = with_endorsements(block, [endorse(t, block.header) for t in T[:3]])
    assert block_reason(state, block) is Reason.WRONG_HEIGHT


def test_block_on_another_parent_is_rejected() -> None:
    state = fresh()
    block = build_block(T[0], height=1, prev_hash=b"\x01" * 32, timestamp_ms=5_000, txs=[])
    block = with_endorsements(block, [endorse(t, block.header) for t in T[:3]])
    assert block_reason(state, block) is Reason.WRONG_PREV_HASH


def test_block_not_after_its_parent_in_time_is_rejected() -> None:
    state = fresh()
    block = build_block(T[0], height=1, prev_hash=state.tip.block_hash,
                        timestamp_ms=state.tip.timestamp_ms, txs=[])
    block = with_endorsements(block, [endorse(t, block.header) for t in T[:3]])
    assert block_reason(state, block) is Reason.TIMESTAMP_NOT_MONOTONIC


def test_block_from_an_unknown_proposer_is_rejected() -> None:
    state = fresh()
    assert block_reason(state, make_block(state, [], proposer=OUTSIDER)) is \
        Reason.UNKNOWN_PROPOSER


def test_block_from_a_retired_proposer_is_rejected() -> None:
    state = fresh()
    commit(state, [B[0].retire_terminal("ecd-04", T[4].public_bytes())])
    assert block_reason(state, make_block(state, [], proposer=T[4])) is Reason.RETIRED_PROPOSER


def test_block_whose_root_does_not_match_its_body_is_rejected() -> None:
    state = fresh()
    tx = B[1].register(METER, key_version=1, fingerprint=fp(1), counter=1)
    block = make_block(state, [tx])
    forged = replace(block.header, merkle_root=hashlib.sha256(b"other").digest())
    forged_block = Block(forged, block.txs, tuple(endorse(t, forged) for t in T[:3]))
    assert block_reason(state, forged_block) is Reason.WRONG_MERKLE_ROOT
    swapped = Block(block.header, (B[1].register(METER, key_version=2, fingerprint=fp(2),
                                                 counter=1),), block.endorsements)
    assert block_reason(state, swapped) is Reason.WRONG_MERKLE_ROOT
    miscounted = replace(block.header, tx_count=2)
    assert block_reason(state, Block(miscounted, block.txs,
                                     tuple(endorse(t, miscounted) for t in T[:3]))) is \
        Reason.WRONG_MERKLE_ROOT


def test_block_without_the_required_pow_is_rejected() -> None:
    state = fresh()
    assert block_reason(state, make_block(state, []), require_pow=8) is Reason.BAD_POW
    sealed = make_block(state, [], difficulty=8)
    missed = replace(sealed.header, nonce=sealed.header.nonce + 1)
    while check_pow(missed):
        missed = replace(missed, nonce=missed.nonce + 1)
    bad = Block(missed, (), tuple(endorse(t, missed) for t in T[:3]))
    assert block_reason(state, bad) is Reason.BAD_POW  # claims 8 bits, has fewer
    assert seal(missed, 8) == sealed.header


def test_block_with_too_many_transactions_is_rejected() -> None:
    state = fresh()
    tx = B[1].register(METER, key_version=1, fingerprint=fp(1), counter=1)
    block = make_block(state, [tx])
    big = Block(block.header, (tx,) * (MAX_TXS_PER_BLOCK + 1), block.endorsements)
    assert block_reason(state, big) is Reason.BLOCK_TOO_LARGE


def test_block_with_too_many_endorsements_is_rejected() -> None:
    state = fresh()
    block = make_block(state, [])
    e = block.endorsements[0]
    big = Block(block.header, (), (e,) * (MAX_ENDORSEMENTS + 1))
    assert block_reason(state, big) is Reason.BLOCK_TOO_LARGE


def test_block_with_a_forged_endorsement_is_rejected() -> None:
    state = fresh()
    block = make_block(state, [])
    other = make_block(state, [], proposer=T[1])
    forged = (*block.endorsements[:2], Endorsement("ecd-03", other.endorsements[0].signature))
    assert block_reason(state, Block(block.header, (), forged)) is \
        Reason.BAD_ENDORSEMENT_SIGNATURE


def test_block_endorsed_twice_by_one_terminal_is_rejected() -> None:
    state = fresh()
    block = make_block(state, [], endorsers=[T[0], T[1], T[1]])
    assert block_reason(state, block) is Reason.DUPLICATE_ENDORSER


def test_block_endorsed_by_a_stranger_is_rejected() -> None:
    state = fresh()
    block = make_block(state, [], endorsers=[T[0], T[1], T[2], OUTSIDER])
    assert block_reason(state, block) is Reason.UNKNOWN_ENDORSER


def test_block_with_too_few_endorsements_is_rejected() -> None:
    state = fresh()
    assert block_reason(state, make_block(state, [], endorsers=[])) is \
        Reason.TOO_FEW_ENDORSEMENTS


# ---------------------------------------------------------------- genesis


def _genesis(txs: Sequence[Transaction], *, proposer: TerminalIdentity = T[0],
             endorsers: Sequence[TerminalIdentity] = tuple(T[:3]), height: int = 0,
             prev_hash: bytes = ZERO_HASH) -> Block:
    block = build_block(proposer, height=height, prev_hash=prev_hash, timestamp_ms=1, txs=txs)
    return with_endorsements(block, [endorse(e, block.header) for e in endorsers])


def test_genesis_defines_the_founding_membership() -> None:
    state = LedgerState()
    verdict = validate_block(state, GENESIS)
    assert verdict == Verdict(True, None, (None,) * 5)
    changes = apply_block(state, GENESIS, verdict)
    assert [c.terminal_id for c in changes.terminals] == [t.terminal_id for t in T[:5]]
    assert state.terminal("ecd-03").public_key == T[3].public_bytes()
    assert state.terminal("ecd-03").added_height == 0


def test_genesis_with_a_key_operation_is_rejected() -> None:
    txs = [*GENESIS.txs, B[0].register(METER, key_version=1, fingerprint=fp(1), counter=1)]
    assert block_reason(LedgerState(), _genesis(txs)) is Reason.BAD_GENESIS
    assert block_reason(LedgerState(), _genesis([])) is Reason.BAD_GENESIS


def test_genesis_is_only_accepted_as_the_first_block() -> None:
    assert block_reason(fresh(), GENESIS) is Reason.WRONG_HEIGHT
    assert block_reason(LedgerState(), _genesis(GENESIS.txs, height=1)) is Reason.WRONG_HEIGHT
    assert block_reason(LedgerState(), _genesis(GENESIS.txs, prev_hash=b"\x01" * 32)) is \
        Reason.WRONG_PREV_HASH


def test_genesis_needs_a_majority_of_its_founders() -> None:
    assert block_reason(LedgerState(), _genesis(GENESIS.txs, endorsers=T[:2])) is \
        Reason.TOO_FEW_ENDORSEMENTS
    assert block_reason(LedgerState(), _genesis(GENESIS.txs, endorsers=[*T[:3], OUTSIDER])) is \
        Reason.UNKNOWN_ENDORSER


def test_genesis_proposed_by_a_non_founder_is_rejected() -> None:
    assert block_reason(LedgerState(), _genesis(GENESIS.txs, proposer=OUTSIDER)) is \
        Reason.UNKNOWN_PROPOSER
    foreign = TxBuilder(OUTSIDER).add_terminal("ecd-05", T[5].public_bytes())
    assert block_reason(LedgerState(), _genesis([*GENESIS.txs, foreign])) is \
        Reason.UNKNOWN_PROPOSER


def test_genesis_naming_a_founder_twice_is_rejected() -> None:
    again = B[0].add_terminal("ecd-01", T[6].public_bytes())
    assert block_reason(LedgerState(), _genesis([*GENESIS.txs, again])) is \
        Reason.TERMINAL_EXISTS
    same_key = B[0].add_terminal("ecd-06", T[1].public_bytes())
    assert block_reason(LedgerState(), _genesis([*GENESIS.txs, same_key])) is \
        Reason.TERMINAL_EXISTS


def test_genesis_with_a_bad_tx_signature_is_rejected() -> None:
    txs = list(GENESIS.txs)
    txs[2] = replace(txs[2], signature=txs[3].signature)
    assert block_reason(LedgerState(), _genesis(txs)) is Reason.BAD_TX_SIGNATURE
    assert block_reason(LedgerState(), _genesis([*GENESIS.txs, GENESIS.txs[0]])) is \
        Reason.DUPLICATE_TX


# --------------------------------------------------- transaction-level reasons


def test_tx_from_an_unknown_proposer_is_rejected() -> None:
    state = fresh()
    tx = TxBuilder(OUTSIDER).register(METER, key_version=1, fingerprint=fp(1), counter=1)
    assert codes(state, [tx]) == (Reason.UNKNOWN_PROPOSER,)


def test_tx_from_a_retired_proposer_is_rejected() -> None:
    state = fresh()
    commit(state, [B[0].retire_terminal("ecd-04", T[4].public_bytes())])
    tx = B[4].register(METER, key_version=1, fingerprint=fp(1), counter=1)
    assert codes(state, [tx]) == (Reason.RETIRED_PROPOSER,)


def test_tx_with_a_bad_signature_is_rejected() -> None:
    state = fresh()
    tx = B[1].register(METER, key_version=1, fingerprint=fp(1), counter=1)
    other = B[1].register(METER, key_version=1, fingerprint=fp(1), counter=2)
    assert codes(state, [replace(tx, signature=other.signature)]) == (Reason.BAD_TX_SIGNATURE,)
    forged = replace(tx, proposer="ecd-02", home="ecd-02")  # claims another proposer
    assert codes(state, [forged]) == (Reason.BAD_TX_SIGNATURE,)


def test_the_same_tx_twice_in_a_block_is_rejected_the_second_time() -> None:
    state = fresh()
    tx = B[1].register(METER, key_version=1, fingerprint=fp(1), counter=1)
    assert codes(state, [tx, tx]) == (None, Reason.DUPLICATE_TX)


def test_register_of_a_live_meter_is_rejected() -> None:
    state = fresh()
    live_meter(state)
    tx = B[2].register(METER, key_version=5, fingerprint=fp(5), counter=9)
    assert codes(state, [tx]) == (Reason.REGISTER_LIVE_METER,)


def test_register_naming_another_home_is_rejected() -> None:
    state = fresh()
    tx = make_tx(T[1], TxKind.REGISTER, meter_id=METER, key_version=1, fingerprint=fp(1),
                 home="ecd-02", counter=1)
    assert codes(state, [tx]) == (Reason.WRONG_HOME,)


def test_rotate_of_an_unknown_meter_is_rejected() -> None:
    state = fresh()
    tx = B[1].rotate(METER, key_version=2, fingerprint=fp(2), proof=proof(2), counter=2)
    assert codes(state, [tx]) == (Reason.UNKNOWN_METER,)


def test_revoke_and_migrate_of_an_unknown_meter_are_rejected() -> None:
    state = fresh()
    assert codes(state, [B[1].revoke(METER, key_version=1, counter=2),
                         B[2].migrate(METER, new_home="ecd-02", key_version=1,
                                      fingerprint=fp(1), counter=2)]) == \
        (Reason.UNKNOWN_METER, Reason.UNKNOWN_METER)


def test_rotate_skipping_or_repeating_a_version_is_rejected() -> None:
    state = fresh()
    live_meter(state, version=3)
    skip = B[1].rotate(METER, key_version=5, fingerprint=fp(5), proof=proof(5), counter=2)
    same = B[1].rotate(METER, key_version=3, fingerprint=fp(6), proof=proof(6), counter=3)
    assert codes(state, [skip, same]) == (Reason.STALE_VERSION, Reason.STALE_VERSION)


def test_revoke_of_another_version_is_rejected() -> None:
    state = fresh()
    live_meter(state, version=3)
    assert codes(state, [B[1].revoke(METER, key_version=2, counter=2)]) == \
        (Reason.STALE_VERSION,)


def test_register_after_revoke_must_start_above_the_last_version() -> None:
    state = fresh()
    revoked_meter(state)
    back = B[1].register(METER, key_version=1, fingerprint=fp(7), counter=3)
    assert codes(state, [back]) == (Reason.STALE_VERSION,)
    assert codes(state, [replace_version(back, 2)]) == (None,)


def replace_version(tx: Transaction, version: int) -> Transaction:
    return make_tx(T[[t.terminal_id for t in T].index(tx.proposer)], tx.kind,
                   meter_id=tx.meter_id, key_version=version, fingerprint=tx.fingerprint,
                   home=tx.home, proof=tx.proof, counter=tx.counter)


def test_migrate_restating_another_key_is_rejected() -> None:
    state = fresh()
    live_meter(state)
    tx = B[1].migrate(METER, new_home="ecd-02", key_version=1, fingerprint=fp(9), counter=2)
    assert codes(state, [tx]) == (Reason.STALE_VERSION,)


def test_rotate_with_replayed_counter_is_rejected() -> None:
    """Injected: the committed rotate, sent again in a later block. Survives: the key line."""
    state = fresh()
    live_meter(state, counter=7)
    rot = B[1].rotate(METER, key_version=2, fingerprint=fp(2), proof=proof(2), counter=8)
    commit(state, [rot])
    assert codes(state, [rot]) == (Reason.REPLAYED_COUNTER,)
    equal = B[1].rotate(METER, key_version=3, fingerprint=fp(3), proof=proof(3), counter=8)
    assert codes(state, [equal]) == (Reason.REPLAYED_COUNTER,)
    assert state.meter(METER).key_version == 2


def test_revoke_migrate_and_reregister_with_replayed_counter_are_rejected() -> None:
    state = fresh()
    live_meter(state, counter=7)
    assert codes(state, [B[1].revoke(METER, key_version=1, counter=7),
                         B[1].migrate(METER, new_home="ecd-02", key_version=1,
                                      fingerprint=fp(1), counter=6)]) == \
        (Reason.REPLAYED_COUNTER, Reason.REPLAYED_COUNTER)
    commit(state, [B[1].revoke(METER, key_version=1, counter=8)])
    again = B[1].register(METER, key_version=2, fingerprint=fp(2), counter=8)
    assert codes(state, [again]) == (Reason.REPLAYED_COUNTER,)


def test_rotate_without_a_proof_is_rejected() -> None:
    state = fresh()
    live_meter(state)
    tx = B[1].rotate(METER, key_version=2, fingerprint=fp(2), proof=ZERO_HASH, counter=2)
    assert codes(state, [tx]) == (Reason.BAD_PROOF,)


def test_rotate_whose_proof_the_home_does_not_attest_is_rejected() -> None:
    state = fresh()
    live_meter(state)
    tx = B[1].rotate(METER, key_version=2, fingerprint=fp(2), proof=proof(2), counter=2)
    held = {METER: proof(3)}  # the wrapped blob the home terminal actually received
    assert codes(state, [tx], attest_proof=lambda t: held[t.meter_id] == t.proof) == \
        (Reason.BAD_PROOF,)
    held[METER] = proof(2)
    assert codes(state, [tx], attest_proof=lambda t: held[t.meter_id] == t.proof) == (None,)


def test_operator_revoke_with_zero_proof_is_not_sent_to_the_attestor() -> None:
    state = fresh()
    live_meter(state)
    asked: list[Transaction] = []
    revoke = B[1].revoke(METER, key_version=1, counter=2)
    assert codes(state, [revoke], attest_proof=lambda t: asked.append(t) or False) == (None,)
    assert asked == []
    meter_revoke = B[1].revoke(METER, key_version=1, counter=2, proof=proof(0))
    assert codes(state, [meter_revoke], attest_proof=lambda t: False) == (Reason.BAD_PROOF,)


def test_anything_but_register_on_a_revoked_meter_is_rejected() -> None:
    state = fresh()
    revoked_meter(state)
    txs = [B[1].rotate(METER, key_version=2, fingerprint=fp(2), proof=proof(2), counter=3),
           B[1].revoke(METER, key_version=1, counter=4),
           B[2].migrate(METER, new_home="ecd-02", key_version=1, fingerprint=fp(1), counter=5)]
    assert codes(state, txs) == (Reason.REVOKED_METER,) * 3


def test_rotate_proposed_by_another_terminal_is_rejected() -> None:
    state = fresh()
    live_meter(state, home=1)
    by_other = B[2].rotate(METER, key_version=2, fingerprint=fp(2), proof=proof(2), counter=2)
    naming_other = make_tx(T[1], TxKind.ROTATE, meter_id=METER, key_version=2,
                           fingerprint=fp(2), home="ecd-02", proof=proof(2), counter=2)
    assert codes(state, [by_other, naming_other]) == (Reason.WRONG_HOME, Reason.WRONG_HOME)


def test_revoke_proposed_by_another_terminal_is_rejected() -> None:
    state = fresh()
    live_meter(state, home=1)
    assert codes(state, [B[3].revoke(METER, key_version=1, counter=2)]) == (Reason.WRONG_HOME,)


def test_migrate_proposed_by_neither_home_is_rejected() -> None:
    state = fresh()
    live_meter(state, home=1)
    tx = make_tx(T[4], TxKind.MIGRATE, meter_id=METER, key_version=1, fingerprint=fp(1),
                 home="ecd-02", counter=2)
    assert codes(state, [tx]) == (Reason.WRONG_HOME,)
    by_old_home = B[1].migrate(METER, new_home="ecd-02", key_version=1, fingerprint=fp(1),
                               counter=2)
    assert codes(state, [by_old_home]) == (None,)


def test_migrate_to_the_current_home_is_rejected() -> None:
    state = fresh()
    live_meter(state, home=1)
    tx = B[1].migrate(METER, new_home="ecd-01", key_version=1, fingerprint=fp(1), counter=2)
    assert codes(state, [tx]) == (Reason.MIGRATE_SAME_HOME,)


def test_migrate_away_from_placements_choice_is_rejected() -> None:
    state = fresh()
    live_meter(state, home=1)
    tx = B[1].migrate(METER, new_home="ecd-02", key_version=1, fingerprint=fp(1), counter=2)
    assert codes(state, [tx], placement_home=lambda m: "ecd-03") == \
        (Reason.MIGRATE_NOT_PLACEMENT_HOME,)
    assert codes(state, [tx], placement_home=lambda m: None) == \
        (Reason.MIGRATE_NOT_PLACEMENT_HOME,)
    assert codes(state, [tx], placement_home=lambda m: "ecd-02") == (None,)


def test_a_new_home_cannot_take_a_live_meter_from_an_active_home() -> None:
    """Injected: ecd-02 proposes to move ecd-01's meter to itself while ecd-01 is active.

    Before, either home could propose a MIGRATE, so any terminal could take
    any meter (and its key hand-over). Now only the old home gives a meter
    away, unless placement names the new home or the old one is retired.
    """
    state = fresh()
    live_meter(state, home=1)
    grab = B[2].migrate(METER, new_home="ecd-02", key_version=1, fingerprint=fp(1), counter=2)
    assert codes(state, [grab]) == (Reason.WRONG_HOME,)
    assert codes(state, [grab], placement_home=lambda m: "ecd-03") == (Reason.WRONG_HOME,)
    assert codes(state, [grab], placement_home=lambda m: "ecd-02") == (None,)
    commit(state, [B[0].retire_terminal("ecd-01", T[1].public_bytes())])
    # the old home is gone: the new one takes it (endorsed by a majority of the four left)
    assert codes(state, [grab], endorsers=(T[0], T[2], T[3])) == (None,)


def test_a_rotation_back_to_the_key_in_force_is_rejected() -> None:
    """Injected: a ROTATE whose new key is the current one (version + 1, same fingerprint)."""
    state = fresh()
    live_meter(state)
    same = B[1].rotate(METER, key_version=2, fingerprint=fp(1), proof=proof(2), counter=2)
    assert codes(state, [same]) == (Reason.KEY_REUSED,)
    new = B[1].rotate(METER, key_version=2, fingerprint=fp(2), proof=proof(2), counter=2)
    assert codes(state, [new]) == (None,)


def test_a_genesis_other_than_the_provisioned_one_is_refused() -> None:
    """Injected: a well-formed, well-endorsed genesis of another fleet (other founders)."""
    other = genesis(T[5], [(t.terminal_id, t.public_bytes()) for t in (T[5], T[4])],
                    timestamp_ms=1, endorsers=[T[5], T[4]])
    pinned = header_hash(GENESIS.header)
    empty = LedgerState()
    assert validate_block(empty, GENESIS, genesis_hash=pinned).block_ok
    assert validate_block(empty, other).block_ok  # self-consistent on its own
    assert block_reason(empty, other, genesis_hash=pinned) is Reason.FOREIGN_GENESIS
    assert check_proposal(empty, other, genesis_hash=pinned).block_reason is \
        Reason.FOREIGN_GENESIS


def test_migrate_to_a_terminal_that_is_not_active_is_rejected() -> None:
    state = fresh()
    live_meter(state, home=1)
    to_stranger = B[1].migrate(METER, new_home="outsider", key_version=1, fingerprint=fp(1),
                               counter=2)
    assert codes(state, [to_stranger]) == (Reason.UNKNOWN_TERMINAL,)
    retire = B[0].retire_terminal("ecd-03", T[3].public_bytes())
    to_leaving = B[1].migrate(METER, new_home="ecd-03", key_version=1, fingerprint=fp(1),
                              counter=2)
    assert codes(state, [retire, to_leaving]) == (None, Reason.UNKNOWN_TERMINAL)


def test_meters_of_a_retired_home_move_by_a_migrate_from_the_new_home() -> None:
    state = fresh()
    live_meter(state, home=4)
    commit(state, [B[0].retire_terminal("ecd-04", T[4].public_bytes())])
    rot = B[4].rotate(METER, key_version=2, fingerprint=fp(2), proof=proof(2), counter=2)
    assert codes(state, [rot]) == (Reason.RETIRED_PROPOSER,)
    commit(state, [B[2].migrate(METER, new_home="ecd-02", key_version=1, fingerprint=fp(1),
                                counter=2)])
    assert state.meter(METER).home == "ecd-02"


def test_adding_an_existing_terminal_is_rejected() -> None:
    state = fresh()
    new_key = ident("fresh-key").public_bytes()
    assert codes(state, [B[0].add_terminal("ecd-01", new_key),
                         B[0].add_terminal("ecd-09", T[1].public_bytes())]) == \
        (Reason.TERMINAL_EXISTS, Reason.TERMINAL_EXISTS)
    twice = B[0].add_terminal("ecd-05", T[5].public_bytes())
    assert codes(state, [twice, B[1].add_terminal("ecd-05", T[5].public_bytes())]) == \
        (None, Reason.TERMINAL_EXISTS)


def test_a_retired_terminal_cannot_be_added_back() -> None:
    """Injected: the signed genesis ADD of a terminal, replayed after its retirement."""
    state = fresh()
    commit(state, [B[0].retire_terminal("ecd-04", T[4].public_bytes())])
    replayed = GENESIS.txs[4]
    assert replayed == B[0].add_terminal("ecd-04", T[4].public_bytes())  # Ed25519: same bytes
    assert codes(state, [replayed]) == (Reason.TERMINAL_EXISTS,)


def test_retiring_an_unknown_or_retired_terminal_is_rejected() -> None:
    state = fresh()
    unknown = B[0].retire_terminal("ecd-77", T[6].public_bytes())
    retire = B[0].retire_terminal("ecd-04", T[4].public_bytes())
    assert codes(state, [unknown, retire, B[1].retire_terminal("ecd-04", T[4].public_bytes())]) \
        == (Reason.UNKNOWN_TERMINAL, None, Reason.UNKNOWN_TERMINAL)
    commit(state, [retire])
    assert codes(state, [B[1].retire_terminal("ecd-04", T[4].public_bytes())]) == \
        (Reason.UNKNOWN_TERMINAL,)


def test_retiring_with_another_terminals_key_is_rejected() -> None:
    state = fresh()
    assert codes(state, [B[0].retire_terminal("ecd-04", T[3].public_bytes())]) == \
        (Reason.TERMINAL_KEY_MISMATCH,)


def test_retiring_the_last_terminal_is_rejected() -> None:
    state = _founded_by(2)
    both = [B[0].retire_terminal("ecd-01", T[1].public_bytes()),
            B[0].retire_terminal("ecd-00", T[0].public_bytes())]
    assert codes(state, both, endorsers=T[:2]) == (None, Reason.LAST_TERMINAL)
    solo = _founded_by(1)
    assert codes(solo, [B[0].retire_terminal("ecd-00", T[0].public_bytes())],
                 endorsers=T[:1]) == (Reason.LAST_TERMINAL,)


def test_adding_past_the_membership_cap_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap is 1024 (one endorsement each per block); lowered here to 6 to reach it."""
    monkeypatch.setattr(rules, "MAX_ACTIVE_TERMINALS", 6)
    state = fresh()
    assert codes(state, [B[0].add_terminal("ecd-05", T[5].public_bytes()),
                         B[0].add_terminal("ecd-06", T[6].public_bytes())]) == \
        (None, Reason.TOO_MANY_TERMINALS)


# ------------------------------------------------------------------- apply


def test_apply_refuses_a_rejected_block() -> None:
    state = fresh()
    block = make_block(state, [], endorsers=[])
    verdict = validate_block(state, block)
    with pytest.raises(ValueError, match="rejected"):
        apply_block(state, block, verdict)
    assert state.tip.height == 0


def test_apply_refuses_a_verdict_for_another_block() -> None:
    state = fresh()
    empty = make_block(state, [])
    one = make_block(state, [B[1].register(METER, key_version=1, fingerprint=fp(1), counter=1)])
    with pytest.raises(ValueError, match="another block"):
        apply_block(state, one, validate_block(state, empty))


def test_apply_refuses_a_block_that_does_not_extend_the_tip() -> None:
    state = fresh()
    block = make_block(state, [])
    verdict = validate_block(state, block)
    apply_block(state, block, verdict)
    with pytest.raises(ValueError, match="tip"):
        apply_block(state, block, verdict)
    assert state.tip.height == 1


def test_every_reason_has_a_test_here() -> None:
    """Each Reason is asserted by name somewhere in this file."""
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    missing = [r.name for r in Reason if f"Reason.{r.name}" not in source]
    assert missing == []


# ------------------------------------------------------------------- state


def test_meter_entries_survive_packing_with_their_record_id() -> None:
    """The storage layer stamps each entry with its flash record id (``seq``)."""
    state = fresh()
    entry = MeterEntry(MeterStatus.LIVE, 2**32 - 1, fp(1), "ecd-04", 2**64 - 1, 2**64 - 1,
                       MAX_TXS_PER_BLOCK - 1, seq=2**64 - 1)
    state.put_meter(METER, entry)
    assert state.meter(METER) == entry
    assert list(state.meter_ids()) == [METER] and state.meter(b"other") is None
    with pytest.raises(KeyError):
        state.put_meter(METER, entry._replace(home="outsider"))


def test_state_lists_terminals_in_the_order_added_and_can_be_replaced() -> None:
    state = fresh()
    commit(state, [B[0].retire_terminal("ecd-01", T[1].public_bytes()),
                   B[0].add_terminal("ecd-05", T[5].public_bytes())])
    order = [(i.terminal_id, i.added_height, i.retired_height)
             for i in state.terminals_in_order()]
    assert order == [("ecd-00", 0, None), ("ecd-01", 0, 1), ("ecd-02", 0, None),
                     ("ecd-03", 0, None), ("ecd-04", 0, None), ("ecd-05", 1, None)]
    assert state.terminal_count == 6 and state.active_count == 5
    assert state.key_in_use(T[1].public_bytes()) and not state.key_in_use(T[6].public_bytes())
    other = LedgerState()
    other.replace_with(state)
    assert other.tip == state.tip and other.active_terminals() == state.active_terminals()


def test_an_endorser_refuses_a_membership_change_the_utility_did_not_order() -> None:
    """Injected: a member proposes adding a terminal of its own making, and retiring an
    honest one. Every rule passes (any member may propose either), so without the
    utility's word one compromised member could vote in sockpuppets or vote out the
    honest; the endorser asks its provisioning (``authorise_member``) and refuses."""
    state = fresh()
    puppet = B[0].add_terminal("ecd-09", ident("ecd-09").public_bytes())
    ousted = B[0].retire_terminal("ecd-02", T[2].public_bytes())
    ordered = {tx_id(puppet): False, tx_id(ousted): False}
    assert codes(state, [puppet, ousted]) == (None, None)  # the rules alone let both in
    assert codes(state, [puppet, ousted], authorise_member=lambda tx: ordered[tx_id(tx)]) == \
        (Reason.MEMBER_NOT_AUTHORISED, Reason.MEMBER_NOT_AUTHORISED)
    ordered[tx_id(puppet)] = True
    assert codes(state, [puppet], authorise_member=lambda tx: ordered[tx_id(tx)]) == (None,)
    meters = codes(state, [B[1].register(b"\x01" * 6, key_version=1, fingerprint=fp(1),
                                         counter=1)], authorise_member=lambda tx: False)
    assert meters == (None,)  # asked of membership changes only


def test_an_endorser_refuses_a_stamp_far_ahead_of_its_clock() -> None:
    """Injected: a proposal stamped 2^64-1 ms. The commit rules bound a stamp only by its
    parent's, so once committed no block could follow it; the endorser's clock stops it."""
    state = fresh()
    block = make_block(state, [])
    late = propose_block(state, T[0], [], timestamp_ms=2**64 - 1)
    now = block.header.timestamp_ms
    assert check_proposal(state, block, now_ms=now).block_ok
    assert check_proposal(state, late, now_ms=now).block_reason is Reason.TIMESTAMP_IN_FUTURE
    within = propose_block(state, T[0], [], timestamp_ms=now + rules.MAX_CLOCK_SKEW_MS)
    assert check_proposal(state, within, now_ms=now).block_ok
    assert check_proposal(state, late).block_ok  # without a clock (at commit) it cannot tell


# -------------------------------------------------------------- checkpoints

def test_a_checkpoint_of_the_parent_state_by_the_proposer_commits_and_changes_nothing() -> None:
    state = fresh()
    live_meter(state)
    before = state.digest()
    tip = state.tip
    cp = B[0].checkpoint(tip.height, before)
    verdict = commit(state, [cp, B[2].register(b"\x01" * 6, key_version=1, fingerprint=fp(2),
                                               counter=1)])
    assert verdict.tx_codes == (None, None)
    assert state.meter(METER) is not None and state.tip.height == tip.height + 1
    encoded = decode_tx(encode_tx(cp))
    assert encoded == cp and encoded.kind is TxKind.CHECKPOINT


def test_a_checkpoint_with_a_wrong_digest_height_signer_or_twice_is_refused() -> None:
    state = fresh()
    live_meter(state)
    d, h = state.digest(), state.tip.height
    wrong = hashlib.sha256(b"another state").digest()
    assert codes(state, [B[0].checkpoint(h, wrong)]) == (Reason.BAD_CHECKPOINT,)
    assert codes(state, [B[0].checkpoint(h - 1, d)]) == (Reason.BAD_CHECKPOINT,)
    # only the block's proposer (T[0] here) may state the digest
    assert codes(state, [B[1].checkpoint(h, d)]) == (Reason.BAD_CHECKPOINT,)
    assert codes(state, [B[0].checkpoint(h, d), B[0].checkpoint(h, d)]) == \
        (None, Reason.DUPLICATE_TX)
    forged = replace(B[0].checkpoint(h, d), signature=bytes(64))
    assert codes(state, [forged]) == (Reason.BAD_TX_SIGNATURE,)
    with pytest.raises(LedgerValueError):
        Transaction(TxKind.CHECKPOINT, "ecd-00", counter=1, fingerprint=ZERO_HASH)
