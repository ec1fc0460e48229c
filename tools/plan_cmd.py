"""``edgekey plan``: site the terminals for a set of meters and compare with the paper.

Reads meters (CSV or GeoJSON, metres or lon/lat) or generates the paper's
setting (300 meters in 3.5 km x 4 km), runs our planner (K-means with
graph-medoid siting and a hard capacity, section 2.1) beside the paper's
two baselines (Voronoi, 1 km grid) and two library anchors (scikit-learn
KMeans, FasterPAM), prints the metrics, and writes the plan (CSV, GeoJSON),
the paper's Figures 4 and 5 (PNG) and a markdown report that puts our
load variance beside the paper's 18.74 / 25.74 / 158.58, labelled as the
paper's. Heavy imports happen inside ``run`` so ``edgekey -h`` stays quick.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.placement.place import MAX_ROUNDS, TILED_ABOVE, is_tiled
from agent.placement.tiling import DEFAULT_TILE_METERS
from tools.argtypes import nonneg_float, nonneg_int, positive_float, positive_int

# Section 3.1, Figure 5: variance of meters per terminal, and how much lower
# scheme 1's is than schemes 2 and 3 (the paper's own numbers, quoted).
PAPER_VARIANCE = {"ours": 18.74, "voronoi": 25.74, "grid": 158.58}
PAPER_LOWER_PCT = {"voronoi": 27.20, "grid": 88.18}

# GeoJSON twins of the plan files with --geojson auto: up to this many meters.
# A GeoJSON meter is about 210 bytes against a CSV row's 72: at 10^5 meters the
# GeoJSON files are 67 of the 94 MB written (three schemes), about 0.7 GB at 10^6.
GEOJSON_AUTO_MAX_METERS = 100_000

# Figure limits: at most this many meters drawn (a seeded sample beyond it),
# terminal numbers printed up to LABEL_MAX terminals, bars up to BAR_MAX.
DRAW_MAX_METERS = 100_000
LABEL_MAX = 60
BAR_MAX = 120
EDGES_MAX = 400  # Voronoi cells or grid cells whose edges are still worth drawing

SCHEMES = ("ours", "voronoi", "grid", "kmeans", "fasterpam")
FIGURE_SCHEMES = ("ours", "voronoi", "grid")
TITLES = {
    "ours": "scheme 1, ours: K-means + medoid, capacity",
    "voronoi": "scheme 2: Voronoi cells + medoid",
    "grid": "scheme 3: square grid + medoid",
    "kmeans": "scikit-learn KMeans (centroids, no capacity)",
    "fasterpam": "FasterPAM k-medoids (no capacity)",
}


class PlanCommandError(ValueError):
    """Options or data that make the requested plan impossible, said in one line."""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``plan`` with its options; its handler is ``run``."""
    p = sub.add_parser(
        "plan", help="cluster meters, site terminals, compare with the paper's schemes",
        description="Plan terminal sites for meters (the paper's section 2.1) and compare "
                    "with the Voronoi and grid schemes, KMeans and FasterPAM. Without INPUT, "
                    "the paper's setting is generated.")
    p.add_argument("input", nargs="?", type=Path, default=None,
                   help="meters as CSV or GeoJSON (default: generate the paper's setting)")
    g = p.add_argument_group("input file")
    g.add_argument("--format", choices=("csv", "geojson"), default=None,
                   help="file format (default: from the extension)")
    g.add_argument("--units", choices=("auto", "metres", "degrees"), default="auto",
                   help="coordinate units (default: from the column names / GeoJSON crs)")
    g.add_argument("--x-col", metavar="COL", default=None, help="CSV column of x or longitude")
    g.add_argument("--y-col", metavar="COL", default=None, help="CSV column of y or latitude")
    g.add_argument("--id-col", metavar="COL", default=None, help="CSV column of the meter id")
    g.add_argument("--epsg", metavar="CODE", type=int, default=None,
                   help="projected CRS (metres) to plan in; default for lon/lat: the UTM zone "
                        "of the meters' centroid")
    g.add_argument("--allow-duplicates", action="store_true",
                   help="accept meters sharing coordinates (one building's meter bank)")
    g = p.add_argument_group("generated input (when no INPUT is given)")
    g.add_argument("--generate", choices=("clustered", "uniform"), default="clustered",
                   help="layout of the generated meters (default: clustered)")
    g.add_argument("--meters", metavar="N", type=positive_int, default=300,
                   help="how many (default 300)")
    g.add_argument("--width-m", metavar="M", type=positive_float, default=3500.0,
                   help="area width in metres (default 3500)")
    g.add_argument("--height-m", metavar="M", type=positive_float, default=4000.0,
                   help="area height in metres (default 4000)")
    g = p.add_argument_group("planning")
    g.add_argument("--cap", metavar="N", type=positive_int, default=25,
                   help="most meters per terminal, a hard bound (paper: 25)")
    g.add_argument("--margin", metavar="F", type=nonneg_float, default=0.05,
                   help="spare capacity when choosing the terminal count (default 0.05)")
    g.add_argument("--terminals", metavar="N", type=positive_int, default=None,
                   help="terminal count N (default: ceil(n (1 + margin) / cap); 13 for 300)")
    g.add_argument("--eps", metavar="M", type=nonneg_float, default=1.0,
                   help="stop when no site moves more than this many metres (eq. 4)")
    g.add_argument("--max-rounds", metavar="N", type=positive_int, default=MAX_ROUNDS,
                   help=f"most rounds of our planner, per tile when tiled (default {MAX_ROUNDS})")
    g.add_argument("--grid-m", metavar="M", type=positive_float, default=1000.0,
                   help="grid scheme's cell side in metres (paper: 1000)")
    g.add_argument("--voronoi-rounds", metavar="N", type=positive_int, default=100,
                   help="Voronoi scheme: most re-partitions around the medoids (1: the random "
                        "generators' cells only)")
    g.add_argument("--tiled-above", metavar="N", type=positive_int, default=TILED_ABOVE,
                   help=f"use the tiled planner above this many meters (default {TILED_ABOVE})")
    g.add_argument("--tile-meters", metavar="N", type=positive_int,
                   default=DEFAULT_TILE_METERS,
                   help=f"meters per tile for the tiled planner (default {DEFAULT_TILE_METERS})")
    g.add_argument("--seed", metavar="S", type=nonneg_int, default=0,
                   help="first seed (default 0)")
    g.add_argument("--workers", metavar="N", type=positive_int, default=os.cpu_count() or 1,
                   help="processes for the tiled planner (default: every core)")
    g.add_argument("--seeds", metavar="N", type=positive_int, default=1,
                   help="average over this many seeds: seed, seed+1, ... (generated meters "
                        "are regenerated per seed); files and figures are the first seed's")
    g.add_argument("--no-extras", action="store_true", help="skip KMeans and FasterPAM")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", type=Path, default=Path("out/plan"),
                   help="output folder (default out/plan)")
    g.add_argument("--no-figures", action="store_true", help="skip Figures 4 and 5")
    g.add_argument("--geojson", choices=("auto", "always", "never"), default="auto",
                   help="GeoJSON twins of the plan CSVs (auto: up to "
                        f"{GEOJSON_AUTO_MAX_METERS:,} meters; default auto)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)
    return p


# ---------------------------------------------------------------- running


@dataclass
class SchemeRun:
    """One scheme on one seed's meters; ``layout`` is kept for the first seed only."""

    scheme: str
    metrics: Any  # agent.placement.metrics.PlanMetrics
    seconds: float
    rounds: int
    layout: Any  # tools.placement_baselines.Layout, or None past the first seed
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """Everything one ``edgekey plan`` computed, for printing, the report and the figures."""

    meters: Any  # placement_io.Meters of the first seed
    seeds: list[int]
    terminals: int
    runs: dict[str, list[SchemeRun]]
    skipped: dict[str, str]
    tiled: bool
    setting: str
    cap: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds of the other stages
    notes: list[str] = field(default_factory=list)  # what was left out of the files, and why


def run(args: argparse.Namespace) -> int:
    """The handler: 0 on success, 1 with one ``edgekey plan: ...`` line on bad input."""
    from tools.placement_io import PlacementInputError

    try:
        outcome = compute(args)
        paths = write_outputs(args, outcome)
    except (PlacementInputError, PlanCommandError) as exc:
        print(f"edgekey plan: {exc}", file=sys.stderr)
        return 1
    print(metrics_table(outcome))
    print()
    for path in paths:
        print(f"wrote {path}")
    return 0


def _load(args: argparse.Namespace, seed: int) -> Any:
    from tools import meters_gen
    from tools import placement_io as pio

    if args.input is not None:
        return pio.read_meters(args.input, fmt=args.format, units=args.units, x_col=args.x_col,
                               y_col=args.y_col, id_col=args.id_col, epsg=args.epsg,
                               allow_duplicates=args.allow_duplicates)
    xy = meters_gen.generate(args.generate, args.meters, args.width_m, args.height_m, seed)
    return pio.metres_meters(xy, source=f"<generated {args.generate}, seed {seed}>")


def _terminal_count(args: argparse.Namespace, meters: Any, tiled: bool) -> int:
    """N, checked against the data so the failure names the file and the option."""
    from agent.placement.plan import terminals_needed

    n, src = len(meters.ids), meters.source
    if tiled and args.terminals is not None:
        raise PlanCommandError(f"{src}: --terminals applies to the whole-area planner; "
                               f"{n} meters is above --tiled-above {args.tiled_above}")
    k = args.terminals if args.terminals is not None else min(
        terminals_needed(n, args.cap, args.margin), n)
    if k > n:
        raise PlanCommandError(f"{src}: {n} meter(s) but {k} terminals (--terminals): "
                               "need at least one meter per terminal")
    if k * args.cap < n:
        raise PlanCommandError(f"{src}: infeasible: {k} terminals x --cap {args.cap} = "
                               f"{k * args.cap} places for {n} meters; raise --terminals to "
                               f"{-(-n // args.cap)} or --cap")
    return k


def skipped_schemes(n: int, no_extras: bool) -> dict[str, str]:
    """The schemes not run on n meters, each with why (said in the table and the report)."""
    from tools import placement_baselines as pb

    skipped: dict[str, str] = {}
    if n > pb.BASELINE_MAX_METERS:
        skipped["voronoi"] = (f"over {pb.BASELINE_MAX_METERS:,} meters (its rounds of "
                              "nearest-generator search and medoids grow past the planner's "
                              "own time)")
        skipped["grid"] = (f"over {pb.BASELINE_MAX_METERS:,} meters (medoids cost the square "
                           "of the meters per cell)")
    if no_extras:
        skipped.update(kmeans="--no-extras", fasterpam="--no-extras")
    else:
        if n > pb.KMEANS_MAX_METERS:
            skipped["kmeans"] = f"over {pb.KMEANS_MAX_METERS:,} meters (n k work per iteration)"
        if n > pb.FASTERPAM_MAX_METERS:
            skipped["fasterpam"] = f"over {pb.FASTERPAM_MAX_METERS:,} meters (n x n matrix)"
    return skipped


def compute(args: argparse.Namespace) -> Outcome:
    """Run every scheme on every seed; layouts are kept for the first seed only."""
    from tqdm import tqdm

    seeds = list(range(args.seed, args.seed + args.seeds))
    t0 = time.perf_counter()
    first = _load(args, seeds[0])
    timings = {"load_s": time.perf_counter() - t0}
    n = len(first.ids)
    tiled = is_tiled(n, args.tiled_above)
    skipped = skipped_schemes(n, args.no_extras)
    schemes = [s for s in SCHEMES if s not in skipped]
    _warm_imports(schemes)  # so the times below measure the work, not the imports
    long_run = len(seeds) > 1 or tiled
    runs: dict[str, list[SchemeRun]] = {s: [] for s in schemes}
    with tqdm(total=len(seeds) * len(schemes), desc="edgekey plan", unit="scheme",
              disable=args.no_progress or not long_run, file=sys.stderr) as bar:
        for seed in seeds:
            meters = first if seed == seeds[0] else (
                _load(args, seed) if args.input is None else first)
            k = _terminal_count(args, meters, tiled)
            for scheme in schemes:  # ours first: the others get its terminal count
                bar.set_postfix_str(f"seed {seed}, {scheme}")
                done = _run_scheme(scheme, args, meters.xy, k, seed, tiled, bar)
                if scheme == "ours":
                    k = done.layout.terminals
                if seed != seeds[0]:
                    done.layout = None  # only the first seed's files and figures are made
                runs[scheme].append(done)
                bar.update()
            del meters
    if args.input is None:
        setting = (f"generated {args.generate} layout: {n} meters in "
                   f"{args.width_m / 1000:g} km x {args.height_m / 1000:g} km")
    else:
        setting = f"{first.source}: {n} meters, {first.crs}"
    return Outcome(first, seeds, len(runs["ours"][0].layout.centres), runs, skipped, tiled,
                   setting, args.cap, timings)


def _warm_imports(schemes: Sequence[str]) -> None:
    import scipy.spatial  # noqa: F401

    if "kmeans" in schemes:
        import sklearn.cluster  # noqa: F401
    if "fasterpam" in schemes:
        import kmedoids  # noqa: F401


def _run_scheme(scheme: str, args: argparse.Namespace, pts: np.ndarray, k: int, seed: int,
                tiled: bool, bar: Any) -> SchemeRun:
    from agent.placement.metrics import plan_metrics
    from tools import placement_baselines as pb

    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if scheme == "ours":
        p = _plan_ours(args, pts, None if tiled else k, seed, bar)
        layout = pb.Layout("ours", p.assign, p.centres, p.sites, rounds=p.rounds)
        info = {"converged": p.converged, "repair_moves": p.repair_moves,
                "repair_cost_m": p.repair_cost_m}
        del p
    elif scheme == "voronoi":
        layout = pb.voronoi_scheme(pts, k, seed=seed, rounds=args.voronoi_rounds)
    elif scheme == "grid":
        origin = (0.0, 0.0) if args.input is None else None
        layout = pb.grid_scheme(pts, cell_m=args.grid_m, origin=origin)
    elif scheme == "kmeans":
        layout = pb.kmeans_layout(pts, k, seed=seed)
    else:
        layout = pb.fasterpam_layout(pts, k, seed=seed)
    seconds = time.perf_counter() - t0
    metrics = plan_metrics(pts, layout.assign, layout.centres, args.cap)
    return SchemeRun(scheme, metrics, seconds, layout.rounds, layout, info)


def _plan_ours(args: argparse.Namespace, pts: np.ndarray, k: int | None, seed: int,
               bar: Any) -> Any:
    """``place`` (the one planner entry) with a tile progress bar and, when tiled with
    --workers > 1, a process pool."""
    import multiprocessing

    from tqdm import tqdm

    from agent.placement import place as placement

    # No tqdm monitor thread: the pool forks, and a fork taken while another thread holds a
    # lock can leave a worker waiting on it for ever (seen once in the test suite).
    tqdm.monitor_interval = 0
    tiled = is_tiled(len(pts), args.tiled_above)
    with contextlib.ExitStack() as stack:
        tiles = stack.enter_context(tqdm(desc=f"ours, seed {seed}: tiles", unit="tile",
                                         leave=False, file=sys.stderr,
                                         disable=bar.disable or not tiled, position=1))

        def progress(done: int, total: int) -> None:
            if tiles.total != total:
                tiles.total = total
            tiles.update(done - tiles.n)

        map_tiles = None
        if tiled and args.workers > 1:
            # fork: the children inherit the loaded modules and need no __main__ guard.
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(args.workers))
            map_tiles = pool.imap
        try:
            return placement.place(pts, cap=args.cap, margin=args.margin, seed=seed, k=k,
                                   eps=args.eps, max_rounds=args.max_rounds,
                                   tiled_above=args.tiled_above, tile_meters=args.tile_meters,
                                   progress=progress, map_tiles=map_tiles)
        except ValueError as exc:
            raise PlanCommandError(f"planner: {exc}") from None


