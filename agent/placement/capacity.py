"""Capacitated assignment: every meter to a terminal, no terminal over ``cap`` meters.

The paper's step (3) sends each meter to its nearest centre (eq. 1). With a
hard capacity that is no longer enough: the assignment must minimise the total
meter-to-centre distance subject to ``load <= cap`` on every centre. That is a
transportation problem, and this module solves it exactly with successive
shortest paths (a min-cost flow), numpy only, so the terminal runs it too.

The flow network, contracted so its size is the number of centres k, not the
number of meters n:

- nodes are the k centres plus one sink ``T``;
- an edge ``a -> b`` stands for "move one meter from centre a to centre b"; its
  cost is the cheapest such move, ``min over meters m at a of D(m, b) - D(m, a)``
  (eq. 1 distances), and the meter that achieves it is remembered;
- ``b -> T`` (cost 0) while b is below ``cap``; ``T -> b`` (cost 0) while b
  sends anything to T.

How it runs:

1. Prices: a few vectorised sweeps raise the price ``p_b`` of every over-full
   centre until the price-adjusted nearest assignment ``argmin_b D(m, b) + p_b``
   is nearly within capacity (``_raise_prices``). Any prices >= 0 are a valid
   start; good ones only save work. The plan passes the previous round's
   final prices back in, since its centres moved little.
2. Exact repair: that assignment has no negative cycle, so pushing each unit
   of excess along a shortest path (on reduced costs, with node potentials)
   to a node with room ends in an optimal assignment. Shortest paths come
   from a Bellman-Ford vectorised over the k + 1 nodes that stops early once
   the paths to all sinks are final; every path of one search whose meters
   have not moved yet is used before searching again.
3. The final potentials are the optimal dual prices, returned for the next call.

A lower bound on every centre's load (``assign_bounded``) reuses the same
solver with one upper bound per centre on a network with each centre split in
two (required places, and extra places priced high).

Ties between equal-cost assignments are broken by index order, so the result
is deterministic; which of several optimal assignments comes back can depend
on the prices passed in, its total distance does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

from agent.placement.geometry import as_points, distances
from agent.placement.metrics import loads
from hal.require import require_int

# Bellman-Ford accepts an improvement only if it beats the old label by this
# fraction of the largest meter-centre distance; prices below it count as 0.
# Rounding in sums of differences of distances is ~1e-16 relative; 1e-9 keeps
# rounding from faking a negative cycle while costing at most ~n * 1e-9 of the
# optimum.
RELATIVE_TOLERANCE = 1e-9

# Edge costs are recomputed for many centres at once through a (rows, m, k)
# block; this caps the block at 2**20 float64 entries (8 MB) so the terminal's
# RAM budget holds however many centres there are.
EDGE_BLOCK_ENTRIES = 1 << 20

# Price-raising sweeps before the exact repair (_raise_prices). A sweep is
# O(n k) numpy work and pushes excess one neighbour further out; on 2000
# meters and 84 centres the first few remove most of it, later ones stall as
# neighbours trade the same meters, and the exact repair finishes faster.
PRICE_SWEEPS = 60
# So sweeping stops once a sweep removes fewer than this many meters of excess.
SWEEP_MIN_GAIN = 2


@dataclass(frozen=True)
class Repair:
    """What the capacity bound cost, relative to the plain nearest-centre assignment.

    ``prices`` are the optimal dual prices (``p_b >= 0``, zero on centres below
    ``cap``): the assignment is ``argmin_b D(m, b) + p_b``. They warm-start the
    next call with nearby centres.
    """

    moves: int  # meters not at (one of) their nearest centre(s)
    cost_m: float  # extra metres in total over the nearest-centre assignment
    prices: np.ndarray = field(default_factory=lambda: np.zeros(0), compare=False, repr=False)


def check_cap(cap: object) -> int:
    """``cap`` as an int >= 1, or a ValueError: a terminal must be able to serve a meter."""
    return require_int("cap", cap, min=1)


def check_assignment(points: object, centres: object, cap: object,
                     what: str = "centre") -> tuple[np.ndarray, np.ndarray, int]:
    """(points, centres, cap) checked for an assignment: at least one ``what``, room
    for every meter; a one-line ValueError otherwise."""
    pts = as_points(points)
    ctr = as_points(centres, f"{what}s")
    cap = check_cap(cap)
    n, k = len(pts), len(ctr)
    if k < 1:
        raise ValueError(f"there must be at least one {what}")
    if n > k * cap:
        raise ValueError(f"infeasible: {n} meters but {k} {what}s x cap {cap} = "
                         f"{k * cap} places")
    return pts, ctr, cap


def assign_capacitated(points: object, centres: object, cap: int, *,
                       prices: np.ndarray | None = None) -> tuple[np.ndarray, Repair]:
    """The assignment of meters to centres with least total distance and no centre over ``cap``.

    Exact (min-cost flow), deterministic, and it terminates: every
    augmentation removes one unit of excess, at most n in all. ``prices``
    (from a previous ``Repair`` with nearby centres) only change how fast the
    answer is found, never its total distance.
    Memory is O(n k): the meter-centre distance matrix. Empty ``points`` give
    an empty assignment.
    """
    pts, ctr, cap = check_assignment(points, centres, cap)
    n, k = len(pts), len(ctr)
    p = np.zeros(k)
    if prices is not None:
        p = np.asarray(prices, dtype=np.float64)
        if p.shape != (k,) or not np.isfinite(p).all() or (p < 0).any():
            raise ValueError(f"prices must be {k} finite values >= 0")
    if n == 0:
        return np.zeros(0, dtype=np.int64), Repair(0, 0.0, np.zeros(k))
    return assign_from_distances(distances(pts, ctr), cap, p)


def assign_from_distances(dist: np.ndarray, cap: int | np.ndarray,
                          prices: np.ndarray) -> tuple[np.ndarray, Repair]:
    """The solver behind ``assign_capacitated`` on a ready (n, k) distance matrix.

    The caller has checked its inputs: finite distances, n <= k * cap, prices >= 0.
    """
    n, k = dist.shape
    # More room than meters changes nothing, and stays within int64. ``cap`` may
    # also be one bound per centre (``assign_bounded`` uses that).
    cap = np.minimum(np.broadcast_to(np.asarray(cap, dtype=np.int64), (k,)), n)
    tol = RELATIVE_TOLERANCE * (1.0 + float(np.abs(dist).max()))
    prices = _raise_prices(dist, prices, cap, tol)
    assign = np.argmin(dist + prices, axis=1).astype(np.int64)  # the API's type, on 32-bit too
    load = loads(assign, k).astype(np.int64)
    # Flow on b -> T. A priced centre must be full (complementary slackness),
    # so it starts wanting cap; an unpriced one passes on what it has, up to cap.
    to_sink = np.where(prices > 0, cap, np.minimum(load, cap)).astype(np.int64)
    balance = np.zeros(k + 1, dtype=np.int64)
    balance[:k] = load - to_sink
    balance[k] = int(to_sink.sum()) - n

    net = _Network(dist, assign, to_sink, cap, prices)
    while (balance > 0).any():
        short = balance < 0
        reach, pred = net.shortest_paths(balance > 0, short, tol)
        sinks = np.flatnonzero(short & np.isfinite(reach))
        if len(sinks) == 0:  # cannot happen when n <= k * cap; kept as a loud guard
            raise RuntimeError("capacity repair found no room for the excess")
        movers = net.mover.copy()  # the meters this search's paths move
        for t in sinks[np.argsort(reach[sinks], kind="stable")].tolist():
            path = _trace(pred, t)
            # Paths of one search stay shortest while their edges are open: an
            # edge's cost does not change while its meter stays put.
            if balance[path[0]] > 0 and balance[t] < 0 and net.is_open(path, movers):
                net.push(path, movers)
                balance[path[0]] -= 1
                balance[t] += 1
        net.refresh()

    price = net.prices(tol)
    nearest = dist.min(axis=1)
    own = dist[np.arange(n), assign]
    repair = Repair(moves=int((own > nearest).sum()),
                    cost_m=float((own - nearest).sum()), prices=price)
    return assign, repair


def assign_bounded(dist: np.ndarray, cap: int, min_load: int,
                   prices: np.ndarray | None = None) -> tuple[np.ndarray, Repair]:
    """Least total distance with ``min_load <= load <= cap`` on every centre, never infeasible.

    The lower bound is a flow lower bound written as costs: each centre is split
    into a "required" copy (``min_load`` places at distance D) and an "extra"
    copy (``cap - min_load`` places at D + M). M exceeds what any augmenting
    path can save in distance, so the optimum fills every required place it
    can (all of them when ``k * min_load <= n``, which ``plan`` ensures) and
    otherwise minimises distance exactly. ``min_load`` is clipped to n // k,
    so a bound that no assignment meets is relaxed rather than failing; ``cap``
    stays hard. ``prices`` are this function's own (2k) prices from a previous
    call. The caller has checked n <= k * cap and finite distances.
    """
    n, k = dist.shape
    low = max(0, min(int(min_load), n // k, cap))
    if low == 0 or low >= cap:  # no bound, or cap alone forces every load to cap
        p = np.zeros(k) if prices is None or len(prices) != k else prices
        return assign_from_distances(dist, cap, p)
    # Any augmenting path crosses at most 2k + 1 edges, each worth at most max D.
    big = (2 * k + 2) * float(dist.max()) + 1.0
    split = np.hstack([dist, dist + big])
    caps = np.concatenate([np.full(k, low), np.full(k, cap - low)])
    p = np.zeros(2 * k) if prices is None or len(prices) != 2 * k else prices
    both, rep = assign_from_distances(split, caps, p)
    assign = both % k
    nearest = dist.min(axis=1)
    own = dist[np.arange(n), assign]
    return assign, Repair(moves=int((own > nearest).sum()),
                          cost_m=float((own - nearest).sum()), prices=rep.prices)


class _Network:
    """The contracted residual network of one repair: k centres and the sink T (index k).

    ``cost[u, v]`` is the cost of edge u -> v, ``mover[u, v]`` the meter it
    moves. ``members[c, :load[c]]`` lists centre c's meters (in no set order)
    so a centre's edges are recomputed without scanning all n meters.
    """

    def __init__(self, dist: np.ndarray, assign: np.ndarray, to_sink: np.ndarray,
                 cap: np.ndarray, prices: np.ndarray) -> None:
        n, k = dist.shape
        self.dist, self.assign, self.to_sink, self.cap, self.k = dist, assign, to_sink, cap, k
        # Node potentials; -prices makes the starting assignment's reduced costs >= 0.
        self.pi = np.zeros(k + 1)
        self.pi[:k] = -prices
        self.cost = np.full((k + 1, k + 1), np.inf)
        self.mover = np.full((k, k), -1, dtype=np.int64)
        self.load = loads(assign, k)
        # Only sources lose meters and no other centre goes past cap, so this width holds.
        width = max(1, int(cap.max()), int(self.load.max()))
        order = np.argsort(assign, kind="stable")
        starts = np.concatenate(([0], np.cumsum(self.load)[:-1]))
        self.slot = np.empty(n, dtype=np.int64)  # meter -> its column in members
        self.slot[order] = np.arange(n) - starts[assign[order]]
        self.members = np.full((k, width), -1, dtype=np.int64)
        self.members[assign, self.slot] = np.arange(n)
        self.touched: set[int] = set()
        self._rows(np.arange(k))
        self._sink_edges()

    def shortest_paths(self, sources: np.ndarray, sinks: np.ndarray,
                       tol: float) -> tuple[np.ndarray, np.ndarray]:
        """Shortest paths from every source at once to the sinks, on reduced costs.

        Bellman-Ford, relaxing all edges per sweep (a handful of numpy calls on
        the (k + 1)^2 matrix; a Dijkstra loops in Python once per node and
        measured slower). Reduced costs are >= 0, so it can stop as soon as no
        label below ``bound`` (the farthest sink's) changed: every label below
        it is then exact, and so is every sink's. The potentials then move by
        min(label, bound), which keeps reduced costs >= 0 and makes the edges
        of the returned paths 0 (Dijkstra's rule for an early stop).
        """
        size = self.k + 1
        pi = self.pi
        into = self.cost.T + (pi[None, :] - pi[:, None])  # into[v, u]: reduced cost u -> v
        cand = np.empty_like(into)
        reach = np.where(sources, 0.0, np.inf)
        pred = np.full(size, -1, dtype=np.int64)
        cols = np.arange(size)
        for _ in range(size + 1):
            np.add(into, reach, out=cand)
            best = np.argmin(cand, axis=1)
            value = cand[cols, best]
            better = value < reach - tol
            if not better.any():
                break
            reach[better] = value[better]
            pred[better] = best[better]
            bound = float(reach[sinks].max())
            if value[better].min() >= bound:
                break
        else:
            raise RuntimeError("capacity repair met a negative cycle (rounding beyond tolerance)")
        bound = float(reach[sinks].max())
        if np.isfinite(bound):
            pi += np.minimum(reach, bound)
        else:  # some sink unreachable: the labels are exact where finite
            pi += np.where(np.isfinite(reach), reach, float(reach[np.isfinite(reach)].max()))
        return reach, pred

    def prices(self, tol: float) -> np.ndarray:
        """p_b = pi_T - pi_b: >= 0, 0 on centres below cap, and the assignment is
        argmin_b D(m, b) + p_b (reduced costs >= 0). Rounding noise below ``tol``
        is cut to 0, so a centre below cap does not look priced next time."""
        p = self.pi[self.k] - self.pi[:self.k]
        p[p <= tol] = 0.0
        return p

    def is_open(self, path: list[int], movers: np.ndarray) -> bool:
        """Whether every edge of ``path`` still has room after this search's earlier pushes."""
        k = self.k
        for u, v in pairwise(path):
            if v == k:
                if self.to_sink[u] >= self.cap[u]:
                    return False
            elif u == k:
                if self.to_sink[v] <= 0:
                    return False
            elif self.assign[movers[u, v]] != u:
                return False  # that meter already moved in this search
        return True

    def push(self, path: list[int], movers: np.ndarray) -> None:
        """One unit along ``path``: move each edge's meter (as the search saw it), or
        shift flow to/from T. The edges of centres that gained or lost a meter are
        stale until ``refresh``."""
        k = self.k
        # From the far end back, so a centre on the path gives before it takes
        # and never holds more than ``members`` has room for.
        for u, v in reversed(list(pairwise(path))):
            if v == k:
                self.to_sink[u] += 1
            elif u == k:
                self.to_sink[v] -= 1
            else:
                self._move(int(movers[u, v]), u, v)

    def refresh(self) -> None:
        """Recompute the edges of every centre touched since the last refresh, in one batch."""
        if self.touched:
            self._rows(np.fromiter(sorted(self.touched), dtype=np.int64))
            self.touched.clear()
        self._sink_edges()

    def _move(self, m: int, u: int, v: int) -> None:
        members, slot, load = self.members, self.slot, self.load
        last = int(load[u]) - 1
        other = int(members[u, last])  # the last member of u fills m's column
        members[u, slot[m]] = other
        slot[other] = slot[m]
        members[u, last] = -1
        load[u] = last
        members[v, load[v]] = m
        slot[m] = load[v]
        load[v] += 1
        self.assign[m] = v
        self.touched.update((u, v))

    def _sink_edges(self) -> None:
        """The zero-cost edges b -> T while b is below cap, T -> b while b sends to T."""
        k = self.k
        self.cost[:k, k] = np.where(self.to_sink < self.cap, 0.0, np.inf)
        self.cost[k, :k] = np.where(self.to_sink > 0, 0.0, np.inf)

    def _rows(self, rows: np.ndarray) -> None:
        """Edges out of the given centres: each one's cheapest meter move to every centre."""
        k, dist = self.k, self.dist
        width = max(1, int(self.load[rows].max()))
        step = max(1, EDGE_BLOCK_ENTRIES // (width * k))
        for lo in range(0, len(rows), step):
            row_ids = rows[lo:lo + step]
            block = self.members[row_ids, :width]
            valid = block >= 0
            safe = np.where(valid, block, 0)
            delta = dist[safe] - dist[safe, row_ids[:, None]][:, :, None]  # (rows, m, k)
            delta[~valid] = np.inf
            best = np.argmin(delta, axis=1)  # (rows, k)
            out = np.take_along_axis(delta, best[:, None, :], axis=1)[:, 0, :]
            movers = np.take_along_axis(block, best, axis=1)  # -1 where a row is empty
            here = np.arange(len(row_ids))
            out[here, row_ids] = np.inf
            movers[here, row_ids] = -1
            self.cost[row_ids, :k] = out
            self.mover[row_ids] = movers


def _raise_prices(dist: np.ndarray, prices: np.ndarray, cap: np.ndarray,
                  tol: float) -> np.ndarray:
    """Cheap head start for the exact repair: raise the price of every over-full centre.

    Each sweep raises an over-full centre's price just enough that its
    ``load - cap`` least attached meters (smallest margin to their second
    choice) prefer another centre; those may overfill a neighbour, which the
    next sweep raises in turn. Prices only rise, so a priced centre stays at
    least full; if the sweeps end with none over-full the assignment already
    meets the optimality conditions. Whatever is left, the shortest-path
    repair finishes exactly.
    """
    n, k = dist.shape
    if k < 2:
        return prices
    p = prices.copy()
    rows = np.arange(n)
    value = np.empty_like(dist)
    last = n + 1
    for _ in range(PRICE_SWEEPS):
        np.add(dist, p, out=value)
        assign = np.argmin(value, axis=1)
        load = loads(assign, k)
        excess = int(np.maximum(load - cap, 0).sum())
        if excess == 0 or last - excess < SWEEP_MIN_GAIN:
            break  # done, or the sweeps stall (neighbours trading the same meters)
        last = excess
        best = value[rows, assign]
        value[rows, assign] = np.inf
        margin = value.min(axis=1) - best
        over = load > cap
        members = np.flatnonzero(over[assign])
        owner = assign[members]
        order = np.lexsort((margin[members], owner))
        owners = np.flatnonzero(over)
        starts = np.searchsorted(owner[order], owners)
        kth = margin[members[order[starts + load[owners] - cap[owners] - 1]]]
        p[owners] += kth + tol
    return p


def _trace(pred: np.ndarray, t: int) -> list[int]:
    """The node path from a source to ``t`` along the predecessor tree."""
    path = [t]
    while pred[path[-1]] >= 0:
        path.append(int(pred[path[-1]]))
        if len(path) > len(pred):
            raise RuntimeError("capacity repair found a cycle in its path tree")
    path.reverse()
    return path
