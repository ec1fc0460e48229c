"""The ``edgekey`` command: a tree of subcommands, each with its own ``-h``.

Handlers return 0 or a non-zero status and print errors as one clear line
(Zephyr's shell habit); nothing here is needed on the terminal itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from hal.blockdev import FlashError
from hal.board import BoardConfigError
from hal.link import LinkError
from hal.recordlog import LogError

Handler = Callable[[argparse.Namespace], int]


def _emit(result: dict, rows: list[tuple[str, str]], title: str, out: str) -> int:
    """A benchmark's JSON on disk and its table on the terminal, titled with the machine."""
    from tools.report import table, write_json

    path = write_json(result, out)
    machine = result.get("machine")
    if machine:
        title += f" ({machine['arch']}, python {machine['python']})"
    print(table(rows, title))
    print(f"\nJSON: {path}")
    return 0


def _board_check(args: argparse.Namespace) -> int:
    from agent.__main__ import main as agent_main

    status = 0
    for name in args.boards:
        status = max(status, agent_main(["--board", name, "--check"]))
    return status


def _bench_hal(args: argparse.Namespace) -> int:
    from tools import bench_hal

    result = bench_hal.run(size_mib=args.size_mib, record_bytes=args.record_bytes,
                           batch=args.batch, durable=args.durable, workdir=args.workdir,
                           board=args.board, frames=args.frames)
    return _emit(result, bench_hal.rows(result), "edgekey bench hal", args.out)


def _bench_placement(args: argparse.Namespace) -> int:
    from tools import bench_placement

    sizes = [int(float(x)) for x in args.sizes.split(",")]
    methods = args.methods.split(",")
    unknown = set(methods) - set(bench_placement.METHODS)
    if unknown:
        print(f"edgekey: unknown method(s) {', '.join(sorted(unknown))}; "
              f"known: {', '.join(bench_placement.METHODS)}", file=sys.stderr)
        return 2
    results = bench_placement.run(sizes, methods, args.seed, args.limit_s)
    return _emit({"cap": bench_placement.CAP, "margin": bench_placement.MARGIN,
                  "seed": args.seed, "limit_s": args.limit_s, "runs": results},
                 bench_placement.rows(results), "edgekey bench placement", args.out)


def _bench_plan(args: argparse.Namespace) -> int:
    from tools import bench_plan

    try:
        sizes = [int(float(x)) for x in args.sizes.split(",")]
        workers = [int(x) for x in args.workers.split(",")]
    except ValueError:
        print(f"edgekey: --sizes and --workers take comma-separated whole numbers, got "
              f"{args.sizes!r} and {args.workers!r}", file=sys.stderr)
        return 2
    if min(sizes) < 1 or min(workers) < 1:
        print("edgekey: sizes and worker counts must be at least 1", file=sys.stderr)
        return 2
    result = bench_plan.run(sizes, workers, seed=args.seed, limit_s=args.limit_s)
    return _emit(result, bench_plan.rows(result), "edgekey bench plan", args.out)


def _bench_balance(args: argparse.Namespace) -> int:
    from tools import bench_balance

    argv = ["--seeds", str(args.seeds), "--out", args.out, "--png", args.png]
    if args.layouts:
        argv += ["--layouts", args.layouts]
    return bench_balance.main(argv)


def _bench_rehome(args: argparse.Namespace) -> int:
    from tools import bench_rehome

    result = bench_rehome.run(ops=args.ops, seed=args.seed, balance_seeds=args.balance_seeds)
    return _emit(result, bench_rehome.rows(result), "edgekey bench rehome", args.out)


