"""Key-operation transactions: the values, their one encoding, their signatures.

A transaction records *that* a meter's key changed, never the key (paper,
section 2.2.1: the chain carries the terminal's signature over the key
information, keys stay on the meter's home terminal). Kinds:

- REGISTER: the paper's *generate*: a meter's first key, or a new key line
  after a revoke.
- ROTATE: the paper's *update*: ``key_version`` is the current one + 1.
- REVOKE: the paper's *empty key*: the fingerprint is all zero.
- MIGRATE: the meter was re-homed after re-clustering (paper, section 2.1);
  ``home`` is the new home, version and fingerprint restate the current key.
- TERMINAL_ADD / TERMINAL_RETIRE: membership; ``terminal`` and its Ed25519
  ``public_key``.
- CHECKPOINT: the digest of the whole ledger state at ``counter`` (the
  parent's height), in ``fingerprint``; proposed by the block's proposer.
  Every terminal checks it against its own state as it applies the block,
  so a committed checkpoint is a state digest a majority endorsed: what a
  terminal catching up from a peer's snapshot checks the snapshot against.

Fields that a kind does not use are not on the wire at all (the layout is
chosen by kind), and the value refuses anything but their empty defaults,
so no meaningless field can carry data.

``fingerprint`` is SHA-256(b"edgekey/key-fingerprint/v1" + key), computed by
the key store. ``proof`` on a ROTATE is the digest of the rotation proof
(``rotation_proof_digest``: SHA-256 over a domain label and the proof): the
new key wrapped under the old one with AES key wrap (RFC 3394). The wrapped blob
itself stays with the home terminal, which checks it: it must not go on the
broadcast chain, since anyone holding a stolen old key could unwrap the new
key from it. On a REVOKE the proof is the digest of the meter's empty-key
request, or zero for an operator's revoke (the meter may be the thing that
was stolen). REGISTER and MIGRATE carry no proof (zero): there is no old key
to wrap under, and a migration's key transfer goes terminal to terminal.

Layout (big-endian, codec.py)::

    tx       := version:u8 kind:u8 proposer:tid body signature:64
    meter    := meter_id:len8(1..16) key_version:u32 fingerprint:32 home:tid
                proof:32 counter:u64                  (REGISTER..MIGRATE)
    member   := terminal:tid public_key:32             (TERMINAL_ADD/RETIRE)
    check    := height:u64 digest:32                   (CHECKPOINT)
    tid      := len8(1..32) [A-Za-z0-9._-]

(the id limits are hal/ids.py's; a decoded transaction's ids are ``MeterId``
and ``TerminalId`` instances, plain ``bytes`` and ``str`` work as well.)

The signature is last, so the signed bytes are the encoding's prefix:
Ed25519 over ``DOMAIN_TX + encoding[:-64]``. ``tx_id`` is SHA-256 of the
whole encoding, signature included.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.ledger.codec import (
    FORMAT_VERSION,
    HASH_LEN,
    PUBLIC_KEY_LEN,
    SIGNATURE_LEN,
    ZERO_HASH,
    DecodeError,
    LedgerValueError,
    Reader,
    Writer,
)
from agent.ledger.identity import DOMAIN_TX, TerminalIdentity, verify_signature
from hal.ids import (
    METER_ID_MAX,
    METER_ID_MIN,
    TERMINAL_ID_MAX,
    check_meter_id,
    check_terminal_id,
)

TX_VERSION = FORMAT_VERSION

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

# The largest encodings, from the layout above: the caps block.py builds on.
MAX_METER_TX_BYTES = 2 + (1 + TERMINAL_ID_MAX) + (1 + METER_ID_MAX) + 4 + HASH_LEN \
    + (1 + TERMINAL_ID_MAX) + HASH_LEN + 8 + SIGNATURE_LEN  # 225
MAX_MEMBER_TX_BYTES = 2 + (1 + TERMINAL_ID_MAX) * 2 + PUBLIC_KEY_LEN + SIGNATURE_LEN  # 164
MAX_TX_BYTES = max(MAX_METER_TX_BYTES, MAX_MEMBER_TX_BYTES)


class TxKind(enum.IntEnum):
    """What a transaction does; the numbers are the wire values (0 is never valid)."""

    REGISTER = 1
    ROTATE = 2
    REVOKE = 3
    MIGRATE = 4
    TERMINAL_ADD = 5
    TERMINAL_RETIRE = 6
    CHECKPOINT = 7

    @property
    def is_meter(self) -> bool:
        return self <= TxKind.MIGRATE

    @property
    def is_member(self) -> bool:
        return self in (TxKind.TERMINAL_ADD, TxKind.TERMINAL_RETIRE)


@dataclass(frozen=True, slots=True)
class Transaction:
    """One key or membership operation, signed by its proposer (``signature`` b"" = unsigned)."""

    kind: TxKind
    proposer: str
    meter_id: bytes = b""
    key_version: int = 0
    fingerprint: bytes = ZERO_HASH
    home: str = ""
    proof: bytes = ZERO_HASH
    counter: int = 0
    terminal: str = ""
    public_key: bytes = b""
    signature: bytes = b""
    version: int = TX_VERSION

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem is not None:
            raise LedgerValueError(f"transaction {problem[0]}: {problem[1]}")

    @property
    def is_signed(self) -> bool:
        return len(self.signature) == SIGNATURE_LEN


def _is_bytes(value: object, lo: int, hi: int) -> bool:
    return isinstance(value, bytes) and lo <= len(value) <= hi


def _is_int(value: object, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _kind_fields(kind: TxKind, fingerprint: bytes, proof: bytes) -> tuple[str, str] | None:
    """The per-kind rules on fingerprint and proof (shared by the value and the decoder)."""
    if kind is TxKind.REVOKE:
        if fingerprint != ZERO_HASH:
            return "fingerprint", "a revoke carries the empty key: all zero"
    elif fingerprint == ZERO_HASH:
        return "fingerprint", "all zero is the empty key, reserved for revoke"
    if kind in (TxKind.REGISTER, TxKind.MIGRATE) and proof != ZERO_HASH:
        return "proof", f"{kind.name} carries no proof: must be all zero"
    return None


def _problem(tx: Transaction) -> tuple[str, str] | None:
    """(field, why) for the first field that makes ``tx`` not a transaction."""
    if tx.version != TX_VERSION:
        return "version", f"unsupported version {tx.version!r}"
    if not isinstance(tx.kind, TxKind):
        return "kind", f"not a TxKind: {tx.kind!r}"
    why = check_terminal_id(tx.proposer)
    if why is not None:
        return "proposer", why
    if not (tx.signature == b"" or _is_bytes(tx.signature, SIGNATURE_LEN, SIGNATURE_LEN)):
        return "signature", f"must be empty (unsigned) or {SIGNATURE_LEN} bytes"
    if tx.kind.is_meter:
        why = check_meter_id(tx.meter_id)
        if why is not None:
            return "meter_id", why
        if not _is_int(tx.key_version, 1, U32_MAX):
            return "key_version", "must be 1..2^32-1 (0 means no key)"
        if not _is_bytes(tx.fingerprint, HASH_LEN, HASH_LEN):
            return "fingerprint", f"must be {HASH_LEN} bytes"
        why = check_terminal_id(tx.home)
        if why is not None:
            return "home", why
        if not _is_bytes(tx.proof, HASH_LEN, HASH_LEN):
            return "proof", f"must be {HASH_LEN} bytes"
        if not _is_int(tx.counter, 0, U64_MAX):
            return "counter", "must be a u64"
        if tx.terminal != "" or tx.public_key != b"":
            return "terminal", "a meter operation names no terminal or public key"
        return _kind_fields(tx.kind, tx.fingerprint, tx.proof)
    if tx.kind is TxKind.CHECKPOINT:
        for name, empty in (("meter_id", b""), ("key_version", 0), ("home", ""),
                            ("proof", ZERO_HASH), ("terminal", ""), ("public_key", b"")):
            if getattr(tx, name) != empty:
                return name, f"a checkpoint carries only a height and a digest: {empty!r}"
        if not _is_int(tx.counter, 0, U64_MAX):
            return "counter", "must be a u64 (the height digested)"
        if not _is_bytes(tx.fingerprint, HASH_LEN, HASH_LEN) or tx.fingerprint == ZERO_HASH:
            return "fingerprint", f"must be a {HASH_LEN}-byte state digest, not all zero"
        return None
    # membership: the meter fields keep their empty defaults
    for name, empty in (("meter_id", b""), ("key_version", 0), ("fingerprint", ZERO_HASH),
                        ("home", ""), ("proof", ZERO_HASH), ("counter", 0)):
        if getattr(tx, name) != empty:
            return name, f"a membership operation carries no meter fields: must be {empty!r}"
    why = check_terminal_id(tx.terminal)
    if why is not None:
        return "terminal", why
    if not _is_bytes(tx.public_key, PUBLIC_KEY_LEN, PUBLIC_KEY_LEN):
        return "public_key", f"must be {PUBLIC_KEY_LEN} bytes"
    return None


# ------------------------------------------------------------------ encoding

def _write_unsigned(w: Writer, tx: Transaction) -> None:
    w.u8(tx.version)
    w.u8(int(tx.kind))
    w.terminal_id(tx.proposer)
    if tx.kind.is_meter:
        w.meter_id(tx.meter_id)
        w.u32(tx.key_version)
        w.fixed(tx.fingerprint, HASH_LEN)
        w.terminal_id(tx.home)
        w.fixed(tx.proof, HASH_LEN)
        w.u64(tx.counter)
    elif tx.kind is TxKind.CHECKPOINT:
        w.u64(tx.counter)
        w.fixed(tx.fingerprint, HASH_LEN)
    else:
        w.terminal_id(tx.terminal)
        w.fixed(tx.public_key, PUBLIC_KEY_LEN)


def encode_unsigned(tx: Transaction) -> bytes:
    """The encoding without the signature: what the proposer signs (after DOMAIN_TX)."""
    w = Writer()
    _write_unsigned(w, tx)
    return w.getvalue()


def encode_tx(tx: Transaction) -> bytes:
    """The canonical encoding of a signed transaction (one flash record)."""
    if not tx.is_signed:
        raise ValueError("an unsigned transaction has no encoding; sign it first")
    w = Writer()
    _write_unsigned(w, tx)
    w.fixed(tx.signature, SIGNATURE_LEN)
    return w.getvalue()


def read_tx(r: Reader, prefix: str = "tx") -> Transaction:
    """Read one transaction at ``r``'s position (used inside a block, too)."""
    r.version(f"{prefix}.version", TX_VERSION)
    at = r.offset
    raw_kind = r.u8(f"{prefix}.kind")
    try:
        kind = TxKind(raw_kind)
    except ValueError:
        raise r.fail(f"{prefix}.kind", f"unknown kind {raw_kind}", at) from None
    proposer = r.terminal_id(f"{prefix}.proposer")
    if kind.is_meter:
        meter_id = r.meter_id(f"{prefix}.meter_id")
        at = r.offset
        key_version = r.u32(f"{prefix}.key_version")
        if key_version == 0:
            raise r.fail(f"{prefix}.key_version", "0 means no key", at)
        fp_at = r.offset
        fingerprint = r.fixed(f"{prefix}.fingerprint", HASH_LEN)
        home = r.terminal_id(f"{prefix}.home")
        proof_at = r.offset
        proof = r.fixed(f"{prefix}.proof", HASH_LEN)
        counter = r.u64(f"{prefix}.counter")
        bad = _kind_fields(kind, fingerprint, proof)
        if bad is not None:
            raise r.fail(f"{prefix}.{bad[0]}", bad[1], fp_at if bad[0] == "fingerprint"
                         else proof_at)
        signature = r.fixed(f"{prefix}.signature", SIGNATURE_LEN)
        tx = Transaction(kind, proposer, meter_id=meter_id, key_version=key_version,
                         fingerprint=fingerprint, home=home, proof=proof, counter=counter,
                         signature=signature)
    elif kind is TxKind.CHECKPOINT:
        height = r.u64(f"{prefix}.height")
        at = r.offset
        digest = r.fixed(f"{prefix}.digest", HASH_LEN)
        if digest == ZERO_HASH:
            raise r.fail(f"{prefix}.digest", "all zero is no state digest", at)
        signature = r.fixed(f"{prefix}.signature", SIGNATURE_LEN)
        tx = Transaction(kind, proposer, fingerprint=digest, counter=height,
                         signature=signature)
    else:
        terminal = r.terminal_id(f"{prefix}.terminal")
        public_key = r.fixed(f"{prefix}.public_key", PUBLIC_KEY_LEN)
        signature = r.fixed(f"{prefix}.signature", SIGNATURE_LEN)
        tx = Transaction(kind, proposer, terminal=terminal, public_key=public_key,
                         signature=signature)
    return tx


