"""The comparison routers (shortest [17], reliability [18], residual capacity [19])."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from agent.routing.baselines import reliability_route, residual_route, shortest_route
from agent.routing.network import (
    PACKET_BITS,
    Bounds,
    Demand,
    Link,
    Network,
    Node,
    NoRouteError,
    iter_simple_paths,
)
from agent.routing.router import greedy_route
from tools.routing_methods import METHODS

MU = 25e6 / PACKET_BITS
BASELINES = [shortest_route, reliability_route, residual_route]


def net_of(links: list[Link]) -> Network:
    names = sorted({x for lk in links for x in (lk.a, lk.b)})
    return Network([Node(n, MU, 50) for n in names], links)


def test_methods_table_names_every_router() -> None:
    assert sorted(METHODS) == ["exact", "greedy", "reliability", "residual", "shortest"]
    assert METHODS["greedy"] is greedy_route


def test_short_congested_path_against_a_long_idle_one() -> None:
    """S-D direct, 90 % loaded; S-X-Y-D idle."""
    net = net_of([Link("S", "D", 10e6, load=9e6), Link("S", "X", 10e6),
                  Link("X", "Y", 10e6), Link("Y", "D", 10e6)])
    demand = Demand("S", "D", 0.5e6)
    assert shortest_route(net, demand).path == ("S", "D")
    assert reliability_route(net, demand).path == ("S", "D")  # all links deliver
    assert residual_route(net, demand).path == ("S", "X", "Y", "D")
    assert greedy_route(net, demand).path == ("S", "X", "Y", "D")


def test_an_unreliable_short_link_is_avoided_only_by_the_reliability_route() -> None:
    net = net_of([Link("S", "D", 10e6, delivery=0.6), Link("S", "X", 10e6, delivery=0.95),
                  Link("X", "D", 10e6, delivery=0.95)])
    demand = Demand("S", "D", 1e6)
    assert reliability_route(net, demand).path == ("S", "X", "D")  # 0.9025 > 0.6
    assert shortest_route(net, demand).path == ("S", "D")
    lossy = net.with_link_stats("S", "X", delivery=0.5)
    assert reliability_route(lossy, demand).path == ("S", "D")  # 0.475 < 0.6


def test_a_narrow_bottleneck_is_avoided_by_the_residual_route() -> None:
    """Both routes two hops; the upper one has a 2 Mbit/s idle bottleneck."""
    net = net_of([Link("S", "U", 100e6), Link("U", "D", 10e6, load=8e6),
                  Link("S", "L", 10e6, load=5e6), Link("L", "D", 10e6, load=5e6)])
    demand = Demand("S", "D", 1e6)
    assert residual_route(net, demand).path == ("S", "L", "D")  # bottleneck 5 > 2
    assert shortest_route(net, demand).path == ("S", "L", "D")  # equal hops, latency: names


def test_shortest_breaks_hop_ties_by_latency_then_names() -> None:
    net = net_of([Link("S", "A", 1e6, latency=0.003), Link("A", "D", 1e6, latency=0.001),
                  Link("S", "B", 1e6, latency=0.002), Link("B", "D", 1e6, latency=0.001),
                  Link("S", "C", 1e6, latency=0.002), Link("C", "D", 1e6, latency=0.001)])
    assert shortest_route(net, Demand("S", "D", 1e3)).path == ("S", "B", "D")
    net = net.with_link_stats("S", "A", latency=0.002)
    assert shortest_route(net, Demand("S", "D", 1e3)).path == ("S", "A", "D")


@pytest.mark.parametrize("fn", BASELINES)
def test_baselines_never_use_a_link_without_room_and_honour_the_hop_bound(fn) -> None:
    net = net_of([Link("S", "D", 10e6, load=9.5e6, delivery=1.0), Link("S", "X", 1e6),
                  Link("X", "D", 1e6), Link("S", "Y", 10e6), Link("Y", "Z", 10e6),
                  Link("Z", "D", 10e6)])
    assert fn(net, Demand("S", "D", 0.4e6)).path in {("S", "D"), ("S", "X", "D"),
                                                      ("S", "Y", "Z", "D")}
    # 0.6 Mbit/s fits neither S-D (0.5 idle)... nor beyond 1 Mbit/s S-X-D at 2 Mbit/s
    assert fn(net, Demand("S", "D", 0.6e6)).path in {("S", "X", "D"), ("S", "Y", "Z", "D")}
    assert fn(net, Demand("S", "D", 2e6)).path == ("S", "Y", "Z", "D")
    with pytest.raises(NoRouteError) as info:
        fn(net, Demand("S", "D", 2e6), Bounds(max_hops=2))
    assert info.value.reason == "hop_bound"
    with pytest.raises(NoRouteError) as info:
        fn(net, Demand("S", "D", 20e6))
    assert info.value.reason == "capacity"


@pytest.mark.parametrize("fn", BASELINES)
def test_baselines_return_a_route_over_the_delay_bound_marked_infeasible(fn) -> None:
    net = net_of([Link("S", "X", 1e6, latency=0.05), Link("X", "D", 1e6, latency=0.05)])
    route = fn(net, Demand("S", "D", 1e3), Bounds(max_delay=0.01))
    assert route.path == ("S", "X", "D") and route.delay > 0.1
    assert not route.feasible
    assert greedy_route(net, Demand("S", "D", 1e3), Bounds(max_delay=0.2)).feasible
    with pytest.raises(NoRouteError, match="T_max"):
        greedy_route(net, Demand("S", "D", 1e3), Bounds(max_delay=0.01))


@pytest.mark.parametrize("fn", BASELINES)
def test_baselines_say_why_when_no_path_has_room(fn) -> None:
    net = Network([Node(n, MU, 5) for n in "ABC"], [Link("A", "B", 1e6)])
    with pytest.raises(NoRouteError) as info:
        fn(net, Demand("A", "C", 1e3))
    assert info.value.reason == "disconnected"


def brute_force_key(net: Network, path: tuple[str, ...], method: str) -> tuple:
    links = [net.link(u, v) for u, v in itertools.pairwise(path)]
    if method == "shortest":
        return (len(links), math.fsum(lk.latency for lk in links), path)
    if method == "reliability":
        return (math.fsum(max(0.0, -math.log(lk.delivery)) for lk in links), len(links), path)
    return (-min(lk.capacity - lk.load for lk in links), len(links), path)


def random_case(rng: random.Random) -> tuple[Network, Demand, Bounds]:
    names = [f"v{i}" for i in range(rng.randint(3, 8))]
    links = [Link(a, b, cap, load=cap * rng.choice([0.0, 0.3, 0.6, 0.9]),
                  delivery=rng.choice([0.5, 0.8, 0.9, 1.0]),
                  latency=rng.choice([0.0, 0.001, 0.002]))
             for i, a in enumerate(names) for b in names[i + 1:] if rng.random() < 0.45
             for cap in [rng.choice([1e6, 2e6])]]
    net = Network([Node(n, MU, 20) for n in names], links)
    src, dst = rng.sample(names, 2)
    return net, Demand(src, dst, rng.choice([0.1e6, 0.5e6])), Bounds(math.inf,
                                                                    rng.randint(1, 5))


@pytest.mark.parametrize("method", ["shortest", "reliability", "residual"])
def test_each_baseline_is_the_optimum_of_its_own_criterion(method: str) -> None:
    """Against brute force over every simple path with room, on seeded random graphs;
    the coarse figures make ties common, so the name tie-break is exercised too."""
    rng = random.Random(4)
    routed = 0
    for _ in range(300):
        net, demand, bounds = random_case(rng)
        ok = [p for p in iter_simple_paths(net, demand.src, demand.dst, bounds.max_hops)
              if all(net.idle(u, v) >= demand.rate_bps for u, v in itertools.pairwise(p))]
        try:
            route = METHODS[method](net, demand, bounds)
        except NoRouteError:
            assert not ok
            continue
        routed += 1
        assert route.path == min(ok, key=lambda p: brute_force_key(net, p, method))
        assert route.delay == net.path_delay(route.path, demand.rate_bps)
    assert routed >= 100
