"""Board configs: the devicetree of this project.

A board file (``board_configs/*.toml``) holds a board's numbers: CPU, RAM
and the agent's share of it, flash geometry and partitions, UARTs and links,
PLC and WAN rates. Code reads these numbers and never tests a board's name
(Zephyr's rule). The loader is strict: every unknown key, missing field,
wrong type and out-of-range value is reported at once, each naming the file
and the field; once every field is valid, the rules that span fields
(budget within RAM, partitions that overlap or leave the flash) are checked
and reported together in the same way.
"""

from __future__ import annotations

import tomllib
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
KIB = 1024

BOARD_DIR = Path(__file__).resolve().parent.parent / "board_configs"


class BoardConfigError(ValueError):
    """A board file is not a valid board description; ``problems`` lists every fault."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {source}: {p}" for p in problems)
        super().__init__(f"invalid board config {source} ({len(problems)} problem(s)):\n{lines}")


def _spec(lo: float | None = None, hi: float | None = None, *, choices: tuple[str, ...] = (),
          default: Any = MISSING, allow_empty: bool = False, doc: str = "") -> Any:
    """A field with its allowed range or choices; the loader enforces them."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "allow_empty": allow_empty, "doc": doc}
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class BoardInfo:
    name: str = _spec(doc="board identifier, informational only")
    description: str = _spec(default="", allow_empty=True)


@dataclass(frozen=True)
class Cpu:
    arch: str = _spec(choices=("armv7l", "aarch64", "x86_64"))
    cores: int = _spec(1, 256)
    mhz: int = _spec(50, 10_000)


@dataclass(frozen=True)
class Ram:
    total_mib: int = _spec(16, 1 << 20)
    agent_budget_mib: int = _spec(8, 1 << 20, doc="the agent process's share of total_mib")

    @property
    def agent_budget_bytes(self) -> int:
        return self.agent_budget_mib * MIB


@dataclass(frozen=True)
class Partition:
    name: str = _spec()
    offset_mib: int = _spec(0, 1 << 20)
    size_mib: int = _spec(1, 1 << 20)

    @property
    def offset_bytes(self) -> int:
        return self.offset_mib * MIB

    @property
    def size_bytes(self) -> int:
        return self.size_mib * MIB


@dataclass(frozen=True)
class Flash:
    size_mib: int = _spec(1, 1 << 20)
    erase_block_kib: int = _spec(4, 16 * 1024, doc="erase unit; the record log's segment size")
    block_size: int = _spec(512, 65536, doc="read/program unit of the block device, bytes")
    device: str = _spec(doc="device node or image file path; relative paths are the runner's")
    partitions: list[Partition] = _spec()

    @property
    def size_bytes(self) -> int:
        return self.size_mib * MIB

    @property
    def erase_block_bytes(self) -> int:
        return self.erase_block_kib * KIB

    def partition(self, name: str) -> Partition:
        for p in self.partitions:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.partitions)
        raise KeyError(f"no flash partition {name!r} on this board (has: {known})")


@dataclass(frozen=True)
class Link:
    """A serial link opened by URL: a UART node, a pty path, socket:// or loop://."""

    url: str = _spec()
    baud: int = _spec(300, 4_000_000)
    timeout_ms: int = _spec(1, 600_000, default=1000)
    pace_bytes_per_s: int = _spec(0, 1 << 30, default=0,
                                  doc="line rate enforced in software; 0 = the hardware paces")
    max_frame_bytes: int = _spec(
        16, 16383, default=2048,
        doc="DL/T 698.45 length field is 14 bits; the modem buffer caps it")


@dataclass(frozen=True)
class Plc:
    """HPLC channel figures (paper, section 3: meter-ECD rate 25-128 KByte/s)."""

    rate_min_kbyte_s: int = _spec(1, 100_000)
    rate_max_kbyte_s: int = _spec(1, 100_000)
    modem_buffer_bytes: int = _spec(64, 1 << 24)


@dataclass(frozen=True)
class Wan:
    kind: str = _spec(choices=("4g", "5g", "ethernet", "loopback"))
    rate_mbit_s: float = _spec(0.01, 100_000.0, doc="forwarding rate mu of the queueing model")
    rtt_ms: float = _spec(0.0, 10_000.0)
    forward_buffer_packets: int = _spec(1, 1 << 20, doc="buffer capacity M of eq. 6")


@dataclass(frozen=True)
class Ledger:
    """The chain's rules this board runs with; every terminal of one network must agree."""

    pow_difficulty: int = _spec(0, 32, doc="leading zero bits a block's hash needs; 0 = no "
                                           "seal (ordering is etcd's), 8 = the paper's setting")
    txs_per_block: int = _spec(1, 1024, doc="most transactions one proposed block carries")
    checkpoint_every: int = _spec(0, 1 << 32, default=1000,
                                  doc="a proposer puts the parent state's digest in every block "
                                      "at a multiple of this height (0: never); etcd keeps "
                                      "blocks from the checkpoint before the newest on")


@dataclass(frozen=True)
class Board:
    board: BoardInfo = _spec()
    cpu: Cpu = _spec()
    ram: Ram = _spec()
    flash: Flash = _spec()
    links: dict[str, Link] = _spec()
    plc: Plc = _spec()
    wan: Wan = _spec()
    ledger: Ledger = _spec()
    source: str = field(default="<memory>", compare=False)

    @property
    def name(self) -> str:
        return self.board.name

    def link(self, role: str) -> Link:
        try:
            return self.links[role]
        except KeyError:
            known = ", ".join(sorted(self.links))
            raise KeyError(f"no link {role!r} on this board (has: {known})") from None


