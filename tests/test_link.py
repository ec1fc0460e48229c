"""Link driver over real pyserial ports: loop://, a pty pair, socket:// on loopback."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import serial

from hal import board
from hal.dlt698 import (
    Control,
    Frame,
    FrameDecoder,
    FunctionCode,
    LocalFrameError,
    Reason,
    ServerAddress,
    encode_frame,
)
from hal.link import (
    DEFAULT_IDLE_GAP_S,
    Link,
    LinkClosedError,
    LinkConfigError,
    LinkError,
    LinkOpenError,
    LinkTimeout,
    TokenBucket,
    open_link,
)

# Under qemu-user everything is about 8x slower. A wait that should end early
# gets plenty (it costs nothing when things work); a wait that is meant to
# expire is kept short, yet long enough for a peer thread to answer in.
EMULATED = bool(os.environ.get("EDGEKEY_EMULATED"))
PATIENCE_S = 5.0 * (8 if EMULATED else 1)
SILENCE_S = 0.15 * (3 if EMULATED else 1)

METER = ServerAddress(b"\x11\x22\x33\x44\x55\x66")
REQUEST = Frame(Control(FunctionCode.USER_DATA), METER, 0x10, b"\x05\x01\x00\x40\x01\x02\x00\x00")


def reply_to(request: Frame) -> Frame:
    """What a meter sends back: DIR set, PRM clear, same addresses."""
    return Frame(Control(FunctionCode.USER_DATA, from_server=True, initiator=False),
                 request.server, request.client, b"\x85" + request.apdu[1:])


def frame_of_size(total: int, client: int = 0x10) -> Frame:
    """A frame of ``total`` bytes on the wire (six-byte SA: 17 bytes of overhead)."""
    apdu = (bytes(range(256)) * (total // 256 + 1))[:total - 17]
    return Frame(Control(FunctionCode.USER_DATA), METER, client, apdu)


@pytest.fixture
def loop() -> Iterator[Link]:
    with open_link("loop://", timeout_s=PATIENCE_S) as link:
        yield link


# ---------------------------------------------------------------- loop://

def test_frame_sent_on_loop_is_received_with_exact_counters(loop):
    size = loop.send_frame(REQUEST)
    assert loop.recv_frame() == REQUEST
    c = loop.counters()
    assert size == len(encode_frame(REQUEST))
    assert (c.bytes_tx, c.bytes_rx, c.frames_tx, c.frames_rx) == (size, size, 1, 1)
    assert (c.timeouts, c.retries, c.unmatched, c.garbage_bytes) == (0, 0, 0, 0)
    assert sum(c.rejects.values()) == 0


def test_garbage_between_frames_is_counted_and_skipped(loop):
    other = reply_to(REQUEST)
    junk = b"\x00\x11\x22"
    bad_candidate = b"\x68\x00\x00"  # a start byte with an impossible length
    loop.send_frame(REQUEST)
    loop.port.write(junk + b"\xfe\xfe\xfe\xfe")
    loop.send_frame(other)
    loop.port.write(bad_candidate)
    loop.send_frame(REQUEST)
    assert [loop.recv_frame() for _ in range(3)] == [REQUEST, other, REQUEST]
    c = loop.counters()
    sent = 2 * len(encode_frame(REQUEST)) + len(encode_frame(other))
    assert c.bytes_tx == sent
    assert c.bytes_rx == sent + len(junk) + 4 + len(bad_candidate)
    assert (c.frames_tx, c.frames_rx) == (3, 3)
    assert c.garbage_bytes == len(junk) + 2  # the wake-up bytes are not garbage
    assert c.rejects[Reason.GARBAGE] == 2
    assert c.rejects[Reason.BAD_LENGTH] == 1
    assert sum(c.rejects.values()) == 3


def test_recv_frame_on_a_silent_line_raises_link_timeout_and_counts_it(loop):
    start = time.monotonic()
    with pytest.raises(LinkTimeout, match="loop://"):
        loop.recv_frame(timeout=0.05)
    assert time.monotonic() - start >= 0.05
    assert loop.counters().timeouts == 1


def test_frame_cut_off_mid_way_does_not_hold_back_the_next_frame(loop):
    cut = encode_frame(frame_of_size(600))[:40]  # its length field promises 560 more bytes
    loop.port.write(cut)
    loop.send_frame(REQUEST)
    start = time.monotonic()
    assert loop.recv_frame() == REQUEST
    assert time.monotonic() - start >= DEFAULT_IDLE_GAP_S * 0.9
    c = loop.counters()
    assert c.rejects[Reason.TRUNCATED] == 1
    assert c.frames_rx == 1 and c.timeouts == 0


def test_request_gives_up_after_its_retries_with_link_timeout(loop):
    # On loop:// the only frame that comes back is our own request: not a reply.
    with pytest.raises(LinkTimeout, match="3 attempt"):
        loop.request(REQUEST, retries=2, timeout=0.05)
    c = loop.counters()
    assert (c.frames_tx, c.retries, c.timeouts, c.unmatched) == (3, 2, 3, 3)


def test_frame_over_max_frame_bytes_is_refused_before_anything_is_sent():
    with open_link("loop://", max_frame_bytes=64) as link:
        with pytest.raises(LocalFrameError, match="exceeds max_frame_bytes 64"):
            link.send_frame(frame_of_size(65))
        assert link.counters().bytes_tx == 0
        link.send_frame(frame_of_size(64))
        assert link.counters().bytes_tx == 64


def test_closed_link_refuses_io_and_context_exit_closes_the_port():
    with open_link("loop://") as link:
        assert link.is_open
    assert not link.port.is_open
    with pytest.raises(LinkClosedError):
        link.send_frame(REQUEST)
    with pytest.raises(LinkClosedError):
        link.recv_frame()
    link.close()  # twice is fine


# ---------------------------------------------------------------- opening

def test_open_link_takes_its_numbers_from_a_board_link_config():
    cfg = board.load_board(board.board_path("host")).link("rs485")
    with open_link(cfg) as link:
        assert link.url == cfg.url
        assert link.timeout_s == cfg.timeout_ms / 1000
        assert link.pace_bytes_per_s == cfg.pace_bytes_per_s
        assert link.max_frame_bytes == cfg.max_frame_bytes
        assert link.port.baudrate == cfg.baud
    with open_link(cfg, timeout_s=0.5, pace_bytes_per_s=0) as link:
        assert link.timeout_s == 0.5 and link.pace_bytes_per_s == 0


def _closed_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("url", [
    "nosuch://meter",
    "/nonexistent-edgekey/ttyS9",
    "socket://127.0.0.1:{port}",
])
def test_unopenable_url_raises_link_error_naming_it(url):
    url = url.format(port=_closed_loopback_port())
    with pytest.raises(LinkError) as caught:
        open_link(url, timeout_s=1.0)
    assert isinstance(caught.value, LinkOpenError)
    assert caught.value.url == url and url in str(caught.value) and caught.value.reason


@pytest.mark.parametrize("kwargs", [
    {"baud": 0}, {"timeout_s": 0}, {"pace_bytes_per_s": -1}, {"max_frame_bytes": 11},
    {"idle_gap_s": 0},
])
def test_out_of_range_link_parameters_are_refused(kwargs):
    with pytest.raises(LinkConfigError):
        open_link("loop://", **kwargs)


# ---------------------------------------------------------------- pty

def _read_exact(fd: int, n: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    out = b""
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        out += os.read(fd, n - len(out))
    return out


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, str]]:
    """The master fd the test drives, and the slave's path the link opens."""
    master, slave = os.openpty()
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def test_pty_carries_frames_both_ways(pty_pair):
    master, path = pty_pair
    with open_link(path, timeout_s=PATIENCE_S) as link:
        sent = encode_frame(REQUEST)
        link.send_frame(REQUEST)
        assert _read_exact(master, len(sent), PATIENCE_S) == sent
        answer = reply_to(REQUEST)
        os.write(master, b"\xfe\xfe" + encode_frame(answer))
        assert link.recv_frame() == answer
        c = link.counters()
        assert (c.bytes_tx, c.bytes_rx) == (len(sent), 2 + len(encode_frame(answer)))


