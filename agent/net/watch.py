"""A supervised etcd watch over the gateway's raw stream: nothing missed, nothing silent.

etcd3gw's own watch is not used (shared/notes, pitfall 4): it drops the
server's ``canceled``/``compact_revision`` message, so a compacted watch
just goes quiet, and when its member dies the consumer's iterator blocks
forever. Instead one daemon thread POSTs ``/v3/watch`` and reads the
newline-delimited JSON stream itself:

- each event is delivered as a ``WatchEvent`` in revision order, and the
  watch remembers the revision it is complete through;
- ``canceled`` with ``compact_revision`` becomes ``WatchCompacted`` and
  delivery stops: history the consumer has not seen is gone, so it must
  resync (a range read at a known revision R) and ``restart(R + 1)``. The
  watch never resumes by itself past a compaction (etcd-io/etcd#8668);
- the stream ending, a connection error, or silence longer than
  ``silence_s`` becomes ``WatchLost`` and the thread reconnects on the next
  endpoint from the last complete revision + 1, after a backoff of 0.1 s
  doubling to 2 s. Nothing is missed or repeated, so the consumer just
  keeps consuming; ``WatchLost`` is for logs and counters.

Silence detection needs the members to send progress notifications more
often than ``silence_s``: etcd 3.4's default is every 10 minutes, so every
member runs with ``--experimental-watch-progress-notify-interval`` (1 s in
``emulator.etcd``). etcd skips a notification for an interval in which
events were sent, so quiet gaps reach twice the interval; keep
``silence_s`` above that. A notification's revision is not taken as the
watch's position: whether it can run ahead of events still in the stream
is disputed for etcd 3.4 (etcd-io/etcd#15220), and trusting it could skip
them on a reconnect. So an idle watch that reconnects after a compaction
reports ``WatchCompacted``, and the consumer resyncs: slower, never wrong.

The consumer side is non-blocking: ``fileno()`` becomes readable whenever
items are queued (for a selector loop), ``poll()`` takes them. The queue is
bounded; when it is full the thread waits (back-pressure), it never drops.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import requests
from etcd3gw.utils import _encode

from agent.net.etcd import API_PATH, kv_from_json, make_session, prefix_end, split_endpoint

QUEUE_BOUND = 65536  # items waiting for the consumer; beyond this the thread waits
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 2.0
CONNECT_TIMEOUT_S = 2.0
JOIN_TIMEOUT_S = 2.0
_CHUNK = 64 * 1024
_PUT_RECHECK_S = 0.2  # how often a thread blocked on a full queue looks for stop/restart


@dataclass(frozen=True)
class WatchEvent:
    key: bytes
    value: bytes  # b"" for a delete
    create_revision: int  # 0 for a delete
    mod_revision: int  # the revision of the change (of the delete, for a delete)
    kind: Literal["put", "delete"]


@dataclass(frozen=True)
class WatchCompacted:
    """History from the watch's position on has been compacted: resync, then ``restart``."""

    compact_revision: int


@dataclass(frozen=True)
class WatchLost:
    """The stream broke and is being re-established from the last complete revision + 1."""

    detail: str
    endpoint: str = ""


WatchItem = WatchEvent | WatchCompacted | WatchLost


class _Restarted(Exception):
    """The consumer restarted or stopped the watch while this stream was open."""


def _event(item: dict[str, Any]) -> WatchEvent:
    kv = kv_from_json(item["kv"])
    kind: Literal["put", "delete"] = "delete" if item.get("type") == "DELETE" else "put"
    return WatchEvent(kv.key, kv.value, kv.create_revision, kv.mod_revision, kind)


def _socket_of(response: requests.Response) -> socket.socket | None:
    """The socket under a streaming response (urllib3 1.26 and 2.x), to abort a blocked read."""
    raw = response.raw
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is None:
        try:
            sock = raw._fp.fp.raw._sock
        except AttributeError:
            return None
    return sock if isinstance(sock, socket.socket) else None


