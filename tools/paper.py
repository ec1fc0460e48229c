"""``edgekey paper``: the paper's Table 1 and Figures 6-7, re-measured by simulation.

Zhai et al., section 3, time the ledger's chain building and measure the
load-balance degree (eq. 8) for their greedy routing (eq. 9) against three
baselines, vs the meters' packet rate lambda (Table 1) and vs the number of
terminals (Figures 6-7). This command rebuilds that experiment from stated
assumptions: the routers of ``agent.routing`` choose the broadcast paths on
the network as measured, and ``tools.netsim`` (SimPy) carries every packet
through the terminals' M/M/1/M queues on those paths. Nothing is fitted to
the paper's numbers; they are printed beside ours, labelled as the paper's.

The model (each default is in ``Model``; report.md repeats them):

- **Terminals.** The paper's setting: 300 meters in 3.5 km x 4 km
  (``tools.meters_gen``, clustered, seeded), N terminals sited by our
  planner (K-means + graph medoid, section 2.1) with N = 1..20 and a cap of
  ceil(300 x 1.05 / N) meters each (25 at the paper's N = 13).
- **Links.** The Delaunay triangulation of the sites: each terminal links to
  its natural neighbours, a planar mesh that is connected and has
  alternative paths (N = 2: one link; collinear sites: a chain). Capacity
  = the board's forwarding rate (pl-terminal: ``wan.rate_mbit_s`` =
  25 Mbit/s, the paper's mu); latency = length / 2e8 m/s; delivery =
  exp(-length / 100 km), about 1 % loss per km (an assumption: the paper
  gives no loss figures).
- **Forwarding.** mu = 25 Mbit/s / 360-byte packets = 8680.6 packets/s,
  M = the board's ``wan.forward_buffer_packets`` = 64, t_rw = 5 ms (a
  link-layer acknowledgement timeout of about 20 loaded hop times; assumed).
- **Background.** Each terminal's meters send 360-byte packets at
  lambda x (its meters / mean meters per terminal) packets/s, Poisson, so
  lambda is the mean per terminal (200 packets/s = 72 KByte/s, inside the
  board's 25-128 KByte/s PLC range). The packets go to the gateway (the
  terminal nearest the area's centre, holding the WAN uplink to the master
  station) along the geographically shortest path, and leave through the
  gateway's queue. Links near the gateway therefore carry more: the uneven
  load the router sees.
- **What the router sees.** A separate simulation of the background alone
  (its own seed: the past, not the future) measured over ``measure_s``:
  per-link bit/s and per-terminal packets/s, put into a ``Network``.
- **The ledger.** ``blocks`` key operations, one every ``block_interval_s``,
  originated by the terminals in turn (a seeded order). Each is a chain
  building (``NetSim.chain_build``): endorsement requests to all others and
  endorsements back (first broadcast; done at a majority), proof of work
  (exponential, mean ``pow_ms``), block to all others (second broadcast).
  Chain time = request until the last terminal has the block. Every message
  fits one 360-byte packet (a block of one signed key record: header ~84 B
  plus a ~140 B transaction).
- **Routes.** For each origin, ``broadcast_routes(measured, origin, r,
  Bounds(T_max, H_max), by_name(method))``, r = the ledger's time-averaged
  rate per destination (3 packets every N block intervals). H_max = 8. T_max = 1.05 x
  the largest fastest-path delay from the origin: the router may spread a
  broadcast's load as long as no terminal is reached later than the
  farthest one would be anyway (the paper leaves T_max unstated; without
  one the greedy detours up to H_max hops to idle links).
- **Load balance.** Eq. 8 over every link's idle bandwidth, capacity minus
  the bit/s the link carried (both directions, every transmission
  attempt), time-averaged over the ledger's window (``blocks`` x interval),
  in (Mbit/s)^2. No links (N = 1) counts as 0: nothing to balance.
- **Growth reductions** (the paper's 1 -> 10 terminals figures): growth_m =
  value_m(10) - value_m(1), reduction vs baseline b = 1 - growth_greedy /
  growth_b.
- **Proof of work.** Difficulty 8 read as 8 leading zero bits: 256 double
  SHA-256 of an 80-byte header expected, about 10 us each in Go on a
  700 MHz Cortex-A7, so ``pow_ms`` = 2.5 ms by default. It is the same for
  every method, so it shifts chain times but not their differences.

Cases (N, lambda, seed) run in parallel worker processes; each is seeded
from (seed, N, lambda) alone, so results.json does not depend on the worker
count or order. Heavy imports happen inside functions, so ``edgekey -h``
stays quick.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import json
import math
import os
import random
import shlex
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hal.require import require_int, require_real
from tools.argtypes import nonneg_float, nonneg_int, positive_float, positive_int

if TYPE_CHECKING:  # numpy, SimPy and the routers load when a run starts, not for ``-h``
    import numpy as np

# Section 3, Table 1: the proposed method at the paper's N = 13 (quoted, never fitted).
PAPER_TABLE1 = {50: (61.23, 67.0), 100: (120.58, 130.7), 150: (200.79, 197.5),
                200: (280.64, 270.3)}  # lambda: (chain time ms, load-balance degree, no unit)
# Section 3, Figures 6-7: how much smaller the proposed method's growth from 1 to
# 10 terminals is than each baseline's, in %.
PAPER_TIME_REDUCTION = {"shortest": 19.83, "reliability": 8.18, "residual": 14.40}
PAPER_LOAD_REDUCTION = {"shortest": 73.05, "reliability": 49.94, "residual": 42.16}

METHODS = ("greedy", "shortest", "reliability", "residual")
BASELINES = METHODS[1:]
TITLES = {"greedy": "greedy (proposed, eq. 9)", "shortest": "shortest path [17]",
          "reliability": "reliability [18]", "residual": "residual capacity [19]"}
LAMBDAS = (50, 100, 150, 200)
PAPER_TERMINALS = 13
GROWTH_FROM, GROWTH_TO = 1, 10

# Quick mode (tests): largest N, ledger blocks, windows.
QUICK_TERMINALS = 4
QUICK_BLOCKS = 4

DEFAULT_SEEDS = 8  # with both cores of the desk, the full run takes ~2 minutes


class PaperError(ValueError):
    """Options that make the experiment meaningless, said in one line."""


@dataclass(frozen=True)
class Model:
    """Every number of the simulated experiment (see the module docstring for the why)."""

    layout: str = "clustered"
    meters: int = 300
    width_m: float = 3500.0
    height_m: float = 4000.0
    margin: float = 0.05  # planner cap = ceil(meters (1 + margin) / N): 25 at N = 13
    service_rate_pps: float = 25e6 / (360 * 8)  # mu; replaced by the board's figure
    buffer: int = 64  # M; replaced by the board's figure
    link_capacity_bps: float = 25e6  # replaced by the board's figure
    retransmit_wait_s: float = 0.005  # t_rw of eq. 7 (assumed)
    loss_length_m: float = 100_000.0  # delivery = exp(-length / this)
    propagation_mps: float = 2e8
    pow_ms: float = 2.5
    block_packets: int = 1
    block_interval_s: float = 0.020
    blocks: int = 20
    warmup_s: float = 0.05
    measure_s: float = 0.5
    max_hops: int = 8
    delay_stretch: float = 1.05  # T_max = stretch x the largest fastest-path delay

    def check(self) -> Model:
        for name in ("width_m", "height_m", "service_rate_pps", "link_capacity_bps",
                     "loss_length_m", "propagation_mps", "block_interval_s", "measure_s",
                     "delay_stretch"):
            require_real(name, getattr(self, name), above=0.0, error=PaperError)
        for name in ("retransmit_wait_s", "pow_ms", "warmup_s"):
            require_real(name, getattr(self, name), min=0.0, error=PaperError)
        for name in ("meters", "buffer", "block_packets", "blocks", "max_hops"):
            require_int(name, getattr(self, name), min=1, error=PaperError)
        if self.delay_stretch < 1.0:
            raise PaperError(f"delay_stretch must be >= 1 (T_max below the fastest path "
                             f"leaves no route), got {self.delay_stretch!r}")
        return self


# ---------------------------------------------------------------- topology


@dataclass(frozen=True)
class Topology:
    """N terminal sites, their meters, the mesh between them and the gateway."""

    names: tuple[str, ...]
    xy: np.ndarray  # (N, 2) metres
    meters: tuple[int, ...]  # meters per terminal
    links: tuple[tuple[int, int, float], ...]  # (i, j, length m), i < j
    gateway: int


def topology(model: Model, n: int, seed: int) -> Topology:
    """The paper's meters (seeded), N planned sites, their Delaunay mesh, the gateway."""
    import numpy as np

    from agent.placement.plan import plan
    from tools import meters_gen

    n = require_int("the number of terminals", n, min=1, error=PaperError)
    if n > model.meters:
        raise PaperError(f"{n} terminals for {model.meters} meters: at most one per meter")
    pts = meters_gen.generate(model.layout, model.meters, model.width_m, model.height_m, seed)
    cap = math.ceil(round(model.meters * (1 + model.margin) / n, 9))
    p = plan(pts, cap=cap, k=n, seed=seed)
    xy = np.asarray(p.centres, dtype=float)
    counts = np.bincount(p.assign, minlength=n)
    names = tuple(f"T{i + 1:02d}" for i in range(n))
    edges = _mesh(xy)
    links = tuple((i, j, float(np.hypot(*(xy[i] - xy[j])))) for i, j in edges)
    centre = np.array([model.width_m / 2, model.height_m / 2])
    gateway = int(np.argmin(np.hypot(*(xy - centre).T)))
    return Topology(names, xy, tuple(int(c) for c in counts), links, gateway)


