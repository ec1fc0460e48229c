"""The paper's comparison schemes (section 3.1) and two library anchors, on the planner's data.

Every scheme sites a terminal at the graph medoid of its meters (eq. 3),
as the paper does, so the schemes differ only in how they partition:

- scheme 2, ``voronoi_scheme``: the Voronoi cells of N randomly drawn
  generators (the paper's step (1), N = our terminal count);
- scheme 3, ``grid_scheme``: square cells of a fixed side (the paper's 1 km);
- anchors: scikit-learn ``KMeans`` (sites at the centroids it returns) and
  FasterPAM from ``kmedoids`` (sites at its medoids). Neither knows the
  capacity bound; their capacity violations are reported, not repaired.

Terminals are numbered 0..k-1; a cell with no meters gets no terminal.
scipy, scikit-learn and kmedoids are imported inside the functions that use
them, so the grid scheme runs on numpy alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from agent.placement.geometry import as_points, distances
from agent.placement.metrics import loads
from agent.placement.plan import cluster_medoids
from hal.require import require_int

# FasterPAM takes a full n x n dissimilarity matrix: 8 n^2 bytes, 200 MB at 5000.
FASTERPAM_MAX_METERS = 5000
# Lloyd's KMeans costs n k per iteration with k ~ n / 24: 1.7e7 at 20 000 meters.
KMEANS_MAX_METERS = 20_000
# The paper's schemes 2 and 3 (``edgekey plan`` skips both above this). Measured on a
# 2-core x86 desk, uniform meters at the paper's density: Voronoi takes 5.3 s at 10^5
# (17 rounds) and 43 s and 210 MiB at 10^6, as its rounds grow with n; the grid takes
# 0.2 s at 10^5 there, but its medoids cost the square of the meters per cell, so in
# the paper's 3.5 km x 4 km area it takes 4.6 s at 10^5 and 47 s at 3 x 10^5 meters.
BASELINE_MAX_METERS = 100_000


@dataclass(frozen=True)
class Layout:
    """One scheme's answer: who serves each meter and where each terminal stands."""

    scheme: str
    assign: np.ndarray  # (n,) int64: meter i's terminal
    centres: np.ndarray  # (k, 2) terminal positions, metres
    sites: np.ndarray | None  # (k,) int64 meter index of each site; None if not a meter (KMeans)
    generators: np.ndarray | None = None  # Voronoi: generators of the final partition's cells
    cell_m: float | None = None  # grid: cell side
    origin: tuple[float, float] | None = None  # grid: corner of cell (0, 0)
    rounds: int = 1

    @property
    def terminals(self) -> int:
        return len(self.centres)


