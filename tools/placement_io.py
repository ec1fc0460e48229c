"""Meters in, plans out: CSV and GeoJSON files for ``edgekey plan``.

The placement core works in metres on a plane (eq. 1 is Euclidean), so
longitude/latitude is projected here, with PROJ (pyproj), to the UTM zone
of the data's centroid or to a projected CRS the user names by EPSG code.
A meter file is untrusted input: every problem is a ``PlacementInputError``
naming the file, the row (CSV: the spreadsheet row, header = row 1;
GeoJSON: the index in ``features``) and the column.

pyproj is imported only when degrees must be projected, so parsing metres
needs numpy alone and runs on the terminal's interpreter too.

Written files: terminals and assignment as CSV and GeoJSON. Sites are
meters (graph medoids, eq. 3), so their longitude/latitude is the meter's
own as read, never an inverse projection. GeoJSON is RFC 7946 lon/lat when
the input was lon/lat; for metre input it carries metres and an old-style
(GeoJSON 2008) ``crs`` member saying which plane, which this reader honours.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO, overload

import numpy as np

from agent.placement.metrics import loads

Units = Literal["auto", "metres", "degrees"]
Format = Literal["csv", "geojson"]

# Header names recognised case-insensitively, first match wins. When a file
# has both lon/lat and x/y (our own outputs do), lon/lat is used: it is
# absolute, while the x/y plane's CRS is not in a CSV.
LON_NAMES = ("lon", "lng", "long", "longitude")
LAT_NAMES = ("lat", "latitude")
X_NAMES = ("x", "x_m", "easting", "east")
Y_NAMES = ("y", "y_m", "northing", "north")
ID_NAMES = ("id", "meter", "meter_id", "meterid", "name")

# Metres declared, yet n >= 3 meters all inside longitude/latitude ranges and
# spanning less than sqrt(n) metres, i.e. under about a square metre of ground
# per meter: distinct meters cannot stand that close (one building's bank shares
# one coordinate), while a district in degrees spans well under 1 "metre".
DEGREES_IN_METRES_M_PER_SQRT_N = 1.0

# UTM is defined between 80 S and 84 N; past 6 degrees from the zone's central
# meridian its scale error passes about 0.5 % (k0 (1 + (dlon cos lat)^2 / 2)).
UTM_LAT_RANGE = (-80.0, 84.0)
UTM_WARN_DEG_FROM_MERIDIAN = 6.0

LOCAL_METRES = "edgekey:local-metres"


class PlacementInputError(ValueError):
    """A meter file (or text) that cannot be planned: says where and why."""

    def __init__(self, source: str, reason: str, *, row: int | None = None,
                 column: str | None = None, row_label: str = "row") -> None:
        self.source, self.reason, self.row, self.column = source, reason, row, column
        where = [source]
        if row is not None:
            where.append(f"{row_label} {row}")
        if column is not None:
            where.append(f"column {column!r}" if row_label == "row" else column)
        super().__init__(f"{', '.join(where)}: {reason}")


class NumberedIds(Sequence[str]):
    """The ids "1".."n" of generated meters, each made when asked for.

    A tuple of them costs about 65 bytes a meter (650 MB at 10^7); this costs
    nothing, and equals any sequence of the same strings.
    """

    __slots__ = ("_n",)

    def __init__(self, n: int) -> None:
        self._n = n

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[str, ...]: ...

    def __getitem__(self, i: int | slice) -> str | tuple[str, ...]:
        if isinstance(i, slice):
            start, stop, step = i.indices(self._n)
            return tuple(map(str, range(start + 1, stop + 1, step)))
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexError(f"meter {i} of {self._n}")
        return str(j + 1)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NumberedIds):
            return self._n == other._n
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == self._n and all(a == b for a, b in zip(self, other,
                                                                         strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"NumberedIds({self._n})"


@dataclass(frozen=True)
class Meters:
    """Meters ready to plan: ids, metres in the planning plane, and what they were read as."""

    ids: Sequence[str]  # a tuple as read, or NumberedIds for generated meters
    xy: np.ndarray  # (n, 2) metres in the planning CRS
    crs: str  # "EPSG:32651", or LOCAL_METRES for metres of unknown CRS
    source: str
    lonlat: np.ndarray | None = None  # (n, 2) as read, when the input was degrees
    duplicates: int = 0  # meters sharing an earlier meter's coordinates (only with allow)
    warnings: tuple[str, ...] = field(default=())

    @property
    def epsg(self) -> int | None:
        m = re.fullmatch(r"EPSG:(\d+)", self.crs)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class _Table:
    """Coordinates as parsed, before units are checked and degrees projected."""

    ids: list[str]
    coords: np.ndarray  # (n, 2) first/second coordinate as read
    rows: list[int]  # row (CSV) or feature index (GeoJSON) of each meter
    columns: tuple[str, str]
    units: Literal["metres", "degrees"]
    row_label: str
    crs_epsg: int | None = None  # a GeoJSON crs member's EPSG code


# ---------------------------------------------------------------- reading


def read_meters(path: str | Path, *, fmt: Format | None = None, units: Units = "auto",
                x_col: str | None = None, y_col: str | None = None,
                id_col: str | None = None, epsg: int | None = None,
                allow_duplicates: bool = False) -> Meters:
    """Meters from a CSV or GeoJSON file (format from ``fmt`` or the file's extension)."""
    path = Path(path)
    source = str(path)
    if fmt is None:
        suffix = path.suffix.lower()
        if suffix == ".csv":
            fmt = "csv"
        elif suffix in (".geojson", ".json"):
            fmt = "geojson"
        else:
            raise PlacementInputError(source, f"cannot tell the format from {suffix or 'no'} "
                                              "extension; use .csv or .geojson, or give --format")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PlacementInputError(source, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PlacementInputError(source, f"not UTF-8 text (byte {exc.start})") from None
    return parse_meters(text, fmt, source=source, units=units, x_col=x_col, y_col=y_col,
                        id_col=id_col, epsg=epsg, allow_duplicates=allow_duplicates)


def parse_meters(text: str, fmt: Format, *, source: str = "<text>", units: Units = "auto",
                 x_col: str | None = None, y_col: str | None = None,
                 id_col: str | None = None, epsg: int | None = None,
                 allow_duplicates: bool = False) -> Meters:
    """Meters from CSV or GeoJSON text; anything wrong is a PlacementInputError."""
    if fmt == "csv":
        table = _parse_csv(text, source, units, x_col, y_col, id_col)
    elif fmt == "geojson":
        if x_col or y_col or id_col:
            raise PlacementInputError(source, "--x-col/--y-col/--id-col apply to CSV only")
        table = _parse_geojson(text, source, units)
    else:
        raise PlacementInputError(source, f"unknown format {fmt!r} (csv or geojson)")
    _check_ids(table, source)
    _check_units(table, source)
    dup = _check_duplicates(table, source, allow_duplicates)
    return _project(table, source, epsg, dup)


def _cell_float(text: str, source: str, row: int, column: str) -> float:
    s = text.strip()
    if not s:
        raise PlacementInputError(source, "empty, a number is needed", row=row, column=column)
    try:
        v = float(s)
    except ValueError:
        raise PlacementInputError(source, f"{_short(s)} is not a number",
                                  row=row, column=column) from None
    if not math.isfinite(v):
        raise PlacementInputError(source, f"{_short(s)} is not a finite number",
                                  row=row, column=column)
    return v


def _short(s: str, limit: int = 40) -> str:
    return repr(s if len(s) <= limit else s[:limit] + "...")


def _pick(header: list[str], wanted: str | None, names: Sequence[str], source: str,
          what: str) -> int | None:
    low = [h.strip().lower() for h in header]
    if wanted is not None:
        if wanted in header:
            return header.index(wanted)
        if wanted.strip().lower() in low:
            return low.index(wanted.strip().lower())
        raise PlacementInputError(source, f"no {what} column {wanted!r}; the header has "
                                          f"{', '.join(map(repr, header))}", row=1)
    for name in names:
        if name in low:
            return low.index(name)
    return None


def _parse_csv(text: str, source: str, units: Units, x_col: str | None, y_col: str | None,
               id_col: str | None) -> _Table:
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        while header is not None and not any(c.strip() for c in header):
            header = next(reader, None)  # blank lines before the header
        if header is None:
            raise PlacementInputError(source, "empty file: no header and no meters")
        header_row = reader.line_num
        ix, iy, kind = _coordinate_columns(header, source, units, x_col, y_col)
        iid = _pick(header, id_col, ID_NAMES, source, "id")
        ids: list[str] = []
        coords: list[tuple[float, float]] = []
        rows: list[int] = []
        for record in reader:
            row = reader.line_num
            if not any(c.strip() for c in record):
                continue  # blank line
            need = max(ix, iy, -1 if iid is None else iid)
            if len(record) <= need:
                raise PlacementInputError(source, f"{len(record)} field(s), the header has "
                                                  f"{len(header)}", row=row)
            a = _cell_float(record[ix], source, row, header[ix])
            b = _cell_float(record[iy], source, row, header[iy])
            coords.append((a, b))
            rows.append(row)
            ids.append(str(len(ids) + 1) if iid is None else record[iid])
    except csv.Error as exc:
        raise PlacementInputError(source, f"malformed CSV: {exc}") from None
    if not coords:
        raise PlacementInputError(source, "no meters: the header (row "
                                          f"{header_row}) has no data rows after it")
    return _Table(ids, np.array(coords, dtype=np.float64), rows,
                  (header[ix], header[iy]), kind, "row")


def _coordinate_columns(header: list[str], source: str, units: Units, x_col: str | None,
                        y_col: str | None) -> tuple[int, int, Literal["metres", "degrees"]]:
    """Which two columns hold the coordinates, and in which units."""
    if (x_col is None) != (y_col is None):
        raise PlacementInputError(source, "give both --x-col and --y-col, or neither")
    if x_col is not None and y_col is not None:
        ix = _pick(header, x_col, (), source, "x")
        iy = _pick(header, y_col, (), source, "y")
        assert ix is not None and iy is not None
        if units == "auto":
            low = (header[ix].strip().lower(), header[iy].strip().lower())
            if low[0] in LON_NAMES and low[1] in LAT_NAMES:
                return ix, iy, "degrees"
            if low[0] in X_NAMES and low[1] in Y_NAMES:
                return ix, iy, "metres"
            raise PlacementInputError(source, f"cannot tell whether {header[ix]!r}/"
                                              f"{header[iy]!r} are metres or degrees; "
                                              "give --units", row=1)
        return ix, iy, units
    ilon = _pick(header, None, LON_NAMES, source, "")
    ilat = _pick(header, None, LAT_NAMES, source, "")
    ixm = _pick(header, None, X_NAMES, source, "")
    iym = _pick(header, None, Y_NAMES, source, "")
    if ilon is not None and ilat is not None and units != "metres":
        return ilon, ilat, "degrees"
    if ixm is not None and iym is not None and units != "degrees":
        return ixm, iym, "metres"
    if ilon is not None and ilat is not None:  # metres declared on lon/lat columns: user knows
        return ilon, ilat, "metres"
    if ixm is not None and iym is not None:
        return ixm, iym, "degrees"
    raise PlacementInputError(
        source, "no coordinate columns: expected lon/lat (" + "/".join(LON_NAMES) + ", "
        + "/".join(LAT_NAMES) + ") or x/y (" + "/".join(X_NAMES) + ", " + "/".join(Y_NAMES)
        + f"); the header has {', '.join(map(repr, header))}; or give --x-col/--y-col", row=1)


def _parse_geojson(text: str, source: str, units: Units) -> _Table:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlacementInputError(source, f"invalid JSON: {exc.msg}", row=exc.lineno,
                                  column=f"character {exc.colno}", row_label="line") from None
    except RecursionError:
        raise PlacementInputError(source, "invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer past Python's 4300-digit limit
        raise PlacementInputError(source, f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection":
        kind = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        raise PlacementInputError(source, f"expected a GeoJSON FeatureCollection, got {kind!r}")
    features = doc.get("features")
    if not isinstance(features, list):
        raise PlacementInputError(source, "FeatureCollection has no 'features' list")
    crs_epsg, crs_units = _geojson_crs(doc.get("crs"), source)
    kind = units if units != "auto" else crs_units
    names = ("coordinates[0] (longitude)", "coordinates[1] (latitude)") if kind == "degrees" \
        else ("coordinates[0] (x)", "coordinates[1] (y)")
    ids: list[str] = []
    coords: list[tuple[float, float]] = []
    rows: list[int] = []
    for i, feat in enumerate(features):
        def bad(reason: str, column: str | None = None, i: int = i) -> PlacementInputError:
            return PlacementInputError(source, reason, row=i, column=column, row_label="feature")
        if not isinstance(feat, dict) or feat.get("type") != "Feature":
            raise bad("not a GeoJSON Feature")
        geom = feat.get("geometry")
        if not isinstance(geom, dict) or geom.get("type") != "Point":
            got = geom.get("type") if isinstance(geom, dict) else geom
            raise bad(f"geometry must be a Point, got {_short(str(got))}", "geometry")
        pos = geom.get("coordinates")
        if not isinstance(pos, list) or len(pos) not in (2, 3):
            raise bad("a Point needs [x, y] or [x, y, z] coordinates", "coordinates")
        pair = []
        for j in (0, 1):
            v = pos[j]
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise bad(f"{_short(json.dumps(v))} is not a number", names[j])
            try:
                f = float(v)
            except OverflowError:
                f = math.inf
            if not math.isfinite(f):
                raise bad(f"{v!r} is not a finite number", names[j])
            pair.append(f)
        coords.append((pair[0], pair[1]))
        rows.append(i)
        ids.append(_feature_id(feat, len(ids)))
    if not coords:
        raise PlacementInputError(source, "no meters: the FeatureCollection has no features")
    return _Table(ids, np.array(coords, dtype=np.float64), rows, names, kind, "feature",
                  crs_epsg)


def _geojson_crs(crs: Any, source: str) -> tuple[int | None, Literal["metres", "degrees"]]:
    """RFC 7946 says lon/lat; a GeoJSON 2008 ``crs`` member may name another plane."""
    if crs is None:
        return None, "degrees"
    name = crs.get("properties", {}).get("name") if isinstance(crs, dict) else None
    if not isinstance(name, str):
        raise PlacementInputError(source, "the 'crs' member has no properties.name")
    if name == LOCAL_METRES:
        return None, "metres"
    if re.search(r"CRS:?84$", name):
        return None, "degrees"
    m = re.search(r"EPSG:+(\d+)$", name)
    if m is None:
        raise PlacementInputError(source, f"unknown crs name {_short(name)}; give --units "
                                          "(and --epsg)")
    code = int(m.group(1))
    return code, "degrees" if code == 4326 else "metres"


def _feature_id(feat: dict[str, Any], index: int) -> str:
    if isinstance(feat.get("id"), str | int) and not isinstance(feat.get("id"), bool):
        return str(feat["id"])
    props = feat.get("properties")
    if isinstance(props, dict):
        for name in ID_NAMES:
            v = props.get(name)
            if isinstance(v, str | int) and not isinstance(v, bool):
                return str(v)
    return str(index + 1)


# ---------------------------------------------------------------- checks


def _check_ids(t: _Table, source: str) -> None:
    seen: dict[str, int] = {}
    for meter_id, row in zip(t.ids, t.rows, strict=True):
        if meter_id == "":
            raise PlacementInputError(source, "empty meter id", row=row, row_label=t.row_label,
                                      column="id" if t.row_label == "row" else None)
        if meter_id in seen:
            raise PlacementInputError(source, f"meter id {_short(meter_id)} repeats "
                                              f"{t.row_label} {seen[meter_id]}",
                                      row=row, row_label=t.row_label)
        seen[meter_id] = row


def _check_units(t: _Table, source: str) -> None:
    """Catch swapped lon/lat, metres declared as degrees and degrees declared as metres."""
    a, b = t.coords[:, 0], t.coords[:, 1]

    def at(i: int, col: int, reason: str) -> PlacementInputError:
        return PlacementInputError(source, reason, row=t.rows[i], column=t.columns[col],
                                   row_label=t.row_label)

    if t.units == "degrees":
        bad_lat = np.flatnonzero(np.abs(b) > 90)
        if len(bad_lat):
            i = int(bad_lat[0])
            if (np.abs(b) <= 180).all() and (np.abs(a) <= 90).all():
                raise at(i, 1, f"latitude {float(b[i])!r} is outside [-90, 90]: longitude and "
                               "latitude look swapped (give --x-col LON --y-col LAT)")
            raise at(i, 1, f"latitude {float(b[i])!r} is outside [-90, 90]: these look like "
                           "metres, not degrees (give --units metres)")
        bad_lon = np.flatnonzero(np.abs(a) > 180)
        if len(bad_lon):
            i = int(bad_lon[0])
            raise at(i, 0, f"longitude {float(a[i])!r} is outside [-180, 180]: these look like "
                           "metres, not degrees (give --units metres)")
        return
    if degrees_in_metres(t.coords):
        span = float(np.hypot(np.ptp(a), np.ptp(b)))
        raise at(0, 0, f"all {len(a)} meters lie within {span:.3g} m of each other and "
                       "inside longitude/latitude ranges: these look like degrees, not "
                       "metres (give --units degrees)")


def degrees_in_metres(coords: np.ndarray) -> bool:
    """True when coordinates declared as metres are surely degrees (see the constant)."""
    a, b = coords[:, 0], coords[:, 1]
    if len(a) < 3 or not ((np.abs(a) <= 180).all() and (np.abs(b) <= 90).all()):
        return False
    span = float(np.hypot(np.ptp(a), np.ptp(b)))
    return span < DEGREES_IN_METRES_M_PER_SQRT_N * math.sqrt(len(a))


def _check_duplicates(t: _Table, source: str, allow: bool) -> int:
    """Meters at one spot are refused unless allowed (one building's meter bank)."""
    _, first, inverse = np.unique(t.coords, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    dup = np.flatnonzero(first[inverse] != np.arange(len(t.coords)))
    if len(dup) and not allow:
        i = int(dup[0])
        j = int(first[inverse[i]])
        x, y = t.coords[i]
        raise PlacementInputError(
            source, f"same coordinates ({float(x)!r}, {float(y)!r}) as {t.row_label} {t.rows[j]}; "
                    f"{len(dup)} meter(s) repeat an earlier site. Fix the file, or pass "
                    "--allow-duplicates if meters share a building",
            row=t.rows[i], row_label=t.row_label)
    return len(dup)


# ---------------------------------------------------------------- projection


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS 84 UTM zone holding (lon, lat), with the Norway/Svalbard exceptions."""
    zone = int((lon + 180.0) // 6.0) % 60 + 1
    if 56.0 <= lat < 64.0 and 3.0 <= lon < 12.0:
        zone = 32
    elif 72.0 <= lat < 84.0 and 0.0 <= lon < 42.0:
        zone = 31 if lon < 9 else 33 if lon < 21 else 35 if lon < 33 else 37
    return (32600 if lat >= 0 else 32700) + zone


def _projected_crs(epsg: int, source: str) -> Any:
    try:
        from pyproj import CRS
        from pyproj.exceptions import CRSError
    except ImportError:
        raise PlacementInputError(source, "projecting needs pyproj (the desk extra: "
                                          "pip install -e '.[desk]')") from None
    try:
        crs = CRS.from_epsg(epsg)
    except CRSError:
        raise PlacementInputError(source, f"EPSG:{epsg} is not a known CRS") from None
    unit = crs.axis_info[0].unit_name if crs.axis_info else ""
    if not crs.is_projected or unit not in ("metre", "meter"):
        raise PlacementInputError(source, f"EPSG:{epsg} ({crs.name}) is not a projected CRS in "
                                          "metres; the planner needs one (e.g. a UTM zone)")
    return crs


def _project(t: _Table, source: str, epsg: int | None, duplicates: int) -> Meters:
    ids = tuple(t.ids)
    if t.units == "metres":
        code = epsg if epsg is not None else t.crs_epsg
        if code is None:
            return Meters(ids, t.coords, LOCAL_METRES, source, duplicates=duplicates)
        _projected_crs(code, source)
        return Meters(ids, t.coords, f"EPSG:{code}", source, duplicates=duplicates)
    lon, lat = t.coords[:, 0], t.coords[:, 1]
    if np.ptp(lon) > 180:
        raise PlacementInputError(source, "the meters span more than 180 degrees of longitude "
                                          "(across the antimeridian?); give --epsg")
    warnings: list[str] = []
    if epsg is None:
        clon, clat = float(lon.mean()), float(lat.mean())
        if not UTM_LAT_RANGE[0] <= clat <= UTM_LAT_RANGE[1]:
            raise PlacementInputError(source, f"centroid latitude {clat:.3f} is outside UTM's "
                                              "-80..84; give --epsg (e.g. 32661 / 32761, UPS)")
        epsg = utm_epsg(clon, clat)
        zone = epsg % 100
        meridian = -183.0 + 6.0 * zone
        far = float(np.abs(lon - meridian).max())
        if far > UTM_WARN_DEG_FROM_MERIDIAN:
            warnings.append(f"meters reach {far:.1f} degrees from UTM zone {zone}'s central "
                            "meridian; distances there are off by more than 0.5 %: "
                            "plan by region or give --epsg")
    crs = _projected_crs(epsg, source)
    from pyproj import Transformer

    tr = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    try:
        x, y = tr.transform(lon, lat, errcheck=True)
    except Exception as exc:  # pyproj raises ProjError, a RuntimeError
        raise PlacementInputError(source, f"cannot project to EPSG:{epsg}: {exc}") from None
    xy = np.column_stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)])
    bad = np.flatnonzero(~np.isfinite(xy).all(axis=1))
    if len(bad):
        i = int(bad[0])
        raise PlacementInputError(source, f"({float(lon[i])!r}, {float(lat[i])!r}) has no "
                                          f"coordinates in EPSG:{epsg}",
                                  row=t.rows[i], row_label=t.row_label)
    return Meters(ids, xy, f"EPSG:{epsg}", source, lonlat=t.coords.copy(),
                  duplicates=duplicates, warnings=tuple(warnings))


def project_lonlat(lonlat: np.ndarray, epsg: int) -> np.ndarray:
    """(n, 2) lon/lat degrees to metres in ``epsg`` (for generators and tests)."""
    from pyproj import Transformer

    tr = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    x, y = tr.transform(lonlat[:, 0], lonlat[:, 1])
    return np.column_stack([x, y]).astype(np.float64)


def unproject(xy: np.ndarray, epsg: int) -> np.ndarray:
    """(n, 2) metres in ``epsg`` to lon/lat degrees."""
    from pyproj import Transformer

    tr = Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)
    lon, lat = tr.transform(xy[:, 0], xy[:, 1])
    return np.column_stack([lon, lat]).astype(np.float64)


# ---------------------------------------------------------------- writing

# Rows per chunk when a per-meter file is streamed. A chunk of GeoJSON features
# (nested dicts, the heaviest rows) takes about 60 MB at this size: edgekey plan
# on 10^6 meters peaks at 240 MiB with --geojson always, 179 MiB without (311 MiB
# with 50 000-row chunks). Before streaming, every row of a file was held as
# boxed values and then the whole text as one string: 1.7 GB peak at 10^6.
WRITE_CHUNK_ROWS = 20_000


def _crs_member(crs: str) -> dict[str, Any]:
    m = re.fullmatch(r"EPSG:(\d+)", crs)
    name = f"urn:ogc:def:crs:EPSG::{m.group(1)}" if m else LOCAL_METRES
    return {"type": "name", "properties": {"name": name}}


def _open(path: Path) -> TextIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("w", encoding="utf-8", newline="")


def _write_csv(path: Path, header: Sequence[str], chunks: Iterable[Iterable[Sequence[Any]]]
               ) -> Path:
    """A CSV written chunk by chunk; \\r\\n ends rows, so ids holding \\r or \\n get quoted.

    Floats arrive as Python floats, which csv writes as ``repr``: the shortest
    text that reads back to the same double.
    """
    with _open(path) as f:
        w = csv.writer(f)
        w.writerow(header)
        for rows in chunks:
            w.writerows(rows)
    return path


def _spans(n: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, WRITE_CHUNK_ROWS):
        yield lo, min(n, lo + WRITE_CHUNK_ROWS)


def _coords(meters: Meters) -> np.ndarray:
    """The coordinates as read: lon/lat for degree input, else the planning plane's metres."""
    return meters.lonlat if meters.lonlat is not None else meters.xy


def write_meters_csv(path: str | Path, meters: Meters) -> Path:
    """The meters as read: ``id,lon,lat`` for degree input, ``id,x_m,y_m`` otherwise."""
    pts = _coords(meters)
    header = ["id", "lon", "lat"] if meters.lonlat is not None else ["id", "x_m", "y_m"]
    chunks = (zip(meters.ids[lo:hi], pts[lo:hi, 0].tolist(), pts[lo:hi, 1].tolist(),
                  strict=True) for lo, hi in _spans(len(meters.ids)))
    return _write_csv(Path(path), header, chunks)


def _write_features(path: Path, meters: Meters,
                    chunks: Iterable[list[dict[str, Any]]]) -> Path:
    """A FeatureCollection written chunk by chunk, byte for byte what one json.dumps gives."""
    with _open(path) as f:
        f.write('{"type": "FeatureCollection", "features": [')
        first = True
        for feats in chunks:
            if not feats:
                continue
            text = json.dumps(feats, ensure_ascii=False, allow_nan=False)[1:-1]
            f.write(text if first else ", " + text)
            first = False
        f.write("]")
        if meters.lonlat is None:
            f.write(', "crs": ' + json.dumps(_crs_member(meters.crs), ensure_ascii=False))
        f.write("}\n")
    return path


def _feature(feature_id: str | int, x: float, y: float, props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "id": feature_id,
            "geometry": {"type": "Point", "coordinates": [x, y]}, "properties": props}


def write_meters_geojson(path: str | Path, meters: Meters) -> Path:
    """The meters as Point features (lon/lat for degree input, else metres with a crs member)."""
    pts = _coords(meters)
    chunks = ([_feature(i, x, y, {}) for i, x, y in zip(
        meters.ids[lo:hi], pts[lo:hi, 0].tolist(), pts[lo:hi, 1].tolist(), strict=True)]
        for lo, hi in _spans(len(meters.ids)))
    return _write_features(Path(path), meters, chunks)


def _terminal_stats(assign: np.ndarray, d: np.ndarray, k: int
                    ) -> tuple[np.ndarray, list[float], list[float]]:
    """Meters, mean and max distance per terminal.

    One stable sort instead of a mask per terminal (n k work: hours at 10^6
    meters); each group keeps the meters' order, so its mean is the same
    float the mask gave.
    """
    load = loads(assign, k)
    order = np.argsort(assign, kind="stable")
    ds = d[order]
    del order
    ends = np.cumsum(load).tolist()
    means, maxes = [], []
    lo = 0
    for hi in ends:
        mine = ds[lo:hi]
        means.append(float(mine.mean()) if hi > lo else 0.0)
        maxes.append(float(mine.max()) if hi > lo else 0.0)
        lo = hi
    return load, means, maxes


def write_plan(out_dir: str | Path, meters: Meters, assign: np.ndarray,
               sites: np.ndarray, *, geojson: bool = True) -> list[Path]:
    """terminals.csv and assignment.csv, plus their .geojson twins when ``geojson``.

    ``assign[i]`` is meter i's terminal (0-based, written 1-based), ``sites[t]``
    the meter index where terminal t stands (its medoid). Per-meter files are
    streamed in chunks of WRITE_CHUNK_ROWS rows.
    """
    out = Path(out_dir)
    assign = np.asarray(assign, dtype=np.int64)
    sites = np.asarray(sites, dtype=np.int64)
    ids, xy, lonlat = meters.ids, meters.xy, meters.lonlat
    coord_head = ["x_m", "y_m"] + (["lon", "lat"] if lonlat is not None else [])

    def coord_cols(idx: np.ndarray | slice) -> list[list[float]]:
        cols = [xy[idx, 0].tolist(), xy[idx, 1].tolist()]
        if lonlat is not None:
            cols += [lonlat[idx, 0].tolist(), lonlat[idx, 1].tolist()]
        return cols

    d = np.empty(len(assign))
    for lo, hi in _spans(len(assign)):  # by chunks: the whole-array temporaries are 56 B/meter
        d[lo:hi] = np.linalg.norm(xy[lo:hi] - xy[sites[assign[lo:hi]]], axis=1)
    load, means, maxes = _terminal_stats(assign, d, len(sites))
    site_ids = [ids[s] for s in sites.tolist()]
    numbers = list(range(1, len(sites) + 1))
    t_head = ["terminal", "site_meter", *coord_head, "meters", "mean_distance_m",
              "max_distance_m"]
    t_rows = list(zip(numbers, site_ids, *coord_cols(sites), load.tolist(), means, maxes,
                      strict=True))

    def a_chunks() -> Iterator[Iterable[Sequence[Any]]]:
        for lo, hi in _spans(len(ids)):
            part = assign[lo:hi]
            yield zip(ids[lo:hi], *coord_cols(slice(lo, hi)), (part + 1).tolist(),
                      [site_ids[t] for t in part.tolist()], d[lo:hi].tolist(), strict=True)

    a_head = ["meter", *coord_head, "terminal", "site_meter", "distance_m"]
    paths = [_write_csv(out / "terminals.csv", t_head, [t_rows]),
             _write_csv(out / "assignment.csv", a_head, a_chunks())]
    if not geojson:
        return paths
    pts = _coords(meters)
    t_feats = [_feature(t, x, y, {"terminal": t, "site_meter": s, "meters": m,
                                  "mean_distance_m": mean, "max_distance_m": mx})
               for t, s, x, y, m, mean, mx in zip(numbers, site_ids, pts[sites, 0].tolist(),
                                                  pts[sites, 1].tolist(), load.tolist(),
                                                  means, maxes, strict=True)]

    def a_feats() -> Iterator[list[dict[str, Any]]]:
        for lo, hi in _spans(len(ids)):
            part = assign[lo:hi]
            yield [_feature(i, x, y, {"terminal": t + 1, "site_meter": site_ids[t],
                                      "distance_m": dist})
                   for i, x, y, t, dist in zip(ids[lo:hi], pts[lo:hi, 0].tolist(),
                                               pts[lo:hi, 1].tolist(), part.tolist(),
                                               d[lo:hi].tolist(), strict=True)]

    paths.append(_write_features(out / "terminals.geojson", meters, [t_feats]))
    paths.append(_write_features(out / "assignment.geojson", meters, a_feats()))
    return paths


def metres_meters(xy: np.ndarray, *, ids: Sequence[str] | None = None,
                  source: str = "<generated>", crs: str = LOCAL_METRES) -> Meters:
    """Meters from an array already in metres (the generator's output)."""
    pts = np.asarray(xy, dtype=np.float64)
    names = tuple(ids) if ids is not None else NumberedIds(len(pts))
    return Meters(names, pts, crs, source)
