"""DL/T 698.45 frame codec and its CRC: known answers, every reject reason, properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hal.crc16 import CHECK, crc16_x25
from hal.dlt698 import (
    DEFAULT_MAX_FRAME_BYTES,
    L_OVERHEAD,
    MAX_FRAME_BYTES,
    MIN_FRAME_BYTES,
    NEED_DATA,
    AddressType,
    Control,
    Frame,
    FrameDecoder,
    FunctionCode,
    LocalFrameError,
    Reason,
    Rejected,
    ServerAddress,
    encode_frame,
    is_response_to,
)
from hal.errors import LocalProtocolError
from hal.ids import MeterId

# Fewer examples for the properties that decode a stream many times over.
HEAVY = settings(max_examples=max(10, settings.default.max_examples // 4))


def crc16_x25_bitwise(data: bytes) -> int:
    """The textbook reflected CRC-16/X.25, one bit at a time (poly 0x1021 reversed = 0x8408)."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc ^ 0xFFFF


def raw_frame(*, l_field: int | None = None, c: int = 0x43, af: int = 0x05,
              sa: bytes = b"\x11\x22\x33\x44\x55\x66", ca: int = 0x10, apdu: bytes = b"\x05\x01",
              hcs: int | None = None, fcs: int | None = None, end: int = 0x16) -> bytes:
    """Frame bytes built field by field, checksums computed unless given: for crafting rejects."""
    if l_field is None:
        l_field = L_OVERHEAD + len(sa) + len(apdu)
    head = bytes([0x68]) + l_field.to_bytes(2, "little") + bytes([c, af]) + sa + bytes([ca])
    if hcs is None:
        hcs = crc16_x25(head[1:])
    body = head + hcs.to_bytes(2, "little") + apdu
    if fcs is None:
        fcs = crc16_x25(body[1:])
    return body + fcs.to_bytes(2, "little") + bytes([end])


