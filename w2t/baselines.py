"""Non-learned reference points printed beside every result (DESIGN §5).

* raw: the flattened factors (A, B) as they sit in the files: not invariant to any symmetry.
* sketch: a fixed random projection Rᵤᵀ ΔW Rᵥ of each module's update (k×k), computed from the
  canonical tokens without forming ΔW; invariant, and a strong linear baseline in practice.
Retrieval ranks by cosine of these features; classification and performance fit a linear model
(logistic / ridge) on the sketch features of the training split.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.preprocessing import StandardScaler

from w2t.adapter import Adapter
from w2t.tokens import TokenSchema, Tokens


def _seeded(name: str, seed: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def sketch_features(tokens: Tokens, schema: TokenSchema, k: int = 8, seed: int = 0) -> torch.Tensor:
    """(B, F) features: per module position, the k×k sketch Rᵤᵀ U diag(S) Vᵀ Rᵥ (zeros when absent)."""
    feats = []
    for g in schema.groups:
        t = tokens[g.name]
        gen = _seeded(g.name, seed)
        Ru = torch.randn(g.m, k, generator=gen, dtype=torch.float64) / g.m**0.5
        Rv = torch.randn(g.n, k, generator=gen, dtype=torch.float64) / g.n**0.5
        s = (t["s"] * t["mask"]).double()  # (B, L, R)
        pu = t["u"].double() @ Ru  # (B, L, R, k)
        pv = t["v"].double() @ Rv  # (B, L, R, k)
        sk = torch.einsum("blri,blr,blrj->blij", pu, s, pv)  # (B, L, k, k)
        feats.append(sk.flatten(1))
    return torch.cat(feats, 1).float()


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


def linear_baseline(task: str, X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, seed: int = 0) -> np.ndarray:
    """Fit on the training split; return class probabilities (classification) or predictions."""
    scaler = StandardScaler().fit(X_train)
    Xtr, Xte = scaler.transform(X_train), scaler.transform(X_test)
    if task == "performance":
        return RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(Xtr, y_train).predict(Xte)
    if y_train.ndim == 2:  # multi-label: one logistic model per column
        return np.stack([_logistic(Xtr, y_train[:, j], Xte, seed)[:, -1] for j in range(y_train.shape[1])], 1)
    return _logistic(Xtr, y_train, Xte, seed)


def _logistic(Xtr, ytr, Xte, seed):
    clf = LogisticRegression(C=0.1, max_iter=2000, random_state=seed).fit(Xtr, ytr)
    proba = np.zeros((len(Xte), int(max(ytr.max() + 1, 2))))
    proba[:, clf.classes_.astype(int)] = clf.predict_proba(Xte)
    return proba
