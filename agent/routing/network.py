"""The terminal network the router works on: terminals, links, demands, routes (section 2.2.2).

Pure values. A ``Network`` is immutable: every ``with_*`` method returns a
new one and leaves the original untouched, so a route can be priced on a
"what if" copy and the router can keep the measured network apart from the
flows it placed.

Model:

- A ``Node`` is one terminal's forwarding queue, M/M/1/M (eq. 5-6, see
  ``queueing.mm1m``): service rate mu packets/s, M places, the measured
  arrival rate lambda_j and the retransmission wait t_rw_j of eq. 7.
- A ``Link`` joins two terminals, undirected: capacity and measured load in
  bit/s (idle bandwidth B_j = capacity - load, eq. 8), the probability a
  packet crosses, and one-way propagation latency.
- **Forwarding nodes.** A packet on path (v_0, ..., v_h) is queued and sent
  by v_0 .. v_(h-1): every node that puts it on a link, the source included
  (a terminal's own broadcasts wait in the same first-come-first-served
  queue as the packets it relays, eq. 5). The destination only receives.
  So ``with_flow`` adds the flow's packets/s to path[:-1], and
  ``path_delay`` is eq. 7 over path[:-1] plus, per link, the transmission
  time packet_bits / capacity and the latency.
- **Load never exceeds capacity.** Eq. 9 requires B_j >= 0, and eq. 8
  (``queueing.load_balance_degree``) refuses a negative idle bandwidth, so a
  link loaded over its capacity is a malformed network (``NetworkError``).
  Flow arithmetic that lands within rounding of the capacity (or of zero)
  is clamped to it.

``no_route_reason`` (shared by the greedy router, the baselines and the
exact check) says exactly why no path meets a demand's constraints, in
polynomial time: connectivity and capacity are breadth-first searches, the
hop bound a hop distance, and the delay bound the least delay within H_max
hops, a hop-layered Bellman-Ford (node and link delays are positive, so the
fastest walk is a simple path).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TypeAlias

from agent.routing.queueing import QueueFigures, load_balance_degree, mm1m
from agent.routing.queueing import path_delay as eq7_path_delay
from hal.require import require_int, require_real

PACKET_BITS = 360 * 8  # the paper's 360-byte packets (section 3)

# Flow arithmetic (load + rate, load - rate) may land a few ulps past the
# capacity or below zero when a flow takes exactly the idle bandwidth; within
# this relative slack of the capacity the result is clamped, past it refused.
_ROUNDING_SLACK = 1e-12


class NetworkError(ValueError):
    """A malformed network, node, link or statistic; the message names which and the field."""


ROUTE_REASONS: tuple[str, ...] = ("disconnected", "capacity", "hop_bound", "delay_bound")


class NoRouteError(Exception):
    """No path meets the demand; ``reason`` says which constraint ruled the last one out.

    The constraints are relaxed in a fixed order and the reason is the first
    one that leaves no path (so it is the most specific true statement):

    - ``disconnected``: no path at all between src and dst;
    - ``capacity``: paths exist, but every one (of any length) crosses a link
      whose idle bandwidth is below the demand's rate;
    - ``hop_bound``: paths with enough idle bandwidth exist, all longer than H_max;
    - ``delay_bound``: such paths within H_max exist, all slower than T_max.
    """

    def __init__(self, reason: str, src: str, dst: str, message: str):
        if reason not in ROUTE_REASONS:
            raise ValueError(f"unknown no-route reason {reason!r}")
        self.reason = reason
        self.src = src
        self.dst = dst
        super().__init__(message)


# ---------------------------------------------------------------- values

@dataclass(frozen=True)
class Node:
    """One terminal as an M/M/1/M forwarder (eq. 5-6); rates in packets/s."""

    name: str
    service_rate: float  # mu, packets/s it can forward (e.g. 25e6 / PACKET_BITS)
    buffer: int  # M, places including the one in service
    arrival_rate: float = 0.0  # lambda_j, packets/s it forwards now (measured), >= 0
    retransmit_wait: float = 0.0  # t_rw_j seconds (eq. 7)


@dataclass(frozen=True)
class Link:
    """An undirected terminal-to-terminal link; bandwidths in bit/s."""

    a: str
    b: str
    capacity: float  # bit/s
    load: float = 0.0  # bit/s carried now (measured), 0 <= load <= capacity
    delivery: float = 1.0  # probability a packet crosses, in (0, 1]
    latency: float = 0.0  # one-way propagation seconds


@dataclass(frozen=True)
class Demand:
    """A flow to route: src to dst at rate_bps, in packets of packet_bits."""

    src: str
    dst: str
    rate_bps: float  # the flow's bandwidth, > 0
    packet_bits: int = PACKET_BITS

    def __post_init__(self) -> None:
        for field in ("src", "dst"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"demand {field} must be a terminal name, got {value!r}")
        if self.src == self.dst:
            raise ValueError(f"demand from {self.src!r} to itself: nothing to route")
        _real("demand", "rate_bps", self.rate_bps, positive=True, error=ValueError)
        _count("demand", "packet_bits", self.packet_bits, error=ValueError)


@dataclass(frozen=True)
class Bounds:
    """The constraints of eq. 9."""

    max_delay: float = math.inf  # T_max, seconds
    max_hops: int = 8  # H_max, links on the path

    def __post_init__(self) -> None:
        require_real("bounds: max_delay", self.max_delay, above=0.0, allow_inf=True)
        _count("bounds", "max_hops", self.max_hops, error=ValueError)


@dataclass(frozen=True)
class Route:
    """A priced path for one demand."""

    method: str  # "greedy" | "exact" | "shortest" | "reliability" | "residual"
    path: tuple[str, ...]  # src ... dst
    hops: int
    delay: float  # network.path_delay(path, demand.rate_bps): eq. 7 + transmission + latency
    load_balance: float  # eq. 8 of the network AFTER adding the demand on this path
    feasible: bool  # delay <= T_max, hops <= H_max, every link's idle >= rate


# ---------------------------------------------------------------- validation

def _real(owner: str, field: str, value: object, *, positive: bool = False,
          error: type[Exception] = NetworkError) -> float:
    """A measured figure, finite and >= 0 (> 0 if ``positive``); the error names owner, field."""
    return require_real(f"{owner}: {field}", value, above=0.0 if positive else None,
                        min=None if positive else 0.0, error=error)


def _count(owner: str, field: str, value: object, *,
           error: type[Exception] = NetworkError) -> int:
    """A count of packets or hops: an integer >= 1 (numpy integers too, 8.0 refused)."""
    return require_int(f"{owner}: {field}", value, min=1, error=error)


def _checked_node(node: object) -> Node:
    if not isinstance(node, Node):
        raise NetworkError(f"expected a Node, got {type(node).__name__}")
    if not isinstance(node.name, str) or not node.name:
        raise NetworkError(f"node name must be a non-empty string, got {node.name!r}")
    owner = f"node {node.name!r}"
    return Node(name=node.name,
                service_rate=_real(owner, "service_rate", node.service_rate, positive=True),
                buffer=_count(owner, "buffer", node.buffer),
                arrival_rate=_real(owner, "arrival_rate", node.arrival_rate),
                retransmit_wait=_real(owner, "retransmit_wait", node.retransmit_wait))


def _link_name(a: object, b: object) -> str:
    return f"link {a!r}-{b!r}"


def _checked_link(link: object, nodes: Mapping[str, Node]) -> Link:
    if not isinstance(link, Link):
        raise NetworkError(f"expected a Link, got {type(link).__name__}")
    owner = _link_name(link.a, link.b)
    for end in (link.a, link.b):
        if not isinstance(end, str) or end not in nodes:
            raise NetworkError(f"{owner}: unknown node {end!r}")
    if link.a == link.b:
        raise NetworkError(f"{owner}: a link joins two distinct terminals")
    capacity = _real(owner, "capacity", link.capacity, positive=True)
    load = _real(owner, "load", link.load)
    if load > capacity:
        raise NetworkError(f"{owner}: load {load!r} exceeds capacity {capacity!r} "
                           "(eq. 9 requires idle bandwidth >= 0)")
    delivery = _real(owner, "delivery", link.delivery)
    if not 0.0 < delivery <= 1.0:
        raise NetworkError(f"{owner}: delivery must be a probability in (0, 1], "
                           f"got {delivery!r}")
    a, b = sorted((link.a, link.b))
    return Link(a=a, b=b, capacity=capacity, load=load, delivery=delivery,
                latency=_real(owner, "latency", link.latency))


def _shifted(value: float, delta: float, top: float, owner: str, field: str) -> float:
    """value + delta kept within [0, top], clamping rounding, refusing real overflow."""
    x = value + delta
    slack = _ROUNDING_SLACK * top
    if x > top:
        if x > top + slack:
            raise NetworkError(f"{owner}: {field} {x!r} would exceed capacity {top!r}")
        return top
    if x < 0.0:
        if x < -slack:
            raise NetworkError(f"{owner}: {field} {x!r} would be negative")
        return 0.0
    return x


def _figures(node: Node, arrival_rate: float) -> QueueFigures:
    """Eq. 5-6 for ``node`` at ``arrival_rate``; an idle queue is the lambda -> 0 limit."""
    if arrival_rate <= 0.0 or arrival_rate / node.service_rate == 0.0:
        # No queueing: an accepted packet waits only its own service, nothing is lost.
        return QueueFigures(arrival_rate=0.0, service_rate=node.service_rate,
                            capacity=node.buffer, rho=0.0, loss_probability=0.0,
                            idle_probability=1.0, mean_in_system=0.0,
                            mean_delay=1.0 / node.service_rate, throughput=0.0)
    return mm1m(arrival_rate, node.service_rate, node.buffer)


def forward_delay(node: Node, extra_pps: float = 0.0) -> float:
    """One forwarding node's term of eq. 7, tau_delay + P_loss * t_rw, with extra packets/s."""
    f = _figures(node, node.arrival_rate + extra_pps)
    return f.mean_delay + f.loss_probability * node.retransmit_wait


