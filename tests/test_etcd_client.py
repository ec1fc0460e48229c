"""EtcdClient against a real 3-member etcd 3.4 cluster on loopback, TLS with client auth."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests

from agent.net.etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdUnavailable,
    prefix_end,
)
from agent.net.pki import FleetCA
from emulator.etcd import ETCD, EtcdCluster, free_port

pytestmark = [
    pytest.mark.host_only,
    pytest.mark.skipif(not Path(ETCD).exists(),
                       reason=f"needs Debian's etcd-server ({ETCD}: apt-get install etcd-server)"),
]



def a_follower(cluster: EtcdCluster) -> int:
    leader = cluster.leader_index()
    return next(i for i in range(3) if i != leader)


def test_prefix_end_increments_the_last_byte() -> None:
    assert prefix_end(b"ledger/") == b"ledger0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"") == b"\0"


def test_put_get_round_trip_binary_keys_and_values(client: EtcdClient) -> None:
    key, value = b"t/bin/\x00\xff", bytes(range(256))
    revision = client.put(key, value)
    got, mod_revision, header_revision = client.get(key)
    assert (got, mod_revision) == (value, revision)
    assert header_revision >= revision
    assert client.get(b"t/bin/absent") == (None, 0, header_revision)
    assert client.put(key, b"") > revision
    assert client.get(key)[0] == b""  # the gateway leaves an empty value out; still b""


def test_range_limit_revision_and_create_order(client: EtcdClient) -> None:
    p = b"t/range/"
    revisions = {name: client.put(p + name, name * 2) for name in (b"b", b"a", b"c")}
    result = client.range(p, prefix_end(p))
    assert [kv.key for kv in result.kvs] == [p + b"a", p + b"b", p + b"c"]
    assert [kv.value for kv in result.kvs] == [b"aa", b"bb", b"cc"]
    assert all(kv.create_revision == kv.mod_revision == revisions[kv.key[-1:]]
               and kv.version == 1 for kv in result.kvs)
    assert not result.more and result.header_revision >= revisions[b"c"]

    limited = client.range(p, prefix_end(p), limit=2)
    assert len(limited.kvs) == 2 and limited.more

    by_create = client.range(p, prefix_end(p), sort_by_create=True)
    assert [kv.key for kv in by_create.kvs] == [p + b"b", p + b"a", p + b"c"]

    client.put(p + b"a", b"new")
    old = client.range(p + b"a", b"", revision=revisions[b"a"])
    assert [kv.value for kv in old.kvs] == [b"aa"]


def test_create_only_when_absent(client: EtcdClient) -> None:
    assert client.create(b"t/create/k", b"first")
    assert not client.create(b"t/create/k", b"second")
    assert client.get(b"t/create/k")[0] == b"first"


def test_create_with_a_stale_fence_fails(client: EtcdClient) -> None:
    election = b"t/fence/leader"
    lease = client.lease_grant(30)
    won, _, token = client.campaign(election, b"A", lease)
    assert won
    assert client.create(b"t/fence/blk1", b"by A", fence=(election, token))

    client.lease_revoke(lease)  # A loses its lease; B is elected
    lease_b = client.lease_grant(30)
    won_b, _, token_b = client.campaign(election, b"B", lease_b)
    assert won_b and token_b > token

    assert not client.create(b"t/fence/blk2", b"by A", fence=(election, token))
    assert client.get(b"t/fence/blk2")[0] is None
    assert client.create(b"t/fence/blk2", b"by B", fence=(election, token_b))
    client.lease_revoke(lease_b)


def test_campaign_second_loses_and_wins_after_the_holder_revokes(client: EtcdClient) -> None:
    election = b"t/campaign/leader"
    first, second = client.lease_grant(30), client.lease_grant(30)
    won, holder, revision = client.campaign(election, b"one", first)
    assert (won, holder) == (True, b"one")
    assert client.range(election, b"").kvs[0].create_revision == revision

    assert client.campaign(election, b"two", second) == (False, b"one", revision)

    client.lease_revoke(first)
    assert client.get(election)[0] is None  # the holder's key went with its lease
    won2, holder2, revision2 = client.campaign(election, b"two", second)
    assert (won2, holder2) == (True, b"two") and revision2 > revision
    # the same campaigner again (a retried txn): still the holder, not a loss
    assert client.campaign(election, b"two", second) == (True, b"two", revision2)
    client.lease_revoke(second)


def test_lease_keepalive_reports_ttl_until_revoked(client: EtcdClient) -> None:
    lease = client.lease_grant(20)
    client.put(b"t/lease/k", b"v", lease=lease)
    assert client.range(b"t/lease/k", b"").kvs[0].lease == lease
    assert 0 < client.lease_keepalive(lease) <= 20
    client.lease_revoke(lease)
    assert client.lease_keepalive(lease) <= 0
    assert client.get(b"t/lease/k")[0] is None
    client.lease_revoke(lease)  # already gone: not an error


def test_delete_range_returns_the_count(client: EtcdClient) -> None:
    p = b"t/delete/"
    for i in range(4):
        client.put(p + bytes([48 + i]), b"x")
    assert client.delete_range(p + b"0", b"") == 1
    assert client.delete_range(p, prefix_end(p)) == 3
    assert client.delete_range(p, prefix_end(p)) == 0
    assert client.range(p, prefix_end(p)).kvs == []


def test_range_at_a_compacted_revision_raises_compacted(client: EtcdClient) -> None:
    old = client.put(b"t/compact/k", b"old")
    new = client.put(b"t/compact/k", b"new")
    client.compact(new)
    with pytest.raises(EtcdCompacted, match="compacted"):
        client.range(b"t/compact/k", b"", revision=old)
    assert client.range(b"t/compact/k", b"", revision=new).kvs[0].value == b"new"
    # the same gRPC code 11 for a future revision is not a compaction
    with pytest.raises(EtcdError, match="future revision") as future:
        client.range(b"t/compact/k", b"", revision=new + 1000)
    assert not isinstance(future.value, EtcdCompacted)


def test_environment_ca_bundles_do_not_override_the_fleet_ca(
        cluster: EtcdCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/bundle.pem")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/nonexistent/bundle.pem")
    assert cluster.cert is not None and cluster.key is not None
    # what etcd3gw's own session does here: the environment beats session.verify
    plain = requests.Session()
    plain.verify, plain.cert = cluster.ca, (cluster.cert, cluster.key)
    with plain, pytest.raises(OSError, match="bundle"):
        plain.post(cluster.endpoints[0] + "/v3/kv/range", json={"key": "eA=="}, timeout=2)
    with cluster.client() as c:
        revision = c.put(b"t/env/k", b"v")
        assert c.get(b"t/env/k")[:2] == (b"v", revision)


def test_a_client_certificate_from_another_ca_is_refused(
        cluster: EtcdCluster, tmp_path: Path) -> None:
    crt, key = FleetCA.create("other").issue("intruder").write(tmp_path, "intruder")[::-1]
    with EtcdClient(cluster.endpoints[:1], ca=cluster.ca, cert=str(crt), key=str(key),
                    timeout_s=2.0) as c, pytest.raises(EtcdError) as refused:
        c.get(b"t/x")
    assert "TLS refused" in str(refused.value)
    assert cluster.endpoints[0] in str(refused.value)


def test_a_member_added_and_removed_through_the_api(cluster: EtcdCluster) -> None:
    index = cluster.add_member("m3")
    try:
        with cluster.client(index) as c:
            assert "m3" in {m["name"] for m in c.member_list()}
            assert c.put(b"t/member/k", b"v") > 0  # it serves
    finally:
        cluster.remove_member(index)
    with cluster.client() as c:
        assert "m3" not in {m["name"] for m in c.member_list()}
        assert cluster.endpoint(index) not in cluster.endpoints
        assert c.get(b"t/member/k")[0] == b"v"


def test_failover_when_the_first_endpoint_dies(cluster: EtcdCluster) -> None:
    victim = a_follower(cluster)
    order = [victim] + [i for i in range(3) if i != victim]
    with cluster.client(*order) as c:
        c.put(b"t/failover/k", b"before")
        assert c.endpoint == cluster.endpoint(victim)
        cluster.kill(victim)
        try:
            revision = c.put(b"t/failover/k", b"after")
            assert c.endpoint != cluster.endpoint(victim)
            assert c.get(b"t/failover/k")[:2] == (b"after", revision)
        finally:
            cluster.start_member(victim)


def test_an_endpoint_added_at_run_time_is_failed_over_to(cluster: EtcdCluster) -> None:
    """A voting terminal added to the fleet: its member joins the client's failover list.
    Injected: the only endpoint the client started with is killed."""
    victim = a_follower(cluster)
    other = next(i for i in range(3) if i != victim)
    with cluster.client(victim) as c:
        c.put(b"t/added/k", b"1")
        c.add_endpoint(cluster.endpoint(other))
        c.add_endpoint(cluster.endpoint(other))  # once only
        assert c.endpoints == [cluster.endpoint(victim), cluster.endpoint(other)]
        cluster.kill(victim)
        try:
            revision = c.put(b"t/added/k", b"2")
            assert c.endpoint == cluster.endpoint(other)
            assert c.get(b"t/added/k")[:2] == (b"2", revision)
        finally:
            cluster.start_member(victim)


def test_a_stopped_member_gives_unavailable_within_the_timeout(cluster: EtcdCluster) -> None:
    victim = a_follower(cluster)
    with cluster.client(victim, timeout_s=1.0) as c:
        c.get(b"t/stopped")  # a pooled connection already open: the read must time out
        os.kill(cluster.pid(victim), signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(EtcdUnavailable, match="timed out") as unavailable:
                c.get(b"t/stopped")
            assert time.monotonic() - started < 3 * c.timeout_s
            assert unavailable.value.attempts[0][0] == cluster.endpoint(victim)
        finally:
            os.kill(cluster.pid(victim), signal.SIGCONT)


def test_every_endpoint_down_names_each_one(cluster: EtcdCluster) -> None:
    dead = [f"https://127.0.0.1:{free_port()}", f"https://127.0.0.1:{free_port()}"]
    with EtcdClient(dead, ca=cluster.ca, cert=cluster.cert, key=cluster.key) as c, \
            pytest.raises(EtcdUnavailable) as unavailable:
        c.put(b"t/k", b"v")
    assert [url for url, _ in unavailable.value.attempts] == dead
    assert all("connection failed" in why for _, why in unavailable.value.attempts)


def test_status_and_member_list_describe_the_cluster(client: EtcdClient,
                                                     cluster: EtcdCluster) -> None:
    status = client.status()
    members = client.member_list()
    assert status["version"].startswith("3.")
    assert status["leader"] in {m["id"] for m in members}
    assert status["raft_term"] >= 2 and status["db_size"] > 0 and status["revision"] > 0
    assert sorted(m["name"] for m in members) == ["m0", "m1", "m2"]
    assert sorted(u for m in members for u in m["client_urls"]) == sorted(cluster.endpoints)
