"""``edgekey bench routing``: router speed at scale, and the queueing model against simulation.

Two questions, one JSON file (bench/results/routing.json):

1. **How long does routing take?** For meshes of 20, 100 and 1000 terminals
   (the Delaunay mesh of random sites at the paper's density, 13 terminals
   per 3.5 km x 4 km, as ``edgekey paper`` builds them; random measured
   loads up to 60 % of the 25 Mbit/s links and arrival rates up to half of
   mu) each method's time per route (random source-destination pairs) and
   per broadcast (``broadcast_routes``: one source to every other terminal,
   placed one after another), p50 and p99 of wall-clock time. H_max =
   max(8, the mesh's hop diameter), so every pair has a route (the router's
   default of 8 does not span a 100-terminal mesh); T_max = infinity (the
   greedy's widest search). A cell stops at ``budget_s``; a broadcast that
   would not fit (the per-route mean x (N - 1) is over the budget) is
   *estimated* from the per-route times and marked so, not run.
2. **Does eq. 6-7 predict what packets do?** At the paper's loads
   (lambda = 50-200 packets/s per terminal, mu = 25 Mbit/s / 360 bytes),
   ``tools.netsim`` (SimPy) against the closed forms: one M/M/1/M node (the
   board's M = 64; the gateway of 13 terminals at 13 lambda; and that
   gateway with M = 4, where losses happen), and a 4-node path toward the
   gateway (cross traffic lambda, 2, 3, 4 lambda x 13/4 with M = 4 and
   t_rw = 5 ms, retransmissions on) against ``Network.path_delay`` (eq. 7 +
   transmission + latency). Relative error = |sim - closed| / closed; a
   loss below 1e-9 in closed form is reported as such, not as a ratio, and
   the count of simulated losses is printed: k losses measure a probability
   to about 1/sqrt(k), so 10-30 % at the gateway's rare losses is sampling.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import random
import statistics
import sys
import time
from typing import Any

SIZES = (20, 100, 1000)
METHODS = ("greedy", "shortest", "reliability", "residual")
LAMBDAS = (50, 100, 150, 200)
PAPER_TERMINALS = 13
BOARD_BUFFER = 64
STRESS_BUFFER = 4
T_RW = 0.005
# Terminals per square metre in the paper's setting: 13 in 3.5 km x 4 km.
DENSITY = 13 / (3500.0 * 4000.0)
# A closed-form loss below this is "none": no simulation can measure it.
LOSS_FLOOR = 1e-9


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(q / 100 * len(v)) - 1))
    return v[k]


def mesh_network(n: int, seed: int) -> Any:
    """n terminals at the paper's density, Delaunay links, random measured loads."""
    import numpy as np

    from agent.routing.network import PACKET_BITS, Link, Network, Node
    from tools.paper import _mesh

    rng = np.random.default_rng(seed)
    side = math.sqrt(n / DENSITY)
    xy = rng.random((n, 2)) * side
    names = [f"T{i:04d}" for i in range(n)]
    mu = 25e6 / PACKET_BITS
    nodes = [Node(name, mu, BOARD_BUFFER, arrival_rate=float(rng.uniform(0, mu / 2)),
                  retransmit_wait=T_RW) for name in names]
    links = []
    for a, b in _mesh(xy):
        length = float(np.hypot(*(xy[a] - xy[b])))
        links.append(Link(names[a], names[b], 25e6, load=float(rng.uniform(0, 0.6 * 25e6)),
                          delivery=math.exp(-length / 100_000.0), latency=length / 2e8))
    return Network(nodes, links)


def hop_diameter(network: Any) -> int:
    """Largest breadth-first hop distance between two terminals (the agent's own)."""
    from agent.routing.mesh import hop_diameter as diameter

    return diameter(network)


