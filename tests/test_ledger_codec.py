"""The ledger's binary layout, transactions and signatures: strict decoding, round trips."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.ledger.codec import (
    TERMINAL_ID_MAX,
    ZERO_HASH,
    DecodeError,
    LedgerValueError,
    Reader,
    VersionError,
    Writer,
    check_terminal_id,
)
from agent.ledger.identity import (
    DOMAIN_ENDORSE,
    DOMAIN_TX,
    TerminalIdentity,
    load_public_key,
    verify_signature,
)
from agent.ledger.tx import (
    MAX_TX_BYTES,
    METER_ID_MAX,
    Transaction,
    TxBuilder,
    TxKind,
    decode_tx,
    encode_tx,
    encode_unsigned,
    make_tx,
    rotation_proof_digest,
    sign_tx,
    signing_payload,
    tx_id,
    verify_tx,
)
from hal.errors import LocalProtocolError, RemoteProtocolError
from hal.ids import MeterId, TerminalId

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"


def ident(name: str) -> TerminalIdentity:
    return TerminalIdentity.from_seed(name, hashlib.sha256(b"test-key/" + name.encode()).digest())


IDS = {name: ident(name) for name in ("ecd-01", "ecd-02", "pl.north.3")}
FP = hashlib.sha256(b"edgekey/key-fingerprint/v1" + bytes(16)).digest()
PROOF = rotation_proof_digest(b"\xa6" * 24)

tids = st.text(alphabet=ALPHABET, min_size=1, max_size=TERMINAL_ID_MAX)
hashes = st.binary(min_size=32, max_size=32)
nonzero = hashes.filter(lambda b: b != ZERO_HASH)


@st.composite
def transactions(draw: st.DrawFn, signed_by: TerminalIdentity | None = None) -> Transaction:
    kind = draw(st.sampled_from(list(TxKind)))
    proposer = signed_by.terminal_id if signed_by else draw(tids)
    if kind.is_meter:
        tx = Transaction(
            kind, proposer,
            meter_id=draw(st.binary(min_size=1, max_size=METER_ID_MAX)),
            key_version=draw(st.integers(1, 2**32 - 1)),
            fingerprint=ZERO_HASH if kind is TxKind.REVOKE else draw(nonzero),
            home=draw(tids),
            proof=ZERO_HASH if kind in (TxKind.REGISTER, TxKind.MIGRATE) else draw(hashes),
            counter=draw(st.integers(0, 2**64 - 1)))
    elif kind is TxKind.CHECKPOINT:
        tx = Transaction(kind, proposer, counter=draw(st.integers(0, 2**64 - 1)),
                         fingerprint=draw(nonzero))
    else:
        tx = Transaction(kind, proposer, terminal=draw(tids), public_key=draw(hashes))
    if signed_by is not None:
        return sign_tx(signed_by, tx)
    return replace(tx, signature=draw(st.binary(min_size=64, max_size=64)))


def sample_rotate() -> Transaction:
    return TxBuilder(IDS["ecd-01"]).rotate(b"\x05\x00\x00\x00\x12\x34", key_version=7,
                                           fingerprint=FP, proof=PROOF, counter=99)


# ------------------------------------------------------------------ codec


def test_writer_and_reader_agree_on_every_field_width() -> None:
    w = Writer()
    w.u8(0xAB)
    w.u16(0xBEEF)
    w.u32(0xDEADBEEF)
    w.u64(2**64 - 1)
    w.fixed(b"xyz", 3)
    w.short_bytes(b"hello", 16)
    w.terminal_id("ecd-01")
    r = Reader(w.getvalue())
    assert (r.u8("a"), r.u16("b"), r.u32("c"), r.u64("d")) == (0xAB, 0xBEEF, 0xDEADBEEF, 2**64 - 1)
    assert r.fixed("e", 3) == b"xyz"
    assert r.short_bytes("f", 1, 16) == b"hello"
    assert r.terminal_id("g") == "ecd-01"
    r.done("all")


def test_integers_are_big_endian_fixed_width() -> None:
    w = Writer()
    w.u32(1)
    w.u16(2)
    assert w.getvalue() == b"\x00\x00\x00\x01\x00\x02"


def test_truncated_field_names_field_and_offset() -> None:
    r = Reader(b"\x01\x02\x03", base=10)
    r.u8("first")
    with pytest.raises(DecodeError) as e:
        r.u32("second")
    assert (e.value.field, e.value.offset) == ("second", 11)
    assert "truncated" in str(e.value)


def test_trailing_bytes_are_refused() -> None:
    r = Reader(b"\x01\x02")
    r.u8("x")
    with pytest.raises(DecodeError, match="1 trailing bytes"):
        r.done("thing")


def test_over_cap_length_is_refused_at_the_length_byte() -> None:
    r = Reader(b"\x00\x05abcde")
    r.u8("pad")
    with pytest.raises(DecodeError) as e:
        r.short_bytes("meter_id", 1, 4)
    assert e.value.offset == 1 and "length 5" in e.value.problem


def test_terminal_id_outside_alphabet_is_refused() -> None:
    with pytest.raises(DecodeError, match="characters outside"):
        Reader(b"\x03a b").terminal_id("proposer")
    assert check_terminal_id("ecd 1") is not None
    assert check_terminal_id("é") is not None
    assert check_terminal_id("x" * 33) is not None
    assert check_terminal_id("") is not None
    assert check_terminal_id("PL-terminal_07.a") is None


def test_unknown_version_is_a_version_error() -> None:
    with pytest.raises(VersionError) as e:
        Reader(b"\x02").version("tx.version", 1)
    assert isinstance(e.value, DecodeError) and isinstance(e.value, ValueError)


def test_writer_refuses_values_it_cannot_encode() -> None:
    w = Writer()
    with pytest.raises(ValueError):
        w.fixed(b"ab", 3)
    with pytest.raises(ValueError):
        w.short_bytes(b"x" * 17, 16)
    with pytest.raises(ValueError):
        w.terminal_id("bad id")


# --------------------------------------------------------------- identity


def test_signature_verifies_only_for_its_key_and_data() -> None:
    a, b = IDS["ecd-01"], IDS["ecd-02"]
    sig = a.sign(b"data")
    assert verify_signature(a.public_bytes(), sig, b"data")
    assert not verify_signature(b.public_bytes(), sig, b"data")
    assert not verify_signature(a.public_bytes(), sig, b"date")


def test_seeded_identity_is_deterministic() -> None:
    assert ident("ecd-01").public_bytes() == IDS["ecd-01"].public_bytes()
    assert ident("ecd-01").sign(b"m") == IDS["ecd-01"].sign(b"m")  # RFC 8032: deterministic
    with pytest.raises(ValueError):
        TerminalIdentity.from_seed("ecd-01", b"short")
    with pytest.raises(ValueError):
        TerminalIdentity.generate("not valid")
    assert len(TerminalIdentity.generate("fresh").public_bytes()) == 32


@given(st.binary(max_size=80), st.binary(max_size=80), st.binary(max_size=40))
def test_verify_signature_never_raises_on_garbage(key: bytes, sig: bytes, data: bytes) -> None:
    assert verify_signature(key, sig, data) in (False, True)
    assert load_public_key(key) is None or len(key) == 32


def test_verify_signature_refuses_non_bytes() -> None:
    pk = IDS["ecd-01"].public_bytes()
    assert not verify_signature(pk, "sig", b"x")  # type: ignore[arg-type]
    assert not verify_signature(pk, IDS["ecd-01"].sign(b"x"), "x")  # type: ignore[arg-type]
    assert not verify_signature(None, b"", b"x")  # type: ignore[arg-type]


def test_transaction_signature_is_domain_separated_from_endorsements() -> None:
    """A tx signature, replayed as an endorsement of the same bytes, does not verify."""
    tx = sample_rotate()
    body = encode_unsigned(tx)
    assert signing_payload(tx) == DOMAIN_TX + body
    pk = IDS["ecd-01"].public_bytes()
    assert verify_signature(pk, tx.signature, DOMAIN_TX + body)
    assert not verify_signature(pk, tx.signature, body)
    assert not verify_signature(pk, tx.signature, DOMAIN_ENDORSE + body)


# ------------------------------------------------------------ transactions


def test_rotate_encodes_to_its_documented_layout() -> None:
    tx = sample_rotate()
    data = encode_tx(tx)
    meter = b"\x05\x00\x00\x00\x12\x34"
    expected = (b"\x01\x02" + b"\x06ecd-01" + b"\x06" + meter + (7).to_bytes(4, "big") + FP
                + b"\x06ecd-01" + PROOF + (99).to_bytes(8, "big") + tx.signature)
    assert data == expected
    assert decode_tx(data) == tx
    assert tx_id(tx) == hashlib.sha256(data).digest()


def test_largest_transaction_matches_the_cap() -> None:
    big = Transaction(TxKind.ROTATE, "p" * 32, meter_id=b"m" * 16, key_version=1,
                      fingerprint=FP, home="h" * 32, proof=PROOF, counter=1,
                      signature=b"s" * 64)
    assert len(encode_tx(big)) == MAX_TX_BYTES == 225


def test_membership_tx_carries_no_meter_fields() -> None:
    pk = IDS["ecd-02"].public_bytes()
    tx = TxBuilder(IDS["ecd-01"]).add_terminal("ecd-02", pk)
    data = encode_tx(tx)
    assert data == b"\x01\x05\x06ecd-01\x06ecd-02" + pk + tx.signature
    for field, value in (("meter_id", b"m"), ("key_version", 1), ("fingerprint", FP),
                         ("home", "ecd-01"), ("proof", PROOF), ("counter", 5)):
        with pytest.raises(ValueError, match=field):
            Transaction(TxKind.TERMINAL_ADD, "ecd-01", terminal="ecd-02", public_key=pk,
                        **{field: value})  # type: ignore[arg-type]


def test_meter_tx_refuses_membership_fields() -> None:
    with pytest.raises(ValueError, match="terminal"):
        Transaction(TxKind.REGISTER, "a", meter_id=b"m", key_version=1, fingerprint=FP,
                    home="a", terminal="b")


@pytest.mark.parametrize(("kind", "fields", "why"), [
    (TxKind.REVOKE, {"fingerprint": FP}, "empty key"),
    (TxKind.ROTATE, {"fingerprint": ZERO_HASH}, "reserved for revoke"),
    (TxKind.REGISTER, {"proof": PROOF}, "no proof"),
    (TxKind.MIGRATE, {"proof": PROOF}, "no proof"),
    (TxKind.ROTATE, {"key_version": 0}, "0 means no key"),
    (TxKind.ROTATE, {"meter_id": b""}, "meter_id"),
    (TxKind.ROTATE, {"meter_id": b"x" * 17}, "meter_id"),
    (TxKind.ROTATE, {"counter": 2**64}, "counter"),
    (TxKind.ROTATE, {"home": "no such/home"}, "home"),
    (TxKind.ROTATE, {"signature": b"x" * 63}, "signature"),
    (TxKind.ROTATE, {"version": 2}, "version"),
    (TxKind.ROTATE, {"fingerprint": b"short"}, "fingerprint"),
    (TxKind.ROTATE, {"proof": b"x" * 33}, "proof"),
])
def test_transaction_refuses_fields_its_kind_forbids(kind: TxKind, fields: dict[str, object],
                                                     why: str) -> None:
    base: dict[str, object] = {"meter_id": b"m", "key_version": 1,
                               "fingerprint": ZERO_HASH if kind is TxKind.REVOKE else FP,
                               "home": "a", "counter": 1}
    base.update(fields)
    with pytest.raises(ValueError, match=why):
        Transaction(kind, "a", **base)  # type: ignore[arg-type]


def test_transaction_refuses_a_bad_kind_proposer_or_member() -> None:
    pk = IDS["ecd-01"].public_bytes()
    with pytest.raises(ValueError, match="kind"):
        Transaction(5, "a", terminal="b", public_key=pk)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="proposer"):
        Transaction(TxKind.TERMINAL_ADD, "", terminal="b", public_key=pk)
    with pytest.raises(ValueError, match="terminal"):
        Transaction(TxKind.TERMINAL_ADD, "a", terminal="b/c", public_key=pk)
    with pytest.raises(ValueError, match="public_key"):
        Transaction(TxKind.TERMINAL_RETIRE, "a", terminal="b", public_key=pk[:31])


def test_reader_takes_only_bytes() -> None:
    with pytest.raises(TypeError):
        Reader("text")  # type: ignore[arg-type]
    assert check_terminal_id(7) == "not a string"  # type: ignore[arg-type]


def test_unsigned_transaction_has_no_encoding() -> None:
    tx = Transaction(TxKind.REGISTER, "a", meter_id=b"m", key_version=1, fingerprint=FP,
                     home="a")
    assert not tx.is_signed
    with pytest.raises(ValueError, match="unsigned"):
        encode_tx(tx)
    assert not verify_tx(IDS["ecd-01"].public_bytes(), tx)


def test_only_the_proposer_can_sign() -> None:
    tx = Transaction(TxKind.REGISTER, "ecd-01", meter_id=b"m", key_version=1, fingerprint=FP,
                     home="ecd-01")
    with pytest.raises(ValueError, match="cannot sign"):
        sign_tx(IDS["ecd-02"], tx)
    signed = sign_tx(IDS["ecd-01"], tx)
    assert verify_tx(IDS["ecd-01"].public_bytes(), signed)
    assert not verify_tx(IDS["ecd-02"].public_bytes(), signed)


def test_proof_digest_and_fingerprint_are_the_key_stores_constructions() -> None:
    """The chain's digests must be the ones the key store computes (agent/keystore)."""
    from agent.keystore import material

    wrapped = bytes(range(40))
    assert rotation_proof_digest(wrapped) == material.proof_digest(wrapped)
    assert rotation_proof_digest(wrapped) == hashlib.sha256(b"edgekey/rotation-proof/v1"
                                                            + wrapped).digest()
    key = bytes(range(32))
    assert material.fingerprint(key) == hashlib.sha256(b"edgekey/key-fingerprint/v1"
                                                       + key).digest()


