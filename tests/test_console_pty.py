"""The shell served on a real pty and driven by the desk's ConsoleClient and CLI.

The serving loop here is a stand-in for the agent runtime's: a selector over
the pty master that reads only while the shell wants input and writes what
it has to send. Each test starts its own and stops it in ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import select
import selectors
import threading
import time
import tty
from collections.abc import Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.console.shell import Call, Command, CommandError, Reply, Shell
from tools import console_client
from tools.console_client import ConsoleClient, ConsoleTimeout

pytestmark = pytest.mark.host_only

READ_CHUNK = 4096  # one read or write of the serving loop
SELECT_S = 0.02  # how long the loop waits before looking at the stop event again
JOIN_S = 5.0


def keys_get(args: list[str], call: Call) -> Reply:
    if args[0] != "m1":
        raise CommandError("ENOENT", f"meter {args[0]}: not registered")
    return Reply("meter m1: key version 3", {"meter": "m1", "version": 3})


def ledger_verify(args: list[str], call: Call) -> Reply:
    raise OSError("flash read failed")


def make_shell() -> Shell:
    return Shell([
        Command("keys", "meter key store", subcommands=(
            Command("get", "a meter's key version", keys_get, mandatory=1, json=True),)),
        Command("ledger", "the chain", subcommands=(
            Command("height", "blocks on the chain", lambda a, c: Reply("42")),
            Command("verify", "check the chain", ledger_verify))),
    ], banner="edgekey test console")


def _serve(shell: Shell, fd: int, stop: threading.Event, errors: list[BaseException]) -> None:
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    pending = b""
    try:
        while not stop.is_set():
            if not pending:
                pending = shell.data_to_send(READ_CHUNK)
            events = ((selectors.EVENT_READ if shell.wants_input() else 0)
                      | (selectors.EVENT_WRITE if pending else 0))
            if not events:
                stop.wait(SELECT_S)
                continue
            sel.modify(fd, events)
            for _, mask in sel.select(SELECT_S):
                if mask & selectors.EVENT_READ:
                    try:
                        data = os.read(fd, READ_CHUNK)
                    except BlockingIOError:
                        data = b""
                    shell.receive_data(data)
                if mask & selectors.EVENT_WRITE and pending:
                    with contextlib.suppress(BlockingIOError):
                        pending = pending[os.write(fd, pending):]
    except BaseException as exc:  # reported by the test, which would otherwise hang
        errors.append(exc)
    finally:
        sel.close()


@contextlib.contextmanager
def served(shell: Shell) -> Iterator[tuple[str, int]]:
    """A pty whose master side serves ``shell``; yields the slave's path and an open slave fd."""
    master, slave = os.openpty()
    stop = threading.Event()
    errors: list[BaseException] = []
    thread: threading.Thread | None = None
    try:
        tty.setraw(slave)
        os.set_blocking(master, False)
        shell.start()
        thread = threading.Thread(target=_serve, args=(shell, master, stop, errors),
                                  name="console-pty", daemon=True)
        thread.start()
        yield os.ttyname(slave), slave
    finally:
        stop.set()
        if thread is not None:
            thread.join(JOIN_S)
        os.close(master)
        os.close(slave)
    assert thread is not None and not thread.is_alive(), "the serving loop did not stop"
    assert not errors, errors


def blast(fd: int, data: bytes, timeout: float = 10.0) -> None:
    """Write ``data`` to the console while reading away its answers, so neither side blocks."""
    blocking = os.get_blocking(fd)
    os.set_blocking(fd, False)
    deadline = time.monotonic() + timeout
    try:
        while data:
            assert time.monotonic() < deadline, "the console stopped reading"
            readable, writable, _ = select.select([fd], [fd], [], SELECT_S)
            if readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(fd, 65536)
            if writable:
                with contextlib.suppress(BlockingIOError):
                    data = data[os.write(fd, data[:READ_CHUNK]):]
    finally:
        os.set_blocking(fd, blocking)


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="edgekey")
    console_client.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["console", *argv])
    assert args.handler is console_client.run
    return args.handler(args)


# --------------------------------------------------------------- the client

def test_client_runs_commands_and_reads_status_and_body() -> None:
    with served(make_shell()) as (path, _), ConsoleClient(path, timeout=5) as client:
        r = client.run("ledger height")
        assert (r.ok, r.code, r.reason, r.body) == (True, None, None, "42")
        r = client.run("keys get m7")
        assert (r.ok, r.code, r.reason, r.body) == (False, "ENOENT", "meter m7: not registered", "")
        assert client.run("retval").body == "ENOENT"
        assert client.run("keys get m1 --json").body == '{"meter": "m1", "version": 3}'
        r = client.run("keys")
        assert r.code == "EINVAL" and r.body.splitlines()[0] == "Usage: keys <subcommand>"
        assert client.run("ledger verify").status == "ERR EIO OSError: flash read failed"
        help_body = client.run("help").body
        assert "\r" not in help_body and "ledger height" in help_body


def test_client_refuses_lines_the_shell_could_not_answer() -> None:
    with served(make_shell()) as (path, _), ConsoleClient(path, timeout=5) as client:
        for line in ("help\r", "help\nretval", "x" * 257, "ab\x03", "ab\x15", "ab\x08"):
            with pytest.raises(ValueError):
                client.run(line)
        assert client.run("   ") == console_client.Result(True, None, None, "")
        assert client.run("say \x1b").code == "EILSEQ"
        assert client.run("retval").body == "EILSEQ"


