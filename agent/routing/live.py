"""Measured link statistics in, forwarding paths out: the router as the running agent uses it.

The link driver (``hal.link.Link.counters``) keeps cumulative counters per
link. The agent samples them now and then and hands each sample, with the
time it read them, to ``LiveRouter.observe``; ``LiveRouter.paths(src)``
answers the forwarding path to every other terminal. No clock, no I/O:
time is an argument (the h11 shape, ``../shared/STYLE.md``).

Estimates (``LinkEstimator``, one per link):

- **Rate**: bits per second over each interval, bytes sent plus bytes
  received (the link is shared by both directions, so both load it).
- **Delivery**: per interval, the share of frames sent that were not
  followed by a resend or a receive timeout. A request/reply exchange
  succeeds only when both the frame and its answer cross, so the
  per-crossing probability is the square root of that share (loss assumed
  symmetric). A timeout while merely listening counts as a failure too:
  conservative. Intervals without frames sent leave it unchanged.
- Both are smoothed by an exponentially weighted moving average in time:
  an interval of dt seconds gets weight 1 - 2^(-dt / half_life), so a step
  change is half absorbed after ``half_life_s`` seconds, whatever the
  sampling rhythm. The first interval sets the estimate outright.
- **Counter resets**: a counter lower than before means the link was
  reopened and its counters restarted; the interval is discarded (its
  delta is unknown), differencing restarts from that sample, the smoothed
  estimates are kept. A rate is never negative.
- **Time going backwards** is a caller error (``LiveStatsError``), the
  estimator unchanged. Samples at the same time carry no rate; their
  traffic is counted in the next interval.

``LiveRouter`` pushes an estimate into its ``Router`` (``update_link``) only
when it moved by more than a relative threshold since the last push, so
measurement noise does not churn paths. The measured traffic includes the
flows this router placed, so the background load pushed is the measured
rate minus their rates (at least 0, at most the capacity). After a push,
the flows crossing that link are routed again one at a time (by the
router's route function, the greedy unless another is given, on the new
figures): a link whose load rose sheds the flows that have a better path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from agent.routing.network import (
    DEFAULT_BOUNDS,
    PACKET_BITS,
    Bounds,
    Demand,
    Network,
    NoRouteError,
    RouteFn,
)
from agent.routing.router import Router, greedy_route
from hal.require import require_int, require_real

DEFAULT_HALF_LIFE_S = 10.0  # a few sampling periods of a once-a-few-seconds poll
DEFAULT_THRESHOLD = 0.1  # push an estimate once it moved by 10 %
# Relative moves of a load are measured against at least this share of the
# link's capacity, so an idle link's first few bytes do not count as "+inf %".
LOAD_FLOOR_SHARE = 0.01
# Delivery never estimated below this: eq. 9's links need delivery in (0, 1].
MIN_DELIVERY = 0.01
DEFAULT_BROADCAST_BPS = 64e3  # the paper's 25-128 KByte/s meter rates are per area; one flow


class LiveStatsError(ValueError):
    """A sample that cannot be right: a bad counter, a time going backwards."""


@dataclass(frozen=True)
class LinkSample:
    """Cumulative counters of one link, read at ``time_s`` (any monotonic clock, seconds)."""

    time_s: float
    bytes_tx: int
    bytes_rx: int
    frames_tx: int
    frames_rx: int
    retries: int
    timeouts: int

    def __post_init__(self) -> None:
        require_real("sample time_s", self.time_s, error=LiveStatsError)
        for f in fields(self)[1:]:
            require_int(f"sample {f.name}", getattr(self, f.name), min=0, error=LiveStatsError)

    @classmethod
    def from_counters(cls, counters: object, time_s: float) -> LinkSample:
        """From a ``hal.link.LinkCounters`` (or anything with the same fields)."""
        try:
            return cls(time_s=time_s, **{f.name: getattr(counters, f.name)
                                         for f in fields(cls)[1:]})
        except AttributeError as exc:
            raise LiveStatsError(f"not link counters: {exc}") from None

    def counters(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(self)[1:])


class LinkEstimator:
    """Rate and delivery of ONE link from successive counter samples (module docstring)."""

    def __init__(self, half_life_s: float = DEFAULT_HALF_LIFE_S, *,
                 min_delivery: float = MIN_DELIVERY):
        self.half_life_s = require_real("half_life_s", half_life_s, above=0.0)
        self.min_delivery = require_real("min_delivery", min_delivery, above=0.0, max=1.0)
        self.rate_bps: float | None = None  # smoothed bit/s; None before the first interval
        self.delivery: float | None = None  # smoothed probability; None before frames were sent
        self.resets = 0
        self._last: LinkSample | None = None

    def feed(self, sample: LinkSample) -> None:
        if not isinstance(sample, LinkSample):
            raise LiveStatsError(f"expected a LinkSample, got {type(sample).__name__}")
        last = self._last
        if last is None:
            self._last = sample
            return
        dt = float(sample.time_s) - float(last.time_s)
        if dt < 0:
            raise LiveStatsError(f"sample time went backwards: {sample.time_s!r} after "
                                 f"{last.time_s!r}")
        delta = [n - o for n, o in zip(sample.counters(), last.counters(), strict=True)]
        if any(d < 0 for d in delta):
            self.resets += 1  # reopened: restart the differencing here
            self._last = sample
            return
        if dt == 0:
            return  # no interval yet: the next sample's delta includes this traffic
        bytes_tx, bytes_rx, frames_tx, _frames_rx, retries, timeouts = delta
        weight = -math.expm1(-dt / self.half_life_s * math.log(2.0))  # 1 - 2^(-dt/T)
        rate = 8.0 * (bytes_tx + bytes_rx) / dt
        if not math.isfinite(rate):  # dt so small the quotient overflows: skip it
            return
        self.rate_bps = rate if self.rate_bps is None else (
            self.rate_bps + weight * (rate - self.rate_bps))
        if frames_tx > 0:
            failed = min(frames_tx, max(retries, timeouts))
            p = max(self.min_delivery, math.sqrt(1.0 - failed / frames_tx))
            self.delivery = p if self.delivery is None else min(1.0, max(
                self.min_delivery, self.delivery + weight * (p - self.delivery)))
        self._last = sample


def _moved(new: float, old: float, floor: float, threshold: float) -> bool:
    return abs(new - old) > threshold * max(abs(old), floor)


class LiveRouter:
    """A ``Router`` fed by measured link counters; ``paths(src)`` for forwarding.

    One flow of ``rate_bps`` per (src, dst) pair asked for, id ``"src>dst"``,
    placed on first use by ``route_fn``. Destinations without a route are
    left out of ``paths``; they are tried again on every call.
    """

    def __init__(self, network: Network, bounds: Bounds = DEFAULT_BOUNDS, *,
                 rate_bps: float = DEFAULT_BROADCAST_BPS,
                 packet_bits: int = PACKET_BITS,
                 half_life_s: float = DEFAULT_HALF_LIFE_S,
                 threshold: float = DEFAULT_THRESHOLD, route_fn: RouteFn = greedy_route):
        threshold = require_real("threshold", threshold, min=0.0)  # a relative change
        Demand("a", "b", rate_bps, packet_bits)  # validates the flow figures
        self.router = Router(network, bounds, route_fn=route_fn)
        self.rate_bps = float(rate_bps)
        self.packet_bits = packet_bits
        self.half_life_s = half_life_s
        self.threshold = threshold
        self._estimators: dict[tuple[str, str], LinkEstimator] = {}
        # last figures pushed into the router, per link: (background load, delivery)
        self._pushed: dict[tuple[str, str], tuple[float, float]] = {}

    @staticmethod
    def flow_id(src: str, dst: str) -> str:
        return f"{src}>{dst}"

    def estimator(self, a: str, b: str) -> LinkEstimator:
        lk = self.router.background.link(a, b)
        key = (lk.a, lk.b)
        if key not in self._estimators:
            self._estimators[key] = LinkEstimator(self.half_life_s)
        return self._estimators[key]

    def observe(self, a: str, b: str, sample: LinkSample) -> list[str]:
        """Feed link a-b's counters; returns the flow ids whose path changed, sorted."""
        est = self.estimator(a, b)
        est.feed(sample)
        return self.report(a, b, est.rate_bps, est.delivery)

    def report(self, a: str, b: str, rate_bps: float | None,
               delivery: float | None) -> list[str]:
        """Link a-b's measured total rate and delivery, from its own estimator or as another
        terminal measured and published them (None: not known); the flow ids re-routed."""
        base = self.router.background
        lk = base.link(a, b)
        key = (lk.a, lk.b)
        old_load, old_delivery = self._pushed.get(key, (lk.load, lk.delivery))
        load = old_load
        if rate_bps is not None:
            rate_bps = require_real("rate_bps", rate_bps, min=0.0, error=LiveStatsError)
            ours = math.fsum(self.router.demand(f).rate_bps for f in self.router.flows_on(a, b))
            load = min(lk.capacity, max(0.0, rate_bps - ours))
        if delivery is None:
            delivery = old_delivery
        else:
            delivery = min(1.0, max(MIN_DELIVERY, require_real(
                "delivery", delivery, min=0.0, max=1.0, error=LiveStatsError)))
        if not (_moved(load, old_load, LOAD_FLOOR_SHARE * lk.capacity, self.threshold)
                or _moved(delivery, old_delivery, 0.0, self.threshold)):
            return []
        self._pushed[key] = (load, delivery)
        before = {f: r.path for f, r in self.router.routes().items()}
        crossing = self.router.flows_on(a, b)
        taken_off = set(self.router.update_link(a, b, load=load, delivery=delivery))
        placed = self.router.routes()
        self.router.reroute([f for f in crossing if f not in taken_off and f in placed])
        after = {f: r.path for f, r in self.router.routes().items()}
        return sorted(f for f in before if after.get(f) != before[f])

    def paths(self, src: str) -> dict[str, tuple[str, ...]]:
        """Forwarding path from ``src`` to every terminal that has a route, by name."""
        net = self.router.background
        net.node(src)
        out = {}
        placed = self.router.routes()  # a snapshot; each id below is looked up once
        for dst in net.nodes:
            if dst == src:
                continue
            fid = self.flow_id(src, dst)
            route = placed.get(fid)
            if route is None:
                if fid in self.router.stranded:
                    self.router.remove(fid)
                try:
                    route = self.router.place(fid, Demand(src, dst, self.rate_bps,
                                                          self.packet_bits))
                except NoRouteError:
                    continue
            out[dst] = route.path
        return out

    def rebalance(self) -> list[str]:
        """Route every flow again on the current estimates (``Router.reroute``)."""
        return self.router.reroute()
