"""Balance and distance of the planner against k-means-constrained and KMeans, 300 meters.

    .venv/bin/python -m tools.bench_balance [--seeds 10]

Layouts: ``tools.meters_gen`` uniform and clustered, 300 meters, seeds
0..seeds-1; k = ``terminals_needed(300)`` = 13, cap 25. Methods:

- ``ours``: ``plan(**BALANCED)`` (lower load bound, 16 starts, local swaps);
- ``ours-before``: ``plan()``'s defaults, the planner before balancing;
- ``kmc``: ``KMeansConstrained(n_clusters=k, size_max=cap)``, sites at its centroids
  (its own answer; they need not be meters);
- ``kmc-medoid``: the same clusters, sites at their medoids (where we may put a terminal);
- ``kmeans-medoid``: ``tools.placement_baselines`` KMeans partition at medoids (no capacity).

Prints a table (mean and sd of the variance over seeds, other figures mean over
seeds, max load the worst seed) and writes bench/results/balance.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.placement.metrics import plan_metrics
from agent.placement.plan import BALANCED, cluster_medoids, plan, terminals_needed
from tools.meters_gen import clustered, uniform

N = 300
CAP = 25
LAYOUTS: dict[str, Callable[..., np.ndarray]] = {"uniform": uniform, "clustered": clustered}
OUT = Path("bench/results/balance.json")

Layout = tuple[np.ndarray, np.ndarray]  # (assign, site coordinates)


def ours(pts: np.ndarray, k: int, seed: int) -> Layout:
    p = plan(pts, cap=CAP, k=k, seed=seed, **BALANCED)
    return p.assign, p.centres


def ours_before(pts: np.ndarray, k: int, seed: int) -> Layout:
    p = plan(pts, cap=CAP, k=k, seed=seed, starts=1, min_load=0, swaps=False)
    return p.assign, p.centres


def kmc(pts: np.ndarray, k: int, seed: int) -> Layout:
    from k_means_constrained import KMeansConstrained

    km = KMeansConstrained(n_clusters=k, size_max=CAP, random_state=seed).fit(pts)
    return np.asarray(km.labels_, dtype=np.int64), np.asarray(km.cluster_centers_)


def at_medoids(method: Callable[[np.ndarray, int, int], Layout]) -> Callable[..., Layout]:
    """The same partition, each terminal moved to its cluster's medoid."""
    def run(pts: np.ndarray, k: int, seed: int) -> Layout:
        assign, _ = method(pts, k, seed)
        return assign, pts[cluster_medoids(pts, assign, k)]
    return run


def kmeans_medoid(pts: np.ndarray, k: int, seed: int) -> Layout:
    from tools.placement_baselines import _medoid_sites, kmeans_layout

    assign, sites = _medoid_sites(pts, kmeans_layout(pts, k, seed=seed).assign)
    return assign, pts[sites]


def methods() -> dict[str, Callable[[np.ndarray, int, int], Layout]]:
    """The methods that can run here; k-means-constrained only if installed."""
    out: dict[str, Callable[[np.ndarray, int, int], Layout]] = {
        "ours": ours, "ours-before": ours_before}
    try:
        import k_means_constrained  # noqa: F401
    except ImportError:
        print("k-means-constrained is not installed: its columns are skipped")
    else:
        out["kmc"] = kmc
        out["kmc-medoid"] = at_medoids(kmc)
    out["kmeans-medoid"] = kmeans_medoid
    return out


def measure(method: Callable[[np.ndarray, int, int], Layout], layout: str,
            seeds: int) -> dict[str, Any]:
    """One method on one layout over the seeds: per-seed figures and their summary."""
    runs = []
    for seed in range(seeds):
        pts = LAYOUTS[layout](N, seed=seed)
        k = terminals_needed(N, CAP)
        t0 = time.perf_counter()
        assign, sites = method(pts, k, seed)
        seconds = time.perf_counter() - t0
        runs.append({"seed": seed, "seconds": seconds,
                     **plan_metrics(pts, assign, sites, cap=CAP).as_dict()})
    var = np.array([r["load_variance"] for r in runs])
    return {"runs": runs, "var_mean": float(var.mean()), "var_sd": float(var.std()),
            "max_load": max(r["max_load"] for r in runs),
            "min_load": min(r["min_load"] for r in runs),
            "mean_dist_m": float(np.mean([r["mean_distance_m"] for r in runs])),
            "max_dist_m": float(np.mean([r["max_distance_m"] for r in runs])),
            "over_cap": sum(r["capacity_violations"] for r in runs),
            "seconds": float(np.mean([r["seconds"] for r in runs]))}


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    head = (f"{'layout':<10} {'method':<14} {'var mean':>8} {'var sd':>7} {'max':>4} "
            f"{'min':>4} {'mean d m':>9} {'max d m':>8} {'overcap':>7} {'s/run':>6}")
    lines = [head, "-" * len(head)]
    for layout, by_method in results.items():
        for name, r in by_method.items():
            lines.append(f"{layout:<10} {name:<14} {r['var_mean']:8.2f} {r['var_sd']:7.2f} "
                         f"{r['max_load']:4d} {r['min_load']:4d} {r['mean_dist_m']:9.1f} "
                         f"{r['max_dist_m']:8.1f} {r['over_cap']:7d} {r['seconds']:6.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    run = methods()
    results = {layout: {name: measure(fn, layout, args.seeds) for name, fn in run.items()}
               for layout in LAYOUTS}
    print(table(results))
    print("max load: worst seed; min load: lowest seed; var sd, distances: over seeds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"n": N, "cap": CAP, "k": terminals_needed(N, CAP),
                                    "seeds": args.seeds, "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
