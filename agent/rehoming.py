"""Medoid reassignment on the running terminal: where a joining meter is homed, what must move.

The placement core (``agent/placement/rehome.py``) is the paper's rule for
meters that join and leave after the plan. This is the terminal's use of
it. Its replica of the fleet's placement is rebuilt from the chain, never
kept on the side: the active terminals (their provisioned sites and
capacity) and every live meter at the home the chain gives it, at the
position the utility's provisioning records. So every terminal at the same
height holds the same placement, and a restart loses nothing.

When a meter that is not live on the chain asks this terminal to register
it (a new meter, or one that left and came back), ``admit_join`` decides.
The utility's provisioning puts every meter with a terminal (the plan's
assignment, or for a meter added later the terminal that hears it): while
that terminal has room, the meter is registered there, as planned.
Otherwise the replica says what joining it would do (on a copy; the chain
changes only when the register commits):

- homed here, nobody moves: admitted, the register goes on;
- homed here once meters of this terminal move to neighbours (a full
  terminal): each move is a MIGRATE this terminal proposes (``migrate``),
  endorsed by the majority like any key operation, its key handed over; the
  meter is told BUSY and registers on its next try, when the room exists
  on the chain, so no committed height ever has a terminal over its cap;
- homed at another terminal (this one is full and a neighbour within the
  detour bound has room): refused NOT_HOME naming it, as the chain would;
- no bounded repair (moves needed at other terminals, or no room near):
  ReplanNeeded, the meter told BUSY; an area re-plan from the station (a
  batch of migrations) makes the room.

Each decision, and each move of this terminal's planned site (the medoid of
its cluster, eq. 3) as meters join, leave and migrate, is an event kept for
the console (``place``), logged, and counted.
"""

from __future__ import annotations

import copy
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import numpy as np

from agent.ledger.state import LedgerState, MeterStatus
from agent.net.wire import PlacementEvent
from agent.node.actions import Nak
from agent.placement import rehome
from agent.provisioning import Provisioning

MAX_EVENTS = 256  # kept for the console, newest last
# What the station is told of (wire.PlacementEvent codes); "assigned" stays local.
STATION_EVENTS = {"site_moved": PlacementEvent.SITE_MOVED,
                  "replan_needed": PlacementEvent.REPLAN_NEEDED,
                  "assigned_elsewhere": PlacementEvent.ASSIGNED_ELSEWHERE,
                  "migrate": PlacementEvent.MIGRATE}


