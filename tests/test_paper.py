"""``edgekey paper``: the experiment's pieces, and the command end to end.

The pieces (gateway paths, background rates, seeds, growth arithmetic, the
delay bound, the tables) need numpy and the routing values only, so they run
under emulated ARM too. Running the command needs SimPy, SciPy, matplotlib
and tqdm (desk libraries): host_only.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from agent.routing.network import PACKET_BITS
from tools import paper
from tools.paper import Model, PaperError, Topology


def _topology() -> Topology:
    """A square with one diagonal: T1 (gateway) - T2 - T3 - T4 - T1, and T2 - T4."""
    xy = np.array([[0.0, 0.0], [1000.0, 0.0], [1000.0, 1000.0], [0.0, 1000.0]])
    links = ((0, 1, 1000.0), (1, 2, 1000.0), (2, 3, 1000.0), (0, 3, 1000.0),
             (1, 3, math.hypot(1000.0, 1000.0)))
    return Topology(("T1", "T2", "T3", "T4"), xy, (10, 30, 20, 20), links, gateway=0)


# ---------------------------------------------------------------- pieces (ARM too)


def test_background_goes_to_the_gateway_along_the_shortest_distance() -> None:
    paths = paper.paths_to_gateway(_topology())
    assert paths["T1"] == ("T1",)
    assert paths["T2"] == ("T2", "T1")
    assert paths["T4"] == ("T4", "T1")
    # T3 is 2000 m from the gateway either way: the tie goes to the smaller names.
    assert paths["T3"] == ("T3", "T2", "T1")


def test_background_rate_is_lambda_per_terminal_scaled_by_its_meters() -> None:
    rates = paper.background_rates(_topology(), 100.0)
    assert rates == {"T1": 50.0, "T2": 150.0, "T3": 100.0, "T4": 100.0}
    assert sum(rates.values()) / len(rates) == pytest.approx(100.0)


def test_the_physical_network_takes_its_figures_from_the_model() -> None:
    model = Model(loss_length_m=50_000.0, retransmit_wait_s=0.004)
    net = paper.physical_network(model, _topology())
    assert list(net.nodes) == ["T1", "T2", "T3", "T4"]
    assert all(n.service_rate == model.service_rate_pps and n.buffer == 64
               and n.retransmit_wait == 0.004 and n.arrival_rate == 0.0
               for n in net.nodes.values())
    diag = net.link("T4", "T2")
    assert diag.capacity == 25e6 and diag.load == 0.0
    assert diag.delivery == pytest.approx(math.exp(-math.hypot(1000, 1000) / 50_000))
    assert diag.latency == pytest.approx(math.hypot(1000, 1000) / 2e8)


def test_the_ledger_rate_is_three_packets_per_destination_every_n_intervals() -> None:
    model = Model(block_interval_s=0.02)
    assert paper.ledger_rate_bps(model, 13) == pytest.approx(3 * PACKET_BITS / (13 * 0.02))


def test_t_max_is_the_stretch_times_the_slowest_fastest_path() -> None:
    model = Model(delay_stretch=1.5)
    net = paper.physical_network(model, _topology())
    net = net.with_link_stats("T1", "T2", latency=0.01)  # make T1 -> T2 direct slower
    rate = 1000.0
    bound = paper.delay_bound(net, "T1", rate, model)
    fastest = {"T2": ("T1", "T4", "T2"), "T3": ("T1", "T4", "T3"), "T4": ("T1", "T4")}
    worst = max(net.path_delay(p, rate) for p in fastest.values())
    assert bound == pytest.approx(1.5 * worst)


def test_case_seeds_depend_on_seed_terminals_and_role_only() -> None:
    a = paper.case_seed(0, 13, "ledger")
    assert a == paper.case_seed(0, 13, "ledger")
    assert len({a, paper.case_seed(1, 13, "ledger"), paper.case_seed(0, 12, "ledger"),
                paper.case_seed(0, 13, "measure")}) == 4


def test_every_terminal_originates_in_turn() -> None:
    model = Model(blocks=10)
    order = paper.origins(_topology(), model, seed=5)
    assert len(order) == 10
    assert sorted(order[:4]) == ["T1", "T2", "T3", "T4"]
    assert order[4:8] == order[:4] and order == paper.origins(_topology(), model, seed=5)


def test_growth_reduction_is_one_minus_the_ratio_of_growths() -> None:
    series = {"greedy": {"chain_ms": [2.0, 3.0, 5.0]},
              "shortest": {"chain_ms": [2.0, 4.0, 10.0]},
              "reliability": {"chain_ms": [2.0, 2.0, 5.0]},
              "residual": {"chain_ms": [2.0, 2.0, 1.0]}}
    g = paper.growth(series, [1, 2, 3], "chain_ms", 1, 3)
    assert g["growth"] == {"greedy": 3.0, "shortest": 8.0, "reliability": 3.0,
                           "residual": -1.0}
    assert g["reduction_pct"]["shortest"] == pytest.approx(62.5)
    assert g["reduction_pct"]["reliability"] == pytest.approx(0.0)
    assert g["reduction_pct"]["residual"] is None  # a baseline that did not grow: undefined


@pytest.mark.parametrize("n", [0, -3, 2.5, True, None])
def test_fewer_than_one_terminal_is_refused(n: object) -> None:
    with pytest.raises(PaperError, match="number of terminals"):
        paper.topology(Model(), n, seed=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("field, value", [
    ("pow_ms", -1.0), ("pow_ms", math.nan), ("block_interval_s", 0.0),
    ("link_capacity_bps", math.inf), ("blocks", 0), ("buffer", 2.5), ("delay_stretch", 0.9),
])
def test_a_model_with_a_meaningless_number_is_refused(field: str, value: object) -> None:
    with pytest.raises(PaperError, match=field):
        Model(**{field: value}).check()


def test_one_or_two_terminals_need_no_triangulation() -> None:
    assert paper._mesh(np.array([[0.0, 0.0]])) == []
    assert paper._mesh(np.array([[5.0, 0.0], [0.0, 0.0]])) == [(0, 1)]


def _summary() -> dict:
    rows = []
    for lam in paper.LAMBDAS:
        for m in paper.METHODS:
            row = {"lambda": lam, "method": m, "chain_ms": lam / 10 + len(m),
                   "chain_ms_se": 0.25, "load_balance": lam / 1000, "load_balance_se": 0.01}
            paper_row = paper.PAPER_TABLE1[lam] if m == "greedy" else (None, None)
            row["paper_chain_ms"], row["paper_load_balance"] = paper_row
            rows.append(row)
    return {"table1": {"terminals": 13, "rows": rows}, "seeds": [0, 1]}


def test_table1_has_a_row_per_lambda_and_method_with_the_papers_values_labelled() -> None:
    text = paper.table1_markdown(_summary())
    body = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(body) == len(paper.LAMBDAS) * len(paper.METHODS)
    assert "| 50 | greedy | 11.000 ± 0.250 | 0.0500 ± 0.0100 | 61.23 (paper) | 67.0 (paper) |" \
        in body
    assert "| 200 | residual | 28.000 ± 0.250 | 0.2000 ± 0.0100 | - | - |" in body
    assert text.count("(paper)") == 2 * len(paper.LAMBDAS)


# ---------------------------------------------------------------- the command (host)


def _run(argv: list[str]) -> tuple[int, str, str]:
    """``edgekey`` in-process, its stdout and stderr captured."""
    from tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One ``edgekey paper --quick`` run (seed 3, two workers): its folder and printout."""
    pytest.importorskip("simpy")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("paper") / "tmp"
    status, printed, err = _run(["paper", "--quick", "--seed", "3", "--out", str(out),
                                 "--no-progress", "--workers", "2"])
    assert status == 0, err
    return out, printed


