"""What the fleet demo measured, as the run record the report renders (tools/demo_report.py).

Every figure comes from the run's own files and processes, never from a
model: the placement from the signed provisioning the terminals booted
from, commit latencies from the emulated meters' answer logs (one JSON line
per answer, from the meter's first request to its authenticated ACK or
NAK), resources from /proc, routing from ``bench live-routing`` run on the
same machine in the same demo.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from agent import provisioning as prov
from agent.routing.mesh import gabriel_edges
from tools.bench_agent import proc_sample

# The paper's setting (section 3), shown beside ours and labelled as the paper's.
PAPER = {"terminals": 13, "meters": 300, "meters_per_terminal_cap": 25, "wan_rate_mbit_s": 25,
         "area_m": "3500 x 4000", "packet_bytes": 360,
         "note": "the paper's simulation setting (section 3); not measured here"}


def placement(directory: Path) -> dict[str, Any]:
    """Sites, capacities, meters and the WAN mesh from the fleet's signed provisioning."""
    trusted = bytes.fromhex((directory / "utility.pub").read_text().strip())
    p = prov.verify((directory / "provisioning.json").read_bytes(), trusted)
    sites = {t.terminal_id: t.site for t in p.terminals if t.terminal_id not in p.retired}
    counts = Counter(m.home for m in p.meters)
    xs = [xy[0] for xy in sites.values()] + [m.xy[0] for m in p.meters]
    ys = [xy[1] for xy in sites.values()] + [m.xy[1] for m in p.meters]
    return {"area_m": [max(xs, default=0.0), max(ys, default=0.0)],
            "terminals": [{"id": t, "xy": list(xy), "capacity": next(
                x.capacity for x in p.terminals if x.terminal_id == t), "meters": counts[t]}
                for t, xy in sorted(sites.items())],
            "meters": [{"id": m.meter_id.hex(), "xy": list(m.xy), "home": m.home}
                       for m in p.meters],
            "links": [list(e) for e in gabriel_edges(sites)]}


def answers(directory: Path, t0_wall: float) -> list[dict[str, Any]]:
    """Every answer the emulated meters logged, times from ``t0_wall`` (epoch seconds)."""
    out = []
    for path in sorted(directory.glob("*.meter-answers.jsonl")):
        terminal = path.name.split(".")[0]
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                a = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill -9 of the meter process
            out.append({"t_s": round(a["t"] - t0_wall, 3), "latency_ms": a["latency_ms"],
                        "op": a["op"], "outcome": a["outcome"], "terminal": terminal,
                        "meter": a["meter"]})
    out.sort(key=lambda a: a["t_s"])
    return out


def commits_and_outcomes(found: list[dict[str, Any]]) -> tuple[list[dict], dict[str, Any]]:
    """ACKed key operations (readings are accepted, not committed) with their latency, and
    every answer counted by outcome."""
    keyops = [a for a in found if a["op"] != "reading"]
    commits = [{k: a[k] for k in ("t_s", "latency_ms", "op", "terminal")}
               for a in keyops if a["outcome"] == "ACK"]
    committed = Counter(a["op"] for a in keyops if a["outcome"] == "ACK")
    refused = Counter(a["outcome"] for a in keyops if a["outcome"] != "ACK")
    readings = Counter("accepted" if a["outcome"] == "ACK" else a["outcome"]
                       for a in found if a["op"] == "reading")
    return commits, {"committed": dict(committed), "refused": dict(refused),
                     "readings": dict(readings)}


def resources(fleet: dict, budget_mib: float) -> list[dict[str, Any]]:
    """RSS and CPU seconds of each terminal's agent, read from /proc while it runs."""
    out = []
    for t in fleet["terminals"]:
        pid = t.get("processes", {}).get("agent", {}).get("pid")
        try:
            cpu, rss = proc_sample(int(pid))
            with open(f"/proc/{int(pid)}/status") as f:
                peak = next((int(line.split()[1]) * 1024 for line in f
                             if line.startswith("VmHWM:")), rss)
        except (OSError, TypeError, ValueError, StopIteration):
            continue  # not running (retired, or killed and not back)
        out.append({"terminal": t["id"], "rss_mib": round(rss / 2**20, 1),
                    "peak_rss_mib": round(peak / 2**20, 1), "cpu_s": round(cpu, 2),
                    "budget_mib": budget_mib})
    return out


def routing(result: dict[str, Any]) -> dict[str, Any]:
    """``bench live-routing``'s runs in the report's shape: one entry per method."""
    out: dict[str, Any] = {}
    for r in result["runs"]:
        seconds = r["duration_s"]
        out[r["method"]] = {
            "links": {lk: {"bytes": round(bps * seconds / 8), "bps": bps}
                      for lk, bps in r["links_bps"].items()},
            "load_balance_degree": r["load_balance_degree"],
            "commit_p50_ms": r["commit_p50_ms"], "commit_p99_ms": r["commit_p99_ms"],
            "duration_s": seconds, "mean_hops": r["mean_hops"], "max_hops": r["max_hops"],
            "busiest_link_utilisation": r["busiest_link_utilisation"],
            "wan_rate_mbit": r["wan_rate_mbit"], "committed_per_s": r["committed_per_s"]}
    return out


def placement_events(directory: Path, t0_wall: float) -> dict[str, list[dict[str, Any]]]:
    """The terminals' placement decisions from their logs: migrations, site moves, re-plans
    and meters placed elsewhere, times from ``t0_wall``."""
    out: dict[str, list[dict[str, Any]]] = {"migrations": [], "site_moves": [], "replans": [],
                                            "elsewhere": []}
    for path in sorted(directory.glob("*.agent.log")):
        terminal = path.name.split(".")[0]
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if '"placement.' not in line:
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            t = round(e["ts"] / 1000 - t0_wall, 3)
            kind = e["event"].partition(".")[2]
            if kind == "migrated":
                out["migrations"].append({"t_s": t, "meter": e["meter"], "from": terminal,
                                          "to": e["to"], "height": e["height"],
                                          "why": "room for a joining meter"})
            elif kind == "site_moved":
                out["site_moves"].append({"t_s": t, "terminal": terminal,
                                          "old_xy": e["old_xy"], "new_xy": e["new_xy"]})
            elif kind == "replan_needed":
                out["replans"].append({"t_s": t, "terminals": e["terminals"],
                                       "reason": e["reason"], "migrations": 0,
                                       "meter": e["meter"]})
            elif kind == "assigned_elsewhere":
                out["elsewhere"].append({"t_s": t, "meter": e["meter"], "heard_by": terminal,
                                         "home": e["home"]})
    for rows in out.values():
        rows.sort(key=lambda r: r["t_s"])
    return out
