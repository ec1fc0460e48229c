"""A ledger partition with a damaged record, cut back to the blocks before the damage.

A fleet terminal whose record log finds a committed record damaged (bit
rot, which hal/recordlog.py tells from a torn write) keeps the blocks
before the damage that still verify and boots on them; its fleet gives the
rest back the way it does to a terminal that was down (agent/network.py:
etcd's retained blocks, or a peer's snapshot checked against a checkpoint a
majority endorsed), each block validated as it is applied. A terminal
without a fleet has nowhere to get them from and keeps refusing to boot
(agent/main.py); so does one whose damage this cannot cut away.

The repair, in three steps:

1. salvage: open the log read-only with the records before the damage
   (``RecordLog(salvage=True)``) and replay them as every boot does
   (``Chain``: hash links, Merkle roots, signatures, quorum, lifecycle, the
   snapshot's seal by this terminal, the genesis pin). Refused, with
   nothing written, when they do not verify or hold no genesis.
2. discard (``RecordLog.discard_damage``, the only step that writes): erase
   the segments holding only records past the damage, then write one
   segment header starting at the first record given up, which recovery
   reads as the log having moved past the damaged records.
3. reopen the record log as the next boot will and check that it finds no
   damage and the very records of step 1, so that the next boot replays to
   the state step 1 verified; the chain of step 1 goes on, on the log that
   is writable again.

Why a power cut at any moment leaves a bootable or repairable image: the
segments step 2 erases hold only records past the damage, and the segment
holding the damage (with the records before it: the genesis, or the
snapshot standing for what was released) is neither written nor erased.
So until the new segment header is on flash, a cut leaves the damage as it
was, over the same records before it, and the next boot salvages the same
prefix and repairs again (a torn header reads as a free segment); once it
is on flash, the log opens cleanly on that prefix. The partition is never
blank (no ``--format``) and never without its genesis or the snapshot
standing for it, so the genesis pin is checked at every boot as before. The
damaged segment stays, sealed, until a compaction releases it like any old
segment.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.ledger.chain import Chain
from agent.ledger.errors import ChainCorruptError, LedgerError
from agent.ledger.identity import TerminalIdentity
from agent.ledger.rules import PlacementOracle
from hal.blockdev import BlockDevice
from hal.recordlog import LogCorruptError, LogError, RecordLog


class RepairRefused(LedgerError):
    """The damage cannot be cut away here; nothing was written."""


@dataclass(frozen=True)
class Repair:
    """What a repair kept and what it gave up to be fetched again."""

    height: int  # the tip kept: every block up to it replayed and validated
    first_record_lost: int  # record id of the first record given up
    records_lost: int  # ids from the damaged record to the newest one seen on flash
    segments_erased: int
    damage: str  # what the record log found, in its words


def repair_chain(device: BlockDevice, identity: TerminalIdentity, *, require_pow: int = 0,
                 placement_home: PlacementOracle | None = None,
                 genesis_hash: bytes | None = None) -> tuple[Chain, Repair]:
    """Cut the damaged ledger partition on ``device`` back to the blocks before the damage
    (module docstring): the chain reopened on what is left, and what the repair did.

    RepairRefused (nothing written) when there is no damage in the record log, when the
    records before it do not replay to a chain from the fleet's genesis, or when the damage
    cannot be put behind the log. An OSError from the flash can leave the repair half done,
    which the next boot finds and repairs again.
    """
    rules = {"require_pow": require_pow, "placement_home": placement_home,
             "genesis_hash": genesis_hash}
    salvaged_log = RecordLog(device, salvage=True)
    found = salvaged_log.report
    if not found.damage:
        raise RepairRefused("the record log finds no damaged record: the records are intact and "
                            "what fails is the chain they hold, which a repair does not cut")
    try:
        kept = Chain(salvaged_log, identity, **rules)  # type: ignore[arg-type]
    except ChainCorruptError as exc:
        raise RepairRefused(f"the records before the damage do not verify: {exc}") from exc
    if kept.height is None or kept.state.genesis_hash is None:
        raise RepairRefused("no block before the damage: the fleet's genesis itself is lost")
    damage = "; ".join(f"segment {d.segment} offset {d.offset}: {d.detail}"
                       for d in found.damage)
    try:
        erased = salvaged_log.discard_damage()
    except LogError as exc:  # raised before anything is written
        raise RepairRefused(str(exc)) from exc
    try:
        again = RecordLog(device)
    except LogCorruptError as exc:
        raise ChainCorruptError(kept.height, found.next_seq,
                                f"the damage is still in the way after the repair: {exc}") from exc
    if (again.first_seq, again.next_seq) != (salvaged_log.first_seq, salvaged_log.next_seq):
        raise ChainCorruptError(kept.height, again.next_seq - 1,
                                f"the repaired partition holds records {again.first_seq}.."
                                f"{again.next_seq - 1}, not the {salvaged_log.first_seq}.."
                                f"{salvaged_log.next_seq - 1} kept")
    return kept, Repair(kept.height, found.next_seq, found.records_lost, erased, damage)
