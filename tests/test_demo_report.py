"""The fleet demo's report (tools/demo_report.py): a synthetic run record drawn as HTML,
Markdown and PNGs; a record with nothing but its parameters; a saved record drawn again."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")  # desk tools: not in the emulated ARM root filesystem
np = pytest.importorskip("numpy")

from tools import demo_report  # noqa: E402

pytestmark = pytest.mark.host_only

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(1)</script>"
SECRET = "5ec7e7" * 8  # key material a station answer may carry: never in the report


def synthetic_run() -> dict[str, Any]:
    """A run record of every section, 6 terminals and 60 meters, from a fixed seed."""
    rng = np.random.default_rng(1)
    ids = [f"ecd-{i:02d}" for i in range(6)]
    sites = {t: [float(x), float(y)] for t, (x, y) in
             zip(ids, rng.uniform([300, 300], [3200, 3700], (6, 2)), strict=True)}
    meters = []
    for k in range(60):
        home = ids[k % 6]
        xy = np.asarray(sites[home]) + rng.normal(0, 150, 2)
        meters.append({"id": EVIL if k == 0 else f"{k:012x}", "xy": xy.round(1).tolist(),
                       "home": home})
    links = [[ids[i], ids[(i + 1) % 6]] for i in range(6)] + [["ecd-00", "ecd-03"]]
    ops = ["register", "rotate", "revoke", "migrate"]
    commits = [{"t_s": round(float(t), 2), "latency_ms": round(float(v), 1),
                "op": ops[int(o)], "terminal": ids[int(o) % 6]}
               for t, v, o in zip(rng.uniform(0, 300, 400), rng.lognormal(4.3, 0.5, 400),
                                  rng.choice(4, 400, p=[0.7, 0.2, 0.05, 0.05]), strict=True)]
    routing = {}
    for method, spread in (("greedy", 0.2), ("shortest", 0.8)):
        routing[method] = {
            "links": {f"{a}|{b}": {"bytes": 0,
                                   "bps": float(3000 * (1 + spread * rng.uniform(-1, 1)))}
                      for a, b in links},
            "load_balance_degree": 1.2e6 * (1 + 4 * spread), "commit_p50_ms": 70 + 10 * spread,
            "commit_p99_ms": 150 + 90 * spread, "duration_s": 20.0, "mean_hops": 1.6,
            "wan_rate_mbit": 25.0}
    return {
        "params": {"terminals": 6, "meters": 60, "board": "host", "seed": 1,
                   "route_method": "greedy", "quick": True},
        "wall_s": 312.4,
        "placement": {"area_m": [3500, 4000],
                      "terminals": [{"id": t, "xy": sites[t], "capacity": 12, "meters": 10}
                                    for t in ids],
                      "meters": meters, "links": links},
        "commits": commits,
        "kills": [{"terminal": "ecd-05", "killed_s": 200.0, "restarted_s": 203.1,
                   "synced_s": 215.0},
                  {"terminal": "ecd-02", "killed_s": 200.2, "restarted_s": 203.4}],
        "outcomes": {"committed": {"register": 60, "rotate": 40, "revoke": 3, "migrate": 12},
                     "refused": {"UNKNOWN_METER": 1, "REVOKED_METER": 2}},
        "routing": routing,
        "migrations": [{"t_s": 150.0, "meter": EVIL, "from": "ecd-01", "to": "ecd-02",
                        "height": 812, "why": "join"}],
        "site_moves": [{"t_s": 151.0, "terminal": "ecd-02", "old_xy": sites["ecd-02"],
                        "new_xy": [sites["ecd-02"][0] + 400, sites["ecd-02"][1] - 300]}],
        "replans": [{"t_s": 160.0, "terminals": ["ecd-01", "ecd-02"], "reason": "site move",
                     "migrations": 4}],
        "resources": [{"terminal": t, "rss_mib": 60.0 + i, "peak_rss_mib": 70.0 + i,
                       "cpu_s": 12.5 + i, "budget_mib": 192} for i, t in enumerate(ids)],
        "station": [{"what": "key", "meter": EVIL, "via": "ecd-03", "home": "ecd-01",
                     "status": "OK", "proof": "checked", "ms": 40.2, "key": SECRET}],
        "paper": {"meters_per_terminal_cap": 25, "terminals": 13, "meters": 300,
                  "wan_rate_mbit_s": 25, "note": "the paper's simulation setting"},
    }


TITLES = [title for title, _ in demo_report.SECTIONS]
FIGURES = ["placement", "load", "latency_hist", "latency_timeline", "routing_links",
           "routing_mesh", "resources"]


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("report")
    return out, demo_report.render(synthetic_run(), out)


def test_every_file_is_written_and_every_png_is_a_png(full: tuple[Path, dict]) -> None:
    out, written = full
    assert set(written) == {"html", "md", *FIGURES}
    for name, path in written.items():
        assert path.parent == out and path.stat().st_size > 0, name
    for name in FIGURES:
        data = written[name].read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name


def test_html_has_every_section_the_wall_time_and_labelled_paper_values(
        full: tuple[Path, dict]) -> None:
    _, written = full
    page = written["html"].read_text(encoding="utf-8")
    for title in TITLES:
        assert f">{title}</h2>" in page.replace("&#x27;", "'"), title
    assert "312.4 s (5 min 12 s)" in page
    assert "paper (Zhai et al., section 3)" in page  # the paper's column, by name
    assert re.search(r"<td>meters per terminal, cap</td><td[^>]*>25</td><td[^>]*>12</td>", page)
    assert page.count("How to read this:") == len(FIGURES)
    assert demo_report.NOT_MEASURED not in page  # the synthetic record has every section
    assert "could not be drawn" not in page


def test_html_escapes_data_and_is_self_contained(full: tuple[Path, dict]) -> None:
    out, written = full
    page = written["html"].read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "&lt;script&gt;" in page
    assert "http://" not in page and "https://" not in page
    images = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(images) == sorted(f"{n}.png" for n in FIGURES)
    assert all((out / i).is_file() for i in images)


def test_markdown_has_the_tables_and_figures(full: tuple[Path, dict]) -> None:
    _, written = full
    md = written["md"].read_text(encoding="utf-8")
    for title in TITLES:
        assert f"## {title}" in md
    assert "| operation | count | p50 (ms) | p99 (ms) | mean (ms) | max (ms) |" in md
    assert "| reason | refused |" in md and "| UNKNOWN_METER | 1 |" in md
    assert "| method | load-balance degree, eq. 8 ((bit/s)^2) |" in md
    assert "| greedy |" in md and "| shortest |" in md
    assert "| quantity | paper (Zhai et al., section 3) | this run |" in md
    for n in FIGURES:
        assert f"]({n}.png)" in md
    assert "<script" not in md and "&lt;script&gt;" in md
    assert ("| what | meter | via | home | status | proof | ms |\n"
            "|---|---|---|---|---|---|---:|") in md  # numbers right-aligned
    assert SECRET not in md and SECRET not in written["html"].read_text(encoding="utf-8")
    assert md.count("*How to read this:*") == len(FIGURES)


def test_a_record_of_only_params_says_not_measured(tmp_path: Path) -> None:
    written = demo_report.render({"params": {"terminals": 13, "meters": 300}}, tmp_path)
    assert set(written) == {"html", "md"}
    page = written["html"].read_text(encoding="utf-8")
    md = written["md"].read_text(encoding="utf-8")
    for text in (page, md):
        assert text.count(demo_report.NOT_MEASURED) >= len(TITLES) - 1
        assert "could not be drawn" not in text
    for title in TITLES:
        assert f"## {title}" in md
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("run", [
    {"params": {}, "placement": {}, "commits": [], "kills": [], "routing": {},
     "outcomes": {}, "resources": [], "station": [], "paper": {}, "wall_s": None},
    {"params": {"x": 1}, "placement": {"terminals": [{"id": "a"}], "meters": [{"xy": None}]},
     "commits": [{"t_s": 1.0}], "routing": {"greedy": {"links": {}}}, "kills": [{}]},
])
def test_empty_or_partial_sections_do_not_break(tmp_path: Path, run: dict) -> None:
    written = demo_report.render(run, tmp_path)
    page = written["html"].read_text(encoding="utf-8")
    assert "could not be drawn" not in page and demo_report.NOT_MEASURED in page


def test_a_section_that_fails_costs_only_itself(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise ValueError("a malformed entry")

    monkeypatch.setattr(demo_report, "fig_resources", broken)
    written = demo_report.render(synthetic_run(), tmp_path)
    page = written["html"].read_text(encoding="utf-8")
    assert "could not be drawn from the record (ValueError: a malformed entry)" in page
    assert "resources" not in written and set(FIGURES) - {"resources"} <= set(written)
    assert page.count("<h2") == len(TITLES)


def test_main_draws_a_saved_record_again(full: tuple[Path, dict], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    _, first = full
    record = tmp_path / "run.json"
    record.write_text(json.dumps(synthetic_run()), encoding="utf-8")
    assert demo_report.main([str(record), str(tmp_path / "b")]) == 0
    assert "html: " in capsys.readouterr().out
    assert (tmp_path / "b" / "report.md").read_text() == first["md"].read_text()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(
        p.name for p in first.values())
    assert demo_report.main([str(tmp_path / "absent.json"), str(tmp_path / "c")]) == 2
    (tmp_path / "list.json").write_text("[1, 2]", encoding="utf-8")
    assert demo_report.main([str(tmp_path / "list.json"), str(tmp_path / "c")]) == 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_chromium_renders_the_page(full: tuple[Path, dict], tmp_path: Path) -> None:
    _, written = full
    shot = tmp_path / "page.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1200,3000",
                    written["html"].resolve().as_uri()], check=True, timeout=60,
                   capture_output=True)
    assert shot.read_bytes()[:8] == PNG_MAGIC
