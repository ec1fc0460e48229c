"""The emulated PLC channel: the model on a fake clock, and the process on real ptys and sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import serial
from hypothesis import given
from hypothesis import strategies as st

from emulator.plc.__main__ import main, parse_end
from emulator.plc.model import (
    COUNTER_NAMES,
    Channel,
    ChannelError,
    ChannelParams,
    OneWayChannel,
    Splitter,
    UnitKind,
)
from hal.dlt698 import Control, Frame, FunctionCode, ServerAddress, encode_frame

ROOT = Path(__file__).resolve().parent.parent
RATE = 25 * 1024  # the slowest HPLC rate, bytes/s
LATENCY = 0.02
# Process tests: how long to wait for the process to be ready, for a frame to
# cross, for it to exit. Generous: a loaded CI host, never a sleep in the pass path.
READY_TIMEOUT_S = 10.0
IO_TIMEOUT_S = 5.0
EXIT_TIMEOUT_S = 5.0


def frame(apdu: bytes = b"\x05\x01", address: bytes = b"\x11\x22\x33\x44\x55\x66",
          *, from_server: bool = False) -> bytes:
    return encode_frame(Frame(Control(FunctionCode.USER_DATA, from_server=from_server,
                                      initiator=not from_server),
                              ServerAddress(address), 0x10, apdu))


def params(**kw: object) -> ChannelParams:
    base: dict[str, object] = {"rate_bytes_per_s": RATE, "latency_s": LATENCY}
    base.update(kw)
    return ChannelParams(**base)  # type: ignore[arg-type]


def drain(ch: OneWayChannel, now: float) -> bytes:
    """Everything still on the line, pulled at its own deadlines."""
    out = bytearray(ch.pull(now))
    while (t := ch.next_deadline()) is not None:
        now = max(now, t)
        out += ch.pull(now)
    return bytes(out)


def conserved(c: dict[str, int]) -> bool:
    return (c["bytes_in"] == c["bytes_out"] + c["bytes_lost"] + c["bytes_dropped_overflow"]
            + c["bytes_in_flight"] + c["pending_bytes"]
            and c["units_in"] == c["units_out"] + c["units_lost"] + c["units_dropped_overflow"]
            + c["units_in_flight"]
            and c["frames_in"] == c["frames_out"] + c["frames_lost"]
            + c["frames_dropped_overflow"] + c["frames_in_flight"])


# ------------------------------------------------------------------ the model

def test_clean_line_delivers_every_frame_byte_exact_and_in_order() -> None:
    ch = OneWayChannel(params())
    frames = [frame(bytes([i]) * (i * 7 % 50)) for i in range(40)]
    stream = b"".join(frames)
    now = 1.0
    for i in range(0, len(stream), 33):
        now += 1e-4
        ch.push(stream[i:i + 33], now)
    assert drain(ch, now) == stream
    c = ch.counters()
    assert (c["frames_in"], c["frames_out"], c["bits_flipped"]) == (40, 40, 0)
    assert c["bytes_out"] == len(stream) and conserved(c)


def test_delivery_time_is_serialisation_after_the_line_frees_plus_latency() -> None:
    ch = OneWayChannel(params())
    a, b, late = frame(b"a" * 100), frame(b"b" * 40), frame(b"c")
    ch.push(a + b, 1.0)
    end_a = 1.0 + len(a) / RATE
    end_b = end_a + len(b) / RATE  # b waits for the line behind a
    assert ch.next_deadline() == pytest.approx(end_a + LATENCY)
    assert ch.pull(end_a + LATENCY - 1e-9) == b""
    assert ch.pull(end_a + LATENCY) == a
    assert ch.next_deadline() == pytest.approx(end_b + LATENCY)
    assert ch.pull(end_b + LATENCY) == b
    ch.push(late, 5.0)  # the line has been idle: it starts at arrival
    deliveries = ch.pull_deliveries(10.0)
    assert [d.delivered_at for d in deliveries] == [pytest.approx(5.0 + len(late) / RATE
                                                                  + LATENCY)]
    assert deliveries[0].arrived_at == 5.0 and ch.next_deadline() is None


def test_a_unit_that_does_not_fit_the_buffer_is_dropped_whole_and_counted() -> None:
    f = frame(b"x" * 23)
    assert len(f) == 40
    ch = OneWayChannel(params(rate_bytes_per_s=1000, latency_s=0.0, buffer_bytes=100))
    ch.push(f + f + f, 0.0)  # 120 bytes at once: the third does not fit beside 80
    c = ch.counters()
    assert (c["units_dropped_overflow"], c["frames_dropped_overflow"]) == (1, 1)
    assert (c["bytes_dropped_overflow"], c["buffered_bytes"], c["max_buffered_bytes"]) == (
        40, 80, 80)
    ch.push(f, 0.03)  # the first frame is still being serialised (until 0.04): no room
    assert ch.counters()["units_dropped_overflow"] == 2
    ch.push(f, 0.041)  # the first frame's last byte is out: room for one again
    assert ch.counters()["units_dropped_overflow"] == 2
    assert ch.next_deadline() == pytest.approx(0.04)
    assert drain(ch, 0.041) == f * 3
    c = ch.counters()
    assert c["frames_in"] == 5 and c["frames_out"] == 3 and conserved(c)
    assert ch.pull_deliveries(1.0) == []


def test_lost_and_dropped_units_are_accounted_for_at_every_moment() -> None:
    ch = OneWayChannel(params(frame_loss=0.3, buffer_bytes=600, seed=7))
    stream = b"".join(frame(bytes([i % 256]) * (i % 60)) + b"\xfe" * (i % 3)
                      for i in range(300))
    now = 0.0
    for i in range(0, len(stream), 97):
        ch.push(stream[i:i + 97], now)
        assert conserved(ch.counters())
        now += 0.002
        ch.pull(now)
        assert conserved(ch.counters())
    drain(ch, now)
    c = ch.counters()
    assert conserved(c) and c["units_in_flight"] == c["bytes_in_flight"] == 0
    assert c["frames_lost"] > 0 and c["frames_dropped_overflow"] > 0 and c["frames_out"] > 0
    assert c["frames_in"] == c["frames_out"] + c["frames_lost"] + c["frames_dropped_overflow"]
    assert c["bytes_in"] == c["bytes_out"] + c["bytes_lost"] + c["bytes_dropped_overflow"]


def test_the_same_seed_gives_the_same_output_and_another_seed_another() -> None:
    stream = b"".join(frame(bytes([i]) * 30) for i in range(100))

    def run(seed: int) -> tuple[bytes, dict[str, int]]:
        ch = OneWayChannel(params(frame_loss=0.2, bit_error_rate=1e-3, seed=seed))
        ch.push(stream, 0.0)
        return drain(ch, 0.0), ch.counters()

    assert run(3) == run(3)
    assert run(3)[0] != run(4)[0]


def test_bit_errors_flip_about_the_expected_number_of_bits() -> None:
    ber = 1e-3
    stream = b"".join(frame(bytes(range(100))) for _ in range(200))
    ch = OneWayChannel(params(bit_error_rate=ber, seed=11, buffer_bytes=len(stream)))
    ch.push(stream, 0.0)
    out = drain(ch, 0.0)
    assert len(out) == len(stream)  # bit errors never change the length
    flipped = sum(bin(x ^ y).count("1") for x, y in zip(stream, out, strict=True))
    expected = ber * 8 * len(stream)  # about 190; 4 standard deviations is about 55
    c = ch.counters()
    assert c["bits_flipped"] == flipped
    assert 0.7 * expected < flipped < 1.3 * expected
    assert 0 < c["frames_corrupted"] <= c["frames_out"]


def test_every_bit_flips_at_a_bit_error_rate_of_one() -> None:
    ch = OneWayChannel(params(bit_error_rate=1.0))
    f = frame()
    ch.push(f, 0.0)
    assert drain(ch, 0.0) == bytes(b ^ 0xFF for b in f)


def test_garbage_and_wake_up_bytes_pass_as_units_of_their_own() -> None:
    ch = OneWayChannel(params())
    f = frame()
    ch.push(b"\xfe\xfe\x00" + f + b"\x16", 1.0)
    kinds = [d.unit.kind for d in ch.pull_deliveries(2.0)]
    assert kinds == [UnitKind.GARBAGE] * 3 + [UnitKind.FRAME, UnitKind.GARBAGE]
    assert ch.counters()["garbage_units_in"] == 4


def test_a_truncated_frame_goes_out_as_it_is_after_the_idle_gap() -> None:
    ch = OneWayChannel(params(idle_gap_s=0.1))
    f = frame(b"z" * 30)
    ch.push(f[:20], 1.0)
    assert ch.counters()["pending_bytes"] == 20
    assert ch.next_deadline() == pytest.approx(1.1)
    ch.push(f[20:25], 1.05)  # more bytes: the gap counts from these
    assert ch.next_deadline() == pytest.approx(1.15)
    assert ch.pull(1.149) == b""
    deliveries = ch.pull_deliveries(5.0)  # pulled late: it still left when the gap ended
    assert [(d.unit.kind, d.data) for d in deliveries] == [(UnitKind.TRUNCATED, f[:25])]
    assert deliveries[0].arrived_at == pytest.approx(1.15)
    assert deliveries[0].delivered_at == pytest.approx(1.15 + 25 / RATE + LATENCY)
    ch.push(f, 5.0)  # the next frame is cut afresh
    assert drain(ch, 5.0) == f
    assert ch.counters()["truncated_units_in"] == 1


def test_a_push_after_the_idle_gap_first_flushes_the_stale_candidate() -> None:
    ch = OneWayChannel(params(idle_gap_s=0.1))
    f = frame()
    ch.push(f[:5], 0.0)
    ch.push(f, 1.0)  # no pull in between
    units = [(d.unit.kind, d.arrived_at) for d in ch.pull_deliveries(2.0)]
    assert units == [(UnitKind.TRUNCATED, pytest.approx(0.1)), (UnitKind.FRAME, 1.0)]


@pytest.mark.parametrize("length, why", [(9, "below the minimal frame"),
                                         (200, "a frame that could never fit the buffer")])
def test_a_candidate_with_an_impossible_length_passes_as_garbage_and_never_stalls(
        length: int, why: str) -> None:
    ch = OneWayChannel(params(buffer_bytes=64))
    f = frame()
    bad = bytes((0x68, length & 0xFF, length >> 8)) + b"\x01" * 8
    ch.push(bad + f, 1.0)
    deliveries = ch.pull_deliveries(2.0)
    assert b"".join(d.data or b"" for d in deliveries) == bad + f, why
    assert [d.unit.kind for d in deliveries][-1] is UnitKind.FRAME
    assert deliveries[0].unit.data == b"\x68" and ch.next_deadline() is None


def test_the_length_field_is_read_through_its_fourteen_bit_mask() -> None:
    f = bytearray(frame())
    f[2] |= 0x80  # reserved bit 15: the modem carries the frame by its 14-bit length
    units = Splitter(8192).feed(bytes(f))
    assert [(u.kind, u.data) for u in units] == [(UnitKind.FRAME, bytes(f))]


ANY_UNIT = st.one_of(
    st.builds(lambda apdu, sa: frame(apdu, sa), st.binary(max_size=80),
              st.binary(min_size=1, max_size=16)),
    st.binary(max_size=12),
    st.builds(lambda apdu, cut: frame(apdu)[:cut], st.binary(max_size=40),
              st.integers(1, 20)),
    st.sampled_from([b"\x68", b"\x68\x05\x00", b"\x68\xff\x3f", b"\xfe\xfe\xfe\xfe"]),
)


@given(parts=st.lists(ANY_UNIT, max_size=12), cuts=st.lists(st.integers(1, 64), min_size=1),
       buffer_bytes=st.sampled_from([64, 200, 8192]))
def test_any_chunking_gives_the_same_units_and_the_same_output(
        parts: list[bytes], cuts: list[int], buffer_bytes: int) -> None:
    stream = b"".join(parts)

    def run(sizes: list[int]) -> tuple[list, bytes, dict[str, int]]:
        splitter = Splitter(buffer_bytes)
        ch = OneWayChannel(params(buffer_bytes=buffer_bytes, rate_bytes_per_s=2000,
                                  bit_error_rate=0.01, frame_loss=0.2, seed=5))
        units: list = []
        pos = i = 0
        while pos < len(stream):
            chunk = stream[pos:pos + sizes[i % len(sizes)]]
            units += splitter.feed(chunk)
            ch.push(chunk, 1.0)
            pos += len(chunk)
            i += 1
        tail = splitter.flush()
        units += [tail] if tail else []
        return units, drain(ch, 1.0), ch.counters()

    whole = run([len(stream) or 1])
    assert run(cuts) == whole
    units, _, counters = whole
    assert b"".join(u.data for u in units) == stream
    assert counters["units_in"] == len(units) and conserved(counters)


def test_time_going_backwards_is_the_callers_error() -> None:
    ch = OneWayChannel(params())
    ch.push(b"\x00", 2.0)
    with pytest.raises(ChannelError, match="backwards"):
        ch.pull(1.0)
    with pytest.raises(ChannelError, match="now"):
        ch.push(b"", float("nan"))


@pytest.mark.parametrize("field, value", [
    ("rate_bytes_per_s", 0), ("rate_bytes_per_s", float("inf")), ("latency_s", -0.001),
    ("bit_error_rate", 1.5), ("frame_loss", -0.1), ("frame_loss", float("nan")),
    ("buffer_bytes", 11), ("buffer_bytes", 100.0), ("seed", True), ("idle_gap_s", 0),
])
def test_parameters_out_of_range_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ChannelError, match=field):
        params(**{field: value})


def test_a_channel_has_two_independent_directions() -> None:
    ch = Channel(params(frame_loss=0.5))
    stream = b"".join(frame(bytes([i])) for i in range(64))
    ch.to_terminal.push(stream, 0.0)
    ch.to_meters.push(stream, 0.0)
    assert ch.next_deadline() == pytest.approx(len(frame(b"\x00")) / RATE + LATENCY)
    up, down = drain(ch.to_terminal, 0.0), drain(ch.to_meters, 0.0)
    assert up != down  # their own draws: not the same frames lost both ways
    counters = ch.counters()
    assert set(counters) == {"to_terminal", "to_meters"}
    assert all(set(c) == set(COUNTER_NAMES) for c in counters.values())


# ------------------------------------------------------------------ the command line, in process

def test_end_specs_parse_and_bad_ones_are_refused() -> None:
    assert parse_end("pty:/tmp/x").path == "/tmp/x"
    assert parse_end("socket").port == 0 and parse_end("socket:4000").port == 4000
    for bad in ("pty:", "socket:x", "socket:70000", "tcp:1", ""):
        with pytest.raises(Exception, match=r"expected|port"):
            parse_end(bad)


@pytest.mark.parametrize("extra, message", [
    (["--rate-kbyte-s", "200"], "outside board host's PLC range 25..128"),
    (["--rate-kbyte-s", "10"], "outside"),
    (["--latency-ms", "-1"], "--latency-ms"),
    (["--ber", "2"], "--ber"),
    (["--buffer-bytes", "4"], "--buffer-bytes"),
    (["--terminal-end", "tcp:1"], "expected pty:PATH"),
])
def test_bad_options_exit_2_with_a_clear_message(extra: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--terminal-end", "socket", "--meter-end", "socket", *extra]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.host_only
def test_an_end_that_cannot_be_opened_exits_1_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--terminal-end", "socket", "--meter-end", f"pty:{tmp_path}/no/such/dir/m"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "cannot open the meters end" in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the process

@contextmanager
def channel_process(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen, dict]]:
    """The channel process, ready; killed on any way out that did not stop it."""
    ready = tmp_path / "ready.json"
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "emulator.plc", "--ready", str(ready),
             "--stats", str(tmp_path / "stats.json"), *args],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "the channel never became ready"
            time.sleep(0.01)
        info = json.loads(ready.read_text())
        assert info["pid"] == proc.pid
        yield proc, info
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(EXIT_TIMEOUT_S)


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(EXIT_TIMEOUT_S)


def read_exactly(port: serial.SerialBase, n: int) -> bytes:
    got = bytearray()
    deadline = time.monotonic() + IO_TIMEOUT_S
    while len(got) < n and time.monotonic() < deadline:
        got += port.read(n - len(got))
    return bytes(got)


def wait_for_stats(path: Path, ok: object) -> dict:
    deadline = time.monotonic() + IO_TIMEOUT_S
    while True:
        stats = json.loads(path.read_text()) if path.exists() else {}
        if stats and ok(stats):  # type: ignore[operator]
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


@pytest.mark.host_only
def test_process_carries_frames_both_ways_between_two_ptys(tmp_path: Path) -> None:
    t_path, m_path = tmp_path / "terminal", tmp_path / "meters"
    requests = [frame(bytes([i]) * 20) for i in range(5)]
    replies = [b"\xfe\xfe\xfe\xfe" + frame(bytes([i]) * 40, from_server=True) for i in range(5)]
    with channel_process(tmp_path, "--terminal-end", f"pty:{t_path}",
                         "--meter-end", f"pty:{m_path}", "--latency-ms", "5") as (proc, info):
        assert info["terminal"] == str(t_path) and info["meters"] == str(m_path)
        assert t_path.is_symlink() and m_path.is_symlink()
        terminal = serial.serial_for_url(info["terminal"], timeout=0.5)
        meters = serial.serial_for_url(info["meters"], timeout=0.5)
        try:
            for request, reply in zip(requests, replies, strict=True):
                terminal.write(request)
                assert read_exactly(meters, len(request)) == request
                meters.write(reply)
                assert read_exactly(terminal, len(reply)) == reply
            terminal.close()  # a client may go away and come back; the master never sees EIO
            terminal = serial.serial_for_url(info["terminal"], timeout=0.5)
            meters.write(replies[0])
            assert read_exactly(terminal, len(replies[0])) == replies[0]
        finally:
            terminal.close()
            meters.close()
        stats_path = tmp_path / "stats.json"
        running = wait_for_stats(stats_path, lambda s: s["uptime_s"] >= 1.0)  # the periodic write
        assert not running["final"]
        assert stop(proc) == 0
    assert not t_path.exists() and not t_path.is_symlink() and not m_path.is_symlink()
    assert not (tmp_path / "ready.json").exists()
    stats = json.loads(stats_path.read_text())
    assert stats["final"] and stats["pid"] == info["pid"]
    down, up = stats["to_meters"], stats["to_terminal"]
    assert (down["frames_in"], down["frames_out"], down["bytes_out"]) == (
        5, 5, sum(map(len, requests)))
    assert (up["frames_in"], up["frames_out"], up["garbage_units_in"]) == (6, 6, 24)
    assert up["bytes_out"] == sum(map(len, replies)) + len(replies[0])
    assert stats["ends"]["terminal"]["bytes_written"] == up["bytes_out"]
    assert sorted(os.listdir(tmp_path)) == ["stats.json", "stderr.txt"]
    assert (tmp_path / "stderr.txt").read_text() == ""


@pytest.mark.host_only
def test_process_socket_ends_serve_one_client_at_a_time_and_reaccept(tmp_path: Path) -> None:
    request, reply = frame(b"q" * 10), frame(b"r" * 30, from_server=True)
    with channel_process(tmp_path, "--terminal-end", "socket", "--meter-end", "socket:0",
                         "--rate-kbyte-s", "25") as (proc, info):
        assert info["terminal"].startswith("socket://127.0.0.1:")
        assert info["meters"].startswith("socket://127.0.0.1:")
        terminal = serial.serial_for_url(info["terminal"], timeout=0.5)
        meters = serial.serial_for_url(info["meters"], timeout=0.5)
        try:
            terminal.write(request)
            assert read_exactly(meters, len(request)) == request
            meters.write(reply)
            assert read_exactly(terminal, len(reply)) == reply
            meters.close()
            terminal.write(request)  # nobody on the meter end: dropped and counted
            stats_path = tmp_path / "stats.json"
            wait_for_stats(stats_path, lambda s: s["ends"]["meters"]["bytes_dropped"]
                           == len(request))
            meters = serial.serial_for_url(info["meters"], timeout=0.5)  # re-accepted
            meters.write(reply)
            assert read_exactly(terminal, len(reply)) == reply
        finally:
            terminal.close()
            meters.close()
        assert stop(proc) == 0
    stats = json.loads(stats_path.read_text())
    assert stats["final"] and stats["params"]["rate_bytes_per_s"] == 25 * 1024
    assert stats["ends"]["meters"]["connections"] == 2
    assert stats["to_terminal"]["frames_out"] == 2 and stats["to_meters"]["frames_out"] == 2
