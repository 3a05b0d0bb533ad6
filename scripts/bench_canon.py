"""Throughput of reading + canonicalizing Llama-3.2-3B-shaped LoRA adapters vs reading alone.

python scripts/bench_canon.py [--adapters 8] [--repeats 3] [--threads N] [--out bench_results/canon.json]

Each adapter: 28 layers × {q, o: 3072×3072; k, v: 1024×3072}, rank 16, bf16, PEFT folder. The
files are read once before timing, so every path reads from the page cache (the comparison is then
CPU and memory work only). The baseline "read" is `safetensors.torch.load_file` to torch tensors.
Paths are timed interleaved (each repeat runs every path once, over all adapters) and the median
repeat is reported, so a burst of load from other jobs hits every path alike; ratios are only
meaningful within one run. Process CPU time is reported next to wall time. On a machine shared with
other jobs use `--threads 1`: with several OpenMP threads every op waits for descheduled peers.
"read + canonicalize (householder)" is the library's reference path (`method="householder"`: Householder
QR, no Gram matrices), timed in the same run.

The same run measures the machine (memory copy bandwidth, float64 GEMM GFLOP/s, and the GFLOP/s of
the batched tall-skinny Gram products canonicalization is made of) and prints a roofline-style lower
bound: the bytes canonicalization must touch (read the bf16 factors, write U and V in float64) and
the flops it must do (a Gram matrix and one r×r·r×m product per factor: 2·(m+n)·r² multiply-adds
per module), turned into a best possible "read + canonicalize" time and ratio vs read alone.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from w2t import canonicalize_adapter, load_adapter

SHAPES = {"q_proj": (3072, 3072), "k_proj": (1024, 3072), "v_proj": (1024, 3072), "o_proj": (3072, 3072)}
LAYERS, RANK = 28, 16


def write_adapter(folder: Path, seed: int, layers: int = LAYERS, rank: int = RANK) -> int:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for name, (m, n) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, n, generator=gen) / n**0.5).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(m, rank, generator=gen) / rank).to(torch.bfloat16)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 32, "target_modules": list(SHAPES), "use_rslora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return (folder / "adapter_model.safetensors").stat().st_size


# --- machine and bound ----------------------------------------------------------------------------


def _median_time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_machine() -> dict:
    """Achievable memory bandwidth and float64 matmul rates, measured now (same load as the paths)."""
    src = torch.empty(64 << 20 >> 3, dtype=torch.float64).normal_()  # 64 MiB, far beyond the caches
    dst = torch.empty_like(src)
    copy_s = _median_time(lambda: dst.copy_(src))
    x = torch.randn(1024, 1024, dtype=torch.float64)
    gemm_s = _median_time(lambda: x @ x)
    k, r, m = 56, RANK, 3072  # the q/o bucket of one adapter: 56 Gram matrices of 3072×16 panels
    panels = torch.randn(k, r, m, dtype=torch.float64)
    gram_s = _median_time(lambda: panels @ panels.mT)
    return {
        "copy_GB_per_s": 2 * src.numel() * 8 / copy_s / 1e9,  # bytes read + bytes written
        "dgemm_GFLOP_per_s": 2 * 1024**3 / gemm_s / 1e9,
        "skinny_gram_GFLOP_per_s": 2 * k * m * r * r / gram_s / 1e9,
    }


def bound(file_bytes: float, read_s: float, machine: dict) -> dict:
    """Lower bound on canonicalization time per adapter, and the best ratio vs read alone it allows."""
    sum_mn = LAYERS * sum(m + n for m, n in SHAPES.values())
    factor_elems = sum_mn * RANK
    bytes_min = factor_elems * 2 + factor_elems * 8  # read A, B in bf16; write U, V in float64
    flops_min = 4 * sum_mn * RANK**2  # Gram + product per factor: 2·(m+n)·r² multiply-adds per module
    bw = machine["copy_GB_per_s"] * 1e9
    t_bytes = bytes_min / bw
    t_flops_peak = flops_min / (machine["dgemm_GFLOP_per_s"] * 1e9)
    t_flops_skinny = flops_min / (machine["skinny_gram_GFLOP_per_s"] * 1e9)
    best = max(t_bytes, t_flops_peak)
    realistic = max(t_bytes, t_flops_skinny)
    return {
        "read_bytes_touched": 2 * file_bytes,  # page cache → tensors: read + write
        "canon_bytes_min": bytes_min,
        "canon_flops_min": flops_min,
        "canon_s_min_bytes": t_bytes,
        "canon_s_min_flops_at_dgemm_peak": t_flops_peak,
        "canon_s_min_flops_at_skinny_rate": t_flops_skinny,
        # bytes alone, whatever the flops: read touches 2× the file, read + canonicalize ≥ that + bytes_min
        "bytes_only_ratio_bound": 2 * file_bytes / (2 * file_bytes + bytes_min),
        "best_ratio_vs_read": read_s / (read_s + best),
        "realistic_ratio_vs_read": read_s / (read_s + realistic),
        "canon_s_min": best,  # 0.5× needs canonicalize ≤ read alone, i.e. read_s ≥ canon_s_min
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="bench_results/canon.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"a{i}" for i in range(args.adapters)]
        size = sum(write_adapter(p, seed=i) for i, p in enumerate(paths)) / args.adapters
        for p in paths:  # warm the page cache: every path below reads from memory
            load_file(str(p / "adapter_model.safetensors"))
        preloaded = [load_adapter(p) for p in paths[:1]]

        runs = {
            "read (safetensors.load_file)": lambda p: load_file(str(p / "adapter_model.safetensors")),
            "read (w2t.load_adapter)": lambda p: load_adapter(p),
            "read + canonicalize (householder)": lambda p: canonicalize_adapter(load_adapter(p), method="householder"),
            "read + canonicalize": lambda p: canonicalize_adapter(load_adapter(p)),
            "read bf16 + canonicalize": lambda p: canonicalize_adapter(load_adapter(p, dtype=torch.bfloat16)),
            "canonicalize only": lambda p: canonicalize_adapter(preloaded[0]),
        }
        if torch.cuda.is_available():
            runs["read + canonicalize (cuda)"] = lambda p: (canonicalize_adapter(load_adapter(p), device="cuda"), torch.cuda.synchronize())
        for fn in runs.values():  # warm-up (lazy imports, allocator)
            fn(paths[0])
        machine = measure_machine()
        times: dict[str, list[float]] = {name: [] for name in runs}
        cpu_times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleaved: each repeat runs every path
            for name, fn in runs.items():
                t, c = time.perf_counter(), time.process_time()
                for p in paths:
                    fn(p)
                cpu_times[name].append(time.process_time() - c)
                times[name].append(time.perf_counter() - t)
        machine_after = measure_machine()  # the load may change during the run: report both
        seconds = {name: statistics.median(ts) for name, ts in times.items()}
        cpu_seconds = {name: statistics.median(ts) for name, ts in cpu_times.items()}

    base = seconds["read (safetensors.load_file)"]
    cpu_base = cpu_seconds["read (safetensors.load_file)"]
    rows = []
    for name, s in seconds.items():
        rows.append({"path": name, "seconds_per_adapter": s / args.adapters, "adapters_per_s": args.adapters / s,
                     "MB_per_s": args.adapters * size / s / 1e6, "ratio_vs_read": base / s,
                     "cpu_seconds_per_adapter": cpu_seconds[name] / args.adapters,
                     "cpu_ratio_vs_read": cpu_base / cpu_seconds[name]})
    mach = {k: statistics.mean([machine[k], machine_after[k]]) for k in machine}
    bnd = bound(size, base / args.adapters, mach)
    header = (f"{args.adapters} adapters, {size / 1e6:.1f} MB each (bf16), {cpu_model()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n" + header)
    print("(wall: median repeat; cpu: process CPU time, less sensitive to other jobs on a shared machine)")
    print(f"{'path':32s} {'ms/adapter':>11s} {'adapters/s':>11s} {'MB/s':>9s} {'× read':>7s} {'cpu ms':>8s} {'cpu × read':>10s}")
    for r in rows:
        print(f"{r['path']:32s} {1e3 * r['seconds_per_adapter']:11.1f} {r['adapters_per_s']:11.2f} {r['MB_per_s']:9.1f} "
              f"{r['ratio_vs_read']:7.3f} {1e3 * r['cpu_seconds_per_adapter']:8.1f} {r['cpu_ratio_vs_read']:10.3f}")
    print(f"\nmachine (mean of before/after the timed runs): copy {mach['copy_GB_per_s']:.1f} GB/s (read+write), "
          f"dgemm {mach['dgemm_GFLOP_per_s']:.1f} GFLOP/s, batched 3072×16 Gram {mach['skinny_gram_GFLOP_per_s']:.1f} GFLOP/s")
    print(f"bound per adapter: canonicalize must touch ≥ {bnd['canon_bytes_min'] / 1e6:.1f} MB "
          f"(≥ {1e3 * bnd['canon_s_min_bytes']:.1f} ms at copy bandwidth) and do ≥ {bnd['canon_flops_min'] / 1e9:.2f} GFLOP "
          f"(≥ {1e3 * bnd['canon_s_min_flops_at_dgemm_peak']:.1f} ms at dgemm rate, "
          f"{1e3 * bnd['canon_s_min_flops_at_skinny_rate']:.1f} ms at the batched-Gram rate)")
    print(f"bytes alone: read touches {bnd['read_bytes_touched'] / 1e6:.1f} MB, read + canonicalize ≥ "
          f"{(bnd['read_bytes_touched'] + bnd['canon_bytes_min']) / 1e6:.1f} MB → ≤ {bnd['bytes_only_ratio_bound']:.3f}× at equal bandwidth")
    print(f"best possible read + canonicalize vs read alone: {bnd['best_ratio_vs_read']:.3f}× (dgemm rate), "
          f"{bnd['realistic_ratio_vs_read']:.3f}× (batched-Gram rate); target 0.5× needs canonicalize ≤ read alone "
          f"({1e3 * base / args.adapters:.1f} ms), the bound is {1e3 * bnd['canon_s_min']:.1f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"adapter_mb": size / 1e6, "adapters": args.adapters, "repeats": args.repeats,
                               "threads": torch.get_num_threads(), "cpu": cpu_model(), "cores": os.cpu_count(),
                               "machine": platform.machine(), "torch": torch.__version__, "rows": rows,
                               "machine_rates": {"before": machine, "after": machine_after, "mean": mach},
                               "bound": bnd}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
