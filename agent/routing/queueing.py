"""One terminal's forwarding queue as M/M/1/M, a path's delay, and the load-balance degree.

Paper, section 2.2.2: requests arrive as a Poisson process of rate lambda, a
terminal forwards first-come-first-served at exponential rate mu (eq. 5,
rho = lambda / mu) and holds at most M packets (eq. 6). Eq. 7 adds up the
per-node delays and retransmission waits along a path; eq. 8 is the variance
of the links' idle bandwidth, which the router (eq. 9) minimises.

Pure functions: no I/O, no clock; the caller measures the rates.

Capacity convention: M counts every packet at the terminal, the one in
service included (Kendall's M/M/1/K with K = M), so the states are
i = 0..M and the stationary distribution is p_i = rho^i p_0. This is the
reading under which eq. 6's P_loss = (1 - rho) rho^M / (1 - rho^(M+1)) and
L_s = rho/(1 - rho) - (M + 1) rho^(M+1) / (1 - rho^(M+1)) are exact.

Numerics: the closed forms of eq. 6 are 0/0 at rho = 1 and lose up to all
their digits near it (1 - rho^(M+1) cancels). We evaluate the same
quantities through a = |ln rho| with expm1 and a Bernoulli series, which
is accurate for every rho > 0, equal to the limits P_loss = 1/(M + 1) and
L_s = M/2 at rho = 1, and never overflows for rho > 1 (there the buffer
is full most of the time; the formulas still hold because the state space
is finite).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hal.require import require_int, require_real

# Below this argument f(t) (see _excess) is summed as its Bernoulli series:
# there 1/expm1(t) and 1/t are both ~1/t and their difference would cancel.
# Truncating after t^11 leaves a relative error under 1e-13 for |t| < 0.5
# (next term 1.3e-11 * t^13); above 0.5 the direct form loses < 2 digits.
_SERIES_BELOW = 0.5

# Where the truncated-geometric mean switches from "M/2 minus corrections"
# to "1/(e^a - 1) minus (M+1)/(e^((M+1)a) - 1)": for (M+1)a >= 1 the second
# term is at most 0.58 of the first, so the subtraction is benign.
_NEAR_UNIFORM_BELOW = 1.0

# Bernoulli coefficients B_2n / (2n)! for 1/(e^t - 1) = 1/t - 1/2 + sum c_n t^(2n-1).
_BERNOULLI = (1 / 12, -1 / 720, 1 / 30240, -1 / 1209600, 1 / 47900160,
              -691 / (2730 * 479001600))


@dataclass(frozen=True)
class QueueFigures:
    """Steady state of one M/M/1/M terminal (eq. 5-6); times in 1 / the rates' unit."""

    arrival_rate: float  # lambda, offered packets per unit time
    service_rate: float  # mu
    capacity: int  # M, places including the one in service
    rho: float  # eq. 5, lambda / mu; may exceed 1 (finite buffer)
    loss_probability: float  # eq. 6, P_loss = p_M: an arrival finds the buffer full
    idle_probability: float  # p_0: the server is idle
    mean_in_system: float  # eq. 6, L_s, in service included
    mean_delay: float  # eq. 6, tau_delay: sojourn of an accepted packet (Little's law)
    throughput: float  # lambda (1 - P_loss) = mu (1 - p_0): accepted = forwarded


def _excess(t: float) -> float:
    """f(t) = 1/(e^t - 1) - 1/t + 1/2, smooth and ~t/12 near 0, without cancellation."""
    if t == 0.0:
        return 0.0
    if t < _SERIES_BELOW:
        t2 = t * t
        acc = 0.0
        for c in reversed(_BERNOULLI):
            acc = acc * t2 + c
        return acc * t
    # 1/(e^t - 1) as e^-t / (1 - e^-t): no overflow for large t.
    return math.exp(-t) / -math.expm1(-t) - 1.0 / t + 0.5


def _geometric_sum(a: float, n: int) -> float:
    """sum_{k=0..n} q^k with q = e^-a, a >= 0, as (1 - q^(n+1)) / (1 - q) via expm1."""
    if a == 0.0:
        return float(n + 1)
    return math.expm1(-(n + 1) * a) / math.expm1(-a)


def _geometric_mean_index(a: float, m: int) -> float:
    """Mean of k under weights q^k, k = 0..m, q = e^-a (a truncated geometric law)."""
    t = (m + 1) * a
    if t < _NEAR_UNIFORM_BELOW:
        # 1/(e^a-1) - (m+1)/(e^t-1) with the 1/a poles removed by hand: m/2 + f(a) - (m+1) f(t)
        return m / 2 + _excess(a) - (m + 1) * _excess(t)
    return math.exp(-a) / -math.expm1(-a) - (m + 1) * math.exp(-t) / -math.expm1(-t)


