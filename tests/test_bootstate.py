"""The A/B boot state: record decoding, the bootloader's choice, power cuts, the RAUC backend."""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import re
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emulator.flash import PowerCut, PowerCutDevice, RamBlockDevice
from hal import bootctl
from hal import bootstate as bs
from hal.blockdev import FileBlockDevice
from hal.board import board_path, load_board
from hal.recordlog import RecordLog

SEG, SEGMENTS = 4096, 4  # a small boot partition: the log's rules, not its size, matter here
SHA = "ab" * 32

versions = st.from_regex(r"\A[0-9]{1,3}(\.[0-9]{1,3}){0,3}(-rc[0-9])?\Z")
images = st.one_of(st.none(), st.builds(
    bs.Image, versions, st.sampled_from(["edgekey-pl-terminal", "edgekey-host"]),
    st.sampled_from(["", SHA])))
slots = st.builds(bs.Slot, st.sampled_from(["good", "bad"]),
                  st.integers(0, bs.MAX_ATTEMPTS), images)
names = st.sampled_from(bs.SLOTS)
states = st.builds(
    bs.BootState, names, slots, slots, st.one_of(st.none(), names),
    st.one_of(st.none(), st.tuples(names, st.builds(bs.Image, versions,
                                                     st.just("edgekey-host")))))


def ram() -> RamBlockDevice:
    return RamBlockDevice(SEG, SEGMENTS)


# ----------------------------------------------------------------- records

@given(states)
def test_encode_decode_round_trip(state: bs.BootState) -> None:
    raw = bs.encode(state)
    assert len(raw) < 400
    assert bs.decode(raw) == state


@given(st.one_of(st.binary(max_size=300),
                 st.binary(max_size=300).map(lambda b: bs.MAGIC + bytes([bs.FORMAT]) + b)))
def test_random_bytes_decode_to_a_clear_error_or_a_valid_state(raw: bytes) -> None:
    try:
        state = bs.decode(raw)
    except bs.BootStateError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert bs.encode(state) == raw


