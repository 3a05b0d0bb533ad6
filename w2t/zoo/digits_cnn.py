"""A third collection: real PEFT conv LoRAs of a small CNN, each trained to tell one digit from another.

Different from `digits` in every respect the weights show: the base is a CNN (three 3×3 convs and a
1×1 conv, trained here on scikit-learn's 8×8 digits), the adapters are conv LoRAs (down `[r, c_in, k, k]`,
up `[c_out, r, 1, 1]`) on subsets of those convs, with ranks 1/3/6, lora_alpha 4 or 16 whatever the rank
and rsLoRA scaling on a third of them, and a task is a digit *pair*: "is this digit P, not N?" on images
of P and N only, read through the base's frozen random probe. The 45 pairs are oriented as a
round-robin tournament (P beats N when (N − P) mod 10 is 1–4, and the lower digit when they are 5 apart),
so every digit is the positive one of 4 or 5 tasks: `positive` is a 10-class label of the weights, and
`accuracy` (held out, on the pair's test images) varies with rank, α, targets, steps, learning rate
and training-set size.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from w2t.errors import CollectionError
from w2t.progress import progress
from w2t.zoo.builder import RecipeBase, deterministic, plan_jobs, pooled_map
from w2t.zoo.digits_model import DigitsData, save_base, train_base

RECIPE_VERSION = 1  # bump whenever the build code changes what a recipe produces

CONVS = ("conv1", "conv2", "conv3", "proj")  # the base's conv modules: PEFT target names and module types
TARGETS = {  # name in metadata `targets` -> the convs it adapts
    "all": CONVS,
    "early": ("conv1", "conv2"),
    "late": ("conv3", "proj"),
    "3x3": ("conv1", "conv2", "conv3"),
}


def tournament(n: int = 10) -> tuple[tuple[int, int], ...]:
    """Every pair of digits once, as (positive, negative): P beats N when (N − P) mod n is in 1 … n/2 − 1,
    and the lower one when they are n/2 apart, so each digit is positive in n/2 − 1 or n/2 pairs."""
    pairs = []
    for a in range(n):
        for b in range(a + 1, n):
            d = b - a
            pairs.append((a, b) if d <= n // 2 else (b, a))
    return tuple(pairs)


PAIRS = tournament()


@dataclass(frozen=True)
class CNNConfig:
    """Shapes of the small CNN; stored next to the weights so the base can be rebuilt anywhere."""

    channels: tuple[int, int, int] = (16, 32, 32)  # conv1 (8×8), conv2 (stride 2: 4×4), conv3 (4×4)
    dim: int = 64  # proj: a 1×1 conv to the feature width, then global average pooling
    classes: int = 10

    def to_dict(self) -> dict:
        return asdict(self)


class DigitsCNN(nn.Module):
    """conv1 → conv2 (stride 2) → conv3 → proj (1×1) → mean over positions → LayerNorm: the feature read by
    `head` (10 classes) or by `probe`, a frozen random binary readout that belongs to the base (as the
    ViT's does in `digits_model`): whatever an adapter learns must live in its conv LoRA updates."""

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.cfg = cfg
        c1, c2, c3 = cfg.channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.proj = nn.Conv2d(c3, cfg.dim, 1)
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.classes)
        self.probe = nn.Linear(cfg.dim, 1)
        self.probe.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(1)  # (B, 1, 8, 8)
        for conv in (self.conv1, self.conv2, self.conv3, self.proj):
            h = F.gelu(conv(h))
        return self.ln(h.mean(dim=(-2, -1)))  # (B, dim)


