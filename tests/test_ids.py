"""Meter and terminal ids (hal/ids.py) and whose-fault errors (hal/errors.py)."""

from __future__ import annotations

import copy
import pickle
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hal.errors import LocalProtocolError, RemoteProtocolError
from hal.ids import (
    METER_ID_MAX,
    METER_ID_MIN,
    TERMINAL_ID_MAX,
    TERMINAL_ID_MIN,
    MeterId,
    MeterIdError,
    MeterIdTypeError,
    TerminalId,
    TerminalIdError,
    TerminalIdTypeError,
    check_meter_id,
    check_terminal_id,
    require_meter_id,
    require_terminal_id,
)

ALPHABET = string.ascii_letters + string.digits + "._-"

meter_ids = st.binary(min_size=METER_ID_MIN, max_size=METER_ID_MAX)
bad_length_meter_ids = st.one_of(st.just(b""), st.binary(min_size=METER_ID_MAX + 1,
                                                           max_size=4 * METER_ID_MAX))
terminal_ids = st.text(alphabet=ALPHABET, min_size=TERMINAL_ID_MIN, max_size=TERMINAL_ID_MAX)
not_bytes = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(),
                      st.lists(st.integers(0, 255)), st.builds(memoryview, st.binary()))
not_str = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.binary(),
                    st.lists(st.text()))


def _bad_terminal_id(value: str) -> bool:
    return not (TERMINAL_ID_MIN <= len(value) <= TERMINAL_ID_MAX
                and all(c in ALPHABET for c in value))


# ------------------------------------------------------------------ MeterId

@given(meter_ids)
def test_every_valid_meter_id_round_trips_and_behaves_as_its_bytes(raw):
    mid = MeterId(raw)
    assert isinstance(mid, bytes) and mid == raw and bytes(mid) == raw
    assert hash(mid) == hash(raw) and {raw: 1}[mid] == 1 and {mid: 1}[raw] == 1
    assert MeterId(bytearray(raw)) == raw
    assert MeterId(mid) is mid  # already checked: no copy
    assert str(mid) == raw.hex()
    assert eval(repr(mid), {"MeterId": MeterId}) == raw  # our own repr
    assert pickle.loads(pickle.dumps(mid)) == mid and type(copy.deepcopy(mid)) is MeterId
    assert check_meter_id(raw) is None


@given(bad_length_meter_ids)
def test_a_meter_id_of_the_wrong_length_raises_meter_id_error_naming_the_limits(raw):
    with pytest.raises(MeterIdError, match=rf"{METER_ID_MIN}\.\.{METER_ID_MAX} bytes") as err:
        MeterId(raw)
    assert type(err.value) is MeterIdError  # a wrong length is not a type error
    assert f"got {len(raw)}" in check_meter_id(raw)


@given(not_bytes)
def test_a_meter_id_that_is_not_bytes_raises_meter_id_error_and_type_error(value):
    with pytest.raises(MeterIdTypeError, match="must be bytes") as err:
        MeterId(value)
    assert isinstance(err.value, MeterIdError) and isinstance(err.value, TypeError)
    assert check_meter_id(value) is not None


@given(st.one_of(meter_ids, bad_length_meter_ids, not_bytes))
def test_meter_id_raises_nothing_but_meter_id_error_and_agrees_with_its_check(value):
    try:
        MeterId(value)
    except MeterIdError:
        ok = False
    else:
        ok = True
    plain = bytes(value) if isinstance(value, bytearray) else value
    assert ok is (check_meter_id(plain) is None)


def test_a_bad_meter_id_is_a_value_error_and_the_callers_fault():
    with pytest.raises(ValueError):
        MeterId(b"")
    assert issubclass(MeterIdError, LocalProtocolError)
    assert not issubclass(MeterIdError, RemoteProtocolError)


def test_meter_id_from_hex_is_checked_and_its_slices_are_plain_bytes():
    mid = MeterId.fromhex("000012345678")
    assert type(mid) is MeterId and repr(mid) == "MeterId.fromhex('000012345678')"
    with pytest.raises(MeterIdError):
        MeterId.fromhex("")
    assert type(mid[:2]) is bytes and type(mid + b"\x00") is bytes


# --------------------------------------------------------------- TerminalId

