"""The terminal's 32-byte device key, under which the key store encrypts meter keys at rest.

On a production board the device key lives in a secure element or in OTP
fuses and never appears as a file. On the development host and under QEMU
a file stands in for it: this module loads that file, or creates it once.

Refused, with the reason: a file of the wrong size (a truncated key would
silently open nothing), one that the group or others may access (like
OpenSSH with private keys), one owned by another user, or anything but a
regular file. Creation is atomic: a temporary file in the same directory,
mode 0600, written and fsynced, then linked into place (a link, unlike a
rename, never replaces a key another process created meanwhile: that key may
already have encrypted data), and the directory is fsynced.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

DEVICE_KEY_BYTES = 32  # AES-256


class DeviceKeyFileError(OSError):
    """The device key file is missing, malformed or too widely readable."""


def load_device_key(path: str | Path, *, create: bool = False,
                    entropy: Callable[[int], bytes] = os.urandom) -> bytes:
    """The 32-byte device key in ``path``; with ``create``, a new random one if absent."""
    path = Path(path)
    try:
        return _read(path)
    except FileNotFoundError:
        if not create:
            raise DeviceKeyFileError(f"no device key at {path} (create it with create=True, "
                                     "or provision the board's secure element)") from None
    _create(path, entropy)
    return _read(path)


def _read(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP for a symbolic link, EACCES, ...
        raise DeviceKeyFileError(exc.errno, f"cannot open device key {path}: "
                                            f"{exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DeviceKeyFileError(f"device key {path} is not a regular file")
        if st.st_mode & 0o077:
            raise DeviceKeyFileError(
                f"device key {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others "
                f"may access it; run chmod 600 {path}")
        if st.st_uid != os.geteuid():
            raise DeviceKeyFileError(f"device key {path} is owned by uid {st.st_uid}, "
                                     f"not by this process (uid {os.geteuid()})")
        if st.st_size != DEVICE_KEY_BYTES:
            raise DeviceKeyFileError(f"device key {path} holds {st.st_size} bytes, "
                                     f"expected {DEVICE_KEY_BYTES}")
        key = os.read(fd, DEVICE_KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != DEVICE_KEY_BYTES:
        raise DeviceKeyFileError(f"device key {path}: read {len(key)} bytes, "
                                 f"expected {DEVICE_KEY_BYTES}")
    return key


def _create(path: Path, entropy: Callable[[int], bytes]) -> None:
    key = entropy(DEVICE_KEY_BYTES)
    if len(key) != DEVICE_KEY_BYTES:
        raise ValueError(f"entropy source returned {len(key)} bytes, asked for "
                         f"{DEVICE_KEY_BYTES}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(key)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # another process won: use its key
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
