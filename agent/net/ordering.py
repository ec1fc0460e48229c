"""The etcd ordering: one elected proposer, candidates in etcd's order, every terminal judging.

Keys under ``/edgekey/<fleet>/``:

    proposer                          the elected proposer's terminal id, under its lease
    chain/<height, 16 hex>/<name>     a candidate block (``encode_block``), created once
    provisioning/<issued>/<part>      the utility's provisioning updates (agent/net/provfeed.py)
    links/<terminal>                  a terminal's measured WAN links, for the others' routers
                                      (agent/routing/fleet.py; advisory, never a safety input)

**One proposer, no race.** Terminals campaign for ``proposer`` with a
compare-and-swap on its create revision under a lease (``lease_ttl_s``,
kept alive by this module's worker); the holder batches every terminal's
forwarded operations into its blocks (agent/node/core.py), the others
forward. Its writes are fenced by the create revision of its own
``proposer`` key, so a deposed proposer (lease expired while it stalled)
cannot write any more: its submission fails and its round is retried under
the new one. Endorsement rounds are never lost to a race for the head,
which a race of 13 terminals through 4-5 ms compare-and-swaps would make
the common case under load.

**Safety does not rest on the election.** Every candidate for a height is
kept, in etcd's revision order, and every terminal applies the same rule:
the block at height h is the *first* candidate at h, in revision order,
that passes ``validate_block`` on the chain at h-1 (signatures, a majority
of endorsements of the membership in force, the lifecycle rules). All
honest terminals see the same candidates in the same order and judge them
by the same pure rules, so they agree; a terminal that writes a forged or
unendorsed block straight into etcd takes one revision and is refused by
everyone: it can delay, never forge, and never block a height.

**I/O.** etcd3gw is synchronous, so a worker thread makes every call
(submissions, the campaign and its keepalive, resync reads) and the
supervised watch (``agent/net/watch.py``) reads the stream in its own. The
agent's loop only waits on ``fileno()`` and takes ``poll()``: candidates,
proposer changes and submission results, never blocking on etcd.

**Resync.** ``start(next_height)`` reads every candidate from that height
at one revision R (paged), then watches from R+1. A compacted or lost watch
resyncs the same way from the height the runtime has reached (``applied``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from agent.net.etcd import EtcdClient, EtcdError, prefix_end
from agent.net.provfeed import feed_prefix
from agent.net.watch import SupervisedWatch, WatchCompacted, WatchEvent, WatchLost

log = logging.getLogger("edgekey.ordering")

LEASE_TTL_S = 3  # a dead proposer is replaced within about this
PAGE = 256  # candidates per resync read
MAX_JOBS = 1024
HEIGHT_DIGITS = 16


@dataclass(frozen=True, slots=True)
class Candidate:
    """A block written for ``height``, in etcd's revision order; judged by the runtime."""

    height: int
    data: bytes
    revision: int
    key: bytes


@dataclass(frozen=True, slots=True)
class ProposerIs:
    proposer: str | None


@dataclass(frozen=True, slots=True)
class Submitted:
    """A submission's fate in etcd: written (it still has to win its height), or not."""

    height: int
    block_hash: bytes
    written: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class OrderingHealth:
    """etcd reachable or not (for the console, the log and catch-up state)."""

    up: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ProvisioningPart:
    """A part of a provisioning update seen under the fleet prefix (agent/net/provfeed.py)."""

    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class LinkReport:
    """A terminal's published link measurements seen under the fleet prefix."""

    terminal: str
    value: bytes


OrderingEvent = (Candidate | ProposerIs | Submitted | OrderingHealth | ProvisioningPart
                 | LinkReport)


LINKS = b"links/"


def chain_key(prefix: bytes, height: int, name: str) -> bytes:
    return prefix + b"chain/" + f"{height:0{HEIGHT_DIGITS}x}/{name}".encode()


def height_of(prefix: bytes, key: bytes) -> int | None:
    """The height in a chain key, or None for any other key."""
    head = prefix + b"chain/"
    if not key.startswith(head):
        return None
    digits = key[len(head):len(head) + HEIGHT_DIGITS]
    try:
        return int(digits, 16) if len(digits) == HEIGHT_DIGITS else None
    except ValueError:
        return None


