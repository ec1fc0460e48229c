"""Remote key queries: a meter's key fetched from the terminal that holds it, wrapped to the asker.

    asker A --QueryForward(path A..H)--> relays --> holder H
    H: requester authorised? meter homed here and live? key held?
       -> QueryAnswer(envelope = key wrapped to the requester's transport key)
    <-- relayed back along the same path, hop by hop --

No key travels in the clear and no relay can open one: the envelope is
sealed to the requester (agent/keystore/transport.py), bound to the meter,
its key version and the requester's id. The holder decides alone whether
the requester may have it (an active member of the fleet, named in the
provisioning's allow list); a relay only checks that the message came from
the hop before it on the path. Every query ends: the asker's timeout
(``timeout_s``, ``retries`` more tries) answers TIMEOUT, a relay forgets a
query at its deadline, tables are bounded.

Sans-I/O: events in (``ask``, ``on_forward``, ``on_answer``, ``tick``) with
the time, messages out as ``(peer, message)`` pairs; the runtime sends them.
"""

from __future__ import annotations

import enum
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from agent.keystore.store import KeyStoreError
from agent.keystore.transport import TransportError
from agent.ledger.state import LedgerState, MeterStatus
from agent.net.wire import QueryAnswer, QueryForward
from agent.node.events import Time

DEFAULT_TIMEOUT_S = 3.0
DEFAULT_RETRIES = 1
MAX_OUTSTANDING = 256
MAX_RELAYS = 4096

Out = list[tuple[str, object]]
Route = Callable[[str], tuple[str, ...]]  # destination -> path from this terminal to it


class QueryStatus(enum.IntEnum):
    """A remote query's outcome; stable wire codes (QueryAnswer.status)."""

    OK = 0
    UNKNOWN_METER = 1
    NOT_HOME = 2  # the holder's chain homes the meter elsewhere (``detail`` names it)
    REVOKED = 3
    NOT_AUTHORISED = 4
    KEY_NOT_HELD = 5  # homed here, but its key has not arrived (a hand-over in flight)
    TIMEOUT = 6
    NO_ROUTE = 7
    BAD_REQUEST = 8


@dataclass(frozen=True, slots=True)
class QueryResult:
    query_id: int
    meter_id: bytes
    requester: str
    status: QueryStatus
    key_version: int = 0
    height: int = 0
    envelope: bytes = b""
    detail: str = ""
    path: tuple[str, ...] = ()
    elapsed_s: float = 0.0
    tries: int = 1


@dataclass(slots=True)
class _Asked:
    meter_id: bytes
    requester: str
    done: Callable[[QueryResult], None]
    started: float
    deadline: float
    path: tuple[str, ...]
    tries: int = 1


