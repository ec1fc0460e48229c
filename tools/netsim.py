"""Packets through the terminals' M/M/1/M forwarding queues, simulated in SimPy (section 2.2.2).

The router prices paths with closed forms (eq. 5-8); this is the check
against time: a discrete-event simulation (SimPy) of the same network in
which every packet is queued, served, carried, lost and retransmitted one
by one, so the ledger's chain building (endorsement round, proof of work,
block broadcast) can be timed on the routes each method chose and eq. 8 can
be measured on the bandwidth the links really carried.

The model, assumption by assumption (``agent.routing.network`` is the
model the router uses; where this differs, it says so):

- **Terminal = one forwarding queue**, M/M/1/M (eq. 5-6): first come first
  served, exponential service at ``Node.service_rate`` packets/s, at most
  ``Node.buffer`` packets including the one in service. Every node that puts
  a packet on a link forwards it through this queue, the source included;
  the destination only receives (as ``Network.path_delay`` counts). A
  packet that leaves the network over the terminal's uplink (``leaves=True``,
  meter data bound for the master station) is forwarded by the last
  terminal's queue too.
- **Link = a fixed delay**: transmission ``packet_bits / capacity`` plus
  ``latency``, no queue of its own (the forwarding queue is the contention
  point, as in the paper and in ``Network.path_delay``). Capacity still
  bounds the idle bandwidth of eq. 8.
- **Losses and retransmission** (eq. 7): a packet that finds node j's buffer
  full is offered to node j again after t_rw_j (the sender's timeout and
  resend folded into one wait, which is how eq. 7 charges P_loss_j t_rw_j).
  A packet lost on link i-j (probability 1 - ``Link.delivery``) is offered
  to node i's queue again after t_rw_i: the sender forwards it again. (With
  t_rw_j = 0 a dropped packet is offered again when node j next forwards a
  packet, not at the same instant, which would find the same full buffer.) The
  router's eq. 7 has no term for link losses; only the reliability baseline
  sees ``delivery``. ``retransmit=False`` drops instead (pure M/M/1/M, for
  checking eq. 6).
- **Counters**: each node counts offers (first attempts and retries),
  drops, services and the sojourn of served packets; each link counts the
  bits of every transmission attempt (a lost packet occupied the link too).
  ``snapshot`` / ``Snapshot.since`` turn them into rates over a window.
- **Randomness**: one ``random.Random`` stream per node (service), per
  link (loss), per packet source and one for proof of work, each seeded from
  (seed, its role, its name) with Python's string seeding (SHA-512, so the
  same on every run and platform). Streams apart keep two runs that differ
  only in routes close: the background arrivals are drawn identically.

This is a desk tool (SimPy is not on the terminal); only ``NetSim`` imports it,
so the counters and checks here work without it.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from agent.routing.network import PACKET_BITS, Network
from hal.require import require_int, require_real

if TYPE_CHECKING:  # SimPy is imported by NetSim itself: the counters need no desk library
    import simpy


class SimError(ValueError):
    """A simulation asked for with parameters that mean nothing; the message names which."""


def stream(seed: int, role: str, name: str = "") -> random.Random:
    """The random stream of one role (``service``, ``loss``, ``source``, ``pow``) and name."""
    return random.Random(f"edgekey-netsim:{seed}:{role}:{name}")


# ---------------------------------------------------------------- counters


@dataclass(frozen=True)
class NodeCount:
    """One forwarding queue's counters (cumulative, or over a window)."""

    offered: int = 0  # packets offered to the queue, retries included
    dropped: int = 0  # offers that found the buffer full
    served: int = 0  # packets forwarded
    sojourn_s: float = 0.0  # summed time in the queue of the served packets

    @property
    def loss(self) -> float:
        """Fraction of offers that found the buffer full (eq. 6's P_loss, measured)."""
        return self.dropped / self.offered if self.offered else 0.0

    @property
    def mean_sojourn(self) -> float:
        """Mean time in the queue of a forwarded packet (eq. 6's tau_delay, measured)."""
        return self.sojourn_s / self.served if self.served else math.nan

    def minus(self, other: NodeCount) -> NodeCount:
        return NodeCount(self.offered - other.offered, self.dropped - other.dropped,
                         self.served - other.served, self.sojourn_s - other.sojourn_s)


@dataclass(frozen=True)
class LinkCount:
    """One link's counters, both directions together (links are undirected)."""

    bits: int = 0  # bits of every transmission attempt
    packets: int = 0
    lost: int = 0  # attempts the link lost (1 - delivery)

    def minus(self, other: LinkCount) -> LinkCount:
        return LinkCount(self.bits - other.bits, self.packets - other.packets,
                         self.lost - other.lost)


