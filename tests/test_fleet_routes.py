"""A terminal's routing table: measured links, others' reports, a dead neighbour routed round."""

from __future__ import annotations

from agent.routing.fleet import ROUTE_METHODS, FleetRoutes, link_sample

# a ring of six with one chord: ecd-00 reaches ecd-03 one way round or the other
SITES = {"ecd-00": (0.0, 0.0), "ecd-01": (1000.0, -600.0), "ecd-02": (2000.0, -600.0),
         "ecd-03": (3000.0, 0.0), "ecd-04": (2000.0, 600.0), "ecd-05": (1000.0, 600.0)}


def stats(bytes_out: int = 0, bytes_in: int = 0, messages: int = 0, *, connected: bool = True,
          failures: int = 0, dropped: int = 0) -> dict[str, object]:
    return {"bytes_out": bytes_out, "bytes_in": bytes_in, "messages_out": messages,
            "messages_in": messages, "failures": failures, "dropped": dropped,
            "connected": connected}


def routes(method: str = "greedy") -> FleetRoutes:
    return FleetRoutes("ecd-00", SITES, rate_mbit_s=1.0, buffer_packets=64, rtt_ms=20.0,
                       route_fn=ROUTE_METHODS[method], method=method)


def test_the_mesh_and_paths_come_from_the_sites() -> None:
    r = routes("shortest")
    assert set(r.neighbours()) == {"ecd-01", "ecd-05"}
    paths = r.refresh()
    assert set(paths) == set(SITES) - {"ecd-00"}
    assert all(p[0] == "ecd-00" and p[-1] == d for d, p in paths.items())
    assert r.path_to("ecd-03") is not None and len(r.path_to("ecd-03")) == 4


def test_a_dead_neighbour_is_routed_round_and_reported_down() -> None:
    """Injected: ecd-00's connection to the neighbour its path to ecd-03 starts with closes
    and its re-dials fail. Survives: a path to every terminal, none through that link; the
    report tells the others the link is down; it comes back when the neighbour answers."""
    for method in ROUTE_METHODS:
        r = routes(method)
        first = r.path_to("ecd-03")[1]  # type: ignore[index]
        other = ({"ecd-01", "ecd-05"} - {first}).pop()
        r.observe(first, stats(10_000, 10_000, 10), 0.0)
        r.observe(first, stats(20_000, 20_000, 20), 2.0)
        r.observe(first, stats(20_000, 20_000, 20, connected=False, failures=2), 4.0)
        r.refresh()
        assert r.down == {first}, method
        assert all(p[1] != first for p in r.refresh().values() if len(p) > 1), method
        assert r.path_to("ecd-03")[1] == other  # type: ignore[index]
        assert r.report()[first][1] <= 0.01
        assert any(lk["down"] for lk in r.table()["links"])
        r.observe(first, stats(21_000, 21_000, 22, failures=2), 6.0)  # connected again
        assert r.down == set()


def test_another_terminal_s_report_loads_the_links_it_is_on() -> None:
    r = routes("greedy")
    assert r.apply_report("ecd-01", {"ecd-02": [900e3, 1.0], "ecd-00": [5.0, 1.0],
                                     "ecd-09": [1.0, 1.0], "ecd-03": [1.0, 1.0]}) == 1
    # our own link (ecd-00) we measure ourselves; ecd-09 is no terminal; 01-03 no mesh link
    table = r.table()
    loaded = {lk["link"]: lk["measured_bps"] for lk in table["links"]}
    assert loaded["ecd-01|ecd-02"] == 900e3
    r.refresh()
    assert r.path_to("ecd-02") is not None
    assert table["load_balance_degree"] > 0
    assert r.apply_report("ecd-01", {"ecd-02": ["fast", 1.0]}) == 0  # figures that are wrong
    assert r.apply_report("ecd-00", {"ecd-01": [1.0, 1.0]}) == 0  # nobody speaks for us


def test_link_samples_count_failures_as_lost_frames() -> None:
    s = link_sample(stats(100, 50, 4, failures=2, dropped=1), 3.0)
    assert (s.bytes_tx, s.bytes_rx, s.frames_tx, s.retries, s.timeouts) == (100, 50, 7, 1, 2)


def test_a_membership_change_makes_a_new_mesh() -> None:
    r = routes()
    r.set_sites({k: v for k, v in SITES.items() if k != "ecd-05"})
    assert "ecd-05" not in r.refresh()
    assert r.neighbours() == ("ecd-01",) or "ecd-05" not in r.neighbours()
