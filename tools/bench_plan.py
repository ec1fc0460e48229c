"""``edgekey bench plan``: the whole ``edgekey plan`` command at scale, as a user runs it.

``edgekey bench placement`` times the planner alone; this runs the command
(loading, every scheme, the CSV/GeoJSON files, the figures, the report) so
what is measured includes everything around the planner. Each (meters,
workers) pair is one ``python -m tools.cli plan`` subprocess on generated
uniform meters at the paper's density (the area grows with n), otherwise with
the command's defaults, a time limit, and a scratch output folder deleted
afterwards. Larger sizes are skipped for a worker count once a size missed
its limit or ran out of memory.

Reported per run: wall time; the planner's own seconds and every other
stage's, from the run's metrics.json; and peak memory two ways:

- ``peak_rss_mib``: ru_maxrss as ``wait4`` returns it for the command, the
  largest peak of any one process of its tree (the command or a pool worker);
- ``tree_pss_mib``: the largest sum over the tree of Pss
  (/proc/PID/smaps_rollup), sampled every SAMPLE_S: what the processes hold
  together, pages a forked worker shares with its parent counted once.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.bench_placement import PAPER_DENSITY_PER_M2

DEFAULT_SIZES = (100_000, 1_000_000, 10_000_000)
DEFAULT_WORKERS = (1, 2)
DEFAULT_LIMIT_S = 1800.0
SAMPLE_S = 0.5


def side_m(n: int) -> float:
    """Side of the square holding n meters at the paper's density (300 in 3.5 km x 4 km)."""
    return (n / PAPER_DENSITY_PER_M2) ** 0.5


def command(n: int, workers: int, out: Path, seed: int = 0) -> list[str]:
    """The ``edgekey plan`` run for n generated meters on ``workers`` processes."""
    side = f"{side_m(n):.0f}"
    return [sys.executable, "-m", "tools.cli", "plan", "--generate", "uniform",
            "--meters", str(n), "--width-m", side, "--height-m", side, "--seed", str(seed),
            "--workers", str(workers), "--out", str(out), "--no-progress"]


def _tree(root: int) -> list[int]:
    """root and its descendants, through /proc/PID/task/TID/children (Linux 3.5+)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                todo += [int(c) for c in text.split()]
        except OSError:
            continue  # exited meanwhile, or no /proc
    return pids


def _pss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def run_one(n: int, workers: int, *, seed: int = 0, limit_s: float = DEFAULT_LIMIT_S,
            bar: Any = None) -> dict[str, Any]:
    """One ``edgekey plan`` run in its own session (so a miss kills its pool too)."""
    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    out = work / "out"
    res: dict[str, Any] = {"n": n, "workers": workers}
    try:
        with (work / "stdout").open("w") as so, (work / "stderr").open("w") as se:
            proc = subprocess.Popen(command(n, workers, out, seed), stdout=so, stderr=se,
                                    start_new_session=True,
                                    env={**os.environ, "PYTHONHASHSEED": "0"})
        t0 = time.perf_counter()
        tree_pss, timed_out = 0.0, False
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                wall = time.perf_counter() - t0
                tree_pss = max(tree_pss, sum(_pss_mib(p) for p in _tree(proc.pid)))
                if bar is not None:
                    bar.set_postfix_str(f"n={n:,} w={workers}: {wall:.0f} s, "
                                        f"{tree_pss:.0f} MiB", refresh=True)
                if wall > limit_s:
                    timed_out = True
                    os.killpg(proc.pid, signal.SIGKILL)
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(SAMPLE_S)
        except BaseException:  # interrupted: leave no planner running
            os.killpg(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            raise
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        res |= {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
                "tree_pss_mib": tree_pss}
        if timed_out:
            return res | {"status": f"did not finish in {limit_s:.0f} s"}
        if proc.returncode != 0:
            err = (work / "stderr").read_text(errors="replace")
            tail = (err.strip().splitlines() or ["no output"])[-1]
            oom = "MemoryError" in err or proc.returncode == -signal.SIGKILL
            return res | {"status": f"failed ({proc.returncode}): {tail}", "oom": oom}
        meta = json.loads((out / "metrics.json").read_text())
        t = meta["timings"]
        return res | {"status": "ok", "planner_s": t["planner_s"],
                      "other_s": wall - t["planner_s"], "stages": t,
                      "terminals": meta["terminals"], "tiled": meta["tiled"],
                      "planner_settings": {key: meta.get(key) for key in (
                          "tiled_above", "max_rounds", "tile_meters")},
                      "skipped": sorted(meta["skipped"]), "geojson": meta["geojson"],
                      "written_mib": sum(f.stat().st_size for f in out.rglob("*")
                                         if f.is_file()) / 2**20}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(sizes: list[int], workers: list[int], *, seed: int = 0,
        limit_s: float = DEFAULT_LIMIT_S) -> dict[str, Any]:
    """Every (size, workers), smallest first; larger sizes skipped per worker count after a miss."""
    from tqdm import tqdm

    runs: list[dict[str, Any]] = []
    gave_up: dict[int, str] = {}  # workers -> why larger sizes are skipped
    todo = [(n, w) for n in sorted(sizes) for w in workers]
    with tqdm(todo, desc="plan bench", unit="run", file=sys.stderr) as bar:
        for n, w in bar:
            if w in gave_up:
                runs.append({"n": n, "workers": w, "status": f"skipped: {gave_up[w]}"})
                continue
            r = run_one(n, w, seed=seed, limit_s=limit_s, bar=bar)
            if r["status"].startswith("did not finish"):
                gave_up[w] = f"n={n:,} did not finish in {limit_s:.0f} s"
            elif r.get("oom"):
                gave_up[w] = f"n={n:,} ran out of memory"
            runs.append(r)
    return {"machine": {"arch": platform.machine(), "python": platform.python_version(),
                        "cpus": os.cpu_count()},
            "sizes": sorted(sizes), "workers": workers, "seed": seed, "limit_s": limit_s,
            "command": f"python -m tools.cli plan --generate uniform --meters N --width-m S "
                       f"--height-m S --seed {seed} --workers W --out DIR --no-progress "
                       "(S = sqrt(N / the paper's density), metres)",
            "runs": runs}


def rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """One table row per run: wall, planner, the rest, peak memory."""
    out = []
    for r in result["runs"]:
        key = f"n={r['n']:>10,}  workers {r['workers']}"
        if r.get("status") != "ok":
            out.append((key, r["status"]))
            continue
        out.append((key, f"wall {r['wall_s']:7.1f} s  planner {r['planner_s']:7.1f} s  "
                         f"rest {r['other_s']:6.1f} s  peak RSS {r['peak_rss_mib']:6.0f} MiB  "
                         f"tree PSS {r['tree_pss_mib']:6.0f} MiB  "
                         f"files {r['written_mib']:5.0f} MiB"
                         + (f"  skipped {','.join(r['skipped'])}" if r["skipped"] else "")))
    return out
