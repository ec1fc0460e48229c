"""``edgekey bench board``: the terminal as it is flashed, booted and updated, measured.

Figures (JSON + table + a PNG of rotation latency per interpreter):
- build: the armhf root filesystems (test tier, board) and the board image
  (kernel, initramfs, system disk), time and size, cold (``--cold``: in a
  fresh cache) and cached;
- the RAUC bundle: build time and size; the factory's install into slot A;
- boot: power-on to the console's first answer on the PL011 UART; the agent's
  RSS against the board's 512 MiB and its 192 MiB agent budget;
- a key rotation end to end (meter request over the link to its
  authenticated ACK), rotations offered open-loop, p50/p99, on the host's
  python, on Debian's armhf python3 under qemu-arm-static (user mode) and on
  the QEMU board (system mode), with the ratios to the host;
- the update on the board from its console: install, reboot into the new
  slot, install of a slot whose agent dies before its health check, and the
  reboot that rolls back to the good slot by itself.
"""

from __future__ import annotations

import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from emulator.agent_harness import ROOT, AgentProc, TestMeter
from tools.bench_agent import ARM_PYTHON, OpenLoop, _pct, _rotation, poisson
from tools.board_cmd import prepare

BUILD = ROOT / "emulator" / "qemu"
BOARD = "qemu-armhf"
BROKEN = 'raise SystemExit("this slot\'s agent is broken: it dies before its health check")\n'


def _du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def _timed_build(script: str, *args: str, env: dict[str, str]) -> tuple[float, Path]:
    t0 = time.monotonic()
    out = subprocess.run(["bash", str(BUILD / script), *args], capture_output=True, text=True,
                         env=env, check=True)
    return time.monotonic() - t0, Path(out.stdout.strip().splitlines()[-1])


def builds(cold: bool) -> dict[str, Any]:
    """Root filesystems and board image: seconds and bytes, cold (a fresh cache) and cached."""
    caches = [tempfile.mkdtemp(prefix="bench-board-cache-")] if cold else []
    try:
        result: dict[str, Any] = {}
        for label, cache in [*(("cold", c) for c in caches), ("cached", None)]:
            env = {**os.environ, **({"EDGEKEY_CACHE": cache} if cache else {})}
            s_user, user = _timed_build("build-rootfs.sh", env=env)
            s_board_fs, board_fs = _timed_build("build-rootfs.sh", "--board", env=env)
            s_board, board = _timed_build("build-board.sh", env=env)
            result[label] = {"rootfs_s": s_user, "board_rootfs_s": s_board_fs,
                             "board_image_s": s_board}
            if label == "cached":
                result["sizes"] = {"rootfs_bytes": _du(user), "board_rootfs_bytes": _du(board_fs),
                                   **{f"{n.split('.')[0]}_bytes": (board / n).stat().st_size
                                      for n in ("vmlinuz", "initrd.cpio.gz", "system.ext4")},
                                   "system_allocated_bytes": _du(board / "system.ext4")}
        return result
    finally:
        for c in caches:
            shutil.rmtree(c, ignore_errors=True)


def rotations(t: Any, meters: list[TestMeter], *, n: int, rate: float, seed: int
              ) -> dict[str, Any]:
    """Register ``meters`` one by one, then ``n`` rotations offered open-loop at ``rate``."""
    for m in meters:
        a = m.request(m.keys.register())
        if a is None or a.__class__.__name__ != "AckAnswer":
            raise RuntimeError(f"registration of {m.meter_id.hex()} not acknowledged: {a}")
    rng = random.Random(seed)
    arrivals = [(at, rng.choice(meters).meter_id, None) for at in poisson(rate, n, rng)]
    by_id = {m.meter_id: m for m in meters}
    loop = OpenLoop(meters, t.link_m)
    loop.run([(at, mid, _rotation(by_id[mid])) for at, mid, _ in arrivals], drain_s=60.0)
    return {"offered": n, "offered_per_s": rate, "acked": loop.done, "naks": loop.naks,
            "latency": _pct(loop.latencies), "samples_s": loop.latencies}


