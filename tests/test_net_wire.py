"""The inter-terminal codec: every message round trips, framing survives any split,
and bytes from a peer raise nothing but WireError (agent/net/wire.py)."""

from __future__ import annotations

import contextlib
import hashlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.ledger.block import MAX_TXS_PER_BLOCK, Block, Endorsement, build_block
from agent.ledger.identity import TerminalIdentity
from agent.ledger.rules import Reason
from agent.ledger.tx import Transaction, TxBuilder, rotation_proof_digest
from agent.net.wire import (
    HEADER_LEN,
    MAGIC,
    MAX_CHUNK_DATA,
    MAX_ENVELOPE,
    MAX_PATH_HOPS,
    MAX_PAYLOAD,
    MESSAGE_CLASSES,
    RELAYABLE,
    WIRE_VERSION,
    EndorsementMsg,
    EndorsementRefusedMsg,
    EndorseRequest,
    ForwardRefused,
    ForwardTxs,
    FrameDecoder,
    FrameEncoder,
    Hello,
    KeyAck,
    KeyHandover,
    Message,
    MsgType,
    Ping,
    PlacementAnswer,
    PlacementEvent,
    Pong,
    QueryAnswer,
    QueryForward,
    ReadingsAnswer,
    Relayed,
    SnapshotChunk,
    SnapshotRequest,
    StationAnswer,
    StationMigrate,
    StationPlacement,
    StationQuery,
    StationReadings,
    StationReply,
    StationRevoke,
    WireError,
    WireFault,
    WireValueError,
    decode_message,
    encode_message,
)
from hal.ids import TERMINAL_ID_MAX

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
HEADER = struct.Struct(">2sBBQI")


def ident(name: str) -> TerminalIdentity:
    return TerminalIdentity.from_seed(name, hashlib.sha256(b"test-key/" + name.encode()).digest())


def fp(n: int) -> bytes:
    return hashlib.sha256(b"edgekey/key-fingerprint/v1" + n.to_bytes(16, "big")).digest()


IDS = [ident(f"ecd-{i:02d}") for i in range(3)]
LONG = ident("L" * TERMINAL_ID_MAX)  # the largest encodings


def _tx_pool() -> list[Transaction]:
    b0, b1, bl = TxBuilder(IDS[0]), TxBuilder(IDS[1]), TxBuilder(LONG)
    meter, long_meter = b"\x01\x02\x03\x04\x05\x06", b"\xaa" * 16
    return [
        b0.register(meter, key_version=1, fingerprint=fp(1), counter=1),
        b0.rotate(meter, key_version=2, fingerprint=fp(2),
                  proof=rotation_proof_digest(b"wrapped"), counter=2),
        b0.revoke(meter, key_version=2, counter=3),
        b0.migrate(meter, new_home="ecd-01", key_version=2, fingerprint=fp(2), counter=4),
        b1.add_terminal("ecd-02", IDS[2].public_bytes()),
        b1.retire_terminal("ecd-02", IDS[2].public_bytes()),
        bl.migrate(long_meter, new_home=LONG.terminal_id, key_version=2**32 - 1,
                   fingerprint=fp(9), counter=2**64 - 1),
    ]


TXS = _tx_pool()

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
tids = st.text(alphabet=ALPHABET, min_size=1, max_size=TERMINAL_ID_MAX)
mids = st.binary(min_size=1, max_size=16)
hashes = st.binary(min_size=32, max_size=32)
key_versions = st.integers(1, 2**32 - 1)
signatures = st.binary(min_size=64, max_size=64)
endorsements = st.builds(Endorsement, terminal_id=tids, signature=signatures)


@st.composite
def blocks(draw: st.DrawFn) -> Block:
    txs = draw(st.lists(st.sampled_from(TXS), max_size=6))
    proposer = draw(st.sampled_from([*IDS, LONG]))
    block = build_block(proposer, height=draw(u64), prev_hash=draw(hashes),
                        timestamp_ms=draw(u64), txs=txs)
    return Block(block.header, block.txs, tuple(draw(st.lists(endorsements, max_size=4))))


