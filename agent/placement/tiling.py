"""The scale path: plan a province tile by tile (issue 4, item 6).

``plan.plan`` holds an n x k distance matrix, which for 10^6 meters and
42 000 terminals is 336 GB. Here the plane is cut by recursive median splits
along the longer side of each piece's bounding box (a k-d tree) until every
tile has at most ``tile_meters`` meters; the area's terminal count is shared
among the tiles in proportion to their meters (``tile_terminals``), each tile
is planned on its own (``plan.solve_quick``: Lloyd's rounds, then exact rounds
with the capacity and the lower load bound), and the results are renumbered
and merged.

Why this keeps the guarantees: every tile plan respects the capacity bound,
and no terminal serves meters of two tiles, so the merged plan does too.
Memory: the input, a permutation and the output (three n-sized arrays), the
split's temporaries (at most about two more at the first cut), and one
tile's working set (about tile_meters x tile_meters / cap floats).
What it costs: clusters cannot cross tile borders, and a tile whose share of
terminals is below ceil(m / cap) gets that many, so a tiled plan may use a
few more terminals than one plan over the whole area would (none on even
densities).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from agent.placement.capacity import check_cap
from agent.placement.geometry import as_points
from agent.placement.plan import (
    DEFAULT_CAP,
    DEFAULT_MARGIN,
    LLOYD_ROUNDS,
    Plan,
    check_rounds,
    check_seed,
    default_max_load,
    default_min_load,
    solve_quick,
    terminals_needed,
)
from hal.require import require_int

# Meters per tile (tiles end up with 250-500). Work per meter grows with the tile
# (the exact assignment's shortest paths run over all of a tile's terminals); with
# the terminal count shared among tiles (tile_terminals) small tiles cost no extra
# terminals, only clusters cut at tile borders. Uniform 10^5 meters, one desk core:
# 500 -> 3.2 s, 394 m mean distance; 1000 -> 4.7 s, 393 m; 2000 -> 8.3 s.
DEFAULT_TILE_METERS = 500


@dataclass(frozen=True)
class TileJob:
    """One tile's planning problem: picklable, so a caller may hand it to a process pool."""

    index: int
    points: np.ndarray  # (m, 2) the tile's meters
    k: int
    cap: int
    seed: int
    eps: float
    max_rounds: int


def plan_tile(job: TileJob) -> Plan:
    """Plan one tile. The seed is derived from the plan's seed and the tile index,
    so the result does not depend on which tiles were planned before or where."""
    rng = np.random.default_rng([job.seed, job.index])
    m = len(job.points)
    low, high = default_min_load(m, job.k), default_max_load(m, job.k, job.cap)
    return solve_quick(job.points, job.k, high, rng, job.eps,
                       lloyd_rounds=min(LLOYD_ROUNDS, job.max_rounds), min_load=low)


def split_tiles(points: object, tile_meters: int = DEFAULT_TILE_METERS) -> list[np.ndarray]:
    """Index arrays of the tiles: recursive median splits along the longer side.

    Each piece with more than ``tile_meters`` meters is cut at the median of
    its longer bounding-box side into halves of floor(m/2) and ceil(m/2)
    meters, so tiles end up with between about tile_meters / 2 and
    tile_meters meters. Tiles come in k-d order (left or lower half first)
    and are views into one permutation of range(n). Deterministic:
    ``argpartition``'s introselect has no randomness.
    """
    pts = as_points(points)
    tile_meters = require_int("tile_meters", tile_meters, min=1)
    n = len(pts)
    perm = np.arange(n, dtype=np.int64)
    tiles: list[np.ndarray] = []
    stack = [(0, n)]
    while stack:
        lo, hi = stack.pop()
        if hi - lo <= tile_meters:
            if hi > lo:
                tiles.append(perm[lo:hi])
            continue
        seg = perm[lo:hi]
        xs = pts[seg, 0]
        x_extent = float(xs.max() - xs.min())
        ys = pts[seg, 1]
        y_extent = float(ys.max() - ys.min())
        along = xs if x_extent >= y_extent else ys
        del xs, ys
        half = (hi - lo) // 2
        order = np.argpartition(along, half)
        del along
        perm[lo:hi] = seg[order]
        del order
        mid = lo + half
        stack.append((mid, hi))  # popped second: the upper half follows the lower one
        stack.append((lo, mid))
    return tiles


