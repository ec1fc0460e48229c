"""Each terminal in its own network namespace on one bridge: a WAN that a test can cut.

On loopback every process reaches every other, so a partition cannot be
made. With ``--netns`` the fleet launcher gives each terminal a namespace
(``ip netns``), a veth pair to a bridge in the root namespace, and an
address of its own (10.231.K.N/24); the terminal's agent and its etcd
member run inside (``ip netns exec``), its peers and etcd are dialled at
those addresses. ``cut`` takes a terminal's veth down: it reaches no one
and no one reaches it, as a terminal whose WAN link failed; ``heal`` brings
it back. The bridge holds 10.231.K.254 so tools in the root namespace (the
launcher's etcd health check) still reach the fleet. Needs root
(CAP_NET_ADMIN) and iproute2; ``available()`` says whether it works here.

Names are derived from a tag (a hash of the fleet directory), so fleets in
different directories do not collide; ``delete`` removes everything,
also after a crash (it is what ``fleet down`` calls).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass

IP = shutil.which("ip") or "/usr/sbin/ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([IP, *args], capture_output=True, text=True, check=check, timeout=10)


def available() -> bool:
    """Whether namespaces, veth and bridges can be made here (root, iproute2, the modules)."""
    # names of this process alone: test runs side by side (pytest-xdist) probe at once
    probe, bridge = f"ek-probe-{os.getpid()}", f"ekp{os.getpid() % 10**8}"
    try:
        if _ip("netns", "add", probe, check=False).returncode != 0:
            return False
        _ip("netns", "del", probe, check=False)
        if _ip("link", "add", bridge, "type", "bridge", check=False).returncode != 0:
            return False
        _ip("link", "del", bridge, check=False)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


@dataclass(frozen=True)
class NetnsPlan:
    """The names and addresses of one fleet's namespaces (module docstring)."""

    tag: str  # 6 hex digits
    subnet: int  # K in 10.231.K.0/24
    terminals: tuple[str, ...]

    @classmethod
    def for_directory(cls, directory: str, terminals: list[str]) -> NetnsPlan:
        h = hashlib.sha256(directory.encode()).digest()
        return cls(h[:3].hex(), h[3], tuple(terminals))

    def to_json(self) -> dict:
        return {"tag": self.tag, "subnet": self.subnet, "terminals": list(self.terminals)}

    @classmethod
    def from_json(cls, d: dict) -> NetnsPlan:
        return cls(str(d["tag"]), int(d["subnet"]), tuple(d["terminals"]))

    # ------------------------------------------------------------- names

    @property
    def bridge(self) -> str:
        return f"ekb{self.tag}"

    def namespace(self, tid: str) -> str:
        return f"ek-{self.tag}-{self.terminals.index(tid)}"

    def veth(self, tid: str) -> str:
        return f"ekv{self.tag}{self.terminals.index(tid):02d}"

    def address(self, tid: str) -> str:
        return f"10.231.{self.subnet}.{self.terminals.index(tid) + 1}"

    def exec_prefix(self, tid: str) -> list[str]:
        """Prefix a command line with this to run it inside ``tid``'s namespace."""
        return [IP, "netns", "exec", self.namespace(tid)]

    # ---------------------------------------------------------- lifecycle

    def create(self) -> None:
        """The bridge, one namespace and veth pair per terminal, addresses, all up."""
        self.delete()
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"10.231.{self.subnet}.254/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for tid in self.terminals:
                ns, veth, peer = self.namespace(tid), self.veth(tid), "ekp" + self.veth(tid)[3:]
                _ip("netns", "add", ns)
                _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
                _ip("link", "set", peer, "netns", ns)
                _ip("link", "set", veth, "master", self.bridge)
                _ip("link", "set", veth, "up")
                _ip("-n", ns, "addr", "add", f"{self.address(tid)}/24", "dev", peer)
                _ip("-n", ns, "link", "set", peer, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as exc:
            self.delete()
            raise RuntimeError(f"network namespaces: {' '.join(exc.cmd)}: "
                               f"{exc.stderr.strip()}") from None

    def delete(self) -> None:
        """Remove every namespace, veth and the bridge of this plan (what exists of them)."""
        for tid in self.terminals:
            _ip("netns", "del", self.namespace(tid), check=False)  # takes its veth end along
            _ip("link", "del", self.veth(tid), check=False)
        _ip("link", "del", self.bridge, check=False)

    def cut(self, tid: str) -> None:
        """``tid``'s WAN link fails: its veth goes down."""
        _ip("link", "set", self.veth(tid), "down")

    def heal(self, tid: str) -> None:
        _ip("link", "set", self.veth(tid), "up")
