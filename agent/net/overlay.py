"""Messages between terminals carried hop by hop along the router's paths, signed end to end.

    origin --Relayed(path origin..dst, inner, signature)--> relay --> ... --> dst

The router (agent/routing/live.py) picks each destination's path; a path of
one link is sent as the message itself, a longer one as a ``wire.Relayed``
frame to the first relay. A relay checks only that the frame reached it from
the hop before it on the path and passes it on undecoded; the destination
checks the origin's Ed25519 signature over the sequence number, the whole
path, the inner type and the payload, and a replay window per origin. So a
relay (a compromised terminal included) can drop or delay what it carries,
as a dead link would, but cannot forge an origin, alter a payload, re-route
it or play it again: its tampering is refused at the destination
(``refused.<reason>``) and the origin's own retries (endorsement rounds,
hand-over resends) go round it on the next path.

Routing never costs liveness (a relay that died, a cut the router has not
seen yet, must not stop the ledger):

- **Answers retrace the question.** An endorsement, a refusal or a key
  acknowledgement goes back along the reverse of the path the last message
  from that terminal came by (straight back when it came straight).
- **Unanswered requests fall back to the direct link.** A request relayed
  to a terminal that has not been heard from since, for ``FALLBACK_S``,
  goes straight to it, and so does everything else for it during
  ``DIRECT_HOLD_S``: the endorsement round that timed out is asked again
  directly, as the WAN (every terminal's own 4G link) allows.

Sequence numbers start at the wall clock in milliseconds shifted left 16
bits (the caller passes it), so a terminal that restarted keeps numbering
above what it sent before without writing anything down. The window keeps
the highest number seen per origin and which of the ``REPLAY_WINDOW`` below
it arrived (frames along different paths overtake each other).

Sans-I/O: ``outgoing`` and ``incoming`` return what to send or deliver; the
runtime (agent/network.py) moves the bytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.ledger.identity import verify_signature
from agent.net import wire

REPLAY_WINDOW = 4096  # sequence numbers below the highest seen that may still arrive once
FALLBACK_S = 1.5  # a relayed request unanswered this long (under the 2 s round): go direct
DIRECT_HOLD_S = 30.0  # and stays on the direct link this long
# Answers: they go back the way the question came.
ANSWERS = (wire.MsgType.ENDORSEMENT, wire.MsgType.ENDORSEMENT_REFUSED,
           wire.MsgType.FORWARD_REFUSED, wire.MsgType.KEY_ACK)


@dataclass(frozen=True, slots=True)
class Deliver:
    """A message for this terminal, from ``origin`` (its signature checked)."""

    origin: str
    message: wire.Message


@dataclass(frozen=True, slots=True)
class Forward:
    """A frame this terminal relays: send it to ``next_hop``."""

    next_hop: str
    frame: wire.Relayed


@dataclass(frozen=True, slots=True)
class Refused:
    """A frame dropped here, and why (the counter ``refused.<reason>``)."""

    reason: str
    detail: str


class _Window:
    __slots__ = ("seen", "top")

    def __init__(self) -> None:
        self.top = -1
        self.seen = 0  # bit i: top - i arrived

    def admit(self, seq: int) -> str | None:
        if seq > self.top:
            shift = seq - self.top
            self.seen = ((self.seen << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) \
                if shift < REPLAY_WINDOW else 1
            self.top = seq
            return None
        back = self.top - seq
        if back >= REPLAY_WINDOW:
            return "too_old"
        if self.seen >> back & 1:
            return "replayed"
        self.seen |= 1 << back
        return None


class Overlay:
    """This terminal's end of the relayed messages (module docstring)."""

    def __init__(self, self_id: str, *, sign: Callable[[bytes], bytes],
                 public_key: Callable[[str], object | None],
                 path_to: Callable[[str], tuple[str, ...] | None], first_seq: int):
        self.self_id = self_id
        self.sign = sign
        self.public_key = public_key
        self.path_to = path_to
        self._seq = int(first_seq)
        self._windows: dict[str, _Window] = {}
        self.counters: Counter[str] = Counter()
        self._came: dict[str, tuple[str, ...]] = {}  # origin -> the way back to it
        self._unanswered: dict[str, float] = {}  # dst -> first relayed request not answered
        self._direct_until: dict[str, float] = {}  # dst -> on the direct link until then

    def heard(self, origin: str, path: tuple[str, ...] | None = None) -> None:
        """A message from ``origin`` arrived, straight (``path`` None) or along ``path``."""
        self._came[origin] = (self.self_id, origin) if path is None else tuple(reversed(path))
        self._unanswered.pop(origin, None)

    def outgoing(self, dst: str, message: wire.Message,
                 now: float = 0.0) -> tuple[str, wire.Message]:
        """(the peer to hand it to, what to hand it): the message, or a Relayed frame."""
        if message.TYPE not in wire.RELAYABLE:
            path = None
        elif message.TYPE in ANSWERS and dst in self._came:
            path = self._came[dst]
        elif now < self._direct_until.get(dst, -1.0):
            path = None
        else:
            path = self.path_to(dst)
            asked = self._unanswered.get(dst)
            if path is not None and len(path) > 2 and asked is not None \
                    and now - asked > FALLBACK_S:
                self._direct_until[dst] = now + DIRECT_HOLD_S
                self._unanswered.pop(dst, None)
                self.counters["direct.fallback"] += 1
                path = None
        if path is None or len(path) <= 2:
            self.counters["direct"] += 1
            return dst, message
        if message.TYPE not in ANSWERS:
            self._unanswered.setdefault(dst, now)
        if path[0] != self.self_id or path[-1] != dst:
            raise ValueError(f"the route to {dst} does not start here and end there: {path}")
        self._seq += 1
        inner = wire.encode_message(message)
        signature = self.sign(wire.relayed_signed(self._seq, path, int(message.TYPE), inner))
        self.counters["relayed.sent"] += 1
        return path[1], wire.Relayed(self._seq, path, int(message.TYPE), inner, signature)

    def incoming(self, peer: str, frame: wire.Relayed) -> Deliver | Forward | Refused:
        """What to do with a Relayed frame that came from ``peer``."""
        path = frame.path
        if self.self_id not in path:
            return self._refuse("not_on_path", f"from {peer}: {'>'.join(path)}")
        i = path.index(self.self_id)
        if i == 0:
            return self._refuse("own_frame", f"from {peer}")
        if path[i - 1] != peer:
            return self._refuse("wrong_hop", f"from {peer}, expected {path[i - 1]}")
        if i < len(path) - 1:
            self.counters["relayed.forwarded"] += 1
            return Forward(path[i + 1], frame)
        origin = frame.origin
        key = self.public_key(origin)
        if key is None:
            return self._refuse("unknown_origin", origin)
        assert isinstance(key, bytes | Ed25519PublicKey)
        signed = wire.relayed_signed(frame.seq, path, frame.inner_type, frame.inner)
        if not verify_signature(key, frame.signature, signed):
            return self._refuse("bad_signature", f"from {origin} via {peer}")
        window = self._windows.setdefault(origin, _Window())
        why = window.admit(frame.seq)
        if why is not None:
            return self._refuse(why, f"{origin} seq {frame.seq}")
        try:
            message = wire.decode_message(frame.inner_type, frame.inner)
        except wire.WireError as exc:  # signed by the origin yet malformed: its bug
            return self._refuse("bad_inner", f"from {origin}: {exc}")
        self.counters["relayed.delivered"] += 1
        self.heard(origin, path)
        return Deliver(origin, message)

    def forget(self, origin: str) -> None:
        """Drop an origin's window (it retired): its frames are refused as unknown after."""
        self._windows.pop(origin, None)

    def _refuse(self, reason: str, detail: str) -> Refused:
        self.counters[f"refused.{reason}"] += 1
        return Refused(reason, detail)