def decode_tx(data: bytes) -> Transaction:
    """The transaction ``data`` encodes, or DecodeError: strict, no trailing bytes."""
    r = Reader(data)
    tx = read_tx(r)
    r.done("tx")
    return tx


def tx_id(tx: Transaction) -> bytes:
    """SHA-256 of the full encoding: the Merkle leaf and the duplicate check's key."""
    return hashlib.sha256(encode_tx(tx)).digest()


def signing_payload(tx: Transaction) -> bytes:
    """What the proposer's Ed25519 signature covers."""
    return DOMAIN_TX + encode_unsigned(tx)


# ---------------------------------------------------------------- signatures

def sign_tx(identity: TerminalIdentity, tx: Transaction) -> Transaction:
    """``tx`` signed by ``identity``, which must be its proposer."""
    if tx.proposer != identity.terminal_id:
        raise ValueError(f"{identity.terminal_id!r} cannot sign a transaction proposed by "
                         f"{tx.proposer!r}")
    unsigned = replace(tx, signature=b"")
    return replace(unsigned, signature=identity.sign(signing_payload(unsigned)))


def verify_tx(public_key: bytes | Ed25519PublicKey, tx: Transaction) -> bool:
    """True when the proposer's signature over ``tx`` verifies under ``public_key``."""
    if not tx.is_signed:
        return False
    return verify_signature(public_key, tx.signature, signing_payload(tx))


