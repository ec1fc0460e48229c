"""The system-mode board: ``qemu-system-arm -M virt -m 512`` booting the project's image.

``emulator/qemu/build-board.sh`` makes the kernel, initramfs and system disk;
this starts QEMU on them with a terminal's 1 GiB flash image as a virtio
disk, its identity (node id, utility key, device key, TLS files) appended to
the initramfs as a second cpio archive, the console on the PL011 UART and
the hplc link on a second UART (a PCI 16550, the guest's /dev/ttyS0) and a
maintenance port on a virtconsole (/dev/hvc0), all as host ptys. ``BoardVM`` keeps the
pty paths QEMU reports, the serial log of the console before the agent
takes it, and stops QEMU on every path (``stop``: SIGTERM, then SIGKILL;
``kill``: a power cut). The guest may reboot itself (a rollback): QEMU
resets in place and the ptys stay.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "emulator" / "qemu" / "build-board.sh"
RAM_MIB = 512  # the PL terminal's (board_configs/pl-terminal.toml)
PTY_LINE = re.compile(rb"char device redirected to (/dev/pts/\d+) \(label (\w+)\)")


class BoardError(Exception):
    """The board could not be built or booted; the message says why."""


def build_board() -> Path:
    """The cached board directory (vmlinuz, initrd.cpio.gz, system.ext4), built if needed."""
    if shutil.which("qemu-system-arm") is None:
        raise BoardError("qemu-system-arm not found (tools/setup-host.sh installs it, as root)")
    out = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True)
    if out.returncode != 0:
        raise BoardError(f"build-board.sh failed: {out.stderr.strip()[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def identity_archive(dest: Path, node: str, trust: Path, device_key: Path,
                     tls_dir: Path | None, update_ca: Path | None = None) -> Path:
    """The terminal's identity as a gzip'd newc cpio of /identity/..., for the initramfs:
    what a real terminal keeps in its secure storage (node id, device key) and its
    factory configuration (the utility's key, the fleet's TLS files and update CA)."""
    stage = dest.with_suffix(".d")
    shutil.rmtree(stage, ignore_errors=True)
    ident = stage / "identity"
    ident.mkdir(parents=True)
    (ident / "node").write_text(node + "\n")
    shutil.copy(trust, ident / "utility.pub")
    shutil.copy(device_key, ident / "device.key")
    os.chmod(ident / "device.key", 0o600)
    if update_ca is not None:
        shutil.copy(update_ca, ident / "update-ca.crt")
    if tls_dir is not None and tls_dir.is_dir():
        shutil.copytree(tls_dir, ident / "tls")
    names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
    cpio = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "--reproducible"],
                          input="\n".join(names).encode(), cwd=stage, capture_output=True)
    shutil.rmtree(stage)
    if cpio.returncode != 0:
        raise BoardError(f"cpio: {cpio.stderr.decode().strip()}")
    dest.write_bytes(gzip.compress(cpio.stdout, mtime=0))
    return dest


class BoardVM:
    """One booted board (module docstring). Use as a context manager, or call ``stop``."""

    def __init__(self, board_dir: Path, flash: Path, identity: Path, work: Path, *,
                 smp: int = 2, extra_append: str = "", share: Path | None = None):
        self.board_dir, self.flash, self.work = board_dir, flash, work
        work.mkdir(parents=True, exist_ok=True)
        self.initrd = work / "initrd-with-identity.cpio.gz"
        # concatenated gzip'd cpio archives: the kernel unpacks one after the other
        self.initrd.write_bytes((board_dir / "initrd.cpio.gz").read_bytes() + identity.read_bytes())
        self.stderr_path = work / "qemu.log"  # QEMU's own messages (the ptys on stdout)
        self.cmd = [
            "qemu-system-arm", "-M", "virt,highmem=off", "-cpu", "cortex-a15", "-smp", str(smp),
            "-m", str(RAM_MIB), "-display", "none", "-monitor", "none", "-nic", "none",
            "-kernel", str(board_dir / "vmlinuz"), "-initrd", str(self.initrd),
            "-append", f"console=ttyAMA0 rdinit=/init quiet loglevel=1 panic=5 {extra_append}",
            "-chardev", "pty,id=con", "-serial", "chardev:con",
            "-chardev", "pty,id=plc", "-device", "pci-serial,chardev=plc",
            "-device", "virtio-serial-device", "-chardev", "pty,id=dbg",
            "-device", "virtconsole,chardev=dbg",
            "-drive", f"file={board_dir / 'system.ext4'},if=none,id=sys,format=raw,readonly=on",
            "-device", "virtio-blk-device,drive=sys,serial=system",
            "-drive", f"file={flash},if=none,id=fl,format=raw",
            "-device", "virtio-blk-device,drive=fl,serial=flash",
        ]
        if share is not None:  # the field engineer's update medium, read-only at /mnt/update
            self.cmd += ["-fsdev", f"local,id=upd,path={share},security_model=none,readonly=on",
                         "-device", "virtio-9p-device,fsdev=upd,mount_tag=update"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.ptys: dict[str, str] = {}
        self.started = 0.0

    def start(self, timeout: float = 30.0) -> None:
        """Start QEMU and learn its ptys (the console's and the hplc link's)."""
        self.started = time.monotonic()
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = dict((label.decode(), path.decode()) for path, label in
                         PTY_LINE.findall(self.stderr_path.read_bytes()))
            if {"con", "plc", "dbg"} <= found.keys():
                self.ptys = found
                return
            if self.proc.poll() is not None:
                raise BoardError(f"qemu-system-arm exited {self.proc.returncode}: "
                                 f"{self.stderr_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        self.kill()
        raise BoardError("qemu-system-arm reported no ptys")

    @property
    def console_path(self) -> str:
        return self.ptys["con"]

    @property
    def link_path(self) -> str:
        return self.ptys["plc"]

    @property
    def maintenance_path(self) -> str:
        """The virtconsole: a root shell there when booted with ``edgekey.shell``."""
        return self.ptys["dbg"]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (QEMU shuts the machine off cleanly at the host's level), then SIGKILL."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """A power cut: QEMU dies at once; what the guest had not written is lost."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> BoardVM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill() if exc[0] is not None else self.stop()
