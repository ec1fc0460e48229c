"""A fleet in one process: the first terminal on the flash given, the others on RAM flash.

What the lifecycle test, the model-based test and the demo share: the
terminals of one provisioning, each running the node core with its own
chain and key store (``agent.terminal.Terminal``), joined by
``emulator.localnet.LocalNet``. ``reboot`` powers the first terminal off
and on: everything it knows is read back from its flash. The first
terminal's flash is two block devices, its ledger and keystore partitions
(``agent.terminal.board_partitions`` cuts them from a board's flash image).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping

from agent.keystore.material import fingerprint
from agent.ledger.query import QueryResult, query
from agent.node import events as ev
from agent.node.actions import Acknowledge, Refuse
from agent.terminal import Terminal
from emulator.flash import RamBlockDevice
from emulator.localnet import LocalNet
from emulator.provision import Provisioning
from hal.blockdev import BlockDevice

RAM_SEGMENT, RAM_SEGMENTS = 8192, 64  # the other terminals' flash, per partition: 512 KiB


class ManualClock:
    """Deterministic time for a whole fleet: it moves only by ``advance``."""

    def __init__(self, wall_ms: int) -> None:
        self.mono = 0.0
        self.wall0 = wall_ms

    def advance(self, seconds: float) -> None:
        self.mono += seconds

    def __call__(self) -> ev.Time:
        return ev.Time(self.mono, self.wall0 + int(self.mono * 1000))


class LocalFleet:
    """The provisioned terminals, the first one on ``flash`` (module docstring)."""

    def __init__(self, fleet: Provisioning, flash: tuple[BlockDevice, BlockDevice],
                 device_key: bytes, *, extra_peers: Mapping[bytes, bytes] | None = None,
                 seeded: bool = True, ram_segment: int = RAM_SEGMENT,
                 ram_segments: int = RAM_SEGMENTS, **settings: object):
        self.fleet, self.device_key = fleet, device_key
        self.settings = settings
        self.seeded = seeded
        self.clock = ManualClock(fleet.genesis.header.timestamp_ms)
        self.peers = fleet.peers(extra_peers)
        self.first = fleet.identities[0].terminal_id
        self.boots = 0
        self.ram = {t.terminal_id: (RamBlockDevice(ram_segment, ram_segments),
                                    RamBlockDevice(ram_segment, ram_segments))
                    for t in fleet.identities[1:]}
        self.ecd = self._first(flash)
        self.net = LocalNet([self.ecd, *(self._other(tid) for tid in self.ram)])

    def _kw(self, tid: str, label: str) -> dict[str, object]:
        kw: dict[str, object] = {"clock": self.clock, "transport_key": self.fleet.transport[tid],
                                 "peers": self.peers}
        if self.seeded:  # AES-GCM nonces must never repeat: a fresh stream every boot
            kw["entropy"] = random.Random(label).randbytes
        return kw

    def _first(self, flash: tuple[BlockDevice, BlockDevice]) -> Terminal:
        self.boots += 1
        return Terminal(self.fleet.config(self.first, **self.settings), ledger=flash[0],
                        keystore=flash[1], device_key=self.device_key,
                        **self._kw(self.first, f"{self.first} boot {self.boots}"))  # type: ignore[arg-type]

    def _other(self, tid: str) -> Terminal:
        ledger, keystore = self.ram[tid]
        return Terminal(self.fleet.config(tid, **self.settings), ledger=ledger,
                        keystore=keystore, device_key=hashlib.sha256(tid.encode()).digest(),
                        **self._kw(tid, f"{tid} boot 1"))  # type: ignore[arg-type]

    def found(self) -> None:
        """The fleet's genesis on every terminal's flash."""
        self.net.found(self.fleet.genesis)

    def reboot(self, flash: tuple[BlockDevice, BlockDevice]) -> Terminal:
        """The first terminal powers off and on over ``flash`` (the same partitions, reopened)."""
        self.ecd = self._first(flash)
        self.net.replace(self.ecd)
        return self.ecd

    def terminal(self, terminal_id: str) -> Terminal:
        return self.net.terminals[terminal_id]

    def request(self, event: ev.Event, home: str | None = None) -> Acknowledge | Refuse:
        """A meter's (or operator's) request to a terminal; its one reply."""
        replies = [r for r in self.net.send(home or self.first, event)
                   if isinstance(r, Acknowledge | Refuse) and r.request_id == event.request_id]
        if len(replies) != 1:
            raise RuntimeError(f"request {event.request_id} got {len(replies)} replies")
        return replies[0]

    def answer(self, meter_id: bytes, terminal_id: str | None = None) -> QueryResult:
        """The query answer (with record, and key where local) of a terminal's index."""
        t = self.terminal(terminal_id or self.first)
        return query(t.chain, meter_id, t.id, with_record=True, key_source=t.keys.get,
                     fingerprint=fingerprint)
