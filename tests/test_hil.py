"""Hardware in the loop: a running terminal driven only through its serial ports.

``pytest --target hil --port /dev/ttyUSB0 --link-port /dev/ttyUSB1 --meters M.json`` runs
these against a real terminal (README, "Hardware in the loop"): its console UART and its
meter link, with the provisioned meters' factory keys. Without ``--port`` the same tests
run against the system-mode QEMU board (``edgekey board boot``: armmp kernel, the agent
from its RAUC-installed slot A, console on the PL011 UART, the hplc link on a
second UART), so the HIL path runs in CI (``make test-board``). The tests that need to
power the terminal off (power cut, damaged flash) run on the board only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import meterproto as mp
from emulator.agent_harness import TestMeter
from emulator.board_session import BoardSession
from emulator.serial_terminal import SerialTerminal
from hal.dlt698 import Reason
from tools.flash_update import region_sha256

pytestmark = pytest.mark.host_only


@dataclass
class Bench:
    """The terminal under test: its serial ports, and on the QEMU board what powers it."""

    hardware: SerialTerminal | None = None  # a real terminal's ports (--port)
    board: BoardSession | None = None  # the QEMU board
    used: set[int] = field(default_factory=set)  # meters a test has taken

    @property
    def t(self) -> SerialTerminal:
        t = self.hardware or (self.board.t if self.board else None)
        assert t is not None, "the terminal is off"
        return t

    @property
    def vm(self) -> object | None:
        return self.board.vm if self.board else None

    def fresh_meters(self, n: int) -> list[TestMeter]:
        """Meters no earlier run registered (a real terminal keeps its chain between runs)."""
        out = []
        for i in range(len(self.t.meters)):
            if i in self.used:
                continue
            self.used.add(i)
            m = TestMeter(self.t, i, seed=i)  # type: ignore[arg-type]
            _, status = self.t.console(f"keys get {m.meter_id.hex()}")
            if status.startswith("ERR ENOENT"):  # not on the chain
                out.append(m)
                if len(out) == n:
                    return out
        pytest.skip(f"fewer than {n} unregistered meters left on the terminal: provision and "
                    "format it afresh")
        raise AssertionError


def console_json(t: SerialTerminal, line: str) -> dict:
    return t.console_json(line)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def bench(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory):
    if pytestconfig.getoption("--target") != "hil":
        pytest.skip("runs with --target hil (make test-board boots the QEMU board for it)")
    port = pytestconfig.getoption("--port")
    if port:
        link, meters = pytestconfig.getoption("--link-port"), pytestconfig.getoption("--meters")
        if not link or not meters:
            raise pytest.UsageError("--target hil --port needs --link-port and --meters")
        with SerialTerminal.from_meters_file(port, link, Path(meters),
                                             baud=pytestconfig.getoption("--baud"),
                                             link_baud=pytestconfig.getoption("--link-baud")
                                             ) as t:
            t.wait_console(30)
            yield Bench(hardware=t)
        return
    from tools.board_cmd import prepare

    board = BoardSession(prepare(tmp_path_factory.mktemp("board"), meters=12))
    try:
        board.power_on()
        yield Bench(board=board)
    finally:
        board.power_off(cut=False)


def on_board(bench: Bench) -> BoardSession:
    if bench.board is None:
        pytest.skip("powers the terminal off: runs on the QEMU board only")
    return bench.board


def test_the_console_answers_with_the_terminal_inside_its_ram_budget(bench):
    status = console_json(bench.t, "status")
    assert status["node"] and status["synced"] is True
    mem = console_json(bench.t, "mem")
    assert 0 < mem["rss_bytes"] < mem["budget_bytes"], mem
    if bench.vm is not None:
        assert status["board"] == "qemu-armhf"
        assert mem["rss_bytes"] < 512 * 2**20 // 4  # far inside the board's RAM


def test_register_rotate_reading_revoke_over_the_meter_link(bench):
    (m,) = bench.fresh_meters(1)
    a = m.request(m.keys.register())
    assert isinstance(a, mp.AckAnswer) and a.key_version == 1
    a = m.request(m.keys.rotate())
    assert isinstance(a, mp.AckAnswer) and a.key_version == 2
    assert a.value == console_json(bench.t, "ledger height")["height"]
    reading = m.keys.reading(b"kWh=42.7")
    a = m.request(reading)
    assert isinstance(a, mp.AckAnswer) and a.value == reading.counter
    got = console_json(bench.t, f"keys get {m.meter_id.hex()}")
    assert got["answer"] == "local" and got["key_version"] == 2 and got["key_held_here"]
    assert isinstance(m.request(m.keys.revoke()), mp.AckAnswer)
    assert console_json(bench.t, f"keys get {m.meter_id.hex()}")["answer"] == "revoked"
    hist = console_json(bench.t, f"keys history {m.meter_id.hex()}")
    assert [h["op"] for h in hist] == ["register", "rotate", "revoke"]


def test_a_frame_with_a_bad_checksum_gets_a_nak_and_commits_nothing(bench):
    (m,) = bench.fresh_meters(1)
    assert isinstance(m.request(m.keys.register()), mp.AckAnswer)
    before = console_json(bench.t, "ledger height")["height"]
    good = m.frame(mp.encode_request(m.keys.rotate()))
    # Injected: the frame's FCS flipped. Survives: nothing committed, NAK 64+BAD_FCS.
    m.send_raw(good[:-3] + bytes([good[-3] ^ 0xFF]) + good[-2:])
    a = m.answer()
    assert isinstance(a, mp.NakAnswer) and a.reason == mp.LINK_REASON_BASE + Reason.BAD_FCS
    assert console_json(bench.t, "ledger height")["height"] == before
    assert console_json(bench.t, f"keys get {m.meter_id.hex()}")["key_version"] == 1


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600), st.sampled_from([b"", b"\r", b"\r\n"]))
def test_the_console_survives_any_bytes_on_its_uart(bench, junk, end):
    """Injected: any bytes on the console UART. Survives: the shell, which answers next."""
    os.write(bench.t.console_m, junk + end)
    bench.t.resync(timeout=60)
    body, status = bench.t.console("ledger height")
    assert status == "OK" and body.strip().isdigit()


def test_a_power_cut_loses_no_acknowledged_operation(bench):
    """Injected: the board's power cut (QEMU killed) right after acknowledgements, with one
    more request in flight. Survives: every acknowledged key version, chain and key store
    agreeing, after the board boots again."""
    board = on_board(bench)
    meters = bench.fresh_meters(3)
    acked: dict[bytes, int] = {}
    for m in meters:
        for step in (m.keys.register, m.keys.rotate):
            a = m.request(step())
            assert isinstance(a, mp.AckAnswer), a
            acked[m.meter_id] = a.key_version
    last = meters[0]
    last.send_raw(last.frame(mp.encode_request(last.keys.rotate())))
    board.power_off(cut=True)
    board.power_on()
    assert console_json(bench.t, "ledger verify")["height"] >= 1
    for meter_id, version in acked.items():
        got = console_json(bench.t, f"keys get {meter_id.hex()}")
        assert got["key_version"] >= version and got["key_held_here"], got


def test_a_damaged_chain_partition_is_refused_and_the_console_says_why(bench):
    """Injected: one flipped byte in the ledger partition's first record, board powered off.
    Survives: the ledger partition, unchanged (the agent refuses to serve it as current and
    writes nothing), and the console, which says why; the byte put back, the board serves
    its chain again."""
    board = on_board(bench)
    from hal.board import board_path, load_board

    height = console_json(bench.t, "ledger height")["height"]
    board.power_off(cut=False)
    part = load_board(board_path("qemu-armhf")).flash.partition("ledger")
    offset = part.offset_bytes + 200
    flash = board.term.flash  # type: ignore[attr-defined]
    with open(flash, "r+b") as f:
        f.seek(offset)
        good = f.read(1)
        f.seek(offset)
        f.write(bytes([good[0] ^ 0x5A]))
    before = region_sha256(str(flash), part.offset_bytes, part.size_bytes)
    board.power_on(wait=False)
    said = bench.t.read_until(b"refused the flash", timeout=300)
    line = said[said.rfind(b"edgekey-boot:"):].decode(errors="replace")
    assert "ledger partition damaged" in bench.t.read_until(b"\r\n", timeout=30,
                                                           start=said).decode(), line
    board.power_off(cut=False)
    assert region_sha256(str(flash), part.offset_bytes, part.size_bytes) == before
    with open(flash, "r+b") as f:
        f.seek(offset)
        f.write(good)
    board.power_on()
    assert console_json(bench.t, "ledger verify")["height"] == height