def mm1m(arrival_rate: float, service_rate: float, capacity: int) -> QueueFigures:
    """Eq. 5-6 for one terminal: rho, loss, mean number in system and delay.

    Raises ValueError for a rate that is not a finite positive number, a
    capacity that is not an integer >= 1, or rates whose ratio over- or
    underflows a float (no meaningful rho).
    """
    # A NaN rate was never measured; an infinite one has no steady state to report.
    lam = require_real("arrival_rate", arrival_rate, above=0.0)
    mu = require_real("service_rate", service_rate, above=0.0)
    m = require_int("capacity", capacity, min=1)  # room for the packet in service
    rho = lam / mu  # eq. 5
    if rho == 0.0 or math.isinf(rho):
        raise ValueError(f"arrival_rate / service_rate = {lam!r} / {mu!r} is outside the "
                         "float range; rescale the rates")
    # p_i = rho^i p_0 (eq. 6). With q = min(rho, 1/rho) = e^-a the weights are
    # q^i (rho <= 1) or q^(M-i) (rho > 1): the same truncated geometric law,
    # read from the other end, so one set of stable sums serves both sides.
    a = abs(math.log(rho))
    g_full = _geometric_sum(a, m)  # sum of the M+1 weights
    g_short = _geometric_sum(a, m - 1)  # the same without the far end's weight
    near_end = _geometric_mean_index(a, m)
    q_m = math.exp(-m * a)  # weight of the far end
    if rho <= 1.0:
        p_loss, p_idle = q_m / g_full, 1.0 / g_full
        accepted = g_short / g_full  # 1 - P_loss without subtracting
        l_s = near_end
    else:
        p_loss, p_idle = 1.0 / g_full, q_m / g_full
        accepted = math.exp(-a) * g_short / g_full
        l_s = m - near_end
    throughput = lam * accepted
    return QueueFigures(
        arrival_rate=lam, service_rate=mu, capacity=m, rho=rho,
        loss_probability=p_loss, idle_probability=p_idle, mean_in_system=l_s,
        mean_delay=l_s / throughput,  # eq. 6, Little's law on the accepted stream
        throughput=throughput)


def path_delay(hops: Sequence[QueueFigures], retransmit_wait: Sequence[float]) -> float:
    """Eq. 7: tau_sum = sum_j (tau_delay_j + P_loss_j * t_rw_j) over a path's forwarding nodes.

    ``retransmit_wait[j]`` is t_rw_j, the fixed wait before node j's sender
    retries a lost packet, in the same time unit as the queues' delays. An
    empty path (sender and receiver adjacent, nobody forwards) takes 0.
    """
    hops = list(hops)
    waits = list(retransmit_wait)
    if len(hops) != len(waits):
        raise ValueError(f"{len(hops)} hops but {len(waits)} retransmission waits: "
                         "eq. 7 needs one wait per forwarding node")
    terms = []
    for j, (hop, wait) in enumerate(zip(hops, waits, strict=True)):
        if not isinstance(hop, QueueFigures):
            raise ValueError(f"hop {j} is {type(hop).__name__}, not QueueFigures (see mm1m)")
        t_rw = require_real(f"retransmit_wait[{j}]", wait, min=0.0)
        terms.append(hop.mean_delay + hop.loss_probability * t_rw)
    return math.fsum(terms)


def load_balance_degree(idle_bandwidth: Iterable[float]) -> float:
    """Eq. 8: L_load = sum_j (B_j - B_mean)^2 / N_num, the population variance of B.

    Definitions (the digest's reading of eq. 8): B_j is the idle bandwidth of
    link j, its capacity minus the load it carries, in any one unit (bit/s,
    say; L_load is then in that unit squared); N_num is the number of links,
    so the result is the population variance over links. 0 means perfectly
    balanced. A negative B_j (a link carrying more than its capacity) is
    refused: eq. 9 requires B_j >= 0, so such a network is infeasible, not
    merely unbalanced. No links at all is refused too (N_num = 0).
    """
    b = []
    for j, value in enumerate(idle_bandwidth):
        x = require_real(f"idle bandwidth of link {j}", value)
        if x < 0.0:
            raise ValueError(f"link {j} is over capacity (idle bandwidth {x!r} < 0); "
                             "eq. 9 requires B_j >= 0")
        b.append(x)
    if not b:
        raise ValueError("no links: eq. 8 divides by N_num = 0")
    if min(b) == max(b):
        return 0.0  # all equal: exactly balanced, whatever the rounding of the mean
    n = len(b)
    mean = math.fsum(b) / n
    dev = [x - mean for x in b]
    # Two-pass variance with the first pass's rounding of the mean corrected.
    return max(0.0, (math.fsum(d * d for d in dev) - math.fsum(dev) ** 2 / n) / n)
