"""Provisioning updates: what a running terminal believes of the utility's newer file.

A terminal added at run time, or one withdrawn, reaches the running fleet as
a newer provisioning the utility signed, in parts through etcd
(agent/net/provfeed.py). Checked here: which updates a terminal takes
(``check_update``), which membership changes its endorsers may sign
(``Provisioning.authorises``), that the file replaces the old one on the
config partition with a power cut at any byte leaving one of the two whole,
and that the parts assemble in any order while malformed, stale or
oversize ones are counted and dropped, never raised.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import provisioning as prov
from agent.keystore.transport import public_bytes
from agent.ledger.block import genesis
from agent.ledger.identity import TerminalIdentity
from agent.ledger.tx import TxBuilder
from agent.net import provfeed
from emulator.flash import PowerCut, PowerCutDevice, RamBlockDevice

UTILITY = Ed25519PrivateKey.from_private_bytes(b"u" * 32)
TRUSTED = UTILITY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
T0 = 1_700_000_000_000
IDS = ["ecd-00", "ecd-01", "ecd-02"]


def _identity(tid: str) -> TerminalIdentity:
    return TerminalIdentity.from_seed(tid, tid.encode().ljust(32, b"i"))


def _transport(tid: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(tid.encode().ljust(32, b"t"))


def _entry(tid: str) -> prov.TerminalEntry:
    return prov.TerminalEntry(tid, _identity(tid).public_bytes(), public_bytes(_transport(tid)),
                              (1.0, 2.0), 64)


def _document() -> dict:
    ids = [_identity(t) for t in IDS]
    block0 = genesis(ids[0], [(i.terminal_id, i.public_bytes()) for i in ids], timestamp_ms=T0,
                     endorsers=ids[:2])
    network = prov.Network(b"\x01" * 32, ("https://127.0.0.1:2379",),
                           {t: ("127.0.0.1", 7100 + i) for i, t in enumerate(IDS)},
                           {"ecd-00": {"name": "m0", "client": "https://127.0.0.1:2379",
                                       "peer": "https://127.0.0.1:2380"}})
    meters = [(bytes([0, 0, 0, 0, 0, i]), IDS[i % 3], (float(i), 0.0), bytes([i]) * 32)
              for i in range(1, 5)]
    return prov.document_for(fleet="f", board="host", layout="L", issued_ms=T0,
                             genesis=block0, terminals=[_entry(t) for t in IDS], meters=meters,
                             entropy=random.Random(1).randbytes, network=network)


BASE = _document()


def _signed(document: dict) -> bytes:
    return prov.sign(document, UTILITY)


def _verified(document: dict) -> prov.Provisioning:
    return prov.verify(_signed(document), TRUSTED)


def _amended(**changes: object) -> dict:
    """A copy of BASE, one millisecond newer, with ``changes`` applied by key."""
    doc = copy.deepcopy(BASE)
    doc["issued_ms"] = BASE["issued_ms"] + 1
    doc.update(changes)
    return doc


def _with_ecd03() -> dict:
    doc = _amended()
    new = _entry("ecd-03")
    doc["terminals"].append({"id": new.terminal_id, "identity": new.identity_public.hex(),
                             "transport": new.transport_public.hex(), "site": [0.0, 0.0],
                             "capacity": 64})
    doc["network"]["peers"]["ecd-03"] = "127.0.0.1:7103"
    return doc


CURRENT = _verified(BASE)


def test_a_newer_file_adding_a_terminal_is_taken_and_authorises_that_terminal_only():
    new = _verified(_with_ecd03())
    prov.check_update(CURRENT, new)
    builder = TxBuilder(_identity("ecd-00"))
    add = builder.add_terminal("ecd-03", _identity("ecd-03").public_bytes())
    assert new.authorises(add) and not CURRENT.authorises(add)
    other_key = builder.add_terminal("ecd-03", _identity("someone").public_bytes())
    assert not new.authorises(other_key)  # the utility named another key for that id
    retire = builder.retire_terminal("ecd-02", _identity("ecd-02").public_bytes())
    assert not new.authorises(retire)  # nobody withdrew ecd-02
    meter = builder.register(b"\x01" * 6, key_version=1, fingerprint=b"\x02" * 32, counter=1)
    assert new.authorises(meter)  # meter operations are not the utility's to order
    assert new.allow_list().public_key(b"ecd-03")  # keys may now be wrapped to it
    assert new.network is not None and new.network.peers["ecd-03"] == ("127.0.0.1", 7103)


def test_a_withdrawal_authorises_the_retire_and_bars_adding_it_back():
    doc = _amended(retired=["ecd-02"])
    new = _verified(doc)
    prov.check_update(CURRENT, new)
    builder = TxBuilder(_identity("ecd-00"))
    assert new.authorises(builder.retire_terminal("ecd-02", _identity("ecd-02").public_bytes()))
    assert not new.authorises(builder.add_terminal("ecd-02",
                                                   _identity("ecd-02").public_bytes()))
    back = copy.deepcopy(doc)
    back["issued_ms"] += 1
    del back["retired"]
    with pytest.raises(prov.ProvisioningError, match="takes back a withdrawn terminal"):
        prov.check_update(new, _verified(back))


def _rekeyed() -> dict:
    doc = _amended()
    doc["terminals"][1]["transport"] = public_bytes(_transport("thief")).hex()
    return doc


def _meter_moved() -> dict:
    doc = _amended()
    doc["meters"][0]["home"] = "ecd-02"
    return doc


def _ca_swapped() -> dict:
    doc = _amended()
    doc["network"]["ca_sha256"] = "02" * 32
    return doc


def _other_genesis() -> dict:
    ids = [_identity(t) for t in IDS]
    block0 = genesis(ids[1], [(i.terminal_id, i.public_bytes()) for i in ids],
                     timestamp_ms=T0 + 5, endorsers=ids[:2])
    from agent.ledger.block import encode_block

    return _amended(genesis=encode_block(block0).hex())


@pytest.mark.parametrize(("make", "match"), [
    (lambda: copy.deepcopy(BASE), "not newer"),  # the same file again: a replay
    (lambda: dict(_amended(), issued_ms=T0 - 1), "not newer"),
    (lambda: _amended(fleet="g"), "changes the fleet"),
    (lambda: _amended(board="pl-terminal"), "changes the board"),
    (_other_genesis, "another genesis"),
    (_ca_swapped, "changes the fleet CA"),
    (_rekeyed, "re-keys terminal 'ecd-01'"),
    (lambda: _amended(terminals=BASE["terminals"][:2]), "drops or re-keys terminal 'ecd-02'"),
    (_meter_moved, "drops or changes meter"),
    (lambda: _amended(meters=BASE["meters"][1:]), "drops or changes meter"),
    (lambda: _amended(station={"id": "ecd-01", "transport": "11" * 32}),
     "station's id is a terminal's"),
], ids=["replay", "older", "fleet", "board", "genesis", "ca", "rekey", "drop-terminal",
        "meter-home", "drop-meter", "station-named-as-a-terminal"])
def test_an_update_that_is_not_an_amendment_is_refused(make, match):
    """Each is signed by the utility: the signature alone would let an old or rewritten
    file back in."""
    with pytest.raises(prov.ProvisioningError, match=match):
        prov.check_update(CURRENT, _verified(make()))


def test_the_master_station_may_be_named_once_and_is_then_kept():
    """Keys may be wrapped to the station the provisioning names: an update that swaps its
    transport key would send every key the station asks for to someone else."""
    with_station = _verified(_amended(station={"id": "station", "transport": "22" * 32}))
    prov.check_update(CURRENT, with_station)
    assert with_station.station_id == "station"
    assert with_station.allow_list().public_key(b"station")
    swapped = _amended(station={"id": "station", "transport": "33" * 32})
    swapped["issued_ms"] += 1
    with pytest.raises(prov.ProvisioningError, match="changes the master station"):
        prov.check_update(with_station, _verified(swapped))
    with pytest.raises(prov.ProvisioningError, match="malformed"):
        _verified(_amended(station={"id": "bad id!", "transport": "22" * 32}))


def test_reinstall_replaces_the_file_and_a_cut_at_any_byte_leaves_one_of_the_two():
    """Injected: a power cut after every byte count of the reinstall's writes. Survives: the
    newest complete file on the partition is the old or the new one, with the secrets."""
    old, new = _signed(BASE), _signed(_with_ecd03())
    secrets = b"S" * 80
    ram = RamBlockDevice(4096, 16)
    prov.install(ram, old, secrets)
    image = bytes(ram.data)
    probe = PowerCutDevice(RamBlockDevice(4096, 16))
    probe.inner.data[:] = image
    prov.reinstall(probe, new)
    assert prov.load(probe.inner) == (new, secrets)
    total = probe.written
    seen = set()
    for budget in range(0, total + 1, max(1, total // 400)):
        dev = RamBlockDevice(4096, 16)
        dev.data[:] = image
        cut = PowerCutDevice(dev, budget)
        with contextlib.suppress(PowerCut):
            prov.reinstall(cut, new)
        got = prov.load(dev)
        assert got in ((old, secrets), (new, secrets)), budget
        seen.add(got[0] == new)
    assert seen == {False, True}


def test_parts_assemble_in_any_order_once_and_stale_issues_are_ignored():
    prefix = b"/edgekey/f/"
    data = random.Random(3).randbytes(provfeed.PART_BYTES * 2 + 17)
    pairs = provfeed.parts(prefix, 42, data)
    assert len(pairs) == 3
    random.Random(4).shuffle(pairs)
    a = provfeed.Assembler(prefix)
    got = [a.feed(k, v) for k, v in pairs + pairs[:1]]
    assert got.count(None) == 3 and (42, data) in got
    a.accepted(42)
    assert a.feed(*provfeed.parts(prefix, 41, b"old")[0]) is None
    assert a.counts["stale"] == 1
    assert a.feed(*provfeed.parts(prefix, 43, b"newer")[0]) == (43, b"newer")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=60), st.binary(max_size=64)), max_size=20),
       st.integers(0, 2**64 - 1), st.binary(min_size=1, max_size=3000))
def test_garbage_under_the_prefix_never_raises_and_never_hides_a_real_issue(garbage, issued,
                                                                            data):
    """Injected: arbitrary keys and values (anyone with a fleet certificate can write under
    the prefix), around a real issue's parts. Survives: the real file assembles."""
    prefix = b"/edgekey/f/"
    a = provfeed.Assembler(prefix)
    for key, value in garbage:
        a.feed(provfeed.feed_prefix(prefix) + key, value)
    out = [a.feed(k, v) for k, v in provfeed.parts(prefix, issued, data)]
    assert out[-1] == (issued, data)


def test_a_malformed_or_oversize_part_is_counted_not_kept():
    prefix = b"/edgekey/f/"
    a = provfeed.Assembler(prefix)
    head = provfeed.feed_prefix(prefix)
    assert a.feed(head + b"zz", b"x") is None
    assert a.feed(head + b"%016x/0001-0001" % 5, b"x") is None  # index beyond the count
    key = provfeed.parts(prefix, 5, b"x")[0][0]
    assert a.feed(key, b"y" * (provfeed.PART_BYTES + 1)) is None
    assert a.counts["malformed"] == 3
    with pytest.raises(ValueError):
        provfeed.parts(prefix, 5, b"")
    with pytest.raises(ValueError):
        provfeed.parts(prefix, 5, b"x" * (provfeed.MAX_FILE_BYTES + 1))
    assert json.loads(_signed(BASE))["document"]["issued_ms"] == T0
