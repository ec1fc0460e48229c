"""Board configs (hal/board.py): the shipped boards, every class of fault, and "boards are data".

Faults are made by editing a shipped board's text, or by editing its parsed
table and writing it back with the small TOML writer below (the stdlib reads
TOML but does not write it).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import datetime
import math
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hal.board import (
    BOARD_DIR,
    MIB,
    Board,
    BoardConfigError,
    board_path,
    load_board,
    parse_board,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("pl-terminal", "qemu-armhf", "host")
PL_TEXT = (BOARD_DIR / "pl-terminal.toml").read_text(encoding="utf-8")


# ------------------------------------------------------------------ a TOML writer

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_str(s: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _toml_str(k)


def _toml_value(v: Any) -> str:
    """An inline TOML value, for the value types tomllib returns."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, datetime.date | datetime.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML for {type(v).__name__}")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def to_toml(table: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """TOML text for a table: values first, then [sub.tables], then [[arrays.of.tables]]."""
    head = ".".join(_toml_key(k) for k in prefix)
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()
             if not isinstance(v, dict) and not _is_table_array(v)]
    for k, v in table.items():
        if isinstance(v, dict):
            sub = (*prefix, k)
            lines.append(f"\n[{'.'.join(_toml_key(p) for p in sub)}]")
            lines.append(to_toml(v, sub))
        elif _is_table_array(v):
            for item in v:
                lines.append(f"\n[[{head + '.' if head else ''}{_toml_key(k)}]]")
                lines.append(to_toml(item, (*prefix, k)))
    return "\n".join(lines)


# ------------------------------------------------------------------ leaves of a board table

Keys = tuple[str | int, ...]


def _leaves(table: Any, keys: Keys = (), where: str = "") -> list[tuple[Keys, str]]:
    """Every scalar of a parsed board, with its access path and the loader's dotted name."""
    out: list[tuple[Keys, str]] = []
    for k, v in table.items():
        w = f"{where}.{k}" if where else k
        if isinstance(v, dict):
            out += _leaves(v, (*keys, k), w)
        elif _is_table_array(v):
            for i, item in enumerate(v):
                out += _leaves(item, (*keys, k, i), f"{w}[{i}]")
        else:
            out.append(((*keys, k), w))
    return out


def _field(keys: Keys) -> tuple[dataclasses.Field[Any], Any]:
    """The dataclass field behind a leaf, and its type."""
    hint: Any = Board
    found: dataclasses.Field[Any] | None = None
    for key in keys:
        origin = typing.get_origin(hint)
        if origin is list or origin is dict:
            hint = typing.get_args(hint)[-1]
            continue
        found = {f.name: f for f in dataclasses.fields(hint)}[str(key)]
        hint = typing.get_type_hints(hint)[str(key)]
    assert found is not None
    return found, hint


def _delete(table: dict[str, Any], keys: Keys) -> dict[str, Any]:
    out = copy.deepcopy(table)
    node: Any = out
    for key in keys[:-1]:
        node = node[key]
    del node[keys[-1]]
    return out


