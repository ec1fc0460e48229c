"""A provisioned agent process on ptys, and meters the caller speaks for: tests and benches.

``AgentProc`` provisions a fleet of one in a directory (``tools.fleet``),
makes two pty pairs (the console UART and the hplc link), starts
``python -m agent`` on their slave ends and keeps the master ends: the
test types on the console and speaks the meter protocol on the link
(``TestMeter``, CPython: ``emulator.meter_keys`` for the keys,
``agent.meterproto`` for the APDUs). ``stop`` and ``kill`` end it on every
path; ``close`` also closes the ptys.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import tty
from pathlib import Path

from agent import meterproto as mp
from emulator.meter_keys import MeterKeys
from hal.dlt698 import (
    NEED_DATA,
    Control,
    Frame,
    FrameDecoder,
    FunctionCode,
    ServerAddress,
    encode_frame,
)
from tools.provision_cmd import provision_fleet

ROOT = Path(__file__).resolve().parents[1]
PROMPT = b"edgekey:~$ "
CLIENT = 0x01


class ConsoleSpeaker:
    """Speaks the agent's console protocol on a file descriptor (a pty master, a serial
    port's): a command line in, its body and status line out. ``AgentProc`` (a process on
    our ptys), ``SerialTerminal`` (a terminal on serial ports: the QEMU board's, or real
    hardware's) share it."""

    console_m: int
    _console_buf: bytearray

    def console(self, line: str, timeout: float = 20.0) -> tuple[str, str]:
        """Run one console line; (body, status line)."""
        os.write(self.console_m, line.encode() + b"\r")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            buf = b"\r\n" + bytes(self._console_buf)  # a status line may open the buffer
            for status in (b"\r\nOK\r\n", b"\r\nERR "):
                i = buf.find(status)
                if i >= 0:
                    end = buf.find(PROMPT, i)
                    if end >= 0:
                        body = buf[2:i].decode() if i >= 2 else ""
                        status_line = buf[i + 2:end].decode().strip()
                        del self._console_buf[:end - 2 + len(PROMPT)]
                        body = body.split(PROMPT.decode())[-1]
                        lines = [x for x in body.split("\r\n") if x != line]
                        return "\n".join(lines).strip("\n"), status_line
            r, _, _ = select.select([self.console_m], [], [], 0.2)
            if r:
                self._console_buf += os.read(self.console_m, 65536)
        raise TimeoutError(f"console: no status for {line!r}; read {bytes(self._console_buf)!r}")

    def resync(self, timeout: float = 20.0) -> None:
        """Skip whatever the console still has to say (answers to junk): send a unique unknown
        command and read up to its ENOEXEC and the prompt after it."""
        self._resyncs = getattr(self, "_resyncs", 0) + 1
        token = f"resync{self._resyncs}"
        os.write(self.console_m, b"\x03\x15" + token.encode() + b"\r")
        mark = f"{token}: command not found".encode()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            i = self._console_buf.find(mark)
            if i >= 0:
                end = self._console_buf.find(PROMPT, i)
                if end >= 0:
                    del self._console_buf[:end + len(PROMPT)]
                    return
            r, _, _ = select.select([self.console_m], [], [], 0.2)
            if r:
                self._console_buf += os.read(self.console_m, 65536)
        raise TimeoutError(f"console: no answer to {token}")

    def console_json(self, line: str) -> object:
        body, status = self.console(line + " --json")
        assert status == "OK", (line, body, status)
        return json.loads(body.strip().splitlines()[-1])



class AgentProc(ConsoleSpeaker):
    def __init__(self, directory: Path, *, meters: int = 8, board: str = "host", seed: int = 3,
                 hplc: str | None = None, python: list[str] | None = None):
        self.fleet = provision_fleet(directory, terminals=1, meters=meters, board_name=board,
                                     seed=seed)
        self.attach(directory, self.fleet["terminals"][0], board=board, hplc=hplc,
                    python=python)

    def attach(self, directory: Path, terminal: dict, *, board: str, hplc: str | None = None,
               python: list[str] | None = None) -> None:
        """A provisioned terminal of ``tools.fleet`` (its image, device key, meters) and the
        console and hplc ptys this harness speaks through."""
        self.dir = directory
        self.board = board
        self.image = Path(terminal["flash"])
        self.device_key = terminal["device_key"]
        self.meters = json.loads(Path(terminal["meters_file"]).read_text())
        self.console_m, console_s = os.openpty()
        self.link_m, link_s = os.openpty()
        for fd in (console_s, self.link_m, self.console_m):
            tty.setraw(fd)
        self._slaves = (console_s, link_s)
        self.console_path = os.ttyname(console_s)
        self.link_path = hplc or os.ttyname(link_s)  # a PLC channel's end, or our own pty
        self.python = python or [sys.executable]
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = directory / "agent.stderr"
        self._console_buf = bytearray()
        self._stderr_mark = 0

    def args(self, *, board: str | None = None, extra: tuple[str, ...] = ()) -> list[str]:
        return [*self.python, "-m", "agent", "--board", board or self.board, "--node", "ecd-00",
                "--flash", str(self.image), "--trust", str(self.dir / "utility.pub"),
                "--device-key", self.device_key, "--links", f"console={self.console_path}",
                f"hplc={self.link_path}", *extra]

    def run_once(self, *extra: str, board: str | None = None) -> subprocess.CompletedProcess:
        """Start the agent and expect it to refuse (it returns at once)."""
        return subprocess.run(self.args(board=board, extra=extra), cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    def start(self, *extra: str) -> None:
        self._stderr_mark = len(self.stderr())
        self.proc = subprocess.Popen(self.args(extra=extra), cwd=ROOT,
                                     stderr=open(self.stderr_path, "ab"))  # noqa: SIM115
        self._console_buf.clear()
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}: {self.stderr()}")
            if '"event":"agent.ready"' in self.stderr()[self._stderr_mark:]:
                self.console("echo off")
                return
            time.sleep(0.05)
        raise TimeoutError("agent did not become ready")

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    # -- process

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        for fd in (self.console_m, self.link_m, *self._slaves):
            with contextlib.suppress(OSError):
                os.close(fd)


class TestMeter:
    """One meter the test speaks for on the agent's hplc link (module docstring)."""

    __test__ = False  # not a test class

    def __init__(self, agent: AgentProc, index: int, *, seed: int = 0,
                 link_fd: int | None = None):
        import random
        row = agent.meters[index]
        self.agent = agent
        self.link_fd = agent.link_m if link_fd is None else link_fd
        self.keys = MeterKeys(bytes.fromhex(row["id"]), bytes.fromhex(row["factory_key"]),
                              entropy=random.Random(f"meter {index} {seed}").randbytes)
        self.decoder = FrameDecoder()

    @property
    def meter_id(self) -> bytes:
        return self.keys.meter_id

    def frame(self, apdu: bytes, *, client: int = CLIENT) -> bytes:
        return encode_frame(Frame(Control(FunctionCode.USER_DATA, from_server=True,
                                          initiator=True),
                                  ServerAddress(self.meter_id), client, apdu))

    def send_raw(self, data: bytes) -> None:
        os.write(self.link_fd, data)

    def answer(self, timeout: float = 15.0) -> mp.AckAnswer | mp.NakAnswer | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.decoder.next_event()
            if isinstance(event, Frame):
                if bytes(event.server.address) == self.meter_id:
                    return mp.decode_answer(event.apdu)
                continue
            if event is not NEED_DATA:
                continue
            r, _, _ = select.select([self.link_fd], [], [], 0.1)
            if r:
                self.decoder.receive_data(os.read(self.link_fd, 65536))
        return None

    def request(self, event: object) -> mp.AckAnswer | mp.NakAnswer | None:
        """Send a request; take the answer (and the new key, on a genuine ACK)."""
        self.send_raw(self.frame(mp.encode_request(event)))  # type: ignore[arg-type]
        return self.take(event, self.answer())

    def take(self, event: object, a: mp.AckAnswer | mp.NakAnswer | None
             ) -> mp.AckAnswer | mp.NakAnswer | None:
        from agent.node import events as ev
        k = self.keys
        if isinstance(a, mp.AckAnswer):
            if isinstance(event, ev.RegisterRequest | ev.RotateRequest):
                assert k.pending is not None and a.authentic(k.pending, self.meter_id)
                k.acknowledged(a.key_version)
            elif isinstance(event, ev.RevokeRequest):
                assert k.key is not None and a.authentic(k.key, self.meter_id)
                k.revoked()
        elif isinstance(a, mp.NakAnswer) and a.reason == 7 and a.counter:
            k.resync(a.counter)
        return a


def image_digest(path: Path) -> str:
    """SHA-256 of a sparse image's data extents and size (a 1 GiB image hashes in ms)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(size.to_bytes(8, "big"))
    with open(path, "rb") as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # no data after pos
            end = os.lseek(fd, start, os.SEEK_HOLE)
            f.seek(start)
            h.update(start.to_bytes(8, "big"))
            remaining = end - start
            while remaining:
                chunk = f.read(min(remaining, 1 << 20))
                h.update(chunk)
                remaining -= len(chunk)
            pos = end
    return h.hexdigest()
