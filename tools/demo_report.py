"""The fleet demo's report: its run record drawn as ``report.html``, ``report.md`` and PNGs.

``tools/demo.py`` collects one JSON-able dict, the run record (built by
``tools/demo_record.py``, saved as ``run.json``), and calls ``render``; ``python -m
tools.demo_report RUN.json OUT_DIR`` draws a saved record again. Every key but
``params`` is optional and every section copes with its data missing or empty,
saying "not measured in this run", because the demo grows section by section.

The page is built once as a list of sections (text, tables, figures) and written
twice, as HTML (plain CSS, no JavaScript, PNGs by relative file name) and as
Markdown, so the two never disagree. The paper's values (Zhai et al., section 3)
are shown beside ours only in columns, lines and labels that say "paper".
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.report import quantile

NOT_MEASURED = "not measured in this run"
PAPER = "paper"  # the word every value of the paper's is labelled with
DPI = 110
MAX_ROWS = 100  # longer tables are cut here; run.json has every row
NUM_TD = '<td class="num">'
SECRET_FIELDS = {"key", "envelope", "private_key", "secret"}  # never printed in a report
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9.5,
         "xtick.labelsize": 9.5, "ytick.labelsize": 9.5, "axes.grid": True, "grid.alpha": 0.3}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1d1d1d; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #bbb; padding-bottom: .15em; }
table { border-collapse: collapse; margin: .2em 0 1.2em; font-size: .92em; }
th, td { border: 1px solid #c8c8c8; padding: .25em .6em; text-align: left; }
th { background: #eef1f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
p.caption { font-weight: 600; margin: 1em 0 .2em; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .95em; color: #333; margin-top: .3em; }
.how { background: #f6f8fa; border-left: 4px solid #7a9cc6; padding: .35em .7em; }
.missing { color: #8a6d00; font-style: italic; }
.lead { font-size: 1.1em; }
"""


# -- the document: sections of text, tables and figures, written as HTML and as Markdown ------

@dataclass
class Text:
    """A paragraph; ``missing`` marks the "not measured" notes so they stand out."""

    text: str
    missing: bool = False


@dataclass
class Table:
    """A table written both as HTML and as Markdown, every cell escaped."""

    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""

    def _cells(self) -> tuple[list[list[str]], int]:
        shown = [[_fmt(v) for v in row] for row in self.rows[:MAX_ROWS]]
        return shown, len(self.rows) - len(shown)

    def _numeric(self) -> list[bool]:
        """Columns of numbers only (blanks aside), right-aligned in both formats."""
        rows = self.rows[:MAX_ROWS]
        return [any(i < len(r) and _is_number(r[i]) for r in rows)
                and all(_is_number(r[i]) for r in rows if i < len(r) and r[i] is not None)
                for i in range(len(self.headers))]

    def html(self) -> str:
        shown, cut = self._cells()
        numeric = self._numeric()
        out = [f"<p class=\"caption\">{html.escape(self.caption)}</p>"] if self.caption else []
        out.append("<table>")
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
                   + "</tr>")
        for row in shown:
            out.append("<tr>" + "".join(
                (NUM_TD if i < len(numeric) and numeric[i] else "<td>") + f"{html.escape(c)}</td>"
                for i, c in enumerate(row)) + "</tr>")
        out.append("</table>")
        if cut:
            out.append(f"<p class=\"missing\">{cut} more rows not shown (all in run.json).</p>")
        return "\n".join(out)

    def markdown(self) -> str:
        shown, cut = self._cells()
        out = [f"**{_md(self.caption)}**", ""] if self.caption else []
        out.append("| " + " | ".join(_md(h) for h in self.headers) + " |")
        out.append("|" + "|".join("---:" if n else "---" for n in self._numeric()) + "|")
        out += ["| " + " | ".join(_md(c) for c in row) + " |" for row in shown]
        if cut:
            out += ["", f"*{cut} more rows not shown (all in run.json).*"]
        return "\n".join(out)


@dataclass
class Figure:
    """A PNG in the report's directory, with the line that tells a newcomer how to read it."""

    file: str
    alt: str
    how_to_read: str


Block = Text | Table | Figure


