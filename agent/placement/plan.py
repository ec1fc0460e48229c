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

Memory is O(n k) (the distance matrix of one round): this is for a single
area of up to a few thousand meters; ``tiling.plan_tiled`` is the scale path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.placement.capacity import assign_capacitated, check_cap
from agent.placement.geometry import as_points, medoid_index
from agent.placement.metrics import loads
from hal.require import require_int, require_real

# The paper: at most 25 meters per terminal, "with some margin" (section 2.1).
DEFAULT_CAP = 25
DEFAULT_MARGIN = 0.05

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


def plan(points: object, *, cap: int = DEFAULT_CAP, k: int | None = None,
         margin: float = DEFAULT_MARGIN, seed: int = 0, eps: float = 1.0,
         max_rounds: int = 100) -> Plan:
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
    return solve(pts, k, cap, np.random.default_rng(check_seed(seed)), eps, max_rounds)


def check_seed(seed: object) -> int:
    """``seed`` as an int >= 0 (what numpy's seeding accepts), or a ValueError."""
    return require_int("seed", seed, min=0)


def check_rounds(eps: float, max_rounds: int) -> tuple[float, int]:
    """``eps`` (metres, eq. 4) finite and >= 0, ``max_rounds`` >= 1, or a ValueError."""
    return require_real("eps", eps, min=0.0), require_int("max_rounds", max_rounds, min=1)


def solve(pts: np.ndarray, k: int, cap: int, rng: np.random.Generator, eps: float,
          max_rounds: int) -> Plan:
    """The rounds of ``plan`` on checked input: 1 <= k <= n <= k * cap."""
    sites = kmeans_pp(pts, k, rng)
    centres = pts[sites]
    prices: np.ndarray | None = None
    converged = False
    rounds = 0
    while rounds < max_rounds and not converged:
        rounds += 1
        # Step (3) with capacity: the exact capacitated nearest-centre assignment (eq. 1).
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

