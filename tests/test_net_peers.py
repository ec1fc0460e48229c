"""Terminals over real TLS on loopback: authentication, order, queue bounds, re-dials,
liveness and a clean close (agent/net/peers.py). Each PeerNet has its own Pump; one
loop drives them all."""

from __future__ import annotations

import os
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.net.peers import PeerNet, tls_contexts
from agent.net.pki import FleetCA, common_name
from agent.net.wire import (
    FrameEncoder,
    Hello,
    KeyAck,
    Message,
    Ping,
    SnapshotChunk,
    SnapshotRequest,
)
from hal.pump import Pump, PumpError

FLEET = "test"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Pki:
    ca: Path  # the fleet CA's certificate
    other_ca: Path  # another fleet's
    certs: dict[str, tuple[Path, Path]]  # name -> (key, crt)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = FleetCA.create(FLEET)
    _, ca_crt = ca.write(d)
    certs = {tid: ca.issue(tid).write(d, tid)
             for tid in ("ecd-00", "ecd-01", "ecd-02", "ecd-03", "ecd-05", "ecd-08")}
    certs["elsewhere"] = ca.issue("ecd-04", ips=("127.0.0.2",), dns=()).write(d, "elsewhere")
    other = FleetCA.create("other")
    (d / "other").mkdir()
    _, other_crt = other.write(d / "other")
    certs["foreign"] = other.issue("ecd-06").write(d, "foreign")
    assert common_name(certs["ecd-08"][1].read_bytes()) == "ecd-08"
    return Pki(ca_crt, other_crt, certs)


@dataclass(eq=False)
class Node:
    tid: str
    pump: Pump
    net: PeerNet
    inbox: list[tuple[str, Message]] = field(default_factory=list)
    paused: bool = False

    def got(self, sender: str, kind: type = object) -> list[Message]:
        return [m for s, m in self.inbox if s == sender and isinstance(m, kind)
                and not isinstance(m, Hello)]


