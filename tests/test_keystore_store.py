"""The key store on flash: encryption at rest, index, destruction, power cuts, space; device key."""

from __future__ import annotations

import copy
import hashlib
import os
import random
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from agent.keystore.material import BadProofError, ProofFault, make_rotation_proof
from agent.keystore.store import (
    HEADROOM_SEGMENTS,
    DeviceKeyError,
    KeyConflictError,
    KeyDestroyedError,
    KeyStore,
    Kind,
    MeterStatus,
    PreparedKey,
    StoreCorruptError,
    StoredRecord,
    StoreFullError,
    UnknownKeyError,
    VersionError,
    decode_record,
    encode_record,
    filler_record,
    record_payload_size,
)
from agent.keystore.transport import AllowList, NotAuthorisedError, open_envelope, public_bytes
from emulator.flash import PowerCut, PowerCutDevice, RamBlockDevice
from hal.blockdev import FileBlockDevice
from hal.board import board_path, load_board
from hal.devicekey import DEVICE_KEY_BYTES, DeviceKeyFileError, load_device_key
from hal.ids import MeterId, MeterIdError
from hal.recordlog import REC_OVERHEAD, LogFailedError, RecordLog

SEG = 4096
DK = bytes(range(32))
MASTER = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
ALLOW = AllowList({b"master": public_bytes(MASTER)})


def key(n: int) -> bytes:
    return hashlib.sha256(b"test key %d" % n).digest()


def mid(n: int) -> bytes:
    return b"meter-%03d" % n


def open_store(dev, seed: int = 7, device_key: bytes = DK) -> KeyStore:
    return KeyStore(dev, device_key, entropy=random.Random(seed).randbytes)


def blank(segments: int = 8) -> RamBlockDevice:
    return RamBlockDevice(SEG, segments)


def key_records(dev, meter_id: bytes) -> list[StoredRecord]:
    """Every KEY record of a meter that the record log on ``dev`` still holds."""
    recs = (decode_record(p) for _, p in RecordLog(dev).records())
    return [r for r in recs if r.kind is Kind.KEY and r.meter_id == meter_id]


# ------------------------------------------------------------- lifecycle

def test_put_rotate_get_retire_and_export_through_a_meters_life():
    store = open_store(blank())
    assert store.report.created and store.status(mid(1)) is MeterStatus.UNKNOWN
    store.put(mid(1), 1, key(1))
    prepared = store.prepare_rotation(mid(1), make_rotation_proof(key(1), key(2)))
    assert (prepared.version, prepared.key) == (2, key(2))
    assert store.versions(mid(1)) == (1,)  # prepared, not written
    assert store.commit_key(prepared) and not store.commit_key(prepared)  # idempotent
    store.put(mid(1), 3, key(3))
    assert store.versions(mid(1)) == (1, 2, 3) and store.newest(mid(1)) == 3
    assert [store.get(mid(1), v) for v in (1, 2, 3)] == [key(1), key(2), key(3)]
    assert store.get(mid(1)) == key(3)
    assert store.retire(mid(1), 2) == 1
    assert store.versions(mid(1)) == (2, 3)
    with pytest.raises(UnknownKeyError, match="no live version 1"):
        store.get(mid(1), 1)
    env = store.export(mid(1), b"master", ALLOW)
    assert open_envelope(MASTER, env, meter_id=mid(1), key_version=3,
                         requester_id=b"master") == key(3)
    env = store.export(mid(1), b"master", ALLOW, version=2)
    assert open_envelope(MASTER, env, meter_id=mid(1), key_version=2,
                         requester_id=b"master") == key(2)
    store.destroy(mid(1))
    assert store.status(mid(1)) is MeterStatus.DESTROYED and store.versions(mid(1)) == ()
    with pytest.raises(KeyDestroyedError, match="revoked"):
        store.get(mid(1))
    with pytest.raises(KeyDestroyedError):
        store.export(mid(1), b"master", ALLOW)
    store.destroy(mid(1))  # idempotent: a replayed revoke changes nothing