@dataclass(frozen=True)
class Recipe(RecipeBase):
    """Everything that determines a collection's bytes; its hash decides when to rebuild."""

    version: ClassVar[int] = RECIPE_VERSION
    name: str
    tasks: tuple[tuple[int, int], ...]  # (positive digit, negative digit)
    adapters_per_task: int
    steps: tuple[int, ...] = (10, 20, 40)
    query_fraction: float = 0.25  # share of each task's adapters trained few-shot (role=query)
    query_n_train: tuple[int, ...] = (8, 16)
    gallery_n_train: tuple[int, ...] = (32, 64, 128, 192)  # the smallest pair has 256 training images
    ranks: tuple[int, ...] = (1, 3, 6)
    alphas: tuple[int, ...] = (4, 16)  # lora_alpha, whatever the rank
    rslora: float = 1 / 3  # share of adapters with use_rslora (scale alpha/√r instead of alpha/r)
    lr_range: tuple[float, float] = (2e-3, 5e-2)  # sampled log-uniform
    targets: tuple[tuple[str, int], ...] = (("all", 2), ("early", 1), ("late", 1), ("3x3", 1))
    batch: int = 16
    n_test: int = 397  # held-out images: never seen by the base or any adapter
    cnn: CNNConfig = field(default_factory=CNNConfig)
    base_steps: int = 300
    base_lr: float = 3e-3
    base_batch: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if len(t) != 2 or t[0] == t[1] or not set(t) <= set(range(10))]
        if bad:
            raise ValueError(f"a task is two different digits (positive, negative); got {bad}")
        unknown = [t for t, _ in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"unknown targets {unknown}; choose from {tuple(TARGETS)}")
        if not 0 < self.query_fraction < 1:
            raise ValueError(f"query_fraction must be in (0, 1), got {self.query_fraction}")


RECIPES = ("digits_cnn", "digits_cnn_tiny")


def make_recipe(name: str, seed: int = 0) -> Recipe:
    """`digits_cnn` (45 pairs × 8 adapters) and `digits_cnn_tiny` (4 pairs × 4, for tests)."""
    if name == "digits_cnn":
        return Recipe(name, PAIRS, adapters_per_task=8, seed=seed)
    if name == "digits_cnn_tiny":
        return Recipe(name, ((0, 1), (3, 8), (7, 1), (9, 2)), adapters_per_task=4, steps=(10, 20),
                      base_steps=100, seed=seed)
    raise CollectionError(f"unknown CNN collection {name!r}; choose from {RECIPES}")


@dataclass(frozen=True)
class AdapterJob:
    """One adapter to train; its fields plus the measured `accuracy` become its metadata row."""

    path: str
    adapter_id: str
    task: str
    positive: int
    negative: int
    role: str
    rank: int
    alpha: int
    rslora: int
    lr: float
    steps: int
    n_train: int
    targets: str
    seed: int

    def row(self, accuracy: float) -> dict:
        """Identity and labels first (path … negative, digit_*: 1 for both digits of the pair), then
        hyperparameters."""
        fields = asdict(self)
        labels = {k: fields.pop(k) for k in ("path", "adapter_id", "task", "positive", "negative")}
        digits = {f"digit_{d}": int(d in (self.positive, self.negative)) for d in range(10)}
        return {**labels, **digits, **fields, "accuracy": accuracy}


def plan(recipe: Recipe) -> list[AdapterJob]:
    """Every adapter's hyperparameters, sampled from the recipe seed in a fixed order (`plan_jobs`)."""
    def job(adapter_id: str, task: tuple[int, int], role: str, hyper: dict) -> AdapterJob:
        positive, negative = task
        return AdapterJob(path=f"adapters/{adapter_id}", adapter_id=adapter_id, task=f"{positive}-vs-{negative}",
                          positive=positive, negative=negative, role=role, **hyper)

    return plan_jobs(recipe, recipe.tasks, recipe.adapters_per_task, "c", job)


@torch.no_grad()
def pair_accuracy(features: nn.Module, probe: nn.Module, data: DigitsData, positive: int, negative: int) -> float:
    """Held-out accuracy of the probe's "positive, not negative" on the test images of the two digits."""
    keep = (data.y_test == positive) | (data.y_test == negative)
    hit = (probe(features(data.x_test[keep])).squeeze(-1) > 0) == (data.y_test[keep] == positive)
    return round(hit.float().mean().item(), 4)