@dataclass(frozen=True)
class Snapshot:
    """Every counter at one simulated time; ``since`` gives a window's counts."""

    time: float
    nodes: Mapping[str, NodeCount]
    links: Mapping[tuple[str, str], LinkCount]  # keyed (a, b) as in ``Network.links``

    def since(self, earlier: Snapshot) -> Window:
        if earlier.time > self.time:
            raise SimError(f"window from {earlier.time!r} s back to {self.time!r} s")
        return Window(
            start=earlier.time, end=self.time,
            nodes=MappingProxyType({k: v.minus(earlier.nodes[k]) for k, v in self.nodes.items()}),
            links=MappingProxyType({k: v.minus(earlier.links[k]) for k, v in self.links.items()}))


@dataclass(frozen=True)
class Window:
    """Counts over [start, end] of simulated time, and the rates they give."""

    start: float
    end: float
    nodes: Mapping[str, NodeCount]
    links: Mapping[tuple[str, str], LinkCount]

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def _per_s(self, count: float) -> float:
        if self.seconds <= 0:
            raise SimError("an empty window has no rates")
        return count / self.seconds

    def link_load_bps(self, a: str, b: str) -> float:
        """Time-averaged bit/s the link carried in the window (both directions)."""
        key = _pair(a, b)
        count = self.links.get(key)
        if count is None:
            raise SimError(f"no link {key[0]!r}-{key[1]!r} in this window")
        return self._per_s(count.bits)

    def node_arrival_rate(self, name: str) -> float:
        """Packets/s offered to the terminal's queue in the window (lambda_j, retries in)."""
        count = self.nodes.get(name)
        if count is None:
            raise SimError(f"no terminal {name!r} in this window")
        return self._per_s(count.offered)

    def idle_bandwidths(self, network: Network) -> list[float]:
        """B_j = capacity - measured load per link, in ``network.links`` order (eq. 8)."""
        return [lk.capacity - self.link_load_bps(lk.a, lk.b) for lk in network.links]


@dataclass
class _Tagged:
    sent: int = 0
    delivered: int = 0
    dropped: int = 0
    delay_s: float = 0.0


@dataclass(frozen=True)
class TagCount:
    """End-to-end figures of the packets sent under one tag."""

    sent: int
    delivered: int
    dropped: int  # given up (only when sent with retransmit=False)
    delay_s: float  # summed creation-to-delivery time of the delivered packets

    @property
    def mean_delay(self) -> float:
        return self.delay_s / self.delivered if self.delivered else math.nan


# ---------------------------------------------------------------- the pieces


class _Queue:
    """One terminal's M/M/1/M forwarding queue: a server process over a deque of waiters."""

    def __init__(self, env: simpy.Environment, name: str, mu: float, capacity: int,
                 t_rw: float, rng: random.Random):
        self.env, self.name, self.mu, self.capacity, self.t_rw = env, name, mu, capacity, t_rw
        self.rng = rng
        self.waiting: deque[tuple[simpy.Event, float]] = deque()  # head is in service
        self.wake: simpy.Event | None = None
        self.departed: simpy.Event | None = None  # fires at the next departure (room frees)
        self.offered = self.dropped = self.served = 0
        self.sojourn_s = 0.0
        env.process(self._serve())

    def offer(self) -> simpy.Event | None:
        """Join the queue: an event that fires when forwarded, or None if the buffer is full."""
        self.offered += 1
        if len(self.waiting) >= self.capacity:  # M places, the one in service included
            self.dropped += 1
            return None
        done = self.env.event()
        self.waiting.append((done, self.env.now))
        if self.wake is not None and not self.wake.triggered:
            self.wake.succeed()
        return done

    def _serve(self) -> Generator[simpy.Event, Any, None]:
        env = self.env
        while True:
            if not self.waiting:
                self.wake = env.event()
                yield self.wake
            yield env.timeout(self.rng.expovariate(self.mu))
            done, since = self.waiting.popleft()
            self.served += 1
            self.sojourn_s += env.now - since
            done.succeed()
            if self.departed is not None:
                self.departed.succeed()
                self.departed = None

    def retry_after_drop(self) -> simpy.Event:
        """When a dropped packet is offered again: t_rw later, or with t_rw = 0 at the
        next departure (retrying at the same instant would find the same full buffer)."""
        if self.t_rw > 0:
            return self.env.timeout(self.t_rw)
        if self.departed is None:
            self.departed = self.env.event()
        return self.departed


class _Wire:
    """One undirected link: fixed transmission + propagation delay, Bernoulli loss."""

    def __init__(self, capacity: float, latency: float, delivery: float, rng: random.Random,
                 packet_bits: int):
        self.delay = packet_bits / capacity + latency
        self.delivery = delivery
        self.rng = rng
        self.bits = self.packets = self.lost = 0


