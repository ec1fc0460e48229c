"""The master station against a running fleet: keys through any terminal, revokes at the home.

Three terminals on etcd, nine meters registered (no rotation, so the keys
stay as the meters acknowledged them). Asked, with ``edgekey station``:

- each meter's key through its home, and through a terminal that is not its
  home (forwarded to the holder): both arrive wrapped to the station, open
  with the station's key, are the key the meter was acknowledged for, and
  come with a record proof that checks against the fleet's public keys;
- the newest readings a meter's home accepted, opened at the station with
  the key it fetched (end to end), in counter order;
- an unknown meter: UNKNOWN_METER, exit status 1;
- a revoke asked of a terminal that is not the home: it names the home, the
  station asks the home, the revoke commits; the key is then REVOKED; the
  same revoke again is answered with the same height (no second block).

Injected: a reading altered on its way, one opened with a wrong key, one
sealed under another key version (bad, bad, stale); a record proof with one
byte flipped, an answer naming another
version than its proof, a key other than the one the record commits (each
refused by the station's check); a connection claiming to be the station with a terminal's
certificate (refused: the certificate is not the station's); a message only
terminals may send, sent by the station (refused and counted); a station
query from a terminal (refused and counted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
from fleetprobe import acked, console_json, consoles, down, edgekey, wait

from agent.keystore.material import fingerprint
from agent.net.peers import tls_contexts
from agent.net.wire import FrameDecoder, FrameEncoder, Hello, KeyAck, QueryAnswer, StationQuery
from tools.console_client import ConsoleClient
from tools.station import Fleet, StationLink, check_answer, open_readings

pytestmark = pytest.mark.host_only

METERS = 9


def _station(d: Path, *args: str):
    r = edgekey("station", "--dir", str(d), "--json", *args)
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return r, lines


def test_the_station_gets_keys_through_any_terminal_and_revokes_at_the_home(tmp_path: Path):
    d = tmp_path / "st"
    fleet: dict = {}
    try:
        r = edgekey("fleet", "up", "--terminals", "3", "--meters", str(METERS), "--dir", str(d),
                    "--reading-every", "1", "--rotate-every", "0", "--start-spread", "1")
        assert r.returncode == 0, r.stdout + r.stderr
        fleet = json.loads((d / "fleet.json").read_text())
        wait(lambda: len(acked(d)) == METERS, 60, "every meter registered")
        done = acked(d)
        with ConsoleClient(consoles(fleet)["ecd-00"]) as c:
            homes = {m: console_json(c, f"keys get {m}")["home"] for m in done}
        ids = sorted(consoles(fleet))

        for m, (version, key) in sorted(done.items()):
            home = homes[m]
            other = next(t for t in ids if t != home)
            for via in (home, other):
                r, (got,) = _station(d, "key", m, "--via", via, "--show-key")
                assert r.returncode == 0, (r.stdout, r.stderr)
                assert got["status"] == "OK" and got["key_version"] == version, got
                assert got["key"] == key and got["via"] == via and got["proof"] == "checked"
                assert got["fingerprint"] == fingerprint(bytes.fromhex(key)).hex()

        # Readings, opened end to end at the station with the key it fetched.
        read = sorted(done)[2]

        def some_readings() -> bool:
            r, (got,) = _station(d, "readings", read, "--via", homes[read])
            return r.returncode == 0 and len(got.get("readings", [])) >= 2

        wait(some_readings, 30, "readings at the home")
        r, (got,) = _station(d, "readings", read, "--via", homes[read])
        assert got["proof"] == "checked" and {x["status"] for x in got["readings"]} == {"ok"}
        counters = [x["counter"] for x in got["readings"]]
        assert counters == sorted(counters) and len(set(counters)) == len(counters)
        # Injected: a reading altered on its way, one opened with a wrong key, one sealed
        # under another key version than the station holds.
        key, version = bytes.fromhex(done[read][1]), done[read][0]
        with StationLink(station_fleet_of(d), homes[read]) as link:
            sealed = link.readings(bytes.fromhex(read)).readings
        v, c, s = sealed[-1]
        altered = (v, c, s[:-1] + bytes([s[-1] ^ 1]))
        opened = open_readings(bytes.fromhex(read), key, version, (sealed[-1], altered))
        assert [x["status"] for x in opened] == ["ok", "bad"]
        assert open_readings(bytes.fromhex(read), b"\x07" * 32, version,
                             sealed[-1:])[0]["status"] == "bad"
        assert open_readings(bytes.fromhex(read), key, version + 1,
                             sealed[-1:])[0]["status"] == "stale"

        r, (unknown,) = _station(d, "key", "0000deadbeef")
        assert r.returncode == 1 and unknown["status"] == "UNKNOWN_METER", unknown

        victim = sorted(done)[0]
        not_home = next(t for t in ids if t != homes[victim])
        r, (revoked,) = _station(d, "revoke", victim, "--via", not_home)
        assert r.returncode == 0 and revoked["ok"] and revoked["via"] == homes[victim], revoked
        assert revoked["height"] > 0
        r, (after,) = _station(d, "key", victim, "--via", not_home)
        assert r.returncode == 1 and after["status"] == "REVOKED", after
        assert after["proof"] == "checked" and after["height"] == revoked["height"], after
        r, (again,) = _station(d, "revoke", victim, "--via", homes[victim])
        assert r.returncode == 0 and again["height"] == revoked["height"], again  # idempotent

        # Injected: a terminal's certificate claiming the station's name.
        station_fleet = Fleet.load(d)
        tls = d / "tls"
        _, ctx = tls_contexts(tls / "ca.crt", tls / "ecd-01.crt", tls / "ecd-01.key")
        host, port = station_fleet.address("ecd-00")
        with socket.create_connection((host, port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(FrameEncoder().encode(Hello("station", os.urandom(8), d.name)))
            s.settimeout(5)
            with contextlib.suppress(ConnectionError):
                assert s.recv(4096) == b""  # closed without a Hello back
        # Injected: the station sends what only terminals may send; a query still works.
        with StationLink(station_fleet, "ecd-00") as link:
            link._send(KeyAck(bytes.fromhex(victim), 1))
            answer = link.query(bytes.fromhex(sorted(done)[1]))
            assert answer.status == 0
        # Injected: the answer's proof tampered with (one endorsement's byte), or naming
        # another version, or another key; the station's check refuses each.
        second = bytes.fromhex(sorted(done)[1])
        key = bytes.fromhex(done[sorted(done)[1]][1])
        assert check_answer(station_fleet, second, answer, key) is None
        bad = bytearray(answer.proof)
        bad[-40] ^= 0x01
        assert check_answer(station_fleet, second, dataclasses.replace(answer, proof=bytes(bad)),
                            key)
        other = dataclasses.replace(answer, key_version=answer.key_version + 1)
        assert "not the answer's" in (check_answer(station_fleet, second, other, key) or "")
        assert check_answer(station_fleet, second, answer, b"\x00" * 32) == \
            "the key is not the one the record commits"
        # Injected: a terminal speaks for the station (its own connection to ecd-00).
        back = _terminal_asks_for_the_station(station_fleet, tls)
        assert any(isinstance(m, Hello) for m in back), back
        assert not any(isinstance(m, QueryAnswer) for m in back), back
        with ConsoleClient(consoles(fleet)["ecd-00"]) as c:
            net = console_json(c, "net")
        assert net["transport"].get("refused.cn_mismatch", 0) >= 1, net["transport"]
        assert net["network"].get("refused.station.KeyAck", 0) == 1, net["network"]
        with ConsoleClient(consoles(fleet)["ecd-02"]) as c:
            net = console_json(c, "net")
        assert net["network"].get("refused.peer.StationQuery", 0) == 1, net["network"]
    finally:
        fleet = down(d, fleet)


def station_fleet_of(d: Path) -> Fleet:
    return Fleet.load(d)


def _terminal_asks_for_the_station(fleet: Fleet, tls: Path) -> list[object]:
    """ecd-00, with its own certificate and name, sends ecd-02 a StationQuery; what ecd-02
    sends back in 3 s, decoded. (ecd-00's dial replaces its running link to ecd-02: the
    lower id's dial wins.)"""
    _, ctx = tls_contexts(tls / "ca.crt", tls / "ecd-00.crt", tls / "ecd-00.key")
    host, port = fleet.address("ecd-02")
    enc, dec = FrameEncoder(), FrameDecoder()
    got: list[object] = []
    with socket.create_connection((host, port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as s:
        s.sendall(enc.encode(Hello("ecd-00", os.urandom(8), fleet.provisioning.fleet)))
        s.sendall(enc.encode(StationQuery(1, b"\x01\x02")))
        s.settimeout(3)
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := s.recv(65536):
                got.extend(dec.feed(chunk))
    return got
