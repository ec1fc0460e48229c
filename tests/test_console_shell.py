"""The console shell as a sans-I/O object: bytes in, bytes out, no port and no thread.

A small command tree of our own stands in for the agent's commands.
"""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agent.console.shell import (
    CODES,
    DEFAULT_MAX_LINE,
    DEFAULT_PROMPT,
    E2BIG,
    EILSEQ,
    EINVAL,
    EIO,
    ENOENT,
    ENOEXEC,
    Call,
    Command,
    CommandError,
    Reply,
    Shell,
)

PROMPT = DEFAULT_PROMPT
METERS = {"m1": 3, "m2": 7}
STATUS = re.compile(r"OK|ERR [A-Z0-9]+ .*")
seen_calls: list[Call] = []


def keys_get(args: list[str], call: Call) -> Reply:
    seen_calls.append(call)
    meter = args[0]
    if meter not in METERS:
        raise CommandError(ENOENT, f"meter {meter}: not registered")
    return Reply(f"meter {meter}: key version {METERS[meter]}",
                 {"version": METERS[meter], "meter": meter})


def keys_rotate(args: list[str], call: Call) -> Reply:
    return Reply(f"rotating {args[0]}" + (f" ({args[1]})" if len(args) > 1 else ""))


def ledger_verify(args: list[str], call: Call) -> Reply:
    raise RuntimeError("flash read failed\nat block 7")


def say(args: list[str], call: Call) -> Reply:
    return Reply("\n".join(f"[{a}]" for a in args))


TREE = (
    Command("keys", "meter key store", subcommands=(
        Command("get", "a meter's key version", keys_get, mandatory=1, json=True,
                usage="<meter>"),
        Command("rotate", "start a key rotation", keys_rotate, mandatory=1, optional=1,
                usage="<meter> [reason]"),
    )),
    Command("ledger", "the chain on flash", subcommands=(
        Command("height", "blocks on the chain", lambda a, c: Reply("42", 42), json=True),
        Command("verify", "check the chain's hashes", ledger_verify),
    )),
    Command("say", "print each argument on its own line", say, optional=-1),
    Command("none", "a handler with a bug: returns None", lambda a, c: None),  # type: ignore
    Command("raw", "quote what a peer sent", lambda a, c: Reply("peer sent \x1b[2J\r\nok")),
)


def drain(shell: Shell) -> bytes:
    out = bytearray()
    while chunk := shell.data_to_send():
        out += chunk
    return bytes(out)


def feed(shell: Shell, data: bytes) -> str:
    shell.receive_data(data)
    return drain(shell).decode()


def scripted(**kw: object) -> Shell:
    """A started shell with echo off, the way scripts and the desk client use it."""
    shell = Shell(TREE, echo=False, **kw)  # type: ignore[arg-type]
    shell.start()
    drain(shell)
    return shell


def ask(shell: Shell, line: str) -> list[str]:
    """One line's answer: its output lines (the status last), the prompt checked and removed."""
    text = feed(shell, line.encode() + b"\r")
    assert text.endswith(PROMPT), text
    text = text[: -len(PROMPT)]
    assert text.endswith("\r\n") and "\n" not in text.replace("\r\n", ""), text
    return text[:-2].split("\r\n")


def statuses(output: bytes) -> list[str]:
    """The status lines in a transcript, echo on or off.

    A status line is the one right before a prompt; with echo off it follows
    the previous prompt on the same line (nothing ended the typed line there).
    Echoed text that looks like a status is followed by its own status, not a
    prompt.
    """
    segments = output.decode("utf-8", "replace").split("\r\n")
    found = []
    for seg, after in itertools.pairwise(segments):
        while seg.startswith(PROMPT):
            seg = seg[len(PROMPT):]
        if STATUS.fullmatch(seg) and after.startswith(PROMPT):
            found.append(seg)
    return found


# ------------------------------------------------------------------ replies

def test_ok_reply_is_text_then_one_status_line_then_prompt() -> None:
    shell = scripted()
    assert feed(shell, b"keys get m1\r") == f"meter m1: key version 3\r\nOK\r\n{PROMPT}"


def test_multi_line_reply_text_is_sent_with_crlf() -> None:
    assert ask(scripted(), "say a b") == ["[a]", "[b]", "OK"]


