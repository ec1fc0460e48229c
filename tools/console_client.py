"""``edgekey console``: drive a terminal's serial console shell from the desk.

``ConsoleClient`` opens the console by pyserial URL (a UART, a pty,
``socket://``, ``rfc2217://``), synchronises with the shell, turns its echo
off so replies are clean, and runs one command line at a time: the reply is
the lines up to the shell's status line (``OK`` or ``ERR <CODE> <reason>``)
and the prompt that follows it.

Synchronising does not trust whatever was on the line before: it abandons
any half-typed line (Ctrl-C), turns echo on, types a random token, erases it
(Ctrl-U) and turns echo off. The echo of that token followed by the ``OK`` of
``echo off`` and the prompt can only be the answer to this sync, so stale
output (a previous client's, or a flood of garbage's) is skipped
deterministically, and the sync leaves no error in the shell's counters or
its ``retval``.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
import time
from dataclasses import dataclass
from types import TracebackType

import serial

from agent.console.shell import DEFAULT_MAX_LINE, DEFAULT_PROMPT

PROMPT = DEFAULT_PROMPT.encode()
# The shell's line limit: a longer line could only be answered E2BIG.
MAX_LINE = DEFAULT_MAX_LINE
# Bytes the shell uses to edit a line: inside a command they would change or
# abandon it, and its answer would not be the command's.
_EDITING = frozenset("\x03\x08\x15\x7f")
# One read waits this long at most, so the overall deadline is checked often.
READ_SLICE_S = 0.05
# A reply is cut by the shell at 64 KiB; anything this long is not our shell.
MAX_REPLY_BYTES = 4 * 1024 * 1024
# While syncing only the tail matters; keep this much of what was skipped.
SYNC_KEEP_BYTES = 65536
_STATUS = re.compile(rb"OK|ERR [A-Z0-9]+(?: [^\r\n]*)?")


class ConsoleError(Exception):
    """The console did not answer as a shell does."""


class ConsoleTimeout(ConsoleError):
    """No complete answer in time; ``received`` holds what was read so far."""

    def __init__(self, message: str, received: bytes) -> None:
        super().__init__(message)
        self.received = received


@dataclass(frozen=True)
class Result:
    """One command's answer: its status (``code``/``reason`` None when OK) and its body."""

    ok: bool
    code: str | None
    reason: str | None
    body: str

    @property
    def status(self) -> str:
        """The status line as the shell printed it."""
        return "OK" if self.ok else f"ERR {self.code} {self.reason}".rstrip()