class Fleet:
    """Terminals in one process, each with its own pump, sharing one address book."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.addresses: dict[str, tuple[str, int]] = {}
        self.nodes: dict[str, Node] = {}

    def add(self, tid: str, *, cert: str | None = None, fleet: str = FLEET,
            members: Callable[[str], bool] = lambda _tid: True, **kw: object) -> Node:
        key, crt = self.pki.certs[cert or tid]
        server, client = tls_contexts(self.pki.ca, crt, key)
        inbox: list[tuple[str, Message]] = []
        pump = Pump()
        net = PeerNet(pump, tid, fleet, server, client, (LOOPBACK, 0), self.addresses,
                      is_member=members, on_message=lambda s, m: inbox.append((s, m)),
                      **kw)  # type: ignore[arg-type]
        self.addresses[tid] = (LOOPBACK, net.port)
        node = self.nodes[tid] = Node(tid, pump, net, inbox)
        return node

    def run(self, until: Callable[[], bool], what: str, *, timeout: float = 5.0,
            nodes: Sequence[Node] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                counters = {n.tid: dict(n.net.counters) for n in self.nodes.values()}
                pytest.fail(f"timed out after {timeout} s waiting for {what}; "
                            f"counters: {counters}")
            for node in nodes if nodes is not None else self.nodes.values():
                if not node.paused:
                    node.pump.run_once(0.002)
                    node.net.tick()

    def close(self) -> None:
        for node in self.nodes.values():
            node.net.close()
            node.pump.close()


@pytest.fixture
def fleet(pki: Pki) -> Iterator[Fleet]:
    f = Fleet(pki)
    yield f
    f.close()


def socket_fds() -> set[int]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                out.add(int(name))
        except OSError:
            pass
    return out


# ------------------------------------------------------------------ contexts


def test_contexts_trust_the_fleet_ca_alone(pki: Pki, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    stray = FleetCA.create("stray")
    _, stray_crt = stray.write(tmp_path)
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(var, str(stray_crt))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    key, crt = pki.certs["ecd-00"]
    for ctx in tls_contexts(pki.ca, crt, key):
        assert ctx.verify_mode is ssl.CERT_REQUIRED
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
        cas = ctx.get_ca_certs()
        assert [dict(x[0] for x in c["subject"])["commonName"] for c in cas] == \
            [f"edgekey fleet CA {FLEET}"]
    assert tls_contexts(pki.ca, crt, key)[1].check_hostname


# ------------------------------------------------------------------ delivery


def test_three_terminals_deliver_in_order_both_ways_to_authenticated_ids(fleet: Fleet) -> None:
    ids = ("ecd-00", "ecd-01", "ecd-02")
    nodes = [fleet.add(tid) for tid in ids]
    rng = random.Random(1234)
    sent: dict[tuple[str, str], list[Message]] = {}
    for a in nodes:  # every terminal sends before any loop runs: simultaneous dials
        for b in nodes:
            if a is b:
                continue
            batch: list[Message] = [SnapshotChunk(i, 0, 1, rng.randbytes(rng.randrange(0, 90_000)))
                                    if i % 3 == 0 else KeyAck(bytes([i + 1]), i + 1)
                                    for i in range(40)]
            sent[a.tid, b.tid] = batch
            assert all(a.net.send(b.tid, m) for m in batch)

    def all_in() -> bool:
        return all(len(fleet.nodes[b].got(a)) == len(batch) for (a, b), batch in sent.items())

    fleet.run(all_in, "every message of every pair")
    for (a, b), batch in sent.items():
        node = fleet.nodes[b]
        assert node.got(a) == batch, f"{a} -> {b} out of order or altered"
        hellos = [m for s, m in node.inbox if s == a and isinstance(m, Hello)]
        assert [h.terminal_id for h in hellos] == [a]  # authenticated once, as its certificate
        assert node.inbox[[s for s, _ in node.inbox].index(a)][1] == hellos[0]  # Hello first
    for a in ids:  # one connection per pair, the lower id's dial
        for b in ids:
            if a < b:
                assert fleet.nodes[a].net.stats(b)["direction"] == "out"
                assert fleet.nodes[b].net.stats(a)["direction"] == "in"
    simultaneous = sum(fleet.nodes[t].net.counters["refused.duplicate"]
                       + fleet.nodes[t].net.counters["closed.replaced"] for t in ids)
    assert simultaneous > 0
    fleet.run(lambda: all(n.net.stats(p)["rtt_s"] is not None
                          for n in nodes for p in ids if p != n.tid), "an RTT on every link")
    stats = fleet.nodes["ecd-00"].net.stats("ecd-01")
    assert stats["connected"] and stats["tls"] == "TLSv1.3"
    assert stats["messages_out"] == 40 and stats["queue_bytes"] == 0
    assert stats["bytes_out"] > sum(len(m.data) for m in sent["ecd-00", "ecd-01"]
                                    if isinstance(m, SnapshotChunk))
    counters = fleet.nodes["ecd-01"].net.counters
    assert counters["received.key_ack"] == 2 * 26 and counters["received.snapshot_chunk"] == 28
    assert not any(k.startswith("refused.") and k != "refused.duplicate" for k in counters)


def test_a_higher_id_with_something_to_say_dials_the_lower(fleet: Fleet) -> None:
    low, high = fleet.add("ecd-00"), fleet.add("ecd-01")
    assert high.net.send("ecd-00", SnapshotRequest(1))
    fleet.run(lambda: low.got("ecd-01") == [SnapshotRequest(1)], "the higher id's message")
    assert low.net.send("ecd-01", SnapshotRequest(2))  # the same connection carries the answer
    fleet.run(lambda: high.got("ecd-00") == [SnapshotRequest(2)], "the answer")
    assert high.net.stats("ecd-00")["direction"] == "out"
    assert low.net.counters["dials"] == 0


# ------------------------------------------------------------------ refusals


def _refused(fleet: Fleet, intruder: Node, reason: str) -> Node:
    home = fleet.nodes["ecd-00"]
    assert intruder.net.send("ecd-00", SnapshotRequest(9))
    fleet.run(lambda: home.net.counters[f"refused.{reason}"] >= 1, f"refused.{reason}")
    fleet.run(lambda: intruder.net.stats("ecd-00")["state"] == "idle", "the intruder cut off")
    assert not [m for s, m in home.inbox if s == intruder.tid]
    assert "connected" not in home.net.counters
    return home


def test_a_certificate_from_another_ca_is_refused_both_ways(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):  # must not widen the trust
        monkeypatch.setenv(var, str(fleet.pki.other_ca))
    fleet.add("ecd-00")
    intruder = fleet.add("ecd-06", cert="foreign")
    home = _refused(fleet, intruder, "certificate")
    assert home.net.send("ecd-06", SnapshotRequest(1))  # and we refuse its server certificate
    fleet.run(lambda: home.net.counters["refused.certificate"] >= 2, "our dial refused")
    assert not intruder.inbox


def test_a_server_certificate_for_another_address_is_refused(fleet: Fleet) -> None:
    home = fleet.add("ecd-00")
    fleet.add("ecd-04", cert="elsewhere")  # valid, but its SAN is 127.0.0.2 only
    assert home.net.send("ecd-04", SnapshotRequest(1))
    fleet.run(lambda: home.net.counters["refused.certificate"] >= 1, "the hostname check")
    assert not fleet.nodes["ecd-04"].inbox


def test_a_hello_that_is_not_its_certificate_cn_is_refused(fleet: Fleet) -> None:
    fleet.add("ecd-00")
    _refused(fleet, fleet.add("ecd-07", cert="ecd-08"), "cn_mismatch")


def test_a_terminal_of_another_fleet_is_refused(fleet: Fleet) -> None:
    fleet.add("ecd-00")
    _refused(fleet, fleet.add("ecd-05", fleet="elsewhere"), "wrong_fleet")


def test_a_dial_that_reaches_another_terminal_is_refused(fleet: Fleet) -> None:
    home, other = fleet.add("ecd-00"), fleet.add("ecd-01")
    fleet.addresses["ecd-02"] = fleet.addresses["ecd-01"]  # a stale address book
    assert home.net.send("ecd-02", SnapshotRequest(1))
    fleet.run(lambda: home.net.counters["refused.unexpected_peer"] >= 1, "the wrong terminal")
    assert not other.got("ecd-00")  # the dialler sent nothing past its Hello


def _raw_client(fleet: Fleet, cert: str) -> ssl.SSLSocket:
    """A hand-driven TLS client with a valid certificate, to send what PeerNet never would."""
    key, crt = fleet.pki.certs[cert]
    _, client = tls_contexts(fleet.pki.ca, crt, key)
    raw = socket.create_connection(fleet.addresses["ecd-00"])  # the kernel's backlog completes it
    raw.setblocking(False)
    return client.wrap_socket(raw, server_hostname=LOOPBACK, do_handshake_on_connect=False)


def _hello(encoder: FrameEncoder, tid: str = "ecd-01") -> bytes:
    return encoder.encode(Hello(tid, bytes(8), FLEET))


@pytest.mark.parametrize(("stream", "reason", "delivered"), [
    (lambda e: _hello(e) + e.encode(SnapshotRequest(1)) + FrameEncoder().encode(Ping(1)),
     "bad_seq", [SnapshotRequest(1)]),
    (lambda e: _hello(e) + b"EK\x02" + bytes(13), "bad_version", []),
    (lambda e: _hello(e) + b"EK\x01\x0d" + (2).to_bytes(8, "big") + (9).to_bytes(4, "big")
     + bytes(9), "trailing_bytes", []),
    (lambda e: e.encode(SnapshotRequest(1)), "hello_expected", []),
    (lambda e: _hello(e) + _hello(e), "duplicate_hello", []),
])
def test_a_peer_that_breaks_the_protocol_is_refused_with_the_fault(
        fleet: Fleet, stream: Callable[[FrameEncoder], bytes], reason: str,
        delivered: list[Message]) -> None:
    home = fleet.add("ecd-00")
    tls = _raw_client(fleet, "ecd-01")
    sent = []

    def step() -> bool:
        if not sent:
            try:
                tls.do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return False
            sent.append(tls.send(stream(FrameEncoder())))
        return home.net.counters[f"refused.{reason}"] == 1

    try:
        fleet.run(step, f"refused.{reason}")
    finally:
        tls.close()
    assert home.got("ecd-01") == delivered  # what came before the fault, authenticated
    assert not home.net.connected()


def test_a_non_member_is_refused_and_not_sent_to(fleet: Fleet) -> None:
    home = fleet.add("ecd-00", members=lambda tid: tid != "ecd-03")
    _refused(fleet, fleet.add("ecd-03"), "not_member")
    assert not home.net.send("ecd-03", SnapshotRequest(1))
    assert home.net.counters["dropped.not_member"] == 1
    assert not home.net.send("ecd-99", SnapshotRequest(1))
    assert not home.net.send("ecd-00", SnapshotRequest(1))
    assert home.net.counters["dropped.unknown_peer"] == home.net.counters["dropped.self"] == 1


def test_a_member_retired_while_connected_is_cut_off(fleet: Fleet) -> None:
    retired: set[str] = set()
    home = fleet.add("ecd-00", members=lambda tid: tid not in retired)
    peer = fleet.add("ecd-01")
    assert peer.net.send("ecd-00", SnapshotRequest(1))
    fleet.run(lambda: home.net.stats("ecd-01")["connected"], "the connection")
    retired.add("ecd-01")
    fleet.run(lambda: not home.net.stats("ecd-01")["connected"], "the retired peer cut off")
    assert home.net.counters["refused.not_member"] == 1


# ------------------------------------------------------------------ queues


def test_the_queue_to_a_peer_that_is_not_reading_is_bounded(fleet: Fleet) -> None:
    cap = 256 * 1024
    sender, reader = fleet.add("ecd-00", max_queue_bytes=cap), fleet.add("ecd-01")
    assert sender.net.send("ecd-01", SnapshotRequest(0))
    fleet.run(lambda: reader.got("ecd-00") == [SnapshotRequest(0)], "the first message")
    reader.paused = True
    chunk = random.Random(99).randbytes(60_000)
    accepted: list[Message] = []
    for i in range(2_000):  # the kernel's buffers fill first, then our queue
        message = SnapshotChunk(i, 0, 1, chunk)
        if not sender.net.send("ecd-01", message):
            break
        accepted.append(message)
        sender.pump.run_once(0)
    else:
        pytest.fail("the queue never filled")
    stats = sender.net.stats("ecd-01")
    assert 0 < stats["queue_bytes"] <= cap  # type: ignore[operator]
    assert sender.net.counters["dropped.queue_full"] == 1 and stats["dropped"] == 1
    assert not sender.net.send("ecd-01", SnapshotChunk(0, 0, 1, chunk))
    reader.paused = False
    fleet.run(lambda: len(reader.got("ecd-00")) == len(accepted) + 1, "the backlog", timeout=10)
    assert reader.got("ecd-00")[1:] == accepted
    assert sender.net.stats("ecd-01")["queue_bytes"] == 0


# ------------------------------------------------------------------ failures


def _kill(node: Node, peer: str) -> None:
    """Shut the TCP connection under the TLS layer, as a reset from the network would."""
    fd = node.net.connection_fileno(peer)
    assert fd is not None
    with socket.socket(fileno=os.dup(fd)) as dup:
        dup.shutdown(socket.SHUT_RDWR)


def test_a_killed_connection_is_redialled_and_later_messages_arrive(fleet: Fleet) -> None:
    a, b = fleet.add("ecd-00"), fleet.add("ecd-01")
    assert a.net.send("ecd-01", SnapshotRequest(1))
    fleet.run(lambda: b.got("ecd-00") == [SnapshotRequest(1)], "the first message")
    _kill(a, "ecd-01")
    fleet.run(lambda: not a.net.stats("ecd-01")["connected"]
              and not b.net.stats("ecd-00")["connected"], "both ends to notice")
    assert a.net.counters["closed.eof"] + a.net.counters["closed.error"] == 1
    assert b.net.send("ecd-00", SnapshotRequest(2))  # the higher id re-dials this time
    assert a.net.send("ecd-01", SnapshotRequest(3))
    fleet.run(lambda: a.got("ecd-01") == [SnapshotRequest(2)]
              and b.got("ecd-00") == [SnapshotRequest(1), SnapshotRequest(3)], "later messages")
    assert a.net.stats("ecd-01")["connects"] == b.net.stats("ecd-00")["connects"] == 2
    hellos = [m for s, m in a.inbox if isinstance(m, Hello)]
    assert len(hellos) == 2 and hellos[0].boot_nonce == hellos[1].boot_nonce  # no restart


def test_a_silent_peer_is_pinged_then_closed_then_redialled(fleet: Fleet) -> None:
    now = [1000.0]  # the nets' timers run on this clock; the sockets stay real

    def clock() -> float:
        return now[0]

    timers = {"clock": clock, "idle_ping_s": 1.0, "dead_after_s": 3.0}
    a, b = fleet.add("ecd-00", **timers), fleet.add("ecd-01", **timers)
    assert a.net.send("ecd-01", SnapshotRequest(1))
    fleet.run(lambda: b.got("ecd-00") == [SnapshotRequest(1)]
              and a.net.stats("ecd-01")["rtt_s"] is not None, "the connection and its RTT")
    assert a.net.stats("ecd-01")["rtt_s"] == 0.0  # the clock stood still
    assert a.net.next_deadline() == pytest.approx(1001.0)  # the next ping
    pings = a.net.counters["sent.ping"]
    b.paused = True
    now[0] += 1.5
    fleet.run(lambda: a.net.counters["sent.ping"] > pings, "a ping to the silent peer")
    assert a.net.stats("ecd-01")["connected"]
    now[0] += 2.0  # 3.5 s without a byte from b
    fleet.run(lambda: a.net.counters["closed.dead"] == 1, "the silent peer declared dead")
    assert not a.net.stats("ecd-01")["connected"]
    b.paused = False
    fleet.run(lambda: not b.net.stats("ecd-00")["connected"], "the other end to notice")
    assert a.net.send("ecd-01", SnapshotRequest(2))
    fleet.run(lambda: b.got("ecd-00") == [SnapshotRequest(1), SnapshotRequest(2)],
              "the message after the re-dial")
    assert a.net.stats("ecd-01")["connects"] == 2


def test_close_leaves_no_fd_registered_and_no_socket_open(pki: Pki) -> None:
    before = socket_fds()
    fleet = Fleet(pki)
    nodes = [fleet.add(t) for t in ("ecd-00", "ecd-01", "ecd-02")]
    for a in nodes:
        for b in nodes:
            if a is not b:
                a.net.send(b.tid, SnapshotRequest(1))
    fleet.run(lambda: all(len(n.got(p)) == 1 for n in nodes for p in fleet.nodes if p != n.tid),
              "the mesh")
    nodes[0].net.send("ecd-01", SnapshotChunk(0, 0, 1, b"\x00" * 500_000))  # left unsent
    assert len(socket_fds() - before) >= 3 + 6
    for node in nodes:
        node.net.close()
        node.net.close()  # idempotent
        with pytest.raises(PumpError, match="nothing registered"):
            node.pump.run_once(None)  # nothing left to wait for
        assert not node.net.send("ecd-01", SnapshotRequest(2))
        node.pump.close()
    assert socket_fds() == before


# ------------------------------------------------------------ emulated WAN links


def _transfer_fake_seconds(fleet: Fleet, rate_bps: float | None) -> tuple[float, Node]:
    """Fake seconds the sender's clock advanced while 300 KB crossed a shaped link."""
    now = [1000.0]
    sender = fleet.add("ecd-00", clock=lambda: now[0], link_rate_bps=rate_bps)
    receiver = fleet.add("ecd-01")
    batch = [SnapshotChunk(i, 0, 1, bytes(30_000)) for i in range(10)]
    assert all(sender.net.send("ecd-01", m) for m in batch)
    start = now[0]

    def arrived() -> bool:
        now[0] += 0.01  # every pass of the loop is 10 ms of the sender's time
        return len(receiver.got("ecd-00")) == len(batch)

    fleet.run(arrived, "the batch over the link", timeout=30.0)
    return now[0] - start, sender


