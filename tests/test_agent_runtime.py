"""The agent process: boot refusals, meter frames and their faults, kill -9 and restart.

Each test runs ``python -m agent`` on ptys (emulator/agent_harness.py) and stops it
on every path. Fault tests say what they injected and what survived.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import meterproto as mp
from agent.keystore.material import make_rotation_proof, new_key
from agent.node.actions import Nak
from emulator.agent_harness import AgentProc, TestMeter, image_digest
from hal.dlt698 import Reason

pytestmark = pytest.mark.host_only


@pytest.fixture
def agent(tmp_path: Path, agent_python: list[str]):
    a = AgentProc(tmp_path, python=agent_python)
    try:
        yield a
    finally:
        a.close()


def _height(agent: AgentProc) -> int:
    return agent.console_json("ledger height")["height"]


def test_register_rotate_reading_revoke_over_the_hplc_link(agent):
    agent.start("--format")
    m = TestMeter(agent, 0)
    a = m.request(m.keys.register())
    assert isinstance(a, mp.AckAnswer) and a.key_version == 1
    a = m.request(m.keys.rotate())
    assert isinstance(a, mp.AckAnswer) and a.key_version == 2 and a.value == _height(agent)
    reading = m.keys.reading(b"kWh=42.7")
    a = m.request(reading)
    assert isinstance(a, mp.AckAnswer) and a.value == reading.counter
    got = agent.console_json(f"keys get {m.meter_id.hex()}")
    assert got["answer"] == "local" and got["key_version"] == 2 and got["key_held_here"]
    a = m.request(m.keys.revoke())
    assert isinstance(a, mp.AckAnswer)
    assert agent.console_json(f"keys get {m.meter_id.hex()}")["answer"] == "revoked"
    hist = agent.console_json(f"keys history {m.meter_id.hex()}")
    assert [h["op"] for h in hist] == ["register", "rotate", "revoke"]
    assert agent.stop() == 0
    assert '"event":"agent.stop"' in agent.stderr()


def test_bad_frames_get_a_nak_with_their_reason_are_counted_and_commit_nothing(agent):
    agent.start("--format")
    m = TestMeter(agent, 1)
    assert isinstance(m.request(m.keys.register()), mp.AckAnswer)
    before = _height(agent)
    key_v1 = m.keys.key
    rotate = m.keys.rotate()
    good = m.frame(mp.encode_request(rotate))
    # Injected: the frame's FCS flipped. Survives: nothing committed, NAK 64+BAD_FCS.
    bad_fcs = good[:-3] + bytes([good[-3] ^ 0xFF]) + good[-2:]
    m.send_raw(bad_fcs)
    a = m.answer()
    assert isinstance(a, mp.NakAnswer) and a.reason == mp.LINK_REASON_BASE + Reason.BAD_FCS
    # Injected: another terminal's client address. Survives: no answer, counted.
    m.send_raw(m.frame(mp.encode_request(rotate), client=0x22))
    # Injected: a meter address this terminal was never provisioned for. Survives: NAK
    # NO_FACTORY_KEY, nothing registered.
    stranger = TestMeter(agent, 1)
    stranger.keys = type(m.keys)(b"\x99" * 6, bytes(32))
    a = stranger.request(stranger.keys.register())
    assert isinstance(a, mp.NakAnswer) and a.reason == Nak.NO_FACTORY_KEY
    # Injected: an APDU longer than any request. Survives: NAK BAD_APDU.
    m.send_raw(m.frame(mp.encode_request(rotate) + bytes(600)))
    a = m.answer()
    assert isinstance(a, mp.NakAnswer) and a.reason == mp.Fault.BAD_APDU
    # Injected: a frame longer than the link's max_frame_bytes. Survives: dropped, counted.
    m.send_raw(b"\x68" + (4000).to_bytes(2, "little") + bytes(40))
    # The real rotation still goes through, after all of that.
    a = m.take(rotate, (m.send_raw(good), m.answer())[1])
    assert isinstance(a, mp.AckAnswer) and a.key_version == 2
    assert _height(agent) == before + 1
    # Injected: the same rotation replayed under a new request id (old counter). The
    # node answers a repeat of a committed operation with its original answer.
    replay = type(rotate)(rotate.meter_id, rotate.request_id + 100, rotate.counter, rotate.proof)
    m.send_raw(m.frame(mp.encode_request(replay)))
    a = m.answer()
    assert isinstance(a, mp.NakAnswer) or (a is not None and a.value == before + 1)
    # Injected: a new rotation that reuses the counter already consumed.
    reused = type(rotate)(rotate.meter_id, rotate.request_id + 101, rotate.counter,
                          make_rotation_proof(m.keys.key, new_key()))
    a = m.request(reused)
    assert isinstance(a, mp.NakAnswer) and a.reason == Nak.REPLAYED
    # Injected: a rotation proved under the superseded (stale) version-1 key.
    stale = type(rotate)(rotate.meter_id, rotate.request_id + 200, rotate.counter + 1,
                         make_rotation_proof(key_v1, new_key()))
    a = m.request(stale)
    assert isinstance(a, mp.NakAnswer) and a.reason == Nak.BAD_PROOF
    assert _height(agent) == before + 1  # none of the bad ones committed anything
    counts = agent.console_json("meters")["links"]["hplc"]["protocol"]
    assert counts["not_ours"] >= 1 and counts["bad_apdu"] >= 1
    assert counts["rejected_BAD_FCS"] >= 1 and counts["rejected_OVERSIZE"] >= 1
    # A replayed reading.
    m3 = TestMeter(agent, 2)
    assert isinstance(m3.request(m3.keys.register()), mp.AckAnswer)
    reading = m3.keys.reading(b"v=1")
    assert isinstance(m3.request(reading), mp.AckAnswer)
    again = type(reading)(reading.meter_id, reading.request_id + 7, reading.counter,
                          reading.sealed)
    a = m3.request(again)
    assert isinstance(a, mp.NakAnswer) and a.reason == Nak.REPLAYED_READING
    assert a.counter == reading.counter


def test_kill_9_during_a_burst_loses_no_acknowledged_operation(agent):
    """Injected: SIGKILL while registrations and rotations are in flight, then a restart.
    Survives: every acknowledged version is on the chain with its key in the store."""
    agent.start("--format")
    meters = [TestMeter(agent, i, seed=1) for i in range(len(agent.meters))]
    acked: dict[bytes, int] = {}
    kill_after = random.Random(9).randrange(15, 30)  # requests sent before the power cut
    sent = 0
    while sent < kill_after:
        for m in meters:
            event = m.keys.register() if m.keys.key is None else m.keys.rotate()
            m.send_raw(m.frame(mp.encode_request(event)))
            sent += 1
            if sent == kill_after:
                agent.kill()  # SIGKILL with this request in flight
                break
            a = m.take(event, m.answer())
            assert isinstance(a, mp.AckAnswer), a
            acked[m.meter_id] = a.key_version
    assert acked, "nothing was acknowledged before the kill"
    agent.start()  # no --format: the ledger holds data
    verify = agent.console_json("ledger verify")
    assert verify["height"] >= 1
    for meter_id, version in acked.items():
        got = agent.console_json(f"keys get {meter_id.hex()}")
        assert got["key_version"] >= version, (meter_id.hex(), got, version)
        assert got["key_held_here"], got  # chain and key store agree: nothing half-applied
    assert agent.stop() == 0


def test_refusals_leave_the_image_untouched(agent, tmp_path):
    # Injected: a blank ledger without --format.
    digest = image_digest(agent.image)
    r = agent.run_once()
    assert r.returncode == 1 and "blank" in r.stderr
    # Injected: the image under a board whose flash map differs (the ledger moved).
    from hal.board import board_path
    other_board = tmp_path / "moved.toml"
    other_board.write_text(board_path("host").read_text().replace(
        'name = "ledger"\noffset_mib = 272\nsize_mib = 512',
        'name = "ledger"\noffset_mib = 274\nsize_mib = 510'))
    assert "offset_mib = 274" in other_board.read_text()
    r = agent.run_once("--format", board=str(other_board))
    assert r.returncode == 1 and "flash map" in r.stderr, r.stderr
    # Injected: another utility's trust key.
    other = tmp_path / "other.pub"
    other.write_text(hashlib.sha256(b"other").hexdigest() + "\n")
    r = agent.run_once("--format", "--trust", str(other))
    assert r.returncode == 1 and "not signed by the trusted utility key" in r.stderr
    assert image_digest(agent.image) == digest
    agent.start("--format")
    m = TestMeter(agent, 0)
    for _ in range(3):
        assert isinstance(m.request(m.keys.register() if m.keys.key is None
                                    else m.keys.rotate()), mp.AckAnswer)
    assert agent.stop() == 0
    # Injected: --format on a ledger that holds blocks.
    digest = image_digest(agent.image)
    r = agent.run_once("--format")
    assert r.returncode == 1 and "--format refused" in r.stderr
    assert image_digest(agent.image) == digest
    # Injected: one flipped byte inside the ledger's first record.
    from hal.board import board_path, load_board
    fl = load_board(board_path("host")).flash
    offset = fl.partition("ledger").offset_bytes + 200
    with open(agent.image, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))
    digest = image_digest(agent.image)
    r = agent.run_once()
    assert r.returncode == 1 and "damaged" in r.stderr, r.stderr
    assert image_digest(agent.image) == digest


@pytest.fixture(scope="module")
def running_agent(tmp_path_factory, agent_python):
    a = AgentProc(tmp_path_factory.mktemp("fuzz"), meters=2, python=agent_python)
    try:
        a.start("--format")
        yield a
    finally:
        a.close()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=3000), st.sampled_from([b"", b"\r", b"\n", b"\r\n"]))
def test_the_agents_console_survives_any_bytes_and_still_answers(running_agent, junk, end):
    """Injected: any bytes of any length on the console UART. Survives: the agent, which
    answers the next command OK (and the chain, untouched)."""
    os.write(running_agent.console_m, junk + end)
    running_agent.resync()
    body, status = running_agent.console("ledger height")
    assert status == "OK" and body.strip() == "0"
    assert running_agent.proc is not None and running_agent.proc.poll() is None


def test_a_console_whose_far_end_went_away_is_not_watched_and_the_agent_does_not_spin(agent):
    """Injected: the console cable's far end closed (the pty master the test holds). Survives:
    the agent stops watching the dead descriptor (a hung-up pty is readable for ever), keeps
    trying to reopen it once a second, uses next to no CPU, and still serves its meters."""
    import time

    from tools.bench_agent import proc_sample

    agent.start("--format")
    m = TestMeter(agent, 4)
    assert isinstance(m.request(m.keys.register()), mp.AckAnswer)
    os.close(agent.console_m)
    agent.console_m = os.open(os.devnull, os.O_RDONLY)  # what close() will close instead
    time.sleep(0.5)
    before = proc_sample(agent.proc.pid)[0]
    time.sleep(2.0)
    used = proc_sample(agent.proc.pid)[0] - before
    assert used < 0.5, f"the agent used {used:.2f} s of CPU in 2 s with its console gone"
    assert isinstance(m.request(m.keys.rotate()), mp.AckAnswer)
    assert '"event":"console.lost"' in agent.stderr()


def test_the_agent_runs_where_the_target_says(agent, pytestconfig):
    """``--target qemu`` must mean the agent process is the armhf python3 under
    qemu-arm-static, not the host's; ``host`` the host's interpreter."""
    import os

    agent.start("--format")
    exe = os.readlink(f"/proc/{agent.proc.pid}/exe")
    with open(f"/proc/{agent.proc.pid}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")
    if pytestconfig.getoption("--target") == "qemu":
        assert exe.endswith("qemu-arm-static"), exe
        assert any(b"armhf-rootfs-" in a and a.endswith(b"/usr/bin/python3")
                   for a in cmdline), cmdline  # Debian's armhf interpreter
        with open(f"/proc/{agent.proc.pid}/cgroup") as f:  # inside the board's 512 MB
            memory = next((line.split(":", 2)[2].strip() for line in f
                           if line.split(":")[1] == "memory"), "")
        limit = f"/sys/fs/cgroup/memory{memory}/memory.limit_in_bytes"
        if "edgekey-arm-" in memory:
            assert int(Path(limit).read_text()) == 512 * 2**20, limit
        else:  # no memory cgroup here: the resident set is checked instead
            assert agent.console_json("mem")["rss_bytes"] < 512 * 2**20
    else:
        assert "qemu" not in exe, exe
    assert agent.console_json("ledger height")["height"] == 0