def test_a_put_that_is_not_the_next_version_is_refused_and_writes_nothing():
    dev = blank()
    store = open_store(dev)
    store.put(mid(1), 5, key(5))  # a meter's first version is the ledger's to choose
    before = bytes(dev.data)
    for v in (5, 7, 4):
        with pytest.raises(VersionError, match="the next is 6"):
            store.put(mid(1), v, key(9))
    assert bytes(dev.data) == before
    store.put(mid(1), 6, key(6))


def test_after_a_destroy_a_meter_starts_a_new_key_line():
    store = open_store(blank())
    store.put(mid(1), 1, key(1))
    store.destroy(mid(1))
    store.put(mid(1), 2, key(2))
    assert store.status(mid(1)) is MeterStatus.LIVE and store.versions(mid(1)) == (2,)
    assert store.get(mid(1)) == key(2)


def test_lookups_of_unknown_meters_and_versions_name_what_is_held():
    store = open_store(blank())
    store.put(mid(1), 1, key(1))
    with pytest.raises(UnknownKeyError, match=mid(2).hex()):
        store.get(mid(2))
    with pytest.raises(UnknownKeyError, match=r"holds \[1\]"):
        store.get(mid(1), 2)
    with pytest.raises(UnknownKeyError):
        store.destroy(mid(2))
    with pytest.raises(VersionError, match="newest"):
        store.retire(mid(1), 2)
    assert store.retire(mid(1), 1) == 0
    with pytest.raises(ValueError, match=r"1\.\.16 bytes"):
        store.put(b"", 1, key(1))
    with pytest.raises(ValueError, match="32 bytes"):
        store.put(mid(1), 2, b"short")


def test_export_to_a_requester_not_on_the_allow_list_is_refused():
    store = open_store(blank())
    store.put(mid(1), 1, key(1))
    with pytest.raises(NotAuthorisedError, match="ecd-99"):
        store.export(mid(1), b"ecd-99", ALLOW)


def test_a_rotation_with_a_bad_proof_writes_nothing():
    dev = blank()
    store = open_store(dev)
    store.put(mid(1), 1, key(1))
    before = bytes(dev.data)
    with pytest.raises(BadProofError):
        store.prepare_rotation(mid(1), make_rotation_proof(key(7), key(2)))  # another old key
    assert bytes(dev.data) == before and store.versions(mid(1)) == (1,)


# ---------------------------------------------------------- at rest, index

def test_reopening_rebuilds_the_index_from_the_log():
    dev = blank()
    store = open_store(dev)
    for n in range(6):
        store.put(mid(n), 1, key(10 * n + 1))
        store.put(mid(n), 2, key(10 * n + 2))
    store.retire(mid(2), 2)
    store.destroy(mid(3))
    again = open_store(dev)
    assert not again.report.created
    assert (again.report.live_meters, again.report.destroyed_meters) == (5, 1)
    assert again.report.records_scanned == len(RecordLog(dev))
    for n in range(6):
        assert again.status(mid(n)) == store.status(mid(n))
        assert again.versions(mid(n)) == store.versions(mid(n))
        for v in again.versions(mid(n)):
            assert again.get(mid(n), v) == key(10 * n + v)
    assert sorted(again.live_meters()) == sorted(store.live_meters())
    assert again.stats().live_bytes == store.stats().live_bytes


def test_no_key_is_ever_written_to_flash_in_clear():
    dev = blank()
    store = open_store(dev)
    for n in range(30):
        store.put(mid(n % 5), store.newest(mid(n % 5)) + 1 if n >= 5 else 1, key(n))
    image = bytes(dev.data)
    assert not [n for n in range(30) if key(n) in image]
    assert DK not in image


