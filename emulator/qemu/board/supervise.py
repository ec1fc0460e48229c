"""The agent under the board's init system, and the slot's boot health check.

busybox init runs this (inittab ``respawn``) once the boot stage has mounted
the chosen A/B slot at /opt/edgekey. It starts the slot's agent on the board's
links (the board file's: console on the PL011 UART, hplc on the second UART) and keeps the
agent's event log off the console UART, which is the agent's shell: it goes
to /run/edgekey/agent.log. The health check is the agent's own boot: the slot
is marked good (hal/bootstate.py) when the agent says ``agent.ready``. A slot
whose agent dies before that is marked bad and the board reboots, so the
bootloader rolls back to the other slot. A refusal of the data on the flash
(a damaged chain, a foreign image) is not the slot's fault: the reason is
printed on the console and the agent is tried again later.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

RUN = "/run/edgekey"
BOOT = "/usr/lib/edgekey-boot"
LOG_CAP = 1 << 20  # bytes of agent log kept in /run (a tmpfs), the older half dropped
READY_TIMEOUT_S = 600.0  # emulated boots are slow; a hung boot fails the check
REFUSED_RETRY_S = 30.0
REBOOT_BOARD_STATUS = 76  # agent/update.py: the agent asks the board to reboot


def env(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            k, _, v = line.strip().partition("=")
            if k:
                out[k] = v
    return out


def console(text: str) -> None:
    with open("/dev/console", "w") as f:
        f.write(f"\r\nedgekey-boot: {text}\r\n")


def mark(slot: str, good: bool, flash: str, board: str) -> None:
    """The health check's verdict on the booted slot, in the A/B boot state (RAUC's mark-good
    and mark-bad), written with the bootloader's code, not the slot's."""
    sys.path.insert(0, BOOT)
    from hal import bootstate
    from hal.board import board_path, load_board

    bootstate.update(flash, load_board(board_path(board)),
                     lambda st: bootstate.set_state(st, slot, good))


def main() -> int:
    boot = env(f"{RUN}/boot.env")
    disks = env(f"{RUN}/disks.env")
    with open(f"{RUN}/node") as f:
        node = f.read().strip()
    slot, board, flash = boot["SLOT"], boot["BOARD"], disks["FLASH"]
    cmd = ["/usr/bin/python3", "-m", "agent", "--board", board, "--node", node,
           "--flash", flash, "--trust", f"{RUN}/utility.pub", "--device-key",
           f"{RUN}/device.key", "--tls-dir", f"{RUN}/tls", "--format-if-blank"]
    envp = {"PATH": "/usr/bin:/bin:/sbin", "PYTHONPATH": "/opt/edgekey/edgekey", "HOME": "/tmp",
            "PYTHONDONTWRITEBYTECODE": "1", "EDGEKEY_RUN_DIR": RUN,
            # the system bus of rauc-service, for `update install` (rauc's client)
            "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/run/dbus/system_bus_socket"}
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=envp, cwd="/tmp", stderr=subprocess.PIPE)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    assert proc.stderr is not None
    ready, last = False, b""
    log = open(f"{RUN}/agent.log", "ab", buffering=0)  # noqa: SIM115
    for line in proc.stderr:
        if log.tell() > LOG_CAP:
            log.close()
            os.replace(f"{RUN}/agent.log", f"{RUN}/agent.log.1")
            log = open(f"{RUN}/agent.log", "ab", buffering=0)  # noqa: SIM115
        log.write(line)
        if line.strip():
            last = line.strip()
        if not ready and b'"event":"agent.ready"' in line:
            ready = True
            mark(slot, True, flash, board)
            with open(f"{RUN}/ready", "w") as f:
                f.write(f"slot={slot} boot_s={time.monotonic() - started:.1f}\n")
        if not ready and time.monotonic() - started > READY_TIMEOUT_S:
            proc.kill()
    status = proc.wait()
    log.close()
    if ready and status == REBOOT_BOARD_STATUS:  # `update reboot` on the console
        console("the agent asked for a reboot: rebooting")
        reboot()
    if ready:
        return status  # init starts it again
    why = last.decode(errors="replace")
    if "refused to start:" in why:
        console(f"the agent refused the flash {flash}: {why.split('refused to start:', 1)[1]}")
        time.sleep(REFUSED_RETRY_S)
        return 1
    console(f"slot {slot} failed its boot health check (agent exit {status}: {why}); "
            "marked bad, rebooting")
    mark(slot, False, flash, board)
    reboot()
    return 1


def reboot() -> None:
    os.sync()
    subprocess.run(["/bin/busybox", "reboot", "-f"])


if __name__ == "__main__":
    sys.exit(main())
