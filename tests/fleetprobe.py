"""What the fleet tests share: ``tools.fleet_probe`` (the CLI, the consoles, the meters' state,
waiting), under the name the tests import."""

from __future__ import annotations

from tools.fleet_probe import (
    ROOT,
    ProbeError,
    acked,
    alive,
    all_pids,
    check_acked,
    console_json,
    consoles,
    converged,
    digests,
    down,
    edgekey,
    etcd_dropped_below,
    heights,
    load,
    marked_pids,
    meter_states,
    statuses,
    stop_meters,
    wait,
)

__all__ = ["ROOT", "ProbeError", "acked", "alive", "all_pids", "check_acked", "console_json",
           "consoles", "converged", "digests", "down", "edgekey", "etcd_dropped_below",
           "heights", "load",
           "marked_pids", "meter_states", "statuses", "stop_meters", "wait"]
