"""The scale path: k-d tiles planned independently, renumbered and merged.

What must survive tiling: the hard capacity bound, one terminal per meter,
terminals that never reach across a tile border, determinism for a seed, and
the same answer whichever way the tiles are mapped (in order, out of order,
in another process).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.placement.metrics import loads
from agent.placement.plan import (
    cluster_medoids,
    default_max_load,
    default_min_load,
    terminals_needed,
)
from agent.placement.tiling import TileJob, plan_tile, plan_tiled, split_tiles, tile_terminals

EMULATED = bool(os.environ.get("EDGEKEY_EMULATED"))

# The example size; a quarter under qemu-user, which runs numpy ~13x slower.
TILED_METERS = 5_000 if EMULATED else 20_000
TILE = 1_000
CAP = 25
# Meters for the tests that plan several times over; smaller under emulation.
SMALL = 1_500 if EMULATED else 3_000


def uniform(n: int, seed: int = 0) -> np.ndarray:
    """n meters at the paper's density (300 per 3.5 km x 4 km)."""
    side = math.sqrt(n / 300 * 3500.0 * 4000.0)
    return np.random.default_rng(seed).random((n, 2)) * side


def clustered(n: int, seed: int = 0) -> np.ndarray:
    """Villages: dense blobs of very different sizes, plus a few isolated meters."""
    rng = np.random.default_rng(seed)
    centres = rng.random((12, 2)) * 20_000
    weights = rng.pareto(1.5, 12) + 0.1
    which = rng.choice(12, n, p=weights / weights.sum())
    pts = centres[which] + rng.normal(0, 150, (n, 2))
    pts[: n // 50] = rng.random((n // 50, 2)) * 20_000
    return pts


@pytest.fixture(scope="module")
def tiled() -> tuple[np.ndarray, object, list[np.ndarray]]:
    pts = uniform(TILED_METERS)
    return pts, plan_tiled(pts, tile_meters=TILE, seed=3), split_tiles(pts, TILE)


# --- split_tiles ----------------------------------------------------------------------

@given(st.integers(1, 3000), st.integers(1, 700), st.integers(0, 2**32 - 1),
       st.sampled_from([None, 0, 5]))
def test_tiles_cover_every_meter_once_and_stay_within_size(n: int, tile: int, seed: int,
                                                           grid: int | None) -> None:
    rng = np.random.default_rng(seed)
    pts = rng.random((n, 2)) * 1e4 if grid is None else rng.integers(0, grid + 1, (n, 2))
    tiles = split_tiles(pts, tile)
    sizes = [len(t) for t in tiles]
    assert np.array_equal(np.sort(np.concatenate(tiles)), np.arange(n))
    assert max(sizes) <= tile
    if n > tile:
        assert min(sizes) >= (tile + 1) // 2  # a median cut halves a piece of > tile meters


def test_tiles_are_cut_at_medians_so_their_boxes_do_not_overlap() -> None:
    pts = uniform(4000, seed=1)
    boxes = [(pts[t].min(axis=0), pts[t].max(axis=0)) for t in split_tiles(pts, 500)]
    for i, (lo_a, hi_a) in enumerate(boxes):
        for lo_b, hi_b in boxes[i + 1:]:
            overlap = np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b)
            assert (overlap <= 0).any()  # separated along at least one axis


def test_split_tiles_is_deterministic() -> None:
    pts = clustered(5000)
    a, b = split_tiles(pts, 300), split_tiles(pts.copy(), 300)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# --- plan_tiled -----------------------------------------------------------------------

def test_tiled_plan_never_exceeds_capacity(tiled: tuple) -> None:
    pts, p, _ = tiled
    assert p.assign.shape == (len(pts),)
    load = loads(p.assign, len(p.sites))
    assert load.max() <= CAP
    assert load.sum() == len(pts)


def test_tiled_plan_keeps_each_terminal_inside_its_tile(tiled: tuple) -> None:
    pts, p, tiles = tiled
    tile_of_meter = np.empty(len(pts), dtype=np.int64)
    for i, idx in enumerate(tiles):
        tile_of_meter[idx] = i
    assert np.array_equal(p.tile[p.assign], tile_of_meter)  # every meter's terminal
    assert np.array_equal(p.tile, tile_of_meter[p.sites])  # every terminal's site
    # the whole area's terminal count, shared among the tiles (none needs more here)
    assert len(p.sites) == terminals_needed(len(pts))
    assert len(p.sites) == sum(tile_terminals([len(t) for t in tiles], len(p.sites), CAP))


