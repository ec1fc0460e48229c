"""Real distribution grids as meter layouts: where SimBench's and IEEE's loads sit.

    .venv/bin/python -m tools.grids export    # regenerate bench/grids/ (the grids extra)

Synthetic layouts (tools.meters_gen) only show how the planner does on the
shapes we imagined; these are grids someone drew from real feeders. Each
load of a grid is one meter (SimBench LV: a household connection; SimBench
MV: an MV/LV substation or an MV customer; IEEE European LV: a household),
at its bus's geodata. The committed CSVs (``id,x_m,y_m``, metres from the
grid's own min corner) are what the benches and tests read: ``load`` needs
the standard library and numpy only, never simbench or pandapower, which
``export`` alone imports.

``HELD_OUT`` grids are kept out of planner tuning: look at them only to
check a change chosen on the others.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

DIR = Path(__file__).resolve().parent.parent / "bench" / "grids"
HEADER = ("id", "x_m", "y_m")
DECIMALS = 2  # 0.01 m: far below the sources' own precision (see SOURCES.md)


@dataclass(frozen=True)
class Grid:
    package: str  # "simbench" or "pandapower"
    code: str  # SimBench code, or the pandapower.networks function
    level: str  # what one load is, for SOURCES.md


GRIDS: dict[str, Grid] = {
    "lv-rural2": Grid("simbench", "1-LV-rural2--0-sw", "LV household connection"),
    "lv-rural3": Grid("simbench", "1-LV-rural3--0-sw", "LV household connection"),
    "lv-semiurb5": Grid("simbench", "1-LV-semiurb5--0-sw", "LV household connection"),
    "lv-urban6": Grid("simbench", "1-LV-urban6--0-sw", "LV household connection"),
    "mv-semiurb": Grid("simbench", "1-MV-semiurb--0-sw",
                       "MV connection (MV/LV substation or MV customer)"),
    "mv-urban": Grid("simbench", "1-MV-urban--0-sw",
                     "MV connection (MV/LV substation or MV customer)"),
    "ieee-eu-lv": Grid("pandapower", "ieee_european_lv_asymmetric",
                       "LV household connection (single-phase load)"),
}
NAMES: tuple[str, ...] = tuple(GRIDS)
# Chosen before any planner ran on them: one SimBench LV grid and the one grid from
# another source, so a tuning that only fits SimBench's drawing style shows.
HELD_OUT: tuple[str, ...] = ("lv-semiurb5", "ieee-eu-lv")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class GridFileError(ValueError):
    """A grid CSV that is not ``id,x_m,y_m`` with finite numbers: one line naming file and row."""


# ---------------------------------------------------------------- reading


def read(path: Path) -> tuple[list[str], np.ndarray]:
    """Ids and (n, 2) float64 metres of one grid CSV; row numbers count the header as row 1."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise GridFileError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise GridFileError(f"{path}: not UTF-8 text (byte {e.start}, line {line})") from None
    ids: list[str] = []
    xy: list[tuple[float, float]] = []
    seen: dict[str, int] = {}
    row = 0
    try:
        for row, rec in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
            if row == 1:
                if tuple(c.strip() for c in rec) != HEADER:
                    raise GridFileError(f"{path} row 1: header must be {','.join(HEADER)}, "
                                        f"got {_show(','.join(rec))}")
                continue
            if len(rec) != len(HEADER):
                raise GridFileError(f"{path} row {row}: {len(rec)} fields, want {len(HEADER)}")
            meter = rec[0].strip()
            if not meter:
                raise GridFileError(f"{path} row {row}: empty id")
            if meter in seen:
                raise GridFileError(f"{path} row {row}: id {_show(meter)} already on row "
                                    f"{seen[meter]}")
            seen[meter] = row
            ids.append(meter)
            xy.append((_number(path, row, "x_m", rec[1]), _number(path, row, "y_m", rec[2])))
    except csv.Error as e:
        raise GridFileError(f"{path} row {row + 1}: not CSV ({e})") from None
    if row == 0:
        raise GridFileError(f"{path}: empty, no header")
    if not ids:
        raise GridFileError(f"{path}: header only, no meters")
    return ids, np.array(xy, dtype=np.float64).reshape(-1, 2)


