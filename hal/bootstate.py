"""The A/B boot state on the boot partition: what the bootloader and RAUC's backend share.

The state is one small record in the boot partition's ``RecordLog``; every
change appends a whole new record and the newest intact one wins, so a
power cut in a write leaves the previous state and never a mix of two. Old
segments are released behind each write, so the partition never fills.

Semantics follow RAUC's U-Boot integration (bootchooser): each slot (bootname
"A" on ``image_a``, "B" on ``image_b``) has a state, good or bad, and a count
of boot attempts left. ``set_primary`` makes a slot primary, good, with
``ATTEMPTS`` tries; ``mark_good`` resets the tries; ``mark_bad`` sets them to
0 (the slot stays primary until the next ``set_primary``). The
bootloader's ``choose`` boots the primary if it has tries left, else the
other slot if it is good with tries left (a rollback); it takes one try off
the chosen slot *before* booting and persists that, so a slot that keeps
crashing before its health check runs out of tries and is left behind. Good
slots that have all run out (boots cut short, never a failed check) get their
tries back rather than halt the terminal.

A blank boot partition (a freshly created image) reads as ``blank()``: A
primary and good with ``ATTEMPTS`` tries, B bad, nothing installed anywhere.
The first install into such an image writes slot A (tools/flash_update.py).

Record, format 1 (little endian), at most a few hundred bytes::

    b"EKBS" fmt:u8 primary:u8 current:u8 pending:u8
    slot A: state:u8 attempts:u8 image    slot B: the same    pending image
    image = version:str compatible:str sha256:(u8 length 0 or 32, bytes)
    str   = u8 length, printable ASCII

``current`` is the slot the bootloader chose last (0xFF: none yet);
``pending`` names the slot an install is writing (0xFF: none) with what it
writes, promoted into that slot's record by ``set_primary``. Only the
standard library and ``hal`` are used: the QEMU guest's base OS runs this as
its bootloader.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from hal.blockdev import BlockDevice, FileBlockDevice, open_partition
from hal.board import Board
from hal.errors import RemoteProtocolError
from hal.recordlog import LogCorruptError, RecordLog

FORMAT = 1
MAGIC = b"EKBS"
SLOTS = ("A", "B")
PARTITIONS = {"A": "image_a", "B": "image_b"}
BOOT_PARTITION = "boot"
ATTEMPTS = 3  # RAUC's U-Boot default (BOOT_x_LEFT)
MAX_ATTEMPTS = 15
MAX_STR = 64
NONE = 0xFF
_HEAD = struct.Struct("<4sBBBB")
_SLOT = struct.Struct("<BB")
_VERSION = re.compile(r"^(\d+(?:\.\d+)*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


class BootStateError(RemoteProtocolError):
    """Bytes on the boot partition that are not a boot state record."""


class BootStateFormatError(BootStateError):
    """A boot state record of a format this build does not read."""


class NoBootableSlotError(Exception):
    """Neither slot is good: both failed their health checks."""


@dataclass(frozen=True)
class Image:
    """What was written into a slot: the bundle's version and compatible, the image's sha256."""

    version: str
    compatible: str
    sha256: str = ""  # hex, "" when unknown


@dataclass(frozen=True)
class Slot:
    state: str  # "good" or "bad"
    attempts: int
    image: Image | None = None

    @property
    def bootable(self) -> bool:
        return self.state == "good" and self.attempts > 0


@dataclass(frozen=True)
class BootState:
    primary: str
    a: Slot
    b: Slot
    current: str | None = None
    pending: tuple[str, Image] | None = None

    def slot(self, name: str) -> Slot:
        return self.a if _check_name(name) == "A" else self.b

    def with_slot(self, name: str, slot: Slot) -> BootState:
        return replace(self, a=slot) if _check_name(name) == "A" else replace(self, b=slot)

    @property
    def booted(self) -> str:
        """The slot running now: the bootloader's last choice, else the primary."""
        return self.current or self.primary


def _check_name(name: str) -> str:
    if name not in SLOTS:
        raise ValueError(f"unknown slot {name!r} (bootnames are A and B)")
    return name