def process_rotations(work: Path, python: list[str], *, meters: int, n: int, rate: float,
                      seed: int) -> dict[str, Any]:
    """The agent as a process on this machine (host python, or armhf under qemu-user)."""
    a = AgentProc(work, meters=meters, board=BOARD, python=python, seed=seed)
    try:
        a.start("--format")
        r = rotations(a, [TestMeter(a, i, seed=seed) for i in range(meters)], n=n, rate=rate,
                      seed=seed)
        r["rss_bytes"] = a.console_json("mem")["rss_bytes"]
        return r
    finally:
        a.close()


def board_run(work: Path, *, meters: int, n: int, rate: float, seed: int) -> dict[str, Any]:
    """Factory, boot, rotations and the update with its rollback, on the QEMU board."""
    from emulator.board_session import BoardSession
    from hal.board import board_path, load_board
    from tools.image_build import build_bundle

    out: dict[str, Any] = {}
    t0 = time.monotonic()
    term = prepare(work / "terminal", meters=meters, seed=seed)
    out["factory_s"] = time.monotonic() - t0  # provisioning, bundle, install into slot A
    share = work / "share"
    board = load_board(board_path(BOARD))
    keys = term.dir / "update-keys"
    bundles = {}
    for version, mutate in (("0.2.0", None), ("0.3.0", break_agent)):
        built = build_bundle(board, share, version, keys, mutate=mutate)
        bundles[version] = built.bundle.name
        out.setdefault("bundle", {"bytes": built.size, "slot_image_bytes": built.image_size,
                                  "build_s": built.seconds})
    s = BoardSession(term, share=share)
    try:
        t = s.power_on()
        out["boot_to_console_s"] = s.console_s
        mem = s.console_json("mem")
        out["rss_bytes"], out["budget_bytes"] = mem["rss_bytes"], mem["budget_bytes"]
        out["rotations"] = rotations(t, [TestMeter(t, i, seed=seed) for i in range(meters)],
                                     n=n, rate=rate, seed=seed)
        st = s.install(bundles["0.2.0"])
        out["install_s"] = st["install"]["seconds"]
        out["reboot_into_new_slot_s"] = s.reboot()
        out["booted_after_update"] = s.settled()["booted"]
        st = s.install(bundles["0.3.0"])
        out["install_broken_s"] = st["install"]["seconds"]
        out["rollback_to_console_s"] = s.reboot()
        st = s.settled()
        out["booted_after_rollback"] = st["booted"]
        out["broken_slot_state"] = st["slots"]["A"]["state"]
        return out
    finally:
        s.power_off(cut=False)


def break_agent(root: Path) -> None:
    """The agent of this slot dies before its health check (agent.ready)."""
    main = root / "edgekey" / "agent" / "__main__.py"
    head, future, rest = main.read_text().partition("from __future__ import annotations\n")
    assert future, "agent/__main__.py has no __future__ import to break after"
    main.write_text(head + future + BROKEN + rest)


