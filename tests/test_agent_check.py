"""``python -m agent --board FILE --check``: 0 and a summary, 1 and every problem, 2 for usage.

In-process through ``agent.__main__.main`` (runs under emulated ARM too),
plus one run of the real command line (host_only: it starts a process).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.__main__ import main
from hal.board import BOARD_DIR, board_path, load_board

ROOT = Path(__file__).resolve().parent.parent
PL_TEXT = (BOARD_DIR / "pl-terminal.toml").read_text(encoding="utf-8")

# Three faults in three tables: a wrong type, an unknown key, a choice not allowed.
BROKEN = (PL_TEXT.replace("cores = 2", 'cores = "two"')
          .replace('url = "/dev/ttyS1"', 'url = "/dev/ttyS1"\nparity = "E"')
          .replace('kind = "4g"', 'kind = "carrier-pigeon"'))
BROKEN_PROBLEMS = ("cpu.cores: must be int, got str 'two'",
                   "links.hplc.parity: unknown key",
                   "wan.kind: 'carrier-pigeon' is not one of")


def test_pl_terminal_check_returns_0_and_prints_the_boards_figures(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--board", "pl-terminal", "--check"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == (f"{BOARD_DIR / 'pl-terminal.toml'}: ok: pl-terminal: armv7l 2x700 MHz, "
                   "RAM 512 MiB (agent 192 MiB), flash 1024 MiB [boot 16 MiB, image_a 128 MiB, "
                   "image_b 128 MiB, ledger 512 MiB, keystore 32 MiB, journal 160 MiB, "
                   "config 48 MiB], links console, hplc, rs485\n")


@pytest.mark.parametrize("name", ["pl-terminal", "qemu-armhf", "host"])
def test_every_shipped_board_passes_the_check_by_name(
        capsys: pytest.CaptureFixture[str], name: str) -> None:
    board = load_board(board_path(name))
    assert main(["--board", name, "--check"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"{board.source}: ok: {name}: {board.cpu.arch} ")
    assert f"(agent {board.ram.agent_budget_mib} MiB)" in out


def test_check_of_a_board_file_by_path_names_that_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "terminal-7.toml"
    path.write_text(PL_TEXT, encoding="utf-8")
    assert main(["--board", str(path), "--check"]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: ok: pl-terminal: ")


def test_broken_board_returns_1_and_lists_every_problem_on_stderr(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN, encoding="utf-8")
    assert main(["--board", str(path), "--check"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"invalid board config {path} (3 problem(s)):\n")
    for problem in BROKEN_PROBLEMS:
        assert f"  {path}: {problem}" in err


def test_cross_field_problems_are_listed_once_fields_are_valid(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "budget.toml"
    path.write_text(PL_TEXT.replace("agent_budget_mib = 192", "agent_budget_mib = 1024")
                    .replace('name = "journal"', 'name = "ledger"'), encoding="utf-8")
    assert main(["--board", str(path), "--check"]) == 1
    err = capsys.readouterr().err
    assert f"  {path}: ram.agent_budget_mib: 1024 exceeds ram.total_mib 512" in err
    assert f"  {path}: flash.partitions[5].name: 'ledger' already names partition [3]" in err


@pytest.mark.parametrize("content, problem", [
    (None, "cannot read file: "),
    ("[cpu\n", "not valid TOML: "),
], ids=["missing-file", "invalid-toml"])
def test_unreadable_or_unparsable_board_returns_1_naming_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None,
        problem: str) -> None:
    path = tmp_path / "board.toml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    assert main(["--board", str(path), "--check"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"  {path}: {problem}" in err


def test_unknown_bare_board_name_returns_1_naming_where_it_looked(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--board", "no-such-board", "--check"]) == 1
    assert f"{BOARD_DIR / 'no-such-board.toml'}: cannot read file" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    [],
    ["--check"],
    ["--board", "pl-terminal"],
    ["--board"],
    ["--board", "pl-terminal", "--check", "--bogus"],
    ["--board", "pl-terminal", "--check", "extra"],
], ids=["nothing", "no-board", "no-check", "board-without-value", "unknown-option",
        "extra-argument"])
def test_usage_error_exits_2_with_usage_on_stderr(
        capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: python -m agent ")
    assert "error: " in err


def test_help_exits_0_and_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--board" in out and "--check" in out


@pytest.mark.host_only
def test_command_line_exits_0_for_a_good_board_1_for_a_broken_one_2_for_usage(
        tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text(BROKEN, encoding="utf-8")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, text=True,
                              capture_output=True, timeout=60, check=False)

    good = run("--board", "pl-terminal", "--check")
    assert (good.returncode, good.stderr) == (0, "")
    assert ": ok: pl-terminal: armv7l 2x700 MHz" in good.stdout
    bad = run("--board", str(broken), "--check")
    assert (bad.returncode, bad.stdout) == (1, "")
    assert all(f"  {broken}: {p}" in bad.stderr for p in BROKEN_PROBLEMS)
    usage = run("--check")
    assert usage.returncode == 2
    assert usage.stderr.startswith("usage: python -m agent ")
