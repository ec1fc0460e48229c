"""Meter files for the planner: parsing, bad input named by file/row/column, projection, writing.

Parsing metres needs numpy alone and runs under emulated ARM too; tests that
project longitude/latitude need pyproj and are host_only (pyproj is imported
inside them, never at module import).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tools import placement_io as pio
from tools.placement_io import PlacementInputError, parse_meters


def _csv(text: str, **kw: object) -> pio.Meters:
    return parse_meters(text, "csv", source="m.csv", **kw)  # type: ignore[arg-type]


def _geo(doc: object, **kw: object) -> pio.Meters:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    return parse_meters(text, "geojson", source="m.geojson", **kw)  # type: ignore[arg-type]


def _fc(coords: list[list[float]], crs: str | None = pio.LOCAL_METRES) -> dict:
    doc: dict = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": f"m{i}", "properties": {},
         "geometry": {"type": "Point", "coordinates": c}} for i, c in enumerate(coords)]}
    if crs is not None:
        doc["crs"] = {"type": "name", "properties": {"name": crs}}
    return doc


# ---------------------------------------------------------------- CSV in metres


def test_csv_in_metres_reads_ids_and_coordinates_in_order() -> None:
    m = _csv("id,x,y\na,0,0\nb,1500.5,20\nc,3,4000\n")
    assert m.ids == ("a", "b", "c")
    assert m.xy.tolist() == [[0.0, 0.0], [1500.5, 20.0], [3.0, 4000.0]]
    assert m.crs == pio.LOCAL_METRES and m.lonlat is None


def test_csv_without_id_column_numbers_meters_from_one() -> None:
    assert _csv("Easting,Northing\n10,20\n30,40\n").ids == ("1", "2")


def test_csv_named_columns_override_detection() -> None:
    m = _csv("a,b,ref\n1,2,p\n3,4,q\n", x_col="b", y_col="a", id_col="ref", units="metres")
    assert m.ids == ("p", "q") and m.xy.tolist() == [[2.0, 1.0], [4.0, 3.0]]


def test_csv_columns_of_unknown_units_ask_for_units() -> None:
    with pytest.raises(PlacementInputError, match="give --units"):
        _csv("a,b\n1,2\n3,4\n", x_col="a", y_col="b")


def test_csv_skips_blank_lines_and_reports_spreadsheet_rows() -> None:
    with pytest.raises(PlacementInputError) as e:
        _csv("\nx,y\n1,2\n\n3,oops\n")
    assert (e.value.row, e.value.column) == (5, "y")
    assert "m.csv, row 5, column 'y'" in str(e.value) and "'oops' is not a number" in str(e.value)


@pytest.mark.parametrize("text,why", [
    ("", "empty file"),
    ("   \n\n", "empty file"),
    ("x,y\n", "no meters"),
    ("x,y\n\n\n", "no meters"),
])
def test_empty_input_is_refused(text: str, why: str) -> None:
    with pytest.raises(PlacementInputError, match=why):
        _csv(text)


@pytest.mark.parametrize("cell", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_non_finite_coordinates_name_row_and_column(cell: str) -> None:
    with pytest.raises(PlacementInputError, match="not a finite number") as e:
        _csv(f"id,x,y\na,1,2\nb,3,{cell}\n")
    assert (e.value.row, e.value.column, e.value.source) == (3, "y", "m.csv")


def test_empty_cell_and_short_row_are_refused() -> None:
    with pytest.raises(PlacementInputError, match="empty") as e:
        _csv("x,y\n1,\n")
    assert (e.value.row, e.value.column) == (2, "y")
    with pytest.raises(PlacementInputError, match="1 field") as e:
        _csv("x,y\n1,2\n7\n")
    assert e.value.row == 3


def test_missing_coordinate_columns_list_the_header() -> None:
    with pytest.raises(PlacementInputError, match=r"no coordinate columns.*'easting'"):
        _csv("easting,height\n1,2\n")


def test_duplicate_coordinates_name_both_rows() -> None:
    with pytest.raises(PlacementInputError, match=r"same coordinates .* as row 2") as e:
        _csv("id,x,y\na,5,6\nb,7,8\nc,5,6\n")
    assert e.value.row == 4 and "--allow-duplicates" in str(e.value)


def test_duplicate_coordinates_are_counted_when_allowed() -> None:
    m = _csv("id,x,y\na,5,6\nb,7,8\nc,5,6\nd,5,6\n", allow_duplicates=True)
    assert len(m.ids) == 4 and m.duplicates == 2


def test_duplicate_and_empty_ids_are_refused() -> None:
    with pytest.raises(PlacementInputError, match="repeats row 2") as e:
        _csv("id,x,y\na,1,1\na,2,2\n")
    assert e.value.row == 3
    with pytest.raises(PlacementInputError, match="empty meter id"):
        _csv("id,x,y\n,1,1\n")


def test_degrees_in_metre_columns_are_caught() -> None:
    text = "id,x,y\n" + "".join(f"m{i},{120.1 + i * 1e-4},{30.2 + i * 1e-4}\n" for i in range(30))
    with pytest.raises(PlacementInputError, match="look like degrees") as e:
        _csv(text)
    assert e.value.column == "x"


def test_swapped_longitude_and_latitude_are_caught() -> None:
    # Hangzhou (120.15 E, 30.25 N) with the columns mislabelled.
    with pytest.raises(PlacementInputError, match="swapped") as e:
        _csv("id,lat,lon\na,120.15,30.25\nb,120.16,30.26\n")
    assert (e.value.row, e.value.column) == (2, "lat")


def test_metres_declared_as_degrees_are_caught() -> None:
    with pytest.raises(PlacementInputError, match="look like metres") as e:
        _csv("id,lon,lat\na,10,20\nb,3500,4000\n")
    assert (e.value.row, e.value.column) == (3, "lat")
    with pytest.raises(PlacementInputError, match="look like metres"):
        _csv("x,y\n1000,50\n2000,60\n", units="degrees")


def test_read_meters_names_the_file_and_takes_format_from_extension(tmp_path: Path) -> None:
    path = tmp_path / "area.csv"
    path.write_bytes("\ufeffid,x,y\na,1,2\nb,3,4\n".encode())
    assert pio.read_meters(path).ids == ("a", "b")
    bad = tmp_path / "area.txt"
    bad.write_text("x,y\n1,2\n")
    with pytest.raises(PlacementInputError, match=r"area.txt.*give --format"):
        pio.read_meters(bad)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"x,y\n1,2\n\xe9,3\n")
    with pytest.raises(PlacementInputError, match=r"latin.csv: not UTF-8 text"):
        pio.read_meters(latin)
    with pytest.raises(PlacementInputError, match=r"missing.csv: cannot read"):
        pio.read_meters(tmp_path / "missing.csv")


# ---------------------------------------------------------------- GeoJSON


def test_geojson_in_local_metres_reads_points_and_ids() -> None:
    m = _geo(_fc([[0, 0], [10.5, 20, 3.0]]))
    assert m.ids == ("m0", "m1") and m.xy.tolist() == [[0.0, 0.0], [10.5, 20.0]]


def test_geojson_without_crs_is_lonlat_and_checked_as_degrees() -> None:
    with pytest.raises(PlacementInputError, match="look like metres") as e:
        _geo(_fc([[0, 0], [3500.0, 4000.0]], crs=None))
    assert e.value.row == 1 and "feature 1" in str(e.value)


@pytest.mark.parametrize("feature,why", [
    ({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": []}}, "must be a Point"),
    ({"type": "Feature", "geometry": None}, "must be a Point"),
    ({"type": "Feature", "geometry": {"type": "Point", "coordinates": [1]}}, "needs \\[x, y\\]"),
    ({"type": "Feature", "geometry": {"type": "Point", "coordinates": ["1", 2]}}, "not a number"),
    ({"type": "Feature", "geometry": {"type": "Point", "coordinates": [True, 2]}}, "not a number"),
    ({"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1e400]}},
     "not a finite number"),
    ({"type": "Thing"}, "not a GeoJSON Feature"),
])
def test_geojson_bad_features_are_named_by_index(feature: dict, why: str) -> None:
    doc = _fc([[0, 0]])
    doc["features"].append(feature)
    text = json.dumps(doc).replace("Infinity", "1e400")
    with pytest.raises(PlacementInputError, match=why) as e:
        _geo(text)
    assert e.value.row == 1 and "m.geojson, feature 1" in str(e.value)


def test_geojson_syntax_error_names_line_and_character() -> None:
    with pytest.raises(PlacementInputError, match="invalid JSON") as e:
        _geo('{"type": "FeatureCollection",\n "features": [,]}')
    assert e.value.row == 2 and "line 2, character" in str(e.value)


@pytest.mark.parametrize("doc,why", [
    ([], "expected a GeoJSON FeatureCollection"),
    ({"type": "Feature"}, "expected a GeoJSON FeatureCollection"),
    ({"type": "FeatureCollection"}, "no 'features' list"),
    ({"type": "FeatureCollection", "features": []}, "no meters"),
    ({"type": "FeatureCollection", "features": [], "crs": {"type": "name"}}, "properties.name"),
])
def test_geojson_bad_documents_are_refused(doc: object, why: str) -> None:
    with pytest.raises(PlacementInputError, match=why):
        _geo(doc)


def test_geojson_nan_literal_is_refused() -> None:
    text = json.dumps(_fc([[0, 0], [1, 2]])).replace("[1, 2]", "[1, NaN]")
    with pytest.raises(PlacementInputError, match="not a finite number") as e:
        _geo(text)
    assert e.value.column == "coordinates[1] (y)"


# ---------------------------------------------------------------- any text


def _meters_or_named_error(read: Callable[[], pio.Meters], source: str) -> None:
    """The reader's contract: valid meters, or a PlacementInputError naming the source."""
    try:
        m = read()
    except PlacementInputError as exc:
        assert str(exc).startswith(source + ":") or str(exc).startswith(source + ",")
    else:
        assert len(m.ids) == len(m.xy) == len(set(m.ids)) > 0
        assert m.xy.shape[1] == 2 and np.isfinite(m.xy).all()