def _mesh(xy: np.ndarray) -> list[tuple[int, int]]:
    """Delaunay edges (natural neighbours); a chain in x, then y order for collinear sites."""
    import numpy as np

    n = len(xy)
    if n < 2:
        return []
    if n >= 3:
        from scipy.spatial import Delaunay, QhullError

        try:
            tri = Delaunay(xy)
        except QhullError:
            pass
        else:
            edges = set()
            for s in tri.simplices:
                for k in range(3):
                    a, b = int(s[k]), int(s[(k + 1) % 3])
                    edges.add((min(a, b), max(a, b)))
            return sorted(edges)
    order = np.lexsort((xy[:, 1], xy[:, 0]))
    return sorted((min(int(a), int(b)), max(int(a), int(b)))
                  for a, b in itertools.pairwise(order))


def physical_network(model: Model, topo: Topology) -> Any:
    """The terminals and links with their static figures; loads and arrivals zero."""
    from agent.routing.network import Link, Network, Node

    nodes = [Node(name, model.service_rate_pps, model.buffer,
                  retransmit_wait=model.retransmit_wait_s) for name in topo.names]
    links = [Link(topo.names[i], topo.names[j], model.link_capacity_bps,
                  delivery=math.exp(-length / model.loss_length_m),
                  latency=length / model.propagation_mps) for i, j, length in topo.links]
    return Network(nodes, links)