def decode(data: bytes, chunks: list[int] | None = None,
           max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> tuple[list, FrameDecoder]:
    """Every event for ``data`` fed in chunks of the given sizes (cycled), drained after each."""
    dec = FrameDecoder(max_frame_bytes)
    events: list = []
    sizes = chunks or [len(data) or 1]
    pos = i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        dec.receive_data(data[pos:pos + size])
        pos += size
        i += 1
        events.extend(dec.events())
        assert dec.buffered < dec.max_frame_bytes
    return events, dec


def frames_of(events: list) -> list[Frame]:
    return [e for e in events if isinstance(e, Frame)]


METER = Frame(Control(FunctionCode.USER_DATA), ServerAddress(b"\x11\x22\x33\x44\x55\x66"), 0x10,
              b"\x05\x01\x00\x40\x01\x02\x00\x00")


# ---------------------------------------------------------------- strategies

controls = st.builds(Control, function=st.sampled_from(FunctionCode), from_server=st.booleans(),
                     initiator=st.booleans(), fragmented=st.booleans(), scrambled=st.booleans())
addresses = st.builds(ServerAddress, address=st.binary(min_size=1, max_size=16),
                      type=st.sampled_from(AddressType), logical=st.integers(0, 3))
frames = st.builds(Frame, control=controls, server=addresses, client=st.integers(0, 255),
                   apdu=st.binary(max_size=64))
small_frames = st.builds(Frame, control=controls, server=addresses, client=st.integers(0, 255),
                         apdu=st.binary(max_size=12))


def _damaged(args: tuple[Frame, int, int, int]) -> bytes:
    frame, where, value, cut = args
    data = bytearray(encode_frame(frame))
    data[where % len(data)] = value
    return bytes(data[:max(1, cut % (len(data) + 1))])


stream_pieces = st.one_of(
    st.binary(max_size=24),
    small_frames.map(encode_frame),
    st.tuples(small_frames, st.integers(0, 200), st.integers(0, 255),
              st.integers(0, 200)).map(_damaged),
    st.sampled_from([b"\x68", b"\xfe\xfe\xfe\xfe", b"\x16", b"\x68\x0a\x00"]),
)
streams = st.lists(stream_pieces, max_size=6).map(b"".join)


# ---------------------------------------------------------------- CRC-16/X.25

def test_crc16_x25_gives_the_catalogue_check_value():
    assert crc16_x25(b"123456789") == CHECK == 0x906E
    assert crc16_x25_bitwise(b"123456789") == 0x906E


@given(st.binary(max_size=300))
def test_crc16_x25_equals_the_bitwise_reference_on_any_bytes(data):
    assert crc16_x25(data) == crc16_x25_bitwise(data)


def test_crc16_x25_takes_bytearray_and_memoryview_alike():
    data = b"\x68\x17\x00\x43\x45"
    assert crc16_x25(bytearray(data)) == crc16_x25(memoryview(data)) == crc16_x25(data)


# ---------------------------------------------------------------- known answers

# A frame as terminals send it to learn a meter's address: a GET request for
# object 4001 (the communication address) to the wildcard address AAAAAAAAAAAA.
# Its HCS and FCS were computed by the sender, not by this codec.
WILDCARD_READ = bytes.fromhex("68 17 00 43 45 AA AA AA AA AA AA 00 5B 4F"
                              " 05 01 00 40 01 02 00 00 ED 03 16")


def test_wildcard_address_read_frame_decodes_to_its_fields():
    events, dec = decode(WILDCARD_READ)
    assert events == [Frame(Control(FunctionCode.USER_DATA, from_server=False, initiator=True),
                            ServerAddress(b"\xaa" * 6, AddressType.WILDCARD, 0), 0,
                            bytes.fromhex("05 01 00 40 01 02 00 00"))]
    assert dec.frames == 1


def test_a_decoded_server_address_is_the_meters_id():
    (frame,), _ = decode(encode_frame(METER))
    assert type(frame.server.address) is MeterId and frame.server.address == METER.server.address


def test_a_frame_our_caller_cannot_send_is_the_callers_fault():
    with pytest.raises(LocalFrameError) as err:
        encode_frame(Frame(Control(FunctionCode.USER_DATA), ServerAddress(b""), 1))
    assert isinstance(err.value, LocalProtocolError) and isinstance(err.value, ValueError)


def test_encoder_reproduces_the_wildcard_address_read_frame_byte_for_byte():
    (frame,), _ = decode(WILDCARD_READ)
    assert encode_frame(frame) == WILDCARD_READ


def test_control_and_address_flags_land_in_their_bits():
    frame = Frame(Control(FunctionCode.LINK_MANAGEMENT, from_server=True, initiator=False,
                          fragmented=True, scrambled=True),
                  ServerAddress(b"\x01\x02\x03", AddressType.GROUP, logical=2), 0xA0, b"")
    data = encode_frame(frame)
    assert data[3] == 0x80 | 0x20 | 0x08 | 0x01
    assert data[4] == (2 << 6) | (2 << 4) | (3 - 1)
    assert int.from_bytes(data[1:3], "little") == len(data) - 2
    assert data[8] == 0xA0 and data[-1] == 0x16


# ---------------------------------------------------------------- encoding errors

@pytest.mark.parametrize("size", [0, 17])
def test_encode_refuses_a_server_address_af_cannot_describe(size):
    frame = Frame(Control(FunctionCode.USER_DATA), ServerAddress(b"\x01" * size), 1)
    with pytest.raises(LocalFrameError, match="server address"):
        encode_frame(frame)


def test_encode_refuses_an_apdu_one_byte_over_max_frame_bytes():
    room = 256 - MIN_FRAME_BYTES - 5  # six-byte SA instead of one
    fits = Frame(Control(FunctionCode.USER_DATA), ServerAddress(b"\x01" * 6), 1, b"\x00" * room)
    assert len(encode_frame(fits, max_frame_bytes=256)) == 256
    over = Frame(fits.control, fits.server, 1, b"\x00" * (room + 1))
    with pytest.raises(LocalFrameError, match="exceeds max_frame_bytes 256"):
        encode_frame(over, max_frame_bytes=256)


@pytest.mark.parametrize("frame, message", [
    (Frame(Control(2), ServerAddress(b"\x01"), 1), "function code"),  # type: ignore[arg-type]
    (Frame(Control(FunctionCode.USER_DATA), ServerAddress(b"\x01", logical=4), 1), "logical"),
    (Frame(Control(FunctionCode.USER_DATA), ServerAddress(b"\x01"), 256), "client address"),
    (Frame(Control(FunctionCode.USER_DATA), ServerAddress(b"\x01", type=4), 1),  # type: ignore[arg-type]
     "address type"),
    (Frame(Control(FunctionCode.USER_DATA), ServerAddress("01"), 1), "must be bytes"),  # type: ignore[arg-type]
])
def test_encode_refuses_fields_outside_their_bit_ranges(frame, message):
    with pytest.raises(LocalFrameError, match=message):
        encode_frame(frame)


@pytest.mark.parametrize("limit", [MIN_FRAME_BYTES - 1, MAX_FRAME_BYTES + 1])
def test_max_frame_bytes_outside_what_the_14_bit_length_allows_is_refused(limit):
    with pytest.raises(LocalFrameError, match="max_frame_bytes"):
        FrameDecoder(limit)
    with pytest.raises(LocalFrameError, match="max_frame_bytes"):
        encode_frame(METER, max_frame_bytes=limit)


# ---------------------------------------------------------------- every reject reason

GOOD = encode_frame(METER)

# For each reason: bytes that must produce it, then a good frame that must still be found.
REASON_CASES: dict[Reason, bytes] = {
    Reason.GARBAGE: b"\x00\x01\x02",
    Reason.BAD_LENGTH: raw_frame(l_field=9, sa=b"\x01", apdu=b""),  # one short of the minimum
    Reason.OVERSIZE: raw_frame(l_field=DEFAULT_MAX_FRAME_BYTES - 1),  # total max + 1
    Reason.UNSUPPORTED_LENGTH_UNIT: raw_frame(l_field=0x4000 | 20),
    Reason.BAD_ADDRESS: raw_frame(l_field=L_OVERHEAD + 5, sa=b"\x01" * 6, apdu=b""),
    Reason.BAD_HCS: raw_frame(hcs=0x1234),
    Reason.BAD_CONTROL: raw_frame(c=0x42),  # function code 2 is reserved
    Reason.BAD_FCS: raw_frame(fcs=0x1234),
    Reason.BAD_END: raw_frame(end=0x17),
    Reason.TRUNCATED: GOOD[:10],  # needs line_idle, see below
}


def test_every_reason_has_a_case():
    assert set(REASON_CASES) == set(Reason)


@pytest.mark.parametrize("reason", list(Reason), ids=lambda r: r.name)
def test_each_reason_is_reported_and_the_next_frame_is_still_found(reason):
    dec = FrameDecoder()
    dec.receive_data(REASON_CASES[reason])
    if reason is Reason.TRUNCATED:
        assert list(dec.events()) == []  # waiting for the rest
        dec.line_idle()
    events = list(dec.events())
    dec.receive_data(GOOD)
    events += list(dec.events())
    discarded = len(REASON_CASES[reason]) if reason is Reason.GARBAGE else 1
    assert (events[0].reason, events[0].discarded) == (reason, discarded)
    assert dec.rejects[reason] == 1
    assert frames_of(events) == [METER]
    if reason in (Reason.BAD_FCS, Reason.BAD_END):  # the header checked: the sender is known
        assert events[0].source is not None
    elif reason is not Reason.TRUNCATED:
        assert events[0].source is None


def test_length_with_reserved_bit_15_set_is_a_bad_length():
    events, _ = decode(raw_frame(l_field=0x8000 | 20) + GOOD)
    assert events[0] == Rejected(Reason.BAD_LENGTH, 1)
    assert frames_of(events) == [METER]


def test_reserved_control_bit_4_is_a_bad_control():
    events, _ = decode(raw_frame(c=0x43 | 0x10) + GOOD)
    assert events[0] == Rejected(Reason.BAD_CONTROL, 1)
    assert frames_of(events) == [METER]


def test_oversize_is_rejected_from_the_length_alone_without_waiting_for_the_body():
    dec = FrameDecoder(256)
    dec.receive_data(b"\x68" + (300).to_bytes(2, "little"))
    assert dec.next_event() == Rejected(Reason.OVERSIZE, 1)


def test_frame_with_bad_hcs_is_rejected_and_next_frame_is_found():
    bad = bytearray(GOOD)
    bad[12] ^= 0x01  # HCS low byte
    events, dec = decode(bytes(bad) + GOOD)
    assert events[0] == Rejected(Reason.BAD_HCS, 1)
    assert frames_of(events) == [METER]
    assert dec.rejects[Reason.BAD_HCS] == 1


def test_corrupted_length_is_caught_by_hcs_before_the_body_is_awaited():
    bad = bytearray(GOOD)
    bad[1] = 0xF0  # L now claims 240 bytes; nothing more will come after the next frame
    events, _ = decode(bytes(bad) + GOOD)
    assert events[0] == Rejected(Reason.BAD_HCS, 1)
    assert frames_of(events) == [METER]


def test_header_is_judged_as_soon_as_its_bytes_are_present():
    dec = FrameDecoder()
    dec.receive_data(raw_frame(hcs=0xBEEF)[:14])  # header of a six-byte SA frame: 14 bytes
    assert dec.next_event() == Rejected(Reason.BAD_HCS, 1)


def test_frame_with_bad_fcs_is_rejected_and_the_frame_inside_its_apdu_is_found():
    inner = encode_frame(Frame(Control(FunctionCode.LINK_MANAGEMENT), ServerAddress(b"\x09"), 7))
    outer = raw_frame(apdu=b"\x00" + inner + b"\x00", fcs=0)
    events, dec = decode(outer)
    assert events[0] == Rejected(Reason.BAD_FCS, 1)
    assert [f.client for f in frames_of(events)] == [7]
    assert dec.garbage_bytes == (len(outer) - 1) - len(inner)


def test_wake_up_bytes_before_a_frame_are_skipped_silently():
    events, dec = decode(b"\xfe" * 4 + GOOD + b"\xfe\xfe" + GOOD)
    assert events == [METER, METER]
    assert dec.garbage_bytes == 0 and dec.wake_up_bytes == 6


def test_fe_bytes_not_directly_before_a_start_byte_are_garbage():
    events, dec = decode(b"\xfe\xfe\x00\xfe" + GOOD)
    assert events == [Rejected(Reason.GARBAGE, 3), METER]
    assert dec.garbage_bytes == 3 and dec.wake_up_bytes == 1


def test_garbage_run_is_reported_once_when_the_next_start_byte_arrives():
    dec = FrameDecoder()
    for chunk in (b"\x01\x02", b"\x03", b"\x04\x05"):
        dec.receive_data(chunk)
        assert dec.next_event() is NEED_DATA
    assert dec.garbage_bytes == 5 and dec.buffered == 0
    dec.receive_data(GOOD)
    assert list(dec.events()) == [Rejected(Reason.GARBAGE, 5), METER]


def test_line_idle_leaves_complete_frames_and_bytes_after_it_alone():
    dec = FrameDecoder()
    dec.receive_data(GOOD)
    dec.line_idle()
    dec.receive_data(GOOD[:5])
    assert list(dec.events()) == [METER]
    dec.receive_data(GOOD[5:])
    assert list(dec.events()) == [METER]
    assert dec.rejects[Reason.TRUNCATED] == 0


def test_line_idle_frees_a_frame_stuck_behind_a_header_that_claims_more_bytes():
    # A good header whose frame was cut off: its L covers the next frame's bytes.
    cut = raw_frame(apdu=bytes(200))[:30]
    dec = FrameDecoder()
    dec.receive_data(cut + GOOD)
    assert frames_of(list(dec.events())) == []
    dec.line_idle()
    events = list(dec.events())
    assert events[0] == Rejected(Reason.TRUNCATED, 1)
    assert frames_of(events) == [METER]


def test_counters_count_frames_rejects_and_garbage_bytes():
    data = b"zz" + GOOD + REASON_CASES[Reason.BAD_END] + GOOD + b"\xfe\xfe" + GOOD
    _, dec = decode(data, chunks=[7])
    assert dec.frames == 3
    assert dec.rejects[Reason.BAD_END] == 1
    assert dec.rejects[Reason.GARBAGE] == 2  # "zz" and the rest of the bad-end frame
    assert dec.garbage_bytes == 2 + len(REASON_CASES[Reason.BAD_END]) - 1
    assert dec.wake_up_bytes == 2
    assert sum(dec.rejects.values()) == 3


def test_decoder_holds_less_than_max_frame_bytes_whatever_it_is_fed():
    dec = FrameDecoder(256)
    for chunk in (b"\x00" * 5000, b"\x68" * 3000, raw_frame(apdu=bytes(300))[:200] * 10):
        dec.receive_data(chunk)
        for _ in dec.events():
            pass
        assert dec.buffered < 256


# ---------------------------------------------------------------- properties

@given(frames)
def test_any_valid_frame_survives_an_encode_decode_round_trip(frame):
    events, dec = decode(encode_frame(frame))
    assert events == [frame]
    assert dec.buffered == 0


@HEAVY
@given(streams, st.lists(st.integers(1, 40), min_size=1, max_size=8))
def test_any_bytes_in_any_chunking_never_raise_and_yield_only_validly_encoded_frames(data, chunks):
    events, dec = decode(data, chunks)
    for event in events:
        if isinstance(event, Frame):
            assert encode_frame(event) in data
        else:
            assert isinstance(event, Rejected) and event.discarded >= 1
    assert dec.frames == len(frames_of(events))


@HEAVY
@given(st.binary(max_size=600), st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_random_bytes_never_raise(data, chunks):
    decode(data, chunks)


@HEAVY
@given(st.binary(max_size=40), st.integers(0, 6), frames, st.binary(max_size=40))
def test_valid_frame_between_arbitrary_garbage_is_found(before, wake_up, frame, after):
    events, _ = decode(before + b"\xfe" * wake_up + encode_frame(frame) + after + GOOD)
    assert frame in frames_of(events)


@HEAVY
@given(st.builds(Frame, control=controls, server=addresses, client=st.integers(0, 255),
                 apdu=st.binary(max_size=40)))
def test_single_byte_corruption_anywhere_is_never_accepted_as_the_original_frame(frame):
    good = encode_frame(frame)
    for where in range(len(good)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(good)
            bad[where] ^= flip
            events, _ = decode(bytes(bad) + GOOD)
            assert frame not in frames_of(events), (where, flip)
            assert frames_of(events)[-1] == METER


@HEAVY
@given(st.lists(st.one_of(small_frames.map(encode_frame), stream_pieces), max_size=4).map(b"".join))
def test_split_at_every_offset_gives_the_same_events_as_one_shot(data):
    whole, one = decode(data)
    for cut in range(1, len(data)):
        dec = FrameDecoder()
        dec.receive_data(data[:cut])
        events = list(dec.events())
        dec.receive_data(data[cut:])
        events += list(dec.events())
        assert events == whole
        assert (dec.frames, dec.rejects, dec.garbage_bytes) == \
               (one.frames, one.rejects, one.garbage_bytes)


# ---------------------------------------------------------------- replies

def test_a_server_reply_answers_its_request_and_nothing_else():
    request = METER
    reply = Frame(Control(FunctionCode.USER_DATA, from_server=True, initiator=False),
                  request.server, request.client, b"\x85\x01")
    assert is_response_to(request, reply)
    assert not is_response_to(request, request)  # our own echo
    other_meter = Frame(reply.control, ServerAddress(b"\x99" * 6), reply.client, reply.apdu)
    assert not is_response_to(request, other_meter)
    other_client = Frame(reply.control, reply.server, 0x11, reply.apdu)
    assert not is_response_to(request, other_client)
    to_wildcard = Frame(request.control, ServerAddress(b"\xaa" * 6, AddressType.WILDCARD),
                        request.client)
    assert is_response_to(to_wildcard, other_meter)


# ---------------------------------------------------------------- benchmark

def test_frame_codec_bench_reports_rates_for_the_frames_it_round_tripped():
    from tools.bench_frames import measure_frame_codec

    result = measure_frame_codec(frames=50, apdu_bytes=360)
    assert result["frames"] == 50 and result["apdu_bytes"] == 360
    assert result["frame_bytes"] == len(encode_frame(
        Frame(Control(FunctionCode.USER_DATA), ServerAddress(b"\x00" * 6), 0, bytes(360)),
        max_frame_bytes=MAX_FRAME_BYTES))
    for key in ("encode_frames_per_s", "decode_frames_per_s", "encode_mb_per_s", "decode_mb_per_s"):
        assert result[key] > 0
    with pytest.raises(ValueError, match="apdu_bytes"):
        measure_frame_codec(frames=1, apdu_bytes=MAX_FRAME_BYTES)
