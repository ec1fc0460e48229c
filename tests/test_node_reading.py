"""Sealed meter readings: what a meter seals opens only for its meter, key version and counter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.node.reading import MAX_READING_BYTES, BadReading, open_reading, seal_reading

KEY = bytes(range(32))
METER = b"\x00\x00\x00\x01\x86\xa1"


@given(st.binary(max_size=MAX_READING_BYTES), st.binary(min_size=12, max_size=12),
       st.integers(1, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_a_sealed_reading_opens_to_itself(reading, nonce, version, counter):
    sealed = seal_reading(KEY, nonce, reading, meter_id=METER, key_version=version,
                          counter=counter)
    assert open_reading(KEY, sealed, meter_id=METER, key_version=version,
                        counter=counter) == reading


@given(st.binary(max_size=700))
def test_any_bytes_open_to_bad_reading_never_another_error(data):
    with pytest.raises(BadReading):
        open_reading(KEY, data, meter_id=METER, key_version=1, counter=1)


@given(st.binary(min_size=1, max_size=64), st.data())
def test_a_reading_bound_to_another_meter_version_counter_or_bit_does_not_open(reading, data):
    sealed = seal_reading(KEY, b"n" * 12, reading, meter_id=METER, key_version=3, counter=9)
    which = data.draw(st.sampled_from(["meter", "version", "counter", "bit", "key"]))
    kw = {"meter_id": METER, "key_version": 3, "counter": 9}
    key = KEY
    if which == "meter":
        kw["meter_id"] = METER[:-1] + bytes([METER[-1] ^ 1])
    elif which == "version":
        kw["key_version"] = 2
    elif which == "counter":
        kw["counter"] = 8
    elif which == "key":
        key = bytes(32)
    else:
        i = data.draw(st.integers(0, len(sealed) - 1))
        sealed = sealed[:i] + bytes([sealed[i] ^ 1 << data.draw(st.integers(0, 7))]) + \
            sealed[i + 1:]
    with pytest.raises(BadReading):
        open_reading(key, sealed, **kw)  # type: ignore[arg-type]


def test_a_reading_too_long_or_a_short_nonce_is_refused_at_the_meter():
    with pytest.raises(ValueError):
        seal_reading(KEY, b"n" * 12, bytes(MAX_READING_BYTES + 1), meter_id=METER,
                     key_version=1, counter=1)
    with pytest.raises(ValueError):
        seal_reading(KEY, b"n" * 11, b"x", meter_id=METER, key_version=1, counter=1)
