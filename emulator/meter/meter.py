"""An emulated meter's protocol state, sans-I/O, in the subset of Python MicroPython runs.

A meter is the DL/T 698.45 server: it starts every exchange, one request at a
time, and the terminal answers each with one ACK or NAK (README, "Meter
protocol"). ``Meter.poll(now_ms)`` returns the frame to send when one is due;
``Meter.receive(frame)`` takes the terminal's answer. No sockets, clocks or
files: the time comes in as an argument, and crypto, randomness and logging
through a ``Shim`` (the platform: ``emulator/meter/shim.py`` on CPython, the
MCU's own drivers on a meter), so this file moves onto a meter unchanged.
``now_ms`` is a millisecond count that never wraps; a MicroPython runner
accumulates ``time.ticks_diff`` to make one.

What a meter does, in order: register its first key (wrapped under its
factory key), then send a sealed reading every ``reading_every_s`` and rotate
its key every ``rotate_every_s`` (0: never). A request that gets no answer is
resent after ``timeout_s`` with the same request id and counter, at most
``retries`` times; then the meter gives up on that series and, after
``retry_later_s`` (plus up to a quarter of it at random, so meters that lost
the same terminal do not come back in step), starts a new series with a new
request id. A key operation keeps its counter, its new key and its proof
across series, as it does after a BUSY, TIMEOUT or OVERLOADED refusal: the
terminal may have committed the operation without the meter hearing of it,
and the node core answers a request with the committed counter and proof as
a committed retry, whereas a new counter would be checked against the key
the chain moved to and refused. A reading that is given up is dropped; the
next one has a higher invocation counter.

Keys change only on an ACK whose MAC checks: for REGISTER and ROTATE under the
pending new key, for REVOKE and READING under the current key; any other ACK
is counted as a bad MAC and ignored (the meter keeps waiting for the real
answer), so a forged acknowledgement cannot desynchronise it. NAKs:
REPLAYED and REPLAYED_READING move the counter above the one the NAK names
and retry at once; NOT_HOME records the home terminal and stops the meter;
BUSY, TIMEOUT, OVERLOADED and KEY_PENDING retry later; any other reason is
counted and logged and the operation dropped (a registration is tried again
after ``retry_later_s``, a rotation at its next turn). A NAK that names no
request (request id and service 0: the terminal's link layer or codec could
not read the frame) makes the meter resend the one request it has out at once.

``MeterBank`` holds the meters that share one channel (an HPLC network
carries many addresses): one frame decoder, answers routed by SA.
"""

from .apdu import (
    BUSY,
    KEY_BYTES,
    KEY_PENDING,
    MAX_READING_BYTES,
    MAX_U32,
    MAX_U64,
    NONCE_BYTES,
    NOT_HOME,
    OVERLOADED,
    READING,
    REGISTER,
    REPLAYED,
    REPLAYED_READING,
    REVOKE,
    ROTATE,
    SERVICE_NAMES,
    TIMEOUT,
    Ack,
    ApduError,
    Nak,
    check_ack,
    decode_answer,
    encode_reading,
    encode_register,
    encode_revoke,
    encode_rotate,
    reading_aad,
    reason_name,
)
from .frame import (
    ADDRESS_SINGLE,
    DEFAULT_MAX_FRAME_BYTES,
    Frame,
    FrameDecoder,
    control_byte,
    encode_frame,
)

DEFAULT_CA = 0x01  # the terminal's client address unless the meter file says otherwise
STATE_FORMAT = 1  # the version of state()'s layout
MAX_ACKED = 64  # acknowledged operations kept for inspection: a bounded list on an MCU
MAX_LOG_DETAIL = 80
REVOCATION_LABEL = b"edgekey/revocation/v1"  # the "empty key" (agent/keystore/material.py)
_REQUEST_C = control_byte(True, True)  # DIR=1 the server sent it, PRM=1 it initiates
_ANSWER_C = control_byte(False, False)  # DIR=0, PRM=0: the terminal's answer
_RETRY_LATER = (BUSY, TIMEOUT, OVERLOADED, KEY_PENDING)  # transient: the same operation later
_COUNTERS = ("requests", "resends", "gave_up", "acks", "bad_macs", "bad_answers",
             "stale_answers", "foreign_frames", "ignored_frames", "readings_sent",
             "readings_acked", "registrations", "rotations", "revocations")


