"""The serial console shell, Zephyr-style, without I/O (the h11 shape).

A ``Shell`` owns the console's protocol state: the line being typed, the
output waiting to be written, the previous command's status. It has no port,
no clock and no thread; the runtime moves the bytes, so the same object serves
the terminal's UART, a pty under emulation and the unit tests.

- Bytes in: ``receive_data(data)``. Bytes out: ``data_to_send(limit)``.
- ``start()`` queues the banner and the first prompt.
- ``wants_input()`` is False while the output waiting to be written is over
  ``max_outbox``: the runtime stops reading, so a peer that never reads can
  grow neither our output nor our input. Input already received is held and
  processed as ``data_to_send`` drains the output.

Commands are a tree (Zephyr's ``SHELL_CMD_ARG`` with ``mandatory`` and
``optional`` argument counts; here the counts do not include the command's
own name). A handler takes the arguments and a ``Call`` and returns a
``Reply``, or raises ``CommandError(code, reason)``; any other exception is
reported as ``EIO`` and the shell carries on.

Output, as raw bytes for a raw tty (every newline is CRLF): the echo of the
typed line, the reply's lines, exactly one status line (``OK`` or
``ERR <CODE> <reason>``, CODE an errno name as Zephyr's handlers return
``-errno``), then the prompt. An empty line, Ctrl-C and Ctrl-U give no
status. A console line is untrusted input (DESIGN "Bad input"): it is parsed
strictly, a bad one is answered with its reason and counted, and nothing a
peer sends can make the shell raise.

Line discipline:
- a line ends at CR or LF; CRLF and LFCR count as one end;
- printable ASCII (0x20-0x7E) is typed (and echoed when echo is on);
  BS (0x08) and DEL (0x7F) erase one character, Ctrl-U (0x15) the whole
  line, Ctrl-C (0x03) abandons it;
- any other control byte (escape sequences included) or a byte >= 0x80 makes
  the line bad: it is answered ``EILSEQ`` at its end and not executed;
- a line longer than ``max_line`` is discarded to its end, then answered
  ``E2BIG``.

Words are split with ``shlex.split`` (POSIX quoting). Options recognised
anywhere after the command words: ``-h``/``--help`` (that command's help),
``--json`` (on commands declared ``json=True``: the reply's ``data`` as one
line of JSON instead of its text); words after ``--`` are plain arguments.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# Status codes: errno names, as Zephyr's shell handlers return -errno.
ENOEXEC = "ENOEXEC"  # no such command
EINVAL = "EINVAL"  # bad arguments, quoting or option
E2BIG = "E2BIG"  # line longer than max_line
EILSEQ = "EILSEQ"  # a control byte or a non-ASCII byte in the line
ENOENT = "ENOENT"  # the thing named does not exist (a meter, a block)
EIO = "EIO"  # the handler failed (an unexpected exception)
EBUSY = "EBUSY"  # the resource is in use; try again later
ENOSPC = "ENOSPC"  # out of room (flash, a queue)
EPERM = "EPERM"  # not allowed here
CODES = frozenset({ENOEXEC, EINVAL, E2BIG, EILSEQ, ENOENT, EIO, EBUSY, ENOSPC, EPERM})

DEFAULT_PROMPT = "edgekey:~$ "
# Zephyr's CONFIG_SHELL_CMD_BUFF_SIZE default: ample for any command we have,
# and a fixed bound on what a line costs us to hold.
DEFAULT_MAX_LINE = 256
# Output held for a slow or absent reader: about 5.7 s of a 115200 baud UART,
# far more than any one reply needs, and nothing next to the board's RAM.
DEFAULT_MAX_OUTBOX = 65536
# A status line's reason stays one readable line on an 80-column terminal log.
MAX_REASON = 200

_CR, _LF, _BS, _DEL, _ETX, _NAK = 0x0D, 0x0A, 0x08, 0x7F, 0x03, 0x15
_PRINTABLE_RUN = re.compile(rb"[\x20-\x7e]+")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_CODE = re.compile(r"E[A-Z0-9]{1,15}")
# C0 and C1 controls except TAB and LF: a reply may quote what a peer sent
# (a meter id, a frame), and must not drive the operator's terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_HELP_OPTIONS = ("-h", "--help")
_JSON_OPTION = "--json"


class CommandError(Exception):
    """A handler's refusal: answered as ``ERR <code> <reason>``.

    ``code`` is an errno name (one of ``CODES`` or another ``E...`` token).
    """

    def __init__(self, code: str, reason: str) -> None:
        if not isinstance(code, str) or not _CODE.fullmatch(code):
            raise ValueError(f"not an errno-style code: {code!r}")
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Call:
    """How a handler was called: ``json`` when ``--json`` was given, ``path`` the command words."""

    json: bool = False
    path: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reply:
    """A handler's answer: ``text`` for people; ``data`` printed as JSON under ``--json``."""

    text: str = ""
    data: object = None


