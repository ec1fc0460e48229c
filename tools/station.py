"""``edgekey station``: the master station (the paper's cloud tier) asking the fleet.

The station is a client of the terminals, never a member: it holds the
fleet CA's ``station`` certificate (``DIR/tls/station.crt``) and an X25519
transport key (``DIR/station.key``) whose public half the utility's
provisioning names, so a terminal lets it connect (TLS with client
certificates, the fleet CA only, the same framing as between terminals:
agent/net/wire.py) and a holder may wrap a key to it. It may only ask:

- ``key METER [--via ID]``: the meter's key through any terminal. The
  terminal answers from its own store when it is the meter's home, or
  forwards the query to the holder (agent/remotequery.py); either way the
  key arrives wrapped to the station, which opens it here, with the record
  proof of the meter's newest record (agent/ledger/proof.py), which the
  station checks against the fleet's public keys: the record's signature,
  its place in the block, a majority of the provisioned terminals endorsing
  the block, and that it commits this very key (its fingerprint), version
  and height. A key the proof does not vouch for is BAD_PROOF. Printed:
  status, key version, height, proof, the key's fingerprint (the key itself
  with ``--show-key``).
- ``readings METER [--via HOME]``: the newest readings the meter's home
  accepted, as the meter sealed them (AES-GCM under its key, bound to meter,
  key version and counter: agent/node/reading.py), opened here with the key
  fetched as above: end to end, so a reading the terminal altered, or one
  sealed under another key, does not open (``bad``, or ``stale`` for another
  key version), whatever the terminal says.
- ``revoke METER [--via ID]``: an operator's revoke, proposed by the meter's
  home and committed through the majority like any operation. A terminal
  that is not the home says which is; the station asks that one.

Exit status per answer: 0 when every answer is OK (the key opened, the
revoke committed), 1 when a terminal refused (the reason printed), 2 when no
terminal could be reached. ``--json`` prints one JSON object per answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agent import provisioning as prov
from agent.keystore.material import fingerprint
from agent.keystore.transport import TransportError, open_envelope
from agent.ledger.codec import DecodeError
from agent.ledger.proof import check_record_proof, decode_record_proof
from agent.ledger.rules import Reason
from agent.net.peers import peer_cn, tls_contexts
from agent.net.wire import (
    FrameDecoder,
    FrameEncoder,
    Hello,
    Message,
    Ping,
    PlacementAnswer,
    Pong,
    ReadingsAnswer,
    StationAnswer,
    StationQuery,
    StationReadings,
    StationReply,
    StationRevoke,
    WireError,
)
from agent.node.actions import Nak
from agent.node.reading import BadReading, open_reading
from agent.remotequery import QueryStatus
from tools.provision_cmd import STATION

DEFAULT_TIMEOUT_S = 10.0
_Ask = StationQuery | StationReadings | StationRevoke
_Reply = TypeVar("_Reply", StationAnswer, ReadingsAnswer, StationReply, PlacementAnswer)


class StationError(Exception):
    """No answer: the terminal is unreachable, refused the station, or broke the protocol."""


@dataclass(frozen=True)
class Fleet:
    """What the station knows of a fleet: the provisioning in force and its own keys."""

    directory: Path
    provisioning: prov.Provisioning

    @classmethod
    def load(cls, directory: Path) -> Fleet:
        trusted = bytes.fromhex((directory / "utility.pub").read_text().strip())
        p = prov.verify((directory / "provisioning.json").read_bytes(), trusted)
        if p.network is None or p.station_id is None:
            raise StationError(f"the fleet in {directory} has no network or no master station")
        return cls(directory, p)

    def address(self, terminal: str) -> tuple[str, int]:
        assert self.provisioning.network is not None
        try:
            return self.provisioning.network.peers[terminal]
        except KeyError:
            raise StationError(f"no terminal {terminal!r} in the provisioning") from None

    def terminals(self) -> list[str]:
        retired = self.provisioning.retired
        return [t.terminal_id for t in self.provisioning.terminals if t.terminal_id not in retired]

    def transport_key(self) -> Any:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        raw = bytes.fromhex((self.directory / f"{STATION}.key").read_text().strip())
        return X25519PrivateKey.from_private_bytes(raw)


class StationLink:
    """One TLS connection from the station to one terminal; blocking, one request at a time."""

    def __init__(self, fleet: Fleet, terminal: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        tls = fleet.directory / "tls"
        _, ctx = tls_contexts(tls / "ca.crt", tls / f"{STATION}.crt", tls / f"{STATION}.key")
        host, port = fleet.address(terminal)
        self.terminal = terminal
        self.timeout_s = timeout_s
        try:
            raw = socket.create_connection((host, port), timeout=timeout_s)
            self.sock = ctx.wrap_socket(raw, server_hostname=host)
        except (OSError, ssl.SSLError) as exc:
            raise StationError(f"{terminal} at {host}:{port}: {exc}") from None
        if peer_cn(self.sock) != terminal:
            self.close()
            raise StationError(f"{host}:{port} is {peer_cn(self.sock)!r}, not {terminal!r}")
        self.encoder, self.decoder = FrameEncoder(), FrameDecoder()
        self._ready: list[Message] = []
        self._send(Hello(STATION, os.urandom(8), fleet.provisioning.fleet))
        hello = self._next(lambda m: isinstance(m, Hello))
        assert isinstance(hello, Hello)
        if hello.terminal_id != terminal:
            raise StationError(f"{terminal}'s Hello names {hello.terminal_id!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> StationLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, message: Message) -> None:
        try:
            self.sock.sendall(self.encoder.encode(message))
        except OSError as exc:
            raise StationError(f"{self.terminal}: {exc}") from None

    def _next(self, wanted: Any) -> Message:
        """The next message ``wanted(message)`` accepts; pings answered meanwhile."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            while self._ready:
                m = self._ready.pop(0)
                if isinstance(m, Ping):
                    self._send(Pong(m.nonce))
                elif wanted(m):
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise StationError(f"{self.terminal}: no answer within {self.timeout_s:.0f} s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise StationError(f"{self.terminal}: {exc}") from None
            if not data:
                raise StationError(f"{self.terminal} closed the connection (the station is "
                                   "not in its provisioning, or it refused the certificate)")
            try:
                self._ready.extend(self.decoder.feed(data))
            except WireError as exc:
                raise StationError(f"{self.terminal}: {exc}") from None

    def ask(self, request: type[_Ask], meter_id: bytes, answer: type[_Reply]) -> _Reply:
        """Send ``request`` about ``meter_id``; its ``answer`` (matched by request id)."""
        return self.exchange(lambda rid: request(rid, meter_id), answer)

    def exchange(self, make: Any, answer: type[_Reply]) -> _Reply:
        """Send ``make(request_id)``; the ``answer`` that carries the same request id."""
        rid = int.from_bytes(os.urandom(8), "big") >> 1
        self._send(make(rid))
        got = self._next(lambda m: isinstance(m, answer) and m.request_id == rid)
        assert isinstance(got, answer)
        return got

    def query(self, meter_id: bytes) -> StationAnswer:
        return self.ask(StationQuery, meter_id, StationAnswer)

    def readings(self, meter_id: bytes) -> ReadingsAnswer:
        return self.ask(StationReadings, meter_id, ReadingsAnswer)

    def revoke(self, meter_id: bytes) -> StationReply:
        return self.ask(StationRevoke, meter_id, StationReply)


def _status_name(status: int) -> str:
    try:
        return QueryStatus(status).name
    except ValueError:
        return f"STATUS_{status}"


def check_answer(fleet: Fleet, meter_id: bytes, a: StationAnswer,
                 key: bytes | None) -> str | None:
    """Why the answer's record proof does not vouch for it (None: it does).

    The proof must hold against the terminals the provisioning lists and has not
    withdrawn (their Ed25519 keys; a majority of them endorsed the block), and be
    the record the answer names: this meter, this key version, this height, and
    (when a key came) the fingerprint of that very key."""
    if not a.proof:
        return "no record proof (the chain there no longer holds the block)"
    try:
        proof = decode_record_proof(a.proof)
    except (DecodeError, ValueError) as exc:
        return f"record proof undecodable: {exc}"
    p = fleet.provisioning
    keys = {t.terminal_id: t.identity_public for t in p.terminals
            if t.terminal_id not in p.retired}
    why = check_record_proof(proof, keys)
    if why is not None:
        return f"record proof: {why}"
    tx = proof.tx
    if tx.meter_id != meter_id or tx.key_version != a.key_version or \
            proof.header.height != a.height:
        return (f"record proof is of meter {tx.meter_id.hex()} v{tx.key_version} at "
                f"{proof.header.height}, not the answer's")
    if key is not None and tx.fingerprint != fingerprint(key):
        return "the key is not the one the record commits"
    return None


def fetch_key(fleet: Fleet, meter_id: bytes, via: str,
              timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """``meter_id``'s key through terminal ``via``, opened with the station's transport key
    and checked against the record proof."""
    with StationLink(fleet, via, timeout_s) as link:
        a = link.query(meter_id)
    out: dict[str, Any] = {"meter": meter_id.hex(), "via": via, "status": _status_name(a.status),
                           "key_version": a.key_version, "height": a.height}
    if a.detail:
        out["detail"] = a.detail
    key = None
    if a.status == QueryStatus.OK:
        try:
            key = open_envelope(fleet.transport_key(), a.envelope, meter_id=meter_id,
                                key_version=a.key_version, requester_id=STATION.encode())
        except TransportError as exc:
            out.update(status="BAD_ENVELOPE", detail=str(exc))
            return out
    if a.status in (QueryStatus.OK, QueryStatus.REVOKED):
        why = check_answer(fleet, meter_id, a, key)
        out["proof"] = "checked" if why is None else why
        if why is not None and key is not None:
            out["status"] = "BAD_PROOF"
    if key is not None:
        out["fingerprint"] = fingerprint(key).hex()
        out["key"] = key.hex()
    return out


def open_readings(meter_id: bytes, key: bytes, key_version: int,
                  readings: tuple[tuple[int, int, bytes], ...]) -> list[dict[str, Any]]:
    """Each sealed reading opened end to end with the station's copy of the key: ``ok``
    (its data), ``stale`` (sealed under another key version than the station holds), or
    ``bad`` (it does not open under that key: tampered, or the wrong key)."""
    out = []
    for version, counter, sealed in readings:
        item: dict[str, Any] = {"counter": counter, "key_version": version}
        if version != key_version:
            item["status"] = "stale"
            item["detail"] = f"sealed under v{version}, the station holds v{key_version}"
        else:
            try:
                item["data"] = open_reading(key, sealed, meter_id=meter_id,
                                            key_version=version, counter=counter).hex()
                item["status"] = "ok"
            except BadReading as exc:
                item.update(status="bad", detail=str(exc))
        out.append(item)
    return out


def fetch_readings(fleet: Fleet, meter_id: bytes, via: str,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """The meter's key (checked, as ``fetch_key``) and the newest readings its home holds,
    each opened with that key."""
    out = fetch_key(fleet, meter_id, via, timeout_s)
    if out["status"] != "OK":
        return out
    with StationLink(fleet, via, timeout_s) as link:
        got = link.readings(meter_id)
    out["readings"] = open_readings(meter_id, bytes.fromhex(out["key"]), out["key_version"],
                                    got.readings)
    if any(r["status"] == "bad" for r in out["readings"]):
        out["status"] = "BAD_READING"
    return out


def reply_fields(r: StationReply) -> dict[str, Any]:
    """A terminal's answer to an order (revoke, migrate) as the station reports it: ok and
    height, and on a refusal the NAK's and the ledger's reasons by name, and the detail."""
    out: dict[str, Any] = {"ok": r.ok, "height": r.height}
    if r.ok:
        return out
    out["reason"] = Nak(r.nak).name if r.nak in Nak._value2member_map_ else str(r.nak)
    if r.ledger_reason:
        out["ledger_reason"] = (Reason(r.ledger_reason).name
                                if r.ledger_reason in Reason._value2member_map_
                                else str(r.ledger_reason))
    out["detail"] = r.detail
    return out


def revoke(fleet: Fleet, meter_id: bytes, via: str,
           timeout_s: float = 30.0) -> dict[str, Any]:
    """Revoke ``meter_id``'s key through ``via``, or through its home when ``via`` says which."""
    tried: list[str] = []
    while True:
        tried.append(via)
        with StationLink(fleet, via, timeout_s) as link:
            r = link.revoke(meter_id)
        out: dict[str, Any] = {"meter": meter_id.hex(), "via": via, **reply_fields(r)}
        if r.ok:
            return out
        home = r.detail.rpartition("(home ")[2].rstrip(")") if "(home " in r.detail else None
        if out["reason"] != "NOT_HOME" or home is None or home in tried:
            return out
        via = home


# ================================================================== command line

def add_parser(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("station", help="the master station: keys through any terminal, "
                                        "revokes through the home")
    st.add_argument("--dir", type=Path, default=Path("out/fleet"))
    st.add_argument("--json", action="store_true", help="one JSON object per answer")
    st.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    cmds = st.add_subparsers(dest="station_cmd", metavar="SUBCOMMAND", required=True)
    key = cmds.add_parser("key", help="a meter's key, wrapped to the station and opened here")
    key.add_argument("meters", nargs="+", metavar="METER", help="meter address (hex)")
    key.add_argument("--via", default=None, help="the terminal to ask (default: the first)")
    key.add_argument("--show-key", action="store_true", help="print the key itself too")
    rd = cmds.add_parser("readings", help="the newest readings the meter's home accepted, "
                                          "opened here with the meter's key (end to end)")
    rd.add_argument("meters", nargs="+", metavar="METER")
    rd.add_argument("--via", default=None, help="the meter's home (readings are kept there)")
    rv = cmds.add_parser("revoke", help="revoke a meter's key through its home terminal")
    rv.add_argument("meters", nargs="+", metavar="METER")
    rv.add_argument("--via", default=None)
    pl = cmds.add_parser("place", help="each terminal's placement: site (medoid), capacity, "
                                       "meters homed, what its placement raised")
    pl.add_argument("terminals", nargs="*", metavar="TERMINAL", help="default: every one")
    rp = cmds.add_parser("replan", help="re-plan an area: its meters assigned again to its "
                                        "terminals (capacitated), the moves committed as "
                                        "migrations through their homes")
    rp.add_argument("terminals", nargs="+", metavar="TERMINAL")
    for p in (st, key, rd, rv, pl, rp):
        p.set_defaults(handler=run)


def _meter(text: str) -> bytes:
    try:
        meter = bytes.fromhex(text)
    except ValueError:
        raise StationError(f"{text!r} is not a meter address in hex") from None
    if not 1 <= len(meter) <= 16:
        raise StationError(f"{text!r}: a meter address is 1 to 16 bytes")
    return meter


def _place(args: argparse.Namespace, fleet: Fleet) -> int:
    from tools import station_place

    if args.station_cmd == "replan":
        out = station_place.replan(fleet, args.terminals, args.timeout)
        rows = [out] if args.json else [
            {k: v for k, v in out.items() if k != "moves"}, *out["moves"]]
        status = 0 if not out["not_placed"] and all(m["ok"] for m in out["moves"]) else 1
    else:
        rows = [station_place.placement(fleet, t, args.timeout)
                for t in (args.terminals or fleet.terminals())]
        status = 0
    for row in rows:
        print(json.dumps(row, sort_keys=True) if args.json else
              "  ".join(f"{k} {v}" for k, v in row.items() if k != "meters")
              + (f"  meters {len(row['meters'])}" if "meters" in row else ""))
    return status


def run(args: argparse.Namespace) -> int:
    try:
        fleet = Fleet.load(args.dir)
        if args.station_cmd in ("place", "replan"):
            return _place(args, fleet)
        via = args.via or fleet.terminals()[0]
        worst = 0
        for text in args.meters:
            meter = _meter(text)
            if args.station_cmd in ("key", "readings"):
                fetch = fetch_key if args.station_cmd == "key" else fetch_readings
                out = fetch(fleet, meter, via, args.timeout)
                ok = out["status"] == "OK"
                if not getattr(args, "show_key", False):
                    out.pop("key", None)
            else:
                out = revoke(fleet, meter, via, max(args.timeout, 30.0))
                ok = out["ok"]
            worst = max(worst, 0 if ok else 1)
            if args.json:
                print(json.dumps(out, sort_keys=True))
            else:
                print("  ".join(f"{k} {v}" for k, v in out.items()))
        return worst
    except (StationError, OSError, prov.ProvisioningError) as exc:
        print(f"edgekey station: {exc}", file=sys.stderr)
        return 2