def time_routing(sizes: tuple[int, ...], methods: tuple[str, ...], routes: int, broadcasts: int,
                 budget_s: float, seed: int, progress: Any = None) -> list[dict[str, Any]]:
    """Per size and method: per-route and per-broadcast wall times (ms), p50 and p99."""
    from agent.routing.network import Bounds, Demand, NoRouteError
    from agent.routing.router import broadcast_routes
    from tools.routing_methods import by_name

    rate = 30_000.0  # bit/s: the ledger's per-destination rate at N = 13 (tools.paper)
    out = []
    for n in sizes:
        net = mesh_network(n, seed)
        diameter = hop_diameter(net)
        bounds = Bounds(max_hops=max(8, diameter))
        names = list(net.nodes)
        rng = random.Random(f"bench-routing:{seed}:{n}")
        pairs = [tuple(rng.sample(names, 2)) for _ in range(routes)]
        sources = [rng.choice(names) for _ in range(broadcasts)]
        for m in methods:
            fn = by_name(m)
            per_route: list[float] = []
            failed = 0
            t_cell = time.perf_counter()
            for src, dst in pairs:
                t0 = time.perf_counter()
                try:
                    fn(net, Demand(src, dst, rate), bounds)
                except NoRouteError:
                    failed += 1
                per_route.append(time.perf_counter() - t0)
                if time.perf_counter() - t_cell > budget_s:
                    break
            per_bcast: list[float] = []
            predicted = statistics.fmean(per_route) * (n - 1)
            estimated = predicted > budget_s
            if not estimated:
                t_cell = time.perf_counter()
                for src in sources:
                    t0 = time.perf_counter()
                    broadcast_routes(net, src, rate, bounds, fn)
                    per_bcast.append(time.perf_counter() - t0)
                    if time.perf_counter() - t_cell > budget_s:
                        break
            out.append({
                "terminals": n, "links": len(net.links), "hop_diameter": diameter,
                "max_hops": bounds.max_hops, "method": m, "routes_timed": len(per_route),
                "routes_without_route": failed,
                "route_ms_p50": 1000 * _percentile(per_route, 50),
                "route_ms_p99": 1000 * _percentile(per_route, 99),
                "route_ms_mean": 1000 * statistics.fmean(per_route),
                "broadcasts_timed": len(per_bcast), "broadcast_estimated": estimated,
                "broadcast_ms_p50": 1000 * (_percentile(per_bcast, 50) if per_bcast
                                            else predicted),
                "broadcast_ms_p99": 1000 * (_percentile(per_bcast, 99) if per_bcast
                                            else predicted),
            })
            if progress is not None:
                progress(f"routing N={n} {m}")
    return out


# ---------------------------------------------------------------- simulation vs eq. 6-7


def _rel(sim: float, closed: float) -> float | None:
    return abs(sim - closed) / closed if closed > 0 else None


def single_node(lam: float, m: int, arrivals: int, seed: int) -> dict[str, Any]:
    """One M/M/1/M terminal at lambda: simulated loss and sojourn against eq. 6."""
    from agent.routing.network import PACKET_BITS, Link, Network, Node
    from agent.routing.queueing import mm1m
    from tools.netsim import NetSim

    mu = 25e6 / PACKET_BITS
    net = Network([Node("A", mu, m), Node("B", mu, m)], [Link("A", "B", 25e6)])
    sim = NetSim(net, seed)
    warm = 2000 / lam
    sim.poisson(["A", "B"], lam, stop=warm, retransmit=False, name="warm-up")
    sim.poisson(["A", "B"], lam, start=warm, retransmit=False, name="measured")
    sim.run(warm)
    before = sim.snapshot()
    sim.run(warm + arrivals / lam)
    a = sim.snapshot().since(before).nodes["A"]
    f = mm1m(lam, mu, m)
    closed_loss = f.loss_probability
    return {"lambda": lam, "buffer": m, "rho": f.rho, "arrivals": a.offered,
            "delay_ms_sim": 1000 * a.mean_sojourn, "delay_ms_closed": 1000 * f.mean_delay,
            "delay_rel_err": _rel(a.mean_sojourn, f.mean_delay),
            "loss_sim": a.loss, "loss_closed": closed_loss, "losses": a.dropped,
            "loss_rel_err": _rel(a.loss, closed_loss) if closed_loss >= LOSS_FLOOR else None}


def tandem_path(lam: float, probes: int, seed: int) -> dict[str, Any]:
    """A 4-node path toward the gateway: probe packets' delay against eq. 7 (path_delay)."""
    from agent.routing.network import PACKET_BITS, Link, Network, Node
    from tools.netsim import NetSim

    mu = 25e6 / PACKET_BITS
    # Cross traffic grows toward the gateway: the terminals' own meters plus what they
    # relay, scaled so the last node carries the 13-terminal gateway's 13 lambda.
    cross = [lam * PAPER_TERMINALS * k / 4 for k in (1, 2, 3, 4)]
    probe = lam / 4
    names = ["P1", "P2", "P3", "P4", "GW"]
    net = Network([Node(nm, mu, STRESS_BUFFER, arrival_rate=c, retransmit_wait=T_RW)
                   for nm, c in zip(names, [*cross, 0.0], strict=True)],
                  [Link(a, b, 25e6, latency=5e-6) for a, b in itertools.pairwise(names)])
    sim = NetSim(net, seed)
    warm = 0.05
    for nm, c in zip(names, cross, strict=False):
        sim.poisson([nm], c, leaves=True, retransmit=False, tag="cross", name=f"cross-{nm}")
    sim.poisson(names, probe, stop=warm, tag="warm-up", name="warm-up")
    sim.poisson(names, probe, start=warm, tag="probe", name="probe")
    sim.run(warm + probes / probe)
    got = sim.tag("probe")
    # Eq. 7 over P1..P4 with the probe's own packets added, + transmission and latency.
    closed = net.path_delay(names, probe * PACKET_BITS)
    return {"lambda": lam, "nodes": 4, "buffer": STRESS_BUFFER, "t_rw_ms": 1000 * T_RW,
            "probes": got.delivered, "delay_ms_sim": 1000 * got.mean_delay,
            "delay_ms_closed": 1000 * closed,
            "delay_rel_err": _rel(got.mean_delay, closed)}