def link_delay(link: Link, packet_bits: int = PACKET_BITS) -> float:
    """Per-link part of a path's delay: transmission of one packet plus propagation."""
    return packet_bits / link.capacity + link.latency


DEFAULT_BOUNDS = Bounds()  # no delay bound, H_max = 8


# ---------------------------------------------------------------- the network

class Network:
    """Terminals and links; immutable, validated, deterministic orders everywhere."""

    __slots__ = ("_adj", "_index", "_nodes", "links", "nodes")

    nodes: Mapping[str, Node]
    links: tuple[Link, ...]

    def __init__(self, nodes: Iterable[Node], links: Iterable[Link]):
        checked: dict[str, Node] = {}
        for node in nodes:
            n = _checked_node(node)
            if n.name in checked:
                raise NetworkError(f"node {n.name!r}: duplicate name")
            checked[n.name] = n
        by_pair: dict[tuple[str, str], Link] = {}
        for link in links:
            lk = _checked_link(link, checked)
            if (lk.a, lk.b) in by_pair:
                raise NetworkError(f"{_link_name(lk.a, lk.b)}: duplicate link between "
                                   "the same terminals")
            by_pair[(lk.a, lk.b)] = lk
        ordered = tuple(by_pair[p] for p in sorted(by_pair))
        index: dict[tuple[str, str], int] = {}
        adj: dict[str, list[str]] = {name: [] for name in checked}
        for i, lk in enumerate(ordered):
            index[(lk.a, lk.b)] = index[(lk.b, lk.a)] = i
            adj[lk.a].append(lk.b)
            adj[lk.b].append(lk.a)
        self._set({k: checked[k] for k in sorted(checked)}, ordered, index,
                  {k: tuple(sorted(v)) for k, v in sorted(adj.items())})

    def _set(self, nodes: dict[str, Node], links: tuple[Link, ...],
             index: dict[tuple[str, str], int], adj: dict[str, tuple[str, ...]]) -> None:
        self._nodes = nodes
        self.nodes = MappingProxyType(nodes)
        self.links = links
        self._index = index
        self._adj = adj

    def _derive(self, nodes: dict[str, Node] | None = None,
                links: tuple[Link, ...] | None = None) -> Network:
        """A copy with already-validated nodes or links swapped in; same topology."""
        new = object.__new__(Network)
        new._set(self._nodes if nodes is None else nodes,
                 self.links if links is None else links, self._index, self._adj)
        return new

    # -- queries

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Network):
            return NotImplemented
        return self.links == other.links and tuple(self._nodes.values()) == tuple(
            other._nodes.values())

    def __hash__(self) -> int:
        return hash((tuple(self._nodes.values()), self.links))

    def __repr__(self) -> str:
        return f"Network({len(self._nodes)} nodes, {len(self.links)} links)"

    def node(self, name: str) -> Node:
        try:
            return self._nodes[name]
        except (KeyError, TypeError):
            raise NetworkError(f"unknown node {name!r}") from None

    def neighbours(self, name: str) -> tuple[str, ...]:
        """Adjacent terminals in name order."""
        self.node(name)
        return self._adj[name]

    def link_index(self, a: str, b: str) -> int:
        """Position of link a-b (either order) in ``links``."""
        try:
            return self._index[(a, b)]
        except (KeyError, TypeError):
            for end in (a, b):
                self.node(end)
            raise NetworkError(f"{_link_name(a, b)}: no such link") from None

    def link(self, a: str, b: str) -> Link:
        return self.links[self.link_index(a, b)]

    def idle(self, a: str, b: str) -> float:
        """B_j of eq. 8: capacity minus load, bit/s."""
        lk = self.link(a, b)
        return lk.capacity - lk.load

    def idle_bandwidths(self) -> list[float]:
        """B_j for every link, in ``links`` order."""
        return [lk.capacity - lk.load for lk in self.links]

    def load_balance(self) -> float:
        """Eq. 8 over all links: the population variance of the idle bandwidths, (bit/s)^2."""
        if not self.links:
            raise NetworkError("a network without links has no load-balance degree "
                               "(eq. 8 divides by N_num = 0)")
        return load_balance_degree(self.idle_bandwidths())

    def path_links(self, path: Sequence[str]) -> list[int]:
        """Link indices along ``path``; NetworkError unless it is a simple path of >= 1 link."""
        path = tuple(path)
        if len(path) < 2:
            raise NetworkError(f"path {path!r} needs at least two terminals")
        if len(set(path)) != len(path):
            raise NetworkError(f"path {path!r} visits a terminal twice")
        return [self.link_index(u, v) for u, v in itertools.pairwise(path)]

    def path_delay(self, path: Sequence[str], rate_bps: float = 0.0,
                   packet_bits: int = PACKET_BITS) -> float:
        """Seconds one packet takes along ``path`` carrying a flow of ``rate_bps`` (eq. 7).

        Eq. 7 over the forwarding nodes path[:-1] (source included, see the
        module docstring), each with rate_bps / packet_bits packets/s added to
        its measured arrival rate, plus packet_bits / capacity + latency per
        link. With rate_bps = 0 this is the delay of a flow already counted in
        the arrival rates.
        """
        idx = self.path_links(path)
        rate = _real("path_delay", "rate_bps", rate_bps)
        bits = _count("path_delay", "packet_bits", packet_bits)
        extra = rate / bits
        nodes = [self._nodes[v] for v in path[:-1]]
        figs = [_figures(n, n.arrival_rate + extra) for n in nodes]
        queues = eq7_path_delay(figs, [n.retransmit_wait for n in nodes])
        return queues + math.fsum(link_delay(self.links[i], bits) for i in idx)

    # -- derived networks

    def _flow(self, path: Sequence[str], rate_bps: float, packet_bits: int,
              sign: float) -> Network:
        idx = self.path_links(path)
        rate = _real("flow", "rate_bps", rate_bps, positive=True)
        bits = _count("flow", "packet_bits", packet_bits)
        links = list(self.links)
        for i in idx:
            lk = links[i]
            links[i] = replace(lk, load=_shifted(lk.load, sign * rate, lk.capacity,
                                                 _link_name(lk.a, lk.b), "load"))
        nodes = dict(self._nodes)
        pps = rate / bits
        for v in path[:-1]:
            n = nodes[v]
            x = n.arrival_rate + sign * pps
            if x < 0.0:
                if x < -_ROUNDING_SLACK * pps:
                    raise NetworkError(f"node {v!r}: arrival_rate would be negative ({x!r})")
                x = 0.0
            nodes[v] = replace(n, arrival_rate=x)
        return self._derive(nodes, tuple(links))

    def with_flow(self, path: Sequence[str], rate_bps: float,
                  packet_bits: int = PACKET_BITS) -> Network:
        """A new network with a flow on ``path``: +rate_bps on its links, +packets/s on path[:-1].

        NetworkError if a link would go over capacity.
        """
        return self._flow(path, rate_bps, packet_bits, 1.0)

    def without_flow(self, path: Sequence[str], rate_bps: float,
                     packet_bits: int = PACKET_BITS) -> Network:
        """The inverse of ``with_flow`` (equal up to rounding of the float sums)."""
        return self._flow(path, rate_bps, packet_bits, -1.0)

    def with_flows(self, flows: Iterable[tuple[Sequence[str], float, int]]) -> Network:
        """All (path, rate_bps, packet_bits) flows added at once, each sum correctly rounded.

        The result does not depend on the flows' order (math.fsum), which the
        incremental router relies on: removing a flow and recomputing gives
        exactly the network the remaining flows alone would give.
        """
        link_add: dict[int, list[float]] = {}
        node_add: dict[str, list[float]] = {}
        for path, rate_bps, packet_bits in flows:
            idx = self.path_links(path)
            rate = _real("flow", "rate_bps", rate_bps, positive=True)
            bits = _count("flow", "packet_bits", packet_bits)
            for i in idx:
                link_add.setdefault(i, []).append(rate)
            for v in tuple(path)[:-1]:
                node_add.setdefault(v, []).append(rate / bits)
        links = list(self.links)
        for i, rates in link_add.items():
            lk = links[i]
            total = math.fsum([lk.load, *rates])
            links[i] = replace(lk, load=_shifted(total, 0.0, lk.capacity,
                                                 _link_name(lk.a, lk.b), "load"))
        nodes = dict(self._nodes)
        for v, pps in node_add.items():
            nodes[v] = replace(nodes[v], arrival_rate=math.fsum([nodes[v].arrival_rate, *pps]))
        return self._derive(nodes, tuple(links))

    def with_link_stats(self, a: str, b: str, *, load: float | None = None,
                        delivery: float | None = None, latency: float | None = None,
                        capacity: float | None = None) -> Network:
        """A new network with link a-b's measured figures replaced (None: unchanged)."""
        i = self.link_index(a, b)
        old = self.links[i]
        changes = {k: v for k, v in (("load", load), ("delivery", delivery),
                                     ("latency", latency), ("capacity", capacity))
                   if v is not None}
        new = _checked_link(replace(old, **changes), self._nodes)
        links = list(self.links)
        links[i] = new
        return self._derive(links=tuple(links))

    def with_node_stats(self, name: str, *, arrival_rate: float | None = None,
                        buffer: int | None = None, service_rate: float | None = None,
                        retransmit_wait: float | None = None) -> Network:
        """A new network with terminal ``name``'s queue figures replaced (None: unchanged)."""
        old = self.node(name)
        changes = {k: v for k, v in (("arrival_rate", arrival_rate), ("buffer", buffer),
                                     ("service_rate", service_rate),
                                     ("retransmit_wait", retransmit_wait)) if v is not None}
        nodes = dict(self._nodes)
        nodes[name] = _checked_node(replace(old, **changes))
        return self._derive(nodes=nodes)


