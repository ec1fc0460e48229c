"""``edgekey demo`` interrupted in the middle of its fleet step leaves nothing running.

Injected: SIGTERM (what ``timeout`` and init systems send; Ctrl-C is SIGINT and
unwinds the same way) once the demo has started its 5-terminal fleet on etcd.
Survives: the demo exits with an error, and none of the processes its fleet
started (agents, etcd members, PLC channels, meters, console cables) is still
alive; their listening ports are free again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fleetprobe import alive, all_pids

pytestmark = pytest.mark.host_only

ROOT = Path(__file__).resolve().parents[1]


def test_a_demo_stopped_mid_fleet_leaves_no_process_and_no_port(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "demo", "--quick", "--out",
                             str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    fleet_json = out / "network" / "fleet.json"
    seen = []
    try:
        deadline = time.monotonic() + 240
        assert proc.stdout is not None
        for line in proc.stdout:  # until the fleet on etcd runs
            seen.append(line)
            if "meters registered" in line and fleet_json.exists():
                break
            assert time.monotonic() < deadline, "".join(seen[-20:])
        else:
            pytest.fail("the demo ended before its fleet step: " + "".join(seen[-20:]))
        fleet = json.loads(fleet_json.read_text())
        pids = all_pids(fleet)
        assert pids and all(alive(p) for p in pids if p)
        ports = [int(a.rsplit(":", 1)[1]) for a in json.loads(
            (out / "network" / "provisioning.json").read_text())["document"]["network"]
            ["peers"].values()]
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0, rest[-2000:]
        assert "fleet down" in rest, rest[-2000:]
        left = [p for p in pids if alive(p)]
        assert not left, f"still running after the demo stopped: {left}"
        for port in ports:  # bound again at once: nothing holds the terminals' ports
            with socket.socket() as s:  # (TIME_WAIT of old connections allowed, a listener not)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if fleet_json.exists():
            subprocess.run([sys.executable, "-m", "tools.cli", "fleet", "down", "--dir",
                            str(out / "network")], cwd=ROOT, env=env, capture_output=True)
