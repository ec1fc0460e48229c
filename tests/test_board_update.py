"""Signed A/B updates on the QEMU board itself: RAUC on the terminal, driven from its console.

The board boots slot A (the factory's install of 0.1.0); a field engineer's update medium
(a read-only 9p share standing in for a USB stick) carries bundles. Through the console:
a downgrade is refused by RAUC's pre-install handler on the terminal; 0.2.0 installs into
slot B and boots after ``update reboot``; a broken 0.3.0 installs into A, dies before its
health check (``agent.ready``), is marked bad and the board rolls back to B by itself.
Power cuts (QEMU killed) at several points of an install: the board boots the old slot
or the complete new one, never neither. Runs with ``--target hil`` and no ``--port``
(``make test-board``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent import meterproto as mp
from emulator.agent_harness import TestMeter
from emulator.serial_terminal import SerialTerminal

pytestmark = pytest.mark.host_only
BROKEN = 'raise SystemExit("this slot\'s agent is broken: it dies before its health check")\n'


def _break_agent(root: Path) -> None:
    main = root / "edgekey" / "agent" / "__main__.py"
    head, future, rest = main.read_text().partition("from __future__ import annotations\n")
    assert future, "agent/__main__.py has no __future__ import to break after"
    main.write_text(head + future + BROKEN + rest)


class Board:
    """One provisioned terminal on the board, powered on and off by the test."""

    def __init__(self, directory: Path, share: Path):
        from tools.board_cmd import prepare

        self.term = prepare(directory, meters=4)
        self.share, self.boots = share, 0
        self.vm = None
        self.t: SerialTerminal | None = None

    def power_on(self, *, wait: bool = True) -> SerialTerminal:
        from tools.board_cmd import CONSOLE_TIMEOUT_S, power_on

        self.boots += 1
        self.vm = power_on(self.term, self.term.dir / f"vm{self.boots}", share=self.share)
        self.t = SerialTerminal.from_meters_file(self.vm.console_path, self.vm.link_path,
                                                 self.term.meters_file)
        if wait:
            self.t.wait_console(CONSOLE_TIMEOUT_S)
        return self.t

    def power_off(self, *, cut: bool) -> None:
        if self.t is not None:
            self.t.close()
            self.t = None
        if self.vm is not None:
            self.vm.kill() if cut else self.vm.stop()
            self.vm = None

    def status(self) -> dict:
        assert self.t is not None
        return self.t.console_json("update status")  # type: ignore[return-value]

    def settled(self, timeout: float = 30.0) -> dict:
        """The status once the booted slot's health check has passed (its attempts are full
        again: the supervisor marks it good as the agent says agent.ready, which can be
        just after the console first answers)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st["slots"][st["booted"]]["attempts"] == 3 or time.monotonic() > deadline:
                return st
            time.sleep(0.5)

    def install(self, name: str, timeout: float = 180.0) -> dict:
        """``update install`` of a bundle on the share, until RAUC has finished with it."""
        assert self.t is not None
        body, status = self.t.console(f"update install /mnt/update/{name}")
        assert status == "OK", (body, status)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if st["install"]["state"] != "running":
                return st
            time.sleep(0.5)
        raise TimeoutError(f"install of {name} still running after {timeout} s")

    def reboot(self) -> None:
        """``update reboot``: the agent stops, the supervisor reboots the board in place
        (QEMU resets, the ptys stay); back when the console answers again."""
        from tools.board_cmd import CONSOLE_TIMEOUT_S

        assert self.t is not None
        body, status = self.t.console("update reboot")
        assert status == "OK", (body, status)
        self.t._console_buf.clear()
        self.t.wait_console(CONSOLE_TIMEOUT_S)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("share")


@pytest.fixture
def board(pytestconfig, tmp_path: Path, bundles: Path):
    if pytestconfig.getoption("--target") != "hil" or pytestconfig.getoption("--port"):
        pytest.skip("runs on the QEMU board: --target hil without --port (make test-board)")
    b = Board(tmp_path / "terminal", bundles)
    try:
        yield b
    finally:
        b.power_off(cut=False)