def test_client_follows_echo_on() -> None:
    with served(make_shell()) as (path, _), ConsoleClient(path, timeout=5) as client:
        assert client.run("echo on").ok
        assert client.run("ledger height").body == "42"
        assert client.run("echo off").ok
        assert client.run("ledger height").body == "42"


def test_8_kib_line_is_e2big_and_the_console_carries_on() -> None:
    with served(make_shell()) as (path, _), ConsoleClient(path, timeout=5) as client:
        client.sync()
        client.write_raw(b"x" * 8192 + b"\r")
        r = client.read_result()
        assert (r.code, r.reason) == ("E2BIG", "line longer than 256 bytes")
        assert client.run("retval").body == "E2BIG"
        assert client.run("help").ok


MAX_GARBAGE = 4096  # a few KiB: more than the pty's and the shell's line buffers
GARBAGE = st.one_of(
    st.binary(max_size=256),
    st.binary(min_size=1024, max_size=MAX_GARBAGE),
    # a short pattern repeated: long lines, floods of line ends, of Ctrl-C, of escapes
    st.tuples(st.binary(min_size=1, max_size=64), st.integers(8, 256))
    .map(lambda t: (t[0] * t[1])[:MAX_GARBAGE]),
    st.lists(st.sampled_from([b"help\r", b"echo on\r", b"echo off\n", b"\x03", b"\x15",
                              b"'", b"\x1b[", b"\xff", b"\x08", b"keys get m1\r\n", b"y" * 300]),
             max_size=40).map(b"".join),
)


def test_console_answers_help_after_any_bytes_written_to_the_pty() -> None:
    shell = make_shell()
    with served(shell) as (path, slave), ConsoleClient(path, timeout=5) as client:

        @settings(max_examples=30, deadline=None)
        @given(garbage=GARBAGE)
        @example(garbage=bytes(range(256)) * 16)
        @example(garbage=b"help\r" * 800)
        @example(garbage=b"\x1b[A\x03\r\n\x13\x11" * 500)
        def check(garbage: bytes) -> None:
            blast(slave, garbage)
            client.sync()
            r = client.run("help")
            assert r.ok, r
            assert "retval" in r.body

        check()
    assert shell.counters()["bytes_in"] > 0


def test_sync_skips_stale_output_and_leaves_no_error() -> None:
    shell = make_shell()
    with served(shell) as (path, slave), ConsoleClient(path, timeout=5) as client:
        blast(slave, b"help\rretval\rbogus\r" * 20)
        client.sync()
        before = shell.counters()["errors"]
        assert client.run("retval").body == "0"  # the sync's own lines all said OK
        client.sync()
        assert shell.counters()["errors"] == before


def test_timeout_raises_with_what_was_read() -> None:
    master, slave = os.openpty()  # a console nobody answers
    try:
        tty.setraw(slave)
        with ConsoleClient(os.ttyname(slave), timeout=0.2) as client:
            t0 = time.monotonic()
            with pytest.raises(ConsoleTimeout, match=r"no prompt within 0\.2 s") as err:
                client.run("help")
            assert time.monotonic() - t0 < 2
            assert err.value.received == b""
    finally:
        os.close(master)
        os.close(slave)


# ------------------------------------------------------------------ the CLI

def test_cli_exit_status_is_the_last_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with served(make_shell()) as (path, _):
        assert cli(path, "-c", "ledger height", "-c", "keys get m1") == 0
        out, err = capsys.readouterr()
        assert out == "42\nmeter m1: key version 3\n" and err == ""
        assert cli(path, "-c", "ledger height", "-c", "keys get m9") == 1
        out, err = capsys.readouterr()
        assert out == "42\n" and err == "ERR ENOENT meter m9: not registered\n"
        assert cli(path, "-c", "bogus", "-c", "ledger height", "--timeout", "3") == 0
        out, err = capsys.readouterr()
        assert out == "42\n" and err == "ERR ENOEXEC bogus: command not found\n"


def test_cli_reads_commands_from_stdin(capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with served(make_shell()) as (path, _):
        monkeypatch.setattr("sys.stdin", io.StringIO("ledger height\n\nretval\nbogus\n"))
        assert cli(path) == 1
        out, _ = capsys.readouterr()
        assert out == "42\nOK\n0\nOK\nERR ENOEXEC bogus: command not found\n"


def test_cli_exit_2_when_the_port_cannot_be_opened(tmp_path: os.PathLike[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(os.path.join(tmp_path, "no-such-tty"), "-c", "help") == 2
    err = capsys.readouterr().err
    assert err.startswith("edgekey console: cannot open ") and err.count("\n") == 1


def test_cli_exit_2_when_the_console_does_not_answer(capsys: pytest.CaptureFixture[str]) -> None:
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        assert cli(os.ttyname(slave), "-c", "help", "--timeout", "0.2") == 2
    finally:
        os.close(master)
        os.close(slave)
    err = capsys.readouterr().err
    assert "does not answer within 0.2 s" in err and err.count("\n") == 1
