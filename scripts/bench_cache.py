"""Token-cache build throughput by worker processes × torch threads; --read: reading it back, shards vs Arrow.

Build: adapters/s by worker processes × torch threads per process. --read: how fast a built cache reads
back, from its safetensors shards and from the same collection exported to Arrow (datasets).

python scripts/bench_cache.py [--collection digits] [--root data] [--workers 1 2] [--threads 2 1]
    [--device cuda] [--out bench_results/cache.json]
python scripts/bench_cache.py --read [--repeats 5] [--cache-dir data/cache] [--out bench_results/cache_read.json]

Each setting builds a fresh cache in a temporary folder: hash every adapter, read and
canonicalize it, write its entry. The process pool is forced even below `PARALLEL_MIN`
(`parallel_min=0`), and its start-up (spawned workers import torch) is part of the time, as in a
real build. Threads are set with torch.set_num_threads here and OMP_NUM_THREADS in the workers.
The adapter files are read once first, so every setting reads from the page cache.
--read times, from the page cache (one untimed pass first), every adapter's cache entry read into
CanonicalModule tensors (`load_entry` per shard; `ExportedCollection.modules`, memory-mapped, opening
included), and a DataModule's `setup` on each (metadata, finding entries: hashing every adapter file
for the shards; reading them; the schema). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works without `pip install -e .`

from w2t.data.cache import CacheOptions, TokenCache, content_hash, load_entry
from w2t.data.collection import read_metadata
from w2t.data.datamodule import AdapterDataModule
from w2t.data.hf import ExportedCollection, export_collection
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


def timed(fn, repeats: int) -> list[float]:
    fn()  # untimed: the page cache holds every file afterwards
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def read_rows(root: Path, cache_dir: str, repeats: int, hf_dir: Path) -> tuple[list[dict], dict]:
    """Seconds to read every token entry, and a DataModule's setup, from safetensors shards and from Arrow."""
    kw = dict(cache_dir=cache_dir, group_column=None, role_column=None)
    dm = AdapterDataModule(root=str(root), **kw)
    dm.setup()  # builds what the cache lacks
    export_collection(dm, hf_dir)
    entries = dm.entries
    n = len(entries)

    def shards():
        return [load_entry(e) for e in entries]

    def arrow():
        hf = ExportedCollection(hf_dir, CacheOptions())
        return [hf.modules(i) for i in range(n)]

    a, b = shards(), arrow()  # the same tensors: dtype, shape and values
    assert all(torch.equal(x.U, y.U) and x.U.dtype == y.U.dtype and torch.equal(x.V, y.V) and torch.equal(x.S, y.S)
               and torch.equal(x.mask, y.mask) for ma, mb in zip(a, b) for x, y in zip(ma, mb, strict=True))
    cases = [("token entries", "safetensors shards", shards), ("token entries", "arrow (datasets)", arrow),
             ("datamodule setup", "safetensors shards", lambda: AdapterDataModule(root=str(root), **kw).setup()),
             ("datamodule setup", "arrow (datasets)", lambda: AdapterDataModule(path=str(hf_dir), **kw).setup())]
    rows = []
    for what, source, fn in cases:
        seconds = timed(fn, repeats)
        rows.append({"what": what, "source": source, "best_s": min(seconds), "median_s": statistics.median(seconds),
                     "adapters_per_s": n / min(seconds), "seconds": seconds})
    for row in rows:
        first = next(r for r in rows if r["what"] == row["what"])
        row["speedup"] = first["best_s"] / row["best_s"]
    entry_bytes = sum(Path(e).stat().st_size for e in entries)
    return rows, {"adapters": n, "shards_mib": entry_bytes / 2**20, "arrow_mib": disk_usage(hf_dir) / 2**20}


def main_read(args) -> None:
    root = ensure_collection(args.collection, args.root)
    cache_dir = args.cache_dir or str(Path(args.root) / "cache")
    with tempfile.TemporaryDirectory() as tmp:
        rows, sizes = read_rows(root, cache_dir, args.repeats, Path(tmp) / "hf")
    result = {"collection": args.collection, **sizes, "repeats": args.repeats, **machine(), "rows": rows}
    print(f"token cache read: {args.collection}, {sizes['adapters']} adapters; shards {sizes['shards_mib']:.1f} MiB, "
          f"arrow (tokens + factors) {sizes['arrow_mib']:.1f} MiB; {os.cpu_count()} CPUs (load "
          f"{result['load_avg_1min']:.1f}), best and median of {args.repeats}")
    print(f"{'what':<17}  {'source':<19}  {'best s':>7}  {'median s':>8}  {'adapters/s':>10}  {'speedup':>7}")
    for row in rows:
        print(f"{row['what']:<17}  {row['source']:<19}  {row['best_s']:>7.3f}  {row['median_s']:>8.3f}  "
              f"{row['adapters_per_s']:>10.1f}  {row['speedup']:>6.2f}x")
    write(result, args.out or "bench_results/cache_read.json")


def machine() -> dict:
    """What the figures depend on: cores, the load while measuring, the CPU and torch."""
    return {"cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "machine": platform.machine(),
            "torch": torch.__version__}


def write(result: dict, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collection", default="digits", choices=["digits", "digits_tiny"])
    ap.add_argument("--root", default="data", help="the collection is (or is built) at ROOT/COLLECTION")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads(), 1],
                    help="torch threads per process (default: torch's default, then 1)")
    ap.add_argument("--device", default=None, help="canonicalize on this device (e.g. cuda); default: CPU")
    ap.add_argument("--read", action="store_true", help="time reading a built cache: safetensors shards against Arrow")
    ap.add_argument("--repeats", type=int, default=5, help="--read: timed passes per case")
    ap.add_argument("--cache-dir", help="--read: the token cache (default: ROOT/cache, as paths.cache_dir)")
    ap.add_argument("--out", help="default: bench_results/cache.json, or cache_read.json with --read")
    args = ap.parse_args()

    os.environ.setdefault("W2T_PROGRESS", "0")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if args.read:
        return main_read(args)
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
              "collection_mib": disk_usage(root) / 2**20, "device": args.device or "cpu", **machine(), "rows": rows}
    print(f"token cache build: {args.collection}, {len(items)} adapters ({result['collection_mib']:.1f} MiB), "
          f"{os.cpu_count()} CPUs (load {result['load_avg_1min']:.1f}), device {result['device']}")
    print(f"{'workers':>7}  {'threads':>7}  {'seconds':>8}  {'adapters/s':>10}  {'speedup':>7}")
    for row in rows:
        print(f"{row['workers']:>7}  {row['threads']:>7}  {row['seconds']:>8.1f}  {row['adapters_per_s']:>10.1f}  "
              f"{row['speedup']:>6.2f}x")
    write(result, args.out or "bench_results/cache.json")


if __name__ == "__main__":
    main()