def _bench_routing(args: argparse.Namespace) -> int:
    from tools import bench_routing

    sizes = tuple(int(float(x)) for x in args.sizes.split(","))
    methods = tuple(args.methods.split(","))
    unknown = set(methods) - set(bench_routing.METHODS)
    if unknown or min(sizes) < 2:
        print(f"edgekey: unknown method(s) {', '.join(sorted(unknown))}; known: "
              f"{', '.join(bench_routing.METHODS)}" if unknown else
              "edgekey: --sizes: every mesh needs at least 2 terminals", file=sys.stderr)
        return 2
    result = bench_routing.run(sizes=sizes, methods=methods, routes=args.routes,
                               broadcasts=args.broadcasts, budget_s=args.budget_s,
                               arrivals=args.arrivals, probes=args.probes, seed=args.seed,
                               progress=not args.no_progress)
    return _emit(result, bench_routing.rows(result), "edgekey bench routing", args.out)


def _bench_ledger(args: argparse.Namespace) -> int:
    from tools import bench_ledger

    result = bench_ledger.run(meters=args.meters, rotations=args.rotations,
                              partition_mib=args.partition_mib, per_block=args.txs_per_block,
                              board=args.board, workdir=args.workdir, scans=args.scans,
                              seals=args.seals, seed=args.seed, quiet=args.no_progress)
    return _emit(result, bench_ledger.rows(result), "edgekey bench ledger", args.out)


def _bench_agent(args: argparse.Namespace) -> int:
    from tools import bench_agent

    def floats(text: str) -> tuple[float, ...]:
        return tuple(float(x) for x in text.split(","))

    result = bench_agent.run(meters=args.meters, latency_meters=args.latency_meters,
                             offered_per_s=args.offered, rates=floats(args.rates),
                             seconds=args.seconds,
                             boot_sizes=tuple(int(x) for x in floats(args.boot_sizes)),
                             arm=args.arm, channel_rates=floats(args.channel_rates),
                             seed=args.seed, workdir=args.workdir)
    return _emit(result, bench_agent.rows(result), "edgekey bench agent", args.out)


def _bench_board(args: argparse.Namespace) -> int:
    from tools import bench_board

    result = bench_board.run(cold=args.cold, meters=args.meters, rotations_n=args.rotations,
                             rate=args.rate, seed=args.seed,
                             out_png=str(Path(args.out).with_suffix(".png")))
    return _emit(result, bench_board.rows(result), "edgekey bench board", args.out)


def _bench_fleet(args: argparse.Namespace) -> int:
    from tools import bench_fleet

    result = bench_fleet.run(terminals=args.terminals, meters=args.meters,
                             etcd_members=args.etcd_members,
                             rates=tuple(float(x) for x in args.rates.split(",")),
                             step=args.step, max_rate=args.max_rate, seconds=args.seconds,
                             drain_s=args.drain, catchup_blocks=args.catchup_blocks,
                             catchup_txs=args.catchup_txs, seed=args.seed, work=args.work,
                             log_level=args.log_level, progress=not args.no_progress)
    return _emit(result, bench_fleet.rows(result), "edgekey bench fleet", args.out)


def _bench_live_routing(args: argparse.Namespace) -> int:
    from tools import bench_live_routing as blr

    result = blr.run(methods=tuple(args.methods.split(",")),
                     wan_rates=tuple(float(x) for x in args.wan_rates.split(",")),
                     terminals=args.terminals, meters=args.meters, rate=args.rate,
                     seconds=args.seconds, seed=args.seed, buffer_packets=args.buffer_packets,
                     progress=not args.no_progress)
    png = blr.plot(result, Path(args.out).with_suffix(".png"))
    status = _emit(result, blr.rows(result), "edgekey bench live-routing", args.out)
    print(f"plot: {png}")
    return status


def _bench_faults(args: argparse.Namespace) -> int:
    from tools import bench_faults

    try:
        result = bench_faults.run(terminals=args.terminals, meters=args.meters, ops=args.ops,
                                  rotate_every=args.rotate_every,
                                  checkpoint_every=args.checkpoint_every,
                                  power_cuts=args.power_cuts, etcd_kills=not args.no_etcd_kills,
                                  seed=args.seed, directory=args.dir,
                                  progress=args.progress or sys.stderr.isatty())
    except ValueError as exc:
        print(f"edgekey: {exc}", file=sys.stderr)
        return 2
    _emit(result, bench_faults.rows(result), "edgekey bench faults", args.out)
    for why in result["failures"]:
        print(f"edgekey bench faults: FAILED: {why}", file=sys.stderr)
    if result["failures"] and result.get("dir"):
        print(f"edgekey bench faults: the fleet's logs are in {result['dir']}", file=sys.stderr)
    return 1 if result["failures"] else 0


