"""The meters' side of the node: link frames to node events, node answers to frames.

Between ``hal.linksession`` (frames) and ``agent.node`` (events and
actions), with the meter protocol of ``agent/meterproto.py`` in the middle.
Sans-I/O like both: frames in, events and frames out. It keeps what an
answer needs and the node does not say: which service a request was, its
counter (a reading's ACK carries it) and the key to authenticate a REVOKE's
ACK with (the key is erased by the time the node acknowledges). Counters
per meter feed the console's ``meters``.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from agent import meterproto as mp
from agent.node import events as ev
from agent.node.actions import Acknowledge, Refuse
from hal.dlt698 import AddressType, Control, Frame, FunctionCode, Reason, ServerAddress

# Requests answered by the node later than they arrived (key operations wait
# for their block): one in flight per meter is the protocol, so the paper's
# 25 meters per terminal need 25; the cap bounds memory against a flood.
MAX_OUTSTANDING = 4096
MAX_METER_STATS = 10_000  # meters whose counters are kept (the oldest forgotten first)

KeySource = Callable[[bytes, int | None], bytes | None]  # (meter, version) -> key or None


@dataclass
class MeterStats:
    frames: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    acks: int = 0
    naks: Counter[str] = field(default_factory=Counter)
    readings: int = 0
    last_reading_counter: int = 0

    def as_dict(self) -> dict:
        return {"frames": self.frames, "requests": dict(self.requests), "acks": self.acks,
                "naks": dict(self.naks), "readings": self.readings,
                "last_reading_counter": self.last_reading_counter}


@dataclass(frozen=True)
class _Outstanding:
    service: mp.Service
    counter: int
    key_before: bytes | None
    client: int
    logical: int


class MeterLink:
    """One hplc link's meters (module docstring); ``client_address`` is this terminal's CA."""

    def __init__(self, client_address: int, keys: KeySource):
        self.client_address = client_address
        self.keys = keys
        self._outstanding: OrderedDict[tuple[bytes, int], _Outstanding] = OrderedDict()
        self.meters: OrderedDict[bytes, MeterStats] = OrderedDict()
        self.counts: Counter[str] = Counter()

    def _stats(self, meter_id: bytes) -> MeterStats:
        st = self.meters.get(meter_id)
        if st is None:
            st = self.meters[meter_id] = MeterStats()
            while len(self.meters) > MAX_METER_STATS:
                self.meters.popitem(last=False)
        return st

    # -- in

    def frame_in(self, frame: Frame) -> tuple[ev.Event | None, Frame | None]:
        """A good frame: the node event it carries, or the NAK frame to send back at once."""
        self.counts["frames"] += 1
        meter_id = bytes(frame.server.address)
        c = frame.control
        if frame.client != self.client_address:
            self.counts["not_ours"] += 1  # another terminal's meter on a shared channel
            return None, None
        if frame.server.type is not AddressType.SINGLE:
            self.counts["bad_address"] += 1
            return None, None  # a group or broadcast address cannot be answered by one meter
        st = self._stats(meter_id)
        st.frames += 1
        if not c.from_server or not c.initiator or c.function is not FunctionCode.USER_DATA:
            self.counts["not_a_request"] += 1
            return None, self._nak_frame(frame, mp.encode_nak(0, 0, mp.Fault.NOT_A_REQUEST), st,
                                         mp.Fault.NOT_A_REQUEST.name)
        try:
            request = mp.decode_request(meter_id, frame.apdu)
        except mp.ApduError as exc:
            self.counts["bad_apdu"] += 1
            name = mp.Fault(exc.code).name
            return None, self._nak_frame(
                frame, mp.encode_nak(exc.request_id, exc.service, exc.code), st, name)
        service = mp.service_of(request)
        st.requests[service.name] += 1
        key_before = self.keys(meter_id, None) if service is mp.Service.REVOKE else None
        self._outstanding[(meter_id, request.request_id)] = _Outstanding(
            service, request.counter, key_before, frame.client,
            frame.server.logical)
        self._outstanding.move_to_end((meter_id, request.request_id))
        while len(self._outstanding) > MAX_OUTSTANDING:
            self._outstanding.popitem(last=False)
            self.counts["outstanding_dropped"] += 1
        return request, None

    def rejected(self, reason: Reason, source: tuple[ServerAddress, int] | None = None
                 ) -> Frame | None:
        """A byte run the link layer threw away; the NAK frame to send when its sender is
        known (its header checked before the body failed) and it is one of ours."""
        self.counts[f"rejected_{reason.name}"] += 1
        if source is None:
            return None
        server, client = source
        if client != self.client_address or server.type is not AddressType.SINGLE:
            return None
        st = self._stats(bytes(server.address))
        st.naks[f"LINK_{reason.name}"] += 1
        self.counts["naks"] += 1
        return _reply(bytes(server.address), server.logical, client,
                      mp.encode_nak(0, 0, mp.LINK_REASON_BASE + int(reason)))

    # -- out

    def answer(self, action: Acknowledge | Refuse) -> Frame | None:
        """The frame that answers a meter's request, or None if it was no meter request."""
        key = (bytes(action.meter_id), action.request_id)
        out = self._outstanding.pop(key, None)
        if out is None:
            return None
        st = self._stats(key[0])
        if isinstance(action, Acknowledge):
            apdu = self._ack(action, out)
            if apdu is None:
                self.counts["ack_without_key"] += 1
                return None
            st.acks += 1
            if out.service is mp.Service.READING:
                st.readings += 1
                st.last_reading_counter = out.counter
        else:
            apdu = mp.encode_nak(action.request_id, out.service, int(action.reason),
                                 counter=action.counter or 0, home=action.home or "")
            st.naks[action.reason.name] += 1
            self.counts["naks"] += 1
        self.counts["answers"] += 1
        return _reply(key[0], out.logical, out.client, apdu)

    def _ack(self, action: Acknowledge, out: _Outstanding) -> bytes | None:
        if out.service is mp.Service.REVOKE:
            mac_key = out.key_before
            value = action.height or 0
        elif out.service is mp.Service.READING:
            mac_key = self.keys(bytes(action.meter_id), action.key_version)
            value = out.counter
        else:
            mac_key = self.keys(bytes(action.meter_id), action.key_version)
            value = action.height or 0
        if mac_key is None:
            return None
        return mp.encode_ack(bytes(action.meter_id), action.request_id, out.service,
                             action.key_version, value, mac_key)

    def _nak_frame(self, frame: Frame, apdu: bytes, st: MeterStats, reason: str) -> Frame:
        st.naks[reason] += 1
        self.counts["naks"] += 1
        return _reply(bytes(frame.server.address), frame.server.logical,
                      frame.client, apdu)

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)


def _reply(meter_id: bytes, logical: int, client: int, apdu: bytes) -> Frame:
    return Frame(Control(FunctionCode.USER_DATA, from_server=False, initiator=False),
                 ServerAddress(meter_id, AddressType.SINGLE, logical), client, apdu)