# ---------------------------------------------------------------- summaries


def _mean(values: Iterable[float]) -> float:
    v = list(values)
    return float(np.mean(v)) if v else math.nan


def summary(outcome: Outcome) -> list[dict[str, Any]]:
    """One row per scheme, means over the seeds (variance also with its spread)."""
    rows = []
    for scheme, runs in outcome.runs.items():
        var = [r.metrics.load_variance for r in runs]
        rows.append({
            "scheme": scheme, "title": TITLES[scheme],
            "terminals": _mean(r.metrics.terminals for r in runs),
            "variance": _mean(var), "variance_sd": float(np.std(var)) if len(var) > 1 else 0.0,
            "paper_variance": PAPER_VARIANCE.get(scheme),
            "max_load": _mean(r.metrics.max_load for r in runs),
            "min_load": _mean(r.metrics.min_load for r in runs),
            "mean_distance_m": _mean(r.metrics.mean_distance_m for r in runs),
            "max_distance_m": _mean(r.metrics.max_distance_m for r in runs),
            "capacity_violations": _mean(r.metrics.capacity_violations for r in runs),
            "rounds": _mean(r.rounds for r in runs),
            "seconds": _mean(r.seconds for r in runs),
            "per_seed_variance": var,
        })
    return rows


def _num(v: float, digits: int = 1) -> str:
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.{digits}f}"


