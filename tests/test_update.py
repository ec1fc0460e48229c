"""Signed A/B updates with the real RAUC: install, boot, rollback, refusals, power cuts.

Bundles come from ``rauc bundle`` (built once for the module), installs go
through ``rauc service`` on a private D-Bus with loop devices over the
image's slots, and every test checks that none of that is left behind.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hal import bootctl
from hal import bootstate as bs
from hal.board import board_path, load_board
from tools import flash_update as fu
from tools import image_build as ib
from tools.cli import main as cli_main

pytestmark = pytest.mark.host_only

TOOLS = ("rauc", "mksquashfs", "unsquashfs", "losetup", "dbus-daemon", "dbus-send", "unshare")
_missing = [t for t in TOOLS if shutil.which(t) is None]
if _missing:
    pytest.skip(f"needs {', '.join(_missing)} (apt-get install rauc squashfs-tools dbus "
                "util-linux)", allow_module_level=True)
if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
    pytest.skip("needs root and loop devices (/dev/loop-control) for RAUC's slots",
                allow_module_level=True)

BOARD = load_board(board_path("pl-terminal"))
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Kit:
    root: Path
    ca: Path
    bundles: dict[str, Path]
    base: Path  # a flash with 0.1.0 in slot A, booted and good


def _break_board(tree: Path) -> None:
    (tree / "edgekey/board_configs/pl-terminal.toml").write_text("[board]\nname = 7\n")


def _alien_slot(tree: Path) -> None:
    meta = tree / "slot.json"
    meta.write_text(meta.read_text().replace('"pl-terminal"', '"qemu-armhf"'))


def _our_processes(folder: Path) -> list[str]:
    """Command lines of install helpers still running with their files under ``folder``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "edgekey-install-" in cmd and str(folder) in cmd:
            found.append(cmd)
    return found