def paths_to_gateway(topo: Topology) -> dict[str, tuple[str, ...]]:
    """Geographically shortest path from every terminal to the gateway (Dijkstra, ties by names)."""
    adj: dict[int, list[tuple[int, float]]] = {i: [] for i in range(len(topo.names))}
    for i, j, length in topo.links:
        adj[i].append((j, length))
        adj[j].append((i, length))
    names = topo.names
    best: dict[int, tuple[float, tuple[str, ...]]] = {}
    heap: list[tuple[float, tuple[str, ...], int]] = [(0.0, (names[topo.gateway],),
                                                       topo.gateway)]
    while heap:
        d, path, v = heapq.heappop(heap)
        if v in best:
            continue
        best[v] = (d, path)
        for u, length in adj[v]:
            if u not in best:
                heapq.heappush(heap, (d + length, (names[u], *path), u))
    if len(best) != len(names):
        raise PaperError("the terminal mesh is not connected")  # Delaunay always is
    return {names[v]: path for v, (_d, path) in sorted(best.items())}


def background_rates(topo: Topology, lam: float) -> dict[str, float]:
    """Packets/s from each terminal's meters: lambda scaled by its share of the meters."""
    mean = sum(topo.meters) / len(topo.meters)
    return {name: lam * m / mean for name, m in zip(topo.names, topo.meters, strict=True)}


# ---------------------------------------------------------------- one case