def test_a_wrong_device_key_is_refused_on_open_and_nothing_is_written():
    dev = blank()
    open_store(dev).put(mid(1), 1, key(1))
    before = bytes(dev.data)
    with pytest.raises(DeviceKeyError, match="does not open this key store"):
        open_store(dev, device_key=bytes(32))
    assert bytes(dev.data) == before
    with pytest.raises(ValueError, match="32 bytes"):
        open_store(dev, device_key=DK[:16])
    assert open_store(dev).get(mid(1)) == key(1)


def test_a_ciphertext_moved_to_another_meter_is_refused_not_decrypted():
    """Injected: a valid-CRC record carrying meter 1's ciphertext under meter 2's id."""
    dev = blank()
    open_store(dev).put(mid(1), 1, key(1))
    rec = key_records(dev, mid(1))[0]
    moved = StoredRecord(Kind.KEY, mid(2), 1, rec.nonce, rec.sealed)
    RecordLog(dev).append(encode_record(moved))
    store = open_store(dev)
    with pytest.raises(StoreCorruptError, match="fails authentication"):
        store.get(mid(2))
    assert store.get(mid(1)) == key(1)


def test_a_forged_tombstone_is_refused_on_open():
    """Injected: a TOMBSTONE record with a made-up tag. Survives: nothing is destroyed."""
    dev = blank()
    open_store(dev).put(mid(1), 1, key(1))
    RecordLog(dev).append(encode_record(StoredRecord(Kind.TOMBSTONE, mid(1), 1, bytes(12),
                                                     bytes(16))))
    with pytest.raises(StoreCorruptError, match="TOMBSTONE"):
        open_store(dev)


def _sealed(kind: Kind, meter_id: bytes, version: int, plaintext: bytes, n: int) -> bytes:
    """A record as the store writes it, sealed here with the device key directly."""
    bare = StoredRecord(kind, meter_id, version, n.to_bytes(12, "little"), b"")
    body = AESGCM(DK).encrypt(bare.nonce, plaintext, bare.aad())
    return encode_record(StoredRecord(kind, meter_id, version, bare.nonce, body))


def test_a_retire_before_the_copy_of_the_version_it_keeps_opens_to_that_version():
    """Two partial compactions can leave: a copy of v1, the retire below v2, then v2's copy."""
    dev = blank()
    RecordLog(dev).append_many([
        _sealed(Kind.KEYCHECK, b"", 0, b"", 1),
        _sealed(Kind.KEY, mid(1), 1, key(1), 2),
        _sealed(Kind.RETIRE, mid(1), 2, b"", 3),
        _sealed(Kind.KEY, mid(1), 2, key(2), 4),
    ])
    store = open_store(dev)
    assert store.versions(mid(1)) == (2,) and store.get(mid(1)) == key(2)


def test_a_meter_whose_every_version_was_retired_is_corrupt():
    """Injected: a log where a retire drops the only version. Survives: a clear refusal."""
    dev = blank()
    RecordLog(dev).append_many([
        _sealed(Kind.KEYCHECK, b"", 0, b"", 1),
        _sealed(Kind.KEY, mid(1), 1, key(1), 2),
        _sealed(Kind.RETIRE, mid(1), 2, b"", 3),
    ])
    with pytest.raises(StoreCorruptError, match="no live version"):
        open_store(dev)


def test_a_record_log_without_a_key_check_is_corrupt():
    dev = blank()
    RecordLog(dev).append(filler_record(10))
    with pytest.raises(StoreCorruptError, match="no key-check record"):
        open_store(dev)


# ------------------------------------------------------------ destruction

def _scatter(store: KeyStore) -> None:
    """Meters 0..9, each with twelve versions put over time (two kept): spread over segments."""
    for r in range(12):
        for n in range(10):
            v = r + 1
            store.put(mid(n), v, key(100 * n + v))
            if r >= 2:
                store.retire(mid(n), v - 1)