def _build(board: Board, version: str, **kw: object) -> str:
    from hal.board import board_path, load_board
    from tools.image_build import build_bundle

    built = build_bundle(load_board(board_path("qemu-armhf")), board.share, version,
                         board.term.dir / "update-keys", **kw)  # type: ignore[arg-type]
    return built.bundle.name


def test_an_update_on_the_terminal_boots_the_new_slot_and_a_broken_one_rolls_back(board):
    older, newer = _build(board, "0.0.9"), _build(board, "0.2.0")
    broken = _build(board, "0.3.0", mutate=_break_agent)
    t = board.power_on()
    m = TestMeter(t, 0)  # type: ignore[arg-type]
    assert isinstance(m.request(m.keys.register()), mp.AckAnswer)

    # Injected: an older bundle, signed by the fleet. Survives: slot A, running, primary.
    st = board.install(older)
    assert st["install"]["state"] == "failed"
    assert any("downgrade" in line for line in st["install"]["service"]), st["install"]
    assert st["primary"] == "A" and st["slots"]["B"]["version"] is None

    st = board.install(newer)
    assert st["install"]["state"] == "done", st["install"]
    assert st["primary"] == "B" and st["booted"] == "A"
    assert st["slots"]["B"] == {"partition": "image_b", "state": "good", "attempts": 3,
                                "version": "0.2.0"}
    board.reboot()
    st = board.settled()
    assert st["booted"] == "B" and st["slots"]["B"]["state"] == "good"
    assert st["slots"]["B"]["attempts"] == 3  # marked good by its health check after boot
    got = t.console_json(f"keys get {m.meter_id.hex()}")
    assert got["key_version"] == 1 and got["key_held_here"]  # the ledger outlived the update

    # Injected: a signed bundle whose agent dies before agent.ready. Survives: slot B, which
    # the board rolls back to by itself (health check failed, slot A marked bad, reboot).
    st = board.install(broken)
    assert st["install"]["state"] == "done" and st["primary"] == "A"
    board.reboot()
    st = board.settled()
    assert st["booted"] == "B" and st["primary"] == "A", st["lines"]
    assert st["slots"]["A"]["state"] == "bad" and st["slots"]["A"]["version"] == "0.3.0"
    a = m.request(m.keys.rotate())  # and it serves the meters again
    assert isinstance(a, mp.AckAnswer) and a.key_version == 2


@pytest.mark.parametrize("cut_after_s", [0.3, 1.5, 3.0])
def test_a_power_cut_during_an_update_boots_the_old_slot_or_the_new_one(board, cut_after_s):
    """Injected: the board's power cut ``cut_after_s`` into ``update install`` (staging,
    signature check, slot write or switch). Survives: a board that boots and answers,
    on slot A (0.1.0) or on slot B with the whole of 0.2.0, never neither."""
    newer = _build(board, "0.2.0")
    t = board.power_on()
    body, status = t.console(f"update install /mnt/update/{newer}")
    assert status == "OK", body
    time.sleep(cut_after_s)
    board.power_off(cut=True)
    board.power_on()
    st = board.settled()
    booted = st["booted"]
    assert st["slots"][booted]["state"] == "good", st["lines"]
    if booted == "B":
        assert st["slots"]["B"]["version"] == "0.2.0"
        from hal import bootstate as bs
        from hal.board import board_path, load_board
        from tools.flash_update import health_check

        qemu = load_board(board_path("qemu-armhf"))
        board.power_off(cut=False)
        state = bs.read(board.term.flash, qemu)
        assert state.b.image is not None and state.b.image.sha256
        ok, detail = health_check(str(board.term.flash), qemu, "B", state.b.image)
        assert ok, detail  # the slot's bytes are the ones RAUC recorded
    else:
        assert booted == "A" and st["slots"]["A"]["version"] == "0.1.0"