def _cells(report: str) -> dict[tuple[int, str], list[str]]:
    """Table 1's rows in report.md: (lambda, method) -> the cells after them."""
    rows = {}
    for line in report.splitlines():
        m = re.match(r"\| (\d+) \| (greedy|shortest|reliability|residual) \| ", line)
        if m and "(ms)" not in line and line.count("|") == 7:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault((int(m[1]), m[2]), cells[2:])
    return rows


@pytest.mark.host_only
def test_quick_run_writes_figures_tables_and_json_that_agree(quick: tuple[Path, str]) -> None:
    out, printed = quick
    for name in ("figure6.png", "figure7.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text(encoding="utf-8")
    table1 = (out / "table1.md").read_text(encoding="utf-8")
    assert table1 in report
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    cells = _cells(report)
    assert set(cells) == {(lam, m) for lam in paper.LAMBDAS for m in paper.METHODS}
    for row in results["table1"]["rows"]:
        chain, load, paper_chain, paper_load = cells[(row["lambda"], row["method"])]
        assert chain == paper.fmt_ms(row["chain_ms"])  # one seed: no ± part
        assert load == paper.fmt_lb(row["load_balance"])
        if row["method"] == "greedy":
            assert paper_chain == f"{paper.PAPER_TABLE1[row['lambda']][0]:.2f} (paper)"
            assert paper_load == f"{paper.PAPER_TABLE1[row['lambda']][1]:.1f} (paper)"
        else:
            assert paper_chain == paper_load == "-"
        assert row["chain_ms"] > 0 and row["load_balance"] >= 0
    for m in paper.BASELINES:
        assert f"{paper.PAPER_TIME_REDUCTION[m]:.2f} (paper)" in report
        assert f"{paper.PAPER_LOAD_REDUCTION[m]:.2f} (paper)" in report
    grow = results["growth"]
    assert grow["to"] == paper.QUICK_TERMINALS
    for m in paper.METHODS:
        assert f"| {m} | {paper.fmt_ms(grow['chain_ms']['growth'][m])} |" in report
    series = results["figures"]["series"]["greedy"]
    assert len(series["chain_ms"]) == paper.QUICK_TERMINALS
    assert series["load_balance"][0] == 0.0  # one terminal: no links, nothing to balance
    assert "lambda 200 greedy" in printed and "paper 280.64 ms" in printed


@pytest.mark.host_only
def test_a_second_run_with_the_same_seed_gives_identical_results(
        quick: tuple[Path, str], tmp_path: Path) -> None:
    texts = [(quick[0] / "results.json").read_text(encoding="utf-8")]
    for k, seed in enumerate((3, 4)):
        out = tmp_path / f"run{k}"
        status, _out, err = _run(["paper", "--quick", "--seed", str(seed), "--out", str(out),
                                  "--no-progress", "--workers", "1"])
        assert status == 0, err
        texts.append((out / "results.json").read_text(encoding="utf-8"))
    assert texts[0] == texts[1]  # and the worker count does not matter
    assert texts[0] != texts[2]


@pytest.mark.host_only
def test_impossible_options_exit_with_one_line(tmp_path: Path) -> None:
    status, _out, err = _run(["paper", "--quick", "--terminals", "3", "--table-terminals", "5",
                              "--out", str(tmp_path)])
    assert status == 1
    assert err.strip() == "edgekey paper: --table-terminals 5 is above --terminals 3"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    status, _out, err = _run(["paper", "--quick", "--terminals", "2", "--no-progress",
                              "--out", str(blocker)])
    assert status == 1 and "cannot write the results" in err
    with pytest.raises(SystemExit):
        _run(["paper", "--terminals", "0"])
