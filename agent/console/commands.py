"""The terminal's console commands: what an engineer asks a running agent.

Each handler reads the agent's state (chain index, key store, links,
journal, RAM) and returns text for people and, with ``--json``, data for
scripts. No handler changes a key or the chain: key operations come from
meters and the ledger only. ``reboot`` stops the agent cleanly and starts
it again. Handlers are cheap (an index lookup, a counter snapshot) except
``ledger verify`` and ``keys history``, which read flash and say so.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from agent.console.shell import Call, Command, CommandError, Pending, Reply
from agent.ledger.block import header_hash
from agent.ledger.chain import scan_records
from agent.ledger.state import MeterStatus
from agent.ledger.tx import encode_tx
from hal.ids import METER_ID_MAX, METER_ID_MIN

if TYPE_CHECKING:
    from agent.main import Agent

HISTORY_SCAN_LIMIT = 200_000  # records read back at most for one `keys history`
DEFAULT_TAIL = 10
MAX_TAIL = 1000
MAX_LIST = 1000  # meters `keys list` prints at most


def _meter(arg: str) -> bytes:
    try:
        value = bytes.fromhex(arg)
    except ValueError:
        raise CommandError("EINVAL", f"{arg!r} is not a meter id in hex") from None
    if not METER_ID_MIN <= len(value) <= METER_ID_MAX:
        raise CommandError("EINVAL", f"a meter id is {METER_ID_MIN}..{METER_ID_MAX} bytes")
    return value


def _count(args: list[str], default: int, limit: int) -> int:
    if not args:
        return default
    if len(args) != 2 or args[0] != "-n":
        raise CommandError("EINVAL", "usage: -n N")
    try:
        n = int(args[1])
    except ValueError:
        raise CommandError("EINVAL", f"-n wants a number, got {args[1]!r}") from None
    if not 1 <= n <= limit:
        raise CommandError("EINVAL", f"-n must be 1..{limit}")
    return n


def _lines(rows: list[tuple[str, object]]) -> str:
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def build_commands(agent: Agent) -> list[Command]:
    """The command tree bound to one running agent."""

    def status(args: list[str], call: Call) -> Reply:
        chain, node = agent.chain, agent.terminal.node
        tip = chain.state.tip
        usage = agent.ram.usage()
        data = {"node": agent.opts.node, "fleet": agent.provisioning.fleet,
                "provisioning_issued_ms": agent.provisioning.issued_ms,
                "board": agent.board.name, "uptime_s": round(agent.uptime_s(), 1),
                "boot_s": round(agent.boot_s, 3), "height": chain.height,
                "tip": tip.block_hash.hex() if tip else None,
                "meters_on_chain": chain.state.meter_count,
                "keys_held": len(agent.terminal.keys.live_meters()),
                "operations_in_flight": node.inflight,
                "terminals": chain.state.active_count,
                "synced": agent.synced, "proposer": node.proposer,
                "ledger_repaired": None if agent.ledger_repair is None else {
                    "height": agent.ledger_repair.height,
                    "records_lost": agent.ledger_repair.records_lost},
                "rss_bytes": usage.rss_bytes, "ram_budget_bytes": usage.budget_bytes,
                "links": {r: ("up" if r in agent.ports or r == "console" else "down")
                          for r in agent.link_urls}}
        return Reply(_lines(list(data.items())), data)

    def board(args: list[str], call: Call) -> Reply:
        b = agent.board
        data = {"name": b.name, "arch": b.cpu.arch, "cores": b.cpu.cores, "mhz": b.cpu.mhz,
                "ram_mib": b.ram.total_mib, "agent_budget_mib": b.ram.agent_budget_mib,
                "flash_mib": b.flash.size_mib,
                "links": {r: agent.link_urls.get(r, c.url) for r, c in b.links.items()},
                "plc_kbyte_s": [b.plc.rate_min_kbyte_s, b.plc.rate_max_kbyte_s],
                "modem_buffer_bytes": b.plc.modem_buffer_bytes,
                "txs_per_block": b.ledger.txs_per_block,
                "pow_difficulty": b.ledger.pow_difficulty}
        return Reply(_lines(list(data.items())), data)

    def keys_get(args: list[str], call: Call) -> Reply:
        meter_id = _meter(args[0])
        r = agent.query(meter_id)
        held = None
        if r.answer.value == "local" and r.key_version is not None:
            fp = agent.key_fingerprint(meter_id, r.key_version)
            held = fp is not None and fp == r.fingerprint
        data = {"meter": meter_id.hex(), "answer": r.answer.value, "home": r.home,
                "key_version": r.key_version,
                "fingerprint": r.fingerprint.hex() if r.fingerprint else None,
                "height": r.height, "key_held_here": held, "current": agent.synced}
        if r.answer.value == "unknown":
            if not agent.synced:
                raise CommandError("EAGAIN", f"meter {meter_id.hex()} is not on the chain here, "
                                   "and this terminal has not caught up with the fleet")
            raise CommandError("ENOENT", f"meter {meter_id.hex()} is not on the chain")
        if not agent.synced:  # a restarted terminal never passes a stale answer off as current
            data["warning"] = "not caught up with the fleet: this answer may be stale"
        return Reply(_lines(list(data.items())), data)

    def keys_fetch(args: list[str], call: Call) -> Pending:
        """The key wrapped to this terminal by its holder (forwarded when it is another)."""
        from agent.keystore.material import fingerprint
        from agent.keystore.transport import TransportError
        from agent.remotequery import QueryStatus

        meter_id = _meter(args[0])
        pending = Pending()
        codes = {QueryStatus.UNKNOWN_METER: "ENOENT", QueryStatus.NOT_AUTHORISED: "EACCES",
                 QueryStatus.TIMEOUT: "ETIMEDOUT", QueryStatus.KEY_NOT_HELD: "EAGAIN",
                 QueryStatus.NO_ROUTE: "EHOSTUNREACH", QueryStatus.REVOKED: "EKEYREVOKED",
                 QueryStatus.NOT_HOME: "EAGAIN"}

        def done(r: object) -> None:
            status = r.status  # type: ignore[attr-defined]
            if status is not QueryStatus.OK:
                detail = f": {r.detail}" if r.detail else ""  # type: ignore[attr-defined]
                pending.finish(CommandError(codes.get(status, "EIO"),
                                            f"{status.name.lower()}{detail}"))
                return
            try:
                key = agent.open_fetched(meter_id, r.key_version, r.envelope)  # type: ignore[attr-defined]
            except TransportError as exc:
                pending.finish(CommandError("EBADMSG", f"the envelope does not open: {exc}"))
                return
            entry = agent.chain.entry(meter_id)
            fp = fingerprint(key)
            data = {"meter": meter_id.hex(), "home": r.path[-1],  # type: ignore[attr-defined]
                    "key_version": r.key_version, "fingerprint": fp.hex(),  # type: ignore[attr-defined]
                    "matches_chain": entry is not None and entry.fingerprint == fp
                    and entry.key_version == r.key_version,  # type: ignore[attr-defined]
                    "path": list(r.path), "tries": r.tries,  # type: ignore[attr-defined]
                    "elapsed_ms": round(r.elapsed_s * 1000, 2),  # type: ignore[attr-defined]
                    "current": agent.synced}
            pending.finish(Reply(_lines(list(data.items())), data))

        agent.fetch_key(meter_id, done)
        return pending

    def keys_list(args: list[str], call: Call) -> Reply:
        rows = []
        for meter_id in agent.terminal.keys.live_meters()[:MAX_LIST]:
            entry = agent.chain.entry(meter_id)
            rows.append({"meter": bytes(meter_id).hex(),
                         "key_version": entry.key_version if entry else None,
                         "status": entry.status.name.lower() if entry else "not on chain",
                         "height": entry.height if entry else None})
        text = "\n".join(f"{r['meter']}  v{r['key_version']}  {r['status']}  block {r['height']}"
                         for r in rows) or "no keys held"
        return Reply(text, rows)

    def keys_history(args: list[str], call: Call) -> Reply:
        meter_id = _meter(args[0])
        log = agent.chain.log
        scanned = min(HISTORY_SCAN_LIMIT, log.next_seq - log.first_seq)
        rows = [{"op": tx.kind.name.lower(), "key_version": tx.key_version, "home": tx.home,
                 "counter": tx.counter, "fingerprint": tx.fingerprint.hex(), "record": seq}
                for seq, tx in scan_records(log, meter_id, limit=HISTORY_SCAN_LIMIT)]
        rows.reverse()
        if not rows:
            raise CommandError("ENOENT", f"no record of meter {meter_id.hex()} on flash")
        text = "\n".join(f"{r['op']:<8} v{r['key_version']}  home {r['home']}  counter "
                         f"{r['counter']}  fp {r['fingerprint'][:16]}" for r in rows)
        return Reply(text + f"\n({scanned} records read)", rows)

    def ledger_height(args: list[str], call: Call) -> Reply:
        h = agent.chain.height
        return Reply(str(h), {"height": h})

    def _head_row(height: int) -> dict[str, Any]:
        head = agent.chain.head(height)
        h = head.header
        return {"height": h.height, "hash": header_hash(h).hex(), "txs": h.tx_count,
                "timestamp_ms": h.timestamp_ms, "proposer": h.proposer,
                "endorsements": len(head.endorsements)}

    def ledger_tail(args: list[str], call: Call) -> Reply:
        n = _count(args, DEFAULT_TAIL, MAX_TAIL)
        top = agent.chain.height
        rows = []
        if top is not None:
            for height in range(top, max(-1, top - n), -1):
                try:
                    rows.append(_head_row(height))
                except KeyError:
                    break  # compacted into a snapshot
        text = "\n".join(f"{r['height']:>7}  {r['hash'][:16]}  txs {r['txs']:<4} by "
                         f"{r['proposer']}  endorsed {r['endorsements']}" for r in rows)
        return Reply(text or "empty chain", rows)

    def ledger_block(args: list[str], call: Call) -> Reply:
        try:
            height = int(args[0])
            block = agent.chain.block(height)
        except ValueError:
            raise CommandError("EINVAL", f"{args[0]!r} is not a height") from None
        except KeyError as exc:
            raise CommandError("ENOENT", str(exc).strip("'\"")) from None
        row = _head_row(height)
        row["transactions"] = [{"kind": t.kind.name.lower(), "meter": t.meter_id.hex(),
                                "key_version": t.key_version, "home": t.home,
                                "counter": t.counter, **({"digest": t.fingerprint.hex()}
                                                         if t.kind.name == "CHECKPOINT" else {})}
                               for t in block.txs]
        text = _lines([(k, v) for k, v in row.items() if k != "transactions"])
        text += "".join(f"\n  {t['kind']:<12} {t['meter']} v{t['key_version']} {t['home']}"
                        for t in row["transactions"])
        return Reply(text, row)

    def ledger_verify(args: list[str], call: Call) -> Reply:
        try:
            report = agent.chain.verify(deep=True)
        except Exception as exc:
            raise CommandError("EIO", f"verify failed: {type(exc).__name__}: {exc}") from None
        data = {"height": report.height, "blocks": report.blocks_replayed,
                "txs": report.txs_replayed, "snapshot_height": report.snapshot_height,
                "state_digest": agent.chain.state_digest().hex()}
        return Reply(_lines(list(data.items())), data)

    def meters(args: list[str], call: Call) -> Reply:
        data: dict[str, Any] = {"links": {}, "meters": {}}
        for role, link in agent.meter_links.items():
            counters = None
            if role in agent.ports:
                c = agent.pump.session(role).counters()
                counters = {"bytes_rx": c.bytes_rx, "bytes_tx": c.bytes_tx,
                            "frames_rx": c.frames_rx, "frames_tx": c.frames_tx,
                            "rejects": {r.name: n for r, n in c.rejects.items()},
                            "events_dropped": c.events_dropped}
            data["links"][role] = {"url": agent.link_urls[role], "up": role in agent.ports,
                                   "session": counters, "protocol": dict(link.counts),
                                   "outstanding": link.outstanding}
            for meter_id, st in link.meters.items():
                data["meters"][bytes(meter_id).hex()] = st.as_dict() | {"link": role}
        lines = [f"link {r}: {'up' if v['up'] else 'DOWN'} {v['url']}  "
                 + json.dumps(v["session"] or {}, sort_keys=True)
                 for r, v in data["links"].items()]
        lines += [f"{m}  frames {s['frames']}  acks {s['acks']}  naks "
                  f"{sum(s['naks'].values())}  readings {s['readings']}"
                  for m, s in data["meters"].items()]
        return Reply("\n".join(lines), data)

    def place(args: list[str], call: Call) -> Reply:
        me = agent.provisioning.terminal(agent.opts.node)
        state = agent.chain.state
        homed = [m for m in state.meter_ids()
                 if (e := state.meter(m)) is not None and e.home == agent.opts.node
                 and e.status is not MeterStatus.REVOKED] if state.meter_count <= 100_000 \
            else None
        planned = agent.provisioning.homed(agent.opts.node)
        live = len(agent.terminal.keys.live_meters())
        data = {"terminal": me.terminal_id, "site_xy_m": list(me.site),
                "cluster_planned": len(planned), "homed_on_chain": None if homed is None
                else len(homed), "keys_held": live, "capacity": me.capacity,
                "spare_capacity": me.capacity - live}
        placement = agent.placement.status() if agent.placement is not None else {}
        data.update(placement)
        lines = _lines([(k, v) for k, v in data.items() if k != "events"])
        lines += "".join(f"\n{e['event']}: " + ", ".join(f"{k} {v}" for k, v in e.items()
                                                         if k not in ("event", "t"))
                         for e in placement.get("events", []))
        return Reply(lines, data)

    def net(args: list[str], call: Call) -> Reply:
        network, node = agent.network, agent.terminal.node
        if network is None:
            return Reply("a fleet of one: no peers, no ordering service",
                         {"peers": {}, "synced": True})
        peers = {p: {k: v.hex() if isinstance(v, bytes) else v
                     for k, v in network.peers.stats(p).items()}
                 for p in network.peers.peers()}
        ordering = network.ordering
        data = {"synced": agent.synced, "etcd_up": network.etcd_up,
                "etcd_endpoint": ordering.client.endpoint,
                "etcd_endpoints": list(ordering.client.endpoints), "proposer": node.proposer,
                "ordering": dict(ordering.counters), "network": dict(network.counts),
                "transport": dict(network.peers.counters),
                "forwarding": {k: v for k, v in node.counters.items()
                               if k.startswith(("forward", "rounds", "proposer", "evidence"))},
                "endorsing": {k: v for k, v in node.counters.items() if k.startswith("endorse")},
                "evidence": len(node.evidence), "peers": peers}
        rows: list[tuple[str, object]] = [(k, v) for k, v in data.items() if k != "peers"]
        rows += [(f"peer {p}", "up" if st.get("connected") else "down") for p, st in
                 peers.items()]
        return Reply(_lines(rows), data)

    def net_evidence(args: list[str], call: Call) -> Reply:
        rows = [{"signer": e.signer, "meter": e.meter_id.hex(), "key_version": e.key_version,
                 "height": e.height, "first": encode_tx(e.first).hex(),
                 "second": encode_tx(e.second).hex()} for e in agent.terminal.node.evidence]
        text = "\n".join(f"{r['signer']} signed two operations on {r['meter']} v"
                         f"{r['key_version']} (height {r['height']})" for r in rows)
        return Reply(text or "no equivocation seen", {"evidence": rows})

    def member_list(args: list[str], call: Call) -> Reply:
        rows = [{"terminal": i.terminal_id, "active": i.active, "added": i.added_height,
                 "retired": i.retired_height} for i in agent.chain.state.terminals_in_order()]
        text = "\n".join(f"{r['terminal']:<12} {'active' if r['active'] else 'retired':<8} "
                         f"added {r['added']}" + (f", retired {r['retired']}"
                                                  if r["retired"] is not None else "")
                         for r in rows)
        return Reply(text, {"terminals": rows, "active": agent.chain.state.active_count})

    def member_change(terminal: str, make: Any) -> Pending:
        """An operator's membership change; answered once it commits (or is refused)."""
        return committed(make, lambda a: {"terminal": terminal, "height": a.height,
                                          "active": agent.chain.state.active_count})

    def committed(make: Any, describe: Any) -> Pending:
        """An operator's request through the majority; answered once it commits (``describe``
        of the acknowledgement) or is refused (an errno and the reason)."""
        from agent.node.actions import Acknowledge

        pending = Pending()

        def done(a: object) -> None:
            if isinstance(a, Acknowledge):
                data = describe(a)
                pending.finish(Reply(_lines(list(data.items())), data))
            else:
                why = a.reason.name.lower()  # type: ignore[attr-defined]
                if a.ledger_reason is not None:  # type: ignore[attr-defined]
                    why += f" ({a.ledger_reason.name.lower()})"  # type: ignore[attr-defined]
                pending.finish(CommandError("EPERM" if a.reason.name == "LEDGER_REFUSED"  # type: ignore[attr-defined]
                                            else "EINVAL" if a.reason.name == "BAD_REQUEST"  # type: ignore[attr-defined]
                                            else "EAGAIN", f"{why}: {a.detail}"))  # type: ignore[attr-defined]

        agent.operator_request(make, done)
        return pending

    def keys_migrate(args: list[str], call: Call) -> Pending:
        """MIGRATE a meter homed here to another terminal: committed through the majority,
        then its key handed over wrapped to the new home, which acknowledges it."""
        from agent.node import events as ev

        meter_id, to = _meter(args[0]), args[1]
        before = agent.query(meter_id)
        return committed(lambda rid: ev.MigrateRequest(meter_id, rid, to),
                         lambda a: {"meter": meter_id.hex(), "from": before.home, "to": to,
                                    "key_version": a.key_version, "height": a.height})

    def member_retire(args: list[str], call: Call) -> Pending:
        """Propose TERMINAL_RETIRE of a terminal the utility's provisioning withdrew."""
        from agent.node import events as ev

        return member_change(args[0], lambda rid: ev.RetireRequest(args[0], rid))

    def member_add(args: list[str], call: Call) -> Pending:
        """Propose TERMINAL_ADD of a terminal the utility's provisioning lists, with its key."""
        from agent import provisioning as prov
        from agent.node import events as ev

        try:
            entry = agent.provisioning.terminal(args[0])
        except prov.ProvisioningError as exc:
            raise CommandError("ENOENT", f"{exc} (the utility's provisioning update comes "
                               "first: edgekey fleet add)") from None
        return member_change(args[0], lambda rid: ev.AddRequest(args[0], entry.identity_public,
                                                                rid))

    def route(args: list[str], call: Call) -> Reply:
        others = [t for t in agent.chain.state.active_terminals() if t != agent.opts.node]
        if not others:
            return Reply("no other terminals: a fleet of one routes nothing",
                         {"paths": {}, "terminals": 1})
        network = agent.network
        routes = None if network is None else network.routes
        if routes is None:
            return Reply("\n".join(f"{agent.opts.node} -> {t}: direct (--route-method direct)"
                                   for t in others),
                         {"method": "direct", "paths": {t: [agent.opts.node, t] for t in others}})
        data = routes.table()
        data["overlay"] = dict(network.overlay.counters) if network.overlay else {}
        lines = [f"method {data['method']}, neighbours {', '.join(data['neighbours'])}; "
                 f"eq. 8 of the measured links {data['load_balance_degree']:.4g}"]
        lines += [f"{agent.opts.node} -> {t}: " + (" > ".join(data["paths"][t])
                                                   if t in data["paths"] else "no route")
                  for t in others]
        for lk in data["links"]:
            if lk["measured_bps"] is not None:
                lines.append(f"link {lk['link']}: {lk['measured_bps'] / 1e3:.1f} kbit/s of "
                             f"{lk['capacity_bps'] / 1e6:g} Mbit/s"
                             + (", DOWN" if lk["down"] else "")
                             + (f", delivery {lk['delivery']:.3f}" if lk["delivery"] else ""))
        return Reply("\n".join(lines), data)

    def flash(args: list[str], call: Call) -> Reply:
        rows = {}
        parts = {"ledger": agent.chain.log, "keystore": agent.terminal.keys.log,
                 "journal": agent.journal.log}
        for name, log in parts.items():
            st = log.stats()
            rows[name] = {"segments": st.segments, "used": st.used_segments,
                          "records": st.records, "free_bytes": st.payload_bytes_free,
                          "wear_min": st.erase_min, "wear_max": st.erase_max}
        for p in agent.board.flash.partitions:
            rows.setdefault(p.name, {}).update(offset_mib=p.offset_mib, size_mib=p.size_mib)
        text = "\n".join(f"{n:<9} {v['offset_mib']:>4}+{v['size_mib']:<4} MiB"
                         + (f"  used {v['used']}/{v['segments']} segments, {v['records']} "
                            f"records, wear {v['wear_min']}..{v['wear_max']}"
                            if "segments" in v else "") for n, v in rows.items())
        return Reply(text, rows)

    def mem(args: list[str], call: Call) -> Reply:
        u = agent.ram.usage()
        lim = agent.ram_limit
        data = {"rss_bytes": u.rss_bytes, "peak_rss_bytes": u.peak_rss_bytes,
                "data_bytes": u.data_bytes, "budget_bytes": u.budget_bytes,
                "fraction": round(u.fraction, 4),
                "rlimit_data_soft": lim.soft_bytes if lim else None,
                "enforced": bool(lim and lim.effective), "source": u.source}
        return Reply(str(u), data)

    def log_(args: list[str], call: Call) -> Reply:
        n = _count(args, 20, MAX_TAIL)
        lines = agent.journal.tail(n)
        return Reply("\n".join(lines), [json.loads(x) if x.startswith("{") else x
                                        for x in lines])

    def reboot(args: list[str], call: Call) -> Reply:
        from agent.main import REEXEC_STATUS
        agent.request_stop(REEXEC_STATUS)
        agent.log.event("agent.reboot", source="console")
        return Reply("rebooting")

    def update_status(args: list[str], call: Call) -> Reply:
        try:
            data = agent.updater.status()
        except (OSError, ValueError) as exc:  # the boot partition unreadable: say so
            raise CommandError("EIO", f"boot state: {exc}") from None
        text = "\n".join(data["lines"])
        inst = data.get("install")
        if inst:
            text += (f"\ninstall of {inst['bundle']}: {inst['state']}"
                     + (f" in {inst['seconds']} s" if inst["seconds"] is not None else "")
                     + (f": {inst['last']}" if inst["last"] else ""))
            text += "".join(f"\n  rauc: {line}" for line in inst.get("service", []))
        return Reply(text, data)

    def update_install(args: list[str], call: Call) -> Reply:
        from agent.update import UpdateRefused
        try:
            inst = agent.updater.start(args[0])
        except UpdateRefused as exc:
            raise CommandError("EPERM", str(exc)) from None
        agent.log.event("update.install", bundle=args[0], pid=inst.proc.pid)
        return Reply(f"installing {args[0]} (rauc pid {inst.proc.pid}); see update status",
                     {"bundle": args[0], "pid": inst.proc.pid})

    def update_reboot(args: list[str], call: Call) -> Reply:
        from agent.update import REBOOT_BOARD_STATUS
        inst = agent.updater.install
        if inst is not None and inst.poll() is None:
            raise CommandError("EBUSY", f"an install of {inst.bundle} is running")
        agent.request_stop(REBOOT_BOARD_STATUS)
        agent.log.event("agent.reboot_board", source="console")
        return Reply("rebooting the board")

    return [
        Command("status", "node, chain, keys, links and RAM at a glance", status, json=True),
        Command("board", "the board this agent runs on", board, json=True),
        Command("keys", "meter keys (fingerprints only; no key leaves the store)", subcommands=(
            Command("get", "where a meter's key is and which it is: keys get <meter hex>",
                    keys_get, mandatory=1, json=True),
            Command("list", "meters whose keys this terminal holds", keys_list, json=True),
            Command("fetch", "a meter's key from its holder, wrapped to this terminal (only its "
                    "fingerprint is shown): keys fetch <meter hex>", keys_fetch, mandatory=1,
                    json=True),
            Command("migrate", "re-home a meter held here (endorsed by the majority, its key "
                    "handed over): keys migrate <meter hex> <terminal>", keys_migrate, mandatory=2,
                    json=True),
            Command("history", "a meter's key operations on flash: keys history <meter hex>",
                    keys_history, mandatory=1, json=True),
        )),
        Command("ledger", "the chain on this terminal's flash", subcommands=(
            Command("height", "the tip's height", ledger_height, json=True),
            Command("tail", "the newest blocks: ledger tail [-n N]", ledger_tail, optional=2,
                    json=True),
            Command("verify", "re-read and re-check the whole chain on flash", ledger_verify,
                    json=True),
            Command("block", "one block and its transactions: ledger block <height>",
                    ledger_block, mandatory=1, json=True),
        )),
        Command("meters", "meter links and per-meter counters", meters, json=True),
        Command("place", "this terminal's cluster, site and spare capacity", place, json=True),
        Command("route", "paths to the other terminals", route, json=True),
        Command("net", "peers, the ordering service and whether this terminal is current",
                net, json=True),
        Command("evidence", "equivocations seen here, with both signed transactions",
                net_evidence, json=True),
        Command("member", "the fleet's membership on the chain", subcommands=(
            Command("list", "every terminal, active or retired, with its heights", member_list,
                    json=True),
            Command("add", "add a terminal the utility's provisioning lists (endorsed by the "
                    "majority like any operation): member add <terminal>", member_add,
                    mandatory=1, json=True),
            Command("retire", "retire a terminal (endorsed by the majority like any "
                    "operation): member retire <terminal>", member_retire, mandatory=1,
                    json=True),
        )),
        Command("flash", "partitions, use and wear", flash, json=True),
        Command("mem", "RAM use against the board's budget", mem, json=True),
        Command("log", "the newest log lines: log [-n N]", log_, optional=2, json=True),
        Command("reboot", "stop cleanly and start again", reboot),
        Command("update", "signed A/B updates (RAUC)", subcommands=(
            Command("status", "the A/B boot state and the last install", update_status,
                    json=True),
            Command("install", "install a RAUC bundle into the inactive slot: update install "
                    "<file>", update_install, mandatory=1, json=True),
            Command("reboot", "reboot the board into the slot its bootloader chooses",
                    update_reboot),
        )),
    ]
