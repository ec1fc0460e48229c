"""Block headers, endorsement lists, blocks: one encoding each, PoW seal, caps, genesis."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.ledger.block import (
    FLASH_RECORD_MAX,
    MAX_BLOCK_BYTES,
    MAX_ENDORSEMENTS,
    MAX_HEAD_BYTES,
    MAX_HEADER_BYTES,
    MAX_TXS_PER_BLOCK,
    PAPER_DIFFICULTY,
    Block,
    BlockHeader,
    Endorsement,
    body_root,
    build_block,
    check_pow,
    decode_block,
    decode_endorsements,
    decode_head,
    decode_header,
    encode_block,
    encode_endorsements,
    encode_head,
    encode_header,
    endorse,
    genesis,
    header_hash,
    leading_zero_bits,
    seal,
    verify_endorsement,
    with_endorsements,
)
from agent.ledger.codec import (
    TERMINAL_ID_MAX,
    ZERO_HASH,
    DecodeError,
    LedgerValueError,
    VersionError,
)
from agent.ledger.identity import TerminalIdentity
from agent.ledger.merkle import MerkleTree, leaf_hash, verify_inclusion
from agent.ledger.rules import apply_block, propose_block, validate_block, validate_block_bytes
from agent.ledger.state import LedgerState
from agent.ledger.tx import MAX_TX_BYTES, Transaction, TxBuilder, TxKind, encode_tx, tx_id
from emulator.flash import RamBlockDevice
from hal.errors import LocalProtocolError
from hal.ids import MeterId, TerminalId
from hal.recordlog import RecordLog

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"


def ident(name: str) -> TerminalIdentity:
    return TerminalIdentity.from_seed(name, hashlib.sha256(b"test-key/" + name.encode()).digest())


IDS = [ident(f"ecd-{i:02d}") for i in range(5)]
MEMBERS = [(i.terminal_id, i.public_bytes()) for i in IDS]
FP = hashlib.sha256(b"edgekey/key-fingerprint/v1" + b"k" * 16).digest()

tids = st.text(alphabet=ALPHABET, min_size=1, max_size=TERMINAL_ID_MAX)
hashes = st.binary(min_size=32, max_size=32)
u64 = st.integers(0, 2**64 - 1)


TX_COUNTS = st.integers(0, MAX_TXS_PER_BLOCK)


def headers(tx_count: st.SearchStrategy[int] = TX_COUNTS) -> st.SearchStrategy[BlockHeader]:
    return st.builds(BlockHeader, height=u64, prev_hash=hashes, timestamp_ms=u64,
                     merkle_root=hashes, tx_count=tx_count, proposer=tids,
                     difficulty=st.integers(0, 255), nonce=u64)


endorsements = st.builds(Endorsement, terminal_id=tids,
                         signature=st.binary(min_size=64, max_size=64))
raw_txs = st.one_of(
    st.builds(lambda p, t, k, s: Transaction(TxKind.TERMINAL_ADD, p, terminal=t, public_key=k,
                                             signature=s),
              tids, tids, hashes, st.binary(min_size=64, max_size=64)),
    st.builds(lambda p, m, v, c, s: Transaction(TxKind.REVOKE, p, meter_id=m, key_version=v,
                                                home=p, counter=c, signature=s),
              tids, st.binary(min_size=1, max_size=16), st.integers(1, 2**32 - 1), u64,
              st.binary(min_size=64, max_size=64)))


@st.composite
def blocks(draw: st.DrawFn) -> Block:
    txs = draw(st.lists(raw_txs, max_size=4))
    header = draw(headers(st.just(len(txs))))
    return Block(header, tuple(txs), tuple(draw(st.lists(endorsements, max_size=4))))


def sample_header(**kw: object) -> BlockHeader:
    fields: dict[str, object] = {"height": 7, "prev_hash": b"\x11" * 32,
                                 "timestamp_ms": 1_700_000_000_000, "merkle_root": b"\x22" * 32,
                                 "tx_count": 0, "proposer": "ecd-00"}
    fields.update(kw)
    return BlockHeader(**fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------ header


def test_header_encodes_to_its_documented_layout() -> None:
    h = sample_header(difficulty=8, nonce=300)
    data = encode_header(h)
    assert data == (b"\x01" + (7).to_bytes(8, "big") + b"\x11" * 32
                    + (1_700_000_000_000).to_bytes(8, "big") + b"\x22" * 32 + b"\x00\x00"
                    + b"\x06ecd-00" + b"\x08" + (300).to_bytes(8, "big"))
    assert header_hash(h) == hashlib.sha256(data).digest()
    assert decode_header(data) == h


@given(headers())
def test_header_round_trips(h: BlockHeader) -> None:
    data = encode_header(h)
    assert len(data) <= MAX_HEADER_BYTES
    assert decode_header(data) == h


@given(st.binary(max_size=140))
def test_any_bytes_decode_to_a_canonical_header_or_raise(data: bytes) -> None:
    try:
        h = decode_header(data)
    except DecodeError:
        return
    assert encode_header(h) == data


def test_header_with_too_many_txs_is_refused() -> None:
    data = bytearray(encode_header(sample_header()))
    data[1 + 8 + 32 + 8 + 32:1 + 8 + 32 + 8 + 32 + 2] = (MAX_TXS_PER_BLOCK + 1).to_bytes(2, "big")
    with pytest.raises(DecodeError) as e:
        decode_header(bytes(data))
    assert (e.value.field, e.value.offset) == ("header.tx_count", 81)
    with pytest.raises(ValueError, match="tx_count"):
        sample_header(tx_count=MAX_TXS_PER_BLOCK + 1)


def test_header_with_another_version_is_a_version_error() -> None:
    data = encode_header(sample_header())
    with pytest.raises(VersionError):
        decode_header(b"\x02" + data[1:])
    with pytest.raises(ValueError, match="version"):
        sample_header(version=2)


@pytest.mark.parametrize(("field", "value"), [
    ("height", -1), ("height", 2**64), ("prev_hash", b"x"), ("merkle_root", b"x" * 33),
    ("proposer", "no spaces"), ("difficulty", 256), ("nonce", 2**64)])
def test_header_refuses_out_of_range_fields(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        sample_header(**{field: value})


# ------------------------------------------------------------ endorsements


def test_endorsements_are_kept_and_encoded_in_canonical_order() -> None:
    h = sample_header()
    es = [endorse(i, h) for i in reversed(IDS)]
    block = Block(h, (), tuple(es))
    assert [e.terminal_id for e in block.endorsements] == sorted(i.terminal_id for i in IDS)
    assert encode_endorsements(es) == encode_endorsements(block.endorsements)
    assert decode_endorsements(encode_endorsements(es)) == block.endorsements


def test_unsorted_endorsement_list_is_refused() -> None:
    a, b = Endorsement("a", b"\x01" * 64), Endorsement("b", b"\x00" * 64)
    good = encode_endorsements([a, b])
    swapped = good[:2] + good[2 + 66:] + good[2:2 + 66]
    with pytest.raises(DecodeError) as e:
        decode_endorsements(swapped)
    assert (e.value.field, e.value.offset) == ("endorsements[1]", 2 + 66)


def test_too_many_endorsements_are_refused() -> None:
    with pytest.raises(DecodeError, match="over the cap"):
        decode_endorsements((MAX_ENDORSEMENTS + 1).to_bytes(2, "big"))
    with pytest.raises(ValueError, match="over the cap"):
        encode_endorsements([Endorsement("a", b"s" * 64)] * (MAX_ENDORSEMENTS + 1))


@given(st.lists(endorsements, max_size=6))
def test_endorsement_list_round_trips(es: list[Endorsement]) -> None:
    data = encode_endorsements(es)
    assert decode_endorsements(data) == tuple(sorted(es, key=lambda e: (e.terminal_id,
                                                                        e.signature)))


def test_endorsement_refuses_a_bad_id_or_signature() -> None:
    with pytest.raises(ValueError, match="terminal_id"):
        Endorsement("", b"s" * 64)
    with pytest.raises(ValueError, match="signature"):
        Endorsement("a", b"s" * 63)
    with pytest.raises(ValueError, match="Endorsement"):
        Block(sample_header(), (), (("a", b"s" * 64),))  # type: ignore[arg-type]


def test_a_block_value_built_wrong_is_our_fault_and_still_a_value_error() -> None:
    for build in (lambda: sample_header(proposer="a b"), lambda: Endorsement("", b"s" * 64),
                  lambda: Block(sample_header(), ("tx",))):  # type: ignore[arg-type]
        with pytest.raises(LedgerValueError) as err:
            build()
        assert isinstance(err.value, LocalProtocolError) and isinstance(err.value, ValueError)


def test_endorsement_verifies_only_for_its_header_and_key() -> None:
    h = sample_header()
    e = endorse(IDS[0], h)
    assert verify_endorsement(IDS[0].public_bytes(), e, header_hash(h))
    assert not verify_endorsement(IDS[1].public_bytes(), e, header_hash(h))
    assert not verify_endorsement(IDS[0].public_bytes(), e, header_hash(sample_header(nonce=1)))


# ------------------------------------------------------------------ blocks


@given(blocks())
def test_block_round_trips(block: Block) -> None:
    data = encode_block(block)
    assert len(data) <= MAX_BLOCK_BYTES
    assert decode_block(data) == block
    head = encode_head(block)
    assert data.startswith(head)
    assert decode_head(head) == (block.header, block.endorsements)


@given(st.binary(max_size=400))
def test_any_bytes_decode_to_a_canonical_block_or_raise(data: bytes) -> None:
    try:
        block = decode_block(data)
    except DecodeError:
        return
    assert encode_block(block) == data


@given(blocks(), st.data())
def test_damaged_blocks_decode_canonically_or_raise(block: Block, data: st.DataObject) -> None:
    """Injected: truncation or one replaced byte anywhere. Survives: canonical value or error."""
    enc = bytearray(encode_block(block))
    i = data.draw(st.integers(0, len(enc) - 1))
    if data.draw(st.booleans()):
        damaged = bytes(enc[:i])
    else:
        enc[i] = data.draw(st.integers(0, 255))
        damaged = bytes(enc)
    try:
        out = decode_block(damaged)
    except DecodeError:
        return
    assert encode_block(out) == damaged


def test_block_body_must_match_the_header_count_to_encode() -> None:
    tx = TxBuilder(IDS[0]).register(b"m", key_version=1, fingerprint=FP, counter=1)
    block = Block(sample_header(tx_count=2), (tx,))
    with pytest.raises(ValueError, match="header says 2"):
        encode_block(block)


def test_block_refuses_unsigned_transactions() -> None:
    tx = Transaction(TxKind.REGISTER, "a", meter_id=b"m", key_version=1, fingerprint=FP,
                     home="a")
    with pytest.raises(ValueError, match="signed"):
        Block(sample_header(tx_count=1), (tx,))


def test_block_with_a_missing_tx_is_refused() -> None:
    txs = [TxBuilder(IDS[0]).register(bytes([i]), key_version=1, fingerprint=FP, counter=1)
           for i in range(2)]
    data = encode_block(build_block(IDS[0], height=1, prev_hash=ZERO_HASH, timestamp_ms=5,
                                    txs=txs))
    with pytest.raises(DecodeError) as e:
        decode_block(data[:-len(encode_tx(txs[1]))])
    assert e.value.field == "tx[1].version"


def test_every_record_fits_one_flash_erase_block() -> None:
    """The storage step writes the head and each transaction as one record each."""
    largest = RecordLog(RamBlockDevice(128 * 1024, 3)).max_payload  # a 128 KiB erase block
    assert MAX_HEAD_BYTES <= FLASH_RECORD_MAX == largest
    assert MAX_TX_BYTES <= FLASH_RECORD_MAX
    worst = Block(sample_header(proposer="p" * 32, tx_count=0), (),
                  tuple(Endorsement(f"{i:032d}", b"s" * 64) for i in range(MAX_ENDORSEMENTS)))
    assert len(encode_head(worst)) == MAX_HEAD_BYTES
    assert MAX_BLOCK_BYTES < 1536 * 1024  # etcd's default request limit


def test_a_transaction_is_proved_in_a_block_from_the_header_alone() -> None:
    """The master station holds one tx record, its audit path and the header."""
    txs = [TxBuilder(IDS[1]).register(bytes([i]), key_version=1, fingerprint=FP, counter=i)
           for i in range(5)]
    block = build_block(IDS[0], height=3, prev_hash=b"\x01" * 32, timestamp_ms=9, txs=txs)
    h = decode_header(encode_header(block.header))
    tree = MerkleTree([tx_id(t) for t in txs])
    assert h.merkle_root == tree.root == body_root(txs)
    record = encode_tx(txs[3])
    leaf = leaf_hash(hashlib.sha256(record).digest())
    assert verify_inclusion(leaf, 3, h.tx_count, tree.inclusion_proof(3), h.merkle_root)
    other = leaf_hash(tx_id(txs[2]))
    assert not verify_inclusion(other, 3, h.tx_count, tree.inclusion_proof(3), h.merkle_root)


# --------------------------------------------------------------------- PoW


def test_seal_at_the_papers_difficulty_finds_the_lowest_nonce() -> None:
    h = seal(sample_header(), PAPER_DIFFICULTY)
    assert h.difficulty == 8
    assert leading_zero_bits(header_hash(h)) >= 8
    assert check_pow(h)
    for nonce in range(h.nonce):
        assert leading_zero_bits(header_hash(replace(h, nonce=nonce))) < 8


def test_check_pow_rejects_a_nonce_that_misses() -> None:
    h = seal(sample_header(height=11), 8)
    misses = [n for n in range(h.nonce + 1, h.nonce + 400)
              if leading_zero_bits(header_hash(replace(h, nonce=n))) < 8]
    assert misses
    assert not check_pow(replace(h, nonce=misses[0]))


def test_difficulty_zero_means_no_seal() -> None:
    h = seal(sample_header(nonce=5), 0)
    assert (h.difficulty, h.nonce) == (0, 0) and check_pow(h)


def test_seal_refuses_difficulties_beyond_reach() -> None:
    with pytest.raises(ValueError):
        seal(sample_header(), 33)


def test_leading_zero_bits_counts_bits() -> None:
    assert leading_zero_bits(b"\x00\x80" + bytes(30)) == 8
    assert leading_zero_bits(b"\x01" + bytes(31)) == 7
    assert leading_zero_bits(bytes(32)) == 256


# ----------------------------------------------------------------- genesis


def test_genesis_adds_the_founders_at_height_zero() -> None:
    g = genesis(IDS[0], MEMBERS, timestamp_ms=1, endorsers=IDS[:3])
    assert (g.header.height, g.header.prev_hash, g.header.proposer) == (0, ZERO_HASH, "ecd-00")
    assert [(t.kind, t.terminal, t.public_key) for t in g.txs] == \
        [(TxKind.TERMINAL_ADD, tid, pk) for tid, pk in MEMBERS]
    assert [e.terminal_id for e in g.endorsements] == ["ecd-00", "ecd-01", "ecd-02"]
    assert decode_block(encode_block(g)) == g


def test_sealed_genesis_carries_its_pow() -> None:
    g = genesis(IDS[0], MEMBERS[:2], timestamp_ms=1, endorsers=IDS[:2], difficulty=8)
    assert g.header.difficulty == 8 and check_pow(g.header)


# ------------------------------------------------- tamper detection by rules


def _chain() -> tuple[LedgerState, Block]:
    state = LedgerState()
    g = genesis(IDS[0], MEMBERS, timestamp_ms=1_000, endorsers=IDS[:3])
    apply_block(state, g, validate_block(state, g))
    b = TxBuilder(IDS[1])
    txs = [b.register(b"meter-a", key_version=1, fingerprint=FP, counter=1),
           TxBuilder(IDS[0]).add_terminal("ecd-99", ident("ecd-99").public_bytes()),
           b.register(b"meter-b", key_version=4, fingerprint=FP, counter=2)]
    block = propose_block(state, IDS[2], txs, timestamp_ms=2_000)
    block = with_endorsements(block, [endorse(i, block.header) for i in IDS[1:4]])
    return state, block


STATE, BLOCK = _chain()
BLOCK_BYTES = encode_block(BLOCK)


def test_a_decoded_block_names_terminals_and_meters_by_their_id_types() -> None:
    block = decode_block(BLOCK_BYTES)
    assert type(block.header.proposer) is TerminalId
    assert all(type(e.terminal_id) is TerminalId for e in block.endorsements)
    assert [type(tx.meter_id) for tx in block.txs if tx.kind.is_meter] == [MeterId, MeterId]


def test_the_state_keys_its_tables_by_plain_ids_whatever_it_is_given() -> None:
    """A MeterId key costs RAM per meter that plain bytes do not (state.py)."""
    state = LedgerState()
    g = genesis(IDS[0], MEMBERS, timestamp_ms=1_000, endorsers=IDS[:3])
    apply_block(state, decode_block(encode_block(g)), validate_block(state, g))
    block = decode_block(BLOCK_BYTES)
    apply_block(state, block, validate_block(state, block))
    assert {type(m) for m in state.meter_ids()} == {bytes}
    assert {type(t.terminal_id) for t in state.terminals_in_order()} == {str}
    assert state.meter(MeterId(b"meter-a")) == state.meter(b"meter-a") is not None
    assert type(state.meter(b"meter-a").home) is str  # type: ignore[union-attr]


def test_the_untampered_block_is_accepted() -> None:
    block, verdict = validate_block_bytes(STATE, BLOCK_BYTES)
    assert block == BLOCK and verdict.block_ok and verdict.tx_codes == (None, None, None)


def test_flipping_any_bit_of_an_endorsed_block_is_detected() -> None:
    """Injected: each byte's low bit, high bit, and all bits flipped, one byte at a time.

    Survives: every damaged copy is refused, or a check on it fails.
    """
    for i in range(len(BLOCK_BYTES)):
        for mask in (0x01, 0x80, 0xFF):
            data = bytearray(BLOCK_BYTES)
            data[i] ^= mask
            _, verdict = validate_block_bytes(STATE, bytes(data))
            assert not verdict.block_ok or any(c is not None for c in verdict.tx_codes), (i, mask)


@given(st.integers(0, len(BLOCK_BYTES) - 1), st.integers(1, 255))
def test_single_byte_change_of_an_endorsed_block_is_detected(i: int, mask: int) -> None:
    """Injected: one byte XORed anywhere in a block (head, endorsements, txs).

    Survives: the block is refused as undecodable, or a check fails
    (header hash vs endorsements, Merkle root vs body, a tx signature).
    """
    data = bytearray(BLOCK_BYTES)
    data[i] ^= mask
    _, verdict = validate_block_bytes(STATE, bytes(data))
    assert not verdict.block_ok or any(c is not None for c in verdict.tx_codes)
