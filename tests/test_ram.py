"""The agent's RAM budget (hal/ram.py): usage figures, the watchdog check, the rlimit.

The rlimit logic is tested against a fake ``resource`` here (it runs under
qemu-user, which ignores RLIMIT_DATA) and against the host kernel in child
processes (host_only): going over the budget must be a clear error, not an
OOM kill.
"""

from __future__ import annotations

import json
import mmap
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hal.board import BOARD_DIR, load_board
from hal.ram import MIB, RamBudget, RamBudgetExceeded, RamLimit, RamUsage, read_status

ROOT = Path(__file__).resolve().parent.parent
INF = resource.RLIM_INFINITY
HAS_PROC = Path("/proc/self/status").exists()
needs_proc = pytest.mark.skipif(not HAS_PROC, reason="needs /proc/self/status")


def _status_file(tmp: Path, rss_kib: int, hwm_kib: int, data_kib: int) -> Path:
    """A /proc/self/status look-alike, with the lines around the Vm* ones."""
    path = tmp / "status"
    path.write_text(
        "Name:\tpython3\nState:\tR (running)\nVmPeak:\t 900000 kB\n"
        f"VmHWM:\t{hwm_kib:8d} kB\nVmRSS:\t{rss_kib:8d} kB\n"
        f"VmData:\t{data_kib:8d} kB\nVmStk:\t     132 kB\nThreads:\t1\n",
        encoding="ascii")
    return path


# ------------------------------------------------------------------ usage

@needs_proc
def test_usage_reports_peak_at_or_above_current_and_both_positive() -> None:
    budget = RamBudget(192 * MIB)
    u = budget.usage()
    assert u.rss_bytes > 0
    assert u.peak_rss_bytes >= u.rss_bytes
    assert u.data_bytes is not None and u.data_bytes > 0
    assert u.budget_bytes == 192 * MIB
    assert u.fraction == pytest.approx(u.rss_bytes / (192 * MIB))


@needs_proc
def test_touching_50_mb_raises_rss_by_about_that_and_peak_remembers_it() -> None:
    budget = RamBudget(1 << 40)
    before = budget.usage()
    # A fresh anonymous mapping, written, so every page is newly resident. (A bytes
    # object could come from heap memory earlier tests left resident, and grow nothing.)
    buf = mmap.mmap(-1, 50 * MIB)
    chunk = b"\x5a" * MIB
    for offset in range(0, 50 * MIB, MIB):
        buf[offset:offset + MIB] = chunk
    during = budget.usage()
    assert buf[-1] == 0x5A
    buf.close()  # unmapped at once
    after = budget.usage()
    grew = during.rss_bytes - before.rss_bytes
    assert 45 * MIB <= grew <= 70 * MIB, f"RSS grew {grew / MIB:.1f} MiB for 50 MiB touched"
    assert during.peak_rss_bytes >= during.rss_bytes
    # The kernel's high-water mark is kept from per-CPU counters, so it may read a
    # little below an earlier exact RSS; it must still hold the 50 MiB excursion.
    assert after.peak_rss_bytes >= before.rss_bytes + 45 * MIB
    assert during.rss_bytes - after.rss_bytes >= 45 * MIB


def test_status_reader_keeps_only_the_vm_lines_in_bytes(tmp_path: Path) -> None:
    path = _status_file(tmp_path, rss_kib=51200, hwm_kib=102400, data_kib=204800)
    assert read_status(path) == {"VmPeak": 900000 * 1024, "VmHWM": 100 * MIB,
                                 "VmRSS": 50 * MIB, "VmData": 200 * MIB, "VmStk": 132 * 1024}
    assert read_status(tmp_path / "no-proc") is None


def test_usage_reads_the_status_figures_in_bytes(tmp_path: Path) -> None:
    path = _status_file(tmp_path, rss_kib=51200, hwm_kib=102400, data_kib=204800)
    u = RamBudget(128 * MIB, status_path=path).usage()
    assert (u.rss_bytes, u.peak_rss_bytes, u.data_bytes) == (50 * MIB, 100 * MIB, 200 * MIB)
    assert u.fraction == pytest.approx(50 / 128)
    assert u.source == str(path)
    assert str(u) == ("RSS 50.0 MiB, peak RSS 100.0 MiB, data segment 200.0 MiB, "
                      "39% of the 128.0 MiB budget")


