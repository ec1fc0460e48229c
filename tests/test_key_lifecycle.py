"""A meter key's whole life on one terminal, on a file-backed image of the host board's flash.

The terminal is ecd-00 of five. Its chain lives in the board's ``ledger``
partition and its keys in the ``keystore`` partition of one sparse 1 GiB
image; the test plays the meters (agent/keystore/material.py) and the other
terminals' endorsements (3 of 5, the paper's "more than 50 %"). Each
operation follows DESIGN.md "Data path (one key rotation)": the home checks
what the meter sent, stores the key, then proposes a transaction with the
fingerprint (and the proof's digest), which commits as an endorsed block
appended to flash; queries are answered from the chain's index
(paper, section 2.2.1, steps 1-4; section 2.1 for migration).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.keystore.material import (
    BadProofError,
    ProofFault,
    fingerprint,
    is_revocation_proof,
    make_revocation_proof,
    make_rotation_proof,
    new_key,
    proof_digest,
)
from agent.keystore.store import KeyDestroyedError, KeyStore, Kind, decode_record
from agent.keystore.transport import AllowList, NotAuthorisedError, open_envelope, public_bytes
from agent.ledger.block import endorse, genesis, with_endorsements
from agent.ledger.chain import REC_TX, Chain, ChainCorruptError, open_chain, scan_newest_record
from agent.ledger.identity import TerminalIdentity
from agent.ledger.query import Answer, QueryResult, query
from agent.ledger.rules import Changes, propose_block
from agent.ledger.state import MeterStatus
from agent.ledger.tx import Transaction, TxBuilder, TxKind, rotation_proof_digest
from hal.blockdev import FileBlockDevice, open_partition
from hal.board import board_path, load_board
from hal.devicekey import load_device_key
from hal.recordlog import RecordLog

BOARD = load_board(board_path("host"))
FLASH = BOARD.flash
T0 = 1_700_000_000_000

TERMINALS = [TerminalIdentity.from_seed(f"ecd-{i:02d}",
                                        hashlib.sha256(b"lifecycle terminal %d" % i).digest())
             for i in range(5)]
SELF, OTHER = TERMINALS[0], TERMINALS[1]
MASTER_ID = b"master-station"
MASTER = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"master station").digest())
OTHER_TRANSPORT = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"ecd-01 x25519").digest())
ALLOW = AllowList({MASTER_ID: public_bytes(MASTER),
                   OTHER.terminal_id.encode(): public_bytes(OTHER_TRANSPORT)})


def meter(n: int) -> bytes:
    """A 6-byte DL/T 698.45 server address."""
    return (100000 + n).to_bytes(6, "big")


def meter_keys(seed: int) -> Callable[[int], bytes]:
    """The meter's entropy source: fixed per seed, so every run makes the same keys."""
    return random.Random(seed).randbytes


class Terminal:
    """ecd-00 as booted from the image: its chain, its key store and the quorum it proposes to.

    Every boot gets a fresh nonce stream for the key store (AES-GCM nonces
    must never repeat under the device key, NIST SP 800-38D 8.3).
    """

    def __init__(self, image: Path, device_key: bytes, boot: int = 0, clock: int = T0):
        self.image = image
        self.dev = FileBlockDevice(image, FLASH.erase_block_bytes)
        self.chain: Chain = open_chain(open_partition(self.dev, FLASH, "ledger"), SELF)
        self.keys = KeyStore.on_board(self.dev, FLASH, device_key,
                                      entropy=random.Random(1000 + boot).randbytes)
        self.builder = TxBuilder(SELF)
        self.device_key = device_key
        self.boot = boot
        self.clock = clock

    def reboot(self) -> Terminal:
        self.close()
        return Terminal(self.image, self.device_key, self.boot + 1, self.clock)

    def close(self) -> None:
        self.dev.close()

    # ------------------------------------------------------------ ordering

    def commit(self, txs: Sequence[Transaction], proposer: TerminalIdentity = SELF,
               attest: Callable[[Transaction], bool] | None = None) -> Changes:
        """Propose, collect 3 of 5 endorsements (the proposer's own counts), append to flash."""
        self.clock += 1000
        block = propose_block(self.chain.state, proposer, txs, timestamp_ms=self.clock)
        endorsers = [proposer, *[t for t in TERMINALS if t is not proposer][:2]]
        changes = self.chain.append(with_endorsements(block, [endorse(t, block.header)
                                                              for t in endorsers]), attest)
        assert len(changes.meters) == len(txs), "a transaction of the block was refused"
        return changes

    # ---------------------------------------------------- the home's data path

    def register(self, meter_id: bytes, key: bytes, *, version: int, counter: int) -> int:
        """Store the meter's key, then commit its fingerprint; the block's height."""
        self.keys.put(meter_id, version, key)
        tx = self.builder.register(meter_id, key_version=version, fingerprint=fingerprint(key),
                                   counter=counter)
        return self.commit([tx]).height

    def rotate(self, meter_id: bytes, proof: bytes, *, counter: int) -> int:
        """Open the proof under the stored key (BadProofError: nothing proposed), then commit."""
        version = self.keys.rotate(meter_id, proof)
        tx = self.builder.rotate(meter_id, key_version=version,
                                 fingerprint=fingerprint(self.keys.get(meter_id, version)),
                                 proof=rotation_proof_digest(proof), counter=counter)
        return self.commit([tx], attest=lambda t: t.proof == proof_digest(proof)).height

    def revoke(self, meter_id: bytes, proof: bytes, *, counter: int) -> int:
        """The meter's empty-key request: checked, every key version erased, then committed."""
        entry = self.chain.entry(meter_id)
        assert entry is not None
        if not is_revocation_proof(self.keys.get(meter_id, entry.key_version), proof):
            raise BadProofError(ProofFault.UNWRAP_FAILED)
        self.keys.destroy(meter_id)
        tx = self.builder.revoke(meter_id, key_version=entry.key_version, counter=counter,
                                 proof=rotation_proof_digest(proof))
        return self.commit([tx], attest=lambda t: t.proof == proof_digest(proof)).height

    def migrate(self, meter_id: bytes, new_home: str, *, counter: int) -> int:
        """Re-home the meter (placement's decision): the new home, same key version."""
        entry = self.chain.entry(meter_id)
        assert entry is not None
        tx = self.builder.migrate(meter_id, new_home=new_home, key_version=entry.key_version,
                                  fingerprint=entry.fingerprint, counter=counter)
        return self.commit([tx]).height

    def answer(self, meter_id: bytes) -> QueryResult:
        return query(self.chain, meter_id, SELF.terminal_id, with_record=True,
                     key_source=self.keys.get, fingerprint=fingerprint)