def test_make_tx_and_builder_agree() -> None:
    a = make_tx(IDS["ecd-01"], TxKind.REVOKE, meter_id=b"m", key_version=3, home="ecd-01",
                counter=8)
    b = TxBuilder(IDS["ecd-01"]).revoke(b"m", key_version=3, counter=8)
    assert a == b and a.fingerprint == ZERO_HASH
    m = TxBuilder(IDS["ecd-02"]).migrate(b"m", new_home="ecd-02", key_version=3,
                                         fingerprint=FP, counter=9)
    assert (m.home, m.proposer, m.proof) == ("ecd-02", "ecd-02", ZERO_HASH)


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda d: b"\x02" + d[1:], "tx.version"),
    (lambda d: d[:1] + b"\x00" + d[2:], "tx.kind"),
    (lambda d: d[:1] + b"\x08" + d[2:], "tx.kind"),
    (lambda d: d[:2] + b"\x00" + d[3:], "tx.proposer"),
    (lambda d: d[:2] + b"\x21" + d[3:], "tx.proposer"),
    (lambda d: d[:3] + b" " + d[4:], "tx.proposer"),
    (lambda d: d[:9] + b"\x11" + d[10:], "tx.meter_id"),
    (lambda d: d[:16] + bytes(4) + d[20:], "tx.key_version"),
    (lambda d: d[:20] + bytes(32) + d[52:], "tx.fingerprint"),
    (lambda d: d[:-1], "tx.signature"),
    (lambda d: d + b"\x00", "tx"),
])
def test_decode_tx_names_the_bad_field(mutate, field: str) -> None:  # type: ignore[no-untyped-def]
    data = encode_tx(sample_rotate())
    with pytest.raises(DecodeError) as e:
        decode_tx(mutate(data))
    assert e.value.field == field
    assert 0 <= e.value.offset <= len(data)


