"""Remote key queries between the terminals of a 5-terminal LocalFleet.

Each terminal gets a ``RemoteQueries`` over its own chain and key store; a
small FIFO stands in for the TLS links and can drop everything to or from a
terminal. Checked: an answer opens only with the requester's transport key
and matches the chain's fingerprint; a relay passes the envelope on but
cannot open it; an unauthorised requester, an unknown or revoked meter get
their status; a silent holder gets one retry then TIMEOUT, and ``done`` is
called exactly once whatever happens; a message from off the path is dropped.
"""

from __future__ import annotations

import random
from collections import deque

import pytest

from agent.keystore.material import fingerprint
from agent.keystore.transport import TransportError, open_envelope
from agent.node.actions import Acknowledge
from agent.remotequery import QueryResult, QueryStatus, RemoteQueries
from emulator.flash import RamBlockDevice
from emulator.localfleet import LocalFleet
from emulator.meter_keys import MeterKeys
from emulator.provision import provision

T0 = 1_700_000_000_000
METERS = [(600000 + i).to_bytes(6, "big") for i in range(6)]


class Net:
    """Queries of every terminal, and the messages between them, delivered in order."""

    def __init__(self, fleet: LocalFleet, route=None, authorised=None):
        self.fleet = fleet
        self.clock = fleet.clock
        self.down: set[str] = set()
        self.queue: deque[tuple[str, str, object]] = deque()
        self.q: dict[str, RemoteQueries] = {}
        for tid, t in fleet.net.terminals.items():
            def export(meter_id, requester, version, t=t):
                return t.keys.export(meter_id, requester.encode(), fleet.peers, version)
            self.q[tid] = RemoteQueries(
                tid, t.chain.state, export=export,
                authorised=authorised or (lambda r, t=t: t.chain.state.is_active(r)),
                route=route or (lambda home, tid=tid: (tid, home)))

    def send(self, sender: str, out: list[tuple[str, object]]) -> None:
        for to, m in out:
            self.queue.append((sender, to, m))

    def run(self) -> None:
        while self.queue:
            sender, to, m = self.queue.popleft()
            if sender in self.down or to in self.down:
                continue
            q = self.q[to]
            handle = q.on_forward if type(m).__name__ == "QueryForward" else q.on_answer
            self.send(to, handle(sender, m, self.clock()))

    def ask(self, asker: str, meter: bytes, requester: str | None = None) -> list[QueryResult]:
        results: list[QueryResult] = []
        self.send(asker, self.q[asker].ask(meter, requester or asker, self.clock(),
                                           results.append))
        self.run()
        return results

    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)
        for tid, q in self.q.items():
            self.send(tid, q.tick(self.clock()))
        self.run()


@pytest.fixture(scope="module")
def fleet() -> LocalFleet:
    f = LocalFleet(provision(5, METERS, timestamp_ms=T0, seed=b"remote query"),
                   (RamBlockDevice(8192, 64), RamBlockDevice(8192, 64)), b"q" * 32)
    f.found()
    fk = f.fleet.factory_keys
    for i, m in enumerate(METERS[:5]):  # meter i homed on ecd-0i
        keys = MeterKeys(m, fk[m], random.Random(m).randbytes)
        assert isinstance(f.request(keys.register(), f"ecd-{i:02d}"), Acknowledge)
    revoke = MeterKeys(METERS[5], fk[METERS[5]], random.Random(5).randbytes)
    home = "ecd-01"
    reply = f.request(revoke.register(), home)
    assert isinstance(reply, Acknowledge)
    revoke.acknowledged(reply.key_version)
    assert isinstance(f.request(revoke.revoke(), home), Acknowledge)
    return f


def opened(fleet: LocalFleet, r: QueryResult, by: str) -> bytes:
    return open_envelope(fleet.fleet.transport[by], r.envelope, meter_id=r.meter_id,
                         key_version=r.key_version, requester_id=r.requester.encode())


def test_a_key_held_elsewhere_comes_wrapped_to_the_requester_and_matches_the_chain(fleet):
    net = Net(fleet)
    (r,) = net.ask("ecd-01", METERS[3])
    assert r.status is QueryStatus.OK and r.path == ("ecd-01", "ecd-03")
    entry = fleet.terminal("ecd-01").chain.entry(METERS[3])
    assert fingerprint(opened(fleet, r, "ecd-01")) == entry.fingerprint
    assert r.key_version == entry.key_version
    with pytest.raises(TransportError):  # sealed to ecd-01: nobody else opens it
        opened(fleet, QueryResult(r.query_id, r.meter_id, "ecd-03", r.status, r.key_version,
                                  envelope=r.envelope), "ecd-03")


def test_the_home_answers_its_own_query_at_once(fleet):
    (r,) = Net(fleet).ask("ecd-02", METERS[2])
    assert r.status is QueryStatus.OK and r.path == ("ecd-02",)
    assert fingerprint(opened(fleet, r, "ecd-02")) == \
        fleet.terminal("ecd-02").chain.entry(METERS[2]).fingerprint


def test_a_relay_on_the_path_passes_the_envelope_on_without_opening_it(fleet):
    net = Net(fleet, route=lambda home: ("ecd-00", "ecd-04", home))
    (r,) = net.ask("ecd-00", METERS[1])
    assert r.status is QueryStatus.OK and r.path == ("ecd-00", "ecd-04", "ecd-01")
    assert net.q["ecd-04"].counters["relayed"] == 1
    fingerprint(opened(fleet, r, "ecd-00"))


@pytest.mark.parametrize(("meter", "status"), [(METERS[5], QueryStatus.REVOKED),
                                                (b"\x01" * 6, QueryStatus.UNKNOWN_METER)])
def test_revoked_and_unknown_meters_get_their_status(fleet, meter, status):
    (r,) = Net(fleet).ask("ecd-03", meter)
    assert r.status is status and r.envelope == b""


def test_an_unauthorised_requester_gets_nothing(fleet):
    net = Net(fleet, authorised=lambda requester: requester != "ecd-02")
    (r,) = net.ask("ecd-02", METERS[4])
    assert r.status is QueryStatus.NOT_AUTHORISED and r.envelope == b""
    assert net.q["ecd-04"].counters["answered.NOT_AUTHORISED"] == 1


def test_a_silent_holder_gets_one_retry_then_timeout_and_one_answer(fleet):
    net = Net(fleet)
    net.down.add("ecd-04")
    results = net.ask("ecd-00", METERS[4])
    assert results == []
    net.wait(3.5)  # the first try times out: sent again
    assert results == [] and net.q["ecd-00"].counters["retried"] == 1
    net.down.clear()  # the holder is back, but the retry was already lost
    net.wait(3.5)
    assert [r.status for r in results] == [QueryStatus.TIMEOUT]
    assert results[0].tries == 2 and net.q["ecd-00"].outstanding == 0
    net.wait(10)
    assert len(results) == 1


def test_a_query_from_off_its_path_is_dropped(fleet):
    net = Net(fleet)
    q = net.q["ecd-03"]
    from agent.net.wire import QueryForward
    m = QueryForward(7, METERS[3], "ecd-00", "ecd-00", ("ecd-00", "ecd-03"), T0 + 10**9)
    assert q.on_forward("ecd-01", m, net.clock()) == []  # ecd-01 is not the hop before
    assert q.counters["forward.off_path"] == 1
    assert len(q.on_forward("ecd-00", m, net.clock())) == 1
