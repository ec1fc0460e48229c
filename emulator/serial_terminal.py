"""A terminal that is already running, reached only through its serial ports.

Hardware in the loop: the console UART and the meter link (HPLC modem or
RS-485 adapter) of a real terminal on the desk, e.g. ``/dev/ttyUSB0`` and
``/dev/ttyUSB1``, opened by pyserial URL at the board's baud rate. The same
class speaks to the QEMU board through the ptys QEMU gives its PL011 UART and
second UART, so the HIL tests run in CI without hardware. Nothing here starts
or stops the terminal; ``meters`` are the provisioned meters' rows (id and
factory key) the tests speak for.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import serial

from emulator.agent_harness import ConsoleSpeaker


class SerialTerminal(ConsoleSpeaker):
    def __init__(self, console_url: str, link_url: str, meters: list[dict], *,
                 baud: int = 115200, link_baud: int = 115200):
        self._ports: list[serial.SerialBase] = []
        try:
            for url, rate in ((console_url, baud), (link_url, link_baud)):
                self._ports.append(serial.serial_for_url(url, baudrate=rate, timeout=0))
        except serial.SerialException:
            self.close()
            raise
        self.console_m = self._ports[0].fileno()
        self.link_m = self._ports[1].fileno()
        self.meters = meters
        self._console_buf = bytearray()

    @classmethod
    def from_meters_file(cls, console_url: str, link_url: str, meters_file: Path,
                         **rates: int) -> SerialTerminal:
        return cls(console_url, link_url, json.loads(meters_file.read_text()), **rates)

    def wait_console(self, timeout: float) -> float:
        """Until the agent's shell answers (it may still be booting); seconds waited.

        Only a bare CR is sent until a prompt shows: a control character on a console
        the agent has not yet put in raw mode would reach the line discipline (^C is a
        signal there), so the resync that skips junk runs once the shell is listening."""
        from emulator.agent_harness import PROMPT

        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            try:
                self.read_until(PROMPT, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
                break
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no console prompt in {timeout:.0f} s; read "
                                       f"{bytes(self._console_buf[-400:])!r}") from None
                os.write(self.console_m, b"\r")
        self.resync(timeout=max(10.0, deadline - time.monotonic()))
        return time.monotonic() - t0

    def read_until(self, mark: bytes, timeout: float, start: bytes = b"") -> bytes:
        """What the console says (boot messages, say) up to and with ``mark``, after
        ``start`` if given (the text a previous call returned)."""
        import select

        deadline = time.monotonic() + timeout
        base = len(start) if start and bytes(self._console_buf).startswith(start) else 0
        while True:
            i = self._console_buf.find(mark, base)
            if i >= 0:
                return bytes(self._console_buf[:i + len(mark)])
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"console never said {mark!r}; read "
                                   f"{bytes(self._console_buf[-400:])!r}")
            r, _, _ = select.select([self.console_m], [], [], min(left, 0.5))
            if r:
                self._console_buf += os.read(self.console_m, 65536)

    def close(self) -> None:
        for port in self._ports:
            port.close()
        self._ports = []

    def __enter__(self) -> SerialTerminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