def lower_pct(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """How much lower our variance is than each baseline's, in % (paper: 27.20 / 88.18)."""
    by = {r["scheme"]: r["variance"] for r in rows}
    return {s: 100.0 * (1 - by["ours"] / by[s]) for s in ("voronoi", "grid")
            if s in by and by[s] > 0}


def _seed_text(seeds: list[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}..{seeds[-1]}"


def metrics_table(outcome: Outcome) -> str:
    """The printed table: ours, the baselines and anchors, the paper's variance beside ours."""
    rows = summary(outcome)
    many = len(outcome.seeds) > 1
    head = ["scheme", "terminals", "variance" + (" (sd)" if many else ""), "paper's variance",
            "max", "min", "mean dist m", "max dist m", "over cap", "rounds", "time s"]
    body = []
    for r in rows:
        var = f"{r['variance']:.2f}" + (f" ({r['variance_sd']:.2f})" if many else "")
        paper = f"{r['paper_variance']:.2f} (paper)" if r["paper_variance"] is not None else "-"
        body.append([r["scheme"], _num(r["terminals"]), var, paper, _num(r["max_load"]),
                     _num(r["min_load"]), f"{r['mean_distance_m']:.0f}",
                     f"{r['max_distance_m']:.0f}", _num(r["capacity_violations"]),
                     _num(r["rounds"]), f"{r['seconds']:.3f}"])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = [f"edgekey plan: {outcome.setting}; cap {outcome.cap}; {_seed_text(outcome.seeds)}"
             + (" (mean over seeds)" if many else "")]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    low = lower_pct(rows)
    if low:
        lines.append("ours' variance is lower by " + ", ".join(
            f"{v:.2f} % than {s} (paper: {PAPER_LOWER_PCT[s]:.2f} %)" for s, v in low.items()))
    for s, why in outcome.skipped.items():
        lines.append(f"{s}: skipped ({why})")
    lines += outcome.notes
    return "\n".join(lines)


def command_line(args: argparse.Namespace) -> str:
    """The run as one explicit command (every option), so the report says how to redo it."""
    parts = ["edgekey", "plan"]
    if args.input is not None:
        parts.append(str(args.input))
        for opt in ("format", "x_col", "y_col", "id_col", "epsg"):
            if getattr(args, opt) is not None:
                parts += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
        parts += ["--units", args.units] + (["--allow-duplicates"] if args.allow_duplicates
                                            else [])
    else:
        parts += ["--generate", args.generate, "--meters", str(args.meters),
                  "--width-m", f"{args.width_m:g}", "--height-m", f"{args.height_m:g}"]
    parts += ["--cap", str(args.cap), "--margin", f"{args.margin:g}"]
    if args.terminals is not None:
        parts += ["--terminals", str(args.terminals)]
    parts += ["--eps", f"{args.eps:g}", "--max-rounds", str(args.max_rounds),
              "--grid-m", f"{args.grid_m:g}", "--voronoi-rounds", str(args.voronoi_rounds),
              "--tiled-above", str(args.tiled_above), "--tile-meters", str(args.tile_meters),
              "--seed", str(args.seed), "--seeds", str(args.seeds), "--out", str(args.out),
              "--geojson", args.geojson]
    if args.no_extras:
        parts.append("--no-extras")
    return " ".join(shlex.quote(p) for p in parts)


# ---------------------------------------------------------------- output files


def geojson_choice(mode: str, n: int) -> tuple[bool, str | None]:
    """Whether to write the GeoJSON twins, and the sentence saying so when they are left out."""
    if mode == "always" or (mode == "auto" and n <= GEOJSON_AUTO_MAX_METERS):
        return True, None
    if mode == "never":
        return False, "GeoJSON files left out (--geojson never); the CSVs hold the same plan"
    return False, (f"GeoJSON files left out: {n:,} meters is over {GEOJSON_AUTO_MAX_METERS:,} "
                   "(--geojson auto); the CSVs hold the same plan, --geojson always writes "
                   "them")


def write_outputs(args: argparse.Namespace, outcome: Outcome) -> list[Path]:
    """Plans (first seed) as CSV (GeoJSON per --geojson), the figures, report.md, metrics.json.

    metrics.json carries each stage's seconds (``timings``) so ``edgekey bench
    plan`` can tell the planner's time from the rest.
    """
    from tools import placement_io as pio

    out: Path = args.out
    t0 = time.perf_counter()
    geojson, note = geojson_choice(args.geojson, len(outcome.meters.ids))
    if note is not None:
        outcome.notes.append(note)
    paths = [pio.write_meters_csv(out / "meters.csv", outcome.meters)]
    for scheme in FIGURE_SCHEMES:
        if scheme not in outcome.runs:
            continue  # skipped: said in the table and the report
        # Terminals numbered as in the figures: left to right, top to bottom.
        lay = outcome.runs[scheme][0].layout
        number = layout_numbers(lay, args.grid_m)
        sites = np.empty_like(lay.sites)
        sites[number - 1] = lay.sites
        paths += pio.write_plan(out / scheme, outcome.meters, (number - 1)[lay.assign], sites,
                                geojson=geojson)
        del number, sites
    outcome.timings["outputs_s"] = time.perf_counter() - t0
    figures: list[Path] = []
    if not args.no_figures:
        t0 = time.perf_counter()
        figures = [figure4(out / "figure4.png", outcome, args),
                   figure5(out / "figure5.png", outcome, args)]
        outcome.timings["figures_s"] = time.perf_counter() - t0
    paths += figures
    rows = summary(outcome)
    ours_s = [r.seconds for r in outcome.runs["ours"]]
    meta = {"setting": outcome.setting, "meters": len(outcome.meters.ids),
            "seeds": outcome.seeds, "cap": args.cap,
            "margin": args.margin, "terminals": outcome.terminals, "tiled": outcome.tiled,
            "tiled_above": args.tiled_above, "max_rounds": args.max_rounds,
            "tile_meters": args.tile_meters, "workers": args.workers,
            "grid_m": args.grid_m, "voronoi_rounds": args.voronoi_rounds,
            "paper_variance": PAPER_VARIANCE, "paper_lower_pct": PAPER_LOWER_PCT,
            "ours_lower_pct": lower_pct(rows), "skipped": outcome.skipped,
            "geojson": geojson, "notes": outcome.notes,
            "timings": {**outcome.timings, "planner_s": sum(ours_s),
                        "schemes_s": {s: [r.seconds for r in runs]
                                      for s, runs in outcome.runs.items()}},
            "ours_runs": [r.info | {"seed": s, "rounds": r.rounds, "seconds": r.seconds}
                          for s, r in zip(outcome.seeds, outcome.runs["ours"], strict=True)],
            "schemes": rows}
    out.mkdir(parents=True, exist_ok=True)
    mj = out / "metrics.json"
    mj.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    md = out / "report.md"
    md.write_text(report_markdown(args, outcome, rows, figures), encoding="utf-8")
    return [*paths, mj, md]


def report_markdown(args: argparse.Namespace, outcome: Outcome, rows: list[dict[str, Any]],
                    figures: list[Path]) -> str:
    """The report: setting, the table with the paper's numbers labelled, how each scheme works."""
    many = len(outcome.seeds) > 1
    lines = [
        "# Terminal placement: ours against the paper's schemes",
        "",
        f"- Setting: {outcome.setting}; cap {args.cap} meters per terminal, margin "
        f"{args.margin:g}, N = {outcome.terminals} terminals"
        + (" (tiled planner)" if outcome.tiled else "") + ".",
        f"- {_seed_text(outcome.seeds)}" + (" (metrics are means over the seeds; files and "
                                           "figures are the first seed's)." if many else "."),
        f"- Command: `{command_line(args)}`",
        "",
        "| scheme | terminals | variance of meters per terminal"
        + (" (mean, sd over seeds)" if many else "")
        + " | **paper's** variance (Zhai et al., Fig. 5) | max load | min load "
          "| mean distance (m) | max distance (m) | terminals over cap | rounds | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        var = f"{r['variance']:.2f}" + (f" ({r['variance_sd']:.2f})" if many else "")
        paper = f"{r['paper_variance']:.2f} (paper)" if r["paper_variance"] is not None else "-"
        lines.append(f"| {r['title']} | {_num(r['terminals'])} | {var} | {paper} | "
                     f"{_num(r['max_load'])} | {_num(r['min_load'])} | "
                     f"{r['mean_distance_m']:.0f} | {r['max_distance_m']:.0f} | "
                     f"{_num(r['capacity_violations'])} | {_num(r['rounds'])} | "
                     f"{r['seconds']:.3f} |")
    low = lower_pct(rows)
    lines.append("")
    for s, v in low.items():
        lines.append(f"- Our variance is {v:.2f} % lower than {s}'s "
                     f"(**paper**: {PAPER_LOWER_PCT[s]:.2f} % lower).")
    for s, why in outcome.skipped.items():
        lines.append(f"- {TITLES[s]}: skipped, {why}.")
    lines += [f"- {note}." for note in outcome.notes]
    ours = outcome.runs["ours"]
    lines += [
        f"- Ours: converged (eq. 4, eps {args.eps:g} m) in "
        f"{sum(bool(r.info['converged']) for r in ours)} of {len(ours)} run(s); the capacity "
        f"repair moved {_mean(r.info['repair_moves'] for r in ours):.1f} meter(s) off their "
        f"nearest terminal at {_mean(r.info['repair_cost_m'] for r in ours):.0f} m extra in "
        "total (final round, mean over runs).",
        "",
        "## How the schemes are defined",
        "",
        "- **Ours (scheme 1)**: k-means++ start, capacitated nearest-terminal assignment "
        f"(at most {args.cap} meters each, exact min-cost flow), terminal moved to its "
        "cluster's medoid (eq. 3), until no site moves more than eps (eq. 4).",
        "- **Voronoi (scheme 2)**: N generators drawn uniformly at random in the meters' "
        "bounding box (seeded; the paper's step (1), N = ours' terminal count); each meter "
        "belongs to its nearest generator's Voronoi cell; a terminal at each non-empty cell's "
        f"medoid; repartitioned around the medoids for at most {args.voronoi_rounds} round(s) "
        "until no site changes. No capacity bound.",
        f"- **Grid (scheme 3)**: square cells of {args.grid_m:g} m, "
        + ("starting at the generated area's corner (0, 0)" if args.input is None else
           "on whole multiples of the cell side in the planning CRS")
        + "; a terminal at each non-empty cell's medoid. No capacity bound.",
        "- **KMeans** (scikit-learn, k-means++, 10 restarts; terminals at centroids) and "
        "**FasterPAM** (`kmedoids`, BUILD start; terminals at medoids) get the same N; "
        "neither knows the capacity, so their terminals over cap are reported, not repaired.",
        "",
        "The paper's values are its own, from a meter layout it does not publish (its "
        "Figure 4(a)); ours come from the layout above. Compare orderings and magnitudes, "
        "not digits.",
    ]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{p.stem}]({p.name})" for p in figures]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- figures


def reading_order(centres: np.ndarray, band_m: float) -> np.ndarray:
    """Terminal numbers 1..k left to right, top to bottom, as the paper numbers them.

    Rows are bands ``band_m`` high counted down from the topmost terminal;
    within a band, by x.
    """
    if len(centres) == 0:
        return np.zeros(0, dtype=np.int64)
    return _number(np.floor((centres[:, 1].max() - centres[:, 1]) / band_m), centres[:, 0])


def _number(row: np.ndarray, x: np.ndarray) -> np.ndarray:
    order = np.lexsort((x, row))
    number = np.empty(len(x), dtype=np.int64)
    number[order] = np.arange(1, len(x) + 1)
    return number


def layout_numbers(lay: Any, band_m: float) -> np.ndarray:
    """``reading_order`` for a layout; a grid's rows are its own cell rows, top row first."""
    if lay.cell_m is not None and lay.origin is not None and len(lay.centres):
        cell_row = np.floor((lay.centres[:, 1] - lay.origin[1]) / lay.cell_m)
        return _number(-cell_row, lay.centres[:, 0])
    return reading_order(lay.centres, band_m)


def _palette(count: int) -> list[Any]:
    """Distinct hues first (tab20's dark members, then its light ones), cycling."""
    from matplotlib import colormaps

    tab = colormaps["tab20"].colors
    base = list(tab[0::2]) + list(tab[1::2])
    return [base[i % len(base)] for i in range(count)]


def _sample(n: int, seed: int) -> np.ndarray:
    if n <= DRAW_MAX_METERS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, DRAW_MAX_METERS, replace=False))