@dataclass(frozen=True)
class ChainTiming:
    """One chain building (section 2.2.2): endorsement round, proof of work, block broadcast."""

    origin: str
    start: float  # endorsement requests handed to the origin's queue
    endorsed: float  # a majority of the terminals (origin included) has endorsed
    sealed: float  # proof of work done
    done: float  # the last terminal has the whole block

    @property
    def chain_time(self) -> float:
        return self.done - self.start


# ---------------------------------------------------------------- the simulator


class NetSim:
    """A SimPy environment carrying packets over ``network``'s terminals and links.

    ``network`` gives the static figures (service rate, buffer, t_rw, link
    capacity, latency, delivery); its measured loads and arrival rates are
    ignored: here the traffic is generated, not assumed.
    """

    def __init__(self, network: Network, seed: int, *, packet_bits: int = PACKET_BITS):
        if not isinstance(network, Network):
            raise SimError(f"expected an agent.routing.network.Network, got "
                           f"{type(network).__name__}")
        if not network.nodes:
            raise SimError("a network needs at least one terminal (N >= 1)")
        self.seed = require_int("seed", seed, min=0, error=SimError)
        self.packet_bits = require_int("packet_bits", packet_bits, min=1, error=SimError)
        import simpy

        self._simpy = simpy
        self.network = network
        self.env = simpy.Environment()
        self._queues = {name: _Queue(self.env, name, n.service_rate, n.buffer,
                                     n.retransmit_wait, stream(self.seed, "service", name))
                        for name, n in network.nodes.items()}
        self._wires = {(lk.a, lk.b): _Wire(lk.capacity, lk.latency, lk.delivery,
                                           stream(self.seed, "loss", f"{lk.a}-{lk.b}"),
                                           self.packet_bits)
                       for lk in network.links}
        self._tags: dict[str, _Tagged] = {}
        self._pow = stream(self.seed, "pow")

    @property
    def now(self) -> float:
        return float(self.env.now)

    # -- packets

    def _check_path(self, path: Sequence[str], leaves: bool) -> tuple[str, ...]:
        path = tuple(path)
        if not path:
            raise SimError("an empty path")
        for v in path:
            if v not in self._queues:
                raise SimError(f"path {path!r}: unknown terminal {v!r}")
        if len(path) == 1 and not leaves:
            raise SimError(f"path {path!r} goes nowhere: a packet that stays on its terminal "
                           "needs leaves=True (forwarded to the uplink)")
        if len(path) > 1:
            self.network.path_links(path)  # simple, over existing links, or NetworkError
        return path

    def send(self, path: Sequence[str], *, tag: str = "", retransmit: bool = True,
             leaves: bool = False) -> simpy.Process:
        """Send one packet along ``path`` now; the process's value is its delivery time.

        With ``leaves`` the last terminal forwards it too (out over its
        uplink). Without ``retransmit`` a loss ends the packet (value None).
        """
        path = self._check_path(path, leaves)
        return self.env.process(self._carry(path, tag, retransmit, leaves))

    def _carry(self, path: tuple[str, ...], tag: str, retransmit: bool,
               leaves: bool) -> Generator[simpy.Event, Any, float | None]:
        env = self.env
        t0 = env.now
        stats = self._tags.setdefault(tag, _Tagged())
        stats.sent += 1
        last = len(path) if leaves else len(path) - 1
        for i in range(last):
            q = self._queues[path[i]]
            wire = self._wires[_pair(path[i], path[i + 1])] if i + 1 < len(path) else None
            while True:
                done = q.offer()
                if done is None:  # buffer full: resent to this node after its t_rw (eq. 7)
                    if not retransmit:
                        stats.dropped += 1
                        return None
                    yield q.retry_after_drop()
                    continue
                yield done
                if wire is None:
                    break
                wire.bits += self.packet_bits
                wire.packets += 1
                yield env.timeout(wire.delay)
                if wire.delivery >= 1.0 or wire.rng.random() < wire.delivery:
                    break
                wire.lost += 1  # lost on the link: this node sends it again after its t_rw
                if not retransmit:
                    stats.dropped += 1
                    return None
                yield env.timeout(q.t_rw)
        stats.delivered += 1
        stats.delay_s += env.now - t0
        return float(env.now)

    def poisson(self, path: Sequence[str], rate_pps: float, *, tag: str = "",
                start: float = 0.0, stop: float = math.inf, retransmit: bool = True,
                leaves: bool = False, name: str | None = None) -> simpy.Process:
        """A Poisson packet stream along ``path`` at ``rate_pps`` from ``start`` until ``stop``.

        Its gaps come from its own stream, seeded by ``name`` (default: the path).
        """
        path = self._check_path(path, leaves)
        rate = require_real("rate_pps", rate_pps, above=0.0, error=SimError)
        start = require_real("start", start, min=0.0, error=SimError)
        stop = require_real("stop", stop, min=0.0, allow_inf=True, error=SimError)
        rng = stream(self.seed, "source", name if name is not None else "/".join(path))
        return self.env.process(self._source(path, rate, tag, start, stop, retransmit, leaves,
                                             rng))

    def _source(self, path: tuple[str, ...], rate: float, tag: str, start: float, stop: float,
                retransmit: bool, leaves: bool,
                rng: random.Random) -> Generator[simpy.Event, Any, None]:
        env = self.env
        if start > env.now:
            yield env.timeout(start - env.now)
        while True:
            yield env.timeout(rng.expovariate(rate))
            if env.now >= stop:
                return
            env.process(self._carry(path, tag, retransmit, leaves))

    # -- the ledger

    def chain_build(self, origin: str, paths: Mapping[str, Sequence[str]], *,
                    pow_mean_s: float, block_packets: int = 1,
                    on_done: Callable[[ChainTiming], None] | None = None) -> simpy.Process:
        """One block, built now by ``origin``; the process's value is its ``ChainTiming``.

        ``paths[d]`` is the route origin -> d for every other terminal d.
        (1) Endorsement round, the first network-wide broadcast: one request
        packet to every d, and d's endorsement back along the reversed path;
        the round ends when more than half of all terminals (origin
        included) have endorsed, as every key operation needs (section 2.2.1).
        (2) Proof of work: an exponential time of mean ``pow_mean_s``
        (geometric trials of a small difficulty), drawn when the build
        starts so equal schedules draw equal times. (3) The block broadcast:
        ``block_packets`` packets to every d; done when the last d has all.
        """
        if origin not in self._queues:
            raise SimError(f"unknown origin terminal {origin!r}")
        others = set(self._queues) - {origin}
        if set(paths) != others:
            missing, extra = sorted(others - set(paths)), sorted(set(paths) - others)
            raise SimError(f"chain build at {origin!r} needs one path to every other terminal "
                           f"(missing {missing}, unexpected {extra})")
        for d, p in paths.items():
            p = tuple(p)
            if len(p) < 2 or p[0] != origin or p[-1] != d:
                raise SimError(f"path to {d!r} must run {origin!r} ... {d!r}, got {p!r}")
            self._check_path(p, False)
        pow_mean = require_real("pow_mean_s", pow_mean_s, min=0.0, error=SimError)
        blocks = require_int("block_packets", block_packets, min=1, error=SimError)
        pow_s = self._pow.expovariate(1.0 / pow_mean) if pow_mean > 0 else 0.0
        routes = {d: tuple(paths[d]) for d in sorted(paths)}
        return self.env.process(self._build(origin, routes, pow_s, blocks, on_done))

    def _build(self, origin: str, routes: dict[str, tuple[str, ...]], pow_s: float, blocks: int,
               on_done: Callable[[ChainTiming], None] | None
               ) -> Generator[simpy.Event, Any, ChainTiming]:
        env = self.env
        start = env.now
        # More than half of the N = len(routes) + 1 terminals: floor(N/2) + 1 votes,
        # the origin's own and `need` others.
        need = (len(routes) + 1) // 2
        if need:
            enough = env.event()
            got = [0]

            def endorse(path: tuple[str, ...]) -> Generator[simpy.Event, Any, None]:
                yield self.env.process(self._carry(path, "request", True, False))
                yield self.env.process(self._carry(path[::-1], "endorsement", True, False))
                got[0] += 1
                if got[0] == need:
                    enough.succeed()

            for path in routes.values():
                env.process(endorse(path))
            yield enough
        endorsed = env.now
        if pow_s > 0:
            yield env.timeout(pow_s)
        sealed = env.now
        sends = [env.process(self._carry(path, "block", True, False))
                 for path in routes.values() for _ in range(blocks)]
        if sends:
            yield self._simpy.AllOf(env, sends)
        timing = ChainTiming(origin, start, endorsed, sealed, env.now)
        if on_done is not None:
            on_done(timing)
        return timing

    # -- running and reading

    def run(self, until: float | simpy.Event) -> None:
        """Advance the simulation to a time (seconds) or until an event fires."""
        if not isinstance(until, self._simpy.Event):
            until = require_real("until", until, min=0.0, error=SimError)
            if until < self.now:
                raise SimError(f"cannot run back to {until!r} s from {self.now!r} s")
        self.env.run(until=until)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            time=self.now,
            nodes=MappingProxyType({k: NodeCount(q.offered, q.dropped, q.served, q.sojourn_s)
                                    for k, q in self._queues.items()}),
            links=MappingProxyType({k: LinkCount(w.bits, w.packets, w.lost)
                                    for k, w in self._wires.items()}))

    def tag(self, tag: str) -> TagCount:
        t = self._tags.get(tag, _Tagged())
        return TagCount(t.sent, t.delivered, t.dropped, t.delay_s)


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)