@dataclass
class Section:
    title: str
    blocks: list[Block]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    """One cell: floats to about 4 significant digits (times keep their tenths), None as a
    dash, lists joined; no thousands separators, so a list of numbers stays unambiguous."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-" if math.isnan(v) else str(v)
        if abs(v) >= 1e6 or 0 < abs(v) < 1e-3:
            return f"{v:.4g}"
        if abs(v) >= 1e4:
            return f"{v:.0f}"
        return f"{round(v, 1):g}" if abs(v) >= 100 else f"{v:.4g}"
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _md(text: str) -> str:
    """Markdown-safe text: HTML's specials escaped (Markdown passes raw HTML through), pipes
    and newlines neutralised so a cell stays in its column."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _html_doc(title: str, lead: list[Text], sections: list[Section]) -> str:
    out = ["<!DOCTYPE html>", "<html lang=\"en\">", "<head>", "<meta charset=\"utf-8\">",
           f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>",
           "<body>", f"<h1>{html.escape(title)}</h1>"]
    out += [f"<p class=\"lead\">{html.escape(t.text)}</p>" for t in lead]
    out.append("<ul>" + "".join(
        f"<li><a href=\"#s{i}\">{html.escape(s.title)}</a></li>" for i, s in enumerate(sections))
        + "</ul>")
    for i, s in enumerate(sections):
        out.append(f"<h2 id=\"s{i}\">{html.escape(s.title)}</h2>")
        for b in s.blocks:
            if isinstance(b, Text):
                cls = " class=\"missing\"" if b.missing else ""
                out.append(f"<p{cls}>{html.escape(b.text)}</p>")
            elif isinstance(b, Table):
                out.append(b.html())
            else:
                out.append(f"<figure><img src=\"{html.escape(b.file)}\" alt=\""
                           f"{html.escape(b.alt)}\"><figcaption class=\"how\"><b>How to read "
                           f"this:</b> {html.escape(b.how_to_read)}</figcaption></figure>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def _markdown_doc(title: str, lead: list[Text], sections: list[Section]) -> str:
    out = [f"# {_md(title)}", ""]
    for t in lead:
        out += [_md(t.text), ""]
    for s in sections:
        out += [f"## {_md(s.title)}", ""]
        for b in s.blocks:
            if isinstance(b, Text):
                out += [f"*{_md(b.text)}*" if b.missing else _md(b.text), ""]
            elif isinstance(b, Table):
                out += [b.markdown(), ""]
            else:
                out += [f"![{_md(b.alt)}]({b.file})", "",
                        f"*How to read this:* {_md(b.how_to_read)}", ""]
    return "\n".join(out)


# -- helpers for the figures -----------------------------------------------------------------

def _plain(s: Any) -> str:
    """A label for matplotlib: a '$' in data must not start mathtext."""
    return str(s).replace("$", r"\$")


def _palette(count: int) -> list[Any]:
    """Distinct hues first (tab20's dark members, then its light ones), as the planner's maps."""
    from matplotlib import colormaps

    tab = colormaps["tab20"].colors
    base = list(tab[0::2]) + list(tab[1::2])
    return [base[i % len(base)] for i in range(count)]


def _finite(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


def _xy(v: Any) -> tuple[float, float] | None:
    if isinstance(v, list | tuple) and len(v) == 2 and all(_finite(c) for c in v):
        return float(v[0]), float(v[1])
    return None


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _plain_log(axis: Any) -> None:
    """Log-scale ticks as plain numbers (20, 50, 100, 200 ms), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _link_ends(key: str) -> tuple[str, str] | None:
    a, sep, b = str(key).partition("|")
    return (a, b) if sep and a and b else None


def _route_links(routing: dict[str, Any]) -> list[str]:
    """Every link any method measured, as 'a|b' sorted, whichever way round it was named."""
    seen: dict[str, str] = {}
    for m in routing.values():
        for key in (m.get("links") or {}) if isinstance(m, dict) else {}:
            ends = _link_ends(key)
            if ends:
                seen.setdefault("|".join(sorted(ends)), key)
    return sorted(seen)


def _link_bps(method: dict[str, Any], link: str) -> float:
    """A method's bit/s on a link named either way round; 0 where it carried nothing."""
    links = method.get("links") or {}
    a, b = link.split("|")
    for key in (f"{a}|{b}", f"{b}|{a}"):
        v = links.get(key)
        if isinstance(v, dict):
            bps = v.get("bps")
            if _finite(bps):
                return float(bps)
            if _finite(v.get("bytes")) and _finite(method.get("duration_s")) \
                    and method["duration_s"] > 0:
                return 8.0 * v["bytes"] / method["duration_s"]
    return 0.0


def _terminal_ids(placement: dict[str, Any]) -> list[str]:
    ids = {str(t.get("id")) for t in placement.get("terminals") or [] if t.get("id") is not None}
    ids |= {str(m.get("home")) for m in placement.get("meters") or [] if m.get("home")}
    return sorted(ids)


def _loads(placement: dict[str, Any]) -> dict[str, int]:
    """Meters per terminal: the terminal's own count, else the meters homed there."""
    counted = Counter(str(m.get("home")) for m in placement.get("meters") or [] if m.get("home"))
    out = {}
    for t in placement.get("terminals") or []:
        tid = str(t.get("id"))
        out[tid] = int(t["meters"]) if _finite(t.get("meters")) else counted.get(tid, 0)
    for tid, n in counted.items():
        out.setdefault(tid, n)
    return dict(sorted(out.items()))


def _paper_cap(run: dict[str, Any]) -> float | None:
    cap = (run.get("paper") or {}).get("meters_per_terminal_cap")
    return float(cap) if _finite(cap) else None


# -- the figures, one function each; each returns None when its data is not there ------------

def fig_placement(placement: dict[str, Any], site_moves: list[dict[str, Any]],
                  path: Path) -> Path | None:
    """Figure 4 style: meters coloured by their home, terminals at their cluster's centre,
    the WAN mesh between terminals, and arrows for terminals moved to a new site."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    terminals = {str(t.get("id")): _xy(t.get("xy")) for t in placement.get("terminals") or []}
    terminals = {k: v for k, v in terminals.items() if v is not None}
    meters = [(m, _xy(m.get("xy"))) for m in placement.get("meters") or []]
    meters = [(m, xy) for m, xy in meters if xy is not None]
    if not terminals and not meters:
        return None
    ids = _terminal_ids(placement)
    colour = dict(zip(ids, _palette(len(ids)), strict=True))
    fig, ax = plt.subplots(figsize=(9, 9), constrained_layout=True)
    for a, b in (e for e in placement.get("links") or [] if isinstance(e, list | tuple)
                 and len(e) == 2):
        if str(a) in terminals and str(b) in terminals:
            (x0, y0), (x1, y1) = terminals[str(a)], terminals[str(b)]
            ax.plot([x0 / 1e3, x1 / 1e3], [y0 / 1e3, y1 / 1e3], color="0.55", lw=0.8, zorder=1)
    if meters:
        ax.scatter([xy[0] / 1e3 for _, xy in meters], [xy[1] / 1e3 for _, xy in meters], s=12,
                   linewidths=0, zorder=2,
                   c=[colour.get(str(m.get("home")), (0.6, 0.6, 0.6)) for m, _ in meters])
    for tid, (x, y) in terminals.items():
        ax.scatter([x / 1e3], [y / 1e3], marker="*", s=380, c=[colour.get(tid, "k")],
                   edgecolors="black", linewidths=1.0, zorder=5)
        ax.annotate(_plain(tid), (x / 1e3, y / 1e3), xytext=(7, 7), textcoords="offset points",
                    fontsize=9, zorder=6, bbox={"boxstyle": "round,pad=0.15", "fc": "white",
                                                "ec": "none", "alpha": 0.85})
    moved = 0
    for mv in site_moves:
        old, new = _xy(mv.get("old_xy")), _xy(mv.get("new_xy"))
        if old is None or new is None:
            continue
        moved += 1
        ax.scatter([old[0] / 1e3], [old[1] / 1e3], marker="*", s=250, facecolors="none",
                   edgecolors="black", linewidths=1.0, zorder=4)
        ax.annotate("", xy=(new[0] / 1e3, new[1] / 1e3), xytext=(old[0] / 1e3, old[1] / 1e3),
                    zorder=7, arrowprops={"arrowstyle": "-|>", "color": "crimson", "lw": 1.8})
    area = placement.get("area_m")
    if isinstance(area, list | tuple) and len(area) == 2 and all(_finite(v) for v in area):
        xs = [xy[0] for _, xy in meters] + [xy[0] for xy in terminals.values()]
        ys = [xy[1] for _, xy in meters] + [xy[1] for xy in terminals.values()]
        pad = 0.03 * max(area[0], area[1], 1.0)
        ax.set_xlim((min([0.0, *xs]) - pad) / 1e3, (max([area[0], *xs]) + pad) / 1e3)
        ax.set_ylim((min([0.0, *ys]) - pad) / 1e3, (max([area[1], *ys]) + pad) / 1e3)
    ax.set_aspect("equal")
    ax.set_xlabel("x (km)")
    ax.set_ylabel("y (km)")
    ax.set_title(f"Where the meters and terminals are: {len(meters)} meters, "
                 f"{len(terminals)} terminals")
    handles = [Line2D([], [], ls="", marker="o", ms=5, color="0.35",
                      label="meter (colour = its home terminal)"),
               Line2D([], [], ls="", marker="*", ms=14, mfc="white", mec="black",
                      label="terminal (its cluster's centre)"),
               Line2D([], [], color="0.55", lw=0.8, label="WAN link between terminals")]
    if moved:
        handles.append(Line2D([], [], color="crimson", lw=1.8, marker=">",
                              label="terminal moved: old site (hollow) to new"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.07), ncol=2,
              frameon=False)
    return _save(fig, path)


def fig_load(placement: dict[str, Any], paper_cap: float | None, path: Path) -> Path | None:
    """Figure 5 style: meters per terminal against each terminal's capacity (and the paper's)."""
    import matplotlib.pyplot as plt

    loads = _loads(placement)
    if not loads:
        return None
    ids = list(loads)
    colour = dict(zip(_terminal_ids(placement), _palette(len(_terminal_ids(placement))),
                      strict=True))
    caps = {str(t.get("id")): float(t["capacity"]) for t in placement.get("terminals") or []
            if _finite(t.get("capacity"))}
    fig, ax = plt.subplots(figsize=(max(7.0, 0.55 * len(ids) + 3), 4.8), constrained_layout=True)
    xs = range(len(ids))
    ax.bar(xs, [loads[i] for i in ids], color=[colour.get(i, "0.5") for i in ids],
           edgecolor="black", linewidth=0.6, zorder=2)
    for x, i in zip(xs, ids, strict=True):
        ax.annotate(str(loads[i]), (x, loads[i]), xytext=(0, 2), textcoords="offset points",
                    ha="center", fontsize=8.5)
    if caps:
        ax.hlines([caps.get(i, math.nan) for i in ids], [x - 0.45 for x in xs],
                  [x + 0.45 for x in xs], colors="crimson", lw=2.2, zorder=3,
                  label="capacity of each terminal (this run)")
    if paper_cap is not None:
        ax.axhline(paper_cap, color="black", ls="--", lw=1.2, zorder=3,
                   label=f"{PAPER}: cap {paper_cap:g} meters per terminal")
    ax.set_xticks(list(xs), [_plain(i) for i in ids], rotation=45 if len(ids) > 8 else 0,
                  ha="right" if len(ids) > 8 else "center")
    ax.set_ylabel("meters homed at the terminal")
    ax.set_title("Meters per terminal")
    top = max([*loads.values(), *caps.values(), paper_cap or 0.0, 1.0])
    ax.set_ylim(0, top * 1.18)
    if caps or paper_cap is not None:
        ax.legend(loc="upper right")
    return _save(fig, path)


def _latencies(commits: list[dict[str, Any]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for c in commits:
        if _finite(c.get("latency_ms")) and c["latency_ms"] > 0:
            out.setdefault(str(c.get("op", "?")), []).append(float(c["latency_ms"]))
    return dict(sorted(out.items()))


def fig_latency_hist(commits: list[dict[str, Any]], path: Path) -> Path | None:
    """How long a meter waits for its operation to commit, all operations stacked by kind."""
    import matplotlib.pyplot as plt
    import numpy as np

    by_op = _latencies(commits)
    every = sorted(v for vs in by_op.values() for v in vs)
    if not every:
        return None
    lo, hi = every[0], every[-1]
    bins = np.geomspace(lo * 0.95, hi * 1.05 if hi > lo else lo * 1.5, 40)
    fig, ax = plt.subplots(figsize=(9, 4.8), constrained_layout=True)
    ax.hist(list(by_op.values()), bins=bins, stacked=True, label=[_plain(k) for k in by_op],
            color=_palette(len(by_op)), edgecolor="white", linewidth=0.4)
    ax.set_xscale("log")
    _plain_log(ax.xaxis)
    for q, ls in ((0.5, "-"), (0.99, "--")):
        v = quantile(every, q)
        ax.axvline(v, color="black", ls=ls, lw=1.3)
        ax.annotate(f"p{round(q * 100)} {v:.0f} ms", (v, 1), xycoords=("data", "axes fraction"),
                    xytext=(4, -14), textcoords="offset points", fontsize=9.5)
    ax.set_xlabel("commit latency, request to acknowledgement (ms, log scale)")
    ax.set_ylabel("operations")
    ax.set_title(f"Commit latency of {len(every)} acknowledged key operations")
    ax.legend(title="operation", loc="upper right")
    return _save(fig, path)


def fig_latency_timeline(commits: list[dict[str, Any]], kills: list[dict[str, Any]],
                         path: Path) -> Path | None:
    """Latency over the run, with each killed terminal's outage shaded, to show the cost of a
    kill -9 and how soon the fleet is back to normal."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    points = [c for c in commits if _finite(c.get("t_s")) and _finite(c.get("latency_ms"))
              and c["latency_ms"] > 0]
    if not points:
        return None
    ops = sorted({str(c.get("op", "?")) for c in points})
    colour = dict(zip(ops, _palette(len(ops)), strict=True))
    fig, ax = plt.subplots(figsize=(11, 5), constrained_layout=True)
    for op in ops:
        mine = [c for c in points if str(c.get("op", "?")) == op]
        ax.scatter([c["t_s"] for c in mine], [c["latency_ms"] for c in mine], s=9, alpha=0.7,
                   color=colour[op], label=_plain(op), linewidths=0, zorder=3)
    ax.set_yscale("log")
    _plain_log(ax.yaxis)
    spans = 0
    for i, k in enumerate(kills):
        start = k.get("killed_s")
        end = next((k[e] for e in ("synced_s", "restarted_s") if _finite(k.get(e))), None)
        if not _finite(start):
            continue
        end = end if end is not None and end > start else start + 0.5
        spans += 1
        ax.axvspan(start, end, color="crimson", alpha=0.12, zorder=1)
        if _finite(k.get("restarted_s")) and start < k["restarted_s"] < end:
            ax.axvline(k["restarted_s"], color="darkred", ls=":", lw=1.0, zorder=2)
        ax.annotate(f"{_plain(k.get('terminal', '?'))} down", (start, 1 - 0.06 * (i % 6)),
                    xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=9, color="darkred")
    ax.set_xlabel("time since the fleet run started (s)")
    ax.set_ylabel("commit latency (ms, log scale)")
    ax.set_title("Commit latency over the run")
    handles, _ = ax.get_legend_handles_labels()
    if spans:
        handles += [Patch(color="crimson", alpha=0.25, label="terminal killed, until back in sync"),
                    Line2D([], [], color="darkred", ls=":", lw=1.0, label="terminal restarted")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False,
              markerscale=2.0)
    return _save(fig, path)