def test_handler_command_error_gives_its_code_and_reason() -> None:
    assert ask(scripted(), "keys get m9") == ["ERR ENOENT meter m9: not registered"]


def test_handler_exception_is_eio_on_one_line_and_the_shell_carries_on() -> None:
    shell = scripted()
    assert ask(shell, "ledger verify") == ["ERR EIO RuntimeError: flash read failed at block 7"]
    assert ask(shell, "ledger height") == ["42", "OK"]


def test_handler_returning_something_else_than_a_reply_is_eio() -> None:
    assert ask(scripted(), "none") == ["ERR EIO TypeError: handler returned NoneType, not Reply"]


def test_control_bytes_in_reply_text_are_shown_escaped() -> None:
    assert ask(scripted(), "raw") == ["peer sent \\x1b[2J", "ok", "OK"]


def test_json_prints_the_data_sorted_on_one_line() -> None:
    shell = scripted()
    seen_calls.clear()
    lines = ask(shell, "keys get --json m2")
    assert lines == ['{"meter": "m2", "version": 7}', "OK"]
    assert json.loads(lines[0]) == {"meter": "m2", "version": 7}
    assert seen_calls == [Call(json=True, path=("keys", "get"))]
    assert ask(shell, "keys get m2")[0] == "meter m2: key version 7"
    assert seen_calls[-1] == Call(json=False, path=("keys", "get"))


def test_json_on_a_command_not_declaring_it_is_einval() -> None:
    assert ask(scripted(), "keys rotate m1 --json") == [
        "ERR EINVAL keys rotate: --json not supported"]


# ------------------------------------------------------- commands and help

def test_unknown_command_is_enoexec() -> None:
    shell = scripted()
    assert ask(shell, "bogus 1 2") == ["ERR ENOEXEC bogus: command not found"]
    assert ask(shell, "keys bogus") == ["ERR ENOEXEC keys bogus: command not found"]
    assert ask(shell, "bogus -h") == ["ERR ENOEXEC bogus: command not found"]


def test_group_without_subcommand_prints_its_help_and_einval() -> None:
    lines = ask(scripted(), "keys")
    assert lines[0] == "Usage: keys <subcommand>"
    assert any(line.split()[:2] == ["get", "<meter>"] for line in lines)
    assert lines[-1] == "ERR EINVAL keys: subcommand required"


def test_wrong_parameter_count_prints_the_usage_line_then_einval() -> None:
    shell = scripted()
    assert ask(shell, "keys get") == ["Usage: keys get <meter> [--json]",
                                      "ERR EINVAL keys get: wrong parameter count"]
    assert ask(shell, "keys rotate m1 why extra")[-1] == (
        "ERR EINVAL keys rotate: wrong parameter count")
    assert ask(shell, "keys rotate m1 'key leaked'") == ["rotating m1 (key leaked)", "OK"]
    assert ask(shell, "retval x") == ["Usage: retval", "ERR EINVAL retval: wrong parameter count"]


def test_help_lists_the_whole_tree_one_line_per_command() -> None:
    lines = ask(scripted(), "help")
    assert lines[-1] == "OK"
    rows = [line.split(None, 1)[0] for line in lines[:-1]]
    paths = [" ".join(line.split()[:2]) for line in lines[:-1]]
    for name in ("help", "retval", "echo", "keys", "ledger", "say"):
        assert name in rows
    assert "keys get" in paths and "ledger verify" in paths
    get = next(line for line in lines if line.split()[:2] == ["keys", "get"])
    assert "<meter> [--json]" in get and "a meter's key version" in get
    assert len(lines) - 1 == 3 + 3 + 3 + 3  # built-ins, keys, ledger, say/none/raw


@pytest.mark.parametrize("line", ["keys get -h", "keys get m1 --help", "keys get --help m1 m2",
                                  "help keys get"])
def test_dash_h_anywhere_prints_that_commands_help_and_ok(line: str) -> None:
    seen_calls.clear()
    assert ask(scripted(), line) == ["Usage: keys get <meter> [--json]", "a meter's key version",
                                     "OK"]
    assert seen_calls == []


