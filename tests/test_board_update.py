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
from emulator.board_session import BoardSession
from tools.bench_board import break_agent

pytestmark = pytest.mark.host_only


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("share")


@pytest.fixture
def board(pytestconfig, tmp_path: Path, bundles: Path):
    if pytestconfig.getoption("--target") != "hil" or pytestconfig.getoption("--port"):
        pytest.skip("runs on the QEMU board: --target hil without --port (make test-board)")
    from tools.board_cmd import prepare

    b = BoardSession(prepare(tmp_path / "terminal", meters=4), share=bundles)
    try:
        yield b
    finally:
        b.power_off(cut=False)


def _build(board: BoardSession, version: str, **kw: object) -> str:
    from hal.board import board_path, load_board
    from tools.image_build import build_bundle

    built = build_bundle(load_board(board_path("qemu-armhf")), board.share, version,
                         board.term.dir / "update-keys", **kw)  # type: ignore[arg-type]
    return built.bundle.name


def test_an_update_on_the_terminal_boots_the_new_slot_and_a_broken_one_rolls_back(board):
    older, newer = _build(board, "0.0.9"), _build(board, "0.2.0")
    broken = _build(board, "0.3.0", mutate=break_agent)
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


def test_power_cuts_during_updates_boot_the_old_slot_or_the_new_one(board):
    """Injected: the board's power cut (QEMU killed) 0.3, 1.5 and 3 s into ``update
    install`` of a newer bundle each time (staging, signature check, slot write, switch).
    Survives: after each, a board that boots and answers, on the slot it ran or on the
    other slot holding the whole new version (its bytes the ones RAUC recorded), never
    neither."""
    from hal import bootstate as bs
    from hal.board import board_path, load_board
    from tools.flash_update import health_check

    qemu = load_board(board_path("qemu-armhf"))
    t = board.power_on()
    for n, cut_after_s in enumerate((0.3, 1.5, 3.0)):
        before = board.settled()
        old, version = before["booted"], f"0.{n + 2}.0"
        body, status = t.console(f"update install /mnt/update/{_build(board, version)}")
        assert status == "OK", body
        time.sleep(cut_after_s)
        board.power_off(cut=True)
        state = bs.read(board.term.flash, qemu)
        booted, why, image = bs.choose(state)[0], "", state.slot(state.primary).image
        if state.primary != old:  # the switch happened: the new slot must be whole
            assert image is not None and image.version == version, state
            ok, why = health_check(str(board.term.flash), qemu, state.primary, image)
            assert ok, why
        t = board.power_on()
        st = board.settled()
        assert st["booted"] == booted and st["slots"][booted]["state"] == "good", st["lines"]
        assert st["slots"][booted]["version"] in (before["slots"][old]["version"], version)
