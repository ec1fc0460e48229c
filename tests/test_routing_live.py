"""Measured link counters in, forwarding paths out: LinkEstimator and LiveRouter."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.routing.baselines import reliability_route
from agent.routing.live import (
    LinkEstimator,
    LinkSample,
    LiveRouter,
    LiveStatsError,
)
from agent.routing.network import PACKET_BITS, Bounds, Link, Network, Node
from hal.link import LinkCounters


def sample(t: float, bytes_tx: int = 0, bytes_rx: int = 0, frames_tx: int = 0,
           frames_rx: int = 0, retries: int = 0, timeouts: int = 0) -> LinkSample:
    return LinkSample(t, bytes_tx, bytes_rx, frames_tx, frames_rx, retries, timeouts)


def steady(est: LinkEstimator, t0: float, t1: float, step: float, bps_tx: float,
           bps_rx: float = 0.0, base: LinkSample | None = None) -> LinkSample:
    """Feed samples of constant traffic from t0 to t1; returns the last one."""
    base = base or sample(t0)
    t, last = t0, base
    while t <= t1 + 1e-9:
        last = dataclasses.replace(base, time_s=t,
                                   bytes_tx=base.bytes_tx + int((t - t0) * bps_tx / 8),
                                   bytes_rx=base.bytes_rx + int((t - t0) * bps_rx / 8))
        est.feed(last)
        t += step
    return last


# ---------------------------------------------------------------- samples

def test_sample_from_hal_link_counters() -> None:
    counters = LinkCounters(bytes_tx=10, bytes_rx=20, frames_tx=3, frames_rx=2, rejects={},
                            garbage_bytes=0, timeouts=1, retries=1, unmatched=0)
    assert LinkSample.from_counters(counters, 5.0) == sample(5.0, 10, 20, 3, 2, 1, 1)
    with pytest.raises(LiveStatsError, match="not link counters"):
        LinkSample.from_counters(object(), 5.0)


@pytest.mark.parametrize("kw, match", [
    (dict(time_s=math.nan), "time"), (dict(time_s=math.inf), "time"),
    (dict(bytes_tx=-1), "bytes_tx"), (dict(retries=1.5), "retries"),
    (dict(frames_rx=True), "frames_rx"), (dict(timeouts=None), "timeouts"),
])
def test_malformed_sample_is_refused(kw: dict, match: str) -> None:
    fields = {**dict(time_s=0.0, bytes_tx=0, bytes_rx=0, frames_tx=0, frames_rx=0, retries=0,
                     timeouts=0), **kw}
    with pytest.raises(LiveStatsError, match=match):
        LinkSample(**fields)


@pytest.mark.parametrize("half_life", [0.0, -1.0, math.nan, math.inf, True])
def test_estimator_needs_a_positive_half_life(half_life: float) -> None:
    with pytest.raises(ValueError, match="half_life_s"):
        LinkEstimator(half_life)


# ---------------------------------------------------------------- estimates

def test_steady_traffic_is_estimated_within_one_percent() -> None:
    est = LinkEstimator(half_life_s=5.0)
    assert est.rate_bps is None
    steady(est, 0.0, 60.0, 1.7, bps_tx=300e3, bps_rx=100e3)
    assert est.rate_bps == pytest.approx(400e3, rel=0.01)


def test_a_step_change_is_half_absorbed_after_one_half_life() -> None:
    est = LinkEstimator(half_life_s=4.0)
    last = steady(est, 0.0, 20.0, 1.0, bps_tx=100e3)
    assert est.rate_bps == pytest.approx(100e3, rel=1e-3)
    steady(est, 20.0, 24.0, 1.0, bps_tx=300e3, base=last)
    assert est.rate_bps == pytest.approx(200e3, rel=0.01)


def test_a_counter_reset_restarts_differencing_without_a_negative_rate() -> None:
    est = LinkEstimator(half_life_s=2.0)
    last = steady(est, 0.0, 10.0, 1.0, bps_tx=80e3)
    before = est.rate_bps
    est.feed(sample(11.0, bytes_tx=100))  # the link was reopened: counters from zero
    assert est.resets == 1 and est.rate_bps == before  # that interval is unknown, skipped
    steady(est, 11.0, 30.0, 1.0, bps_tx=80e3, base=sample(11.0, bytes_tx=100))
    assert est.rate_bps == pytest.approx(80e3, rel=0.01)
    assert last.bytes_tx > 100


def test_retries_and_timeouts_lower_the_delivery_estimate() -> None:
    est = LinkEstimator(half_life_s=1.0)
    est.feed(sample(0.0))
    est.feed(sample(1.0, frames_tx=100, frames_rx=100))
    assert est.delivery == 1.0
    # 100 sends, 19 of them followed by a resend: 81 % of exchanges came back,
    # so each crossing succeeded with probability 0.9.
    t, frames, retries = 1.0, 100, 0
    for _ in range(30):
        t, frames, retries = t + 1.0, frames + 100, retries + 19
        est.feed(sample(t, frames_tx=frames, retries=retries, timeouts=retries))
    assert est.delivery == pytest.approx(0.9, rel=1e-3)
    # timeouts alone count as failures too
    only_timeouts = LinkEstimator(half_life_s=1.0)
    only_timeouts.feed(sample(0.0))
    only_timeouts.feed(sample(1.0, frames_tx=10, timeouts=10))
    assert only_timeouts.delivery == pytest.approx(0.01)  # floored, never 0


def test_time_going_backwards_is_refused_and_changes_nothing() -> None:
    est = LinkEstimator()
    est.feed(sample(10.0))
    est.feed(sample(11.0, bytes_tx=1000))
    rate = est.rate_bps
    with pytest.raises(LiveStatsError, match="backwards"):
        est.feed(sample(10.5, bytes_tx=2000))
    assert est.rate_bps == rate
    est.feed(sample(12.0, bytes_tx=2000))
    assert est.rate_bps == pytest.approx(8000.0)


def test_samples_at_the_same_time_carry_their_traffic_into_the_next_interval() -> None:
    est = LinkEstimator()
    est.feed(sample(0.0))
    est.feed(sample(0.0, bytes_tx=500))
    assert est.rate_bps is None
    est.feed(sample(1.0, bytes_tx=1000))
    assert est.rate_bps == 8000.0


counters = st.integers(0, 10**12)


@given(st.lists(st.tuples(st.floats(0.0, 1e4), counters, counters, counters, counters,
                          counters, counters), min_size=1, max_size=30),
       st.floats(1e-3, 1e3))
def test_any_counter_sequence_never_gives_a_negative_or_nan_estimate(steps, half_life) -> None:
    est = LinkEstimator(half_life)
    t = 0.0
    for dt, *c in steps:
        t += dt
        est.feed(LinkSample(t, *c))
        if est.rate_bps is not None:
            assert math.isfinite(est.rate_bps) and est.rate_bps >= 0.0
        if est.delivery is not None:
            assert 0.0 < est.delivery <= 1.0


# ---------------------------------------------------------------- LiveRouter

def diamond() -> Network:
    """S to D over X or over Y; all 10 Mbit/s and idle."""
    return Network([Node(n, 25e6 / PACKET_BITS, 50) for n in "DSXY"],
                   [Link("S", "X", 10e6), Link("X", "D", 10e6), Link("S", "Y", 10e6),
                    Link("Y", "D", 10e6)])


def test_live_router_switches_paths_when_a_links_measured_load_rises() -> None:
    live = LiveRouter(diamond(), Bounds(max_hops=3), rate_bps=1e6, half_life_s=1.0)
    assert live.paths("S")["D"] == ("S", "X", "D")  # a tie: names decide
    assert live.observe("X", "D", sample(0.0)) == []
    ours = live.router.flows_on("X", "D")
    assert "S>D" in ours
    # 7 Mbit/s measured on X-D, our own flows' 1 Mbit/s each among it.
    changed = live.observe("D", "X", sample(1.0, bytes_tx=500_000, bytes_rx=375_000))
    assert "S>D" in changed
    assert live.paths("S")["D"] == ("S", "Y", "D")
    assert live.router.background.link("D", "X").load == pytest.approx(7e6 - 1e6 * len(ours))


def test_live_router_ignores_moves_below_the_threshold() -> None:
    live = LiveRouter(diamond(), rate_bps=1e6, half_life_s=1.0, threshold=0.2)
    live.observe("S", "Y", sample(0.0))
    live.observe("S", "Y", sample(1.0, bytes_tx=625_000))  # 5 Mbit/s: pushed
    assert live.router.background.link("S", "Y").load == pytest.approx(5e6)
    live.observe("S", "Y", sample(2.0, bytes_tx=625_000 + 680_000))  # 5.44: < 20 % move
    assert live.router.background.link("S", "Y").load == pytest.approx(5e6)
    live.observe("S", "Y", sample(3.0, bytes_tx=625_000 + 680_000 + 1_000_000))
    assert live.router.background.link("S", "Y").load > 6e6


def test_live_router_clamps_a_measured_load_above_capacity() -> None:
    live = LiveRouter(diamond(), rate_bps=1e6, half_life_s=1.0)
    live.observe("S", "X", sample(0.0))
    live.observe("S", "X", sample(1.0, bytes_tx=5_000_000))  # 40 Mbit/s on a 10 Mbit/s link
    assert live.router.background.link("S", "X").load == 10e6
    paths = live.paths("S")
    assert "X" not in paths["D"] and paths["X"] == ("S", "Y", "D", "X")


def test_live_router_leaves_out_unreachable_destinations_and_retries_them() -> None:
    net = Network([Node(n, 1e4, 10) for n in "ABC"], [Link("A", "B", 1e6, load=0.7e6),
                                                      Link("B", "C", 1e6)])
    live = LiveRouter(net, rate_bps=0.4e6)
    assert live.paths("A") == {}
    live.router.update_link("A", "B", load=0.0)
    assert live.paths("A") == {"B": ("A", "B"), "C": ("A", "B", "C")}


def test_live_router_feeds_delivery_estimates_to_the_reliability_baseline() -> None:
    live = LiveRouter(diamond(), rate_bps=1e5, half_life_s=1.0, route_fn=reliability_route)
    assert live.paths("S")["D"] == ("S", "X", "D")
    live.observe("S", "X", sample(0.0))
    live.observe("S", "X", sample(1.0, frames_tx=100, retries=36, timeouts=36))
    assert live.router.background.link("S", "X").delivery == pytest.approx(0.8)
    assert live.paths("S")["D"] == ("S", "Y", "D")


def test_live_router_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="threshold"):
        LiveRouter(diamond(), threshold=-0.1)
    with pytest.raises(ValueError, match="rate_bps"):
        LiveRouter(diamond(), rate_bps=0.0)
