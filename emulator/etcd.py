"""A local etcd cluster for tests and emulation: Debian's etcd 3.4 on loopback, TLS everywhere.

``EtcdCluster(directory, members=3)`` makes a fleet CA in ``directory``
(``agent.net.pki``), a certificate per member (CN ``m0``, ``m1``, ...) used
for both its client and peer listeners, and a client certificate; starts
each member with client-certificate auth on both listeners, as the fleet
runs them; and returns once every member answers with a leader. Members can
be killed, stopped, restarted, added and removed to test failover.

Every process started is stopped by ``close()`` (also on a failed start, at
interpreter exit, and by the context manager). The watch-progress interval
is 1 s (``agent.net.watch`` counts on it to detect a silent stream).

``python -m emulator.etcd --dir DIR --members N`` starts a cluster, prints
one JSON line (endpoints, CA and client certificate paths) and runs until
SIGTERM or SIGINT, for a fleet launcher to run in the background.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.net.etcd import EtcdClient, EtcdError
from agent.net.pki import FleetCA

ETCD = "/usr/bin/etcd"
HOST = "127.0.0.1"
READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
PROGRESS_NOTIFY = "1s"  # etcd 3.4 defaults to 10 min; the watch's silence limit is 5 s
CLIENT_NAME = "emulator"


@functools.cache
def has_progress_notify_flag(etcd: str = ETCD) -> bool:
    """Whether this etcd has ``--experimental-watch-progress-notify-interval`` (3.4 has)."""
    out = subprocess.run([etcd, "--help"], capture_output=True, text=True, check=False)
    return "--experimental-watch-progress-notify-interval" in out.stdout + out.stderr


def free_port(taken: set[int] | None = None) -> int:
    """A loopback port free right now (bind to 0, read it, close), and not one of ``taken``
    (which it joins): the kernel may hand a port just released to the next caller, so two
    listeners picked one after the other could otherwise get the same one."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if taken is None:
            return port
        if port not in taken:
            taken.add(port)
            return port


def retry_unhealthy(call: Callable[[], object], timeout_s: float = 15.0) -> None:
    """``call()``, again while etcd answers "unhealthy cluster" (its strict reconfig check)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            call()
            return
        except EtcdError as exc:
            if "unhealthy cluster" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class _Member:
    name: str
    client_port: int
    peer_port: int
    scheme: str
    process: subprocess.Popen[bytes] | None = None
    removed: bool = False

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.peer_port}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def wait_leader(client: EtcdClient, running: Callable[[], bool], timeout_s: float) -> str | None:
    """Poll a member's status until it knows a leader; why not (exited, no answer), or None."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not running():
            return "exited"
        try:
            if client.status()["leader"]:
                return None
        except EtcdError:
            pass
        if time.monotonic() > deadline:
            return f"did not answer within {timeout_s:.0f} s"
        time.sleep(0.1)


def member_command(name: str, data_dir: Path, client_url: str, peer_url: str,
                   initial_cluster: str, token: str, state: str, log: Path,
                   tls: tuple[str, str, str] | None, *, etcd: str = ETCD) -> list[str]:
    """One member's command line: TLS with client auth on both listeners when ``tls`` is
    (ca, cert, key); watch progress notifications often enough for silence detection."""
    command = [
        etcd, "--name", name, "--data-dir", str(data_dir),
        "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", initial_cluster, "--initial-cluster-token", token,
        "--initial-cluster-state", state, "--logger", "zap", "--log-outputs", str(log),
    ]
    if tls is not None:
        ca, crt, key = tls
        command += ["--cert-file", crt, "--key-file", key, "--trusted-ca-file", ca,
                    "--client-cert-auth", "--peer-cert-file", crt, "--peer-key-file", key,
                    "--peer-trusted-ca-file", ca, "--peer-client-cert-auth"]
    if has_progress_notify_flag(etcd):
        command += ["--experimental-watch-progress-notify-interval", PROGRESS_NOTIFY]
    return command