class ConsoleClient:
    """A shell's console opened by pyserial URL; ``run(line)`` gives the ``Result``."""

    def __init__(self, url: str, *, baud: int = 115200, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout
        self._port = serial.serial_for_url(url, baudrate=baud, timeout=READ_SLICE_S)
        self._synced = False
        self._echo = True  # what the shell does until we turn it off

    def __enter__(self) -> ConsoleClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._port.close()

    def sync(self) -> None:
        """Find the prompt, past any stale output, and turn the shell's echo off."""
        self._synced = False
        self._port.reset_input_buffer()
        token = secrets.token_hex(8).encode()
        self._port.write(b"\x03echo on\r" + token + b"\x15echo off\r")
        expect = PROMPT + token + b"\b \b" * len(token) + b"echo off\r\nOK\r\n" + PROMPT
        buf = bytearray()
        deadline = time.monotonic() + self.timeout
        while not buf.endswith(expect):
            self._read_into(buf, deadline, "prompt")
            if len(buf) > SYNC_KEEP_BYTES:
                del buf[:-SYNC_KEEP_BYTES]
        self._echo = False
        self._synced = True

    def run(self, line: str) -> Result:
        """Run one command line; a blank line is not sent (the shell gives it no status)."""
        if "\r" in line or "\n" in line:
            raise ValueError("a command line cannot contain CR or LF")
        if _EDITING.intersection(line):
            raise ValueError("a command line cannot contain line-editing bytes "
                             "(Ctrl-C, Ctrl-U, backspace, DEL)")
        data = line.encode("utf-8")
        if len(data) > MAX_LINE:
            raise ValueError(f"command line longer than {MAX_LINE} bytes")
        if not line.strip(" "):
            return Result(True, None, None, "")
        if not self._synced:
            self.sync()
        self.write_raw(data + b"\r")
        result = self.read_result(echoed=data if self._echo else None)
        if result.ok and line.split() in (["echo", "on"], ["echo", "off"]):
            self._echo = line.split()[1] == "on"
        return result

    def write_raw(self, data: bytes) -> None:
        """Bytes to the console as they are (tests, and lines ``run`` refuses)."""
        self._port.write(data)

    def read_result(self, echoed: bytes | None = None) -> Result:
        """Read up to a status line and the prompt; ``echoed``: the line echo to skip."""
        buf = bytearray()
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                found = _split_reply(buf)
                if found is not None:
                    break
                self._read_into(buf, deadline, "status line")
                if len(buf) > MAX_REPLY_BYTES:
                    raise ConsoleError(f"{self.url}: reply longer than {MAX_REPLY_BYTES} bytes "
                                       "without a status line")
        except ConsoleError:
            self._synced = False  # what comes next may be the rest of this reply
            raise
        body, status = found
        if echoed is not None and body.startswith(echoed + b"\r\n"):
            body = body[len(echoed) + 2:]
        text = body.decode("utf-8", "replace").replace("\r\n", "\n").removesuffix("\n")
        if status == b"OK":
            return Result(True, None, None, text)
        _, code, *reason = status.decode("utf-8", "replace").split(" ", 2)
        return Result(False, code, reason[0] if reason else "", text)

    def _read_into(self, buf: bytearray, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise ConsoleTimeout(f"{self.url}: no {what} within {self.timeout:g} s; "
                                 f"read so far: {bytes(buf[-200:])!r}", bytes(buf))
        buf += self._port.read(max(1, self._port.in_waiting))


def _split_reply(buf: bytearray) -> tuple[bytes, bytes] | None:
    """(body, status line) when ``buf`` ends with a status line and the prompt."""
    if not buf.endswith(b"\r\n" + PROMPT):
        return None
    end = len(buf) - len(PROMPT) - 2
    start = buf.rfind(b"\r\n", 0, end)
    start = 0 if start < 0 else start + 2
    status = bytes(buf[start:end])
    if not _STATUS.fullmatch(status):
        return None
    return bytes(buf[:start]), status


# ------------------------------------------------------------------ the CLI

def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``console`` with its options; its handler is ``run``."""
    p = sub.add_parser(
        "console", help="a terminal's serial console: run commands, or type them",
        description="Open a terminal's console shell by pyserial URL (/dev/ttyUSB0, a pty, "
                    "socket://host:port) and run commands: with -c in order, else read them "
                    "from stdin. Exit status: the last command's (0 OK, 1 ERR); 2 when the "
                    "console cannot be opened or does not answer.")
    p.add_argument("url", metavar="URL", help="serial port or pyserial URL")
    p.add_argument("-c", dest="commands", metavar="CMD", action="append", default=None,
                   help="a command line to run (repeatable; run in order)")
    p.add_argument("--baud", metavar="N", type=int, default=115200,
                   help="baud rate (default 115200)")
    p.add_argument("--timeout", metavar="S", type=float, default=5.0,
                   help="seconds to wait for an answer (default 5)")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    """``edgekey console``: 0 when the last command said OK, 1 on ERR, 2 when no console."""
    try:
        client = ConsoleClient(args.url, baud=args.baud, timeout=args.timeout)
    except (serial.SerialException, OSError, ValueError) as exc:
        print(f"edgekey console: cannot open {args.url}: {exc}", file=sys.stderr)
        return 2
    try:
        with client:
            client.sync()
            if args.commands is not None:
                return _run_commands(client, args.commands)
            return _interactive(client)
    except ConsoleTimeout as exc:
        print(f"edgekey console: {args.url} does not answer within {args.timeout:g} s "
              f"({len(exc.received)} bytes read, no prompt)", file=sys.stderr)
        return 2
    except (ConsoleError, serial.SerialException, OSError) as exc:
        print(f"edgekey console: {exc}", file=sys.stderr)
        return 2


def _run_one(client: ConsoleClient, line: str, status_out: object) -> int:
    """Run one line, print its body and (to ``status_out``) its status; 0 OK, 1 ERR."""
    try:
        result = client.run(line)
    except ValueError as exc:
        print(f"edgekey console: {line!r}: {exc}", file=sys.stderr)
        return 1
    if result.body:
        print(result.body)
    if status_out is not None and (status_out is sys.stdout or not result.ok):
        print(result.status, file=status_out)  # type: ignore[arg-type]
    return 0 if result.ok else 1


def _run_commands(client: ConsoleClient, commands: list[str]) -> int:
    status = 0
    for line in commands:
        status = _run_one(client, line, sys.stderr)
    return status


def _interactive(client: ConsoleClient) -> int:
    status = 0
    tty = sys.stdin.isatty()
    while True:
        try:
            line = input(DEFAULT_PROMPT) if tty else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            if tty:
                print()
            return status
        if not tty:
            if not line:
                return status
            line = line.rstrip("\r\n")
        if not line.strip(" "):
            continue
        status = _run_one(client, line, sys.stdout)


__all__ = ["MAX_LINE", "PROMPT", "ConsoleClient", "ConsoleError", "ConsoleTimeout", "Result",
           "add_parser", "run"]