Handler = Callable[[list[str], Call], "Reply | Pending"]


class Pending:
    """A handler's answer that comes later (a query forwarded to another terminal).

    The shell holds the prompt and the operator's next lines until the
    handler's owner calls ``finish`` with the ``Reply`` or a ``CommandError``;
    the owner bounds the wait (its own timeout always finishes it).
    """

    def __init__(self) -> None:
        self._shell: Shell | None = None
        self._json = False
        self.done = False
        self.result: Reply | CommandError | None = None  # finished before the shell held it

    def finish(self, result: Reply | CommandError) -> None:
        """Answer the held command now (once; later calls do nothing)."""
        if self.done:
            return
        self.done = True
        if self._shell is None:
            self.result = result  # answered at once: the shell prints it when it returns
            return
        self._shell._finish(self, result)


@dataclass(frozen=True)
class Command:
    """One node of the command tree (Zephyr's ``SHELL_CMD_ARG``).

    ``mandatory`` and ``optional`` count the arguments after the command's
    words (``optional=-1``: any number). A node without a handler is a group:
    it needs a subcommand. ``usage`` names the arguments in help
    (``"<meter> [reason]"``); without it they are shown as ``<arg>``.
    """

    name: str
    help: str
    handler: Handler | None = None
    mandatory: int = 0
    optional: int = 0
    subcommands: tuple[Command, ...] = ()
    json: bool = False
    usage: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "subcommands", tuple(self.subcommands))
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"command name {self.name!r}: letters, digits, _ . - only, "
                             "not starting with -")
        if self.mandatory < 0 or self.optional < -1:
            raise ValueError(f"command {self.name!r}: mandatory >= 0 and optional >= -1")
        if self.handler is None:
            if not self.subcommands:
                raise ValueError(f"command {self.name!r}: needs a handler or subcommands")
            if self.mandatory or self.optional or self.json:
                raise ValueError(f"command {self.name!r}: arguments and --json need a handler")
        names = [c.name for c in self.subcommands]
        for c in self.subcommands:
            if not isinstance(c, Command):
                raise ValueError(f"command {self.name!r}: subcommand {c!r} is not a Command")
        if len(set(names)) != len(names):
            raise ValueError(f"command {self.name!r}: duplicate subcommand names")

    def arg_usage(self) -> str:
        """The arguments as help shows them."""
        if self.usage is not None:
            return self.usage
        if self.handler is None:
            return "<subcommand>"
        words = ["<arg>"] * self.mandatory
        words += ["[arg ...]"] if self.optional < 0 else ["[arg]"] * self.optional
        return " ".join(words)

    def accepts(self, n: int) -> bool:
        """Whether ``n`` arguments are a legal count."""
        if n < self.mandatory:
            return False
        return self.optional < 0 or n <= self.mandatory + self.optional


