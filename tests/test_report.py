"""The desk benchmarks' RSS columns (tools/report.py): hal.ram's /proc figures in MiB."""

from __future__ import annotations

import math

import pytest

from hal import ram
from hal.ram import MIB
from tools import report


def test_rss_columns_are_the_status_figures_in_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    figures = {"VmRSS": 51200 * 1024, "VmHWM": 102401 * 1024}
    monkeypatch.setattr(report, "read_status", lambda: figures)
    assert report.rss_mib() == 50.0
    assert report.peak_rss_mib() == 102401 / 1024


def test_rss_columns_are_nan_where_proc_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "read_status", lambda: None)
    assert math.isnan(report.rss_mib()) and math.isnan(report.peak_rss_mib())
    monkeypatch.setattr(report, "read_status", lambda: {"VmData": MIB})  # no RSS lines
    assert math.isnan(report.rss_mib()) and math.isnan(report.peak_rss_mib())


@pytest.mark.skipif(not ram.PROC_STATUS.exists(), reason="needs /proc/self/status")
def test_rss_columns_read_this_process() -> None:
    assert report.rss_mib() > 0 and report.peak_rss_mib() >= report.rss_mib() * 0.9