def _loops_over(folder: Path) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if str(folder) in ln]


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kit]:
    root = tmp_path_factory.mktemp("update")
    keys, other = root / "keys", root / "other-keys"
    qemu = load_board(board_path("qemu-armhf"))

    def build(board, version, folder, keydir=keys, mutate=None) -> Path:
        return ib.build_bundle(board, root / folder, version, keydir, mutate=mutate).bundle

    b = {"v1": build(BOARD, "0.1.0", "out"), "v2": build(BOARD, "0.2.0", "out"),
         "old": build(BOARD, "0.0.9", "out"),
         "broken": build(BOARD, "0.2.0", "broken", mutate=_break_board),
         "alien": build(BOARD, "0.2.0", "alien", mutate=_alien_slot),
         "wrongboard": build(qemu, "0.2.0", "out"),
         "unsigned": build(BOARD, "0.2.0", "other", keydir=other)}
    raw = bytearray(b["v2"].read_bytes())
    raw[len(raw) // 3] ^= 0x01
    b["tampered"] = root / "tampered.raucb"
    b["tampered"].write_bytes(bytes(raw))
    b["truncated"] = root / "truncated.raucb"
    b["truncated"].write_bytes(bytes(raw[:len(raw) // 2]))
    base = root / "base.img"
    assert cli_main(["flash", "create", str(base), "--board", "pl-terminal"]) == 0
    ca = keys / "ca.crt"
    with pytest.MonkeyPatch.context() as mp:  # the install's files under root, to find them
        mp.setattr(tempfile, "tempdir", str(root))
        done = fu.install(base, BOARD, b["v1"], ca)
        assert (done.slot, done.factory) == ("A", True)
        assert fu.boot(base, BOARD).slot == "A"
    yield Kit(root, ca, b, base)
    every = tmp_path_factory.getbasetemp()  # the module's and each of its tests' folders
    assert not _loops_over(every), "loop devices left behind"
    assert not _our_processes(every), "install helpers left running"


@pytest.fixture
def img(kit: Kit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of the kit's flash; the test's installs keep their files in its folder."""
    path = tmp_path / "flash.img"
    subprocess.run(["cp", "--sparse=always", str(kit.base), str(path)], check=True)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield path
    assert not _loops_over(tmp_path), "loop devices left behind"
    assert not _our_processes(tmp_path), "install helpers left running"


def region_sha(image: Path, slot: str) -> str:
    off, size = fu.region(BOARD, slot)
    return fu.region_sha256(str(image), off, size)


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def install_args(kit: Kit, image: Path, name: str, *extra: str) -> list[object]:
    return ["flash", "install", image, kit.bundles[name], "--board", "pl-terminal",
            "--keyring", kit.ca, *extra]


# ----------------------------------------------------------------- install and boot

def test_a_blank_flash_gets_its_first_install_in_slot_a(kit: Kit) -> None:
    state = bs.read(kit.base, BOARD)
    info = ib.bundle_info(kit.bundles["v1"], kit.ca)
    assert state.primary == state.current == "A"
    assert state.a == bs.Slot("good", bs.ATTEMPTS, bs.Image("0.1.0", "edgekey-pl-terminal",
                                                             info.sha256))
    assert state.b.image is None and not state.b.bootable


def test_install_writes_slot_b_and_switches_only_at_its_end(
        kit: Kit, img: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    before, a_sha = bs.read(img, BOARD), region_sha(img, "A")
    trace = tmp_path / "trace"
    monkeypatch.setenv(bootctl.TRACE_ENV, str(trace))
    rc, out, err = cli(capsys, *install_args(kit, img, "v2"))
    assert rc == 0, err
    assert "installed 0.2.0 into slot B (image_b)" in out and "running slot A untouched" in out
    calls = trace.read_text().split("\n")[:-1]
    assert calls[0] == "pre-install" and calls[-1] == "set-primary B"
    assert calls.index("set-state B bad") < calls.index("set-primary B")
    assert not [c for c in calls if c.endswith(" A") or " A " in c]  # A is never touched
    state = bs.read(img, BOARD)
    info = ib.bundle_info(kit.bundles["v2"], kit.ca)
    assert state.primary == "B" and state.current == "A" and state.a == before.a
    assert state.b == bs.Slot("good", bs.ATTEMPTS, bs.Image("0.2.0", info.compatible,
                                                             info.sha256))
    off, _ = fu.region(BOARD, "B")
    assert fu.region_sha256(str(img), off, info.image_size) == info.sha256
    assert region_sha(img, "A") == a_sha

    rc, out, err = cli(capsys, "flash", "boot", img, "--board", "pl-terminal")
    assert rc == 0, err
    assert "bootloader: booting primary slot B" in out
    assert "slot B: health check passed (0.2.0 for pl-terminal, agent --check ok)" in out
    state = bs.read(img, BOARD)
    assert state.current == "B" and state.b.attempts == bs.ATTEMPTS
    rc, out, _ = cli(capsys, "flash", "status", img, "--board", "pl-terminal")
    assert rc == 0 and "primary B, booted B" in out and "0.2.0" in out


@pytest.mark.parametrize("name, why", [
    ("broken", "python -m agent --check: invalid board config"),
    ("alien", "slot.json is for board 'qemu-armhf'"),
])
def test_a_slot_failing_its_health_check_is_rolled_back(
        kit: Kit, img: Path, capsys: pytest.CaptureFixture[str], name: str, why: str) -> None:
    a_sha = region_sha(img, "A")
    rc, _, err = cli(capsys, *install_args(kit, img, name))
    assert rc == 0, err
    rc, out, err = cli(capsys, "flash", "boot", img, "--board", "pl-terminal")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("bootloader: booting primary slot B")
    assert lines[1].startswith("slot B: health check failed: ") and why in lines[1]
    assert lines[2].startswith("bootloader: rollback: primary slot B is marked bad; "
                               "booting slot A")
    assert lines[3].startswith("slot A: health check passed (0.1.0")
    assert lines[4] == "rolled back to slot A (slot B failed)"
    state = bs.read(img, BOARD)
    assert state.current == "A" and state.b.state == "bad" and state.b.attempts == 0
    assert state.a.bootable and region_sha(img, "A") == a_sha


def test_a_block_device_is_a_flash_too(kit: Kit, img: Path) -> None:
    """As /dev/vda in the guest: a loop device over the whole image stands in for it."""
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        assert fu.install(dev, BOARD, kit.bundles["v2"], kit.ca).slot == "B"
        assert fu.boot(dev, BOARD).slot == "B"
        assert bs.read(dev, BOARD).b.image.version == "0.2.0"
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_no_service_uses_the_rauc_service_already_running(
        kit: Kit, img: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on the terminal, whose init system started rauc service with our backend."""
    env = dict(os.environ)
    folder = tmp_path / "system"
    folder.mkdir()
    with fu.rauc_on_host(str(img), BOARD, kit.ca, "A", folder, env):
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", env["DBUS_SYSTEM_BUS_ADDRESS"])
        with pytest.raises(fu.Refused, match="the system's pre-install handler refused"):
            fu.install(img, BOARD, kit.bundles["old"], kit.ca, no_service=True,
                       allow_downgrade=True)
        done = fu.install(img, BOARD, kit.bundles["v2"], kit.ca, no_service=True)
    assert done.slot == "B" and bs.read(img, BOARD).primary == "B"


# ----------------------------------------------------------------- refusals

@pytest.mark.parametrize("name, why", [
    ("unsigned", "bundle signature: signature verification failed: Verify error: unable to "
                 "get local issuer certificate"),
    ("tampered", "bundle signature: signature verification failed"),
    ("truncated", "bundle format: Invalid bundle format"),
    ("wrongboard", "wrong board: bundle is for 'edgekey-qemu-armhf', this flash is "
                   "'edgekey-pl-terminal'"),
    ("old", "downgrade: bundle 0.0.9 is older than 0.1.0 in the booted slot A"),
    ("v1", "not newer: bundle 0.1.0 is what the booted slot A runs"),
])
def test_refused_bundles_leave_the_running_slot_alone(
        kit: Kit, img: Path, capsys: pytest.CaptureFixture[str], name: str, why: str) -> None:
    before, a_sha, b_sha = bs.read(img, BOARD), region_sha(img, "A"), region_sha(img, "B")
    rc, out, err = cli(capsys, *install_args(kit, img, name))
    assert rc == 1 and out == ""
    assert err.startswith(f"edgekey flash install: refused: {why}") and err.count("\n") == 1
    assert bs.read(img, BOARD) == before
    assert (region_sha(img, "A"), region_sha(img, "B")) == (a_sha, b_sha)


def test_rauc_itself_refuses_a_downgrade_through_the_pre_install_handler(
        kit: Kit, img: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a direct ``rauc install`` on the terminal would be: the desk's check is skipped."""
    before, b_sha = bs.read(img, BOARD), region_sha(img, "B")
    check = fu.check_bundle
    monkeypatch.setattr(fu, "check_bundle", lambda s, b, bu, k, allow: check(s, b, bu, k, True))
    with pytest.raises(fu.Refused, match=r"downgrade: bundle 0\.0\.9 is older than 0\.1\.0"):
        fu.install(img, BOARD, kit.bundles["old"], kit.ca)
    assert bs.read(img, BOARD) == before and region_sha(img, "B") == b_sha


def test_allow_downgrade_installs_an_older_bundle(kit: Kit, img: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, *install_args(kit, img, "old", "--allow-downgrade"))
    assert rc == 0, err
    assert "installed 0.0.9 into slot B" in out
    assert fu.boot(img, BOARD).slot == "B"


# ----------------------------------------------------------------- power cuts

def _writer_pid(path: str) -> int | None:
    """The process holding ``path`` open for writing (RAUC writing the slot), if any."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        with contextlib.suppress(OSError, ValueError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") != path:
                    continue
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                flags = int(info.split("flags:")[1].split()[0], 8)
                if flags & os.O_ACCMODE == os.O_WRONLY:
                    return int(pid)
    return None


class CutWhileWriting:
    """Slot devices for ``fu.install``: the target slot is a FIFO whose reader copies the
    first ``cut`` bytes RAUC writes into the slot, then SIGKILLs RAUC: a cut mid-write."""

    def __init__(self, folder: Path, target: str, cut: int):
        self.fifo, self.cut, self.copied, self.killed = folder / "slot.fifo", cut, 0, False
        self.target_offset = fu.region(BOARD, target)[0]

    @contextlib.contextmanager
    def __call__(self, device: str, offset: int, size: int) -> Iterator[str]:
        if offset != self.target_offset:
            with fu.loop_device(device, offset, size) as dev:
                yield dev
            return
        os.mkfifo(self.fifo)
        stop = threading.Event()
        pump = threading.Thread(target=self._pump, args=(device, offset, stop))
        pump.start()
        try:
            yield str(self.fifo)
        finally:
            stop.set()
            pump.join()

    def _pump(self, device: str, offset: int, stop: threading.Event) -> None:
        fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            with open(device, "r+b") as out:
                out.seek(offset)
                while self.copied < self.cut and not stop.is_set():
                    if not select.select([fd], [], [], 0.05)[0]:
                        continue
                    with contextlib.suppress(BlockingIOError):
                        chunk = os.read(fd, min(65536, self.cut - self.copied))
                        if not chunk and self.copied:
                            break
                        out.write(chunk)
                        self.copied += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            pid = _writer_pid(str(self.fifo))
            if pid is not None and self.copied == self.cut:
                os.kill(pid, signal.SIGKILL)
                self.killed = True
        finally:
            os.close(fd)


@pytest.mark.parametrize("point", ["before:pre-install", "after:pre-install", "after:set-state",
                                   "mid-write", "before:set-primary", "after:set-primary"])
def test_a_power_cut_during_install_boots_the_old_slot_or_the_complete_new_one(
        kit: Kit, img: Path, tmp_path: Path, point: str) -> None:
    a_sha = region_sha(img, "A")
    info = ib.bundle_info(kit.bundles["v2"], kit.ca)
    env, devices = {bootctl.KILL_ENV: point}, fu.loop_device
    if point == "mid-write":
        env, devices = {}, CutWhileWriting(tmp_path, "B", info.image_size // 2)
    with pytest.raises(fu.UpdateError, match=r"rauc service died during the install \(killed "
                                             r"by signal 9\)"):
        fu.install(img, BOARD, kit.bundles["v2"], kit.ca, service_env=env, slot_device=devices)
    assert not _our_processes(tmp_path) and not _loops_over(tmp_path)
    if isinstance(devices, CutWhileWriting):
        assert devices.killed and devices.copied == info.image_size // 2
    new_complete = point == "after:set-primary"
    result = fu.boot(img, BOARD)
    assert result.slot == ("B" if new_complete else "A"), result.lines
    assert any("health check passed" in ln for ln in result.lines)
    state = bs.read(img, BOARD)
    assert region_sha(img, "A") == a_sha and state.a.image.version == "0.1.0"
    if new_complete:  # the version came with set-primary, though the install never returned
        assert state.b.image == bs.Image("0.2.0", info.compatible, info.sha256)
    else:
        assert not state.b.bootable and state.primary == "A"
    if point == "mid-write":  # and the next install simply goes through
        assert fu.install(img, BOARD, kit.bundles["v2"], kit.ca).slot == "B"
        assert fu.boot(img, BOARD).slot == "B"


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{p}/stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                children.setdefault(ppid, []).append(int(p))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def test_sigterm_mid_install_stops_everything_it_started(kit: Kit, img: Path,
                                                         tmp_path: Path) -> None:
    before = bs.read(img, BOARD)
    gate = tmp_path / "gate.fifo"
    os.mkfifo(gate)  # the backend's trace write blocks on it: RAUC waits in pre-install
    env = {**os.environ, bootctl.TRACE_ENV: str(gate), "PYTHONPATH": str(ROOT),
           "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", *map(str, install_args(
        kit, img, "v2"))], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not any("pre-install.sh" in c for c in _our_processes(tmp_path)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        started = _descendants(proc.pid)
        assert len(started) >= 3  # dbus-daemon, rauc service, the handler
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "interrupted" in err
    assert not [p for p in started if os.path.exists(f"/proc/{p}")]
    assert not _loops_over(tmp_path) and not _our_processes(tmp_path)
    assert bs.read(img, BOARD) == before


# ----------------------------------------------------------------- keys and bundles

def test_update_keys_bundle_info_and_a_reproducible_slot_image(
        kit: Kit, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    ca = x509.load_pem_x509_certificate(kit.ca.read_bytes())
    sign = x509.load_pem_x509_certificate((kit.ca.parent / "signing.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert sign.issuer == ca.subject
    assert isinstance(sign.public_key(), ec.EllipticCurvePublicKey)
    assert sign.public_key().curve.name == "secp256r1"
    with pytest.raises(x509.ExtensionNotFound):  # RAUC refuses codeSigning by default
        sign.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    rc, out, err = cli(capsys, "image", "info", kit.bundles["v2"], "--keyring", kit.ca)
    assert rc == 0, err
    assert "'edgekey-pl-terminal'" in out and "'0.2.0'" in out and "\x1b" not in out
    rc, _, err = cli(capsys, "image", "keys", "--out", kit.ca.parent)
    assert rc == 1 and err.count("\n") == 1 and "refusing to overwrite" in err
    again = ib.build_bundle(BOARD, tmp_path, "0.1.0", kit.ca.parent).bundle
    assert ib.bundle_info(again, kit.ca).sha256 == ib.bundle_info(kit.bundles["v1"],
                                                                   kit.ca).sha256
