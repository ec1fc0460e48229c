"""SupervisedWatch against a real 3-member etcd 3.4 cluster: order, compaction, failover."""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.net.etcd import EtcdClient, prefix_end
from agent.net.watch import SupervisedWatch, WatchCompacted, WatchEvent, WatchItem, WatchLost
from emulator.etcd import ETCD, EtcdCluster

pytestmark = [
    pytest.mark.host_only,
    pytest.mark.skipif(not Path(ETCD).exists(),
                       reason=f"needs Debian's etcd-server ({ETCD}: apt-get install etcd-server)"),
]



def watch(cluster: EtcdCluster, prefix: bytes, start: int, *, first: int | None = None,
          silence_s: float = 5.0) -> SupervisedWatch:
    """A started watch on all members, ``first``'s endpoint tried first."""
    order = list(range(3)) if first is None else [first] + [i for i in range(3) if i != first]
    w = SupervisedWatch([cluster.endpoint(i) for i in order], prefix, start, ca=cluster.ca,
                        cert=cluster.cert, key=cluster.key, silence_s=silence_s)
    w.start()
    return w


def collect(w: SupervisedWatch, done: Callable[[list[WatchItem]], bool],
            timeout_s: float = 10.0) -> list[WatchItem]:
    """Poll the way the agent's selector loop does, until ``done(items)`` or the timeout."""
    items: list[WatchItem] = []
    deadline = time.monotonic() + timeout_s
    while not done(items):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; got {items}")
        select.select([w.fileno()], [], [], left)
        items += w.poll()
    return items


def events(items: list[WatchItem]) -> list[WatchEvent]:
    return [i for i in items if isinstance(i, WatchEvent)]


def n_events(n: int) -> Callable[[list[WatchItem]], bool]:
    return lambda items: len(events(items)) >= n


def a_follower(cluster: EtcdCluster) -> int:
    leader = cluster.leader_index()
    return next(i for i in range(3) if i != leader)


def test_events_arrive_in_order_with_their_revisions(cluster: EtcdCluster,
                                                     client: EtcdClient) -> None:
    p = b"w/order/"
    start = client.put(b"w/outside", b"before") + 1
    w = watch(cluster, p, start)
    try:
        r1 = client.put(p + b"a", b"1")
        r2 = client.put(p + b"b", b"2")
        r3 = client.put(p + b"a", b"3")
        client.put(b"w/outside", b"not under the prefix")
        deleted = client.delete_range(p + b"b", b"")
        r4 = client.get(p + b"b")[2]
        assert client.create(p + b"c", b"4")
        r5 = client.get(p + b"c")[1]
        got = collect(w, n_events(5))
        assert got == [
            WatchEvent(p + b"a", b"1", r1, r1, "put"),
            WatchEvent(p + b"b", b"2", r2, r2, "put"),
            WatchEvent(p + b"a", b"3", r1, r3, "put"),
            WatchEvent(p + b"b", b"", 0, r4, "delete"),
            WatchEvent(p + b"c", b"4", r5, r5, "put"),
        ]
        assert deleted == 1 and w.revision == r5
        assert select.select([w.fileno()], [], [], 0)[0] == []  # drained: not readable
        assert w.poll() == []
    finally:
        w.stop()


def test_a_compacted_start_reports_compacted_and_restart_resyncs(cluster: EtcdCluster,
                                                                  client: EtcdClient) -> None:
    p = b"w/compact/"
    old = client.put(p + b"k", b"old")
    head = client.put(p + b"k", b"new")
    client.compact(head)
    w = watch(cluster, p, old)
    try:
        assert collect(w, lambda items: bool(items)) == [WatchCompacted(head)]
        time.sleep(0.3)
        assert w.poll() == []  # stopped delivering: no silent skip past the gap

        snapshot = client.range(p, prefix_end(p))  # the resync: a read at a known revision
        assert [kv.value for kv in snapshot.kvs] == [b"new"]
        w.restart(snapshot.header_revision + 1)
        r = client.put(p + b"k", b"after")
        assert collect(w, n_events(1)) == [WatchEvent(p + b"k", b"after", old, r, "put")]
    finally:
        w.stop()


def test_a_killed_member_is_left_without_missing_or_repeating_events(
        cluster: EtcdCluster, client: EtcdClient) -> None:
    p = b"w/kill/"
    victim = a_follower(cluster)
    start = client.put(b"w/kill-start", b"") + 1
    w = watch(cluster, p, start, first=victim)
    try:
        written = [client.put(p + b"before%d" % i, b"x") for i in range(5)]
        items = collect(w, n_events(5))
        assert w.endpoint == cluster.endpoint(victim)

        cluster.kill(victim)
        written += [client.put(p + b"during%d" % i, b"x") for i in range(5)]
        items += collect(w, lambda more: any(isinstance(i, WatchLost) for i in more)
                         and len(events(items + more)) >= 10)
        assert w.endpoint != cluster.endpoint(victim)
        written += [client.put(p + b"after%d" % i, b"x") for i in range(5)]
        items += collect(w, lambda more: len(events(items + more)) >= 15)

        lost = [i for i in items if isinstance(i, WatchLost)]
        assert lost and lost[0].endpoint == cluster.endpoint(victim)
        assert [e.mod_revision for e in events(items)] == written
        time.sleep(0.2)
        assert events(w.poll()) == []
    finally:
        w.stop()
        cluster.start_member(victim)


def test_a_silent_member_is_detected_and_left(cluster: EtcdCluster, client: EtcdClient) -> None:
    p = b"w/silent/"
    victim = a_follower(cluster)
    start = client.put(b"w/silent-start", b"") + 1
    # progress notifications (1 s) keep an idle watch alive through silence_s
    w = watch(cluster, p, start, first=victim, silence_s=2.5)
    try:
        time.sleep(3.0)
        assert w.poll() == []
        os.kill(cluster.pid(victim), signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            r = client.put(p + b"k", b"v")
            items = collect(w, n_events(1), timeout_s=8.0)
            assert time.monotonic() - stopped < 2.5 + 2.0
        finally:
            os.kill(cluster.pid(victim), signal.SIGCONT)
        assert isinstance(items[0], WatchLost) and "silent" in items[0].detail
        assert events(items) == [WatchEvent(p + b"k", b"v", r, r, "put")]
    finally:
        w.stop()


def test_stop_is_idempotent_and_leaves_no_thread(cluster: EtcdCluster,
                                                 client: EtcdClient) -> None:
    before = set(threading.enumerate())
    w = watch(cluster, b"w/stop/", client.put(b"w/stop/k", b"v"))
    assert len(collect(w, n_events(1))) == 1
    assert len(set(threading.enumerate()) - before) == 1
    started = time.monotonic()
    w.stop()
    w.stop()
    assert time.monotonic() - started < 2.5
    assert set(threading.enumerate()) - before == set()
    assert w.poll() == []
    with pytest.raises(ValueError):
        w.fileno()