def fig_route_loads(routing: dict[str, Any], path: Path) -> Path | None:
    """Per-link load of each routing method, side by side: a balanced router spreads the
    same traffic flatter over the links."""
    import matplotlib.pyplot as plt
    import numpy as np

    methods = [m for m, v in routing.items() if isinstance(v, dict) and v.get("links")]
    links = _route_links({m: routing[m] for m in methods})
    if not links:
        return None
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(min(14.0, max(8.0, 0.3 * len(links) * len(methods) + 3)),
                                    5.2), constrained_layout=True)
    x = np.arange(len(links))
    for j, (m, c) in enumerate(zip(methods, _palette(len(methods)), strict=True)):
        ax.bar(x - 0.4 + width * (j + 0.5), [_link_bps(routing[m], lk) / 1e3 for lk in links],
               width, color=c, label=_plain(m), zorder=2)
    ax.set_xticks(x, [_plain(lk.replace("|", "-")) for lk in links], rotation=60, ha="right",
                  fontsize=8.5 if len(links) > 20 else 9.5)
    ax.set_ylabel("load carried (kbit/s)")
    ax.set_xlabel("WAN link (terminal - terminal)")
    ax.set_title("Load per WAN link, by routing method (same fleet, same traffic)")
    ax.legend(title="routing method")
    return _save(fig, path)