def test_second_open_of_the_same_tty_is_refused(pty_pair):
    _, path = pty_pair
    with open_link(path), pytest.raises(LinkOpenError, match=path):
        open_link(path)


# ---------------------------------------------------------------- socket://

@contextmanager
def loopback_peer(handler: Callable[[socket.socket], None]) -> Iterator[int]:
    """A TCP peer on 127.0.0.1 (ephemeral port) running ``handler`` on one connection."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(PATIENCE_S)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(PATIENCE_S)
                handler(conn)
        except Exception as exc:  # reported by the test thread below
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        thread.join(PATIENCE_S)
    assert not errors, errors


def echo(conn: socket.socket) -> None:
    while data := conn.recv(4096):
        conn.sendall(data)


def test_socket_link_to_a_loopback_echo_peer_round_trips_a_frame():
    with loopback_peer(echo) as port, \
            open_link(f"socket://127.0.0.1:{port}", timeout_s=PATIENCE_S) as link:
        link.send_frame(REQUEST)
        assert link.recv_frame() == REQUEST
        c = link.counters()
        assert c.bytes_rx == c.bytes_tx == len(encode_frame(REQUEST))


def drops_first_request(seen: list[Frame]) -> Callable[[socket.socket], None]:
    """A meter that ignores the first request and answers the rest."""

    def handler(conn: socket.socket) -> None:
        decoder = FrameDecoder()
        while data := conn.recv(4096):
            decoder.receive_data(data)
            for event in decoder.events():
                if isinstance(event, Frame):
                    seen.append(event)
                    if len(seen) > 1:
                        conn.sendall(encode_frame(reply_to(event)))

    return handler


def test_request_resends_when_the_peer_drops_the_first_request():
    seen: list[Frame] = []
    with loopback_peer(drops_first_request(seen)) as port, \
            open_link(f"socket://127.0.0.1:{port}", timeout_s=PATIENCE_S) as link:
        assert link.request(REQUEST, retries=2, timeout=SILENCE_S * 2) == reply_to(REQUEST)
        c = link.counters()
    assert seen == [REQUEST, REQUEST]
    assert (c.frames_tx, c.frames_rx, c.retries, c.timeouts, c.unmatched) == (2, 1, 1, 1, 0)


# ---------------------------------------------------------------- pacing

class FakeClock:
    """A clock that only moves when the driver sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