def test_every_tile_keeps_the_balance_band(tiled: tuple) -> None:
    _pts, p, tiles = tiled
    load = loads(p.assign, len(p.sites))
    for i, idx in enumerate(tiles):
        mine = np.flatnonzero(p.tile == i)
        assert load[mine].sum() == len(idx)
        assert load[mine].min() >= default_min_load(len(idx), len(mine))
        assert load[mine].max() <= default_max_load(len(idx), len(mine), CAP)


@given(st.lists(st.integers(1, 2000), min_size=1, max_size=40), st.integers(1, 40),
       st.floats(0.0, 0.3))
def test_tile_terminals_share_the_count_within_each_tiles_bounds(sizes: list[int], cap: int,
                                                                 spare: float) -> None:
    n = sum(sizes)
    least = sum(-(-m // cap) for m in sizes)
    total = min(n, max(-(-n // cap), int(n * (1 + spare) / cap)))
    ks = tile_terminals(sizes, total, cap)
    assert all(-(-m // cap) <= k <= m for m, k in zip(sizes, ks, strict=True))
    assert sum(ks) == max(total, least)
    if total >= least:  # proportional: no tile two terminals off its share when floors allow
        for m, k in zip(sizes, ks, strict=True):
            assert k <= max(-(-m // cap), m * total / n + 1)
    assert tile_terminals(sizes, total, cap) == ks  # deterministic


def test_tiled_plan_sites_are_the_medoids_of_their_clusters(tiled: tuple) -> None:
    pts, p, _ = tiled
    assert np.array_equal(p.centres, pts[p.sites])
    medoids = cluster_medoids(pts, p.assign, len(p.sites))
    assert np.array_equal(medoids, p.sites)


def test_tiled_plan_reports_progress_once_per_tile() -> None:
    pts = uniform(SMALL)
    calls: list[tuple[int, int]] = []
    plan_tiled(pts, tile_meters=500, progress=lambda done, total: calls.append((done, total)))
    total = len(split_tiles(pts, 500))
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_tiled_plan_is_the_same_for_the_same_seed_and_any_tile_mapping() -> None:
    pts = clustered(SMALL, seed=2)
    a = plan_tiled(pts, tile_meters=400, seed=9)
    b = plan_tiled(pts, tile_meters=400, seed=9)

    def backwards(fn, jobs):  # plans the tiles last to first, yields them in order
        return reversed([fn(job) for job in reversed(list(jobs))])

    c = plan_tiled(pts, tile_meters=400, seed=9, map_tiles=backwards)
    for other in (b, c):
        assert np.array_equal(a.assign, other.assign)
        assert np.array_equal(a.sites, other.sites)
    d = plan_tiled(pts, tile_meters=400, seed=10)
    assert not np.array_equal(a.sites, d.sites)


def test_a_tile_job_does_not_depend_on_the_other_tiles() -> None:
    pts = uniform(600)
    job = TileJob(index=4, points=pts, k=terminals_needed(600), cap=CAP, seed=1, eps=1.0,
                  max_rounds=50)
    first, again = plan_tile(job), plan_tile(job)
    assert np.array_equal(first.assign, again.assign)


def test_clustered_meters_still_respect_capacity() -> None:
    pts = clustered(SMALL, seed=5)
    p = plan_tiled(pts, tile_meters=800)
    assert loads(p.assign, len(p.sites)).max() <= CAP


def test_a_small_input_is_one_tile_planned_like_plan() -> None:
    pts = uniform(200)
    p = plan_tiled(pts)
    assert p.tile is not None and set(p.tile.tolist()) == {0}
    assert len(p.sites) == terminals_needed(200)


def test_a_failing_map_that_drops_tiles_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="tile plans"):
        plan_tiled(uniform(1000), tile_meters=300,
                   map_tiles=lambda fn, jobs: [fn(next(iter(jobs)))])


@pytest.mark.parametrize(("points", "kwargs", "match"), [
    (np.zeros((0, 2)), {}, "no meters"),
    ([[0.0, math.nan]], {}, "not finite"),
    ([[0.0, 0.0]], {"cap": 0}, "cap"),
    ([[0.0, 0.0]], {"tile_meters": 0}, "tile_meters"),
    ([[0.0, 0.0]], {"tile_meters": 1.5}, "tile_meters"),
    ([[0.0, 0.0]], {"seed": -2}, "seed"),
    ([[0.0, 0.0]], {"margin": -1.0}, "margin"),
    ([[0.0, 0.0]], {"max_rounds": 0}, "max_rounds"),
])
def test_plan_tiled_rejects_bad_input(points: object, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_tiled(points, **kwargs)
