"""``edgekey provision``: what a utility makes before a fleet is switched on, and as it changes.

``new`` plans the meters (K-means + medoid, agent/placement) and makes,
under DIR:

- the utility's signing key (``utility.key``, ``utility.pub``: the key the
  terminals trust) and the signed provisioning (``provisioning.json``): the
  fleet, its genesis block (every founding terminal's TERMINAL_ADD,
  endorsed by a majority of them), every terminal's identity and transport
  public keys, every meter with its factory key sealed to its home;
- the fleet CA and certificates (``tls/``): one per terminal (its peer TLS
  and etcd client identity), one per etcd voting member, one for the
  master station (``station``: it publishes provisioning updates and
  connects to terminals as a client); the station's X25519 transport key
  (``station.key``; its public half is in the provisioning, so keys can be
  wrapped to it);
- one flash image per terminal of its board's size, the provisioning and
  the terminal's secrets (sealed under its device key) on its config
  partition; the device keys; each home's meters with their factory keys
  (the emulated meters' side);
- ``fleet.json``: the fleet description ``edgekey fleet up`` starts.

``add`` and ``retire`` change a fleet as a utility does: a newer provisioning
that lists one more terminal (its identity, transport key, certificate,
peer address, image; optionally an etcd member of its own) or withdraws
one, signed again by the utility. The document is amended, never remade:
every existing entry stays byte for byte, which is what a running terminal
checks before it believes an update (``agent.provisioning.check_update``).
``publish`` writes the newest provisioning into etcd, where every running
terminal sees it (agent/net/provfeed.py). The ledger change itself
(TERMINAL_ADD, TERMINAL_RETIRE, endorsed by the majority) is asked of a
terminal's console: ``edgekey fleet add`` and ``fleet retire`` do all of it.

Every secret is derived from ``--seed`` so runs are reproducible; a real
utility would keep them in its HSM. Images and keys are written 0600.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from emulator.etcd import free_port
from emulator.netns import NetnsPlan

AREA_M = 1000.0  # meters spread over a square of this side around the terminal
STATION = "station"  # the master station's certificate CN (never a terminal id)


def derive(seed: int, label: str) -> bytes:
    """A fleet's secret of one kind, from its seed (the emulated utility's key store)."""
    return hashlib.sha256(f"edgekey fleet {seed} {label}".encode()).digest()


def meter_id(i: int) -> bytes:
    """A 6-byte meter address, BCD digits as DL/T 698.45 meters print theirs."""
    return bytes.fromhex(f"{i + 1:012d}")


def _ports_of(network: dict) -> set[int]:
    """The ports a provisioning document's network section already uses."""
    urls = [*network["peers"].values(), *network["etcd"]]
    urls += [m[k] for m in network["members"].values() for k in ("client", "peer")]
    return {int(str(u).rsplit(":", 1)[1]) for u in urls}


def _network(directory: Path, ids: list[str], fleet_name: str, members: int,
             plan: NetnsPlan | None = None) -> tuple:
    """The fleet CA and certificates under DIR/tls, ports, etcd members: (Network, etcd dict).

    On loopback every listener takes a free port; in namespaces each terminal has its own
    address and the usual ports (peers 7100, etcd 2379 and 2380)."""
    from agent import provisioning as prov
    from agent.net.pki import FleetCA, sha256_pem

    tls = directory / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    ca = FleetCA.create(fleet_name)
    ca.write(tls)
    taken: set[int] = set()

    def host(t: str) -> str:
        return plan.address(t) if plan is not None else "127.0.0.1"

    def port(fixed: int) -> int:
        return fixed if plan is not None else free_port(taken)

    for t in ids:
        ca.issue(t, ips=(host(t), "127.0.0.1")).write(tls, t)
    ca.issue(STATION).write(tls, STATION)  # the master station's etcd client identity
    peers = {t: (host(t), port(7100)) for t in ids}
    voting = {}
    for i, t in enumerate(ids[:members]):
        name = f"m{i}"
        ca.issue(name, ips=(host(t), "127.0.0.1")).write(tls, name)
        voting[t] = {"name": name, "client": f"https://{host(t)}:{port(2379)}",
                     "peer": f"https://{host(t)}:{port(2380)}"}
    network = prov.Network(sha256_pem(ca.cert_pem), tuple(m["client"] for m in voting.values()),
                           peers, voting)
    return network, voting