def test_an_emulated_link_carries_no_more_than_its_rate(fleet: Fleet) -> None:
    """Injected: a 800 kbit/s link (100 kB/s) and 300 kB to send. Survives: every byte, in
    order, after about 3 s of the sender's clock: the token bucket, not the socket, sets
    the pace, and the wait is a deadline the loop wakes for."""
    elapsed, sender = _transfer_fake_seconds(fleet, 800e3)
    assert 2.7 <= elapsed <= 6.0, elapsed
    assert sender.net.stats("ecd-01")["bytes_out"] >= 300_000


def test_an_unshaped_link_is_as_fast_as_the_loop(fleet: Fleet) -> None:
    elapsed, _ = _transfer_fake_seconds(fleet, None)
    assert elapsed < 1.0, elapsed


def test_a_full_link_buffer_drops_what_arrives_and_counts_it(fleet: Fleet) -> None:
    """Injected: 5 messages of 4 kB into a 10 kB buffer before the link is up. Survives:
    what fits (the first two), in order; the rest counted as dropped.link_buffer, the
    failures the router reads as a lossy link."""
    sender = fleet.add("ecd-00", link_rate_bps=25e6, link_buffer_bytes=10_000)
    receiver = fleet.add("ecd-01")
    batch = [KeyAck(bytes([i + 1]), i + 1) for i in range(5)]
    big = [SnapshotChunk(i, 0, 1, bytes(4000)) for i in range(5)]
    took = [sender.net.send("ecd-01", m) for m in big]
    assert took == [True, True, False, False, False]
    assert sender.net.counters["dropped.link_buffer"] == 3
    assert sender.net.stats("ecd-01")["dropped"] == 3
    fleet.run(lambda: len(receiver.got("ecd-00")) == 2, "what the buffer held")
    assert receiver.got("ecd-00") == big[:2]
    assert all(sender.net.send("ecd-01", m) for m in batch[:1])  # drained: room again
