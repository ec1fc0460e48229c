"""Benchmark results: JSON on disk and a two-column table on the terminal."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hal.ram import MIB, read_status


def _status_mib(field: str) -> float:
    """A Vm* field of /proc/self/status in MiB (a float for JSON); NaN where /proc is missing."""
    value = (read_status() or {}).get(field)
    return math.nan if value is None else value / MIB


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB; NaN where /proc is missing."""
    return _status_mib("VmHWM")


def rss_mib() -> float:
    """This process's resident set now (VmRSS), MiB; NaN where /proc is missing."""
    return _status_mib("VmRSS")


def quantile(values: list[float], q: float) -> float:
    """The sample at rank floor(q * n) of the sorted values (the last for q near 1)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def table(rows: list[tuple[str, str]], title: str = "") -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)] if title else []
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
