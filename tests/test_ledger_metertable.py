"""The compact meter table behaves as a dict of id -> entry, whatever the ids look like."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.ledger.metertable import GROW_AT, INITIAL_BUCKETS, MeterSet, MeterTable

ENTRY = 3  # small, so a key often appears inside other records' bytes (unaligned matches)
# Ids over a two-byte alphabet: prefixes, zero padding look-alikes and ids embedded in entries.
ids = st.binary(min_size=1, max_size=16).map(lambda b: bytes(x & 1 for x in b))
entries = st.binary(min_size=ENTRY, max_size=ENTRY)


@given(st.lists(st.tuples(ids, entries), max_size=300), st.lists(ids, max_size=50))
def test_the_table_agrees_with_a_dict(puts, probes):
    table, model = MeterTable(ENTRY), {}
    for meter_id, entry in puts:
        table.put(meter_id, entry)
        model[meter_id] = entry
        assert table.get(meter_id) == entry
    assert len(table) == len(model)
    for meter_id in probes + list(model):
        assert table.get(meter_id) == model.get(meter_id)
        assert (meter_id in table) == (meter_id in model)
    assert sorted(table) == sorted(model)
    assert dict(table.items()) == model


def test_growth_keeps_every_entry_and_the_order_is_the_same_every_time():
    n = GROW_AT * INITIAL_BUCKETS * 8 + 3  # three doublings and some
    a, b = MeterTable(ENTRY), MeterTable(ENTRY)
    for i in range(n):
        for t in (a, b):
            t.put(i.to_bytes(4, "big"), (i % 251).to_bytes(1, "big") * ENTRY)
    assert len(a) == n and all(a.get(i.to_bytes(4, "big")) == (i % 251).to_bytes(1, "big") * 3
                               for i in range(n))
    assert list(a) == list(b)


def test_what_is_not_a_meter_id_is_not_in_the_table_and_cannot_be_put():
    t = MeterTable(ENTRY)
    assert t.get(b"") is None and t.get(bytes(17)) is None and b"" not in t
    with pytest.raises(ValueError):
        t.put(b"", b"abc")
    with pytest.raises(ValueError):
        t.put(b"x", b"ab")  # wrong entry size


@given(st.lists(st.tuples(st.booleans(), ids), max_size=300))
def test_a_meter_set_agrees_with_a_set(ops):
    ours, model = MeterSet(), set()
    for add, meter_id in ops:
        if add:
            ours.add(meter_id)
            model.add(meter_id)
        else:
            ours.discard(meter_id)
            model.discard(meter_id)
        assert (meter_id in ours) == (meter_id in model)
    assert ours == model and len(ours) == len(model) and sorted(ours) == sorted(model)