@given(st.text())
def test_any_text_as_csv_gives_meters_or_a_placement_error(text: str) -> None:
    _meters_or_named_error(lambda: _csv(text), "m.csv")


_CELLS = st.one_of(st.sampled_from(["", "nan", "inf", "-0", "1e308", "1e999", " 7 ", "x"]),
                   st.floats(allow_nan=True).map(repr), st.text(max_size=5))


@given(st.sampled_from(["x,y", "id,x,y", "lon,lat", "id,lat,lon", "Easting,Northing,id", "a,b"]),
       st.lists(st.lists(_CELLS, min_size=0, max_size=4), max_size=6))
def test_csv_shaped_text_gives_meters_or_a_placement_error(header: str,
                                                           rows: list[list[str]]) -> None:
    text = header + "\n" + "\n".join(",".join(r) for r in rows)
    _meters_or_named_error(lambda: _csv(text, allow_duplicates=True), "m.csv")


@given(st.text())
def test_any_text_as_geojson_gives_meters_or_a_placement_error(text: str) -> None:
    _meters_or_named_error(lambda: _geo(text), "m.geojson")


_JSON = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=4),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.sampled_from(["type", "coordinates", "geometry", "id",
                                                        "properties", "features", "crs"]),
                                       inner, max_size=4), max_leaves=12)