def _medoid_sites(pts: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel non-empty groups 0..k-1 (in label order) and find each group's medoid (eq. 3)."""
    used, assign = np.unique(labels, return_inverse=True)
    assign = assign.reshape(-1).astype(np.intp)
    k = len(used)
    # The planner's batched medoids (ties to the lowest index, as medoid_index) pad every
    # group to the largest one; grouping by size (powers of two) keeps the padding under 4x
    # when a few cells are much fuller than the rest.
    size = loads(assign, k)
    bucket = np.ceil(np.log2(np.maximum(size, 1))).astype(np.intp)
    sites = np.empty(k, dtype=np.int64)
    for b in np.unique(bucket):
        groups = np.flatnonzero(bucket == b)
        local = np.full(k, -1, dtype=np.intp)
        local[groups] = np.arange(len(groups))
        members = np.flatnonzero(local[assign] >= 0)  # ascending, so ties keep their order
        found = cluster_medoids(pts[members], local[assign[members]], len(groups))
        sites[groups] = members[found]
    return assign.astype(np.int64), sites


def _check_k(n: int, k: int) -> None:
    if k < 1:
        raise ValueError(f"need at least one terminal, got {k}")
    if k > n:
        raise ValueError(f"{k} terminals but only {n} meters")


def _nearest(pts: np.ndarray, gens: np.ndarray) -> np.ndarray:
    """Index of each point's Voronoi cell: its nearest generator, ties to the lower index."""
    from scipy.spatial import cKDTree

    k = min(2, len(gens))
    d, i = cKDTree(gens).query(pts, k=k)
    if k == 1:
        return np.asarray(i, dtype=np.int64).reshape(-1)
    tie = d[:, 0] == d[:, 1]
    return np.where(tie, i.min(axis=1), i[:, 0]).astype(np.int64)


def voronoi_scheme(points: object, k: int, *, seed: int = 0, rounds: int = 100) -> Layout:
    """Scheme 2: partition by the Voronoi diagram of k random generators, site at cell medoids.

    Generators: ``k`` points drawn uniformly at random in the meters' bounding
    box with ``numpy.random.default_rng(seed)`` (the paper's step (1), "place
    N ECDs at random points of the meters' area", with N = our terminal
    count). A meter belongs to the Voronoi cell containing it, that is to
    its nearest generator, found exactly with scipy.spatial.cKDTree (exact
    ties go to the lower-numbered generator); the diagram itself
    (scipy.spatial.Voronoi, dual of the Delaunay triangulation the paper
    names) is only needed to draw the cells. Each non-empty cell gets one terminal at its
    medoid; an empty cell gets none, so there may be fewer than ``k``.
    The paper uses "the medoid as the site in each iteration": the medoids
    become the generators and the meters are partitioned again, until no
    site changes or ``rounds`` partitions were made (``rounds=1``: the drawn
    generators' cells only). No capacity bound, no k-means++ start: those
    are what set our planner apart.
    """
    pts = as_points(points)
    _check_k(len(pts), k)
    rounds = require_int("rounds", rounds, min=1)
    rng = np.random.default_rng(seed)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    gens = lo + rng.random((k, 2)) * (hi - lo)
    sites = np.empty(0, dtype=np.int64)
    done = 0
    for done in range(1, rounds + 1):  # noqa: B007 - the count is reported
        used = gens
        assign, new_sites = _medoid_sites(pts, _nearest(pts, used))
        if np.array_equal(new_sites, sites):
            break
        sites = new_sites
        gens = pts[sites]
    return Layout("voronoi", assign, pts[sites], sites, generators=used, rounds=done)


def grid_origin(points: np.ndarray, cell_m: float) -> tuple[float, float]:
    """The grid's corner: the meters' minimum, rounded down to a multiple of the cell side.

    So cells sit on map-grid lines (whole kilometres for 1 km cells) and the
    paper's 3.5 km x 4 km area starting at (0, 0) gets cells [0, 1) km, ...
    """
    lo = points.min(axis=0)
    # min() guards against lo / cell_m rounding up to the next whole cell.
    return (min(float(np.floor(lo[0] / cell_m) * cell_m), float(lo[0])),
            min(float(np.floor(lo[1] / cell_m) * cell_m), float(lo[1])))


def grid_scheme(points: object, *, cell_m: float = 1000.0,
                origin: tuple[float, float] | None = None) -> Layout:
    """Scheme 3: square cells of side ``cell_m`` (paper: 1 km), one terminal per non-empty cell.

    Cell (i, j) is the half-open square [x0 + i c, x0 + (i+1) c) x
    [y0 + j c, y0 + (j+1) c), (x0, y0) = ``origin`` or ``grid_origin``.
    The terminal stands at the cell's medoid; terminals are numbered by
    row (j), then column (i).
    """
    pts = as_points(points)
    if len(pts) == 0:
        raise ValueError("no meters")
    if not (cell_m > 0 and np.isfinite(cell_m)):
        raise ValueError(f"cell side must be positive, got {cell_m}")
    x0, y0 = origin if origin is not None else grid_origin(pts, cell_m)
    cells = np.floor((pts - (x0, y0)) / cell_m).astype(np.int64)
    if (cells < 0).any():
        raise ValueError("origin must be at or below every meter's coordinates")
    width = int(cells[:, 0].max()) + 1
    assign, sites = _medoid_sites(pts, cells[:, 1] * width + cells[:, 0])
    return Layout("grid", assign, pts[sites], sites, cell_m=cell_m, origin=(x0, y0))


def kmeans_layout(points: object, k: int, *, seed: int = 0) -> Layout:
    """scikit-learn KMeans (k-means++, 10 restarts); terminals at its centroids, no capacity."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    pts = as_points(points)
    _check_k(len(pts), k)
    with warnings.catch_warnings():
        # Fewer distinct points than k (a building's meter bank): empty clusters are the answer.
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(pts)
    return Layout("kmeans", km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float64),
                  None, rounds=int(km.n_iter_))


def fasterpam_layout(points: object, k: int, *, seed: int = 0) -> Layout:
    """FasterPAM k-medoids on Euclidean distances (BUILD start, one thread); no capacity."""
    import kmedoids

    pts = as_points(points)
    _check_k(len(pts), k)
    if len(pts) > FASTERPAM_MAX_METERS:
        raise ValueError(f"FasterPAM needs an n x n matrix; {len(pts)} meters is over "
                         f"{FASTERPAM_MAX_METERS}")
    res = kmedoids.fasterpam(distances(pts, pts), k, init="build", random_state=seed, n_cpu=1)
    sites = np.asarray(res.medoids, dtype=np.int64)
    return Layout("fasterpam", np.asarray(res.labels, dtype=np.int64), pts[sites], sites,
                  rounds=int(res.n_iter))
