"""``edgekey bench ledger``: the chain on a flash image at 10^6 meters.

Figures (one run, side by side, JSON + table):
- query latency p50/p99 by the index (O(1) flash read) against the paper's
  method, a scan back from the tail (section 2.2.1, step 2), on the same
  chain of ``meters`` registrations; their ratio;
- flash bytes per committed operation, amortised over a run of rotations
  long enough to take snapshots (compaction), and how many operations the
  ledger partition holds without compaction;
- boot (replay from the last snapshot) time and peak RSS of a fresh process
  holding the index for all meters;
- block validation rate (validate_block alone, and with the flash append)
  and the PoW seal cost at the paper's difficulty 8.

Every transaction is a real signed Ed25519 transaction in a block endorsed by
a majority of five terminals, validated by the same rules as in service.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.ledger.block import (
    PAPER_DIFFICULTY,
    Block,
    BlockHeader,
    endorse,
    genesis,
    seal,
    with_endorsements,
)
from agent.ledger.chain import Chain, open_chain, scan_newest_record
from agent.ledger.identity import TerminalIdentity
from agent.ledger.rules import propose_block
from agent.ledger.state import LedgerState, MeterEntry, MeterStatus
from agent.ledger.tx import Transaction, TxBuilder, rotation_proof_digest
from hal.blockdev import FileBlockDevice
from hal.board import board_path, load_board
from hal.recordlog import RecordLog
from tools.report import peak_rss_mib, quantile, rss_mib

MIB = 1 << 20
TERMINALS = 5
T0 = 1_700_000_000_000


def identities(n: int = TERMINALS) -> list[TerminalIdentity]:
    return [TerminalIdentity.from_seed(f"ecd-{i:02d}", (b"bench-ledger-%02d" % i).ljust(32, b"."))
            for i in range(n)]


def meter_id(n: int) -> bytes:
    return n.to_bytes(6, "big")  # a DL/T 698.45 6-byte server address


def fingerprint(n: int, version: int) -> bytes:
    return (n * 1_000_003 + version).to_bytes(32, "big")


class _Proposer:
    """Builds endorsed blocks on the chain's tip, clock in whole seconds."""

    def __init__(self, chain: Chain, ids: list[TerminalIdentity]):
        self.chain = chain
        self.ids = ids
        self.quorum = ids[:len(ids) // 2 + 1]
        self.clock = (chain.state.tip.timestamp_ms if chain.state.tip else T0)

    def block(self, txs: list[Transaction], proposer: int = 0) -> Block:
        self.clock += 1000
        block = propose_block(self.chain.state, self.ids[proposer], txs, timestamp_ms=self.clock)
        return with_endorsements(block, [endorse(i, block.header) for i in self.quorum])


def _percentiles(samples: list[float]) -> dict[str, float]:
    return {"n": len(samples), "p50_us": quantile(samples, 0.5) * 1e6,
            "p99_us": quantile(samples, 0.99) * 1e6,
            "mean_us": sum(samples) / len(samples) * 1e6}


def _progress(total: int, desc: str, quiet: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # the emulated terminal has no desk libraries
        tqdm = None
    if tqdm is None or quiet:
        class _Null:
            def update(self, n: int) -> None: ...
            def close(self) -> None: ...
        return _Null()
    return tqdm(total=total, desc=desc, unit="tx", mininterval=1.0)


def _register_all(chain: Chain, ids: list[TerminalIdentity], meters: int, per_block: int,
                  quiet: bool) -> dict[str, Any]:
    builders = [TxBuilder(i) for i in ids]
    prop = _Proposer(chain, ids)
    written0 = chain.log.device.counters().bytes_written
    t_check = t_total = 0.0
    bar = _progress(meters, "register", quiet)
    for start in range(0, meters, per_block):
        home = (start // per_block) % len(ids)
        txs = [builders[home].register(meter_id(n), key_version=1, fingerprint=fingerprint(n, 1),
                                       counter=1)
               for n in range(start, min(meters, start + per_block))]
        block = prop.block(txs, home)
        t0 = time.perf_counter()
        chain.check(block)
        t1 = time.perf_counter()
        chain.append(block)
        t2 = time.perf_counter()
        t_check += t1 - t0
        t_total += t2 - t1
        bar.update(len(txs))
    bar.close()
    blocks = -(-meters // per_block)
    return {"meters": meters, "blocks": blocks, "txs_per_block": per_block,
            "validate_only": {"blocks_per_s": blocks / t_check, "tx_per_s": meters / t_check},
            "validate_write_apply": {"blocks_per_s": blocks / t_total,
                                     "tx_per_s": meters / t_total},
            "flash_bytes_written": chain.log.device.counters().bytes_written - written0}


def _queries(chain: Chain, meters: int, samples: int, scans: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    picks = [rng.randrange(meters) for _ in range(samples)]
    entry_t, record_t = [], []
    for n in picks:
        t0 = time.perf_counter()
        e = chain.entry(meter_id(n))
        t1 = time.perf_counter()
        r = chain.newest_record(meter_id(n))
        t2 = time.perf_counter()
        assert e is not None and r is not None and r.tx.meter_id == meter_id(n)
        entry_t.append(t1 - t0)
        record_t.append(t2 - t1)
    scan_t = []
    for n in picks[:scans]:
        t0 = time.perf_counter()
        tx = scan_newest_record(chain.log, meter_id(n))
        scan_t.append(time.perf_counter() - t0)
        assert tx == chain.newest_record(meter_id(n)).tx
    index, scan = _percentiles(record_t), _percentiles(scan_t)
    return {"records_on_chain": len(chain.log), "entry_ram": _percentiles(entry_t),
            "index": index, "tail_scan": scan,
            "ratio_p50": scan["p50_us"] / index["p50_us"],
            "ratio_p99": scan["p99_us"] / index["p99_us"]}


def _rotations(chain: Chain, ids: list[TerminalIdentity], meters: int, ops: int, per_block: int,
               seed: int, quiet: bool) -> dict[str, Any]:
    """Rotate random meters, each at its home; count flash bytes across snapshots."""
    rng = random.Random(seed)
    builders = {i.terminal_id: TxBuilder(i) for i in ids}
    index = {i.terminal_id: k for k, i in enumerate(ids)}
    prop = _Proposer(chain, ids)
    dev = chain.log.device
    written0, snaps0 = dev.counters().bytes_written, chain.snapshots_written
    done = 0
    bar = _progress(ops, "rotate", quiet)
    t0 = time.perf_counter()
    while done < ops:
        home = ids[rng.randrange(len(ids))].terminal_id
        txs, seen = [], set()
        while len(txs) < min(per_block, ops - done):
            n = rng.randrange(meters)
            e = chain.entry(meter_id(n))
            if n in seen or e is None or e.home != home:
                continue
            seen.add(n)
            v = e.key_version + 1
            txs.append(builders[home].rotate(meter_id(n), key_version=v,
                                             fingerprint=fingerprint(n, v),
                                             proof=rotation_proof_digest(b"%d/%d" % (n, v)),
                                             counter=e.counter + 1))
        chain.append(prop.block(txs, index[home]))
        done += len(txs)
        bar.update(len(txs))
    bar.close()
    seconds = time.perf_counter() - t0
    written = dev.counters().bytes_written - written0
    stats = chain.log.stats()
    return {"ops": ops, "seconds": seconds, "ops_per_s": ops / seconds,
            "snapshots": chain.snapshots_written - snaps0,
            "flash_bytes_written": written, "flash_bytes_per_op": written / ops,
            "erase_max": stats.erase_max, "erase_mean": stats.erase_mean,
            "free_bytes_after": stats.payload_bytes_free}


def _pow_cost(seals: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    nonces = []
    for i in range(seals):
        h = seal(BlockHeader(1, bytes(32), T0 + i, bytes(32), 0, "ecd-00"), PAPER_DIFFICULTY)
        nonces.append(h.nonce)
    dt = time.perf_counter() - t0
    return {"difficulty": PAPER_DIFFICULTY, "seals": seals, "mean_ms": dt / seals * 1e3,
            "mean_nonces_tried": sum(nonces) / seals + 1}


def index_ram(meters: int) -> dict[str, Any]:
    """RSS growth of a meter table of ``meters`` packed entries (run first, on a fresh heap)."""
    state = LedgerState()
    ident = identities(1)[0]
    state.add_terminal(ident.terminal_id, ident.public_bytes(), 0)
    before = rss_mib()
    for n in range(meters):
        state.put_meter(meter_id(n), MeterEntry(MeterStatus.LIVE, 1, fingerprint(n, 1),
                                                ident.terminal_id, 1, 1, n % 1000, n + 1))
    grown = rss_mib() - before
    return {"meters": meters, "mib": grown, "bytes_per_meter": grown * MIB / meters}


def boot_probe(image: str, erase_block: int) -> dict[str, Any]:
    """Open the chain on ``image`` in this (fresh) process: boot time and peak RSS."""
    ids = identities()
    rss0 = peak_rss_mib()
    with FileBlockDevice(image, erase_block) as dev:
        t0 = time.perf_counter()
        chain = open_chain(dev, ids[0])
        dt = time.perf_counter() - t0
        r = chain.report
        return {"seconds": dt, "meters": chain.state.meter_count, "height": chain.height,
                "blocks_replayed": r.blocks_replayed, "snapshot_meters": r.snapshot_meters,
                "peak_rss_mib": peak_rss_mib(), "rss_before_open_mib": rss0}


def _boot_in_fresh_process(img: Path, erase_block: int) -> dict[str, Any]:
    """boot_probe in a child interpreter, so its peak RSS is the index's alone.

    qemu-user cannot exec a guest binary from the guest (no binfmt inside),
    so under emulation the probe runs in this process and its RSS is this
    process's peak: an upper bound, marked ``in_process``.
    """
    try:
        probe = subprocess.run(
            [sys.executable, "-m", "tools.bench_ledger", "--boot-probe", str(img),
             str(erase_block)], capture_output=True, text=True, check=False,
            cwd=Path(__file__).resolve().parent.parent)
    except OSError:
        return {**boot_probe(str(img), erase_block), "in_process": True}
    if probe.returncode != 0:
        raise RuntimeError(f"boot probe failed: {probe.stderr.strip()[-2000:]}")
    return {**json.loads(probe.stdout), "in_process": False}


def run(meters: int = 1_000_000, rotations: int = 1_000_000, partition_mib: int | None = None,
        per_block: int = 1000, board: str = "pl-terminal", workdir: str | None = None,
        query_samples: int = 10_000, scans: int = 10, seals: int = 2000, seed: int = 7,
        quiet: bool = False) -> dict[str, Any]:
    b = load_board(board_path(board))
    erase_block = b.flash.erase_block_bytes
    size = (partition_mib * MIB if partition_mib
            else b.flash.partition("ledger").size_bytes)
    out: dict[str, Any] = {
        "machine": {"arch": platform.machine(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "params": {"meters": meters, "rotations": rotations, "partition_mib": size / MIB,
                   "erase_block_bytes": erase_block, "txs_per_block": per_block,
                   "terminals": TERMINALS, "board": board, "seed": seed},
    }
    out["index_ram"] = index_ram(meters)
    ids = identities()
    with tempfile.TemporaryDirectory(dir=workdir, prefix="edgekey-ledger-") as tmp:
        img = Path(tmp) / "ledger.img"
        with FileBlockDevice.create_image(img, size, erase_block) as dev:
            log = RecordLog(dev)
            log.erase_dirty()
            chain = Chain(log, ids[0])
            chain.append(genesis(ids[0], [(i.terminal_id, i.public_bytes()) for i in ids],
                                 timestamp_ms=T0, endorsers=ids[:3]))
            out["register"] = _register_all(chain, ids, meters, per_block, quiet)
            reg = out["register"]
            reg["flash_bytes_per_op"] = reg["flash_bytes_written"] / meters
            reg["ops_fit_without_compaction"] = int(size / reg["flash_bytes_per_op"])
            out["query"] = _queries(chain, meters, query_samples, scans, seed)
            if rotations:
                out["rotate"] = _rotations(chain, ids, meters, rotations, per_block, seed, quiet)
            estimate = chain.snapshot_bytes()
            written0 = dev.counters().bytes_written
            t0 = time.perf_counter()
            freed = chain.snapshot()
            out["snapshot"] = {"seconds": time.perf_counter() - t0,
                               "flash_bytes": dev.counters().bytes_written - written0,
                               "estimate_bytes": estimate, "meters": chain.state.meter_count,
                               "segments_freed": freed}
            del chain, log
        out["boot"] = _boot_in_fresh_process(img, erase_block)
    out["pow"] = _pow_cost(seals)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    reg, q, boot, pw = r["register"], r["query"], r["boot"], r["pow"]
    out = [
        ("chain", f"{q['records_on_chain']:,} records, {reg['meters']:,} meters, "
                  f"{reg['blocks']:,} blocks of {reg['txs_per_block']} tx, "
                  f"{r['params']['terminals']} terminals"),
        ("query by index (flash read)", f"p50 {q['index']['p50_us']:.1f} us, "
                                        f"p99 {q['index']['p99_us']:.1f} us"),
        ("query entry (RAM only)", f"p50 {q['entry_ram']['p50_us']:.2f} us, "
                                   f"p99 {q['entry_ram']['p99_us']:.2f} us"),
        ("paper's tail scan", f"p50 {q['tail_scan']['p50_us'] / 1e6:.2f} s, "
                              f"p99 {q['tail_scan']['p99_us'] / 1e6:.2f} s "
                              f"({q['tail_scan']['n']} queries)"),
        ("ratio scan / index", f"{q['ratio_p50']:,.0f}x at p50, {q['ratio_p99']:,.0f}x at p99"),
        ("validate_block", f"{reg['validate_only']['blocks_per_s']:.2f} blocks/s, "
                           f"{reg['validate_only']['tx_per_s']:,.0f} tx/s"),
        ("validate + flash append + apply", f"{reg['validate_write_apply']['blocks_per_s']:.2f} "
                                            f"blocks/s, "
                                            f"{reg['validate_write_apply']['tx_per_s']:,.0f} tx/s"),
        ("flash per register (no compaction)", f"{reg['flash_bytes_per_op']:.0f} B; "
                                               f"{reg['ops_fit_without_compaction']:,} ops fill "
                                               f"the {r['params']['partition_mib']:.0f} MiB "
                                               f"partition"),
    ]
    if "rotate" in r:
        rot = r["rotate"]
        out.append(("flash per rotation, amortised", f"{rot['flash_bytes_per_op']:.0f} B over "
                    f"{rot['ops']:,} ops, {rot['snapshots']} snapshot(s), "
                    f"{rot['ops_per_s']:,.0f} ops/s"))
    snap = r["snapshot"]
    out += [
        ("snapshot of the live state", f"{snap['flash_bytes'] / MIB:.1f} MiB "
                                       f"({snap['flash_bytes'] / snap['meters']:.0f} B/meter) in "
                                       f"{snap['seconds']:.1f} s, {snap['segments_freed']} erase "
                                       f"blocks freed"),
        ("boot (fresh process)", f"{boot['seconds']:.1f} s, {boot['blocks_replayed']} blocks "
                                 f"replayed, {boot['snapshot_meters']:,} meters from snapshot"),
        ("meter table in RAM", f"{r['index_ram']['bytes_per_meter']:.0f} B/meter "
                               f"({r['index_ram']['mib']:.1f} MiB for "
                               f"{r['index_ram']['meters']:,})"),
        ("peak RSS holding the index", f"{boot['peak_rss_mib']:.0f} MiB for "
                                       f"{boot['meters']:,} meters"
                                       + (" (bench process, upper bound)" if boot["in_process"]
                                          else " (fresh process)")),
        ("PoW seal, difficulty 8", f"{pw['mean_ms']:.3f} ms mean "
                                   f"({pw['mean_nonces_tried']:.0f} nonces)"),
    ]
    return out


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--boot-probe":
        print(json.dumps(boot_probe(argv[1], int(argv[2]))))
        return 0
    print("usage: python -m tools.bench_ledger --boot-probe IMAGE ERASE_BLOCK "
          "(use `edgekey bench ledger`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
