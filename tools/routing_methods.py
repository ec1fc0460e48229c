"""Routing methods by name, for the desk tools' options, result files and tables.

The agent's router takes a route function (``agent.routing.network.RouteFn``);
the fleet's methods by name are ``agent.routing.fleet.ROUTE_METHODS``. Names are
for people at a desk: ``--methods greedy,shortest``, a ``"method"`` key in a results file.
``Route.method`` carries the same name.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from agent.routing.exact import exact_route
from agent.routing.fleet import ROUTE_METHODS
from agent.routing.network import RouteFn

# the fleet's methods (agent/routing/fleet.py) and, at the desk, the exhaustive check
METHODS: Mapping[str, RouteFn] = MappingProxyType({**ROUTE_METHODS, "exact": exact_route})


def by_name(name: str) -> RouteFn:
    """The route function called ``name``; ValueError naming the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown routing method {name!r}; one of {sorted(METHODS)}") from None