class RemoteQueries:
    """One terminal's side of remote key queries (module docstring)."""

    def __init__(self, self_id: str, state: LedgerState, *,
                 export: Callable[[bytes, str, int], bytes],
                 authorised: Callable[[str], bool], route: Route,
                 timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES):
        self.self_id = self_id
        self.state = state
        self.export = export
        self.authorised = authorised
        self.route = route
        self.timeout_s = timeout_s
        self.retries = retries
        self.counters: dict[str, int] = {}
        self._asked: dict[int, _Asked] = {}
        self._relays: OrderedDict[int, tuple[str, float]] = OrderedDict()  # id -> (back, until)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    # ------------------------------------------------------------ asking

    def ask(self, meter_id: bytes, requester: str, at: Time,
            done: Callable[[QueryResult], None]) -> Out:
        """Fetch ``meter_id``'s key for ``requester``; ``done`` is called exactly once."""
        qid = int.from_bytes(os.urandom(8), "big") >> 1
        if len(self._asked) >= MAX_OUTSTANDING:
            done(QueryResult(qid, meter_id, requester, QueryStatus.BAD_REQUEST,
                             detail=f"{len(self._asked)} queries outstanding"))
            return []
        entry = self.state.meter(meter_id)
        if entry is None or entry.status is MeterStatus.REVOKED or entry.home == self.self_id:
            status, version, height, envelope, detail = self._judge(meter_id, requester)
            self._count(f"local.{status.name}")
            done(QueryResult(qid, meter_id, requester, status, version, height, envelope,
                             detail, (self.self_id,)))
            return []
        path = self._path(entry.home)
        if path is None:
            done(QueryResult(qid, meter_id, requester, QueryStatus.NO_ROUTE,
                             detail=f"no path to {entry.home}"))
            return []
        self._asked[qid] = _Asked(meter_id, requester, done, at.mono,
                                  at.mono + self.timeout_s, path)
        self._count("asked")
        return [(path[1], self._forward(qid, meter_id, requester, path, at))]

    def _path(self, home: str) -> tuple[str, ...] | None:
        try:
            path = tuple(self.route(home))
        except (LookupError, ValueError):
            return None
        if len(path) < 2 or path[0] != self.self_id or path[-1] != home or \
                len(set(path)) != len(path):
            return None
        return path

    def _forward(self, qid: int, meter_id: bytes, requester: str, path: tuple[str, ...],
                 at: Time) -> QueryForward:
        return QueryForward(qid, meter_id, requester, self.self_id, path,
                            at.wall_ms + int(self.timeout_s * 1000))

    # ------------------------------------------------- holder and relays

    def on_forward(self, peer: str, m: QueryForward, at: Time) -> Out:
        """A query reaching this terminal: answer it (the path ends here) or pass it on."""
        path = m.path
        if self.self_id not in path or path.index(self.self_id) == 0 or \
                path[path.index(self.self_id) - 1] != peer:
            self._count("forward.off_path")  # not from the hop before us: dropped
            return []
        if at.wall_ms > m.deadline_ms:
            self._count("forward.expired")
            return []
        i = path.index(self.self_id)
        if i == len(path) - 1:
            status, version, height, envelope, detail = self._judge(m.meter_id, m.requester)
            self._count(f"answered.{status.name}")
            return [(peer, QueryAnswer(m.query_id, int(status), version, height, envelope,
                                       detail))]
        if len(self._relays) >= MAX_RELAYS:
            self._relays.popitem(last=False)
        self._relays[m.query_id] = (peer, at.mono + self.timeout_s)
        self._count("relayed")
        return [(path[i + 1], m)]

    def _judge(self, meter_id: bytes, requester: str
               ) -> tuple[QueryStatus, int, int, bytes, str]:
        """The holder's answer: (status, key version, height, envelope, detail)."""
        if not self.authorised(requester):
            return QueryStatus.NOT_AUTHORISED, 0, 0, b"", f"{requester!r} may not have keys"
        entry = self.state.meter(meter_id)
        if entry is None:
            return QueryStatus.UNKNOWN_METER, 0, 0, b"", ""
        if entry.status is MeterStatus.REVOKED:
            return QueryStatus.REVOKED, entry.key_version, entry.height, b"", ""
        if entry.home != self.self_id:
            return QueryStatus.NOT_HOME, entry.key_version, entry.height, b"", entry.home
        try:
            envelope = self.export(meter_id, requester, entry.key_version)
        except (KeyStoreError, TransportError, LookupError) as exc:
            return (QueryStatus.KEY_NOT_HELD, entry.key_version, entry.height, b"",
                    str(exc)[:200])
        return QueryStatus.OK, entry.key_version, entry.height, envelope, ""

    def on_answer(self, peer: str, m: QueryAnswer, at: Time) -> Out:
        asked = self._asked.get(m.query_id)
        if asked is not None:
            if peer != asked.path[1]:
                self._count("answer.off_path")
                return []
            del self._asked[m.query_id]
            try:
                status = QueryStatus(m.status)
            except ValueError:
                status = QueryStatus.BAD_REQUEST
            self._count(f"result.{status.name}")
            asked.done(QueryResult(m.query_id, asked.meter_id, asked.requester, status,
                                   m.key_version, m.height, m.envelope, m.detail, asked.path,
                                   at.mono - asked.started, asked.tries))
            return []
        relay = self._relays.pop(m.query_id, None)
        if relay is None:
            self._count("answer.stray")
            return []
        return [(relay[0], m)]

    # --------------------------------------------------------------- time

    def tick(self, at: Time) -> Out:
        out: Out = []
        for qid, a in list(self._asked.items()):
            if at.mono < a.deadline:
                continue
            entry = self.state.meter(a.meter_id)
            path = self._path(entry.home) if entry is not None else None
            if a.tries <= self.retries and path is not None:
                a.tries += 1
                a.deadline = at.mono + self.timeout_s
                a.path = path
                self._count("retried")
                out.append((path[1], self._forward(qid, a.meter_id, a.requester, path, at)))
                continue
            del self._asked[qid]
            self._count("result.TIMEOUT")
            a.done(QueryResult(qid, a.meter_id, a.requester, QueryStatus.TIMEOUT,
                               detail=f"no answer from {a.path[-1]} after {a.tries} tries",
                               path=a.path, elapsed_s=at.mono - a.started, tries=a.tries))
        for qid in [q for q, (_, until) in self._relays.items() if at.mono >= until]:
            del self._relays[qid]
        return out

    @property
    def outstanding(self) -> int:
        return len(self._asked)
