"""What a utility hands a terminal: a provisioning file it signed, and the terminal's secrets.

The **provisioning file** is public and signed (Ed25519) by the utility; the
terminal trusts it only under the utility's public key (``--trust``; on a
board it ships in the signed root filesystem). It names the fleet, its
genesis block, every terminal (identity and transport public keys, site,
capacity) and every meter (home, location, and its factory key sealed to
the home's transport key with the key transport of
``agent/keystore/transport.py``). The factory key is the trust anchor of a
meter's first registration: its first key arrives wrapped under it.

    file := {"document": {...}, "signature": hex}   (JSON)
    signature = Ed25519(utility key, "edgekey/provisioning/v1" | canonical JSON of document)

A fleet of more than one terminal also has a ``network`` section: the
SHA-256 of the fleet CA's certificate (the TLS trust anchor, pinned so a
swapped CA file is refused), the etcd client endpoints, the etcd voting
members (terminal -> member name and URLs) and each terminal's peer address.

The **secrets** (the terminal's Ed25519 identity seed and X25519 transport
key) are sealed under the device key (AES-256-GCM, bound to the terminal
id). Both go into the ``config`` partition as records of a record log
(``install``); the agent reads the newest of each at boot (``load``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.keystore.transport import AllowList, TransportError, open_envelope, seal_envelope
from agent.ledger.block import Block, decode_block, encode_block
from agent.ledger.codec import DecodeError
from agent.ledger.identity import TerminalIdentity
from agent.ledger.tx import Transaction, TxKind
from hal.blockdev import BlockDevice
from hal.board import Flash
from hal.ids import check_terminal_id
from hal.recordlog import RecordLog

FORMAT = "edgekey-provisioning/1"
SIGN_LABEL = b"edgekey/provisioning/v1"
SECRETS_LABEL = b"edgekey/secrets/v1"
FACTORY_KEY_VERSION = 0  # the envelope's version field for a factory key
TAG_PROVISIONING = b"P"
TAG_SECRETS = b"S"
MAX_FILE_BYTES = 4 << 20  # 10^4 meters of about 330 bytes each, with room
CHUNK_HEAD = 5  # tag, chunk index u16, chunk count u16


class ProvisioningError(ValueError):
    """The provisioning is missing, malformed, not signed by the trusted utility, or not ours."""


@dataclass(frozen=True)
class TerminalEntry:
    terminal_id: str
    identity_public: bytes
    transport_public: bytes
    site: tuple[float, float]
    capacity: int


@dataclass(frozen=True)
class MeterEntry:
    meter_id: bytes
    home: str
    xy: tuple[float, float]
    sealed_factory_key: bytes


@dataclass(frozen=True)
class Network:
    """How a fleet's terminals reach each other and the ordering (signed with the rest)."""

    ca_sha256: bytes
    etcd: tuple[str, ...]  # client URLs, every member's
    peers: dict[str, tuple[str, int]]  # terminal -> (host, port) of its TLS listener
    members: dict[str, dict[str, str]]  # voting terminal -> {"name", "client", "peer"}


@dataclass(frozen=True)
class Provisioning:
    """A verified provisioning document."""

    fleet: str
    board: str
    flash_layout: str  # flash_layout() of the board the images were made for
    issued_ms: int
    genesis: Block
    terminals: tuple[TerminalEntry, ...]
    meters: tuple[MeterEntry, ...]
    network: Network | None = None
    # Terminals the utility has withdrawn: their TERMINAL_RETIRE may be endorsed.
    retired: frozenset[str] = frozenset()
    # The master station: (its id, its X25519 transport key). Keys may be wrapped to it,
    # and it may connect to a terminal as a client (never a member: it signs nothing).
    station: tuple[str, bytes] | None = None

    def terminal(self, terminal_id: str) -> TerminalEntry:
        for t in self.terminals:
            if t.terminal_id == terminal_id:
                return t
        raise ProvisioningError(f"terminal {terminal_id!r} is not in fleet {self.fleet!r}")

    def homed(self, terminal_id: str) -> list[MeterEntry]:
        return [m for m in self.meters if m.home == terminal_id]

    def allow_list(self) -> AllowList:
        """Who a key may be wrapped to: the fleet's terminals and its master station."""
        entries = {t.terminal_id.encode(): t.transport_public for t in self.terminals}
        if self.station is not None:
            entries[self.station[0].encode()] = self.station[1]
        return AllowList(entries)

    @property
    def station_id(self) -> str | None:
        return None if self.station is None else self.station[0]

    def authorises(self, tx: Transaction) -> bool:
        """Whether the utility ordered membership change ``tx``: a TERMINAL_ADD of a terminal
        listed here with that identity key and not withdrawn; a TERMINAL_RETIRE of one it
        withdrew. The endorsers' check (``NodeConfig.authorise_member``): the majority
        signs what the rules allow, but only the utility decides who belongs."""
        if tx.kind is TxKind.TERMINAL_RETIRE:
            return tx.terminal in self.retired
        if tx.kind is TxKind.TERMINAL_ADD:
            return tx.terminal not in self.retired and any(
                t.terminal_id == tx.terminal and t.identity_public == tx.public_key
                for t in self.terminals)
        return True


