"""Key export: envelopes sealed to an allowed requester (X25519 + HKDF-SHA256 + AES-256-GCM)."""

from __future__ import annotations

import random

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from agent.keystore.transport import (
    MAX_ENVELOPE,
    MAX_REQUESTER_ID,
    MIN_ENVELOPE,
    AllowList,
    Envelope,
    NotAuthorisedError,
    TransportError,
    TransportFault,
    decode_envelope,
    encode_envelope,
    open_envelope,
    public_bytes,
    seal_envelope,
)
from hal.errors import RemoteProtocolError
from hal.ids import METER_ID_MAX, MeterId

MASTER = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
TERMINAL = X25519PrivateKey.from_private_bytes(bytes(range(33, 65)))
ALLOW = AllowList({b"master": public_bytes(MASTER), b"ecd-07": TERMINAL.public_key()})
KEY = bytes(range(100, 132))
METER = bytes.fromhex("000012345678")
BINDING = {"meter_id": METER, "key_version": 3, "requester_id": b"master"}


def seeded(seed: int):
    return random.Random(seed).randbytes


def sealed(seed: int = 1, **over) -> bytes:
    args = {**BINDING, "allow_list": ALLOW, "entropy": seeded(seed), **over}
    return seal_envelope(KEY, **args)


def fault_of(call) -> TransportFault:
    with pytest.raises(TransportError) as err:
        call()
    return err.value.fault


# offsets in an envelope for METER (6 bytes) and b"master" (6 bytes)
_H = 12
REGIONS = {
    "magic": range(0, 4), "version": range(4, 5), "meter id length": range(5, 6),
    "requester id length": range(6, 7), "reserved": range(7, 8), "key version": range(8, 12),
    "meter id": range(_H, _H + 6), "requester id": range(_H + 6, _H + 12),
    "recipient": range(_H + 12, _H + 44), "ephemeral": range(_H + 44, _H + 76),
    "salt": range(_H + 76, _H + 92), "sealed key": range(_H + 92, _H + 140),
}
EXPECTED_FAULT = {
    "magic": TransportFault.BAD_ENCODING, "version": TransportFault.BAD_ENCODING,
    "meter id length": TransportFault.BAD_ENCODING,
    "requester id length": TransportFault.BAD_ENCODING,
    "reserved": TransportFault.BAD_ENCODING, "key version": TransportFault.BINDING_MISMATCH,
    "meter id": TransportFault.BINDING_MISMATCH, "requester id": TransportFault.BINDING_MISMATCH,
    "recipient": TransportFault.WRONG_RECIPIENT, "ephemeral": TransportFault.TAMPERED,
    "salt": TransportFault.TAMPERED, "sealed key": TransportFault.TAMPERED,
}


def region_of(pos: int) -> str:
    return next(name for name, r in REGIONS.items() if pos in r)


def test_an_envelope_opens_for_its_requester_to_the_key():
    env = sealed()
    assert len(env) == _H + 140 and KEY not in env
    assert open_envelope(MASTER, env, **BINDING) == KEY


def test_sealing_is_repeatable_with_a_seeded_entropy_source_and_fresh_otherwise():
    assert sealed(1) == sealed(1)
    assert sealed(1) != sealed(2)
    fresh = seal_envelope(KEY, **BINDING, allow_list=ALLOW)  # os.urandom
    assert open_envelope(MASTER, fresh, **BINDING) == KEY


def test_another_terminal_is_a_requester_in_its_own_right():
    env = sealed(requester_id=b"ecd-07")
    assert open_envelope(TERMINAL, env, meter_id=METER, key_version=3,
                         requester_id=b"ecd-07") == KEY


def test_an_envelope_opened_with_another_private_key_names_the_wrong_recipient():
    assert fault_of(lambda: open_envelope(TERMINAL, sealed(), **BINDING)) is \
        TransportFault.WRONG_RECIPIENT


def test_an_envelope_relabelled_for_another_recipient_fails_authentication():
    """Injected: the recipient field rewritten to the terminal's public key. Survives: the key."""
    env = bytearray(sealed())
    env[REGIONS["recipient"].start:REGIONS["recipient"].stop] = public_bytes(TERMINAL)
    assert fault_of(lambda: open_envelope(TERMINAL, bytes(env), **BINDING)) is \
        TransportFault.TAMPERED


@pytest.mark.parametrize(("field", "value"), [("meter_id", b"\x00\x00\x12\x34\x56\x79"),
                                              ("key_version", 4), ("requester_id", b"ecd-07")])
