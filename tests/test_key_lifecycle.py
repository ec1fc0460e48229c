"""A meter key's whole life through the node core, on a file-backed image of the host board.

ecd-00 is one of five terminals. Its chain lives in the board's ``ledger``
partition and its keys in the ``keystore`` partition of one sparse 1 GiB
image; the other four run the same node core on RAM flash. Meters are
played by emulator/meter_keys.py and send the node core's requests; the
five terminals endorse (more than half must: paper, section 2.2.1) and an
in-process ordering (emulator/localnet.py) delivers each block to all of
them. Every operation follows DESIGN.md's data path: check, prepare the key
(nothing written), propose, endorse, order, validate and append, then the
key-store effect, then the acknowledgement.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.keystore.material import fingerprint, make_rotation_proof, new_key
from agent.keystore.store import KeyDestroyedError, Kind, decode_record
from agent.keystore.store import MeterStatus as StoreStatus
from agent.keystore.transport import NotAuthorisedError, open_envelope, public_bytes
from agent.ledger.chain import REC_TX, ChainCorruptError, open_chain, scan_newest_record
from agent.ledger.query import Answer, QueryResult
from agent.ledger.state import MeterStatus
from agent.ledger.tx import TxKind, rotation_proof_digest
from agent.node import events as ev
from agent.node.actions import Acknowledge, Nak, Refuse
from agent.terminal import board_partitions
from emulator.localfleet import LocalFleet
from emulator.meter_keys import MeterKeys
from emulator.provision import Provisioning, provision
from hal.blockdev import FileBlockDevice, open_partition
from hal.board import board_path, load_board
from hal.devicekey import load_device_key
from hal.recordlog import RecordLog

BOARD = load_board(board_path("host"))
FLASH = BOARD.flash
T0 = 1_700_000_000_000
MASTER_ID = b"master-station"
MASTER = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"master station").digest())


def meter(n: int) -> bytes:
    """A 6-byte DL/T 698.45 server address."""
    return (100000 + n).to_bytes(6, "big")


METERS = [meter(n) for n in range(1, 8)]
FLEET: Provisioning = provision(5, METERS, timestamp_ms=T0, seed=b"lifecycle")


class Site(LocalFleet):
    """The five terminals, ecd-00 on the image, and the meters."""

    def __init__(self, image: Path, device_key: bytes):
        self.image = image
        self.dev = FileBlockDevice(image, FLASH.erase_block_bytes)
        super().__init__(FLEET, board_partitions(self.dev, FLASH), device_key,
                         extra_peers={MASTER_ID: public_bytes(MASTER)})
        self.meters = {m: MeterKeys(m, FLEET.factory_keys[m], random.Random(m).randbytes)
                       for m in METERS}

    def reopen(self) -> None:
        """ecd-00 powers off and on: its chain and key store are read back from the image."""
        self.dev.close()
        self.dev = FileBlockDevice(self.image, FLASH.erase_block_bytes)
        self.reboot(board_partitions(self.dev, FLASH))

    def close(self) -> None:
        self.dev.close()

    def send(self, event: ev.Event, home: str = "ecd-00") -> Acknowledge | Refuse:
        """A meter's request to its home; the meter takes its new key on the acknowledgement."""
        reply = self.request(event, home)
        m = self.meters.get(event.meter_id)
        if m is not None and isinstance(reply, Acknowledge):
            m.heard(event, reply)
        return reply

    def register(self, n: int, home: str = "ecd-00") -> Acknowledge:
        reply = self.send(self.meters[meter(n)].register(), home)
        assert isinstance(reply, Acknowledge), reply
        return reply


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """Five terminals founded on the fleet's genesis; ecd-00 on a fresh sparse image."""
    image = tmp_path / "flash.img"
    FileBlockDevice.create_image(image, FLASH.size_bytes, FLASH.erase_block_bytes).close()
    device_key = load_device_key(tmp_path / "device.key", create=True,
                                 entropy=random.Random(7).randbytes)
    s = Site(image, device_key)
    try:
        assert s.ecd.chain.height is None and s.ecd.keys.report.created
        s.found()
        assert all(t.chain.height == 0 for t in s.net.terminals.values())
        yield s
    finally:
        s.close()


def partition_bytes(image: Path, name: str) -> bytes:
    part = FLASH.partition(name)
    with open(image, "rb") as f:
        f.seek(part.offset_bytes)
        return f.read(part.size_bytes)