@pytest.fixture
def ecd(tmp_path: Path) -> Iterator[Terminal]:
    """ecd-00 on a fresh sparse image, its genesis (five founders) endorsed by three."""
    image = tmp_path / "flash.img"
    FileBlockDevice.create_image(image, FLASH.size_bytes, FLASH.erase_block_bytes).close()
    device_key = load_device_key(tmp_path / "device.key", create=True,
                                 entropy=random.Random(7).randbytes)
    t = Terminal(image, device_key)
    assert t.chain.height is None and t.keys.report.created
    t.chain.append(genesis(SELF, [(i.terminal_id, i.public_bytes()) for i in TERMINALS],
                           timestamp_ms=T0, endorsers=TERMINALS[:3]))
    yield t
    t.close()


def partition_bytes(image: Path, name: str) -> bytes:
    part = FLASH.partition(name)
    with open(image, "rb") as f:
        f.seek(part.offset_bytes)
        return f.read(part.size_bytes)


def sealed_keys_on_flash(t: Terminal, meter_id: bytes) -> list[bytes]:
    """The meter's key ciphertexts as stored, read through a second (reading) view of the log."""
    log = RecordLog(open_partition(t.dev, FLASH, "keystore"))
    records = (decode_record(payload) for _, payload in log.records())
    return [r.sealed for r in records if r.kind is Kind.KEY and r.meter_id == meter_id]


# ------------------------------------------------------------- operations

def test_a_registered_meter_answers_local_with_the_key_its_fingerprint_names(ecd):
    k1 = new_key(meter_keys(1))
    assert ecd.register(meter(1), k1, version=1, counter=1) == 1
    got = ecd.answer(meter(1))
    assert got.answer is Answer.LOCAL and got.home == "ecd-00"
    assert (got.key, got.key_version, got.height) == (k1, 1, 1)
    assert got.fingerprint == fingerprint(k1)
    assert got.record is not None and got.record.tx.kind is TxKind.REGISTER
    assert k1 not in ecd.chain.log.read(got.record.seq)  # the chain records no key


def test_a_rotation_commits_version_2_and_queries_answer_the_new_key(ecd):
    old = new_key(meter_keys(1))
    ecd.register(meter(1), old, version=1, counter=1)
    new = new_key(meter_keys(2))
    proof = make_rotation_proof(old, new)  # the meter wraps its new key under the old one
    assert ecd.rotate(meter(1), proof, counter=2) == 2
    got = ecd.answer(meter(1))
    assert got.answer is Answer.LOCAL
    assert (got.key, got.key_version, got.fingerprint) == (new, 2, fingerprint(new))
    assert got.key != old
    tx = got.record.tx
    assert (tx.kind, tx.key_version, tx.counter) == (TxKind.ROTATE, 2, 2)
    assert tx.proof == rotation_proof_digest(proof) == proof_digest(proof)
    assert proof not in ecd.chain.log.read(got.record.seq)  # the wrapped key stays home
    assert ecd.keys.get(meter(1), 1) == old  # kept until retired, never answered


