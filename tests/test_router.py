"""The greedy router of eq. 9 against the exhaustive optimum, its errors, the incremental Router."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.routing.baselines import reliability_route, residual_route, shortest_route
from agent.routing.exact import exact_route
from agent.routing.network import (
    PACKET_BITS,
    Bounds,
    Demand,
    Link,
    Network,
    NetworkError,
    Node,
    NoRouteError,
    RouteSearch,
    iter_simple_paths,
)
from agent.routing.router import Router, broadcast_routes, greedy_route
from tools.routing_methods import METHODS, by_name

MU = 25e6 / PACKET_BITS

# Generating whole networks is the slow part: 60 examples on the host, half
# the profile's count under emulation (20), where hypothesis itself is slow.
FEW = settings(max_examples=min(60, settings.default.max_examples // 2))


def node(name: str, **kw: object) -> Node:
    return Node(name, **{"service_rate": MU, "buffer": 50, **kw})


def random_instance(rng: random.Random, sizes: tuple[int, int] = (6, 9),
                    density: tuple[float, float] = (0.15, 0.6)
                    ) -> tuple[Network, Demand, Bounds]:
    """Mostly connected, loads up to 95 %, delay bounds from loose to tight."""
    n = rng.randint(*sizes)
    names = [f"t{i}" for i in range(n)]
    nodes = [Node(nm, service_rate=rng.uniform(200, 2000), buffer=rng.randint(2, 30),
                  arrival_rate=rng.uniform(0, 1500), retransmit_wait=rng.uniform(0, 0.05))
             for nm in names]
    pairs = set()
    if rng.random() < 0.9:  # a random spanning tree; else maybe disconnected
        for i in range(1, n):
            pairs.add((names[rng.randrange(i)], names[i]))
    p = rng.uniform(*density)
    pairs |= {(a, b) for i, a in enumerate(names) for b in names[i + 1:] if rng.random() < p}
    links = []
    for a, b in sorted(pairs):
        cap = rng.choice([1e6, 2e6, 5e6, 10e6])
        links.append(Link(a, b, cap, load=cap * rng.uniform(0, 0.95),
                          delivery=rng.uniform(0.7, 1.0), latency=rng.uniform(0, 0.01)))
    net = Network(nodes, links)
    src, dst = rng.sample(names, 2)
    demand = Demand(src, dst, rng.uniform(0.05e6, 1e6))
    hops = rng.randint(1, 8)
    kind = rng.randrange(3)
    if kind == 0:
        max_delay = math.inf
    elif kind == 1:
        max_delay = rng.uniform(0.005, 0.1)
    else:  # just above the fastest path: the delay bound binds
        fastest = RouteSearch(net, demand).fastest_path(hops)
        max_delay = (net.path_delay(fastest, demand.rate_bps) * rng.uniform(1.0, 1.5)
                     if fastest else 0.05)
    return net, demand, Bounds(max_delay, hops)


def attempt(fn, net: Network, demand: Demand, bounds: Bounds):
    try:
        return fn(net, demand, bounds)
    except NoRouteError as err:
        return err


# ---------------------------------------------------------------- greedy vs exact

# Measured with this seed: greedy found the exact optimum in all 595
# routable instances (and in all of 3,000 more with other seeds); with one
# label per node instead of LABELS_PER_NODE = 4 it was 97.8 % (mean gap
# 8e-4, worst 18 %). The bounds leave room for a rare miss, not for that.
OPTIMAL_SHARE_AT_LEAST = 0.98
MEAN_GAP_AT_MOST = 1e-3
# Greedy's eq. 8 was <= each baseline's on 100 % of the instances where both
# routes met the bounds (85-96 % of the routable ones, per baseline).
BEATS_BASELINE_SHARE_AT_LEAST = 0.98


def test_greedy_matches_exact_on_random_small_networks(capsys: pytest.CaptureFixture) -> None:
    rng = random.Random(20240611)
    gaps: list[float] = []
    reasons: dict[str, int] = {}
    versus = {name: [0, 0] for name in ("shortest", "reliability", "residual")}
    for _ in range(800):
        net, demand, bounds = random_instance(rng)
        best = attempt(exact_route, net, demand, bounds)
        got = attempt(greedy_route, net, demand, bounds)
        if isinstance(best, NoRouteError):
            # greedy never "finds" a route exact proves impossible, and agrees on why
            assert isinstance(got, NoRouteError), (demand, bounds, got)
            assert got.reason == best.reason
            reasons[best.reason] = reasons.get(best.reason, 0) + 1
            continue
        assert not isinstance(got, NoRouteError), (demand, bounds, got)
        assert got.feasible and got.method == "greedy"
        assert got.delay <= bounds.max_delay and got.hops <= bounds.max_hops
        gap = (got.load_balance - best.load_balance) / best.load_balance
        assert gap >= -1e-9, "the greedy beat the exhaustive optimum: exact_route is wrong"
        gaps.append(max(gap, 0.0))
        for name, fn in (("shortest", shortest_route), ("reliability", reliability_route),
                         ("residual", residual_route)):
            other = fn(net, demand, bounds)
            if other.feasible:
                versus[name][1] += 1
                versus[name][0] += got.load_balance <= other.load_balance * (1 + 1e-12)
    optimal = sum(g <= 1e-9 for g in gaps) / len(gaps)
    with capsys.disabled():
        print(f"\ngreedy vs exact: {len(gaps)} routable, optimal {optimal:.1%}, relative gap "
              f"mean {statistics.fmean(gaps):.2e} max {max(gaps):.2e}; no route: {reasons}; "
              "greedy <= baseline: " + ", ".join(f"{k} {w}/{n}" for k, (w, n) in versus.items()))
    assert len(gaps) >= 500 and len(reasons) == 4  # every outcome is exercised
    assert optimal >= OPTIMAL_SHARE_AT_LEAST
    assert statistics.fmean(gaps) <= MEAN_GAP_AT_MOST
    for wins, both in versus.values():
        assert both >= 400 and wins / both >= BEATS_BASELINE_SHARE_AT_LEAST


def test_greedy_stays_near_exact_on_random_mid_size_networks(
        capsys: pytest.CaptureFixture) -> None:
    """10-13 terminals: room for the label search to go wrong.

    Measured with LABELS_PER_NODE = 4: optimal on 119 of these 120 routable
    instances (and on 720 of 720 with six other seeds). With 2 labels per
    node it was 96.7 % here, with 1 label 92.5 % (88-95 % on the other
    seeds): the bounds below reject both.
    """
    rng = random.Random(77)
    gaps: list[float] = []
    while len(gaps) < 120:
        net, demand, bounds = random_instance(rng, sizes=(10, 13), density=(0.2, 0.45))
        best = attempt(exact_route, net, demand, bounds)
        got = attempt(greedy_route, net, demand, bounds)
        if isinstance(best, NoRouteError):
            assert isinstance(got, NoRouteError) and got.reason == best.reason
            continue
        assert not isinstance(got, NoRouteError) and got.feasible
        gaps.append(max(0.0, (got.load_balance - best.load_balance) / best.load_balance))
    optimal = sum(g <= 1e-9 for g in gaps) / len(gaps)
    with capsys.disabled():
        print(f"\ngreedy vs exact, 10-13 terminals: optimal {optimal:.1%}, relative gap mean "
              f"{statistics.fmean(gaps):.2e} max {max(gaps):.2e}")
    assert optimal >= 0.97
    assert statistics.fmean(gaps) <= 5e-4


@st.composite
def small_networks(draw: st.DrawFn) -> tuple[Network, Demand, Bounds]:
    n = draw(st.integers(2, 7))
    names = [f"n{i}" for i in range(n)]
    nodes = [Node(nm, service_rate=draw(st.sampled_from([100.0, 1000.0, MU])),
                  buffer=draw(st.integers(1, 20)), arrival_rate=draw(st.floats(0, 2000)),
                  retransmit_wait=draw(st.floats(0, 0.1))) for nm in names]
    pairs = draw(st.sets(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(
        lambda p: p[0] < p[1]), max_size=12))
    links = [Link(names[i], names[j], cap, load=cap * draw(st.floats(0, 1)),
                  latency=draw(st.floats(0, 0.02)))
             for i, j in sorted(pairs) for cap in [draw(st.sampled_from([1e6, 4e6]))]]
    src, dst = draw(st.permutations(names))[:2]
    demand = Demand(src, dst, draw(st.floats(1e4, 2e6)))
    bounds = Bounds(draw(st.one_of(st.just(math.inf), st.floats(0.001, 0.1))),
                    draw(st.integers(1, 6)))
    return Network(nodes, links), demand, bounds


@FEW
@given(small_networks())
def test_greedy_returns_a_feasible_route_or_a_true_reason(case) -> None:
    net, demand, bounds = case
    got = attempt(greedy_route, net, demand, bounds)
    # The truth, by brute force over every simple path.
    every = list(iter_simple_paths(net, demand.src, demand.dst, len(net.nodes)))
    roomy = [p for p in every
             if all(net.idle(u, v) >= demand.rate_bps for u, v in itertools.pairwise(p))]
    short = [p for p in roomy if len(p) - 1 <= bounds.max_hops]
    fast = [p for p in short if net.path_delay(p, demand.rate_bps) <= bounds.max_delay]
    if isinstance(got, NoRouteError):
        assert not fast
        truth = ("disconnected" if not every else "capacity" if not roomy
                 else "hop_bound" if not short else "delay_bound")
        assert got.reason == truth
        assert repr(demand.src) in str(got) and repr(demand.dst) in str(got)
        best = attempt(exact_route, net, demand, bounds)
        assert isinstance(best, NoRouteError) and best.reason == got.reason
    else:
        assert got.path in fast and got.feasible
        assert got.delay == net.path_delay(got.path, demand.rate_bps)
        assert got.load_balance == net.with_flow(got.path, demand.rate_bps).load_balance()


# ---------------------------------------------------------------- hand-built cases

def triangle(direct_load: float) -> Network:
    """A-B direct (possibly congested) or the idle detour A-C-B."""
    return Network([node("A"), node("B"), node("C")],
                   [Link("A", "B", 10e6, load=direct_load), Link("A", "C", 10e6),
                    Link("C", "B", 10e6)])


def test_greedy_takes_the_longer_idle_path_around_a_congested_link() -> None:
    net = triangle(direct_load=9e6)
    route = greedy_route(net, Demand("A", "B", 0.5e6))
    assert route.path == ("A", "C", "B")
    direct = net.with_flow(("A", "B"), 0.5e6).load_balance()
    assert route.load_balance < direct


def test_greedy_keeps_the_direct_link_when_the_detour_breaks_a_bound() -> None:
    net = triangle(direct_load=9e6)
    demand = Demand("A", "B", 0.5e6)
    assert greedy_route(net, demand, Bounds(max_hops=1)).path == ("A", "B")
    direct = net.path_delay(("A", "B"), 0.5e6)
    assert net.path_delay(("A", "C", "B"), 0.5e6) > direct * 1.5
    assert greedy_route(net, demand, Bounds(max_delay=direct * 1.5)).path == ("A", "B")


def test_greedy_never_uses_a_link_without_room_for_the_demand() -> None:
    net = triangle(direct_load=0.0).with_link_stats("A", "C", load=9.8e6)
    assert greedy_route(net, Demand("A", "B", 0.5e6)).path == ("A", "B")


def test_no_route_reasons_on_hand_built_networks() -> None:
    line = Network([node(n) for n in "ABCDE"] + [node("Z")],
                   [Link("A", "B", 1e6), Link("B", "C", 1e6), Link("C", "D", 1e6),
                    Link("D", "E", 1e6, load=0.9e6)])
    cases = [
        (Demand("A", "Z", 1e3), Bounds(), "disconnected"),
        (Demand("A", "E", 0.5e6), Bounds(), "capacity"),
        (Demand("A", "D", 1e3), Bounds(max_hops=2), "hop_bound"),
        (Demand("A", "D", 1e3), Bounds(max_delay=1e-4), "delay_bound"),
    ]
    for demand, bounds, reason in cases:
        for fn in (greedy_route, exact_route):
            with pytest.raises(NoRouteError) as info:
                fn(line, demand, bounds)
            assert info.value.reason == reason
            assert "'A'" in str(info.value) and repr(demand.dst) in str(info.value)
    with pytest.raises(NoRouteError, match="H_max = 2"):
        greedy_route(line, Demand("A", "D", 1e3), Bounds(max_hops=2))
    with pytest.raises(NoRouteError, match=r"T_max = 0\.0001"):
        greedy_route(line, Demand("A", "D", 1e3), Bounds(max_delay=1e-4))


def test_unknown_terminal_and_wrong_types_are_refused() -> None:
    net = triangle(0.0)
    with pytest.raises(NetworkError, match="unknown node 'Q'"):
        greedy_route(net, Demand("A", "Q", 1e3))
    with pytest.raises(TypeError, match="Demand"):
        greedy_route(net, ("A", "B", 1e3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate_bps"):
        greedy_route(net, Demand("A", "B", math.nan))


def test_exact_refuses_an_enumeration_beyond_max_paths() -> None:
    names = [f"k{i}" for i in range(9)]
    clique = Network([node(n) for n in names],
                     [Link(a, b, 1e6) for i, a in enumerate(names) for b in names[i + 1:]])
    with pytest.raises(ValueError, match="max_paths = 1000"):
        exact_route(clique, Demand("k0", "k8", 1e3), max_paths=1000)


def test_routing_is_deterministic() -> None:
    rng = random.Random(5)
    for _ in range(30):
        net, demand, bounds = random_instance(rng)
        again = Network(list(net.nodes.values())[::-1], list(net.links)[::-1])
        a = attempt(greedy_route, net, demand, bounds)
        b = attempt(greedy_route, again, demand, bounds)
        assert (a.path, a.load_balance) == (b.path, b.load_balance) if not isinstance(
            a, NoRouteError) else b.reason == a.reason


# ---------------------------------------------------------------- broadcast

def grid(n: int = 3) -> Network:
    names = [f"g{r}{c}" for r in range(n) for c in range(n)]
    links = []
    for r in range(n):
        for c in range(n):
            if c + 1 < n:
                links.append(Link(f"g{r}{c}", f"g{r}{c + 1}", 10e6, load=(r * 3 + c) * 0.5e6,
                                  latency=0.001))
            if r + 1 < n:
                links.append(Link(f"g{r}{c}", f"g{r + 1}{c}", 10e6, load=c * 1e6,
                                  latency=0.002, delivery=0.8 + 0.05 * r))
    return Network([node(x, arrival_rate=50.0) for x in names], links)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_broadcast_routes_place_one_flow_per_destination_in_name_order(method: str) -> None:
    net = grid()
    routes = broadcast_routes(net, "g11", 1e6, Bounds(max_hops=4), route_fn=METHODS[method])
    assert list(routes) == sorted(set(net.nodes) - {"g11"})
    loaded = net
    for dst, route in routes.items():
        assert route.method == method and route.path[0] == "g11" and route.path[-1] == dst
        # each route was computed on the network carrying the ones before it
        assert route == METHODS[method](loaded, Demand("g11", dst, 1e6), Bounds(max_hops=4))
        loaded = loaded.with_flow(route.path, 1e6)


def test_an_unknown_method_name_or_broadcast_source_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown routing method 'fastest'"):
        by_name("fastest")
    with pytest.raises(NetworkError, match="unknown node"):
        broadcast_routes(grid(), "x", 1e6)


# ---------------------------------------------------------------- the incremental Router

def test_placed_flows_add_up_and_removing_them_gives_back_the_network() -> None:
    base = grid()
    router = Router(base, Bounds(max_hops=4))
    demands = {f"f{i}": Demand(a, b, r) for i, (a, b, r) in enumerate(
        [("g00", "g22", 1e6), ("g02", "g20", 2e6), ("g00", "g22", 0.5e6), ("g12", "g10", 1e6)])}
    for fid, demand in demands.items():
        router.place(fid, demand)
    routes = router.routes()
    assert list(routes) == sorted(demands)
    for i, lk in enumerate(base.links):
        on = [demands[f].rate_bps for f, r in routes.items()
              if i in base.path_links(r.path)]
        assert router.network.links[i].load == math.fsum([lk.load, *on])
    for name, n in base.nodes.items():
        sent = [demands[f].rate_bps / PACKET_BITS for f, r in routes.items()
                if name in r.path[:-1]]
        assert router.network.nodes[name].arrival_rate == pytest.approx(
            n.arrival_rate + sum(sent), rel=1e-12)
    router.remove("f1")
    assert "f1" not in router.routes()
    for fid in ("f0", "f2", "f3"):
        router.remove(fid)
    assert router.network == base  # exactly, not approximately
    with pytest.raises(KeyError, match="f1"):
        router.remove("f1")


def test_placing_the_same_flow_id_twice_is_refused() -> None:
    router = Router(grid())
    router.place("x", Demand("g00", "g01", 1e3))
    with pytest.raises(ValueError, match="already placed"):
        router.place("x", Demand("g00", "g02", 1e3))


def test_congesting_a_link_reroutes_exactly_the_flows_that_no_longer_fit() -> None:
    router = Router(grid(), Bounds(max_hops=6))
    for i, (a, b) in enumerate([("g00", "g02"), ("g10", "g12"), ("g20", "g22"),
                                ("g01", "g21"), ("g00", "g01")]):
        router.place(f"f{i}", Demand(a, b, 1e6))
    before = dict(router.routes())
    busiest = max(router.network.links,
                  key=lambda lk: (len(router.flows_on(lk.a, lk.b)), lk.a, lk.b))
    users = router.flows_on(busiest.a, busiest.b)
    assert len(users) >= 2
    # Room for nothing more than one flow's worth less than they need: none fits.
    moved = router.update_link(busiest.a, busiest.b, load=busiest.capacity - 0.5e6)
    assert moved == users
    after = router.routes()
    congested = router.network.link_index(busiest.a, busiest.b)
    for fid, route in before.items():
        if fid in users:  # placed elsewhere (no 1 Mbit/s flow fits there any more)
            assert congested not in router.network.path_links(after[fid].path)
        else:
            assert after[fid] is route  # untouched
    assert not router.stranded
    # a small change that leaves every flow fitting moves nothing
    assert router.update_link(busiest.a, busiest.b, load=busiest.capacity - 1.5e6) == []


def test_a_node_slowing_down_reroutes_the_flows_that_now_miss_the_delay_bound() -> None:
    tri = triangle(direct_load=5e6)
    net = Network([*tri.nodes.values(), node("D")], [*tri.links, Link("A", "D", 10e6)])
    bound = net.path_delay(("A", "C", "B"), 1e6) * 1.01
    router = Router(net, Bounds(max_delay=bound))
    router.place("detour", Demand("A", "B", 1e6))
    router.place("direct", Demand("C", "B", 1e3))
    router.place("elsewhere", Demand("A", "D", 1e3))
    assert router.routes()["detour"].path == ("A", "C", "B")
    assert router.routes()["direct"].path == ("C", "B")
    # C's queue fills: anything C forwards now takes far longer than T_max.
    assert router.update_node("C", arrival_rate=0.99 * MU) == ["detour", "direct"]
    assert router.routes()["detour"].path == ("A", "B")
    assert router.stranded["direct"].reason == "delay_bound"  # C is its source
    assert router.routes()["elsewhere"].path == ("A", "D")


def test_a_flow_without_any_route_left_is_stranded_and_comes_back_on_reroute() -> None:
    net = Network([node("A"), node("B")], [Link("A", "B", 1e6)])
    router = Router(net)
    router.place("f", Demand("A", "B", 0.6e6))
    assert router.update_link("A", "B", load=0.5e6) == ["f"]
    assert "f" not in router.routes()
    assert router.stranded["f"].reason == "capacity"
    assert router.network == router.background  # a stranded flow carries no load
    assert router.reroute() == []
    router.update_link("A", "B", load=0.1e6)
    assert router.reroute() == ["f"]
    assert router.routes()["f"].path == ("A", "B") and not router.stranded


def test_reroute_moves_a_flow_whose_path_still_fits_but_is_no_longer_best() -> None:
    router = Router(triangle(direct_load=0.0))
    router.place("a", Demand("A", "B", 4e6))
    assert router.routes()["a"].path == ("A", "B")  # a tie on eq. 8: fewer hops
    # Background traffic on A-B: the flow still fits (5 + 4 <= 10), so it stays...
    assert router.update_link("A", "B", load=5e6) == []
    assert router.routes()["a"].path == ("A", "B")
    # ...until asked: the detour leaves the links far more even.
    assert router.reroute() == ["a"]
    assert router.routes()["a"].path == ("A", "C", "B")
    assert router.reroute() == []  # settled
    with pytest.raises(KeyError, match="'zz'"):
        router.reroute(["zz"])


def test_router_is_deterministic() -> None:
    def run() -> dict:
        router = Router(grid(), Bounds(max_hops=5))
        rng = random.Random(9)
        names = sorted(grid().nodes)
        for i in range(12):
            a, b = rng.sample(names, 2)
            router.place(f"f{i:02d}", Demand(a, b, rng.uniform(0.2e6, 1.5e6)))
        router.update_link("g11", "g12", load=9.5e6)
        router.reroute()
        return {f: r.path for f, r in router.routes().items()}

    assert run() == run()


@pytest.mark.parametrize("method", ["shortest", "residual", "exact"])
def test_router_can_place_with_another_method(method: str) -> None:
    router = Router(grid(), Bounds(max_hops=4), route_fn=by_name(method))
    route = router.place("f", Demand("g00", "g22", 1e6))
    assert route.method == method
    with pytest.raises(ValueError, match="unknown routing method"):
        by_name("nope")
    with pytest.raises(TypeError, match="route_fn"):
        Router(grid(), route_fn="greedy")  # type: ignore[arg-type]