def sealed_keys_on_flash(s: Site, meter_id: bytes) -> list[bytes]:
    """The meter's key ciphertexts as stored, read through a second (reading) view of the log."""
    log = RecordLog(open_partition(s.dev, FLASH, "keystore"))
    records = (decode_record(payload) for _, payload in log.records())
    return [r.sealed for r in records if r.kind is Kind.KEY and r.meter_id == meter_id]


# ------------------------------------------------------------- operations

def test_a_registered_meter_answers_local_with_the_key_its_fingerprint_names(site):
    ack = site.register(1)
    assert (ack.key_version, ack.height) == (1, 1)
    k1 = site.meters[meter(1)].key
    got = site.answer(meter(1))
    assert got.answer is Answer.LOCAL and got.home == "ecd-00"
    assert (got.key, got.key_version, got.height) == (k1, 1, 1)
    assert got.fingerprint == fingerprint(k1)
    assert got.record is not None and got.record.tx.kind is TxKind.REGISTER
    assert k1 not in site.ecd.chain.log.read(got.record.seq)  # the chain records no key
    for t in site.net.terminals.values():  # every terminal holds the same chain
        assert t.chain.state_digest() == site.ecd.chain.state_digest()


def test_a_rotation_commits_version_2_and_queries_answer_the_new_key(site):
    site.register(1)
    m = site.meters[meter(1)]
    old = m.key
    request = m.rotate()  # the meter wraps its new key under the old one
    ack = site.send(request)
    assert isinstance(ack, Acknowledge) and (ack.key_version, ack.height) == (2, 2)
    got = site.answer(meter(1))
    assert got.answer is Answer.LOCAL
    assert (got.key, got.key_version, got.fingerprint) == (m.key, 2, fingerprint(m.key))
    assert got.key != old
    tx = got.record.tx
    assert (tx.kind, tx.key_version, tx.counter) == (TxKind.ROTATE, 2, 2)
    assert tx.proof == rotation_proof_digest(request.proof)
    assert request.proof not in site.ecd.chain.log.read(got.record.seq)  # the wrap stays home
    assert site.ecd.keys.get(meter(1), 1) == old  # kept until retired, never answered


def test_a_proof_under_the_wrong_old_key_is_refused_and_nothing_is_proposed(site):
    site.register(1)
    ecd = site.ecd
    before = (ecd.chain.height, ecd.chain.log.next_seq, ecd.keys.versions(meter(1)),
              ecd.node.counters.get("rounds"))
    forged = ev.RotateRequest(meter(1), 99, 2, make_rotation_proof(new_key(), new_key()))
    reply = site.send(forged)
    assert isinstance(reply, Refuse) and reply.reason is Nak.BAD_PROOF
    assert (ecd.chain.height, ecd.chain.log.next_seq, ecd.keys.versions(meter(1)),
            ecd.node.counters.get("rounds")) == before
    assert site.answer(meter(1)).key == site.meters[meter(1)].key


def test_an_export_opens_at_the_master_station_and_strangers_are_refused(site):
    site.register(1)
    got = site.answer(meter(1))
    envelope = site.ecd.keys.export(meter(1), MASTER_ID, site.peers)
    assert got.key not in envelope
    assert open_envelope(MASTER, envelope, meter_id=meter(1), key_version=got.key_version,
                         requester_id=MASTER_ID) == got.key
    with pytest.raises(NotAuthorisedError):
        site.ecd.keys.export(meter(1), b"unknown-requester", site.peers)


def test_a_meter_homed_elsewhere_answers_remote_and_an_unknown_one_unknown(site):
    site.register(2, home="ecd-01")  # ecd-01 proposed it; ecd-00 stores the block too
    got = site.answer(meter(2))
    assert got.answer is Answer.REMOTE and got.home == "ecd-01"
    assert got.key is None and got.key_version == 1
    assert site.ecd.keys.status(meter(2)) is StoreStatus.UNKNOWN
    reply = site.send(site.meters[meter(2)].rotate())  # asked of the wrong terminal
    assert isinstance(reply, Refuse) and (reply.reason, reply.home) == (Nak.NOT_HOME, "ecd-01")
    unknown = site.answer(meter(99))
    assert unknown == QueryResult(Answer.UNKNOWN, meter(99))
    assert scan_newest_record(site.ecd.chain.log, meter(99)) is None