def _variance_text(outcome: Outcome, scheme: str) -> str:
    v = outcome.runs[scheme][0].metrics.load_variance
    paper = PAPER_VARIANCE.get(scheme)
    return f"variance {v:.2f}" + (f"  (paper: {paper:.2f})" if paper is not None else "")


def figure4(path: Path, outcome: Outcome, args: argparse.Namespace) -> Path:
    """Figure 4: (a) the meters, (b)-(d) the layouts of the three schemes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    xy = outcome.meters.xy
    shown = _sample(len(xy), outcome.seeds[0])
    km = xy[shown] / 1000.0  # the drawn sample only: no full-size copy
    size = 9 if len(shown) <= 2000 else 1
    lo, hi = xy.min(axis=0) / 1000.0, xy.max(axis=0) / 1000.0
    pad = 0.04 * max(float((hi - lo).max()), 1e-3)
    fig, axes = plt.subplots(2, 2, figsize=(12, 13.5), constrained_layout=True)
    panels = [("(a) meters", None), *[(f"({c}) {TITLES[s]}", s) for c, s in
                                      zip("bcd", FIGURE_SCHEMES, strict=True)]]
    for ax, (title, scheme) in zip(axes.flat, panels, strict=True):
        ax.set_xlim(lo[0] - pad, hi[0] + pad)
        ax.set_ylim(lo[1] - pad, hi[1] + pad)
        ax.set_aspect("equal")
        ax.set_xlabel("x (km)")
        ax.set_ylabel("y (km)")
        if scheme is None:
            ax.scatter(km[:, 0], km[:, 1], s=size, c="0.2", linewidths=0)
            ax.set_title(f"{title}: {len(xy)} meters", fontsize=11)
            continue
        if scheme not in outcome.runs:
            _skipped_panel(ax, title, outcome.skipped.get(scheme, ""))
            continue
        lay = outcome.runs[scheme][0].layout
        number = layout_numbers(lay, args.grid_m)
        colours = np.array(_palette(int(number.max()) if len(number) else 0))
        ax.scatter(km[:, 0], km[:, 1], s=size, linewidths=0,
                   c=colours[number[lay.assign[shown]] - 1])
        if scheme == "voronoi" and lay.generators is not None and len(lay.generators) <= EDGES_MAX:
            _draw_voronoi(ax, lay.generators / 1000.0)
        if scheme == "grid" and lay.cell_m is not None and lay.origin is not None:
            _draw_grid(ax, lay.origin, lay.cell_m, lo, hi)
        c = lay.centres / 1000.0
        few = len(c) <= LABEL_MAX
        ax.scatter(c[:, 0], c[:, 1], marker="*", s=190 if few else max(2.0, 190 * LABEL_MAX
                                                                         / len(c)),
                   c=colours[number - 1] if few else "black",
                   edgecolors="black", linewidths=0.9 if few else 0, zorder=5)
        if len(c) <= LABEL_MAX:
            for (x, y), num in zip(c, number, strict=True):
                ax.annotate(str(num), (x, y), xytext=(5, 5), textcoords="offset points",
                            fontsize=8, zorder=6,
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                                  "alpha": 0.8})
        ax.set_title(f"{title}\n{lay.terminals} terminals, "
                     f"{_variance_text(outcome, scheme)}", fontsize=11)
    handles = [
        Line2D([], [], ls="", marker="o", ms=5, color="0.2", label="meter (colour: its terminal)"),
        Line2D([], [], ls="", marker="*", ms=13, mfc="white", mec="black",
               label="terminal site (medoid), numbered left to right, top to bottom"),
        Line2D([], [], color="0.45", lw=1, label="(c) Voronoi cell edge"),
        Line2D([], [], color="0.45", lw=1, ls="--",
               label=f"(d) {args.grid_m / 1000:g} km grid cell"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    sampled = "" if len(shown) == len(xy) else f", {len(shown)} of {len(xy)} meters drawn"
    fig.suptitle(f"Figure 4 (reproduced): terminal placement under three schemes\n"
                 f"{outcome.setting}; cap {args.cap}; seed {outcome.seeds[0]}{sampled}; "
                 "'paper' = the variance Zhai et al. report", fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _skipped_panel(ax: Any, title: str, why: str) -> None:
    """A panel that says the scheme was not run, so the figure keeps the paper's layout."""
    ax.text(0.5, 0.5, f"skipped:\n{why}", transform=ax.transAxes, ha="center", va="center",
            fontsize=10, wrap=True)
    ax.set_title(title, fontsize=11)