@st.composite
def snapshot_chunks(draw: st.DrawFn) -> SnapshotChunk:
    count = draw(st.integers(1, 2**32 - 1))
    return SnapshotChunk(draw(u64), draw(st.integers(0, count - 1)), count,
                         draw(st.binary(max_size=64)))


STRATEGIES: dict[type, st.SearchStrategy[Message]] = {
    Hello: st.builds(Hello, tids, st.binary(min_size=8, max_size=8),
                     st.text(min_size=1, max_size=16)),
    EndorseRequest: st.builds(EndorseRequest, blocks()),
    EndorsementMsg: st.builds(EndorsementMsg, u64, hashes, endorsements),
    EndorsementRefusedMsg: st.builds(EndorsementRefusedMsg, u64, hashes,
                                     st.one_of(st.sampled_from(list(Reason)), u16)),
    ForwardTxs: st.builds(ForwardTxs, st.lists(st.sampled_from(TXS), min_size=1, max_size=8)
                          .map(tuple)),
    ForwardRefused: st.builds(ForwardRefused, hashes, u16, u64),
    KeyHandover: st.builds(KeyHandover, mids, key_versions,
                           st.binary(min_size=1, max_size=300)),
    KeyAck: st.builds(KeyAck, mids, key_versions),
    QueryForward: st.builds(QueryForward, u64, mids, tids, tids,
                            st.lists(tids, max_size=MAX_PATH_HOPS).map(tuple), u64),
    QueryAnswer: st.builds(QueryAnswer, u64, u8, u32, u64, st.binary(max_size=300),
                           st.text(max_size=50)),
    SnapshotRequest: st.builds(SnapshotRequest, u64),
    SnapshotChunk: snapshot_chunks(),
    Ping: st.builds(Ping, u64),
    Pong: st.builds(Pong, u64),
    StationQuery: st.builds(StationQuery, u64, mids),
    StationRevoke: st.builds(StationRevoke, u64, mids),
    StationReply: st.builds(StationReply, u64, st.booleans(), u8, u16, u64,
                            st.text(max_size=50)),
    StationAnswer: st.builds(StationAnswer, u64, u8, u32, u64, st.binary(max_size=300),
                             st.binary(max_size=600), st.text(max_size=50)),
    StationReadings: st.builds(StationReadings, u64, mids),
    ReadingsAnswer: st.builds(ReadingsAnswer, u64, st.lists(
        st.tuples(u32, u64, st.binary(min_size=1, max_size=80)), max_size=6).map(tuple)),
    Relayed: st.builds(Relayed, u64, st.lists(tids, min_size=2, max_size=MAX_PATH_HOPS,
                                              unique=True).map(tuple),
                       st.sampled_from(RELAYABLE).map(int), st.binary(max_size=300), signatures),
    StationMigrate: st.builds(StationMigrate, u64, mids, tids),
    StationPlacement: st.builds(StationPlacement, u64),
    PlacementAnswer: st.builds(PlacementAnswer, u64, st.integers(0, 10**9),
                               st.integers(0, 10**9), u16,
                               st.lists(mids, max_size=8).map(tuple),
                               st.lists(st.tuples(st.sampled_from(list(PlacementEvent)).map(int),
                                                  u64, mids, tids), max_size=5).map(tuple)),
}
messages = st.one_of(*STRATEGIES.values())