def queueing_checks(arrivals: int, probes: int, seed: int,
                    progress: Any = None) -> dict[str, list[dict[str, Any]]]:
    nodes, paths = [], []
    for lam in LAMBDAS:
        for load, m in ((lam, BOARD_BUFFER), (lam * PAPER_TERMINALS, BOARD_BUFFER),
                        (lam * PAPER_TERMINALS, STRESS_BUFFER)):
            row = single_node(load, m, arrivals, seed)
            row["case"] = "terminal" if load == lam else "gateway of 13"
            nodes.append(row)
            if progress is not None:
                progress(f"M/M/1/M lambda={load:g} M={m}")
        paths.append(tandem_path(lam, probes, seed))
        if progress is not None:
            progress(f"path lambda={lam}")
    return {"single_node": nodes, "path": paths}


# ---------------------------------------------------------------- the command


def run(*, sizes: tuple[int, ...] = SIZES, methods: tuple[str, ...] = METHODS,
        routes: int = 200, broadcasts: int = 20, budget_s: float = 10.0,
        arrivals: int = 100_000, probes: int = 4000, seed: int = 0,
        progress: bool = True) -> dict[str, Any]:
    """Both parts; the JSON-ready result."""
    from tqdm import tqdm

    from tools.report import peak_rss_mib

    steps = len(sizes) * len(methods) + len(LAMBDAS) * 4
    t0, cpu0 = time.perf_counter(), time.process_time()
    with tqdm(total=steps, desc="edgekey bench routing", file=sys.stderr,
              disable=not progress) as bar:
        def tick(what: str) -> None:
            bar.set_postfix_str(what)
            bar.update()

        routing = time_routing(sizes, methods, routes, broadcasts, budget_s, seed, tick)
        checks = queueing_checks(arrivals, probes, seed, tick)
    return {
        "machine": {"arch": platform.machine(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "settings": {"sizes": list(sizes), "methods": list(methods), "routes": routes,
                     "broadcasts": broadcasts, "budget_s": budget_s, "arrivals": arrivals,
                     "probes": probes, "seed": seed, "rate_bps": 30_000.0,
                     "t_max": "inf", "max_hops": "max(8, hop diameter)"},
        "routing": routing, "queueing": checks,
        "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
        "peak_rss_mib": peak_rss_mib(),
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The printed table: one line per routing cell and per simulated case."""
    out: list[tuple[str, str]] = []
    for r in result["routing"]:
        bc = (f"broadcast p50 {r['broadcast_ms_p50']:.1f} ms p99 {r['broadcast_ms_p99']:.1f} ms "
              f"({r['broadcasts_timed']} run)" if not r["broadcast_estimated"] else
              f"broadcast ~{r['broadcast_ms_p50'] / 1000:.0f} s (estimated: "
              f"{r['terminals'] - 1} x mean route)")
        out.append((f"N={r['terminals']} (H_max {r['max_hops']}) {r['method']}",
                    f"route p50 {r['route_ms_p50']:.2f} ms p99 {r['route_ms_p99']:.2f} ms "
                    f"({r['routes_timed']} run); {bc}"))
    for r in result["queueing"]["single_node"]:
        loss = (f"loss sim {r['loss_sim']:.4g} closed {r['loss_closed']:.4g} "
                f"err {_pct(r['loss_rel_err'])} ({r['losses']} losses)"
                if r["loss_rel_err"] is not None else
                f"loss sim {r['loss_sim']:.3g}, closed {r['loss_closed']:.2g} (< 1e-9)")
        out.append((f"M/M/1/M {r['case']} lambda={r['lambda']:g} M={r['buffer']} "
                    f"rho={r['rho']:.3f}",
                    f"delay sim {r['delay_ms_sim']:.4f} ms closed {r['delay_ms_closed']:.4f} ms "
                    f"err {_pct(r['delay_rel_err'])}; {loss}"))
    for r in result["queueing"]["path"]:
        out.append((f"eq. 7 path of 4 lambda={r['lambda']:g} M={r['buffer']} "
                    f"t_rw={r['t_rw_ms']:g} ms",
                    f"delay sim {r['delay_ms_sim']:.4f} ms closed {r['delay_ms_closed']:.4f} ms "
                    f"err {_pct(r['delay_rel_err'])} ({r['probes']} probes)"))
    out.append(("wall time", f"{result['seconds']:.1f} s (CPU {result['cpu_seconds']:.1f} s: "
                             f"less means a busy host), peak RSS "
                             f"{result['peak_rss_mib']:.0f} MiB"))
    return out