@pytest.mark.parametrize("victim", [0, 9])
def test_destroy_erases_every_ciphertext_of_the_meter_from_the_raw_image(tmp_path, victim):
    """A file-backed image; the victim's ciphertexts and keys are searched in the file's bytes."""
    ram = blank(16)
    _scatter(open_store(ram))  # in RAM: a file image would fsync every put
    img = tmp_path / "keystore.img"
    img.write_bytes(ram.data)
    with FileBlockDevice(img, SEG) as dev:
        store = open_store(dev)
        sealed = [r.sealed for r in key_records(dev, mid(victim))]
        assert len(sealed) >= 2
        raw = img.read_bytes()
        assert all(s in raw for s in sealed)  # the search can find them
        store.destroy(mid(victim))
        raw = img.read_bytes()
        assert not [s for s in sealed if s in raw]
        assert not [v for v in range(1, 13) if key(100 * victim + v) in raw]
        assert key_records(dev, mid(victim)) == []
        for n in set(range(10)) - {victim}:
            assert store.get(mid(n)) == key(100 * n + 12)
    with FileBlockDevice(img, SEG) as dev:
        again = open_store(dev)
        assert again.status(mid(victim)) is MeterStatus.DESTROYED
        assert not again.report.purge_finished


def test_destroying_a_meter_held_only_in_the_open_segment_still_erases_it():
    dev = blank()
    store = open_store(dev)
    store.put(mid(1), 1, key(1))
    store.put(mid(2), 1, key(2))
    sealed = key_records(dev, mid(2))[0].sealed
    store.destroy(mid(2))
    assert sealed not in bytes(dev.data)
    assert store.get(mid(1)) == key(1)


def test_destroying_a_meter_with_old_keys_compacts_only_the_oldest_segments():
    """The victim's records are far behind the tail: the purge copies the few live records
    ahead of them and releases that prefix, leaving the younger segments in place."""
    dev = blank(16)
    store = open_store(dev)
    store.put(mid(0), 1, key(1))
    for n in range(1, 4):
        store.put(mid(n), 1, key(n))
    for r in range(2, 200):  # meter 4 rotates on, its old versions pile up behind
        store.put(mid(4), r, key(400 + r))
    live = store.stats().live_versions
    sealed = key_records(dev, mid(0))[0].sealed
    before = RecordLog(dev).next_seq
    store.destroy(mid(0))
    assert sealed not in bytes(dev.data)
    copied = RecordLog(dev).next_seq - before - 1  # minus the tombstone
    assert 0 < copied < live // 2
    assert [store.get(mid(n)) for n in range(1, 4)] == [key(1), key(2), key(3)]
    assert store.get(mid(4), 2) == key(402)


# ------------------------------------------------------------- power cuts

def _bytes_written_by(dev, op) -> int:
    probe = PowerCutDevice(copy.deepcopy(dev))
    op(open_store(probe))
    return probe.written


def _cut(dev, op, budget: int) -> RamBlockDevice:
    victim = copy.deepcopy(dev)
    store = open_store(PowerCutDevice(victim, budget))
    with pytest.raises(PowerCut):
        op(store)
    with pytest.raises((PowerCut, LogFailedError)):
        store.put(mid(99), 1, key(99))
    return victim


def _held(store: KeyStore, meters) -> dict[bytes, dict[int, bytes]]:
    return {m: {v: store.get(m, v) for v in store.versions(m)} for m in meters}