def provision_fleet(directory: Path, *, terminals: int, meters: int, board_name: str,
                    seed: int, etcd_members: int | None = None, netns: bool = False) -> dict:
    """Keys, plan, signed provisioning and one flash image per terminal; the fleet description."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from agent import provisioning as prov
    from agent.keystore.transport import public_bytes
    from agent.ledger.block import genesis
    from agent.ledger.identity import TerminalIdentity
    from agent.placement.place import place
    from agent.placement.plan import DEFAULT_CAP
    from hal.board import board_path, load_board

    board = load_board(board_path(board_name))
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    points = rng.uniform(0.0, AREA_M, size=(meters, 2))
    cap = max(DEFAULT_CAP, -(-meters // terminals))
    p = place(points, k=terminals, cap=cap, seed=seed)
    utility = Ed25519PrivateKey.from_private_bytes(derive(seed, "utility"))
    raw = serialization.Encoding.Raw
    _secret_file(directory / "utility.key", utility.private_bytes(
        raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()).hex())
    (directory / "utility.pub").write_text(utility.public_key().public_bytes(
        raw, serialization.PublicFormat.Raw).hex() + "\n")
    ids = [f"ecd-{i:02d}" for i in range(terminals)]
    identities = {t: TerminalIdentity.from_seed(t, derive(seed, f"identity {t}")) for t in ids}
    transports = {t: X25519PrivateKey.from_private_bytes(derive(seed, f"transport {t}"))
                  for t in ids}
    now_ms = int(time.time() * 1000)
    block0 = genesis(identities[ids[0]], [(t, identities[t].public_bytes()) for t in ids],
                     timestamp_ms=now_ms, endorsers=[identities[t] for t in
                                                     ids[:terminals // 2 + 1]],
                     difficulty=board.ledger.pow_difficulty)
    entries = [prov.TerminalEntry(t, identities[t].public_bytes(), public_bytes(transports[t]),
                                  tuple(float(v) for v in p.centres[i]), cap)  # type: ignore[arg-type]
               for i, t in enumerate(ids)]
    factory = {meter_id(i): derive(seed, f"factory {i}") for i in range(meters)}
    network, voting = None, {}
    plan = NetnsPlan.for_directory(str(directory.resolve()), ids) if netns else None
    if terminals > 1:
        members = etcd_members or (3 if terminals >= 3 else 1)
        network, voting = _network(directory, ids, directory.name, min(members, terminals),
                                   plan)
    rows = [(meter_id(i), ids[int(p.assign[i])], (float(points[i, 0]), float(points[i, 1])),
             factory[meter_id(i)]) for i in range(meters)]
    station = X25519PrivateKey.from_private_bytes(derive(seed, f"transport {STATION}"))
    _secret_file(directory / f"{STATION}.key", derive(seed, f"transport {STATION}").hex())
    document = prov.document_for(fleet=directory.name, board=board.name,
                                 layout=prov.flash_layout(board.flash), issued_ms=now_ms,
                                 genesis=block0, terminals=entries, meters=rows,
                                 network=network, station=(STATION, public_bytes(station)))
    signed = prov.sign(document, utility)
    (directory / "provisioning.json").write_bytes(signed)
    fleet: dict = {"board": board.name, "seed": seed, "terminals": [], "processes": {},
                   "etcd": {"members": voting,
                            "endpoints": list(network.etcd) if network else []},
                   "netns": plan.to_json() if plan is not None else None}
    for t in ids:
        homed = [{"id": m.hex(), "factory_key": factory[m].hex()}
                 for m, home, _xy, _k in rows if home == t]
        fleet["terminals"].append(_terminal_files(directory, board, seed, t, signed, homed,
                                                  voting.get(t)))
    return fleet


def _terminal_files(directory: Path, board: Any, seed: int, tid: str, signed: bytes,
                    homed: list[dict], etcd: dict | None) -> dict:
    """One terminal's flash image (provisioning and sealed secrets on its config partition),
    device key and meters file; its entry in fleet.json."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from agent import provisioning as prov
    from hal.blockdev import FileBlockDevice, open_partition
    from tools.flash_tool import create

    image = directory / f"{tid}.img"
    devkey = directory / f"{tid}.devkey"
    device_key = derive(seed, f"device {tid}")
    _secret_file(devkey, device_key, binary=True)
    if image.exists():
        image.unlink()
    create(image, board)
    transport = X25519PrivateKey.from_private_bytes(derive(seed, f"transport {tid}"))
    sealed = prov.seal_secrets(device_key, tid, derive(seed, f"identity {tid}"), transport,
                               nonce=derive(seed, f"secrets nonce {tid}")[:12])
    with FileBlockDevice(image, board.flash.erase_block_bytes) as dev:
        prov.install(open_partition(dev, board.flash, "config"), signed, sealed)
    meters_file = directory / f"{tid}.meters.json"
    _secret_file(meters_file, json.dumps(homed, indent=1))
    return {"id": tid, "flash": str(image), "device_key": str(devkey),
            "meters_file": str(meters_file), "meters": len(homed), "etcd": etcd}


