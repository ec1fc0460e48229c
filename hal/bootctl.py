"""RAUC's custom bootloader backend over the boot partition, and the bootloader's choice.

RAUC (``bootloader=custom``) runs its ``bootloader-custom-backend`` as
``BACKEND get-primary | set-primary NAME | get-state NAME | set-state NAME
good|bad | get-current`` and reads the answer from stdout (``A``, ``good``);
a non-zero exit is a failure. An install wraps this module in a small shell
script with the board and device baked in, so RAUC calls::

    python3 -m hal.bootctl --board B --device PATH COMMAND [ARG...]

PATH is the flash image file or the block device (/dev/vda in the guest).
Three more commands are ours: ``pre-install`` is RAUC's pre-install handler
(it refuses a bundle that is not newer than the booted slot's, unless RAUC
passes ``allow-downgrade`` in the handler args, and records what the
install writes so ``set-primary`` can record it on the slot in the same
write); ``choose`` is the bootloader (pick, take one try off, persist, print
the slot; the reason goes to stderr); ``show`` prints the state for people.
Exit status: 0 done, 1 refused or failed (one line on stderr), 2 usage.
Standard library and ``hal`` only: the guest's base OS runs this.
"""

from __future__ import annotations

import argparse
import configparser
import os
import shlex
import sys
from pathlib import Path

from hal import bootstate as bs
from hal.blockdev import FlashError
from hal.board import Board, BoardConfigError, board_path, load_board
from hal.recordlog import LogError

CURRENT_ENV = "EDGEKEY_BOOT_SLOT"  # overrides get-current (as rauc.slot= on a kernel cmdline)
SLOT_CLASS = "appfs"  # RAUC's slot class of the agent's A/B image
TRACE_ENV = "EDGEKEY_BOOTCTL_TRACE"  # file: the backend logs every call RAUC makes
KILL_ENV = "EDGEKEY_BOOTCTL_KILL"  # before:CMD | after:CMD: SIGKILL rauc service there (tests)


def compatible(board: Board) -> str:
    """RAUC's compatible string for a board: bundles install only where it matches."""
    return f"edgekey-{board.name}"


def backend_script(board: Board, device: str, *, python: str, pythonpath: str,
                   command: str | None = None) -> str:
    """The shell wrapper RAUC runs as the backend (command None) or a handler (``command``):
    this module under ``python`` with ``pythonpath``, the board and flash device baked in.
    The desk's installer (tools/flash_update.py) and the board's boot stage write one."""
    call = " ".join(shlex.quote(a) for a in (python, "-m", "hal.bootctl", "--board",
                                             str(Path(board.source).resolve()), "--device",
                                             device))
    if command is None:
        cmd, trace, args = '"$1"', '"$*"', '"$@"'
    else:
        cmd, trace, args = command, f'"{command}${{1:+ $1}}"', f"{command} ${{1:-}}"
    role = "bootloader-custom-backend" if command is None else f"{command} handler"
    return f"""#!/bin/sh
# RAUC {role}: board {board.name}, flash {device}.
# ${TRACE_ENV}=FILE logs each call; ${KILL_ENV}=before:CMD or after:CMD
# SIGKILLs the caller (rauc service) around call CMD: a power cut there, for tests.
cmd={cmd}
[ -n "${{{TRACE_ENV}:-}}" ] && echo {trace} >> "${TRACE_ENV}"
if [ "${{{KILL_ENV}:-}}" = "before:$cmd" ]; then kill -KILL "$PPID"; exit 1; fi
PYTHONPATH={shlex.quote(pythonpath)}${{PYTHONPATH:+:$PYTHONPATH}} {call} {args}
rc=$?
if [ "${{{KILL_ENV}:-}}" = "after:$cmd" ]; then kill -KILL "$PPID"; fi
exit $rc
"""


