"""Re-homing meters as they join and leave: the terminal's half of step 1 (paper, section 2.1).

The planner clusters the meters and sites every terminal at its cluster's
graph central point, the medoid (eq. 3). Afterwards meters keep joining and
leaving; the paper: "ECDs keep spare capacity; when it runs out, re-run
steps 1-4 for the affected area". This module is that rule as a sans-I/O core
(the h11 shape, ``../shared/STYLE.md``): one object, ``Placement``, owns the
state; ``join`` and ``leave`` change it and hand back typed events that the
caller acts on. No sockets, files, clocks or threads; numpy only, so it runs
on the terminal.

Events and what the caller does with them:

- ``Assigned(meter_id, terminal)``: a new meter's home; the ledger's
  *generate* operation goes to that terminal.
- ``Migrate(meter_id, from_terminal, to_terminal)``: an existing meter's home
  changed; the ledger turns it into a *migrate* key operation, which, like
  every key operation, needs the confirmation of more than half of the
  terminals (paper, section 2.1 and 2.2.1). Migrations come in an order in
  which applying them one at a time never puts a terminal over its cap.
- ``Removed(meter_id, terminal)``: a meter left.
- ``SiteMoved(terminal, old_xy, new_xy)``: the medoid of a terminal's cluster,
  its planned site, changed. Advisory only: terminals are physical boxes and
  the planner decides whether one is moved.
- ``ReplanNeeded(terminals, reason, meter_id, xy)``: no bounded, local repair
  exists; re-run the planner (steps 1-4) over ``terminals``, the affected
  area, then join the meter again.

Decisions:

- **Capacity is hard.** No terminal ever has more than ``cap`` meters, not
  even for a moment between two events.
- **A join that needs a re-plan assigns nothing.** The state is left exactly
  as it was and the only event is ``ReplanNeeded``; the meter stays pending
  with the caller. A provisional home would either break the cap or park the
  meter arbitrarily far away, and every provisional home would cost a
  majority-confirmed generate now and a migrate after the re-plan.
- **A join into spare capacity moves nobody.** Only when every terminal
  within the detour bound is full does a chain of migrations make room.
  (Preferring a terminal below the mean load within the detour bound was
  measured: 0.03 less variance after a turnover for 1.5 % more distance.)
- **Leaving rebalances only below the planner's lower bound.** It frees a
  place and recomputes the medoid of the cluster it touched; only when the
  terminal falls below floor(n / k) - ``MIN_LOAD_SLACK`` (the bound ``plan``
  keeps) does one meter move in from a neighbour above floor(n / k), the one
  adding least distance within the detour bound (one majority-confirmed
  migration). Other drift is the planner's business at its next run.
  Measured (``edgekey bench rehome``): after a full turnover of the paper's
  300 meters the load variance stays at or below a fresh plan's.
- **An emptied terminal keeps its site.** A cluster without members has no
  medoid, so the box stays where it is (no ``SiteMoved``) until a meter
  joins it.
- **Determinism.** Ties between terminals go to the lower terminal index;
  ties between meters to the earlier arrival (the order of
  ``from_assignment``'s input, then of joins); a tie for the medoid to the
  member standing on the current site, so a site never hops between equally
  central members. The same sequence of calls gives the same events.

Per-operation work is local and bounded (n meters, k terminals, K =
``neighbourhood``, L = ``max_chain``, c = ``cap``): one distance from the new
meter to each of the k sites (the spatial index is a numpy pass over the
site array; k is about n / c for one terminal network), then only inside the
K nearest terminals. Nothing scans the n meters.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import numpy as np

from agent.placement.geometry import as_points, distances
from agent.placement.metrics import PlanMetrics, loads, plan_metrics
from hal.require import require_int, require_real

# ---------------------------------------------------------------- limits
# Paper, section 2.1: at most 25 meters per terminal.
DEFAULT_CAP = 25
# How much further than its nearest terminal a meter may be homed, in metres.
# About one cluster radius in the paper's setting: 3.5 km x 4 km shared by 13
# terminals is 1.08 km^2 each, the radius of a disc that size 590 m.
DEFAULT_MAX_DETOUR_M = 500.0
# A leave that takes a terminal below floor(n / k) minus this pulls one meter back in
# (Placement._refill): the planner's own lower bound (plan.MIN_LOAD_SLACK).
MIN_LOAD_SLACK = 2
# At most this many migrations to make room for one joining meter; each is a
# majority-confirmed ledger operation, so a long chain is a re-plan in disguise.
DEFAULT_MAX_CHAIN = 3
# Terminals searched for a chain: the new meter's nearest few. Six neighbours
# surround a cell in a planar layout on average; two more for irregular ones.
DEFAULT_NEIGHBOURHOOD = 8
# Sums of distances (eq. 3) closer than this are a tie: a micrometre, far below
# any surveyed meter position, far above float64 rounding of a few dozen terms.
SITE_TIE_M = 1e-6

# Placement names meters by any hashable key: the planner's labels ("M0042"),
# plain ints in tests, a hal.ids.MeterId on the terminal. It never looks inside one,
# so it keeps no id rules of its own (hal/ids.py has them).
MeterKey = Hashable
XY = tuple[float, float]


class PlacementError(ValueError):
    """The caller asked for something the placement cannot do; nothing was changed."""


class PlacementInvariantError(RuntimeError):
    """``check`` found the state inconsistent: a bug here, not the caller's fault."""


