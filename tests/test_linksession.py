"""LinkSession, the sans-I/O link state: times are plain numbers, no port, no waiting.

The last section runs the blocking hal.link.Link over loop:// to check what
it gained from the session: unsolicited frames kept, rejects visible.
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.routing.live import LinkSample
from hal.dlt698 import (
    AddressType,
    Control,
    Frame,
    FunctionCode,
    LocalFrameError,
    Reason,
    ServerAddress,
    encode_frame,
)
from hal.link import open_link
from hal.linksession import (
    DEFAULT_IDLE_GAP_S,
    MAX_OUTBOX_BYTES,
    MAX_RETRIES,
    READ_CHUNK,
    REASON_DETAIL,
    FrameReceived,
    LinkSession,
    LocalProtocolError,
    Rejected,
    RemoteProtocolError,
    Reply,
    RequestId,
    Resend,
    Timeout,
    default_max_events,
)

EMULATED = bool(os.environ.get("EDGEKEY_EMULATED"))
PATIENCE_S = 5.0 * (8 if EMULATED else 1)
# Fewer examples for the properties that run a whole session per example.
HEAVY = settings(max_examples=max(10, settings.default.max_examples // 4))

METER = ServerAddress(b"\x11\x22\x33\x44\x55\x66")
OTHER_METER = ServerAddress(b"\x99\x88\x77\x66\x55\x44")
REQUEST = Frame(Control(FunctionCode.USER_DATA), METER, 0x10, b"\x05\x01\x00\x40\x01\x02\x00\x00")


def reply_to(request: Frame, apdu: bytes = b"") -> Frame:
    """What a meter sends back: DIR set, PRM clear, same addresses."""
    return Frame(Control(FunctionCode.USER_DATA, from_server=True, initiator=False),
                 request.server, request.client, apdu or b"\x85" + request.apdu[1:])


def report(server: ServerAddress = METER, apdu: bytes = b"\x88\x01\x02") -> Frame:
    """A frame a meter sends on its own (DIR and PRM set): it answers no request."""
    return Frame(Control(FunctionCode.USER_DATA, from_server=True, initiator=True), server,
                 0x10, apdu)


def request_to(server: ServerAddress, client: int = 0x10) -> Frame:
    return Frame(REQUEST.control, server, client, REQUEST.apdu)


def corrupted(frame: Frame, at: int, flip: int = 0x20) -> bytes:
    data = bytearray(encode_frame(frame))
    data[at] ^= flip
    return bytes(data)


def frames_of(events: list) -> list[Frame]:
    return [e.frame for e in events if isinstance(e, FrameReceived | Reply)]


# ---------------------------------------------------------------- requests and replies

def test_reply_is_matched_to_its_request_and_ends_it():
    s = LinkSession()
    rid = s.send_request(REQUEST, 0.0, timeout_s=1.0, retries=2)
    assert s.data_to_send() == encode_frame(REQUEST)
    assert s.pending == (rid,) and s.next_deadline() == 1.0
    answer = reply_to(REQUEST)
    s.receive_data(encode_frame(answer), 0.4)
    assert list(s.events()) == [Reply(rid, answer)]
    assert s.pending == () and s.next_deadline() is None
    s.tick(10.0)
    assert s.next_event() is None and s.data_to_send() == b""
    c = s.counters()
    assert (c.frames_tx, c.frames_rx, c.replies, c.timeouts, c.retries, c.unmatched) == \
           (1, 1, 1, 0, 0, 0)
    assert (c.bytes_tx, c.bytes_rx) == (len(encode_frame(REQUEST)), len(encode_frame(answer)))


def test_unanswered_request_is_resent_then_times_out_with_exact_counts():
    s = LinkSession()
    sent = encode_frame(REQUEST)
    rid = s.send_request(REQUEST, 0.0, timeout_s=1.0, retries=2)
    assert s.data_to_send() == sent
    s.tick(0.999)
    assert s.next_event() is None and s.data_to_send() == b""
    s.tick(1.0)
    assert list(s.events()) == [Resend(rid, 2)]
    assert s.data_to_send() == sent and s.next_deadline() == 2.0
    s.tick(2.5)  # a late tick: the next attempt waits its full timeout from the resend
    assert list(s.events()) == [Resend(rid, 3)]
    assert s.data_to_send() == sent and s.next_deadline() == 3.5
    s.tick(3.4)
    assert s.next_event() is None
    s.tick(3.5)
    assert list(s.events()) == [Timeout(rid, 3)]
    assert s.pending == () and s.data_to_send() == b"" and s.next_deadline() is None
    c = s.counters()
    assert (c.frames_tx, c.retries, c.timeouts, c.requests_failed, c.replies) == (3, 2, 3, 1, 0)
    assert c.bytes_tx == 3 * len(sent)
    sample = LinkSample.from_counters(c, 3.5)  # the router's live statistics read the same fields
    assert (sample.frames_tx, sample.retries, sample.timeouts) == (3, 2, 3)


def test_request_without_retries_times_out_after_one_attempt():
    s = LinkSession()
    rid = s.send_request(REQUEST, 5.0, timeout_s=0.5, retries=0)
    s.tick(5.5)
    assert list(s.events()) == [Timeout(rid, 1)]
    assert s.counters().retries == 0


def test_unsolicited_frame_while_a_request_is_pending_is_delivered_and_not_lost():
    s = LinkSession()
    rid = s.send_request(REQUEST, 0.0)
    news, answer = report(), reply_to(REQUEST)
    s.receive_data(encode_frame(news) + encode_frame(answer) + encode_frame(news), 0.1)
    assert list(s.events()) == [FrameReceived(news), Reply(rid, answer), FrameReceived(news)]
    c = s.counters()
    assert (c.frames_rx, c.replies, c.unmatched) == (3, 1, 1)  # the last came with none pending


def test_frames_with_no_request_pending_are_received_not_unmatched():
    s = LinkSession()
    s.receive_data(encode_frame(REQUEST), 0.0)  # e.g. a master station's command to us
    assert list(s.events()) == [FrameReceived(REQUEST)]
    assert s.counters().unmatched == 0


def test_reply_after_its_request_timed_out_is_a_frame_received():
    s = LinkSession()
    rid = s.send_request(REQUEST, 0.0, timeout_s=1.0, retries=0)
    s.tick(1.0)
    answer = reply_to(REQUEST)
    s.receive_data(encode_frame(answer), 1.2)
    assert list(s.events()) == [Timeout(rid, 1), FrameReceived(answer)]


def test_reply_received_before_a_later_tick_still_counts():
    s = LinkSession()
    rid = s.send_request(REQUEST, 0.0, timeout_s=1.0, retries=0)
    s.receive_data(encode_frame(reply_to(REQUEST)), 0.9)
    s.tick(5.0)  # the caller was slow; the reply had arrived in time
    assert list(s.events()) == [Reply(rid, reply_to(REQUEST))]


def test_a_reply_that_fits_two_pending_requests_goes_to_the_oldest():
    s = LinkSession()
    first = s.send_request(REQUEST, 0.0)
    other = s.send_request(request_to(OTHER_METER), 0.0)
    second = s.send_request(REQUEST, 0.0)
    s.receive_data(encode_frame(reply_to(REQUEST, b"\x85\x01")), 0.1)
    s.receive_data(encode_frame(reply_to(request_to(OTHER_METER))), 0.2)
    s.receive_data(encode_frame(reply_to(REQUEST, b"\x85\x02")), 0.3)
    assert [(e.request_id, e.frame.apdu) for e in s.events()] == [
        (first, b"\x85\x01"), (other, reply_to(REQUEST).apdu), (second, b"\x85\x02")]


def test_wildcard_request_is_answered_by_a_meter_naming_its_own_address():
    s = LinkSession()
    wildcard = request_to(ServerAddress(b"\xaa" * 6, AddressType.WILDCARD))
    rid = s.send_request(wildcard, 0.0)
    answer = reply_to(request_to(METER))
    s.receive_data(encode_frame(answer), 0.1)
    assert list(s.events()) == [Reply(rid, answer)]


def test_a_request_may_bring_its_own_match():
    s = LinkSession()
    rid = s.send_request(REQUEST, 0.0, match=lambda req, f: f.apdu[:1] == b"\x88")
    s.receive_data(encode_frame(reply_to(REQUEST)) + encode_frame(report()), 0.1)
    assert list(s.events()) == [FrameReceived(reply_to(REQUEST)), Reply(rid, report())]


def test_cancelled_request_gets_no_resend_and_its_late_reply_is_received():
    s = LinkSession()
    rid = s.send_request(REQUEST, 0.0, timeout_s=1.0)
    s.data_to_send()
    s.cancel(rid)
    s.tick(10.0)
    assert s.next_event() is None and s.data_to_send() == b""
    s.receive_data(encode_frame(reply_to(REQUEST)), 10.0)
    assert list(s.events()) == [FrameReceived(reply_to(REQUEST))]


def test_unsolicited_outgoing_frame_is_queued_as_bytes():
    s = LinkSession()
    answer = reply_to(REQUEST)
    assert s.send(answer) == len(encode_frame(answer))
    assert s.outbox_bytes == len(encode_frame(answer))
    assert s.data_to_send(limit=5) + s.data_to_send() == encode_frame(answer)
    assert s.counters().frames_tx == 1 and s.pending == ()


# ---------------------------------------------------------------- bad frames

# For each: bytes the decoder rejects first for that reason.
BAD = {
    Reason.BAD_HCS: corrupted(report(), 12, 0x01),  # HCS low byte (six-byte SA)
    Reason.BAD_FCS: corrupted(report(), 15),  # an APDU byte
    Reason.BAD_END: encode_frame(report())[:-1] + b"\x17",
    Reason.OVERSIZE: b"\x68" + (4000).to_bytes(2, "little"),
    Reason.BAD_LENGTH: b"\x68\x00\x00",
}


@pytest.mark.parametrize("reason", list(BAD), ids=lambda r: r.name)
def test_corrupted_frame_yields_rejected_with_its_reason_and_the_next_frame_arrives(reason):
    s = LinkSession()
    after = report(apdu=b"\x88\x09")
    s.receive_data(BAD[reason] + encode_frame(after), 0.0)
    events = list(s.events())
    assert events[0] == Rejected(reason, REASON_DETAIL[reason], 1)
    assert frames_of(events) == [after]
    assert all(isinstance(e, Rejected) for e in events[:-1])
    assert s.counters().rejects[reason] == 1


def test_every_reason_has_words_for_its_rejection():
    assert set(REASON_DETAIL) == set(Reason) and all(REASON_DETAIL.values())


def test_garbage_before_a_frame_is_one_rejected_run_with_its_length():
    s = LinkSession()
    s.receive_data(b"\x00\x01\x02\x03" + b"\xfe\xfe" + encode_frame(report()), 0.0)
    assert list(s.events()) == [Rejected(Reason.GARBAGE, REASON_DETAIL[Reason.GARBAGE], 4),
                                FrameReceived(report())]
    assert s.counters().garbage_bytes == 4  # the wake-up bytes are not garbage


def test_frame_cut_off_mid_way_is_released_by_the_idle_gap():
    s = LinkSession()
    cut = encode_frame(report(apdu=bytes(600)))[:40]  # its L promises 600 more bytes
    after = report(apdu=b"\x88\x07")
    s.receive_data(cut + encode_frame(after), 2.0)
    assert s.next_event() is None  # held back behind the cut frame
    assert s.next_deadline() == 2.0 + DEFAULT_IDLE_GAP_S
    s.tick(2.0 + DEFAULT_IDLE_GAP_S * 0.99)
    assert s.next_event() is None
    s.tick(2.0 + DEFAULT_IDLE_GAP_S)
    events = list(s.events())
    assert events[0] == Rejected(Reason.TRUNCATED, REASON_DETAIL[Reason.TRUNCATED], 1)
    assert frames_of(events) == [after]
    assert s.next_deadline() is None


def test_bytes_trickling_in_within_the_gap_keep_their_frame():
    s = LinkSession(idle_gap_s=0.1)
    data = encode_frame(report())
    for i, t in enumerate((0.0, 0.08, 0.16, 0.24)):
        s.tick(t)
        s.receive_data(data[i * 6:(i + 1) * 6] if i < 3 else data[18:], t)
    assert list(s.events()) == [FrameReceived(report())]


def test_peer_closing_the_link_releases_the_partial_frame_and_ends_its_requests():
    s = LinkSession()
    rid = s.send_request(REQUEST, 0.0, timeout_s=1.0, retries=3)
    s.receive_data(encode_frame(reply_to(REQUEST))[:20], 0.1)
    s.receive_data(b"", 0.2)
    assert s.peer_closed
    assert next(s.events()).reason is Reason.TRUNCATED
    with pytest.raises(RemoteProtocolError):
        s.send(REQUEST)
    with pytest.raises(RemoteProtocolError):
        s.send_request(REQUEST, 0.3)
    with pytest.raises(LocalProtocolError, match="end of stream"):
        s.receive_data(b"\x68", 0.3)
    s.data_to_send()
    s.tick(1.0)  # no resend into a closed link: the request simply runs out
    assert list(s.events()) == [Timeout(rid, 1)]
    assert s.data_to_send() == b""


# ---------------------------------------------------------------- limits

def test_too_many_pending_requests_is_a_local_error_until_one_ends():
    s = LinkSession(max_pending=2)
    first = s.send_request(REQUEST, 0.0)
    s.send_request(request_to(OTHER_METER), 0.0)
    with pytest.raises(LocalProtocolError, match="already pending"):
        s.send_request(REQUEST, 0.0)
    s.receive_data(encode_frame(reply_to(REQUEST)), 0.1)
    assert list(s.events()) == [Reply(first, reply_to(REQUEST))]
    s.send_request(REQUEST, 0.1)
    assert len(s.pending) == 2


def test_received_events_past_the_cap_are_dropped_and_counted_but_replies_are_kept():
    s = LinkSession(max_events=3)
    rid = s.send_request(REQUEST, 0.0)
    flood = b"".join(encode_frame(report(apdu=bytes([0x88, i]))) for i in range(5))
    s.receive_data(flood + encode_frame(reply_to(REQUEST)), 0.1)
    assert s.queued_events == 4
    with pytest.raises(LocalProtocolError, match="events not taken"):
        s.send_request(REQUEST, 0.1)  # the caller must drain before starting more work
    events = list(s.events())
    assert [e.frame.apdu for e in events[:3]] == [b"\x88\x00", b"\x88\x01", b"\x88\x02"]
    assert events[3] == Reply(rid, reply_to(REQUEST))
    c = s.counters()
    assert (c.frames_rx, c.events_dropped, c.replies) == (6, 2, 1)
    s.send_request(REQUEST, 0.2)


def test_a_caller_that_drains_after_every_read_never_loses_an_event():
    # The worst input: a bad candidate every three bytes, one event each.
    s = LinkSession()
    worst = (b"\x68\x00\x00" * READ_CHUNK)[:READ_CHUNK + 1]
    total = 0
    for i in range(8):
        s.receive_data(worst, float(i))
        total += len(list(s.events()))
    c = s.counters()
    assert c.events_dropped == 0 and total == sum(c.rejects.values())
    assert default_max_events(2048) == READ_CHUNK + 1 + 2048 == s.max_events


def test_outbox_past_its_cap_is_a_local_error_until_written():
    s = LinkSession(max_frame_bytes=16385)
    big = Frame(REQUEST.control, METER, 0x10, bytes(16385 - 17))
    for _ in range(MAX_OUTBOX_BYTES // 16385):
        s.send(big)
    with pytest.raises(LocalProtocolError, match="outbox"):
        s.send(big)
    assert len(s.data_to_send()) == MAX_OUTBOX_BYTES // 16385 * 16385
    s.send(big)


# ---------------------------------------------------------------- caller errors

def test_unknown_request_id_is_a_local_error():
    s = LinkSession()
    rid = s.send_request(REQUEST, 0.0)
    s.cancel(rid)
    for bad in (rid, RequestId(99)):
        with pytest.raises(LocalProtocolError, match="no pending request"):
            s.cancel(bad)


def test_calls_after_close_are_local_errors_but_queued_events_can_be_taken():
    s = LinkSession()
    s.send_request(REQUEST, 0.0)
    s.receive_data(encode_frame(report()), 0.1)
    s.close()
    s.close()
    assert s.closed and s.pending == ()
    for call in (lambda: s.send(REQUEST), lambda: s.send_request(REQUEST, 1.0),
                 lambda: s.receive_data(b"\x00", 1.0), lambda: s.tick(1.0),
                 lambda: s.data_to_send(), lambda: s.cancel(RequestId(1))):
        with pytest.raises(LocalProtocolError, match="closed"):
            call()
    assert list(s.events()) == [FrameReceived(report())]


def test_time_going_backwards_or_not_a_number_is_a_local_error():
    s = LinkSession()
    s.tick(5.0)
    with pytest.raises(LocalProtocolError, match="backwards"):
        s.receive_data(b"\x00", 4.0)
    for bad in (math.nan, math.inf, "5", True):
        with pytest.raises(LocalProtocolError, match="now must be"):
            s.tick(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs, match", [
    ({"timeout_s": 0}, "timeout_s"), ({"timeout_s": math.inf}, "timeout_s"),
    ({"retries": -1}, "retries"), ({"retries": MAX_RETRIES + 1}, "retries"),
    ({"retries": 1.0}, "retries"),
])
def test_request_parameters_out_of_range_are_local_errors(kwargs, match):
    s = LinkSession()
    with pytest.raises(LocalProtocolError, match=match):
        s.send_request(REQUEST, 0.0, **kwargs)
    assert s.pending == () and s.outbox_bytes == 0


def test_frame_that_cannot_be_encoded_is_refused_before_anything_is_queued():
    s = LinkSession(max_frame_bytes=64)
    too_big = Frame(REQUEST.control, METER, 0x10, bytes(100))
    with pytest.raises(LocalFrameError, match="exceeds max_frame_bytes 64"):
        s.send_request(too_big, 0.0)
    with pytest.raises(LocalFrameError):
        s.send(too_big)
    assert s.pending == () and s.outbox_bytes == 0 and s.counters().frames_tx == 0


@pytest.mark.parametrize("kwargs", [
    {"max_frame_bytes": 11}, {"idle_gap_s": 0}, {"max_pending": 0}, {"max_pending": 33},
    {"max_events": 0},
])
def test_session_parameters_out_of_range_are_local_errors(kwargs):
    with pytest.raises(LocalProtocolError):
        LinkSession(**kwargs)


# ---------------------------------------------------------------- properties

frames = st.builds(
    Frame,
    control=st.builds(Control, function=st.sampled_from(FunctionCode),
                      from_server=st.booleans(), initiator=st.booleans()),
    server=st.builds(ServerAddress, address=st.binary(min_size=1, max_size=8),
                     type=st.sampled_from(AddressType), logical=st.integers(0, 3)),
    client=st.integers(0, 255), apdu=st.binary(max_size=24))


def _damaged(args: tuple[Frame, int, int, int]) -> bytes:
    frame, where, value, cut = args
    data = bytearray(encode_frame(frame))
    data[where % len(data)] = value
    return bytes(data[:max(1, cut % (len(data) + 1))])


noise = st.lists(st.one_of(
    st.binary(max_size=16),
    st.tuples(frames, st.integers(0, 100), st.integers(0, 255), st.integers(0, 100))
    .map(_damaged),
    st.sampled_from([b"\x68", b"\xfe\xfe", b"\x16", b"\x68\x0a\x00"]),
), max_size=3).map(b"".join)

# One step of a session's life, after a time step: bytes, a tick, a request,
# or the peer closing the link.
steps = st.lists(st.one_of(
    st.tuples(st.just("data"), st.one_of(noise, frames.map(encode_frame)).filter(bool),
              st.floats(0, 0.3)),
    st.tuples(st.just("tick"), st.just(b""), st.floats(0, 0.3)),
    st.tuples(st.just("request"), st.just(b""), st.floats(0, 0.3)),
    st.tuples(st.just("eof"), st.just(b""), st.floats(0, 0.3)),
), max_size=12)


def run_steps(script: list[tuple[str, bytes, float]]) -> tuple[list, LinkSession]:
    s = LinkSession(max_frame_bytes=256)
    events: list = []
    now = 0.0
    for kind, data, dt in script:
        now += dt
        if kind == "tick":
            s.tick(now)
        elif kind == "eof":
            s.receive_data(b"", now)
        elif s.peer_closed:  # nothing more comes in, nothing more goes out
            with pytest.raises(LocalProtocolError if kind == "data" else RemoteProtocolError):
                (s.receive_data(data, now) if kind == "data" else s.send_request(REQUEST, now))
        elif kind == "data":
            s.receive_data(data, now)
        else:
            s.send_request(REQUEST, now, timeout_s=0.2, retries=1)
        events += s.events()
        assert s.queued_events == 0
    for _ in range(100):  # run the timers out: every tick ends or resends something
        due = s.next_deadline()
        if due is None:
            break
        now = max(now, due)
        s.tick(now)
    events += s.events()
    return events, s


@HEAVY
@given(steps)
def test_any_bytes_in_any_chunking_and_timing_never_raise_and_end_every_request(script):
    events, s = run_steps(script)
    assert s.pending == () and s.next_deadline() is None
    requests = s.counters().frames_tx - s.counters().retries
    ended = [e for e in events if isinstance(e, Reply | Timeout)]
    assert len(ended) == len({e.request_id for e in ended}) == requests
    assert all(e.length >= 1 for e in events if isinstance(e, Rejected))


@HEAVY
@given(st.lists(st.tuples(noise, frames), max_size=4), noise,
       st.lists(st.integers(1, 30), min_size=1, max_size=6))
def test_every_valid_frame_embedded_in_noise_comes_out_in_order(pieces, tail, chunks):
    data = b"".join(n + encode_frame(f) for n, f in pieces) + tail
    s = LinkSession()
    pos = i = 0
    out: list = []
    while pos < len(data):  # all within one idle gap: chunking alone
        size = chunks[i % len(chunks)]
        s.receive_data(data[pos:pos + size], i * 0.001)
        pos, i = pos + size, i + 1
        out += s.events()
    s.tick(10.0)
    out += s.events()
    got = iter(frames_of(out))
    assert all(any(f == g for g in got) for _, f in pieces)  # a subsequence, in order


@HEAVY
@given(steps)
def test_the_same_input_gives_the_same_events_and_counters(script):
    first, s1 = run_steps(script)
    second, s2 = run_steps(script)
    assert first == second and s1.counters() == s2.counters()


@HEAVY
@given(st.lists(st.one_of(noise, frames.map(encode_frame)), max_size=5).map(b"".join),
       st.integers(1, 64))
def test_how_the_bytes_are_split_does_not_change_the_events(data, cut):
    whole = LinkSession()
    whole.receive_data(data, 0.0)
    split = LinkSession()
    for pos in range(0, len(data), cut):
        split.receive_data(data[pos:pos + cut], 0.0)
    assert list(whole.events()) == list(split.events())
    assert whole.counters() == split.counters()


# ---------------------------------------------------------------- the blocking Link over it

def test_link_request_keeps_frames_that_are_not_its_reply_for_recv_frame():
    with open_link("loop://", timeout_s=PATIENCE_S) as link:
        news = report()
        link.port.write(encode_frame(news) + encode_frame(reply_to(REQUEST)))  # already waiting
        assert link.request(REQUEST) == reply_to(REQUEST)
        assert link.recv_frame() == news
        assert link.recv_frame() == REQUEST  # loop:// echoes what we sent
        c = link.counters()
        # the report came while the request was pending; the echo after its reply
        assert (c.frames_rx, c.replies, c.unmatched) == (3, 1, 1)


def test_link_recv_frame_keeps_the_rejects_it_skipped_for_rejected():
    with open_link("loop://", timeout_s=PATIENCE_S) as link:
        link.port.write(b"\x00\x01" + corrupted(report(), 15))
        link.send_frame(REQUEST)
        assert link.recv_frame() == REQUEST
        rest = len(encode_frame(report())) - 1
        assert [(r.reason, r.length) for r in link.rejected()] == [
            (Reason.GARBAGE, 2), (Reason.BAD_FCS, 1), (Reason.GARBAGE, rest)]
        assert link.rejected() == []


def test_link_recv_event_returns_rejects_as_they_come():
    with open_link("loop://", timeout_s=PATIENCE_S) as link:
        link.port.write(b"\x68\x00\x00")
        link.send_frame(REQUEST)
        assert link.recv_event() == Rejected(Reason.BAD_LENGTH,
                                             REASON_DETAIL[Reason.BAD_LENGTH], 1)
        assert link.recv_event() == Rejected(Reason.GARBAGE, REASON_DETAIL[Reason.GARBAGE], 2)
        assert link.recv_event() == FrameReceived(REQUEST)
        assert link.rejected() == []
