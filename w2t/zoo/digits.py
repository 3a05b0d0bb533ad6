"""The default collection: hundreds of real PEFT LoRA adapters fine-tuned from the digits ViT.

A task is (input transform T, positive digit subset S): the adapter learns "is this digit in S?"
on images transformed by T, read out through the base model's frozen random probe. Nothing but
the LoRA update is trained, so the update itself must encode both S and T: the metadata columns
`digit_*`, `subset`, `transform` and `task` are real, learnable properties of the weights, and
`accuracy` (held out) varies with rank, targets, steps, learning rate and training-set size.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch
import torch.nn.functional as F

from w2t.zoo.builder import RecipeBase, plan_jobs, deterministic, pooled_map
from w2t.zoo.digits_model import (TRANSFORMS, DigitsData, DigitsViT, ViTConfig,
                                         apply_transform, heldout_accuracy, save_base,
                                         train_base)
from w2t.errors import CollectionError
from w2t.progress import progress

log = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump whenever the build code changes what a recipe produces

SUBSETS: dict[str, tuple[int, ...]] = {
    "even": (0, 2, 4, 6, 8),
    "odd": (1, 3, 5, 7, 9),
    "low": (0, 1, 2, 3, 4),
    "high": (5, 6, 7, 8, 9),
    "mixed": (0, 3, 5, 6, 9),  # aligned with neither parity nor magnitude
}
MODULES = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o",
           "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


@dataclass(frozen=True)
class Recipe(RecipeBase):
    """Everything that determines a collection's bytes; its hash decides when to rebuild."""

    version: ClassVar[int] = RECIPE_VERSION
    name: str
    tasks: tuple[tuple[str, str], ...]  # (transform, subset)
    adapters_per_task: int
    steps: tuple[int, ...]
    query_fraction: float = 0.25  # share of each task's adapters trained few-shot (role=query)
    query_n_train: tuple[int, ...] = (16, 32)
    gallery_n_train: tuple[int, ...] = (64, 128, 256, 512)
    ranks: tuple[int, ...] = (2, 4, 8)
    alpha_factors: tuple[int, ...] = (1, 2, 4)  # lora_alpha = factor × rank
    lr_range: tuple[float, float] = (2e-3, 5e-2)  # sampled log-uniform
    targets: tuple[tuple[str, int], ...] = (  # (short module names, sampling weight)
        ("q,v", 1), ("q,k,v,o", 1), ("q,k,v,o,fc1,fc2", 3), ("fc1,fc2", 1))
    batch: int = 16
    n_test: int = 397  # held-out images: never seen by the base or any adapter
    vit: ViTConfig = field(default_factory=ViTConfig)
    base_steps: int = 200
    base_lr: float = 3e-3
    base_batch: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t[0] not in TRANSFORMS or t[1] not in SUBSETS]
        if bad:
            raise ValueError(f"unknown (transform, subset) in {bad}; transforms are "
                             f"{TRANSFORMS}, subsets {tuple(SUBSETS)}")
        if not 0 < self.query_fraction < 1:
            raise ValueError(f"query_fraction must be in (0, 1), got {self.query_fraction}")



def make_recipe(name: str, seed: int = 0) -> Recipe:
    """The named recipes: `digits` (30 tasks × 20 adapters) and `digits_tiny` (4 × 6, for tests)."""
    if name == "digits":
        tasks = tuple((t, s) for t in TRANSFORMS for s in SUBSETS)
        return Recipe(name, tasks, adapters_per_task=20, steps=(10, 20, 40), seed=seed)
    if name == "digits_tiny":
        tasks = (("identity", "even"), ("identity", "low"), ("rot90", "even"), ("rot90", "low"))
        return Recipe(name, tasks, adapters_per_task=6, steps=(10, 20), base_steps=100, seed=seed)
    raise CollectionError(f"unknown default collection {name!r}; choose 'digits' or 'digits_tiny'")