def case_seed(seed: int, n: int, role: str) -> int:
    """A simulation seed from (seed, N, role) only: the same in any worker or order.

    Not from lambda: Table 1's rows then share proof-of-work draws, origins and
    arrival streams (common random numbers), so the trend in lambda is not noise.
    """
    digest = hashlib.sha256(f"edgekey-paper:{seed}:{n}:{role}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _add_background(sim: Any, paths: dict[str, tuple[str, ...]], rates: dict[str, float]) -> None:
    for name, rate in rates.items():
        if rate > 0:
            sim.poisson(paths[name], rate, tag="meters", leaves=True, name=f"meters-{name}")


def measure(model: Model, topo: Topology, lam: float, seed: int) -> Any:
    """The network as the router sees it: background loads measured in a separate run."""
    from agent.routing.network import Network
    from tools.netsim import NetSim

    net = physical_network(model, topo)
    sim = NetSim(net, case_seed(seed, len(topo.names), "measure"))
    _add_background(sim, paths_to_gateway(topo), background_rates(topo, lam))
    sim.run(model.warmup_s)
    before = sim.snapshot()
    sim.run(model.warmup_s + model.measure_s)
    win = sim.snapshot().since(before)
    nodes = [replace(node, arrival_rate=win.node_arrival_rate(name))
             for name, node in net.nodes.items()]
    links = [replace(lk, load=min(lk.capacity, win.link_load_bps(lk.a, lk.b)))
             for lk in net.links]
    return Network(nodes, links)


def ledger_rate_bps(model: Model, n: int) -> float:
    """Time-averaged bit/s one origin's broadcast puts on each destination's path."""
    from agent.routing.network import PACKET_BITS

    per_block = (2 + model.block_packets) * PACKET_BITS  # request, endorsement back, block
    return per_block / (n * model.block_interval_s)


def delay_bound(network: Any, origin: str, rate_bps: float, model: Model) -> float:
    """T_max for origin's broadcast: stretch x its largest fastest-path delay (see docstring)."""
    from agent.routing.network import Demand, RouteSearch

    worst = 0.0
    for dst in network.nodes:
        if dst == origin:
            continue
        search = RouteSearch(network, Demand(origin, dst, rate_bps))
        path = search.fastest_path(model.max_hops)
        if path is None:
            raise PaperError(f"no path {origin} -> {dst} within {model.max_hops} hops")
        worst = max(worst, network.path_delay(path, rate_bps))
    return model.delay_stretch * worst


def origins(topo: Topology, model: Model, seed: int) -> list[str]:
    """Who originates each block: the terminals in turn, in a seeded order."""
    order = list(topo.names)
    random.Random(case_seed(seed, len(topo.names), "origins")).shuffle(order)
    return [order[k % len(order)] for k in range(model.blocks)]


@dataclass
class MethodRun:
    """One method on one case: what the simulation measured (deterministic) and router time."""

    chain_ms: float
    endorse_ms: float
    pow_ms: float
    block_ms: float
    load_balance: float  # eq. 8, (Mbit/s)^2
    mean_hops: float
    link_losses: int
    buffer_drops: int
    route_s: float = field(default=0.0, compare=False)  # wall clock; not in results.json


def run_method(model: Model, topo: Topology, measured: Any, lam: float, seed: int,
               method: str, starters: list[str]) -> MethodRun:
    """Route every origin's broadcasts with ``method``, then simulate the ledger window."""
    import simpy

    from agent.routing.network import Bounds
    from agent.routing.queueing import load_balance_degree
    from agent.routing.router import broadcast_routes
    from tools.netsim import NetSim
    from tools.routing_methods import by_name

    n = len(topo.names)
    rate = ledger_rate_bps(model, n)
    route_fn = by_name(method)
    routes: dict[str, dict[str, tuple[str, ...]]] = {}
    hops: list[int] = []
    t0 = time.perf_counter()
    for o in sorted(set(starters)):
        if n == 1:
            routes[o] = {}
            continue
        bounds = Bounds(max_delay=delay_bound(measured, o, rate, model), max_hops=model.max_hops)
        chosen = broadcast_routes(measured, o, rate, bounds, route_fn)
        routes[o] = {d: r.path for d, r in chosen.items()}
        hops += [r.hops for r in chosen.values()]
    route_s = time.perf_counter() - t0

    net = physical_network(model, topo)
    sim = NetSim(net, case_seed(seed, n, "ledger"))
    _add_background(sim, paths_to_gateway(topo), background_rates(topo, lam))
    timings: list[Any] = []
    start = model.warmup_s
    end = start + model.blocks * model.block_interval_s

    def schedule() -> Any:
        procs = []
        for k, o in enumerate(starters):
            at = start + k * model.block_interval_s
            if at > sim.env.now:
                yield sim.env.timeout(at - sim.env.now)
            procs.append(sim.chain_build(o, routes[o], pow_mean_s=model.pow_ms / 1000,
                                         block_packets=model.block_packets,
                                         on_done=timings.append))
        yield simpy.AllOf(sim.env, procs)

    driver = sim.env.process(schedule())
    sim.run(start)
    before = sim.snapshot()
    sim.run(end)
    win = sim.snapshot().since(before)
    limit = end + 60.0  # simulated seconds: a ledger that has not finished by then never will
    sim.run(simpy.AnyOf(sim.env, [driver, sim.env.timeout(limit - sim.now)]))
    if not driver.triggered:
        raise PaperError(f"N={n}, lambda={lam}, {method}: chain building did not finish "
                         "(the network is overloaded)")
    if net.links:
        idle = [b / 1e6 for b in win.idle_bandwidths(net)]
        if min(idle) < 0:
            raise PaperError(f"N={n}, lambda={lam}, {method}: a link carried more than its "
                             "capacity")
        lb = load_balance_degree(idle)
    else:
        lb = 0.0  # N = 1: no links, nothing to balance (eq. 8's N_num = 0)
    return MethodRun(
        chain_ms=1000 * statistics.fmean(t.chain_time for t in timings),
        endorse_ms=1000 * statistics.fmean(t.endorsed - t.start for t in timings),
        pow_ms=1000 * statistics.fmean(t.sealed - t.endorsed for t in timings),
        block_ms=1000 * statistics.fmean(t.done - t.sealed for t in timings),
        load_balance=lb,
        mean_hops=statistics.fmean(hops) if hops else 0.0,
        link_losses=sum(c.lost for c in win.links.values()),
        buffer_drops=sum(c.dropped for c in win.nodes.values()),
        route_s=route_s)


def run_case(job: tuple[Model, int, float, int]) -> tuple[tuple[int, float, int],
                                                        dict[str, MethodRun]]:
    """Every method on one (N, lambda, seed): one topology, one measurement, four ledgers."""
    model, n, lam, seed = job
    topo = topology(model, n, seed)
    measured = measure(model, topo, lam, seed)
    starters = origins(topo, model, seed)
    runs = {m: run_method(model, topo, measured, lam, seed, m, starters) for m in METHODS}
    return (n, lam, seed), runs


# ---------------------------------------------------------------- the command










def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``edgekey paper``."""
    p.add_argument("--out", metavar="DIR", type=Path, default=Path("out/paper"),
                   help="output folder (default out/paper)")
    p.add_argument("--seeds", metavar="N", type=positive_int, default=None,
                   help=f"seeds per point, mean and standard error over them (default "
                        f"{DEFAULT_SEEDS}; --quick: 1)")
    p.add_argument("--seed", metavar="S", type=nonneg_int, default=0,
                   help="first seed (default 0)")
    p.add_argument("--terminals", metavar="MAX", type=positive_int, default=None,
                   help=f"Figures 6-7 run N = 1..MAX (default 20; --quick: {QUICK_TERMINALS})")
    p.add_argument("--table-terminals", metavar="N", type=positive_int, default=None,
                   help=f"N for Table 1 (default the paper's {PAPER_TERMINALS}, at most MAX)")
    p.add_argument("--figure-lambda", metavar="PPS", type=positive_float, default=200.0,
                   help="meter packets/s per terminal for Figures 6-7 (default 200, the "
                        "paper's heaviest load)")
    p.add_argument("--pow-ms", metavar="MS", type=nonneg_float, default=Model.pow_ms,
                   help="mean proof-of-work time per block (default 2.5: 256 double SHA-256 "
                        "at ~10 us on a 700 MHz Cortex-A7, difficulty 8 read as 8 zero bits)")
    p.add_argument("--board", default="pl-terminal",
                   help="board whose forwarding rate, buffer and link rate to use")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny run for tests: N <= {QUICK_TERMINALS}, one seed, "
                        f"{QUICK_BLOCKS} blocks, short windows")
    p.add_argument("--workers", metavar="N", type=positive_int, default=os.cpu_count() or 1,
                   help="worker processes (default: every core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(sub: argparse._SubParsersAction, handler: Any = None) -> argparse.ArgumentParser:
    """Register ``paper``; its handler is ``handler`` (default ``run``)."""
    p = sub.add_parser(
        "paper", help="reproduce the paper's Table 1 and Figures 6-7 (routing, chain time)",
        description="Simulate the ledger's chain building over the terminals (SimPy, M/M/1/M "
                    "queues) with the greedy router and three baselines; write Table 1, "
                    "Figures 6-7 and a report with the paper's values beside ours.")
    add_arguments(p)
    p.set_defaults(handler=handler or run)
    return p


@dataclass
class Experiment:
    """What to run, resolved from the options."""

    model: Model
    seeds: list[int]
    terminals: int
    table_terminals: int
    figure_lambda: float
    board: str
    quick: bool
    jobs: list[tuple[int, float, int]]


def resolve(args: argparse.Namespace) -> Experiment:
    from agent.routing.network import PACKET_BITS
    from hal.board import board_path, load_board

    board = load_board(board_path(args.board))
    rate_bps = board.wan.rate_mbit_s * 1e6
    model = Model(service_rate_pps=rate_bps / PACKET_BITS, buffer=board.wan.forward_buffer_packets,
                  link_capacity_bps=rate_bps, pow_ms=args.pow_ms)
    if args.quick:
        model = replace(model, blocks=QUICK_BLOCKS, measure_s=0.1, warmup_s=0.02)
    model.check()
    terminals = args.terminals or (QUICK_TERMINALS if args.quick else 20)
    table_n = args.table_terminals or min(PAPER_TERMINALS, terminals)
    if table_n > terminals:
        raise PaperError(f"--table-terminals {table_n} is above --terminals {terminals}")
    if terminals > model.meters:
        raise PaperError(f"--terminals {terminals}: at most one terminal per meter "
                         f"({model.meters})")
    n_seeds = args.seeds or (1 if args.quick else DEFAULT_SEEDS)
    seeds = list(range(args.seed, args.seed + n_seeds))
    wanted = {(table_n, float(lam)) for lam in LAMBDAS}
    wanted |= {(n, float(args.figure_lambda)) for n in range(1, terminals + 1)}
    # Largest first: the slow cases start early and the workers finish together.
    jobs = [(n, lam, s) for n, lam in sorted(wanted, key=lambda t: (-t[0], t[1]))
            for s in seeds]
    return Experiment(model, seeds, terminals, table_n, float(args.figure_lambda), args.board,
                args.quick, jobs)


def compute(plan: Experiment, workers: int, progress: bool) -> tuple[dict[tuple[int, float, int],
                                                                   dict[str, MethodRun]], float]:
    """Run every case (in a process pool when workers > 1); results and wall seconds."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    results: dict[tuple[int, float, int], dict[str, MethodRun]] = {}
    jobs = [(plan.model, n, lam, s) for n, lam, s in plan.jobs]
    tqdm.monitor_interval = 0  # no monitor thread in a process that forks workers
    with tqdm(total=len(jobs), desc="edgekey paper", unit="case", file=sys.stderr,
              disable=not progress) as bar:
        if workers <= 1 or len(jobs) == 1:
            for job in jobs:
                key, runs = run_case(job)
                results[key] = runs
                bar.update()
        else:
            import multiprocessing

            # fork: the children inherit the loaded modules and need no __main__ guard.
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for key, runs in pool.imap_unordered(run_case, jobs):
                    results[key] = runs
                    bar.set_postfix_str(f"N={key[0]}, lambda={key[1]:g}")
                    bar.update()
    return results, time.perf_counter() - t0


# ---------------------------------------------------------------- summaries

FIELDS = ("chain_ms", "endorse_ms", "pow_ms", "block_ms", "load_balance", "mean_hops",
          "link_losses", "buffer_drops")


def _stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for one value)."""
    v = [float(x) for x in values]
    se = statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0
    return statistics.fmean(v), se


def point(results: dict, n: int, lam: float, seeds: Iterable[int], method: str) -> dict:
    """Mean (and standard error) over seeds of every field for one (N, lambda, method)."""
    runs = [results[(n, lam, s)][method] for s in seeds]
    out: dict[str, Any] = {}
    for f in FIELDS:
        mean, se = _stats([getattr(r, f) for r in runs])
        out[f] = mean
        out[f + "_se"] = se
    out["per_seed"] = {f: [getattr(r, f) for r in runs] for f in ("chain_ms", "load_balance")}
    return out


def growth(series: dict[str, dict[str, list[float]]], terminals: list[int], key: str,
           n_from: int, n_to: int) -> dict[str, Any]:
    """growth_m = value(n_to) - value(n_from); reduction vs b = 1 - growth_greedy / growth_b."""
    i, j = terminals.index(n_from), terminals.index(n_to)
    g = {m: series[m][key][j] - series[m][key][i] for m in METHODS}
    red = {b: (100.0 * (1 - g["greedy"] / g[b]) if g[b] > 0 else None) for b in BASELINES}
    return {"growth": g, "reduction_pct": red}


def summarise(plan: Experiment, results: dict) -> dict[str, Any]:
    """results.json: the model, Table 1, the figures' series, the growth reductions."""
    table = []
    for lam in LAMBDAS:
        for m in METHODS:
            row = {"lambda": lam, "method": m,
                   **point(results, plan.table_terminals, float(lam), plan.seeds, m)}
            paper = PAPER_TABLE1[lam] if m == "greedy" else (None, None)
            row["paper_chain_ms"], row["paper_load_balance"] = paper
            table.append(row)
    ns = list(range(1, plan.terminals + 1))
    series: dict[str, dict[str, list[float]]] = {}
    for m in METHODS:
        pts = [point(results, n, plan.figure_lambda, plan.seeds, m) for n in ns]
        series[m] = {f: [p[f] for p in pts] for f in
                     ("chain_ms", "chain_ms_se", "load_balance", "load_balance_se", "mean_hops")}
    n_to = min(GROWTH_TO, plan.terminals)
    grow = None
    if n_to > GROWTH_FROM:
        grow = {"from": GROWTH_FROM, "to": n_to,
                "chain_ms": growth(series, ns, "chain_ms", GROWTH_FROM, n_to),
                "load_balance": growth(series, ns, "load_balance", GROWTH_FROM, n_to),
                "paper_reduction_pct": {"chain_ms": PAPER_TIME_REDUCTION,
                                        "load_balance": PAPER_LOAD_REDUCTION}}
    return {
        "model": asdict(plan.model), "board": plan.board, "seeds": plan.seeds,
        "quick": plan.quick, "load_balance_unit": "(Mbit/s)^2", "time_unit": "ms",
        "table1": {"terminals": plan.table_terminals, "rows": table},
        "figures": {"lambda": plan.figure_lambda, "terminals": ns, "series": series},
        "growth": grow,
        "paper": {"table1": {str(k): {"chain_ms": v[0], "load_balance": v[1]}
                             for k, v in PAPER_TABLE1.items()},
                  "terminals": PAPER_TERMINALS},
    }