def run(*, cold: bool = False, meters: int = 4, rotations_n: int = 60, rate: float = 2.0,
        seed: int = 1, out_png: str | None = None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-board-"))
    try:
        result: dict[str, Any] = {
            "machine": {"arch": platform.machine(), "python": platform.python_version(),
                        "cpus": os.cpu_count()},
            "builds": builds(cold),
            "host": process_rotations(work / "host", [sys.executable], meters=meters,
                                      n=rotations_n, rate=rate, seed=seed),
            "qemu_user": process_rotations(work / "qemu-user", ARM_PYTHON, meters=meters,
                                           n=rotations_n, rate=rate, seed=seed),
            "board": board_run(work / "board", meters=meters, n=rotations_n, rate=rate,
                               seed=seed),
        }
        host = result["host"]["latency"]["p50_ms"]
        result["ratios_p50"] = {"qemu_user": result["qemu_user"]["latency"]["p50_ms"] / host,
                                "board": result["board"]["rotations"]["latency"]["p50_ms"] / host}
        if out_png:
            plot(result, out_png)
            result["plot"] = out_png
        for r in (result["host"], result["qemu_user"], result["board"]["rotations"]):
            r.pop("samples_s", None)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plot(r: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rot in (("host python", r["host"]), ("armhf, qemu-arm-static", r["qemu_user"]),
                       ("QEMU board (system mode)", r["board"]["rotations"])):
        xs = sorted(x * 1e3 for x in rot["samples_s"])
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("rotation, meter request to authenticated ACK (ms)")
    ax.set_ylabel("fraction of rotations")
    ax.set_title(f"Key rotation end to end, offered open-loop at {r['host']['offered_per_s']:g}/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    mib = 2**20
    out: list[tuple[str, str]] = []
    b = r["builds"]
    for label in ("cold", "cached"):
        if label in b:
            x = b[label]
            out.append((f"build, {label}", f"test rootfs {x['rootfs_s']:.1f} s, board rootfs "
                        f"{x['board_rootfs_s']:.1f} s, board image {x['board_image_s']:.1f} s"))
    z = b["sizes"]
    out.append(("sizes", f"test rootfs {z['rootfs_bytes'] / mib:.0f} MiB, board rootfs "
                f"{z['board_rootfs_bytes'] / mib:.0f} MiB; kernel {z['vmlinuz_bytes'] / mib:.1f}"
                f" MiB, initramfs {z['initrd_bytes'] / mib:.1f} MiB, system disk "
                f"{z['system_bytes'] / mib:.0f} MiB ({z['system_allocated_bytes'] / mib:.0f} "
                "MiB allocated)"))
    bd = r["board"]
    out.append(("RAUC bundle", f"{bd['bundle']['bytes'] / mib:.2f} MiB (slot image "
                f"{bd['bundle']['slot_image_bytes'] / mib:.2f} MiB), built in "
                f"{bd['bundle']['build_s']:.1f} s"))
    out.append(("factory: provision, bundle, install into slot A", f"{bd['factory_s']:.1f} s"))
    out.append(("board: power-on to console", f"{bd['boot_to_console_s']:.1f} s"))
    out.append(("board: agent RSS", f"{bd['rss_bytes'] / mib:.1f} MiB of the 512 MiB board "
                f"({bd['budget_bytes'] / mib:.0f} MiB agent budget)"))
    for label, rot in (("host python", r["host"]), ("armhf under qemu-arm-static",
                                                    r["qemu_user"]),
                       ("QEMU board", bd["rotations"])):
        lat = rot["latency"]
        out.append((f"rotation end to end, {label}", f"p50 {lat['p50_ms']:.1f} ms, p99 "
                    f"{lat['p99_ms']:.1f} ms ({rot['acked']}/{rot['offered']} acked, "
                    f"{rot['offered_per_s']:g}/s offered)"))
    out.append(("agent RSS, host / qemu-arm-static (qemu's own included)",
                f"{r['host']['rss_bytes'] / mib:.1f} MiB / {r['qemu_user']['rss_bytes'] / mib:.1f}"
                " MiB"))
    out.append(("rotation p50 vs host", f"qemu-arm-static {r['ratios_p50']['qemu_user']:.1f}x, "
                f"QEMU board {r['ratios_p50']['board']:.1f}x"))
    out.append(("update on the board: install 0.2.0", f"{bd['install_s']:.1f} s"))
    out.append(("update reboot into slot B", f"{bd['reboot_into_new_slot_s']:.1f} s to the "
                f"console (booted {bd['booted_after_update']})"))
    out.append(("install of a broken 0.3.0 into A", f"{bd['install_broken_s']:.1f} s"))
    out.append(("reboot, health check fails, rollback", f"{bd['rollback_to_console_s']:.1f} s "
                f"to the console (booted {bd['booted_after_rollback']}, slot A "
                f"{bd['broken_slot_state']})"))
    return out