def test_an_envelope_for_another_meter_version_or_requester_is_a_binding_mismatch(field, value):
    asked = {**BINDING, field: value}
    with pytest.raises(TransportError, match=field.replace("_", " ")) as err:
        open_envelope(MASTER, sealed(), **asked)
    assert err.value.fault is TransportFault.BINDING_MISMATCH


def test_exporting_to_a_requester_not_on_the_allow_list_is_refused():
    with pytest.raises(NotAuthorisedError, match="intruder"):
        sealed(requester_id=b"intruder")
    assert b"intruder" not in ALLOW and b"master" in ALLOW and len(ALLOW) == 2
    assert list(ALLOW) == [b"ecd-07", b"master"]


def test_an_allow_list_with_a_malformed_entry_is_refused():
    with pytest.raises(ValueError, match="32 bytes"):
        AllowList({b"master": b"short"})
    with pytest.raises(ValueError, match="requester id"):
        AllowList({b"": public_bytes(MASTER)})
    with pytest.raises(TypeError, match="X25519"):
        AllowList({b"master": object()})


def test_a_flipped_byte_anywhere_in_an_envelope_is_refused_with_the_fault_of_its_field():
    """Injected: each byte flipped in turn (low and high bit). Survives: nothing opens."""
    env = sealed()
    assert sum(len(r) for r in REGIONS.values()) == len(env)
    for pos in range(len(env)):
        for mask in (0x01, 0x80):  # other masks: the property test below
            bad = bytearray(env)
            bad[pos] ^= mask
            got = fault_of(lambda bad=bad: open_envelope(MASTER, bytes(bad), **BINDING))
            assert got is EXPECTED_FAULT[region_of(pos)], (pos, mask, got)


@given(st.integers(0, _H + 139), st.integers(1, 255))
def test_any_single_byte_change_is_caught(pos, mask):
    bad = bytearray(sealed())
    bad[pos] ^= mask
    assert fault_of(lambda: open_envelope(MASTER, bytes(bad), **BINDING)) is \
        EXPECTED_FAULT[region_of(pos)]


def test_truncated_or_extended_envelopes_are_bad_encodings_naming_the_length():
    env = sealed()
    for bad in (env[:-1], env + b"\x00", env[:MIN_ENVELOPE - 1], b""):
        with pytest.raises(TransportError, match="bad encoding") as err:
            decode_envelope(bad)
        assert err.value.fault is TransportFault.BAD_ENCODING


def test_a_refused_envelope_is_the_senders_fault_and_a_value_error():
    with pytest.raises(TransportError) as err:
        decode_envelope(b"EKTE")
    assert isinstance(err.value, RemoteProtocolError) and isinstance(err.value, ValueError)
    assert type(decode_envelope(sealed()).meter_id) is MeterId


def test_a_low_order_ephemeral_key_is_refused_not_used():
    """Injected: an all-zero ephemeral public key (shared secret 0, RFC 7748 6.1)."""
    env = decode_envelope(sealed())
    forged = Envelope(env.meter_id, env.key_version, env.requester_id, env.recipient_public,
                      bytes(32), env.salt, env.sealed)
    with pytest.raises(TransportError, match="low-order") as err:
        open_envelope(MASTER, encode_envelope(forged), **BINDING)
    assert err.value.fault is TransportFault.TAMPERED


envelopes = st.builds(
    Envelope,
    meter_id=st.binary(min_size=1, max_size=METER_ID_MAX),
    key_version=st.integers(0, 2**32 - 1),
    requester_id=st.binary(min_size=1, max_size=MAX_REQUESTER_ID),
    recipient_public=st.binary(min_size=32, max_size=32),
    ephemeral_public=st.binary(min_size=32, max_size=32),
    salt=st.binary(min_size=16, max_size=16),
    sealed=st.binary(min_size=48, max_size=48),
)


@given(envelopes)
def test_every_envelope_value_round_trips_through_its_encoding(env):
    data = encode_envelope(env)
    assert MIN_ENVELOPE <= len(data) <= MAX_ENVELOPE
    assert decode_envelope(data) == env


@st.composite
def mutated_envelopes(draw) -> bytes:
    data = bytearray(encode_envelope(draw(envelopes)))
    data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@given(st.one_of(st.binary(max_size=MAX_ENVELOPE + 8), mutated_envelopes()))
def test_any_bytes_decode_to_an_envelope_that_re_encodes_or_raise_a_bad_encoding(data):
    try:
        env = decode_envelope(data)
    except TransportError as err:
        assert err.fault is TransportFault.BAD_ENCODING
        return
    assert encode_envelope(env) == data


@given(st.binary(max_size=MAX_ENVELOPE + 8))
def test_any_bytes_opened_as_an_envelope_give_a_transport_error(data):
    with pytest.raises(TransportError):
        open_envelope(MASTER, data, **BINDING)