def _replace(table: dict[str, Any], keys: Keys, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(table)
    node: Any = out
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return out


TABLES = {n: tomllib.loads((BOARD_DIR / f"{n}.toml").read_text(encoding="utf-8")) for n in SHIPPED}
PL_LEAVES = _leaves(TABLES["pl-terminal"])
ALL_LEAVES = [(n, keys, where) for n in SHIPPED for keys, where in _leaves(TABLES[n])]


# ------------------------------------------------------------------ shipped boards

def test_pl_terminal_has_the_papers_figures() -> None:
    b = load_board(BOARD_DIR / "pl-terminal.toml")
    assert (b.cpu.arch, b.cpu.cores, b.cpu.mhz) == ("armv7l", 2, 700)
    assert (b.ram.total_mib, b.flash.size_mib) == (512, 1024)
    assert b.ram.agent_budget_mib < b.ram.total_mib
    assert b.flash.partition("ledger").size_bytes == 512 * MIB
    assert b.source == str(BOARD_DIR / "pl-terminal.toml")


def test_qemu_armhf_board_has_the_terminals_cpu_ram_and_flash() -> None:
    pl = load_board(BOARD_DIR / "pl-terminal.toml")
    q = load_board(BOARD_DIR / "qemu-armhf.toml")
    assert (q.cpu, q.ram) == (pl.cpu, pl.ram)
    assert q.flash.size_mib == pl.flash.size_mib
    assert q.flash.partitions == pl.flash.partitions


def test_host_board_keeps_the_terminals_budgets_on_emulated_links() -> None:
    pl = load_board(BOARD_DIR / "pl-terminal.toml")
    h = load_board(BOARD_DIR / "host.toml")
    assert h.ram == pl.ram
    assert h.flash.partitions == pl.flash.partitions
    assert set(h.links) == set(pl.links)
    assert all(link.url.startswith("loop://") or link.url.startswith("socket://")
               for link in h.links.values())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_board_loads_with_a_ledger_and_links(name: str) -> None:
    b = load_board(board_path(name))
    assert b.name == name
    assert b.flash.partition("ledger").size_mib > 0
    assert {"console", "hplc"} <= set(b.links)


def test_board_path_maps_a_bare_name_to_board_configs_and_keeps_a_path() -> None:
    assert board_path("qemu-armhf") == BOARD_DIR / "qemu-armhf.toml"
    assert board_path("elsewhere/x.toml") == Path("elsewhere/x.toml")


# ------------------------------------------------------------------ every class of fault

def _edit(text: str, *edits: tuple[str, str]) -> str:
    """Apply text edits; each must match exactly once, so a reworded board breaks loudly."""
    for old, new in edits:
        assert text.count(old) == 1, f"{old!r} must occur once in the board text"
        text = text.replace(old, new)
    return text


RAM_SECTION = ("[ram]\ntotal_mib = 512\n# The rest is the OS, etcd, the modem and WAN daemons, "
               "and page cache.\nagent_budget_mib = 192\n")

FAULTS: dict[str, tuple[list[tuple[str, str]], str]] = {
    # id: edits of pl-terminal.toml (old -> new), the problem the loader must report
    "unknown-key-top": ([("[cpu]", "[extra]\nx = 1\n\n[cpu]")], "extra: unknown key"),
    "unknown-key-nested": ([("mhz = 700", "mhz = 700\nturbo = true")], "cpu.turbo: unknown key"),
    "unknown-key-partition": ([('name = "ledger"', 'name = "ledger"\nwear = 3')],
                              "flash.partitions[3].wear: unknown key"),
    "unknown-key-link": ([('url = "/dev/ttyS0"', 'url = "/dev/ttyS0"\nparity = "N"')],
                         "links.console.parity: unknown key"),
    "missing-field": ([("mhz = 700\n", "")], "cpu.mhz: missing field"),
    "missing-table": ([(RAM_SECTION, "")], "ram: missing field"),
    "misspelt-table": ([("[ram]\n", "[ram_]\n")], "ram: missing field"),
    "wrong-type": ([("cores = 2", 'cores = "2"')], "cpu.cores: must be int, got str '2'"),
    "bool-for-int": ([("cores = 2", "cores = true")], "cpu.cores: must be int, got bool True"),
    "float-for-int": ([("mhz = 700", "mhz = 700.0")], "cpu.mhz: must be int, got float 700.0"),
    "table-for-scalar": ([("mhz = 700", "mhz = { value = 700 }")],
                         "cpu.mhz: must be int, got dict"),
    "scalar-for-table": ([(RAM_SECTION, ""), ("[board]", "ram = 512\n\n[board]")],
                         "ram: must be a table, got int"),
    "out-of-range": ([("mhz = 700", "mhz = 5")], "cpu.mhz: 5 out of range [50, 10000]"),
    "out-of-range-float": ([("rtt_ms = 60.0", "rtt_ms = -1.0")], "wan.rtt_ms: -1.0 out of range"),
    "nan-float": ([("rate_mbit_s = 25.0", "rate_mbit_s = nan")],
                  "wan.rate_mbit_s: must be a number, got nan"),
    "choice": ([('arch = "armv7l"', 'arch = "mips"')], "cpu.arch: 'mips' is not one of"),
    "empty-string": ([('url = "/dev/ttyS0"', 'url = ""')], "links.console.url: must not be empty"),
    "blank-string": ([('name = "pl-terminal"', 'name = "   "')], "board.name: must not be empty"),
    "overlap": ([('name = "image_a"\noffset_mib = 16', 'name = "image_a"\noffset_mib = 10')],
                "flash.partitions[1]: 'image_a' overlaps partition [0] 'boot'"),
    "beyond-flash": ([("offset_mib = 976\nsize_mib = 48", "offset_mib = 976\nsize_mib = 49")],
                     "flash.partitions[6]: 'config' ends at 1025 MiB, beyond the 1024 MiB flash"),
    "duplicate-partition": ([('name = "journal"', 'name = "ledger"')],
                            "flash.partitions[5].name: 'ledger' already names partition [3]"),
    "budget-above-ram": ([("agent_budget_mib = 192", "agent_budget_mib = 600")],
                         "ram.agent_budget_mib: 600 exceeds ram.total_mib 512"),
    "block-not-dividing-erase": ([("erase_block_kib = 128\nblock_size = 2048",
                                   "erase_block_kib = 4\nblock_size = 8192")],
                                 "flash.block_size: 8192 does not divide the erase block "
                                 "(4096 bytes)"),
    "block-not-power-of-two": ([("block_size = 2048", "block_size = 1536")],
                               "flash.block_size: 1536 is not a power of two"),
    "plc-rates-inverted": ([("rate_min_kbyte_s = 25", "rate_min_kbyte_s = 200")],
                           "plc.rate_min_kbyte_s: exceeds plc.rate_max_kbyte_s"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_a_board_config_error_naming_file_and_field(
        tmp_path: Path, fault: str) -> None:
    edits, problem = FAULTS[fault]
    path = tmp_path / "broken.toml"
    path.write_text(_edit(PL_TEXT, *edits), encoding="utf-8")
    with pytest.raises(BoardConfigError) as info:
        load_board(path)
    err = info.value
    assert err.source == str(path)
    assert any(p.startswith(problem) for p in err.problems), err.problems
    assert f"  {path}: {problem}" in str(err)


def test_unedited_board_text_from_a_file_is_valid(tmp_path: Path) -> None:
    """The fault tests' base: only their edit makes a file invalid."""
    path = tmp_path / "ok.toml"
    path.write_text(PL_TEXT, encoding="utf-8")
    assert load_board(path) == load_board(BOARD_DIR / "pl-terminal.toml")


def test_invalid_toml_is_reported_with_its_line(tmp_path: Path) -> None:
    line = PL_TEXT.splitlines().index("mhz = 700") + 1
    path = tmp_path / "syntax.toml"
    path.write_text(_edit(PL_TEXT, ("mhz = 700", "mhz = = 700")), encoding="utf-8")
    with pytest.raises(BoardConfigError) as info:
        load_board(path)
    (problem,) = info.value.problems
    assert problem.startswith("not valid TOML: ")
    assert f"line {line}," in problem
    assert str(path) in str(info.value)


@pytest.mark.parametrize("make", ["missing", "directory", "not-utf8"])
def test_unreadable_file_is_a_board_config_error_naming_it(tmp_path: Path, make: str) -> None:
    path = tmp_path / "board.toml"
    if make == "directory":
        path.mkdir()
    elif make == "not-utf8":
        path.write_bytes(PL_TEXT.encode() + b"\n# \xff\xfe\n")
    with pytest.raises(BoardConfigError) as info:
        load_board(path)
    (problem,) = info.value.problems
    assert problem.startswith("cannot read file: ")
    assert info.value.source == str(path)
    assert str(path) in str(info.value)


def test_several_faults_in_one_file_are_all_reported_together(tmp_path: Path) -> None:
    faults = ("unknown-key-nested", "table-for-scalar", "empty-string", "choice", "nan-float")
    text = _edit(PL_TEXT, *[edit for f in faults for edit in FAULTS[f][0]])
    path = tmp_path / "many.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BoardConfigError) as info:
        load_board(path)
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "cpu.turbo", "cpu.arch", "cpu.mhz", "links.console.url", "wan.rate_mbit_s"]
    assert "(5 problem(s))" in str(info.value)
    assert all(f"  {path}: {p}" in str(info.value) for p in problems)


def test_cross_field_faults_are_reported_together() -> None:
    faults = ("budget-above-ram", "duplicate-partition", "beyond-flash")
    text = _edit(PL_TEXT, *[edit for f in faults for edit in FAULTS[f][0]])
    with pytest.raises(BoardConfigError) as info:
        parse_board(text, "cross.toml")
    assert [p.split(":")[0] for p in info.value.problems] == [
        "ram.agent_budget_mib", "flash.partitions[5].name", "flash.partitions[6]"]


def test_every_overlapping_pair_of_partitions_is_reported() -> None:
    """Not only neighbours in offset order: a long partition can overlap several."""
    # boot now spans 0-200 MiB: it overlaps image_a (16-144) and image_b (144-272).
    text = _edit(PL_TEXT, ('name = "boot"\noffset_mib = 0\nsize_mib = 16',
                           'name = "boot"\noffset_mib = 0\nsize_mib = 200'))
    with pytest.raises(BoardConfigError) as info:
        parse_board(text, "overlaps.toml")
    assert info.value.problems == ["flash.partitions[1]: 'image_a' overlaps partition [0] 'boot'",
                                   "flash.partitions[2]: 'image_b' overlaps partition [0] 'boot'"]


@pytest.mark.parametrize("nested", ["[" * 3000 + "]" * 3000, "{a=" * 3000 + "1" + "}" * 3000],
                         ids=["arrays", "inline-tables"])
def test_deeply_nested_toml_is_a_board_config_error(nested: str) -> None:
    """tomllib recurses once per nesting level: its RecursionError must not escape."""
    escaped = None
    try:
        parse_board(f"[board]\nname = {nested}\n", "deep.toml")
    except BoardConfigError as exc:
        assert "not valid TOML" in str(exc)
    except RecursionError:
        # Noted, not re-raised: formatting a 3000-frame traceback takes a minute under qemu.
        escaped = "RecursionError"
    assert escaped is None, f"{escaped} escaped parse_board"


# ------------------------------------------------------------------ properties

@given(st.text())
def test_arbitrary_text_is_a_board_or_a_board_config_error(text: str) -> None:
    try:
        board = parse_board(text, "fuzz.toml")
    except BoardConfigError as exc:
        assert exc.problems and exc.source == "fuzz.toml"
    else:
        assert isinstance(board, Board)


@given(st.data())
def test_edited_board_text_is_a_board_or_a_board_config_error(data: st.DataObject) -> None:
    text = PL_TEXT
    for _ in range(data.draw(st.integers(1, 3))):
        start = data.draw(st.integers(0, len(text)))
        end = data.draw(st.integers(start, min(len(text), start + 40)))
        text = text[:start] + data.draw(st.text(max_size=12)) + text[end:]
    try:
        parse_board(text, "edited.toml")
    except BoardConfigError as exc:
        assert exc.problems


@pytest.mark.parametrize("name", SHIPPED)
def test_toml_writer_round_trips_the_shipped_boards(name: str) -> None:
    """The writer the property tests rely on: same table, same board."""
    text = to_toml(TABLES[name])
    assert tomllib.loads(text) == TABLES[name]
    assert parse_board(text) == load_board(BOARD_DIR / f"{name}.toml")


@pytest.mark.parametrize("keys, where", PL_LEAVES, ids=[w for _, w in PL_LEAVES])
def test_deleting_any_leaf_names_its_path_unless_it_has_a_default(keys: Keys, where: str) -> None:
    field, _ = _field(keys)
    text = to_toml(_delete(TABLES["pl-terminal"], keys))
    if field.default is dataclasses.MISSING:
        with pytest.raises(BoardConfigError) as info:
            parse_board(text, "deleted.toml")
        assert info.value.problems == [f"{where}: missing field"]
    else:
        node: Any = parse_board(text, "deleted.toml")
        for key in keys[:-1]:
            node = getattr(node, key) if isinstance(key, str) and hasattr(node, key) else node[key]
        assert getattr(node, str(keys[-1])) == field.default


_TABLES = ["board", "cpu", "ram", "flash", "flash.partitions", "flash.partitions[2]", "links",
           "links.hplc", "plc", "wan", "ledger"]


@pytest.mark.parametrize("where", _TABLES)
def test_replacing_a_table_with_a_scalar_names_its_path(where: str) -> None:
    keys: list[str | int] = []
    for part in where.split("."):
        name, _, index = part.partition("[")
        keys += [name, int(index.rstrip("]"))] if index else [name]
    text = to_toml(_replace(TABLES["pl-terminal"], tuple(keys), 7))
    with pytest.raises(BoardConfigError) as info:
        parse_board(text, "scalar.toml")
    expected = {"flash.partitions": "must be an array of tables", "links": "must be a table"}
    assert info.value.problems == [f"{where}: {expected.get(where, 'must be a table, got int')}"]


# A value of each TOML type, and which field types accept it (int for float is widened).
_OTHER = {
    "str": (st.text(max_size=10), {str}),
    "int": (st.integers(-(2**63), 2**63 - 1), {int, float}),
    "float": (st.floats(), {float}),
    "bool": (st.booleans(), set()),
    "date": (st.dates(), set()),
    "array": (st.lists(st.integers(-3, 3), max_size=3), set()),
    "table": (st.dictionaries(st.sampled_from(["a", "b c"]), st.integers(0, 9), max_size=2),
              set()),
}


@given(st.data())
def test_replacing_any_leaf_with_another_type_names_its_path(data: st.DataObject) -> None:
    board, keys, where = data.draw(st.sampled_from(ALL_LEAVES))
    _, hint = _field(keys)
    kind = data.draw(st.sampled_from([k for k, (_, ok) in _OTHER.items() if hint not in ok]))
    value = data.draw(_OTHER[kind][0])
    table = _replace(TABLES[board], keys, value)
    text = to_toml(table)
    if not (isinstance(value, float) and math.isnan(value)):  # nan != nan
        assert tomllib.loads(text) == table
    with pytest.raises(BoardConfigError) as info:
        parse_board(text, "replaced.toml")
    assert [p for p in info.value.problems if p.startswith(f"{where}: ")], info.value.problems


# ------------------------------------------------------------------ boards are data

SOURCE_DIRS = ("agent", "hal", "emulator", "tools")
NAME_LITERALS = ("pl-terminal", "qemu-armhf")  # "host" is also an ordinary word (the host tier)
_BOARD_VALUE = re.compile(r"(^|[._])board$", re.IGNORECASE)
_SHELL_TEST = re.compile(
    r"(\[\[?\s|==|!=|\btest\s|\bcase\b).*\b(pl-terminal|qemu-armhf)\b"
    r"|^\s*[\"']?(pl-terminal|qemu-armhf)[\"']?\s*(\|[^)]*)?\)")


def _is_board_name(node: ast.AST) -> bool:
    """``board.name``, ``self.board.name``, ``cfg.board.name`` ..."""
    return (isinstance(node, ast.Attribute) and node.attr == "name"
            and bool(_BOARD_VALUE.search(ast.unparse(node.value))))


def _has_name_literal(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and n.value in NAME_LITERALS for n in ast.walk(node))


def python_name_tests(source: str) -> list[int]:
    """Lines that branch on a board's name: compare it, match it, key a table or call on it."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            hit = any(_is_board_name(o) or _has_name_literal(o)
                      for o in (node.left, *node.comparators))
        elif isinstance(node, ast.Match):
            hit = _is_board_name(node.subject) or any(_has_name_literal(c.pattern)
                                                      for c in node.cases)
        elif isinstance(node, ast.Subscript):
            hit = _is_board_name(node.slice)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            on_name = _is_board_name(node.func.value)  # board.name.startswith(...)
            lookup = node.func.attr == "get" and any(_is_board_name(a) for a in node.args)
            hit = on_name or lookup
        else:
            continue
        if hit:
            hits.append(node.lineno)
    return sorted(hits)


def shell_name_tests(text: str) -> list[int]:
    """Lines of a script that test a board name (``[ "$B" = qemu-armhf ]``, ``case`` arms)."""
    return [i for i, line in enumerate(text.splitlines(), 1)
            if not line.lstrip().startswith("#") and _SHELL_TEST.search(line)]


@pytest.mark.parametrize("snippet", [
    'if board.name == "pl-terminal":\n    pass',
    "if self.board.name != other:\n    pass",
    'fast = cfg.board.name in ("host", "qemu-armhf")',
    "match board.name:\n    case _:\n        pass",
    'match tag:\n    case "qemu-armhf":\n        pass',
    "limit = LIMITS[board.name]",
    'emulated = board.name.startswith("qemu")',
    "limit = LIMITS.get(the_board.name, 0)",
    'if arch == "qemu-armhf":\n    pass',
])
def test_name_test_finder_flags_a_board_name_test(snippet: str) -> None:
    assert python_name_tests(snippet) == [1]


@pytest.mark.parametrize("snippet", [
    'print(f"{board.source}: ok: {board.name}")',
    'ledger = [p for p in board.flash.partitions if p.name == "ledger"]',
    'board = load_board(board_path("pl-terminal"))',
    'parser.add_argument("--board", default="qemu-armhf", help="(pl-terminal, ...)")',
    'same = BOARD_DIR.name == "board_configs"',
])
def test_name_test_finder_passes_reading_or_choosing_a_board(snippet: str) -> None:
    assert python_name_tests(snippet) == []


@pytest.mark.parametrize("script, hits", [
    ('if [ "$BOARD" = "qemu-armhf" ]; then\n  x\nfi', [1]),
    ('[[ $b == pl-terminal ]] && x', [1]),
    ('case "$board" in\n  pl-terminal|host) x ;;\nesac', [2]),
    ("python3 -m agent --board qemu-armhf --check\n# on pl-terminal only\nmake test-arm", []),
])
def test_shell_name_test_finder_flags_only_tests(script: str, hits: list[int]) -> None:
    assert shell_name_tests(script) == hits


def test_no_code_outside_board_configs_tests_a_board_name() -> None:
    offenders = []
    for top in SOURCE_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # a binary
            if path.suffix == ".py":
                lines = python_name_tests(text)
            elif path.suffix == ".sh" or text.startswith("#!"):
                lines = shell_name_tests(text)
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{n}" for n in lines]
    assert offenders == [], "boards are data: read the board's numbers, not its name"
