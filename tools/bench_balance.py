"""Balance and distance of the planner against k-means-constrained and KMeans, cap 25.

    .venv/bin/python -m tools.bench_balance [--seeds 10] [--layouts uniform,lv-rural2,...]

Layouts: ``tools.meters_gen`` uniform and clustered, 300 meters, a new layout
per seed 0..seeds-1; and every real grid of ``tools.grids.NAMES``, one fixed
layout, only the methods' seeds varying (``tools.grids.HELD_OUT`` ones are
reported apart, ``held_out: true``: they are not for tuning the planner).
k = ``terminals_needed(n)`` for every method, cap 25. Methods:

- ``ours``: ``agent.placement.place.place(points, cap=25, seed=s)``, the one
  planner entry (balanced: lower load bound, seeded starts, local swaps);
- ``ours-before``: ``plan()``'s defaults, the planner before balancing;
- ``kmc``: ``KMeansConstrained(n_clusters=k, size_max=cap, random_state=s)``,
  sites at its clusters' medoids (where we may put a terminal: at a meter);
- ``kmc-centroid``: the same clusters, sites at its centroids (its own answer;
  they need not be meters);
- ``kmeans-medoid``: ``tools.placement_baselines`` KMeans partition at medoids
  (no capacity).

The k-means-constrained rows are skipped, with a message, when it is not
installed (``pip install k-means-constrained``). Prints a table (mean and sd
of the variance over seeds; max load the worst seed, min load the lowest;
distances and seconds mean over seeds), writes bench/results/balance.json and
docs/placement-balance.png. ``run`` and ``table`` are what a CLI calls.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.placement.metrics import plan_metrics
from agent.placement.place import place
from agent.placement.plan import cluster_medoids, plan, terminals_needed
from tools import grids
from tools.meters_gen import clustered, uniform

N = 300
CAP = 25
SYNTHETIC: dict[str, Callable[..., np.ndarray]] = {"uniform": uniform, "clustered": clustered}
LAYOUTS: tuple[str, ...] = (*SYNTHETIC, *grids.NAMES)
OUT = Path("bench/results/balance.json")
PNG = Path("docs/placement-balance.png")
PLOTTED = ("ours", "kmc", "kmeans-medoid")

Layout = tuple[np.ndarray, np.ndarray]  # (assign, site coordinates)
Method = Callable[[np.ndarray, int, int], Layout]


def ours(pts: np.ndarray, k: int, seed: int) -> Layout:
    p = place(pts, cap=CAP, seed=seed)
    if len(p.centres) != k:
        raise RuntimeError(f"place() sited {len(p.centres)} terminals, terminals_needed says {k}")
    return p.assign, p.centres


def ours_before(pts: np.ndarray, k: int, seed: int) -> Layout:
    p = plan(pts, cap=CAP, k=k, seed=seed)
    return p.assign, p.centres


def kmc_centroid(pts: np.ndarray, k: int, seed: int) -> Layout:
    from k_means_constrained import KMeansConstrained

    km = KMeansConstrained(n_clusters=k, size_max=CAP, random_state=seed).fit(pts)
    return np.asarray(km.labels_, dtype=np.int64), np.asarray(km.cluster_centers_)


def at_medoids(method: Method) -> Method:
    """The same partition, each terminal moved to its cluster's medoid."""
    def run(pts: np.ndarray, k: int, seed: int) -> Layout:
        assign, _ = method(pts, k, seed)
        return assign, pts[cluster_medoids(pts, assign, k)]
    return run


def kmeans_medoid(pts: np.ndarray, k: int, seed: int) -> Layout:
    from tools.placement_baselines import _medoid_sites, kmeans_layout

    assign, sites = _medoid_sites(pts, kmeans_layout(pts, k, seed=seed).assign)
    return assign, pts[sites]


def methods(say: Callable[[str], None] = print) -> dict[str, Method]:
    """The methods that can run here; k-means-constrained only if installed."""
    out: dict[str, Method] = {"ours": ours, "ours-before": ours_before}
    try:
        import k_means_constrained  # noqa: F401
    except ImportError:
        say("k-means-constrained is not installed: its rows (kmc, kmc-centroid) are skipped")
    else:
        out["kmc"] = at_medoids(kmc_centroid)
        out["kmc-centroid"] = kmc_centroid
    out["kmeans-medoid"] = kmeans_medoid
    return out


def points(layout: str, seed: int) -> np.ndarray:
    """The meters of ``layout`` for ``seed``: a new draw if synthetic, the grid itself if real."""
    if layout in SYNTHETIC:
        return SYNTHETIC[layout](N, seed=seed)
    return grids.load(layout)


def measure(method: Method, layout: str, seeds: int,
            tick: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """One method on one layout over the seeds: per-seed figures and their summary."""
    runs = []
    for seed in range(seeds):
        pts = points(layout, seed)
        k = terminals_needed(len(pts), CAP)
        t0 = time.perf_counter()
        assign, sites = method(pts, k, seed)
        seconds = time.perf_counter() - t0
        runs.append({"seed": seed, "seconds": seconds,
                     **plan_metrics(pts, assign, sites, cap=CAP).as_dict()})
        tick()
    var = np.array([r["load_variance"] for r in runs])
    mean_d = np.array([r["mean_distance_m"] for r in runs])
    return {"runs": runs, "var_mean": float(var.mean()), "var_sd": float(var.std()),
            "max_load": max(r["max_load"] for r in runs),
            "min_load": min(r["min_load"] for r in runs),
            "mean_dist_m": float(mean_d.mean()), "mean_dist_sd": float(mean_d.std()),
            "max_dist_m": float(np.mean([r["max_distance_m"] for r in runs])),
            "over_cap": sum(r["capacity_violations"] for r in runs),
            "seconds": float(np.mean([r["seconds"] for r in runs]))}


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="plans", unit="plan", mininterval=0.5, leave=False)


