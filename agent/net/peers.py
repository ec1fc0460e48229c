"""TLS connections between terminals, driven by the agent's one selector loop (hal/pump.py).

Every socket here is non-blocking and joins the pump with ``add_fd``; the
callbacks connect, handshake, read and write only what the kernel has ready,
so a slow or hostile peer can hold up nothing but its own connection. There
are no threads. The pump has no timers for descriptors, so the owner calls
``tick()`` from its loop (as the agent's loop ticks every TICK_S) and may
size its ``run_once`` timeout with ``next_deadline()``; pings, dead-peer
detection, connect and handshake timeouts (``dead_after_s``) and re-dials
happen there.

Trust: TLS 1.2 at least (1.3 when both ends have it), a certificate required
both ways and checked against the fleet CA alone; never the system store,
which would let any public CA vouch for a "terminal". A certificate's CN is
its terminal id. A connection carries application messages only once the
peer is authenticated: its Hello names the CN of its certificate, our fleet,
and a terminal ``is_member`` says is active (a retired terminal's
certificate stays valid for years, so the chain's membership decides). Any
refusal closes the connection and counts ``refused.<reason>``.

Connection rule (one connection per pair, the lower id's dial wins):

- A terminal dials a peer when it has something to send and no connection
  to it, whichever id is lower: waiting for the other end to call would leave
  a higher id's traffic stuck behind a lower id with nothing to say.
- The dialler sends its Hello first; the acceptor answers with its own Hello
  only once it has accepted, and the dialler sends nothing else until that
  answer. So no application frame is ever written on a connection that is
  then refused, and a refused dial loses nothing (the queue waits for the
  next one).
- An acceptor that authenticates a dial from P while it already has a
  connection to P: if that connection is its own dial (under way or open)
  and its id is the lower, it refuses the new one (``refused.duplicate``); otherwise the new one
  replaces the old (``closed.replaced``): the dialler re-dialled because it
  lost the old one, or the lower id dialled over the higher's own dial.
  Both ends apply the same rule, so a simultaneous dial leaves exactly the
  lower id's connection.

Queues: ``send`` encodes at once (a bad message is the caller's bug, raised
there) and queues the payload for the peer; frames are numbered when they go
onto a connection, 64 KiB at a time, so a connection that dies loses only
what was already handed to it (``dropped.connection_lost``) and the rest goes
out on the next one. A peer's queue (waiting plus handed over, unwritten) is
capped at ``max_queue_bytes``: past it ``send`` returns False and counts
``dropped.queue_full``; the caller's own retries (a KeyHandover is resent
until its KeyAck) cover what a full queue or a lost connection drops.

Liveness: each end pings at connection and every ``idle_ping_s`` after, the
Ping jumping the queue (so a long backlog neither looks like a dead peer nor
hides the RTT, which ``stats`` reports for the router); a connection silent for
``dead_after_s`` is closed (``closed.dead``) and re-dialled when there is
something to send. Ping and Pong are handled here; every other message, and
the peer's Hello once it is authenticated (its boot nonce says whether the
peer restarted), goes to ``on_message(peer_id, message)``. That callback runs
inside the pump's; an exception from it is the caller's bug and propagates.

Emulated WAN links (``link_rate_bps``, ``link_buffer_bytes``): on loopback every
connection is as fast as memory, so no queue ever forms and no router choice
matters. With a rate set, each peer connection is a link of that many bit/s
in each direction: a token bucket (a burst of ``SHAPING_BURST_S`` of the
rate, at least one write chunk) meters what is written to the socket, the
rest waits in the peer's queue, and a message that finds more than
``link_buffer_bytes`` already waiting is dropped (``dropped.link_buffer``),
as a forwarding queue of M packets drops arrivals when full (eq. 6). One
message larger than the buffer is still taken when the queue is empty (a
block is one message; the paper's 360-byte packets are its pieces). The
wait for tokens is a deadline of ``next_deadline``, so the owner's loop
wakes when the link may send again.

``addresses`` hold numeric IPs (a name would need a DNS lookup, which
blocks); the mapping is read at each dial, so its owner may keep it current
as terminals join.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from agent.net.wire import (
    BOOT_NONCE_LEN,
    HEADER_LEN,
    U64_MAX,
    FrameDecoder,
    FrameEncoder,
    Hello,
    Message,
    MsgType,
    Ping,
    Pong,
    WireError,
    encode_message,
)
from hal.ids import require_terminal_id
from hal.pump import Pump, PumpError

log = logging.getLogger("edgekey.net.peers")

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE

DEFAULT_MAX_QUEUE_BYTES = 4 * 1024 * 1024
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
READ_CHUNK = 64 * 1024
READ_BUDGET = 512 * 1024  # per callback, so one busy peer cannot starve the loop
WRITE_CHUNK = 16 * 1024  # one TLS record
FILL_BYTES = 64 * 1024  # framed ahead of the socket; the rest waits unnumbered in the queue
SHAPING_BURST_S = 0.02  # an emulated link may write this much of its rate at once
ACCEPTS_PER_CALL = 16
MAX_UNAUTHENTICATED = 32  # inbound connections still in handshake or Hello
LISTEN_BACKLOG = 64

Address = tuple[str, int]
Clock = Callable[[], float]
OnMessage = Callable[[str, Message], None]

_CONNECTING, _HANDSHAKE, _HELLO, _OPEN = "connecting", "handshake", "hello", "open"
_CONTROL = frozenset({MsgType.HELLO, MsgType.PING, MsgType.PONG})  # the transport's own


def tls_contexts(ca_path: str | Path, cert_path: str | Path,
                 key_path: str | Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts trusting the fleet CA at ``ca_path`` only.

    Both require the peer's certificate; the client also checks the server's
    against the address it dialled (terminal certificates carry IP SANs).
    Neither consults the system store or SSL_CERT_FILE-style variables:
    ``SSLContext()`` loads no default paths unless asked to.
    """
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        # TLS 1.2 suites: forward secrecy and AEAD only (1.3's are all of that)
        ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        ctx.load_verify_locations(cafile=str(ca_path))
        ctx.load_cert_chain(str(cert_path), str(key_path))
    client.check_hostname = True
    return server, client


