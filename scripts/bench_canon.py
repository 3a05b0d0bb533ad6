"""Throughput of reading + canonicalizing Llama-3.2-3B-shaped LoRA adapters vs reading alone and vs the floor.

python scripts/bench_canon.py [--adapters 8] [--repeats 3] [--threads 1 2] [--out bench_results/canon.json]

Each adapter: 28 layers × {q, o: 3072×3072; k, v: 1024×3072}, rank 16, bf16, PEFT folder. The
files are read once before timing, so every path reads from the page cache (the comparison is then
CPU and memory work only). The baseline "read" is `safetensors.torch.load_file` to torch tensors.
Paths are timed interleaved (each repeat runs every path once, over all adapters, at every thread
setting) and the median repeat is reported, so a burst of load from other jobs hits every path alike;
ratios are only meaningful within one run. Process CPU time is reported next to wall time. On a
machine shared with other jobs prefer `--threads 1`: with several OpenMP threads every op waits for
descheduled peers, and with GNU OpenMP's default active waiting those peers spin on cores the other
jobs need, so one op can take 100× its usual time; `OMP_WAIT_POLICY=PASSIVE` (set before the run)
avoids that. The OpenMP/MKL environment variables and the load average are printed and written to
the JSON. "read + canonicalize (householder)" is the library's reference path (`method="householder"`:
Householder QR, no Gram matrices), timed in the same run.

The floor row times the bare float64 work on the same files, batched by shape bucket (one bucket
per factor shape, as canonicalization batches): read (`load_file`); convert both factors to float64
(each bucket stacked, then converted to one float64 tensor, in the stored layout); the Gram
matrices AAᵀ and BᵀB (one batched matmul per bucket); the (dim×r)(r×r) products that form U and V
(one batched matmul per bucket, written as the (r×r)(r×dim) product of the transposes, the faster
layout here). No Cholesky, SVD, sign rule, checks or Python bookkeeping. "÷ floor" is each path's
time over the floor's; the target for "read + canonicalize" is ≤ 2 at every thread setting. The
floor's steps are timed too (`floor_steps_seconds_per_adapter` in the JSON).

The same run measures the machine (memory copy bandwidth, float64 GEMM GFLOP/s, and the GFLOP/s of
the batched tall-skinny Gram products canonicalization is made of) and prints a roofline-style lower
bound: the bytes canonicalization must touch (read the bf16 factors, write U and V in float64) and
the flops it must do (a Gram matrix and one r×r·r×m product per factor: 2·(m+n)·r² multiply-adds
per module), turned into a best possible "read + canonicalize" time and ratio vs read alone.
Prints a table per thread setting and writes JSON: `runs` holds one entry per thread setting; the
top-level `rows`, `threads`, `bound` and `machine_rates` repeat the first one.
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


# --- the floor: the bare float64 work on the same file --------------------------------------------

FLOOR_STEPS = ("read", "convert", "gram", "product")


def floor_work(path: Path, steps: dict[str, float] | None = None) -> list[torch.Tensor]:
    """Read; both factors to float64; AAᵀ and BᵀB; the (dim×r)(r×r) products; batched by shape bucket.

    Adds each step's seconds to `steps`. Every factor is X (dim, r): B as stored, A transposed (a view).
    """
    t0 = time.perf_counter()
    tensors = load_file(str(path / "adapter_model.safetensors"))
    t1 = time.perf_counter()
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for key, t in tensors.items():
        buckets.setdefault((".lora_B." in key, tuple(t.shape)), []).append(t)
    times = dict.fromkeys(FLOOR_STEPS, 0.0)
    times["read"] = t1 - t0
    out = []
    for (is_b, shape), mats in buckets.items():
        a = time.perf_counter()
        stacked = torch.stack(mats).to(torch.float64)  # two passes, but one op each (stack(out=float64) copies
        # module by module, one parallel region each with several threads: far slower on a loaded machine)
        X = stacked if is_b else stacked.mT  # (k, dim, r)
        b = time.perf_counter()
        G = X.mT @ X  # BᵀB, AAᵀ: (k, r, r)
        c = time.perf_counter()
        out.append(G @ X.mT)  # (X·G)ᵀ: the (dim×r)(r×r) product, in the faster (r×r)(r×dim) layout
        d = time.perf_counter()
        times["convert"] += b - a
        times["gram"] += c - b
        times["product"] += d - c
    if steps is not None:
        for name, v in times.items():
            steps[name] = steps.get(name, 0.0) + v
    return out


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


def omp_env() -> dict[str, str]:
    """The environment variables that change how OpenMP and MKL threads wait and how many there are."""
    names = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "KMP_BLOCKTIME")
    return {k: os.environ[k] for k in names if k in os.environ}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


READ, FLOOR, REAL = "read (safetensors.load_file)", "floor (read, float64, Grams, products)", "read + canonicalize"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[0],
                    help="torch thread settings, each timed in the same run (0: torch's default)")
    ap.add_argument("--out", default="bench_results/canon.json")
    args = ap.parse_args()
    settings = [t or torch.get_num_threads() for t in args.threads]
    load_start = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"a{i}" for i in range(args.adapters)]
        size = sum(write_adapter(p, seed=i) for i, p in enumerate(paths)) / args.adapters
        for p in paths:  # warm the page cache: every path below reads from memory
            load_file(str(p / "adapter_model.safetensors"))
        preloaded = [load_adapter(p) for p in paths[:1]]
        floor_steps: dict[int, dict[str, float]] = {t: {} for t in settings}
        current = {"threads": settings[0]}

        runs = {
            READ: lambda p: load_file(str(p / "adapter_model.safetensors")),
            FLOOR: lambda p: floor_work(p, floor_steps[current["threads"]]),
            "read (w2t.load_adapter)": lambda p: load_adapter(p),
            "read + canonicalize (householder)": lambda p: canonicalize_adapter(load_adapter(p), method="householder"),
            REAL: lambda p: canonicalize_adapter(load_adapter(p)),
            "read bf16 + canonicalize": lambda p: canonicalize_adapter(load_adapter(p, dtype=torch.bfloat16)),
            "canonicalize only": lambda p: canonicalize_adapter(preloaded[0]),
        }
        if torch.cuda.is_available():
            runs["read + canonicalize (cuda)"] = lambda p: (canonicalize_adapter(load_adapter(p), device="cuda"), torch.cuda.synchronize())
        machine: dict[int, list[dict]] = {}
        for t in settings:
            torch.set_num_threads(t)
            current["threads"] = t
            for fn in runs.values():  # warm-up (lazy imports, allocator)
                fn(paths[0])
            machine[t] = [measure_machine()]
            floor_steps[t].clear()
        times = {(t, name): [] for t in settings for name in runs}
        cpu_times = {(t, name): [] for t in settings for name in runs}
        for _ in range(args.repeats):  # interleaved: each repeat runs every path at every thread setting
            for t in settings:
                torch.set_num_threads(t)
                current["threads"] = t
                for name, fn in runs.items():
                    w, c = time.perf_counter(), time.process_time()
                    for p in paths:
                        fn(p)
                    cpu_times[t, name].append(time.process_time() - c)
                    times[t, name].append(time.perf_counter() - w)
        for t in settings:  # the load may change during the run: report both
            torch.set_num_threads(t)
            machine[t].append(measure_machine())

    load = (load_start, os.getloadavg()[0])  # 1-minute load average (all processes) at the start and the end
    results = [report(t, times, cpu_times, machine[t], floor_steps[t], runs, size, load, args) for t in settings]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    first = results[0]
    out.write_text(json.dumps({"adapter_mb": size / 1e6, "adapters": args.adapters, "repeats": args.repeats,
                               "cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
                               "torch": torch.__version__, "env": omp_env(), "load_average_start_end": load,
                               "threads": first["threads"], "rows": first["rows"],
                               "machine_rates": first["machine_rates"], "bound": first["bound"], "runs": results},
                              indent=1))
    print(f"wrote {out}")


def report(threads, times, cpu_times, machine, floor_steps, runs, size, load, args) -> dict:
    """Print one thread setting's table and bound; its JSON entry."""
    seconds = {name: statistics.median(times[threads, name]) for name in runs}
    cpu_seconds = {name: statistics.median(cpu_times[threads, name]) for name in runs}
    base, cpu_base = seconds[READ], cpu_seconds[READ]
    floor, cpu_floor = seconds[FLOOR], cpu_seconds[FLOOR]
    rows = []
    for name, s in seconds.items():
        rows.append({"path": name, "seconds_per_adapter": s / args.adapters, "adapters_per_s": args.adapters / s,
                     "MB_per_s": args.adapters * size / s / 1e6, "ratio_vs_read": base / s,
                     "time_over_floor": s / floor, "cpu_seconds_per_adapter": cpu_seconds[name] / args.adapters,
                     "cpu_ratio_vs_read": cpu_base / cpu_seconds[name], "cpu_time_over_floor": cpu_seconds[name] / cpu_floor})
    before, after = machine
    mach = {k: statistics.mean([before[k], after[k]]) for k in before}
    bnd = bound(size, base / args.adapters, mach)
    steps = {k: v / (len(times[threads, FLOOR]) * args.adapters) for k, v in floor_steps.items()}  # mean per adapter
    header = (f"{args.adapters} adapters, {size / 1e6:.1f} MB each (bf16), {cpu_model()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, {threads} threads, {' '.join(f'{k}={v}' for k, v in omp_env().items()) or 'no OMP/MKL env'}, "
              f"load average {load[0]:.1f} → {load[1]:.1f}")
    print("\n" + header)
    print("(wall: median repeat; cpu: process CPU time, less sensitive to other jobs on a shared machine)")
    print("(× read: read's time over the path's, higher is faster; ÷ floor: the path's time over the floor's)")
    print(f"{'path':40s} {'ms/adapter':>11s} {'adapters/s':>11s} {'MB/s':>9s} {'× read':>7s} {'÷ floor':>8s} "
          f"{'cpu ms':>8s} {'cpu × read':>10s} {'cpu ÷ floor':>11s}")
    for r in rows:
        print(f"{r['path']:40s} {1e3 * r['seconds_per_adapter']:11.1f} {r['adapters_per_s']:11.2f} {r['MB_per_s']:9.1f} "
              f"{r['ratio_vs_read']:7.3f} {r['time_over_floor']:8.2f} {1e3 * r['cpu_seconds_per_adapter']:8.1f} "
              f"{r['cpu_ratio_vs_read']:10.3f} {r['cpu_time_over_floor']:11.2f}")
    real = seconds[REAL] / floor
    print("floor steps (mean ms/adapter): " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in steps.items()))
    print(f"read + canonicalize / floor: {real:.2f} (wall), {cpu_seconds[REAL] / cpu_floor:.2f} (cpu); "
          f"target ≤ 2: {'met' if real <= 2 else 'NOT met'}")
    print(f"machine (mean of before/after the timed runs): copy {mach['copy_GB_per_s']:.1f} GB/s (read+write), "
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
    return {"threads": threads, "rows": rows, "floor_steps_seconds_per_adapter": steps,
            "read_canonicalize_over_floor": real, "cpu_read_canonicalize_over_floor": cpu_seconds[REAL] / cpu_floor,
            "machine_rates": {"before": before, "after": after, "mean": mach}, "bound": bnd}

if __name__ == "__main__":
    main()
