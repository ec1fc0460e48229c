"""The interpreter and libraries the tests run on are the ones we claim.

Under emulation (EDGEKEY_EMULATED set by emulator/qemu/run-arm-tests.sh) the
tests must really run on ARM with Debian bookworm's armhf builds, the
terminal's own; anywhere, the installed libraries must meet the lower bounds
that pyproject.toml declares (which are bookworm's versions).
"""

from __future__ import annotations

import os
import platform
import re
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

EMULATED = os.environ.get("EDGEKEY_EMULATED", "")
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

# What Debian bookworm's armhf packages give the terminal (python3-numpy
# 1.24.2, python3-cryptography 38.0.4, python3-serial 3.5, python3 3.11).
BOOKWORM = {"numpy": (1, 24), "cryptography": (38,), "pyserial": (3, 5), "etcd3gw": (2, 0)}


def release(text: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: '1.24.2' -> (1, 24, 2)."""
    match = re.match(r"\d+(?:\.\d+)*", text)
    assert match, f"not a version: {text!r}"
    return tuple(int(part) for part in match.group(0).split("."))


EM_ARM = 40  # ELF e_machine of 32-bit ARM


def elf_machine(path: str) -> int:
    """The e_machine field of an ELF file (a compiled extension module)."""
    with open(path, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")


def runtime_minimums() -> dict[str, tuple[int, ...]]:
    """``name>=X.Y`` from [project].dependencies; any other form is an error here."""
    deps = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    minimums = {}
    for dep in deps:
        match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([0-9][0-9.]*)\s*", dep)
        assert match, f"pyproject dependency {dep!r} is not of the form name>=X.Y"
        minimums[match.group(1)] = release(match.group(2))
    return minimums


def test_release_parser() -> None:
    assert release("1.24.2") == (1, 24, 2)
    assert release("38.0.4") == (38, 0, 4)
    assert release("2.4.6rc1") == (2, 4, 6)
    assert release("3.5") == (3, 5) < (3, 5, 0) < (3, 10)


def test_runtime_dependencies_meet_pyproject_minimums() -> None:
    minimums = runtime_minimums()
    assert set(minimums) == {"numpy", "cryptography", "pyserial", "etcd3gw"}
    too_old = {name: version(name) for name, low in minimums.items()
               if release(version(name)) < low}
    assert not too_old, f"installed below pyproject's minimums {minimums}: {too_old}"


@pytest.mark.skipif(not EMULATED, reason="only under emulation (EDGEKEY_EMULATED)")
def test_emulated_interpreter_is_armv7_with_bookworm_libraries() -> None:
    machine = platform.machine()
    assert machine.startswith("armv7"), (
        f"EDGEKEY_EMULATED={EMULATED!r} but the interpreter runs on {machine!r}, not ARMv7")
    assert sys.version_info[:2] == (3, 11), sys.version
    # The compiled extensions loaded are ARM builds, not the host's.
    from cryptography.hazmat.bindings import _rust
    from numpy.core import _multiarray_umath
    for module in (_multiarray_umath, _rust):
        assert elf_machine(module.__file__) == EM_ARM, module.__file__
    wrong = {}
    for name, series in BOOKWORM.items():
        installed = version(name)
        if release(installed)[: len(series)] != series:
            wrong[name] = installed
    assert not wrong, f"expected Debian bookworm's {BOOKWORM}, found {wrong}"
    import serial
    assert release(serial.__version__)[:2] == BOOKWORM["pyserial"], serial.__version__