def samples() -> list[Message]:
    """One fixed message of every type, for the byte-by-byte tests."""
    block = build_block(IDS[0], height=5, prev_hash=b"\x11" * 32, timestamp_ms=1_700_000_000_000,
                        txs=TXS[:3])
    return [
        Hello("ecd-00", b"\x00\x01\x02\x03\x04\x05\x06\x07", "north"),
        EndorseRequest(Block(block.header, block.txs, (Endorsement("ecd-01", b"\x07" * 64),))),
        EndorsementMsg(5, b"\x22" * 32, Endorsement("ecd-02", b"\x09" * 64)),
        EndorsementRefusedMsg(5, b"\x22" * 32, Reason.WRONG_PREV_HASH),
        ForwardTxs(tuple(TXS)),
        ForwardRefused(b"\x33" * 32, Reason.REPLAYED_COUNTER, 9),
        KeyHandover(b"\x01\x02\x03", 4, b"envelope" * 10),
        KeyAck(b"\x01\x02\x03", 4),
        QueryForward(77, b"\x01\x02\x03", "ecd-02", "ecd-01", ("ecd-01", "ecd-00"), 123_456),
        QueryAnswer(77, 2, 4, 9, b"sealed", "found at ecd-00 \u2713"),
        SnapshotRequest(9),
        SnapshotChunk(9, 2, 3, b"chunk" * 20),
        Ping(2**64 - 1),
        Pong(0),
        StationQuery(5, b"\x01\x02\x03"),
        StationRevoke(2**64 - 1, b"\x04" * 16),
        StationReply(5, False, 11, int(Reason.RETIRED_PROPOSER), 0, "not the home"),
        StationAnswer(5, 0, 3, 12, b"sealed to the station", b"proof" * 30, ""),
        StationReadings(6, b"\x01\x02\x03"),
        ReadingsAnswer(6, ((3, 17, b"sealed" * 8), (3, 18, b"\x00" * 44))),
        Relayed(9, ("ecd-00", "ecd-03", "ecd-01"), MsgType.KEY_ACK, b"\x03\x01\x02\x03"
                b"\x00\x00\x00\x04", b"\x05" * 64),
        StationMigrate(7, b"\x01\x02\x03", "ecd-02"),
        StationPlacement(8),
        PlacementAnswer(8, 12_345, 67_890, 25, (b"\x01\x02\x03", b"\x04" * 6),
                        ((PlacementEvent.SITE_MOVED, 1_700_000_000_000, b"\x04" * 6, "ecd-00"),)),
    ]


