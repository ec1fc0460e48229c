"""The planner on real grids' meters (bench/grids, tools.grids), and the grid CSV reader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.placement.metrics import loads
from agent.placement.place import place
from agent.placement.plan import default_max_load, default_min_load, terminals_needed
from tools import grids

# The desk's balanced planner, as tests/test_placement_balance.py: its starts and swaps take
# minutes under emulated ARM.
pytestmark = pytest.mark.host_only

CAP = 25


@pytest.mark.parametrize("name", grids.NAMES)
def test_grid_plan_covers_every_meter_within_capacity_and_balance(name: str) -> None:
    pts = grids.load(name)
    n = len(pts)
    p = place(pts, cap=CAP, seed=0)
    k = len(p.centres)
    assert k == terminals_needed(n, CAP)
    # coverage: every meter to exactly one real terminal
    assert p.assign.shape == (n,)
    assert p.assign.min() >= 0 and p.assign.max() < k
    load = loads(p.assign, k)
    assert load.sum() == n
    # capacity, and the planner's band (floor(n/k) - 2 to ceil(n/k) + 2, within cap)
    assert load.max() <= CAP
    assert default_min_load(n, k) == max(0, n // k - 2)
    assert load.min() >= default_min_load(n, k), load.tolist()
    assert load.max() <= default_max_load(n, k, CAP) == min(CAP, -(-n // k) + 2), load.tolist()
    # each site is a meter's own position
    assert p.sites.shape == (k,)
    np.testing.assert_array_equal(p.centres, pts[p.sites])


@pytest.mark.parametrize("name", grids.NAMES)
def test_committed_grid_files_are_whole(name: str) -> None:
    ids = grids.load_ids(name)
    pts = grids.load(name)
    assert pts.dtype == np.float64 and pts.shape == (len(ids), 2)
    assert len(set(ids)) == len(ids) == len(pts) >= 50
    np.testing.assert_array_equal(pts.min(axis=0), [0.0, 0.0])  # the grid's own min corner
    assert ids == sorted(ids)


def test_held_out_grids_are_grids() -> None:
    assert len(grids.HELD_OUT) == 2
    assert set(grids.HELD_OUT) <= set(grids.NAMES)


def _good_text() -> str:
    return grids.path_of(grids.NAMES[0]).read_text(encoding="utf-8")


def _check_error_or_result(path: Path, text_rows: int | None = None) -> None:
    """Either a clean parse or one GridFileError line naming the file (and a row after it)."""
    try:
        ids, pts = grids.read(path)
    except grids.GridFileError as e:
        msg = str(e)
        assert isinstance(e, ValueError)
        assert "\n" not in msg and "\r" not in msg
        assert msg.startswith(str(path))
        if " row " in msg:
            row = int(msg[len(str(path)):].split(" row ", 1)[1].split(":", 1)[0])
            assert row >= 1 and (text_rows is None or row <= text_rows + 1)
    else:
        assert pts.shape == (len(ids), 2) and len(ids) >= 1
        assert np.isfinite(pts).all()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("grids") / "damaged.csv"


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([b"", b"id,x_m,y_m\n", b"id,x_m,y_m\na,1,2\n"]), st.binary(max_size=400))
def test_random_bytes_give_a_grid_file_error_or_a_clean_parse(scratch: Path, head: bytes,
                                                              data: bytes) -> None:
    scratch.write_bytes(head + data)
    _check_error_or_result(scratch)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_truncated_and_corrupted_rows_name_file_and_row(scratch: Path,
                                                        data: st.DataObject) -> None:
    text = _good_text()
    lines = text.splitlines(keepends=True)
    cut = data.draw(st.integers(0, len(text)), label="cut")
    damaged = text[:cut]
    if data.draw(st.booleans(), label="corrupt a row"):
        row = data.draw(st.integers(1, len(lines) - 1), label="row")
        junk = data.draw(st.text(max_size=12), label="junk")
        at = data.draw(st.integers(0, len(lines[row])), label="at")
        lines[row] = lines[row][:at] + junk + lines[row][at:]
        damaged = "".join(lines)[:max(cut, 1)]
    scratch.write_text(damaged, encoding="utf-8", newline="")
    _check_error_or_result(scratch, text_rows=damaged.count("\n") + damaged.count("\r") + 1)


@pytest.mark.parametrize(("text", "expect"), [
    ("", "empty, no header"),
    ("id,x_m,y_m\n", "header only"),
    ("id,x,y\na,1,2\n", "row 1: header must be id,x_m,y_m"),
    ("id,x_m,y_m\na,1,2\nb,1\n", "row 3: 2 fields, want 3"),
    ("id,x_m,y_m\na,1,2\nb,one,2\n", "row 3: x_m 'one' is not a number"),
    ("id,x_m,y_m\na,1,nan\n", "row 2: y_m 'nan' is not finite"),
    ("id,x_m,y_m\na,1,inf\n", "row 2: y_m 'inf' is not finite"),
    ("id,x_m,y_m\na,1,2\na,3,4\n", "row 3: id 'a' already on row 2"),
    ("id,x_m,y_m\n,1,2\n", "row 2: empty id"),
    ("id,x_m,y_m\na,1,2\nb,\x00,2\n", "row 3: x_m '\\x00' is not a number"),
    ("id,x_m,y_m\n" + "a" * 200_000 + ",1,2\n", "row 2: not CSV (field larger"),
])
def test_each_damage_has_its_message(tmp_path: Path, text: str, expect: str) -> None:
    path = tmp_path / "g.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(grids.GridFileError) as e:
        grids.read(path)
    assert str(e.value).startswith(str(path))
    assert expect in str(e.value), str(e.value)


def test_load_names_the_file_for_bad_bytes_and_unknown_grids(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_bytes(b"id,x_m,y_m\na,1,\xff\n")
    with pytest.raises(grids.GridFileError, match=r"bad\.csv: not UTF-8 text \(byte 15, line 2\)"):
        grids.load("bad", root=tmp_path)
    with pytest.raises(grids.GridFileError, match="no such grid file"):
        grids.load("nowhere", root=tmp_path)
    with pytest.raises(grids.GridFileError, match="grid name"):
        grids.load("../etc/passwd", root=tmp_path)


def test_a_good_file_reads_back_exactly(tmp_path: Path) -> None:
    ids = ["b", "a"]
    xy = np.array([[0.0, 1.25], [math.pi, 2.0]])
    grids.write_csv(tmp_path / "g.csv", ids, xy)
    got_ids, got = grids.read(tmp_path / "g.csv")
    assert got_ids == ids
    np.testing.assert_array_equal(got, np.round(xy, 2))


def test_edgekey_bench_balance_writes_the_table_json_and_plot(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    import json

    from tools.cli import main

    out, png = tmp_path / "balance.json", tmp_path / "balance.png"
    assert main(["bench", "balance", "--seeds", "1", "--layouts", "ieee-eu-lv",
                 "--out", str(out), "--png", str(png)]) == 0
    assert "ieee-eu-lv" in capsys.readouterr().out
    result = json.loads(out.read_text())
    ours = result["layouts"]["ieee-eu-lv"]["results"]["ours"]["runs"][0]
    assert ours["capacity_violations"] == 0 and ours["max_load"] <= 25
    assert png.stat().st_size > 0
