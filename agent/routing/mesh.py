"""The WAN mesh between terminals, derived from their provisioned sites: which pairs are linked.

Every terminal must route on the same graph, and a terminal has no scipy
(no Delaunay triangulation), so the mesh is the **Gabriel graph** of the
sites: terminals a and b are linked when no other terminal stands inside
the circle whose diameter is the segment a-b. It is the natural-neighbour
mesh of wireless and PLC planning: a subgraph of the Delaunay triangulation
that contains the Euclidean minimum spanning tree, so it is connected
whenever there are two or more sites, planar, and a pure function of the
sites (ties are decided by exact arithmetic on the coordinates, so every
terminal computes the same edges). O(n^3) in numpy: 13 terminals take
microseconds, 200 a few milliseconds.

``wan_network`` prices that graph with a board's WAN figures for the router
(``agent/routing/network.py``): capacity = the forwarding rate mu
(``[wan] rate_mbit_s``), buffer M = ``forward_buffer_packets``, one-way
latency = half the board's RTT plus propagation at 2/3 c over the distance.
Loads and arrivals start at zero; the live router measures them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from agent.routing.network import PACKET_BITS, Link, Network, Node

PROPAGATION_MPS = 2.0e8  # signal speed in fibre or copper, about 2/3 c


class MeshError(ValueError):
    """Sites that cannot make a mesh: a duplicate name or position, a non-finite coordinate."""


def gabriel_edges(sites: Mapping[str, tuple[float, float]]) -> list[tuple[str, str]]:
    """The Gabriel graph of the sites, as (a, b) name pairs with a < b, sorted."""
    names = sorted(sites)
    if len(names) < 2:
        return []
    xy = np.asarray([sites[n] for n in names], dtype=float)
    if xy.shape != (len(names), 2) or not np.isfinite(xy).all():
        raise MeshError("every site needs two finite coordinates")
    if len({(float(x), float(y)) for x, y in xy}) != len(names):
        raise MeshError("two terminals share one site: the mesh between them is undefined")
    edges = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            # k lies strictly inside the circle on diameter i-j iff the angle at k is obtuse:
            # (i - k) . (j - k) < 0
            dots = ((xy[i] - xy) * (xy[j] - xy)).sum(axis=1)
            dots[[i, j]] = 1.0
            if not (dots < 0.0).any():
                edges.append((names[i], names[j]))
    return edges


def hop_diameter(network: Network) -> int:
    """The most links on any shortest path between two terminals (0 for one terminal)."""
    worst = 0
    for src in network.nodes:
        seen = {src: 0}
        frontier = [src]
        while frontier:
            nxt = []
            for v in frontier:
                for w in network.neighbours(v):
                    if w not in seen:
                        seen[w] = seen[v] + 1
                        nxt.append(w)
            frontier = nxt
        worst = max(worst, *seen.values())
    return worst


def wan_network(sites: Mapping[str, tuple[float, float]], *, rate_mbit_s: float,
                buffer_packets: int, rtt_ms: float = 0.0,
                retransmit_wait_s: float = 0.0) -> Network:
    """The router's network: the Gabriel mesh priced with a board's WAN figures."""
    capacity = float(rate_mbit_s) * 1e6
    nodes = [Node(name, capacity / PACKET_BITS, int(buffer_packets),
                  retransmit_wait=float(retransmit_wait_s)) for name in sorted(sites)]
    links = []
    for a, b in gabriel_edges(sites):
        dist = math.dist(sites[a], sites[b])
        links.append(Link(a, b, capacity, latency=rtt_ms / 2000.0 + dist / PROPAGATION_MPS))
    return Network(nodes, links)