PROOF_DIGEST_LABEL = b"edgekey/rotation-proof/v1"


def rotation_proof_digest(proof: bytes) -> bytes:
    """SHA-256(b"edgekey/rotation-proof/v1" + proof): the ``proof`` field of ROTATE/REVOKE.

    ``proof`` is the new key (or the revocation marker) AES-key-wrapped under
    the old key; the same construction as the key store's ``proof_digest``.
    """
    return hashlib.sha256(PROOF_DIGEST_LABEL + bytes(proof)).digest()


def make_tx(identity: TerminalIdentity, kind: TxKind, **fields: object) -> Transaction:
    """A transaction proposed and signed by ``identity``; ``fields`` as in Transaction."""
    tx = Transaction(kind, identity.terminal_id, **fields)  # type: ignore[arg-type]
    return sign_tx(identity, tx)


class TxBuilder:
    """Signed transactions for one terminal, with the home/proposer rules filled in.

    ROTATE and REVOKE are proposed by the meter's home, so ``home`` is this
    terminal; a MIGRATE names the new home and may come from either home.
    """

    __slots__ = ("identity",)

    def __init__(self, identity: TerminalIdentity) -> None:
        self.identity = identity

    def register(self, meter_id: bytes, *, key_version: int, fingerprint: bytes,
                 counter: int) -> Transaction:
        return make_tx(self.identity, TxKind.REGISTER, meter_id=meter_id,
                       key_version=key_version, fingerprint=fingerprint,
                       home=self.identity.terminal_id, counter=counter)

    def rotate(self, meter_id: bytes, *, key_version: int, fingerprint: bytes, proof: bytes,
               counter: int) -> Transaction:
        return make_tx(self.identity, TxKind.ROTATE, meter_id=meter_id,
                       key_version=key_version, fingerprint=fingerprint,
                       home=self.identity.terminal_id, proof=proof, counter=counter)

    def revoke(self, meter_id: bytes, *, key_version: int, counter: int,
               proof: bytes = ZERO_HASH) -> Transaction:
        return make_tx(self.identity, TxKind.REVOKE, meter_id=meter_id,
                       key_version=key_version, home=self.identity.terminal_id, proof=proof,
                       counter=counter)

    def migrate(self, meter_id: bytes, *, new_home: str, key_version: int, fingerprint: bytes,
                counter: int) -> Transaction:
        return make_tx(self.identity, TxKind.MIGRATE, meter_id=meter_id,
                       key_version=key_version, fingerprint=fingerprint, home=new_home,
                       counter=counter)

    def add_terminal(self, terminal_id: str, public_key: bytes) -> Transaction:
        return make_tx(self.identity, TxKind.TERMINAL_ADD, terminal=terminal_id,
                       public_key=public_key)

    def retire_terminal(self, terminal_id: str, public_key: bytes) -> Transaction:
        return make_tx(self.identity, TxKind.TERMINAL_RETIRE, terminal=terminal_id,
                       public_key=public_key)

    def checkpoint(self, height: int, digest: bytes) -> Transaction:
        return make_tx(self.identity, TxKind.CHECKPOINT, counter=height, fingerprint=digest)


__all__ = [
    "MAX_TX_BYTES",
    "METER_ID_MAX",
    "METER_ID_MIN",
    "TX_VERSION",
    "DecodeError",
    "Transaction",
    "TxBuilder",
    "TxKind",
    "decode_tx",
    "encode_tx",
    "encode_unsigned",
    "make_tx",
    "read_tx",
    "rotation_proof_digest",
    "sign_tx",
    "signing_payload",
    "tx_id",
    "verify_tx",
]
