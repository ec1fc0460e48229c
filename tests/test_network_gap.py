"""A gap etcd cannot close, with more candidates past it than one pass takes.

Found at 13 terminals (``edgekey bench faults``, a checkpoint every 200
blocks): a terminal back from a long outage held some 200 candidates above
its missing blocks. Each resync read them all again; as they took more
than one pass (CANDIDATES_PER_PASS) the backlog was never empty when the
gap was looked at, which reset the resync count, so the snapshot catch-up
never started; and every re-read appended the same candidates again, until
the agent hit its RAM budget. Injected here with fakes for the terminal,
the ordering and the peers (no etcd, no sockets): 120 candidates above a
gap, read again at every resync. Survives: after the allowed resyncs the
catch-up is tried, and each candidate is held once.
"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

from agent import network as netmod
from agent.net.ordering import Candidate, OrderingHealth


class FakeOrdering:
    prefix = b"/edgekey/f/"

    def __init__(self, candidates: list[Candidate]):
        self.candidates = candidates
        self.queue: deque[object] = deque([OrderingHealth(True, "watching"), *candidates])
        self.resyncs = 0

    def poll(self) -> list[object]:
        out, self.queue = list(self.queue), deque()
        return out

    def resync(self) -> None:
        self.resyncs += 1
        self.queue.extend(self.candidates)  # etcd still has these, not the missing ones

    def eligible(self, ok: bool, *, member: bool = True) -> None:
        pass


class FakePeers:
    def __init__(self, on_message: object):
        self.sent: list[tuple[str, object]] = []

    def send(self, peer: str, message: object) -> bool:
        self.sent.append((peer, message))
        return True


def _terminal() -> SimpleNamespace:
    state = SimpleNamespace(is_active=lambda t: True, active_terminals=lambda: ["a", "b"])
    return SimpleNamespace(id="a", chain=SimpleNamespace(height=10, state=state),
                           node=SimpleNamespace(proposer="b"))


def test_a_long_gap_reaches_the_snapshot_catch_up_and_holds_each_candidate_once(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(netmod.time, "monotonic", lambda: clock[0])
    ahead = [Candidate(h, b"not a block", 5000 + h, f"chain/{h}/x".encode())
             for h in range(200, 320)]
    assert len(ahead) > netmod.CANDIDATES_PER_PASS * 2
    ordering = FakeOrdering(ahead)
    net = netmod.FleetNetwork(_terminal(), ordering, FakePeers)  # type: ignore[arg-type]
    for _ in range(60):
        net.take()
        clock[0] += 0.5
    tried = net.counts["catchup.started"] + net.counts["catchup.no_checkpoint"]
    assert ordering.resyncs >= netmod.GAP_RESYNCS_BEFORE_SNAPSHOT, net.counts
    assert tried >= 1, net.counts  # before the fix: resyncs for ever, never a catch-up
    assert net._ahead_count == len(ahead) == sum(len(v) for v in net._ahead.values())
    assert not net.synced


def test_held_candidates_are_bounded_in_all_heights(monkeypatch):
    monkeypatch.setattr(netmod, "MAX_AHEAD", 50)
    many = [Candidate(100, b"x", i, f"chain/100/{i}".encode()) for i in range(80)]
    net = netmod.FleetNetwork(_terminal(), FakeOrdering(many), FakePeers)  # type: ignore[arg-type]
    for _ in range(3):
        net.take()
    assert net._ahead_count == 50
    assert net.counts["candidates.ahead_dropped"] == 30
