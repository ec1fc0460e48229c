"""``python -m agent --board FILE --check``: validate a board file on the terminal.

Exit status 0 when the board file is valid, 1 with every problem listed on
stderr when it is not, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import sys

from hal.board import BoardConfigError, board_path, load_board


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent", description="edgekey terminal agent")
    parser.add_argument("--board", required=True,
                        help="board file, or a name under board_configs/ (pl-terminal, ...)")
    parser.add_argument("--check", action="store_true", required=True,
                        help="validate the board file and exit")
    args = parser.parse_args(argv)
    try:
        board = load_board(board_path(args.board))
    except BoardConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    parts = ", ".join(f"{p.name} {p.size_mib} MiB" for p in board.flash.partitions)
    print(f"{board.source}: ok: {board.name}: {board.cpu.arch} {board.cpu.cores}x"
          f"{board.cpu.mhz} MHz, RAM {board.ram.total_mib} MiB (agent {board.ram.agent_budget_mib}"
          f" MiB), flash {board.flash.size_mib} MiB [{parts}], links "
          f"{', '.join(sorted(board.links))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