def test_a_proof_under_the_wrong_old_key_is_refused_and_nothing_is_proposed(ecd):
    old = new_key(meter_keys(1))
    ecd.register(meter(1), old, version=1, counter=1)
    before = (ecd.chain.height, ecd.chain.log.next_seq, ecd.chain.state.tip,
              ecd.keys.versions(meter(1)))
    forged = make_rotation_proof(new_key(meter_keys(66)), new_key(meter_keys(2)))
    with pytest.raises(BadProofError) as info:
        ecd.rotate(meter(1), forged, counter=2)
    assert info.value.fault is ProofFault.UNWRAP_FAILED
    assert (ecd.chain.height, ecd.chain.log.next_seq, ecd.chain.state.tip,
            ecd.keys.versions(meter(1))) == before
    got = ecd.answer(meter(1))
    assert (got.key, got.key_version) == (old, 1)


def test_an_export_opens_at_the_master_station_and_strangers_are_refused(ecd):
    key = new_key(meter_keys(1))
    ecd.register(meter(1), key, version=1, counter=1)
    got = ecd.answer(meter(1))
    envelope = ecd.keys.export(meter(1), MASTER_ID, ALLOW)
    assert key not in envelope
    assert open_envelope(MASTER, envelope, meter_id=meter(1), key_version=got.key_version,
                         requester_id=MASTER_ID) == got.key == key
    with pytest.raises(NotAuthorisedError):
        ecd.keys.export(meter(1), b"unknown-requester", ALLOW)


def test_a_meter_homed_elsewhere_answers_remote_and_an_unknown_one_unknown(ecd):
    tx = TxBuilder(OTHER).register(meter(2), key_version=1,
                                   fingerprint=fingerprint(new_key(meter_keys(2))), counter=1)
    ecd.commit([tx], proposer=OTHER)  # ecd-01 proposed it; ecd-00 stores the block too
    got = ecd.answer(meter(2))
    assert got.answer is Answer.REMOTE and got.home == "ecd-01"
    assert got.key is None and got.key_version == 1
    unknown = ecd.answer(meter(99))
    assert unknown == QueryResult(Answer.UNKNOWN, meter(99))
    assert scan_newest_record(ecd.chain.log, meter(99)) is None


def test_a_migrated_meter_answers_remote_naming_its_new_home(ecd):
    key = new_key(meter_keys(3))
    ecd.register(meter(3), key, version=1, counter=1)
    handover = ecd.keys.export(meter(3), OTHER.terminal_id.encode(), ALLOW)
    assert open_envelope(OTHER_TRANSPORT, handover, meter_id=meter(3), key_version=1,
                         requester_id=OTHER.terminal_id.encode()) == key
    assert ecd.migrate(meter(3), OTHER.terminal_id, counter=2) == 2
    got = ecd.answer(meter(3))
    assert got.answer is Answer.REMOTE and got.home == "ecd-01"
    assert (got.key, got.key_version, got.fingerprint) == (None, 1, fingerprint(key))
    assert got.record.tx.kind is TxKind.MIGRATE
    sealed = sealed_keys_on_flash(ecd, meter(3))
    ecd.keys.hand_over(meter(3))  # the new home holds it: this copy goes
    raw = partition_bytes(ecd.image, "keystore")
    assert sealed and [s for s in sealed if s in raw] == [] and key not in raw
    assert ecd.answer(meter(3)).answer is Answer.REMOTE  # the chain still knows where it is


def test_a_revoke_answers_revoked_and_erases_the_key_from_the_image(ecd):
    k1, k2 = new_key(meter_keys(1)), new_key(meter_keys(2))
    ecd.register(meter(1), k1, version=1, counter=1)
    ecd.rotate(meter(1), make_rotation_proof(k1, k2), counter=2)
    sealed = sealed_keys_on_flash(ecd, meter(1))
    assert len(sealed) == 2
    raw = partition_bytes(ecd.image, "keystore")
    assert all(s in raw for s in sealed)  # the search finds what is there
    assert ecd.revoke(meter(1), make_revocation_proof(k2), counter=3) == 3
    got = ecd.answer(meter(1))
    assert got.answer is Answer.REVOKED
    assert (got.key, got.fingerprint, got.key_version) == (None, None, 2)
    assert got.record.tx.kind is TxKind.REVOKE
    with pytest.raises(KeyDestroyedError):
        ecd.keys.get(meter(1))
    raw = partition_bytes(ecd.image, "keystore")
    assert [s for s in sealed if s in raw] == []
    assert k1 not in raw and k2 not in raw
    assert sealed_keys_on_flash(ecd, meter(1)) == []


