"""Throughput of reading + canonicalizing Llama-3.2-3B-shaped LoRA adapters vs reading alone.

python scripts/bench_canon.py [--adapters 8] [--repeats 3] [--out bench_results/canon.json]

Each adapter: 28 layers × {q, o: 3072×3072; k, v: 1024×3072}, rank 16, bf16, PEFT folder. The
files are read once before timing so both paths read from the page cache (the comparison is then
CPU work only). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from w2t import load_adapter
from w2t.canonical import canonicalize_adapter

SHAPES = {"q_proj": (3072, 3072), "k_proj": (1024, 3072), "v_proj": (1024, 3072), "o_proj": (3072, 3072)}


def write_adapter(folder: Path, seed: int, layers: int = 28, rank: int = 16) -> int:
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


def timed(fn, paths, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for p in paths:
            fn(p)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_results/canon.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"a{i}" for i in range(args.adapters)]
        size = sum(write_adapter(p, seed=i) for i, p in enumerate(paths)) / args.adapters
        for p in paths:  # warm the page cache
            load_file(str(p / "adapter_model.safetensors"))

        runs = {
            "read (safetensors.load_file)": lambda p: load_file(str(p / "adapter_model.safetensors")),
            "read (w2t.load_adapter)": lambda p: load_adapter(p),
            "read + canonicalize (cpu)": lambda p: canonicalize_adapter(load_adapter(p)),
        }
        if torch.cuda.is_available():
            runs["read + canonicalize (cuda)"] = lambda p: (canonicalize_adapter(load_adapter(p), device="cuda"), torch.cuda.synchronize())
        canonicalize_adapter(load_adapter(paths[0]))  # warm-up (lazy imports, allocator)
        seconds = {name: timed(fn, paths, args.repeats) for name, fn in runs.items()}

    base = seconds["read (safetensors.load_file)"]
    rows = []
    for name, s in seconds.items():
        rows.append({"path": name, "seconds_per_adapter": s / args.adapters, "adapters_per_s": args.adapters / s,
                     "MB_per_s": args.adapters * size / s / 1e6, "ratio_vs_read": base / s})
    print(f"\n{args.adapters} adapters, {size / 1e6:.1f} MB each (bf16), {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'path':32s} {'ms/adapter':>11s} {'adapters/s':>11s} {'MB/s':>9s} {'× read':>7s}")
    for r in rows:
        print(f"{r['path']:32s} {1e3 * r['seconds_per_adapter']:11.1f} {r['adapters_per_s']:11.2f} {r['MB_per_s']:9.1f} {r['ratio_vs_read']:7.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"adapter_mb": size / 1e6, "adapters": args.adapters, "threads": torch.get_num_threads(),
                               "machine": platform.machine(), "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