def run(seeds: int = 10, layouts: list[str] | None = None,
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every method on every layout (default: all of ``LAYOUTS``) over ``seeds`` seeds."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    chosen = list(LAYOUTS) if layouts is None else list(layouts)
    unknown = [name for name in chosen if name not in LAYOUTS]
    if unknown:
        raise ValueError(f"unknown layouts {', '.join(unknown)}; known: {', '.join(LAYOUTS)}")
    run_methods = methods(say)
    bar = _progress(len(chosen) * len(run_methods) * seeds)
    tick = bar.update if bar is not None else (lambda: None)
    out: dict[str, Any] = {}
    try:
        for layout in chosen:
            n = len(points(layout, 0))
            results = {}
            for name, fn in run_methods.items():
                if bar is not None:
                    bar.set_postfix_str(f"{layout} {name}")
                results[name] = measure(fn, layout, seeds, tick)
            out[layout] = {"n": n, "k": terminals_needed(n, CAP),
                           "source": "synthetic" if layout in SYNTHETIC else "grid",
                           "held_out": layout in grids.HELD_OUT, "results": results}
    finally:
        if bar is not None:
            bar.close()
    return {"cap": CAP, "seeds": seeds, "methods": list(run_methods),
            "held_out": list(grids.HELD_OUT), "layouts": out}


def _sections(result: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    layouts = result["layouts"]
    tuned = {k: v for k, v in layouts.items() if not v["held_out"]}
    held = {k: v for k, v in layouts.items() if v["held_out"]}
    if tuned:
        yield "layouts for tuning", tuned
    if held:
        yield "held out (held_out: true; not for tuning)", held


def table(result: dict[str, Any]) -> str:
    """The bench as text: one row per (layout, method), held-out grids in their own section."""
    head = (f"{'layout':<12} {'n':>4} {'k':>3} {'method':<14} {'var mean':>8} {'var sd':>7} "
            f"{'max':>4} {'min':>4} {'mean d m':>9} {'max d m':>8} {'overcap':>7} {'s/plan':>7}")
    lines: list[str] = []
    for title, layouts in _sections(result):
        lines += [f"== {title}", head, "-" * len(head)]
        for layout, lay in layouts.items():
            for name, r in lay["results"].items():
                lines.append(
                    f"{layout:<12} {lay['n']:4d} {lay['k']:3d} {name:<14} {r['var_mean']:8.2f} "
                    f"{r['var_sd']:7.2f} {r['max_load']:4d} {r['min_load']:4d} "
                    f"{r['mean_dist_m']:9.1f} {r['max_dist_m']:8.1f} {r['over_cap']:7d} "
                    f"{r['seconds']:7.3f}")
        lines.append("")
    lines.append(f"{result['seeds']} seeds, cap {result['cap']}; max load: worst seed; "
                 "min load: lowest seed; var sd over seeds; distances, seconds: mean over seeds")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path = PNG) -> None:
    """Load variance and mean distance per layout, ours vs k-means-constrained vs KMeans."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = result["layouts"]
    names = sorted(layouts, key=lambda n: layouts[n]["held_out"])  # held-out ones last
    shown = [m for m in PLOTTED if m in result["methods"]]
    fig, axes = plt.subplots(3, 1, figsize=(max(7.0, 1.1 * len(names) + 2), 9), sharex=True)
    width = 0.8 / max(len(shown), 1)
    x = np.arange(len(names))
    for i, m in enumerate(shown):
        rs = [layouts[n]["results"][m] for n in names]
        off = x + (i - (len(shown) - 1) / 2) * width
        axes[0].bar(off, [r["var_mean"] for r in rs], width, yerr=[r["var_sd"] for r in rs],
                    capsize=2, label=m)
        # markers, not bars: a log axis (layouts span 30 m to 400 m) has no bar baseline
        axes[1].errorbar(off, [r["mean_dist_m"] for r in rs],
                         yerr=[r["mean_dist_sd"] for r in rs], fmt="o", capsize=2, label=m)
        # the same distances over ours': a few per cent is what separates the methods
        base = [layouts[n]["results"]["ours"]["mean_dist_m"] for n in names]
        axes[2].errorbar(off, [r["mean_dist_m"] / b for r, b in zip(rs, base, strict=True)],
                         yerr=[r["mean_dist_sd"] / b for r, b in zip(rs, base, strict=True)],
                         fmt="o", capsize=2, label=m)
    axes[0].set_ylabel("variance of meters per terminal")
    # symlog: KMeans' variances (up to ~300) would flatten the capacitated methods' (2-30)
    axes[0].set_yscale("symlog", linthresh=10)
    axes[1].set_ylabel("mean meter-terminal distance (m)")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("mean distance / ours'")
    axes[2].axhline(1.0, color="grey", lw=0.8)
    axes[2].set_xticks(x)
    axes[2].set_xticklabels([f"{n}{' *' if layouts[n]['held_out'] else ''}\n"
                             f"n={layouts[n]['n']} k={layouts[n]['k']}" for n in names],
                            rotation=30, ha="right", fontsize=8)
    axes[0].set_title(f"Placement balance and distance, cap {result['cap']}, "
                      f"{result['seeds']} seeds\n(error bars: sd over seeds; * held out)",
                      fontsize=10)
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--layouts", type=lambda s: [x for x in s.split(",") if x], default=None,
                    help=f"comma-separated subset of: {','.join(LAYOUTS)}")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--png", type=Path, default=PNG)
    args = ap.parse_args(argv)
    try:
        result = run(args.seeds, args.layouts)
    except ValueError as e:
        ap.error(str(e))
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.png)
    print(f"wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