def test_power_cut_at_every_byte_of_a_put_leaves_the_old_or_the_new_version():
    """Injected: power lost after each byte of a put. Survives: v1 always, v2 whole or absent."""
    dev = blank()
    store = open_store(dev)
    for n in range(4):
        store.put(mid(n), 1, key(n))
    op = lambda s: s.put(mid(2), 2, key(22))  # noqa: E731
    total = _bytes_written_by(dev, op)
    assert total == REC_OVERHEAD + record_payload_size(Kind.KEY, len(mid(2)))  # one record
    old = _held(store, [mid(n) for n in range(4)])
    new = {**old, mid(2): {1: key(2), 2: key(22)}}
    outcomes = set()
    for budget in range(total):
        after = open_store(_cut(dev, op, budget))
        got = _held(after, [mid(n) for n in range(4)])
        assert got in (old, new), f"cut after {budget} of {total} bytes"
        outcomes.add(got == new)
    assert outcomes == {False}  # the record is durable only once its last byte is written
    assert _held(open_store(_cut_after(dev, op)), new) == new


def _cut_after(dev, op) -> RamBlockDevice:
    done = copy.deepcopy(dev)
    op(open_store(done))
    return done


def _nearly_full(segments: int = 8) -> RamBlockDevice:
    """A store whose next put must compact first: fewer than the headroom segments free."""
    dev = blank(segments)
    store = open_store(dev)
    for n in range(6):
        store.put(mid(n), 1, key(100 * n + 1))
    for v in range(2, 1000):
        for n in range(6):
            store.retire(mid(n), v - 1)
            store.put(mid(n), v, key(100 * n + v))
            if store.stats().log.free_segments < HEADROOM_SEGMENTS:
                return dev
    raise AssertionError("the store never ran low on free segments")


