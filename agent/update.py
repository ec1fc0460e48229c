"""The terminal's side of a signed A/B update: RAUC does it, the console drives it.

``update install FILE`` starts ``rauc install FILE`` as a child of the agent:
RAUC's service on the board (started by its init system, system.conf with
our custom bootloader backend, hal/bootctl.py) checks the bundle's signature
against the fleet's update CA, its compatible string and version (the
pre-install handler refuses a downgrade), writes the inactive slot and only
then makes it primary. The agent's loop is never blocked: ``update status``
shows the A/B boot state from the flash's boot partition and how the last
install went. ``update reboot`` stops the agent cleanly with
``REBOOT_BOARD_STATUS``, which the board's supervisor turns into a reboot
into whatever the bootloader chooses; the new slot then has to pass its
boot health check (reaching ``agent.ready``) or it is rolled back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from hal import bootstate as bs
from hal.board import Board
from hal.bootctl import describe

REBOOT_BOARD_STATUS = 76  # the agent's exit status that asks the board's supervisor to reboot
OUTPUT_KEPT = 4000  # characters of rauc's output kept for `update status`
STAGING_MARGIN = 4 << 20  # bytes left free where a bundle is staged


class UpdateRefused(Exception):
    """An update command that cannot run here; the message says why."""


@dataclass
class Install:
    bundle: str
    proc: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)
    status: int | None = None
    seconds: float | None = None

    def poll(self) -> int | None:
        if self.status is None and self.proc.poll() is not None:
            self.status = self.proc.returncode
            self.seconds = time.monotonic() - self.started
        return self.status

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-OUTPUT_KEPT:]
        except OSError:
            return ""


class Updater:
    """One install at a time, run by ``rauc`` (the system's own), watched from the loop."""

    def __init__(self, flash: Path, board: Board, scratch: Path,
                 service_log: Path | None = None):
        self.flash, self.board, self.scratch = flash, board, scratch
        self.service_log = service_log  # the RAUC service's own output, on the board
        self.install: Install | None = None

    def start(self, bundle: str) -> Install:
        if self.install is not None and self.install.poll() is None:
            raise UpdateRefused(f"an install of {self.install.bundle} is running")
        rauc = shutil.which("rauc")
        if rauc is None:
            raise UpdateRefused("no rauc on this terminal: updates are installed from the desk "
                                "(edgekey flash install)")
        if not os.path.isfile(bundle):
            raise UpdateRefused(f"no bundle {bundle}")
        self.scratch.mkdir(parents=True, exist_ok=True)
        size = os.path.getsize(bundle)
        free = shutil.disk_usage(self.scratch).free
        if size + STAGING_MARGIN > free:
            raise UpdateRefused(f"bundle {bundle} is {size} bytes; {self.scratch} has {free} "
                                "free to stage it")
        log = self.scratch / "update.log"
        staged = self.scratch / "staged.raucb"
        # Staged first, then installed: RAUC looks up the device a bundle lives on, which
        # a network or 9p share (the update medium) does not have; the copy is ours alone.
        with open(log, "wb") as out:
            proc = subprocess.Popen(["/bin/sh", "-c", 'cp -- "$1" "$2" && exec "$3" install "$2"',
                                     "stage", bundle, str(staged), rauc],
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        self.install = Install(bundle, proc, log)
        return self.install

    def status(self) -> dict:
        state = bs.read(self.flash, self.board)
        data: dict = {"primary": state.primary, "booted": state.booted, "slots": {
            name: {"partition": bs.PARTITIONS[name], "state": state.slot(name).state,
                   "attempts": state.slot(name).attempts,
                   "version": (state.slot(name).image.version if state.slot(name).image
                               else None)} for name in bs.SLOTS},
            "pending": state.pending[0] if state.pending else None,
            "lines": describe(state)}
        inst = self.install
        if inst is not None:
            status = inst.poll()
            output = inst.output().strip()
            data["install"] = {
                "bundle": inst.bundle,
                "state": "running" if status is None else ("done" if status == 0 else "failed"),
                "exit": status, "seconds": None if inst.seconds is None else round(inst.seconds, 1),
                "last": output.splitlines()[-1] if output else ""}
            if status not in (None, 0) and self.service_log is not None:
                try:  # why RAUC refused: its client says only "D-Bus error"
                    tail = self.service_log.read_text(errors="replace").strip().splitlines()
                except OSError:
                    tail = []
                data["install"]["service"] = tail[-6:]
        return data