# ---------------------------------------------------------------- output


def fmt_ms(v: float) -> str:
    return f"{v:.3f}"


def fmt_lb(v: float) -> str:
    return f"{v:.4f}"


def fmt_pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def command_line(args: argparse.Namespace) -> str:
    parts = ["edgekey", "paper", "--out", str(args.out), "--seed", str(args.seed)]
    if args.seeds is not None:
        parts += ["--seeds", str(args.seeds)]
    if args.terminals is not None:
        parts += ["--terminals", str(args.terminals)]
    if args.table_terminals is not None:
        parts += ["--table-terminals", str(args.table_terminals)]
    parts += ["--figure-lambda", f"{args.figure_lambda:g}", "--pow-ms", f"{args.pow_ms:g}",
              "--board", args.board]
    if args.quick:
        parts.append("--quick")
    return " ".join(shlex.quote(p) for p in parts)


def table1_markdown(summary: dict[str, Any]) -> str:
    """Table 1 (ours beside the paper's): every lambda, every method."""
    t = summary["table1"]
    se = len(summary["seeds"]) > 1
    pm = " (± s.e.)" if se else ""
    lines = [f"Table 1 (reproduced): chain-building time and load-balance degree vs lambda, "
             f"N = {t['terminals']} terminals, mean over {len(summary['seeds'])} seed(s)"
             + (", ± standard error" if se else "") + ".",
             "",
             f"| lambda (packets/s) | method | chain time (ms){pm} | load balance "
             f"((Mbit/s)^2){pm} | chain time (ms), paper | load balance (no unit), paper |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in t["rows"]:
        ct = fmt_ms(r["chain_ms"]) + (f" ± {fmt_ms(r['chain_ms_se'])}" if se else "")
        lb = fmt_lb(r["load_balance"]) + (f" ± {fmt_lb(r['load_balance_se'])}" if se else "")
        pc = "-" if r["paper_chain_ms"] is None else f"{r['paper_chain_ms']:.2f} (paper)"
        pl = "-" if r["paper_load_balance"] is None else f"{r['paper_load_balance']:.1f} (paper)"
        lines.append(f"| {r['lambda']} | {r['method']} | {ct} | {lb} | {pc} | {pl} |")
    return "\n".join(lines) + "\n"


def growth_markdown(summary: dict[str, Any]) -> str:
    g = summary["growth"]
    if g is None:
        return "Growth reductions need at least two terminal counts.\n"
    lines = [f"Growth from {g['from']} to {g['to']} terminals (lambda = "
             f"{summary['figures']['lambda']:g} packets/s): growth_m = value_m({g['to']}) - "
             f"value_m({g['from']}); reduction = 1 - growth_greedy / growth_baseline.",
             "",
             "| quantity | method | growth | greedy's reduction vs it (%) | reduction, paper (%) |",
             "|---|---|---:|---:|---:|"]
    for key, label, f in (("chain_ms", "chain time (ms)", fmt_ms),
                          ("load_balance", "load balance ((Mbit/s)^2)", fmt_lb)):
        for m in METHODS:
            red = g[key]["reduction_pct"].get(m) if m != "greedy" else None
            paper = g["paper_reduction_pct"][key].get(m)
            lines.append(f"| {label} | {m} | {f(g[key]['growth'][m])} | "
                         f"{'-' if m == 'greedy' else fmt_pct(red)} | "
                         f"{'-' if paper is None else f'{paper:.2f} (paper)'} |")
    if g["to"] != GROWTH_TO:
        lines += ["", f"(The paper's span is 1 to {GROWTH_TO} terminals; this run stops at "
                      f"{g['to']}.)"]
    return "\n".join(lines) + "\n"


def breakdown_markdown(summary: dict[str, Any]) -> str:
    t = summary["table1"]
    lines = [f"Where the chain time goes (N = {t['terminals']}, means over seeds): endorsement "
             "round to a majority, proof of work, block to the last terminal; route hops; "
             "losses in the ledger window.",
             "",
             "| lambda | method | endorse (ms) | PoW (ms) | block (ms) | mean hops | "
             "link losses | buffer drops |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in t["rows"]:
        lines.append(f"| {r['lambda']} | {r['method']} | {fmt_ms(r['endorse_ms'])} | "
                     f"{fmt_ms(r['pow_ms'])} | {fmt_ms(r['block_ms'])} | "
                     f"{r['mean_hops']:.2f} | {r['link_losses']:.1f} | "
                     f"{r['buffer_drops']:.1f} |")
    return "\n".join(lines) + "\n"


def _figure(path: Path, summary: dict[str, Any], key: str, ylabel: str, title: str,
            paper_note: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2), constrained_layout=True)
    ns = summary["figures"]["terminals"]
    markers = {"greedy": "o", "shortest": "s", "reliability": "^", "residual": "D"}
    for m in METHODS:
        s = summary["figures"]["series"][m]
        ax.errorbar(ns, s[key], yerr=s[key + "_se"], marker=markers[m], ms=4, capsize=3,
                    lw=1.4, label=TITLES[m])
    ax.set_xlabel("number of terminals N")
    ax.set_ylabel(ylabel)
    ax.set_xticks(ns if len(ns) <= 20 else ns[::2])
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    seeds = len(summary["seeds"])
    ax.set_title(f"{title}\nlambda = {summary['figures']['lambda']:g} packets/s per terminal; "
                 f"mean of {seeds} seed(s)" + (", bars: ± standard error" if seeds > 1 else "")
                 + f"\n{paper_note}", fontsize=9.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figures(out: Path, summary: dict[str, Any]) -> list[Path]:
    time_note = ("paper: greedy's 1->10 growth smaller by " + ", ".join(
        f"{v:.2f} % vs {k}" for k, v in PAPER_TIME_REDUCTION.items()))
    load_note = ("paper: greedy's 1->10 growth smaller by " + ", ".join(
        f"{v:.2f} % vs {k}" for k, v in PAPER_LOAD_REDUCTION.items()))
    return [
        _figure(out / "figure6.png", summary, "chain_ms", "chain-building time (ms)",
                "Figure 6 (reproduced): chain-building time vs terminals", time_note),
        _figure(out / "figure7.png", summary, "load_balance",
                "load-balance degree, eq. 8 ((Mbit/s)^2)",
                "Figure 7 (reproduced): load-balance degree vs terminals", load_note),
    ]


def report_markdown(args: argparse.Namespace, plan: Experiment, summary: dict[str, Any],
                    seconds: float, route_times: dict[str, float]) -> str:
    m = plan.model
    t = summary["table1"]
    greedy = {r["lambda"]: r for r in t["rows"] if r["method"] == "greedy"}
    lo, hi = greedy[LAMBDAS[0]], greedy[LAMBDAS[-1]]
    lines = [
        "# Routing and chain building: ours against the paper's Table 1 and Figures 6-7",
        "",
        f"- Command: `{command_line(args)}`",
        f"- Seeds {plan.seeds[0]}..{plan.seeds[-1]} ({len(plan.seeds)}); "
        f"{len(plan.jobs)} cases x {len(METHODS)} methods simulated in {seconds:.1f} s "
        f"({args.workers} worker(s)); router time per method (all cases): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in route_times.items()) + ".",
        "- Values marked **paper** are Zhai et al.'s own (section 3, Table 1 and the text "
        "on Figures 6-7); everything else is measured here. Nothing was fitted to them.",
        "",
        "## Table 1",
        "",
        table1_markdown(summary),
        breakdown_markdown(summary),
        "## Figures 6 and 7",
        "",
        "![Figure 6](figure6.png)",
        "",
        "![Figure 7](figure7.png)",
        "",
        growth_markdown(summary),
        "## Where our model disagrees with the paper",
        "",
        f"- **Absolute chain time.** Ours is {fmt_ms(lo['chain_ms'])} ms at lambda = 50 and "
        f"{fmt_ms(hi['chain_ms'])} ms at 200 (greedy, N = {t['terminals']}); the paper's is "
        "61.23 and 280.64 ms (**paper**). With the paper's own figures (mu = 25 Mbit/s, "
        "360-byte packets) a terminal forwards 8680.6 packets/s, so even the gateway, "
        f"which forwards all N x lambda meter packets, stays at rho <= "
        f"{t['terminals'] * LAMBDAS[-1] / m.service_rate_pps:.2f} at N = {t['terminals']}: "
        "queueing adds fractions of a millisecond per hop, and chain time is dominated by "
        "the proof of work, hop count and retransmission waits. The paper's near-linear "
        f"growth with lambda (x{PAPER_TABLE1[200][0] / PAPER_TABLE1[50][0]:.2f} from 50 to "
        "200) does not follow from eq. 5-7 at these "
        "rates; it must come from parts of its NS2 set-up the paper does not describe.",
        "- **Load-balance degree.** Ours is eq. 8 in (Mbit/s)^2 over every link's "
        "time-averaged idle bandwidth; the paper's 67-270 carry no unit and are not "
        "comparable in magnitude. From lambda = 50 to 200 ours (greedy) changes "
        f"x{_ratio(hi['load_balance'], lo['load_balance'])}, the paper's x"
        f"{PAPER_TABLE1[200][1] / PAPER_TABLE1[50][1]:.2f} (**paper**); our chain time "
        f"changes x{_ratio(hi['chain_ms'], lo['chain_ms'])}, the paper's x"
        f"{PAPER_TABLE1[200][0] / PAPER_TABLE1[50][0]:.2f} (**paper**). The meter traffic "
        "scales with lambda, the ledger's does not, so a variance of link loads grows "
        "between lambda^0 and lambda^2 here.",
        *methods_findings(summary),
        "",
        "## The model (every assumption)",
        "",
        f"- Meters: the paper's 300 in {m.width_m / 1000:g} km x {m.height_m / 1000:g} km, "
        f"generated ({m.layout}, seeded by the seed); the paper does not publish its layout.",
        f"- Terminals: N sites from our planner (K-means + graph medoid, section 2.1), cap "
        f"ceil(300 x {1 + m.margin:g} / N) meters each (25 at N = 13), seeded by the seed.",
        "- Links: the Delaunay triangulation of the sites (natural neighbours; connected, "
        "with alternative paths); N = 2 one link, collinear sites a chain. Capacity "
        f"{m.link_capacity_bps / 1e6:g} Mbit/s (board `{plan.board}`, `wan.rate_mbit_s`, "
        f"the paper's forwarding rate); latency length / {m.propagation_mps:.0e} m/s; "
        f"delivery exp(-length / {m.loss_length_m / 1000:g} km), about "
        f"{100 * (1 - math.exp(-1000 / m.loss_length_m)):.1f} % loss per km (assumed).",
        f"- Terminals forward through one M/M/1/M queue each: mu = "
        f"{m.service_rate_pps:.1f} packets/s (25 Mbit/s / 360 bytes), M = {m.buffer} "
        f"(board `wan.forward_buffer_packets`), t_rw = {m.retransmit_wait_s * 1000:g} ms "
        "(assumed). Source queues count, destinations only receive; links are a fixed "
        "transmission + propagation delay (tools/netsim.py lists the packet rules).",
        "- Background: each terminal's meters send Poisson 360-byte packets at lambda x "
        "(its meters / mean meters), i.e. lambda per terminal on average (200 packets/s = "
        "72 KByte/s, inside the board's 25-128 KByte/s PLC range), to the gateway (terminal "
        "nearest the area's centre, with the WAN uplink) along the geographically shortest "
        "path, out through the gateway's queue.",
        f"- What the router sees: link bit/s and terminal packets/s measured over "
        f"{m.measure_s:g} s of a separate background-only run (its own seed).",
        f"- Ledger: {m.blocks} key operations, one every {m.block_interval_s * 1000:g} ms "
        f"after a {m.warmup_s * 1000:g} ms warm-up, originated by the terminals in a "
        "seeded turn. Each: endorsement requests to all others and endorsements back along "
        "the reversed path (first broadcast, done at a majority of all terminals), proof of "
        f"work (exponential, mean {m.pow_ms:g} ms), block of {m.block_packets} packet(s) to "
        "all others (second broadcast). Chain time: request until the last terminal has the "
        "block; N = 1 is the proof of work alone.",
        f"- Proof of work: {m.pow_ms:g} ms by default = 256 expected double SHA-256 (difficulty "
        "8 read as 8 leading zero bits) at ~10 us each in Go on a 700 MHz Cortex-A7; the "
        "same for every method (common random numbers), so it shifts but does not separate "
        "them.",
        "- Routes: `broadcast_routes(measured, origin, r, Bounds(T_max, H_max), "
        "by_name(method))` per "
        f"origin, r = 3 packets x 2880 bit / (N x {m.block_interval_s * 1000:g} ms) (the "
        f"ledger's time-averaged rate per destination), H_max = {m.max_hops}, T_max = "
        f"{m.delay_stretch:g} x the origin's largest fastest-path delay (the router may "
        "spread load but reach no terminal later than the farthest one on its fastest path; "
        "the paper gives no T_max). Baselines ignore T_max (agent/routing/baselines.py).",
        "- Load balance: eq. 8 over all links, B_j = capacity - time-averaged bit/s carried "
        "(both directions, every transmission attempt, background + ledger) over the ledger "
        "window, in (Mbit/s)^2; N = 1 has no links and counts 0.",
        f"- Table 1 at N = {t['terminals']}; Figures 6-7 at lambda = "
        f"{summary['figures']['lambda']:g} packets/s, N = 1..{plan.terminals}; means over "
        "seeds, error bars one standard error of the mean. Each seed changes the meters, "
        "the sites and every random stream; the four methods of a case share them.",
        "",
    ]
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def methods_findings(summary: dict[str, Any]) -> list[str]:
    """What this run says about the four methods, read off the numbers (not asserted)."""
    t = summary["table1"]
    top = max(r["lambda"] for r in t["rows"])
    at = {r["method"]: r for r in t["rows"] if r["lambda"] == top}
    fastest = min(METHODS, key=lambda m: at[m]["chain_ms"])
    flattest = min(METHODS, key=lambda m: at[m]["load_balance"])
    lines = [
        f"- **The methods, N = {t['terminals']}, lambda = {top}.** Fastest chain building: "
        f"{fastest} ({fmt_ms(at[fastest]['chain_ms'])} ms; greedy "
        f"{fmt_ms(at['greedy']['chain_ms'])} ms). Lowest load-balance degree: {flattest} "
        f"({fmt_lb(at[flattest]['load_balance'])}; greedy "
        f"{fmt_lb(at['greedy']['load_balance'])}). Greedy's routes average "
        f"{at['greedy']['mean_hops']:.2f} hops against shortest path's "
        f"{at['shortest']['mean_hops']:.2f}: spreading load costs hops, and each hop costs "
        "forwarding time and exposure to link loss. The paper claims greedy is best on both; "
        "here it is so only where the numbers above say so."]
    g = summary["growth"]
    if g is not None:
        for key, name, paper_red in (("chain_ms", "chain-time", PAPER_TIME_REDUCTION),
                                     ("load_balance", "load-balance", PAPER_LOAD_REDUCTION)):
            ours = g[key]["reduction_pct"]
            lines.append(
                f"- **Growth {g['from']} -> {g['to']} terminals, {name}.** Greedy's growth "
                "is smaller than " + ", ".join(
                    f"{b}'s by {fmt_pct(ours[b])} %" for b in BASELINES)
                + " (negative: larger); **paper**: " + ", ".join(
                    f"{paper_red[b]:.2f} %" for b in BASELINES) + ".")
    return lines


def run(args: argparse.Namespace) -> int:
    """The handler: 0 on success, 1 with one ``edgekey paper: ...`` line on bad input."""
    from hal.board import BoardConfigError
    from tools.report import table

    try:
        plan = resolve(args)
        results, seconds = compute(plan, args.workers, not args.no_progress)
    except (PaperError, BoardConfigError) as exc:
        print(f"edgekey paper: {exc}", file=sys.stderr)
        return 1
    summary = summarise(plan, results)
    route_times = {m: sum(r[m].route_s for r in results.values()) for m in METHODS}
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = figures(out, summary)
        for name, text in (
                ("results.json", json.dumps(summary, indent=2, sort_keys=True) + "\n"),
                ("table1.md", table1_markdown(summary)),
                ("report.md", report_markdown(args, plan, summary, seconds, route_times))):
            (out / name).write_text(text, encoding="utf-8")
            paths.append(out / name)
    except OSError as exc:
        print(f"edgekey paper: cannot write the results to {out}: {exc}", file=sys.stderr)
        return 1
    rows = []
    for r in summary["table1"]["rows"]:
        paper = (f"   paper {r['paper_chain_ms']:.2f} ms / {r['paper_load_balance']:.1f}"
                 if r["paper_chain_ms"] is not None else "")
        rows.append((f"lambda {r['lambda']:>3} {r['method']}",
                     f"{fmt_ms(r['chain_ms'])} ms  L_load {fmt_lb(r['load_balance'])} "
                     f"(Mbit/s)^2{paper}"))
    g = summary["growth"]
    if g is not None:
        for key, name, paper in (("chain_ms", "time", PAPER_TIME_REDUCTION),
                                 ("load_balance", "load", PAPER_LOAD_REDUCTION)):
            for b in BASELINES:
                rows.append((f"{name} growth {g['from']}->{g['to']} vs {b}",
                             f"{fmt_pct(g[key]['reduction_pct'][b])} % smaller   "
                             f"paper {paper[b]:.2f} %"))
    rows.append(("wall time", f"{seconds:.1f} s, {args.workers} worker(s)"))
    print(table(rows, f"edgekey paper: Table 1 at N = {summary['table1']['terminals']}, "
                      f"growth at lambda {summary['figures']['lambda']:g}"))
    print()
    for p in paths:
        print(f"wrote {p}")
    return 0
