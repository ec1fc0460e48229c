"""Structured logs: one JSON object per line, to stderr and to the journal ring on flash.

    {"ts": 1767225600123, "level": "info", "node": "ecd-00", "event": "meter.ack",
     "meter": "0102030405", "op": "rotate", "height": 12}

``ts`` is wall-clock milliseconds; ``event`` names what happened with a
dotted prefix per layer (``agent.``, ``node.``, ``meter.``, ``link.``,
``console.``); the other keys are the event's fields, bytes shown in hex.
Python ``logging`` records from the cores (``edgekey.*`` loggers) come
through the same path, so nothing prints in another format.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import TextIO

from agent.journal import Journal

LEVELS = ("debug", "info", "warning", "error")


def _plain(value: object) -> object:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


class EventLog:
    """Where the agent's events go (module docstring)."""

    def __init__(self, node: str, *, stream: TextIO = sys.stderr, journal: Journal | None = None,
                 level: str = "info", wall_ms: Callable[[], int] | None = None):
        self.node = node
        self.stream = stream
        self.journal = journal
        self.min_level = LEVELS.index(level)
        self.wall_ms = wall_ms or (lambda: int(time.time() * 1000))
        self.counts: Counter[str] = Counter()

    def event(self, event: str, level: str = "info", **fields: object) -> None:
        self.counts[level] += 1
        if LEVELS.index(level) < self.min_level:
            return
        record = {"ts": self.wall_ms(), "level": level, "node": self.node, "event": event}
        record.update({k: _plain(v) for k, v in fields.items()})
        line = json.dumps(record, separators=(",", ":"), default=str)
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            self.counts["stderr_failed"] += 1  # a closed stderr must not stop the terminal
        if self.journal is not None:
            self.journal.line(line)


class ToEventLog(logging.Handler):
    """Route ``logging`` records into the event log as ``log.<logger>`` events."""

    def __init__(self, log: EventLog):
        super().__init__()
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower()
        try:
            self.log.event(f"log.{record.name}", level if level in LEVELS else "error",
                           message=record.getMessage())
        except Exception:  # a log line must never break the code that logs it
            self.handleError(record)