def test_a_revoke_without_the_meters_proof_is_refused_and_nothing_is_proposed(ecd):
    key = new_key(meter_keys(1))
    ecd.register(meter(1), key, version=1, counter=1)
    seq = ecd.chain.log.next_seq
    with pytest.raises(BadProofError):
        ecd.revoke(meter(1), make_revocation_proof(new_key(meter_keys(66))), counter=2)
    assert ecd.chain.log.next_seq == seq
    assert ecd.answer(meter(1)).key == key


def test_a_revoked_meter_registers_again_as_a_new_key_line(ecd):
    k1, k2, k3 = (new_key(meter_keys(n)) for n in (1, 2, 3))
    ecd.register(meter(1), k1, version=1, counter=1)
    ecd.rotate(meter(1), make_rotation_proof(k1, k2), counter=2)
    ecd.revoke(meter(1), make_revocation_proof(k2), counter=3)
    assert ecd.register(meter(1), k3, version=3, counter=4) == 4
    got = ecd.answer(meter(1))
    assert got.answer is Answer.LOCAL
    assert (got.key, got.key_version, got.fingerprint) == (k3, 3, fingerprint(k3))
    assert ecd.keys.versions(meter(1)) == (3,)


# ------------------------------------------------------------ whole story

STORY_METERS = [meter(n) for n in (1, 2, 3, 4, 5, 99)]


def story(ecd: Terminal) -> None:
    """Every operation: register, rotate, refused proof, remote, migrate, revoke, register again."""
    k1, k2, k3 = (new_key(meter_keys(n)) for n in (1, 2, 3))
    ecd.register(meter(1), k1, version=1, counter=1)
    ecd.rotate(meter(1), make_rotation_proof(k1, k2), counter=2)
    with pytest.raises(BadProofError):
        ecd.rotate(meter(1), make_rotation_proof(k1, k3), counter=3)  # k1 is no longer current
    ecd.commit([TxBuilder(OTHER).register(meter(2), key_version=1, counter=1,
                                          fingerprint=fingerprint(new_key(meter_keys(20))))],
               proposer=OTHER)
    k4, k5 = new_key(meter_keys(4)), new_key(meter_keys(5))
    ecd.register(meter(4), k4, version=1, counter=1)
    ecd.register(meter(5), k5, version=1, counter=1)
    ecd.migrate(meter(4), OTHER.terminal_id, counter=2)
    ecd.revoke(meter(5), make_revocation_proof(k5), counter=2)
    ecd.revoke(meter(1), make_revocation_proof(k2), counter=3)
    ecd.register(meter(1), k3, version=3, counter=4)
    ecd.register(meter(3), new_key(meter_keys(30)), version=1, counter=1)


def test_every_answer_is_the_same_after_a_reboot_and_matches_the_tail_scan(ecd):
    story(ecd)
    before = {m: ecd.answer(m) for m in STORY_METERS}
    assert [before[m].answer for m in STORY_METERS] == [
        Answer.LOCAL, Answer.REMOTE, Answer.LOCAL, Answer.REMOTE, Answer.REVOKED, Answer.UNKNOWN]
    height = ecd.chain.height
    again = ecd.reboot()
    try:
        assert again.chain.height == height == 10
        assert again.chain.report.blocks_replayed == height + 1
        assert again.chain.report.orphans == again.chain.report.invalid_txs == 0
        after = {m: again.answer(m) for m in STORY_METERS}
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
    finally:
        again.close()


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


def test_a_flipped_byte_in_a_stored_transaction_names_its_block_at_boot(ecd):
    """Injected: one bit of a ROTATE record of block 2 flipped in the image file (bit rot).

    Survives: boot refuses the chain, naming height 2 rather than dropping
    the block or the blocks after it; the image untouched boots cleanly.
    """
    k1 = new_key(meter_keys(1))
    ecd.register(meter(1), k1, version=1, counter=1)
    ecd.rotate(meter(1), make_rotation_proof(k1, new_key(meter_keys(2))), counter=2)
    ecd.register(meter(2), new_key(meter_keys(3)), version=1, counter=1)
    entry = ecd.chain.entry(meter(1))
    assert entry.height == 2
    payload = ecd.chain.log.read(entry.seq)
    assert payload[0] == REC_TX
    ecd.close()
    with FileBlockDevice(ecd.image, FLASH.erase_block_bytes) as dev:
        assert open_chain(open_partition(dev, FLASH, "ledger"), SELF).height == 3
    at = _offset_in_partition(ecd.image, "ledger", payload) + len(payload) // 2
    with open(ecd.image, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes((byte ^ 0x10,)))
    with (FileBlockDevice(ecd.image, FLASH.erase_block_bytes) as dev,
          pytest.raises(ChainCorruptError) as info):
        open_chain(open_partition(dev, FLASH, "ledger"), SELF)
    assert info.value.height == entry.height == 2
    assert "fails its check" in info.value.detail