@given(st.lists(_JSON, max_size=4), st.sampled_from(["Point", "MultiPoint", 3]))
def test_geojson_shaped_documents_give_meters_or_a_placement_error(parts: list[object],
                                                                   kind: object) -> None:
    feats = [{"type": "Feature", "geometry": {"type": kind, "coordinates": p}} for p in parts]
    doc = {"type": "FeatureCollection", "features": [*feats, *parts]}
    _meters_or_named_error(lambda: _geo(json.dumps(doc), units="metres", allow_duplicates=True),
                           "m.geojson")


def test_a_huge_or_deeply_nested_document_is_a_placement_error() -> None:
    with pytest.raises(PlacementInputError, match="invalid JSON"):
        _geo("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PlacementInputError, match="invalid JSON"):
        _geo('{"type": "FeatureCollection", "features": [' + "9" * 5000 + "]}")


# ---------------------------------------------------------------- round trips


_IDS = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)
_COORD = st.floats(min_value=-1e7, max_value=1e7, allow_nan=False, allow_infinity=False)


@given(st.dictionaries(_IDS, st.tuples(_COORD, _COORD), min_size=2, max_size=20))
def test_metres_round_trip_through_csv_and_geojson(tmp_path_factory: pytest.TempPathFactory,
                                                   table: dict[str, tuple[float, float]]) -> None:
    xy = np.array(list(table.values()))
    if len(np.unique(xy, axis=0)) < len(xy) or pio.degrees_in_metres(xy):
        return  # refused by design, tested above
    meters = pio.metres_meters(xy, ids=list(table))
    out = tmp_path_factory.mktemp("rt")
    for path in (pio.write_meters_csv(out / "m.csv", meters),
                 pio.write_meters_geojson(out / "m.geojson", meters)):
        back = pio.read_meters(path)
        assert back.ids == meters.ids
        assert np.array_equal(back.xy, xy)


