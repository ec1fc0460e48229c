"""The three comparison routers of the paper's Figures 6-7.

Paper, section 3: the proposed routing is compared with a shortest path
[17], a reliability-scaled path [18] and a path that accounts for residual
link capacity [19]. The paper gives no more than those names; the readings
here:

- ``shortest_route``: fewest hops, then least summed latency, then the
  lexicographically smallest path (terminal names).
- ``reliability_route``: the most reliable path, maximising the product of
  the links' delivery probabilities (least sum of -ln p), then fewest hops,
  then names.
- ``residual_route``: the widest path, maximising the bottleneck idle
  bandwidth (capacity - load) along it, then fewest hops, then names.

All three route only over links with idle bandwidth >= the demand (the
capacity constraint of eq. 9) and within H_max hops. They do not look at
eq. 8 and do not check T_max while searching: a route slower than T_max is
returned with ``feasible=False``. NoRouteError (reason disconnected,
capacity or hop_bound) only when no path within H_max has room at all.

Each is exact and O(H_max E). Shortest and reliability are hop-layered
dynamic programmes: layer h keeps per terminal the best walk of exactly h
hops under (summed figure, path names), an order that extending both walks
by the same link preserves (sums are math.fsum over the path, so equal
multisets of link figures tie exactly and the names decide); the best over
all layers is a simple path, since cutting a loop out of a walk never
worsens the sum and saves hops. The widest path takes two passes (see
``_widest_path``), because bottlenecks tie under extension.

Each has the signature of ``network.RouteFn``, so a ``Router`` or
``broadcast_routes`` can use it in place of the greedy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from agent.routing.network import (
    DEFAULT_BOUNDS,
    Bounds,
    Demand,
    Network,
    Route,
    RouteSearch,
    make_route,
    no_route_reason,
)

# key of a label, from the link indices along it; smaller is better
_Key = Callable[[list[int]], tuple]


def _best_path(search: RouteSearch, max_hops: int, key: _Key,
               stop_at_first: bool) -> tuple[str, ...] | None:
    """argmin over walks of <= max_hops usable links of (key(links), hops, path).

    ``stop_at_first``: the key leads with the hop count, so the first layer
    that reaches dst holds the answer.
    """
    src, dst = search.demand.src, search.demand.dst
    labels: dict[str, tuple[tuple, tuple[str, ...], list[int]]] = {
        src: ((), (src,), [])}
    best: tuple[tuple, int, tuple[str, ...]] | None = None
    for h in range(1, max_hops + 1):
        grown: dict[str, tuple[tuple, tuple[str, ...], list[int]]] = {}
        for v in sorted(labels):
            if v == dst:
                continue
            _k, path, links = labels[v]
            for u, i, _t in search.adj[v]:
                new_links = [*links, i]
                cand = (key(new_links), (*path, u), new_links)
                old = grown.get(u)
                if old is None or cand[:2] < old[:2]:
                    grown[u] = cand
        labels = grown
        if dst in labels:
            k, path, _links = labels[dst]
            if best is None or (k, h, path) < best:
                best = (k, h, path)
            if stop_at_first:
                break
        if not labels:
            break
    return None if best is None else best[2]


def _route(method: str, network: Network, demand: Demand, bounds: Bounds,
           find: Callable[[RouteSearch, int], tuple[str, ...] | None]) -> Route:
    search = RouteSearch(network, demand)
    path = find(search, bounds.max_hops)
    if path is None:
        err = no_route_reason(search, Bounds(math.inf, bounds.max_hops))
        assert err is not None
        raise err
    return make_route(method, network, demand, bounds, path)


def _latency_key(network: Network) -> _Key:
    lat = [lk.latency for lk in network.links]
    # hops lead the key: the comparison across layers puts fewer hops first
    return lambda links: (len(links), math.fsum(lat[i] for i in links))


def _reliability_key(network: Network) -> _Key:
    cost = [max(0.0, -math.log(lk.delivery)) for lk in network.links]
    return lambda links: (math.fsum(cost[i] for i in links),)


def _widest_path(search: RouteSearch, max_hops: int) -> tuple[str, ...] | None:
    """Max bottleneck idle bandwidth, then fewest hops, then names, in two exact passes.

    A bottleneck ties easily (extending two labels by a narrow link makes
    them equal), so a single labelled pass could drop the one whose name
    should win. First the widest bottleneck W* within max_hops (hop-layered
    max-min Bellman-Ford); then, over the links with idle >= W* only, the
    fewest hops and, among those, the smallest path in name order (a
    breadth-first pass keeping the smallest path per terminal: equal-length
    paths keep their order when the same terminal is appended).
    """
    src, dst = search.demand.src, search.demand.dst
    idle = search.network.idle_bandwidths()
    width = {src: math.inf}
    frontier = {src}
    for _ in range(max_hops):
        changed = set()
        nxt = dict(width)
        for v in frontier:
            if v == dst:
                continue
            for u, i, _t in search.adj[v]:
                w = min(width[v], idle[i])
                if w > nxt.get(u, -math.inf):
                    nxt[u] = w
                    changed.add(u)
        width, frontier = nxt, changed
        if not frontier:
            break
    if dst not in width:
        return None
    widest = width[dst]
    reached = {src: (src,)}
    layer = {src: (src,)}
    for _ in range(max_hops):
        nxt_layer: dict[str, tuple[str, ...]] = {}
        for v, path in layer.items():
            for u, i, _t in search.adj[v]:
                if idle[i] < widest or u in reached:
                    continue
                cand = (*path, u)
                if u not in nxt_layer or cand < nxt_layer[u]:
                    nxt_layer[u] = cand
        if dst in nxt_layer:
            return nxt_layer[dst]
        reached.update(nxt_layer)
        layer = nxt_layer
    raise AssertionError("a path of width W* within max_hops exists by construction")


def shortest_route(network: Network, demand: Demand, bounds: Bounds = DEFAULT_BOUNDS) -> Route:
    """Fewest hops, then least latency, then path names (ref. [17])."""
    return _route("shortest", network, demand, bounds, lambda search, h: _best_path(
        search, h, _latency_key(network), stop_at_first=True))


def reliability_route(network: Network, demand: Demand,
                      bounds: Bounds = DEFAULT_BOUNDS) -> Route:
    """Most reliable: max product of delivery probabilities, then hops, then names (ref. [18])."""
    return _route("reliability", network, demand, bounds, lambda search, h: _best_path(
        search, h, _reliability_key(network), stop_at_first=False))


def residual_route(network: Network, demand: Demand, bounds: Bounds = DEFAULT_BOUNDS) -> Route:
    """Widest: max bottleneck idle bandwidth, then hops, then names (ref. [19])."""
    return _route("residual", network, demand, bounds, _widest_path)