def _draw_voronoi(ax: Any, gens: np.ndarray) -> None:
    if len(gens) < 3:
        return
    from scipy.spatial import QhullError, Voronoi, voronoi_plot_2d

    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    with contextlib.suppress(QhullError):  # collinear generators: nothing to draw
        voronoi_plot_2d(Voronoi(gens), ax=ax, show_points=False, show_vertices=False,
                        line_colors="0.45", line_width=0.9, line_alpha=0.9)
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)


def _draw_grid(ax: Any, origin: tuple[float, float], cell_m: float, lo: np.ndarray,
               hi: np.ndarray) -> None:
    c = cell_m / 1000.0
    x0, y0 = origin[0] / 1000.0, origin[1] / 1000.0
    nx = int(np.floor((hi[0] - x0) / c)) + 1
    ny = int(np.floor((hi[1] - y0) / c)) + 1
    if nx * ny > EDGES_MAX:
        return  # too fine to see
    for i in range(nx + 1):
        ax.axvline(x0 + i * c, color="0.45", lw=0.9, ls="--", zorder=0)
    for j in range(ny + 1):
        ax.axhline(y0 + j * c, color="0.45", lw=0.9, ls="--", zorder=0)


def figure5(path: Path, outcome: Outcome, args: argparse.Namespace) -> Path:
    """Figure 5: meters per terminal for the three schemes, terminals in reading order.

    Bars per terminal as in the paper while every scheme has at most BAR_MAX
    terminals; beyond that, a histogram of the loads per scheme.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agent.placement.metrics import loads

    lays = [outcome.runs[s][0].layout if s in outcome.runs else None for s in FIGURE_SCHEMES]
    bars = max(lay.terminals for lay in lays if lay is not None) <= BAR_MAX
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2), sharey=bars, constrained_layout=True)
    top = 0
    for ax, letter, scheme, lay in zip(axes, "abc", FIGURE_SCHEMES, lays, strict=True):
        if lay is None:
            _skipped_panel(ax, f"({letter}) {TITLES[scheme]}", outcome.skipped.get(scheme, ""))
            continue
        count = loads(lay.assign, lay.terminals)
        top = max(top, int(count.max()))
        cap_label, mean_label = f"cap {args.cap} (binds ours only)", f"mean {count.mean():.2f}"
        if bars:
            number = layout_numbers(lay, args.grid_m)
            by_number = np.empty_like(count)
            by_number[number - 1] = count
            ax.bar(np.arange(1, lay.terminals + 1), by_number, color=_palette(lay.terminals),
                   edgecolor="black", linewidth=0.5)
            ax.set_xlabel("terminal (numbered left to right, top to bottom)")
            ax.set_xticks(np.arange(1, lay.terminals + 1, max(1, lay.terminals // 20)))
            ax.axhline(args.cap, color="tab:red", ls="--", lw=1.2, label=cap_label)
            ax.axhline(count.mean(), color="0.3", ls=":", lw=1.2, label=mean_label)
        else:
            ax.hist(count, bins=np.arange(count.max() + 2) - 0.5, color="tab:blue")
            ax.set_xlabel("meters per terminal")
            ax.set_ylabel("terminals")
            ax.axvline(args.cap, color="tab:red", ls="--", lw=1.2, label=cap_label)
            ax.axvline(count.mean(), color="0.3", ls=":", lw=1.2, label=mean_label)
        ax.set_title(f"({letter}) {TITLES[scheme]}\n{lay.terminals} terminals, "
                     f"{_variance_text(outcome, scheme)}", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    if bars:
        axes[0].set_ylabel("meters per terminal")
        axes[0].set_ylim(0, max(top, args.cap) * 1.15)
    kind = "" if bars else " (histograms: too many terminals for one bar each)"
    fig.suptitle(f"Figure 5 (reproduced): meters per terminal under three schemes{kind}; "
                 f"{outcome.setting}, seed {outcome.seeds[0]}\n'paper' = the value "
                 "Zhai et al. report for that scheme", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
