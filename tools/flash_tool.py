"""``edgekey flash``: make, format and inspect a terminal's flash image on the desk.

The image has the board's flash size (sparse, so a 1 GiB image costs only
what is written) and its partitions at the board's offsets, so the same
file can be handed to ``qemu-system-arm`` as the board's virtio disk.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from hal.blockdev import FileBlockDevice, open_partition
from hal.board import Board, board_path, load_board
from hal.recordlog import RecordLog


def add_parser(sub: argparse._SubParsersAction, handler: Callable) -> None:
    flash = sub.add_parser("flash", help="flash images: create, format, info; RAUC install, "
                                         "status, boot").add_subparsers(
        dest="flash_cmd", metavar="SUBCOMMAND", required=True)
    for name, text in (("create", "a new sparse image of the board's flash size"),
                       ("format", "erase a partition's free segments for a record log"),
                       ("info", "partitions, records, wear and recovery state of an image")):
        p = flash.add_parser(name, help=text)
        p.add_argument("image", type=Path)
        p.add_argument("--board", default="host", help="board name or file")
        if name == "format":
            p.add_argument("--partition", action="append", default=None,
                           help="partition to format (repeatable; default: ledger)")
        p.set_defaults(handler=handler)
    from tools import flash_update

    flash_update.add_parsers(flash, handler)


def _open(image: Path, board: Board) -> FileBlockDevice:
    return FileBlockDevice(image, board.flash.erase_block_bytes,
                           board.flash.size_bytes // board.flash.erase_block_bytes)


def create(image: Path, board: Board) -> None:
    image.parent.mkdir(parents=True, exist_ok=True)
    FileBlockDevice.create_image(image, board.flash.size_bytes,
                                 board.flash.erase_block_bytes).close()


def info_lines(image: Path, board: Board) -> list[str]:
    lines = [f"{image}: {board.flash.size_mib} MiB flash of board {board.name}, "
             f"{board.flash.erase_block_kib} KiB erase blocks"]
    with _open(image, board) as dev:
        for part in board.flash.partitions:
            log = RecordLog(open_partition(dev, board.flash, part.name))
            st, rep = log.stats(), log.report
            state = "torn tail recovered" if rep.torn_tail else "clean"
            if st.used_segments == 0:
                held = "no records"
            else:
                held = f"records {st.first_seq}..{st.next_seq - 1} ({st.records})"
            lines.append(
                f"  {part.name:<9} {part.offset_mib:>5}+{part.size_mib:<4} MiB  {held}; "
                f"segments used {st.used_segments}/{st.segments}, to erase {rep.dirty_segments}; "
                f"wear {st.erase_min}..{st.erase_max}; {state}")
    return lines


def run(args: argparse.Namespace) -> int:
    from tools import flash_update

    if args.flash_cmd in flash_update.COMMANDS:
        return flash_update.run(args)
    board = load_board(board_path(args.board))
    if args.flash_cmd == "create":
        create(args.image, board)
        print(f"created {args.image}: {board.flash.size_mib} MiB sparse image for {board.name}")
    elif args.flash_cmd == "format":
        with _open(args.image, board) as dev:
            for name in args.partition or ["ledger"]:
                n = RecordLog(open_partition(dev, board.flash, name)).erase_dirty()
                print(f"{name}: erased {n} segment(s)")
    else:
        print("\n".join(info_lines(args.image, board)))
    return 0
