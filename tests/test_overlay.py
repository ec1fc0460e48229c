"""Relayed messages: delivered along the path, and every tampering a relay could try refused."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ledger.identity import TerminalIdentity
from agent.net import wire
from agent.net.overlay import REPLAY_WINDOW, Deliver, Forward, Overlay, Refused

IDS = ("ecd-00", "ecd-01", "ecd-02", "ecd-03")
KEYS = {t: TerminalIdentity.from_seed(t, bytes([i + 1]) * 32) for i, t in enumerate(IDS)}
PATH = ("ecd-00", "ecd-01", "ecd-02", "ecd-03")  # ecd-00 reaches ecd-03 through 01 and 02
MESSAGE = wire.KeyAck(b"\x01\x02\x03", 4)


def overlay(me: str, paths: dict[str, tuple[str, ...]] | None = None) -> Overlay:
    return Overlay(me, sign=KEYS[me].sign,
                   public_key=lambda t: KEYS[t].public_bytes() if t in KEYS else None,
                   path_to=lambda dst: (paths or {}).get(dst), first_seq=1 << 20)


def carry(frame: wire.Relayed) -> Deliver | Refused:
    """Hand a frame hop by hop along its path, as the terminals would."""
    prev = frame.path[0]
    for hop in frame.path[1:]:
        got = overlay(hop).incoming(prev, frame)
        if not isinstance(got, Forward):
            return got
        assert got.next_hop == frame.path[frame.path.index(hop) + 1]
        prev = hop
    raise AssertionError("the last hop forwarded")


def sent() -> wire.Relayed:
    hop, frame = overlay("ecd-00", {"ecd-03": PATH}).outgoing("ecd-03", MESSAGE)
    assert hop == "ecd-01" and isinstance(frame, wire.Relayed)
    return frame


def test_a_message_crosses_two_relays_and_arrives_from_its_origin() -> None:
    got = carry(sent())
    assert got == Deliver("ecd-00", MESSAGE)


def test_a_neighbour_or_an_unrouted_destination_gets_the_message_itself() -> None:
    o = overlay("ecd-00", {"ecd-01": ("ecd-00", "ecd-01")})
    assert o.outgoing("ecd-01", MESSAGE) == ("ecd-01", MESSAGE)
    assert o.outgoing("ecd-02", MESSAGE) == ("ecd-02", MESSAGE)  # no route known: direct
    query = wire.SnapshotRequest(4)  # not relayable: it goes direct whatever the path
    assert overlay("ecd-00", {"ecd-03": PATH}).outgoing("ecd-03", query) == ("ecd-03", query)


@pytest.mark.parametrize("tamper, reason", [
    (lambda f: dataclasses.replace(f, inner=f.inner[:-1] + b"\x05"), "bad_signature"),
    (lambda f: dataclasses.replace(f, path=("ecd-00", "ecd-02", "ecd-03")), "bad_signature"),
    (lambda f: dataclasses.replace(f, seq=f.seq + 1), "bad_signature"),
    (lambda f: dataclasses.replace(f, inner_type=int(wire.MsgType.ENDORSEMENT)),
     "bad_signature"),
    (lambda f: dataclasses.replace(f, path=("ecd-02", "ecd-01", "ecd-03")), "bad_signature"),
])
def test_a_relay_cannot_alter_reroute_or_reattribute_what_it_carries(tamper, reason) -> None:
    """Injected: a relay rewrites the payload, the path, the number, the type or the origin.
    Survives: nothing; the destination refuses it under ``reason``."""
    frame = tamper(sent())
    dst = overlay("ecd-03")
    got = dst.incoming(frame.path[-2], frame)
    assert isinstance(got, Refused) and got.reason == reason
    assert dst.counters[f"refused.{reason}"] == 1


def test_a_frame_from_the_wrong_hop_or_not_for_us_is_dropped() -> None:
    frame = sent()
    assert overlay("ecd-02").incoming("ecd-00", frame).reason == "wrong_hop"  # type: ignore[union-attr]
    assert overlay("ecd-00").incoming("ecd-01", frame).reason == "own_frame"  # type: ignore[union-attr]
    stranger = Overlay("ecd-09", sign=KEYS["ecd-00"].sign, public_key=lambda t: None,
                       path_to=lambda d: None, first_seq=0)
    assert stranger.incoming("ecd-02", frame).reason == "not_on_path"  # type: ignore[union-attr]
    unknown = overlay("ecd-03")
    unknown.public_key = lambda t: None  # the origin retired: its key no longer vouches
    assert unknown.incoming("ecd-02", frame).reason == "unknown_origin"  # type: ignore[union-attr]


def test_a_replayed_frame_is_delivered_once() -> None:
    """Injected: the same signed frame twice, and one older than the window. Survives: the
    first delivery only."""
    origin = overlay("ecd-00", {"ecd-03": PATH})
    dst = overlay("ecd-03")
    frames = [origin.outgoing("ecd-03", MESSAGE)[1] for _ in range(3)]
    assert all(isinstance(f, wire.Relayed) for f in frames)
    # out of order along different paths is fine; the second copy is not
    for f in (frames[2], frames[0], frames[1]):
        assert isinstance(dst.incoming("ecd-02", f), Deliver)  # type: ignore[arg-type]
    assert dst.incoming("ecd-02", frames[0]).reason == "replayed"  # type: ignore[union-attr, arg-type]
    for _ in range(REPLAY_WINDOW + 1):
        origin.outgoing("ecd-03", MESSAGE)
    newest = origin.outgoing("ecd-03", MESSAGE)[1]
    assert isinstance(dst.incoming("ecd-02", newest), Deliver)  # type: ignore[arg-type]
    stale = dataclasses.replace(frames[0])
    assert dst.incoming("ecd-02", stale).reason == "too_old"  # type: ignore[union-attr]


def test_a_terminal_restarted_numbers_above_what_it_sent_before() -> None:
    before = Overlay("ecd-00", sign=KEYS["ecd-00"].sign, public_key=lambda t: None,
                     path_to=lambda d: PATH, first_seq=1000 << 16)
    after = Overlay("ecd-00", sign=KEYS["ecd-00"].sign, public_key=lambda t: None,
                    path_to=lambda d: PATH, first_seq=1001 << 16)
    a = before.outgoing("ecd-03", MESSAGE)[1]
    b = after.outgoing("ecd-03", MESSAGE)[1]
    assert b.seq > a.seq  # type: ignore[union-attr]


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 2**64 - 1))
def test_garbage_inner_signed_by_a_member_is_refused_cleanly(inner: bytes, seq: int) -> None:
    """A member signs bytes that are no valid message: refused as bad_inner, never raised."""
    t = int(wire.MsgType.ENDORSEMENT)
    sig = KEYS["ecd-00"].sign(wire.relayed_signed(seq, PATH, t, inner))
    frame = wire.Relayed(seq, PATH, t, inner, sig)
    got = overlay("ecd-03").incoming("ecd-02", frame)
    if isinstance(got, Refused):
        assert got.reason == "bad_inner"
    else:
        assert isinstance(got, Deliver) and got.origin == "ecd-00"


def test_an_answer_goes_back_the_way_its_question_came() -> None:
    dst = overlay("ecd-03", {"ecd-00": ("ecd-03", "ecd-02", "ecd-01", "ecd-00")})
    frame = sent()
    assert isinstance(dst.incoming("ecd-02", frame), Deliver)
    answer = wire.EndorsementMsg(5, b"\x22" * 32, wire.Endorsement("ecd-03", b"\x09" * 64))
    hop, back = dst.outgoing("ecd-00", answer, 1.0)
    assert hop == "ecd-02" and back.path == tuple(reversed(PATH))  # type: ignore[union-attr]
    dst.heard("ecd-00")  # then a question came straight: the answer goes straight back
    assert dst.outgoing("ecd-00", answer, 2.0) == ("ecd-00", answer)


def test_an_unanswered_relayed_request_falls_back_to_the_direct_link() -> None:
    """Injected: a relay on the path swallows everything. Survives: after FALLBACK_S the
    request goes straight to its destination, and stays direct for DIRECT_HOLD_S."""
    from agent.net.overlay import DIRECT_HOLD_S, FALLBACK_S

    o = overlay("ecd-00", {"ecd-03": PATH})
    request = wire.KeyHandover(b"\x01\x02\x03", 4, b"envelope")
    assert o.outgoing("ecd-03", request, 10.0)[0] == "ecd-01"  # relayed, then lost
    assert o.outgoing("ecd-03", request, 10.0 + FALLBACK_S / 2)[0] == "ecd-01"
    assert o.outgoing("ecd-03", request, 10.0 + FALLBACK_S + 0.1) == ("ecd-03", request)
    assert o.counters["direct.fallback"] == 1
    assert o.outgoing("ecd-03", request, 20.0)[0] == "ecd-03"
    assert o.outgoing("ecd-03", request, 11.0 + FALLBACK_S + DIRECT_HOLD_S)[0] == "ecd-01"
    o2 = overlay("ecd-00", {"ecd-03": PATH})
    o2.outgoing("ecd-03", request, 10.0)
    o2.heard("ecd-03", tuple(reversed(PATH)))  # answered: the relays work, no fallback
    assert o2.outgoing("ecd-03", request, 10.0 + 2 * FALLBACK_S)[0] == "ecd-01"