def test_help_of_a_group_lists_its_subcommands() -> None:
    lines = ask(scripted(), "ledger -h")
    assert lines[:3] == ["Usage: ledger <subcommand>", "the chain on flash", "Subcommands:"]
    assert [line.split()[0] for line in lines[3:-1]] == ["height", "verify"]
    assert lines[-1] == "OK"


def test_dash_h_alone_is_the_whole_tree() -> None:
    shell = scripted()
    assert ask(shell, "-h") == ask(shell, "help")


def test_help_of_an_unknown_command_is_enoexec() -> None:
    assert ask(scripted(), "help keys nope") == ["ERR ENOEXEC keys nope: command not found"]


def test_quotes_make_one_word_and_double_dash_ends_options() -> None:
    shell = scripted()
    assert ask(shell, "say 'a b' \"c  d\" e\\ f") == ["[a b]", "[c  d]", "[e f]", "OK"]
    assert ask(shell, "say -- -h --json") == ["[-h]", "[--json]", "OK"]
    assert ask(shell, "say ''") == ["[]", "OK"]


@pytest.mark.parametrize("line", ["say 'open", 'say "open', "say trailing\\"])
def test_unbalanced_quotes_are_einval(line: str) -> None:
    [status] = ask(scripted(), line)
    assert status.startswith("ERR EINVAL cannot parse line: ")


def test_empty_and_blank_lines_give_only_a_new_prompt() -> None:
    shell = scripted()
    assert feed(shell, b"\r\r    \r") == PROMPT * 3
    assert shell.counters()["lines"] == 0


def test_retval_is_the_previous_status_zephyr_style() -> None:
    shell = scripted()
    assert ask(shell, "retval") == ["0", "OK"]
    ask(shell, "bogus")
    assert ask(shell, "retval") == [ENOEXEC, "OK"]
    assert ask(shell, "retval") == ["0", "OK"]
    ask(shell, "keys get")
    feed(shell, b"\r\x03")  # an empty line and Ctrl-C keep the previous status
    assert ask(shell, "retval") == [EINVAL, "OK"]


def test_echo_on_echoes_typed_characters_and_echo_off_silences_them() -> None:
    shell = Shell(TREE)
    shell.start()
    assert drain(shell) == PROMPT.encode()
    assert feed(shell, b"ledger height\r") == f"ledger height\r\n42\r\nOK\r\n{PROMPT}"
    assert feed(shell, b"echo off\r") == f"echo off\r\nOK\r\n{PROMPT}"
    assert feed(shell, b"ledger height\r") == f"42\r\nOK\r\n{PROMPT}"
    assert feed(shell, b"echo on\r") == f"OK\r\n{PROMPT}"
    assert feed(shell, b"x") == "x"
    assert ask(scripted(), "echo loud") == ["ERR EINVAL echo: expected on or off, got 'loud'"]


def test_banner_then_first_prompt() -> None:
    shell = Shell(TREE, banner="edgekey 0.1\nPL terminal")
    shell.start()
    assert drain(shell) == f"edgekey 0.1\r\nPL terminal\r\n{PROMPT}".encode()


# ---------------------------------------------------------- line discipline

def test_line_longer_than_max_line_is_e2big_at_its_end() -> None:
    shell = scripted()
    text = feed(shell, b"say " + b"x" * 400)
    assert text == ""  # nothing answered before the line ends
    assert feed(shell, b"\r") == f"ERR E2BIG line longer than {DEFAULT_MAX_LINE} bytes\r\n{PROMPT}"
    assert ask(shell, "say " + "y" * (DEFAULT_MAX_LINE - 4))[-1] == "OK"  # exactly max_line


def test_overflowing_line_is_discarded_even_when_it_names_a_command() -> None:
    shell = Shell(TREE, echo=False, max_line=8)
    seen_calls.clear()
    assert feed(shell, b"keys get m1\r") == f"ERR E2BIG line longer than 8 bytes\r\n{PROMPT}"
    assert seen_calls == []


@pytest.mark.parametrize("junk", [b"\x01", b"\x00", b"\t", b"\x1b[A", b"\x04", b"\x7e\x1b"])
def test_control_byte_makes_the_line_eilseq_and_nothing_runs(junk: bytes) -> None:
    shell = scripted()
    seen_calls.clear()
    [status] = ask(shell, "keys get m1" + junk.decode("latin-1"))
    assert status.startswith("ERR EILSEQ byte 0x")
    assert seen_calls == []
    assert ask(shell, "retval") == [EILSEQ, "OK"]


