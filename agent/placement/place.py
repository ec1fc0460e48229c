"""The one planner entry: what ``edgekey plan``, the benchmarks and the fleet tools call.

Up to ``TILED_ABOVE`` meters the whole area is one balanced ``plan``; above
it, ``tiling.plan_tiled`` plans tiles of at most ``tile_meters`` meters each
with the same objective. Why one entry: the thresholds and round limits a
benchmark measures are then the ones the command line runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from agent.placement.geometry import as_points
from agent.placement.plan import BALANCED, DEFAULT_CAP, DEFAULT_MARGIN, Plan, plan
from agent.placement.tiling import DEFAULT_TILE_METERS, TileJob, plan_tiled

# Above this many meters the whole-area planner gives way to tiles: plan() holds an
# n x k matrix (k ~ n / 24) and its exact assignment grows faster still. Uniform
# meters, one desk core, whole area vs tiles: 2000 -> 2.6 s vs 0.08 s (mean distance
# 373 vs 394 m); 4000 -> 8.9 s vs 0.15 s (376 vs 388 m); 5000 -> 18 s vs 0.15 s.
TILED_ABOVE = 2_000
# Rounds of assign + medoid, for the whole-area plan and for every tile.
MAX_ROUNDS = 100

MapTiles = Callable[[Callable[[TileJob], Plan], Iterable[TileJob]], Iterable[Plan]]


def is_tiled(n: int, tiled_above: int = TILED_ABOVE) -> bool:
    """Whether ``place`` plans n meters tile by tile."""
    return n > tiled_above


def place(points: object, *, cap: int = DEFAULT_CAP, margin: float = DEFAULT_MARGIN,
          seed: int = 0, k: int | None = None, eps: float = 1.0,
          max_rounds: int = MAX_ROUNDS, tiled_above: int = TILED_ABOVE,
          tile_meters: int = DEFAULT_TILE_METERS,
          progress: Callable[[int, int], None] | None = None,
          map_tiles: MapTiles | None = None) -> Plan:
    """The balanced plan of ``points`` (see ``plan``'s objective), tiled above ``tiled_above``.

    ``k`` forces the terminal count (tiles share it in proportion to their
    meters; default ``terminals_needed``). ``progress`` and
    ``map_tiles`` are ``plan_tiled``'s (ignored for a whole-area plan).
    """
    pts = as_points(points)
    if is_tiled(len(pts), tiled_above):
        return plan_tiled(pts, cap=cap, margin=margin, seed=seed, k=k, eps=eps,
                          max_rounds=max_rounds, tile_meters=tile_meters,
                          progress=progress, map_tiles=map_tiles)
    return plan(pts, cap=cap, k=k, margin=margin, seed=seed, eps=eps, max_rounds=max_rounds,
                **BALANCED)  # type: ignore[arg-type]
