"""What a task is: one object that owns its head, loss, metrics, simple baselines, plot and report columns.

A task is found by name in `TASKS` (`task.name` in the config); nothing outside it asks which task
it is. A new task is one module in this folder (it registers itself with `@register`) and one
config in `configs/task/`.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from w2t.data.tokens import TokenSchema, collate_tokens, tokenize
from w2t.models.features import (delta_w_features, fixed_projections, principal_projections, sketch_features,
                                 spectral_features)

ESTIMATORS = ("linear", "knn")


def mlp(d_in: int, d_out: int, hidden: int, dropout: float, zero_out: bool = False) -> nn.Module:
    """A one-hidden-layer MLP; `hidden=0`: a linear map (keeps a linear encoder's geometry).
    `zero_out`: the last layer starts at zero, so the MLP is a residual that starts by adding nothing."""
    if not hidden:
        head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, d_out))
    else:
        head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout),
                             nn.Linear(hidden, d_out))
    if zero_out:
        nn.init.zeros_(head[-1].weight)
        nn.init.zeros_(head[-1].bias)
    return head


_PRINCIPAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # datamodule -> {k: projections}


def training_principal_projections(dm, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`principal_projections` of the datamodule's training split, computed once per datamodule and k: the
    encoder's start, the tasks' fixed reads and their baselines all see ΔW through them (seconds each time on
    minilm_text's 1536×384 modules)."""
    by_k = _PRINCIPAL.setdefault(dm, {})
    if k not in by_k:
        by_k[k] = principal_projections(dm.whole_split("train")["tokens"], dm.schema, k)
    return by_k[k]


class Projections(nn.Module):
    """The (Qᵤ, Qᵥ) per module type that a fixed read sees ΔW through, held as buffers so that they are saved with
    the checkpoint and the exported encoder: the fixed orthonormal ones of `dw` (seed 0) until `load` puts the
    training split's principal directions (`principal_projections`: the `dw_fit` reads) in their place."""

    K = 48

    def __init__(self, schema: TokenSchema):
        super().__init__()
        self.schema = schema
        for i, g in enumerate(schema.groups):
            for name, Q in zip(("Qu", "Qv"), fixed_projections(g, self.K, kind="orthonormal")):
                self.register_buffer(f"{name}_{i}", Q.float())
        self.register_buffer("fitted", torch.tensor(False))

    def projections(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"Qu_{i}"), getattr(self, f"Qv_{i}")) for i in range(len(self.schema.groups))]

    def load(self, projections: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for fitted, held in zip(projections, self.projections()):
            for Q, buf in zip(fitted, held):
                buf.copy_(Q)
        self.fitted.fill_(True)


class LinearPrior(nn.Module):
    """A linear read of fixed features, fitted in closed form on the training split and then frozen (buffers):
    what a warm-started model outputs before training. Its head is a residual that starts at zero, so the
    model starts as the best simple read (chosen on validation) and training can only add to it."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(d_in))
        self.register_buffer("weight", torch.zeros(d_out, d_in))
        self.register_buffer("bias", torch.zeros(d_out))
        self.register_buffer("fitted", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.to(self.mean) - self.mean) / self.scale) @ self.weight.T + self.bias

    def load(self, columns: slice, mean, scale, weight, bias) -> None:
        """Fit result of a read of the feature columns `columns` (the others keep weight 0)."""
        self.weight.zero_()
        for buf, value in ((self.mean[columns], mean), (self.scale[columns], scale), (self.weight[:, columns], weight),
                           (self.bias, bias)):
            buf.copy_(torch.as_tensor(np.asarray(value), dtype=buf.dtype).reshape(buf.shape))
        self.fitted.fill_(True)


# the read's weight λ in a blend (0: the trained model alone), finer near the ends: where the two outputs'
# scales differ (a contrastive cosine against ΔW's), an even mix of them sits near one end
BLEND_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class Task(nn.Module):
    """A head on the adapter embedding. `evaluate` scores a whole split at once (never per batch).

    `blend`: after training, the outputs become a mixture of the trained model's and a fixed simple read's
    (`read_outputs`), with the read's weight λ chosen on the validation split (`fit_blend`). A few hundred
    adapters teach a model things a linear read of ΔW misses and miss things it knows; choosing λ on
    validation keeps the better of both, and their mixture where the two err apart. λ = 0 while training.
    """

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]  # the report's metric columns
    primary: ClassVar[str]  # the main metric: what comparisons rank by
    baselines: ClassVar[tuple[str, ...]]  # the simple reads of docs/design.md §5 it scores beside every model
    uses_gallery: ClassVar[bool] = False  # evaluation also embeds the gallery (docs/design.md §5)
    embeds: ClassVar[bool] = False  # its outputs are an embedding space: the exported encoder embeds through it
    mode: ClassVar[str] = "max"
    monitor: str  # the validation metric checkpointing and early stopping follow
    blend: bool = False  # `init_blend`
    head: nn.Module

    def loss(self, emb: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def augment(self, batch: dict) -> dict:
        """A training batch as the encoder and the loss see it: a task may re-write adapters and their targets."""
        return batch

    def outputs(self, emb: torch.Tensor, tokens=None) -> torch.Tensor:
        """Per adapter: predictions, or the retrieval embedding (what `evaluate` takes), blended with the fixed
        read once `fit_blend` has chosen its weight; `tokens` feed the fixed reads."""
        out = self.model_outputs(emb, tokens)
        lam = float(self.blend_weight) if self.blend else 0.0
        return self.mix(out, self.read_outputs(tokens), lam) if lam > 0 else out

    def model_outputs(self, emb: torch.Tensor, tokens=None) -> torch.Tensor:
        """The trained model's outputs (with a warm start's fixed read, when the task has one)."""
        return self.head(emb)

    def init_blend(self, blend: bool) -> None:
        self.blend = blend
        if blend:  # λ < 0: not chosen yet (the outputs are the model's alone); saved with the checkpoint
            self.register_buffer("blend_weight", torch.tensor(-1.0))

    def read_outputs(self, tokens) -> torch.Tensor:
        """The fixed simple read the outputs are blended with, in the units of `outputs`."""
        raise NotImplementedError

    def mix(self, out: torch.Tensor, read: torch.Tensor, lam: float) -> torch.Tensor:
        """The blend of the model's outputs and the read's, the read weighted λ."""
        raise NotImplementedError

    @torch.no_grad()
    def fit_blend(self, out: torch.Tensor, val: dict) -> dict[float, float]:
        """Choose λ on `BLEND_GRID` by the main metric of the validation split (`out`: the model's outputs on it);
        ties go to the λ nearest 1/2, the plain average. Returns the validation score of every λ."""
        read = self.read_outputs(val["tokens"]).to(out)
        scores = {lam: self.evaluate(self.mix(out, read, lam) if lam else out, val)[self.primary] for lam in BLEND_GRID}
        sign = 1 if self.mode == "max" else -1
        self.blend_weight.fill_(max(BLEND_GRID, key=lambda lam: (sign * scores[lam], -abs(lam - 0.5))))
        return scores

    def evaluate(self, out: torch.Tensor, batch: dict) -> dict[str, float]:
        raise NotImplementedError

    def fit_read(self, X: np.ndarray, train: dict, kind: str = "linear", seed: int = 0):
        """A read of fixed features X fitted on the training split: a callable from features to outputs."""
        raise NotImplementedError

    def item_values(self, out: torch.Tensor, batch: dict) -> dict[str, np.ndarray]:
        """Per evaluated item (adapter, or query): what `primary_of` needs, so the main metric can be resampled
        over items (paired bootstrap across models, scripts/compare.py)."""
        raise NotImplementedError

    @staticmethod
    def primary_of(items: dict[str, np.ndarray], idx: np.ndarray | None = None) -> float:
        """The main metric of the items `idx` (all: None) of `item_values`: their mean unless a task says otherwise."""
        (values,) = items.values()
        return float(np.mean(values if idx is None else values[idx]))

    def baseline_outputs(self, dm, seed: int, stages: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
        """`{stage: {name: outputs}}` of every simple read in `baselines`, fitted on the training split once."""
        raise NotImplementedError

    def baseline_metrics(self, dm, seed: int, stages: tuple[str, ...],
                         outputs: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, float]:
        """`{stage}/baseline_{name}/{metric}` of the simple reads (of `outputs` when given)."""
        outputs = outputs or self.baseline_outputs(dm, seed, stages)
        out: dict[str, float] = {}
        for stage, by_name in outputs.items():
            split = dm.whole_split(stage)
            for name, x in by_name.items():
                out |= {f"{stage}/baseline_{name}/{k}": float(v) for k, v in self.evaluate(x, split).items()}
        return out

    def plot(self, fig, out: torch.Tensor, split: dict, info, metrics: dict[str, float]) -> str:
        """Draw the test split's picture, with its test metric in the title, on `fig`; returns the file stem."""
        raise NotImplementedError

    @classmethod
    def best_baseline(cls, metrics: dict[str, float]) -> str | None:
        """The simple read with the best validation score on the main metric: the bar a learned model must
        clear (chosen on validation, never on test). None without validation scores."""
        scored = {b: metrics[f"val/baseline_{b}/{cls.primary}"] for b in cls.baselines
                  if f"val/baseline_{b}/{cls.primary}" in metrics}
        return max(scored, key=lambda b: (scored[b], -cls.baselines.index(b))) if scored else None


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


@dataclass
class FittedRead:
    """A scikit-learn estimator on fixed features, returning what the task's `evaluate` takes."""

    task: PredictionTask
    est: Any

    def __call__(self, X: np.ndarray) -> torch.Tensor:
        return self.task.estimator_outputs(self.est, X)

    def num_parameters(self) -> int:
        """Fitted coefficients (linear) or stored training features (kNN)."""
        last = self.est[-1]
        if hasattr(last, "estimators_"):  # multi-label: one model per label
            return int(sum(np.size(e.coef_) + np.size(e.intercept_) for e in last.estimators_ if hasattr(e, "coef_")))
        coef = getattr(last, "coef_", None)
        if coef is not None:
            return int(np.size(coef) + np.size(getattr(last, "intercept_", 0)))
        return int(np.size(getattr(last, "_fit_X", 0)))


class PredictionTask(Task):
    """A task with targets: its simple reads are a linear model (logistic / ridge) on fixed features."""

    baselines = ("sketch", "dw", "spectrum", "dw+spectrum", "dw_fit", "dw_fit+spectrum")

    # the reads a warm-started model may start from and a blend mixes with, chosen on validation
    PRIOR_READS = ("dw", "spectrum", "dw+spectrum", "dw_fit", "dw_fit+spectrum")

    @staticmethod
    def features(tokens, schema, seed: int, sketch: bool = True,
                 principal: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        """(B, F) features of every simple read, each computed once: `spectrum` is blind to the singular
        vectors, `dw` reads ΔW/‖ΔW‖ (and log‖ΔW‖) through fixed projections, `dw_fit` through the training
        split's `principal` directions (when given), `a+b` is both side by side."""
        spectrum = spectral_features(tokens, schema)
        reads = {"dw": delta_w_features(tokens, schema, seed=seed, norms=True).double()}
        if principal is not None:
            reads["dw_fit"] = delta_w_features(tokens, schema, norms=True, projections=principal).double()
        out = {"spectrum": spectrum} | reads | {f"{k}+spectrum": torch.cat([v, spectrum], 1) for k, v in reads.items()}
        return out | {"sketch": sketch_features(tokens, schema, seed=seed)} if sketch else out

    def init_prior(self, info, d_out: int, warm_start: bool, blend: bool) -> None:
        """The `LinearPrior` on `dw+spectrum` (its `dw` through `prior_projections`) that a warm start adds the
        head to (the head must start at 0) and a blend mixes with: the best linear read on validation."""
        self.schema = TokenSchema.from_dict(info.schema)
        self.warm_start = warm_start
        self.init_blend(blend)
        if warm_start or blend:  # the features' width, from an adapter with no module
            empty = collate_tokens([tokenize([], self.schema)[0]])
            self.prior = LinearPrior(self.features(empty, self.schema, 0, sketch=False)["dw+spectrum"].shape[1], d_out)
            self.prior_projections = Projections(self.schema)
        else:
            self.prior = None

    def read_outputs(self, tokens) -> torch.Tensor:
        """The prior's outputs, in the units of `outputs`."""
        dw = delta_w_features(tokens, self.schema, norms=True, projections=self.prior_projections.projections())
        return self.prior(torch.cat([dw.double(), spectral_features(tokens, self.schema)], 1)).float()

    def prior_outputs(self, tokens) -> torch.Tensor | float:
        """What a warm start adds to the head (0 without one)."""
        return self.read_outputs(tokens) if self.warm_start else 0.0

    @torch.no_grad()
    def fit_prior(self, dm) -> str:
        """Fit every read of `PRIOR_READS` on the training split, load the best on validation into the prior (and,
        for a `dw_fit` read, the principal directions into `prior_projections`)."""
        train, val = dm.whole_split("train"), dm.whole_split("val")
        principal = training_principal_projections(dm, Projections.K)
        X_train, X_val = (self.features(s["tokens"], dm.schema, 0, sketch=False, principal=principal)
                          for s in (train, val))
        reads = {name: self.fit_read(X_train[name].numpy(), train) for name in self.PRIOR_READS}
        scores = {name: self.evaluate(read(X_val[name].numpy()), val)[self.primary] for name, read in reads.items()}
        best = max(self.PRIOR_READS, key=lambda name: (scores[name], -self.PRIOR_READS.index(name)))
        n_dw = X_train["dw"].shape[1]
        columns = slice(n_dw, None) if best == "spectrum" else slice(None) if "+" in best else slice(0, n_dw)
        if best.startswith("dw_fit"):
            self.prior_projections.load(principal)
        scaler, est = reads[best].est[0], reads[best].est[-1]
        self.prior.load(columns, scaler.mean_, scaler.scale_, *self.linear_coefficients(est))
        return best

    def linear_coefficients(self, est) -> tuple[np.ndarray, np.ndarray]:
        """(weight (d_out, F), bias (d_out,)) of a fitted linear estimator, in the units of the prior's outputs."""
        raise NotImplementedError

    def estimator(self, kind: str, seed: int):
        raise NotImplementedError

    def estimator_outputs(self, est, X: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def targets(self, split: dict) -> np.ndarray:
        raise NotImplementedError

    def fit_read(self, X, train, kind="linear", seed=0) -> FittedRead:
        if kind not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {kind!r}")
        return FittedRead(self, make_pipeline(StandardScaler(), self.estimator(kind, seed)).fit(X, self.targets(train)))

    def baseline_outputs(self, dm, seed, stages):
        train = dm.whole_split("train")
        principal = training_principal_projections(dm, Projections.K)
        X_train = self.features(train["tokens"], dm.schema, seed, principal=principal)
        X = {stage: self.features(dm.whole_split(stage)["tokens"], dm.schema, seed, principal=principal)
             for stage in stages}
        reads = {name: self.fit_read(X_train[name].numpy(), train, seed=seed) for name in self.baselines}
        return {stage: {name: read(X[stage][name].numpy()) for name, read in reads.items()} for stage in stages}