def test_power_cut_during_a_put_that_compacts_first_loses_no_key():
    """Injected: power lost at about 60 sampled bytes (every total/48th, and every 8th of the
    last 96: the put's own record) of a put whose compaction closes the open segment, copies
    the live set and erases old segments (~26 KB written). Survives: every live version, the
    new one whole or absent."""
    dev = _nearly_full()
    store = open_store(dev)
    meters = [mid(n) for n in range(6)]
    newest = store.newest(mid(0))
    op = lambda s: s.put(mid(0), newest + 1, key(7777))  # noqa: E731
    total = _bytes_written_by(dev, op)
    probe = open_store(copy.deepcopy(dev))
    op(probe)
    assert probe.stats().compactions == 1 and total > 2 * SEG
    old = _held(store, meters)
    new = {**old, mid(0): {**old[mid(0)], newest + 1: key(7777)}}
    cuts = sorted(set(range(0, total, total // 48)) | set(range(total - 96, total, 8)))
    for budget in cuts:
        victim = _cut(dev, op, budget)
        after = open_store(victim)
        assert _held(after, meters) in (old, new), f"cut after {budget} of {total} bytes"
        if budget % 3 == 0:  # the recovered store takes writes
            after.put(mid(50), 1, key(50))
            assert open_store(victim).get(mid(50)) == key(50)


def test_power_cut_during_a_destroy_either_keeps_the_meter_or_finishes_erasing_it():
    """Injected: power lost at about 45 sampled bytes (every total/45th) of a destroy.
    Survives: the other meters; the victim is live and whole, or destroyed with its
    ciphertext gone after reopen."""
    dev = blank(12)
    store = open_store(dev)
    _scatter(store)
    sealed = [r.sealed for r in key_records(dev, mid(0))]
    others = _held(store, [mid(n) for n in range(1, 10)])
    whole = _held(store, [mid(0)])
    op = lambda s: s.destroy(mid(0))  # noqa: E731
    total = _bytes_written_by(dev, op)
    finished = 0
    assert total > 2 * SEG
    for budget in range(0, total, total // 45):
        victim = _cut(dev, op, budget)
        after = open_store(victim)
        assert _held(after, [mid(n) for n in range(1, 10)]) == others, budget
        if after.status(mid(0)) is MeterStatus.LIVE:
            assert _held(after, [mid(0)]) == whole
        else:
            assert after.status(mid(0)) is MeterStatus.DESTROYED
            assert not [s for s in sealed if s in victim.data], f"cut after {budget}"
            finished += after.report.purge_finished
    assert finished, "no cut fell between the tombstone and the end of the purge"


# ------------------------------------------------------------------- space

def test_a_long_rotation_workload_never_fills_the_partition():
    """40 meters rotating 30 times each (keeping two versions) through 10 erase blocks:
    the partition is written over about 8 times; compaction keeps it open, wear stays even."""
    dev = blank(10)
    store = open_store(dev)
    meters = [mid(n) for n in range(40)]
    for i, m in enumerate(meters):
        store.put(m, 1, key(i))
    for r in range(2, 32):
        for i, m in enumerate(meters):
            store.put(m, r, key(1000 * r + i))
            store.retire(m, r - 1)
    st_ = store.stats()
    assert st_.compactions >= 8 and st_.live_versions == 80
    assert st_.log.erase_max - st_.log.erase_min <= 2
    assert dev.counters().bytes_written > 6 * 10 * SEG
    again = open_store(dev)
    assert all(again.get(m) == key(31000 + i) for i, m in enumerate(meters))


def test_a_live_set_that_does_not_fit_is_refused_before_the_partition_fills():
    dev = blank(8)
    store = open_store(dev)
    n = 0
    with pytest.raises(StoreFullError, match="key store full"):
        while True:
            store.put(mid(n % 1000), 1 + n // 1000, key(n))
            n += 1
    assert n > 100
    again = open_store(dev)
    assert all(again.get(mid(i)) == key(i) for i in range(n))
    assert again.status(mid(n)) is MeterStatus.UNKNOWN
    for i in range(20):  # a full store can still revoke, and then takes keys again
        again.destroy(mid(i))
    again.put(mid(n), 1, key(n))
    assert open_store(dev).get(mid(n)) == key(n)


# --------------------------------------------------------------- property

meter_ops = st.lists(st.tuples(  # puts and rotations weighted up, so the erase blocks fill
    st.sampled_from(["put", "put", "rotate", "rotate", "retire", "destroy", "reopen"]),
    st.integers(0, 4)), min_size=4, max_size=40)


@given(meter_ops)
def test_the_store_matches_a_dict_model_under_any_sequence_of_operations(ops):
    """Small erase blocks (8 x 256 B: two key records each), so space compactions happen as
    well as purges; a put the live set cannot take is refused whole (StoreFullError) and the
    model keeps it out."""
    dev = RamBlockDevice(256, 8)
    store = open_store(dev)
    model: dict[bytes, dict[int, bytes] | None] = {}  # None: destroyed
    last: dict[bytes, int] = {}
    counter = 0
    for op, n in ops:
        m = mid(n)
        live = model.get(m)
        counter += 1
        if op in ("put", "rotate") and (live or op == "put"):
            v = max(live) + 1 if live else last.get(m, 0) + 1
            try:
                if op == "put":
                    store.put(m, v, key(counter))
                else:
                    prepared = store.prepare_rotation(m, make_rotation_proof(live[v - 1],
                                                                             key(counter)))
                    assert prepared.version == v
                    store.commit_key(prepared)
            except StoreFullError:
                assert store.stats().live_bytes > 512  # several erase blocks are live
            else:
                model[m] = {**(live or {}), v: key(counter)}
                last[m] = v
        elif op == "retire" and live:
            assert store.retire(m, max(live)) == len(live) - 1
            model[m] = {max(live): live[max(live)]}
        elif op == "destroy":
            if m not in model:
                with pytest.raises(UnknownKeyError):
                    store.destroy(m)
                continue
            sealed = [r.sealed for r in key_records(dev, m)]
            store.destroy(m)
            model[m] = None
            assert not [s for s in sealed if s in dev.data]
        elif op == "reopen":
            store = open_store(dev, seed=counter)
        for k in range(5):
            want = model.get(mid(k), {})
            status = (MeterStatus.UNKNOWN if mid(k) not in model else
                      MeterStatus.DESTROYED if want is None else MeterStatus.LIVE)
            assert store.status(mid(k)) is status
            assert {v: store.get(mid(k), v) for v in store.versions(mid(k))} == (want or {})


@st.composite
def records(draw) -> StoredRecord:
    kind = draw(st.sampled_from(list(Kind)))
    if kind is Kind.FILLER:
        return decode_record(filler_record(draw(st.integers(2, 300))))
    check = kind is Kind.KEYCHECK
    meter = b"" if check else draw(st.binary(min_size=1, max_size=16))
    version = 0 if check else draw(st.integers(0, 2**32 - 1))
    sealed = 48 if kind is Kind.KEY else 16
    return StoredRecord(kind, meter, version, draw(st.binary(min_size=12, max_size=12)),
                        draw(st.binary(min_size=sealed, max_size=sealed)))


@st.composite
def mutated_records(draw) -> bytes:
    data = bytearray(encode_record(draw(records())))
    data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@given(records())
def test_every_record_value_round_trips_through_its_encoding(rec):
    assert decode_record(encode_record(rec)) == rec


def test_records_and_the_index_name_meters_by_their_id_type():
    dev = blank()
    store = open_store(dev)
    store.put(mid(1), 1, key(1))
    assert [type(r.meter_id) for r in key_records(dev, mid(1))] == [MeterId]
    assert [type(m) for m in open_store(dev).live_meters()] == [MeterId]
    with pytest.raises(MeterIdError):
        store.get(b"x" * 17)
    with pytest.raises(TypeError):  # as before: a meter id is bytes
        store.status("meter-001")  # type: ignore[arg-type]


@given(st.one_of(st.binary(max_size=120), mutated_records()))
def test_any_bytes_decode_to_a_record_that_re_encodes_or_raise_a_corruption_error(data):
    try:
        rec = decode_record(data)
    except StoreCorruptError:
        return
    assert encode_record(rec) == data


# ---------------------------------------------------------- board geometry

def test_the_store_runs_on_the_boards_keystore_partition_of_a_flash_image(tmp_path):
    board = load_board(board_path("host"))
    img = tmp_path / "flash.img"
    bs = board.flash.erase_block_bytes
    with FileBlockDevice.create_image(img, board.flash.size_bytes, bs) as dev:
        store = KeyStore.on_board(dev, board.flash, DK)
        assert store.stats().log.segments == 32 * 1024 * 1024 // bs
        store.put(mid(1), 1, key(1))
        store.destroy(mid(1))
        store.put(mid(2), 1, key(2))
    with FileBlockDevice(img, bs) as dev:
        again = KeyStore.on_board(dev, board.flash, DK)
        assert again.get(mid(2)) == key(2)
        assert again.status(mid(1)) is MeterStatus.DESTROYED
    part = board.flash.partition("keystore")
    with open(img, "rb") as f:
        f.seek(part.offset_bytes - 4096)
        assert f.read(4096) == bytes(4096)  # the partition below is untouched
        f.seek(part.offset_bytes + part.size_bytes)
        assert f.read(4096) == bytes(4096)  # and the one above


# ------------------------------------------------------------- device key

def test_a_device_key_is_created_once_with_mode_0600_and_then_loaded(tmp_path):
    path = tmp_path / "device.key"
    k = load_device_key(path, create=True, entropy=random.Random(3).randbytes)
    assert len(k) == DEVICE_KEY_BYTES and path.read_bytes() == k
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_device_key(path) == k
    assert load_device_key(path, create=True) == k  # create never replaces a key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.key"]  # no temporary left


def test_a_missing_device_key_is_an_error_unless_creation_is_asked_for(tmp_path):
    with pytest.raises(DeviceKeyFileError, match="no device key"):
        load_device_key(tmp_path / "absent.key")


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_a_device_key_file_of_the_wrong_size_is_refused(tmp_path, size):
    path = tmp_path / "device.key"
    path.write_bytes(bytes(size))
    path.chmod(0o600)
    with pytest.raises(DeviceKeyFileError, match=f"holds {size} bytes"):
        load_device_key(path, create=True)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_device_key_that_group_or_others_may_read_is_refused(tmp_path, mode):
    path = tmp_path / "device.key"
    path.write_bytes(bytes(32))
    path.chmod(mode)
    with pytest.raises(DeviceKeyFileError, match="chmod 600"):
        load_device_key(path)


def test_a_device_key_behind_a_symlink_or_a_directory_is_refused(tmp_path):
    real = tmp_path / "real.key"
    real.write_bytes(bytes(32))
    real.chmod(0o600)
    (tmp_path / "link.key").symlink_to(real)
    with pytest.raises(DeviceKeyFileError, match="cannot open"):
        load_device_key(tmp_path / "link.key")
    (tmp_path / "dir.key").mkdir(mode=0o700)
    with pytest.raises(DeviceKeyFileError, match="not a regular file"):
        load_device_key(tmp_path / "dir.key")


def test_the_device_key_file_opens_the_store_it_created(tmp_path):
    dk = load_device_key(tmp_path / "device.key", create=True)
    dev = blank()
    KeyStore(dev, dk).put(mid(1), 1, key(1))
    assert KeyStore(dev, load_device_key(tmp_path / "device.key")).get(mid(1)) == key(1)


# ------------------------------------------------------------ commit protocol

def test_preparing_a_rotation_writes_nothing_and_an_uncommitted_one_leaves_no_trace():
    """Before, ``rotate`` wrote the new key before its block committed. Now prepare writes
    nothing; a rotation whose block never commits leaves flash byte for byte as it was."""
    dev = blank()
    store = open_store(dev)
    store.put(mid(1), 1, key(1))
    before = bytes(dev.data)
    prepared = store.prepare_rotation(mid(1), make_rotation_proof(key(1), key(2)))
    assert bytes(dev.data) == before and store.versions(mid(1)) == (1,)
    assert key(2).hex() not in repr(prepared) and str(key(2)) not in repr(prepared)
    del prepared  # the block never committed
    again = open_store(dev)
    assert again.versions(mid(1)) == (1,) and again.get(mid(1)) == key(1)


def test_a_committed_key_is_stored_once_and_a_retry_is_a_no_op():
    dev = blank()
    store = open_store(dev)
    store.put(mid(1), 1, key(1))
    prepared = store.prepare_rotation(mid(1), make_rotation_proof(key(1), key(2)))
    assert store.commit_key(prepared) is True
    after = bytes(dev.data)
    assert store.commit_key(prepared) is False and bytes(dev.data) == after
    rebooted = open_store(dev, seed=8)
    assert rebooted.commit_key(prepared) is False  # a block delivered again after a reboot
    assert rebooted.get(mid(1), 2) == key(2)


def test_a_commit_never_overwrites_a_version_held_with_another_key():
    store = open_store(blank())
    store.put(mid(1), 1, key(1))
    with pytest.raises(KeyConflictError):
        store.commit_key(PreparedKey(mid(1), 1, key(9)))
    assert store.get(mid(1), 1) == key(1)


def test_a_rotation_back_to_a_key_the_meter_held_is_refused():
    """Injected: the meter wraps its previous key under the current one (a downgrade)."""
    store = open_store(blank())
    store.put(mid(1), 1, key(1))
    store.commit_key(store.prepare_rotation(mid(1), make_rotation_proof(key(1), key(2))))
    with pytest.raises(BadProofError) as info:
        store.prepare_rotation(mid(1), make_rotation_proof(key(2), key(1)))
    assert info.value.fault is ProofFault.KEY_REUSED
    with pytest.raises(BadProofError):
        store.prepare_key(mid(1), 3, key(1))
    assert store.versions(mid(1)) == (1, 2)