def system_conf(board: Board, folder: Path, keyring: Path, loops: dict[str, str]) -> str:
    """RAUC's system.conf for the board: ``folder`` holds the wrappers (bootctl.sh,
    pre-install.sh), its data and mount points; ``loops`` the slots' devices by bootname."""
    slots = "".join(f"\n[slot.{SLOT_CLASS}.{i}]\ndevice={loops[n]}\ntype=raw\nbootname={n}\n"
                    for i, n in enumerate(bs.SLOTS))
    return (f"[system]\ncompatible={compatible(board)}\nbootloader=custom\n"
            f"data-directory={folder / 'data'}\nmountprefix={folder / 'mnt'}\n\n"
            f"[handlers]\nbootloader-custom-backend={folder / 'bootctl.sh'}\n"
            f"pre-install={folder / 'pre-install.sh'}\n\n"
            f"[keyring]\npath={keyring.resolve()}\n{slots}")


def write_rauc_config(board: Board, device: str, folder: Path, keyring: Path,
                      loops: dict[str, str], *, python: str, pythonpath: str) -> Path:
    """system.conf and the two wrappers it names, in ``folder``; the system.conf's path."""
    for name, command in (("bootctl.sh", None), ("pre-install.sh", "pre-install")):
        path = folder / name
        path.write_text(backend_script(board, device, python=python, pythonpath=pythonpath,
                                       command=command))
        path.chmod(0o755)
    conf = folder / "system.conf"
    conf.write_text(system_conf(board, folder, keyring, loops))
    return conf


class Refused(Exception):
    """The pre-install handler refuses the bundle."""


def describe(state: bs.BootState) -> list[str]:
    """The state as lines for people (``flash status``, ``show``)."""
    lines = [f"primary {state.primary}, booted {state.current or '- (not booted yet)'}"]
    for name in bs.SLOTS:
        slot = state.slot(name)
        img = slot.image
        what = (f"{img.version} ({img.compatible}, sha256 {img.sha256[:16] or '-'})"
                if img else "nothing recorded")
        lines.append(f"slot {name} ({bs.PARTITIONS[name]}): {slot.state}, "
                     f"{slot.attempts} attempt(s) left; {what}")
    if state.pending:
        name, img = state.pending
        lines.append(f"pending: install of {img.version} into slot {name} not finished")
    return lines


def _manifest(env: dict[str, str]) -> tuple[str, str]:
    """The bundle's version and compatible: RAUC's variables, else its mounted manifest.

    RAUC 1.8 gives a pre-install handler only the mount point; the bundle
    is mounted there after its signature was checked, so its manifest is
    the signed one.
    """
    if "RAUC_MF_VERSION" in env:
        return env["RAUC_MF_VERSION"], env.get("RAUC_MF_COMPATIBLE", "")
    mount = env.get("RAUC_BUNDLE_MOUNT_POINT") or env.get("RAUC_UPDATE_SOURCE")
    if not mount:
        raise Refused("no RAUC_BUNDLE_MOUNT_POINT: not run by RAUC as a pre-install handler")
    mf = configparser.ConfigParser(interpolation=None)
    try:
        with open(os.path.join(mount, "manifest.raucm"), encoding="utf-8") as f:
            mf.read_file(f)
        return mf["update"].get("version", ""), mf["update"].get("compatible", "")
    except (OSError, UnicodeDecodeError, configparser.Error, KeyError) as exc:
        raise Refused(f"cannot read the bundle's manifest in {mount}: {exc}") from None


