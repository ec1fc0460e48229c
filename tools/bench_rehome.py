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

from agent.placement.plan import plan
from agent.placement.rehome import Migrate, Placement, ReplanNeeded
from tools.report import peak_rss_mib, quantile

PAPER_W, PAPER_H, PAPER_N, CAP = 3500.0, 4000.0, 300, 25


def run(ops: int = 400, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    pts = rng.uniform((0.0, 0.0), (PAPER_W, PAPER_H), size=(PAPER_N, 2))
    t0 = time.perf_counter()
    p = plan(pts, cap=CAP, seed=seed)
    plan_s = time.perf_counter() - t0
    ids = [f"M{i}" for i in range(PAPER_N)]
    place = Placement.from_assignment(ids, pts, p.assign, p.centres, cap=CAP)
    joins: list[float] = []
    leaves: list[float] = []
    migrations = replans = 0
    present = list(ids)
    for i in range(ops):  # alternate: a meter leaves, a new one joins somewhere in the area
        gone = present.pop(int(rng.integers(len(present))))
        t = time.perf_counter()
        place.leave(gone)
        leaves.append(time.perf_counter() - t)
        xy = rng.uniform((0.0, 0.0), (PAPER_W, PAPER_H))
        t = time.perf_counter()
        events = place.join(f"N{i}", xy)
        joins.append(time.perf_counter() - t)
        migrations += sum(isinstance(e, Migrate) for e in events)
        if any(isinstance(e, ReplanNeeded) for e in events):
            replans += 1
        else:
            present.append(f"N{i}")
    place.check()
    return {"arch": platform.machine(), "python": platform.python_version(),
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
    ]