@dataclass(frozen=True)
class Secrets:
    identity: TerminalIdentity
    transport: X25519PrivateKey


def flash_layout(flash: Flash) -> str:
    """The flash map an image is laid out in (size, erase block, partitions): what must
    match for a board to open the image, whatever the board is called."""
    parts = ",".join(f"{p.name}@{p.offset_mib}+{p.size_mib}" for p in flash.partitions)
    return f"{flash.size_mib}MiB/{flash.erase_block_kib}KiB:{parts}"


def _canonical(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def sign(document: dict, utility_key: Ed25519PrivateKey) -> bytes:
    """The provisioning file for ``document`` (see ``document_for``)."""
    signature = utility_key.sign(SIGN_LABEL + _canonical(document))
    return json.dumps({"document": document, "signature": signature.hex()},
                      sort_keys=True).encode()


def document_for(*, fleet: str, board: str, layout: str, issued_ms: int, genesis: Block,
                 terminals: list[TerminalEntry], meters: list[tuple[bytes, str, tuple[float, float],
                                                                   bytes]],
                 entropy: Callable[[int], bytes] = os.urandom,
                 network: Network | None = None, retired: tuple[str, ...] = (),
                 station: tuple[str, bytes] | None = None) -> dict:
    """The document: ``meters`` as (id, home, xy, factory key), sealed here to each home."""
    allow = AllowList({t.terminal_id.encode(): t.transport_public for t in terminals})
    rows = []
    for meter_id, home, xy, factory_key in meters:
        sealed = seal_envelope(factory_key, meter_id=meter_id, key_version=FACTORY_KEY_VERSION,
                               requester_id=home.encode(), allow_list=allow, entropy=entropy)
        rows.append({"id": meter_id.hex(), "home": home, "xy": list(xy),
                     "factory_key": sealed.hex()})
    document = {"format": FORMAT, "fleet": fleet, "board": board, "flash_layout": layout,
            "issued_ms": issued_ms,
            "genesis": encode_block(genesis).hex(),
            "terminals": [{"id": t.terminal_id, "identity": t.identity_public.hex(),
                           "transport": t.transport_public.hex(), "site": list(t.site),
                           "capacity": t.capacity} for t in terminals],
            "meters": rows}
    if retired:
        document["retired"] = sorted(retired)
    if station is not None:
        document["station"] = {"id": station[0], "transport": station[1].hex()}
    if network is not None:
        document["network"] = {"ca_sha256": network.ca_sha256.hex(), "etcd": list(network.etcd),
                               "peers": {t: f"{h}:{port}" for t, (h, port) in
                                         network.peers.items()},
                               "members": network.members}
    return document


def _network(doc: dict | None) -> Network | None:
    if doc is None:
        return None
    peers = {}
    for tid, address in doc["peers"].items():
        host, _, port = str(address).rpartition(":")
        peers[str(tid)] = (host, int(port))
    members = {str(t): {k: str(v) for k, v in m.items()} for t, m in doc["members"].items()}
    return Network(bytes.fromhex(doc["ca_sha256"]), tuple(str(u) for u in doc["etcd"]), peers,
                   members)


def _station(doc: dict | None) -> tuple[str, bytes] | None:
    if doc is None:
        return None
    station_id, transport = str(doc["id"]), bytes.fromhex(doc["transport"])
    why = check_terminal_id(station_id)
    if why is not None:
        raise ValueError(f"the station's id {station_id!r}: {why}")
    if len(transport) != 32:
        raise ValueError("the station's transport key must be 32 bytes")
    return station_id, transport


def verify(data: bytes, trusted: bytes) -> Provisioning:
    """The document in ``data`` if the utility key ``trusted`` (32 raw bytes) signed it."""
    if len(data) > MAX_FILE_BYTES:
        raise ProvisioningError(f"provisioning file of {len(data)} bytes (max {MAX_FILE_BYTES})")
    try:
        outer = json.loads(data)
        document, signature = outer["document"], bytes.fromhex(outer["signature"])
        Ed25519PublicKey.from_public_bytes(trusted).verify(signature,
                                                           SIGN_LABEL + _canonical(document))
    except InvalidSignature:
        raise ProvisioningError("provisioning file is not signed by the trusted utility key") \
            from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ProvisioningError(f"provisioning file is malformed: {exc}") from None
    try:
        if document["format"] != FORMAT:
            raise ProvisioningError(f"provisioning format {document['format']!r}, "
                                    f"expected {FORMAT!r}")
        return Provisioning(
            fleet=str(document["fleet"]), board=str(document["board"]),
            flash_layout=str(document["flash_layout"]), issued_ms=int(document["issued_ms"]),
            genesis=decode_block(bytes.fromhex(document["genesis"])),
            terminals=tuple(TerminalEntry(str(t["id"]), bytes.fromhex(t["identity"]),
                                          bytes.fromhex(t["transport"]),
                                          (float(t["site"][0]), float(t["site"][1])),
                                          int(t["capacity"])) for t in document["terminals"]),
            meters=tuple(MeterEntry(bytes.fromhex(m["id"]), str(m["home"]),
                                    (float(m["xy"][0]), float(m["xy"][1])),
                                    bytes.fromhex(m["factory_key"])) for m in document["meters"]),
            network=_network(document.get("network")),
            retired=frozenset(str(t) for t in document.get("retired", ())),
            station=_station(document.get("station")))
    except (ValueError, KeyError, TypeError, IndexError, DecodeError) as exc:
        raise ProvisioningError(f"signed provisioning document is malformed: {exc}") from None


def check_update(current: Provisioning, new: Provisioning) -> None:
    """Raise unless ``new`` may replace ``current`` on a running terminal.

    An update (the utility adds a terminal, withdraws one, or adds meters) is
    newer and of the same fleet, board, flash map, genesis and fleet CA; it
    keeps every terminal and meter it had with the same keys (a terminal with
    new keys is a new terminal id) and withdraws nothing it had withdrawn
    back. So a replayed older file, another fleet's, or one that swaps a
    member's key is refused even though the utility signed it once.
    """
    if new.issued_ms <= current.issued_ms:
        raise ProvisioningError(f"provisioning issued at {new.issued_ms} is not newer than "
                                f"the one in force ({current.issued_ms})")
    for name in ("fleet", "board", "flash_layout"):
        if getattr(new, name) != getattr(current, name):
            raise ProvisioningError(f"provisioning update changes the {name}")
    if encode_block(new.genesis) != encode_block(current.genesis):
        raise ProvisioningError("provisioning update names another genesis")
    if (new.network is None) != (current.network is None) or (
            new.network is not None and current.network is not None
            and new.network.ca_sha256 != current.network.ca_sha256):
        raise ProvisioningError("provisioning update changes the fleet CA")
    terminals = {t.terminal_id: t for t in new.terminals}
    for t in current.terminals:
        kept = terminals.get(t.terminal_id)
        if kept is None or (kept.identity_public, kept.transport_public) != (
                t.identity_public, t.transport_public):
            raise ProvisioningError(f"provisioning update drops or re-keys terminal "
                                    f"{t.terminal_id!r}")
    meters = {m.meter_id: m for m in new.meters}
    for m in current.meters:
        if meters.get(m.meter_id) != m:
            raise ProvisioningError(f"provisioning update drops or changes meter "
                                    f"{m.meter_id.hex()}")
    if not current.retired <= new.retired:
        raise ProvisioningError("provisioning update takes back a withdrawn terminal")
    if current.station is not None and new.station != current.station:
        raise ProvisioningError("provisioning update changes the master station")
    if new.station is not None and new.station[0] in terminals:
        raise ProvisioningError("the master station's id is a terminal's")


def factory_keys(prov: Provisioning, secrets: Secrets) -> dict[bytes, bytes]:
    """The factory keys of the meters homed on this terminal, opened with its transport key."""
    tid = secrets.identity.terminal_id
    keys = {}
    for m in prov.homed(tid):
        try:
            keys[m.meter_id] = open_envelope(secrets.transport, m.sealed_factory_key,
                                             meter_id=m.meter_id,
                                             key_version=FACTORY_KEY_VERSION,
                                             requester_id=tid.encode())
        except TransportError as exc:
            raise ProvisioningError(f"factory key of meter {m.meter_id.hex()} does not open "
                                    f"with this terminal's transport key: {exc}") from None
    return keys


def seal_secrets(device_key: bytes, secrets_id: str, identity_seed: bytes,
                 transport: X25519PrivateKey, nonce: bytes) -> bytes:
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )
    raw = transport.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    aad = SECRETS_LABEL + secrets_id.encode()
    return secrets_id.encode().ljust(32, b"\0") + nonce + AESGCM(device_key).encrypt(
        nonce, identity_seed + raw, aad)