def fig_route_mesh(routing: dict[str, Any], placement: dict[str, Any],
                   path: Path) -> Path | None:
    """The mesh on the map, each link as wide as the load the first method put on it."""
    import matplotlib.pyplot as plt

    methods = [m for m, v in routing.items() if isinstance(v, dict) and v.get("links")]
    sites = {str(t.get("id")): _xy(t.get("xy")) for t in placement.get("terminals") or []}
    sites = {k: v for k, v in sites.items() if v is not None}
    if not methods or len(sites) < 2:
        return None
    first = routing[methods[0]]
    links = [lk for lk in _route_links({methods[0]: first})
             if all(e in sites for e in lk.split("|"))]
    if not links:
        return None
    loads = {lk: _link_bps(first, lk) for lk in links}
    top = max(loads.values()) or 1.0
    fig, ax = plt.subplots(figsize=(8.5, 8.5), constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    for lk, bps in loads.items():
        a, b = lk.split("|")
        ax.plot([sites[a][0] / 1e3, sites[b][0] / 1e3], [sites[a][1] / 1e3, sites[b][1] / 1e3],
                lw=0.8 + 9.0 * bps / top, color=cmap(bps / top), solid_capstyle="round",
                zorder=2)
    for tid, (x, y) in sites.items():
        ax.scatter([x / 1e3], [y / 1e3], s=120, c="white", edgecolors="black", zorder=3)
        ax.annotate(_plain(tid), (x / 1e3, y / 1e3), xytext=(6, 6), textcoords="offset points",
                    fontsize=9, zorder=4)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, top / 1e3))
    fig.colorbar(sm, ax=ax, shrink=0.7, label="load carried (kbit/s)")
    ax.set_aspect("equal")
    ax.set_xlabel("x (km)")
    ax.set_ylabel("y (km)")
    ax.set_title(f"WAN link loads on the map, routing method '{_plain(methods[0])}'")
    return _save(fig, path)


