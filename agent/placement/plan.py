"""Place terminals: the paper's K-means with graph-medoid siting (section 2.1, eq. 1-4).

One round is (3) assign every meter to a terminal, here with the hard
capacity bound (``capacity.assign_capacitated``, exact), then (4) move each
terminal to its cluster's medoid, the member with the least total distance to
the other members (eq. 3). Rounds stop when no centre moved more than ``eps``
metres (eq. 4) or after ``max_rounds``. The paper's step (1) places the
centres at random; k-means++ seeding does that reproducibly for a seed.

Both steps can only lower the total meter-to-terminal distance (the
assignment is optimal for the centres, the medoid for its cluster), so the
rounds settle; ``max_rounds`` bounds them when ties make equal plans alternate.

Balance (``plan(**BALANCED)``, what ``place`` runs): every terminal's load
is held in a band, floor(n / k) - 2 to ceil(n / k) + 2 meters and never over
``cap`` (the lower end by ``capacity.assign_bounded``, exact, relaxed only to
what n and k allow; the upper end as a tighter capacity), ``starts`` seeded
k-means++ starts are run and the kept one is polished by local site swaps
between neighbouring clusters (``polish``). The objective, lexicographic:
(a) capacity ``cap`` hard; (b) the band hard; (c) least mean meter-terminal
distance; (d) least load variance to break ties. Why: the band alone caps
the spread of loads (21..25 for 300 meters on 13 terminals; 16..21 for 55 on
3), so variance is set by a constraint the operator can read, not by a
weight lambda traded against metres; within it distance is what costs PLC
signal, so the starts compete on distance. What the band costs: where
meters cluster, a looser balance would be shorter (README, "Balance beside
distance").

Memory is O(n k) (the distance matrix of one round): this is for a single
area of up to a few thousand meters; ``tiling.plan_tiled`` is the scale path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.placement.capacity import (
    Repair,
    assign_bounded,
    assign_capacitated,
    assign_from_distances,
    check_assignment,
    check_cap,
)
from agent.placement.geometry import as_points, distances, medoid_index
from agent.placement.metrics import loads
from hal.require import require_int, require_real

# The paper: at most 25 meters per terminal, "with some margin" (section 2.1).
DEFAULT_CAP = 25
DEFAULT_MARGIN = 0.05

# Seeded starts plan() runs by default: START_WORK // n, within [MIN_STARTS, MAX_STARTS].
# On 300 meters (uniform and clustered, seeds 0-9) the best of 16 had 1-3 % less
# mean distance than one start; a start takes ~25 ms there, ~0.6 s on 2000 meters,
# so larger areas get fewer (2000: 3) and plan() stays within seconds.
MAX_STARTS = 16
MIN_STARTS = 2
START_WORK = 6000
# Default lower load bound: floor(n / k) minus this. 2 (300 meters, 13 terminals:
# loads 21..25) measured variance ~3 at about the mean distance of no bound; 0
# (loads 23..24) costs 2-5 % more distance.
MIN_LOAD_SLACK = 2
# Local swaps (polish): candidate sites per terminal and passes over the terminals.
# 4 and 2 took uniform 300 (seeds 0-9) from 374.8 to 372.9 m mean distance for
# ~0.1 s; 8 and 5 gained only 0.2 m more. A swap must gain this fraction of the total.
SWAP_CANDIDATES = 4
SWAP_PASSES = 2
# A trial re-solves only a terminal and this many nearest ones, so it costs
# O(cap) meters, not O(n), and plan() stays ~linear in k per pass.
SWAP_NEIGHBOURS = 4
SWAP_MIN_GAIN = 1e-9

# solve_quick (the tile schedule): at most this many plain Lloyd rounds, then this many
# exact bounded rounds. On 300-meter tiles (uniform, seeds 0-9) 1 exact round gave
# 3-4 % more mean distance than 2, and 2 were within 1 % of solve's rounds to convergence
# at a third of its time.
LLOYD_ROUNDS = 20
EXACT_ROUNDS = 2

# Medoids of many small clusters are computed together through a padded
# (clusters, m, m) block; this caps a block at 2**20 entries (8 MB of float64,
# twice that for the coordinate differences), within the terminal's budget.
MEDOID_BLOCK_ENTRIES = 1 << 20

# terminals_needed rounds n * (1 + margin) / cap to this many decimals before
# ceil, so float noise (500 * 1.05 / 25 = 21.000000000000004) does not add a terminal.
NEEDED_DECIMALS = 9


@dataclass(frozen=True)
class Plan:
    """Where the terminals go and which meters each serves.

    A terminal may have no meters only when duplicate coordinates leave fewer
    distinct positions than terminals (or ``k`` was forced that high); its
    site then sits on a position another terminal also uses.
    """

    assign: np.ndarray  # (n,) int64, terminal index of each meter
    sites: np.ndarray  # (k,) int64, meter whose position is terminal i's site (cluster medoid)
    centres: np.ndarray  # (k, 2) float64, = points[sites]
    rounds: int  # rounds of assign + medoid update done
    converged: bool  # every centre moved <= eps in the last round (eq. 4)
    repair_moves: int  # meters the capacity repair moved off their nearest centre, final round
    repair_cost_m: float  # extra total metres of those moves vs. nearest centre, final round
    tile: np.ndarray | None = None  # (k,) int64 tile of each terminal (plan_tiled only)


def terminals_needed(n: int, cap: int = DEFAULT_CAP, margin: float = DEFAULT_MARGIN) -> int:
    """Terminals for ``n`` meters at ``cap`` each with ``margin`` spare: ceil(n (1 + margin) / cap).

    The paper's setting, 300 meters at 25 each with 5 % margin, gives 13.
    Never fewer than ceil(n / cap), so the plan is always feasible.
    """
    n = require_int("meter count", n, min=0)
    cap = check_cap(cap)
    margin = require_real("margin", margin, min=0.0)
    wanted = math.ceil(round(n * (1.0 + margin) / cap, NEEDED_DECIMALS))
    return max(wanted, -(-n // cap))


# plan(..., **BALANCED): the lower load bound, several starts and local swaps, each at
# its default for the area's size.
BALANCED: dict[str, object] = {"starts": None, "min_load": None, "max_load": None,
                               "swaps": True}


def plan(points: object, *, cap: int = DEFAULT_CAP, k: int | None = None,
         margin: float = DEFAULT_MARGIN, seed: int = 0, eps: float = 1.0,
         max_rounds: int = 100, starts: int | None = 1,
         min_load: int | None = 0, max_load: int | None = 0,
         swaps: bool = False) -> Plan:
    """Cluster the meters and site one terminal at each cluster's medoid (eq. 1-4).

    ``k`` defaults to ``terminals_needed(n, cap, margin)``, capped at n so the
    margin never asks for more terminals than meters. No terminal ever gets
    more than ``cap`` meters. The same ``seed`` gives the same plan.

    Duplicate coordinates are fine: ties are broken by index order (a
    medoid tie goes to the lowest meter index), so the plan is still
    deterministic, and with fewer distinct positions than terminals some
    terminals stay empty (see ``Plan``).

    A cluster that empties during the rounds has its centre re-seeded at the
    meter farthest from its own centre, as k-means does; when every meter sits
    on its centre there is nowhere better and the centre stays.

    ``starts`` seeded k-means++ starts are run (start 0 from ``seed`` itself,
    start i from ``[seed, i]``; None: ``default_starts(n)``) and the best by
    ``objective`` is kept. ``min_load`` is the lower load bound (None:
    ``default_min_load``; 0 for none, relaxed to n // k if higher), ``max_load``
    the upper one (None: ``default_max_load``; 0 for ``cap`` alone; never below
    ceil(n / k)). ``swaps``
    then polishes the kept plan (``polish``). The defaults are still the
    planner before balancing (one start, no bound, no swaps): ``**BALANCED``
    asks for the balanced plan, which is about 100x slower (0.5 s at 300
    meters, 12 s at 2000) and not yet what the CLI and the fleets use.
    """
    pts = as_points(points)
    n = len(pts)
    if n == 0:
        raise ValueError("no meters to plan")
    cap = check_cap(cap)
    if k is None:
        k = min(terminals_needed(n, cap, margin), n)
    k = require_int("k", k, min=1)
    if n < k:
        raise ValueError(f"fewer meters ({n}) than terminals ({k})")
    if k * cap < n:
        raise ValueError(f"infeasible: {k} terminals x cap {cap} = {k * cap} places "
                         f"for {n} meters; need k >= {-(-n // cap)}")
    eps, max_rounds = check_rounds(eps, max_rounds)
    seed = check_seed(seed)
    starts = default_starts(n) if starts is None else require_int("starts", starts, min=1)
    low = default_min_load(n, k) if min_load is None else require_int("min_load", min_load,
                                                                       min=0)
    if max_load is None:
        cap = default_max_load(n, k, cap)
    elif max_load:
        cap = min(cap, max(-(-n // k), require_int("max_load", max_load, min=1)))
    best: Plan | None = None
    best_score: tuple[float, float] | None = None
    for i in range(starts):
        rng = np.random.default_rng(seed if i == 0 else [seed, i])
        candidate = solve(pts, k, cap, rng, eps, max_rounds, low)
        score = objective(pts, candidate)
        if best_score is None or score < best_score:  # ties keep the earlier start
            best, best_score = candidate, score
    assert best is not None
    return polish(pts, best, cap, low) if swaps else best


def polish(pts: np.ndarray, p: Plan, cap: int, min_load: int,
           passes: int = SWAP_PASSES) -> Plan:
    """Local swaps: try each terminal at the few meters of its cluster nearest the centroid.

    A trial re-solves the bounded assignment of the meters of that cluster and
    its ``SWAP_NEIGHBOURS`` nearest clusters among those terminals (so meters
    move between neighbouring clusters; the rest stay put) and is kept only if
    the total distance drops. The sites then go to the medoids of the kept
    assignment, which can only lower it again; capacity and the lower bound hold
    throughout. Why: the rounds stop at a fixed point of assign-then-medoid, and
    a site move that first costs its own cluster can still win once the
    neighbours re-balance.
    """
    k = len(p.sites)
    sites = p.sites.copy()
    assign = p.assign.copy()
    changed = False
    for _ in range(passes):
        improved = False
        for c in range(k):
            order = np.sort(_neighbours(pts[sites], c))
            members = np.flatnonzero(np.isin(assign, order))
            local = np.searchsorted(order, assign[members])  # column of each one's terminal
            dist = distances(pts[members], pts[sites[order]])
            rows = np.arange(len(members))
            before = float(dist[rows, local].sum())
            col = int(np.flatnonzero(order == c)[0])
            for s in _swap_candidates(pts, assign, c, sites[c]):
                trial = dist.copy()
                trial[:, col] = np.linalg.norm(pts[members] - pts[s], axis=1)
                got, _ = _assign(trial, cap, min_load)
                total = float(trial[rows, got].sum())
                if total < before * (1.0 - SWAP_MIN_GAIN):
                    dist, local, before = trial, got, total
                    sites[c] = s
                    assign[members] = order[got]
                    improved = changed = True
        if not improved:
            break
    if not changed:
        return p
    medoids = cluster_medoids(pts, assign, k)
    sites = np.where(medoids >= 0, medoids, sites).astype(np.int64)
    centres = pts[sites]
    own = np.linalg.norm(pts - centres[assign], axis=1)
    nearest = distances(pts, centres).min(axis=1)
    return Plan(assign=assign, sites=sites, centres=centres, rounds=p.rounds,
                converged=p.converged, repair_moves=int((own > nearest).sum()),
                repair_cost_m=float((own - nearest).sum()))


def _neighbours(centres: np.ndarray, c: int) -> np.ndarray:
    """Terminal c and its ``SWAP_NEIGHBOURS`` nearest terminals (ties to the lower index)."""
    d = np.linalg.norm(centres - centres[c], axis=1)
    d[c] = -1.0
    return np.argsort(d, kind="stable")[:SWAP_NEIGHBOURS + 1]


def _swap_candidates(pts: np.ndarray, assign: np.ndarray, c: int, site: int) -> list[int]:
    """Up to ``SWAP_CANDIDATES`` members of cluster c nearest its centroid, not its site."""
    members = np.flatnonzero(assign == c)
    if len(members) == 0:
        return []
    d = np.linalg.norm(pts[members] - pts[members].mean(axis=0), axis=1)
    near = members[np.argsort(d, kind="stable")[:SWAP_CANDIDATES]]
    return [int(m) for m in near if m != site]


def _assign(dist: np.ndarray, cap: int, min_load: int) -> tuple[np.ndarray, Repair]:
    if min_load > 0:
        return assign_bounded(dist, cap, min_load)
    return assign_from_distances(dist, cap, np.zeros(dist.shape[1]))


def assign_to_sites(points: object, sites: object, cap: int = DEFAULT_CAP) -> np.ndarray:
    """The plan's objective with the sites fixed (the boxes stand where they stand):
    capacity hard, the lower bound ``default_min_load``, then least total distance.
    What an area re-plan assigns (tools/station_place.py)."""
    pts, ctr, cap = check_assignment(points, sites, cap, "site")
    n, k = len(pts), len(ctr)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    assign, _ = _assign(distances(pts, ctr), cap, default_min_load(n, k))
    return assign


def default_starts(n: int) -> int:
    """How many starts ``plan`` runs on n meters by default (see ``START_WORK``)."""
    return max(MIN_STARTS, min(MAX_STARTS, START_WORK // max(n, 1)))


def default_max_load(n: int, k: int, cap: int) -> int:
    """ceil(n / k) + ``MIN_LOAD_SLACK``, at most ``cap``: the upper end of the balanced band."""
    return min(cap, -(-n // k) + MIN_LOAD_SLACK)


def default_min_load(n: int, k: int) -> int:
    """floor(n / k) - ``MIN_LOAD_SLACK``, at least 0: the lower load bound ``plan`` uses."""
    return max(0, n // k - MIN_LOAD_SLACK)


def objective(pts: np.ndarray, p: Plan) -> tuple[float, float]:
    """What ``plan`` minimises over its starts: (mean meter-terminal distance, load variance).

    Compared as a tuple (lexicographic). Capacity and the lower load bound are
    constraints every start already meets, so they are not part of it.
    """
    d = np.linalg.norm(pts - p.centres[p.assign], axis=1)
    return float(d.mean()), float(loads(p.assign, len(p.sites)).var())


def check_seed(seed: object) -> int:
    """``seed`` as an int >= 0 (what numpy's seeding accepts), or a ValueError."""
    return require_int("seed", seed, min=0)


def check_rounds(eps: float, max_rounds: int) -> tuple[float, int]:
    """``eps`` (metres, eq. 4) finite and >= 0, ``max_rounds`` >= 1, or a ValueError."""
    return require_real("eps", eps, min=0.0), require_int("max_rounds", max_rounds, min=1)


def solve(pts: np.ndarray, k: int, cap: int, rng: np.random.Generator, eps: float,
          max_rounds: int, min_load: int = 0) -> Plan:
    """The rounds of ``plan`` from one k-means++ start on checked input: 1 <= k <= n <= k * cap.

    ``min_load`` > 0 adds the lower load bound of ``capacity.assign_bounded``.
    """
    sites = kmeans_pp(pts, k, rng)
    centres = pts[sites]
    prices: np.ndarray | None = None
    converged = False
    rounds = 0
    while rounds < max_rounds and not converged:
        rounds += 1
        # Step (3) with capacity: the exact capacitated nearest-centre assignment (eq. 1).
        if min_load > 0:
            assign, repair = assign_bounded(distances(pts, centres), cap, min_load, prices)
        else:
            assign, repair = assign_capacitated(pts, centres, cap, prices=prices)
        # Warm-start the next round with these prices (capacity.py), except after
        # the first: centres then jump from k-means++ seeds to medoids, and stale
        # prices measured 1.5-2x slower than none. The plan is the same either way.
        prices = repair.prices if rounds > 1 else None
        # Step (4): each centre to its cluster's medoid (eq. 3).
        medoids = cluster_medoids(pts, assign, k)
        empty = np.flatnonzero(medoids < 0)
        if len(empty):
            medoids[empty] = _reseed(pts, centres, assign, medoids, sites, empty)
        moved = np.linalg.norm(pts[medoids] - centres, axis=1)
        converged = bool(moved.max() <= eps)  # eq. 4: D(C_i, C'_i) <= eps for every i
        sites = medoids
        centres = pts[sites]
    return Plan(assign=assign, sites=sites.astype(np.int64), centres=centres, rounds=rounds,
                converged=converged, repair_moves=repair.moves, repair_cost_m=repair.cost_m)


def solve_quick(pts: np.ndarray, k: int, cap: int, rng: np.random.Generator, eps: float,
                lloyd_rounds: int = LLOYD_ROUNDS, exact_rounds: int = EXACT_ROUNDS,
                min_load: int = 0) -> Plan:
    """The tile schedule: k-means++, plain Lloyd rounds, then a few exact bounded rounds.

    Lloyd's rounds (centroids, no capacity) are a few numpy calls each and
    bring the centres near where ``solve``'s rounds would settle; the exact
    rounds (bounded assignment, then medoids) then start close and are only
    ``exact_rounds``. Capacity and the lower bound hold as in ``solve``. Why:
    on 300-meter tiles one exact round costs ~5 ms, so ten of them per tile
    put a province (3 000+ tiles a million meters) past what two cores do in
    seconds; the mean distance measured within 1 % of ``solve``'s (module
    ``tiling``'s figures).
    """
    sites = kmeans_pp(pts, k, rng)
    centres = lloyd(pts, pts[sites].copy(), lloyd_rounds, eps)
    prices: np.ndarray | None = None
    assign = np.zeros(len(pts), dtype=np.int64)
    repair = Repair(0, 0.0)
    moved = np.full(k, np.inf)
    for _ in range(exact_rounds):
        if min_load > 0:
            assign, repair = assign_bounded(distances(pts, centres), cap, min_load, prices)
        else:
            assign, repair = assign_capacitated(pts, centres, cap, prices=prices)
        prices = repair.prices
        medoids = cluster_medoids(pts, assign, k)
        empty = np.flatnonzero(medoids < 0)
        if len(empty):
            medoids[empty] = _reseed(pts, centres, assign, medoids, sites, empty)
        moved = np.linalg.norm(pts[medoids] - centres, axis=1)
        sites = medoids
        centres = pts[sites]
    return Plan(assign=assign, sites=sites.astype(np.int64), centres=centres,
                rounds=exact_rounds, converged=bool(moved.max() <= eps),
                repair_moves=repair.moves, repair_cost_m=repair.cost_m)


def lloyd(pts: np.ndarray, centres: np.ndarray, rounds: int, eps: float) -> np.ndarray:
    """Plain k-means rounds (nearest centre, then centroids) until no centre moves more
    than ``eps`` or ``rounds`` are done. A centre that loses all its meters stays put."""
    k = len(centres)
    for _ in range(rounds):
        assign = np.argmin(_sq_dists(pts, centres), axis=1)
        count = np.bincount(assign, minlength=k).astype(np.float64)
        new = centres.copy()
        held = count > 0
        for axis in (0, 1):
            new[held, axis] = (np.bincount(assign, pts[:, axis], minlength=k)[held]
                               / count[held])
        moved = float(np.sqrt(((new - centres) ** 2).sum(axis=1)).max())
        centres = new
        if moved <= eps:
            break
    return centres


def _sq_dists(pts: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(n, k) squared distances, |p|^2 - 2 p.c + |c|^2 (one matrix product, not n k pairs)."""
    out = pts @ (-2.0 * centres.T)
    out += np.einsum("ij,ij->i", pts, pts)[:, None]
    out += np.einsum("ij,ij->i", centres, centres)[None, :]
    return out


def kmeans_pp(pts: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct seed meters by k-means++: each next one drawn with probability ~ D^2.

    When every meter already sits on a chosen seed (duplicates), the lowest
    unchosen index is taken, so k distinct meters are always returned.
    """
    n = len(pts)
    chosen = np.zeros(n, dtype=bool)
    sites = np.empty(k, dtype=np.int64)
    first = int(rng.integers(n))
    sites[0] = first
    chosen[first] = True
    d2 = _sq_dist(pts, pts[first])
    for i in range(1, k):
        cum = np.cumsum(d2)
        total = float(cum[-1])
        if total > 0:
            pick = int(np.searchsorted(cum, rng.random() * total, side="right"))
            pick = min(pick, n - 1)
            if chosen[pick]:  # only at the float edge r * total == total
                pick = int(np.flatnonzero(d2 > 0)[-1])
        else:
            pick = int(np.argmin(chosen))  # lowest unchosen index
        sites[i] = pick
        chosen[pick] = True
        np.minimum(d2, _sq_dist(pts, pts[pick]), out=d2)
    return sites


def _sq_dist(pts: np.ndarray, c: np.ndarray) -> np.ndarray:
    d = pts - c
    return np.einsum("ij,ij->i", d, d)


def cluster_medoids(pts: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    """Medoid meter index of each of the k clusters (eq. 3), -1 for an empty cluster.

    The same answer as ``geometry.medoid_index`` on each cluster's members in
    index order (ties to the lowest index), computed for many small clusters
    at once; clusters too large for a block go through ``medoid_index``.
    Sums may differ from it in the last bits, so an exact tie in the reals
    that rounding splits can go either way.
    """
    n = len(pts)
    out = np.full(k, -1, dtype=np.int64)
    if n == 0:
        return out
    counts = loads(assign, k)
    order = np.argsort(assign, kind="stable")
    owner = assign[order]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    width = int(counts.max())
    if width * width > MEDOID_BLOCK_ENTRIES:
        for c in np.flatnonzero(counts).tolist():
            members = order[starts[c]:starts[c] + counts[c]]
            out[c] = members[medoid_index(pts[members])]
        return out
    table = np.full((k, width), -1, dtype=np.int64)
    table[owner, np.arange(n) - starts[owner]] = order
    step = max(1, MEDOID_BLOCK_ENTRIES // (width * width))
    for lo in range(0, k, step):
        block = table[lo:lo + step]
        valid = block >= 0
        xy = pts[np.where(valid, block, 0)]  # (c, m, 2)
        diff = xy[:, :, None, :] - xy[:, None, :, :]
        dist = np.sqrt(np.einsum("cijx,cijx->cij", diff, diff))
        dist *= valid[:, None, :]
        sums = dist.sum(axis=2)
        sums[~valid] = np.inf
        best = np.argmin(sums, axis=1)
        out[lo:lo + step] = np.where(valid[:, 0], block[np.arange(len(block)), best], -1)
    return out


def _reseed(pts: np.ndarray, centres: np.ndarray, assign: np.ndarray,
            medoids: np.ndarray, sites: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """New sites for empty clusters: the meters farthest from their own centre.

    A meter on its own centre (distance 0) is no better place than where the
    empty centre is, so such a cluster keeps its old site.
    """
    far = np.linalg.norm(pts - centres[assign], axis=1)
    far[medoids[medoids >= 0]] = 0.0
    order = np.argsort(-far, kind="stable")[:len(empty)]
    new = sites[empty].copy()
    usable = far[order] > 0
    new[:int(usable.sum())] = order[usable]
    return new

