"""Non-learned reference points printed beside every result (DESIGN §5).

* raw: the flattened factors (A, B) as they sit in the files: not invariant to any symmetry.
* sketch: a fixed random projection Rᵤᵀ ΔW Rᵥ of each module's update (k×k), computed from the
  canonical tokens without forming ΔW; invariant.
* dw: each module's ΔW/‖ΔW‖ seen through fixed orthonormal Qᵤ, Qᵥ (exact when k ≥ m, n), plus
  log‖ΔW‖ per module for the fitted models: the "simple invariant model" a learned encoder has to
  beat (on digits its cosine retrieves far better than the k=8 sketch's).
Retrieval ranks by cosine of these features; classification and performance fit a linear model
(logistic / ridge) on the features of the training split.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.multioutput import MultiOutputClassifier
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from w2t.adapter import Adapter
from w2t.tokens import GroupSpec, TokenSchema, Tokens


def _seeded(name: str, seed: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def sketch_matrices(group: GroupSpec, k: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed Gaussian projections (Rᵤ: m×k, Rᵥ: n×k) of one module type, seeded by its name."""
    gen = _seeded(group.name, seed)
    Ru = torch.randn(group.m, k, generator=gen, dtype=torch.float64) / group.m**0.5
    Rv = torch.randn(group.n, k, generator=gen, dtype=torch.float64) / group.n**0.5
    return Ru, Rv


def sketch_features(tokens: Tokens, schema: TokenSchema, k: int = 8, seed: int = 0) -> torch.Tensor:
    """(B, F) features: per module position, the k×k sketch Rᵤᵀ U diag(S) Vᵀ Rᵥ (zeros when absent)."""
    feats = []
    for g in schema.groups:
        t = tokens[g.name]
        Ru, Rv = (R.to(t["u"].device) for R in sketch_matrices(g, k, seed))
        s = (t["s"] * t["mask"]).double()  # (B, L, R)
        pu = t["u"].double() @ Ru  # (B, L, R, k)
        pv = t["v"].double() @ Rv  # (B, L, R, k)
        sk = torch.einsum("blri,blr,blrj->blij", pu, s, pv)  # (B, L, k, k)
        feats.append(sk.flatten(1))
    return torch.cat(feats, 1).float()


def orthonormal_matrices(group: GroupSpec, k: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed Qᵤ (m×min(k, m)) and Qᵥ (n×min(k, n)) with orthonormal columns, seeded by the type's name."""
    gen = _seeded(group.name, seed)
    qu = torch.linalg.qr(torch.randn(group.m, min(k, group.m), generator=gen, dtype=torch.float64))[0]
    qv = torch.linalg.qr(torch.randn(group.n, min(k, group.n), generator=gen, dtype=torch.float64))[0]
    return qu, qv


def delta_w_features(tokens: Tokens, schema: TokenSchema, k: int = 48, seed: int = 0,
                     norms: bool = False) -> torch.Tensor:
    """(B, F): per module position Qᵤᵀ (ΔW/‖ΔW‖) Qᵥ (zeros when absent); `norms` appends log‖ΔW‖ per
    module (0 when absent). Cosines of these are mean cosines of the modules' normalized updates."""
    feats, logs = [], []
    for g in schema.groups:
        t = tokens[g.name]
        Qu, Qv = (Q.to(t["u"].device) for Q in orthonormal_matrices(g, k, seed))
        s, u, v = (t["s"] * t["mask"]).double(), t["u"].double(), t["v"].double()  # (B, L, R), ...
        gram = (u @ u.transpose(-1, -2)) * (v @ v.transpose(-1, -2))  # (B, L, R, R); the identity if canonical
        norm = torch.einsum("blr,blrq,blq->bl", s, gram, s).clamp_min(0).sqrt()  # ‖ΔW‖_F of any factorization
        w = s / norm.clamp_min(1e-300).unsqueeze(-1)
        sk = torch.einsum("blri,blr,blrj->blij", u @ Qu, w, v @ Qv)
        feats.append(sk.flatten(1))
        logs.append(torch.where(norm > 0, torch.log(norm.clamp_min(1e-300)), 0.0))
    return torch.cat(feats + (logs if norms else []), 1).float()


def raw_features(adapter: Adapter, schema: TokenSchema) -> torch.Tensor:
    """(F,) the adapter's factors flattened in schema order, rank-padded, zeros where absent."""
    parts = []
    by_pos = {(m.module_type, *m.shape, m.layer): m for m in adapter.modules}
    for g in schema.groups:
        for layer in g.layers:
            A = torch.zeros(g.max_rank, g.n)
            B = torch.zeros(g.m, g.max_rank)
            mod = by_pos.get((g.module_type, g.m, g.n, layer))
            if mod is not None and mod.rank <= g.max_rank:
                A[: mod.rank] = mod.A.float()
                B[:, : mod.rank] = mod.B.float()
            parts += [A.flatten(), B.flatten()]
    return torch.cat(parts)


ESTIMATORS = ("linear", "knn")


def make_estimator(task: str, kind: str = "linear", seed: int = 0, multilabel: bool = False):
    """A scikit-learn pipeline (standardize → estimator) for a task: `linear` is logistic regression
    (C=0.1) or RidgeCV; `knn` is a 5-nearest-neighbour vote or average."""
    if kind not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {kind!r}")
    if task == "performance":
        est = RidgeCV(alphas=np.logspace(-2, 4, 13)) if kind == "linear" else KNeighborsRegressor(5, weights="distance")
    else:
        est = (LogisticRegression(C=0.1, max_iter=2000, random_state=seed) if kind == "linear"
               else KNeighborsClassifier(5, weights="distance"))
        if multilabel:
            est = MultiOutputClassifier(est)
    return make_pipeline(StandardScaler(), est)


def estimator_outputs(est, X: np.ndarray, task: str, n_outputs: int = 0, multilabel: bool = False) -> torch.Tensor:
    """What the task's `evaluate` takes: predictions (performance) or logits over all `n_outputs` classes."""
    if task == "performance":
        return torch.as_tensor(est.predict(X), dtype=torch.float32)
    if multilabel:  # one binary model per label: logit of P(label = 1)
        p = np.stack([pr[:, -1] if pr.shape[1] > 1 else np.zeros(len(X)) for pr in est.predict_proba(X)], 1)
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return torch.as_tensor(np.log(p / (1 - p)), dtype=torch.float32)
    proba = np.full((len(X), n_outputs), 1e-7)
    proba[:, est.classes_.astype(int)] = np.clip(est.predict_proba(X), 1e-7, None)
    return torch.as_tensor(np.log(proba), dtype=torch.float32)


def fit_estimator(task_head, task: str, X: np.ndarray, split: dict, kind: str = "linear", seed: int = 0):
    """Fit `make_estimator` on features X of a split (`DataModule.whole_split`), with the task's targets."""
    multilabel = getattr(task_head, "multilabel", False)
    key = "target" if task == "performance" else ("labels" if multilabel else "label")
    return make_estimator(task, kind, seed, multilabel).fit(X, split[key].numpy())


def fit_outputs(task_head, task: str, X_train: np.ndarray, train: dict, X_eval: list[np.ndarray], kind: str = "linear",
                seed: int = 0) -> list[torch.Tensor]:
    """Fit once on the training split, return the task's outputs on each of X_eval (for `task_head.evaluate`)."""
    est = fit_estimator(task_head, task, X_train, train, kind, seed)
    n, multilabel = getattr(task_head, "n", 0), getattr(task_head, "multilabel", False)
    return [estimator_outputs(est, X, task, n, multilabel) for X in X_eval]