@dataclass(frozen=True)
class AdapterJob:
    """One adapter to train; its fields plus the measured `accuracy` become its metadata row."""

    path: str
    adapter_id: str
    task: str
    transform: str
    subset: str
    role: str
    rank: int
    alpha: int
    lr: float
    steps: int
    n_train: int
    targets: str
    seed: int

    def row(self, accuracy: float) -> dict:
        """Identity and labels first (path … subset, digit_*), then hyperparameters."""
        fields = asdict(self)
        labels = {k: fields.pop(k) for k in ("path", "adapter_id", "task", "transform", "subset")}
        digits = {f"digit_{d}": int(d in SUBSETS[self.subset]) for d in range(10)}
        return {**labels, **digits, **fields, "accuracy": accuracy}


def plan(recipe: Recipe) -> list[AdapterJob]:
    """Every adapter's hyperparameters, sampled from the recipe seed in a fixed order (`plan_jobs`)."""
    def job(adapter_id: str, task: tuple[str, str], role: str, hyper: dict) -> AdapterJob:
        transform, subset = task
        return AdapterJob(path=f"adapters/{adapter_id}", adapter_id=adapter_id, task=f"{transform}-{subset}",
                          transform=transform, subset=subset, role=role, **hyper)

    return plan_jobs(recipe, recipe.tasks, recipe.adapters_per_task, "a", job)


# ---- adapter training (runs in worker processes) ---------------------------------------------

_WORKER: dict = {}


def _init_worker(base_state: dict, vit: ViTConfig, data: DigitsData, seed: int) -> None:
    base = DigitsViT(vit)
    base.load_state_dict(base_state)
    _WORKER.update(base=base.eval(), data=data, seed=seed)


def _train_adapter(job: AdapterJob, root: Path, batch: int) -> float:
    """Fine-tune one PEFT LoRA through the frozen probe, save it, return held-out accuracy."""
    from peft import LoraConfig, get_peft_model

    data: DigitsData = _WORKER["data"]
    torch.manual_seed(job.seed)  # LoRA A init
    g = torch.Generator().manual_seed(job.seed)
    config = LoraConfig(r=job.rank, lora_alpha=job.alpha, lora_dropout=0.0,
                        target_modules=[MODULES[m] for m in job.targets.split(",")])
    model = get_peft_model(copy.deepcopy(_WORKER["base"]), config)
    probe = model.get_base_model().probe
    positive = torch.tensor(SUBSETS[job.subset])
    idx = torch.randperm(len(data.y_train), generator=g)[:job.n_train]
    x, y = data.x_train[idx], torch.isin(data.y_train[idx], positive).float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=job.lr,
                            weight_decay=0.0, foreach=True)
    for _ in range(job.steps):
        b = torch.randperm(job.n_train, generator=g)[:batch]
        logit = probe(model(apply_transform(job.transform, x[b], g))).squeeze(-1)  # (batch,)
        loss = F.binary_cross_entropy_with_logits(logit, y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.save_pretrained(root / job.path)
    return heldout_accuracy(model, probe, data, job.transform, SUBSETS[job.subset],
                            _WORKER["seed"])


def build(recipe: Recipe, dest: Path, workers: int) -> pd.DataFrame:
    """Train the base and every adapter into `dest`; metadata.csv and recipe.json come last."""
    dest.mkdir(parents=True, exist_ok=True)
    with deterministic():
        data = DigitsData.load(recipe.n_test, recipe.seed)
        base = train_base(recipe.vit, data, steps=recipe.base_steps, lr=recipe.base_lr,
                          batch=recipe.base_batch, seed=recipe.seed)
        save_base(base, data, dest, n_test=recipe.n_test, seed=recipe.seed, arch="vit",
                  probe="frozen random linear readout on the CLS feature; logit > 0 means "
                        "'digit in subset'; not part of any adapter")
        jobs = plan(recipe)
        init_args = (base.state_dict(), recipe.vit, data, recipe.seed)
        with pooled_map(_train_adapter, jobs, dest, recipe.batch, init=_init_worker,
                        init_args=init_args, clear=_WORKER.clear, workers=workers,
                        chunksize=4) as results:
            accuracies = list(progress(results, f"{recipe.name}: training LoRA adapters",
                                       len(jobs)))
    table = pd.DataFrame([job.row(acc) for job, acc in zip(jobs, accuracies)])
    table.to_csv(dest / "metadata.csv", index=False)
    return table