@needs_proc
def test_usage_falls_back_to_getrusage_peak_without_proc(tmp_path: Path) -> None:
    proc_peak = RamBudget(MIB).usage().peak_rss_bytes
    u = RamBudget(MIB, status_path=tmp_path / "no-proc").usage()
    assert u.source == "getrusage"
    assert u.data_bytes is None
    # ru_maxrss is the high-water mark VmHWM shows (both from per-CPU counters).
    assert u.peak_rss_bytes >= 0.9 * proc_peak > 0
    assert u.rss_bytes == u.peak_rss_bytes  # current unknown: the peak bounds it


def test_budget_comes_from_the_board_agent_share() -> None:
    board = load_board(BOARD_DIR / "pl-terminal.toml")
    budget = RamBudget.from_board(board)
    assert budget.budget_bytes == board.ram.agent_budget_mib * MIB == 192 * MIB


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-MIB, ValueError),
                                        (True, TypeError), (1.5e8, TypeError)])
def test_non_positive_or_non_int_budget_is_refused(bad: object, error: type) -> None:
    with pytest.raises(error):
        RamBudget(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------ check

def test_check_passes_and_returns_the_reading_under_budget() -> None:
    u = RamBudget(1 << 40).check()
    assert isinstance(u, RamUsage)
    assert u.fraction < 1


def test_check_raises_naming_budget_rss_peak_and_data_in_mib(tmp_path: Path) -> None:
    path = _status_file(tmp_path, rss_kib=153600, hwm_kib=204800, data_kib=307200)
    with pytest.raises(RamBudgetExceeded) as info:
        RamBudget(100 * MIB, status_path=path).check()
    assert str(info.value) == ("agent RAM budget of 100.0 MiB exceeded (RSS over budget): "
                               "RSS 150.0 MiB, peak RSS 200.0 MiB, data segment 300.0 MiB")
    assert info.value.budget_bytes == 100 * MIB
    assert info.value.usage is not None and info.value.usage.rss_bytes == 150 * MIB


def test_check_allows_rss_exactly_at_budget_and_refuses_one_page_more(tmp_path: Path) -> None:
    at = _status_file(tmp_path, rss_kib=131072, hwm_kib=131072, data_kib=131072)
    assert RamBudget(128 * MIB, status_path=at).check().fraction == 1.0
    over = _status_file(tmp_path, rss_kib=131076, hwm_kib=131076, data_kib=131076)
    with pytest.raises(RamBudgetExceeded):
        RamBudget(128 * MIB, status_path=over).check()


@needs_proc
def test_check_raises_when_budget_is_below_the_live_process() -> None:
    with pytest.raises(RamBudgetExceeded) as info:
        RamBudget(MIB).check()
    u = info.value.usage
    assert u is not None and u.rss_bytes > MIB
    message = str(info.value)
    assert "budget of 1.0 MiB exceeded" in message
    assert f"RSS {u.rss_bytes / MIB:.1f} MiB" in message
    assert f"peak RSS {u.peak_rss_bytes / MIB:.1f} MiB" in message


def test_budget_exceeded_is_a_memory_error_so_oom_handlers_still_apply() -> None:
    assert issubclass(RamBudgetExceeded, MemoryError)


# ------------------------------------------------------------------ guard

def test_guard_turns_memory_error_into_budget_exceeded_with_cause() -> None:
    budget = RamBudget(64 * MIB)
    original = MemoryError()
    with pytest.raises(RamBudgetExceeded) as info, budget.guard():
        raise original
    assert info.value.__cause__ is original
    assert str(info.value).startswith("agent RAM budget of 64.0 MiB exceeded (allocation failed, "
                                      "no data-segment limit in force): RSS ")


def test_guard_names_the_enforced_limit() -> None:
    budget = RamBudget(128 * MIB)
    budget.limit = RamLimit(128 * MIB, 96 * MIB, 96 * MIB, 20 * MIB, effective=True)
    refused = r"refused at the data-segment limit of 96\.0 MiB"
    with pytest.raises(RamBudgetExceeded, match=refused), budget.guard():
        raise MemoryError


def test_guard_lets_other_errors_and_budget_errors_through_unchanged() -> None:
    budget = RamBudget(64 * MIB)
    inner = RamBudgetExceeded("RSS over budget", 32 * MIB)
    with pytest.raises(RamBudgetExceeded) as info, budget.guard():
        raise inner
    assert info.value is inner
    with pytest.raises(ValueError, match="not memory"), budget.guard():
        raise ValueError("not memory")


# ------------------------------------------------------------------ enforce (fake kernel)

class FakeRlimit:
    """RLIMIT_DATA as the kernel keeps it; ``applies=False`` is qemu-user ignoring it."""

    def __init__(self, soft: int, hard: int, applies: bool = True):
        self.soft, self.hard, self.applies = soft, hard, applies
        self.calls: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_DATA
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_DATA
        self.calls.append(limits)
        soft, hard = limits
        if hard != INF and (self.hard == INF or hard > self.hard):
            raise ValueError("not allowed to raise maximum limit")
        if hard != INF and (soft == INF or soft > hard):
            raise ValueError("current limit exceeds maximum limit")
        if self.applies:
            self.soft, self.hard = soft, hard

    def patch(self) -> Any:
        """Stand in for the kernel's RLIMIT_DATA while the block runs."""
        return mock.patch.multiple(resource, getrlimit=self.getrlimit,
                                   setrlimit=self.setrlimit)


@pytest.mark.parametrize(
    "soft, hard, expect_soft, note",
    [(INF, INF, 128 * MIB, None),
     (INF, 1024 * MIB, 128 * MIB, None),
     (64 * MIB, 64 * MIB, 64 * MIB, "hard limit 64.0 MiB is below the budget: kept"),
     (100 * MIB, INF, 100 * MIB, "soft limit 100.0 MiB is below the budget: kept"),
     (256 * MIB, 512 * MIB, 128 * MIB, None)],
    ids=["unlimited", "hard-above-budget", "hard-below-budget", "soft-below-budget",
         "soft-above-budget"])
def test_enforce_lowers_only_the_soft_limit_and_keeps_stricter_ones(
        tmp_path: Path, soft: int, hard: int, expect_soft: int, note: str | None) -> None:
    fake = FakeRlimit(soft, hard)
    status = _status_file(tmp_path, rss_kib=20480, hwm_kib=20480, data_kib=30720)
    with fake.patch():
        limit = RamBudget(128 * MIB, status_path=status).enforce()
    assert (fake.soft, fake.hard) == (expect_soft, hard)
    assert all(h == hard for _, h in fake.calls)
    assert limit.effective
    assert limit.soft_bytes == expect_soft
    assert limit.hard_bytes == (None if hard == INF else hard)
    assert limit.data_at_enforce_bytes == 30 * MIB
    assert limit.headroom_bytes == expect_soft - 30 * MIB
    assert (note in " ".join(limit.notes)) if note else limit.notes == ()


def test_enforce_records_the_limit_it_left(tmp_path: Path) -> None:
    budget = RamBudget(128 * MIB, status_path=tmp_path / "no-proc")
    with FakeRlimit(INF, INF).patch():
        limit = budget.enforce()
    assert budget.limit is limit
    assert limit.data_at_enforce_bytes is None and limit.headroom_bytes is None


def test_enforce_reports_not_effective_where_the_kernel_ignores_it(tmp_path: Path) -> None:
    fake = FakeRlimit(INF, INF, applies=False)
    # VmData of the emulator process is over the budget; not the guest's, so no error.
    status = _status_file(tmp_path, rss_kib=60000, hwm_kib=60000, data_kib=300000)
    with fake.patch():
        limit = RamBudget(128 * MIB, status_path=status).enforce()
    assert not limit.effective
    assert limit.soft_bytes is None
    assert any("check() is the only guard" in n for n in limit.notes)


def test_enforce_refuses_a_budget_the_data_segment_already_fills(tmp_path: Path) -> None:
    fake = FakeRlimit(INF, INF)
    status = _status_file(tmp_path, rss_kib=100000, hwm_kib=100000, data_kib=125 * 1024)
    budget = RamBudget(128 * MIB, status_path=status)
    with fake.patch(), pytest.raises(RamBudgetExceeded) as info:
        budget.enforce()
    assert "data segment already 125.0 MiB at enforce, limit 128.0 MiB" in str(info.value)
    assert (fake.soft, fake.hard) == (INF, INF)  # the old limit is back
    assert budget.limit is None


_limits = st.one_of(st.just(INF), st.integers(1, 1 << 34))


@given(soft=_limits, hard=_limits, budget=st.integers(1, 1 << 34))
def test_enforce_never_raises_a_limit_and_ends_at_the_strictest(
        soft: int, hard: int, budget: int) -> None:
    if hard != INF and (soft == INF or soft > hard):
        soft = hard  # the kernel keeps soft <= hard
    fake = FakeRlimit(soft, hard)
    with fake.patch():
        limit = RamBudget(budget, status_path=Path("/nonexistent/status")).enforce()
    assert fake.hard == hard
    assert fake.soft == min(v for v in (soft, hard, budget) if v != INF)
    assert limit.soft_bytes == fake.soft and limit.effective


# ------------------------------------------------------------------ enforce (host kernel)

_CHILD = textwrap.dedent("""
    import json, resource, sys
    from hal.ram import MIB, RamBudget
    budget = RamBudget(128 * MIB)
    limit = budget.enforce()
    with budget.guard():
        buf = b"\\x5a" * int(sys.argv[1])
    print(json.dumps({"allocated": len(buf), "headroom": limit.headroom_bytes,
                      "data": limit.data_at_enforce_bytes,
                      "rlimit": resource.getrlimit(resource.RLIMIT_DATA)}))
""")


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.host_only
def test_child_allocating_512_mb_over_128_mib_budget_gets_a_clear_error_not_oom_kill() -> None:
    proc = _run(_CHILD, str(512 * 10**6))
    assert proc.returncode == 1, (proc.returncode, proc.stderr)  # an exception, not a signal
    assert proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hal.ram.RamBudgetExceeded: agent RAM budget of 128.0 MiB exceeded "
                           "(allocation refused at the data-segment limit of 128.0 MiB): RSS ")
    assert "MemoryError" in proc.stderr  # the cause is kept


