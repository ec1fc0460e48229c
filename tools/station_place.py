"""The master station's side of placement: each terminal's placement, and an area re-plan.

``placement(fleet, terminal)`` asks one terminal (wire StationPlacement) for
its site (the medoid of its meters), capacity, the meters the chain homes
on it, and the events its placement raised (site moved, re-plan needed,
join sent elsewhere, migration to make room): the station hears them.

``replan(fleet, terminals)`` is the paper's "re-run steps 1-4 for the
affected area" for the terminals named: their meters (as the terminals
report them) are assigned again to those terminals' provisioned sites (the
boxes stand where they stand) with the planner's own objective
(``agent.placement.plan.assign_to_sites``: no terminal over its capacity,
none below the planner's lower load bound, then least total distance). Every
meter whose home changes is one MIGRATE, ordered through its home (wire
StationMigrate), endorsed by the majority, its key handed over. The moves go
as one batch, in waves so that no committed height puts a terminal over its
capacity: a wave holds only moves into terminals with room counting the
wave's own arrivals, and sends them all at once (the proposer batches what
arrives in one round into one block); moves into a full terminal wait for
the next wave, after the terminals they leave have committed. Moves that
only a cycle could place (every destination full) are reported, not made.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from agent.net.wire import (
    PlacementAnswer,
    PlacementEvent,
    StationMigrate,
    StationPlacement,
    StationReply,
)
from agent.placement.plan import assign_to_sites
from tools.station import DEFAULT_TIMEOUT_S, Fleet, StationError, StationLink, reply_fields


def placement(fleet: Fleet, terminal: str,
              timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """One terminal's placement, as the station hears it."""
    with StationLink(fleet, terminal, timeout_s) as link:
        got = link.exchange(StationPlacement, PlacementAnswer)
    return {"terminal": terminal, "site_xy_m": [got.site_x_dm / 10, got.site_y_dm / 10],
            "capacity": got.capacity, "meters": [m.hex() for m in got.meters],
            "events": [{"event": PlacementEvent(k).name.lower(), "t_ms": t, "meter": m.hex(),
                        "terminal": who} for k, t, m, who in got.events]}


def migrate(fleet: Fleet, meter: str, to: str, via: str,
            timeout_s: float = 30.0) -> dict[str, Any]:
    """Order one MIGRATE of ``meter`` to ``to`` through its home ``via``; the reply."""
    with StationLink(fleet, via, timeout_s) as link:
        r = link.exchange(lambda rid: StationMigrate(rid, bytes.fromhex(meter), to),
                          StationReply)
    return {"meter": meter, "from": via, "to": to, **reply_fields(r)}


def plan_moves(fleet: Fleet, answers: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(meter, from, to) for every meter of the area the capacitated assignment re-homes."""
    where = {m.meter_id.hex(): m.xy for m in fleet.provisioning.meters}
    names = sorted(answers)
    sites = np.array([fleet.provisioning.terminal(t).site for t in names], dtype=float)
    cap = min(int(answers[t]["capacity"]) for t in names)
    meters = [(m, t) for t in names for m in answers[t]["meters"] if m in where]
    if not meters:
        return []
    points = np.array([where[m] for m, _ in meters], dtype=float)
    assign = assign_to_sites(points, sites, cap)
    return [(m, old, names[int(a)]) for (m, old), a in zip(meters, assign, strict=True)
            if names[int(a)] != old]


def replan(fleet: Fleet, terminals: list[str],
           timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Re-plan the area of ``terminals`` and commit its migrations (module docstring)."""
    if len(set(terminals)) < 2:
        raise StationError("a re-plan needs an area of at least two terminals")
    answers = {t: placement(fleet, t, timeout_s) for t in sorted(set(terminals))}
    cap = {t: int(a["capacity"]) for t, a in answers.items()}
    load = {t: len(a["meters"]) for t, a in answers.items()}
    before = dict(load)
    left = plan_moves(fleet, answers)
    planned = len(left)
    done: list[dict[str, Any]] = []
    waves = 0
    while left:
        wave, arriving = [], {t: 0 for t in load}
        for mv in left:
            if load[mv[2]] + arriving[mv[2]] < cap[mv[2]]:
                wave.append(mv)
                arriving[mv[2]] += 1
        if not wave:
            break  # only a cycle of full terminals is left
        waves += 1
        with ThreadPoolExecutor(max_workers=min(16, len(wave))) as pool:
            results = list(pool.map(lambda mv: migrate(fleet, mv[0], mv[2], mv[1]), wave))
        for mv, r in zip(wave, results, strict=True):
            done.append(dict(r, wave=waves))
            if r["ok"]:
                load[mv[1]] -= 1
                load[mv[2]] += 1
        left = [mv for mv in left if mv not in wave]
    return {"terminals": sorted(answers), "planned": planned, "waves": waves, "moves": done,
            "not_placed": [{"meter": m, "from": a, "to": b} for m, a, b in left],
            "loads_before": before, "loads_after": load, "capacity": cap,
            "heights": sorted({r["height"] for r in done if r["ok"]})}