def fig_resources(resources: list[dict[str, Any]], path: Path) -> Path | None:
    """Each agent's memory against the board's RAM budget, and the CPU time it used."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in resources if r.get("terminal") is not None]
    if not rows:
        return None
    ids = [_plain(r["terminal"]) for r in rows]
    x = np.arange(len(rows))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(max(10.0, 0.75 * len(rows) + 4), 4.8),
                                 constrained_layout=True)

    def val(r: dict[str, Any], k: str) -> float:
        return float(r[k]) if _finite(r.get(k)) else 0.0

    ax.bar(x - 0.2, [val(r, "rss_mib") for r in rows], 0.4, label="RSS now", color="#4c78a8",
           zorder=2)
    ax.bar(x + 0.2, [val(r, "peak_rss_mib") for r in rows], 0.4, label="peak RSS",
           color="#9ecae9", zorder=2)
    budgets = sorted({float(r["budget_mib"]) for r in rows if _finite(r.get("budget_mib"))})
    for b in budgets:
        ax.axhline(b, color="crimson", lw=1.6, label=f"RAM budget {b:g} MiB (board config)")
    ax.set_xticks(x, ids, rotation=45, ha="right")
    ax.set_ylabel("memory (MiB)")
    ax.set_title("Agent memory per terminal")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    bx.bar(x, [val(r, "cpu_s") for r in rows], 0.6, color="#f58518", zorder=2)
    bx.set_xticks(x, ids, rotation=45, ha="right")
    bx.set_ylabel("CPU time used (s)")
    bx.set_title("Agent CPU time per terminal")
    return _save(fig, path)


# -- the sections ----------------------------------------------------------------------------

class _Out:
    """Where the figures go, and the record of what was written."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = out_dir
        self.written: dict[str, Path] = {}

    def figure(self, name: str, draw: Callable[[Path], Path | None], alt: str,
               how: str) -> list[Block]:
        path = draw(self.dir / f"{name}.png")
        if path is None:
            return []
        self.written[name] = path
        return [Figure(path.name, alt, how)]


def _missing(what: str = "") -> Text:
    return Text(f"{what}: {NOT_MEASURED}." if what else f"{NOT_MEASURED.capitalize()}.",
                missing=True)


def _list(run: dict[str, Any], key: str) -> list[dict[str, Any]]:
    v = run.get(key)
    return [x for x in v if isinstance(x, dict)] if isinstance(v, list) else []


def _dict(run: dict[str, Any], key: str) -> dict[str, Any]:
    v = run.get(key)
    return v if isinstance(v, dict) else {}


def _columns(rows: Sequence[dict[str, Any]], preferred: Sequence[str]) -> list[str]:
    """The preferred columns that occur, then any others in first-seen order."""
    present: dict[str, None] = {}
    for r in rows:
        present.update(dict.fromkeys(r))
    return [c for c in preferred if c in present] + [c for c in present if c not in preferred]