def _abort(response: requests.Response | None) -> None:
    """Wake a thread blocked reading ``response``.

    ``close()`` from another thread does not interrupt a blocked ``recv`` on
    Linux; ``shutdown`` does. The plain socket's shutdown is called so an
    SSLSocket keeps its state for the reader to fail cleanly.
    """
    if response is None:
        return
    sock = _socket_of(response)
    if sock is not None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class SupervisedWatch:
    """Watch every key under ``prefix`` from ``start_revision`` on (module docstring)."""

    def __init__(self, endpoints: Sequence[str], prefix: bytes, start_revision: int, *,
                 ca: str | None = None, cert: str | None = None, key: str | None = None,
                 silence_s: float = 5.0, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        if not endpoints:
            raise ValueError("SupervisedWatch needs at least one endpoint")
        for url in endpoints:
            split_endpoint(url)
        self.endpoints = [url.rstrip("/") for url in endpoints]
        self.prefix = prefix
        self._tls = {"ca": ca, "cert": cert, "key": key}
        self._timeouts = (connect_timeout_s, silence_s)
        self._queue: queue.Queue[tuple[int, WatchItem]] = queue.Queue(maxsize=QUEUE_BOUND)
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._lock = threading.Lock()  # guards everything below
        self._wake = threading.Event()  # restart or stop
        self._generation = 0  # bumped by restart; items of an older one are dropped
        self._next_revision = start_revision
        self._paused = False  # after WatchCompacted, until restart
        self._stopped = False
        self._response: requests.Response | None = None
        self._endpoint_index = 0
        self._thread: threading.Thread | None = None

    # -- consumer side -----------------------------------------------------

    @property
    def revision(self) -> int:
        """The revision of the last event delivered (start - 1 before the first)."""
        with self._lock:
            return self._next_revision - 1

    @property
    def endpoint(self) -> str:
        """The endpoint the watch is on, or will try next."""
        return self.endpoints[self._endpoint_index]

    def add_endpoint(self, url: str) -> None:
        """One more member to resume on (the list only grows; see EtcdClient.add_endpoint)."""
        split_endpoint(url)
        with self._lock:
            if url.rstrip("/") not in self.endpoints:
                self.endpoints.append(url.rstrip("/"))

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self._stopped:
                raise RuntimeError("a SupervisedWatch starts once")
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"etcd-watch {self.prefix!r}")
        self._thread.start()

    def fileno(self) -> int:
        """Readable whenever ``poll`` has something (a pipe's read end)."""
        with self._lock:
            if self._stopped:
                raise ValueError("the watch is stopped")
            return self._rfd

    def poll(self) -> list[WatchItem]:
        """What has arrived since the last call, without blocking."""
        with self._lock:
            if self._stopped:
                return []
            generation = self._generation
            try:  # drain the pipe before the queue, so no wake-up is ever lost
                while os.read(self._rfd, 4096):
                    pass
            except BlockingIOError:
                pass
        items: list[WatchItem] = []
        while True:
            try:
                item_generation, item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if item_generation == generation:
                items.append(item)

    def restart(self, from_revision: int) -> None:
        """Watch again from ``from_revision``; items still queued from before are dropped.

        After ``WatchCompacted``: read the keys at a revision R (range read,
        header revision), apply them, then ``restart(R + 1)``.
        """
        with self._lock:
            self._generation += 1
            self._next_revision = from_revision
            self._paused = False
            self._wake.set()
            response = self._response
        _abort(response)

    def stop(self) -> None:
        """Close the stream, join the thread, close the pipe; calling it again does nothing.

        A thread caught opening a connection (no response to abort yet) can
        outlive the 2 s join by up to its timeouts; it then ends without
        touching the queue or the pipe.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._wake.set()
            response, thread = self._response, self._thread
        _abort(response)
        if thread is not None:
            thread.join(JOIN_TIMEOUT_S)
        with self._lock:  # the thread writes the pipe only under the lock, if not stopped
            os.close(self._rfd)
            os.close(self._wfd)

    def __enter__(self) -> SupervisedWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the thread --------------------------------------------------------

    def _run(self) -> None:
        session = make_session(self._timeouts, **self._tls)
        backoff = BACKOFF_MIN_S
        try:
            while True:
                with self._lock:
                    self._wake.clear()
                    if self._stopped:
                        return
                    generation, start, paused = (self._generation, self._next_revision,
                                                 self._paused)
                if paused:
                    self._wake.wait()
                    continue
                endpoint = self.endpoint
                try:
                    detail, healthy = self._stream(session, endpoint, generation, start)
                    if detail is None:  # compacted: paused until restart
                        continue
                    self._deliver(generation, WatchLost(detail, endpoint))
                except _Restarted:
                    continue  # the loop's top sees a stop; a restart reconnects at once
                self._endpoint_index = (self._endpoint_index + 1) % len(self.endpoints)
                backoff = BACKOFF_MIN_S if healthy else min(backoff * 2, BACKOFF_MAX_S)
                self._wake.wait(backoff)  # a restart or stop cuts it short
        finally:
            session.close()

    def _stream(self, session: requests.Session, endpoint: str, generation: int,
                start: int) -> tuple[str | None, bool]:
        """Read one stream until it breaks: (why, whether it had worked), or (None, _) if compacted.

        Raises ``_Restarted`` when the consumer restarted or stopped the watch.
        """
        request = {"create_request": {
            "key": _encode(self.prefix), "range_end": _encode(prefix_end(self.prefix)),
            "start_revision": start, "progress_notify": True}}
        url = endpoint + API_PATH + "watch"
        try:
            response = session.post(url, json=request, stream=True)
        except (OSError, ValueError) as exc:  # requests.RequestException is an OSError
            self._check(generation)
            return f"cannot open the stream: {exc}", False
        created = False
        try:
            with self._lock:
                self._response = response
            self._check(generation)
            if response.status_code != requests.codes.ok:
                return f"HTTP {response.status_code}: {response.text[:200]}", False
            buffer = bytearray()
            for chunk in response.iter_content(chunk_size=_CHUNK):
                buffer += chunk
                while (end := buffer.find(b"\n")) >= 0:
                    line = bytes(buffer[:end]).strip()
                    del buffer[:end + 1]
                    if not line:  # Launchpad #2072492: the gateway may send blank lines
                        continue
                    outcome = self._handle(json.loads(line), generation)
                    if outcome == "created":
                        created = True
                    elif outcome is not None:
                        return (None if outcome == "compacted" else outcome), created
            self._check(generation)
            return "the stream ended", created
        except (OSError, ValueError) as exc:
            # requests' ConnectionError (read timeout: silence) and
            # ChunkedEncodingError are OSErrors; a garbled line is a ValueError
            self._check(generation)
            if isinstance(exc, requests.exceptions.ConnectionError) and "timed out" in str(exc):
                return f"silent for more than {self._timeouts[1]} s", created
            return f"{type(exc).__name__}: {exc}", created
        finally:
            with self._lock:
                self._response = None
            response.close()

    def _handle(self, message: dict[str, Any], generation: int) -> str | None:
        """Deliver one gateway message; "created", "compacted", a reason to reconnect, or None."""
        if "error" in message:  # the gateway's stream error: {"error": {"message": ...}}
            error = message["error"]
            detail = error.get("message", error) if isinstance(error, dict) else error
            return f"stream error: {detail}"
        result = message.get("result", {})
        if result.get("canceled"):
            compact = int(result.get("compact_revision", 0))
            if not compact:
                return f"canceled by the server: {result.get('cancel_reason', 'no reason given')}"
            self._deliver(generation, WatchCompacted(compact))
            with self._lock:
                if self._generation == generation:
                    self._paused = True
            return "compacted"
        events = result.get("events", [])
        with self._lock:
            floor = self._next_revision
        for item in events:
            event = _event(item)
            if event.mod_revision < floor:  # already delivered (cannot happen; never repeat)
                continue
            # The position moves before the event is queued, so a caller that has polled
            # an event never reads an older ``revision``. Nothing is lost by it: only this
            # thread reconnects from the position, and it queues the event first.
            with self._lock:
                if self._generation == generation and event.mod_revision >= self._next_revision:
                    self._next_revision = event.mod_revision + 1
            self._deliver(generation, event)
        # A progress notification (no events) only proves the stream is alive:
        # its revision does not move the position (module docstring).
        return "created" if result.get("created") else None

    def _deliver(self, generation: int, item: WatchItem) -> None:
        """Queue ``item`` (waiting while the queue is full), then make the pipe readable."""
        while True:
            self._check(generation)
            try:
                self._queue.put((generation, item), timeout=_PUT_RECHECK_S)
                break
            except queue.Full:
                continue
        with self._lock:
            if self._stopped:
                return
            with contextlib.suppress(BlockingIOError):  # full: it is readable already
                os.write(self._wfd, b"\0")

    def _check(self, generation: int) -> None:
        with self._lock:
            if self._stopped or self._generation != generation:
                raise _Restarted