class EtcdCluster:
    """A static etcd cluster of ``members`` members under ``directory`` (module docstring)."""

    def __init__(self, directory: Path, members: int = 3, *, tls: bool = True,
                 fleet: str = "test", etcd: str = ETCD) -> None:
        if members < 1:
            raise ValueError("an etcd cluster has at least one member")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if stale := sorted(self.directory.glob("*.etcd")):
            # its members' peer URLs (fresh ports each time) are in there: it cannot be reused
            raise ValueError(f"{self.directory} holds an earlier cluster's data ({stale[0].name})")
        self.etcd = etcd
        self.tls = tls
        self.token = f"edgekey-{fleet}"
        self._members: list[_Member] = []
        self._lock = threading.Lock()
        self._closed = False
        self._ca = FleetCA.create(fleet) if tls else None
        self.ca: str | None = None
        self.cert: str | None = None
        self.key: str | None = None
        if self._ca is not None:
            self.ca = str(self._ca.write(self.directory)[1])
            self.cert, self.key = self.client_cert(CLIENT_NAME)
        scheme = "https" if tls else "http"
        self._ports: set[int] = set()
        for i in range(members):
            self._members.append(_Member(f"m{i}", free_port(self._ports),
                                         free_port(self._ports), scheme))
        atexit.register(self.close)
        try:
            initial = self._initial_cluster()
            for i in range(members):
                self._spawn(i, initial, "new")
            for i in range(members):
                self._wait_ready(i)
        except BaseException:
            self.close()
            raise

    # -- what clients need -------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        """The client URLs of the members in the cluster, by index (removed ones left out)."""
        return [m.client_url for m in self._members if not m.removed]

    def endpoint(self, i: int) -> str:
        """Member ``i``'s client URL."""
        return self._members[i].client_url

    def client_cert(self, name: str) -> tuple[str, str]:
        """A new client certificate with CN ``name``: ``(crt path, key path)``."""
        if self._ca is None:
            raise RuntimeError("the cluster runs without TLS")
        key, crt = self._ca.issue(name).write(self.directory, name)
        return str(crt), str(key)

    def client(self, *indices: int, timeout_s: float = 2.0) -> EtcdClient:
        """An ``EtcdClient`` on the given members (all members in the cluster by default)."""
        urls = [self.endpoint(i) for i in indices] if indices else self.endpoints
        return EtcdClient(urls, ca=self.ca, cert=self.cert, key=self.key, timeout_s=timeout_s)

    # -- faults ------------------------------------------------------------

    def kill(self, i: int) -> None:
        """SIGKILL member ``i``: a crash, or power cut, without a goodbye to its peers."""
        self._signal(i, signal.SIGKILL, wait_s=STOP_GRACE_S)

    def stop_member(self, i: int) -> None:
        """SIGTERM member ``i`` and wait for it (SIGKILL after 5 s)."""
        self._stop(self._members[i])

    def start_member(self, i: int) -> None:
        """Restart member ``i`` on its data directory and wait until it answers."""
        member = self._members[i]
        if member.removed:
            raise RuntimeError(f"{member.name} was removed from the cluster")
        if member.running():
            raise RuntimeError(f"{member.name} is running")
        self._spawn(i, self._initial_cluster(), "existing")
        self._wait_ready(i)

    def pid(self, i: int) -> int:
        process = self._members[i].process
        if process is None or process.poll() is not None:
            raise RuntimeError(f"{self._members[i].name} is not running")
        return process.pid

    def leader_index(self, timeout_s: float = 10.0) -> int:
        """The index of the member that is the Raft leader, waiting for an election."""
        deadline = time.monotonic() + timeout_s
        while True:
            ids: dict[int, int] = {}
            leaders: set[int] = set()
            for i, m in enumerate(self._members):
                if m.removed or not m.running():
                    continue
                with self.client(i, timeout_s=1.0) as c:
                    try:
                        status = c.status()
                    except EtcdError:
                        continue
                ids[status["member_id"]] = i
                leaders.add(status["leader"])
            if len(leaders) == 1 and (leader := leaders.pop()) in ids:
                return ids[leader]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no leader among the running members within {timeout_s} s")
            time.sleep(0.1)

    def add_member(self, name: str) -> int:
        """Add a member through the cluster API, start it, and return its index.

        etcd's strict reconfiguration check refuses ("unhealthy cluster") until
        every running member has been connected to its peers for 5 s, so a
        cluster just started or just restarted is retried until then.
        """
        scheme = "https" if self.tls else "http"
        member = _Member(name, free_port(self._ports), free_port(self._ports), scheme)
        with self.client() as c:
            retry_unhealthy(lambda: c.member_add([member.peer_url]))
        with self._lock:
            self._members.append(member)
            i = len(self._members) - 1
        self._spawn(i, self._initial_cluster(), "existing")
        self._wait_ready(i)
        return i

    def remove_member(self, i: int) -> None:
        """Stop member ``i``, then remove it from the cluster.

        In that order because etcd refuses to remove a member that is up and
        connected for less than 5 s if that leaves quorum thin; a stopped one
        can always go.
        """
        member = self._members[i]
        self._stop(member)
        member.removed = True
        others = [j for j, m in enumerate(self._members) if not m.removed]
        with self.client(*others) as c:
            for m in c.member_list():
                if m["name"] == member.name or member.peer_url in m["peer_urls"]:
                    retry_unhealthy(functools.partial(c.member_remove, m["id"]))

    def close(self) -> None:
        """Stop every member (SIGTERM, SIGKILL after 5 s) and wait for them; idempotent.

        Followers go first: a leader given SIGTERM hands its leadership to a
        connected follower and waits for that (up to 7 s) if the follower is
        shutting down too; alone, it just stops.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            members = [m for m in self._members if m.running()]
        try:
            leader = self._leader_name()
            followers = [m for m in members if m.name != leader]
            for m in followers:
                assert m.process is not None
                with contextlib.suppress(ProcessLookupError):
                    m.process.terminate()
            for m in followers:
                self._stop(m)
        finally:
            for m in self._members:
                self._stop(m)
            atexit.unregister(self.close)

    def _leader_name(self) -> str | None:
        """The leader's name as the members say, or None if they do not answer at once."""
        try:
            with self.client(timeout_s=1.0) as c:
                leader = c.status()["leader"]
                return next((m["name"] for m in c.member_list() if m["id"] == leader), None)
        except EtcdError:
            return None

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- processes ---------------------------------------------------------

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self._members if not m.removed)

    def _command(self, member: _Member, initial_cluster: str, state: str) -> list[str]:
        d = self.directory
        tls = None
        if self.tls:
            crt, key = d / f"{member.name}.crt", d / f"{member.name}.key"
            if not crt.exists():
                assert self._ca is not None
                self._ca.issue(member.name).write(d, member.name)
            tls = (str(self.ca), str(crt), str(key))
        return member_command(member.name, d / f"{member.name}.etcd", member.client_url,
                              member.peer_url, initial_cluster, self.token, state,
                              d / f"{member.name}.log", tls, etcd=self.etcd)

    def _spawn(self, i: int, initial_cluster: str, state: str) -> None:
        member = self._members[i]
        env = dict(os.environ)
        if platform.machine().startswith("arm"):  # shared/notes 9: upstream exits without it
            env["ETCD_UNSUPPORTED_ARCH"] = "arm"
        with self._lock:
            if self._closed:
                raise RuntimeError("the cluster is closed")
            with open(self.directory / f"{member.name}.out", "ab") as out:
                member.process = subprocess.Popen(
                    self._command(member, initial_cluster, state), stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, env=env)

    def _wait_ready(self, i: int) -> None:
        """Until member ``i`` answers its status with a leader; its log tail if it does not."""
        member = self._members[i]
        with self.client(i, timeout_s=1.0) as c:
            why = wait_leader(c, member.running, READY_TIMEOUT_S)
        if why is not None:
            self._fail(member, why)

    def _fail(self, member: _Member, what: str) -> None:
        d = self.directory
        raise RuntimeError(f"etcd member {member.name} {what}; {d / member.name}.log ends:\n"
                           f"{_tail(d / f'{member.name}.log')}\n"
                           f"{member.name}.out ends:\n{_tail(d / f'{member.name}.out')}")

    def _signal(self, i: int, sig: signal.Signals, *, wait_s: float) -> None:
        process = self._members[i].process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        process.wait(wait_s)

    def _stop(self, member: _Member) -> None:
        process = member.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulator.etcd", description=__doc__)
    parser.add_argument("--dir", type=Path, required=True, help="certificates, data and logs")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--fleet", default="test")
    parser.add_argument("--no-tls", action="store_true", help="plain HTTP (tests only)")
    args = parser.parse_args(argv)
    done = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with EtcdCluster(args.dir, args.members, tls=not args.no_tls, fleet=args.fleet) as cluster:
        print(json.dumps({"endpoints": cluster.endpoints, "ca": cluster.ca, "cert": cluster.cert,
                          "key": cluster.key, "pid": os.getpid()}), flush=True)
        while not done.wait(1.0):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
