"""The paper's comparison schemes: grid cells and Voronoi cells, each sited at its medoid.

The grid scheme needs numpy only and runs under emulated ARM; Voronoi
(scipy), KMeans (scikit-learn) and FasterPAM (kmedoids) are host_only and
imported inside the tests through the module's own lazy imports.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tools.placement_baselines import grid_origin, grid_scheme, voronoi_scheme


def _brute_medoid(pts: np.ndarray) -> int:
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(axis=2))
    return int(np.argmin(d.sum(axis=1)))


def _check_sites_are_cell_medoids(pts: np.ndarray, assign: np.ndarray,
                                  sites: np.ndarray) -> None:
    for t, s in enumerate(sites):
        members = np.flatnonzero(assign == t)
        assert len(members) > 0, "a terminal without meters"
        assert s == members[_brute_medoid(pts[members])]


def _uniform(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 2)) * (3500.0, 4000.0)


# ---------------------------------------------------------------- grid (numpy only)


def test_grid_puts_meters_in_1km_cells_and_sites_each_at_its_medoid() -> None:
    pts = np.array([[100.0, 100.0], [900.0, 200.0], [500.0, 600.0],  # cell (0, 0)
                    [1500.0, 100.0],  # cell (1, 0)
                    [200.0, 3999.0], [300.0, 3100.0]])  # cell (0, 3)
    lay = grid_scheme(pts, cell_m=1000.0, origin=(0.0, 0.0))
    assert lay.terminals == 3
    assert lay.assign.tolist() == [0, 0, 0, 1, 2, 2]  # row-major: row 0 then row 3
    assert lay.sites.tolist() == [2, 3, 4]  # medoid; tie in cell (0, 3) to the lower index
    assert np.array_equal(lay.centres, pts[lay.sites])


def test_grid_cells_are_half_open_on_their_upper_edges() -> None:
    pts = np.array([[0.0, 0.0], [999.999, 10.0], [1000.0, 10.0]])
    assert grid_scheme(pts, cell_m=1000.0, origin=(0.0, 0.0)).assign.tolist() == [0, 0, 1]


def test_grid_cell_size_is_a_parameter() -> None:
    pts = _uniform(300, 1)
    count = {c: grid_scheme(pts, cell_m=c, origin=(0.0, 0.0)).terminals
             for c in (500.0, 1000.0, 2000.0)}
    assert count == {500.0: 56, 1000.0: 16, 2000.0: 4}  # 7x8, 4x4, 2x2 cells, all occupied


def test_grid_origin_defaults_to_whole_cells_below_the_meters() -> None:
    pts = np.array([[351_234.0, 3_350_960.0], [352_900.0, 3_351_100.0]])
    assert grid_origin(pts, 1000.0) == (351_000.0, 3_350_000.0)
    assert grid_scheme(pts).origin == (351_000.0, 3_350_000.0)


def test_empty_grid_cells_get_no_terminal() -> None:
    pts = np.array([[10.0, 10.0], [3900.0, 3900.0]])
    lay = grid_scheme(pts, origin=(0.0, 0.0))
    assert lay.terminals == 2 and lay.assign.tolist() == [0, 1]


@pytest.mark.parametrize("kw,why", [({"cell_m": 0.0}, "positive"), ({"cell_m": float("nan")},
                                    "positive"), ({"origin": (50.0, 0.0)}, "origin")])
def test_grid_refuses_bad_cells_and_origins(kw: dict, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        grid_scheme(np.array([[10.0, 10.0], [20.0, 20.0]]), **kw)


def test_grid_refuses_non_finite_points() -> None:
    with pytest.raises(ValueError, match="not finite"):
        grid_scheme(np.array([[1.0, 2.0], [np.nan, 1.0]]))


@given(st.lists(st.tuples(st.floats(0, 5000), st.floats(0, 5000)), min_size=1, max_size=40),
       st.sampled_from([250.0, 1000.0, 3000.0]))
def test_grid_assigns_every_meter_once_to_its_own_cell(raw: list, cell: float) -> None:
    pts = np.array(raw)
    lay = grid_scheme(pts, cell_m=cell, origin=(0.0, 0.0))
    assert lay.assign.shape == (len(pts),) and set(lay.assign.tolist()) == set(range(lay.terminals))
    cells = np.floor(pts / cell)
    for t in range(lay.terminals):  # one cell per terminal, one terminal per cell
        assert len(np.unique(cells[lay.assign == t], axis=0)) == 1
    assert len(np.unique(cells, axis=0)) == lay.terminals
    _check_sites_are_cell_medoids(pts, lay.assign, lay.sites)


# ---------------------------------------------------------------- Voronoi (scipy)


@pytest.mark.host_only
def test_voronoi_one_round_partitions_by_nearest_random_generator() -> None:
    pytest.importorskip("scipy")
    pts = _uniform(300, 2)
    lay = voronoi_scheme(pts, 13, seed=5, rounds=1)
    gens = lay.generators
    assert gens is not None and gens.shape == (13, 2)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    assert ((gens >= lo) & (gens <= hi)).all()  # drawn inside the meters' bounding box
    expected = np.random.default_rng(5).random((13, 2)) * (hi - lo) + lo
    assert np.array_equal(gens, expected)  # the documented draw
    nearest = np.argmin(((pts[:, None] - gens[None]) ** 2).sum(axis=2), axis=1)
    _, relabelled = np.unique(nearest, return_inverse=True)
    assert np.array_equal(lay.assign, relabelled.reshape(-1))
    _check_sites_are_cell_medoids(pts, lay.assign, lay.sites)


@pytest.mark.host_only
def test_voronoi_iterates_until_the_medoids_generate_their_own_cells() -> None:
    pytest.importorskip("scipy")
    pts = _uniform(300, 3)
    lay = voronoi_scheme(pts, 13, seed=0)
    assert 1 < lay.rounds < 100
    assert lay.generators is not None and np.array_equal(lay.generators, lay.centres)
    d = ((pts[:, None] - lay.centres[None]) ** 2).sum(axis=2)
    assert np.array_equal(lay.assign, np.argmin(d, axis=1))  # fixed point of the iteration
    _check_sites_are_cell_medoids(pts, lay.assign, lay.sites)


@pytest.mark.host_only
def test_voronoi_is_deterministic_per_seed_and_varies_with_it() -> None:
    pytest.importorskip("scipy")
    pts = _uniform(200, 4)
    a, b, c = (voronoi_scheme(pts, 9, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.assign, b.assign) and np.array_equal(a.sites, b.sites)
    assert not np.array_equal(a.generators, c.generators)


@pytest.mark.host_only
def test_voronoi_ties_go_to_the_lower_generator_and_empty_cells_get_no_terminal() -> None:
    pytest.importorskip("scipy")
    from tools.placement_baselines import _nearest

    gens = np.array([[0.0, 0.0], [2.0, 0.0], [100.0, 100.0]])
    pts = np.array([[1.0, 0.0], [1.0, 5.0], [-1.0, 0.0]])  # all equidistant from 0 and 1
    assert _nearest(pts, gens).tolist() == [0, 0, 0]
    lay = voronoi_scheme(np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 1.0], [100.0, 100.0]]), 4,
                         seed=0, rounds=1)
    assert lay.terminals <= 4 and np.bincount(lay.assign).min() >= 1


@pytest.mark.host_only
@pytest.mark.parametrize("k,why", [(0, "at least one"), (5, "only 4 meters")])
def test_voronoi_refuses_impossible_terminal_counts(k: int, why: str) -> None:
    pytest.importorskip("scipy")
    with pytest.raises(ValueError, match=why):
        voronoi_scheme(_uniform(4, 0), k)


# ---------------------------------------------------------------- library anchors


@pytest.mark.host_only
def test_kmeans_and_fasterpam_give_k_clusters_without_capacity() -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("kmedoids")
    from agent.placement.metrics import plan_metrics
    from tools.placement_baselines import fasterpam_layout, kmeans_layout

    # Two villages of 40 and 10 meters: 2 clusters of any centre-based method are
    # the villages, so a 25-meter cap is broken by the big one.
    rng = np.random.default_rng(0)
    pts = np.vstack([rng.normal((0, 0), 50, (40, 2)), rng.normal((3000, 3000), 50, (10, 2))])
    for lay in (kmeans_layout(pts, 2, seed=0), fasterpam_layout(pts, 2, seed=0)):
        m = plan_metrics(pts, lay.assign, lay.centres, cap=25)
        assert sorted(np.bincount(lay.assign).tolist()) == [10, 40]
        assert m.capacity_violations == 1
    pam = fasterpam_layout(pts, 2, seed=0)
    assert pam.sites is not None and np.array_equal(pam.centres, pts[pam.sites])
    _check_sites_are_cell_medoids(pts, pam.assign, pam.sites)