class AreaPlacement:
    """This terminal's placement replica and its decisions (module docstring)."""

    def __init__(self, self_id: str, provisioning: Callable[[], Provisioning],
                 state: LedgerState, *, migrate: Callable[[bytes, str], None],
                 on_event: Callable[[str, dict[str, Any]], None] = lambda kind, fields: None,
                 clock: Callable[[], float] = time.time):
        self.self_id = self_id
        self.provisioning = provisioning
        self.state = state
        self.migrate = migrate  # propose MIGRATE(meter -> terminal) from this terminal
        self.on_event = on_event
        self.clock = clock
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.counts: Counter[str] = Counter()
        self.error: str | None = None
        self._key: tuple[int, int] | None = None
        self._replica: rehome.Placement | None = None
        self._ids: list[str] = []
        self._moving: set[bytes] = set()  # migrations this terminal proposed, not yet on chain
        self._entries: dict[bytes, Any] = {}  # the provisioning's meters by id, per issue
        self._entries_issued = -1

    # ----------------------------------------------------------- the replica

    def replica(self) -> rehome.Placement | None:
        """The placement at the chain's current height (rebuilt when it moved)."""
        p = self.provisioning()
        tip = self.state.tip
        key = (tip.height if tip is not None else -1, p.issued_ms)
        if key != self._key:
            old_site = self.site()
            self._key = key
            self._build(p)
            new_site = self.site()
            if old_site is not None and new_site is not None and old_site != new_site:
                self._event("site_moved", old_xy=list(old_site), new_xy=list(new_site))
        return self._replica

    def _build(self, p: Provisioning) -> None:
        active = [t for t in p.terminals if self.state.is_active(t.terminal_id)]
        self._ids = sorted(t.terminal_id for t in active)
        index = {t: i for i, t in enumerate(self._ids)}
        sites = [next(t.site for t in active if t.terminal_id == tid) for tid in self._ids]
        cap = min((t.capacity for t in active), default=1)
        if self._entries_issued != p.issued_ms:  # the meters change only with the provisioning
            self._entries = {m.meter_id: m for m in p.meters}
            self._entries_issued = p.issued_ms
        where = self._entries
        ids, points, assign = [], [], []
        for meter_id in self.state.meter_ids():
            entry = self.state.meter(meter_id)
            if (entry is None or entry.status is not MeterStatus.LIVE
                    or entry.home not in index or meter_id not in where):
                continue
            ids.append(bytes(meter_id))
            points.append(where[meter_id].xy)
            assign.append(index[entry.home])
        self._moving = {m for m in self._moving
                        if (e := self.state.meter(m)) is not None and e.home == self.self_id}
        try:
            self._replica = rehome.Placement.from_assignment(
                ids, np.asarray(points, dtype=float).reshape(-1, 2),
                np.asarray(assign, dtype=np.int64), sites, cap=cap)
            self.error = None
        except rehome.PlacementError as exc:  # e.g. a terminal over its cap after migrations
            self._replica, self.error = None, str(exc)
            self.counts["replica.errors"] += 1

    def site(self) -> tuple[float, float] | None:
        """This terminal's planned site at the last rebuild: the medoid of its meters."""
        if self._replica is None or self.self_id not in self._ids:
            return None
        x, y = self._replica.site(self._ids.index(self.self_id))
        return (float(x), float(y))

    # ------------------------------------------------------------- decisions

    def admit_join(self, meter_id: bytes) -> tuple[Nak, str, str | None] | None:
        """The node core's join check (``NodeConfig.admit_join``)."""
        meter_id = bytes(meter_id)
        replica = self.replica()
        entry = self._entries.get(meter_id)
        if entry is None or replica is None or meter_id in replica:
            return None  # not provisioned (the core refuses it), no replica, or already placed
        xy = entry.xy
        if self.self_id in self._ids:  # the common cases, without a copy
            me = self._ids.index(self.self_id)
            room = len(replica.members(me)) < replica.cap
            if room and entry.home == self.self_id:  # the utility put it here, and it fits
                self._event("assigned", meter=meter_id.hex(), xy=list(xy))
                return None
            sites = np.array([replica.site(t) for t in range(replica.terminals)], dtype=float)
            d = np.hypot(*(sites - np.asarray(xy, dtype=float)).T)
            if int(np.argmin(d)) == me and room:
                self._event("assigned", meter=meter_id.hex(), xy=list(xy))
                return None
        trial = copy.deepcopy(replica)
        events = trial.join(meter_id, xy)
        name = self._ids.__getitem__
        moves = [e for e in events if isinstance(e, rehome.Migrate)]
        assigned = next((e for e in events if isinstance(e, rehome.Assigned)), None)
        replan = next((e for e in events if isinstance(e, rehome.ReplanNeeded)), None)
        if replan is not None or (moves and any(name(e.from_terminal) != self.self_id
                                                for e in moves)):
            terminals = [name(t) for t in replan.terminals] if replan else sorted(
                {name(e.from_terminal) for e in moves} | {name(e.to_terminal) for e in moves})
            reason = str(replan.reason) if replan else "moves-at-other-terminals"
            self._event("replan_needed", meter=meter_id.hex(), xy=list(xy), reason=reason,
                        terminals=terminals)
            return (Nak.BUSY, f"no room near here without a re-plan of {','.join(terminals)} "
                              f"({reason})", None)
        assert assigned is not None
        home = name(assigned.terminal)
        if home != self.self_id:
            self._event("assigned_elsewhere", meter=meter_id.hex(), xy=list(xy), home=home)
            return (Nak.NOT_HOME, f"placement homes it at {home}", home)
        if moves:
            for e in moves:
                mid = bytes(e.meter_id)  # type: ignore[arg-type]
                if mid not in self._moving:
                    self._moving.add(mid)
                    self.migrate(mid, name(e.to_terminal))
                    self._event("migrate", meter=mid.hex(), to=name(e.to_terminal),
                                why=f"room for {meter_id.hex()}")
            return (Nak.BUSY, f"making room: {len(moves)} meters move to neighbours first",
                    None)
        self._event("assigned", meter=meter_id.hex(), xy=list(xy))
        return None

    def _event(self, kind: str, **fields: Any) -> None:
        self.counts[kind] += 1
        record = {"t": round(self.clock(), 3), "event": kind, **fields}
        self.events.append(record)
        self.on_event(kind, fields)

    def station_events(self) -> list[tuple[int, int, bytes, str]]:
        """The events the master station hears (wire.PlacementAnswer), oldest first."""
        out = []
        for e in self.events:
            kind = STATION_EVENTS.get(e["event"])
            if kind is None:
                continue
            meter = bytes.fromhex(e.get("meter", "")) or b"\x00"
            terminal = (e.get("home") or e.get("to") or (e.get("terminals") or [None])[0]
                        or self.self_id)
            out.append((int(kind), int(e["t"] * 1000), meter, terminal))
        return out

    def status(self) -> dict[str, Any]:
        """What the console's ``place`` adds: the medoid site, load, recent decisions."""
        replica = self.replica()
        me = self._ids.index(self.self_id) if self.self_id in self._ids else None
        return {"medoid_site_xy": None if self.site() is None else list(self.site() or ()),
                "placed_here": None if replica is None or me is None
                else len(replica.members(me)),
                "replica_cap": None if replica is None else replica.cap,
                "replica_error": self.error, "decisions": dict(self.counts),
                "events": list(self.events)[-20:]}
