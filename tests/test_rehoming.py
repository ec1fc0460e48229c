"""The placement replica on a terminal: joins admitted, sent elsewhere, made room for, replanned."""

from __future__ import annotations

from types import SimpleNamespace

from agent.ledger.state import LedgerState, MeterEntry, MeterStatus, Tip
from agent.node.actions import Nak
from agent.rehoming import AreaPlacement

SITES = {"ecd-00": (0.0, 0.0), "ecd-01": (1000.0, 0.0), "ecd-02": (2000.0, 0.0)}
XY = {b"\x0a": (-50.0, 0.0), b"\x0b": (450.0, 0.0), b"\x0c": (1000.0, 30.0),
      b"\x0d": (1950.0, 0.0), b"\x0e": (-20.0, 5.0), b"\x0f": (1800.0, 0.0),
      b"\x10": (2100.0, 0.0)}


def fleet(homes: dict[bytes, str], cap: int = 2) -> tuple[SimpleNamespace, LedgerState]:
    terminals = tuple(SimpleNamespace(terminal_id=t, site=xy, capacity=cap)
                      for t, xy in SITES.items())
    meters = tuple(SimpleNamespace(meter_id=m, xy=xy, home="ecd-00") for m, xy in XY.items())
    p = SimpleNamespace(terminals=terminals, meters=meters, issued_ms=1)
    state = LedgerState()
    for i, t in enumerate(SITES):
        state.add_terminal(t, bytes([i + 1]) * 32, 0)
    for m, home in homes.items():
        put(state, m, home)
    state.advance_tip(Tip(1, b"\x00" * 32, 0))
    return p, state


def put(state: LedgerState, meter: bytes, home: str, status=MeterStatus.LIVE) -> None:
    state.put_meter(meter, MeterEntry(status, 1, b"\x01" * 32, home, 1, 1, 0))


def placement(me: str, p: SimpleNamespace, state: LedgerState, moved: list) -> AreaPlacement:
    return AreaPlacement(me, lambda: p, state, migrate=lambda m, to: moved.append((m, to)),
                         clock=lambda: 100.0)  # type: ignore[arg-type, return-value]


def test_a_join_into_spare_capacity_is_admitted_and_moves_nobody() -> None:
    p, state = fleet({b"\x0a": "ecd-00", b"\x0b": "ecd-00", b"\x0c": "ecd-01"})
    moved: list = []
    area = placement("ecd-02", p, state, moved)
    assert area.admit_join(b"\x0d") is None
    assert moved == [] and area.events[-1]["event"] == "assigned"
    assert area.admit_join(b"\x0a") is None  # already live: nothing for placement to say


def test_a_full_terminal_makes_room_by_migrating_its_own_meter_first() -> None:
    """Injected: a meter joins at ecd-00, full (cap 2). Survives: ecd-00 proposes one MIGRATE
    of its cheapest member to ecd-01 and tells the meter BUSY; asked again before that commits,
    it proposes nothing more; once the chain shows the move, the join is admitted."""
    p, state = fleet({b"\x0a": "ecd-00", b"\x0b": "ecd-00", b"\x0c": "ecd-01"})
    moved: list = []
    area = placement("ecd-00", p, state, moved)
    nak, detail, home = area.admit_join(b"\x0e")  # type: ignore[misc]
    assert nak is Nak.BUSY and "making room" in detail and home is None
    assert moved == [(b"\x0b", "ecd-01")]
    area.admit_join(b"\x0e")
    assert moved == [(b"\x0b", "ecd-01")]  # not proposed twice
    put(state, b"\x0b", "ecd-01")  # the MIGRATE committed
    state.advance_tip(Tip(2, b"\x02" * 32, 0))
    assert area.admit_join(b"\x0e") is None
    assert max(len(area.replica().members(i)) for i in range(3)) <= 2  # type: ignore[union-attr]


def test_a_meter_placement_homes_elsewhere_is_refused_not_home_naming_it() -> None:
    p, state = fleet({b"\x0a": "ecd-00", b"\x0b": "ecd-00", b"\x0c": "ecd-01"})
    area = placement("ecd-00", p, state, [])
    assert area.admit_join(b"\x0d") == (Nak.NOT_HOME, "placement homes it at ecd-02",
                                        "ecd-02")
    assert area.events[-1] == {"t": 100.0, "event": "assigned_elsewhere", "meter": "0d",
                               "xy": [1950.0, 0.0], "home": "ecd-02"}


def test_no_bounded_repair_raises_replan_needed_and_changes_nothing() -> None:
    """Injected: every terminal full (cap 1). Survives: BUSY, a replan_needed event naming the
    area, nothing proposed, the replica as it was."""
    p, state = fleet({b"\x0a": "ecd-00", b"\x0c": "ecd-01", b"\x0d": "ecd-02"}, cap=1)
    moved: list = []
    area = placement("ecd-00", p, state, moved)
    before = area.replica().arrays().assign.tolist()  # type: ignore[union-attr]
    nak, detail, _ = area.admit_join(b"\x0e")  # type: ignore[misc]
    assert nak is Nak.BUSY and "re-plan" in detail and moved == []
    assert area.events[-1]["event"] == "replan_needed"
    assert area.replica().arrays().assign.tolist() == before  # type: ignore[union-attr]


def test_the_terminal_s_site_follows_its_cluster_s_medoid() -> None:
    p, state = fleet({b"\x0d": "ecd-02", b"\x10": "ecd-02"}, cap=3)
    area = placement("ecd-02", p, state, [])
    area.replica()
    first = area.site()
    assert first is not None
    put(state, b"\x0f", "ecd-02")  # a third meter at 1800 m: the medoid moves to 1950
    state.advance_tip(Tip(2, b"\x02" * 32, 0))
    area.replica()
    assert area.site() != first and area.site() == (1950.0, 0.0)
    assert area.events[-1]["event"] == "site_moved"
    put(state, b"\x0f", "ecd-02", MeterStatus.REVOKED)  # it leaves
    state.advance_tip(Tip(3, b"\x03" * 32, 0))
    area.replica()
    assert area.status()["placed_here"] == 2