class Shim:
    """The platform under a meter; subclass it. Crypto is AES key wrap (RFC 3394), AES-256-GCM
    and HMAC-SHA256, as the terminal's ``cryptography`` computes them."""

    def key_wrap(self, kek: bytes, key: bytes) -> bytes:
        """``key`` wrapped under ``kek`` (RFC 3394 2.2.1): 40 bytes for a 32-byte key."""
        raise NotImplementedError

    def gcm_seal(self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM: ciphertext | 16-byte tag."""
        raise NotImplementedError

    def hmac_sha256(self, key: bytes, msg: bytes) -> bytes:
        raise NotImplementedError

    def sha256(self, data: bytes) -> bytes:
        raise NotImplementedError

    def random_bytes(self, n: int) -> bytes:
        """``n`` bytes from the platform's random source (keys and nonces come from it)."""
        raise NotImplementedError

    def ticks_ms(self) -> int:
        """A millisecond clock that never goes backwards, for runners (the meter takes now_ms)."""
        raise NotImplementedError

    def log(self, meter_id: bytes, event: str, detail: str) -> None:
        """Something worth a line in a log: a refusal, a bad MAC, a give-up. Default: dropped."""

    def answered(self, meter_id: bytes, service: str, outcome: str, latency_ms: int) -> None:
        """An operation's answer: ``outcome`` "ACK" or the NAK's reason, ``latency_ms`` from
        its first request (resends included). For a run's figures; default: dropped."""


class Operation:
    """The one request a meter has out, or has parked to start again later.

    ``new_key`` is the key a REGISTER or ROTATE proposes, ``key_version`` the
    version a REGISTER asks for, ``body`` the wrapped key, proof or sealed
    reading; a new series re-encodes them under a new request id.
    ``retry_at_ms`` is -1 while a series is out, else when the next starts.
    """

    __slots__ = ("attempts", "body", "counter", "deadline_ms", "frame", "key_version",
                 "new_key", "request_id", "retry_at_ms", "service", "started_ms")

    def __init__(self, service: int, counter: int, body: bytes, new_key: bytes = b"",
                 key_version: int = 0) -> None:
        self.service = service
        self.counter = counter
        self.body = body
        self.new_key = new_key
        self.key_version = key_version
        self.request_id = 0
        self.frame = b""
        self.attempts = 0
        self.deadline_ms = 0
        self.retry_at_ms = -1
        self.started_ms = -1  # the first request of the operation (-1: not sent yet)


def _ms(seconds: float) -> int:
    """Seconds from the configuration as whole milliseconds; 0 stays 0 (never)."""
    if seconds < 0:
        raise ValueError(f"a period of {seconds} s")
    return int(seconds * 1000 + 0.5)


class Meter:
    """One meter: its id (the SA), keys, counters, schedule and the operation in flight."""

    def __init__(self, meter_id: bytes, factory_key: bytes, shim: Shim, ca: int = DEFAULT_CA,
                 reading_every_s: float = 60, rotate_every_s: float = 3600,
                 timeout_s: float = 5, retries: int = 3, retry_later_s: float = 30,
                 start_ms: int = 0, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if not 1 <= len(meter_id) <= 16:
            raise ValueError(f"meter id of {len(meter_id)} bytes, not 1..16")
        if len(factory_key) != KEY_BYTES:
            raise ValueError(f"factory key of {len(factory_key)} bytes, not {KEY_BYTES}")
        if not 0 <= ca <= 0xFF:
            raise ValueError(f"client address {ca} is not one byte")
        if retries < 0 or _ms(timeout_s) <= 0:
            raise ValueError("timeout_s must be > 0 and retries >= 0")
        self.meter_id = bytes(meter_id)
        self.factory_key = bytes(factory_key)
        self.shim = shim
        self.ca = ca
        self.reading_every_ms = _ms(reading_every_s)
        self.rotate_every_ms = _ms(rotate_every_s)
        self.timeout_ms = _ms(timeout_s)
        self.retries = retries
        self.retry_later_ms = max(_ms(retry_later_s), 1)
        self.max_frame_bytes = max_frame_bytes
        self._marker = shim.sha256(REVOCATION_LABEL)
        # what a meter keeps across restarts (state())
        self.key: bytes | None = None
        self.key_version = 0
        self.counter = 0  # the last key-operation counter used (the chain's per-meter counter)
        self.reading_counter = 0  # the last reading invocation counter used
        self.request_id = 0  # the last request id used
        self.home = ""  # the home terminal a NOT_HOME named
        self.stopped = False  # NOT_HOME: this terminal is not the meter's home
        self.energy_wh = 0  # what the readings report
        self.op: Operation | None = None
        self.counters: dict[str, int] = {}
        for name in _COUNTERS:
            self.counters[name] = 0
        self.naks: dict[str, int] = {}  # reason name -> NAKs received
        self.acked: list[list] = []  # [operation, key version, value], the last MAX_ACKED
        self.dirty = False  # something a runner should persist happened since it last looked
        # schedule: -1 is "not due"
        self._now = start_ms
        self._next_register_ms = start_ms
        self._next_rotate_ms = -1
        self._next_reading_ms = -1
        self._rotate_wanted = False
        self._revoke_wanted = False
        self._reading_data: bytes | None = None

    # ------------------------------------------------------------ requests asked for

    def request_rotate(self) -> None:
        """Rotate the key at the next chance, whatever the schedule says."""
        self._rotate_wanted = True

    def request_revoke(self) -> None:
        """Revoke the key at the next chance; the meter then registers a new key line."""
        self._revoke_wanted = True

    def request_reading(self, data: bytes) -> None:
        """Send ``data`` (at most 512 bytes) as the next reading, at the next chance."""
        if len(data) > MAX_READING_BYTES:
            raise ValueError(f"a reading is at most {MAX_READING_BYTES} bytes")
        self._reading_data = bytes(data)

    # ------------------------------------------------------------ the clock side

    def poll(self, now_ms: int) -> bytes | None:
        """The frame to send now, if one is due: a new request, a resend, a new series."""
        self._now = now_ms
        if self.stopped:
            return None
        op = self.op
        if op is not None:
            if op.retry_at_ms >= 0:
                if now_ms < op.retry_at_ms:
                    return None
                return self._send(op, now_ms)
            if now_ms < op.deadline_ms:
                return None
            if op.attempts <= self.retries:
                op.attempts += 1
                op.deadline_ms = now_ms + self.timeout_ms
                self.counters["resends"] += 1
                return op.frame
            self.counters["gave_up"] += 1
            self._log("gave_up", f"{SERVICE_NAMES[op.service]} request {op.request_id} after "
                                 f"{op.attempts} attempts")
            if op.service == READING:
                self.op = None
            else:
                op.retry_at_ms = now_ms + self._later()
                return None
        return self._start_due(now_ms)

    def next_deadline_ms(self) -> int | None:
        """When ``poll`` next has something to do, or None (stopped, nothing scheduled)."""
        if self.stopped:
            return None
        op = self.op
        if op is not None:
            return op.retry_at_ms if op.retry_at_ms >= 0 else op.deadline_ms
        if self.key is None:
            return self._next_register_ms if self._next_register_ms >= 0 else None
        if self._revoke_wanted or self._rotate_wanted or self._reading_data is not None:
            return self._now
        due = -1
        for t in (self._next_rotate_ms, self._next_reading_ms):
            if t >= 0 and (due < 0 or t < due):
                due = t
        return due if due >= 0 else None

    def _start_due(self, now_ms: int) -> bytes | None:
        if self.key is None:
            if 0 <= self._next_register_ms <= now_ms:
                return self._begin_register(now_ms)
            return None
        key = self.key
        if self._revoke_wanted:
            self._revoke_wanted = False
            return self._begin(Operation(REVOKE, 0, self.shim.key_wrap(key, self._marker)),
                               now_ms)
        if self._rotate_wanted or 0 <= self._next_rotate_ms <= now_ms:
            self._rotate_wanted = False
            self._next_rotate_ms = now_ms + self.rotate_every_ms if self.rotate_every_ms else -1
            new_key = self._new_key(key)
            return self._begin(Operation(ROTATE, 0, self.shim.key_wrap(key, new_key), new_key),
                               now_ms)
        data = self._reading_data
        if data is not None or 0 <= self._next_reading_ms <= now_ms:
            self._reading_data = None
            if self.reading_every_ms:
                self._next_reading_ms = now_ms + self.reading_every_ms
            if data is None:
                data = self._reading_payload()
            return self._begin_reading(key, data, now_ms)
        return None

    def _begin_register(self, now_ms: int) -> bytes | None:
        if self.key_version >= MAX_U32:
            self._log("exhausted", "no key version left to register")
            self.stopped = True
            return None
        new_key = self._new_key(None)
        op = Operation(REGISTER, 0, self.shim.key_wrap(self.factory_key, new_key), new_key,
                       self.key_version + 1)
        return self._begin(op, now_ms)

    def _begin_reading(self, key: bytes, data: bytes, now_ms: int) -> bytes | None:
        if self.reading_counter >= MAX_U64:
            self._log("exhausted", "no reading counter left")
            return None
        self.reading_counter += 1
        counter = self.reading_counter
        nonce = self.shim.random_bytes(NONCE_BYTES)
        sealed = nonce + self.shim.gcm_seal(key, nonce, data,
                                            reading_aad(self.meter_id, self.key_version, counter))
        op = Operation(READING, counter, sealed)
        self.counters["readings_sent"] += 1
        self.op = op
        return self._send(op, now_ms)

    def _begin(self, op: Operation, now_ms: int) -> bytes | None:
        """A new key operation: the next counter; persisted (``dirty``) since it holds a key."""
        if self.counter >= MAX_U64:
            self._log("exhausted", "no key-operation counter left")
            self.stopped = True
            return None
        self.counter += 1
        op.counter = self.counter
        self.op = op
        self.dirty = True
        return self._send(op, now_ms)

    def _send(self, op: Operation, now_ms: int) -> bytes:
        """Start a series: a new request id, the APDU encoded, the first attempt."""
        self.request_id = self.request_id + 1 if self.request_id < MAX_U32 else 1
        op.request_id = self.request_id
        if op.service == REGISTER:
            apdu = encode_register(op.request_id, op.counter, op.key_version, op.body)
        elif op.service == ROTATE:
            apdu = encode_rotate(op.request_id, op.counter, op.body)
        elif op.service == REVOKE:
            apdu = encode_revoke(op.request_id, op.counter, op.body)
        else:
            apdu = encode_reading(op.request_id, op.counter, op.body)
        op.frame = encode_frame(self.meter_id, self.ca, apdu, _REQUEST_C,
                                max_frame_bytes=self.max_frame_bytes)
        op.attempts = 1
        if op.started_ms < 0:
            op.started_ms = now_ms
        op.deadline_ms = now_ms + self.timeout_ms
        op.retry_at_ms = -1
        self.counters["requests"] += 1
        return op.frame

    def _new_key(self, old: bytes | None) -> bytes:
        while True:
            key = self.shim.random_bytes(KEY_BYTES)
            if len(key) != KEY_BYTES:
                raise ValueError("the random source returned a short key")
            if key != old and key != self._marker:
                return key

    def _later(self) -> int:
        """retry_later plus up to a quarter of it, from the platform's random source."""
        r = self.shim.random_bytes(1)[0]
        return self.retry_later_ms + self.retry_later_ms * r // 1024

    def _reading_payload(self) -> bytes:
        """A register reading: invocation counter and cumulative energy (Wh), 16 bytes."""
        self.energy_wh += 1 + (self.reading_counter * 7919) % 97
        return (self.reading_counter + 1).to_bytes(8, "big") + self.energy_wh.to_bytes(8, "big")

    # ------------------------------------------------------------ the line side

    def receive(self, frame: Frame, now_ms: int = -1) -> None:
        """Take a frame from the terminal (``now_ms``: the time, default the last poll's)."""
        if now_ms >= 0:
            self._now = now_ms
        if frame.address != self.meter_id:
            self.counters["foreign_frames"] += 1
            return
        if frame.client != self.ca or frame.control != _ANSWER_C or \
                frame.address_type != ADDRESS_SINGLE:
            self.counters["ignored_frames"] += 1
            return
        try:
            answer = decode_answer(frame.apdu)
        except ApduError as exc:
            self.counters["bad_answers"] += 1
            self._log("bad_answer", str(exc))
            return
        op = self.op
        if isinstance(answer, Nak) and answer.request_id == 0 and answer.service == 0:
            # The terminal could not read the request (a link-layer or codec refusal names
            # no request id); a meter has one request out, so that one is resent now.
            name = reason_name(answer.reason)
            self.naks[name] = self.naks.get(name, 0) + 1
            if op is not None and op.retry_at_ms < 0:
                op.deadline_ms = self._now
            return
        if op is None or answer.request_id != op.request_id or answer.service != op.service:
            self.counters["stale_answers"] += 1  # a late answer to a series already settled
            return
        if isinstance(answer, Ack):
            self._on_ack(op, answer)
        else:
            self._on_nak(op, answer.reason, answer.counter, answer.home)

    def _on_ack(self, op: Operation, ack: Ack) -> None:
        service = op.service
        key = op.new_key if service in (REGISTER, ROTATE) else self.key
        if not key or not check_ack(ack, self.meter_id, key, self.shim.hmac_sha256):
            self.counters["bad_macs"] += 1
            self._log("bad_mac", f"ACK of {SERVICE_NAMES[service]} request {ack.request_id}")
            return
        now = self._now
        self.counters["acks"] += 1
        self.shim.answered(self.meter_id, SERVICE_NAMES[service], "ACK", now - op.started_ms)
        if service == READING:
            self.counters["readings_acked"] += 1
        else:
            self.key_version = ack.key_version
            if service == REVOKE:
                self.key = None
                self.counters["revocations"] += 1
                self._next_register_ms = now
                self._next_rotate_ms = self._next_reading_ms = -1
            else:
                self.key = op.new_key
                self.counters["registrations" if service == REGISTER else "rotations"] += 1
                self._next_rotate_ms = now + self.rotate_every_ms if self.rotate_every_ms else -1
                if service == REGISTER:
                    self._next_reading_ms = (now + self.reading_every_ms
                                             if self.reading_every_ms else -1)
        self.acked.append([SERVICE_NAMES[service], ack.key_version, ack.value])
        if len(self.acked) > MAX_ACKED:
            self.acked = self.acked[-MAX_ACKED:]
        self.op = None
        self.dirty = True

    def _on_nak(self, op: Operation, reason: int, counter: int, home: str) -> None:
        name = reason_name(reason)
        self.naks[name] = self.naks.get(name, 0) + 1
        now = self._now
        self.shim.answered(self.meter_id, SERVICE_NAMES[op.service], name, now - op.started_ms)
        service = op.service
        if reason == REPLAYED and service != READING and counter < MAX_U64:
            self.counter = max(self.counter, counter) + 1  # above the chain's, then again
            op.counter = self.counter
            op.retry_at_ms = now
            self.dirty = True
        elif reason == REPLAYED_READING and service == READING and counter < MAX_U64:
            self.reading_counter = max(self.reading_counter, counter)
            self.op = None
            self._next_reading_ms = now  # a new reading above the one in force, at once
        elif reason == NOT_HOME:
            self.home = home
            self.stopped = True
            self.op = None
            self.dirty = True
            self._log("not_home", f"home is {home!r}; stopped")
        elif reason in _RETRY_LATER:
            if service == READING:
                self.op = None
                later = now + self._later()
                if self._next_reading_ms < 0 or later < self._next_reading_ms:
                    self._next_reading_ms = later
            else:
                op.retry_at_ms = now + self._later()
        else:
            self._log("refused", f"{SERVICE_NAMES[service]} request {op.request_id}: {name}")
            self.op = None
            self.dirty = True
            if service == REGISTER:
                self._next_register_ms = now + self._later()

    def _log(self, event: str, detail: str) -> None:
        self.shim.log(self.meter_id, event, detail[:MAX_LOG_DETAIL])

    # ------------------------------------------------------------ persistence

    def state(self) -> dict:
        """What a restarted meter needs, as plain ints, strings and lists (JSON as it is).

        The operation out, if a key operation, is kept with its new key: a
        rotation that committed unheard is finished after a restart by
        sending it again.
        """
        op = self.op
        saved_op = None
        if op is not None and op.service != READING:
            saved_op = {"service": op.service, "counter": op.counter, "body": op.body.hex(),
                        "new_key": op.new_key.hex(), "key_version": op.key_version,
                        "request_id": op.request_id}
        counters = {}
        for name in self.counters:
            counters[name] = self.counters[name]
        naks = {}
        for name in self.naks:
            naks[name] = self.naks[name]
        return {
            "format": STATE_FORMAT,
            "id": self.meter_id.hex(),
            "factory_key": self.factory_key.hex(),
            "key": self.key.hex() if self.key else "",
            "key_version": self.key_version,
            "counter": self.counter,
            "reading_counter": self.reading_counter,
            "request_id": self.request_id,
            "home": self.home,
            "stopped": 1 if self.stopped else 0,
            "energy_wh": self.energy_wh,
            "op": saved_op,
            "counters": counters,
            "naks": naks,
            "acked": [list(a) for a in self.acked],
        }

    @classmethod
    def from_state(cls, state: dict, shim: Shim, ca: int = DEFAULT_CA,
                   reading_every_s: float = 60, rotate_every_s: float = 3600,
                   timeout_s: float = 5, retries: int = 3, retry_later_s: float = 30,
                   start_ms: int = 0,
                   max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> "Meter":
        """A meter as ``state()`` left it; the schedule starts again at ``start_ms``.

        An operation that was out is sent again at ``start_ms`` under a new
        request id with its counter and proof. ValueError for a state that
        does not hold together.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"meter state format {state.get('format')!r}, "
                             f"expected {STATE_FORMAT}")
        meter = cls(bytes.fromhex(state["id"]), bytes.fromhex(state["factory_key"]), shim, ca,
                    reading_every_s, rotate_every_s, timeout_s, retries, retry_later_s,
                    start_ms, max_frame_bytes)
        key = bytes.fromhex(state["key"])
        if key and len(key) != KEY_BYTES:
            raise ValueError(f"key of {len(key)} bytes")
        meter.key = key or None
        meter.key_version = int(state["key_version"])
        meter.counter = int(state["counter"])
        meter.reading_counter = int(state["reading_counter"])
        meter.request_id = int(state["request_id"])
        meter.home = str(state.get("home", ""))
        meter.stopped = bool(state.get("stopped", 0))
        meter.energy_wh = int(state.get("energy_wh", 0))
        for name, n in state.get("counters", {}).items():
            meter.counters[name] = int(n)
        for name, n in state.get("naks", {}).items():
            meter.naks[name] = int(n)
        meter.acked = [[str(a[0]), int(a[1]), int(a[2])]
                       for a in state.get("acked", [])][-MAX_ACKED:]
        saved = state.get("op")
        if saved:
            service = int(saved["service"])
            if service not in (REGISTER, ROTATE, REVOKE):
                raise ValueError(f"saved operation of service {service}")
            op = Operation(service, int(saved["counter"]), bytes.fromhex(saved["body"]),
                           bytes.fromhex(saved["new_key"]), int(saved["key_version"]))
            op.request_id = int(saved.get("request_id", 0))
            op.retry_at_ms = start_ms
            meter.op = op
        if meter.key is not None:
            meter._next_reading_ms = start_ms + meter.reading_every_ms \
                if meter.reading_every_ms else -1
            meter._next_rotate_ms = start_ms + meter.rotate_every_ms \
                if meter.rotate_every_ms else -1
        return meter


class MeterBank:
    """The meters on one channel: one decoder, answers routed to the meter their SA names.

    Counters: ``frames`` decoded, ``foreign_frames`` (an SA no meter here has),
    ``wrong_ca`` (another terminal's client address), ``not_answers`` (a frame
    whose control byte is not a terminal's answer: another meter's request
    heard on the shared medium); the decoder's rejects are in ``decoder``.
    """

    def __init__(self, ca: int = DEFAULT_CA,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.ca = ca
        self.meters: dict[bytes, Meter] = {}
        self._order: list[Meter] = []  # poll order: insertion (MicroPython dicts keep none)
        self.decoder = FrameDecoder(max_frame_bytes)
        self.counters = {"frames": 0, "foreign_frames": 0, "wrong_ca": 0, "not_answers": 0}

    def add(self, meter: Meter) -> None:
        if meter.ca != self.ca:
            raise ValueError(f"meter {meter.meter_id.hex()} answers to CA {meter.ca}, "
                             f"the bank to {self.ca}")
        if meter.meter_id in self.meters:
            raise ValueError(f"meter {meter.meter_id.hex()} is already on this channel")
        self.meters[meter.meter_id] = meter
        self._order.append(meter)

    def feed(self, data: bytes, now_ms: int) -> None:
        """Bytes from the channel: each answer goes to its meter; the rest is counted."""
        self._route(self.decoder.feed(data), now_ms)

    def line_idle(self, now_ms: int) -> None:
        """The channel went quiet: a frame cut off mid-way stops holding back the decoder."""
        self.decoder.line_idle()
        self._route(self.decoder.feed(b""), now_ms)

    def _route(self, frames: list[Frame], now_ms: int) -> None:
        for frame in frames:
            self.counters["frames"] += 1
            if frame.control != _ANSWER_C:
                self.counters["not_answers"] += 1
                continue
            if frame.client != self.ca:
                self.counters["wrong_ca"] += 1
                continue
            meter = self.meters.get(frame.address)
            if meter is None:
                self.counters["foreign_frames"] += 1
                continue
            meter.receive(frame, now_ms)

    def poll(self, now_ms: int) -> list[bytes]:
        """The frames due now, at most one per meter."""
        out = []
        for meter in self._order:
            frame = meter.poll(now_ms)
            if frame:
                out.append(frame)
        return out

    def next_deadline_ms(self) -> int | None:
        """The earliest time a meter has something to do, or None."""
        due = None
        for meter in self._order:
            t = meter.next_deadline_ms()
            if t is not None and (due is None or t < due):
                due = t
        return due