@given(states, st.data())
def test_damaged_records_decode_to_a_clear_error_or_a_valid_state(state: bs.BootState,
                                                                   data: st.DataObject) -> None:
    raw = bytearray(bs.encode(state))
    how = data.draw(st.sampled_from(["flip", "cut", "extend"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    elif how == "cut":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=8))
    try:
        got = bs.decode(bytes(raw))
    except bs.BootStateError as exc:
        assert "\n" not in str(exc)
    else:
        assert bs.encode(got) == bytes(raw)


def test_unknown_format_is_refused_by_name() -> None:
    raw = bytearray(bs.encode(bs.blank()))
    raw[4] = 9
    with pytest.raises(bs.BootStateFormatError, match="format 9; this build reads format 1"):
        bs.decode(bytes(raw))
    with pytest.raises(bs.BootStateError, match="not a boot state record"):
        bs.decode(b"EKXX" + bytes(raw[4:]))


def test_bad_values_are_not_encoded() -> None:
    with pytest.raises(ValueError):
        bs.encode(replace(bs.blank(), a=bs.Slot("good", 3, bs.Image("1 0", "x"))))
    with pytest.raises(ValueError):
        bs.encode(replace(bs.blank(), a=bs.Slot("good", 99)))


# ----------------------------------------------------------------- choose

@given(states)
def test_choose_invariants(state: bs.BootState) -> None:
    bootable = [n for n in bs.SLOTS if state.slot(n).bootable]
    good = [n for n in bs.SLOTS if state.slot(n).state == "good"]
    if not good:
        with pytest.raises(bs.NoBootableSlotError, match="no bootable slot"):
            bs.choose(state)
        return
    if not bootable:  # good slots out of tries get them back, and only they
        slot, new, why = bs.choose(state)
        assert why.startswith("no slot had boot attempts left")
        assert slot == (state.primary if state.primary in good else good[0])
        for n in bs.SLOTS:
            want = (bs.ATTEMPTS - (n == slot)) if n in good else state.slot(n).attempts
            assert new.slot(n).attempts == want and new.slot(n).state == state.slot(n).state
        return
    slot, new, why = bs.choose(state)
    assert state.slot(slot).attempts > 0 and state.slot(slot).state == "good"
    assert slot == (state.primary if state.slot(state.primary).bootable else bootable[0])
    assert ("rollback" in why) == (slot != state.primary)
    assert new.current == slot
    assert new.slot(slot).attempts == state.slot(slot).attempts - 1
    for n in bs.SLOTS:  # attempts never increase; nothing else changes
        assert new.slot(n).attempts <= state.slot(n).attempts
        assert new.slot(n).state == state.slot(n).state
        assert new.slot(n).image == state.slot(n).image
    assert (new.primary, new.pending) == (state.primary, state.pending)


def test_a_slot_that_never_passes_its_check_runs_out_of_tries() -> None:
    state = bs.set_primary(bs.mark_good(bs.blank(), "A"), "B")
    booted = []
    for _ in range(bs.ATTEMPTS + 2):  # B crashes before its health check every time
        slot, state, _why = bs.choose(state)
        booted.append(slot)
    assert booted == ["B"] * bs.ATTEMPTS + ["A", "A"]
    _slot, _state, why = bs.choose(state)
    assert why.startswith("rollback: primary slot B has no boot attempts left")


def test_power_cuts_before_every_health_check_never_halt_a_good_terminal() -> None:
    """Injected: the power cut on every boot before the health check, 3 x ATTEMPTS boots in
    a row. Survives: the terminal boots each time (its good slots get their tries back);
    only slots whose check failed are left behind."""
    state = bs.set_primary(bs.mark_good(bs.blank(), "A"), "B")
    booted = []
    for _ in range(3 * bs.ATTEMPTS):
        slot, state, _why = bs.choose(state)
        booted.append(slot)
    assert booted[:2 * bs.ATTEMPTS] == ["B"] * bs.ATTEMPTS + ["A"] * bs.ATTEMPTS
    assert booted[2 * bs.ATTEMPTS] == "B"  # both good: the primary first again
    state = bs.mark_bad(state, "B")  # B's check fails at last
    for _ in range(2 * bs.ATTEMPTS):
        slot, state, _why = bs.choose(state)
        assert slot == "A"
    with pytest.raises(bs.NoBootableSlotError, match="A is bad"):
        bs.choose(bs.mark_bad(state, "A"))


def test_install_steps_as_rauc_calls_them() -> None:
    img = bs.Image("0.2.0", "edgekey-host", SHA)
    state = bs.record_install(bs.blank(), "A", bs.Image("0.1.0", "edgekey-host", SHA))
    state = bs.begin_install(state, "B", img)  # pre-install
    state = bs.set_state(state, "B", False)  # before writing
    assert state.primary == "A" and not state.b.bootable and state.pending == ("B", img)
    state = bs.set_primary(state, "B")  # after writing: the image lands with the switch
    assert state.primary == "B" and state.b == bs.Slot("good", bs.ATTEMPTS, img)
    assert state.pending is None
    state = bs.mark_bad(state, "B")
    slot, state, why = bs.choose(state)
    assert slot == "A" and why.startswith("rollback: primary slot B is marked bad")


# ----------------------------------------------------------------- versions

def test_versions_compare_as_dotted_integers() -> None:
    order = ["0.0.9", "0.1.0-rc1", "0.1.0", "0.2.0", "0.10.0", "1.0.0"]
    for lo, hi in itertools.pairwise(order):
        assert bs.compare_versions(lo, hi) == -1 and bs.compare_versions(hi, lo) == 1
    assert bs.compare_versions("1.0", "1.0.0") == 0
    assert bs.compare_versions("1.0.0+build7", "1.0.0") == 0
    for bad in ("", "v1.0", "1..0", "1.0 ", "latest"):
        with pytest.raises(ValueError, match="dotted integers"):
            bs.version_key(bad)


# ----------------------------------------------------------------- on flash

def test_blank_partition_reads_as_the_initial_state() -> None:
    assert bs.load(ram()) == bs.blank()
    assert bs.blank().a.bootable and not bs.blank().b.bootable


def test_many_saves_never_fill_the_partition() -> None:
    dev = ram()
    state = bs.blank()
    for i in range(400):
        state = bs.record_install(state, "AB"[i % 2], bs.Image(f"0.{i}.0", "edgekey-host", SHA))
        bs.save(dev, state)
    assert bs.load(dev) == state
    assert RecordLog(dev).stats().used_segments <= 2


def _cut_budgets(written: int) -> list[int]:
    """Every byte of a save's record writes (its first and last 300), every 61st elsewhere."""
    return sorted({*range(0, written + 1, 61), *range(min(300, written + 1)),
                   *range(max(0, written - 300), written + 1)})


def test_a_power_cut_in_a_save_leaves_the_old_state_or_the_new() -> None:
    old = bs.record_install(bs.blank(), "A", bs.Image("0.1.0", "edgekey-host", SHA))
    new = bs.set_primary(bs.begin_install(old, "B", bs.Image("0.2.0", "edgekey-host", SHA)), "B")
    base, swept = ram(), 0
    for saves in range(1, 80):  # until a save that opens a segment and releases the old one
        bs.save(base, old)
        probe = PowerCutDevice(copy.deepcopy(base))
        bs.save(probe, new)
        if saves > 1 and probe.written < 2 * SEG:
            continue
        swept += 1
        seen = set()
        for budget in _cut_budgets(probe.written):
            dev = copy.deepcopy(base)
            with contextlib.suppress(PowerCut):
                bs.save(PowerCutDevice(dev, budget), new)
            got = bs.load(dev)
            assert got in (old, new), (saves, budget)
            seen.add(got == new)
            bs.save(dev, got)  # and the log stays writable after the cut
        assert seen == {False, True}
        if swept == 2:
            break
    assert swept == 2


def test_an_unknown_record_format_on_flash_is_named() -> None:
    dev = ram()
    raw = bytearray(bs.encode(bs.blank()))
    raw[4] = 2
    RecordLog(dev).append(bytes(raw))
    with pytest.raises(bs.BootStateFormatError, match="record 1: boot state record of format 2"):
        bs.load(dev)


# ----------------------------------------------------------------- the backend

@pytest.fixture
def image(tmp_path: Path) -> Path:
    board = load_board(board_path("pl-terminal"))
    path = tmp_path / "flash.img"
    FileBlockDevice.create_image(path, board.flash.size_bytes,
                                 board.flash.erase_block_bytes).close()
    return path


def ctl(image: Path, *args: str, env: dict[str, str] | None = None,
        monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[int, str, str]:
    if env and monkeypatch:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = bootctl.main(["--board", "pl-terminal", "--device", str(image), *args])
    return rc, out.getvalue(), err.getvalue()


def test_backend_answers_as_rauc_expects(image: Path) -> None:
    assert ctl(image, "get-primary") == (0, "A\n", "")
    assert ctl(image, "get-state", "A")[:2] == (0, "good\n")
    assert ctl(image, "get-state", "B")[:2] == (0, "bad\n")
    assert ctl(image, "set-state", "B", "good") == (0, "", "")
    assert ctl(image, "set-primary", "B") == (0, "", "")
    assert ctl(image, "get-primary")[1] == "B\n"
    assert ctl(image, "get-current")[1] == "B\n"  # not booted yet: the primary
    rc, out, err = ctl(image, "choose")
    assert (rc, out) == (0, "B\n") and "booting primary slot B" in err
    assert ctl(image, "--current", "A", "get-current")[1] == "A\n"
    assert ctl(image, "set-state", "B", "bad") == (0, "", "")
    assert ctl(image, "get-state", "B")[1] == "bad\n"
    assert ctl(image, "get-current")[1] == "B\n"


def test_backend_usage_errors_exit_2(image: Path) -> None:
    for args in (["get-state", "C"], ["set-state", "A", "maybe"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exc, redirect_stderr(io.StringIO()):
            ctl(image, *args)
        assert exc.value.code == 2


def test_backend_fails_in_one_line_on_a_missing_device(tmp_path: Path) -> None:
    rc, out, err = ctl(tmp_path / "none.img", "get-primary")
    assert rc == 1 and out == "" and err.count("\n") == 1 and "none.img" in err


def _rauc_env(tmp: Path, version: str, booted: str = "A") -> dict[str, str]:
    (tmp / "manifest.raucm").write_text(f"[update]\ncompatible=edgekey-pl-terminal\n"
                                        f"version={version}\n")
    return {"RAUC_BUNDLE_MOUNT_POINT": str(tmp), "RAUC_CURRENT_BOOTNAME": booted,
            "RAUC_TARGET_SLOTS": "2", "RAUC_SLOT_BOOTNAME_2": bs.other(booted),
            "RAUC_IMAGE_DIGEST_2": SHA}


def test_pre_install_refuses_downgrades_and_records_the_pending_image(tmp_path: Path) -> None:
    state = bs.record_install(bs.blank(), "A", bs.Image("0.2.0", "edgekey-pl-terminal", SHA))
    for version, why in (("0.1.0", "downgrade: bundle 0.1.0 is older than 0.2.0"),
                         ("0.2.0", "not newer")):
        with pytest.raises(bootctl.Refused, match=re.escape(why)):
            bootctl.pre_install(state, _rauc_env(tmp_path, version), "")
    assert bootctl.pre_install(state, _rauc_env(tmp_path, "0.1.0"), "allow-downgrade").pending
    new = bootctl.pre_install(state, _rauc_env(tmp_path, "0.3.0"), "")
    assert new.pending == ("B", bs.Image("0.3.0", "edgekey-pl-terminal", SHA))
    with pytest.raises(bootctl.Refused, match="is for 'edgekey-pl-terminal', this system"):
        bootctl.pre_install(state, {**_rauc_env(tmp_path, "0.3.0"),
                                    "RAUC_SYSTEM_COMPATIBLE": "edgekey-host"}, "")


def test_pre_install_refusal_is_a_rauc_handler_line(image: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    board = load_board(board_path("pl-terminal"))
    bs.update(image, board, lambda s: bs.record_install(
        s, "A", bs.Image("0.2.0", "edgekey-pl-terminal", SHA)))
    rc, out, _ = ctl(image, "pre-install", env=_rauc_env(tmp_path, "0.1.0"),
                       monkeypatch=monkeypatch)
    assert rc == 1 and out.startswith("<< error refused: downgrade")
    assert bs.read(image, board).pending is None
