"""Routing methods by name, for the desk tools' options, result files and tables.

The agent's router takes a route function (``agent.routing.network.RouteFn``),
so agent/routing keeps no table of names and its modules import one another
one way only. Names are for people at a desk: ``--methods greedy,shortest``,
a ``"method"`` key in a results file. ``Route.method`` carries the same name.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from agent.routing.baselines import reliability_route, residual_route, shortest_route
from agent.routing.exact import exact_route
from agent.routing.network import RouteFn
from agent.routing.router import greedy_route

METHODS: Mapping[str, RouteFn] = MappingProxyType({
    "greedy": greedy_route,
    "exact": exact_route,
    "shortest": shortest_route,
    "reliability": reliability_route,
    "residual": residual_route,
})


def by_name(name: str) -> RouteFn:
    """The route function called ``name``; ValueError naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown routing method {name!r}; one of {sorted(METHODS)}") from None