# ---------------------------------------------------------------- events
@dataclass(frozen=True)
class Assigned:
    """A joining meter's home terminal (the ledger's generate goes there)."""

    meter_id: MeterKey
    terminal: int


@dataclass(frozen=True)
class Migrate:
    """An existing meter's home changed: a migrate key operation for the ledger."""

    meter_id: MeterKey
    from_terminal: int
    to_terminal: int


@dataclass(frozen=True)
class Removed:
    """A meter left; it was homed at ``terminal``."""

    meter_id: MeterKey
    terminal: int


@dataclass(frozen=True)
class SiteMoved:
    """The medoid of ``terminal``'s cluster (its planned site, eq. 3) moved. Advisory."""

    terminal: int
    old_xy: XY
    new_xy: XY


class ReplanReason(enum.StrEnum):
    NO_SPARE_CAPACITY = "no-spare-capacity"  # every terminal in the neighbourhood is full
    NO_BOUNDED_CHAIN = "no-bounded-chain"  # spare exists, but not within max_chain / max_detour_m


@dataclass(frozen=True)
class ReplanNeeded:
    """No bounded repair: re-plan ``terminals`` (nearest first), then join the meter again."""

    terminals: tuple[int, ...]
    reason: ReplanReason
    meter_id: MeterKey
    xy: XY


Event = Assigned | Migrate | Removed | SiteMoved | ReplanNeeded


@dataclass(frozen=True, eq=False)
class PlacementArrays:
    """The state as arrays, meters in arrival order (``from_assignment``'s, then joins)."""

    meter_ids: tuple[MeterKey, ...]
    points: np.ndarray  # (n, 2) float64, metres
    assign: np.ndarray  # (n,) int64, home terminal of each meter
    sites: np.ndarray  # (k, 2) float64, each terminal's site
    site_meter: np.ndarray  # (k,) int64, index of the site's meter in meter_ids; -1 if empty
    loads: np.ndarray  # (k,) int64, meters per terminal


