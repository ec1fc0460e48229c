"""``edgekey bench live-routing``: one fleet and load per routing method, measured from traffic.

For every emulated WAN rate and every routing method, ``tools.bench_fleet``
starts the fleet afresh (N terminals on etcd, every meter registered at its
home), with each agent run as ``--route-method M --wan-rate-mbit R``: each
link between two terminals is shaped to R in each direction with the
board's buffer, and every endorsement request, endorsement, forwarded
transaction and key hand-over travels along the paths the terminal's
router picks over the Gabriel mesh of the sites (agent/routing/fleet.py).
Then key rotations are offered open-loop (Poisson, fixed seed) at one rate.

Measured per run, from the terminals' own counters, not from the model:

- bytes each terminal pair exchanged in the window (both directions, as
  ``net`` reports them per peer), as bit/s per mesh link;
- eq. 8 of that measurement: the population variance of the links' idle
  bandwidth B_j = capacity - measured load, over the mesh's links;
- commit latency p50 / p99 / mean (arrival to authenticated ACK), and
  committed ops/s;
- the paths' mean and longest hop count, and relayed-frame counters.

The paper's claim (section 3, Figure 8) is that the greedy's lower eq. 8
gives a shorter chain-building time than shortest-path routing. Whether it
does here is what the table answers; at the paper's 25 Mbit/s the links are
nearly idle, so a congested rate is worth running beside it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from agent.routing.queueing import load_balance_degree
from tools import bench_fleet

DEFAULT_METHODS = ("greedy", "shortest")
DEFAULT_WAN_RATES = (25.0,)  # the paper's forwarding rate mu, Mbit/s


def measured(row: dict[str, Any], capacity_bps: float) -> dict[str, Any]:
    """Per-link bit/s and eq. 8 over the mesh from one rate row of ``bench_fleet``."""
    seconds = row["measured_s"]
    mesh = row["routing"].get("mesh") or sorted(row["bytes_out"]["per_link"])
    per_link = row["bytes_out"]["per_link"]
    bps = {lk: 8.0 * per_link.get(lk, 0) / seconds for lk in mesh}
    off_mesh = {lk: n for lk, n in per_link.items() if lk not in bps}
    idle = [max(0.0, capacity_bps - min(capacity_bps, x)) for x in bps.values()]
    lat = row["latency"]
    busiest = max(bps.values(), default=0.0)
    return {"links_bps": bps, "off_mesh_bytes": off_mesh,
            "load_balance_degree": load_balance_degree(idle) if idle else None,
            "busiest_link_utilisation": busiest / capacity_bps,
            "mean_link_utilisation": (sum(bps.values()) / len(bps) / capacity_bps
                                      if bps else None),
            "total_bps": sum(bps.values()),
            "commit_p50_ms": lat.get("p50_ms"), "commit_p99_ms": lat.get("p99_ms"),
            "commit_mean_ms": lat.get("mean_ms"), "committed_per_s": row["committed_per_s"],
            "committed": row["committed"], "timeouts": row["timeouts"], "naks": row["naks"],
            "mean_hops": row["routing"]["mean_hops"], "max_hops": row["routing"]["max_hops"],
            "duration_s": seconds}


def run(*, methods: tuple[str, ...] = DEFAULT_METHODS,
        wan_rates: tuple[float, ...] = DEFAULT_WAN_RATES, terminals: int = 13,
        meters: int = 300, rate: float = 100.0, seconds: float = 20.0, seed: int = 1,
        buffer_packets: int | None = None, progress: bool = True) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    machine = None
    for wan in wan_rates:
        for method in methods:
            args = ("--route-method", method, "--wan-rate-mbit", f"{wan:g}")
            if buffer_packets is not None:
                args += ("--wan-buffer-packets", str(buffer_packets))
            r = bench_fleet.run(terminals=terminals, meters=meters, rates=(rate,), step=rate,
                                max_rate=rate, seconds=seconds, catchup_blocks=0, seed=seed,
                                progress=progress, agent_args=args)
            machine = r["machine"]
            row = r["rates"][0]
            runs.append({"method": method, "wan_rate_mbit": wan,
                         **measured(row, wan * 1e6)})
    return {"parameters": {"methods": list(methods), "wan_rates_mbit": list(wan_rates),
                           "terminals": terminals, "meters": meters, "offered_per_s": rate,
                           "seconds": seconds, "seed": seed, "buffer_packets": buffer_packets},
            "machine": machine, "runs": runs,
            "paper": {"claim": "greedy's lower load-balance degree gives a shorter "
                               "chain-building time than shortest-path routing (Figure 8)",
                      "wan_rate_mbit": 25.0}}


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    p = result["parameters"]
    out = [("fleet", f"{p['terminals']} terminals, {p['meters']} meters, rotations offered "
                     f"{p['offered_per_s']:g}/s for {p['seconds']:g} s (open loop)")]
    for r in result["runs"]:
        label = f"{r['method']} at {r['wan_rate_mbit']:g} Mbit/s"
        out.append((label, f"eq. 8 {_fmt(r['load_balance_degree'], '.4g')} (bit/s)^2, busiest "
                           f"link {100 * r['busiest_link_utilisation']:.1f} %, mean "
                           f"{100 * (r['mean_link_utilisation'] or 0):.2f} %, hops mean "
                           f"{_fmt(r['mean_hops'], '.2f')} max {r['max_hops']}"))
        out.append((f"  {label} commits", f"{r['committed']} at {r['committed_per_s']:.1f}/s, "
                                         f"p50 {_fmt(r['commit_p50_ms'], '.0f')} ms, p99 "
                                         f"{_fmt(r['commit_p99_ms'], '.0f')} ms, timeouts "
                                         f"{r['timeouts']}"))
    out.append(("paper", result["paper"]["claim"]))
    return out


def plot(result: dict[str, Any], path: Path) -> Path:
    """Per-link measured load, one bar per method, for each WAN rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wans = sorted({r["wan_rate_mbit"] for r in result["runs"]}, reverse=True)
    fig, axes = plt.subplots(len(wans), 1, figsize=(11, 3.6 * len(wans)), squeeze=False)
    for ax, wan in zip(axes[:, 0], wans, strict=True):
        runs = [r for r in result["runs"] if r["wan_rate_mbit"] == wan]
        links = sorted({lk for r in runs for lk in r["links_bps"]})
        width = 0.8 / max(1, len(runs))
        for i, r in enumerate(runs):
            ax.bar([j + i * width for j in range(len(links))],
                   [r["links_bps"].get(lk, 0) / 1e3 for lk in links], width,
                   label=f"{r['method']} (eq. 8 {_fmt(r['load_balance_degree'], '.3g')})")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(links))])
        ax.set_xticklabels([lk.replace("ecd-", "") for lk in links], rotation=60, fontsize=7)
        ax.set_ylabel("measured kbit/s")
        ax.set_title(f"load per WAN link at {wan:g} Mbit/s, measured from traffic")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
