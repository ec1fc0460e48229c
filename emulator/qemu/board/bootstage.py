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

sys.path.insert(0, "/usr/lib/edgekey-boot")

from hal import bootstate
from hal.board import board_path, load_board

RUN = "/run/edgekey"
BOARD = "qemu-armhf"
MOUNT = "/opt/edgekey"


def say(text: str) -> None:
    with open("/dev/console", "w") as f:
        f.write(f"edgekey-boot: {text}\r\n")


def mount_slot(flash: str, part_name: str) -> str | None:
    """The slot's squashfs read-only at MOUNT through a loop device; None if it won't."""
    fl = load_board(board_path(BOARD)).flash
    part = next(p for p in fl.partitions if p.name == part_name)
    loop = subprocess.run(["/sbin/losetup", "-r", "-f", "--show", "-o", str(part.offset_mib << 20),
                           "--sizelimit", str(part.size_mib << 20), flash],
                          capture_output=True, text=True)
    if loop.returncode != 0:
        return f"losetup: {loop.stderr.strip()}"
    dev = loop.stdout.strip()
    m = subprocess.run(["/bin/busybox", "mount", "-t", "squashfs", "-o", "ro", dev, MOUNT],
                       capture_output=True, text=True)
    if m.returncode != 0:
        subprocess.run(["/sbin/losetup", "-d", dev])
        return f"not a squashfs appfs ({m.stderr.strip() or 'mount failed'})"
    return None


def main() -> int:
    with open(f"{RUN}/disks.env") as f:
        flash = f.read().strip().partition("=")[2]
    for _ in range(2):
        slot, reason = bootstate.boot_device(flash, BOARD)
        if slot is None:
            say(f"no bootable slot: {reason}")
            return 1
        part = bootstate.SLOT_PARTITION[slot]
        why = mount_slot(flash, part)
        if why is None:
            try:
                with open(f"{MOUNT}/slot.json") as f:
                    info = json.load(f)
            except (OSError, ValueError) as exc:
                info = {"version": f"? ({exc})"}
            say(f"slot {slot} ({part}, version {info.get('version')}): {reason}")
            with open(f"{RUN}/boot.env", "w") as f:
                f.write(f"SLOT={slot}\nBOARD={BOARD}\nVERSION={info.get('version')}\n")
            return 0
        say(f"slot {slot} ({part}) will not mount: {why}; marked bad")
        bootstate.mark_device(flash, BOARD, slot, False)
    say("neither slot mounts")
    return 1


if __name__ == "__main__":
    sys.exit(main())