def _secret_file(path: Path, content: str | bytes, *, binary: bool = False) -> None:
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())




# ====================================================== changing a fleet

def _utility(directory: Path) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        raw = bytes.fromhex((directory / "utility.key").read_text().strip())
    except FileNotFoundError:
        raise SystemExit(f"edgekey provision: no utility key in {directory} "
                         "(edgekey provision new)") from None
    return Ed25519PrivateKey.from_private_bytes(raw)


def _document(directory: Path) -> dict:
    """The provisioning in force, checked under the utility's public key."""
    from agent import provisioning as prov

    data = (directory / "provisioning.json").read_bytes()
    prov.verify(data, bytes.fromhex((directory / "utility.pub").read_text().strip()))
    return json.loads(data)["document"]


def _issue(directory: Path, document: dict) -> int:
    """Sign the amended ``document`` as newer than the one it amends; write it; its stamp."""
    from agent import provisioning as prov

    document["issued_ms"] = max(int(time.time() * 1000), int(document["issued_ms"]) + 1)
    tmp = directory / "provisioning.json.tmp"
    tmp.write_bytes(prov.sign(document, _utility(directory)))
    os.replace(tmp, directory / "provisioning.json")
    return int(document["issued_ms"])


def _load_fleet(directory: Path) -> dict:
    try:
        return json.loads((directory / "fleet.json").read_text())
    except FileNotFoundError:
        raise SystemExit(f"edgekey provision: no fleet in {directory} "
                         "(edgekey provision new)") from None


def write_fleet(directory: Path, fleet: dict) -> None:
    tmp = directory / "fleet.json.tmp"
    tmp.write_text(json.dumps(fleet, indent=1))
    os.replace(tmp, directory / "fleet.json")


