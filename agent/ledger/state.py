"""What the chain says now: the meter table, the membership and the tip.

This is what the rules check a block against, kept in RAM. The meter table
must hold 10^6 meters inside the agent's 192 MiB RAM budget, so an entry is
not an object: it is one packed 65-byte record (status, key version,
fingerprint, home as an index into the terminal list, counter, height, tx
index, record id) in ``metertable.MeterTable``'s buckets, unpacked into a
``MeterEntry`` only when read (about 95 bytes a meter in all, against about
190 for a dict of packed bytes and 280 for a tuple per meter). Updates are
O(1); nothing here walks the chain or the table.

Ids come in as ``hal.ids.MeterId`` / ``TerminalId`` (what the decoders make)
or plain values; the table stores plain ``bytes`` and ``str``. A subclass
instance costs more RAM than the plain value (sys.getsizeof, CPython 3.11:
a 6-byte meter id is 55 bytes as a MeterId against 39 as bytes, the GC
header a subclass instance carries; 17 bytes more per key in a dict of
200,000, measured with tracemalloc: 17 MB at 10^6 meters), so ``put_meter``
and ``add_terminal`` convert at this boundary and reads hand back plain values.

Membership: a terminal is active from the block after its TERMINAL_ADD up to
and including the block holding its TERMINAL_RETIRE; the record of a retired
terminal is kept (its id and key are never reused, so an old signed ADD
cannot bring it back).
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.ledger.codec import HASH_LEN
from agent.ledger.identity import load_public_key
from agent.ledger.metertable import MeterTable

# Active terminals at once: each may endorse a block, and a block holds at
# most block.MAX_ENDORSEMENTS (1024) endorsements.
MAX_ACTIVE_TERMINALS = 1024
# Terminals ever added: a meter entry names its home by a u16 index.
MAX_TERMINAL_IDS = 2**16 - 1


class MeterStatus(enum.IntEnum):
    LIVE = 1
    REVOKED = 2


class MeterEntry(NamedTuple):
    """A meter's newest key record: where it is and which chain record said so."""

    status: MeterStatus
    key_version: int
    fingerprint: bytes
    home: str
    counter: int
    height: int  # block of the newest record for this meter
    tx_index: int  # its position in that block
    seq: int = 0  # its flash record id, set by the storage layer (0: not stored yet)


# status, version, fingerprint, home#, counter, height, tx index, record id
_ENTRY = struct.Struct(">BI32sHQQHQ")

DOMAIN_STATE = b"edgekey/state-digest/v1"
_NO_HEIGHT = 2**64 - 1  # "none" (not retired; no tip) in the digest's canonical form
# A meter in the digest: status, version, fingerprint, counter, height, tx index (the
# id and home go before it, length-prefixed). The record id is storage, not state.
_DIGEST_METER = struct.Struct(">BI32sQQH")


@dataclass(slots=True)
class TerminalInfo:
    """One terminal's membership record."""

    terminal_id: str
    public_key: bytes
    added_height: int
    retired_height: int | None
    verifier: Ed25519PublicKey  # the loaded key, so checks do not re-parse it

    @property
    def active(self) -> bool:
        return self.retired_height is None


@dataclass(frozen=True, slots=True)
class Tip:
    """The newest applied block."""

    height: int
    block_hash: bytes
    timestamp_ms: int


