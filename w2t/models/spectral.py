"""A non-neural baseline: scikit-learn on singular-value statistics of every module.

Per module position: the top-k log σᵢ, log‖ΔW‖_F, log‖ΔW‖_*, the effective rank exp(H(σ²/Σσ²)),
the stable rank ‖ΔW‖²_F/σ₁² and a presence flag. All are functions of the singular values, so
they are invariant to every factorization; they ignore the singular *vectors*, i.e. what the
update does, and keep only how big and how spread it is. Fitted on the training split (no
gradient descent): logistic / ridge / kNN by `estimator`; retrieval ranks by cosine of the
standardized features.
"""
from __future__ import annotations

import numpy as np
import torch

from w2t.baselines import estimator_outputs, fit_estimator
from w2t.datamodule import DataInfo
from w2t.tasks import TASKS
from w2t.tokens import TokenSchema, Tokens


def spectral_features(tokens: Tokens, schema: TokenSchema, top_k: int = 4) -> np.ndarray:
    """(B, F) singular-value statistics per module position; zeros where a module is absent."""
    feats = []
    for g in schema.groups:
        t = tokens[g.name]
        s = (t["s"].double() * t["mask"]).clamp_min(0)  # (B, L, R), descending
        present = t["mask"].any(-1)
        k = min(top_k, s.shape[-1])
        top = torch.zeros(*s.shape[:-1], top_k, dtype=s.dtype)
        top[..., :k] = torch.log(s[..., :k] + 1e-8)
        fro2 = (s**2).sum(-1)
        p = s**2 / fro2.clamp_min(1e-30).unsqueeze(-1)
        eff = torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum(-1))
        stable = fro2 / (s[..., 0] ** 2).clamp_min(1e-30)
        stats = torch.stack([0.5 * torch.log(fro2 + 1e-16), torch.log(s.sum(-1) + 1e-8), eff, stable], -1)
        f = torch.cat([top, stats], -1) * present.unsqueeze(-1)
        feats.append(torch.cat([f, present.unsqueeze(-1).double()], -1).flatten(1))
    return torch.cat(feats, 1).numpy()


class SpectralModel:
    """Selected by `model=spectral`; `run.train` fits it where it would train an encoder."""

    arch = "spectral"

    def __init__(self, task: str, info: dict, head: dict | None = None, estimator: str = "linear", top_k: int = 4,
                 seed: int = 0, input: str = "canonical"):
        # `head` and `input` are accepted so every model= config instantiates alike (no neural head here;
        # singular values are the same in either representation only when canonical, so that is the default)
        self.task_name, self.estimator, self.top_k, self.seed = task, estimator, top_k, seed
        self.schema = TokenSchema.from_dict(info["schema"])
        self.task = TASKS[task](1, DataInfo(**info))  # for its metrics and monitor only
        self.est = None
        self.scaler_mean = self.scaler_std = None

    @property
    def monitor(self) -> tuple[str, str]:
        return self.task.monitor, self.task.mode

    def num_parameters(self) -> int:
        """Fitted coefficients (linear) or stored training features (kNN)."""
        if self.est is None:
            return 0
        last = self.est[-1]
        coef = getattr(last, "coef_", None)
        if coef is not None:
            return int(np.size(coef) + np.size(getattr(last, "intercept_", 0)))
        if hasattr(last, "estimators_"):  # multi-label: one model per label
            return int(sum(np.size(e.coef_) + np.size(e.intercept_) for e in last.estimators_ if hasattr(e, "coef_")))
        return int(np.size(getattr(last, "_fit_X", 0)))

    def fit(self, train: dict) -> SpectralModel:
        X = spectral_features(train["tokens"], self.schema, self.top_k)
        self.scaler_mean, self.scaler_std = X.mean(0), X.std(0) + 1e-12
        if self.task_name != "retrieval":
            self.est = fit_estimator(self.task, self.task_name, X, train, self.estimator, self.seed)
        return self

    def __call__(self, tokens: Tokens) -> torch.Tensor:
        """Outputs the task's `evaluate` takes: logits, predictions, or retrieval embeddings."""
        X = spectral_features(tokens, self.schema, self.top_k)
        if self.task_name == "retrieval":
            return torch.as_tensor((X - self.scaler_mean) / self.scaler_std, dtype=torch.float32)
        return estimator_outputs(self.est, X, self.task_name, getattr(self.task, "n", 0),
                                 getattr(self.task, "multilabel", False))
