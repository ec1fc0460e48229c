"""``edgekey plan`` end to end, its bad-input exits, and the paper-setting generator.

The generator, the option parsing and the terminal numbering need numpy
only (they run under emulated ARM); running the command needs the desk
libraries (scipy, matplotlib, ...) and is host_only. The parser is built
here the way tools/cli.py builds it, through ``plan_cmd.add_parser``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from tools import meters_gen, plan_cmd


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgekey")
    plan_cmd.add_parser(p.add_subparsers(dest="command", required=True))
    return p


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args = _parser().parse_args(["plan", *argv])
    status = args.handler(args)
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------- generator (numpy only)


@pytest.mark.parametrize("kind", meters_gen.KINDS)
def test_generator_gives_the_papers_300_meters_inside_3_5_by_4_km(kind: str) -> None:
    pts = meters_gen.generate(kind, seed=3)
    assert pts.shape == (300, 2)
    assert (pts >= 0).all() and (pts[:, 0] < 3500).all() and (pts[:, 1] < 4000).all()
    assert len(np.unique(pts, axis=0)) == 300


@pytest.mark.parametrize("kind", meters_gen.KINDS)
def test_generator_is_seeded(kind: str) -> None:
    a, b, c = (meters_gen.generate(kind, seed=s) for s in (7, 7, 8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("n", [1, 2, 37, 5000])
def test_generator_takes_any_meter_count_and_area(n: int) -> None:
    for kind in meters_gen.KINDS:
        pts = meters_gen.generate(kind, n, 100.0, 50.0, seed=0)
        assert pts.shape == (n, 2) and (pts < (100.0, 50.0)).all() and (pts >= 0).all()


def test_clustered_meters_sit_closer_together_than_uniform_ones() -> None:
    def median_nn(p: np.ndarray) -> float:
        d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(axis=2))
        np.fill_diagonal(d, np.inf)
        return float(np.median(d.min(axis=1)))

    for seed in range(3):
        assert median_nn(meters_gen.clustered(seed=seed)) < 0.6 * median_nn(
            meters_gen.uniform(seed=seed))


@pytest.mark.parametrize("call,why", [
    (lambda: meters_gen.generate("uniform", 0), "at least one meter"),
    (lambda: meters_gen.generate("uniform", 5, -1.0, 5.0), "positive"),
    (lambda: meters_gen.generate("hexagonal", 5), "unknown layout"),
])
def test_generator_refuses_bad_settings(call: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        call()  # type: ignore[operator]


# ---------------------------------------------------------------- options, numbering


def test_plan_registers_with_the_papers_defaults() -> None:
    args = _parser().parse_args(["plan"])
    assert args.handler is plan_cmd.run and args.input is None
    assert (args.cap, args.margin, args.grid_m, args.meters, args.width_m, args.height_m) == (
        25, 0.05, 1000.0, 300, 3500.0, 4000.0)
    assert (args.generate, args.seeds, args.out) == ("clustered", 1, Path("out/plan"))


@pytest.mark.parametrize("argv", [["--cap", "0"], ["--seeds", "0"], ["--grid-m", "-1"],
                                  ["--margin", "nan"], ["--meters", "x"], ["--seed", "-1"],
                                  ["--units", "feet"]])
def test_plan_refuses_nonsense_options(argv: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["plan", *argv])
    assert e.value.code == 2
    assert "argument" in capsys.readouterr().err


def test_terminals_are_numbered_left_to_right_top_to_bottom() -> None:
    centres = np.array([[2500.0, 100.0], [100.0, 3900.0], [2000.0, 3500.0], [100.0, 200.0],
                        [900.0, 3950.0]])
    # Rows are 1 km bands down from the top terminal (y = 3950).
    assert plan_cmd.reading_order(centres, 1000.0).tolist() == [5, 1, 3, 4, 2]


def test_lower_percentages_are_computed_like_the_papers() -> None:
    rows = [{"scheme": "ours", "variance": 18.74}, {"scheme": "voronoi", "variance": 25.74},
            {"scheme": "grid", "variance": 158.58}]
    low = plan_cmd.lower_pct(rows)
    assert round(low["voronoi"], 2) == 27.20 and round(low["grid"], 2) == 88.18


# ---------------------------------------------------------------- the command (desk libraries)


@pytest.mark.host_only
def test_plan_on_the_papers_setting_writes_plans_figures_and_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    status, out, err = _run(["--out", str(tmp_path), "--no-progress"], capsys)
    assert status == 0, err
    table = out.split("\n\n")[0]
    for scheme in plan_cmd.SCHEMES:
        assert f"\n{scheme} " in table
    assert "18.74 (paper)" in table and "25.74 (paper)" in table and "158.58 (paper)" in table
    ours = next(line for line in table.splitlines() if line.startswith("ours "))
    assert ours.split()[1] == "13"  # N = 13 terminals, as the paper
    for name in ("meters.csv", "figure4.png", "figure5.png", "report.md", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    for scheme in plan_cmd.FIGURE_SCHEMES:
        for name in ("terminals.csv", "assignment.csv", "terminals.geojson",
                     "assignment.geojson"):
            assert (tmp_path / scheme / name).exists()
    for png in ("figure4.png", "figure5.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "| 18.74 (paper) |" in report and "**paper**: 27.20 % lower" in report
    assert "edgekey plan --generate clustered --meters 300" in report
    meta = json.loads((tmp_path / "metrics.json").read_text())
    by = {r["scheme"]: r for r in meta["schemes"]}
    assert by["ours"]["capacity_violations"] == 0 and by["ours"]["max_load"] <= 25
    assert meta["paper_variance"] == {"ours": 18.74, "voronoi": 25.74, "grid": 158.58}


@pytest.mark.host_only
def test_written_plan_matches_the_printed_metrics(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("scipy")
    from tools import placement_io as pio

    status, _, err = _run(["--out", str(tmp_path), "--no-figures", "--no-extras",
                           "--generate", "uniform", "--meters", "120"], capsys)
    assert status == 0, err
    meta = json.loads((tmp_path / "metrics.json").read_text())
    by = {r["scheme"]: r for r in meta["schemes"]}
    meters = pio.read_meters(tmp_path / "meters.csv")
    for scheme in ("ours", "voronoi", "grid"):
        rows = (tmp_path / scheme / "assignment.csv").read_text().splitlines()[1:]
        terminal = np.array([int(r.split(",")[3]) for r in rows])
        load = np.bincount(terminal)[1:]
        assert load.sum() == len(meters.ids) == 120
        assert np.isclose(load.var(), by[scheme]["variance"])
        assert load.max() == by[scheme]["max_load"]


@pytest.mark.host_only
def test_several_seeds_are_averaged_and_listed(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("scipy")
    status, out, err = _run(["--out", str(tmp_path), "--no-figures", "--no-extras",
                             "--meters", "100", "--seeds", "3", "--seed", "4",
                             "--no-progress"], capsys)
    assert status == 0, err
    assert "seeds 4..6 (mean over seeds)" in out and "variance (sd)" in out
    meta = json.loads((tmp_path / "metrics.json").read_text())
    ours = next(r for r in meta["schemes"] if r["scheme"] == "ours")
    assert len(ours["per_seed_variance"]) == 3
    assert np.isclose(ours["variance"], np.mean(ours["per_seed_variance"]))
    assert meta["seeds"] == [4, 5, 6]


@pytest.mark.host_only
def test_plan_reads_a_lonlat_file_and_writes_lonlat_geojson(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pyproj")
    src = tmp_path / "meters.csv"
    assert meters_gen.main(["--meters", "80", "--anchor", "120.15", "30.25",
                            "--out", str(src)]) == 0
    status, out, err = _run([str(src), "--out", str(tmp_path / "o"), "--no-figures",
                             "--no-extras"], capsys)
    assert status == 0, err
    assert "EPSG:32651" in out
    doc = json.loads((tmp_path / "o" / "ours" / "terminals.geojson").read_text())
    lon, lat = doc["features"][0]["geometry"]["coordinates"]
    assert 120.1 < lon < 120.25 and 30.2 < lat < 30.3 and "crs" not in doc


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.host_only
@pytest.mark.parametrize("text,argv,why", [
    ("id,x,y\na,1,2\nb,3,nan\n", [], "bad.csv, row 3, column 'y': 'nan' is not a finite number"),
    ("id,x,y\n", [], "bad.csv: no meters"),
    ("id,x,y\na,0,0\nb,500,0\nc,0,500\n", ["--terminals", "4"],
     "3 meter(s) but 4 terminals"),
    ("".join(["id,x,y\n"] + [f"m{i},{i * 100},0\n" for i in range(30)]),
     ["--terminals", "1"], "infeasible: 1 terminals x --cap 25 = 25 places for 30 meters"),
    ("id,x,y\na,0,0\nb,9,9\nc,0,0\n", [], "bad.csv, row 4: same coordinates (0.0, 0.0) as row 2"),
    ("id,lat,lon\na,120.15,30.25\nb,120.16,30.26\n", [], "look swapped"),
])
def test_bad_input_exits_1_with_one_line_naming_the_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, argv: list[str],
        why: str) -> None:
    path = _write(tmp_path / "bad.csv", text)
    status, out, err = _run([str(path), "--out", str(tmp_path / "o"), *argv], capsys)
    assert status == 1 and out == ""
    assert err.startswith("edgekey plan: ") and why in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.host_only
def test_large_inputs_go_through_the_tiled_planner_alike_on_one_or_two_workers(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("scipy")
    common = ["--meters", "400", "--tiled-above", "300", "--tile-meters", "100", "--no-figures",
              "--no-extras", "--no-progress"]
    plans = []
    for workers in ("1", "2"):
        out = tmp_path / workers
        status, _, err = _run([*common, "--workers", workers, "--out", str(out)], capsys)
        assert status == 0, err
        meta = json.loads((out / "metrics.json").read_text())
        assert meta["tiled"] is True
        ours = next(r for r in meta["schemes"] if r["scheme"] == "ours")
        assert ours["capacity_violations"] == 0 and ours["max_load"] <= 25
        assert "(tiled planner)" in (out / "report.md").read_text()
        plans.append((out / "ours" / "assignment.csv").read_text())
    assert plans[0] == plans[1]
    status, _, err = _run([*common, "--terminals", "17", "--out", str(tmp_path / "t")], capsys)
    assert status == 1 and "--terminals applies to the whole-area planner" in err


def test_grid_terminals_are_numbered_by_their_cell_rows() -> None:
    from tools.placement_baselines import grid_scheme

    # Cell row 1 (y in [1, 2) km) has sites at y = 1990 and 1010, cell row 0 one at y = 995:
    # a 1 km band down from the top site would hold all three and number them by x alone.
    pts = np.array([[100.0, 1990.0], [1500.0, 1010.0], [500.0, 995.0]])
    lay = grid_scheme(pts, origin=(0.0, 0.0))
    assert plan_cmd.layout_numbers(lay, 1000.0)[lay.assign].tolist() == [1, 2, 3]
    assert plan_cmd.reading_order(lay.centres, 1000.0)[lay.assign].tolist() == [1, 3, 2]


# ---------------------------------------------------------------- one planner entry, skips, files


def test_plan_defaults_come_from_the_one_planner_entry() -> None:
    from agent.placement import place
    from agent.placement.tiling import DEFAULT_TILE_METERS
    from tools import bench_placement

    args = _parser().parse_args(["plan"])
    assert (args.tiled_above, args.max_rounds, args.tile_meters) == (
        place.TILED_ABOVE, place.MAX_ROUNDS, DEFAULT_TILE_METERS)
    assert args.geojson == "auto"
    assert not hasattr(bench_placement, "TILED_ABOVE")  # no second threshold to drift


@pytest.mark.host_only
def test_cli_and_bench_placement_reach_the_same_planner_entry(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("scipy")
    import inspect

    from agent.placement import place
    from tools import bench_placement

    real = place.place
    calls: list[dict[str, object]] = []

    def recording(*a: object, **kw: object) -> object:
        bound = inspect.signature(real).bind(*a, **kw)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return real(*a, **kw)

    monkeypatch.setattr(place, "place", recording)
    status, _, err = _run(["--meters", "120", "--generate", "uniform", "--no-figures",
                           "--no-extras", "--no-progress", "--geojson", "never",
                           "--out", str(tmp_path)], capsys)
    assert status == 0, err
    assert bench_placement.run_one("ours", 120, 0)["capacity_violations"] == 0
    assert len(calls) == 2
    for call in calls:
        assert (call["tiled_above"], call["max_rounds"]) == (place.TILED_ABOVE,
                                                             place.MAX_ROUNDS)
        assert (call["cap"], call["margin"]) == (25, 0.05)


def test_skipped_schemes_follow_the_stated_thresholds() -> None:
    from tools import placement_baselines as pb

    at = pb.BASELINE_MAX_METERS
    assert "voronoi" not in plan_cmd.skipped_schemes(at, False)
    over = plan_cmd.skipped_schemes(at + 1, False)
    assert {"voronoi", "grid", "kmeans", "fasterpam"} <= set(over)
    assert f"over {at:,} meters" in over["voronoi"]
    assert plan_cmd.skipped_schemes(10, True) == {"kmeans": "--no-extras",
                                                  "fasterpam": "--no-extras"}


@pytest.mark.host_only
def test_baselines_over_the_threshold_are_skipped_and_said_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from tools import placement_baselines as pb

    monkeypatch.setattr(pb, "BASELINE_MAX_METERS", 100)
    status, out, err = _run(["--meters", "150", "--generate", "uniform", "--no-extras",
                             "--no-progress", "--out", str(tmp_path)], capsys)
    assert status == 0, err
    assert "voronoi: skipped (over 100 meters" in out and "grid: skipped (over 100 meters" in out
    assert "\nvoronoi " not in out.split("\n\n")[0]  # no table row
    report = (tmp_path / "report.md").read_text()
    assert "- scheme 2: Voronoi cells + medoid: skipped, over 100 meters" in report
    assert "- scheme 3: square grid + medoid: skipped, over 100 meters" in report
    meta = json.loads((tmp_path / "metrics.json").read_text())
    assert {"voronoi", "grid"} <= set(meta["skipped"])
    assert [r["scheme"] for r in meta["schemes"]] == ["ours"]
    assert not (tmp_path / "voronoi").exists() and not (tmp_path / "grid").exists()
    for png in ("figure4.png", "figure5.png"):  # the skipped panels say so
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    t = meta["timings"]
    assert t["planner_s"] == t["schemes_s"]["ours"][0] > 0
    assert set(t) >= {"load_s", "outputs_s", "figures_s", "planner_s", "schemes_s"}


def test_geojson_auto_writes_up_to_its_stated_size() -> None:
    at = plan_cmd.GEOJSON_AUTO_MAX_METERS
    assert plan_cmd.geojson_choice("auto", at) == (True, None)
    assert plan_cmd.geojson_choice("always", 10 * at) == (True, None)
    written, note = plan_cmd.geojson_choice("auto", at + 1)
    assert not written and note is not None and f"over {at:,}" in note
    written, note = plan_cmd.geojson_choice("never", 1)
    assert not written and note is not None and "--geojson never" in note


@pytest.mark.host_only
@pytest.mark.parametrize("mode,written,said", [
    ("never", False, "GeoJSON files left out (--geojson never)"),
    ("always", True, None),
    ("auto", False, "GeoJSON files left out: 150 meters is over 100 (--geojson auto)"),
])
def test_geojson_option_writes_or_leaves_out_the_twins(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        mode: str, written: bool, said: str | None) -> None:
    pytest.importorskip("scipy")
    monkeypatch.setattr(plan_cmd, "GEOJSON_AUTO_MAX_METERS", 100)
    status, out, err = _run(["--meters", "150", "--generate", "uniform", "--no-extras",
                             "--no-figures", "--no-progress", "--geojson", mode,
                             "--out", str(tmp_path)], capsys)
    assert status == 0, err
    for scheme in plan_cmd.FIGURE_SCHEMES:
        assert (tmp_path / scheme / "assignment.csv").exists()
        for name in ("terminals.geojson", "assignment.geojson"):
            assert (tmp_path / scheme / name).exists() == written
    report = (tmp_path / "report.md").read_text()
    meta = json.loads((tmp_path / "metrics.json").read_text())
    assert meta["geojson"] is written and f"--geojson {mode}" in report
    if said is None:
        assert "GeoJSON files left out" not in out + report
    else:
        assert said in out and said in report and meta["notes"][0].startswith(said)


# ---------------------------------------------------------------- edgekey bench plan


def test_bench_plan_registers_with_its_defaults() -> None:
    from tools import bench_plan, cli

    args = cli.build_parser().parse_args(["bench", "plan"])
    assert args.handler is cli._bench_plan and args.out == "bench/results/plan.json"
    assert [int(float(x)) for x in args.sizes.split(",")] == list(bench_plan.DEFAULT_SIZES)
    assert [int(x) for x in args.workers.split(",")] == list(bench_plan.DEFAULT_WORKERS)
    assert args.limit_s == bench_plan.DEFAULT_LIMIT_S


def test_bench_plan_skips_larger_sizes_after_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    from tools import bench_plan

    def fake(n: int, workers: int, **_: object) -> dict[str, object]:
        if n >= 2000 and workers == 1:
            return {"n": n, "workers": workers, "status": "did not finish in 5 s"}
        return {"n": n, "workers": workers, "status": "ok", "wall_s": 2.0, "planner_s": 1.5,
                "other_s": 0.5, "peak_rss_mib": 90.0, "tree_pss_mib": 80.0,
                "written_mib": 1.0, "skipped": ["kmeans"]}

    monkeypatch.setattr(bench_plan, "run_one", fake)
    result = bench_plan.run([3000, 1000, 2000], [1, 2], limit_s=5)
    got = [(r["n"], r["workers"], r["status"].split(":")[0]) for r in result["runs"]]
    assert got == [(1000, 1, "ok"), (1000, 2, "ok"), (2000, 1, "did not finish in 5 s"),
                   (2000, 2, "ok"), (3000, 1, "skipped"), (3000, 2, "ok")]
    table = dict(bench_plan.rows(result))
    assert "planner     1.5 s" in table["n=     1,000  workers 1"]
    assert table["n=     3,000  workers 1"] == "skipped: n=2,000 did not finish in 5 s"


@pytest.mark.host_only
def test_bench_plan_runs_the_command_and_reads_its_timings() -> None:
    pytest.importorskip("matplotlib")
    from tools import bench_plan

    r = bench_plan.run_one(300, 2, limit_s=120)
    assert r["status"] == "ok", r
    assert 0 < r["planner_s"] < r["wall_s"] and r["other_s"] == r["wall_s"] - r["planner_s"]
    assert r["peak_rss_mib"] > 30 and r["tree_pss_mib"] > 0 and r["written_mib"] > 0
    assert r["skipped"] == [] and r["geojson"] is True
    missed = bench_plan.run_one(300, 1, limit_s=0.2)
    assert missed["status"] == "did not finish in 0 s"
