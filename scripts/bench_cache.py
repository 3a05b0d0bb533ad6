"""Token-cache build throughput by worker processes × torch threads; --read: reading it back, by entry format.

Build: adapters/s by worker processes × torch threads per process. --read: how fast a built cache reads
back, from its Arrow entries, from the same tokens as safetensors entries (the format measured against
it), and from the collection exported as one Arrow folder (datasets).

python scripts/bench_cache.py [--collection digits] [--root data] [--workers 1 2] [--threads 2 1]
    [--device cuda] [--out bench_results/cache.json]
python scripts/bench_cache.py --read [--repeats 5] [--cache-dir data/cache] [--out bench_results/cache_read.json]

Each setting builds a fresh cache in a temporary folder: hash every adapter, read and
canonicalize it, write its entry. The process pool is forced even below `PARALLEL_MIN`
(`parallel_min=0`), and its start-up (spawned workers import torch) is part of the time, as in a
real build. Threads are set with torch.set_num_threads here and OMP_NUM_THREADS in the workers.
The adapter files are read once first, so every setting reads from the page cache.
--read times, from the page cache (one untimed pass first), every adapter's tokens read into
CanonicalModule tensors (`load_entry` per Arrow entry; one safetensors file per entry; the folder's
`ExportedCollection.modules`, memory-mapped, opening included), and a DataModule's `setup` on the cache
and the folder (metadata, finding entries: hashing every adapter file for the cache; reading them; the
schema). Prints a table and writes JSON.
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

from safetensors import safe_open
from safetensors.torch import save_file

from w2t.canon.canonical import CanonicalModule
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


def save_safetensors_entry(target: Path, modules: list) -> None:
    """The alternative entry format measured against Arrow: every token tensor in one safetensors file."""
    tensors = {}
    for i, m in enumerate(modules):
        tensors.update({f"{i}.U": m.U, f"{i}.S": m.S, f"{i}.V": m.V, f"{i}.mask": m.mask})
        if m.features is not None:
            tensors[f"{i}.F"] = m.features
    meta = json.dumps([[m.module_type, m.layer] for m in modules])
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target), metadata={"modules": meta})


def load_safetensors_entry(path: Path) -> list[CanonicalModule]:
    with safe_open(str(path), framework="pt") as f:
        meta, t = json.loads(f.metadata()["modules"]), {k: f.get_tensor(k) for k in f.keys()}
    return [CanonicalModule(typ, layer, t[f"{i}.U"], t[f"{i}.S"], t[f"{i}.V"], t[f"{i}.mask"], t.get(f"{i}.F"))
            for i, (typ, layer) in enumerate(meta)]


def read_rows(root: Path, cache_dir: str, repeats: int, tmp: Path) -> tuple[list[dict], dict]:
    """Seconds to read every adapter's tokens: the cache's Arrow entries, the same tokens as safetensors
    entries, and the collection exported as one Arrow folder; and a DataModule's setup on the cache and the folder."""
    kw = dict(cache_dir=cache_dir, group_column=None, role_column=None)
    dm = AdapterDataModule(root=str(root), **kw)
    dm.setup()  # builds what the cache lacks
    hf_dir = export_collection(dm, tmp / "hf")
    entries = dm.entries
    n = len(entries)
    st_entries = [tmp / "st" / f"{i}.safetensors" for i in range(n)]
    st_entries[0].parent.mkdir()
    for e, st in zip(entries, st_entries):
        save_safetensors_entry(st, load_entry(e))

    def arrow_entries():
        return [load_entry(e) for e in entries]

    def safetensors_entries():
        return [load_safetensors_entry(e) for e in st_entries]

    def arrow_folder():
        hf = ExportedCollection(hf_dir, CacheOptions())
        return [hf.modules(i) for i in range(n)]

    ref = arrow_entries()
    for other in (safetensors_entries(), arrow_folder()):  # the same tensors: dtype, shape and values
        assert all(torch.equal(x.U, y.U) and x.U.dtype == y.U.dtype and torch.equal(x.V, y.V) and torch.equal(x.S, y.S)
                   and torch.equal(x.mask, y.mask) for ma, mb in zip(ref, other) for x, y in zip(ma, mb, strict=True))
    cases = [("token entries", "arrow entries", arrow_entries), ("token entries", "safetensors entries", safetensors_entries),
             ("token entries", "arrow folder", arrow_folder),
             ("datamodule setup", "arrow entries", lambda: AdapterDataModule(root=str(root), **kw).setup()),
             ("datamodule setup", "arrow folder", lambda: AdapterDataModule(path=str(hf_dir), **kw).setup())]
    rows = []
    for what, source, fn in cases:
        seconds = timed(fn, repeats)
        rows.append({"what": what, "source": source, "best_s": min(seconds), "median_s": statistics.median(seconds),
                     "adapters_per_s": n / min(seconds), "seconds": seconds})
    for row in rows:
        first = next(r for r in rows if r["what"] == row["what"])
        row["speedup"] = first["best_s"] / row["best_s"]
    mib = lambda files: sum(Path(f).stat().st_size for f in files) / 2**20  # noqa: E731
    return rows, {"adapters": n, "arrow_entries_mib": mib(entries), "safetensors_entries_mib": mib(st_entries),
                  "arrow_folder_mib": disk_usage(hf_dir) / 2**20}


def main_read(args) -> None:
    root = ensure_collection(args.collection, args.root)
    cache_dir = args.cache_dir or str(Path(args.root) / "cache")
    with tempfile.TemporaryDirectory() as tmp:
        rows, sizes = read_rows(root, cache_dir, args.repeats, Path(tmp))
    result = {"collection": args.collection, **sizes, "repeats": args.repeats, **machine(), "rows": rows}
    print(f"token cache read: {args.collection}, {sizes['adapters']} adapters; arrow entries "
          f"{sizes['arrow_entries_mib']:.1f} MiB, safetensors entries {sizes['safetensors_entries_mib']:.1f} MiB, "
          f"arrow folder (tokens + factors) {sizes['arrow_folder_mib']:.1f} MiB; {os.cpu_count()} CPUs (load "
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
    ap.add_argument("--read", action="store_true", help="time reading a built cache: its Arrow entries, safetensors entries, an Arrow folder")
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
