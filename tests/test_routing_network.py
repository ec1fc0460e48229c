"""The router's network model: validation, derived networks, path delay (eq. 7), eq. 8."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

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
from agent.routing.queueing import load_balance_degree, mm1m

MU = 25e6 / PACKET_BITS  # the paper's 25 Mbit/s forwarding rate, in packets/s

# Generating whole networks is the slow part: 60 examples on the host, half
# the profile's count under emulation (20), where hypothesis itself is slow.
FEW = settings(max_examples=min(60, settings.default.max_examples // 2))


def node(name: str, **kw: object) -> Node:
    return Node(name, **{"service_rate": MU, "buffer": 50, **kw})


def square() -> Network:
    """A-B-C-D-A with different loads, latencies and delivery probabilities."""
    return Network(
        [node("A", arrival_rate=100.0, retransmit_wait=0.01), node("B", arrival_rate=300.0),
         node("C"), node("D", arrival_rate=50.0, retransmit_wait=0.2)],
        [Link("B", "A", 10e6, load=4e6, latency=0.002, delivery=0.9),
         Link("B", "C", 10e6, load=1e6, latency=0.001),
         Link("C", "D", 5e6, load=0.0, latency=0.003),
         Link("D", "A", 20e6, load=15e6, latency=0.0005, delivery=0.99)])


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("bad, match", [
    (dict(name=""), "node name"),
    (dict(service_rate=0.0), "'X': service_rate"),
    (dict(service_rate=-5.0), "'X': service_rate"),
    (dict(service_rate=math.nan), "'X': service_rate"),
    (dict(service_rate=math.inf), "'X': service_rate"),
    (dict(buffer=0), "'X': buffer"),
    (dict(buffer=2.5), "'X': buffer"),
    (dict(buffer=True), "'X': buffer"),
    (dict(arrival_rate=-1.0), "'X': arrival_rate"),
    (dict(arrival_rate=math.nan), "'X': arrival_rate"),
    (dict(retransmit_wait=-0.1), "'X': retransmit_wait"),
    (dict(retransmit_wait=math.inf), "'X': retransmit_wait"),
    (dict(retransmit_wait="0.1"), "'X': retransmit_wait"),
])
def test_bad_node_field_is_refused_naming_node_and_field(bad: dict, match: str) -> None:
    fields = {"name": "X", "service_rate": MU, "buffer": 10, **bad}
    with pytest.raises(NetworkError, match=match):
        Network([Node(**fields), node("Y")], [])


@pytest.mark.parametrize("bad, match", [
    (dict(capacity=0.0), "'A'-'B': capacity"),
    (dict(capacity=math.nan), "'A'-'B': capacity"),
    (dict(capacity=math.inf), "'A'-'B': capacity"),
    (dict(load=-1.0), "'A'-'B': load"),
    (dict(load=math.nan), "'A'-'B': load"),
    (dict(load=2e6), "'A'-'B': load .* exceeds capacity"),
    (dict(delivery=0.0), "'A'-'B': delivery"),
    (dict(delivery=1.5), "'A'-'B': delivery"),
    (dict(delivery=math.nan), "'A'-'B': delivery"),
    (dict(latency=-0.001), "'A'-'B': latency"),
    (dict(latency=math.inf), "'A'-'B': latency"),
    (dict(b="Z"), "unknown node 'Z'"),
    (dict(b="A"), "two distinct terminals"),
])
def test_bad_link_field_is_refused_naming_link_and_field(bad: dict, match: str) -> None:
    fields = {"a": "A", "b": "B", "capacity": 1e6, **bad}
    with pytest.raises(NetworkError, match=match):
        Network([node("A"), node("B")], [Link(**fields)])


def test_duplicate_node_and_duplicate_link_in_either_order_are_refused() -> None:
    with pytest.raises(NetworkError, match="'A': duplicate"):
        Network([node("A"), node("A")], [])
    with pytest.raises(NetworkError, match="duplicate link"):
        Network([node("A"), node("B")], [Link("A", "B", 1e6), Link("B", "A", 2e6)])


def test_network_error_is_a_value_error() -> None:
    assert issubclass(NetworkError, ValueError)


@pytest.mark.parametrize("kw, match", [
    (dict(src="A", dst="A", rate_bps=1.0), "to itself"),
    (dict(src="", dst="A", rate_bps=1.0), "src"),
    (dict(src="A", dst="B", rate_bps=0.0), "rate_bps"),
    (dict(src="A", dst="B", rate_bps=-3.0), "rate_bps"),
    (dict(src="A", dst="B", rate_bps=math.nan), "rate_bps"),
    (dict(src="A", dst="B", rate_bps=math.inf), "rate_bps"),
    (dict(src="A", dst="B", rate_bps=1.0, packet_bits=0), "packet_bits"),
])
def test_bad_demand_is_refused(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Demand(**kw)


@pytest.mark.parametrize("kw, match", [
    (dict(max_delay=0.0), "max_delay"), (dict(max_delay=math.nan), "max_delay"),
    (dict(max_delay=-1.0), "max_delay"), (dict(max_hops=0), "max_hops"),
    (dict(max_hops=2.0), "max_hops"),
])
def test_bad_bounds_are_refused(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Bounds(**kw)


def test_no_route_error_refuses_an_unknown_reason() -> None:
    with pytest.raises(ValueError, match="reason"):
        NoRouteError("congestion", "A", "B", "x")


# ---------------------------------------------------------------- queries

def test_links_are_canonical_and_lookups_work_in_either_order() -> None:
    net = square()
    assert [(lk.a, lk.b) for lk in net.links] == [("A", "B"), ("A", "D"), ("B", "C"),
                                                   ("C", "D")]
    assert net.link("B", "A") is net.link("A", "B")
    assert net.neighbours("A") == ("B", "D")
    assert list(net.nodes) == ["A", "B", "C", "D"]
    assert net.idle("A", "D") == 5e6 == net.idle("D", "A")
    with pytest.raises(NetworkError, match="no such link"):
        net.link("A", "C")
    with pytest.raises(NetworkError, match="unknown node 'Q'"):
        net.neighbours("Q")


def test_load_balance_is_eq8_over_every_links_idle_bandwidth() -> None:
    net = square()
    assert net.load_balance() == load_balance_degree([6e6, 5e6, 9e6, 5e6])
    with pytest.raises(NetworkError, match="without links"):
        Network([node("A")], []).load_balance()


def test_path_delay_is_eq7_over_the_forwarding_nodes_plus_transmission_and_latency() -> None:
    net = square()
    rate = 288e3  # 100 packets/s of 360 bytes
    # Forwarding nodes of A-B-C are A and B (the destination only receives).
    qa, qb = mm1m(100.0 + 100.0, MU, 50), mm1m(300.0 + 100.0, MU, 50)
    by_hand = (qa.mean_delay + qa.loss_probability * 0.01 + qb.mean_delay
               + 2 * PACKET_BITS / 10e6 + 0.002 + 0.001)
    assert net.path_delay(("A", "B", "C"), rate) == pytest.approx(by_hand, rel=1e-12)
    # Reversed, C and B forward; C carries only the flow's own packets.
    qc = mm1m(100.0, MU, 50)
    assert net.path_delay(("C", "B", "A"), rate) == pytest.approx(
        qc.mean_delay + qb.mean_delay + 2 * PACKET_BITS / 10e6 + 0.003, rel=1e-12)


def test_path_delay_of_an_idle_hop_is_service_plus_transmission() -> None:
    net = square()
    assert net.path_delay(("C", "D"), 0.0) == pytest.approx(1 / MU + PACKET_BITS / 5e6 + 0.003)


@pytest.mark.parametrize("path, match", [
    (("A",), "at least two"), (("A", "B", "A"), "twice"), (("A", "C"), "no such link"),
    (("A", "Q"), "unknown node"),
])
def test_bad_path_is_refused(path: tuple, match: str) -> None:
    with pytest.raises(NetworkError, match=match):
        square().path_delay(path)


def test_simple_paths_of_a_complete_graph_are_all_enumerated() -> None:
    names = "ABCD"
    net = Network([node(n) for n in names],
                  [Link(a, b, 1e6) for i, a in enumerate(names) for b in names[i + 1:]])
    paths = list(iter_simple_paths(net, "A", "D", max_hops=3))
    assert len(paths) == 5  # direct, via B, via C, via B-C, via C-B
    assert paths == sorted(paths)
    assert list(iter_simple_paths(net, "A", "D", max_hops=1)) == [("A", "D")]


# ---------------------------------------------------------------- derived networks

def test_with_flow_loads_links_and_forwarding_nodes_only() -> None:
    net = square()
    after = net.with_flow(("A", "B", "C"), 2e6)
    assert after.link("A", "B").load == 6e6 and after.link("B", "C").load == 3e6
    assert after.link("C", "D") == net.link("C", "D")
    pps = 2e6 / PACKET_BITS
    assert after.nodes["A"].arrival_rate == pytest.approx(100.0 + pps)
    assert after.nodes["B"].arrival_rate == pytest.approx(300.0 + pps)
    assert after.nodes["C"] == net.nodes["C"]  # the destination forwards nothing
    assert net == square()  # the original is untouched


def test_with_flow_over_capacity_is_refused() -> None:
    with pytest.raises(NetworkError, match=r"'A'-'D': load .* exceed capacity"):
        square().with_flow(("A", "D"), 5.5e6)


def test_with_flow_taking_exactly_the_idle_bandwidth_fills_the_link() -> None:
    net = Network([node("A"), node("B")], [Link("A", "B", 0.3, load=0.1)])
    assert net.with_flow(("A", "B"), net.idle("A", "B"), 8).link("A", "B").load == 0.3


def test_with_stats_validate_and_leave_the_original_alone() -> None:
    net = square()
    hot = net.with_link_stats("B", "A", load=9e6, delivery=0.5)
    assert hot.link("A", "B").load == 9e6 and hot.link("A", "B").delivery == 0.5
    assert net.link("A", "B").load == 4e6
    with pytest.raises(NetworkError, match="'A'-'B': load"):
        net.with_link_stats("A", "B", load=11e6)
    with pytest.raises(NetworkError, match="'A'-'B': delivery"):
        net.with_link_stats("A", "B", delivery=0.0)
    busy = net.with_node_stats("C", arrival_rate=500.0, buffer=3)
    assert busy.nodes["C"].arrival_rate == 500.0 and busy.nodes["C"].buffer == 3
    assert net.nodes["C"].arrival_rate == 0.0
    with pytest.raises(NetworkError, match="'C': arrival_rate"):
        net.with_node_stats("C", arrival_rate=-1.0)
    with pytest.raises(NetworkError, match="unknown node"):
        net.with_node_stats("Q", arrival_rate=1.0)


def test_with_flows_is_independent_of_order_and_matches_with_flow() -> None:
    net = square()
    flows = [(("A", "B", "C"), 1e6, PACKET_BITS), (("C", "B"), 0.3e6, PACKET_BITS),
             (("D", "A", "B"), 0.7e6, 2000)]
    one = net.with_flows(flows)
    assert one == net.with_flows(flows[::-1])
    step = net
    for path, rate, bits in flows:
        step = step.with_flow(path, rate, bits)
    for x, y in zip(one.links, step.links, strict=True):
        assert x.load == pytest.approx(y.load, rel=1e-15)


# ---------------------------------------------------------------- properties

@st.composite
def networks(draw: st.DrawFn) -> Network:
    """2-7 terminals, 1 to all pairs linked; free floats only where the value matters
    most (arrival rates, loads), preset spreads elsewhere: cheap to draw under emulation."""
    n = draw(st.integers(2, 7))
    names = [f"n{i}" for i in range(n)]
    nodes = [Node(nm, service_rate=draw(st.sampled_from([1.0, 37.5, 1e3, MU, 1e5])),
                  buffer=draw(st.integers(1, 60)), arrival_rate=draw(st.floats(0.0, 1e5)),
                  retransmit_wait=draw(st.sampled_from([0.0, 0.01, 1.0]))) for nm in names]
    pairs = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(
        lambda p: p[0] < p[1]), min_size=1, max_size=n * (n - 1) // 2, unique=True))
    links = []
    for i, j in pairs:
        cap = draw(st.sampled_from([1.0, 1e3, 1e6, 25e6, 1e9]))
        links.append(Link(names[j], names[i], cap, load=cap * draw(st.floats(0.0, 1.0)),
                          delivery=draw(st.sampled_from([0.01, 0.5, 0.99, 1.0])),
                          latency=draw(st.sampled_from([0.0, 1e-3, 0.1]))))
    return Network(nodes, links)


def rebuilt(net: Network) -> Network:
    """An independent copy from the public values."""
    return Network(list(net.nodes.values()), list(net.links))


@FEW
@given(networks(), st.data())
def test_with_flow_and_back_leaves_the_original_and_restores_the_loads(
        net: Network, data: st.DataObject) -> None:
    copy = rebuilt(net)
    lk = data.draw(st.sampled_from(net.links))
    assume(net.idle(lk.a, lk.b) > 0)
    path = data.draw(st.sampled_from([(lk.a, lk.b), (lk.b, lk.a)]))
    rate = net.idle(lk.a, lk.b) * data.draw(st.floats(0.01, 1.0))
    after = net.with_flow(path, rate)
    assert net == copy
    assert after.link(lk.a, lk.b).load == pytest.approx(lk.load + rate, rel=1e-12)
    assert rebuilt(after) == after  # the derived network is itself valid
    back = after.without_flow(path, rate)
    for x, y in zip(back.links, net.links, strict=True):
        assert x.load == pytest.approx(y.load, rel=1e-12, abs=1e-12 * y.capacity)
    for name in net.nodes:
        assert back.nodes[name].arrival_rate == pytest.approx(
            net.nodes[name].arrival_rate, rel=1e-12, abs=1e-9)


@FEW
@given(networks(), st.data())
def test_with_link_stats_round_trips_without_mutation(net: Network,
                                                      data: st.DataObject) -> None:
    copy = rebuilt(net)
    lk = data.draw(st.sampled_from(net.links))
    load = data.draw(st.floats(0.0, lk.capacity))
    delivery = data.draw(st.floats(0.01, 1.0))
    changed = net.with_link_stats(lk.b, lk.a, load=load, delivery=delivery)
    assert net == copy
    assert changed.link(lk.a, lk.b).load == load
    assert changed.with_link_stats(lk.a, lk.b, load=lk.load, delivery=lk.delivery) == net
    assert changed.load_balance() >= 0.0


@FEW
@given(networks(), st.data())
def test_path_delay_grows_with_the_flows_rate(net: Network, data: st.DataObject) -> None:
    lk = data.draw(st.sampled_from(net.links))
    lo, hi = sorted(data.draw(st.tuples(st.floats(0.0, 1e9), st.floats(0.0, 1e9))))
    d_lo, d_hi = net.path_delay((lk.a, lk.b), lo), net.path_delay((lk.a, lk.b), hi)
    assert 0.0 < d_lo <= d_hi * (1 + 1e-12)
    assert math.isfinite(d_hi)


@FEW
@given(networks(), st.data())
def test_the_routers_cached_delay_terms_give_path_delay_bit_for_bit(
        net: Network, data: st.DataObject) -> None:
    names = list(net.nodes)
    src = data.draw(st.sampled_from(names))
    dst = data.draw(st.sampled_from([n for n in names if n != src]))
    demand = Demand(src, dst, data.draw(st.floats(1.0, 1e9)))
    search = RouteSearch(net, demand)
    for path in itertools.islice(iter_simple_paths(net, src, dst, 4), 20):
        assert search.path_delay(path, net.path_links(path)) == net.path_delay(
            path, demand.rate_bps)