# ---------------------------------------------------------------- shared routing pieces

RouteFn: TypeAlias = Callable[[Network, Demand, Bounds], Route]
"""A routing method: ``greedy_route``, ``exact_route`` or a baseline of ``baselines``.

The router and the broadcast take one of these rather than a method's name,
so agent/routing keeps no table of names (that is the desk tools'
``tools.routing_methods``) and its modules import one another one way only.
It returns a priced ``Route`` or raises ``NoRouteError`` with its reason.
"""


class RouteSearch:
    """What every routing method needs about one demand on one network, computed once.

    ``adj[v]`` lists (u, link index, link delay) over the *usable* links only,
    those whose idle bandwidth is at least the demand's rate (eq. 9's B_j >= 0
    after the flow is added), neighbours in name order. ``forward(v)`` is v's
    eq. 7 term with the demand's packets added, cached.
    """

    def __init__(self, network: Network, demand: Demand):
        if not isinstance(demand, Demand):
            raise TypeError(f"expected a Demand, got {type(demand).__name__}")
        network.node(demand.src)
        network.node(demand.dst)
        self.network = network
        self.demand = demand
        rate, bits = demand.rate_bps, demand.packet_bits
        self.pps = rate / bits
        links = network.links
        self.usable = [lk.capacity - lk.load >= rate for lk in links]
        self.link_delays = [link_delay(lk, bits) for lk in links]
        self.adj: dict[str, list[tuple[str, int, float]]] = {}
        index = network._index
        for v, nbrs in network._adj.items():
            row = []
            for u in nbrs:
                i = index[(v, u)]
                if self.usable[i]:
                    row.append((u, i, self.link_delays[i]))
            self.adj[v] = row
        self._forward: dict[str, float] = {}

    def forward(self, v: str) -> float:
        d = self._forward.get(v)
        if d is None:
            d = self._forward[v] = forward_delay(self.network._nodes[v], self.pps)
        return d

    def path_delay(self, path: Sequence[str], link_indices: Sequence[int]) -> float:
        """``Network.path_delay(path, rate, bits)`` from the cached terms, bit for bit."""
        return (math.fsum(self.forward(v) for v in path[:-1])
                + math.fsum(self.link_delays[i] for i in link_indices))

    def delay_to_dst(self, max_hops: int) -> list[dict[str, float]]:
        """R[k][v]: least delay from v to dst within k usable hops (hop-layered Bellman-Ford).

        R[k][v] = min over usable links v-u of forward(v) + link delay + R[k-1][u],
        v != dst. A lower bound for every path, exact for the best walk, which
        is a simple path because every node and link delay is positive.
        """
        dst = self.demand.dst
        layers: list[dict[str, float]] = [{dst: 0.0}]
        frontier = {dst}
        for _ in range(max_hops):
            prev = layers[-1]
            cur = dict(prev)
            changed = set()
            for u in sorted(frontier):
                ru = prev[u]
                for v, _i, tl in self.adj[u]:
                    if v == dst:
                        continue
                    cand = self.forward(v) + tl + ru
                    if cand < cur.get(v, math.inf):
                        cur[v] = cand
                        changed.add(v)
            layers.append(cur)
            frontier = changed
            if not frontier:
                # Nothing improved: later layers are equal; share the object.
                layers.extend([cur] * (max_hops - len(layers) + 1))
                break
        return layers

    def fastest_path(self, max_hops: int,
                     layers: list[dict[str, float]] | None = None) -> tuple[str, ...] | None:
        """The least-delay usable path within max_hops, ties by neighbour name; None if none."""
        layers = self.delay_to_dst(max_hops) if layers is None else layers
        src, dst = self.demand.src, self.demand.dst
        if src not in layers[max_hops]:
            return None
        path = [src]
        v, k = src, max_hops
        while v != dst:
            best, best_u = math.inf, None
            fv = self.forward(v)
            for u, _i, tl in self.adj[v]:
                r = layers[k - 1].get(u)
                if r is not None and fv + tl + r < best:
                    best, best_u = fv + tl + r, u
            assert best_u is not None  # R[k][v] finite means some neighbour achieves it
            path.append(best_u)
            v, k = best_u, k - 1
        return _without_cycles(path)

    def hops_to_dst(self, usable_only: bool) -> dict[str, int]:
        """Breadth-first hop distances to dst, over usable links or over all links."""
        dst = self.demand.dst
        dist = {dst: 0}
        frontier = [dst]
        adj = self.network._adj
        while frontier:
            nxt = []
            for u in frontier:
                nbrs = ([w for w, _i, _t in self.adj[u]] if usable_only else adj[u])
                for w in nbrs:
                    if w not in dist:
                        dist[w] = dist[u] + 1
                        nxt.append(w)
            frontier = nxt
        return dist


