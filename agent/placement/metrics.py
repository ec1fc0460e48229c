"""How good a placement is: the figures the paper reports and the ones a planner needs.

The paper's metric is the variance of meters per terminal (population
variance, as its 18.74 / 25.74 / 158.58 are); a planner also wants the
load extremes, how far meters are from their terminal, and whether any
terminal is over its capacity.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from agent.placement.geometry import as_points


@dataclass(frozen=True)
class PlanMetrics:
    meters: int
    terminals: int
    load_variance: float  # population variance of meters per terminal
    max_load: int
    min_load: int
    mean_distance_m: float  # meter to its terminal's site
    max_distance_m: float
    capacity_violations: int  # terminals over cap (0 when cap is None)

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def loads(assign: np.ndarray, terminals: int) -> np.ndarray:
    """Meters per terminal, terminals without meters included.

    ``np.intp``: bincount refuses int64 input on 32-bit ARM (numpy 1.24).
    """
    return np.bincount(np.asarray(assign, dtype=np.intp), minlength=terminals)


def plan_metrics(points: object, assign: object, sites: object,
                 cap: int | None = None) -> PlanMetrics:
    """Metrics of an assignment of ``points`` to terminals sited at ``sites`` (k, 2)."""
    pts = as_points(points)
    site_xy = as_points(sites, "sites")
    a = np.asarray(assign, dtype=np.intp)
    if a.shape != (len(pts),):
        raise ValueError(f"assign must have shape ({len(pts)},), got {a.shape}")
    if len(a) and (a.min() < 0 or a.max() >= len(site_xy)):
        raise ValueError(f"assign refers to terminal {int(a.max())}, only {len(site_xy)} exist")
    count = loads(a, len(site_xy))
    d = np.linalg.norm(pts - site_xy[a], axis=1) if len(a) else np.zeros(0)
    return PlanMetrics(
        meters=len(pts), terminals=len(site_xy), load_variance=float(count.var()),
        max_load=int(count.max()) if len(count) else 0,
        min_load=int(count.min()) if len(count) else 0,
        mean_distance_m=float(d.mean()) if len(d) else 0.0,
        max_distance_m=float(d.max()) if len(d) else 0.0,
        capacity_violations=0 if cap is None else int((count > cap).sum()))