def add_terminal(directory: Path, *, etcd_member: bool = False,
                 site: tuple[float, float] | None = None) -> dict:
    """One more terminal in the provisioning (amended and signed again) and its files; its
    fleet.json entry (also written there, with ``issued_ms`` of the new provisioning).

    ``etcd_member``: it hosts an etcd voting member of its own (replacing a retired voting
    terminal); the member still has to be announced to etcd and started (``fleet add``)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from agent.keystore.transport import public_bytes
    from agent.ledger.identity import TerminalIdentity
    from agent.net.pki import FleetCA
    from hal.board import board_path, load_board

    fleet = _load_fleet(directory)
    if fleet.get("netns"):
        raise SystemExit("edgekey provision: adding a terminal to a --netns fleet is not "
                         "supported (its namespaces are laid out at up)")
    document = _document(directory)
    if "network" not in document:
        raise SystemExit("edgekey provision: a fleet of one terminal has no network to join")
    seed = int(fleet["seed"])
    taken = {t["id"] for t in document["terminals"]}
    tid = next(f"ecd-{i:02d}" for i in range(len(taken), 10_000) if f"ecd-{i:02d}" not in taken)
    identity = TerminalIdentity.from_seed(tid, derive(seed, f"identity {tid}"))
    transport = X25519PrivateKey.from_private_bytes(derive(seed, f"transport {tid}"))
    sites = np.array([t["site"] for t in document["terminals"]], dtype=float)
    where = site if site is not None else tuple(float(v) for v in sites.mean(axis=0))
    document["terminals"].append({"id": tid, "identity": identity.public_bytes().hex(),
                                  "transport": public_bytes(transport).hex(),
                                  "site": list(where),
                                  "capacity": document["terminals"][0]["capacity"]})
    tls = directory / "tls"
    ca = FleetCA.load((tls / "ca.key").read_bytes(), (tls / "ca.crt").read_bytes())
    ca.issue(tid).write(tls, tid)
    network = document["network"]
    taken = _ports_of(network)
    network["peers"][tid] = f"127.0.0.1:{free_port(taken)}"
    member = None
    if etcd_member:
        names = {m["name"] for m in network["members"].values()} | set(
            fleet.get("etcd", {}).get("retired_members", []))
        name = next(f"m{i}" for i in range(100) if f"m{i}" not in names)
        ca.issue(name).write(tls, name)
        member = {"name": name, "client": f"https://127.0.0.1:{free_port(taken)}",
                  "peer": f"https://127.0.0.1:{free_port(taken)}"}
        network["members"][tid] = member
        network["etcd"].append(member["client"])
    issued = _issue(directory, document)
    board = load_board(board_path(fleet["board"]))
    entry = _terminal_files(directory, board, seed, tid,
                            (directory / "provisioning.json").read_bytes(), [], member)
    entry["added_ms"] = issued
    fleet["terminals"].append(entry)
    if member is not None:
        fleet["etcd"]["members"][tid] = member
        fleet["etcd"]["endpoints"].append(member["client"])
    write_fleet(directory, fleet)
    return entry


def _placement(document: dict, names: list[str]) -> Any:
    """The desk's copy of the fleet's placement: the provisioned meters at their homes."""
    from agent.placement.rehome import Placement

    index = {t: i for i, t in enumerate(names)}
    sites = {t["id"]: t["site"] for t in document["terminals"]}
    rows = [m for m in document["meters"] if m["home"] in index]
    cap = min(t["capacity"] for t in document["terminals"] if t["id"] in index)
    return Placement.from_assignment(
        [m["id"] for m in rows], np.array([m["xy"] for m in rows], dtype=float).reshape(-1, 2),
        np.array([index[m["home"]] for m in rows], dtype=np.int64),
        [sites[t] for t in names], cap=max(cap, max(
            (sum(1 for m in rows if m["home"] == t) for t in names), default=0)))


def _heard_by(plan: Any, names: list[str], mid: bytes, point: Any) -> str:
    """The terminal a new meter is put with: where the placement homes it (the terminal will
    check it with its own replica), or the nearest planned site when it needs a re-plan."""
    from agent.placement.rehome import Assigned

    events = plan.join(mid.hex(), point)
    assigned = next((e for e in events if isinstance(e, Assigned)), None)
    if assigned is not None:
        return names[assigned.terminal]
    sites = np.array([plan.site(t) for t in range(plan.terminals)], dtype=float)
    return names[int(np.argmin(np.hypot(*(sites - point).T)))]


def add_meters(directory: Path, count: int, *, seed: int | None = None) -> list[dict]:
    """``count`` new meters in the provisioning (amended, signed again): positions drawn in
    the area of the meters already there (seeded), each put with the terminal the desk's copy
    of the placement homes it at (its factory key sealed to that terminal, whose PLC hears
    it). That terminal checks the join against its own replica, built from the chain, when
    the meter registers (agent/rehoming.py). The new meters: id, home, xy, factory_key."""
    from agent import provisioning as prov
    from agent.keystore.transport import AllowList, seal_envelope

    fleet = _load_fleet(directory)
    document = _document(directory)
    retired = set(document.get("retired", []))
    sites = {t["id"]: t["site"] for t in document["terminals"] if t["id"] not in retired}
    if count < 1 or not sites:
        raise SystemExit("edgekey provision: meters to add need a count >= 1 and a terminal")
    xy = np.array([m["xy"] for m in document["meters"]] or list(sites.values()), dtype=float)
    low, high = xy.min(axis=0), xy.max(axis=0)
    taken = {m["id"] for m in document["meters"]}
    first = len(taken)
    rng = np.random.default_rng([int(fleet["seed"]) if seed is None else seed, first])
    allow = AllowList({t["id"].encode(): bytes.fromhex(t["transport"])
                       for t in document["terminals"]})
    names = sorted(sites)
    plan = _placement(document, names)
    out = []
    i = first
    while len(out) < count:
        mid = meter_id(i)
        i += 1
        if mid.hex() in taken:
            continue
        point = rng.uniform(low, high)
        home = _heard_by(plan, names, mid, point)
        factory = derive(int(fleet["seed"]), f"factory {i - 1}")
        sealed = seal_envelope(factory, meter_id=mid, key_version=prov.FACTORY_KEY_VERSION,
                               requester_id=home.encode(), allow_list=allow)
        row = {"id": mid.hex(), "home": home, "xy": [float(point[0]), float(point[1])],
               "factory_key": sealed.hex()}
        document["meters"].append(row)
        out.append(dict(row, factory_key=factory.hex()))
    _issue(directory, document)
    return out


def retire_terminal(directory: Path, tid: str) -> int:
    """Withdraw ``tid`` in the provisioning (amended, signed again): its TERMINAL_RETIRE may
    now be endorsed. The new provisioning's stamp."""
    document = _document(directory)
    if tid not in {t["id"] for t in document["terminals"]}:
        raise SystemExit(f"edgekey provision: no terminal {tid!r} in the provisioning")
    document["retired"] = sorted(set(document.get("retired", [])) | {tid})
    issued = _issue(directory, document)
    fleet = _load_fleet(directory)
    member = fleet.get("etcd", {}).get("members", {}).pop(tid, None)
    if member is not None:  # its etcd member leaves with it (agent/network.py removes it)
        fleet["etcd"].setdefault("retired_members", []).append(member["name"])
        fleet["etcd"]["endpoints"] = [u for u in fleet["etcd"]["endpoints"]
                                      if u != member["client"]]
    write_fleet(directory, fleet)
    return issued


