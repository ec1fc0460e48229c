"""Shared test settings: deterministic hypothesis profiles, the emulation flag, the etcd fixture."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# Under qemu-user everything runs about 8x slower (../shared/notes): fewer
# examples, no deadline. Both profiles are derandomized so a run is repeatable.
EMULATED = os.environ.get("EDGEKEY_EMULATED", "")

settings.register_profile("host", derandomize=True, max_examples=200, deadline=None)
settings.register_profile("arm", derandomize=True, max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("arm" if EMULATED else "host")


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# A test run stopped with SIGTERM (a CI timeout, a kill) unwinds like Ctrl-C: each test's
# finally blocks run, so the fleets, etcd clusters and agents a test started are stopped.
signal.signal(signal.SIGTERM, _interrupted)


# Where the integration tests' agent runs (``--target``): ``host``, this machine's python;
# ``qemu``, Debian's armhf python3 under qemu-arm-static on the cached root filesystem
# (emulator/qemu/arm-python.sh), the bench and the emulated meters on the host; ``hil``, a
# real terminal on serial ports (tests/test_hil.py: ``--port``, ``--link-port``, ``--meters``),
# or without ``--port`` the system-mode QEMU board on its pty UARTs. The tests that start
# the agent themselves (AgentProc) skip under hil: a terminal runs its own agent.
TARGETS = ("host", "qemu", "hil")
ARM_MEM_LIMIT = "512M"  # the PL terminal's RAM (board_configs/pl-terminal.toml)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The emulated agents' memory cgroups (arm-python.sh) go with the session."""
    import glob

    for cg in glob.glob("/sys/fs/cgroup/memory/**/edgekey-arm-*", recursive=True):
        try:
            with open(os.path.join(cg, "cgroup.procs")) as f:
                if not f.read().strip():
                    os.rmdir(cg)
        except OSError:
            pass  # still in use, or gone


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--target", choices=TARGETS, default="host",
                     help="where the agent under test runs: host, qemu (armhf under "
                          "qemu-arm-static) or hil (a real terminal, or the QEMU board)")
    parser.addoption("--port", default=None,
                     help="hil: the terminal's console serial port (pyserial URL, e.g. "
                          "/dev/ttyUSB0); without it the QEMU board is booted")
    parser.addoption("--link-port", default=None,
                     help="hil: the serial port of the terminal's meter link (its HPLC modem "
                          "or RS-485 adapter)")
    parser.addoption("--meters", default=None,
                     help="hil: the terminal's provisioned meters (edgekey provision's "
                          "<node>.meters.json: id and factory key of each)")
    parser.addoption("--baud", type=int, default=115200, help="hil: console baud rate")
    parser.addoption("--link-baud", type=int, default=115200, help="hil: meter link baud rate")


@pytest.fixture(scope="session")
def agent_python(pytestconfig: pytest.Config) -> list[str]:
    """The command that runs ``python`` for the agent under test, for the chosen target."""
    import sys

    target = pytestconfig.getoption("--target")
    if target == "qemu":
        from tools.bench_agent import ARM_PYTHON

        # the board's RAM, as a memory cgroup around each emulated agent (arm-python.sh)
        os.environ["EDGEKEY_ARM_MEM_LIMIT"] = ARM_MEM_LIMIT
        return list(ARM_PYTHON)
    if target == "hil":
        pytest.skip("--target hil: a terminal runs its own agent; tests/test_hil.py drives "
                    "it over its serial ports")
    return [sys.executable]


# The etcd tests' cluster (3 members, TLS, client auth), one per test module, and a client of
# it; imported lazily, so the other tests never load the etcd client.
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from emulator.etcd import EtcdCluster

    with EtcdCluster(tmp_path_factory.mktemp("etcd"), 3) as c:
        yield c


@pytest.fixture
def client(cluster: object) -> Iterator[object]:
    with cluster.client() as c:  # type: ignore[attr-defined]
        yield c
