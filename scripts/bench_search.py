"""Library search and embedding speed: index build time, single-query latency, adapters embedded per second.

python scripts/bench_search.py [--sizes 10000 100000 1000000] [--dim 256] [--out bench_results/search.json]

Search: random `dim`-d embeddings, exact cosine top-k with the torch index and (when `faiss` imports)
FAISS `IndexFlatIP`; build = normalize + index, latency = one query at a time (p50, p99).
Embedding: every adapter of the default digits collection if it is built under the data dir, else of
digits_tiny (built there if needed), through a randomly initialized encoder on the collection's
schema (speed does not depend on the weights): read + canonicalize + tokenize + forward, and the
forward alone on tokens made beforehand. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from w2t.canon.canonical import canonicalize_adapter
from w2t.data.collection import read_metadata
from w2t.zoo import ensure_collection
from w2t.models.w2t import W2TEncoder
from w2t.io.formats import load_adapter
from w2t.search.index import EmbeddingIndex
from w2t.data.tokens import TokenSchema


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def bench_search(n: int, dim: int, k: int, queries: int, backends: list[str]) -> list[dict]:
    gen = torch.Generator().manual_seed(n)
    library = torch.randn(n, dim, generator=gen)
    ids = [f"a{i}" for i in range(n)]
    q = torch.randn(queries, dim, generator=gen)
    rows = []
    for backend in backends:
        t = time.perf_counter()
        index = EmbeddingIndex(library, ids, backend=backend)
        build = time.perf_counter() - t
        index.search(q[:1], k)  # warm-up
        lat = []
        for i in range(queries):
            t = time.perf_counter()
            index.search(q[i], k)
            lat.append(time.perf_counter() - t)
        rows.append({"n": n, "backend": backend, "build_s": build, "queries": queries,
                     "p50_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * percentile(lat, 0.99)})
        del index
    return rows


def bench_embed(data_dir: Path, batch_size: int, min_adapters: int) -> dict:
    """Read + canonicalize + tokenize, then forward, each timed over ≥ `min_adapters` (the collection repeated)."""
    name = "digits" if (data_dir / "digits" / "metadata.csv").exists() else "digits_tiny"
    paths = list(read_metadata(ensure_collection(name, data_dir))["abs_path"])
    schema = TokenSchema.from_modules(m for p in paths for m in canonicalize_adapter(load_adapter(p)))
    encoder = W2TEncoder(schema).eval()
    encoder.embed(paths[:batch_size], batch_size=batch_size)  # warm-up
    paths = paths * -(-min_adapters // len(paths))
    t = time.perf_counter()
    tokens = [encoder.adapter_tokens(p) for p in paths]
    t_tokens = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, len(tokens), batch_size):
        encoder.embed_tokens(tokens[i:i + batch_size])
    t_forward = time.perf_counter() - t
    return {"collection": name, "adapters": len(paths), "batch_size": batch_size, "encoder_params": encoder.num_parameters(),
            "end_to_end_adapters_per_s": len(paths) / (t_tokens + t_forward), "forward_adapters_per_s": len(paths) / t_forward}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--query-budget", type=float, default=5e7,
                    help="queries per size = min(200, budget / size): fewer queries on big libraries")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--min-adapters", type=int, default=200, help="embed at least this many (repeating a small collection)")
    ap.add_argument("--data-dir", default=os.environ.get("W2T_DATA_DIR", "data"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and FAISS threads; 0: torch's default. 1 by default: on a busy shared machine more "
                         "threads than free cores make every op wait on the slowest thread (10-30x slower here)")
    ap.add_argument("--out", default="bench_results/search.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        import faiss

        faiss_version = faiss.__version__
        faiss.omp_set_num_threads(torch.get_num_threads())
    except ImportError:
        faiss_version = None
    backends = ["torch", "faiss"] if faiss_version else ["torch"]
    search = [row for n in args.sizes
              for row in bench_search(n, args.dim, args.k, max(20, min(200, int(args.query_budget // n))), backends)]
    embed = bench_embed(Path(args.data_dir), args.batch_size, args.min_adapters)

    print(f"\n{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", faiss {faiss_version}" if faiss_version else ", faiss not installed"))
    print(f"{'library':>10s} {'backend':>8s} {'build s':>9s} {'p50 ms':>9s} {'p99 ms':>9s} {'queries':>8s}   ({args.dim}-d, k={args.k})")
    for r in search:
        print(f"{r['n']:>10,d} {r['backend']:>8s} {r['build_s']:9.3f} {r['p50_ms']:9.2f} {r['p99_ms']:9.2f} {r['queries']:>8d}")
    print(f"\nembedding {embed['adapters']} adapters of {embed['collection']} (batch {embed['batch_size']}, "
          f"{embed['encoder_params']:,}-parameter encoder): {embed['end_to_end_adapters_per_s']:.1f} adapters/s end to end "
          f"(read + canonicalize + tokenize + forward), {embed['forward_adapters_per_s']:.1f} adapters/s forward only")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "faiss": faiss_version, "dim": args.dim, "k": args.k, "search": search, "embed": embed}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