def test_written_plan_reads_back_with_terminals_and_distances(tmp_path: Path) -> None:
    xy = np.array([[0.0, 0.0], [100.0, 0.0], [1000.0, 0.0], [1100.0, 50.0], [1050.0, 0.0]])
    meters = pio.metres_meters(xy, ids=["a", "b", "c", "d", "e"])
    assign, sites = np.array([0, 0, 1, 1, 1]), np.array([0, 4])
    paths = pio.write_plan(tmp_path, meters, assign, sites)
    assert sorted(p.name for p in paths) == ["assignment.csv", "assignment.geojson",
                                            "terminals.csv", "terminals.geojson"]
    back = pio.read_meters(tmp_path / "assignment.csv")  # meter, x_m, y_m columns
    assert back.ids == meters.ids and np.array_equal(back.xy, xy)
    rows = (tmp_path / "terminals.csv").read_text().splitlines()
    assert rows[0] == "terminal,site_meter,x_m,y_m,meters,mean_distance_m,max_distance_m"
    assert rows[2].startswith("2,e,1050.0,0.0,3,")
    doc = json.loads((tmp_path / "assignment.geojson").read_text())
    d = {f["id"]: f["properties"] for f in doc["features"]}
    assert d["d"]["terminal"] == 2 and math.isclose(d["d"]["distance_m"], math.hypot(50, 50))
    assert doc["crs"]["properties"]["name"] == pio.LOCAL_METRES


# ---------------------------------------------------------------- lon/lat (pyproj)


def test_utm_zone_follows_the_centroid_and_the_norway_exceptions() -> None:
    assert pio.utm_epsg(120.15, 30.25) == 32651  # Hangzhou
    assert pio.utm_epsg(-58.4, -34.6) == 32721  # Buenos Aires, south
    assert pio.utm_epsg(5.3, 60.4) == 32632  # Bergen: zone 32, not 31
    assert pio.utm_epsg(15.6, 78.2) == 32633  # Svalbard
    assert pio.utm_epsg(180.0, 0.0) == 32601


def _lonlat_square(lon0: float, lat0: float, step: float = 0.01) -> str:
    pts = [(lon0 + i * step, lat0 + j * step) for i in range(3) for j in range(3)]
    return "id,lon,lat\n" + "".join(f"m{i},{a!r},{b!r}\n" for i, (a, b) in enumerate(pts))


@pytest.mark.host_only
def test_lonlat_is_projected_to_the_centroids_utm_zone_preserving_distances() -> None:
    pyproj = pytest.importorskip("pyproj")
    m = _csv(_lonlat_square(120.15, 30.25))
    assert m.crs == "EPSG:32651" and m.lonlat is not None
    geod = pyproj.Geod(ellps="WGS84")
    for i, j in [(0, 8), (1, 5), (2, 6)]:
        *_, true = geod.inv(*m.lonlat[i], *m.lonlat[j])
        planar = float(np.linalg.norm(m.xy[i] - m.xy[j]))
        assert abs(planar - true) / true < 1e-3  # UTM scale error near the meridian


