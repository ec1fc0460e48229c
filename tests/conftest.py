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