def _dict_table(rows: Sequence[dict[str, Any]], preferred: Sequence[str],
                caption: str = "") -> Table:
    cols = _columns(rows, preferred)
    return Table(cols, [[r.get(c) for c in cols] for r in rows], caption)


def _paper_rows(run: dict[str, Any]) -> list[list[Any]]:
    """The paper's setting beside the same quantity in this run, where the run has it."""
    params, placement = _dict(run, "params"), _dict(run, "placement")
    caps = [t.get("capacity") for t in placement.get("terminals") or []
            if _finite(t.get("capacity"))]
    rates = sorted({r.get("wan_rate_mbit") for r in _dict(run, "routing").values()
                    if isinstance(r, dict) and _finite(r.get("wan_rate_mbit"))})
    area = placement.get("area_m")
    ours = {"terminals": params.get("terminals"), "meters": params.get("meters"),
            "meters_per_terminal_cap": max(caps) if caps else None,
            "wan_rate_mbit_s": rates[0] if len(rates) == 1 else rates or None,
            "area_m": " x ".join(f"{v:.0f}" for v in area) if isinstance(area, list)
            and all(_finite(v) for v in area) else None}
    names = {"terminals": "terminals", "meters": "meters",
             "meters_per_terminal_cap": "meters per terminal, cap",
             "wan_rate_mbit_s": "WAN link rate (Mbit/s)", "area_m": "area (m)",
             "packet_bytes": "packet size (bytes)"}
    return [[names.get(k, k), v, ours.get(k)] for k, v in _dict(run, "paper").items()
            if k != "note"]


def _section_overview(run: dict[str, Any], out: _Out) -> list[Block]:
    """Parameters and the paper's setting: what was run, next to what the paper ran."""
    blocks: list[Block] = []
    params = _dict(run, "params")
    blocks.append(Table(["parameter", "value"], [[k, v] for k, v in params.items()],
                        "Parameters of this run") if params else _missing("Parameters"))
    rows = _paper_rows(run)
    if rows:
        blocks.append(Table(["quantity", f"{PAPER} (Zhai et al., section 3)", "this run"], rows,
                            f"The {PAPER}'s setting beside this run's"))
        note = _dict(run, "paper").get("note")
        blocks.append(Text(f"Values in the '{PAPER}' column are the paper's own, not measured "
                           "here" + (f" ({note})." if note else ".")))
    else:
        blocks.append(Text(f"The {PAPER}'s setting: not in this run's record.", missing=True))
    chains = _dict(run, "chains")
    if chains:
        blocks.append(Table(["ledger at the end", "value"], [[k, v] for k, v in chains.items()],
                            "Every terminal's chain when the meters stopped"))
    return blocks


def _section_placement(run: dict[str, Any], out: _Out) -> list[Block]:
    """Where meters and terminals are and how full each terminal is (Figures 4, 5)."""
    placement = _dict(run, "placement")
    moves = _list(run, "site_moves")
    blocks = out.figure(
        "placement", lambda p: fig_placement(placement, moves, p), "placement map",
        "each dot is a smart meter, coloured like the terminal (star) that is its home; "
        "meters of one colour form a cluster around their terminal, as in the paper's "
        "Figure 4; grey lines are the WAN links the terminals talk over; a red arrow is a "
        "terminal moved to a new site during the run.")
    blocks += out.figure(
        "load", lambda p: fig_load(placement, _paper_cap(run), p), "meters per terminal",
        "one bar per terminal, as tall as the number of meters it serves (the paper's "
        f"Figure 5); the red tick is that terminal's capacity in this run, the dashed line "
        f"the {PAPER}'s cap; even bars under the line mean a balanced placement.")
    if not blocks:
        return [_missing()]
    caps = {str(t.get("id")): t.get("capacity") for t in placement.get("terminals") or []}
    sites = {str(t.get("id")): t.get("xy") for t in placement.get("terminals") or []}
    loads = _loads(placement)
    blocks.append(Table(["terminal", "site x, y (m)", "capacity", "meters"],
                        [[t, [round(v) for v in sites[t]] if _xy(sites.get(t)) else None,
                          caps.get(t), n] for t, n in loads.items()], "Terminals"))
    return blocks


def _latency_rows(commits: list[dict[str, Any]]) -> list[list[Any]]:
    by_op = _latencies(commits)
    groups = [*by_op.items(), *([("all", [v for vs in by_op.values() for v in vs])]
                                if len(by_op) > 1 else [])]
    return [[op, len(vs), quantile(vs, 0.5), quantile(vs, 0.99), sum(vs) / len(vs), max(vs)]
            for op, vs in groups]