def tile_terminals(sizes: list[int], total: int, cap: int) -> list[int]:
    """``total`` terminals shared among tiles of ``sizes`` meters in proportion (largest
    remainder, ties to the lower tile), each tile at least ceil(m / cap) and at most m;
    more than ``total`` only when those floors add up to more.

    Why: each tile rounding its own ``terminals_needed`` up put 3-4 % more terminals
    on a province than one plan over it; shared this way the count is the whole
    area's, more only where a tile's capacity needs it.
    """
    n = sum(sizes)
    share = [m * total / n for m in sizes]
    ks = [min(m, max(-(-m // cap), int(x))) for m, x in zip(sizes, share, strict=True)]
    least = [-(-m // cap) for m in sizes]
    left = total - sum(ks)
    if left > 0:  # the largest remainders get one more
        order = sorted(range(len(sizes)), key=lambda i: (ks[i] - share[i], i))
        for i in order:
            if left == 0:
                break
            if ks[i] < sizes[i]:
                ks[i] += 1
                left -= 1
    elif left < 0:  # capacity floors took more: the tiles most above their share give back
        order = sorted(range(len(sizes)), key=lambda i: (share[i] - ks[i], i))
        for i in order:
            if left == 0:
                break
            if ks[i] > least[i]:
                ks[i] -= 1
                left += 1
    return ks


def plan_tiled(points: object, *, cap: int = DEFAULT_CAP, margin: float = DEFAULT_MARGIN,
               seed: int = 0, k: int | None = None, eps: float = 1.0, max_rounds: int = 100,
               tile_meters: int = DEFAULT_TILE_METERS,
               progress: Callable[[int, int], None] | None = None,
               map_tiles: Callable[[Callable[[TileJob], Plan], Iterable[TileJob]],
                                   Iterable[Plan]] | None = None) -> Plan:
    """Plan any number of meters tile by tile (see the module docstring).

    The area gets ``k`` terminals (default ``terminals_needed(n, cap, margin)``),
    shared among tiles by ``tile_terminals``; each tile gets the plan of
    ``plan.solve_quick`` (k-means++ seeds, Lloyd, then capacitated assignment
    with the lower load bound and medoid siting, eq. 1-4), at most
    ``max_rounds`` Lloyd rounds; terminals are numbered tile after tile. No terminal
    ever gets more than ``cap`` meters. ``rounds`` is the most any tile
    needed, ``converged`` whether all tiles converged, and the repair
    figures are totals. ``tile[i]`` is terminal i's tile, in the order of
    ``split_tiles``.

    ``progress(done, total)`` is called after each tile. ``map_tiles`` runs
    ``plan_tile`` over the jobs and yields plans in job order, like the
    built-in ``map`` (the default); a desk tool may pass a process pool's
    ``imap`` to use every core. This module starts no processes itself.
    """
    pts = as_points(points)
    n = len(pts)
    if n == 0:
        raise ValueError("no meters to plan")
    cap = check_cap(cap)
    terminals_needed(0, cap, margin)  # raises on a bad margin before any work
    eps, max_rounds = check_rounds(eps, max_rounds)
    seed = check_seed(seed)
    tiles = split_tiles(pts, tile_meters)
    total = len(tiles)
    if k is None:
        k = min(terminals_needed(n, cap, margin), n)
    k = require_int("k", k, min=1)
    if k > n or k * cap < n:
        raise ValueError(f"{k} terminals for {n} meters at cap {cap}: need "
                         f"{-(-n // cap)} <= k <= {n}")
    ks = tile_terminals([len(t) for t in tiles], k, cap)

    def jobs() -> Iterator[TileJob]:
        for i, idx in enumerate(tiles):
            yield TileJob(index=i, points=pts[idx], k=ks[i], cap=cap, seed=seed, eps=eps,
                          max_rounds=max_rounds)

    runner = map if map_tiles is None else map_tiles
    k_total = sum(ks)
    assign = np.empty(n, dtype=np.int64)
    sites = np.empty(k_total, dtype=np.int64)
    tile_of = np.repeat(np.arange(total, dtype=np.int64), ks)
    offset = 0
    rounds, converged, moves, cost = 0, True, 0, 0.0
    done = 0
    for i, part in enumerate(runner(plan_tile, jobs())):
        idx, k = tiles[i], ks[i]
        assign[idx] = part.assign + offset
        sites[offset:offset + k] = idx[part.sites]
        offset += k
        rounds = max(rounds, part.rounds)
        converged = converged and part.converged
        moves += part.repair_moves
        cost += part.repair_cost_m
        done += 1
        if progress is not None:
            progress(done, total)
    if done != total:
        raise RuntimeError(f"map_tiles returned {done} tile plans for {total} tiles")
    return Plan(assign=assign, sites=sites, centres=pts[sites], rounds=rounds,
                converged=converged, repair_moves=moves, repair_cost_m=cost, tile=tile_of)
