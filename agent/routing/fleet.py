"""One terminal's routing table in the fleet: its measured links, the others' reports, paths.

The mesh is the Gabriel graph of the active terminals' provisioned sites
(``agent/routing/mesh.py``), priced with the board's WAN figures, so every
terminal routes on the same graph. Each terminal measures only the links
it is on (its peer connections' byte, message, drop and failure counters,
``observe``) and publishes those figures (``report``); the others' reports
(``apply_report``) give it the loads of links it is not on, which the
greedy's eq. 8 and eq. 7 need. ``path_to(dst)`` answers from the paths of
the last ``refresh``, so a send never waits for a route computation.

Counters to a link sample (``link_sample``): the peer connection carries
both directions of one link, so bytes are bytes out plus bytes in; a frame
"sent" is a message written or an attempt that failed (a failed dial, a
connection found dead, a message dropped), and a failure is a retry, so a
neighbour that stopped answering drives the link's delivery estimate down
and the router routes round it. A neighbour whose connection is closed and
failed again since the last sample is **down**: its link is reported full
(no idle bandwidth, delivery at the floor), so no method routes over it
until it answers again; the others learn it from this terminal's report.

Sans-I/O: statistics and time in, paths out.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from agent.routing.baselines import reliability_route, residual_route, shortest_route
from agent.routing.live import MIN_DELIVERY, LinkSample, LiveRouter
from agent.routing.mesh import hop_diameter, wan_network
from agent.routing.network import Bounds, Network, NoRouteError, RouteFn
from agent.routing.queueing import load_balance_degree
from agent.routing.router import greedy_route

# The methods a fleet may route by (the exhaustive exact search is for the desk only).
ROUTE_METHODS: Mapping[str, RouteFn] = MappingProxyType({
    "greedy": greedy_route, "shortest": shortest_route, "reliability": reliability_route,
    "residual": residual_route})
REPORT_MAX_AGE_S = 30.0
SPARE_HOPS = 1  # another terminal's figures older than this are not applied


def link_sample(stats: Mapping[str, Any], time_s: float) -> LinkSample:
    """A link sample from one peer connection's cumulative stats (``PeerNet.stats``)."""
    failures = int(stats.get("failures", 0))
    dropped = int(stats.get("dropped", 0))
    return LinkSample(time_s=time_s, bytes_tx=int(stats["bytes_out"]),
                      bytes_rx=int(stats["bytes_in"]),
                      frames_tx=int(stats["messages_out"]) + failures + dropped,
                      frames_rx=int(stats["messages_in"]), retries=dropped, timeouts=failures)


class FleetRoutes:
    """Paths from ``self_id`` over the fleet's mesh, kept current by measurement."""

    def __init__(self, self_id: str, sites: Mapping[str, tuple[float, float]], *,
                 rate_mbit_s: float, buffer_packets: int, rtt_ms: float = 0.0,
                 route_fn: RouteFn = greedy_route, method: str = "greedy"):
        self.self_id = self_id
        self.method = method
        self.route_fn = route_fn
        self._wan = {"rate_mbit_s": rate_mbit_s, "buffer_packets": buffer_packets,
                     "rtt_ms": rtt_ms}
        self._paths: dict[str, tuple[str, ...]] = {}
        self.reroutes = 0
        self.set_sites(sites)

    def set_sites(self, sites: Mapping[str, tuple[float, float]]) -> None:
        """The active terminals changed: a new mesh, measurements start again."""
        self.sites = dict(sites)
        self.network: Network = wan_network(self.sites, **self._wan)
        # H_max of eq. 9: one link more than the mesh's hop diameter, so every method may
        # detour round one busy link but none wanders the whole mesh
        self.bounds = Bounds(max_hops=hop_diameter(self.network) + SPARE_HOPS)
        self.live = LiveRouter(self.network, self.bounds, route_fn=self.route_fn)
        self._measured: dict[tuple[str, str], tuple[float | None, float | None]] = {}
        self._failures: dict[str, int] = {}
        self.down: set[str] = set()  # neighbours found down at the last sample
        self.refresh()

    def neighbours(self) -> tuple[str, ...]:
        if self.self_id not in self.network.nodes:
            return ()
        return self.network.neighbours(self.self_id)

    def observe(self, peer: str, stats: Mapping[str, Any], time_s: float) -> None:
        """A neighbour's connection counters, read at ``time_s``."""
        if peer not in self.neighbours():
            return
        failures = int(stats.get("failures", 0))
        failed_again = failures > self._failures.get(peer, 0)
        self._failures[peer] = failures
        sample = link_sample(stats, time_s)
        if not stats.get("connected") and failed_again:
            self.down.add(peer)
            self.live.estimator(self.self_id, peer).feed(sample)
            full = 2.0 * self.network.link(self.self_id, peer).capacity
            self.reroutes += len(self.live.report(self.self_id, peer, full, MIN_DELIVERY))
            self._measured[_key(self.self_id, peer)] = (full, MIN_DELIVERY)
            return
        self.down.discard(peer)
        self.reroutes += len(self.live.observe(self.self_id, peer, sample))
        est = self.live.estimator(self.self_id, peer)
        self._measured[_key(self.self_id, peer)] = (est.rate_bps, est.delivery)

    def report(self) -> dict[str, list[float | None]]:
        """This terminal's measured links, to publish: peer -> [bit/s, delivery]."""
        return {(b if a == self.self_id else a): [rate, delivery]
                for (a, b), (rate, delivery) in sorted(self._measured.items())
                if self.self_id in (a, b)}

    def apply_report(self, terminal: str, links: Mapping[str, Any]) -> int:
        """Another terminal's published figures; returns how many links were taken."""
        if terminal == self.self_id or terminal not in self.network.nodes:
            return 0
        taken = 0
        for peer, figures in links.items():
            if peer == self.self_id or peer not in self.network.nodes:
                continue  # our own links we measure ourselves
            try:
                self.network.link(terminal, peer)
                rate, delivery = figures
                self.reroutes += len(self.live.report(terminal, peer, rate, delivery))
            except (KeyError, ValueError, TypeError):
                continue  # not a mesh link here, or figures that cannot be right
            self._measured[_key(terminal, peer)] = (rate, delivery)
            taken += 1
        return taken

    def refresh(self) -> dict[str, tuple[str, ...]]:
        """Recompute the path to every other terminal on the current figures."""
        if self.self_id not in self.network.nodes:
            self._paths = {}
        else:
            try:
                self._paths = self.live.paths(self.self_id)
            except NoRouteError:
                self._paths = {}
        return dict(self._paths)

    def path_to(self, dst: str) -> tuple[str, ...] | None:
        return self._paths.get(dst)

    def table(self) -> dict[str, Any]:
        """What the console's ``route`` shows: paths, measured links, eq. 8 of the measurement."""
        links = []
        idle = []
        for lk in self.network.links:
            rate, delivery = self._measured.get(_key(lk.a, lk.b), (None, None))
            links.append({"link": f"{lk.a}|{lk.b}", "capacity_bps": lk.capacity,
                          "measured_bps": rate, "delivery": delivery,
                          "down": delivery is not None and delivery <= MIN_DELIVERY,
                          "flows": len(self.live.router.flows_on(lk.a, lk.b))})
            idle.append(max(0.0, lk.capacity - min(lk.capacity, rate or 0.0)))
        return {"method": self.method, "terminal": self.self_id,
                "neighbours": list(self.neighbours()),
                "paths": {d: list(p) for d, p in sorted(self._paths.items())},
                "links": links, "reroutes": self.reroutes,
                "load_balance_degree": load_balance_degree(idle) if idle else None}


def _key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)