@pytest.mark.parametrize("junk", [b"\x80", b"\xc3\xa9", b"\xff"])
def test_byte_at_or_above_0x80_makes_the_line_eilseq(junk: bytes) -> None:
    shell = scripted()
    text = feed(shell, b"say " + junk + b"\r")
    assert text == (f"ERR EILSEQ byte 0x{junk[0]:02x} in line: only printable ASCII is accepted"
                    f"\r\n{PROMPT}")


def test_ctrl_c_abandons_the_line_without_a_status() -> None:
    shell = Shell(TREE)
    shell.start()
    drain(shell)
    seen_calls.clear()
    assert feed(shell, b"keys get m1\x03") == f"keys get m1^C\r\n{PROMPT}"
    assert seen_calls == []
    assert shell.counters()["lines"] == 0
    assert feed(shell, b"\r") == f"\r\n{PROMPT}"  # the abandoned line is gone


def test_ctrl_c_also_clears_a_bad_or_overflowing_line() -> None:
    shell = Shell(TREE, echo=False, max_line=8)
    assert feed(shell, b"\x1b123456789\x03retval\r") == f"{PROMPT}0\r\nOK\r\n{PROMPT}"


def test_backspace_and_del_erase_one_character() -> None:
    shell = Shell(TREE)
    shell.start()
    drain(shell)
    assert feed(shell, b"ledger heightt\x08") == "ledger heightt\b \b"
    assert feed(shell, b"\r") == f"\r\n42\r\nOK\r\n{PROMPT}"
    assert feed(shell, b"retvalx\x7f\r").startswith("retvalx\b \b\r\n0\r\n")
    assert feed(shell, b"\x08\x08") == ""  # nothing to erase, nothing echoed


def test_ctrl_u_clears_the_line() -> None:
    shell = Shell(TREE)
    shell.start()
    drain(shell)
    assert feed(shell, b"bogus\x15") == "bogus" + "\b \b" * 5
    assert feed(shell, b"retval\r") == f"retval\r\n0\r\nOK\r\n{PROMPT}"


@pytest.mark.parametrize(("ends", "lines"), [(b"\r", 1), (b"\n", 1), (b"\r\n", 1), (b"\n\r", 1),
                                             (b"\r\r", 2), (b"\n\n", 2), (b"\r\n\r\n", 2),
                                             (b"\r\n\n", 2), (b"\n\r\r", 2)])
def test_crlf_and_lfcr_end_one_line(ends: bytes, lines: int) -> None:
    shell = scripted()
    text = feed(shell, b"retval" + ends)
    assert text == f"0\r\nOK\r\n{PROMPT}" + PROMPT * (lines - 1)


def test_line_end_split_between_chunks_still_counts_once() -> None:
    shell = scripted()
    assert feed(shell, b"retval\r") == f"0\r\nOK\r\n{PROMPT}"
    assert feed(shell, b"\nretval\n") == f"0\r\nOK\r\n{PROMPT}"
    assert feed(shell, b"\r") == ""  # LF then CR: one end


# ---------------------------------------------------- limits and counters

def test_a_peer_that_never_reads_stops_our_reading_and_memory_stays_bounded() -> None:
    shell = Shell(TREE, max_outbox=4096)
    shell.start()
    accepted = 0
    while shell.wants_input():
        shell.receive_data(b"help\r")
        accepted += 1
        assert accepted < 100, "the shell never pushed back"
    assert not shell.wants_input()
    shell.receive_data(b"help\r" * 50)  # a runtime that read one chunk too many
    held = shell.data_to_send()
    assert len(held) <= 2 * 4096 + 1024
    out = held + drain(shell)
    assert shell.wants_input()
    assert len(statuses(out)) == accepted + 50 and set(statuses(out)) == {"OK"}


def test_reply_longer_than_max_outbox_is_cut_with_a_note() -> None:
    shell = Shell(TREE, echo=False, max_outbox=100)
    out = feed(shell, b"say " + b"x" * 200 + b" y" * 20 + b"\r")
    lines = out.split("\r\n")
    assert len(out) < 100 + 100
    assert re.fullmatch(r"\[output cut: \d+ bytes dropped\]", lines[-3])
    assert lines[-2:] == ["OK", PROMPT]
    assert shell.counters()["dropped"] == int(re.findall(r"\d+", lines[-3])[0]) > 0


