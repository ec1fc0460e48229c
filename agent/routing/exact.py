"""Eq. 9 solved exactly by enumerating simple paths: the yardstick for the greedy router.

Depth-first over the usable links (idle bandwidth >= the demand) in name
order, from src, at most H_max hops. A partial path is cut as soon as its
delay plus the least delay still needed to reach dst (the same hop-layered
lower bound the greedy uses, ``RouteSearch.delay_to_dst``) exceeds T_max:
node and link delays are positive, so nothing beyond it can be feasible.
Every complete path is scored with the same closed form of eq. 8 as the
greedy (``LoadBalanceScore``), its delay re-checked as
``Network.path_delay`` computes it, and the least (L', hops, path names) wins.

Exponential in general; for small graphs (tests, and checking the greedy).
``max_paths`` bounds the work: it counts the simple paths out of src that
the search extends (prefixes included), and the search stops with
ValueError before exceeding it.
"""

from __future__ import annotations

from agent.routing.network import (
    DEFAULT_BOUNDS,
    Bounds,
    Demand,
    LoadBalanceScore,
    Network,
    Route,
    RouteSearch,
    make_route,
    no_route_reason,
)
from hal.require import require_int

_PRUNE_SLACK = 1e-9  # as in router.py: rounding never cuts a feasible path


def exact_route(network: Network, demand: Demand, bounds: Bounds = DEFAULT_BOUNDS, *,
                max_paths: int = 200_000) -> Route:
    """The optimum of eq. 9 (least L', then hops, then names); NoRouteError with its reason."""
    max_paths = require_int("max_paths", max_paths, min=1)
    search = RouteSearch(network, demand)
    h_max = bounds.max_hops
    layers = search.delay_to_dst(h_max)
    src, dst = demand.src, demand.dst
    if src not in layers[h_max]:  # nothing within the hop bound: say why
        err = no_route_reason(search, bounds, layers)
        assert err is not None
        raise err
    limit = bounds.max_delay * (1.0 + _PRUNE_SLACK)
    score = LoadBalanceScore(network, demand.rate_bps)

    best: tuple[float, int, tuple[str, ...]] | None = None
    explored = 0
    path = [src]
    links: list[int] = []
    on_path = {src}
    # stack of (node, delay so far at node, neighbour iterator); explicit to bound recursion
    stack = [(src, 0.0, iter(search.adj[src]))]
    while stack:
        v, delay, nbrs = stack[-1]
        step = next(nbrs, None)
        if step is None:
            stack.pop()
            on_path.discard(path.pop())
            if links:
                links.pop()
            continue
        u, i, tl = step
        if u in on_path:
            continue
        hops = len(links) + 1
        rest = layers[h_max - hops].get(u)
        d = delay + search.forward(v) + tl
        if rest is None or d + rest > limit:
            continue
        if u == dst:
            full = (*path, u)
            if search.path_delay(full, [*links, i]) <= bounds.max_delay:
                key = (score.of([*links, i]), hops, full)
                if best is None or key < best:
                    best = key
            continue
        explored += 1
        if explored > max_paths:
            raise ValueError(f"exact_route {src!r} -> {dst!r}: more than max_paths = "
                             f"{max_paths} partial paths to enumerate; the graph is too "
                             "large for the exact check")
        path.append(u)
        links.append(i)
        on_path.add(u)
        stack.append((u, d, iter(search.adj[u])))
    if best is None:
        err = no_route_reason(search, bounds, layers)
        assert err is not None, "a path within the bounds exists but none was enumerated"
        raise err
    return make_route("exact", network, demand, bounds, best[2])
