"""What a task is: one object that owns its head, loss, metrics, simple baselines, plot and report columns.

A task is found by name in `TASKS` (`task.name` in the config); nothing outside it asks which task
it is. A new task is one module in this folder (it registers itself with `@register`) and one
config in `configs/task/`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from w2t.models.features import delta_w_features, sketch_features, spectral_features

ESTIMATORS = ("linear", "knn")


def mlp(d_in: int, d_out: int, hidden: int, dropout: float) -> nn.Module:
    """A one-hidden-layer MLP; `hidden=0`: a linear map (keeps a linear encoder's geometry)."""
    if not hidden:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, d_out))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_out))


class Task(nn.Module):
    """A head on the adapter embedding. `evaluate` scores a whole split at once (never per batch)."""

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]  # the report's metric columns
    primary: ClassVar[str]  # the main metric: what comparisons rank by
    baselines: ClassVar[tuple[str, ...]]  # the simple reads of docs/design.md §5 it scores beside every model
    uses_gallery: ClassVar[bool] = False  # evaluation also embeds the gallery (docs/design.md §5)
    mode: ClassVar[str] = "max"
    monitor: str  # the validation metric checkpointing and early stopping follow
    head: nn.Module

    def loss(self, emb: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def outputs(self, emb: torch.Tensor) -> torch.Tensor:
        """Per adapter: predictions, or the retrieval embedding (what `evaluate` takes)."""
        return self.head(emb)

    def evaluate(self, out: torch.Tensor, batch: dict) -> dict[str, float]:
        raise NotImplementedError

    def fit_read(self, X: np.ndarray, train: dict, kind: str = "linear", seed: int = 0):
        """A read of fixed features X fitted on the training split: a callable from features to outputs."""
        raise NotImplementedError

    def baseline_metrics(self, dm, seed: int, stages: tuple[str, ...]) -> dict[str, float]:
        """`{stage}/baseline_{name}/{metric}` of every simple read in `baselines`, fitted on the training split once."""
        raise NotImplementedError

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

    baselines = ("sketch", "dw", "spectrum", "dw+spectrum")

    @staticmethod
    def features(tokens, schema, seed: int) -> dict[str, np.ndarray]:
        """(B, F) features of every simple read, each computed once: `spectrum` is blind to the singular
        vectors, `dw` reads ΔW/‖ΔW‖ (and log‖ΔW‖), `dw+spectrum` is both side by side."""
        dw = delta_w_features(tokens, schema, seed=seed, norms=True).numpy()
        spectrum = spectral_features(tokens, schema)
        return {"sketch": sketch_features(tokens, schema, seed=seed).numpy(), "dw": dw, "spectrum": spectrum,
                "dw+spectrum": np.concatenate([dw, spectrum], 1)}

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

    def baseline_metrics(self, dm, seed, stages):
        splits = {stage: dm.whole_split(stage) for stage in stages}
        train = dm.whole_split("train")
        X_train = self.features(train["tokens"], dm.schema, seed)
        X = {stage: self.features(split["tokens"], dm.schema, seed) for stage, split in splits.items()}
        out: dict[str, float] = {}
        for name in self.baselines:
            read = self.fit_read(X_train[name], train, seed=seed)
            for stage, split in splits.items():
                out |= {f"{stage}/baseline_{name}/{k}": float(v) for k, v in self.evaluate(read(X[stage][name]), split).items()}
        return out