def _paper(args: argparse.Namespace) -> int:
    from tools import paper

    return paper.run(args)


def _flash(args: argparse.Namespace) -> int:
    from tools import flash_tool

    return flash_tool.run(args)


def _demo(args: argparse.Namespace) -> int:
    from tools import demo

    return demo.run(args.out, board=args.board, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgekey",
        description="Distributed key management for smart meters on edge terminals: "
                    "desk tools for boards, flash images, benchmarks and the demo.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from tools import board_cmd

    board_cmd.add_parser(sub, _board_check)

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

    bb = bench.add_parser("balance", help="balance and distance of the planner beside "
                                          "k-means-constrained and KMeans + medoid, on uniform, "
                                          "clustered and real distribution grids")
    bb.add_argument("--seeds", type=int, default=10)
    bb.add_argument("--layouts", default="", help="comma-separated subset (default: all)")
    bb.add_argument("--out", default="bench/results/balance.json")
    bb.add_argument("--png", default="docs/placement-balance.png")
    bb.set_defaults(handler=_bench_balance)

    bp = bench.add_parser("plan", help="the whole `edgekey plan` command at scale: wall time, "
                                       "the planner's share, peak RSS, per worker count")
    bp.add_argument("--sizes", default="1e5,1e6,1e7", help="comma-separated meter counts")
    bp.add_argument("--workers", default="1,2", help="comma-separated --workers values")
    bp.add_argument("--seed", type=int, default=0)
    bp.add_argument("--limit-s", type=float, default=1800.0,
                    help="time limit of one run; larger sizes are skipped after a miss")
    bp.add_argument("--out", default="bench/results/plan.json")
    bp.set_defaults(handler=_bench_plan)

    rh = bench.add_parser("rehome", help="the terminal's placement work: plan the paper's "
                                         "setting, join/leave latency, balance under churn")
    rh.add_argument("--ops", type=int, default=400, help="leave+join pairs to time")
    rh.add_argument("--seed", type=int, default=0)
    rh.add_argument("--balance-seeds", type=int, default=5,
                    help="seeds of each churn scenario whose balance is set beside a fresh plan")
    rh.add_argument("--out", default="bench/results/rehome.json")
    rh.set_defaults(handler=_bench_rehome)

    ro = bench.add_parser("routing", help="routing time per method at 20/100/1000 terminals; "
                                          "simulated vs closed-form delay and loss (eq. 6-7)")
    ro.add_argument("--sizes", default="20,100,1000", help="comma-separated terminal counts")
    ro.add_argument("--methods", default="greedy,shortest,reliability,residual")
    ro.add_argument("--routes", type=int, default=200, help="routes to time per cell")
    ro.add_argument("--broadcasts", type=int, default=20, help="broadcasts to time per cell")
    ro.add_argument("--budget-s", type=float, default=10.0,
                    help="wall-time budget of one cell's routes, and of its broadcasts")
    ro.add_argument("--arrivals", type=int, default=200_000,
                    help="packets per simulated single-node case")
    ro.add_argument("--probes", type=int, default=4000, help="probe packets per simulated path")
    ro.add_argument("--seed", type=int, default=0)
    ro.add_argument("--no-progress", action="store_true", help="no progress bar")
    ro.add_argument("--out", default="bench/results/routing.json")
    ro.set_defaults(handler=_bench_routing)

    lg = bench.add_parser("ledger", help="the chain on a flash image: query by index vs the "
                                         "paper's tail scan, flash per op, boot RSS, validation "
                                         "rate, PoW cost")
    lg.add_argument("--meters", type=int, default=1_000_000, help="meters registered")
    lg.add_argument("--rotations", type=int, default=300_000,
                    help="rotations after registration (flash per op across snapshots)")
    lg.add_argument("--partition-mib", type=int, default=None,
                    help="ledger partition size (default: the board's)")
    lg.add_argument("--txs-per-block", type=int, default=1000)
    lg.add_argument("--board", default="pl-terminal")
    lg.add_argument("--workdir", default=None, help="folder for the flash image (default: tmp)")
    lg.add_argument("--scans", type=int, default=10, help="tail-scan queries to time")
    lg.add_argument("--seals", type=int, default=2000, help="PoW seals to time")
    lg.add_argument("--seed", type=int, default=7)
    lg.add_argument("--no-progress", action="store_true", help="no progress bar")
    lg.add_argument("--out", default="bench/results/ledger.json")
    lg.set_defaults(handler=_bench_ledger)

    ag = bench.add_parser("agent", help="the running agent: register latency over PLC "
                                        "channels, ops/s, console round trip, boot, RSS, CPU")
    ag.add_argument("--meters", type=int, default=300, help="meters for the ops/s runs")
    ag.add_argument("--latency-meters", type=int, default=100,
                    help="meters registering through each channel")
    ag.add_argument("--offered", type=float, default=20.0,
                    help="registrations per second offered through a channel (open loop)")
    ag.add_argument("--rates", default="50,100,200,400,800,1600",
                    help="rotations per second offered, one run each (open loop)")
    ag.add_argument("--seconds", type=float, default=4.0, help="length of each rate's run")
    ag.add_argument("--channel-rates", default="25,128", help="PLC channel rates, KByte/s")
    ag.add_argument("--boot-sizes", default="1e4,1e5,5e5,1e6", help="meters on the chain at boot")
    ag.add_argument("--arm", action="store_true",
                    help="run the agent under qemu-arm-static (Debian armhf python3)")
    ag.add_argument("--seed", type=int, default=1)
    ag.add_argument("--workdir", default=None, help="scratch folder (default: tmp)")
    ag.add_argument("--out", default="bench/results/agent.json")
    ag.set_defaults(handler=_bench_agent)

    bb = bench.add_parser("board", help="the QEMU board: image builds, boot to console, RSS, "
                                        "a rotation on host, qemu-user and the board, and a "
                                        "RAUC update with its rollback")
    bb.add_argument("--cold", action="store_true",
                    help="also build the root filesystems and board image in a fresh cache")
    bb.add_argument("--meters", type=int, default=4)
    bb.add_argument("--rotations", type=int, default=60, help="rotations offered per target")
    bb.add_argument("--rate", type=float, default=2.0, help="rotations per second (open loop)")
    bb.add_argument("--seed", type=int, default=1)
    bb.add_argument("--out", default="bench/results/board.json")
    bb.set_defaults(handler=_bench_board)

    blr = bench.add_parser("live-routing", help="one fleet and load per routing method and "
                                                "emulated WAN rate: link loads, eq. 8 and "
                                                "commit latency measured from traffic")
    blr.add_argument("--methods", default="greedy,shortest",
                     help="comma-separated: greedy, shortest, reliability, residual")
    blr.add_argument("--wan-rates", default="25", metavar="MBIT,...",
                     help="emulated WAN link rates to run each method at (the paper's is 25)")
    blr.add_argument("--buffer-packets", type=int, default=None,
                     help="link buffer in 360-byte packets (default: the board's)")
    blr.add_argument("--terminals", type=int, default=13)
    blr.add_argument("--meters", type=int, default=300)
    blr.add_argument("--rate", type=float, default=100.0,
                     help="key rotations per second offered (open loop)")
    blr.add_argument("--seconds", type=float, default=20.0)
    blr.add_argument("--seed", type=int, default=1)
    blr.add_argument("--no-progress", action="store_true")
    blr.add_argument("--out", default="bench/results/live-routing.json")
    blr.set_defaults(handler=_bench_live_routing)
    bf = bench.add_parser("fleet", help="a fleet on etcd: ops/s, commit latency beside the "
                                        "paper's Table 1, CPU and bytes per op, catch-up")
    bf.add_argument("--terminals", type=int, default=13)
    bf.add_argument("--meters", type=int, default=300)
    bf.add_argument("--etcd-members", type=int, choices=(1, 3, 5), default=3,
                    help="etcd voting members, hosted by the first terminals")
    bf.add_argument("--rates", default="50,100,150,200",
                    help="rotations per second offered, one run each (open loop)")
    bf.add_argument("--step", type=float, default=100.0,
                    help="past the last rate, go up by this until the fleet saturates")
    bf.add_argument("--max-rate", type=float, default=1000.0, help="highest rate to offer")
    bf.add_argument("--seconds", type=float, default=20.0, help="length of each rate's run")
    bf.add_argument("--drain", type=float, default=10.0,
                    help="seconds to wait for the answers after a run")
    bf.add_argument("--catchup-blocks", type=int, default=10_000,
                    help="blocks a stopped terminal misses and catches up on (0: skip)")
    bf.add_argument("--catchup-txs", type=int, default=1, help="transactions per such block")
    bf.add_argument("--seed", type=int, default=1)
    bf.add_argument("--work", default=None,
                    help="an empty folder for the fleet, kept afterwards (default: tmp, removed)")
    bf.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                    help="the agents' log level")
    bf.add_argument("--no-progress", action="store_true", help="no progress bars")
    bf.add_argument("--out", default="bench/results/fleet.json")
    bf.set_defaults(handler=_bench_fleet)

    from tools.argtypes import nonneg_int, positive_float, positive_int

    bx = bench.add_parser("faults", help="a fleet of emulated meters under power cuts, etcd "
                                         "member kills and a catch-up by snapshot: no "
                                         "acknowledged operation lost, one chain")
    bx.add_argument("--terminals", type=positive_int, default=13)
    bx.add_argument("--meters", type=positive_int, default=300)
    bx.add_argument("--ops", type=positive_int, default=10_000,
                    help="key operations (registers and rotations) to see acknowledged")
    bx.add_argument("--rotate-every", type=positive_float, default=3.0,
                    help="seconds between a meter's rotations (300 meters: 100 ops/s)")
    bx.add_argument("--checkpoint-every", type=positive_int, default=200, metavar="N",
                    help="blocks between checkpoints: etcd keeps the blocks from the one "
                         "before the newest")
    bx.add_argument("--power-cuts", type=nonneg_int, default=3,
                    help="rounds of power cuts of a random minority")
    bx.add_argument("--no-etcd-kills", action="store_true",
                    help="leave out the etcd leader's and a follower's kill")
    bx.add_argument("--seed", type=int, default=1, help="the fault schedule's and the fleet's")
    bx.add_argument("--dir", default=None,
                    help="the fleet's folder, kept afterwards (default: tmp, removed unless a "
                         "check fails)")
    bx.add_argument("--progress", action="store_true",
                    help="a progress bar also when stderr is not a terminal")
    bx.add_argument("--out", default="bench/results/faults.json")
    bx.set_defaults(handler=_bench_faults)

    from tools import flash_tool

    flash_tool.add_parser(sub, _flash)

    from tools import image_build

    image_build.add_parser(sub)

    from tools import fleet, provision_cmd, station

    provision_cmd.add_parser(sub)
    fleet.add_parser(sub)
    station.add_parser(sub)

    from tools import console_client

    console_client.add_parser(sub)

    from tools import plan_cmd

    plan_cmd.add_parser(sub)

    from tools import paper

    paper.add_parser(sub, _paper)

    demo = sub.add_parser("demo", help="one terminal at work (flash image, power cut, meter "
                                       "link, key lifecycle, placement), then 13 terminals "
                                       "on etcd with 300 meters and the master station")
    demo.add_argument("--board", default="host")
    demo.add_argument("--quick", action="store_true",
                      help="5 terminals and 40 meters for the fleet on etcd")
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
