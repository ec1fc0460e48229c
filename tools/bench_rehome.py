"""``edgekey bench rehome``: what placement costs on the terminal itself.

Plans the paper's 300-meter setting with the numpy core, then times joins
and leaves through the re-homing core, as a terminal would run them when
meters come and go. Run it on the host, or on the terminal's interpreter
with ``emulator/qemu/arm-python.sh -m tools.cli bench rehome``.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import numpy as np

from agent.placement.metrics import plan_metrics
from agent.placement.place import place
from agent.placement.rehome import Migrate, Placement, ReplanNeeded
from tools.report import peak_rss_mib, quantile

PAPER_W, PAPER_H, PAPER_N, CAP = 3500.0, 4000.0, 300, 25
# Balance under churn: (leaves, joins) per step and steps. "turnover" replaces every
# meter once (leave, then join elsewhere); "grow" adds 10 %, "shrink" drops 20 %.
SCENARIOS = {"turnover": ((1, 1), PAPER_N), "grow": ((0, 1), PAPER_N // 10),
             "shrink": ((1, 0), PAPER_N // 5)}


def balance(scenario: str, seed: int) -> dict[str, float]:
    """Loads after ``scenario`` through the re-homing core beside a fresh plan of the
    same meters on as many terminals: the variance, mean distance and least load of each."""
    (n_leave, n_join), steps = SCENARIOS[scenario]
    rng = np.random.default_rng([seed, 1])
    pts = rng.uniform((0.0, 0.0), (PAPER_W, PAPER_H), size=(PAPER_N, 2))
    p = place(pts, cap=CAP, seed=seed)
    ids = [f"M{i}" for i in range(PAPER_N)]
    where = dict(zip(ids, pts.tolist(), strict=True))
    pl = Placement.from_assignment(ids, pts, p.assign, p.centres, cap=CAP)
    present = list(ids)
    migrations = replans = 0
    for i in range(steps):
        events: list = []
        for _ in range(n_leave):
            gone = present.pop(int(rng.integers(len(present))))
            events += pl.leave(gone)
            del where[gone]
        for _ in range(n_join):
            xy = rng.uniform((0.0, 0.0), (PAPER_W, PAPER_H)).tolist()
            got = pl.join(f"N{i}", xy)
            events += got
            if any(isinstance(e, ReplanNeeded) for e in got):
                replans += 1
            else:
                present.append(f"N{i}")
                where[f"N{i}"] = xy
        migrations += sum(isinstance(e, Migrate) for e in events)
    pl.check()
    now = pl.metrics()
    fresh_pts = np.array([where[m] for m in present])
    fresh = place(fresh_pts, cap=CAP, seed=seed, k=pl.terminals)
    then = plan_metrics(fresh_pts, fresh.assign, fresh.centres, cap=CAP)
    return {"variance": now.load_variance, "fresh_variance": then.load_variance,
            "mean_distance_m": now.mean_distance_m,
            "fresh_mean_distance_m": then.mean_distance_m,
            "min_load": now.min_load, "fresh_min_load": then.min_load,
            "migrations": migrations, "replans": replans}


def run(ops: int = 400, seed: int = 0, balance_seeds: int = 5) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    pts = rng.uniform((0.0, 0.0), (PAPER_W, PAPER_H), size=(PAPER_N, 2))
    t0 = time.perf_counter()
    p = place(pts, cap=CAP, seed=seed)
    plan_s = time.perf_counter() - t0
    ids = [f"M{i}" for i in range(PAPER_N)]
    placed = Placement.from_assignment(ids, pts, p.assign, p.centres, cap=CAP)
    joins: list[float] = []
    leaves: list[float] = []
    migrations = replans = 0
    present = list(ids)
    for i in range(ops):  # alternate: a meter leaves, a new one joins somewhere in the area
        gone = present.pop(int(rng.integers(len(present))))
        t = time.perf_counter()
        placed.leave(gone)
        leaves.append(time.perf_counter() - t)
        xy = rng.uniform((0.0, 0.0), (PAPER_W, PAPER_H))
        t = time.perf_counter()
        events = placed.join(f"N{i}", xy)
        joins.append(time.perf_counter() - t)
        migrations += sum(isinstance(e, Migrate) for e in events)
        if any(isinstance(e, ReplanNeeded) for e in events):
            replans += 1
        else:
            present.append(f"N{i}")
    placed.check()
    churn = {}
    for scenario in SCENARIOS:
        runs = [balance(scenario, s) for s in range(seed, seed + balance_seeds)]
        churn[scenario] = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
    return {"balance": churn, "balance_seeds": balance_seeds, "arch": platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__, "meters": PAPER_N, "terminals": len(p.centres),
            "plan_s": plan_s, "ops": ops,
            "join_p50_us": quantile(joins, 0.5) * 1e6,
            "join_p99_us": quantile(joins, 0.99) * 1e6,
            "leave_p50_us": quantile(leaves, 0.5) * 1e6,
            "leave_p99_us": quantile(leaves, 0.99) * 1e6,
            "migrations": migrations, "replans": replans, "peak_rss_mib": peak_rss_mib()}


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("interpreter", f"{r['arch']}, python {r['python']}, numpy {r['numpy']}"),
        ("plan, paper's setting", f"{r['meters']} meters -> {r['terminals']} terminals in "
                                  f"{r['plan_s'] * 1e3:.0f} ms"),
        ("join", f"p50 {r['join_p50_us']:.0f} us, p99 {r['join_p99_us']:.0f} us "
                 f"({r['ops']} joins: {r['migrations']} migrations, {r['replans']} re-plans)"),
        ("leave", f"p50 {r['leave_p50_us']:.0f} us, p99 {r['leave_p99_us']:.0f} us"),
        ("peak RSS of the process", f"{r['peak_rss_mib']:.0f} MiB"),
    ] + [(f"balance after {name} (mean of {r['balance_seeds']} seeds)",
          f"variance {b['variance']:.2f} (fresh plan {b['fresh_variance']:.2f}), least load "
          f"{b['min_load']:.1f} ({b['fresh_min_load']:.1f}), mean distance "
          f"{b['mean_distance_m']:.0f} m ({b['fresh_mean_distance_m']:.0f} m), "
          f"{b['migrations']:.0f} migrations, {b['replans']:.0f} re-plans")
         for name, b in r["balance"].items()]