def frame(msg_type: int, payload: bytes, seq: int = 1, *, magic: bytes = MAGIC,
          version: int = WIRE_VERSION, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return HEADER.pack(magic, version, msg_type, seq, n) + payload


def refused(data: bytes, decoder: FrameDecoder | None = None) -> WireError:
    with pytest.raises(WireError) as info:
        (decoder or FrameDecoder()).feed(data)
    return info.value


# ------------------------------------------------------------------ round trips


def test_every_message_type_is_covered_here() -> None:
    assert set(STRATEGIES) == set(MESSAGE_CLASSES.values())
    assert {type(m) for m in samples()} == set(MESSAGE_CLASSES.values())
    assert [int(t) for t in MsgType] == list(range(1, 25))  # stable codes, none reused


@given(messages)
def test_payload_round_trips(message: Message) -> None:
    payload = encode_message(message)
    assert len(payload) <= MAX_PAYLOAD
    assert decode_message(message.TYPE, payload) == message


@given(st.lists(messages, min_size=1, max_size=6), st.data())
def test_a_stream_round_trips_however_it_is_cut(batch: list[Message], data: st.DataObject) -> None:
    encoder = FrameEncoder()
    stream = b"".join(encoder.encode(m) for m in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder, out, start = FrameDecoder(), [], 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[start:cut])
        start = cut
    assert out == batch
    assert decoder.buffered == 0
    assert decoder.expected_seq == encoder.next_seq == len(batch) + 1


def test_one_byte_at_a_time_yields_each_message_at_its_last_byte() -> None:
    batch = samples()
    encoder = FrameEncoder()
    frames = [encoder.encode(m) for m in batch]
    decoder = FrameDecoder()
    for message, data in zip(batch, frames, strict=True):
        for i in range(len(data) - 1):
            assert decoder.feed(data[i:i + 1]) == []
        assert decoder.feed(data[-1:]) == [message]
        assert decoder.buffered == 0


def test_a_split_at_every_byte_boundary_gives_the_same_messages() -> None:
    batch = samples()[-6:] + samples()[:2]
    encoder = FrameEncoder()
    stream = b"".join(encoder.encode(m) for m in batch)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == batch


def test_decoded_ids_are_checked_values_equal_to_the_plain_ones() -> None:
    message = QueryForward(1, b"\x01", "ecd-02", "ecd-01", ("ecd-01",), 5)
    decoded = decode_message(MsgType.QUERY_FORWARD, encode_message(message))
    assert decoded == message
    assert type(decoded).__name__ == "QueryForward"


def test_reason_codes_travel_as_u16_and_map_back() -> None:
    m = EndorsementRefusedMsg(1, b"\x00" * 32, Reason.BAD_POW)
    decoded = decode_message(m.TYPE, encode_message(m))
    assert isinstance(decoded, EndorsementRefusedMsg)
    assert Reason(decoded.reason) is Reason.BAD_POW
    assert encode_message(m)[-2:] == int(Reason.BAD_POW).to_bytes(2, "big")


# --------------------------------------------------------------------- caps


def test_the_largest_block_and_forward_fit_one_frame() -> None:
    builder = TxBuilder(LONG)
    txs = [builder.migrate(i.to_bytes(16, "big"), new_home=LONG.terminal_id,
                           key_version=2**32 - 1, fingerprint=fp(i), counter=2**64 - 1)
           for i in range(1, MAX_TXS_PER_BLOCK + 1)]
    block = build_block(LONG, height=2**64 - 1, prev_hash=b"\xff" * 32,
                        timestamp_ms=2**64 - 1, txs=txs)
    block = Block(block.header, block.txs,
                  tuple(Endorsement(f"{'e' * 28}{i:04d}", b"\x01" * 64) for i in range(1024)))
    for message in (EndorseRequest(block), ForwardTxs(tuple(txs))):
        data = FrameEncoder().encode(message)
        assert len(data) <= HEADER_LEN + MAX_PAYLOAD
        assert FrameDecoder().feed(data) == [message]
    chunk = SnapshotChunk(1, 0, 1, b"\x5a" * MAX_CHUNK_DATA)
    assert FrameDecoder().feed(FrameEncoder().encode(chunk)) == [chunk]


def test_an_oversize_length_is_refused_from_the_header_alone() -> None:
    decoder = FrameDecoder()
    error = refused(frame(MsgType.SNAPSHOT_CHUNK, b"", length=MAX_PAYLOAD + 1), decoder)
    assert error.reason is WireFault.OVERSIZE
    assert decoder.buffered == 0
    with pytest.raises(WireError):  # and it stays refused
        decoder.feed(b"\x00" * 100)


def test_the_decoder_buffers_at_most_one_maximal_payload() -> None:
    decoder = FrameDecoder()
    header = frame(MsgType.SNAPSHOT_CHUNK, b"", length=MAX_PAYLOAD)
    assert decoder.feed(header + b"\x00" * (MAX_PAYLOAD - 1)) == []
    assert decoder.buffered == MAX_PAYLOAD - 1
    # the payload completes with the next byte and is judged before the rest is looked at
    with pytest.raises(WireError) as info:
        decoder.feed(b"\x00" + b"\x00" * (3 * MAX_PAYLOAD))
    assert info.value.reason is WireFault.BAD_FIELD  # count 0: no such chunk
    assert decoder.buffered == 0


def test_the_encoder_refuses_what_the_decoder_would() -> None:
    encoder = FrameEncoder()
    with pytest.raises(WireValueError):
        encoder.frame(MsgType.SNAPSHOT_CHUNK, b"\x00" * (MAX_PAYLOAD + 1))
    with pytest.raises(WireValueError):
        encoder.frame(99, b"")
    assert encoder.next_seq == 1  # a refused frame takes no number
    with pytest.raises(WireValueError):
        encode_message("not a message")  # type: ignore[arg-type]


@pytest.mark.parametrize("build", [
    lambda: Hello("ecd 00", b"\x00" * 8, "f"),
    lambda: Hello("ecd-00", b"\x00" * 7, "f"),
    lambda: Hello("ecd-00", b"\x00" * 8, ""),
    lambda: Hello("ecd-00", b"\x00" * 8, "x" * 65),
    lambda: EndorsementMsg(-1, b"\x00" * 32, Endorsement("a", b"\x00" * 64)),
    lambda: EndorsementMsg(0, b"\x00" * 31, Endorsement("a", b"\x00" * 64)),
    lambda: EndorsementRefusedMsg(0, b"\x00" * 32, 2**16),
    lambda: ForwardTxs(()),
    lambda: ForwardTxs((TXS[0],) * (MAX_TXS_PER_BLOCK + 1)),
    lambda: ForwardRefused(b"\x00" * 32, True, 0),
    lambda: KeyHandover(b"", 1, b"e"),
    lambda: KeyHandover(b"\x01", 0, b"e"),
    lambda: KeyHandover(b"\x01", 1, b""),
    lambda: KeyHandover(b"\x01", 1, b"e" * (MAX_ENVELOPE + 1)),
    lambda: KeyAck(b"\x01" * 17, 1),
    lambda: QueryForward(0, b"\x01", "a", "b", ("c",) * (MAX_PATH_HOPS + 1), 0),
    lambda: QueryForward(0, b"\x01", "a", "b", ("c d",), 0),
    lambda: QueryForward(0, b"\x01", "", "b", (), 0),
    lambda: QueryAnswer(0, 256, 0, 0, b"", ""),
    lambda: QueryAnswer(0, 0, 0, 0, b"", "\u00e9" * 101),
    lambda: QueryAnswer(0, 0, 0, 0, b"", "\ud800"),
    lambda: SnapshotChunk(0, 3, 3, b""),
    lambda: SnapshotChunk(0, 0, 0, b""),
    lambda: SnapshotChunk(0, 0, 1, b"\x00" * (MAX_CHUNK_DATA + 1)),
    lambda: Ping(2**64),
    lambda: Pong(-1),
    lambda: StationQuery(-1, b"\x01"),
    lambda: StationRevoke(0, b""),
    lambda: StationReply(0, 1, 0, 0, 0, ""),  # type: ignore[arg-type]
    lambda: StationReply(0, True, 256, 0, 0, ""),
    lambda: StationReply(0, True, 0, 2**16, 0, ""),
    lambda: StationAnswer(0, 0, 0, 0, b"", b"p" * (256 * 1024 + 1), ""),
    lambda: ReadingsAnswer(0, ((0, 0, b""),)),
    lambda: ReadingsAnswer(0, ((0, 0, b"x"),) * 65),
    lambda: ReadingsAnswer(0, ((2**32, 0, b"x"),)),
])
def test_messages_refuse_bad_fields_when_built(build: object) -> None:
    with pytest.raises(WireValueError):
        build()  # type: ignore[operator]


# ------------------------------------------------------------- header faults


def test_wrong_magic_is_refused_at_its_first_byte() -> None:
    assert refused(b"X").reason is WireFault.BAD_MAGIC
    assert refused(b"EX").reason is WireFault.BAD_MAGIC
    assert FrameDecoder().feed(b"E") == []  # a prefix of the magic is not a fault yet


@pytest.mark.parametrize("version", [0, 2, 255])
def test_another_version_is_refused(version: int) -> None:
    data = frame(MsgType.PING, b"\x00" * 8, version=version)
    assert refused(data[:3]).reason is WireFault.BAD_VERSION


@pytest.mark.parametrize("msg_type", [0, 25, 200, 255])
def test_an_unknown_type_is_refused_before_its_payload(msg_type: int) -> None:
    assert refused(frame(msg_type, b"")[:4]).reason is WireFault.UNKNOWN_TYPE
    with pytest.raises(WireError) as info:
        decode_message(msg_type, b"")
    assert info.value.reason is WireFault.UNKNOWN_TYPE


def test_trailing_and_truncated_payloads_are_refused() -> None:
    good = encode_message(Ping(5))
    assert refused(frame(MsgType.PING, good + b"\x00")).reason is WireFault.TRAILING_BYTES
    assert refused(frame(MsgType.PING, good[:-1])).reason is WireFault.BAD_FIELD
    for m in samples():
        payload = encode_message(m)
        with pytest.raises(WireError) as info:
            decode_message(m.TYPE, payload + b"\x00")
        assert info.value.reason is WireFault.TRAILING_BYTES
        for cut in range(len(payload)):
            with pytest.raises(WireError) as info:
                decode_message(m.TYPE, payload[:cut])
            assert info.value.reason is WireFault.BAD_FIELD


def _hello_payload(tid: bytes) -> bytes:
    return bytes([len(tid)]) + tid + b"\x00" * 8 + b"\x01f"


@pytest.mark.parametrize(("msg_type", "payload"), [
    (MsgType.HELLO, _hello_payload(b"ecd 00")),  # outside the id alphabet
    (MsgType.HELLO, _hello_payload(b"")),
    (MsgType.HELLO, b"\x01a" + b"\x00" * 8 + b"\x01\xff"),  # fleet not UTF-8
    (MsgType.HELLO, b"\x01a" + b"\x00" * 8 + b"\x00"),  # empty fleet
    (MsgType.KEY_ACK, b"\x01\x01" + b"\x00\x00\x00\x00"),  # key version 0
    (MsgType.KEY_ACK, b"\x11" + b"\x01" * 17 + b"\x00\x00\x00\x01"),  # 17-byte meter id
    (MsgType.KEY_HANDOVER, b"\x01\x01\x00\x00\x00\x01" + b"\x10\x01" + b"e" * 4097),
    (MsgType.KEY_HANDOVER, b"\x01\x01\x00\x00\x00\x01\x00\x00"),  # empty envelope
    (MsgType.FORWARD_TXS, b"\x00\x00"),
    (MsgType.FORWARD_TXS, b"\x04\x01"),  # 1025 txs
    (MsgType.QUERY_FORWARD, b"\x00" * 8 + b"\x01\x01" + b"\x01a\x01b" + b"\x11"
     + b"\x01c" * 17 + b"\x00" * 8),
    (MsgType.QUERY_ANSWER, b"\x00" * 21 + b"\x00\x00" + b"\xc9" + b"a" * 201),
    (MsgType.QUERY_ANSWER, b"\x00" * 21 + b"\x00\x00" + b"\x02\xc0\xaf"),  # overlong UTF-8
    (MsgType.SNAPSHOT_CHUNK, b"\x00" * 8 + b"\x00\x00\x00\x03\x00\x00\x00\x03" + b"\x00" * 4),
    (MsgType.SNAPSHOT_CHUNK, b"\x00" * 8 + b"\x00\x00\x00\x00\x00\x00\x00\x01"
     + (MAX_CHUNK_DATA + 1).to_bytes(4, "big")),
    (MsgType.ENDORSEMENT, b"\x00" * 40 + b"\x00" + b"\x00" * 64),
    (MsgType.ENDORSE_REQUEST, b"\x02" + b"\x00" * 124),  # block version 2
])
def test_fields_are_validated_on_decode(msg_type: MsgType, payload: bytes) -> None:
    with pytest.raises(WireError) as info:
        decode_message(msg_type, payload)
    assert info.value.reason is WireFault.BAD_FIELD
    assert refused(frame(msg_type, payload)).reason is WireFault.BAD_FIELD


# ------------------------------------------------------------------ sequence


def _frames(n: int) -> list[bytes]:
    encoder = FrameEncoder()
    return [encoder.encode(Ping(i)) for i in range(n)]


def test_encoder_numbers_frames_from_one_and_the_decoder_follows() -> None:
    frames = _frames(5)
    assert [HEADER.unpack(f[:HEADER_LEN])[3] for f in frames] == [1, 2, 3, 4, 5]
    decoder = FrameDecoder()
    for i, f in enumerate(frames):
        assert decoder.feed(f) == [Ping(i)]
        assert decoder.expected_seq == i + 2


@pytest.mark.parametrize(("order", "good"), [
    ([0, 0], 1),  # replayed / duplicated
    ([0, 1, 1], 2),  # duplicated later
    ([1, 0], 0),  # reordered
    ([0, 2], 1),  # one missing
    ([1], 0),  # not starting at 1
])
def test_replayed_duplicated_and_reordered_frames_are_refused(order: list[int],
                                                              good: int) -> None:
    frames = _frames(3)
    error = refused(b"".join(frames[i] for i in order))
    assert error.reason is WireFault.BAD_SEQ
    assert error.messages == tuple(Ping(i) for i in order[:good])  # what came before the fault


def test_a_new_connection_starts_again_at_one() -> None:
    first, second = _frames(2), _frames(2)
    decoder = FrameDecoder()
    decoder.feed(b"".join(first))
    assert refused(second[0], decoder).reason is WireFault.BAD_SEQ
    assert FrameDecoder().feed(b"".join(second)) == [Ping(0), Ping(1)]


def test_seq_zero_is_never_valid() -> None:
    assert refused(frame(MsgType.PING, b"\x00" * 8, seq=0)).reason is WireFault.BAD_SEQ


# ---------------------------------------------------------------------- fuzz


@given(st.binary(max_size=400))
def test_random_bytes_raise_only_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        FrameDecoder().feed(data)


@given(st.binary(max_size=300))
def test_random_bytes_behind_a_valid_header_raise_only_wire_error(payload: bytes) -> None:
    for msg_type in MsgType:
        with contextlib.suppress(WireError):
            FrameDecoder().feed(frame(msg_type, payload))


@given(st.integers(0, 255), st.binary(max_size=300))
def test_any_payload_decodes_canonically_or_raises_wire_error(msg_type: int,
                                                               payload: bytes) -> None:
    try:
        message = decode_message(msg_type, payload)
    except WireError:
        return
    assert encode_message(message) == payload


@given(messages, st.data())
def test_mutated_frames_decode_canonically_or_raise_wire_error(message: Message,
                                                               data: st.DataObject) -> None:
    stream = bytearray(FrameEncoder().encode(message) + FrameEncoder().encode(Ping(1))[:20])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = data.draw(st.integers(0, max(0, len(stream) - 1)))
        if op == "flip" and stream:
            stream[at] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del stream[at:]
        elif op == "insert":
            stream[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif stream:
            del stream[at]
    try:
        out = FrameDecoder().feed(bytes(stream))
    except WireError:
        return
    encoder = FrameEncoder()
    again = b"".join(encoder.encode(m) for m in out)
    assert bytes(stream).startswith(again)  # every message decoded is the one encoding of it


@given(st.lists(messages, min_size=1, max_size=3), st.binary(min_size=1, max_size=40))
def test_garbage_after_good_frames_keeps_the_good_ones(batch: list[Message],
                                                       junk: bytes) -> None:
    encoder = FrameEncoder()
    stream = b"".join(encoder.encode(m) for m in batch)
    decoder = FrameDecoder()
    try:
        out = decoder.feed(stream + junk)
    except WireError as exc:
        assert list(exc.messages[:len(batch)]) == batch
        return
    assert out[:len(batch)] == batch