def other(name: str) -> str:
    return "B" if _check_name(name) == "A" else "A"


def blank() -> BootState:
    """The state a blank boot partition reads as (module docstring)."""
    return BootState("A", Slot("good", ATTEMPTS), Slot("bad", 0))


# ------------------------------------------------------------- transitions

def set_primary(state: BootState, name: str) -> BootState:
    """RAUC's set-primary: primary, good, full tries; an install's pending image lands here."""
    slot = state.slot(name)
    image, pending = slot.image, state.pending
    if pending is not None and pending[0] == name:
        image, pending = pending[1], None
    new = state.with_slot(name, Slot("good", ATTEMPTS, image))
    return replace(new, primary=name, pending=pending)


def mark_good(state: BootState, name: str) -> BootState:
    return state.with_slot(name, Slot("good", ATTEMPTS, state.slot(name).image))


def mark_bad(state: BootState, name: str) -> BootState:
    """No tries left. A bad primary stays primary: ``choose`` then says why it rolls back."""
    return state.with_slot(name, Slot("bad", 0, state.slot(name).image))


def set_state(state: BootState, name: str, good: bool) -> BootState:
    """RAUC's set-state. Marking the slot a pending install targets bad is RAUC's step
    before it writes the slot, so the slot's old image is forgotten there."""
    if good:
        return mark_good(state, name)
    new = mark_bad(state, name)
    if new.pending is not None and new.pending[0] == name:
        new = new.with_slot(name, replace(new.slot(name), image=None))
    return new


def begin_install(state: BootState, name: str, image: Image) -> BootState:
    """An install is about to write ``image`` into ``name`` (RAUC's pre-install step)."""
    _check_name(name)
    return replace(state, pending=(name, image))


def record_install(state: BootState, name: str, image: Image) -> BootState:
    """A finished install's image, recorded on its slot (the pending one is settled)."""
    slot = state.slot(name)
    pending = None if state.pending and state.pending[0] == name else state.pending
    return replace(state.with_slot(name, Slot(slot.state, slot.attempts, image)),
                   pending=pending)


def choose(state: BootState) -> tuple[str, BootState, str]:
    """The bootloader's decision: (slot to boot, state to persist before booting, why).

    When no slot has tries left but one is still good (its boots were cut
    short before the health check, by power cuts say, and no check has failed),
    the good slots get their tries back, as RAUC's U-Boot reference script
    resets BOOT_x_LEFT rather than leave a terminal in the field halted. A slot
    marked bad stays bad."""
    if not any(state.slot(n).bootable for n in SLOTS):
        good = [n for n in SLOTS if state.slot(n).state == "good"]
        if good:
            reset = state
            for n in good:
                reset = reset.with_slot(n, replace(reset.slot(n), attempts=ATTEMPTS))
            slot, new, why = _choose(reset)
            return slot, new, (f"no slot had boot attempts left; good slot(s) "
                               f"{', '.join(good)} given {ATTEMPTS} again; {why}")
    return _choose(state)


def _choose(state: BootState) -> tuple[str, BootState, str]:
    primary = state.primary
    for name in (primary, other(primary)):
        slot = state.slot(name)
        if not slot.bootable:
            continue
        left = slot.attempts - 1
        new = replace(state.with_slot(name, replace(slot, attempts=left)), current=name)
        if name == primary:
            why = f"booting primary slot {name} ({left} attempt(s) left after this one)"
        else:
            p = state.slot(primary)
            cause = "is marked bad" if p.state == "bad" else "has no boot attempts left"
            why = (f"rollback: primary slot {primary} {cause}; booting slot {name} "
                   f"({left} attempt(s) left after this one)")
        return name, new, why
    raise NoBootableSlotError("no bootable slot: " + "; ".join(
        f"{n} is {state.slot(n).state} with {state.slot(n).attempts} attempt(s) left"
        for n in SLOTS))


# ------------------------------------------------------------- versions

