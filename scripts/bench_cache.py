"""Token-cache build throughput (adapters/s) by worker processes × torch threads per process.

python scripts/bench_cache.py [--collection digits] [--root data] [--workers 1 2] [--threads 2 1]
    [--device cuda] [--out bench_results/cache.json]

Each setting builds a fresh cache in a temporary folder: hash every adapter, read and
canonicalize it, write its entry. The process pool is forced even below `PARALLEL_MIN`
(`parallel_min=0`), and its start-up (spawned workers import torch) is part of the time, as in a
real build. Threads are set with torch.set_num_threads here and OMP_NUM_THREADS in the workers.
The adapter files are read once first, so every setting reads from the page cache.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works without `pip install -e .`

from w2t.data.cache import CacheOptions, TokenCache, content_hash
from w2t.data.collection import read_metadata
from w2t.zoo import disk_usage, ensure_collection


def build_seconds(items: list, workers: int, threads: int, device: str | None) -> float:
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the spawned workers when they import torch
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cache = TokenCache(tmp, CacheOptions(device=device))
        start = time.perf_counter()
        report = cache.build(items, workers=workers, parallel_min=0)
        seconds = time.perf_counter() - start
    assert report.built == len(items) and not report.failed, report.failed[:3]
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collection", default="digits", choices=["digits", "digits_tiny"])
    ap.add_argument("--root", default="data", help="the collection is (or is built) at ROOT/COLLECTION")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads(), 1],
                    help="torch threads per process (default: torch's default, then 1)")
    ap.add_argument("--device", default=None, help="canonicalize on this device (e.g. cuda); default: CPU")
    ap.add_argument("--out", default="bench_results/cache.json")
    args = ap.parse_args()

    os.environ.setdefault("W2T_PROGRESS", "0")
    root = ensure_collection(args.collection, args.root)
    table = read_metadata(root)
    items = list(zip(table["adapter_id"].astype(str), table["abs_path"]))
    for _, path in items:  # warm the page cache
        content_hash(path)

    rows = []
    for threads in args.threads:
        for workers in args.workers:
            seconds = build_seconds(items, workers, threads, args.device)
            rows.append({"workers": workers, "threads": threads, "seconds": seconds,
                         "adapters_per_s": len(items) / seconds})
    for row in rows:
        row["speedup"] = rows[0]["seconds"] / row["seconds"]

    result = {"collection": args.collection, "adapters": len(items),
              "collection_mib": disk_usage(root) / 2**20, "device": args.device or "cpu",
              "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
              "machine": platform.machine(), "torch": torch.__version__, "rows": rows}
    print(f"token cache build: {args.collection}, {len(items)} adapters ({result['collection_mib']:.1f} MiB), "
          f"{os.cpu_count()} CPUs (load {result['load_avg_1min']:.1f}), device {result['device']}")
    print(f"{'workers':>7}  {'threads':>7}  {'seconds':>8}  {'adapters/s':>10}  {'speedup':>7}")
    for row in rows:
        print(f"{row['workers']:>7}  {row['threads']:>7}  {row['seconds']:>8.1f}  {row['adapters_per_s']:>10.1f}  "
              f"{row['speedup']:>6.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