@pytest.mark.host_only
def test_a_given_epsg_is_used_and_must_be_projected_metres() -> None:
    pytest.importorskip("pyproj")
    m = _csv(_lonlat_square(120.15, 30.25), epsg=32650)
    assert m.crs == "EPSG:32650"
    for code, why in [(4326, "not a projected CRS in metres"), (2, "not a known CRS")]:
        with pytest.raises(PlacementInputError, match=why):
            _csv(_lonlat_square(120.15, 30.25), epsg=code)


@pytest.mark.host_only
def test_lonlat_far_from_the_zone_meridian_warns_and_polar_data_needs_an_epsg() -> None:
    pytest.importorskip("pyproj")
    wide = "lon,lat\n100,30\n112,30\n124,31\n"
    assert any("central meridian" in w for w in _csv(wide).warnings)
    with pytest.raises(PlacementInputError, match="give --epsg"):
        _csv("lon,lat\n10,88\n11,88.5\n")
    with pytest.raises(PlacementInputError, match="180 degrees"):
        _csv("lon,lat\n-179.9,10\n179.9,10\n")


@pytest.mark.host_only
def test_lonlat_plan_is_written_as_lonlat_geojson_and_reads_back(tmp_path: Path) -> None:
    pytest.importorskip("pyproj")
    m = _csv(_lonlat_square(-3.7, 40.4))  # Madrid, zone 30
    assert m.crs == "EPSG:32630"
    assign = np.array([0] * 5 + [1] * 4)
    pio.write_plan(tmp_path, m, assign, np.array([2, 6]))
    doc = json.loads((tmp_path / "assignment.geojson").read_text())
    assert "crs" not in doc  # RFC 7946: lon/lat
    assert doc["features"][0]["geometry"]["coordinates"] == m.lonlat[0].tolist()
    back = pio.read_meters(tmp_path / "assignment.geojson")
    assert back.crs == m.crs and np.array_equal(back.xy, m.xy)
    back_csv = pio.read_meters(tmp_path / "assignment.csv")  # lon/lat preferred over x_m/y_m
    assert back_csv.lonlat is not None and np.array_equal(back_csv.xy, m.xy)


# ---------------------------------------------------------------- streamed writing


def _one_string_csv(header: list[str], rows: list[list[object]]) -> str:
    """How the files were written before streaming: every row in one list, then one string."""
    import csv
    import io

    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows([[repr(v) if isinstance(v, float) else v for v in r] for r in rows])
    return buf.getvalue()


def _one_string_plan(m: pio.Meters, assign: np.ndarray, sites: np.ndarray) -> dict[str, str]:
    """The four plan files as the one-string writer made them (its code, kept as the oracle)."""
    geo = m.lonlat is not None
    pts = m.lonlat if m.lonlat is not None else m.xy

    def coords(i: int) -> list[float]:
        c = [float(m.xy[i, 0]), float(m.xy[i, 1])]
        if m.lonlat is not None:
            c += [float(m.lonlat[i, 0]), float(m.lonlat[i, 1])]
        return c

    def point(i: int, props: dict, fid: object = None) -> dict:
        return {"type": "Feature", "id": m.ids[i] if fid is None else fid,
                "geometry": {"type": "Point", "coordinates": [float(pts[i, 0]),
                                                              float(pts[i, 1])]},
                "properties": props}

    def fc(feats: list[dict]) -> str:
        doc: dict = {"type": "FeatureCollection", "features": feats}
        if m.lonlat is None:
            doc["crs"] = pio._crs_member(m.crs)
        return json.dumps(doc, ensure_ascii=False, allow_nan=False) + "\n"

    d = np.linalg.norm(m.xy - m.xy[sites][assign], axis=1)
    load = np.bincount(np.asarray(assign, dtype=np.intp), minlength=len(sites))
    terms = []
    for t, s in enumerate(sites):
        mine = d[assign == t]
        terms.append({"terminal": t + 1, "site_meter": m.ids[int(s)], "meters": int(load[t]),
                      "mean_distance_m": float(mine.mean()) if len(mine) else 0.0,
                      "max_distance_m": float(mine.max()) if len(mine) else 0.0})
    head = ["x_m", "y_m"] + (["lon", "lat"] if geo else [])
    return {
        "terminals.csv": _one_string_csv(
            ["terminal", "site_meter", *head, "meters", "mean_distance_m", "max_distance_m"],
            [[r["terminal"], r["site_meter"], *coords(int(s)), r["meters"],
              r["mean_distance_m"], r["max_distance_m"]]
             for r, s in zip(terms, sites, strict=True)]),
        "assignment.csv": _one_string_csv(
            ["meter", *head, "terminal", "site_meter", "distance_m"],
            [[m.ids[i], *coords(i), int(assign[i]) + 1, m.ids[int(sites[assign[i]])],
              float(d[i])] for i in range(len(m.ids))]),
        "terminals.geojson": fc([point(int(s), r, r["terminal"])
                                 for r, s in zip(terms, sites, strict=True)]),
        "assignment.geojson": fc([point(i, {"terminal": int(assign[i]) + 1,
                                            "site_meter": m.ids[int(sites[assign[i]])],
                                            "distance_m": float(d[i])})
                                  for i in range(len(m.ids))]),
        "meters.csv": _one_string_csv(
            ["id", "lon", "lat"] if geo else ["id", "x_m", "y_m"],
            [[i, float(a), float(b)] for i, (a, b) in zip(m.ids, pts, strict=True)]),
        "meters.geojson": fc([point(i, {}) for i in range(len(m.ids))]),
    }