def _clean(text: str) -> str:
    """Text safe for the operator's terminal: controls shown as ``\\xNN``, newlines as LF."""
    text = text.replace("\r\n", "\n")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _one_line(text: str) -> str:
    """A reason for a status line: one line, bounded."""
    text = " ".join(_clean(text).split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def _crlf(text: str) -> bytes:
    """Text as raw-tty bytes: each line ended by CRLF."""
    if not text:
        return b""
    text = _clean(text)
    if not text.endswith("\n"):
        text += "\n"
    return text.replace("\n", "\r\n").encode("utf-8", "replace")


class Shell:
    """The console's state: bytes in, bytes out; see the module docstring."""

    def __init__(self, commands: Iterable[Command], *, prompt: str = DEFAULT_PROMPT,
                 max_line: int = DEFAULT_MAX_LINE, max_outbox: int = DEFAULT_MAX_OUTBOX,
                 echo: bool = True, banner: str | None = None) -> None:
        if max_line < 1 or max_outbox < 1:
            raise ValueError("max_line and max_outbox must be positive")
        self.prompt = prompt
        self.max_line = max_line
        self.max_outbox = max_outbox
        self.echo = echo
        self.banner = banner
        self._prompt = _clean(prompt).encode("utf-8", "replace")
        builtins = (
            Command("echo", "local echo of typed characters (off for scripts)", self._cmd_echo,
                    mandatory=1, usage="on|off"),
            Command("help", "this list, or one command's help", self._cmd_help, optional=-1,
                    usage="[command ...]"),
            Command("retval", "the previous command's status: 0 or its error code",
                    self._cmd_retval),
        )
        self._top: dict[str, Command] = {c.name: c for c in builtins}
        for c in commands:
            if not isinstance(c, Command):
                raise ValueError(f"not a Command: {c!r}")
            if c.name in self._top:
                raise ValueError(f"command {c.name!r} is defined twice (or is a built-in)")
            self._top[c.name] = c
        # protocol state
        self._inbox = bytearray()  # received, not yet processed (held under back-pressure)
        self._outbox = bytearray()
        self._line = bytearray()
        self._overflow = False  # the line passed max_line: discard to its end
        self._bad: int | None = None  # first byte that makes the line bad
        self._prev_term: int | None = None  # CR or LF just ended a line
        self._retval = "0"
        self._held: Pending | None = None  # a command whose reply comes later
        # counters
        self._lines = self._ok = self._errors = 0
        self._by_code: dict[str, int] = {}
        self._bytes_in = self._bytes_out = self._dropped = 0

    # ------------------------------------------------------------ I/O side

    def start(self) -> None:
        """Queue the banner (if any) and the first prompt; call once, when the link opens."""
        if self.banner:
            self._outbox += _crlf(self.banner)
        self._outbox += self._prompt

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the console link; replies appear in ``data_to_send``."""
        self._bytes_in += len(data)
        self._inbox += data
        self._process()

    def data_to_send(self, limit: int | None = None) -> bytes:
        """Up to ``limit`` bytes to write (all when None); draining resumes held input."""
        n = len(self._outbox) if limit is None else max(0, min(limit, len(self._outbox)))
        data = bytes(self._outbox[:n])
        del self._outbox[:n]
        self._bytes_out += n
        if self._inbox:
            self._process()
        return data

    def wants_input(self) -> bool:
        """False while output is over ``max_outbox`` or input is held: stop reading the link."""
        return not self._inbox and len(self._outbox) <= self.max_outbox and self._held is None

    def counters(self) -> dict[str, Any]:
        """A snapshot: lines answered, ok, errors, errors by code, bytes in/out,
        ``dropped`` reply bytes cut off."""
        return {"lines": self._lines, "ok": self._ok, "errors": self._errors,
                "by_code": dict(self._by_code), "bytes_in": self._bytes_in,
                "bytes_out": self._bytes_out, "dropped": self._dropped}

    # ------------------------------------------------------ line discipline

    def _process(self) -> None:
        data = self._inbox
        i, n = 0, len(data)
        while i < n and len(self._outbox) <= self.max_outbox and self._held is None:
            b = data[i]
            if 0x20 <= b <= 0x7E:
                run = _PRINTABLE_RUN.match(data, i)
                assert run is not None  # data[i] is printable
                end = run.end()
                self._prev_term = None
                self._type(data[i:end])
                i = end
                continue
            i += 1
            if b in (_CR, _LF):
                if self._prev_term is not None and self._prev_term != b:
                    self._prev_term = None  # the second half of CRLF or LFCR
                else:
                    self._prev_term = b
                    self._end_line()
                continue
            self._prev_term = None
            if b == _ETX:
                if self.echo:
                    self._outbox += b"^C\r\n"
                self._reset_line()
                self._outbox += self._prompt
            elif b in (_BS, _DEL):
                if self._line and not self._overflow:
                    del self._line[-1]
                    if self.echo:
                        self._outbox += b"\b \b"
            elif b == _NAK:
                if self.echo:  # erase what was echoed: the line, up to max_line
                    self._outbox += b"\b \b" * len(self._line)
                self._reset_line()
            elif self._bad is None:
                self._bad = b
        del data[:i]

    def _type(self, chars: bytes | bytearray) -> None:
        if self._overflow:
            return
        room = self.max_line - len(self._line)
        if len(chars) > room:
            chars = chars[:room]
            self._overflow = True
        self._line += chars
        if self.echo:
            self._outbox += chars

    def _reset_line(self) -> None:
        self._line.clear()
        self._overflow = False
        self._bad = None

    def _end_line(self) -> None:
        if self.echo:
            self._outbox += b"\r\n"
        if self._overflow:
            self._status(E2BIG, f"line longer than {self.max_line} bytes")
        elif self._bad is not None:
            self._status(EILSEQ, f"byte 0x{self._bad:02x} in line: only printable ASCII "
                                 "is accepted")
        else:
            self._execute(self._line.decode("ascii"))
        self._reset_line()
        if self._held is None:
            self._outbox += self._prompt

    # ------------------------------------------------------------ execution

    def _execute(self, line: str) -> None:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            self._status(EINVAL, f"cannot parse line: {exc}")
            return
        if not words:
            return  # an empty line: just a new prompt
        node, path, rest = self._walk(words)
        args, want_help, want_json = _options(rest)
        where = " ".join(path)
        if node is None and (args or not want_help):
            self._status(ENOEXEC, f"{args[0] if args else words[0]}: command not found")
        elif want_help:
            self._emit(Reply(self._tree_help() if node is None else self._node_help(node, path)))
            self._status(None)
        elif node is None:  # only options, none of them -h: nothing to run
            self._status(ENOEXEC, f"{words[0]}: command not found")
        elif node.handler is None:
            if args:
                self._status(ENOEXEC, f"{where} {args[0]}: command not found")
            else:
                self._emit(Reply(self._node_help(node, path)))
                self._status(EINVAL, f"{where}: subcommand required")
        elif want_json and not node.json:
            self._status(EINVAL, f"{where}: --json not supported")
        elif not node.accepts(len(args)):
            self._emit(Reply(self._usage(node, path)))
            self._status(EINVAL, f"{where}: wrong parameter count")
        else:
            self._call(node.handler, args, Call(json=want_json, path=tuple(path)))

    def _walk(self, words: list[str]) -> tuple[Command | None, list[str], list[str]]:
        """The deepest command the leading words name, its words, and the words left."""
        node: Command | None = None
        table = self._top
        i = 0
        while i < len(words) and words[i] in table:
            node = table[words[i]]
            table = {c.name: c for c in node.subcommands}
            i += 1
        return node, words[:i], words[i:]

    def _call(self, handler: Handler, args: list[str], call: Call) -> None:
        try:
            reply = handler(list(args), call)
            if isinstance(reply, Pending):
                if reply.result is None:
                    reply._shell, reply._json = self, call.json
                    self._held = reply
                    return
                if isinstance(reply.result, CommandError):
                    raise reply.result
                reply = reply.result
            if not isinstance(reply, Reply):
                raise TypeError(f"handler returned {type(reply).__name__}, not Reply")
            text = json.dumps(reply.data, sort_keys=True) if call.json else reply.text
            if not isinstance(text, str):
                raise TypeError(f"reply text is {type(text).__name__}, not str")
        except CommandError as exc:
            self._status(exc.code, exc.reason)
        except Exception as exc:  # a handler's bug must not take the console down
            self._status(EIO, f"{type(exc).__name__}: {exc}")
        else:
            self._emit(Reply(text))
            self._status(None)

    def _finish(self, pending: Pending, result: Reply | CommandError) -> None:
        if pending is not self._held:
            return
        self._held = None
        if isinstance(result, CommandError):
            self._status(result.code, result.reason)
        else:
            self._emit(Reply(json.dumps(result.data, sort_keys=True) if pending._json
                             else result.text))
            self._status(None)
        self._outbox += self._prompt
        if self._inbox:
            self._process()

    def _emit(self, reply: Reply) -> None:
        """A reply's text, cut with a note when longer than max_outbox."""
        data = _crlf(reply.text)
        if len(data) > self.max_outbox:
            kept = data[: self.max_outbox].decode("utf-8", "ignore").encode("utf-8")
            kept = kept.rstrip(b"\r")
            dropped = len(data) - len(kept)
            self._dropped += dropped
            if not kept.endswith(b"\r\n"):
                kept += b"\r\n"
            data = kept + f"[output cut: {dropped} bytes dropped]\r\n".encode()
        self._outbox += data

    def _status(self, code: str | None, reason: str = "") -> None:
        """The one status line that ends a line's output; remembered for ``retval``."""
        self._lines += 1
        if code is None:
            self._ok += 1
            self._retval = "0"
            self._outbox += b"OK\r\n"
            return
        self._errors += 1
        self._by_code[code] = self._by_code.get(code, 0) + 1
        self._retval = code
        self._outbox += f"ERR {code} {_one_line(reason)}".rstrip().encode("utf-8", "replace")
        self._outbox += b"\r\n"

    # ----------------------------------------------------------------- help

    def _usage(self, node: Command, path: list[str]) -> str:
        words = [*path, node.arg_usage()] + ([f"[{_JSON_OPTION}]"] if node.json else [])
        return "Usage: " + " ".join(w for w in words if w)

    def _node_help(self, node: Command, path: list[str]) -> str:
        lines = [self._usage(node, path), node.help]
        if node.subcommands:
            lines.append("Subcommands:")
            lines += _table([(f"{c.name} {c.arg_usage()}".rstrip(), c.help)
                             for c in sorted(node.subcommands, key=lambda c: c.name)])
        return "\n".join(lines)

    def _tree_help(self) -> str:
        rows: list[tuple[str, str]] = []

        def walk(cmds: Iterable[Command], prefix: str) -> None:
            for c in sorted(cmds, key=lambda c: c.name):
                usage = c.arg_usage() + (f" [{_JSON_OPTION}]" if c.json else "")
                rows.append((f"{prefix}{c.name} {usage}".rstrip(), c.help))
                walk(c.subcommands, f"{prefix}{c.name} ")

        walk(self._top.values(), "")
        return "\n".join(_table(rows))

    # ------------------------------------------------------------- built-ins

    def _cmd_echo(self, args: list[str], call: Call) -> Reply:
        if args[0] not in ("on", "off"):
            raise CommandError(EINVAL, f"echo: expected on or off, got {args[0]!r}")
        self.echo = args[0] == "on"
        return Reply()

    def _cmd_help(self, args: list[str], call: Call) -> Reply:
        if not args:
            return Reply(self._tree_help())
        node, path, rest = self._walk(args)
        if node is None or rest:
            raise CommandError(ENOEXEC, f"{' '.join(args[: len(path) + 1])}: command not found")
        return Reply(self._node_help(node, path))

    def _cmd_retval(self, args: list[str], call: Call) -> Reply:
        return Reply(self._retval)


def _options(words: list[str]) -> tuple[list[str], bool, bool]:
    """Split the words after a command into arguments, ``-h``/``--help`` and ``--json``."""
    args: list[str] = []
    want_help = want_json = literal = False
    for w in words:
        if literal:
            args.append(w)
        elif w == "--":
            literal = True
        elif w in _HELP_OPTIONS:
            want_help = True
        elif w == _JSON_OPTION:
            want_json = True
        else:
            args.append(w)
    return args, want_help, want_json


def _table(rows: list[tuple[str, str]]) -> list[str]:
    width = max((len(a) for a, _ in rows), default=0)
    return [f"  {a:<{width}}  {b}".rstrip() for a, b in rows]


__all__ = [
    "CODES", "DEFAULT_MAX_LINE", "DEFAULT_MAX_OUTBOX", "DEFAULT_PROMPT", "E2BIG", "EBUSY",
    "EILSEQ", "EINVAL", "EIO", "ENOENT", "ENOEXEC", "ENOSPC", "EPERM", "MAX_REASON", "Call",
    "Command", "CommandError", "Handler", "Reply", "Shell",
]
