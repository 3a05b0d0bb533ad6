"""Encoder training and embedding throughput (adapters/s) and parameters, for every model config.

python scripts/bench_models.py [--collection digits_cnn] [--root data] [--batch-size 32] [--steps 20]
    [--repeats 3] [--out bench_results/models.json]

Each model of configs/model that trains an encoder (and `w2t-no-rank-attention`, `model=w2t` with
`model.encoder.rank_attention=false`) is built from its config's encoder options on the collection's
schema, as `train.py` builds it, then timed on one batch of real tokens of its input representation
(canonical, or raw factors): a training step (forward, backward of the embedding's mean square, an
AdamW step; the task heads are one linear layer and left out) and an embedding pass under no_grad.
Each figure is the best of `--repeats` runs of `--steps` steps after 3 untimed ones, so these are the
encoders' own costs, not a whole run's (data loading, validation, early stopping). Ratios are to `w2t`,
measured in the same run. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # works without `pip install -e .`

from bench_cache import machine, write  # noqa: E402  (scripts/, this script's folder)
from compare import ABLATIONS  # noqa: E402
from w2t.data.datamodule import AdapterDataModule  # noqa: E402
from w2t.models.registry import build_encoder  # noqa: E402
from w2t.zoo import ensure_collection  # noqa: E402

VARIANTS = ["w2t-no-rank-attention"]  # compare.py's ablations that change the encoder's cost


def model_configs() -> dict[str, tuple[str, str, dict]]:
    """name -> (arch, input, encoder options), composed as train.py composes them, for every configs/model
    file that trains an encoder and for VARIANTS."""
    names = [f.stem for f in sorted((ROOT / "configs" / "model").glob("*.yaml"))] + VARIANTS
    out = {}
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        for name in names:
            model = compose("train", overrides=ABLATIONS.get(name, [f"model={name}"])).model
            if "arch" in model:
                out[name] = (model.arch, model.input, OmegaConf.to_container(model.encoder, resolve=True))
    return out


def seconds_per_step(step, steps: int, repeats: int) -> float:
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def measure(encoder: torch.nn.Module, tokens, steps: int, repeats: int) -> tuple[float, float]:
    opt = torch.optim.AdamW(encoder.parameters(), lr=1e-4)

    def train_step():
        opt.zero_grad(set_to_none=True)
        encoder(tokens).square().mean().backward()
        opt.step()

    def embed_step():
        with torch.no_grad():
            encoder(tokens)

    encoder.train()
    train = seconds_per_step(train_step, steps, repeats)
    encoder.eval()
    return train, seconds_per_step(embed_step, steps, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--collection", default="digits_cnn", help="a collection of w2t.zoo, built if missing")
    ap.add_argument("--root", default="data")
    ap.add_argument("--cache-dir", help="default: ROOT/cache")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_results/models.json")
    args = ap.parse_args()
    os.environ.setdefault("W2T_PROGRESS", "0")

    root = ensure_collection(args.collection, args.root)
    batches = {}
    for inp in ("canonical", "raw"):
        dm = AdapterDataModule(root=str(root), cache_dir=args.cache_dir or str(Path(args.root) / "cache"),
                               representation=inp, group_column=None, role_column=None, batch_size=args.batch_size)
        dm.setup()
        batches[inp] = (dm.schema, next(iter(dm.train_dataloader()))["tokens"])
    rows = []
    for name, (arch, inp, options) in model_configs().items():
        schema, tokens = batches[inp]
        torch.manual_seed(0)
        encoder = build_encoder(arch, schema, options)
        train, embed = measure(encoder, tokens, args.steps, args.repeats)
        rows.append({"model": name, "arch": arch, "input": inp, "params": sum(p.numel() for p in encoder.parameters()),
                     "train_adapters_per_s": args.batch_size / train, "embed_adapters_per_s": args.batch_size / embed})
    ref = next(r for r in rows if r["model"] == "w2t")
    for r in rows:
        r["train_vs_w2t"] = r["train_adapters_per_s"] / ref["train_adapters_per_s"]
    result = {"collection": args.collection, "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats,
              "threads": torch.get_num_threads(), **machine(), "rows": rows}
    print(f"encoder throughput: {args.collection}, batch {args.batch_size}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs (load {result['load_avg_1min']:.1f}), best of {args.repeats}×{args.steps} steps")
    print(f"{'model':<22}  {'input':<9}  {'params':>10}  {'train ad/s':>10}  {'embed ad/s':>10}  {'train vs w2t':>12}")
    for r in rows:
        print(f"{r['model']:<22}  {r['input']:<9}  {r['params']:>10,}  {r['train_adapters_per_s']:>10.1f}  "
              f"{r['embed_adapters_per_s']:>10.1f}  {r['train_vs_w2t']:>11.2f}x")
    write(result, args.out)


if __name__ == "__main__":
    main()