@given(terminal_ids)
def test_every_valid_terminal_id_round_trips_and_behaves_as_its_str(text):
    tid = TerminalId(text)
    assert isinstance(tid, str) and tid == text and str(tid) == text and repr(tid) == repr(text)
    assert hash(tid) == hash(text) and {text: 1}[tid] == 1 and {tid: 1}[text] == 1
    assert TerminalId(tid) is tid
    assert TerminalId.from_ascii(text.encode("ascii")) == text
    assert type(TerminalId.from_ascii(text.encode("ascii"))) is TerminalId
    assert pickle.loads(pickle.dumps(tid)) == tid
    assert check_terminal_id(text) is None


@given(st.text(max_size=2 * TERMINAL_ID_MAX).filter(_bad_terminal_id))
def test_every_invalid_terminal_id_raises_terminal_id_error_naming_the_rule(text):
    with pytest.raises(TerminalIdError, match=r"length|characters outside") as err:
        TerminalId(text)
    assert type(err.value) is TerminalIdError
    assert check_terminal_id(text) is not None
    with pytest.raises(TerminalIdError):
        TerminalId.from_ascii(text.encode("utf-8"))


@given(st.binary(max_size=2 * TERMINAL_ID_MAX))
def test_from_ascii_accepts_exactly_what_the_str_check_accepts(raw):
    text = raw.decode("latin-1")
    try:
        tid = TerminalId.from_ascii(raw)
    except TerminalIdError:
        assert check_terminal_id(text) is not None
    else:
        assert check_terminal_id(text) is None and tid == text


@given(not_str)
def test_a_terminal_id_that_is_not_a_str_raises_terminal_id_error_and_type_error(value):
    with pytest.raises(TerminalIdTypeError, match="not a string") as err:
        TerminalId(value)
    assert isinstance(err.value, TerminalIdError) and isinstance(err.value, TypeError)
    assert check_terminal_id(value) == "not a string"


@pytest.mark.parametrize("text, problem", [
    ("", "length 0 outside 1..32"),
    ("x" * 33, "length 33 outside 1..32"),
    ("ecd 1", "characters outside [A-Za-z0-9._-]"),
    ("é", "characters outside [A-Za-z0-9._-]"),
    ("ecd-07\n", "characters outside [A-Za-z0-9._-]"),
])
def test_terminal_id_problems_are_named(text, problem):
    assert check_terminal_id(text) == problem
    with pytest.raises(TerminalIdError, match=problem.replace("[", r"\[").replace(".", r"\.")):
        TerminalId(text)


def _raised(call, value) -> tuple[type, str] | None:
    try:
        call(value)
    except (MeterIdError, TerminalIdError) as exc:
        return type(exc), str(exc)
    return None


@given(st.one_of(meter_ids, bad_length_meter_ids, not_bytes, terminal_ids, not_str))
def test_require_raises_exactly_what_the_constructor_raises(value):
    assert _raised(require_meter_id, value) == _raised(MeterId, value)
    assert _raised(require_terminal_id, value) == _raised(TerminalId, value)


# ------------------------------------------------------------------- errors

def test_remote_errors_are_value_errors_and_local_ones_are_not():
    assert issubclass(RemoteProtocolError, ValueError)
    assert not issubclass(LocalProtocolError, ValueError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)


def test_every_layer_says_whose_fault_its_errors_are():
    from agent.keystore.transport import TransportError
    from agent.ledger.codec import DecodeError, LedgerValueError, VersionError
    from agent.node import errors as node_errors
    from hal import linksession
    from hal.dlt698 import LocalFrameError

    for remote in (DecodeError, VersionError, TransportError, linksession.RemoteProtocolError):
        assert issubclass(remote, RemoteProtocolError) and issubclass(remote, ValueError)
    for local in (LedgerValueError, LocalFrameError, linksession.LocalProtocolError,
                  MeterIdError, TerminalIdError):
        assert issubclass(local, LocalProtocolError)
    for old_base in (LedgerValueError, LocalFrameError):
        assert issubclass(old_base, ValueError)
    for kept in (linksession.LocalProtocolError, linksession.RemoteProtocolError):
        assert issubclass(kept, linksession.SessionError)
    assert node_errors.LocalProtocolError is LocalProtocolError
    assert node_errors.RemoteProtocolError is RemoteProtocolError