# ---------------------------------------------------------------- loading

def load_board(path: str | Path) -> Board:
    """Read and validate one board file; raises BoardConfigError naming every fault."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BoardConfigError(source, [f"cannot read file: {exc}"]) from exc
    return parse_board(text, source)


def board_path(name_or_path: str) -> Path:
    """A path as given, or ``board_configs/<name>.toml`` for a bare name."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return p
    return BOARD_DIR / f"{name_or_path}.toml"


def parse_board(text: str, source: str = "<memory>") -> Board:
    """Validate TOML text as a board description."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BoardConfigError(source, [f"not valid TOML: {exc}"]) from exc
    except RecursionError as exc:  # tomllib recurses once per nesting level
        raise BoardConfigError(source, ["not valid TOML: values nested too deeply"]) from exc
    problems: list[str] = []
    board = _build(Board, table, "", problems, skip=("source",))
    if board is not None:
        _check_board(board, problems)
    if problems or board is None:
        raise BoardConfigError(source, problems or ["empty board description"])
    return Board(**{f.name: getattr(board, f.name) for f in fields(Board) if f.name != "source"},
                 source=source)


def _where(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build(cls: type, table: Any, path: str, problems: list[str],
           skip: tuple[str, ...] = ()) -> Any:
    """Check a TOML table against dataclass ``cls``; None if any problem was found."""
    if not isinstance(table, dict):
        problems.append(f"{path or '<top>'}: must be a table, got {type(table).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name not in skip}
    before = len(problems)
    for key in sorted(set(table) - known):
        problems.append(f"{_where(path, key)}: unknown key")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        where = _where(path, f.name)
        if f.name not in table:
            if f.default is MISSING:
                problems.append(f"{where}: missing field")
            continue
        values[f.name] = _value(hints[f.name], table[f.name], where, f.metadata, problems)
    if len(problems) > before:
        return None
    return cls(**values)


def _value(hint: Any, raw: Any, where: str, meta: Any, problems: list[str]) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(raw, list):
            problems.append(f"{where}: must be an array of tables")
            return None
        return [_build(item, v, f"{where}[{i}]", problems) for i, v in enumerate(raw)]
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a table")
            return None
        return {k: _build(item, v, _where(where, k), problems) for k, v in raw.items()}
    if is_dataclass(hint):
        return _build(hint, raw, where, problems)
    return _scalar(hint, raw, where, meta, problems)


def _scalar(hint: type, raw: Any, where: str, meta: Any, problems: list[str]) -> Any:
    if hint is float and isinstance(raw, int) and not isinstance(raw, bool):
        raw = float(raw)
    if not isinstance(raw, hint) or (hint is int and isinstance(raw, bool)):
        problems.append(f"{where}: must be {hint.__name__}, got {type(raw).__name__} {raw!r}")
        return None
    if hint is float and raw != raw:  # NaN
        problems.append(f"{where}: must be a number, got nan")
        return None
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if (lo is not None and raw < lo) or (hi is not None and raw > hi):
        problems.append(f"{where}: {raw!r} out of range [{lo}, {hi}]")
    if choices and raw not in choices:
        problems.append(f"{where}: {raw!r} is not one of {', '.join(choices)}")
    if hint is str and not raw.strip() and not meta.get("allow_empty"):
        problems.append(f"{where}: must not be empty")
    return raw


def _check_board(b: Board, problems: list[str]) -> None:
    """Rules that span fields: budgets within totals, partitions within the flash."""
    if b.ram.agent_budget_mib > b.ram.total_mib:
        problems.append(f"ram.agent_budget_mib: {b.ram.agent_budget_mib} exceeds "
                        f"ram.total_mib {b.ram.total_mib}")
    fl = b.flash
    if fl.erase_block_bytes % fl.block_size:
        problems.append(f"flash.block_size: {fl.block_size} does not divide the erase block "
                        f"({fl.erase_block_bytes} bytes)")
    if fl.block_size & (fl.block_size - 1):
        problems.append(f"flash.block_size: {fl.block_size} is not a power of two")
    if MIB % fl.erase_block_bytes:
        problems.append(f"flash.erase_block_kib: {fl.erase_block_kib} does not divide 1 MiB, "
                        "so partitions would not start on erase blocks")
    if not fl.partitions:
        problems.append("flash.partitions: at least one partition is needed")
    seen: dict[str, int] = {}
    spans = sorted(((p.offset_mib, p.offset_mib + p.size_mib, i, p.name)
                    for i, p in enumerate(fl.partitions)))
    for i, p in enumerate(fl.partitions):
        where = f"flash.partitions[{i}]"
        if p.name in seen:
            problems.append(f"{where}.name: {p.name!r} already names partition [{seen[p.name]}]")
        seen.setdefault(p.name, i)
        if p.offset_mib + p.size_mib > fl.size_mib:
            problems.append(f"{where}: {p.name!r} ends at {p.offset_mib + p.size_mib} MiB, "
                            f"beyond the {fl.size_mib} MiB flash")
    for k, (_, end_a, ia, na) in enumerate(spans):
        for start_b, _, ib, nb in spans[k + 1:]:
            if start_b >= end_a:
                break  # sorted by start: no later partition reaches back into this one
            problems.append(f"flash.partitions[{ib}]: {nb!r} overlaps partition [{ia}] {na!r}")
    if b.plc.rate_min_kbyte_s > b.plc.rate_max_kbyte_s:
        problems.append("plc.rate_min_kbyte_s: exceeds plc.rate_max_kbyte_s")
    if not b.links:
        problems.append("links: at least one link is needed")
