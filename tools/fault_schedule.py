"""The faults ``edgekey bench faults`` injects, drawn from a seed before the fleet starts.

No process, no clock: a list of ``Fault`` values, each with the number of
acknowledged key operations at which it is due (the run's "random moment",
so a slower machine injects at the same point of the work, only later in
seconds) and what it hits. Two tracks:

- in order, spread over ``SPAN`` of the operations, each at a random moment
  of its slot: rounds of power cuts (``fleet kill`` of a random minority,
  up again after a random down time) and, among them at random positions,
  the etcd leader's process alone, then a follower's;
- beside them, one terminal hosting no etcd member power-cut early and kept
  down until etcd no longer holds the blocks after its tip (``KEPT_AT``).

A fleet of n terminals stays endorsed by a majority only while fewer than
half are down, so at most ``minority(n)`` terminals are down at once; the
runner trims a round drawn bigger than what is left of that while the kept
terminal is down, and says so in the fault's note. A round leaves one etcd
member running: ``fleet start`` powers one terminal on at a time and waits
for its member to see a leader, which a lone member of three never does.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

POWER_CUT = "power_cut"
ETCD_LEADER = "etcd_leader"
ETCD_FOLLOWER = "etcd_follower"
KEPT_DOWN = "kept_down"
SPAN = (0.05, 0.8)  # the share of the operations the in-order faults are spread over
KEPT_AT = (0.03, 0.12)  # early: the fleet must commit two checkpoints past it
CUT_DOWN_S = (2.0, 6.0)  # a power cut lasts a few seconds
ETCD_DOWN_S = (3.0, 8.0)
MOMENT = (0.1, 0.9)  # where in its slot a fault falls


def minority(terminals: int) -> int:
    """The most terminals that may be down at once with a majority still up."""
    return (terminals - 1) // 2


@dataclass
class Fault:
    """One injected fault: what is planned, then what the run saw (``at_ops`` and
    ``ops_at_injection`` count from the load's start; ``*_s`` fields are seconds, since the
    load began for ``injected_s`` and ``restarted_s``; ``down_s`` planned, ``down_for_s`` as
    it was)."""

    kind: str
    at_ops: int
    down_s: float = 0.0
    planned: list[str] = field(default_factory=list)
    terminals: list[str] = field(default_factory=list)
    member: str | None = None
    ops_at_injection: int | None = None
    injected_s: float | None = None
    restarted_s: float | None = None  # powered on again: ``fleet start`` issued
    down_for_s: float | None = None
    start_s: float | None = None  # ``fleet start``: until the consoles answer
    recovered_s: float | None = None  # from power-on to every running terminal current
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def draw(ids: list[str], members: set[str], *, ops: int, power_cuts: int, etcd_kills: bool,
         kept_down: bool, seed: int) -> tuple[list[Fault], Fault | None]:
    """The in-order faults and the kept-down terminal's (None when no terminal fits)."""
    rng = random.Random(seed)
    spare = [t for t in ids if t not in members]
    kept = None
    if kept_down and spare and minority(len(ids)) >= 1:
        kept = Fault(KEPT_DOWN, at_ops=int(ops * rng.uniform(*KEPT_AT)),
                     planned=[rng.choice(spare)])
    kinds = [POWER_CUT] * power_cuts
    if etcd_kills and len(members) >= 3:  # one member down leaves a quorum
        kinds += [ETCD_LEADER, ETCD_FOLLOWER]
    order = sorted(range(len(kinds)), key=lambda _: rng.random())
    kinds = [kinds[i] for i in order]
    if ETCD_LEADER in kinds and kinds.index(ETCD_FOLLOWER) < kinds.index(ETCD_LEADER):
        a, b = kinds.index(ETCD_FOLLOWER), kinds.index(ETCD_LEADER)
        kinds[a], kinds[b] = kinds[b], kinds[a]  # the leader first, as the issue lists them
    pool = [t for t in ids if kept is None or t != kept.planned[0]]
    lo, hi = SPAN
    faults = []
    for j, kind in enumerate(kinds):
        at = int(ops * (lo + (hi - lo) * (j + rng.uniform(*MOMENT)) / len(kinds)))
        if kind == POWER_CUT:
            k = min(rng.randint(1, max(1, minority(len(ids)))), len(pool))
            victims = rng.sample(pool, k)
            while members and members <= set(victims):
                victims = rng.sample(pool, k)
            faults.append(Fault(kind, at, rng.uniform(*CUT_DOWN_S), sorted(victims)))
        else:
            faults.append(Fault(kind, at, rng.uniform(*ETCD_DOWN_S)))
    return faults, kept
