"""``edgekey board build|boot``: the system-mode board on the desk, as a terminal is made.

``build`` makes (or reuses) the kernel, initramfs and system disk
(emulator/qemu/build-board.sh). ``boot`` does what a factory and a field
engineer do: provision a terminal (a fleet of one), install the agent's
signed RAUC bundle into its flash through the same ``flash install`` as any
update (a blank image's first install goes to slot A), append its identity
to the initramfs and power it on under ``qemu-system-arm``, with the
terminal's meters emulated on the host at the far end of its HPLC UART
(``python -m emulator.meter``). It prints the ptys and the boot-to-console
time, then keeps the board running until Ctrl-C (``--check``: once every
meter is registered it asks the console for ``status`` and powers off).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BOARD = "qemu-armhf"  # the board file of the terminal under qemu-system-arm -M virt
CONSOLE_TIMEOUT_S = 300.0
REGISTER_TIMEOUT_S = 120.0


@dataclass
class Terminal:
    """A provisioned terminal of the board, with its slot A installed."""

    dir: Path
    node: str
    flash: Path
    trust: Path
    device_key: Path
    meters_file: Path
    tls_dir: Path | None
    keyring: Path
    installed: str  # the version in slot A


def prepare(directory: Path, *, meters: int = 8, seed: int = 3, version: str | None = None,
            keys: Path | None = None) -> Terminal:
    """Provision a fleet of one for the board and install the agent's bundle into its flash."""
    from hal.board import board_path, load_board
    from tools import flash_update, image_build
    from tools.provision_cmd import provision_fleet

    board = load_board(board_path(BOARD))
    directory.mkdir(parents=True, exist_ok=True)
    fleet = provision_fleet(directory, terminals=1, meters=meters, board_name=BOARD, seed=seed)
    t = fleet["terminals"][0]
    keys_dir = keys or directory / "update-keys"
    built = image_build.build_bundle(board, directory / "images",
                                     version or image_build.project_version(), keys_dir)
    keyring = image_build.keys_in(keys_dir).ca_crt
    done = flash_update.install(t["flash"], board, built.bundle, keyring)
    term = Terminal(directory, t["id"], Path(t["flash"]), directory / "utility.pub",
                    Path(t["device_key"]), Path(t["meters_file"]), None, keyring, done.version)
    (directory / "board.json").write_text(json.dumps(
        {k: str(v) if isinstance(v, Path) else v for k, v in vars(term).items()}, indent=1))
    return term


def power_on(term: Terminal, work: Path, *, smp: int = 2, share: Path | None = None,
             debug_shell: bool = False):
    """The board for this terminal, built or cached, started: a ``BoardVM``."""
    from emulator.qemu_board import BoardVM, build_board, identity_archive

    board_dir = build_board()
    work.mkdir(parents=True, exist_ok=True)
    ident = identity_archive(work / "identity.cpio.gz", term.node, term.trust, term.device_key,
                             term.tls_dir, term.keyring)
    vm = BoardVM(board_dir, term.flash, ident, work, smp=smp, share=share,
                 extra_append="edgekey.shell" if debug_shell else "")
    vm.start()
    return vm


def add_parser(sub: argparse._SubParsersAction, check: Callable) -> None:
    board = sub.add_parser("board", help="board configs and the system-mode QEMU board"
                           ).add_subparsers(dest="board_cmd", metavar="SUBCOMMAND", required=True)
    c = board.add_parser("check", help="validate board files (name or path)")
    c.add_argument("boards", nargs="+", metavar="BOARD")
    c.set_defaults(handler=check)
    b = board.add_parser("build", help="build or reuse the kernel, initramfs and system disk "
                                       "qemu-system-arm boots")
    b.set_defaults(handler=run_build)
    bo = board.add_parser("boot", help="provision a terminal, install its signed image into "
                                       "slot A and boot it under qemu-system-arm")
    bo.add_argument("--dir", type=Path, default=Path("out/board"),
                    help="where the terminal's flash image, keys and logs go (a new one each "
                         "time; default out/board)")
    bo.add_argument("--meters", type=int, default=8, help="meters to provision (default 8)")
    bo.add_argument("--seed", type=int, default=3)
    bo.add_argument("--version", help="the installed image's version (default the project's)")
    bo.add_argument("--keys", type=Path, help="the fleet's update keys (default DIR/update-keys, "
                                              "made if absent)")
    bo.add_argument("--smp", type=int, default=2, help="emulated cores (default 2, the board's)")
    bo.add_argument("--share", type=Path, help="a directory the board mounts read-only at "
                                               "/mnt/update (bundles for `update install`)")
    bo.add_argument("--debug-shell", action="store_true",
                    help="a root shell on the maintenance port (the virtconsole's pty): to "
                         "look inside the board")
    bo.add_argument("--no-meters", action="store_true",
                    help="leave the HPLC UART's pty free (for a test or another meter "
                         "emulator); by default the provisioned meters run on it")
    bo.add_argument("--rotate-every", type=float, default=60.0,
                    help="seconds between each emulated meter's key rotations (default 60)")
    bo.add_argument("--check", action="store_true",
                    help="boot, wait for every meter to register, ask the console for "
                         "status, power off")
    bo.set_defaults(handler=run_boot)