def _without_cycles(path: Sequence[str]) -> tuple[str, ...]:
    """Cut any loop out of a walk (never needed with positive delays; rounding insurance)."""
    out: list[str] = []
    seen: dict[str, int] = {}
    for v in path:
        if v in seen:
            del out[seen[v] + 1:]
            seen = {w: i for i, w in enumerate(out)}
        else:
            seen[v] = len(out)
            out.append(v)
    return tuple(out)


def no_route_reason(search: RouteSearch, bounds: Bounds,
                    layers: list[dict[str, float]] | None = None) -> NoRouteError | None:
    """The NoRouteError to raise when no path meets (capacity, H_max, T_max), else None."""
    d = search.demand
    src, dst, h = d.src, d.dst, bounds.max_hops
    if src not in search.hops_to_dst(usable_only=False):
        return NoRouteError("disconnected", src, dst,
                            f"no route {src!r} -> {dst!r}: the terminals are not connected")
    hops = search.hops_to_dst(usable_only=True)
    if src not in hops:
        return NoRouteError("capacity", src, dst,
                            f"no route {src!r} -> {dst!r}: every path crosses a link with less "
                            f"than {d.rate_bps!r} bit/s idle")
    if hops[src] > h:
        return NoRouteError("hop_bound", src, dst,
                            f"no route {src!r} -> {dst!r} within H_max = {h} hops: the "
                            f"shortest path with enough idle bandwidth has {hops[src]}")
    layers = search.delay_to_dst(h) if layers is None else layers
    fastest = search.fastest_path(h, layers)
    assert fastest is not None
    delay = search.network.path_delay(fastest, d.rate_bps, d.packet_bits)
    if delay > bounds.max_delay:
        return NoRouteError("delay_bound", src, dst,
                            f"no route {src!r} -> {dst!r} within T_max = {bounds.max_delay!r} s: "
                            f"the fastest path within {h} hops takes {delay!r} s")
    return None