def test_counters_count_lines_statuses_codes_and_bytes() -> None:
    shell = scripted()
    lines = ("retval", "bogus", "keys get", "keys get m1", "say \x01")
    for line in lines:
        feed(shell, line.encode("latin-1") + b"\r")
    c = shell.counters()
    assert c == {"lines": 5, "ok": 2, "errors": 3,
                 "by_code": {ENOEXEC: 1, EINVAL: 1, EILSEQ: 1},
                 "bytes_in": c["bytes_in"], "bytes_out": c["bytes_out"], "dropped": 0}
    assert c["bytes_in"] == sum(len(line) + 1 for line in lines)
    assert c["bytes_out"] > 0


def test_builtin_name_clash_and_bad_trees_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="help"):
        Shell([Command("help", "mine", lambda a, c: Reply())])
    with pytest.raises(ValueError, match="twice"):
        Shell([Command("x", "", lambda a, c: Reply()), Command("x", "", lambda a, c: Reply())])
    with pytest.raises(ValueError, match="handler or subcommands"):
        Command("empty", "nothing to run")
    with pytest.raises(ValueError, match="duplicate"):
        Command("g", "", subcommands=(Command("a", "", say), Command("a", "", say)))
    with pytest.raises(ValueError, match="name"):
        Command("-h", "", say)
    with pytest.raises(ValueError, match="name"):
        Command("two words", "", say)
    with pytest.raises(ValueError, match="optional"):
        Command("x", "", say, optional=-2)


def test_command_error_needs_an_errno_style_code() -> None:
    assert {ENOEXEC, EINVAL, E2BIG, EILSEQ, ENOENT, EIO} <= CODES
    assert CommandError(ENOENT, "gone").code == ENOENT
    with pytest.raises(ValueError):
        CommandError("not found", "gone")


def test_optional_minus_one_takes_any_number_of_arguments() -> None:
    shell = scripted()
    assert ask(shell, "say") == ["OK"]
    assert ask(shell, "say " + " ".join("abcdefghijklmnopqrstuvwxyz"))[-1] == "OK"


# ------------------------------------------------------------- properties

TOKENS = (b"help", b"retval", b"ledger height", b"keys get m1", b"bogus", b"-h", b"--json",
          b"echo off", b"echo on", b"'", b'"', b" ", b"\r", b"\n", b"\r\n", b"\x03", b"\x08",
          b"\x7f", b"\x15", b"\x1b[A", b"\x00", b"\xff", b"\xc3\xa9", b"x" * 40,
          b"help\r", b"retval\n", b"ledger height --json\r\n", b"ledger\r", b"echo off\r",
          b"echo on\n\r", b"help ledger height\r", b"say 'a b'\r")
GARBAGE = st.lists(st.one_of(st.binary(max_size=24), st.sampled_from(TOKENS)),
                   max_size=60).map(b"".join)
MAX_LINE = 32  # small, so that garbage overflows lines often


def property_shell() -> Shell:
    """Built-ins and a command whose output can never look like a status line."""
    shell = Shell([Command("ledger", "the chain", subcommands=(
        Command("height", "blocks", lambda a, c: Reply("42", 42), json=True),))],
        max_line=MAX_LINE, max_outbox=256)
    shell.start()
    return shell


def expected_statuses(data: bytes, max_line: int) -> int:
    """An independent model of the line discipline: how many lines get a status."""
    count, prev, line, over, bad = 0, None, [], False, False
    for b in data:
        if b in (0x0D, 0x0A):
            if prev is not None and prev != b:
                prev = None
                continue
            prev = b
            count += over or bad or any(c != 0x20 for c in line)
            line, over, bad = [], False, False
            continue
        prev = None
        if b in (0x03, 0x15):
            line, over, bad = [], False, False
        elif b in (0x08, 0x7F):
            if line and not over:
                line.pop()
        elif 0x20 <= b < 0x7F:
            if len(line) >= max_line:
                over = True
            elif not over:
                line.append(b)
        else:
            bad = True
    return count


