"""The agent's RAM budget: a data-segment rlimit, a usage report, a watchdog check.

The board gives the agent a share of its RAM (``ram.agent_budget_mib``, at
most ``ram.total_mib``; the rest is the OS, etcd, the modem and WAN daemons
and page cache). Going over it must be a clear error inside the agent, never
the kernel's OOM killer picking a victim on a 512 MB terminal. Two guards:

- ``enforce()`` sets the soft ``RLIMIT_DATA`` to the budget. Since Linux 4.7
  RLIMIT_DATA counts every private writable mapping (``VmData``): the brk
  heap, malloc's mmap'd chunks, numpy buffers, pymalloc arenas, thread
  stacks. A request past it fails in ``mmap``/``brk``, so Python raises
  ``MemoryError`` at the allocation and ``guard()`` names the budget.
  RLIMIT_AS would be worse: it also counts shared libraries and reserved but
  inaccessible address space (malloc's per-thread arenas), which is not RAM.
- ``check()`` compares the resident set with the budget, for a watchdog to
  call periodically. It is the only guard where the kernel does not apply
  the rlimit: qemu-user accepts ``setrlimit(RLIMIT_DATA)`` from the guest and
  ignores it (it would limit the emulator itself); ``enforce()`` reads the
  limit back and reports ``effective=False`` there.

How the budget relates to the data segment already in use: the limit covers
the whole process, so the budget is a total, not growth on top of what is
mapped at start. What the agent can still map is ``budget - VmData`` at the
time of ``enforce()`` (``RamLimit.headroom_bytes``). VmData counts mappings,
touched or not, so it is never below the process's private resident memory:
the rlimit is the conservative bound. Each thread's stack (8 MiB by default,
from RLIMIT_STACK) is charged in full, so agent threads should use a small
``threading.stack_size()``. RSS, which ``check()`` watches, also counts
resident pages of shared libraries, which the rlimit does not; under qemu-user
``/proc/self/status`` describes the emulator process, so RSS includes the
emulator's own memory, as the memory cgroup sees it.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hal.require import require_int

if TYPE_CHECKING:
    from hal.board import Board

MIB = 1024 * 1024

PROC_STATUS = Path("/proc/self/status")

# Below this much room under the limit the agent fails at its next step
# (one thread stack is 8 MiB of VmData): refuse at enforce() instead.
MIN_HEADROOM_BYTES = 8 * MIB


def _mib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / MIB:.1f} MiB"


@dataclass(frozen=True)
class RamUsage:
    """One reading of the process's memory, in bytes, against the budget."""

    rss_bytes: int
    peak_rss_bytes: int
    data_bytes: int | None  # VmData; None where /proc is missing
    budget_bytes: int
    source: str  # where the figures came from: /proc/self/status or getrusage

    @property
    def fraction(self) -> float:
        """Current RSS as a fraction of the budget (over 1.0 means over budget)."""
        return self.rss_bytes / self.budget_bytes

    def __str__(self) -> str:
        return (f"RSS {_mib(self.rss_bytes)}, peak RSS {_mib(self.peak_rss_bytes)}, "
                f"data segment {_mib(self.data_bytes)}, {self.fraction:.0%} of the "
                f"{_mib(self.budget_bytes)} budget")


@dataclass(frozen=True)
class RamLimit:
    """What ``enforce()`` left in force, and why it differs from the budget if it does."""

    budget_bytes: int
    soft_bytes: int | None  # RLIMIT_DATA soft limit in force; None = unlimited
    hard_bytes: int | None  # RLIMIT_DATA hard limit, never raised; None = unlimited
    data_at_enforce_bytes: int | None  # VmData when enforce() ran; None without /proc
    effective: bool  # False where the kernel did not apply it (qemu-user)
    notes: tuple[str, ...] = ()

    @property
    def headroom_bytes(self) -> int | None:
        """What the agent could still map after enforce(); None if unknown or unlimited."""
        if self.soft_bytes is None or self.data_at_enforce_bytes is None:
            return None
        return self.soft_bytes - self.data_at_enforce_bytes


class RamBudgetExceeded(MemoryError):
    """The agent went over its RAM budget; the message names budget and usage in MiB.

    A MemoryError, so handlers written for running out of memory still apply.
    """

    def __init__(self, what: str, budget_bytes: int, usage: RamUsage | None = None):
        super().__init__(what, budget_bytes, usage)
        self.what = what
        self.budget_bytes = budget_bytes
        self.usage = usage

    def __str__(self) -> str:
        figures = ("usage unknown" if self.usage is None else
                   f"RSS {_mib(self.usage.rss_bytes)}, peak RSS "
                   f"{_mib(self.usage.peak_rss_bytes)}, data segment "
                   f"{_mib(self.usage.data_bytes)}")
        return (f"agent RAM budget of {_mib(self.budget_bytes)} exceeded ({self.what}): "
                f"{figures}")


