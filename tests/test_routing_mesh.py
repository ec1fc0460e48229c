"""The WAN mesh: the Gabriel graph of the sites, connected, planar-sparse, the same everywhere."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.routing.mesh import MeshError, gabriel_edges, hop_diameter, wan_network

coords = st.integers(0, 4000).map(float)
site_sets = st.lists(st.tuples(coords, coords), min_size=2, max_size=24, unique=True)


def named(points: list[tuple[float, float]]) -> dict[str, tuple[float, float]]:
    return {f"ecd-{i:02d}": p for i, p in enumerate(points)}


def mst_weight(sites: dict[str, tuple[float, float]],
               edges: list[tuple[str, str]] | None = None) -> float:
    """Prim's minimum spanning tree weight over all pairs (edges None) or the given edges."""
    names = sorted(sites)
    allowed = None if edges is None else set(edges)
    seen, total = {names[0]}, 0.0
    while len(seen) < len(names):
        best = min(((math.dist(sites[a], sites[b]), b) for a in seen for b in names
                    if b not in seen and (allowed is None or (min(a, b), max(a, b)) in allowed)),
                   default=None)
        if best is None:
            return math.inf  # not connected
        total += best[0]
        seen.add(best[1])
    return total


@settings(max_examples=60, deadline=None)
@given(site_sets)
def test_the_mesh_is_connected_and_holds_a_minimum_spanning_tree(points) -> None:
    sites = named(points)
    edges = gabriel_edges(sites)
    assert edges == sorted(set(edges)) and all(a < b for a, b in edges)
    # the Gabriel graph contains every Euclidean MST: its own MST weighs the same
    assert mst_weight(sites, edges) == pytest.approx(mst_weight(sites))
    assert len(edges) <= 3 * len(sites) - 6 or len(sites) < 3  # planar


@settings(max_examples=40, deadline=None)
@given(site_sets)
def test_no_other_site_stands_in_an_edge_s_diametral_circle(points) -> None:
    sites = named(points)
    for a, b in gabriel_edges(sites):
        centre = ((sites[a][0] + sites[b][0]) / 2, (sites[a][1] + sites[b][1]) / 2)
        radius = math.dist(sites[a], sites[b]) / 2
        for k, p in sites.items():
            if k not in (a, b):
                assert math.dist(p, centre) >= radius * (1 - 1e-9), (a, b, k)


def test_every_terminal_computes_the_same_mesh_whatever_the_order() -> None:
    sites = named([(0, 0), (1000, 0), (0, 1000), (1000, 1000), (500, 400)])
    reordered = dict(reversed(list(sites.items())))
    assert gabriel_edges(sites) == gabriel_edges(reordered)
    # a square with a point inside: the centre links to all four, the diagonals are not links
    assert ("ecd-00", "ecd-03") not in gabriel_edges(sites)
    assert all(("ecd-04" in e) for e in gabriel_edges(sites) if "ecd-04" in e)


def test_sites_that_cannot_make_a_mesh_are_refused() -> None:
    with pytest.raises(MeshError, match="share one site"):
        gabriel_edges({"a": (1.0, 2.0), "b": (1.0, 2.0)})
    with pytest.raises(MeshError, match="finite"):
        gabriel_edges({"a": (math.nan, 2.0), "b": (1.0, 2.0)})
    assert gabriel_edges({"a": (0.0, 0.0)}) == []


def test_the_network_carries_the_board_s_wan_figures() -> None:
    sites = named([(0, 0), (3000, 0), (6000, 0)])
    net = wan_network(sites, rate_mbit_s=25.0, buffer_packets=64, rtt_ms=60.0)
    assert [(lk.a, lk.b) for lk in net.links] == [("ecd-00", "ecd-01"), ("ecd-01", "ecd-02")]
    lk = net.links[0]
    assert lk.capacity == 25e6 and lk.latency == pytest.approx(0.030 + 3000 / 2e8)
    assert net.node("ecd-01").buffer == 64
    assert hop_diameter(net) == 2