def test_a_migrated_meter_is_handed_over_and_its_copy_here_erased(site):
    site.register(3)
    key = site.meters[meter(3)].key
    sealed = sealed_keys_on_flash(site, meter(3))
    reply = site.net.send("ecd-00", ev.MigrateRequest(meter(3), 500, "ecd-01"))
    assert [type(r) for r in reply] == [Acknowledge]
    got = site.answer(meter(3))
    assert got.answer is Answer.REMOTE and got.home == "ecd-01"
    assert (got.key, got.key_version, got.fingerprint) == (None, 1, fingerprint(key))
    assert got.record.tx.kind is TxKind.MIGRATE
    new_home = site.net.terminals["ecd-01"]
    assert site.answer(meter(3), new_home.id).key == key  # the new home holds it now
    assert site.ecd.keys.status(meter(3)) is StoreStatus.DESTROYED  # erased after its ack
    raw = partition_bytes(site.image, "keystore")
    assert sealed and [s for s in sealed if s in raw] == [] and key not in raw
    m = site.meters[meter(3)]
    stale = site.send(m.rotate(), home="ecd-01")  # the migration took the meter's next counter
    assert isinstance(stale, Refuse) and (stale.reason, stale.counter) == (Nak.REPLAYED, 2)
    m.resync(stale.counter)
    rotated = site.send(m.rotate(), home="ecd-01")  # served by its new home
    assert isinstance(rotated, Acknowledge) and rotated.key_version == 2


def test_a_revoke_answers_revoked_and_erases_the_key_from_the_image(site):
    site.register(1)
    k1 = site.meters[meter(1)].key
    site.send(site.meters[meter(1)].rotate())
    k2 = site.meters[meter(1)].key
    sealed = sealed_keys_on_flash(site, meter(1))
    assert len(sealed) == 2
    raw = partition_bytes(site.image, "keystore")
    assert all(s in raw for s in sealed)  # the search finds what is there
    ack = site.send(site.meters[meter(1)].revoke())
    assert isinstance(ack, Acknowledge) and ack.height == 3
    got = site.answer(meter(1))
    assert got.answer is Answer.REVOKED
    assert (got.key, got.fingerprint, got.key_version) == (None, None, 2)
    assert got.record.tx.kind is TxKind.REVOKE
    with pytest.raises(KeyDestroyedError):
        site.ecd.keys.get(meter(1))
    raw = partition_bytes(site.image, "keystore")
    assert [s for s in sealed if s in raw] == []
    assert k1 not in raw and k2 not in raw
    assert sealed_keys_on_flash(site, meter(1)) == []


def test_a_revoke_without_the_meters_proof_is_refused_and_nothing_is_proposed(site):
    site.register(1)
    seq = site.ecd.chain.log.next_seq
    forged = ev.RevokeRequest(meter(1), 77, 2, make_rotation_proof(new_key(), new_key()))
    reply = site.send(forged)
    assert isinstance(reply, Refuse) and reply.reason is Nak.BAD_PROOF
    assert site.ecd.chain.log.next_seq == seq
    assert site.answer(meter(1)).key == site.meters[meter(1)].key


def test_a_revoked_meter_registers_again_as_a_new_key_line(site):
    site.register(1)
    site.send(site.meters[meter(1)].rotate())
    site.send(site.meters[meter(1)].revoke())
    ack = site.register(1)
    assert (ack.key_version, ack.height) == (3, 4)
    got = site.answer(meter(1))
    k3 = site.meters[meter(1)].key
    assert got.answer is Answer.LOCAL
    assert (got.key, got.key_version, got.fingerprint) == (k3, 3, fingerprint(k3))
    assert site.ecd.keys.versions(meter(1)) == (3,)


def test_a_replayed_request_is_refused_by_the_chains_counter(site):
    """Injected: the meter's committed rotation request sent again with a new request id."""
    site.register(1)
    rotate = site.meters[meter(1)].rotate()
    site.send(rotate)
    replay = ev.RotateRequest(rotate.meter_id, 4242, rotate.counter, rotate.proof)
    again = site.send(replay)
    # the same counter and proof: a committed retry, answered again without a new block
    assert isinstance(again, Acknowledge) and again.key_version == 2
    stale = ev.RotateRequest(rotate.meter_id, 4243, rotate.counter - 1, rotate.proof)
    refused = site.send(stale)
    assert isinstance(refused, Refuse) and refused.reason is Nak.REPLAYED
    assert refused.counter == rotate.counter and site.ecd.chain.height == 2