def test_decode_revoke_with_a_fingerprint_is_refused() -> None:
    tx = TxBuilder(IDS["ecd-01"]).revoke(b"m", key_version=3, counter=8)
    data = bytearray(encode_tx(tx))
    fp_at = 2 + 7 + 2 + 4
    data[fp_at] = 1
    with pytest.raises(DecodeError) as e:
        decode_tx(bytes(data))
    assert (e.value.field, e.value.offset) == ("tx.fingerprint", fp_at)


def test_decode_register_with_a_proof_is_refused() -> None:
    tx = TxBuilder(IDS["ecd-01"]).register(b"m", key_version=1, fingerprint=FP, counter=1)
    data = bytearray(encode_tx(tx))
    proof_at = 2 + 7 + 2 + 4 + 32 + 7
    data[proof_at + 31] = 1
    with pytest.raises(DecodeError) as e:
        decode_tx(bytes(data))
    assert (e.value.field, e.value.offset) == ("tx.proof", proof_at)


def test_decode_tx_wrong_version_is_a_version_error() -> None:
    data = encode_tx(sample_rotate())
    with pytest.raises(VersionError):
        decode_tx(b"\x09" + data[1:])


@given(transactions())
def test_transaction_round_trips(tx: Transaction) -> None:
    data = encode_tx(tx)
    assert len(data) <= MAX_TX_BYTES
    assert decode_tx(data) == tx
    assert encode_tx(decode_tx(data)) == data


