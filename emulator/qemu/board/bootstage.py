"""The board's boot stage: the bootloader's A/B choice, and the chosen slot mounted.

A terminal's bootloader reads the A/B boot state, counts the boot attempt and
starts the chosen slot; here that runs first thing in the system disk's init
(rcS), with the bootloader's own copy of hal/ (not the slot's). The state is
hal/bootstate.py's, on the flash's boot partition, where RAUC's custom
backend (hal/bootctl.py) writes it during an update. A slot that will not
mount (empty, or not a squashfs appfs) is marked bad and the other is tried:
no slot at all halts the board (rcS), which says so on the console.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, "/usr/lib/edgekey-boot")  # the bootloader's code: hal/, board_configs/

from hal import bootstate
from hal.board import Board, board_path, load_board
from hal.bootctl import write_rauc_config
from hal.recordlog import LogError

RUN = "/run/edgekey"
BOOT = "/usr/lib/edgekey-boot"
BOARD = "qemu-armhf"
MOUNT = "/opt/edgekey"


def say(text: str) -> None:
    with open("/dev/console", "w") as f:
        f.write(f"edgekey-boot: {text}\r\n")


def loop(flash: str, board: Board, slot: str, *, read_only: bool) -> str:
    """A loop device over the slot's partition of the flash (util-linux losetup)."""
    offset, size = bootstate.slot_region(board, slot)
    out = subprocess.run(["/sbin/losetup", *(["-r"] if read_only else []), "-f", "--show",
                          "-o", str(offset), "--sizelimit", str(size), flash],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise OSError(f"losetup: {out.stderr.strip()}")
    return out.stdout.strip()


def mount_slot(flash: str, board: Board, slot: str) -> tuple[str | None, str]:
    """The slot's squashfs read-only at MOUNT: (None, loop device), or (why not, "")."""
    try:
        dev = loop(flash, board, slot, read_only=True)
    except OSError as exc:
        return str(exc), ""
    m = subprocess.run(["/bin/busybox", "mount", "-t", "squashfs", "-o", "ro", dev, MOUNT],
                       capture_output=True, text=True)
    if m.returncode != 0:
        subprocess.run(["/sbin/losetup", "-d", dev])
        return f"not a squashfs appfs ({m.stderr.strip() or 'mount failed'})", ""
    return None, dev


def rauc_config(flash: str, board: Board, booted: str, booted_dev: str) -> None:
    """system.conf for the board's RAUC service (rauc-service): the booted slot's loop
    device, a writable one over the other slot, our backend from this boot code."""
    keyring = Path(RUN) / "update-ca.crt"
    if not keyring.is_file():
        say("no fleet update CA in this terminal's identity: updates are off")
        return
    loops = {booted: booted_dev, bootstate.other(booted): loop(flash, board,
                                                               bootstate.other(booted),
                                                               read_only=False)}
    folder = Path(RUN) / "rauc"
    folder.mkdir(exist_ok=True)
    write_rauc_config(board, flash, folder, keyring, loops, python="/usr/bin/python3",
                      pythonpath=BOOT)


def choose(flash: str, board: Board) -> tuple[str | None, str]:
    """The bootloader's choice, its boot attempt counted on the flash before booting."""
    try:
        slot, why, _ = bootstate.boot_choice(flash, board)
    except bootstate.NoBootableSlotError as exc:
        return None, str(exc)
    except (bootstate.BootStateError, LogError) as exc:
        return None, f"the boot partition holds no readable boot state: {exc}"
    return slot, why


def main() -> int:
    with open(f"{RUN}/disks.env") as f:
        flash = f.read().strip().partition("=")[2]
    board = load_board(board_path(BOARD))
    for _ in range(2):
        slot, reason = choose(flash, board)
        if slot is None:
            say(reason)
            return 1
        part = bootstate.PARTITIONS[slot]
        why, dev = mount_slot(flash, board, slot)
        if why is None:
            try:
                with open(f"{MOUNT}/slot.json") as f:
                    info = json.load(f)
            except (OSError, ValueError) as exc:
                info = {"version": f"? ({exc})"}
            say(f"slot {slot} ({part}, version {info.get('version')}): {reason}")
            with open(f"{RUN}/boot.env", "w") as f:
                f.write(f"SLOT={slot}\nBOARD={BOARD}\nVERSION={info.get('version')}\n")
            try:
                rauc_config(flash, board, slot, dev)
            except OSError as exc:
                say(f"updates are off: {exc}")
            return 0
        say(f"slot {slot} ({part}) will not mount: {why}; marked bad")
        bootstate.update(flash, board, lambda st, s=slot: bootstate.mark_bad(st, s))
    say("neither slot mounts")
    return 1


if __name__ == "__main__":
    sys.exit(main())