# ---- the base ---------------------------------------------------------------------------------

def load_base(folder: str | Path) -> tuple[DigitsCNN, DigitsData]:
    """The base CNN of a built collection and the exact train/test split it and its adapters used."""
    folder = Path(folder)
    info = json.loads((folder / "base_config.json").read_text())
    cfg = info["cnn"]
    model = DigitsCNN(CNNConfig(**{**cfg, "channels": tuple(cfg["channels"])}))
    model.load_state_dict(load_file(folder / "base_model.safetensors"))
    return model.eval(), DigitsData.load(**info["data"])


# ---- adapter training (runs in worker processes) ---------------------------------------------

_WORKER: dict = {}


def _init_worker(base_state: dict, cnn: CNNConfig, data: DigitsData) -> None:
    base = DigitsCNN(cnn)
    base.load_state_dict(base_state)
    _WORKER.update(base=base.eval(), data=data)


def _train_adapter(job: AdapterJob, root: Path, batch: int) -> float:
    """Fine-tune one PEFT conv LoRA through the frozen probe, save it, return held-out accuracy."""
    from peft import LoraConfig, get_peft_model

    data: DigitsData = _WORKER["data"]
    torch.manual_seed(job.seed)  # LoRA A init
    g = torch.Generator().manual_seed(job.seed)
    config = LoraConfig(r=job.rank, lora_alpha=job.alpha, lora_dropout=0.0, use_rslora=bool(job.rslora),
                        target_modules=list(TARGETS[job.targets]))
    model = get_peft_model(copy.deepcopy(_WORKER["base"]), config)
    probe = model.get_base_model().probe
    pool = torch.nonzero((data.y_train == job.positive) | (data.y_train == job.negative)).squeeze(1)
    if len(pool) < job.n_train:
        raise CollectionError(f"{job.adapter_id}: {job.n_train} training images planned, pair {job.task} has "
                              f"{len(pool)}; lower gallery_n_train")
    idx = pool[torch.randperm(len(pool), generator=g)[:job.n_train]]
    x, y = data.x_train[idx], (data.y_train[idx] == job.positive).float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=job.lr,
                            weight_decay=0.0, foreach=True)
    for _ in range(job.steps):
        b = torch.randperm(job.n_train, generator=g)[:batch]
        loss = F.binary_cross_entropy_with_logits(probe(model(x[b])).squeeze(-1), y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.save_pretrained(root / job.path)
    return pair_accuracy(model, probe, data, job.positive, job.negative)


def build(recipe: Recipe, dest: Path, workers: int) -> pd.DataFrame:
    """Train the base and every adapter into `dest`; metadata.csv and recipe.json come last."""
    dest.mkdir(parents=True, exist_ok=True)
    with deterministic():
        data = DigitsData.load(recipe.n_test, recipe.seed)
        base = train_base(recipe.cnn, data, steps=recipe.base_steps, lr=recipe.base_lr,
                          batch=recipe.base_batch, seed=recipe.seed, make=DigitsCNN)
        save_base(base, data, dest, n_test=recipe.n_test, seed=recipe.seed, arch="cnn",
                  probe="frozen random linear readout on the pooled feature; logit > 0 means "
                        "'the positive digit of the pair'; not part of any adapter")
        jobs = plan(recipe)
        with pooled_map(_train_adapter, jobs, dest, recipe.batch, init=_init_worker,
                        init_args=(base.state_dict(), recipe.cnn, data), clear=_WORKER.clear,
                        workers=workers, chunksize=4) as results:
            accuracies = list(progress(results, f"{recipe.name}: training conv LoRA adapters", len(jobs)))
    table = pd.DataFrame([job.row(acc) for job, acc in zip(jobs, accuracies)])
    table.to_csv(dest / "metadata.csv", index=False)
    return table
