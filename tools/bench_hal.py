"""``edgekey bench hal``: the HAL's figures on a real flash image file.

Fills a ledger partition (1 GiB by default) of 256-byte records through the
record log on a sparse image file, then measures the recovery scan a
terminal runs at boot (warm and with the file's page cache dropped), random
reads by record id, durable one-record appends (one fdatasync each), and
the DL/T 698.45 frame codec. Writes JSON and prints a table.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hal.blockdev import FileBlockDevice
from hal.board import board_path, load_board
from hal.recordlog import PartitionFullError, RecordLog, record_size
from tools.report import peak_rss_mib

MIB = 1024 * 1024


def _drop_cache(path: Path) -> bool:
    """Ask the kernel to forget the image's cached pages, so the scan reads the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def _fill(log: RecordLog, record_bytes: int, batch: int, total_bytes: int) -> dict[str, Any]:
    """Append batches until the partition is full; the group-commit throughput."""
    rec = bytearray(os.urandom(record_bytes))
    n = 0
    t0 = time.perf_counter()
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="fill ledger",
              leave=False) as bar:
        while True:
            payloads = []
            for i in range(n, n + batch):
                rec[:8] = i.to_bytes(8, "little")
                payloads.append(bytes(rec))
            try:
                log.append_many(payloads)
            except PartitionFullError:
                break
            n += batch
            bar.update(batch * record_size(record_bytes))
        while True:  # top up the last segments one record at a time
            try:
                log.append(bytes(rec))
            except PartitionFullError:
                break
            n += 1
    dt = time.perf_counter() - t0
    return {"records": n, "seconds": dt, "records_per_s": n / dt,
            "payload_mb_per_s": n * record_bytes / dt / 1e6,
            "flash_mb_per_s": n * record_size(record_bytes) / dt / 1e6,
            "batch_records": batch, "syncs": log.device.counters().syncs}


def _durable_appends(dev: FileBlockDevice, record_bytes: int, count: int) -> dict[str, Any]:
    log = RecordLog(dev)
    log.erase_dirty()
    lat = []
    payload = os.urandom(record_bytes)
    for _ in tqdm(range(count), desc="durable appends", leave=False):
        t = time.perf_counter()
        log.append(payload)
        lat.append(time.perf_counter() - t)
    return {"records": count, "records_per_s": count / sum(lat),
            "p50_ms": statistics.median(lat) * 1e3,
            "p99_ms": sorted(lat)[int(0.99 * (count - 1))] * 1e3}


def _random_reads(log: RecordLog, count: int, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    ids = [rng.randrange(log.first_seq, log.next_seq) for _ in range(count)]
    lat = []
    for seq in ids:
        t = time.perf_counter()
        log.read(seq)
        lat.append(time.perf_counter() - t)
    lat.sort()
    return {"reads": count, "p50_us": lat[count // 2] * 1e6,
            "p99_us": lat[int(0.99 * (count - 1))] * 1e6}


def run(size_mib: int = 1024, record_bytes: int = 256, batch: int = 256,
        durable: int = 2000, workdir: str | None = None, board: str = "pl-terminal",
        frames: int = 20000) -> dict[str, Any]:
    erase_block = load_board(board_path(board)).flash.erase_block_bytes
    out: dict[str, Any] = {
        "machine": {"arch": platform.machine(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "params": {"partition_mib": size_mib, "record_bytes": record_bytes,
                   "erase_block_bytes": erase_block, "board": board, "batch": batch},
    }
    with tempfile.TemporaryDirectory(dir=workdir, prefix="edgekey-bench-") as tmp:
        img = Path(tmp) / "ledger.img"
        with FileBlockDevice.create_image(img, size_mib * MIB, erase_block) as dev:
            log = RecordLog(dev)
            t0 = time.perf_counter()
            log.erase_dirty()
            out["format"] = {"seconds": time.perf_counter() - t0,
                             "segments": log.segment_count}
            out["append_group_commit"] = _fill(log, record_bytes, batch, size_mib * MIB)
            st = log.stats()
            out["partition"] = {"records": st.records, "used_segments": st.used_segments,
                                "index_mib": st.index_bytes / MIB,
                                "fill_ratio": st.records * record_size(record_bytes)
                                / (size_mib * MIB)}
            del log
        for label, cold in (("recovery_scan_warm", False), ("recovery_scan_cold", True)):
            dropped = _drop_cache(img) if cold else False
            with FileBlockDevice(img, erase_block) as dev:
                t0 = time.perf_counter()
                log = RecordLog(dev)
                dt = time.perf_counter() - t0
                out[label] = {"seconds": dt, "records": len(log),
                              "records_per_s": len(log) / dt,
                              "mb_per_s": size_mib * MIB / dt / 1e6,
                              "page_cache_dropped": dropped}
                if not cold:
                    out["random_read"] = _random_reads(log, 20000)
        img.unlink()
        small = Path(tmp) / "durable.img"
        with FileBlockDevice.create_image(small, 64 * MIB, erase_block) as dev:
            out["append_durable"] = _durable_appends(dev, record_bytes, durable)
    from tools.bench_frames import measure_frame_codec

    out["frame_codec"] = measure_frame_codec(frames=frames, apdu_bytes=360)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The printed table: (figure, value)."""
    a, w, c = r["append_group_commit"], r["recovery_scan_warm"], r["recovery_scan_cold"]
    d, rr, fc = r["append_durable"], r["random_read"], r["frame_codec"]
    p = r["params"]
    return [
        ("partition", f"{p['partition_mib']} MiB, {p['record_bytes']}-byte records, "
                      f"{p['erase_block_bytes'] // 1024} KiB erase blocks"),
        ("format (erase all segments)", f"{r['format']['seconds']:.2f} s"),
        ("records to fill", f"{a['records']:,} ({r['partition']['fill_ratio']:.1%} of flash)"),
        ("record-id index in RAM", f"{r['partition']['index_mib']:.1f} MiB"),
        (f"append, group commit ({p['batch']}/sync)",
         f"{a['records_per_s']:,.0f} rec/s, {a['payload_mb_per_s']:.1f} MB/s payload, "
         f"{a['flash_mb_per_s']:.1f} MB/s flash"),
        ("append, durable (1 sync each)",
         f"{d['records_per_s']:,.0f} rec/s (p50 {d['p50_ms']:.2f} ms, p99 {d['p99_ms']:.2f} ms)"),
        ("recovery scan, warm cache",
         f"{w['seconds']:.2f} s ({w['records_per_s']:,.0f} rec/s, {w['mb_per_s']:.0f} MB/s)"),
        ("recovery scan, cache dropped" + ("" if c["page_cache_dropped"] else " (not dropped)"),
         f"{c['seconds']:.2f} s ({c['records_per_s']:,.0f} rec/s, {c['mb_per_s']:.0f} MB/s)"),
        ("read by record id", f"p50 {rr['p50_us']:.1f} us, p99 {rr['p99_us']:.1f} us"),
        (f"frame encode ({fc.get('apdu_bytes', 360)}-byte APDU)",
         f"{fc['encode_frames_per_s']:,.0f} frames/s, {fc['encode_mb_per_s']:.1f} MB/s"),
        ("frame decode", f"{fc['decode_frames_per_s']:,.0f} frames/s, "
                         f"{fc['decode_mb_per_s']:.1f} MB/s"),
        ("peak RSS of the whole bench process", f"{r['peak_rss_mib']:.0f} MiB"),
    ]