def read_status(path: Path = PROC_STATUS) -> dict[str, int] | None:
    """The Vm* lines of /proc/<pid>/status in bytes; None where there is no /proc.

    The one reader of that file: the budget's figures here and the desk
    benchmarks' RSS columns (``tools.report``) come from the same parse.
    """
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and key.startswith("Vm") and len(parts) == 2 and parts[1] == "kB":
            with contextlib.suppress(ValueError):
                out[key] = int(parts[0]) * 1024
    return out


def _maxrss_bytes() -> int:
    """Peak RSS from getrusage: kilobytes on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _rlim(value: int) -> int | None:
    return None if value == resource.RLIM_INFINITY else value


class RamBudget:
    """The agent process's RAM budget: enforce it, report against it, check it."""

    def __init__(self, budget_bytes: int, *, status_path: Path = PROC_STATUS):
        self.budget_bytes = require_int("budget_bytes", budget_bytes, min=1,
                                        type_error=TypeError)
        self.status_path = status_path
        self.limit: RamLimit | None = None  # set by enforce()

    @classmethod
    def from_board(cls, board: Board) -> RamBudget:
        """The budget a board gives the agent (the loader keeps it within ram.total_mib)."""
        return cls(board.ram.agent_budget_bytes)

    def usage(self) -> RamUsage:
        """Current and peak RSS and the data segment, from /proc or else getrusage.

        Without /proc only the peak is known; it stands in for the current RSS
        too, an upper bound, so check() errs on the side of raising.
        """
        status = read_status(self.status_path)
        if status is not None and "VmRSS" in status:
            rss = status["VmRSS"]
            peak = max(status.get("VmHWM", rss), rss)
            return RamUsage(rss, peak, status.get("VmData"), self.budget_bytes,
                            str(self.status_path))
        peak = _maxrss_bytes()
        return RamUsage(peak, peak, None, self.budget_bytes, "getrusage")

    def check(self) -> RamUsage:
        """Raise RamBudgetExceeded if RSS is over the budget; else return the reading.

        The watchdog's guard, and the only one under qemu-user where the rlimit
        is ignored.
        """
        usage = self.usage()
        if usage.rss_bytes > self.budget_bytes:
            raise RamBudgetExceeded("RSS over budget", self.budget_bytes, usage)
        return usage

    def enforce(self) -> RamLimit:
        """Lower the soft RLIMIT_DATA to the budget; return (and keep) what is in force.

        Never loosens a limit: a hard limit is passed back unchanged, and an
        existing soft or hard limit below the budget is kept (and noted).
        Raises RamBudgetExceeded, leaving the old limit, if the data segment
        already leaves less than MIN_HEADROOM_BYTES under the limit.
        """
        data = (read_status(self.status_path) or {}).get("VmData")
        old_soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        target, notes = self.budget_bytes, []
        if _rlim(hard) is not None and hard < target:
            target = hard
            notes.append(f"hard limit {_mib(hard)} is below the budget: kept "
                         "(a hard limit is never raised)")
        if _rlim(old_soft) is not None and old_soft < target:
            target = old_soft
            notes.append(f"soft limit {_mib(old_soft)} is below the budget: kept")
        if target != old_soft:
            resource.setrlimit(resource.RLIMIT_DATA, (target, hard))
        soft_now, hard_now = resource.getrlimit(resource.RLIMIT_DATA)
        effective = soft_now == target
        if not effective:
            notes.append("RLIMIT_DATA was not applied (qemu-user ignores it): "
                         "check() is the only guard")
        limit = RamLimit(self.budget_bytes, _rlim(soft_now), _rlim(hard_now), data,
                         effective, tuple(notes))
        headroom = limit.headroom_bytes
        if effective and headroom is not None and headroom < MIN_HEADROOM_BYTES:
            if soft_now != old_soft:
                resource.setrlimit(resource.RLIMIT_DATA, (old_soft, hard))
            raise RamBudgetExceeded(
                f"data segment already {_mib(data)} at enforce, limit {_mib(target)}, "
                f"at least {_mib(MIN_HEADROOM_BYTES)} headroom needed",
                self.budget_bytes, self.usage())
        self.limit = limit
        return limit

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn a MemoryError in the block into RamBudgetExceeded naming the budget.

        Under the enforced limit an allocation past the budget fails with a bare
        MemoryError; this says whose limit it was and how much was in use.
        Usable as a decorator too.
        """
        try:
            yield
        except RamBudgetExceeded:
            raise
        except MemoryError as exc:
            if self.limit is not None and self.limit.effective:
                what = ("allocation refused at the data-segment limit of "
                        f"{_mib(self.limit.soft_bytes)}")
            else:
                what = "allocation failed, no data-segment limit in force"
            try:
                usage: RamUsage | None = self.usage()
            except MemoryError:
                usage = None
            raise RamBudgetExceeded(what, self.budget_bytes, usage) from exc