@pytest.mark.parametrize("degrees", [False, True])
def test_streamed_files_are_byte_for_byte_the_one_string_writers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, degrees: bool) -> None:
    monkeypatch.setattr(pio, "WRITE_CHUNK_ROWS", 7)  # 103 meters: 15 chunks, a short last one
    rng = np.random.default_rng(4)
    n, k = 103, 10
    xy = rng.random((n, 2)) * 5000.0
    ids = tuple(f"m{i}" if i % 9 else f'bank, "{i}"\r\nnext' for i in range(n))
    lonlat = xy / 1e5 + (120.0, 30.0) if degrees else None
    m = pio.Meters(ids, xy, "EPSG:32651" if degrees else pio.LOCAL_METRES, "t", lonlat=lonlat)
    assign = rng.integers(0, k - 1, n)  # terminal k - 1 serves nobody: 0.0 distances
    sites = np.array([int(np.flatnonzero(assign == t)[0]) for t in range(k - 1)] + [5])
    pio.write_plan(tmp_path, m, assign, sites)
    pio.write_meters_csv(tmp_path / "meters.csv", m)
    pio.write_meters_geojson(tmp_path / "meters.geojson", m)
    for name, text in _one_string_plan(m, assign, sites).items():
        assert (tmp_path / name).read_bytes() == text.encode("utf-8"), name


def test_plan_without_geojson_writes_the_csvs_only(tmp_path: Path) -> None:
    m = pio.metres_meters(np.array([[0.0, 0.0], [10.0, 0.0], [500.0, 0.0]]))
    paths = pio.write_plan(tmp_path, m, np.array([0, 0, 1]), np.array([0, 2]), geojson=False)
    assert sorted(p.name for p in paths) == ["assignment.csv", "terminals.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assignment.csv", "terminals.csv"]


def test_generated_meters_are_numbered_without_holding_every_id() -> None:
    m = pio.metres_meters(np.zeros((12, 2)) + np.arange(12)[:, None])
    ids = m.ids
    assert isinstance(ids, pio.NumberedIds) and len(ids) == 12
    plain = tuple(str(i) for i in range(1, 13))
    assert ids == plain and plain == ids and list(ids) == list(plain)
    for sl in (slice(3, 6), slice(10, 20), slice(None, None, 5), slice(None, None, -1),
               slice(-3, None), slice(8, 2, -2)):
        assert ids[sl] == plain[sl]
    assert (ids[0], ids[-1]) == ("1", "12")
    with pytest.raises(IndexError):
        ids[12]
    assert ids != plain[:-1] and ids == pio.NumberedIds(12) and ids != pio.NumberedIds(11)
