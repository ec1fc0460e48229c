"""hal.pump: one thread serving several links over real ptys, with a fake clock for timers.

The test plays every meter itself from the pty masters, between run_once
calls, so no thread is needed. Every port, fd and selector is closed on
every path; a fixture checks the process has no more descriptors open after
a test than before it.
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import Any

import pytest
import serial

from hal.dlt698 import Control, Frame, FrameDecoder, FunctionCode, ServerAddress, encode_frame
from hal.linksession import (
    FrameReceived,
    LinkSession,
    LocalProtocolError,
    Rejected,
    RemoteProtocolError,
    Reply,
    Resend,
    Timeout,
)
from hal.pump import POLL_INTERVAL_S, LinkDown, Pump, PumpError

EMULATED = bool(os.environ.get("EDGEKEY_EMULATED"))
PATIENCE_S = 5.0 * (8 if EMULATED else 1)  # real time allowed for bytes to cross a pty
STEP_S = 0.01  # real time one run_once may wait for readiness in a polling test loop


def request_to(meter: int) -> Frame:
    return Frame(Control(FunctionCode.USER_DATA), ServerAddress(bytes([meter]) * 6), 0x10,
                 b"\x05\x01\x00\x40\x01\x02\x00\x00")


def reply_to(request: Frame) -> Frame:
    return Frame(Control(FunctionCode.USER_DATA, from_server=True, initiator=False),
                 request.server, request.client, b"\x85" + request.apdu[1:])


def report_from(request: Frame) -> Frame:
    """A frame the meter sends on its own: it answers no request."""
    return Frame(Control(FunctionCode.USER_DATA, from_server=True, initiator=True),
                 request.server, request.client, b"\x88\x02")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Meter:
    """The master side of a pty: what the meter on that line reads and writes."""

    def __init__(self, master: int):
        self.fd = master
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []
        self.bytes = b""

    def poll(self) -> None:
        while select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 4096)
            self.bytes += data
            self.decoder.receive_data(data)
            self.frames += [e for e in self.decoder.events() if isinstance(e, Frame)]

    def send(self, frame: Frame) -> None:
        os.write(self.fd, encode_frame(frame))


@pytest.fixture(autouse=True)
def no_descriptor_left_open() -> Iterator[None]:
    before = set(os.listdir("/proc/self/fd"))
    yield
    assert set(os.listdir("/proc/self/fd")) <= before


@contextmanager
def pty_links(n: int) -> Iterator[list[tuple[Meter, Any]]]:
    """``n`` pty pairs: a Meter on each master, a pyserial port on each slave."""
    with ExitStack() as stack:
        out = []
        for _ in range(n):
            master, slave = os.openpty()
            stack.callback(os.close, slave)
            stack.callback(_close_quietly, master)  # a test may close a master early
            port = serial.serial_for_url(os.ttyname(slave), baudrate=115200)
            stack.callback(port.close)
            out.append((Meter(master), port))
        yield out


def _close_quietly(fd: int) -> None:
    with suppress(OSError):
        os.close(fd)


@contextmanager
def pump_of(**kwargs: Any) -> Iterator[Pump]:
    pump = Pump(**kwargs)
    try:
        yield pump
    finally:
        pump.close()


def run_until(pump: Pump, done: Callable[[list], bool], meters: list[Meter]) -> list:
    """run_once in short real-time steps, the meters reading between, until ``done(events)``."""
    events: list = []
    give_up = time.monotonic() + PATIENCE_S
    while not done(events):
        assert time.monotonic() < give_up, f"gave up; events so far: {events}"
        events += pump.run_once(STEP_S)
        for m in meters:
            m.poll()
    return events


# ---------------------------------------------------------------- many links, one thread

def test_one_thread_serves_requests_replies_reports_and_timeouts_on_three_links():
    clock = FakeClock()
    with pty_links(3) as ptys, pump_of(clock=clock) as pump:
        (ma, pa), (mb, pb), (mc, pc) = ptys
        meters = [ma, mb, mc]
        sa, sb, sc = (pump.add_link(name, port) for name, port in (("a", pa), ("b", pb),
                                                                   ("c", pc)))
        assert pump.links == ("a", "b", "c")
        req_a, req_b = request_to(0xA1), request_to(0xB2)
        rid_a = sa.send_request(req_a, clock(), timeout_s=1.0, retries=0)
        rid_b = sb.send_request(req_b, clock(), timeout_s=1.0, retries=1)
        notice = reply_to(request_to(0xC3))  # an unsolicited frame we send: e.g. an acknowledgement
        sc.send(notice)
        run_until(pump, lambda _: ma.frames and mb.frames and mc.frames, meters)
        assert (ma.frames, mb.frames, mc.frames) == ([req_a], [req_b], [notice])

        ma.send(reply_to(req_a))
        mb.send(report_from(req_b))  # while b's request is pending: kept, not dropped
        got = run_until(pump, lambda ev: len(ev) >= 2, meters)
        assert sorted(got, key=lambda p: p[0]) == [
            ("a", Reply(rid_a, reply_to(req_a))), ("b", FrameReceived(report_from(req_b)))]

        clock.now = 1.0  # b's first attempt expires: resent, and the meter sees it again
        assert pump.run_once(0) == [("b", Resend(rid_b, 2))]
        run_until(pump, lambda _: len(mb.frames) == 2, meters)
        assert mb.frames == [req_b, req_b]
        clock.now = 2.0
        assert pump.run_once(0) == [("b", Timeout(rid_b, 2))]
        assert pump.next_deadline() is None

        a, b, c = sa.counters(), sb.counters(), sc.counters()
        assert (a.frames_tx, a.frames_rx, a.replies, a.timeouts, a.retries) == (1, 1, 1, 0, 0)
        assert (b.frames_tx, b.frames_rx, b.unmatched, b.retries, b.timeouts,
                b.requests_failed) == (2, 1, 1, 1, 2, 1)
        assert (c.frames_tx, c.bytes_tx, c.frames_rx) == (1, len(encode_frame(notice)), 0)
        assert b.bytes_tx == len(mb.bytes) == 2 * len(encode_frame(req_b))


def test_pump_sleeps_until_the_next_deadline_instead_of_spinning():
    class CountingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
        calls = 0

        def select(self, timeout: float | None = None) -> list:
            CountingSelector.calls += 1
            return super().select(timeout)

    with pty_links(1) as ((meter, port),), pump_of(selector=CountingSelector()) as pump:
        session = pump.add_link("a", port)
        start = time.monotonic()
        rid = session.send_request(request_to(1), start, timeout_s=0.05, retries=1)
        events: list = []
        while not any(isinstance(e, Timeout) for _, e in events):
            assert time.monotonic() - start < PATIENCE_S
            events += pump.run_once(None)  # no timeout of ours: only the session's deadlines
        meter.poll()
        assert time.monotonic() - start >= 0.1
        assert [e for _, e in events] == [Resend(rid, 2), Timeout(rid, 2)]
        assert len(meter.frames) == 2
        # Two sends (each waits once for writability) and two deadlines: a handful of
        # wake-ups, where a spinning loop would make thousands in 0.1 s.
        assert CountingSelector.calls <= 8


def test_paced_link_writes_no_faster_than_its_rate():
    clock = FakeClock()
    writes: list[tuple[float, int]] = []

    class Recording:
        """The pty port, noting when (by the fake clock) each write went out."""

        def __init__(self, port: Any):
            object.__setattr__(self, "_port", port)

        def write(self, data: bytes) -> int:
            n = self._port.write(data)
            writes.append((clock.now, n))
            return n

        def __getattr__(self, name: str) -> Any:
            return getattr(self._port, name)

        def __setattr__(self, name: str, value: Any) -> None:
            setattr(self._port, name, value)

    rate, burst = 1000, 16
    with pty_links(1) as ((meter, port),), pump_of(clock=clock) as pump:
        session = pump.add_link("a", Recording(port), pace_bytes_per_s=rate,
                                pace_burst_bytes=burst)
        frame = Frame(Control(FunctionCode.USER_DATA), ServerAddress(b"\x01" * 6), 0x10,
                      bytes(83))  # 100 bytes on the wire
        session.send(frame)
        give_up = time.monotonic() + PATIENCE_S
        while sum(n for _, n in writes) < 100:
            assert time.monotonic() < give_up
            pump.run_once(0)
            due = pump.next_deadline()
            clock.now = max(clock.now + 0.001, due or 0.0)
        run_until(pump, lambda _: meter.frames, [meter])
        assert meter.frames == [frame]
    sizes = [n for _, n in writes]
    times = [t for t, _ in writes]
    assert max(sizes) <= burst
    for i in range(len(times)):
        sent = 0
        for j in range(i, len(times)):
            sent += sizes[j]
            assert sent <= burst + rate * (times[j] - times[i]) + 1e-9
    assert times[-1] >= (100 - burst) / rate - 1e-9


# ---------------------------------------------------------------- ports and descriptors

def test_port_without_a_file_descriptor_is_polled():
    port = serial.serial_for_url("loop://", timeout=1.0, write_timeout=1.0)
    try:
        with pump_of() as pump:
            session = pump.add_link("loop", port)
            session.send(request_to(7))
            start = time.monotonic()
            events = pump.run_once(None)  # nothing to select on: returns after one poll interval
            while not events:
                assert time.monotonic() - start < PATIENCE_S
                events = pump.run_once(None)
            assert events == [("loop", FrameReceived(request_to(7)))]  # loop:// echoes
            start = time.monotonic()
            assert pump.run_once(None) == []
            assert time.monotonic() - start >= POLL_INTERVAL_S * 0.5
    finally:
        port.close()


def test_sockets_share_the_selector_through_callbacks():
    left, right = socket.socketpair()
    try:
        with pty_links(1) as ((meter, port),), pump_of() as pump:
            pump.add_link("a", port)
            got: list[tuple[int, bytes]] = []
            pump.add_fd(left, selectors.EVENT_READ, lambda mask: got.append((mask,
                                                                            left.recv(100))))
            right.sendall(b"console line\n")
            meter.send(report_from(request_to(3)))
            events = run_until(pump, lambda ev: got and ev, [meter])
            assert got == [(selectors.EVENT_READ, b"console line\n")]
            assert events == [("a", FrameReceived(report_from(request_to(3))))]
            later: list[bytes] = []
            pump.modify_fd(left, selectors.EVENT_READ, lambda mask: later.append(left.recv(100)))
            right.sendall(b"next line\n")
            run_until(pump, lambda _: later, [])
            assert later == [b"next line\n"] and len(got) == 1
            with pytest.raises(PumpError, match="remove_link"):
                pump.remove_fd(port.fileno())
            pump.remove_fd(left)
            with pytest.raises(PumpError, match="not watched"):
                pump.remove_fd(left)
    finally:
        left.close()
        right.close()


def test_port_that_fails_is_reported_once_and_its_request_runs_out_without_resends():
    clock = FakeClock()
    with pty_links(2) as ((meter, port), (other, other_port)), pump_of(clock=clock) as pump:
        session = pump.add_link("a", port)
        pump.add_link("b", other_port)
        rid = session.send_request(request_to(1), clock(), timeout_s=1.0, retries=2)
        run_until(pump, lambda _: meter.frames, [meter])
        os.close(meter.fd)  # the far end hangs up
        events = run_until(pump, lambda ev: ev, [])
        assert len(events) == 1 and events[0][0] == "a" and isinstance(events[0][1], LinkDown)
        with pytest.raises(RemoteProtocolError):
            session.send(request_to(1))
        assert pump.next_deadline() == 1.0  # the loop still wakes for it
        clock.now = 1.0
        assert pump.run_once(0) == [("a", Timeout(rid, 1))]
        assert session.counters().frames_tx == 1
        other.send(report_from(request_to(2)))  # the other link carries on
        assert run_until(pump, lambda ev: ev, [other]) == [
            ("b", FrameReceived(report_from(request_to(2))))]


def test_removed_link_leaves_its_port_open_and_its_session_usable():
    with pty_links(1) as ((meter, port),), pump_of() as pump:
        session = LinkSession(idle_gap_s=0.05)
        assert pump.add_link("a", port, session) is session
        assert pump.session("a") is session
        assert pump.remove_link("a") is session
        assert port.is_open and pump.links == ()
        session.send(request_to(4))  # the owner may drive it by hand now
        port.write(session.data_to_send())
        run_until(pump, lambda _: meter.frames, [meter])
        assert meter.frames == [request_to(4)]
        with pytest.raises(PumpError, match="no link"):
            pump.session("a")


def test_registration_mistakes_are_pump_errors():
    with pty_links(1) as ((_, port),), pump_of() as pump:
        with pytest.raises(PumpError, match="nothing registered"):
            pump.run_once(None)
        pump.add_link("a", port)
        with pytest.raises(PumpError, match="already registered"):
            pump.add_link("a", port)
        with pytest.raises(PumpError, match="already registered"):
            pump.add_link("b", port)  # the same fd twice
        with pytest.raises(PumpError, match="timeout"):
            pump.run_once(-1)
        assert isinstance(PumpError("x"), LocalProtocolError)
        pump.close()
        with pytest.raises(PumpError, match="closed"):
            pump.run_once(0)


def test_a_frame_finished_while_the_caller_worked_is_not_cut_off_by_its_idle_gap():
    """Injected: the caller busy for longer than the idle gap while the rest of a frame
    arrives. Survives: the frame (the bytes go in before the timers run)."""
    clock = FakeClock()
    with pty_links(1) as [(meter, port)], pump_of(clock=clock) as pump:
        session = pump.add_link("hplc", port)
        data = encode_frame(report_from(request_to(1)))
        os.write(meter.fd, data[:10])
        events = run_until(pump, lambda ev: session.counters().bytes_rx >= 10, [meter])
        os.write(meter.fd, data[10:])  # the rest arrives ...
        time.sleep(0.05)
        clock.now += 1.0  # ... while the caller works far past the 0.1 s idle gap
        events += run_until(pump, lambda ev: any(isinstance(e, FrameReceived) for _, e in ev),
                            [meter])
        assert not [e for _, e in events if isinstance(e, Rejected)]
