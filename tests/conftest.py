"""Shared test settings: deterministic hypothesis profiles, the emulation flag."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Under qemu-user everything runs about 8x slower (../shared/notes): fewer
# examples, no deadline. Both profiles are derandomized so a run is repeatable.
EMULATED = os.environ.get("EDGEKEY_EMULATED", "")

settings.register_profile("host", derandomize=True, max_examples=200, deadline=None)
settings.register_profile("arm", derandomize=True, max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("arm" if EMULATED else "host")