def _number(path: Path, row: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise GridFileError(f"{path} row {row}: {column} {_show(text)} is not a number") from None
    if not math.isfinite(value):
        raise GridFileError(f"{path} row {row}: {column} {_show(text)} is not finite")
    return value


def _show(text: str, limit: int = 40) -> str:
    """A field as one short line (repr escapes newlines and control bytes)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def path_of(name: str, root: Path = DIR) -> Path:
    if not _NAME.fullmatch(name):
        raise GridFileError(f"grid name {name!r}: letters, digits, '.', '_', '-' only")
    return Path(root) / f"{name}.csv"


def load(name: str, root: Path = DIR) -> np.ndarray:
    """The (n, 2) float64 meter positions in metres of grid ``name`` (one of ``NAMES``)."""
    path = path_of(name, root)
    if not path.is_file():
        raise GridFileError(f"{path}: no such grid file (grids: {', '.join(NAMES)})")
    return read(path)[1]


def load_ids(name: str, root: Path = DIR) -> list[str]:
    """The meter ids of grid ``name``, in the order ``load`` gives their positions."""
    return read(path_of(name, root))[0]


# ---------------------------------------------------------------- export (needs simbench)


def _lonlat_or_xy(geo: Any) -> tuple[float, float]:
    """A bus's point from pandapower >= 3's GeoJSON string (``net.bus.geo``)."""
    point = json.loads(geo) if isinstance(geo, str) else geo
    if not isinstance(point, dict) or point.get("type") != "Point":
        raise ValueError(f"bus geodata {geo!r} is not a GeoJSON Point")
    x, y = point["coordinates"][:2]
    return float(x), float(y)


def _bus_points(net: Any, buses: list[int]) -> np.ndarray:
    """Coordinates of ``buses`` from either pandapower layout (``bus.geo`` or ``bus_geodata``)."""
    if "geo" in net.bus.columns:
        geo = net.bus["geo"]
        missing = [b for b in buses if not isinstance(geo.at[b], str | dict)]
        if missing:
            raise ValueError(f"buses without geodata: {missing[:5]}")
        return np.array([_lonlat_or_xy(geo.at[b]) for b in buses], dtype=np.float64)
    table = net.bus_geodata  # pandapower < 3
    missing = [b for b in buses if b not in table.index]
    if missing:
        raise ValueError(f"buses without geodata: {missing[:5]}")
    return table.loc[buses, ["x", "y"]].to_numpy(dtype=np.float64)


def extract(name: str) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Ids, metres from the min corner (sorted by id) and facts for SOURCES.md of one grid."""
    grid = GRIDS[name]
    if grid.package == "simbench":
        import simbench

        net = simbench.get_simbench_net(grid.code)
        loads = net.load
        version = f"simbench {metadata.version('simbench')}"
    else:
        import pandapower.networks as pn

        net = getattr(pn, grid.code)()
        loads = net.asymmetric_load if len(net.asymmetric_load) else net.load
        version = f"pandapower {metadata.version('pandapower')}"
    ids = [str(v) for v in loads["name"]]
    if len(set(ids)) != len(ids):
        ids = [str(i) for i in loads.index]  # names not unique: the load index is
    raw = _bus_points(net, [int(b) for b in loads["bus"]])
    if grid.package == "simbench":
        # SimBench geodata is WGS 84 lon/lat: PROJ's UTM zone of the grid's centroid.
        from tools.placement_io import project_lonlat, utm_epsg

        epsg = utm_epsg(float(raw[:, 0].mean()), float(raw[:, 1].mean()))
        xy = project_lonlat(raw, epsg)
        crs = f"lon/lat (WGS 84) projected to EPSG:{epsg}"
    else:
        # The IEEE feeder's bus coordinates are already metres on a local plane: every
        # line's length_km * 1000 equals the distance between its buses (checked here).
        _check_local_metres(net)
        xy = raw
        crs = "local metres (line lengths = bus distances), no projection"
    xy = np.round(xy - xy.min(axis=0), DECIMALS) + 0.0  # + 0.0: no -0.0
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    ids = [ids[i] for i in order]
    xy = xy[order]
    extent = xy.max(axis=0)
    facts = {"name": name, "source": version, "code": grid.code, "level": grid.level,
             "meters": len(ids), "buses": int(loads["bus"].nunique()),
             "positions": len(np.unique(xy, axis=0)), "extent_m": extent.tolist(), "crs": crs,
             "k": _terminals(len(ids))}
    return ids, xy, facts


def _check_local_metres(net: Any, tolerance: float = 0.01) -> None:
    xy = _bus_points(net, [int(b) for b in net.bus.index])
    at = {int(b): i for i, b in enumerate(net.bus.index)}
    a = xy[[at[int(b)] for b in net.line["from_bus"]]]
    b = xy[[at[int(b)] for b in net.line["to_bus"]]]
    length = net.line["length_km"].to_numpy(dtype=np.float64) * 1000.0
    long = length > 1.0
    ratio = np.linalg.norm(a - b, axis=1)[long] / length[long]
    if abs(float(np.median(ratio)) - 1.0) > tolerance:
        raise ValueError(f"bus coordinates are not metres: median distance / line length "
                         f"{np.median(ratio):.3f}")


def _terminals(n: int) -> int:
    from agent.placement.plan import terminals_needed

    return terminals_needed(n)


def write_csv(path: Path, ids: list[str], xy: np.ndarray) -> None:
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    for meter, (x, y) in zip(ids, xy, strict=True):
        w.writerow((meter, f"{x:.{DECIMALS}f}", f"{y:.{DECIMALS}f}"))
    path.write_text(buf.getvalue(), encoding="utf-8")


SOURCES_HEAD = """\
# Meter layouts from real distribution grids

Written by `python -m tools.grids export`; do not edit by hand. Regenerate with

    .venv/bin/pip install -e '.[desk,grids]'
    .venv/bin/python -m tools.grids export

One row of a CSV (`id,x_m,y_m`) is one load of the grid, taken as one meter,
at its bus's geodata: the load's name as id, metres east and north of the
grid's own min corner (so the smallest x and the smallest y are 0),
rounded to 0.01 m, rows sorted by id. SimBench's lon/lat is projected with
PROJ (pyproj, `tools.placement_io.utm_epsg` / `project_lonlat`) to the UTM
zone of the grid's centroid. k is `terminals_needed(meters)` at cap 25 and
5 % margin, what the benches and tests plan with.

Held out of planner tuning (chosen before any planner ran on them):
{held_out}. Tune on the others; run these only to check a change.

"""
COLUMNS = ("file", "source", "grid", "one meter is", "meters", "load buses",
           "distinct positions", "extent x by y (m)", "k", "coordinates")

SOURCES_TAIL = """
Duplicate positions are kept: meters minus distinct positions is how
many a file has. In SimBench they are several loads on one bus (most in
lv-urban6, apartment buildings with up to 4 loads a bus); in the IEEE
feeder every load has its own bus, but two pairs of buses are drawn at
the same point.

Precision: SimBench's coordinates are given to 4 decimal degrees (its
Coordinates.csv), about 7 m east and 11 m north at 53.6 N, so its positions
sit on that lattice; the IEEE feeder's are whole metres.

SimBench MV grids: each load is an MV connection point, nearly all the
equivalents of the LV grids behind MV/LV substations (profiles `lv_*`),
plus a few MV customers (commercial, agricultural) including the one on
the HV/MV substation's MV busbar.

Left out: SimBench `1-LV-rural1--0-sw` (13 loads) and `1-LV-semiurb4--0-sw`
(41 loads on 39 buses), too few meters for more than two terminals at cap
25; `1-MV-rural--0-sw` and `1-MV-comm--0-sw` (96 and 98 loads), whose
shapes the two MV grids here already cover; the `1-MVLV-*-all-*` grids
(5 000 to 11 500 LV loads), whose plans take too long for a bench of
several methods times ten seeds. Every SimBench grid checked has geodata
on every load bus.

## Licences

- SimBench data (`simbench` package, University of Kassel, TU Dortmund,
  RWTH Aachen, Fraunhofer IEE): Open Database License (ODbL 1.0),
  http://opendatacommons.org/licenses/odbl/1.0/, contents under the
  Database Contents License (DbCL 1.0). These CSVs are a derived database:
  share them under the ODbL with attribution to SimBench
  (https://simbench.de). The simbench code is BSD 3-clause.
- IEEE European LV test feeder as shipped by pandapower
  (`pandapower.networks.ieee_european_lv_asymmetric`, from the IEEE PES
  test feeders, https://cmte.ieee.org/pes-testfeeders/resources/):
  pandapower is BSD 3-clause.
"""


def sources_md(facts: list[dict[str, Any]]) -> str:
    rows = []
    for f in facts:
        ex, ey = f["extent_m"]
        rows.append(f"| {f['name']}.csv | {f['source']} | `{f['code']}` | {f['level']} | "
                    f"{f['meters']} | {f['buses']} | {f['positions']} | {ex:.0f} x {ey:.0f} | "
                    f"{f['k']} | {f['crs']} |")
    held = ", ".join(f"`{h}`" for h in HELD_OUT)
    head = [f"| {' | '.join(COLUMNS)} |", "|" + "---|" * len(COLUMNS)]
    return (SOURCES_HEAD.format(held_out=held) + "\n".join(head + rows) + "\n"
            + SOURCES_TAIL)


def export(root: Path = DIR) -> list[dict[str, Any]]:
    """Write every grid's CSV and SOURCES.md under ``root``; the facts of each."""
    import warnings

    root.mkdir(parents=True, exist_ok=True)
    facts = []
    for name in NAMES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pandapower's deprecation chatter on load
            ids, xy, f = extract(name)
        write_csv(path_of(name, root), ids, xy)
        facts.append(f)
        print(f"{name}: {f['meters']} meters, {f['positions']} positions, "
              f"{f['extent_m'][0]:.0f} x {f['extent_m'][1]:.0f} m, k {f['k']}")
    (root / "SOURCES.md").write_text(sources_md(facts), encoding="utf-8")
    return facts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="regenerate the grid CSVs and SOURCES.md")
    ex.add_argument("--out", type=Path, default=DIR)
    args = ap.parse_args(argv)
    if args.cmd == "export":
        export(args.out)
        print(f"wrote {len(NAMES)} grids and SOURCES.md to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
