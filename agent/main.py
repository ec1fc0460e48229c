"""The agent a terminal runs: HAL -> node core -> HAL, top to bottom, one event loop.

    board file (hal.board) -> RAM budget (hal.ram) -> flash image (hal.blockdev)
      config partition: provisioning signed by the utility + sealed secrets (agent.provisioning)
      ledger + keystore partitions: chain and key store, verified and reconciled (agent.terminal)
      journal partition: log ring and reading-counter ceilings (agent.journal)
    links by URL (hal.link.open_port) served by one selector loop (hal.pump):
      hplc / rs485: frames -> agent.meterlink -> node events -> actions -> answer frames
      console: bytes -> agent.console.shell -> commands (agent.console.commands) -> bytes
    ordering: a fleet of one orders its own blocks (``SoloOrdering``); a fleet of
    more has its network (agent/network.py): TLS links to the peers for
    endorsements, forwarded operations and key hand-overs, and etcd for the
    order of blocks, each candidate judged here before it is applied.

One thread. Every queue is bounded (link sessions, shell outbox, meter
requests, the node's operations). SIGTERM and SIGINT stop the loop between
two events, flush the journal and close the flash image; SIGKILL is a power
cut, which the record logs are built to survive.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import signal
import sys
import tempfile
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import provisioning as prov
from agent.journal import Journal
from agent.keystore.material import fingerprint
from agent.keystore.store import KeyStoreError
from agent.keystore.transport import open_envelope
from agent.ledger.block import Block, header_hash
from agent.ledger.chain import ChainCorruptError, LedgerError
from agent.ledger.proof import encode_record_proof
from agent.ledger.query import query
from agent.ledger.repair import Repair, RepairRefused
from agent.ledger.state import MeterStatus
from agent.logs import EventLog, ToEventLog
from agent.meterlink import MeterLink
from agent.net.ordering import EtcdOrdering
from agent.net.overlay import Overlay
from agent.net.peers import PeerNet, tls_contexts
from agent.net.pki import common_name, sha256_pem
from agent.net.wire import (
    MAX_PLACED,
    MAX_PLACEMENT_EVENTS,
    MAX_READINGS,
    PlacementAnswer,
    QueryForward,
    ReadingsAnswer,
    StationAnswer,
    StationMigrate,
    StationPlacement,
    StationQuery,
    StationReadings,
    StationReply,
)
from agent.network import FleetNetwork
from agent.node import events as ev
from agent.node.actions import (
    AcceptReading,
    Acknowledge,
    Action,
    AnswerQuery,
    Refuse,
    RequestEndorsements,
    SubmitBlock,
)
from agent.node.core import NodeConfig
from agent.rehoming import AreaPlacement
from agent.remotequery import QueryResult, RemoteQueries
from agent.routing.fleet import ROUTE_METHODS, FleetRoutes
from agent.routing.network import PACKET_BITS
from agent.terminal import Terminal, open_node_chain, repair_node_chain
from agent.update import Updater
from hal.blockdev import FileBlockDevice, open_partition
from hal.board import Board, BoardConfigError, board_path, load_board
from hal.devicekey import DeviceKeyFileError, load_device_key
from hal.link import LinkOpenError, open_port
from hal.linksession import FrameReceived, LinkSession, Rejected, Reply, Timeout
from hal.pump import LinkDown, Pump
from hal.ram import RamBudget
from hal.recordlog import LogError

PLACEMENT_CHECK_S = 5.0  # the placement replica follows the chain this often
TICK_S = 0.25  # node timers and batching: well below the 2 s endorsement round
FLUSH_S = 1.0  # journal lines reach flash at least this often
RECONNECT_S = 1.0  # a meter link that went down is reopened this often
METER_ROLES = ("hplc", "rs485")
CONSOLE_READ = 512
CONSOLE_WRITE = 4096  # the tty layer's buffer: the shell's outbox holds the rest
DEFAULT_TRUST = "/etc/edgekey/utility.pub"
DEFAULT_DEVICE_KEY = "/etc/edgekey/device.key"
DEFAULT_TLS_DIR = "/etc/edgekey/tls"  # ca.crt, <node>.crt, <node>.key
DEFAULT_CLIENT_ADDRESS = 0x01
REEXEC_STATUS = 75  # reboot: the loop ends and the process replaces itself
READINGS_PER_METER = 8  # sealed readings kept for the master station, per meter
READINGS_METERS = 4096  # ... for the meters read last (about 3 MiB at most)


class BootError(Exception):
    """The agent will not start on this board, image or configuration; the message says why."""


class SoloOrdering:
    """Ordering for a membership of one: the only endorser's block is the next block.

    More than half of one terminal is one, so an endorsed block needs no
    one else's say; what it must still pass is the chain's own validation
    (``Chain.append`` in ``Terminal.deliver``). The network ordering (etcd)
    has the same two calls.
    """

    def __init__(self) -> None:
        self._blocks: deque[Block] = deque()

    def submit(self, block: Block) -> None:
        self._blocks.append(block)

    def delivered(self) -> list[Block]:
        out = list(self._blocks)
        self._blocks.clear()
        return out


@dataclass
class Options:
    board: str
    node: str
    flash: Path
    links: dict[str, str]
    trust: Path
    device_key: Path
    format: bool
    log_level: str
    client_address: int
    # RLIMIT_DATA lowered to the board's budget for the whole process: off only where the
    # agent shares its process with others (the in-process test of the ARM tier).
    enforce_ram: bool = True
    tls_dir: Path = Path(DEFAULT_TLS_DIR)
    checkpoint_every: int | None = None  # None: the board's [ledger] checkpoint_every
    # Live routing over the WAN mesh (agent/routing/fleet.py): a method name, or "direct"
    # (every message straight to its destination, no relays).
    route_method: str = "direct"
    # Emulated WAN links (agent/net/peers.py): each peer connection shaped to this rate
    # and buffer; None: as fast as the transport (a real WAN shapes itself).
    wan_rate_mbit: float | None = None
    wan_buffer_packets: int | None = None
    # Unattended first boot (the board's init system): lay the genesis only if the ledger
    # partition is blank, boot as usual otherwise.
    format_if_blank: bool = False


def parse_links(values: list[str]) -> dict[str, str]:
    links: dict[str, str] = {}
    for item in values:
        role, sep, url = item.partition("=")
        if not sep or not role or not url:
            raise BootError(f"--links wants ROLE=URL, got {item!r}")
        links[role] = url
    return links


class Agent:
    """One terminal's running agent (module docstring)."""

    def __init__(self, opts: Options, argv: list[str]):
        self.opts, self.argv = opts, argv
        self.started = time.monotonic()
        self.stopping = False
        self.exit_status = 0
        self.counts: Counter[str] = Counter()
        try:
            self.board: Board = load_board(board_path(opts.board))
        except BoardConfigError as exc:
            raise BootError(str(exc)) from None
        unknown = set(opts.links) - set(self.board.links)
        if unknown:
            raise BootError(f"--links names {', '.join(sorted(unknown))}: board "
                            f"{self.board.name} has links {', '.join(sorted(self.board.links))}")
        self.ram = RamBudget.from_board(self.board)
        self.ram_limit = self.ram.enforce() if opts.enforce_ram else None
        self._open_flash()
        run_dir = os.environ.get("EDGEKEY_RUN_DIR")  # the board's /run/edgekey
        self.updater = Updater(opts.flash, self.board,
                               Path(run_dir or tempfile.gettempdir()) / f"edgekey-{opts.node}",
                               Path(run_dir) / "rauc" / "service.log" if run_dir else None)
        self.log = EventLog(opts.node, journal=self.journal, level=opts.log_level)
        self._log_handler = ToEventLog(self.log)
        logging.getLogger("edgekey").addHandler(self._log_handler)
        logging.getLogger("edgekey").setLevel(logging.INFO)
        self.pump = Pump()
        self.network: FleetNetwork | None = None
        self.placement: AreaPlacement | None = None  # medoid reassignment, once booted
        self.operator_ids = 1 << 62  # above any meter's request ids
        self.operator_waiting: dict[int, Any] = {}
        self.readings: OrderedDict[bytes, deque[tuple[int, int, bytes]]] = OrderedDict()
        self._watch_fd: int | None = None
        self._boot_node()
        self.meter_links: dict[str, MeterLink] = {}
        self.link_urls: dict[str, str] = {}
        self.link_down_at: dict[str, float] = {}
        self.ports: dict[str, Any] = {}
        self.console: Any = None
        self._console_down_at: float | None = None
        self._console_events = 0
        self.shell: Any = None
        self._console_out = bytearray()
        self._open_links()
        self.boot_s = time.monotonic() - self.started
        self.log.event("agent.ready", boot_s=round(self.boot_s, 3), height=self.chain.height,
                       meters=self.chain.state.meter_count, board=self.board.name,
                       links=self.link_urls)

    # ============================================================== boot

    def _open_flash(self) -> None:
        fl = self.board.flash
        path = self.opts.flash
        if not (path.is_file() or path.is_block_device()):
            raise BootError(f"flash image {path} does not exist (edgekey flash create makes one)")
        size = _flash_size(path)
        if size != fl.size_bytes:
            raise BootError(f"flash image {path} is {size} bytes; board {self.board.name} has "
                            f"{fl.size_bytes} bytes of flash: wrong board or not an image")
        self.device = FileBlockDevice(path, fl.erase_block_bytes)
        try:
            self._open_partitions()
        except BaseException:
            self.device.close()
            raise

    def _open_partitions(self) -> None:
        fl = self.board.flash
        try:
            device_key = load_device_key(self.opts.device_key)
        except DeviceKeyFileError as exc:
            raise BootError(str(exc)) from None
        try:
            trusted = self.opts.trust.read_bytes()
        except OSError as exc:
            raise BootError(f"utility key {self.opts.trust}: {exc.strerror}") from None
        if len(trusted) != 32:
            trusted = bytes.fromhex(trusted.decode(errors="replace").strip() or "00")
        self.trusted = trusted
        config = open_partition(self.device, fl, "config")
        try:
            raw, sealed = prov.load(config)
            self.provisioning = prov.verify(raw, trusted)
            self.secrets = prov.open_secrets(device_key, sealed)
        except (prov.ProvisioningError, LogError, ValueError) as exc:
            raise BootError(f"{self.opts.flash}: {exc}") from None
        p = self.provisioning
        if p.flash_layout != prov.flash_layout(self.board.flash):
            raise BootError(f"{self.opts.flash} is laid out for the flash map of board "
                            f"{p.board!r} ({p.flash_layout}); this board's is "
                            f"{prov.flash_layout(self.board.flash)}")
        if self.secrets.identity.terminal_id != self.opts.node:
            raise BootError(f"{self.opts.flash} holds terminal "
                            f"{self.secrets.identity.terminal_id!r}, not --node {self.opts.node!r}")
        me = p.terminal(self.opts.node)
        if me.identity_public != self.secrets.identity.public_bytes():
            raise BootError("the terminal's identity key does not match its provisioning entry")
        try:
            self.factory = prov.factory_keys(p, self.secrets)
        except prov.ProvisioningError as exc:
            raise BootError(str(exc)) from None
        self.device_key = device_key
        self.journal = Journal(open_partition(self.device, fl, "journal"))

    def _boot_node(self) -> None:
        p, ledger_cfg = self.provisioning, self.board.ledger
        journal = self.journal
        self.node_config = NodeConfig(
            self.secrets.identity, txs_per_block=ledger_cfg.txs_per_block,
            pow_difficulty=ledger_cfg.pow_difficulty, genesis_hash=_genesis_hash(p.genesis),
            factory_key=self.factory.get,
            authorise_member=lambda tx: self.provisioning.authorises(tx),
            admit_join=lambda m: None if self.placement is None else self.placement.admit_join(m),
            reading_floor=lambda m: journal.ceiling(m) - 1,
            checkpoint_every=(ledger_cfg.checkpoint_every if self.opts.checkpoint_every is None
                              else self.opts.checkpoint_every))
        fl = self.board.flash
        ledger = open_partition(self.device, fl, "ledger")
        # The chain is opened and judged before anything may write (the key store's opening,
        # the reconcile): a refusal leaves the image as it was. A fleet terminal's damaged
        # ledger is cut back to the blocks before the damage, which its fleet gives back.
        self.ledger_repair: Repair | None = None
        try:
            chain = open_node_chain(self.node_config, ledger)
        except ChainCorruptError as exc:
            damaged = f"{self.opts.flash}: ledger partition damaged: {exc}"
            if p.network is None:  # a fleet of one has nowhere to fetch the lost blocks from
                raise BootError(f"{damaged}; the image is left as it is") from None
            try:
                chain, self.ledger_repair = repair_node_chain(self.node_config, ledger)
            except (RepairRefused, LogError) as why:
                raise BootError(f"{damaged}; not repaired: {why}; the image is left as it "
                                "is") from None
            except (LedgerError, OSError) as why:
                raise BootError(f"{damaged}; the repair failed part-way ({type(why).__name__}: "
                                f"{why}); the next boot repairs again") from None
            r = self.ledger_repair
            self.log.event("agent.ledger_repaired", "warning", height=r.height,
                           first_record_lost=r.first_record_lost, records_lost=r.records_lost,
                           segments_erased=r.segments_erased, damage=r.damage)
        except (LedgerError, LogError) as exc:
            raise BootError(f"{self.opts.flash}: {type(exc).__name__}: {exc}") from None
        st = chain.log.stats()
        blank = st.used_segments == 0
        if blank and not (self.opts.format or self.opts.format_if_blank):
            raise BootError(f"{self.opts.flash}: the ledger partition is blank; start once with "
                            "--format to lay down the fleet's genesis")
        if not blank and self.opts.format:
            raise BootError(f"{self.opts.flash}: --format refused: the ledger partition holds "
                            f"{st.records} records")
        if not blank and chain.height is None:
            raise BootError(f"{self.opts.flash}: the ledger partition holds records but no "
                            "chain; the image is left as it is")
        if len(p.terminals) > 1 and p.network is None:
            raise BootError(f"fleet {p.fleet!r} has {len(p.terminals)} terminals but its "
                            "provisioning names no network (etcd endpoints, peer addresses)")
        try:
            self.terminal = Terminal(
                self.node_config, ledger=chain,
                keystore=open_partition(self.device, fl, "keystore"),
                device_key=self.device_key, clock=_clock,
                transport_key=self.secrets.transport, peers=p.allow_list())
        except (LedgerError, KeyStoreError, LogError) as exc:
            raise BootError(f"{self.opts.flash}: {type(exc).__name__}: {exc}") from None
        self.chain = self.terminal.chain
        self.placement = AreaPlacement(self.opts.node, lambda: self.provisioning,
                                       self.chain.state, migrate=self._migrate,
                                       on_event=self._placement_event)
        self.ordering = SoloOrdering()
        if blank:
            self._run(self.terminal.deliver(p.genesis))
            if self.chain.height != 0:
                raise BootError("the fleet's genesis was refused by this terminal's rules")
            self.log.event("agent.formatted", genesis=_genesis_hash(p.genesis))
        if p.network is not None:
            self._open_network(p.network)
            if self.ledger_repair is not None and self.network is not None:  # console `net`
                self.network.counts.update({"ledger.repaired": 1,
                                            "ledger.repaired.height": self.ledger_repair.height,
                                            "ledger.repaired.records_lost":
                                                self.ledger_repair.records_lost})
        self.queries = self._remote_queries()
        self._run(self.terminal.boot_actions)
        self.log.event("agent.boot", height=self.chain.height,
                       meters=self.chain.state.meter_count,
                       keys=len(self.terminal.keys.live_meters()))

    def _open_network(self, net: prov.Network) -> None:
        """The fleet CA pinned by the provisioning, this terminal's certificate, peers, etcd."""
        d, node = self.opts.tls_dir, self.opts.node
        ca, cert, key = d / "ca.crt", d / f"{node}.crt", d / f"{node}.key"
        try:
            ca_pem, cert_pem = ca.read_bytes(), cert.read_bytes()
        except OSError as exc:
            raise BootError(f"TLS material: {exc.filename}: {exc.strerror}") from None
        try:
            if sha256_pem(ca_pem) != net.ca_sha256:
                raise BootError(f"{ca} is not the fleet CA the provisioning pins")
            if common_name(cert_pem) != node:
                raise BootError(f"{cert} is issued to {common_name(cert_pem)!r}, not {node!r}")
            server_ctx, client_ctx = tls_contexts(ca, cert, key)
        except (ValueError, OSError) as exc:
            raise BootError(f"TLS material in {d}: {exc}") from None
        if node not in net.peers:
            raise BootError(f"the provisioning gives terminal {node!r} no peer address")
        state = self.chain.state
        ordering = EtcdOrdering(net.etcd, self.provisioning.fleet, node, ca=str(ca),
                                cert=str(cert), key=str(key))
        # PeerNet reads this at each dial: a provisioning update adds the new terminals' here
        self.peer_addresses = {t: a for t, a in net.peers.items() if t != node}
        station = self.provisioning.station_id  # a client: let in, never dialled, may only ask
        wan = self.board.wan
        rate_mbit = self.opts.wan_rate_mbit or wan.rate_mbit_s
        buffer_packets = self.opts.wan_buffer_packets or wan.forward_buffer_packets
        routes = overlay = None
        if self.opts.route_method != "direct":
            routes = FleetRoutes(node, self._route_sites(), rate_mbit_s=rate_mbit,
                                 buffer_packets=buffer_packets, rtt_ms=wan.rtt_ms,
                                 route_fn=ROUTE_METHODS[self.opts.route_method],
                                 method=self.opts.route_method)

            def public_key(t: str) -> object | None:
                info = state.terminal(t)
                return info.verifier if info is not None and info.active else None

            overlay = Overlay(node, sign=self.terminal.identity.sign, public_key=public_key,
                              path_to=routes.path_to, first_seq=int(time.time() * 1000) << 16)
        shaped = self.opts.wan_rate_mbit is not None
        self.network = FleetNetwork(self.terminal, ordering, lambda on_message: PeerNet(
            self.pump, node, self.provisioning.fleet, server_ctx, client_ctx, net.peers[node],
            self.peer_addresses, is_member=lambda t: state.is_active(t) or t == station,
            on_message=on_message,
            link_rate_bps=rate_mbit * 1e6 if shaped else None,
            link_buffer_bytes=buffer_packets * PACKET_BITS // 8 if shaped else None),
            routes=routes, overlay=overlay, route_sites=self._route_sites,
            on_adopted=self._adopted, require_pow=self.board.ledger.pow_difficulty,
            etcd_members={t: m["name"] for t, m in net.members.items()},
            on_provisioning=self._provisioning_update,
            provisioning_issued=self.provisioning.issued_ms, station=station)
        self.pump.add_fd(ordering.fileno(), selectors.EVENT_READ, lambda mask: None)
        ordering.start((self.chain.height or 0) + 1)
        self.log.event("agent.network", peers=len(net.peers) - 1, etcd=list(net.etcd),
                       listen=f"{net.peers[node][0]}:{net.peers[node][1]}")

    def _migrate(self, meter_id: bytes, to: str) -> None:
        """Placement moves a meter of this terminal to a neighbour: MIGRATE, then the key."""
        def done(a: Acknowledge | Refuse) -> None:
            if isinstance(a, Acknowledge):
                self.log.event("placement.migrated", meter=meter_id, to=to, height=a.height)
            else:
                self.log.event("placement.migrate_refused", "warning", meter=meter_id, to=to,
                               reason=a.reason.name, detail=a.detail)

        self.operator_request(lambda rid: ev.MigrateRequest(meter_id, rid, to), done)

    def _placement_event(self, kind: str, fields: dict[str, Any]) -> None:
        level = {"replan_needed": "warning", "assigned": "debug"}.get(kind, "info")
        self.log.event(f"placement.{kind}", level, **fields)

    def _route_sites(self) -> dict[str, tuple[float, float]]:
        """The active terminals' provisioned sites: the WAN mesh every terminal routes on."""
        state = self.chain.state
        return {t.terminal_id: t.site for t in self.provisioning.terminals
                if state.is_active(t.terminal_id)}

    def _provisioning_update(self, data: bytes) -> bool:
        """The utility's newer provisioning, seen in etcd: believed when it is signed by the
        trusted key and may replace the one in force (``prov.check_update``), written to the
        config partition, then in force at once: the new terminals' transport keys (key
        hand-overs and queries to them), peer addresses, factory keys of new meters homed
        here, and which membership changes the endorsers may sign."""
        try:
            new = prov.verify(data, self.trusted)
            prov.check_update(self.provisioning, new)
            factory = prov.factory_keys(new, self.secrets)
        except prov.ProvisioningError as exc:
            self.log.event("agent.provisioning_refused", "warning", error=str(exc))
            return False
        try:
            prov.reinstall(open_partition(self.device, self.board.flash, "config"), data)
        except (LogError, prov.ProvisioningError, OSError) as exc:
            self.log.event("agent.provisioning_unwritable", "error", error=str(exc))
            return False
        old = self.provisioning
        self.provisioning = new
        self.factory.update(factory)
        self.terminal.peers = new.allow_list()
        if new.network is not None:
            self.peer_addresses.update({t: a for t, a in new.network.peers.items()
                                        if t != self.opts.node})
            if self.network is not None:
                self.network.ordering.add_endpoints(new.network.etcd)
        added = sorted({t.terminal_id for t in new.terminals}
                       - {t.terminal_id for t in old.terminals})
        self.log.event("agent.provisioning_updated", issued_ms=new.issued_ms, added=added,
                       retired=sorted(new.retired - old.retired),
                       meters=len(new.meters) - len(old.meters))
        return True

    def _adopted(self, height: int) -> None:
        """A peer's snapshot became this chain's state: boot again on it (reconcile)."""
        self.log.event("agent.caught_up_by_snapshot", "warning", height=height)
        self.request_stop(REEXEC_STATUS)

    def _remote_queries(self) -> RemoteQueries:
        """Key queries from this terminal to the holder, and the holder's side of them."""
        state, node = self.chain.state, self.opts.node

        def export(meter_id: bytes, requester: str, version: int) -> bytes:
            allow = self.terminal.peers  # read now: a provisioning update may have added one
            return self.terminal.keys.export(meter_id, requester.encode(), allow, version)

        def authorised(requester: str) -> bool:  # an active member the utility provisioned,
            p = self.provisioning                # or its master station
            return requester == p.station_id or (state.is_active(requester) and requester in {
                t.terminal_id for t in p.terminals})

        def route(home: str) -> tuple[str, ...]:
            network = self.network
            path = None if network is None or network.routes is None \
                else network.routes.path_to(home)
            return path or (node, home)

        return RemoteQueries(node, state, export=export, authorised=authorised, route=route)

    def _network_pass(self) -> None:
        """What the peers and the ordering brought since the last pass, into the node."""
        network = self.network
        if network is None:
            return
        events, actions = network.take()
        if actions:
            self._run(actions)
        if network.query_inbox:
            incoming, network.query_inbox = network.query_inbox, []
            now = _clock()
            for peer, m in incoming:
                handle = (self.queries.on_forward if isinstance(m, QueryForward)
                          else self.queries.on_answer)
                for to, out in handle(peer, m, now):  # type: ignore[arg-type]
                    network.send(to, out)
        if network.station_inbox:
            asked, network.station_inbox = network.station_inbox, []
            for m in asked:
                self._station_request(network, m)
        if events:
            self._run(self.terminal.feed_many(events))
        fd = network.ordering.watch_fileno()
        if fd is not None and fd != self._watch_fd:  # the watch started: wake on its events
            if self._watch_fd is not None:
                self.pump.remove_fd(self._watch_fd)
            self.pump.add_fd(fd, selectors.EVENT_READ, lambda mask: None)
            self._watch_fd = fd

    def _station_request(self, network: FleetNetwork, m: Any) -> None:
        """The master station asks through this terminal: a key (ours, or fetched from its
        holder, wrapped to the station either way), a meter's readings, this terminal's
        placement, or orders a revoke or a migration (this terminal must be the meter's
        home); each answered once, on the station's connection."""
        station = self.provisioning.station_id
        assert station is not None
        rid = m.request_id
        self.counts[f"station.{type(m).__name__}"] += 1
        if isinstance(m, StationReadings):
            kept = tuple(self.readings.get(m.meter_id, ()))
            network.send(station, ReadingsAnswer(rid, kept[-MAX_READINGS:]))
            return
        if isinstance(m, StationPlacement):
            network.send(station, self._placement_answer(rid))
            return
        if isinstance(m, StationQuery):
            def answered(r: QueryResult) -> None:
                detail = r.detail.encode()[:200].decode(errors="ignore")
                network.send(station, StationAnswer(rid, int(r.status), r.key_version,
                                                    r.height, r.envelope,
                                                    self._record_proof(m.meter_id), detail))

            for to, out in self.queries.ask(m.meter_id, station, _clock(), answered):
                network.send(to, out)
            return

        def done(a: Acknowledge | Refuse) -> None:
            if isinstance(a, Acknowledge):
                reply = StationReply(rid, True, 0, 0, a.height or 0, "")
            else:
                why = a.detail if a.home is None else f"{a.detail} (home {a.home})".strip()
                reply = StationReply(rid, False, int(a.reason),
                                     0 if a.ledger_reason is None else int(a.ledger_reason), 0,
                                     why.encode()[:200].decode(errors="ignore"))
            network.send(station, reply)

        if isinstance(m, StationMigrate):
            self.operator_request(lambda request_id: ev.MigrateRequest(
                m.meter_id, request_id, m.new_home), done)
        else:
            self.operator_request(lambda request_id: ev.OperatorRevoke(m.meter_id, request_id),
                                  done)

    def _placement_answer(self, rid: int) -> PlacementAnswer:
        """This terminal's placement for the station: medoid site, capacity, the meters the
        chain homes here, and the newest placement events (rehoming.STATION_EVENTS)."""
        me = self.provisioning.terminal(self.opts.node)
        placement = self.placement
        site = (placement.site() if placement is not None else None) or me.site
        state = self.chain.state
        homed = tuple(bytes(mid) for mid in state.meter_ids()
                      if (e := state.meter(mid)) is not None and e.home == self.opts.node
                      and e.status is MeterStatus.LIVE)[:MAX_PLACED]
        events = [] if placement is None else placement.station_events()
        return PlacementAnswer(rid, max(0, round(site[0] * 10)), max(0, round(site[1] * 10)),
                               me.capacity, homed, tuple(events[-MAX_PLACEMENT_EVENTS:]))

    def _keep_reading(self, r: AcceptReading) -> None:
        """The newest readings as the meters sealed them, for the master station (RAM only,
        bounded: READINGS_PER_METER for each of the READINGS_METERS meters read last)."""
        mid = bytes(r.meter_id)
        kept = self.readings.get(mid)
        if kept is None:
            kept = self.readings[mid] = deque(maxlen=READINGS_PER_METER)
            while len(self.readings) > READINGS_METERS:
                self.readings.popitem(last=False)
        else:
            self.readings.move_to_end(mid)
        if r.sealed:
            kept.append((r.key_version, r.counter, r.sealed))

    def _record_proof(self, meter_id: bytes) -> bytes:
        """The record proof of the meter's newest record on this chain (what the station
        checks the key against), or b"" when it holds no such record or no longer the block
        (released behind a snapshot, which vouches for it instead)."""
        try:
            proof = self.chain.record_proof(meter_id)
        except (LedgerError, LogError, LookupError) as exc:
            self.counts["station.proof_unavailable"] += 1
            self.log.event("station.proof_unavailable", "info", meter=meter_id.hex(),
                           error=str(exc))
            return b""
        return b"" if proof is None else encode_record_proof(proof)

    # ============================================================= links

    def _open_links(self) -> None:
        for role, cfg in self.board.links.items():
            url = self.opts.links.get(role, cfg.url)
            self.link_urls[role] = url
            if role == "console":
                self._open_console(url, cfg.baud)
            elif role in METER_ROLES:
                self.meter_links[role] = MeterLink(self.opts.client_address, self._key_for)
                self._open_meter_link(role)

    def _open_meter_link(self, role: str) -> None:
        cfg = self.board.links[role]
        url = self.link_urls[role]
        try:
            port = open_port(url, baud=cfg.baud)
        except LinkOpenError as exc:
            self.link_down_at[role] = time.monotonic()
            self.log.event("link.open_failed", "warning", link=role, url=url, error=str(exc))
            return
        session = LinkSession(max_frame_bytes=cfg.max_frame_bytes)
        self.pump.add_link(role, port, session, pace_bytes_per_s=cfg.pace_bytes_per_s)
        self.ports[role] = port
        self.link_down_at.pop(role, None)
        self.log.event("link.up", link=role, url=url)

    def _open_console(self, url: str, baud: int) -> None:
        from agent.console.commands import build_commands
        from agent.console.shell import Shell
        try:
            port = open_port(url, baud=baud)
        except LinkOpenError as exc:
            raise BootError(f"console link: {exc}") from None
        try:
            fd = port.fileno()
        except Exception:  # loop:// has none
            port.close()
            self.log.event("console.off", "warning", url=url,
                           reason="the console port has no file descriptor")
            return
        self.console = port
        self.console_fd = fd
        self._console_events = 0  # what the pump watches the console for (0: not registered)
        self._console_down_at: float | None = None
        if self.shell is None:  # a reopened console keeps its shell (and a held reply)
            self.shell = Shell(build_commands(self), banner=f"edgekey {self.opts.node} on "
                                                            f"{self.board.name}")
            self.shell.start()
        self._console_flush()

    def _console_lost(self, why: str) -> None:
        """The console's far end went away (the cable's pty closed): stop watching the
        descriptor, which would otherwise be readable for ever, and reopen it later."""
        self.counts["console_lost"] += 1
        self.log.event("console.lost", "warning", reason=why)
        if self._console_events:
            self.pump.remove_fd(self.console_fd)
            self._console_events = 0
        with contextlib.suppress(OSError):
            self.console.close()
        self.console = None
        self._console_out.clear()
        self._console_down_at = time.monotonic()

    def _console_ready(self, mask: int) -> None:
        if mask & selectors.EVENT_READ and self.shell.wants_input():
            try:
                data = os.read(self.console_fd, CONSOLE_READ)
            except BlockingIOError:
                data = None
            except OSError as exc:
                self.counts["console_read_errors"] += 1
                return self._console_lost(f"read: {exc}")
            if data == b"":
                return self._console_lost("end of file")
            if data:
                self.shell.receive_data(data)
        self._console_flush()

    def _console_flush(self) -> None:
        if self.console is None:
            return
        while True:
            if not self._console_out:  # take more only once the port took what we hold
                self._console_out += self.shell.data_to_send(CONSOLE_WRITE)
                if not self._console_out:
                    break
            try:
                n = os.write(self.console_fd, self._console_out)
            except BlockingIOError:
                break
            except OSError as exc:
                self.counts["console_write_errors"] += 1
                return self._console_lost(f"write: {exc}")
            del self._console_out[:n]
        want = selectors.EVENT_READ if self.shell.wants_input() else 0
        if self._console_out:
            want |= selectors.EVENT_WRITE
        # Nothing to wait for (a held reply, no output): not watched at all; a pty is always
        # writable, so watching it for writes would spin. The loop's next pass looks again.
        if want == self._console_events:
            return
        if not want:
            self.pump.remove_fd(self.console_fd)
        elif not self._console_events:
            self.pump.add_fd(self.console_fd, want, self._console_ready)
        else:
            self.pump.modify_fd(self.console_fd, want, self._console_ready)
        self._console_events = want

    def _key_for(self, meter_id: bytes, version: int | None) -> bytes | None:
        try:
            return self.terminal.keys.get(meter_id, version)
        except (KeyStoreError, KeyError):
            return None

    # ============================================================== loop

    def serve(self) -> int:
        next_tick = next_flush = next_place = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            wake = min(next_tick, next_flush)
            if self.network is not None:
                wake = min(wake, self.network.next_deadline() or wake)
                if self.network.more:  # a backlog of blocks: serve the rest, then go on
                    wake = now
            timeout = max(0.0, wake - now)
            requests: list[ev.Event] = []
            for name, event in self.pump.run_once(timeout):
                request = self._link_event(name, event)
                if request is not None:
                    requests.append(request)
            self._network_pass()
            if requests:  # what one pass read shares one round (one block)
                self._run(self.terminal.feed_many(requests))
            if self.shell is not None:
                self._console_flush()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                self.feed(ev.Tick())
                self._reconnect(now)
                if self.placement is not None and now >= next_place:
                    next_place = now + PLACEMENT_CHECK_S
                    self.placement.replica()  # its site moved: an event for the log and console
                if self.network is not None:
                    self.network.tick()
                    for to, out in self.queries.tick(_clock()):
                        self.network.send(to, out)
            if now >= next_flush:
                next_flush = now + FLUSH_S
                self.journal.flush()
        self.shutdown()
        return self.exit_status

    def _link_event(self, name: str, event: object) -> ev.Event | None:
        """Count and answer what a link produced; the meter request it carried, if any."""
        link = self.meter_links.get(name)
        if link is None:
            return None
        if isinstance(event, FrameReceived):
            request, nak = link.frame_in(event.frame)
            if nak is not None:
                self._send(name, nak)
            if request is not None:
                self.counts["meter_requests"] += 1
                return request
        elif isinstance(event, Rejected):
            nak = link.rejected(event.reason, event.source)
            if nak is not None:
                self._send(name, nak)
            self.log.event("link.rejected", "debug", link=name, reason=event.reason.name,
                           bytes=event.length)
        elif isinstance(event, LinkDown):
            self.log.event("link.down", "warning", link=name, detail=event.detail)
            self.pump.remove_link(name)
            port = self.ports.pop(name, None)
            if port is not None:
                port.close()
            self.link_down_at[name] = time.monotonic()
        elif isinstance(event, Reply | Timeout):
            pass  # the agent sends no requests to meters (yet): nothing can be pending
        return None

    def _reconnect(self, now: float) -> None:
        if self.console is None and self._console_down_at is not None and \
                now - self._console_down_at >= RECONNECT_S:
            self._console_down_at = now
            try:
                self._open_console(self.link_urls["console"], self.board.links["console"].baud)
                self.log.event("console.reopened")
            except BootError as exc:
                self.log.event("console.reopen_failed", "debug", error=str(exc))
                self._console_down_at = now
        for role, since in list(self.link_down_at.items()):
            if now - since >= RECONNECT_S:
                self.link_down_at[role] = now
                self._open_meter_link(role)

    def _send(self, link: str, frame: Any) -> None:
        if link not in self.ports:
            self.counts["answers_lost_link_down"] += 1
            return
        try:
            self.pump.session(link).send(frame)
        except Exception as exc:  # a full outbox or a closed session: counted, never fatal
            self.counts["answers_dropped"] += 1
            self.log.event("link.send_failed", "warning", link=link, error=str(exc))

    # ======================================================= node <-> runtime

    def feed(self, event: ev.Event) -> None:
        """One event into the node core; carry out its actions (and the blocks they order)."""
        self._run(self.terminal.feed(event))

    def _run(self, actions: list[Action]) -> None:
        while True:
            for action in actions:
                self._action(action)
            blocks = self.ordering.delivered()
            if not blocks:
                return
            actions = []
            for block in blocks:
                actions.extend(self.terminal.deliver(block))
                self.counts["blocks_committed"] += 1

    def _action(self, action: Action) -> None:
        if self.network is not None and self.network.route(action):
            return
        if isinstance(action, Acknowledge | Refuse) and action.request_id in self.operator_waiting:
            self.operator_waiting.pop(action.request_id)(action)
            return
        if isinstance(action, Acknowledge | Refuse):
            for name, link in self.meter_links.items():  # the link holding the request
                frame = link.answer(action)
                if frame is not None:
                    self._send(name, frame)
                    break
            kind = "meter.ack" if isinstance(action, Acknowledge) else "meter.nak"
            fields: dict[str, object] = {"meter": action.meter_id, "op": action.op.value,
                                         "request": action.request_id}
            if isinstance(action, Acknowledge):
                fields.update(version=action.key_version, height=action.height)
            else:
                fields.update(reason=action.reason.name, detail=action.detail)
            self.log.event(kind, "debug" if action.op.value == "reading" else "info", **fields)
        elif isinstance(action, AcceptReading):
            self.journal.accepted(bytes(action.meter_id), action.counter)
            self.counts["readings_accepted"] += 1
            self._keep_reading(action)
            self.log.event("meter.reading", "debug", meter=action.meter_id,
                           counter=action.counter, bytes=len(action.plaintext))
        elif isinstance(action, SubmitBlock):
            self.ordering.submit(action.block)
        elif isinstance(action, RequestEndorsements):
            if action.peers:  # a fleet of one has no one to ask
                self.log.event("node.no_peers", "error", peers=list(action.peers))
        elif isinstance(action, AnswerQuery):
            pass  # queries come from the console, which reads the index itself
        else:
            self.counts[f"unrouted_{type(action).__name__}"] += 1
            self.log.event("node.unrouted", "warning", action=type(action).__name__)

    # ========================================================= console API

    def query(self, meter_id: bytes) -> Any:
        return query(self.chain, meter_id, self.terminal.id, with_record=True)

    def key_fingerprint(self, meter_id: bytes, version: int) -> bytes | None:
        key = self._key_for(meter_id, version)
        return None if key is None else fingerprint(key)

    def request_stop(self, status: int = 0) -> None:
        self.stopping = True
        self.exit_status = status

    def operator_request(self, make: Any, done: Any) -> None:
        """An operator's request into the node core (``make(request_id)`` builds the event);
        ``done`` gets its Acknowledge or Refuse."""
        self.operator_ids += 1
        self.operator_waiting[self.operator_ids] = done
        self.feed(make(self.operator_ids))

    def fetch_key(self, meter_id: bytes, done: Any) -> None:
        """Ask for ``meter_id``'s key wrapped to this terminal, wherever it is held."""
        out = self.queries.ask(meter_id, self.opts.node, _clock(), done)
        for to, m in out:
            if self.network is not None:
                self.network.send(to, m)

    def open_fetched(self, meter_id: bytes, key_version: int, envelope: bytes) -> bytes:
        """A fetched key's envelope opened with this terminal's transport key."""
        return open_envelope(self.secrets.transport, envelope, meter_id=meter_id,
                             key_version=key_version, requester_id=self.opts.node.encode())

    @property
    def synced(self) -> bool:
        """Current with the fleet: a fleet of one always is; a networked terminal once its
        ordering read is done, etcd answers and no known block waits (agent/network.py)."""
        return self.network is None or self.network.synced

    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    # ========================================================== shutdown

    def shutdown(self) -> None:
        self.log.event("agent.stop", status=self.exit_status, height=self.chain.height)
        if self.network is not None:
            self.network.close()
        for role in list(self.pump.links):
            self.pump.remove_link(role)
        for port in self.ports.values():
            port.close()
        if self.console is not None:
            self._console_flush()
            self.console.close()
        self.pump.close()
        logging.getLogger("edgekey").removeHandler(self._log_handler)
        self.journal.flush()
        self.device.close()


def _flash_size(path: Path) -> int:
    """An image file's length or a flash device's (/dev/vda on the QEMU board): the end."""
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def _genesis_hash(block: Block) -> bytes:
    return header_hash(block.header)


def _clock() -> ev.Time:
    return ev.Time(time.monotonic(), int(time.time() * 1000))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agent", description="edgekey terminal agent: boot the board's flash, "
                                            "serve its meter links and console")
    parser.add_argument("--board", required=True,
                        help="board file, or a name under board_configs/ (pl-terminal, ...)")
    parser.add_argument("--check", action="store_true",
                        help="validate the board file and exit")
    parser.add_argument("--node", help="this terminal's id (as provisioned)")
    parser.add_argument("--flash", type=Path, help="the flash image (or device)")
    parser.add_argument("--links", nargs="*", default=[], metavar="ROLE=URL",
                        help="override a board link's URL for this run (emulation)")
    parser.add_argument("--trust", type=Path, default=Path(DEFAULT_TRUST),
                        help=f"the utility's Ed25519 public key (default {DEFAULT_TRUST})")
    parser.add_argument("--device-key", type=Path, default=Path(DEFAULT_DEVICE_KEY),
                        help=f"the device key file (default {DEFAULT_DEVICE_KEY})")
    parser.add_argument("--format", action="store_true",
                        help="lay the fleet's genesis on a blank ledger partition (refused when "
                             "it holds data)")
    parser.add_argument("--format-if-blank", action="store_true",
                        help="lay the genesis only if the ledger partition is blank, else boot "
                             "as usual (a board's unattended first boot)")
    parser.add_argument("--tls-dir", type=Path, default=Path(DEFAULT_TLS_DIR),
                        help="the fleet CA and this terminal's certificate: ca.crt, NODE.crt, "
                             f"NODE.key (default {DEFAULT_TLS_DIR})")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help="override the board's [ledger] checkpoint_every (emulation, tests)")
    parser.add_argument("--route-method", choices=("direct", *ROUTE_METHODS),
                        default="direct",
                        help="how messages between terminals travel: straight to their "
                             "destination (direct, the default), or along the WAN mesh by the "
                             "router's method (greedy: the paper's eq. 9; shortest, "
                             "reliability, residual: baselines)")
    parser.add_argument("--wan-rate-mbit", type=float, default=None, metavar="MBIT",
                        help="emulate WAN links: shape every peer connection to this rate "
                             "(the board's [wan] rate_mbit_s is the paper's 25)")
    parser.add_argument("--wan-buffer-packets", type=int, default=None, metavar="M",
                        help="an emulated link's buffer in 360-byte packets (default the "
                             "board's [wan] forward_buffer_packets)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        default="info")
    parser.add_argument("--client-address", type=lambda s: int(s, 0),
                        default=DEFAULT_CLIENT_ADDRESS,
                        help="this terminal's DL/T 698.45 client address CA (default 0x01)")
    return parser


def check_board(name: str) -> int:
    try:
        board = load_board(board_path(name))
    except BoardConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    parts = ", ".join(f"{p.name} {p.size_mib} MiB" for p in board.flash.partitions)
    print(f"{board.source}: ok: {board.name}: {board.cpu.arch} {board.cpu.cores}x"
          f"{board.cpu.mhz} MHz, RAM {board.ram.total_mib} MiB (agent {board.ram.agent_budget_mib}"
          f" MiB), flash {board.flash.size_mib} MiB [{parts}], links "
          f"{', '.join(sorted(board.links))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check:
        return check_board(args.board)
    if not args.node or not args.flash:
        parser.error("--node and --flash are required to run (or --check to validate a board)")
    try:
        opts = Options(args.board, args.node, args.flash, parse_links(args.links), args.trust,
                       args.device_key, args.format, args.log_level, args.client_address,
                       tls_dir=args.tls_dir, checkpoint_every=args.checkpoint_every,
                       route_method=args.route_method, wan_rate_mbit=args.wan_rate_mbit,
                       wan_buffer_packets=args.wan_buffer_packets,
                       format_if_blank=args.format_if_blank)
        agent = Agent(opts, argv)
    except BootError as exc:
        print(f"edgekey agent: refused to start: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        # RLIMIT_DATA (hal.ram) stopped the boot: the chain's index does not fit.
        budget_mib = load_board(board_path(opts.board)).ram.agent_budget_mib
        print(f"edgekey agent: refused to start: booting {opts.flash} needs more RAM than the "
              f"board's agent budget of {budget_mib} MiB: the chain's meter index does not fit",
              file=sys.stderr)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.request_stop(0))
    status = agent.serve()
    if status == REEXEC_STATUS:
        args_again = [a for a in argv if a != "--format"]
        os.execv(sys.executable, [sys.executable, "-m", "agent", *args_again])
    return status