class LoadBalanceScore:
    """Eq. 8 after adding a demand on a path, in closed form, for ranking many candidates.

    With c_j = B_j - mean(B) (eq. 8 is shift-invariant, and centring keeps
    the sums small), S1 = sum c_j, S2 = sum c_j^2 over N links, adding rate r
    on the links of path P (|P| = h) gives
        L' = (S2 + sum_{j in P} w_j) / N - ((S1 - r h) / N)^2,  w_j = r^2 - 2 r c_j.
    For a fixed h the objective is additive over links (weight w_j, negative
    on links idler than average). ``of`` sums with math.fsum, so two paths
    over the same links score bit-identically whatever their order.
    """

    def __init__(self, network: Network, rate_bps: float):
        b = network.idle_bandwidths()
        if not b:
            raise NetworkError("a network without links has no load-balance degree")
        self.n = len(b)
        mean = math.fsum(b) / self.n
        c = [x - mean for x in b]
        self.s1 = math.fsum(c)
        self.s2 = math.fsum(x * x for x in c)
        r = float(rate_bps)
        self.rate = r
        self.weights = [r * r - 2.0 * r * x for x in c]

    def of(self, link_indices: Iterable[int]) -> float:
        idx = list(link_indices)
        w = math.fsum([self.s2, *(self.weights[i] for i in idx)])
        m = (self.s1 - self.rate * len(idx)) / self.n
        return max(0.0, w / self.n - m * m)


