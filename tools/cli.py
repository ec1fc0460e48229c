"""The ``edgekey`` command: a tree of subcommands, each with its own ``-h``.

Handlers return 0 or a non-zero status and print errors as one clear line
(Zephyr's shell habit); nothing here is needed on the terminal itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from hal.blockdev import FlashError
from hal.board import BoardConfigError
from hal.link import LinkError
from hal.recordlog import LogError

Handler = Callable[[argparse.Namespace], int]


def _board_check(args: argparse.Namespace) -> int:
    from agent.__main__ import main as agent_main

    status = 0
    for name in args.boards:
        status = max(status, agent_main(["--board", name, "--check"]))
    return status


def _bench_hal(args: argparse.Namespace) -> int:
    from tools import bench_hal
    from tools.report import table, write_json

    result = bench_hal.run(size_mib=args.size_mib, record_bytes=args.record_bytes,
                           batch=args.batch, durable=args.durable, workdir=args.workdir,
                           board=args.board, frames=args.frames)
    path = write_json(result, args.out)
    print(table(bench_hal.rows(result), f"edgekey bench hal ({result['machine']['arch']}, "
                                        f"python {result['machine']['python']})"))
    print(f"\nJSON: {path}")
    return 0


def _bench_placement(args: argparse.Namespace) -> int:
    from tools import bench_placement
    from tools.report import table, write_json

    sizes = [int(float(x)) for x in args.sizes.split(",")]
    methods = args.methods.split(",")
    unknown = set(methods) - set(bench_placement.METHODS)
    if unknown:
        print(f"edgekey: unknown method(s) {', '.join(sorted(unknown))}; "
              f"known: {', '.join(bench_placement.METHODS)}", file=sys.stderr)
        return 2
    results = bench_placement.run(sizes, methods, args.seed, args.limit_s)
    path = write_json({"cap": bench_placement.CAP, "margin": bench_placement.MARGIN,
                       "seed": args.seed, "limit_s": args.limit_s, "runs": results}, args.out)
    print(table(bench_placement.rows(results), "edgekey bench placement"))
    print(f"\nJSON: {path}")
    return 0


def _bench_rehome(args: argparse.Namespace) -> int:
    from tools import bench_rehome
    from tools.report import table, write_json

    result = bench_rehome.run(ops=args.ops, seed=args.seed)
    path = write_json(result, args.out)
    print(table(bench_rehome.rows(result), "edgekey bench rehome"))
    print(f"\nJSON: {path}")
    return 0


def _flash(args: argparse.Namespace) -> int:
    from tools import flash_tool

    return flash_tool.run(args)


def _demo(args: argparse.Namespace) -> int:
    from tools import demo

    return demo.run(args.out, board=args.board)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgekey",
        description="Distributed key management for smart meters on edge terminals: "
                    "desk tools for boards, flash images, benchmarks and the demo.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    board = sub.add_parser("board", help="board configs").add_subparsers(
        dest="board_cmd", metavar="SUBCOMMAND", required=True)
    check = board.add_parser("check", help="validate board files (name or path)")
    check.add_argument("boards", nargs="+", metavar="BOARD")
    check.set_defaults(handler=_board_check)

    bench = sub.add_parser("bench", help="benchmarks: JSON plus a printed table").add_subparsers(
        dest="bench_cmd", metavar="SUITE", required=True)
    hal = bench.add_parser("hal", help="record log on a flash image, recovery scan, frame codec")
    hal.add_argument("--size-mib", type=int, default=1024, help="ledger partition size")
    hal.add_argument("--record-bytes", type=int, default=256)
    hal.add_argument("--batch", type=int, default=256, help="records per group commit")
    hal.add_argument("--durable", type=int, default=2000, help="one-sync-each appends to time")
    hal.add_argument("--frames", type=int, default=20000, help="frames to encode and decode")
    hal.add_argument("--board", default="pl-terminal", help="board whose erase block to use")
    hal.add_argument("--workdir", default=None, help="where the image goes (default: $TMPDIR)")
    hal.add_argument("--out", default="bench/results/hal.json")
    hal.set_defaults(handler=_bench_hal)

    pl = bench.add_parser("placement", help="planning runtime and peak RSS at scale, ours "
                                            "vs scikit-learn KMeans and FasterPAM")
    pl.add_argument("--sizes", default="1e4,1e5,1e6,1e7", help="comma-separated meter counts")
    pl.add_argument("--methods", default="ours,sklearn-kmeans,fasterpam")
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--limit-s", type=float, default=900.0, help="time limit of one run")
    pl.add_argument("--out", default="bench/results/placement.json")
    pl.set_defaults(handler=_bench_placement)

    rh = bench.add_parser("rehome", help="the terminal's placement work: plan the paper's "
                                         "setting, join/leave latency")
    rh.add_argument("--ops", type=int, default=400, help="leave+join pairs to time")
    rh.add_argument("--seed", type=int, default=0)
    rh.add_argument("--out", default="bench/results/rehome.json")
    rh.set_defaults(handler=_bench_rehome)

    from tools import flash_tool

    flash_tool.add_parser(sub, _flash)

    from tools import plan_cmd

    plan_cmd.add_parser(sub)

    demo = sub.add_parser("demo", help="the HAL at work on one terminal's flash image and link")
    demo.add_argument("--board", default="host")
    demo.add_argument("--out", default="out/demo", help="folder for the flash image")
    demo.set_defaults(handler=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (BoardConfigError, FlashError, LogError, LinkError) as exc:
        print(f"edgekey: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