class EtcdOrdering:
    """One terminal's view of the fleet's ordering (module docstring)."""

    def __init__(self, endpoints: Sequence[str], fleet: str, terminal_id: str, *,
                 ca: str | None = None, cert: str | None = None, key: str | None = None,
                 timeout_s: float = 2.0, lease_ttl_s: int = LEASE_TTL_S,
                 campaign: bool = True, silence_s: float = 5.0):
        self.endpoints = list(endpoints)
        self.prefix = f"/edgekey/{fleet}/".encode()
        self.terminal_id = terminal_id
        self.tls = {"ca": ca, "cert": cert, "key": key}
        self.client = EtcdClient(endpoints, timeout_s=timeout_s, **self.tls)
        self.lease_ttl_s = lease_ttl_s
        self.campaign_enabled = campaign
        self.silence_s = silence_s
        self.proposer: str | None = None
        self.counters: dict[str, int] = {}
        self.up = False
        self._fence: tuple[bytes, int] | None = None  # our proposer key's create revision
        self._lease = 0
        self._eligible = False  # the runtime says it has caught up: it may propose
        self._member = True  # an active member of the fleet: a retired one steps down
        self._applied = -1
        self._jobs: queue.Queue[tuple[str, object]] = queue.Queue(MAX_JOBS)
        self._out: queue.Queue[OrderingEvent] = queue.Queue()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._watch: SupervisedWatch | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ runtime side

    @property
    def proposer_key(self) -> bytes:
        return self.prefix + b"proposer"

    def start(self, next_height: int) -> None:
        """Read what is already ordered from ``next_height``, then follow the watch."""
        self._applied = next_height - 1
        self._thread = threading.Thread(target=self._work, name="edgekey-ordering", daemon=True)
        self._thread.start()
        self._job("resync", None)

    def fileno(self) -> int:
        return self._rfd

    def watch_fileno(self) -> int | None:
        return self._watch.fileno() if self._watch is not None else None

    def poll(self) -> list[OrderingEvent]:
        """What arrived (non-blocking), candidates in revision order."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._rfd, 4096):
                pass
        out: list[OrderingEvent] = []
        while True:
            try:
                out.append(self._out.get_nowait())
            except queue.Empty:
                break
        watch = self._watch
        if watch is not None:
            for item in watch.poll():
                if isinstance(item, WatchEvent):
                    out.extend(self._watch_event(item))
                elif isinstance(item, WatchCompacted):
                    self._count("watch.compacted")
                    log.warning("ordering watch compacted at %d: resync", item.compact_revision)
                    self._job("resync", None)
                elif isinstance(item, WatchLost):
                    self._count("watch.lost")
                    log.info("ordering watch lost (%s): reconnecting", item.detail)
        return out

    def submit(self, height: int, block_hash: bytes, data: bytes) -> None:
        """Write a candidate for ``height`` (fenced by our proposership when we hold it)."""
        self._job("submit", (height, block_hash, data))

    def publish_links(self, value: bytes) -> None:
        """Put this terminal's link measurements where every terminal's watch sees them."""
        self._job("links", value)

    def applied(self, height: int) -> None:
        """The runtime's chain reached ``height`` (where a resync starts from)."""
        self._applied = max(self._applied, height)

    def eligible(self, ok: bool, *, member: bool = True) -> None:
        """Whether this terminal may campaign (caught up, an active member); a terminal no
        longer a member also gives the proposership up."""
        self._eligible = ok and member
        self._member = member

    def add_endpoints(self, urls: Sequence[str]) -> None:
        """etcd members the fleet gained (a provisioning update): the client and the watch
        may fail over to them too."""
        for url in urls:
            self.client.add_endpoint(url)
            watch = self._watch
            if watch is not None:
                watch.add_endpoint(url)
            if url not in self.endpoints:
                self.endpoints.append(url)

    def remove_member(self, name: str) -> None:
        """Take etcd member ``name`` out of etcd's membership (its terminal was retired)."""
        self._job("remove_member", name)

    def resync(self) -> None:
        self._job("resync", None)

    def retain_from(self, height: int) -> None:
        """Delete the candidates below ``height`` from etcd and compact its history (the
        proposer does this from the checkpoint before the newest: a terminal further behind
        catches up from a snapshot)."""
        self._job("retain", height)

    def stop(self) -> None:
        """Stop the threads, give up the proposership (its lease is revoked), close the pipe."""
        if self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._watch is not None:
            self._watch.stop()
        if self._lease:
            with contextlib.suppress(EtcdError):
                self.client.lease_revoke(self._lease)
        self.client.close()
        for fd in (self._rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)

    # ------------------------------------------------------------ internals

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _job(self, kind: str, arg: object) -> None:
        try:
            self._jobs.put_nowait((kind, arg))
        except queue.Full:
            self._count("jobs.dropped")
            if kind == "submit":
                height, block_hash, _ = arg  # type: ignore[misc]
                self._emit(Submitted(height, block_hash, False, "ordering queue full"))

    def _emit(self, event: OrderingEvent) -> None:
        self._out.put(event)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wfd, b"\0")

    def _health(self, up: bool, detail: str = "") -> None:
        if up != self.up:
            self.up = up
            self._emit(OrderingHealth(up, detail))

    def _watch_event(self, item: WatchEvent) -> list[OrderingEvent]:
        if item.key == self.proposer_key:
            holder = item.value.decode("ascii", "replace") if item.kind == "put" else None
            return self._proposer_seen(holder, item.mod_revision)
        if item.key.startswith(feed_prefix(self.prefix)):
            return [ProvisioningPart(item.key, item.value)] if item.kind == "put" else []
        if item.key.startswith(self.prefix + LINKS):
            name = item.key[len(self.prefix + LINKS):].decode("ascii", "replace")
            return [LinkReport(name, item.value)] if item.kind == "put" else []
        height = height_of(self.prefix, item.key)
        if height is None or item.kind != "put":
            return []
        return [Candidate(height, item.value, item.mod_revision, item.key)]

    def _proposer_seen(self, holder: str | None, revision: int) -> list[OrderingEvent]:
        with self._lock:
            # Another holder (or none) seen after our key was made: we are not the proposer.
            # An older event (the previous holder's delete, read after we won) changes nothing.
            if (holder != self.terminal_id and self._fence is not None
                    and revision > self._fence[1]):
                self._fence = None
            if holder == self.proposer:
                return []
            self.proposer = holder
        return [ProposerIs(holder)]

    def _work(self) -> None:
        next_campaign = 0.0
        while not self._stop.is_set():
            timeout = max(0.05, next_campaign - time.monotonic())
            try:
                kind, arg = self._jobs.get(timeout=timeout)
            except queue.Empty:
                kind, arg = "", None
            if kind == "stop":
                return
            try:
                if kind == "resync":
                    self._do_resync()
                elif kind == "submit":
                    self._do_submit(*arg)  # type: ignore[misc]
                elif kind == "retain":
                    self._do_retain(arg)  # type: ignore[arg-type]
                elif kind == "remove_member":
                    self._do_remove_member(arg)  # type: ignore[arg-type]
                elif kind == "links":
                    self.client.put(self.prefix + LINKS + self.terminal_id.encode(),
                                    arg)  # type: ignore[arg-type]
                if time.monotonic() >= next_campaign:
                    next_campaign = time.monotonic() + max(0.5, self.lease_ttl_s / 3)
                    self._probe()
                    self._do_campaign()
                self._health(True)
            except Exception as exc:  # the worker must outlive any one job
                # etcd down is routine; anything else (a MemoryError under the RAM budget, a
                # gateway answer etcd3gw cannot parse) is logged, but the terminal must not
                # silently stop following the ordering because one job failed.
                if isinstance(exc, EtcdError):
                    self._count("etcd.errors")
                else:
                    self._count("worker.errors")
                    log.exception("ordering worker: %s job failed", kind or "periodic")
                self._health(False, f"{type(exc).__name__}: {exc}")
                if kind == "submit":
                    height, block_hash, _ = arg  # type: ignore[misc]
                    self._emit(Submitted(height, block_hash, False, f"etcd: {exc}"))
                elif kind == "resync":
                    time.sleep(0.5)
                    with contextlib.suppress(queue.Full):
                        self._jobs.put_nowait(("resync", None))

    def _do_resync(self) -> None:
        """Candidates from the applied height on at one revision, then the watch from there."""
        start = chain_key(self.prefix, self._applied + 1, "")
        end = prefix_end(self.prefix + b"chain/")
        revision = 0
        found = []
        while True:
            page = self.client.range(start, end, limit=PAGE, revision=revision)
            revision = revision or page.header_revision
            found.extend(page.kvs)
            if not page.more or not page.kvs:
                break
            start = page.kvs[-1].key + b"\0"
        updates, start, end = [], feed_prefix(self.prefix), prefix_end(feed_prefix(self.prefix))
        while True:  # two parts (1 MiB) a read: a response stays far below gRPC's limits
            page = self.client.range(start, end, limit=2, revision=revision)
            updates.extend(page.kvs)
            if not page.more or not page.kvs:
                break
            start = page.kvs[-1].key + b"\0"
        holder, holder_rev, _ = self.client.get(self.proposer_key)
        for kv in updates:  # before the blocks: a block may add a terminal an update names
            self._emit(ProvisioningPart(kv.key, kv.value))
        # within a height, revision order; across heights, height order
        found.sort(key=lambda kv: (height_of(self.prefix, kv.key) or 0, kv.create_revision))
        for kv in found:
            height = height_of(self.prefix, kv.key)
            if height is not None:
                self._emit(Candidate(height, kv.value, kv.mod_revision, kv.key))
        for event in self._proposer_seen(holder.decode("ascii", "replace") if holder else None,
                                         holder_rev or revision):
            self._emit(event)
        self._count("resyncs")
        if self._watch is None:
            self._watch = SupervisedWatch(self.endpoints, self.prefix, revision + 1,
                                          silence_s=self.silence_s, **self.tls)
            self._watch.start()
            self._emit(OrderingHealth(True, "watching"))  # wakes the loop to add the fd
        else:
            self._watch.restart(revision + 1)

    def _do_retain(self, height: int) -> None:
        deleted = self.client.delete_range(chain_key(self.prefix, 0, ""),
                                           chain_key(self.prefix, height, ""))
        revision = self.client.get(self.proposer_key)[2]
        self.client.compact(revision)
        self.counters["retained.deleted"] = self.counters.get("retained.deleted", 0) + deleted
        self._count("compactions")
        log.info("etcd: candidates below %d deleted (%d), compacted at revision %d", height,
                 deleted, revision)

    def _probe(self) -> None:
        """A linearizable read of the proposer key: etcd answers with a quorum behind it, or
        this raises (a partitioned terminal learns it is cut off, and says so); it also
        corrects the proposer if a watch event was missed."""
        holder, holder_rev, header_rev = self.client.get(self.proposer_key)
        name = holder.decode("ascii", "replace") if holder else None
        for event in self._proposer_seen(name, holder_rev or header_rev):
            self._emit(event)

    def _do_submit(self, height: int, block_hash: bytes, data: bytes) -> None:
        key = chain_key(self.prefix, height, f"{self.terminal_id}-{block_hash[:8].hex()}")
        with self._lock:
            fence = self._fence
        written = self.client.create(key, data, fence=fence)
        self._count("submitted" if written else "submit.refused")
        detail = "" if written else ("no longer the proposer" if fence is not None
                                     else "written before")
        self._emit(Submitted(height, block_hash, written, detail))

    def _do_remove_member(self, name: str) -> None:
        for m in self.client.member_list():
            if m.get("name") == name:
                self.client.member_remove(int(m["id"]))
                self._count("members.removed")
                log.warning("etcd member %s removed from etcd's membership", name)

    def _do_campaign(self) -> None:
        if self._lease and not self._member:  # retired: the others elect a proposer
            self.client.lease_revoke(self._lease)
            self._lease = 0
            with self._lock:
                self._fence = None
            self._count("stepped_down")
            return
        if self._lease:
            if self.client.lease_keepalive(self._lease) > 0:
                return
            self._lease = 0  # expired while we stalled: no longer the proposer
            with self._lock:
                self._fence = None
            self._count("lease.lost")
        if not (self.campaign_enabled and self._eligible) or self.proposer is not None:
            return
        lease = self.client.lease_grant(self.lease_ttl_s)
        won, _, create_rev = self.client.campaign(self.proposer_key,
                                                       self.terminal_id.encode(), lease)
        if won:
            self._lease = lease
            with self._lock:
                self._fence = (self.proposer_key, create_rev)
            self._count("campaign.won")
            log.info("%s is the fleet's proposer (revision %d)", self.terminal_id, create_rev)
        else:
            self.client.lease_revoke(lease)
            self._count("campaign.lost")