def run_build(args: argparse.Namespace) -> int:
    from emulator.qemu_board import BoardError, build_board

    t0 = time.monotonic()
    try:
        d = build_board()
    except BoardError as exc:
        print(f"edgekey board build: {exc}", file=sys.stderr)
        return 1
    for name in ("vmlinuz", "initrd.cpio.gz", "system.ext4"):
        print(f"{d / name}  {(d / name).stat().st_size / 2**20:.1f} MiB")
    print(f"board ready in {time.monotonic() - t0:.1f} s")
    return 0


def run_boot(args: argparse.Namespace) -> int:
    import shutil

    from emulator.qemu_board import BoardError
    from emulator.serial_terminal import SerialTerminal
    from tools.flash_update import UpdateError
    from tools.image_build import ImageError

    if args.dir.exists() and any(args.dir.iterdir()):
        if not (args.dir / "board.json").is_file():
            print(f"edgekey board boot: {args.dir} holds files of something else; give --dir "
                  "a new folder or one an earlier board boot made", file=sys.stderr)
            return 1
        shutil.rmtree(args.dir)  # an earlier board's: a new terminal each time
    try:
        term = prepare(args.dir, meters=args.meters, seed=args.seed, version=args.version,
                       keys=args.keys)
        print(f"terminal {term.node}: flash {term.flash}, slot A holds {term.installed}")
        vm = power_on(term, args.dir / "vm", smp=args.smp, share=args.share,
                      debug_shell=args.debug_shell)
    except (BoardError, UpdateError, ImageError) as exc:
        print(f"edgekey board boot: {exc}", file=sys.stderr)
        return 1
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    meters: subprocess.Popen | None = None
    try:
        print(f"console (PL011 UART) on {vm.console_path}, hplc link (16550 UART) on "
              f"{vm.link_path}, maintenance port (virtconsole) on {vm.maintenance_path}"
              f"{' with a root shell' if args.debug_shell else ''}; QEMU log {vm.stderr_path}")
        with SerialTerminal.from_meters_file(vm.console_path, vm.link_path,
                                             term.meters_file) as t:
            t.wait_console(CONSOLE_TIMEOUT_S)
            print(f"console answers {time.monotonic() - vm.started:.1f} s after power-on")
            if not args.no_meters:
                meters = start_meters(term, vm.link_path, args.rotate_every)
                print(f"{args.meters} emulated meters on the HPLC UART (stats "
                      f"{term.dir / 'meters.stats.json'})")
            if args.check:
                if meters is not None:
                    wait_registered(term, args.meters, meters, REGISTER_TIMEOUT_S)
                body, status = t.console("status")
                print(body)
                return 0 if status == "OK" else 1
        print("board running; Ctrl-C powers it off")
        while vm.running() and not stop:
            time.sleep(0.5)
        return 0
    except (TimeoutError, KeyboardInterrupt) as exc:
        if isinstance(exc, TimeoutError):
            print(f"edgekey board boot: {exc}", file=sys.stderr)
            return 1
        return 0
    finally:
        if meters is not None:
            meters.terminate()
            try:
                meters.wait(timeout=10)
            except subprocess.TimeoutExpired:
                meters.kill()
                meters.wait()
        vm.stop()


def start_meters(term: Terminal, link: str, rotate_every: float) -> subprocess.Popen:
    """The provisioned meters, emulated on the host at the far end of the board's HPLC
    UART; timeouts sized for an emulated terminal."""
    return subprocess.Popen(
        [sys.executable, "-m", "emulator.meter", "--link", link, "--meters",
         str(term.meters_file), "--state", str(term.dir / "meter-state"), "--stats",
         str(term.dir / "meters.stats.json"), "--rotate-every", str(rotate_every),
         "--reading-every", "30", "--start-spread", "2", "--timeout", "20",
         "--log-level", "warning"], stdin=subprocess.DEVNULL)


def wait_registered(term: Terminal, n: int, meters: subprocess.Popen, timeout: float) -> None:
    t0 = time.monotonic()
    stats = term.dir / "meters.stats.json"
    while time.monotonic() < t0 + timeout:
        if meters.poll() is not None:
            raise TimeoutError(f"the emulated meters exited {meters.returncode}")
        try:
            if json.loads(stats.read_text()).get("registered", 0) >= n:
                print(f"every meter registered {time.monotonic() - t0:.1f} s after they started")
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"not every meter registered in {timeout:.0f} s (see {stats})")