def make_route(method: str, network: Network, demand: Demand, bounds: Bounds,
               path: Sequence[str]) -> Route:
    """Price ``path`` for ``demand``: delay, eq. 8 afterwards, feasibility against ``bounds``."""
    path = tuple(path)
    idx = network.path_links(path)
    delay = network.path_delay(path, demand.rate_bps, demand.packet_bits)
    fits = all(network.links[i].capacity - network.links[i].load >= demand.rate_bps
               for i in idx)
    if fits:
        after = network.with_flow(path, demand.rate_bps, demand.packet_bits).load_balance()
    else:
        after = math.inf  # over capacity: eq. 8 undefined (B_j < 0); routers never return it
    feasible = fits and len(idx) <= bounds.max_hops and delay <= bounds.max_delay
    return Route(method=method, path=path, hops=len(idx), delay=delay,
                 load_balance=after, feasible=feasible)


def iter_simple_paths(network: Network, src: str, dst: str,
                      max_hops: int) -> Iterator[tuple[str, ...]]:
    """Every simple path src -> dst of at most max_hops links, depth first in name order.

    Ignores capacity and delay: the independent reference for the tests and
    for ``exact_route``'s diagnosis checks. Exponential; small graphs only.
    """
    network.node(src)
    network.node(dst)
    path = [src]
    on_path = {src}

    def walk(v: str) -> Iterator[tuple[str, ...]]:
        if v == dst:
            yield tuple(path)
            return
        if len(path) > max_hops:
            return
        for u in network._adj[v]:
            if u not in on_path:
                path.append(u)
                on_path.add(u)
                yield from walk(u)
                on_path.discard(u)
                path.pop()

    yield from walk(src)