def version_key(version: str) -> tuple:
    """Sort key of a RAUC/semver-ish version: dotted integers, a pre-release sorts first."""
    m = _VERSION.match(version)
    if not m:
        raise ValueError(f"version {version!r} is not dotted integers (like 1.2.0 or 1.2.0-rc1)")
    nums = [int(x) for x in m.group(1).split(".")]
    while len(nums) > 1 and nums[-1] == 0:
        nums.pop()
    pre = m.group(2)
    if pre is None:
        return (tuple(nums), 1, ())
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (tuple(nums), 0, parts)


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` is older than, the same as or newer than ``b``."""
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)


# ------------------------------------------------------------- encoding

def _put_str(out: bytearray, text: str, what: str) -> None:
    raw = text.encode("ascii", "replace")
    if len(raw) > MAX_STR or not text.isascii() or not all(0x20 < c < 0x7F for c in raw):
        raise ValueError(f"{what} {text!r}: at most {MAX_STR} printable ASCII characters")
    out.append(len(raw))
    out += raw


def _put_image(out: bytearray, image: Image | None) -> None:
    img = image or Image("", "", "")
    _put_str(out, img.version, "version")
    _put_str(out, img.compatible, "compatible")
    digest = bytes.fromhex(img.sha256) if img.sha256 else b""
    if len(digest) not in (0, 32):
        raise ValueError(f"sha256 {img.sha256!r} is not 32 bytes of hex")
    out.append(len(digest))
    out += digest


def encode(state: BootState) -> bytes:
    idx = {n: i for i, n in enumerate(SLOTS)}
    pending = idx[state.pending[0]] if state.pending else NONE
    current = idx[state.current] if state.current else NONE
    out = bytearray(_HEAD.pack(MAGIC, FORMAT, idx[state.primary], current, pending))
    for slot in (state.a, state.b):
        if slot.state not in ("good", "bad") or not 0 <= slot.attempts <= MAX_ATTEMPTS:
            raise ValueError(f"slot state {slot.state!r} with {slot.attempts} attempts")
        out += _SLOT.pack(slot.state == "good", slot.attempts)
        _put_image(out, slot.image)
    _put_image(out, state.pending[1] if state.pending else None)
    return bytes(out)


class _Reader:
    def __init__(self, raw: bytes):
        self.raw, self.pos = raw, 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.raw):
            raise BootStateError(f"boot state record ends inside its {what} "
                                 f"({len(self.raw)} bytes)")
        chunk = self.raw[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def string(self, what: str) -> str:
        n = self.take(1, what)[0]
        if n > MAX_STR:
            raise BootStateError(f"boot state {what} of {n} bytes (at most {MAX_STR})")
        raw = self.take(n, what)
        if not all(0x20 < c < 0x7F for c in raw):
            raise BootStateError(f"boot state {what} is not printable ASCII")
        return raw.decode("ascii")

    def image(self, what: str) -> Image | None:
        version = self.string(f"{what} version")
        compatible = self.string(f"{what} compatible")
        n = self.take(1, f"{what} sha256")[0]
        if n not in (0, 32):
            raise BootStateError(f"boot state {what} sha256 of {n} bytes (0 or 32)")
        digest = self.take(n, f"{what} sha256").hex()
        if not version and not compatible and not digest:
            return None
        if not version:
            raise BootStateError(f"boot state {what} has an image without a version")
        return Image(version, compatible, digest)


def _slot_index(value: int, what: str, allow_none: bool) -> str | None:
    if value == NONE and allow_none:
        return None
    if value >= len(SLOTS):
        raise BootStateError(f"boot state {what} slot {value} (0 = A, 1 = B)")
    return SLOTS[value]


def decode(raw: bytes) -> BootState:
    """A record's bytes as a BootState; BootStateError (one line) for anything else."""
    rd = _Reader(bytes(raw))
    magic, fmt, primary, current, pending = _HEAD.unpack(rd.take(_HEAD.size, "header"))
    if magic != MAGIC:
        raise BootStateError(f"not a boot state record (magic {magic!r}, expected {MAGIC!r})")
    if fmt != FORMAT:
        raise BootStateFormatError(f"boot state record of format {fmt}; this build reads format "
                                   f"{FORMAT} (boot the firmware that wrote it)")
    slots = []
    for name in SLOTS:
        good, attempts = _SLOT.unpack(rd.take(_SLOT.size, f"slot {name}"))
        if good > 1 or attempts > MAX_ATTEMPTS:
            raise BootStateError(f"boot state slot {name}: state {good} with {attempts} "
                                 f"attempts (state 0/1, at most {MAX_ATTEMPTS} attempts)")
        slots.append(Slot("good" if good else "bad", attempts, rd.image(f"slot {name}")))
    pend_slot = _slot_index(pending, "pending", True)
    pend_image = rd.image("pending")
    if (pend_slot is None) != (pend_image is None):
        raise BootStateError("boot state pending install names a slot without an image, "
                             "or an image without a slot")
    if rd.pos != len(rd.raw):
        raise BootStateError(f"boot state record has {len(rd.raw) - rd.pos} trailing bytes")
    prim = _slot_index(primary, "primary", False)
    assert prim is not None
    return BootState(prim, slots[0], slots[1], _slot_index(current, "current", True),
                     (pend_slot, pend_image) if pend_slot and pend_image else None)


# ------------------------------------------------------------- storage

def load(dev: BlockDevice) -> BootState:
    """The newest boot state on the boot partition ``dev``; ``blank()`` if it holds none."""
    try:
        log = RecordLog(dev)
    except LogCorruptError:  # rot: the newest committed record before it still decides
        log = RecordLog(dev, salvage=True)
    if len(log) == 0:
        return blank()
    seq = log.next_seq - 1
    try:
        return decode(log.read(seq))
    except BootStateError as exc:
        raise type(exc)(f"boot partition record {seq}: {exc}") from None


def save(dev: BlockDevice, state: BootState) -> int:
    """Append ``state`` as the newest record (durable on return), then release older ones."""
    payload = encode(state)
    try:
        log = RecordLog(dev)
    except LogCorruptError:
        log = RecordLog(dev, salvage=True)
        log.discard_damage()
    seq = log.append(payload)
    log.release(seq)
    return seq


@contextmanager
def boot_partition(device: str | os.PathLike, board: Board) -> Iterator[BlockDevice]:
    """The boot partition of the flash image or block device ``device``, locked for us alone.

    The lock (flock on the device node or image file) keeps the bootloader,
    RAUC's backend and the desk tools from interleaving read-modify-writes.
    """
    lock = os.open(device, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        flash = board.flash
        with FileBlockDevice(device, flash.erase_block_bytes,
                             flash.size_bytes // flash.erase_block_bytes) as dev:
            yield open_partition(dev, flash, BOOT_PARTITION)
    finally:
        os.close(lock)


def read(device: str | os.PathLike, board: Board) -> BootState:
    with boot_partition(device, board) as part:
        return load(part)


def update(device: str | os.PathLike, board: Board,
           change: Callable[[BootState], BootState]) -> BootState:
    """Load, change and save the boot state under one lock; returns the new state."""
    with boot_partition(device, board) as part:
        new = change(load(part))
        save(part, new)
        return new


def boot_choice(device: str | os.PathLike, board: Board) -> tuple[str, str, Image | None]:
    """The bootloader's step on the flash: choose, persist the try taken off, and return
    (slot, why, the image recorded in it). NoBootableSlotError when neither can boot."""
    picked: list = []

    def pick(state: BootState) -> BootState:
        slot, new, why = choose(state)
        picked[:] = [slot, why, new.slot(slot).image]
        return new

    update(device, board, pick)
    return picked[0], picked[1], picked[2]


def slot_region(board: Board, slot: str) -> tuple[int, int]:
    """(offset, size) in bytes of the slot's partition on the board's flash: where the
    desk's installer and the board's boot stage put their loop devices."""
    part = board.flash.partition(PARTITIONS[_check_name(slot)])
    return part.offset_bytes, part.size_bytes