@pytest.mark.host_only
def test_child_allocating_16_mb_under_128_mib_budget_succeeds() -> None:
    proc = _run(_CHILD, str(16 * 10**6))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["allocated"] == 16 * 10**6
    assert out["rlimit"] == [128 * MIB, resource.getrlimit(resource.RLIMIT_DATA)[1]]
    assert out["headroom"] == 128 * MIB - out["data"] > 16 * 10**6


_HARD_CHILD = textwrap.dedent("""
    import json, resource, sys
    from hal.ram import MIB, RamBudget
    hard = int(sys.argv[1]) * MIB
    resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
    limit = RamBudget(128 * MIB).enforce()
    print(json.dumps({"rlimit": resource.getrlimit(resource.RLIMIT_DATA),
                      "notes": limit.notes, "effective": limit.effective}))
""")


@pytest.mark.host_only
@pytest.mark.parametrize("hard_mib, soft_mib", [(96, 96), (1024, 128)])
def test_enforce_in_the_kernel_never_raises_the_hard_limit(hard_mib: int, soft_mib: int) -> None:
    proc = _run(_HARD_CHILD, str(hard_mib))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["rlimit"] == [soft_mib * MIB, hard_mib * MIB]
    assert out["effective"] is True
    assert any("hard limit" in n for n in out["notes"]) == (hard_mib < 128)