def etcd_client(directory: Path, endpoints: list[str] | None = None) -> Any:
    """An etcd client of the fleet as the master station (its own certificate)."""
    from agent.net.etcd import EtcdClient

    tls = directory / "tls"
    fleet = _load_fleet(directory)
    return EtcdClient(endpoints or fleet["etcd"]["endpoints"], ca=str(tls / "ca.crt"),
                      cert=str(tls / f"{STATION}.crt"), key=str(tls / f"{STATION}.key"))


def publish(directory: Path) -> int:
    """The newest provisioning into etcd for the running terminals (agent/net/provfeed.py);
    the older issues are deleted after it. Its stamp."""
    from agent.net.provfeed import feed_prefix, parts

    data = (directory / "provisioning.json").read_bytes()
    issued = int(json.loads(data)["document"]["issued_ms"])
    fleet_prefix = f"/edgekey/{directory.name}/".encode()
    with etcd_client(directory) as etcd:
        pairs = parts(fleet_prefix, issued, data)
        for key, value in pairs:
            etcd.put(key, value)
        # [the feed's start, this issue's own keys): the older issues only
        etcd.delete_range(feed_prefix(fleet_prefix), pairs[0][0].rsplit(b"/", 1)[0] + b"/")
    return issued


# ================================================================== command line

def add_parser(sub: argparse._SubParsersAction) -> None:
    prov = sub.add_parser("provision", help="a fleet's keys, certificates, genesis, images; "
                                            "terminals added and withdrawn").add_subparsers(
        dest="provision_cmd", metavar="SUBCOMMAND", required=True)
    new = prov.add_parser("new", help="make a fleet: utility key, CA, identities, genesis, "
                                      "signed provisioning, flash images (fleet up starts it)")
    new.add_argument("--dir", type=Path, default=Path("out/fleet"))
    new.add_argument("--terminals", type=int, default=1)
    new.add_argument("--meters", type=int, default=20)
    new.add_argument("--board", default="host")
    new.add_argument("--seed", type=int, default=1)
    new.add_argument("--etcd-members", type=int, choices=(1, 3, 5), default=None)
    new.add_argument("--netns", action="store_true")
    add = prov.add_parser("add", help="one more terminal in a newer signed provisioning, its "
                                      "certificate and image")
    add.add_argument("--dir", type=Path, default=Path("out/fleet"))
    add.add_argument("--etcd-member", action="store_true",
                     help="it hosts an etcd voting member (replacing a retired voting host)")
    retire = prov.add_parser("retire", help="withdraw a terminal in a newer signed provisioning")
    retire.add_argument("--dir", type=Path, default=Path("out/fleet"))
    retire.add_argument("id")
    pub = prov.add_parser("publish", help="the newest provisioning into the fleet's etcd, "
                                          "for the running terminals")
    pub.add_argument("--dir", type=Path, default=Path("out/fleet"))
    for p in prov.choices.values():
        p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if args.provision_cmd == "new":
        if (directory / "fleet.json").exists():
            print(f"edgekey provision: {directory} already holds a fleet", file=sys.stderr)
            return 2
        if args.terminals < 1:
            print("edgekey provision: --terminals must be at least 1", file=sys.stderr)
            return 2
        fleet = provision_fleet(directory, terminals=args.terminals, meters=args.meters,
                                board_name=args.board, seed=args.seed,
                                etcd_members=args.etcd_members, netns=args.netns)
        write_fleet(directory, fleet)
        print(f"provisioned {len(fleet['terminals'])} terminal(s), {args.meters} meters: "
              f"{directory / 'provisioning.json'}")
        return 0
    if args.provision_cmd == "add":
        entry = add_terminal(directory, etcd_member=args.etcd_member)
        print(f"{entry['id']}: provisioned (image {entry['flash']}); provisioning issued at "
              f"{entry['added_ms']}")
        return 0
    if args.provision_cmd == "retire":
        print(f"{args.id}: withdrawn; provisioning issued at {retire_terminal(directory, args.id)}")
        return 0
    print(f"published the provisioning issued at {publish(directory)}")
    return 0