def open_secrets(device_key: bytes, sealed: bytes) -> Secrets:
    tid = sealed[:32].rstrip(b"\0").decode("ascii", "replace")
    nonce, body = sealed[32:44], sealed[44:]
    try:
        plain = AESGCM(device_key).decrypt(nonce, body, SECRETS_LABEL + tid.encode())
    except (InvalidTag, ValueError):
        raise ProvisioningError("terminal secrets do not open under this device key "
                                "(another terminal's image, or the wrong --device-key)") from None
    return Secrets(TerminalIdentity.from_seed(tid, plain[:32]),
                   X25519PrivateKey.from_private_bytes(plain[32:64]))


def install(config: BlockDevice, provisioning_file: bytes, sealed_secrets: bytes, *,
            release_older: bool = False) -> None:
    """Write the provisioning file (in chunks of one record each) and the sealed secrets to
    the ``config`` partition, in one group commit; ``release_older``: then free what they
    replace. A power cut leaves the old pair or the new one as the newest complete."""
    log = RecordLog(config)
    first = log.next_seq
    step = log.max_payload - CHUNK_HEAD
    chunks = [provisioning_file[i:i + step] for i in range(0, len(provisioning_file), step)]
    log.append_many([TAG_PROVISIONING + i.to_bytes(2, "big") + len(chunks).to_bytes(2, "big") + c
                     for i, c in enumerate(chunks)] + [TAG_SECRETS + sealed_secrets])
    if release_older:
        log.release(first)


def reinstall(config: BlockDevice, provisioning_file: bytes) -> None:
    """Replace the provisioning on the ``config`` partition by a checked update."""
    install(config, provisioning_file, load(config)[1], release_older=True)


def load(config: BlockDevice) -> tuple[bytes, bytes]:
    """The newest complete provisioning file and sealed secrets on the ``config`` partition."""
    parts: list[bytes] = []
    complete: bytes | None = None
    secrets: bytes | None = None
    for _seq, payload in RecordLog(config).records():
        tag, body = payload[:1], payload[1:]
        if tag == TAG_SECRETS:
            secrets = body
        elif tag == TAG_PROVISIONING and len(body) >= CHUNK_HEAD - 1:
            index, count = int.from_bytes(body[:2], "big"), int.from_bytes(body[2:4], "big")
            parts = [] if index == 0 else parts
            if index == len(parts):
                parts.append(body[4:])
                if len(parts) == count:
                    complete = b"".join(parts)
    if complete is None or secrets is None:
        raise ProvisioningError("no provisioning on the config partition: this image was never "
                                "provisioned (edgekey fleet up provisions the images it makes)")
    return complete, secrets