class RecordingPort:
    """A real loop:// port that also notes when each write happened, by the fake clock."""

    def __init__(self, clock: FakeClock):
        self._port = serial.serial_for_url("loop://", timeout=PATIENCE_S)
        self._clock = clock
        self.writes: list[tuple[float, int]] = []

    def write(self, data: bytes) -> int:
        self.writes.append((self._clock.now, len(data)))
        return self._port.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._port, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("_port", "_clock", "writes"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._port, name, value)


def test_paced_writes_never_exceed_the_rate_in_any_window():
    clock = FakeClock()
    port = RecordingPort(clock)
    rate = 1000
    link = Link(port, url="loop://", pace_bytes_per_s=rate, clock=clock, sleep=clock.sleep,
                timeout_s=PATIENCE_S)
    burst = link.pace_burst_bytes
    frames = [frame_of_size(1000, client=i) for i in range(3)]
    for f in frames:
        link.send_frame(f)
    assert [link.recv_frame() for _ in frames] == frames  # chunking kept the bytes intact
    link.close()
    times = [t for t, _ in port.writes]
    sizes = [n for _, n in port.writes]
    assert sum(sizes) == 3000 and max(sizes) <= burst
    for i in range(len(times)):
        sent = 0
        for j in range(i, len(times)):
            sent += sizes[j]
            assert sent <= burst + rate * (times[j] - times[i]) + 1e-6
    assert clock.now >= (3000 - burst) / rate  # and the fake clock, not the real one, waited


def test_unpaced_link_never_sleeps():
    clock = FakeClock()
    with open_link("loop://", clock=clock, sleep=clock.sleep) as link:
        link.send_frame(frame_of_size(1000))
        assert clock.now == 0.0 and link.pace_burst_bytes == 0


def test_token_bucket_refills_at_its_rate_up_to_its_depth():
    bucket = TokenBucket(rate=100, burst=10, now=0.0)
    assert bucket.reserve(10, now=0.0) == 0.0  # starts full
    assert bucket.reserve(5, now=0.0) == pytest.approx(0.05)
    assert bucket.reserve(10, now=100.0) == 0.0  # long idle refills to 10, not beyond
    assert bucket.reserve(1, now=100.0) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        bucket.reserve(11, now=200.0)


@pytest.mark.host_only
def test_4_kib_at_64_kib_per_s_takes_at_least_60_ms_of_real_time():
    rate = 64 * 1024
    with open_link("loop://", pace_bytes_per_s=rate, timeout_s=PATIENCE_S) as link:
        frames = [frame_of_size(1024, client=i) for i in range(4)]
        start = time.monotonic()
        for f in frames:
            link.send_frame(f)
            assert link.recv_frame() == f
        elapsed = time.monotonic() - start
        assert link.counters().bytes_tx == 4096
        assert elapsed >= (4096 - link.pace_burst_bytes) / rate >= 0.058