def peer_cn(sock: ssl.SSLSocket) -> str | None:
    cert = sock.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    fd: int
    outbound: bool
    started: float
    address: Address | None  # dialled (outbound) or calling from (inbound)
    peer_id: str | None  # the one dialled (outbound), or the authenticated one
    state: str
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    encoder: FrameEncoder = field(default_factory=FrameEncoder)
    outbuf: bytearray = field(default_factory=bytearray)
    inflight: deque[list[int]] = field(default_factory=deque)  # [unwritten bytes, type]
    retry_len: int = 0  # OpenSSL wants a write retried with the same length
    hs_want: int = READ
    read_wants_write: bool = False
    write_wants_read: bool = False
    mask: int = 0
    cn: str | None = None
    last_rx: float = 0.0
    last_ping: float = 0.0
    closed: bool = False


@dataclass(eq=False)
class _Peer:
    peer_id: str
    conn: _Conn | None = None
    pending: deque[tuple[MsgType, bytes]] = field(default_factory=deque)
    urgent: deque[tuple[MsgType, bytes]] = field(default_factory=deque)
    pending_bytes: int = 0
    backoff: float = BACKOFF_MIN_S
    next_dial_at: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0
    dropped: int = 0
    connects: int = 0
    rtt_s: float | None = None
    boot_nonce: bytes | None = None
    ping_nonce: int | None = None
    ping_sent_at: float = 0.0
    failures: int = 0  # dials that failed, connections found dead or broken
    tokens: float = 0.0  # bytes the emulated link may write now
    token_at: float = 0.0
    throttled: bool = False  # waiting for tokens: WRITE not wanted until then

    def queue_bytes(self) -> int:
        held = len(self.conn.outbuf) if self.conn is not None else 0
        return self.pending_bytes + held

    def is_open(self) -> bool:
        return self.conn is not None and self.conn.state == _OPEN


