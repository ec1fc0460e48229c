"""One provisioned terminal on the QEMU board, powered on and off, driven over its console.

What the board tests and ``edgekey bench board`` share: ``power_on`` boots the
board (tools/board_cmd.py) and waits for the agent's shell on the PL011 UART;
``power_off`` stops it cleanly or cuts the power (QEMU killed); ``install``
runs ``update install`` on a bundle of the share (the board's update medium,
read-only at /mnt/update) until RAUC is done; ``reboot`` is ``update reboot``
and the wait for the shell to answer again; ``settled`` is the update status
once the booted slot's health check has passed.
"""

from __future__ import annotations

import time
from pathlib import Path

from emulator.serial_terminal import SerialTerminal

HEALTHY_ATTEMPTS = 3  # hal/bootstate.py's ATTEMPTS: a slot marked good has them all


class BoardSession:
    def __init__(self, term: object, share: Path | None = None):
        self.term = term  # tools.board_cmd.Terminal
        self.share, self.boots = share, 0
        self.vm: object | None = None  # emulator.qemu_board.BoardVM while powered
        self.t: SerialTerminal | None = None
        self.console_s: float | None = None  # power-on to the console's first answer

    def power_on(self, *, wait: bool = True) -> SerialTerminal:
        from tools.board_cmd import CONSOLE_TIMEOUT_S, power_on

        self.boots += 1
        vm = power_on(self.term, self.term.dir / f"vm{self.boots}",  # type: ignore[attr-defined]
                      share=self.share)
        self.vm = vm
        self.t = SerialTerminal.from_meters_file(vm.console_path, vm.link_path,
                                                 self.term.meters_file)  # type: ignore[attr-defined]
        if wait:
            self.t.wait_console(CONSOLE_TIMEOUT_S)
            self.console_s = time.monotonic() - vm.started
        return self.t

    def power_off(self, *, cut: bool) -> None:
        if self.t is not None:
            self.t.close()
            self.t = None
        if self.vm is not None:
            self.vm.kill() if cut else self.vm.stop()  # type: ignore[attr-defined]
            self.vm = None

    def console_json(self, line: str) -> dict:
        assert self.t is not None, "the board is off"
        return self.t.console_json(line)  # type: ignore[return-value]

    def status(self) -> dict:
        return self.console_json("update status")

    def settled(self, timeout: float = 30.0) -> dict:
        """The update status once the booted slot is marked good again (the supervisor does
        it as the agent says agent.ready, which can be just after the console answers)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if (st["slots"][st["booted"]]["attempts"] == HEALTHY_ATTEMPTS
                    or time.monotonic() > deadline):
                return st
            time.sleep(0.5)

    def install(self, name: str, timeout: float = 180.0) -> dict:
        """``update install`` of a bundle on the share, until RAUC has finished with it."""
        assert self.t is not None, "the board is off"
        body, status = self.t.console(f"update install /mnt/update/{name}")
        if status != "OK":
            raise RuntimeError(f"update install {name}: {status} {body}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if st["install"]["state"] != "running":
                return st
            time.sleep(0.5)
        raise TimeoutError(f"install of {name} still running after {timeout} s")

    def reboot(self) -> float:
        """``update reboot``: the agent stops, the supervisor reboots the board in place
        (QEMU resets, the ptys stay); returns the seconds until the console answers again."""
        from tools.board_cmd import CONSOLE_TIMEOUT_S

        assert self.t is not None, "the board is off"
        body, status = self.t.console("update reboot")
        if status != "OK":
            raise RuntimeError(f"update reboot: {status} {body}")
        self.t._console_buf.clear()
        return self.t.wait_console(CONSOLE_TIMEOUT_S)