# ---------------------------------------------------------------- the core
class Placement:
    """Meters, their homes and the terminals' sites; ``join`` and ``leave`` return events.

    ``sites`` (k, 2) are where the k terminals stand before any meter is
    homed (terminals are numbered 0..k-1). ``cap`` is the hard capacity,
    ``max_detour_m`` how much further than its nearest terminal any meter may
    end up (for a moved meter: further than its old site), ``max_chain`` the
    most migrations one join may cause, ``neighbourhood`` how many of the new
    meter's nearest terminals a chain may pass through. Build a planned
    network with ``from_assignment``.
    """

    def __init__(self, sites: object, *, cap: int = DEFAULT_CAP,
                 max_detour_m: float = DEFAULT_MAX_DETOUR_M,
                 max_chain: int = DEFAULT_MAX_CHAIN,
                 neighbourhood: int = DEFAULT_NEIGHBOURHOOD) -> None:
        site_xy = _points(sites, "sites")
        if len(site_xy) == 0:
            raise PlacementError("a placement needs at least one terminal")
        self._cap = require_int("cap", cap, min=1, error=PlacementError)
        self._max_detour_m = require_real("max_detour_m", max_detour_m, min=0.0,
                                          allow_inf=True, error=PlacementError)
        self._max_chain = require_int("max_chain", max_chain, min=0, error=PlacementError)
        self._neighbourhood = require_int("neighbourhood", neighbourhood, min=1,
                                          error=PlacementError)
        k = len(site_xy)
        self._site_xy = site_xy.copy()
        self._site_meter: list[MeterKey | None] = [None] * k
        self._members: list[list[MeterKey]] = [[] for _ in range(k)]
        self._load = np.zeros(k, dtype=np.int64)
        self._xy: dict[MeterKey, XY] = {}
        self._home: dict[MeterKey, int] = {}
        self._seq: dict[MeterKey, int] = {}
        self._next_seq = 0

    @classmethod
    def from_assignment(cls, meter_ids: Iterable[MeterKey], points: object, assign: object,
                        sites: object, *, cap: int = DEFAULT_CAP,
                        max_detour_m: float = DEFAULT_MAX_DETOUR_M,
                        max_chain: int = DEFAULT_MAX_CHAIN,
                        neighbourhood: int = DEFAULT_NEIGHBOURHOOD) -> Placement:
        """A placement from a plan: ``assign[i]`` is the home of ``meter_ids[i]`` at ``points[i]``.

        ``sites`` (k, 2) gives the number of terminals and, for a terminal
        without meters, its site; a non-empty cluster's site is recomputed as
        its medoid (eq. 3), keeping the given site when it is one of the
        tied medoids. From ``agent.placement.plan``:
        ``Placement.from_assignment(ids, pts, p.assign, p.centres, cap=25)``.
        O(n + k c^2). Raises ``PlacementError`` for duplicate or unhashable
        ids, mismatched lengths, non-finite coordinates, terminals out of
        range, or a terminal over ``cap``.
        """
        placement = cls(sites, cap=cap, max_detour_m=max_detour_m, max_chain=max_chain,
                        neighbourhood=neighbourhood)
        ids = list(meter_ids)
        pts = _points(points, "points")
        a = np.asarray(assign)
        if a.shape != (len(ids),) or len(pts) != len(ids):
            raise PlacementError(f"{len(ids)} meter ids, {len(pts)} points and assign of "
                                 f"shape {a.shape}: they must match")
        if len(a) and not np.issubdtype(a.dtype, np.integer):
            raise PlacementError(f"assign must hold terminal indices, got dtype {a.dtype}")
        a = a.astype(np.int64)
        k = placement.terminals
        if len(a) and (a.min() < 0 or a.max() >= k):
            bad = int(np.flatnonzero((a < 0) | (a >= k))[0])
            raise PlacementError(f"assign[{bad}] = {int(a[bad])}: terminals are 0..{k - 1}")
        count = loads(a, k)
        if (count > cap).any():
            t = int(np.flatnonzero(count > cap)[0])
            raise PlacementError(f"terminal {t} has {int(count[t])} meters, cap is {cap}")
        seen: set[MeterKey] = set()
        for i, mid in enumerate(ids):
            if not _hashable(mid):
                raise PlacementError(f"meter_ids[{i}] = {mid!r} is not hashable")
            if mid in seen:
                raise PlacementError(f"meter id {mid!r} appears more than once")
            seen.add(mid)
        for mid, xy, t in zip(ids, pts.tolist(), a.tolist(), strict=True):
            placement._add(mid, (xy[0], xy[1]), t)
        for t in range(k):
            placement._resite(t)
        return placement

    # ------------------------------------------------------------ reading
    @property
    def cap(self) -> int:
        return self._cap

    @property
    def terminals(self) -> int:
        """The number of terminals, k."""
        return len(self._members)

    def __len__(self) -> int:
        return len(self._home)

    def __contains__(self, meter_id: object) -> bool:
        return _hashable(meter_id) and meter_id in self._home

    def home(self, meter_id: MeterKey) -> int:
        """The home terminal of a known meter; ``PlacementError`` for an unknown one."""
        self._require_known(meter_id)
        return self._home[meter_id]

    def site(self, terminal: int) -> XY:
        """Where ``terminal`` is planned to stand."""
        x, y = self._site_xy[terminal]
        return (float(x), float(y))

    def members(self, terminal: int) -> tuple[MeterKey, ...]:
        """The meters homed at ``terminal``, in arrival order."""
        return tuple(sorted(self._members[terminal], key=self._seq.__getitem__))

    def arrays(self) -> PlacementArrays:
        """The whole state as fresh arrays, for export and tests. O(n log n)."""
        ids = sorted(self._home, key=self._seq.__getitem__)
        index = {mid: i for i, mid in enumerate(ids)}
        points = np.array([self._xy[m] for m in ids], dtype=np.float64).reshape(len(ids), 2)
        assign = np.array([self._home[m] for m in ids], dtype=np.int64)
        site_meter = np.array([-1 if m is None else index[m] for m in self._site_meter],
                              dtype=np.int64)
        return PlacementArrays(meter_ids=tuple(ids), points=points, assign=assign,
                               sites=self._site_xy.copy(), site_meter=site_meter,
                               loads=self._load.copy())

    def metrics(self) -> PlanMetrics:
        """The planner's figures (load variance, distances, violations) for the current state."""
        arr = self.arrays()
        return plan_metrics(arr.points, arr.assign, arr.sites, cap=self._cap)

    def check(self) -> None:
        """Raise ``PlacementInvariantError`` unless every invariant holds. O(n + k c^2).

        Every meter is homed exactly once and its home lists it; loads match
        and never exceed ``cap``; every non-empty cluster's site is one of its
        members and a medoid (eq. 3, ties within ``SITE_TIE_M``); an empty
        terminal has no site meter.
        """
        problems: list[str] = []
        listed: dict[MeterKey, int] = {}
        for t, members in enumerate(self._members):
            for mid in members:
                if mid in listed:
                    problems.append(f"meter {mid!r} listed by terminals {listed[mid]} and {t}")
                listed[mid] = t
            if len(members) != int(self._load[t]):
                problems.append(f"terminal {t}: load {int(self._load[t])}, "
                                f"{len(members)} members")
            if len(members) > self._cap:
                problems.append(f"terminal {t}: {len(members)} meters, cap {self._cap}")
            site = self._site_meter[t]
            if not members:
                if site is not None:
                    problems.append(f"terminal {t}: empty but site meter {site!r}")
                continue
            if site not in members:
                problems.append(f"terminal {t}: site meter {site!r} is not a member")
                continue
            if self._xy[site] != self.site(t):
                problems.append(f"terminal {t}: site {self.site(t)} is not where its site "
                                f"meter {site!r} is, {self._xy[site]}")
            sums = self._distance_sums(members)
            own = float(sums[members.index(site)])
            if own > float(sums.min()) + SITE_TIE_M:
                problems.append(f"terminal {t}: site sum {own} m, medoid's {float(sums.min())} m")
        if listed != self._home:
            problems.append(f"{len(self._home)} meters homed, {len(listed)} listed, "
                            "or homes disagree")
        if not (self._xy.keys() == self._home.keys() == self._seq.keys()):
            problems.append("coordinates, homes and arrival order cover different meters")
        if problems:
            raise PlacementInvariantError("; ".join(problems))

    # ------------------------------------------------------------ changing
    def join(self, meter_id: MeterKey, xy: object) -> list[Event]:
        """Home a new meter at ``xy`` (metres); return what changed.

        1. The nearest terminal with spare capacity among those at most
           ``max_detour_m`` further than the nearest terminal (ties: lower
           distance, then lower index): ``[Assigned]``, nobody moves.
        2. Otherwise every terminal within the detour is full. Among the
           ``neighbourhood`` nearest terminals, the cheapest simple chain
           ``t0 -> t1 -> ... -> tj`` (j <= ``max_chain``): the meter joins the
           full t0 (within the detour), the cheapest member of each full t_i
           moves to t_{i+1} (cheapest: least added distance to its site,
           ties to the earlier arrival; each move adds at most
           ``max_detour_m``), and t_j has spare capacity. Cost is the total
           added distance, measured to the sites before the join; ties go to
           the shorter chain, then the nearer terminals. Events:
           ``Migrate`` from the far end back (applied in order, no terminal
           ever exceeds ``cap``), then ``Assigned``.
        3. No such chain: ``[ReplanNeeded]`` naming the neighbourhood, with
           ``NO_SPARE_CAPACITY`` when all of it is full, else
           ``NO_BOUNDED_CHAIN``; nothing changes, the meter is not homed.

        After 1 or 2, the medoid of each cluster that changed is recomputed and
        a ``SiteMoved`` follows for each site that moved, by terminal.

        Work: O(k) for the distances to the sites and the nearest few,
        O(K^2 c) for the chain's cost table, at most K (K-1)^L partial chains
        (2744 for the defaults, each O(1)), O((L+1) c^2) for the medoids.
        Raises ``PlacementError``, changing nothing, for a known or unhashable
        id and for coordinates that are not two finite numbers.
        """
        if not _hashable(meter_id):
            raise PlacementError(f"meter id {meter_id!r} is not hashable")
        if meter_id in self._home:
            raise PlacementError(f"meter {meter_id!r} already joined, at terminal "
                                 f"{self._home[meter_id]}")
        p = _xy(meter_id, xy)
        d = distances(np.array([p]), self._site_xy)[0]
        d0 = float(d.min())
        reach = d <= d0 + self._max_detour_m
        direct = np.flatnonzero(reach & (self._load < self._cap))
        if direct.size:
            near = d[direct]
            t = int(direct[np.flatnonzero(near == near.min())[0]])  # ties: lower index
            self._add(meter_id, p, t)
            return [Assigned(meter_id, t), *self._resite_all([t])]

        nbhd = self._nearest(d)
        found = self._cheapest_chain(d, d0, reach, nbhd)
        if isinstance(found, ReplanReason):
            return [ReplanNeeded(tuple(int(t) for t in nbhd), found, meter_id, p)]
        events: list[Event] = []
        for mid, a, b in reversed(found):
            self._move(mid, b)
            events.append(Migrate(mid, a, b))
        t0 = found[0][1]
        self._add(meter_id, p, t0)
        events.append(Assigned(meter_id, t0))
        touched = {t0} | {b for _, _, b in found}
        return events + self._resite_all(sorted(touched))

    def leave(self, meter_id: MeterKey) -> list[Event]:
        """Remove a meter: ``[Removed]``, a ``Migrate`` into its terminal if that fell below
        ``min_load`` (see the module's decisions), then ``SiteMoved`` for each medoid
        that moved.

        An emptied terminal keeps its site. Work: O(c) to drop it from its
        cluster, O(K c k) for a refill, O(c^2) per medoid. ``PlacementError``,
        changing nothing, for an unknown id.
        """
        self._require_known(meter_id)
        t = self._home[meter_id]
        self._members[t].remove(meter_id)
        self._load[t] -= 1
        del self._home[meter_id], self._xy[meter_id], self._seq[meter_id]
        events: list[Event] = [Removed(meter_id, t)]
        pulled = self._refill(t)
        if pulled is not None:
            events.append(pulled)
        return events + self._resite_all(sorted({t} | ({pulled.from_terminal} if pulled else
                                                          set())))

    def min_load(self) -> int:
        """The lower load bound a leave restores: the planner's floor(n / k) - slack."""
        return max(0, len(self) // self.terminals - MIN_LOAD_SLACK)

    def _refill(self, t: int) -> Migrate | None:
        """After a leave left ``t`` below ``min_load``: one meter from the neighbour that can
        spare it (load above floor(n / k)) at the least added distance, within the
        detour bound of that meter's nearest terminal; None when no neighbour can.
        Why: leaves alone let a terminal drain to a handful of meters beside full
        ones, which a fresh plan would never do. Work: O(K c) over the
        ``neighbourhood`` terminals nearest ``t``'s site."""
        if self._load[t] >= self.min_load():
            return None
        spare = len(self) // self.terminals
        d_site = distances(self._site_xy[t:t + 1], self._site_xy)[0]
        best: tuple[float, int, MeterKey, int] | None = None
        for u in self._nearest(d_site).tolist():
            if u == t or self._load[u] <= spare:
                continue
            members = self._members[u]
            pts = self._coords(members)
            to_all = distances(pts, self._site_xy)
            own, here = to_all[:, u], to_all[:, t]
            ok = here <= to_all.min(axis=1) + self._max_detour_m
            for i in np.flatnonzero(ok).tolist():
                key = (float(here[i] - own[i]), self._seq[members[i]], members[i], u)
                if best is None or key[:2] < best[:2]:
                    best = key
        if best is None:
            return None
        _, _, mid, u = best
        self._move(mid, t)
        return Migrate(mid, u, t)

    # ------------------------------------------------------------ internals
    def _require_known(self, meter_id: object) -> None:
        if meter_id not in self:
            raise PlacementError(f"meter {meter_id!r} is not homed here")

    def _add(self, meter_id: MeterKey, xy: XY, t: int) -> None:
        self._xy[meter_id] = (float(xy[0]), float(xy[1]))
        self._home[meter_id] = t
        self._seq[meter_id] = self._next_seq
        self._next_seq += 1
        self._members[t].append(meter_id)
        self._load[t] += 1

    def _move(self, meter_id: MeterKey, to: int) -> None:
        a = self._home[meter_id]
        self._members[a].remove(meter_id)
        self._load[a] -= 1
        self._members[to].append(meter_id)
        self._load[to] += 1
        self._home[meter_id] = to

    def _nearest(self, d: np.ndarray) -> np.ndarray:
        """The ``neighbourhood`` terminals nearest, by (distance, index). O(k)."""
        k = len(d)
        want = min(self._neighbourhood, k)
        if want < k:
            cut = np.partition(d, want - 1)[want - 1]
            pool = np.flatnonzero(d <= cut)  # ties at the cut stay in the pool
        else:
            pool = np.arange(k)
        return pool[np.lexsort((pool, d[pool]))][:want]

    def _cheapest_chain(self, d: np.ndarray, d0: float, reach: np.ndarray,
                        nbhd: np.ndarray) -> list[tuple[MeterKey, int, int]] | ReplanReason:
        """The cheapest chain for ``join`` step 2, or why there is none.

        Returns the moves ``[(meter, t0, t1), (meter, t1, t2), ...]`` in chain
        order: the joining meter goes to t0, the first move's source. Work:
        O(K^2 c) for the cost table, at most K (K-1)^L partial chains.
        """
        full = self._load[nbhd] >= self._cap
        if full.all():
            return ReplanReason.NO_SPARE_CAPACITY
        size = len(nbhd)
        site = self._site_xy[nbhd]
        # cost[i, j]: least distance added by moving a member of nbhd[i] to
        # nbhd[j]'s site; who[i][j] that member. Only full terminals pass meters on.
        cost = np.full((size, size), np.inf)
        who: list[list[MeterKey]] = [[] for _ in range(size)]
        for i in np.flatnonzero(full).tolist():
            members = self.members(int(nbhd[i]))
            dm = distances(self._coords(members), site)
            extra = dm - dm[:, i:i + 1]
            best = np.argmin(extra, axis=0)  # first minimum: the earliest arrival
            cost[i] = extra[best, np.arange(size)]
            cost[i, i] = np.inf
            who[i] = [members[j] for j in best.tolist()]
        cost[cost > self._max_detour_m] = np.inf
        table = cost.tolist()
        spare = (~full).tolist()
        limit = self._max_chain
        best_key: tuple[float, int, tuple[int, ...]] | None = None

        def extend(path: list[int], total: float) -> None:
            nonlocal best_key
            if len(path) - 1 >= limit:
                return
            row = table[path[-1]]
            for j in range(size):
                w = row[j]
                if w == math.inf or j in path:
                    continue
                if spare[j]:
                    key = (total + w, len(path), (*path, j))
                    if best_key is None or key < best_key:
                        best_key = key
                else:
                    path.append(j)
                    extend(path, total + w)
                    path.pop()

        for i in range(size):
            if reach[nbhd[i]]:  # so full: join step 1 found no room within the detour
                extend([i], float(d[nbhd[i]]) - d0)
        if best_key is None:
            return ReplanReason.NO_BOUNDED_CHAIN
        hops = best_key[2]
        return [(who[i][j], int(nbhd[i]), int(nbhd[j]))
                for i, j in itertools.pairwise(hops)]

    def _coords(self, members: tuple[MeterKey, ...] | list[MeterKey]) -> np.ndarray:
        return np.array([self._xy[m] for m in members], dtype=np.float64).reshape(-1, 2)

    def _distance_sums(self, members: tuple[MeterKey, ...] | list[MeterKey]) -> np.ndarray:
        """Each member's sum of distances to the others (eq. 3's objective). O(c^2)."""
        pts = self._coords(members)
        return distances(pts, pts).sum(axis=1)

    def _resite(self, t: int) -> SiteMoved | None:
        """Recompute terminal ``t``'s medoid (eq. 3) and site. O(c^2).

        Among the members within ``SITE_TIE_M`` of the least sum, one on the
        current site wins, then the earliest arrival. An empty cluster keeps
        its site.
        """
        members = self._members[t]
        if not members:
            self._site_meter[t] = None
            return None
        sums = self._distance_sums(members)
        tied = np.flatnonzero(sums <= sums.min() + SITE_TIE_M).tolist()
        old = self.site(t)
        chosen = min((members[i] for i in tied),
                     key=lambda m: (self._xy[m] != old, self._seq[m]))
        self._site_meter[t] = chosen
        new = self._xy[chosen]
        if new == old:
            return None
        self._site_xy[t] = new
        return SiteMoved(t, old, new)

    def _resite_all(self, terminals: list[int]) -> list[Event]:
        return [moved for t in terminals if (moved := self._resite(t)) is not None]


# ---------------------------------------------------------------- helpers
def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _points(points: object, name: str) -> np.ndarray:
    try:
        if np.size(points) == 0:  # [] has shape (0,): no points, not a wrong shape
            return np.empty((0, 2))
        return as_points(points, name)
    except (TypeError, ValueError) as exc:
        raise PlacementError(str(exc)) from exc


def _xy(meter_id: MeterKey, xy: object) -> XY:
    try:
        p = np.asarray(xy, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PlacementError(f"meter {meter_id!r}: xy must be two numbers, got {xy!r}") from exc
    if p.shape != (2,):
        raise PlacementError(f"meter {meter_id!r}: xy must be two numbers, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise PlacementError(f"meter {meter_id!r}: xy is not finite: {p.tolist()}")
    return (float(p[0]), float(p[1]))
