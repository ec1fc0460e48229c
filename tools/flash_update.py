"""``edgekey flash install | status | boot``: RAUC updates of a flash image's A/B slots.

install: the bundle is checked first with ``rauc info --keyring`` (signature,
compatible ``edgekey-<board>``, a version newer than the booted slot's), then
RAUC itself writes it: loop devices over the image's ``image_a`` and
``image_b``, a private D-Bus, ``rauc service`` with a system.conf of
``bootloader=custom`` (our backend, ``hal.bootctl``, behind a generated
wrapper) and a pre-install handler that refuses downgrades, then ``rauc
install``. Everything started is stopped on every path. A flash whose boot
partition records no installed image anywhere is blank: its first install
writes slot A (RAUC is told B is booted), so a new image gets its factory
slot. ``--no-service`` uses the RAUC service already running (on the
terminal, whose system.conf names the same backend).

boot: the bootloader's choice (``hal.bootstate.choose``), then the chosen
slot's health check: its squashfs read in place with ``unsquashfs -offset``,
its sha256 against the one recorded at install, its slot.json's board and
compatible, and ``python -m agent --board B --check`` run from it. A slot
that fails is marked bad and the bootloader chooses again: a rollback.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hal import bootstate as bs
from hal.board import Board, board_path, load_board
from hal.bootctl import compatible, write_rauc_config
from tools.image_build import ROOT, BundleInfo, ImageError, bundle_info, last_line
from tools.signals import sigterm_unwinds

COMMANDS = ("install", "status", "boot")
RAUC_NAME = "de.pengutronix.rauc"
SQUASHFS_MAGIC = b"hsqs"
_PR_SET_PDEATHSIG = 1


class UpdateError(Exception):
    """An install, boot or status that could not be carried out; one line."""


class Refused(UpdateError):
    """A bundle this flash must not take; nothing was written."""


region = bs.slot_region  # (offset, size) of a slot's partition


# ------------------------------------------------------------------ checks

def check_bundle(state: bs.BootState, board: Board, bundle: Path, keyring: Path,
                 allow_downgrade: bool) -> tuple[BundleInfo, str, str, bool]:
    """(bundle info, booted slot as RAUC is told, target slot, blank flash), or Refused."""
    try:
        info = bundle_info(bundle, keyring)
    except ImageError as exc:
        msg = str(exc).removeprefix("rauc info: ")
        low = msg.lower()
        kind = ("bundle format" if "bundle format" in low else
                "bundle signature" if "signature" in low or "verif" in low else "bundle")
        raise Refused(f"{kind}: {msg}") from None
    want = compatible(board)
    if info.compatible != want:
        raise Refused(f"wrong board: bundle is for {info.compatible!r}, this flash is {want!r}")
    try:
        bs.version_key(info.version)
    except ValueError as exc:
        raise Refused(f"bundle {exc}") from None
    if all(state.slot(n).image is None for n in bs.SLOTS):
        return info, "B", "A", True  # a blank flash: the first install is slot A
    booted = state.booted
    running = state.slot(booted).image
    if running is not None and not allow_downgrade:
        cmp = bs.compare_versions(info.version, running.version)
        if cmp < 0:
            raise Refused(f"downgrade: bundle {info.version} is older than {running.version} "
                          f"in the booted slot {booted} (--allow-downgrade to force)")
        if cmp == 0:
            raise Refused(f"not newer: bundle {info.version} is what the booted slot {booted} "
                          "runs (--allow-downgrade to reinstall)")
    return info, booted, bs.other(booted), False


# ------------------------------------------------------------------ plumbing

def _tool(cmd: list[str], what: str, timeout: float = 60) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UpdateError(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise UpdateError(f"{what}: {cmd[0]} did not finish in {timeout:.0f} s") from None
    if res.returncode != 0:
        raise UpdateError(f"{what}: {last_line(res.stderr or res.stdout)}")
    return res.stdout


@contextlib.contextmanager
def loop_device(path: str, offset: int, size: int) -> Iterator[str]:
    """A loop device over ``size`` bytes at ``offset`` of an image file or block device."""
    dev = _tool(["losetup", "-f", "--show", "-o", str(offset), "--sizelimit", str(size),
                 path], "losetup").strip()
    try:
        yield dev
    finally:
        for attempt in range(20):  # busy for a moment after a writer was killed
            res = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
            if res.returncode == 0 or "No such device" in res.stderr:
                break
            time.sleep(0.05 * (attempt + 1))
        else:
            print(f"edgekey: could not detach {dev}: {last_line(res.stderr)}", file=sys.stderr)


def _die_with_parent() -> None:
    """In the child: SIGKILL when the process that started it dies (no orphaned services)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _stop(proc: subprocess.Popen, grace: float = 5.0, group: bool = False) -> None:
    """Stop ``proc`` (with ``group``, its whole process group: handlers it started too)."""
    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    if proc.poll() is None:
        send(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait()
    if group:  # the leader is gone; what it left in its group goes too
        send(signal.SIGKILL)


BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:{socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


@contextlib.contextmanager
def private_bus(folder: Path) -> Iterator[str]:
    """A dbus-daemon of our own (an abstract socket: no path length limit, nothing to
    remove), its config in ``folder``; yields its address once it listens."""
    conf = folder / "bus.conf"
    conf.write_text(BUS_CONF.format(socket=f"abstract=edgekey-rauc-{os.getpid()}-"
                                           f"{os.urandom(6).hex()}"))
    try:
        proc = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork",
                                 "--nopidfile", "--print-address"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_die_with_parent)
    except FileNotFoundError:
        raise UpdateError("dbus-daemon is not installed (apt-get install dbus)") from None
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        address = proc.stdout.readline().decode().strip() if ready else ""
        if not address:
            _stop(proc)
            err = proc.stderr.read().decode(errors="replace")
            raise UpdateError(f"dbus-daemon: {last_line(err) if err else 'no address in 10 s'}")
        yield address
    finally:
        _stop(proc)


def _has_owner(env: dict[str, str]) -> bool:
    res = subprocess.run(["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
                          "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
                          f"string:{RAUC_NAME}"], capture_output=True, text=True, env=env)
    return res.returncode == 0 and "boolean true" in res.stdout


@contextlib.contextmanager
def rauc_service(conf: Path, booted: str, env: dict[str, str], log: Path,
                 handler_args: str) -> Iterator[subprocess.Popen]:
    """``rauc service`` in a mount namespace of its own (its bundle mount goes with it)."""
    cmd = ["unshare", "--mount", "--propagation", "private", "rauc", "service",
           f"--conf={conf}", f"--override-boot-slot={booted}"]
    if handler_args:
        cmd.append(f"--handler-args={handler_args}")
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not _has_owner(env):
            if proc.poll() is not None:
                raise UpdateError(f"rauc service exited: {last_line(log.read_text())}")
            if time.monotonic() > deadline:
                raise UpdateError("rauc service did not come up on the bus in 15 s")
            time.sleep(0.02)
        yield proc
    finally:
        _stop(proc, group=True)


def _install_error(output: str, log: str) -> str:
    """The line that says why: our handler's refusal, else RAUC's LastError."""
    lines = [ln.strip() for ln in (log + "\n" + output).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "refused:" in ln:
            return ln[ln.index("refused:"):]
    for ln in reversed(lines):
        if ln.startswith("LastError:"):
            return ln.removeprefix("LastError:").strip()
    for ln in reversed(lines):
        if "failed" in ln.lower() or "error" in ln.lower():
            return ln
    return lines[-1] if lines else "no output"


def _rauc_install(bundle: Path, env: dict[str, str], service: subprocess.Popen | None,
                  log: Path, timeout: float) -> None:
    """``rauc install``; fails as soon as the service dies (its client would wait forever)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(["rauc", "install", str(bundle)], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None:
                if service is not None and service.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    raise UpdateError(f"rauc install did not finish in {timeout:.0f} s")
                time.sleep(0.02)
        finally:
            _stop(proc, 2.0)
        out.seek(0)
        text = out.read()
    if service is not None and proc.returncode != 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.wait(0.5)
        if service.returncode is not None:
            code = service.returncode
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            raise UpdateError(f"rauc service died during the install ({how}); the slot it "
                              "was writing stays marked bad")
    if proc.returncode != 0:
        why = _install_error(text, log.read_text(errors="replace") if log.exists() else "")
        if why.startswith("refused:"):
            raise Refused(why.removeprefix("refused:").strip())
        if why.startswith("Pre-install handler error"):  # on a service not ours
            raise Refused(f"the system's pre-install handler refused the bundle ({why}; "
                          "its reason is in rauc service's log)")
        raise UpdateError(f"rauc install failed: {why}")


# ------------------------------------------------------------------ install

@dataclass(frozen=True)
class Installed:
    slot: str
    booted: str
    version: str
    sha256: str
    seconds: float
    factory: bool  # the flash was blank: this was its first install, into slot A


SlotDevice = Callable[[str, int, int], contextlib.AbstractContextManager[str]]


@contextlib.contextmanager
def rauc_on_host(device: str, board: Board, keyring: Path, booted: str, folder: Path,
                 env: dict[str, str], handler_args: str = "",
                 slot_device: SlotDevice = loop_device) -> Iterator[subprocess.Popen]:
    """What a terminal's init system gives RAUC, made in ``folder`` for one install: slot
    devices, the backend and handler wrappers, system.conf, a private bus (its address set
    in ``env``) and ``rauc service`` told ``booted`` is running. All of it stops on exit."""
    with contextlib.ExitStack() as stack:
        loops = {n: stack.enter_context(slot_device(device, *region(board, n)))
                 for n in bs.SLOTS}
        conf = write_rauc_config(board, device, folder, keyring, loops,
                                 python=sys.executable, pythonpath=str(ROOT))
        env["DBUS_SYSTEM_BUS_ADDRESS"] = stack.enter_context(private_bus(folder))
        yield stack.enter_context(rauc_service(conf, booted, env, folder / "rauc.log",
                                               handler_args))


def install(device: str | os.PathLike, board: Board, bundle: Path, keyring: Path, *,
            allow_downgrade: bool = False, no_service: bool = False,
            service_env: dict[str, str] | None = None, timeout: float = 600.0,
            slot_device: SlotDevice = loop_device) -> Installed:
    """Install ``bundle`` into the flash's inactive slot with RAUC (module docstring).

    ``slot_device(device, offset, size)`` gives the node RAUC writes a slot
    through: a loop device over the slot's bytes (tests put other nodes there).
    """
    t0 = time.monotonic()
    device = str(device)
    if not os.path.exists(device):
        raise UpdateError(f"no flash image or device {device}")
    bundle, keyring = bundle.resolve(), keyring.resolve()
    state = bs.read(device, board)
    info, booted, target, factory = check_bundle(state, board, bundle, keyring, allow_downgrade)
    handler_args = "allow-downgrade" if allow_downgrade else ""
    with sigterm_unwinds(), tempfile.TemporaryDirectory(prefix="edgekey-install-") as tmp:
        folder = Path(tmp)
        env = {**os.environ, **(service_env or {})}
        if no_service:
            _rauc_install(bundle, env, None, folder / "rauc.log", timeout)
        else:
            with rauc_on_host(device, board, keyring, booted, folder, env, handler_args,
                              slot_device) as service:
                _rauc_install(bundle, env, service, folder / "rauc.log", timeout)
    image = bs.Image(info.version, info.compatible, info.sha256)
    new = bs.update(device, board, lambda s: bs.record_install(s, target, image))
    if new.primary != target or not new.slot(target).bootable:
        raise UpdateError(f"rauc install finished but slot {target} is not the bootable primary "
                          f"({new.slot(target).state}, primary {new.primary})")
    return Installed(target, booted, info.version, info.sha256, time.monotonic() - t0, factory)


# ------------------------------------------------------------------ boot

def _superblock(device: str, board: Board, slot: str) -> int | None:
    """Bytes the slot's squashfs takes (as RAUC wrote it, padded to 4 KiB); None if none."""
    offset, size = region(board, slot)
    with open(device, "rb") as f:
        f.seek(offset)
        head = f.read(96)
    if len(head) < 48 or head[:4] != SQUASHFS_MAGIC:
        return None
    used = struct.unpack_from("<Q", head, 40)[0]
    padded = -(-used // 4096) * 4096
    return padded if 0 < padded <= size else None


def region_sha256(device: str, offset: int, length: int) -> str:
    """SHA-256 of ``length`` bytes of a flash image or device from ``offset``."""
    h = hashlib.sha256()
    with open(device, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def health_check(device: str, board: Board, slot: str, recorded: bs.Image | None,
                 timeout: float = 120.0) -> tuple[bool, str]:
    """(passed, what was found) for the slot's image: content, identity, the agent's check."""
    size = _superblock(device, board, slot)
    if size is None:
        return False, f"{bs.PARTITIONS[slot]} holds no squashfs image"
    offset, _ = region(board, slot)
    if recorded is not None and recorded.sha256:
        got = region_sha256(device, offset, size)
        if got != recorded.sha256:
            return False, (f"image sha256 {got[:16]} is not the {recorded.sha256[:16]} recorded "
                           f"when {recorded.version} was installed")
    with tempfile.TemporaryDirectory(prefix="edgekey-slot-") as tmp:
        root = Path(tmp) / "root"
        res = subprocess.run(["unsquashfs", "-no-xattrs", "-no-progress", "-d", str(root),
                              "-offset", str(offset), device], capture_output=True, text=True)
        if res.returncode != 0:
            return False, f"unsquashfs: {last_line(res.stderr or res.stdout)}"
        try:
            meta = json.loads((root / "slot.json").read_text())
            version, compat, name = meta["version"], meta["compatible"], meta["board"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return False, f"slot.json unreadable: {exc}"
        if compat != compatible(board) or f"edgekey-{name}" != compat:  # RAUC's identity
            return False, (f"slot.json is for board {name!r} ({compat}), this is "
                           f"{board.name!r} ({compatible(board)})")
        env = {**os.environ, "PYTHONPATH": str(root / "edgekey")}
        try:
            run = subprocess.run([sys.executable, "-m", "agent", "--board", board.name,
                                  "--check"], cwd=tmp, env=env, capture_output=True, text=True,
                                 timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"python -m agent --check did not finish in {timeout:.0f} s"
        if run.returncode != 0:
            text = (run.stderr or run.stdout).replace(f"{root}/", "")
            err = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
            why = " ".join(err[:2]) if err else f"status {run.returncode}"
            return False, f"python -m agent --check: {why[:300]}"
    return True, f"{version} for {name}, agent --check ok"


@dataclass(frozen=True)
class Booted:
    slot: str | None
    lines: list[str]
    rolled_back: bool


def boot(device: str | os.PathLike, board: Board) -> Booted:
    """The bootloader's choice and the chosen slot's health check, until one passes."""
    device = str(device)
    lines: list[str] = []
    failed: list[str] = []
    while True:
        try:
            slot, why, image = bs.boot_choice(device, board)
        except bs.NoBootableSlotError as exc:
            lines.append(f"bootloader: {exc}")
            return Booted(None, lines, bool(failed))
        lines.append(f"bootloader: {why}")
        ok, detail = health_check(device, board, slot, image)
        mark = bs.mark_good if ok else bs.mark_bad
        bs.update(device, board, lambda s, m=mark, n=slot: m(s, n))
        if ok:
            lines.append(f"slot {slot}: health check passed ({detail}); marked good")
            if failed:
                lines.append(f"rolled back to slot {slot} (slot {', '.join(failed)} failed)")
            return Booted(slot, lines, bool(failed))
        lines.append(f"slot {slot}: health check failed: {detail}; marked bad")
        failed.append(slot)


def status_lines(device: str | os.PathLike, board: Board) -> list[str]:
    from hal.bootctl import describe

    device = str(device)
    lines = [f"{device}: boot state of board {board.name} ({compatible(board)})"]
    lines += ["  " + ln for ln in describe(bs.read(device, board))]
    for name in bs.SLOTS:
        size = _superblock(device, board, name)
        what = f"squashfs image of {size} bytes" if size else "no squashfs image"
        lines.append(f"  {bs.PARTITIONS[name]}: {what}")
    return lines


# ------------------------------------------------------------------ CLI

def add_parsers(flash: argparse._SubParsersAction, handler: object) -> None:
    """``flash install``, ``flash status`` and ``flash boot`` (called by flash_tool)."""
    texts = {"install": "install a signed RAUC bundle into the inactive slot",
             "status": "A/B boot state, slots and installed versions",
             "boot": "run the bootloader's choice and the slot's health check (rollback)"}
    for name in COMMANDS:
        p = flash.add_parser(name, help=texts[name])
        p.add_argument("image", type=Path, help="flash image file or block device")
        if name == "install":
            p.add_argument("bundle", type=Path)
            p.add_argument("--keyring", type=Path, required=True,
                           help="the update CA (ca.crt) the bundle must be signed under")
            p.add_argument("--allow-downgrade", action="store_true",
                           help="also install an older or the same version")
            p.add_argument("--no-service", action="store_true",
                           help="use the rauc service already running (on the terminal)")
        p.add_argument("--board", default="host", help="board name or file")
        p.set_defaults(handler=handler)


def run(args: argparse.Namespace) -> int:
    board = load_board(board_path(args.board))
    try:
        if args.flash_cmd == "install":
            done = install(args.image, board, args.bundle, args.keyring,
                           allow_downgrade=args.allow_downgrade, no_service=args.no_service)
            where = (f"blank flash: first install, slot {done.slot}" if done.factory else
                     f"running slot {done.booted} untouched")
            print(f"installed {done.version} into slot {done.slot} ({bs.PARTITIONS[done.slot]}) "
                  f"in {done.seconds:.1f} s ({where}); slot {done.slot} is primary from the "
                  "next boot")
        elif args.flash_cmd == "status":
            print("\n".join(status_lines(args.image, board)))
        else:
            result = boot(args.image, board)
            print("\n".join(result.lines))
            return 0 if result.slot else 1
    except Refused as exc:
        print(f"edgekey flash {args.flash_cmd}: refused: {exc}", file=sys.stderr)
        return 1
    except (UpdateError, bs.BootStateError, OSError) as exc:
        print(f"edgekey flash {args.flash_cmd}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edgekey flash {args.flash_cmd}: interrupted; everything it started is stopped",
              file=sys.stderr)
        return 130
    return 0
