"""A terminal's side of the fleet: node actions out to peers and the ordering, answers back in.

    node actions                          -> PeerNet (TLS, agent/net/peers.py)
      RequestEndorsements, SendEndorsement, RefuseEndorsement, ForwardTxs,
      RefuseForwarded, SendKey (wrapped by Terminal.export_key), AcknowledgeKey
    SubmitBlock                           -> EtcdOrdering.submit (agent/net/ordering.py)
    peer messages                         -> node events (EndorseRequest, ..., KeyReceived)
    ordering candidates                   -> the first valid one per height -> Terminal.deliver
    ordering proposer                     -> ProposerChanged
    provisioning parts (etcd)             -> a complete update -> on_provisioning (the agent)
    endorsement and hand-over messages    -> along the router's path (agent/net/overlay.py):
                                             direct to a neighbour, else Relayed via the mesh
    peer connection counters, etcd links/ -> FleetRoutes (agent/routing/fleet.py): measured
                                             links, the others' reports, the paths

Peer messages and ordering results are queued as they arrive (inside the
pump's callbacks) and handed to the node core after the pump's pass, so
the node is never re-entered. Candidates above the next height wait in a
bounded buffer; a gap that stays open asks the ordering to resync.

``synced`` says whether this terminal is current: the ordering's first
read is done, etcd answers, and no known candidate is waiting. Until then
the console and queries say their answers may be stale.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable

from agent.catchup import CatchUp, judge, open_snapshot, snapshot_chunks
from agent.keystore.store import KeyStoreError
from agent.keystore.transport import TransportError
from agent.ledger.block import decode_block, encode_block, header_hash
from agent.ledger.chain import LedgerError
from agent.ledger.codec import DecodeError
from agent.ledger.errors import ChainCorruptError
from agent.ledger.rules import Reason, checkpoint_of
from agent.net import wire
from agent.net.ordering import (
    Candidate,
    EtcdOrdering,
    LinkReport,
    OrderingHealth,
    ProposerIs,
    ProvisioningPart,
    Submitted,
)
from agent.net.overlay import Deliver, Forward, Overlay
from agent.net.peers import PeerNet
from agent.net.provfeed import Assembler
from agent.node import events as ev
from agent.node.actions import (
    AcknowledgeKey,
    Action,
    ForwardTxs,
    RefuseEndorsement,
    RefuseForwarded,
    RequestEndorsements,
    SendEndorsement,
    SendKey,
    SubmitBlock,
)
from agent.routing.fleet import REPORT_MAX_AGE_S, FleetRoutes
from agent.terminal import Terminal

log = logging.getLogger("edgekey.network")

MAX_AHEAD = 4096  # candidates above the next height held for the gap to close (all heights)
MAX_INBOX = 65536  # peer messages and ordering results between two passes
GAP_RESYNC_S = 2.0
# Candidates judged per pass of the agent's loop: a backlog of thousands (a catch-up) is
# applied a slice at a time, so the console, the peers' pings and the meter links are
# served in between (about 50 blocks take well under a second here).
CANDIDATES_PER_PASS = 50
GAP_RESYNCS_BEFORE_SNAPSHOT = 2  # a gap resyncs cannot close: etcd no longer has those blocks
ROUTE_SAMPLE_S = 2.0  # links measured and paths recomputed this often
LINK_REPORT_S = 5.0  # this terminal's link figures published for the others this often

PEER_ACTIONS = (RequestEndorsements, SendEndorsement, RefuseEndorsement, ForwardTxs,
                RefuseForwarded, SendKey, AcknowledgeKey, SubmitBlock)


class FleetNetwork:
    """The peers and the ordering of one terminal (module docstring)."""

    def __init__(self, terminal: Terminal, ordering: EtcdOrdering,
                 peers_factory: Callable[[Callable[[str, object], None]], PeerNet], *,
                 on_adopted: Callable[[int], None] = lambda height: None,
                 require_pow: int = 0, etcd_members: dict[str, str] | None = None,
                 on_provisioning: Callable[[bytes], bool] | None = None,
                 provisioning_issued: int = -1, station: str | None = None,
                 routes: FleetRoutes | None = None, overlay: Overlay | None = None,
                 route_sites: Callable[[], dict[str, tuple[float, float]]] | None = None):
        self.terminal = terminal
        self.ordering = ordering
        self.peers = peers_factory(self._on_message)
        self.counts: Counter[str] = Counter()
        self.synced = False
        self.etcd_up = False
        self.initial_read = False
        self._inbox: list[ev.Event] = []
        self._backlog: deque[object] = deque()  # ordering results not taken yet, in order
        self.query_inbox: list[tuple[str, wire.QueryForward | wire.QueryAnswer]] = []
        self._ahead: dict[int, list[Candidate]] = {}
        self._ahead_count = 0  # candidates in _ahead, all heights
        self._gap_since: float | None = None
        self._gap_resyncs = 0
        self.catchup: CatchUp | None = None
        self.on_adopted = on_adopted
        self.require_pow = require_pow
        self._checkpoints: list[int] = []  # heights of the checkpoint blocks applied here
        self.etcd_members = etcd_members or {}  # terminal -> the etcd member it hosts
        # The utility's provisioning updates, assembled from etcd; the agent checks and
        # applies each (True: believed and in force).
        self.on_provisioning = on_provisioning
        # The master station, a client of this terminal (its id), and what it asked.
        self.station = station
        self.station_inbox: list[wire.StationQuery | wire.StationRevoke | wire.StationReadings] = []
        self.provisioning_feed = Assembler(ordering.prefix, provisioning_issued)
        # Live routing: None sends every message straight to its destination.
        self.routes = routes
        self.overlay = overlay
        self.route_sites = route_sites
        self._next_sample = self._next_report = 0.0

    # ------------------------------------------------------------- outward

    def route(self, action: Action) -> bool:
        """Carry a peer or ordering action out; False when it is not one."""
        if not isinstance(action, PEER_ACTIONS):
            return False
        send = self._send
        if isinstance(action, RequestEndorsements):
            for peer in action.peers:
                send(peer, wire.EndorseRequest(action.block))
        elif isinstance(action, SendEndorsement):
            send(action.peer, wire.EndorsementMsg(action.height, action.block_hash,
                                                  action.endorsement))
        elif isinstance(action, RefuseEndorsement):
            send(action.peer, wire.EndorsementRefusedMsg(action.height, action.block_hash,
                                                         int(action.reason)))
        elif isinstance(action, ForwardTxs):
            send(action.peer, wire.ForwardTxs(action.txs))
        elif isinstance(action, RefuseForwarded):
            send(action.peer, wire.ForwardRefused(action.tx_id, int(action.reason),
                                                  max(action.height, 0)))
        elif isinstance(action, SendKey):
            try:
                envelope = self.terminal.export_key(action)
            except (KeyStoreError, LedgerError, OSError) as exc:
                self.counts["handover.unreadable"] += 1
                log.warning("hand-over of %s to %s: %s", action.meter_id.hex(), action.peer, exc)
                return True
            send(action.peer, wire.KeyHandover(action.meter_id, action.key_version, envelope))
        elif isinstance(action, AcknowledgeKey):
            send(action.peer, wire.KeyAck(action.meter_id, action.key_version))
        elif isinstance(action, SubmitBlock):
            h = action.block.header
            self.ordering.submit(h.height, header_hash(h), encode_block(action.block))
            self.counts["blocks_submitted"] += 1
        return True

    def send(self, peer: str, message: object) -> None:
        self._send(peer, message)

    def _send(self, peer: str, message: object) -> None:
        if self.overlay is not None and peer != self.station:
            peer, message = self.overlay.outgoing(peer, message,  # type: ignore[arg-type]
                                                  time.monotonic())
        if not self.peers.send(peer, message):  # type: ignore[arg-type]
            self.counts["peer.dropped"] += 1

    def _relayed(self, peer: str, frame: wire.Relayed) -> None:
        if self.overlay is None:
            self.counts["refused.relayed.not_routing"] += 1
            return
        got = self.overlay.incoming(peer, frame)
        if isinstance(got, Forward):
            if not self.peers.send(got.next_hop, got.frame):
                self.counts["relay.dropped"] += 1
        elif isinstance(got, Deliver):
            event = self._event(got.origin, got.message)
            if event is not None:
                self._inbox.append(event)
        else:
            log.warning("relayed frame from %s refused: %s: %s", peer, got.reason, got.detail)

    # -------------------------------------------------------------- inward

    def _on_message(self, peer: str, message: object) -> None:
        if len(self._inbox) >= MAX_INBOX:
            self.counts["inbox.full"] += 1
            return
        from_station = self.station is not None and peer == self.station
        if from_station and not isinstance(message, wire.Hello):
            # the station is a client, never a member: it may only ask
            if isinstance(message, wire.FROM_STATION) and len(self.station_inbox) < MAX_INBOX:
                self.station_inbox.append(message)  # the agent's (agent/main.py)
            else:
                self.counts[f"refused.station.{type(message).__name__}"] += 1
            return
        if isinstance(message, wire.FROM_STATION):  # a terminal never speaks for the station
            self.counts[f"refused.peer.{type(message).__name__}"] += 1
            return
        if isinstance(message, wire.Relayed):
            self._relayed(peer, message)
            return
        if self.overlay is not None and not isinstance(message, wire.Hello):
            self.overlay.heard(peer)
        event = self._event(peer, message)
        if event is not None:
            self._inbox.append(event)

    def _event(self, peer: str, m: object) -> ev.Event | None:
        self.counts[f"in.{type(m).__name__}"] += 1
        try:
            if isinstance(m, wire.EndorseRequest):
                return ev.EndorseRequest(peer, m.block)
            if isinstance(m, wire.EndorsementMsg):
                return ev.EndorsementReceived(peer, m.height, m.block_hash, m.endorsement)
            if isinstance(m, wire.EndorsementRefusedMsg):
                return ev.EndorsementRefused(peer, m.height, m.block_hash, Reason(m.reason))
            if isinstance(m, wire.ForwardTxs):
                return ev.TxsForwarded(peer, m.txs)
            if isinstance(m, wire.ForwardRefused):
                return ev.ForwardRefused(peer, m.tx_id, Reason(m.reason), m.height)
            if isinstance(m, wire.KeyHandover):
                return self.terminal.open_key(peer, m.meter_id, m.key_version, m.envelope)
            if isinstance(m, wire.KeyAck):
                return ev.KeyAcknowledged(peer, m.meter_id, m.key_version)
            if isinstance(m, wire.QueryForward | wire.QueryAnswer) and \
                    len(self.query_inbox) < MAX_INBOX:
                self.query_inbox.append((peer, m))  # the remote queries' (agent/main.py)
            if isinstance(m, wire.SnapshotRequest):
                chunks = snapshot_chunks(self.terminal.chain, m.height)
                self.counts["snapshot.served" if chunks else "snapshot.none"] += 1
                for chunk in chunks or [wire.SnapshotChunk(m.height, 0, 1, b"")]:
                    self._send(peer, chunk)
            if isinstance(m, wire.SnapshotChunk) and self.catchup is not None:
                self._snapshot_chunk(peer, m)
        except ValueError as exc:  # an unknown reason code
            self.counts["in.bad_field"] += 1
            log.warning("from %s: %s: %s", peer, type(m).__name__, exc)
        except (TransportError, LedgerError) as exc:
            self.counts["handover.bad_envelope"] += 1
            log.warning("hand-over from %s refused: %s", peer, exc)
        return None

    def take(self) -> tuple[list[ev.Event], list[Action]]:
        """Peer events for the node, and the actions applying ordered blocks produced."""
        actions: list[Action] = []
        self._backlog.extend(self.ordering.poll())
        judged = 0
        while self._backlog and judged < CANDIDATES_PER_PASS:
            item = self._backlog.popleft()
            if isinstance(item, Candidate):
                judged += 1
                actions.extend(self._candidate(item))
            elif isinstance(item, ProposerIs):
                self._inbox.append(ev.ProposerChanged(item.proposer))
                log.info("proposer: %s", item.proposer)
            elif isinstance(item, Submitted):
                if not item.written:
                    self.counts["submit.failed"] += 1
                    self._inbox.append(ev.BlockRefused(item.height, item.block_hash,
                                                       f"not ordered: {item.detail}"))
            elif isinstance(item, ProvisioningPart):
                self._provisioning_part(item)
            elif isinstance(item, LinkReport):
                self._link_report(item)
            elif isinstance(item, OrderingHealth):
                self.etcd_up = item.up
                self.initial_read = self.initial_read or item.up
                log.log(logging.INFO if item.up else logging.WARNING, "etcd %s %s",
                        "up" if item.up else "down", item.detail)
        self._check_gap()
        self.synced = (self.initial_read and self.etcd_up and not self._ahead
                       and not self._backlog)
        self.ordering.eligible(self.synced, member=self.terminal.chain.state.is_active(
            self.terminal.id))
        events, self._inbox = self._inbox, []
        return events, actions

    def _provisioning_part(self, part: ProvisioningPart) -> None:
        done = self.provisioning_feed.feed(part.key, part.value)
        if done is None or self.on_provisioning is None:
            return
        issued, data = done
        if self.on_provisioning(data):
            self.provisioning_feed.accepted(issued)
            self.counts["provisioning.updated"] += 1
        else:
            self.counts["provisioning.refused"] += 1

    @property
    def more(self) -> bool:
        """Ordering results are left for the next pass: the loop should not sleep."""
        return bool(self._backlog)

    def _candidate(self, c: Candidate) -> list[Action]:
        chain = self.terminal.chain
        tip = -1 if chain.height is None else chain.height
        if c.height <= tip:
            self.counts["candidates.settled"] += 1  # that height is decided here already
            return []
        if c.height > tip + 1:
            held = self._ahead.get(c.height, [])
            if any(x.key == c.key for x in held):  # a resync reads again what is held
                return []
            if self._ahead_count >= MAX_AHEAD:  # a resync reads it again once there is room
                self.counts["candidates.ahead_dropped"] += 1
                return []
            self._ahead.setdefault(c.height, held).append(c)
            self._ahead_count += 1
            return []
        actions = self._judge(c)
        while chain.height is not None and chain.height + 1 in self._ahead:
            held = self._ahead.pop(chain.height + 1)
            self._ahead_count -= len(held)
            for later in held:
                if later.height == chain.height + 1:
                    actions.extend(self._judge(later))
        for h in [h for h in self._ahead if chain.height is not None and h <= chain.height]:
            self._ahead_count -= len(self._ahead.pop(h))
        return actions

    def _judge(self, c: Candidate) -> list[Action]:
        """Apply ``c`` if it is valid on the chain here; the first valid one wins its height."""
        try:
            block = decode_block(c.data)
        except DecodeError as exc:
            self.counts["candidates.undecodable"] += 1
            log.warning("candidate %s undecodable: %s", c.key.decode(errors="replace"), exc)
            return []
        if block.header.height != c.height:
            self.counts["candidates.misfiled"] += 1
            log.warning("candidate %s holds block %d", c.key.decode(errors="replace"),
                        block.header.height)
            return []
        before = self.terminal.chain.height
        actions = self.terminal.deliver(block)
        if self.terminal.chain.height != before:
            self.counts["blocks_committed"] += 1
            self.ordering.applied(c.height)
            if checkpoint_of(block) is not None:
                self._checkpoint_applied(c.height)
            self._membership_applied(block)
        else:
            why = self.terminal.last_refusal
            self.counts["candidates.refused"] += 1
            self.counts[f"candidates.refused.{why}"] += 1
            log.warning("candidate %s at %d refused by this terminal's rules: %s",
                        c.key.decode(errors="replace"), c.height, why)
        return actions

    def _membership_applied(self, block: object) -> None:
        """A retired terminal that hosted an etcd voting member leaves etcd's membership too
        (the proposer asks etcd; a replacement joins it with ``member_add``)."""
        if self.terminal.node.proposer != self.terminal.id:
            return
        for tx in block.txs:  # type: ignore[attr-defined]
            if tx.kind.name == "TERMINAL_RETIRE" and tx.terminal in self.etcd_members:
                self.ordering.remove_member(self.etcd_members[tx.terminal])
                self.counts["etcd.member_removed"] += 1

    def _checkpoint_applied(self, height: int) -> None:
        """The proposer keeps etcd's blocks from the checkpoint before this one on."""
        self._checkpoints = [*self._checkpoints[-1:], height]
        node = self.terminal.node
        if len(self._checkpoints) == 2 and node.proposer == self.terminal.id:
            self.ordering.retain_from(self._checkpoints[0])
            self.counts["retained"] += 1

    def _check_gap(self) -> None:
        if not self._ahead:
            self._gap_since, self._gap_resyncs = None, 0
            return
        if self._backlog:  # what is still queued may close it: wait, but keep the count
            self._gap_since = None
            return
        now = time.monotonic()
        if self._gap_since is None:
            self._gap_since = now
        elif now - self._gap_since >= GAP_RESYNC_S:
            self._gap_since = now
            self._gap_resyncs += 1
            if self._gap_resyncs > GAP_RESYNCS_BEFORE_SNAPSHOT and self.catchup is None:
                self._start_catchup(now)
            else:
                self.counts["gap.resync"] += 1
                self.ordering.resync()

    # ------------------------------------------------------------ catch-up

    def _start_catchup(self, now: float) -> None:
        """etcd no longer has the blocks after our tip: a peer's snapshot at a checkpoint."""
        self._gap_resyncs = 0
        # The newest checkpoint: a peer keeps the snapshot of the last one it applied.
        for height in sorted(self._ahead, reverse=True):
            for c in self._ahead[height]:
                try:
                    block = decode_block(c.data)
                except DecodeError:
                    continue
                cp = checkpoint_of(block)
                if cp is None or cp.counter != height - 1:
                    continue
                state = self.terminal.chain.state
                others = sorted(t for t in state.active_terminals()
                                if t not in (self.terminal.id, block.header.proposer))
                peers = [block.header.proposer, *others]
                self.catchup = CatchUp(block, peers)
                self.counts["catchup.started"] += 1
                log.warning("blocks %d..%d are gone from etcd: catching up from a snapshot at "
                            "%d, checked against the checkpoint of block %d",
                            (self.terminal.chain.height or 0) + 1, height - 1, height - 1, height)
                self.catchup.next_peer(now, self._send)
                return
        self.counts["catchup.no_checkpoint"] += 1

    def _snapshot_chunk(self, peer: str, m: wire.SnapshotChunk) -> None:
        cu = self.catchup
        assert cu is not None
        try:
            data = cu.chunk(peer, m)
        except ValueError as exc:
            return self._snapshot_refused(peer, str(exc))
        if data is None:
            return
        info = self.terminal.chain.state.terminal(peer)
        if info is None:
            return self._snapshot_refused(peer, "not a member here")
        try:
            records, state = open_snapshot(data, info.public_key)
        except (ValueError, ChainCorruptError) as exc:
            return self._snapshot_refused(peer, f"unreadable: {exc}")
        why = judge(state, cu.block, self.terminal.chain.state, require_pow=self.require_pow)
        if why is not None:
            return self._snapshot_refused(peer, why)
        self.terminal.chain.adopt(records, state)
        self.counts["catchup.adopted"] += 1
        log.warning("adopted %s's snapshot at height %d (%d meters): rebooting to reconcile",
                    peer, cu.height, state.meter_count)
        self.catchup = None
        self.on_adopted(cu.height)

    def _snapshot_refused(self, peer: str, why: str) -> None:
        cu = self.catchup
        assert cu is not None
        self.counts["catchup.refused"] += 1
        cu.refusals.append(f"{peer}: {why}")
        log.warning("snapshot from %s refused: %s", peer, why)
        if not cu.next_peer(time.monotonic(), self._send):
            log.error("no peer gave a snapshot that checks: %s", "; ".join(cu.refusals))
            self.catchup = None  # tried again at the next gap

    def _catchup_tick(self) -> None:
        cu = self.catchup
        if cu is not None and cu.asked is not None and time.monotonic() > cu.deadline:
            self._snapshot_refused(cu.asked, "no answer in time")

    # ---------------------------------------------------------------- misc

    def _link_report(self, item: LinkReport) -> None:
        if self.routes is None:
            return
        try:
            report = json.loads(item.value)
            fresh = abs(time.time() - float(report["time"])) <= REPORT_MAX_AGE_S
            links = report["links"] if fresh else {}
            if not isinstance(links, dict):
                raise ValueError("links is not a mapping")
        except (ValueError, KeyError, TypeError) as exc:
            self.counts["links.bad_report"] += 1
            log.warning("link report of %s unreadable: %s", item.terminal, exc)
            return
        self.counts["links.reports"] += 1
        self.routes.apply_report(item.terminal, links)

    def _route_tick(self) -> None:
        routes, now = self.routes, time.monotonic()
        if routes is None or now < self._next_sample:
            return
        self._next_sample = now + ROUTE_SAMPLE_S
        if self.route_sites is not None:
            self.set_route_sites(self.route_sites())
        for peer in routes.neighbours():
            try:
                routes.observe(peer, self.peers.stats(peer), now)
            except KeyError:
                continue  # never connected yet: nothing measured
        routes.refresh()
        if now >= self._next_report:
            self._next_report = now + LINK_REPORT_S
            self.ordering.publish_links(json.dumps(
                {"time": round(time.time(), 3), "links": routes.report()}).encode())

    def set_route_sites(self, sites: dict[str, tuple[float, float]]) -> None:
        """The active terminals changed (a member added or retired): a new mesh."""
        if self.routes is not None and sites != self.routes.sites:
            self.routes.set_sites(sites)

    def tick(self) -> None:
        self.peers.tick()
        self._catchup_tick()
        self._route_tick()

    def next_deadline(self) -> float | None:
        return self.peers.next_deadline()

    def close(self) -> None:
        self.peers.close()
        self.ordering.stop()