def _section_latency(run: dict[str, Any], out: _Out) -> list[Block]:
    """What a meter waits for a commit, and what a terminal's kill -9 costs it."""
    commits, kills = _list(run, "commits"), _list(run, "kills")
    blocks = out.figure(
        "latency_hist", lambda p: fig_latency_hist(commits, p), "commit latency histogram",
        "how long a meter waited from sending a key operation to its acknowledgement, once "
        "the terminals had committed it; the x axis is logarithmic; solid line = median (p50), "
        "dashed = p99 (1 in 100 waited longer); colours are the kinds of operation.")
    blocks += out.figure(
        "latency_timeline", lambda p: fig_latency_timeline(commits, kills, p),
        "commit latency over time",
        "each dot is one committed operation at the time it was acknowledged (x) and how long "
        "it took (y, log scale); red bands are terminals killed with kill -9, from the kill "
        "until the terminal was back in sync (dotted line: its restart); dots rising inside a "
        "band are the outage's cost to the meters.")
    rows = _latency_rows(commits)
    if rows:
        blocks.append(Table(["operation", "count", "p50 (ms)", "p99 (ms)", "mean (ms)",
                             "max (ms)"], rows, "Commit latency by operation"))
    else:
        blocks.append(_missing("Commit latencies"))
    if kills:
        blocks.append(Table(
            ["terminal", "killed at (s)", "restarted at (s)", "in sync at (s)",
             "down until in sync (s)"],
            [[k.get("terminal"), k.get("killed_s"), k.get("restarted_s"), k.get("synced_s"),
              k["synced_s"] - k["killed_s"] if _finite(k.get("synced_s"))
              and _finite(k.get("killed_s")) else None] for k in kills],
            "Terminals killed (kill -9) and restarted"))
    else:
        blocks.append(_missing("Terminal kills"))
    return blocks


ROUTE_COLUMNS = [("load_balance_degree", "load-balance degree, eq. 8 ((bit/s)^2)"),
                 ("commit_p50_ms", "commit p50 (ms)"), ("commit_p99_ms", "commit p99 (ms)"),
                 ("mean_hops", "mean hops"), ("max_hops", "max hops"),
                 ("busiest_link_utilisation", "busiest link (fraction of rate)"),
                 ("wan_rate_mbit", "WAN rate (Mbit/s)"),
                 ("committed_per_s", "committed per s"), ("duration_s", "measured for (s)")]


def _section_routing(run: dict[str, Any], out: _Out) -> list[Block]:
    """Whether the greedy router spreads the same traffic more evenly than the others."""
    routing = {m: v for m, v in _dict(run, "routing").items() if isinstance(v, dict)}
    placement = _dict(run, "placement")
    if not routing:
        return [_missing()]
    blocks = out.figure(
        "routing_links", lambda p: fig_route_loads(routing, p), "load per link and method",
        "one group of bars per WAN link, one bar per routing method, all carrying the same "
        "fleet's traffic; a method that balances load keeps the tallest bars lower and the "
        "bars more even.")
    first = next((m for m, v in routing.items() if v.get("links")), None)
    blocks += out.figure(
        "routing_mesh", lambda p: fig_route_mesh(routing, placement, p), "link loads on the map",
        f"the terminals on the map with each WAN link drawn as wide (and as bright) as the load "
        f"the '{first}' method put on it; thick bright links are the hot spots.")
    keys = [k for k, _ in ROUTE_COLUMNS if any(k in v for v in routing.values())]
    heads = dict(ROUTE_COLUMNS)
    blocks.append(Table(["method", *(heads[k] for k in keys)],
                        [[m, *(v.get(k) for k in keys)] for m, v in routing.items()],
                        "Routing methods compared"))
    blocks.append(Text("The load-balance degree is the paper's eq. 8, the variance of the "
                       "links' idle bandwidth: 0 is perfectly balanced, smaller is better."))
    return blocks


def _section_changes(run: dict[str, Any], out: _Out) -> list[Block]:
    """What moved during the run: meters re-homed, terminals re-sited, re-plans."""
    blocks: list[Block] = []
    migrations, moves, replans = (_list(run, k) for k in ("migrations", "site_moves", "replans"))
    if migrations:
        blocks.append(_dict_table(migrations, ["t_s", "meter", "from", "to", "height", "why"],
                                  "Meters migrated to another terminal"))
    else:
        blocks.append(_missing("Meter migrations"))
    if moves:
        rows = []
        for mv in moves:
            old, new = _xy(mv.get("old_xy")), _xy(mv.get("new_xy"))
            dist = math.dist(old, new) if old and new else None
            rows.append([mv.get("t_s"), mv.get("terminal"), mv.get("old_xy"), mv.get("new_xy"),
                         dist])
        blocks.append(Table(["t_s", "terminal", "old site (m)", "new site (m)", "moved (m)"],
                            rows, "Terminals moved to a new site (arrows on the placement map)"))
    else:
        blocks.append(_missing("Terminal site moves"))
    if replans:
        blocks.append(_dict_table(replans, ["t_s", "terminals", "reason", "migrations"],
                                  "Placement re-plans"))
    else:
        blocks.append(_missing("Placement re-plans"))
    return blocks


def _section_outcomes(run: dict[str, Any], out: _Out) -> list[Block]:
    """How many key operations committed and why any were refused."""
    outcomes = _dict(run, "outcomes")
    committed = _dict(outcomes, "committed")
    refused = _dict(outcomes, "refused")
    blocks: list[Block] = []
    if committed:
        blocks.append(Table(["operation", "committed"],
                            [*sorted(committed.items()), ["total", sum(
                                v for v in committed.values() if _finite(v))]],
                            "Key operations committed, by operation"))
    else:
        blocks.append(_missing("Committed operations"))
    if refused:
        blocks.append(Table(["reason", "refused"],
                            [*sorted(refused.items()), ["total", sum(
                                v for v in refused.values() if _finite(v))]],
                            "Key operations refused, by reason"))
    else:
        blocks.append(Text("Refused operations: none recorded." if committed
                           else f"Refused operations: {NOT_MEASURED}.", missing=not committed))
    return blocks


