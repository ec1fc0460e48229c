"""Synthetic meter layouts for the paper's setting, so anyone can regenerate the comparison.

The paper (section 3.1, Figure 4(a)) places 300 meters in a 3.5 km x 4 km
area but does not publish their positions. Two seeded stand-ins:
``uniform`` (every point of the area equally likely) and ``clustered``
(meters in Gaussian villages/blocks around a few centres, plus scattered
farms), which is how meters sit in practice. numpy only.

    python -m tools.meters_gen --kind clustered --seed 0 --out meters.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

PAPER_METERS = 300
PAPER_WIDTH_M = 3500.0
PAPER_HEIGHT_M = 4000.0
KINDS = ("uniform", "clustered")

# Clustered layout, fixed a priori (not fitted to the paper's figures): one
# village per about 30 meters (a rural transformer area serves tens of
# households), uneven village sizes (Dirichlet, alpha 1.5), village radius
# (Gaussian sigma) 80-250 m, and 10 % of meters scattered over the area.
METERS_PER_VILLAGE = 30
VILLAGE_SIZE_ALPHA = 1.5
VILLAGE_SIGMA_M = (80.0, 250.0)
SCATTERED_FRACTION = 0.10


def _check(n: int, width: float, height: float) -> None:
    if n < 1:
        raise ValueError(f"need at least one meter, got n={n}")
    if not (width > 0 and height > 0 and np.isfinite(width) and np.isfinite(height)):
        raise ValueError(f"the area must be positive and finite, got {width} x {height} m")


def uniform(n: int = PAPER_METERS, width: float = PAPER_WIDTH_M,
            height: float = PAPER_HEIGHT_M, seed: int = 0) -> np.ndarray:
    """(n, 2) metres, uniform in [0, width) x [0, height)."""
    _check(n, width, height)
    rng = np.random.default_rng(seed)
    return _distinct(rng.random((n, 2)) * (width, height), rng, width, height)


def clustered(n: int = PAPER_METERS, width: float = PAPER_WIDTH_M,
              height: float = PAPER_HEIGHT_M, seed: int = 0, *,
              villages: int | None = None) -> np.ndarray:
    """(n, 2) metres: Gaussian villages truncated to the area, plus scattered meters."""
    _check(n, width, height)
    rng = np.random.default_rng(seed)
    v = villages if villages is not None else max(1, round(n / METERS_PER_VILLAGE))
    centres = rng.random((v, 2)) * (width, height)
    sigma = rng.uniform(*VILLAGE_SIGMA_M, size=v)
    scattered = round(n * SCATTERED_FRACTION)
    sizes = rng.multinomial(n - scattered, rng.dirichlet(np.full(v, VILLAGE_SIZE_ALPHA)))
    village = np.repeat(np.arange(v), sizes.astype(np.intp))  # intp: 32-bit ARM numpy
    pts = centres[village] + rng.standard_normal((len(village), 2)) * sigma[village, None]
    # Truncate to the area by redrawing the few that fall outside it.
    while True:
        out = np.flatnonzero((pts < 0).any(axis=1) | (pts[:, 0] >= width)
                             | (pts[:, 1] >= height))
        if not len(out):
            break
        vo = village[out]
        pts[out] = centres[vo] + rng.standard_normal((len(out), 2)) * sigma[vo, None]
    pts = np.vstack([pts, rng.random((scattered, 2)) * (width, height)])
    return _distinct(pts, rng, width, height)


def _distinct(pts: np.ndarray, rng: np.random.Generator, width: float,
              height: float) -> np.ndarray:
    """Redraw exact duplicates (vanishingly rare) so the planner's input has distinct sites."""
    while True:
        _, first = np.unique(pts, axis=0, return_index=True)
        if len(first) == len(pts):
            return pts
        dup = np.setdiff1d(np.arange(len(pts)), first)
        pts[dup] = rng.random((len(dup), 2)) * (width, height)


def generate(kind: str = "clustered", n: int = PAPER_METERS, width: float = PAPER_WIDTH_M,
             height: float = PAPER_HEIGHT_M, seed: int = 0) -> np.ndarray:
    """The named layout (``uniform`` or ``clustered``)."""
    if kind == "uniform":
        return uniform(n, width, height, seed)
    if kind == "clustered":
        return clustered(n, width, height, seed)
    raise ValueError(f"unknown layout {kind!r}; one of {', '.join(KINDS)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.meters_gen", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--kind", choices=KINDS, default="clustered")
    p.add_argument("--meters", type=int, default=PAPER_METERS)
    p.add_argument("--width-m", type=float, default=PAPER_WIDTH_M)
    p.add_argument("--height-m", type=float, default=PAPER_HEIGHT_M)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anchor", type=float, nargs=2, metavar=("LON", "LAT"), default=None,
                   help="put the area's south-west corner here and write lon/lat "
                        "(projected through the corner's UTM zone; needs pyproj)")
    p.add_argument("--out", type=Path, default=Path("out/plan/meters-generated.csv"))
    args = p.parse_args(argv)
    from tools import placement_io as pio

    try:
        xy = generate(args.kind, args.meters, args.width_m, args.height_m, args.seed)
    except ValueError as exc:
        print(f"meters_gen: {exc}", file=sys.stderr)
        return 2
    meters = pio.metres_meters(xy)
    if args.anchor is not None:
        lon0, lat0 = args.anchor
        epsg = pio.utm_epsg(lon0, lat0)
        corner = pio.project_lonlat(np.array([[lon0, lat0]]), epsg)[0]
        lonlat = pio.unproject(xy + corner, epsg)
        meters = pio.Meters(meters.ids, xy + corner, f"EPSG:{epsg}", meters.source, lonlat)
    if args.out.suffix.lower() in (".geojson", ".json"):
        path = pio.write_meters_geojson(args.out, meters)
    else:
        path = pio.write_meters_csv(args.out, meters)
    print(f"{path}: {len(xy)} {args.kind} meters, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