def pre_install(state: bs.BootState, env: dict[str, str], handler_args: str
                ) -> bs.BootState:
    """RAUC's pre-install handler: refuse a downgrade, remember what is about to be written."""
    version, mf_compat = _manifest(env)
    sys_compat = env.get("RAUC_SYSTEM_COMPATIBLE")
    if sys_compat is not None and mf_compat != sys_compat:
        raise Refused(f"bundle is for {mf_compat!r}, this system is {sys_compat!r}")
    try:
        bs.version_key(version)
    except ValueError as exc:
        raise Refused(f"bundle {exc}") from None
    booted = env.get("RAUC_CURRENT_BOOTNAME") or state.booted
    if booted not in bs.SLOTS:
        raise Refused(f"booted slot {booted!r} is not A or B")
    running = state.slot(booted).image
    allow = "allow-downgrade" in handler_args.split()
    if running is not None and not allow:
        cmp = bs.compare_versions(version, running.version)
        if cmp < 0:
            raise Refused(f"downgrade: bundle {version} is older than {running.version} "
                          f"in the booted slot {booted}")
        if cmp == 0:
            raise Refused(f"not newer: bundle {version} is the version the booted slot "
                          f"{booted} runs")
    for idx in env.get("RAUC_TARGET_SLOTS", "").split():
        name = env.get(f"RAUC_SLOT_BOOTNAME_{idx}", "")
        if name in bs.SLOTS:
            image = bs.Image(version, mf_compat, env.get(f"RAUC_IMAGE_DIGEST_{idx}", ""))
            state = bs.begin_install(state, name, image)
    return state


def _slot_arg(value: str) -> str:
    if value not in bs.SLOTS:
        raise argparse.ArgumentTypeError(f"unknown bootname {value!r} (A or B)")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m hal.bootctl",
                                description="RAUC custom bootloader backend on the boot "
                                            "partition, and the A/B bootloader's choice")
    p.add_argument("--board", required=True, help="board name or file")
    p.add_argument("--device", required=True, help="flash image file or block device")
    p.add_argument("--current", type=_slot_arg, default=None,
                   help=f"the slot booted now, for get-current (also ${CURRENT_ENV})")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)
    sub.add_parser("get-primary")
    sub.add_parser("set-primary").add_argument("name", type=_slot_arg)
    sub.add_parser("get-state").add_argument("name", type=_slot_arg)
    ss = sub.add_parser("set-state")
    ss.add_argument("name", type=_slot_arg)
    ss.add_argument("value", choices=("good", "bad"))
    sub.add_parser("get-current")
    sub.add_parser("pre-install").add_argument("handler_args", nargs="*", default=[])
    sub.add_parser("choose")
    sub.add_parser("show")
    return p


def run(args: argparse.Namespace) -> str:
    """Carry out one command; returns what goes to stdout."""
    board = load_board(board_path(args.board))
    dev = args.device
    if args.cmd == "get-primary":
        return bs.read(dev, board).primary
    if args.cmd == "get-state":
        return "good" if bs.read(dev, board).slot(args.name).bootable else "bad"
    if args.cmd == "get-current":
        override = args.current or os.environ.get(CURRENT_ENV)
        if override:
            if override not in bs.SLOTS:
                raise ValueError(f"${CURRENT_ENV}={override!r} is not a bootname (A or B)")
            return override
        return bs.read(dev, board).booted
    if args.cmd == "show":
        return "\n".join(describe(bs.read(dev, board)))
    if args.cmd == "set-primary":
        bs.update(dev, board, lambda s: bs.set_primary(s, args.name))
    elif args.cmd == "set-state":
        bs.update(dev, board, lambda s: bs.set_state(s, args.name, args.value == "good"))
    elif args.cmd == "pre-install":
        bs.update(dev, board, lambda s: pre_install(s, dict(os.environ),
                                                    " ".join(args.handler_args)))
    elif args.cmd == "choose":
        slot, why, _ = bs.boot_choice(dev, board)
        print(f"bootctl: {why}", file=sys.stderr)
        return slot
    return ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except Refused as exc:
        print(f"<< error refused: {exc}")  # RAUC shows handler lines of this form
        print(f"bootctl {args.cmd}: refused: {exc}", file=sys.stderr)
        return 1
    except (bs.BootStateError, bs.NoBootableSlotError, BoardConfigError, FlashError, LogError,
            OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"bootctl {args.cmd}: {msg}", file=sys.stderr)
        return 1
    if out:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