def _section_resources(run: dict[str, Any], out: _Out) -> list[Block]:
    """Whether each agent stayed inside the board's RAM budget, and its CPU cost."""
    resources = _list(run, "resources")
    if not resources:
        return [_missing()]
    blocks = out.figure(
        "resources", lambda p: fig_resources(resources, p), "memory and CPU per terminal",
        "left: each terminal's agent process, its memory now and at its peak, against the "
        "board's RAM budget (red line) that the agent must stay under; right: the CPU seconds "
        "each agent has used so far.")
    rows = []
    for r in resources:
        peak, budget = r.get("peak_rss_mib"), r.get("budget_mib")
        share = 100.0 * peak / budget if _finite(peak) and _finite(budget) and budget else None
        rows.append([r.get("terminal"), r.get("rss_mib"), peak, r.get("cpu_s"), budget, share])
    blocks.append(Table(["terminal", "RSS (MiB)", "peak RSS (MiB)", "CPU (s)", "budget (MiB)",
                         "peak, % of budget"], rows, "Agent resources"))
    return blocks


def _section_station(run: dict[str, Any], out: _Out) -> list[Block]:
    """What the master station asked the terminals and whether the answers checked out."""
    station = _list(run, "station")
    if not station:
        return [_missing()]
    return [
        Text("The utility's master station asking the terminals for keys, through the "
             "meter's home terminal or through another that forwards the query; 'checked' "
             "in the proof column means the station verified the answer's record proof (the "
             "ledger block holding the key's record, signed by the terminals) and that the "
             "key it received is the one that record commits."),
        _dict_table([{k: v for k, v in r.items() if k not in SECRET_FIELDS} for r in station],
                    ["what", "meter", "via", "home", "status", "proof", "ms"],
                    "What the station asked and got")]


Builder = Callable[[dict[str, Any], _Out], list[Block]]
SECTIONS: list[tuple[str, Builder]] = [
    ("Run at a glance", _section_overview),
    ("Placement of meters and terminals", _section_placement),
    ("Commit latency and terminal kills", _section_latency),
    ("Routing: load per WAN link", _section_routing),
    ("Migrations, site moves and re-plans", _section_changes),
    ("Key-operation outcomes", _section_outcomes),
    ("Memory and CPU per terminal", _section_resources),
    ("Master station answers", _section_station)]


def _wall(run: dict[str, Any]) -> Text:
    w = run.get("wall_s")
    if not _finite(w):
        return Text(f"Wall time: {NOT_MEASURED}.", missing=True)
    minutes, seconds = divmod(float(w), 60.0)
    human = f" ({int(minutes)} min {seconds:.0f} s)" if minutes >= 1 else ""
    return Text(f"Wall time of the fleet run: {float(w):.1f} s{human}.")


def _lead(run: dict[str, Any]) -> list[Text]:
    p = _dict(run, "params")
    what = ", ".join(f"{p[k]} {k}" for k in ("terminals", "meters") if k in p)
    board = f" on board '{p['board']}'" if "board" in p else ""
    return [Text(f"The fleet demo: {what or 'a fleet'}{board}. Measured values come from "
                 f"this run; values labelled '{PAPER}' are Zhai et al.'s, shown for "
                 "comparison only."), _wall(run)]


def _safely(title: str, build: Builder, run: dict[str, Any], out: _Out) -> Section:
    """One section; a malformed part of the record costs that section, not the report."""
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    try:
        return Section(title, build(run, out))
    except Exception as e:  # the rest of the report is still worth having
        traceback.print_exc(file=sys.stderr)
        for n in set(plt.get_fignums()) - before:
            plt.close(n)  # the half-drawn figure
        return Section(title, [Text(f"This section could not be drawn from the record "
                                    f"({type(e).__name__}: {e}).", missing=True)])


def render(run: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write report.html, report.md and the PNGs for ``run`` into ``out_dir``.

    Returns name -> path of every file written: "html", "md" and one entry per figure
    (its file stem, e.g. "placement"). Figures whose data is absent are not drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = _Out(out_dir)
    with plt.rc_context(STYLE):
        sections = [_safely(title, build, run, out) for title, build in SECTIONS]
    title = "edgekey fleet demo: report of the run"
    lead = _lead(run)
    page = out_dir / "report.html"
    page.write_text(_html_doc(title, lead, sections), encoding="utf-8")
    md = out_dir / "report.md"
    md.write_text(_markdown_doc(title, lead, sections), encoding="utf-8")
    return {"html": page, "md": md, **out.written}


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m tools.demo_report RUN.json OUT_DIR``: draw a saved run record again."""
    parser = argparse.ArgumentParser(prog="python -m tools.demo_report",
                                     description="Render the fleet demo's report from run.json.")
    parser.add_argument("record", type=Path, help="the run record (the demo's run.json)")
    parser.add_argument("out_dir", type=Path, help="where report.html, report.md and PNGs go")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        run = json.loads(args.record.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        print(f"cannot read the run record {args.record}: {e}", file=sys.stderr)
        return 2
    if not isinstance(run, dict):
        print(f"{args.record} is not a run record (a JSON object)", file=sys.stderr)
        return 2
    for name, path in render(run, args.out_dir).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