class PeerNet:
    """This terminal's TLS links to its peers; see the module docstring."""

    def __init__(self, pump: Pump, self_id: str, fleet: str, server_ctx: ssl.SSLContext,
                 client_ctx: ssl.SSLContext, listen: Address, addresses: Mapping[str, Address],
                 *, is_member: Callable[[str], bool], on_message: OnMessage,
                 clock: Clock = time.monotonic,
                 max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
                 idle_ping_s: float = 5.0, dead_after_s: float = 15.0,
                 link_rate_bps: float | None = None, link_buffer_bytes: int | None = None) -> None:
        require_terminal_id(self_id)
        if not 0 < idle_ping_s < dead_after_s:
            raise ValueError("need 0 < idle_ping_s < dead_after_s")
        self.pump = pump
        self.self_id = self_id
        self.fleet = fleet
        self.server_ctx = server_ctx
        self.client_ctx = client_ctx
        self.is_member = is_member
        self.on_message = on_message
        self.clock = clock
        self.max_queue_bytes = max_queue_bytes
        self.idle_ping_s = idle_ping_s
        self.dead_after_s = dead_after_s
        if link_rate_bps is not None and not link_rate_bps > 0:
            raise ValueError(f"link_rate_bps must be > 0, got {link_rate_bps!r}")
        self.link_rate = None if link_rate_bps is None else link_rate_bps / 8.0  # bytes/s
        self.link_burst = 0.0 if self.link_rate is None else max(
            float(WRITE_CHUNK), self.link_rate * SHAPING_BURST_S)
        self.link_buffer_bytes = link_buffer_bytes
        self.boot_nonce = os.urandom(BOOT_NONCE_LEN)
        self._hello = encode_message(Hello(self_id, self.boot_nonce, fleet))
        self.counters: Counter[str] = Counter()
        self._addresses = addresses
        self._peers: dict[str, _Peer] = {}
        self._unauthenticated: set[_Conn] = set()
        self._ping_seq = int.from_bytes(os.urandom(8), "big") >> 1
        self._closed = False
        self._listener = self._listen(listen)
        self.port: int = self._listener.getsockname()[1]
        pump.add_fd(self._listener, READ, self._on_accept)

    # ------------------------------------------------------------------ public

    def send(self, peer_id: str, message: Message) -> bool:
        """Queue ``message`` for ``peer_id`` (dialling it if need be); False when dropped."""
        payload = encode_message(message)  # WireValueError: the caller built it wrong
        if self._closed:
            return self._drop(None, "closed")
        if peer_id == self.self_id:
            return self._drop(None, "self")
        peer = self._peer(peer_id)
        if peer is None:
            return self._drop(None, "unknown_peer")
        if not self.is_member(peer_id):
            return self._drop(peer, "not_member")
        size = HEADER_LEN + len(payload)
        if peer.queue_bytes() + size > self.max_queue_bytes:
            return self._drop(peer, "queue_full")
        if self.link_buffer_bytes is not None and peer.pending_bytes > 0 and \
                peer.pending_bytes + size > self.link_buffer_bytes:
            return self._drop(peer, "link_buffer")
        peer.pending.append((message.TYPE, payload))
        peer.pending_bytes += size
        now = self.clock()
        if peer.conn is None:
            if now >= peer.next_dial_at:
                self._dial(peer, now)
        elif peer.conn.state == _OPEN:
            self._watch(peer.conn)
        return True

    def tick(self) -> None:
        """Timers: pings, dead and stalled connections, re-dials of queued peers."""
        if self._closed:
            return
        now = self.clock()
        for conn in list(self._unauthenticated):
            if now - conn.started >= self.dead_after_s:
                self._close(conn, "timeout", now)
        for peer in list(self._peers.values()):
            conn = peer.conn
            if conn is not None and conn.state != _OPEN:
                if now - conn.started >= self.dead_after_s:
                    self._close(conn, "timeout", now)
            elif conn is not None:
                if not self.is_member(peer.peer_id):
                    self._refuse(conn, "not_member", "no longer an active terminal", now)
                elif now - conn.last_rx >= self.dead_after_s:
                    self._close(conn, "dead", now)
                elif now - conn.last_ping >= self.idle_ping_s:
                    self._ping(peer, conn, now)
            if (peer.conn is None and peer.pending and now >= peer.next_dial_at
                    and peer.peer_id in self._addresses and self.is_member(peer.peer_id)):
                self._dial(peer, now)
            if peer.throttled and peer.conn is not None and not peer.conn.closed:
                self._refill(peer, now)
                if peer.tokens >= min(self.link_burst, WRITE_CHUNK):
                    peer.throttled = False
                    self._watch(peer.conn)

    def next_deadline(self) -> float | None:
        """When ``tick`` next has something to do (clock time), or None."""
        times: list[float] = []
        for conn in self._unauthenticated:
            times.append(conn.started + self.dead_after_s)
        for peer in self._peers.values():
            conn = peer.conn
            if conn is None:
                if peer.pending and peer.peer_id in self._addresses:
                    times.append(peer.next_dial_at)
            elif conn.state != _OPEN:
                times.append(conn.started + self.dead_after_s)
            else:
                times.append(conn.last_rx + self.dead_after_s)
                times.append(conn.last_ping + self.idle_ping_s)
                if peer.throttled and self.link_rate:
                    need = min(self.link_burst, WRITE_CHUNK) - peer.tokens
                    times.append(peer.token_at + max(0.0, need) / self.link_rate)
        return min(times) if times else None

    def stats(self, peer_id: str) -> dict[str, object]:
        """What the router reads about ``peer_id`` (KeyError for a peer never known)."""
        peer = self._peer(peer_id)
        if peer is None:
            raise KeyError(peer_id)
        conn = peer.conn
        tls = conn.sock.version() if conn is not None and isinstance(conn.sock, ssl.SSLSocket) \
            and conn.state in (_HELLO, _OPEN) else None
        return {
            "connected": peer.is_open(),
            "tls": tls,
            "state": conn.state if conn is not None else "idle",
            "direction": None if conn is None else ("out" if conn.outbound else "in"),
            "bytes_in": peer.bytes_in,
            "bytes_out": peer.bytes_out,
            "messages_in": peer.messages_in,
            "messages_out": peer.messages_out,
            "queue_bytes": peer.queue_bytes(),
            "queued_messages": len(peer.pending) + (
                sum(1 for f in conn.inflight if f[1] not in _CONTROL) if conn else 0),
            "dropped": peer.dropped,
            "failures": peer.failures,
            "connects": peer.connects,
            "rtt_s": peer.rtt_s,
            "boot_nonce": peer.boot_nonce,
        }

    def peers(self) -> tuple[str, ...]:
        """Every peer known here: the configured ones and any authenticated caller."""
        known = dict.fromkeys(p for p in self._addresses if p != self.self_id)
        known.update(dict.fromkeys(self._peers))
        return tuple(known)

    def connected(self) -> tuple[str, ...]:
        """Peers with an authenticated connection now."""
        return tuple(p.peer_id for p in self._peers.values() if p.is_open())

    def connection_fileno(self, peer_id: str) -> int | None:
        """The socket descriptor of ``peer_id``'s connection (diagnostics), or None."""
        peer = self._peers.get(peer_id)
        return peer.conn.fd if peer is not None and peer.conn is not None else None

    def close(self) -> None:
        """Close every connection and the listener, and leave the pump; idempotent."""
        if self._closed:
            return
        now = self.clock()
        for conn in list(self._unauthenticated):
            self._close(conn, "local", now)
        for peer in self._peers.values():
            if peer.conn is not None:
                self._close(peer.conn, "local", now)
        self._closed = True
        self._forget(self._listener)
        self._listener.close()

    # ------------------------------------------------------------ connections

    def _peer(self, peer_id: str) -> _Peer | None:
        """The record of a configured or already authenticated peer (made on first use)."""
        peer = self._peers.get(peer_id)
        if peer is None and peer_id in self._addresses and peer_id != self.self_id:
            require_terminal_id(peer_id)
            peer = self._peers[peer_id] = _Peer(peer_id)
        return peer

    def _listen(self, address: Address) -> socket.socket:
        info = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM,
                                  flags=socket.AI_NUMERICHOST | socket.AI_PASSIVE)
        family, kind, proto, _, sockaddr = info[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            raise
        return sock

    def _on_accept(self, mask: int) -> None:
        now = self.clock()
        for _ in range(ACCEPTS_PER_CALL):
            try:
                raw, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # EMFILE and the like: try again on the next readiness
                self.counters["accept_failed"] += 1
                log.warning("accept failed: %s", exc)
                break
            if len(self._unauthenticated) >= MAX_UNAUTHENTICATED:
                raw.close()
                self._count_refusal("too_many_pending", None, f"from {address}")
                continue
            self.counters["accepts"] += 1
            try:
                raw.setblocking(False)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = self.server_ctx.wrap_socket(raw, server_side=True,
                                                   do_handshake_on_connect=False)
            except (OSError, ValueError) as exc:
                raw.close()
                self._count_refusal("handshake", None, str(exc))
                continue
            conn = _Conn(sock, sock.fileno(), False, now, (str(address[0]), int(address[1])),
                         None, _HANDSHAKE, last_rx=now, last_ping=now)
            self._unauthenticated.add(conn)
            self._register(conn, READ)
            self._handshake(conn, now)

    def _dial(self, peer: _Peer, now: float) -> None:
        address = self._addresses.get(peer.peer_id)
        if address is None:
            return  # not dialable (an inbound-only caller): its queue waits for its call
        host, port = str(address[0]), int(address[1])
        self.counters["dials"] += 1
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                      flags=socket.AI_NUMERICHOST)
        except socket.gaierror as exc:
            self._dial_failed(peer, now, f"address {host!r}: {exc}")
            return
        family, kind, proto, _, sockaddr = info[0]
        raw = socket.socket(family, kind, proto)
        try:
            raw.setblocking(False)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rc = raw.connect_ex(sockaddr)
        except OSError as exc:
            raw.close()
            self._dial_failed(peer, now, str(exc))
            return
        if rc not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            raw.close()
            self._dial_failed(peer, now, os.strerror(rc))
            return
        conn = _Conn(raw, raw.fileno(), True, now, (host, port), peer.peer_id, _CONNECTING,
                     last_rx=now, last_ping=now)
        peer.conn = conn
        self._register(conn, WRITE)

    def _dial_failed(self, peer: _Peer, now: float, detail: str) -> None:
        self.counters["closed.dial_failed"] += 1
        peer.failures += 1
        log.info("dial to %s failed: %s", peer.peer_id, detail)
        self._back_off(peer, now)

    def _back_off(self, peer: _Peer, now: float) -> None:
        peer.next_dial_at = now + peer.backoff
        peer.backoff = min(peer.backoff * 2, BACKOFF_MAX_S)

    def _on_ready(self, conn: _Conn, mask: int) -> None:
        if conn.closed:
            return
        now = self.clock()
        if conn.state == _CONNECTING:
            self._connected(conn, now)
        elif conn.state == _HANDSHAKE:
            self._handshake(conn, now)
        else:
            if mask & READ or (mask & WRITE and conn.read_wants_write):
                self._read(conn, now)
            if not conn.closed:
                self._flush(conn, now)
        if not conn.closed:
            self._watch(conn)

    def _connected(self, conn: _Conn, now: float) -> None:
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._close(conn, "dial_failed", now, detail=os.strerror(err))
            return
        assert conn.address is not None
        try:
            conn.sock = self.client_ctx.wrap_socket(conn.sock, server_hostname=conn.address[0],
                                                    do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            self._refuse(conn, "handshake", str(exc), now)
            return
        conn.state = _HANDSHAKE
        self._handshake(conn, now)

    def _handshake(self, conn: _Conn, now: float) -> None:
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            conn.hs_want = READ
            self._watch(conn)
            return
        except ssl.SSLWantWriteError:
            conn.hs_want = WRITE
            self._watch(conn)
            return
        except ssl.SSLCertVerificationError as exc:
            self._refuse(conn, "certificate", exc.verify_message or str(exc), now)
            return
        except (ssl.SSLError, OSError) as exc:
            self._refuse(conn, "handshake", str(exc), now)
            return
        conn.cn = peer_cn(sock)
        if conn.cn is None:
            self._refuse(conn, "no_cn", "the certificate names no terminal", now)
            return
        conn.state = _HELLO
        conn.last_rx = now
        if conn.outbound:
            self._put_frame(conn, MsgType.HELLO, self._hello)
            self._flush(conn, now)
        if not conn.closed:
            self._read(conn, now)  # the peer's first frame may already be in
        if not conn.closed:
            self._watch(conn)

    def _read(self, conn: _Conn, now: float) -> None:
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        budget = READ_BUDGET
        while budget > 0 or sock.pending():  # OpenSSL may hold decrypted bytes select can't see
            try:
                data = sock.recv(max(READ_CHUNK, sock.pending()))
            except ssl.SSLWantReadError:
                conn.read_wants_write = False
                break
            except ssl.SSLWantWriteError:
                conn.read_wants_write = True
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # with or without close_notify
                self._close(conn, "eof", now)
                return
            except ssl.SSLCertVerificationError as exc:
                self._refuse(conn, "certificate", exc.verify_message or str(exc), now)
                return
            except ssl.SSLError as exc:  # an alert, e.g. the peer refused our certificate
                self._refuse(conn, "tls", str(exc), now)
                return
            except OSError as exc:
                self._close(conn, "error", now, detail=str(exc))
                return
            if not data:
                self._close(conn, "eof", now)
                return
            conn.read_wants_write = False
            budget -= len(data)
            conn.last_rx = now
            self.counters["bytes_in"] += len(data)
            peer = self._peers.get(conn.peer_id) if conn.state == _OPEN and conn.peer_id else None
            if peer is not None:
                peer.bytes_in += len(data)
            try:
                messages = conn.decoder.feed(data)
                error = None
            except WireError as exc:
                messages, error = list(exc.messages), exc
            for message in messages:
                self._handle(conn, message, now)
                if conn.closed:
                    return
            if error is not None:
                self._refuse(conn, str(error.reason), error.detail, now)
                return

    def _handle(self, conn: _Conn, message: Message, now: float) -> None:
        if conn.state != _OPEN:
            if not isinstance(message, Hello):
                self._refuse(conn, "hello_expected", f"got {message.TYPE.label} first", now)
            else:
                self._authenticate(conn, message, now)
            return
        assert conn.peer_id is not None
        peer = self._peers[conn.peer_id]
        self.counters[f"received.{message.TYPE.label}"] += 1
        if message.TYPE not in _CONTROL:
            peer.messages_in += 1
        if isinstance(message, Hello):
            self._refuse(conn, "duplicate_hello", "a second Hello", now)
        elif isinstance(message, Ping):
            self._enqueue_urgent(peer, Pong(message.nonce))
        elif isinstance(message, Pong):
            if message.nonce == peer.ping_nonce:
                peer.rtt_s = now - peer.ping_sent_at
                peer.ping_nonce = None
        else:
            self.on_message(conn.peer_id, message)

    def _authenticate(self, conn: _Conn, hello: Hello, now: float) -> None:
        tid = hello.terminal_id
        if conn.cn != tid:
            self._refuse(conn, "cn_mismatch", f"Hello says {tid!r}, certificate {conn.cn!r}",
                         now)
            return
        if hello.fleet != self.fleet:
            self._refuse(conn, "wrong_fleet", f"{tid!r} is of fleet {hello.fleet!r}", now)
            return
        if tid == self.self_id:
            self._refuse(conn, "self", "a connection to ourselves", now)
            return
        if conn.outbound and tid != conn.peer_id:
            self._refuse(conn, "unexpected_peer", f"dialled {conn.peer_id!r}, reached {tid!r}",
                         now)
            return
        if not self.is_member(tid):
            self._refuse(conn, "not_member", f"{tid!r} is not an active terminal", now)
            return
        peer = self._peer(tid)
        if not conn.outbound:
            if peer is not None and peer.conn is not None and peer.conn is not conn:
                if peer.conn.outbound and self.self_id < tid:
                    self._refuse(conn, "duplicate", f"our own dial to {tid!r} wins", now)
                    return
                self._close(peer.conn, "replaced", now)
            if peer is None:
                peer = self._peers[tid] = _Peer(tid)
            self._unauthenticated.discard(conn)
            conn.peer_id = tid
            peer.conn = conn
            self._put_frame(conn, MsgType.HELLO, self._hello)
        assert peer is not None
        conn.state = _OPEN
        peer.boot_nonce = hello.boot_nonce
        peer.connects += 1
        peer.backoff = BACKOFF_MIN_S
        peer.next_dial_at = now
        peer.ping_nonce = None
        self.counters["connected"] += 1
        log.info("peer %s up (%s)", tid, "dialled" if conn.outbound else "accepted")
        self._ping(peer, conn, now)  # an RTT for the router from the start
        self.on_message(tid, hello)
        if not conn.closed:
            self._flush(conn, now)

    # ------------------------------------------------------------------ writing

    def _put_frame(self, conn: _Conn, msg_type: MsgType, payload: bytes) -> None:
        frame = conn.encoder.frame(msg_type, payload)
        conn.outbuf += frame
        conn.inflight.append([len(frame), msg_type])

    def _fill(self, conn: _Conn, peer: _Peer) -> None:
        """Number and frame queued messages, urgent first, up to FILL_BYTES ahead."""
        while peer.urgent and len(conn.outbuf) < FILL_BYTES:
            msg_type, payload = peer.urgent.popleft()
            self._put_frame(conn, msg_type, payload)
        while peer.pending and len(conn.outbuf) < FILL_BYTES:
            msg_type, payload = peer.pending.popleft()
            peer.pending_bytes -= HEADER_LEN + len(payload)
            self._put_frame(conn, msg_type, payload)

    def _flush(self, conn: _Conn, now: float) -> None:
        sock = conn.sock
        peer = self._peers.get(conn.peer_id) if conn.state == _OPEN and conn.peer_id else None
        while True:
            if peer is not None and len(conn.outbuf) < FILL_BYTES:
                self._fill(conn, peer)
            if not conn.outbuf:
                break
            n = conn.retry_len or min(len(conn.outbuf), WRITE_CHUNK)
            if peer is not None and self.link_rate is not None and not conn.retry_len:
                self._refill(peer, now)
                n = min(n, int(peer.tokens))
                if n <= 0:  # the emulated link is busy: tick re-watches when it may send
                    peer.throttled = True
                    self._watch(conn)
                    break
            try:
                sent = sock.send(bytes(conn.outbuf[:n]))
            except ssl.SSLWantWriteError:
                conn.retry_len, conn.write_wants_read = n, False
                break
            except ssl.SSLWantReadError:  # TLS needs the peer's bytes first (a key update)
                conn.retry_len, conn.write_wants_read = n, True
                break
            except BlockingIOError:
                conn.retry_len = 0
                break
            except (ssl.SSLError, OSError) as exc:
                self._close(conn, "error", now, detail=f"write: {exc}")
                return
            conn.retry_len, conn.write_wants_read = 0, False
            del conn.outbuf[:sent]
            self.counters["bytes_out"] += sent
            if peer is not None:
                peer.bytes_out += sent
                if self.link_rate is not None:
                    peer.tokens -= sent
            self._written(conn, peer, sent)

    def _written(self, conn: _Conn, peer: _Peer | None, n: int) -> None:
        while n and conn.inflight:
            head = conn.inflight[0]
            step = min(n, head[0])
            head[0] -= step
            n -= step
            if head[0] == 0:
                conn.inflight.popleft()
                msg_type = MsgType(head[1])
                self.counters[f"sent.{msg_type.label}"] += 1
                if peer is not None and msg_type not in _CONTROL:
                    peer.messages_out += 1

    def _refill(self, peer: _Peer, now: float) -> None:
        assert self.link_rate is not None
        peer.tokens = min(self.link_burst,
                          peer.tokens + max(0.0, now - peer.token_at) * self.link_rate)
        peer.token_at = now

    def _enqueue_urgent(self, peer: _Peer, message: Message) -> None:
        peer.urgent.append((message.TYPE, encode_message(message)))
        if peer.conn is not None:
            self._watch(peer.conn)

    def _ping(self, peer: _Peer, conn: _Conn, now: float) -> None:
        self._ping_seq = (self._ping_seq + 1) & U64_MAX
        peer.ping_nonce = self._ping_seq
        peer.ping_sent_at = now
        conn.last_ping = now
        self._enqueue_urgent(peer, Ping(self._ping_seq))

    # -------------------------------------------------------------- registration

    def _wanted(self, conn: _Conn) -> int:
        if conn.state == _CONNECTING:
            return WRITE
        if conn.state == _HANDSHAKE:
            return conn.hs_want
        mask = READ
        has_output = bool(conn.outbuf or conn.retry_len)
        if conn.state == _OPEN and conn.peer_id is not None:
            peer = self._peers[conn.peer_id]
            has_output = has_output or bool(peer.pending or peer.urgent)
            if peer.throttled:
                has_output = False
        if (has_output and not conn.write_wants_read) or conn.read_wants_write:
            mask |= WRITE
        return mask

    def _register(self, conn: _Conn, mask: int) -> None:
        self.pump.add_fd(conn.fd, mask, partial(self._on_ready, conn))
        conn.mask = mask

    def _watch(self, conn: _Conn) -> None:
        if conn.closed:
            return
        mask = self._wanted(conn)
        if mask != conn.mask:
            self.pump.modify_fd(conn.fd, mask, partial(self._on_ready, conn))
            conn.mask = mask

    def _forget(self, fileobj: object) -> None:
        with contextlib.suppress(PumpError):  # not watched, or the pump was closed first
            self.pump.remove_fd(fileobj)

    # ----------------------------------------------------------------- closing

    def _drop(self, peer: _Peer | None, why: str) -> bool:
        self.counters[f"dropped.{why}"] += 1
        if peer is not None:
            peer.dropped += 1
        return False

    def _count_refusal(self, reason: str, conn: _Conn | None, detail: str) -> None:
        self.counters[f"refused.{reason}"] += 1
        who = "?" if conn is None else (conn.peer_id or conn.cn or
                                        (f"{conn.address[0]}:{conn.address[1]}"
                                         if conn.address else "?"))
        level = logging.INFO if reason == "duplicate" else logging.WARNING  # routine: a race
        log.log(level, "refused connection %s %s: %s: %s",
                "to" if conn is not None and conn.outbound else "from", who, reason, detail)

    def _refuse(self, conn: _Conn, reason: str, detail: str, now: float) -> None:
        self._count_refusal(reason, conn, detail)
        self._close(conn, None, now)

    def _close(self, conn: _Conn, reason: str | None, now: float, *, detail: str = "") -> None:
        """Close ``conn``; ``reason`` None: already counted as a refusal."""
        if conn.closed:
            return
        conn.closed = True
        if reason is not None:
            self.counters[f"closed.{reason}"] += 1
            if reason not in ("local", "replaced"):
                log.info("connection %s %s closed: %s%s", "to" if conn.outbound else "from",
                         conn.peer_id or "?", reason, f": {detail}" if detail else "")
        self._forget(conn.fd)
        conn.sock.close()
        self._unauthenticated.discard(conn)
        peer = self._peers.get(conn.peer_id) if conn.peer_id is not None else None
        if peer is None or peer.conn is not conn:
            return
        peer.conn = None
        peer.throttled = False
        if reason in ("dead", "timeout", "error") or conn.state != _OPEN:
            peer.failures += 1
        lost = sum(1 for f in conn.inflight if f[1] not in _CONTROL)
        if lost:
            self.counters["dropped.connection_lost"] += lost
            peer.dropped += lost
        peer.urgent.clear()  # pings and pongs belong to the connection that asked
        peer.ping_nonce = None
        if conn.state != _OPEN:
            self._back_off(peer, now)  # the dial failed or was refused: wait before the next


__all__ = [
    "BACKOFF_MAX_S",
    "BACKOFF_MIN_S",
    "DEFAULT_MAX_QUEUE_BYTES",
    "PeerNet",
    "tls_contexts",
]