class LedgerState:
    """Meter table + membership + tip; changed only by ``rules.apply_block``."""

    __slots__ = ("_active", "_home_index", "_keys", "_meters", "_names", "_terminals",
                 "genesis_hash", "tip")

    def __init__(self) -> None:
        self._meters = MeterTable(_ENTRY.size)
        self._terminals: dict[str, TerminalInfo] = {}
        self._names: list[str] = []  # home index -> terminal id
        self._home_index: dict[str, int] = {}
        self._keys: set[bytes] = set()
        self._active = 0
        self.tip: Tip | None = None
        self.genesis_hash: bytes | None = None  # header hash of block 0, once applied

    # ---------------------------------------------------------------- reads

    def meter(self, meter_id: bytes) -> MeterEntry | None:
        packed = self._meters.get(meter_id)
        if packed is None:
            return None
        status, version, fp, home, counter, height, index, seq = _ENTRY.unpack(packed)
        return MeterEntry(MeterStatus(status), version, fp, self._names[home], counter, height,
                          index, seq)

    @property
    def meter_count(self) -> int:
        return len(self._meters)

    def meter_ids(self) -> Iterator[bytes]:
        """Every meter id (for snapshots; the table must not change while iterating)."""
        return iter(self._meters)  # plain bytes ids, made as the table is walked

    def terminal(self, terminal_id: str) -> TerminalInfo | None:
        return self._terminals.get(terminal_id)

    def is_active(self, terminal_id: str) -> bool:
        info = self._terminals.get(terminal_id)
        return info is not None and info.active

    def active_terminals(self) -> tuple[str, ...]:
        """Sorted ids of the active terminals (O(terminals), not for per-tx use)."""
        return tuple(sorted(t for t, info in self._terminals.items() if info.active))

    def terminals_in_order(self) -> tuple[TerminalInfo, ...]:
        """Every terminal ever added, in the order added (the order homes are indexed in)."""
        return tuple(self._terminals[t] for t in self._names)

    @property
    def active_count(self) -> int:
        return self._active

    @property
    def terminal_count(self) -> int:
        """Terminals ever added, retired ones included."""
        return len(self._names)

    def key_in_use(self, public_key: bytes) -> bool:
        """Some terminal, active or retired, holds this public key."""
        return public_key in self._keys

    # ---------------------------------------------------- writes (apply_block)

    def put_meter(self, meter_id: bytes, entry: MeterEntry) -> None:
        if len(entry.fingerprint) != HASH_LEN:
            raise ValueError("fingerprint must be 32 bytes")
        # plain bytes as the key: a MeterId key costs 17 bytes more per meter (module doc)
        self._meters.put(bytes(meter_id), _ENTRY.pack(
            entry.status, entry.key_version, entry.fingerprint, self._home_index[entry.home],
            entry.counter, entry.height, entry.tx_index, entry.seq))

    def add_terminal(self, terminal_id: str, public_key: bytes, height: int) -> None:
        terminal_id = str(terminal_id)  # plain str, as for meter ids (module doc)
        if terminal_id in self._terminals:
            raise ValueError(f"terminal {terminal_id!r} exists")
        if len(self._names) >= MAX_TERMINAL_IDS:
            raise ValueError("no terminal index left")
        verifier = load_public_key(public_key)
        if verifier is None:
            raise ValueError("not an Ed25519 public key")
        self._terminals[terminal_id] = TerminalInfo(terminal_id, bytes(public_key), height, None,
                                                    verifier)
        self._home_index[terminal_id] = len(self._names)
        self._names.append(terminal_id)
        self._keys.add(bytes(public_key))
        self._active += 1

    def retire_terminal(self, terminal_id: str, height: int) -> None:
        info = self._terminals[terminal_id]
        if not info.active:
            raise ValueError(f"terminal {terminal_id!r} already retired")
        info.retired_height = height
        self._active -= 1

    def advance_tip(self, tip: Tip) -> None:
        self.tip = tip

    def digest(self) -> bytes:
        """SHA-256 of the whole state (meters, membership, tip, genesis): O(meters log meters).

        What ``Chain.verify`` compares and the model-based test checks; see
        ``state_digest`` for the canonical form.
        """
        meters = ((mid, self.meter(mid)) for mid in sorted(self._meters))
        terminals = ((i.terminal_id, i.public_key, i.added_height, i.retired_height)
                     for i in self.terminals_in_order())
        return state_digest(meters, terminals, self.tip, self.genesis_hash)  # type: ignore[arg-type]

    def replace_with(self, other: LedgerState) -> None:
        """Take over ``other``'s contents (a state restored from a snapshot)."""
        for name in LedgerState.__slots__:
            setattr(self, name, getattr(other, name))


def _short(data: bytes) -> bytes:
    return len(data).to_bytes(1, "big") + data


def state_digest(meters: Iterable[tuple[bytes, MeterEntry]],
                 terminals: Iterable[tuple[str, bytes, int, int | None]],
                 tip: Tip | None, genesis_hash: bytes | None) -> bytes:
    """The canonical digest of a ledger state, from plain values.

    ``meters`` in ascending meter-id order; ``terminals`` (id, public key,
    added height, retired height or None) in the order they were added. Any
    implementation of the rules (a model, another terminal) that reaches the
    same state gets the same digest.
    """
    h = hashlib.sha256(DOMAIN_STATE)
    count = 0
    for meter_id, e in meters:
        h.update(_short(meter_id))
        h.update(_short(e.home.encode()))
        h.update(_DIGEST_METER.pack(int(e.status), e.key_version, e.fingerprint, e.counter,
                                    e.height, e.tx_index))
        count += 1
    h.update(count.to_bytes(8, "big"))
    count = 0
    for terminal_id, public_key, added, retired in terminals:
        h.update(_short(terminal_id.encode()))
        h.update(public_key)
        h.update(added.to_bytes(8, "big"))
        h.update((_NO_HEIGHT if retired is None else retired).to_bytes(8, "big"))
        count += 1
    h.update(count.to_bytes(8, "big"))
    if tip is None:
        h.update(_NO_HEIGHT.to_bytes(8, "big"))
    else:
        h.update(tip.height.to_bytes(8, "big") + tip.block_hash
                 + tip.timestamp_ms.to_bytes(8, "big"))
    h.update(genesis_hash or bytes(32))
    return h.digest()
