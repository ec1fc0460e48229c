"""The load-balanced router of eq. 9, greedy, and the incremental ``Router`` (section 2.2.2).

Eq. 9: among paths from src to dst, minimise the load-balance degree L'
(eq. 8 after the demand is added) subject to the path's delay (eq. 7 plus
transmission and latency) <= T_max, idle bandwidth >= the demand on every
link, and at most H_max hops. The paper solves it "greedily" and says no
more; this is the greedy used here.

Why a heuristic: adding rate r on path P moves eq. 8 in closed form
(``network.LoadBalanceScore``): for a fixed hop count h the objective is
additive over links, weight w_j = r^2 - 2 r (B_j - mean B), lowest on the
idlest links. Minimising an additive weight under an additive delay bound
is the resource-constrained shortest path problem, NP-hard in general.

The greedy (``greedy_route``):

1. Usable links: idle bandwidth >= r (the capacity constraint, exact).
2. Lookahead: R[k][v], the least delay from v to dst within k hops, by a
   hop-layered Bellman-Ford from dst over the usable links (each node's
   eq. 7 term priced with the demand's packets added). A partial path that
   cannot reach dst within the remaining hops and delay is dropped, so the
   search never walks into a dead end.
3. Hop-layered label search from src: layer h keeps, per terminal, the
   ``LABELS_PER_NODE`` simple paths of exactly h hops with the least summed
   weight w (ties by path names). Extending a label checks simplicity and
   the lookahead of step 2.
4. Candidates: the labels that reach dst in every layer h = 1..H_max, plus
   the fastest path within H_max (from step 2's table), which is feasible
   whenever any path is: so the greedy finds a route exactly when one exists.
5. Each candidate is scored by the true L' (closed form, math.fsum) and its
   delay recomputed exactly as ``Network.path_delay`` does; the feasible one with the
   least (L', hops, path names) wins. Deterministic: every loop runs in name
   order and every tie has an explicit rule.

Cost per route, with E links, H = H_max and K = LABELS_PER_NODE: step 2 is
O(H E) relaxations (and one eq. 6 evaluation per terminal reached); step 3
O(H E K) extensions with an O(H) simplicity check; step 5 O(H K) candidates
of O(H) each, plus O(N + E) to price the winner. Measured against the
exhaustive ``exact_route`` in tests/test_router.py.

When no route exists the error says why (``network.NoRouteError``): the
reasons are decided exactly, not by the heuristic.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from agent.routing.network import (
    DEFAULT_BOUNDS,
    PACKET_BITS,
    Bounds,
    Demand,
    LoadBalanceScore,
    Network,
    NetworkError,
    NoRouteError,
    Route,
    RouteFn,
    RouteSearch,
    make_route,
    no_route_reason,
)

# Labels kept per (hop layer, terminal). On the random instances of
# tests/test_router.py, the share solved optimally (exact check) was, for
# 10-13 terminals, 92.5 % with 1 label, 96.7 % with 2 and 99.2 % with 4
# (99-100 % for 12-16 terminals). Time grows linearly with it.
LABELS_PER_NODE = 4

# Partial paths are pruned when their delay plus the lookahead exceeds T_max
# by more than this relative margin: rounding between the running sums and
# Network.path_delay's fsum must never drop a path that is feasible; the
# final check computes Network.path_delay's own sum.
_PRUNE_SLACK = 1e-9

# A link counts as over capacity only past this relative rounding margin
# (the same margin Network's flow arithmetic clamps within).
_OVER_SLACK = 1e-12


def greedy_route(network: Network, demand: Demand, bounds: Bounds = DEFAULT_BOUNDS) -> Route:
    """Eq. 9 by the greedy of the module docstring; NoRouteError (with its reason) if none."""
    search = RouteSearch(network, demand)
    h_max = bounds.max_hops
    layers = search.delay_to_dst(h_max)
    src, dst = demand.src, demand.dst
    if src not in layers[h_max]:
        err = no_route_reason(search, bounds, layers)
        assert err is not None
        raise err
    limit = bounds.max_delay * (1.0 + _PRUNE_SLACK)
    score = LoadBalanceScore(network, demand.rate_bps)
    weights = score.weights

    candidates: set[tuple[str, ...]] = set()
    fastest = search.fastest_path(h_max, layers)
    if fastest is not None:
        candidates.add(fastest)
    # label: (summed weight, path, delay so far up to the path's last node)
    labels: dict[str, list[tuple[float, tuple[str, ...], float]]] = {src: [(0.0, (src,), 0.0)]}
    for h in range(1, h_max + 1):
        ahead = layers[h_max - h]
        grown: dict[str, list[tuple[float, tuple[str, ...], float]]] = {}
        for v in sorted(labels):
            if v == dst:
                continue
            fv = search.forward(v)
            for w, path, delay in labels[v]:
                base = delay + fv
                for u, i, tl in search.adj[v]:
                    rest = ahead.get(u)
                    if rest is None or u in path:
                        continue
                    d = base + tl
                    if d + rest > limit:
                        continue
                    grown.setdefault(u, []).append((w + weights[i], (*path, u), d))
        labels = {u: heapq.nsmallest(LABELS_PER_NODE, items, key=_label_key)
                  for u, items in grown.items()}
        for _w, path, _d in labels.get(dst, ()):
            candidates.add(path)
        if not labels:
            break

    best: tuple[float, int, tuple[str, ...]] | None = None
    for path in candidates:
        idx = network.path_links(path)
        if search.path_delay(path, idx) > bounds.max_delay:
            continue
        key = (score.of(idx), len(idx), path)
        if best is None or key < best:
            best = key
    if best is None:
        err = no_route_reason(search, bounds, layers)
        assert err is not None, "the fastest path is feasible whenever any path is"
        raise err
    return make_route("greedy", network, demand, bounds, best[2])


def _label_key(label: tuple[float, tuple[str, ...], float]) -> tuple[float, tuple[str, ...]]:
    return label[0], label[1]


def broadcast_routes(network: Network, src: str, rate_bps: float, bounds: Bounds = DEFAULT_BOUNDS,
                     route_fn: RouteFn = greedy_route,
                     packet_bits: int = PACKET_BITS) -> dict[str, Route]:
    """One route from ``src`` to every other terminal, destinations in name order.

    Placed one after another: each route is computed by ``route_fn`` on the
    network carrying the previous ones (a broadcast is N - 1 unicast flows
    of ``rate_bps``). Used for endorsement requests and block broadcast.
    NoRouteError for the first destination (in name order) that has no route.
    """
    network.node(src)
    out: dict[str, Route] = {}
    net = network
    for dst in network.nodes:
        if dst == src:
            continue
        route = route_fn(net, Demand(src, dst, rate_bps, packet_bits), bounds)
        out[dst] = route
        net = net.with_flow(route.path, rate_bps, packet_bits)
    return out


class Router:
    """Routes flows one by one and keeps the network they load; sans-I/O.

    State: the measured *background* network (``update_link`` and
    ``update_node`` set its figures: load excludes the flows placed here) and
    the placed flows. ``network`` is the background plus every placed flow,
    recomputed with correctly rounded sums, so removing a flow gives back
    exactly the loads the other flows alone would give.

    Re-routing rule: after a statistics update, a flow is re-routed when its
    path no longer fits, i.e. a link on it would carry more than its
    capacity, or its delay (eq. 7 with every flow counted) now exceeds
    T_max while it was within T_max when placed. Those flows are taken off
    and placed again one at a time in flow-id order, each seeing all the
    others. A flow that then has no route is *stranded*: it carries no load,
    ``stranded`` holds its NoRouteError, and ``reroute`` tries it again.

    Placing a flow does not re-check the delay of flows already placed
    (eq. 9 is per demand); the next update or ``reroute`` does.

    Every flow is routed by ``route_fn``: the greedy of eq. 9 unless the
    caller passes another method (a baseline, or ``exact_route``).
    """

    def __init__(self, network: Network, bounds: Bounds = DEFAULT_BOUNDS, *,
                 route_fn: RouteFn = greedy_route):
        if not isinstance(network, Network):
            raise TypeError(f"expected a Network, got {type(network).__name__}")
        if not callable(route_fn):
            raise TypeError(f"route_fn must be a routing function, got {route_fn!r}")
        self.bounds = bounds
        self.route_fn = route_fn
        self._base = network
        self._flows: dict[str, tuple[Demand, Route]] = {}
        self._stranded: dict[str, tuple[Demand, NoRouteError]] = {}
        self._network = network

    # -- reading

    @property
    def network(self) -> Network:
        """The current network, including the loads of the placed flows."""
        return self._network

    @property
    def background(self) -> Network:
        """The measured network without the placed flows."""
        return self._base

    @property
    def stranded(self) -> Mapping[str, NoRouteError]:
        return MappingProxyType({k: e for k, (_d, e) in sorted(self._stranded.items())})

    def routes(self) -> Mapping[str, Route]:
        """Placed flows' routes by flow id (as priced when placed)."""
        return MappingProxyType({k: r for k, (_d, r) in sorted(self._flows.items())})

    def demand(self, flow_id: str) -> Demand:
        if flow_id in self._flows:
            return self._flows[flow_id][0]
        if flow_id in self._stranded:
            return self._stranded[flow_id][0]
        raise KeyError(f"no flow {flow_id!r}")

    def flows_on(self, a: str, b: str) -> list[str]:
        """Ids of the placed flows whose path crosses link a-b, sorted."""
        i = self._base.link_index(a, b)
        return sorted(f for f, (_d, r) in self._flows.items()
                      if i in self._base.path_links(r.path))

    # -- changing

    def _rebuild(self) -> None:
        self._network = self._base.with_flows(
            (r.path, d.rate_bps, d.packet_bits) for d, r in self._flows.values())

    def _route(self, flow_id: str, demand: Demand) -> Route | None:
        try:
            route = self.route_fn(self._network, demand, self.bounds)
        except NoRouteError as err:
            self._stranded[flow_id] = (demand, err)
            return None
        self._stranded.pop(flow_id, None)
        self._flows[flow_id] = (demand, route)
        self._rebuild()
        return route

    def place(self, flow_id: str, demand: Demand) -> Route:
        """Route ``demand`` on the current network and add its load; NoRouteError if none.

        A flow that cannot be placed is not kept (not even as stranded).
        """
        if flow_id in self._flows or flow_id in self._stranded:
            raise ValueError(f"flow {flow_id!r} is already placed; remove it first")
        route = self.route_fn(self._network, demand, self.bounds)
        self._flows[flow_id] = (demand, route)
        self._rebuild()
        return route

    def remove(self, flow_id: str) -> None:
        """Take a flow (placed or stranded) away and give back its load."""
        if flow_id in self._stranded:
            del self._stranded[flow_id]
            return
        if flow_id not in self._flows:
            raise KeyError(f"no flow {flow_id!r}")
        del self._flows[flow_id]
        self._rebuild()

    def update_link(self, a: str, b: str, **stats: float) -> list[str]:
        """New measured figures for link a-b (load = background, without our flows).

        Returns the ids of the flows re-routed because their path stopped
        fitting (see the class docstring), sorted.
        """
        return self._update(self._base.with_link_stats(a, b, **stats))

    def update_node(self, name: str, **stats: float) -> list[str]:
        """New measured figures for terminal ``name``; returns the ids re-routed."""
        return self._update(self._base.with_node_stats(name, **stats))

    def _update(self, base: Network) -> list[str]:
        # Flows over a link that no longer has room for all of them: off.
        extra: dict[int, list[float]] = {}
        for d, r in self._flows.values():
            for i in base.path_links(r.path):
                extra.setdefault(i, []).append(d.rate_bps)
        over = {i for i, rates in extra.items()
                if math.fsum([base.links[i].load, *rates])
                > base.links[i].capacity * (1.0 + _OVER_SLACK)}
        off = {f: self._flows.pop(f)[0] for f in sorted(self._flows)
               if over.intersection(base.path_links(self._flows[f][1].path))}
        self._base = base
        self._rebuild()
        # Flows that were within T_max and no longer are: off as well.
        slow = [f for f, (d, r) in sorted(self._flows.items()) if r.feasible
                and self._network.path_delay(r.path, 0.0, d.packet_bits) > self.bounds.max_delay]
        if slow:
            off.update({f: self._flows.pop(f)[0] for f in slow})
            self._rebuild()
        for f in sorted(off):
            self._route(f, off[f])
        return sorted(off)

    def reroute(self, flow_ids: Iterable[str] | None = None) -> list[str]:
        """Route flows again, one at a time in flow-id order, each seeing all the others.

        All flows by default, stranded ones last (also in id order); with
        ``flow_ids``, only those. Returns the ids whose path changed (a
        stranded flow placed, a placed flow stranded, or a new path), sorted.
        """
        if flow_ids is None:
            placed, stranded = sorted(self._flows), sorted(self._stranded)
        else:
            wanted = set(flow_ids)
            unknown = wanted - set(self._flows) - set(self._stranded)
            if unknown:
                raise KeyError(f"no flow {sorted(unknown)[0]!r}")
            placed = sorted(wanted & set(self._flows))
            stranded = sorted(wanted & set(self._stranded))
        changed = []
        for f in placed:
            demand, old = self._flows.pop(f)
            self._rebuild()
            new = self._route(f, demand)
            if new is None or new.path != old.path:
                changed.append(f)
        for f in stranded:
            demand, _err = self._stranded[f]
            if self._route(f, demand) is not None:
                changed.append(f)
        return sorted(changed)


__all__ = ["LABELS_PER_NODE", "NetworkError", "Router", "broadcast_routes", "greedy_route"]
