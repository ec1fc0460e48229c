"""Key material: fingerprints, rotation proofs (RFC 3394 key wrap), revocation proofs."""

from __future__ import annotations

import hashlib
import random

import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from hypothesis import given
from hypothesis import strategies as st

from agent.keystore.material import (
    KEY_BYTES,
    PROOF_BYTES,
    REVOCATION_MARKER,
    BadProofError,
    ProofFault,
    fingerprint,
    is_revocation_proof,
    make_revocation_proof,
    make_rotation_proof,
    new_key,
    open_rotation_proof,
    proof_digest,
)

keys = st.binary(min_size=KEY_BYTES, max_size=KEY_BYTES)


def seeded(seed: int):
    return random.Random(seed).randbytes


OLD = new_key(seeded(1))
NEW = new_key(seeded(2))


def test_new_keys_are_32_bytes_from_the_entropy_source_and_repeatable_with_a_seed():
    assert len(OLD) == KEY_BYTES and OLD != NEW
    assert new_key(seeded(1)) == OLD
    assert len(new_key()) == KEY_BYTES  # os.urandom by default


def test_an_entropy_source_returning_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="returned 31 bytes"):
        new_key(lambda n: bytes(n - 1))


def test_fingerprint_is_sha256_of_the_label_and_key_and_is_not_the_key():
    expected = hashlib.sha256(b"edgekey/key-fingerprint/v1" + OLD).digest()
    assert fingerprint(OLD) == expected
    assert fingerprint(OLD) == fingerprint(bytes(OLD))  # stable
    assert fingerprint(OLD) != OLD and OLD not in fingerprint(OLD)
    assert fingerprint(OLD) != fingerprint(NEW)


def test_fingerprint_of_a_fixed_key_matches_the_vector_the_ledger_relies_on():
    # a literal, so a changed label or construction fails here and not only on a peer
    vector = "46c4d0c6c321d4059ee8c5665c1d6204645aec0dc94e2da0eb557357f527dda1"
    assert hashlib.sha256(b"edgekey/key-fingerprint/v1" + bytes(range(32))).hexdigest() == vector
    assert fingerprint(bytes(range(32))).hex() == vector


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33])
def test_fingerprint_of_something_that_is_not_a_key_is_refused(bad):
    with pytest.raises(ValueError, match="32 bytes"):
        fingerprint(bad)


def test_rotation_proof_is_the_rfc3394_wrap_of_the_new_key_under_the_old():
    # RFC 3394 section 4.6: 256 bits of key data wrapped with a 256-bit KEK
    kek = bytes.fromhex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
    data = bytes.fromhex("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
    wrapped = bytes.fromhex("28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326"
                            "CBC7F0E71A99F43BFB988B9B7A02DD21")
    assert make_rotation_proof(kek, data) == wrapped
    assert open_rotation_proof(kek, wrapped) == data


def test_a_rotation_proof_opens_under_the_old_key_to_the_new_key():
    proof = make_rotation_proof(OLD, NEW)
    assert len(proof) == PROOF_BYTES
    assert NEW not in proof
    assert open_rotation_proof(OLD, proof) == NEW


def test_a_rotation_proof_under_the_wrong_old_key_is_refused():
    proof = make_rotation_proof(OLD, NEW)
    with pytest.raises(BadProofError, match="integrity check") as err:
        open_rotation_proof(new_key(seeded(3)), proof)
    assert err.value.fault is ProofFault.UNWRAP_FAILED


def test_every_single_byte_tamper_of_a_rotation_proof_is_refused():
    proof = make_rotation_proof(OLD, NEW)
    for pos in range(len(proof)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(proof)
            bad[pos] ^= mask
            with pytest.raises(BadProofError) as err:
                open_rotation_proof(OLD, bytes(bad))
            assert err.value.fault is ProofFault.UNWRAP_FAILED, (pos, mask)


@pytest.mark.parametrize("length", [0, 8, 24, 32, 39, 41, 48, 80])
def test_a_proof_of_the_wrong_length_is_refused_with_its_length(length):
    with pytest.raises(BadProofError, match=f"{length} bytes") as err:
        open_rotation_proof(OLD, bytes(length))
    assert err.value.fault is ProofFault.WRONG_LENGTH


def test_a_rotation_must_change_the_key():
    with pytest.raises(ValueError, match="change the key"):
        make_rotation_proof(OLD, OLD)
    with pytest.raises(BadProofError) as err:  # crafted by hand: the old key wrapped under itself
        open_rotation_proof(OLD, aes_key_wrap(OLD, OLD))
    assert err.value.fault is ProofFault.KEY_UNCHANGED


def test_a_revocation_proof_carries_no_key_and_is_not_a_rotation():
    proof = make_revocation_proof(OLD)
    assert len(proof) == PROOF_BYTES
    assert is_revocation_proof(OLD, proof)
    assert not is_revocation_proof(NEW, proof)
    assert not is_revocation_proof(OLD, make_rotation_proof(OLD, NEW))
    with pytest.raises(BadProofError) as err:
        open_rotation_proof(OLD, proof)
    assert err.value.fault is ProofFault.REVOCATION
    with pytest.raises(ValueError, match="revocation marker"):
        make_rotation_proof(OLD, REVOCATION_MARKER)


def test_a_tampered_revocation_proof_is_not_a_revocation():
    proof = make_revocation_proof(OLD)
    for pos in range(len(proof)):
        bad = bytearray(proof)
        bad[pos] ^= 0x40
        assert not is_revocation_proof(OLD, bytes(bad)), pos
    assert not is_revocation_proof(OLD, proof[:-1])


def test_proof_digest_is_sha256_of_the_label_and_proof():
    proof = make_rotation_proof(OLD, NEW)
    assert proof_digest(proof) == hashlib.sha256(b"edgekey/rotation-proof/v1" + proof).digest()
    assert proof_digest(proof) != proof_digest(make_revocation_proof(OLD))
    assert NEW not in proof_digest(proof)


@given(keys, keys)
def test_any_two_distinct_keys_round_trip_through_a_proof(old, new):
    if old == new:
        with pytest.raises(ValueError):
            make_rotation_proof(old, new)
        return
    proof = make_rotation_proof(old, new)
    assert open_rotation_proof(old, proof) == new
    assert not is_revocation_proof(old, proof)


@given(st.binary(max_size=64))
def test_any_bytes_as_a_proof_give_a_key_or_a_bad_proof_error(junk):
    try:
        key = open_rotation_proof(OLD, junk)
    except BadProofError:
        return
    assert len(key) == KEY_BYTES and make_rotation_proof(OLD, key) == junk