# ------------------------------------------------------------ whole story

STORY_METERS = [meter(n) for n in (1, 2, 3, 4, 5, 99)]


def story(s: Site) -> None:
    """Every operation: register, rotate, refused proof, remote, migrate, revoke, register again."""
    s.register(1)
    s.send(s.meters[meter(1)].rotate())
    refused = s.send(ev.RotateRequest(meter(1), 900, 50, make_rotation_proof(new_key(),
                                                                             new_key())))
    assert isinstance(refused, Refuse) and refused.reason is Nak.BAD_PROOF
    s.register(2, home="ecd-01")
    s.register(4)
    s.register(5)
    s.net.send("ecd-00", ev.MigrateRequest(meter(4), 901, "ecd-01"))
    s.send(s.meters[meter(5)].revoke())
    s.send(s.meters[meter(1)].revoke())
    s.register(1)
    s.register(3)


def test_every_answer_is_the_same_after_a_reboot_and_matches_the_tail_scan(site):
    story(site)
    before = {m: site.answer(m) for m in STORY_METERS}
    assert [before[m].answer for m in STORY_METERS] == [
        Answer.LOCAL, Answer.REMOTE, Answer.LOCAL, Answer.REMOTE, Answer.REVOKED, Answer.UNKNOWN]
    height, digest = site.ecd.chain.height, site.ecd.chain.state_digest()
    site.reopen()
    again = site.ecd
    assert again.chain.height == height == 10
    assert again.chain.report.blocks_replayed == height + 1
    assert again.chain.report.orphans == 0
    assert again.chain.state_digest() == digest
    after = {m: site.answer(m) for m in STORY_METERS}
    assert after == before
    assert again.chain.verify(deep=True).height == height
    for m, got in after.items():
        scanned = scan_newest_record(again.chain.log, m)
        assert scanned == (got.record.tx if got.record is not None else None)
        if scanned is not None:
            entry = again.chain.entry(m)
            assert (scanned.home, scanned.counter) == (entry.home, entry.counter)
            assert (scanned.kind is TxKind.REVOKE) == (entry.status is MeterStatus.REVOKED)
    with pytest.raises(KeyDestroyedError):
        again.keys.get(meter(5))
    assert again.node.pending_keys == set()
    reply = site.send(site.meters[meter(3)].rotate())  # the rebooted terminal serves on
    assert isinstance(reply, Acknowledge) and reply.height == height + 1


# ------------------------------------------------------------------ tamper

def _offset_in_partition(image: Path, name: str, payload: bytes) -> int:
    """Where ``payload`` sits in the image file: records never cross an erase block."""
    part = FLASH.partition(name)
    block = FLASH.erase_block_bytes
    with open(image, "rb") as f:
        for start in range(part.offset_bytes, part.offset_bytes + part.size_bytes, block):
            f.seek(start)
            at = f.read(block).find(payload)
            if at >= 0:
                return start + at
    raise AssertionError("the record is not in the partition")


def test_a_flipped_byte_in_a_stored_transaction_names_its_block_at_boot(site):
    """Injected: one bit of a ROTATE record of block 2 flipped in the image file (bit rot).

    Survives: boot refuses the chain, naming height 2 rather than dropping
    the block or the blocks after it; the image untouched boots cleanly.
    """
    site.register(1)
    site.send(site.meters[meter(1)].rotate())
    site.register(2)
    entry = site.ecd.chain.entry(meter(1))
    assert entry.height == 2
    payload = site.ecd.chain.log.read(entry.seq)
    assert payload[0] == REC_TX
    site.close()
    with FileBlockDevice(site.image, FLASH.erase_block_bytes) as dev:
        assert open_chain(open_partition(dev, FLASH, "ledger"), FLEET.identities[0]).height == 3
    at = _offset_in_partition(site.image, "ledger", payload) + len(payload) // 2
    with open(site.image, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes((byte ^ 0x10,)))
    with (FileBlockDevice(site.image, FLASH.erase_block_bytes) as dev,
          pytest.raises(ChainCorruptError) as info):
        open_chain(open_partition(dev, FLASH, "ledger"), FLEET.identities[0])
    assert info.value.height == entry.height == 2
    assert "fails its check" in info.value.detail
