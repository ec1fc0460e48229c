"""``edgekey bench placement``: runtime and peak memory of planning at scale.

Ours (``agent.placement.place.place``, the entry ``edgekey plan`` calls, with
its own tiling threshold and round limit) against two library anchors on the
same points: scikit-learn's KMeans (Lloyd, no capacity bound, centres are
means not meters) and FasterPAM from the ``kmedoids`` package (true medoids,
no capacity bound, needs the full distance matrix). Every run is its own
process, so its peak RSS is its own, and has a time limit: a run that does
not finish is reported as such.

Points are uniform at the paper's density (300 meters in 3.5 km x 4 km,
about 21 meters per km^2), the area growing with n; seeded.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

from tools.report import peak_rss_mib

PAPER_DENSITY_PER_M2 = 300 / (3500 * 4000)
CAP = 25
MARGIN = 0.05
METHODS = ("ours", "sklearn-kmeans", "fasterpam")


def points(n: int, seed: int) -> np.ndarray:
    """n uniform meters at the paper's density, in metres, in a square."""
    side = math.sqrt(n / PAPER_DENSITY_PER_M2)
    return np.random.default_rng(seed).uniform(0.0, side, size=(n, 2))


def run_one(method: str, n: int, seed: int) -> dict[str, Any]:
    """Plan once in this process; the figures of that one run."""
    from agent.placement import place as placement
    from agent.placement.metrics import plan_metrics
    from agent.placement.plan import terminals_needed

    pts = points(n, seed)
    k = terminals_needed(n, CAP, MARGIN)
    t0 = time.perf_counter()
    if method == "ours":
        # place's own TILED_ABOVE and MAX_ROUNDS: what is measured is what the CLI runs.
        p = placement.place(pts, cap=CAP, margin=MARGIN, seed=seed)
        assign, sites = p.assign, p.centres
    elif method == "sklearn-kmeans":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(pts)
        assign, sites = km.labels_, km.cluster_centers_
    elif method == "fasterpam":
        import kmedoids

        from agent.placement.geometry import distances

        diss = distances(pts, pts)
        res = kmedoids.fasterpam(diss, k, random_state=seed)
        assign, sites = np.asarray(res.labels), pts[np.asarray(res.medoids)]
    else:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    seconds = time.perf_counter() - t0
    m = plan_metrics(pts, assign, sites, cap=CAP)
    return {"method": method, "n": n, "k": len(sites), "seed": seed, "seconds": seconds,
            "peak_rss_mib": peak_rss_mib(), **m.as_dict()}


def run(sizes: list[int], methods: list[str], seed: int, limit_s: float,
        skip_after_timeout: bool = True) -> list[dict[str, Any]]:
    """Each (method, n) in a fresh process with a time limit; larger n skipped after a miss."""
    from tqdm import tqdm

    results = []
    gave_up: dict[str, str] = {}  # method -> why larger n are skipped
    todo = [(m, n) for n in sizes for m in methods]
    for method, n in tqdm(todo, desc="placement bench", unit="run"):
        if method in gave_up:
            results.append({"method": method, "n": n, "status": f"skipped: {gave_up[method]}"})
            continue
        cmd = [sys.executable, "-m", "tools.bench_placement", method, str(n), str(seed)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s,
                                  env={**os.environ, "PYTHONHASHSEED": "0"})
        except subprocess.TimeoutExpired:
            results.append({"method": method, "n": n,
                            "status": f"did not finish in {limit_s:.0f} s"})
            if skip_after_timeout:
                gave_up[method] = f"n={n:,} did not finish"
            continue
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"method": method, "n": n, "status": f"failed: {tail}",
                            "wall_s": time.perf_counter() - t0})
            if "MemoryError" in proc.stderr or proc.returncode == -9:
                gave_up[method] = f"n={n:,} ran out of memory"
            continue
        results.append({"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])})
    return results


def rows(results: list[dict[str, Any]]) -> list[tuple[str, str]]:
    out = []
    for r in results:
        key = f"{r['method']:<15} n={r['n']:>10,}"
        if r.get("status") != "ok":
            out.append((key, r["status"]))
            continue
        out.append((key, f"{r['seconds']:8.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
                         f"k={r['k']:,}  var {r['load_variance']:.2f}  max load "
                         f"{r['max_load']}  over cap {r['capacity_violations']:,}  "
                         f"mean dist {r['mean_distance_m']:.0f} m"))
    return out


if __name__ == "__main__":
    method_arg, n_arg, seed_arg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(run_one(method_arg, n_arg, seed_arg)))