@given(transactions())
def test_a_decoded_transaction_names_its_meter_and_terminals_by_their_id_types(
        tx: Transaction) -> None:
    back = decode_tx(encode_tx(tx))
    assert type(back.proposer) is TerminalId
    if tx.kind.is_meter:
        assert type(back.meter_id) is MeterId and type(back.home) is TerminalId
    elif tx.kind.is_member:
        assert type(back.terminal) is TerminalId


def test_a_bad_value_is_our_fault_and_bad_bytes_are_the_peers() -> None:
    with pytest.raises(LedgerValueError) as local:
        Transaction(TxKind.REGISTER, "a", meter_id=b"", key_version=1, fingerprint=FP, home="a")
    assert isinstance(local.value, LocalProtocolError) and isinstance(local.value, ValueError)
    assert "meter_id: must be 1..16 bytes, got 0" in str(local.value)
    with pytest.raises(DecodeError) as remote:
        decode_tx(b"\x01\x01")
    assert isinstance(remote.value, RemoteProtocolError) and isinstance(remote.value, ValueError)


def test_reader_reads_ids_as_their_types_and_refuses_bad_ones_as_decode_errors() -> None:
    r = Reader(b"\x02\x00\x01\x06ecd-07")
    assert type(r.meter_id("meter_id")) is MeterId and type(r.terminal_id("home")) is TerminalId
    with pytest.raises(DecodeError, match=r"length 17 outside 1\.\.16"):
        Reader(b"\x11" + bytes(17)).meter_id("meter_id")
    with pytest.raises(DecodeError, match=r"length 0 outside 1\.\.16"):
        Reader(b"\x00").meter_id("meter_id")


