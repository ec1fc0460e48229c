"""SIGTERM that unwinds like Ctrl-C, for the desk commands that start processes.

A bench, the demo or an install stopped with SIGTERM (a CI timeout, a kill)
raises KeyboardInterrupt where it stands, so its finally clauses stop the
fleets, services and loop devices it started. Only the main thread can take
signals; elsewhere this does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