def chunked_output(shell: Shell, data: bytes, cuts: list[int], limit: int | None) -> bytes:
    out = bytearray(shell.data_to_send())
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for a, b in itertools.pairwise(edges):
        shell.receive_data(data[a:b])
        while chunk := shell.data_to_send(limit):
            out += chunk
    return bytes(out)


@given(data=GARBAGE, cuts=st.lists(st.integers(0, 10_000), max_size=12),
       limit=st.one_of(st.none(), st.integers(1, 64)))
def test_any_bytes_in_any_chunking_never_raise_and_give_the_same_output(
        data: bytes, cuts: list[int], limit: int | None) -> None:
    whole = chunked_output(property_shell(), data, [], None)
    assert chunked_output(property_shell(), data, cuts, limit) == whole


@given(data=GARBAGE)
@example(data=b"echo off\r\x00\r")  # with echo off the status follows the prompt
def test_every_completed_non_empty_line_gets_exactly_one_status(data: bytes) -> None:
    shell = property_shell()
    out = chunked_output(shell, data, [], None)
    expected = expected_statuses(data, MAX_LINE)
    assert len(statuses(out)) == expected
    assert shell.counters()["lines"] == expected


@given(data=GARBAGE)
def test_after_any_garbage_help_answers_ok(data: bytes) -> None:
    shell = property_shell()
    out = chunked_output(shell, data + b"\r\nhelp\r\n", [], None)
    assert statuses(out)[-1] == "OK"
    assert out.endswith(PROMPT.encode())


@given(data=GARBAGE, pieces=st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_held_output_stays_bounded_when_the_runtime_honours_wants_input(
        data: bytes, pieces: list[int]) -> None:
    shell = property_shell()
    # max_outbox, then at most one line's worth more: its echo, a cut reply, a status, a prompt
    bound = 2 * shell.max_outbox + 256
    out = bytearray()
    data = data * 4
    i = 0
    for k in range(10 * len(data) + 10):
        if i >= len(data):
            break
        n = pieces[k % len(pieces)]
        if shell.wants_input():
            shell.receive_data(data[i:i + n])
            i += n
        else:
            held = shell.data_to_send()  # everything queued while the peer was not reading
            assert len(held) <= bound
            out += held
    out += drain(shell)
    assert shell.wants_input()
    assert out == chunked_output(property_shell(), data, [], None)


# ----------------------------------------------------------- deferred replies

def test_a_pending_reply_holds_the_prompt_and_the_next_lines_until_it_is_finished() -> None:
    from agent.console.shell import Pending

    held: list[Pending] = []

    def fetch(args: list[str], call: Call) -> Pending:
        p = Pending()
        held.append(p)
        return p

    shell = Shell((*TREE, Command("fetch", "answered later", fetch, mandatory=1, json=True)),
                  echo=False)
    shell.start()
    drain(shell)
    assert feed(shell, b"fetch m1\rledger height\r") == ""  # nothing yet, not even a prompt
    assert not shell.wants_input()
    held[0].finish(Reply("key v3", {"version": 3}))
    out = drain(shell).decode()
    # the held reply, its status, a prompt, then the line typed meanwhile, answered in order
    assert out == "key v3\r\nOK\r\n" + PROMPT + "42\r\nOK\r\n" + PROMPT
    held[0].finish(Reply("again"))  # a second finish does nothing
    assert drain(shell) == b""
    feed(shell, b"fetch m2 --json\r")
    held[1].finish(CommandError("ETIMEDOUT", "no answer from ecd-03 after 2 tries"))
    assert drain(shell).decode() == "ERR ETIMEDOUT no answer from ecd-03 after 2 tries\r\n" \
        + PROMPT
    assert ask(shell, "retval") == ["ETIMEDOUT", "OK"]


def test_a_pending_reply_finished_before_the_handler_returns_is_printed_at_once() -> None:
    from agent.console.shell import Pending

    def fetch(args: list[str], call: Call) -> Pending:
        p = Pending()
        p.finish(Reply("local", {"answer": "local"}))
        return p

    shell = Shell((Command("fetch", "answered at once", fetch, json=True),), echo=False)
    shell.start()
    drain(shell)
    assert ask(shell, "fetch") == ["local", "OK"]
    assert ask(shell, "fetch --json") == ['{"answer": "local"}', "OK"]