@given(st.binary(max_size=260))
def test_any_bytes_decode_to_a_canonical_tx_or_raise_decode_error(data: bytes) -> None:
    try:
        tx = decode_tx(data)
    except DecodeError:
        return
    assert encode_tx(tx) == data


@given(transactions(), st.data())
def test_damaged_encodings_decode_canonically_or_raise(tx: Transaction,
                                                       data: st.DataObject) -> None:
    """Injected: truncation, a replaced byte, an inserted byte. Survives: canonical or error."""
    enc = bytearray(encode_tx(tx))
    i = data.draw(st.integers(0, len(enc) - 1))
    how = data.draw(st.sampled_from(["cut", "set", "insert"]))
    if how == "cut":
        damaged = bytes(enc[:i])
    elif how == "set":
        enc[i] = data.draw(st.integers(0, 255))
        damaged = bytes(enc)
    else:
        damaged = bytes(enc[:i]) + bytes([data.draw(st.integers(0, 255))]) + bytes(enc[i:])
    try:
        out = decode_tx(damaged)
    except DecodeError:
        return
    assert encode_tx(out) == damaged


@given(st.sampled_from(sorted(IDS)), st.data())
def test_single_byte_change_of_a_signed_tx_is_detected(name: str, data: st.DataObject) -> None:
    """Injected: one byte XORed with a non-zero mask. Survives: decode error or bad signature."""
    tx = data.draw(transactions(signed_by=IDS[name]))
    enc = bytearray(encode_tx(tx))
    i = data.draw(st.integers(0, len(enc) - 1))
    enc[i] ^= data.draw(st.integers(1, 255))
    try:
        out = decode_tx(bytes(enc))
    except DecodeError:
        return
    signer = IDS.get(out.proposer)
    assert signer is None or not verify_tx(signer.public_bytes(), out)
