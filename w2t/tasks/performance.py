"""Performance prediction: MSE on the standardized `target_column`, metrics in its own units."""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import RidgeCV
from sklearn.neighbors import KNeighborsRegressor
from torchmetrics.functional import kendall_rank_corrcoef, mean_absolute_error, r2_score, spearman_corrcoef

from w2t.tasks.base import PredictionTask, mlp, register


@register
class Performance(PredictionTask):
    name = "performance"
    columns = ("r2", "spearman", "kendall", "mae")
    primary = "spearman"
    monitor = "val/spearman"

    def __init__(self, d: int, info, hidden: int = 64, dropout: float = 0.1, warm_start: bool = False,
                 blend: bool = False):
        super().__init__()
        self.head = mlp(d, 1, hidden, dropout, zero_out=warm_start)
        self.init_prior(info, 1, warm_start, blend)
        self.mean, self.std = info.target_mean, info.target_std

    def model_outputs(self, emb, tokens=None):
        """Predictions in the target's units: the prior's, or the target's mean, plus the head's in std units."""
        start = self.prior_outputs(tokens) if self.warm_start else self.mean
        return self.head(emb).squeeze(-1) * self.std + start

    def read_outputs(self, tokens):
        return super().read_outputs(tokens).squeeze(-1)

    def mix(self, out, read, lam):
        return (1 - lam) * out + lam * read

    def loss(self, emb, batch):
        return ((self.model_outputs(emb, batch["tokens"]) - batch["target"]) / self.std).square().mean()  # MSE in std units

    def evaluate(self, out, batch):
        keep = batch["in_split"]
        p, y = out[keep].double(), batch["target"][keep].double()
        return {"r2": r2_score(p, y).item(), "spearman": spearman_corrcoef(p, y).item(),
                "kendall": kendall_rank_corrcoef(p, y).item(), "mae": mean_absolute_error(p, y).item()}

    def item_values(self, out, batch):
        keep = batch["in_split"]
        return {"pred": out[keep].double().cpu().numpy(), "target": batch["target"][keep].double().cpu().numpy()}

    @staticmethod
    def primary_of(items, idx=None):
        """Spearman's ρ of the items `idx`: not a mean over items, so it is recomputed on each resample."""
        p, y = (items[k] if idx is None else items[k][idx] for k in ("pred", "target"))
        return float(spearmanr(p, y).statistic)

    # ---- the simple reads: ridge regression (α by cross-validation) or 5-nearest-neighbour averaging ----
    def estimator(self, kind, seed):
        return RidgeCV(alphas=np.logspace(-2, 4, 13)) if kind == "linear" else KNeighborsRegressor(5, weights="distance")

    def targets(self, split):
        return split["target"].numpy()

    def linear_coefficients(self, est):
        return est.coef_.reshape(1, -1), np.atleast_1d(est.intercept_)

    def estimator_outputs(self, est, X):
        return torch.as_tensor(est.predict(X), dtype=torch.float32)

    def plot(self, fig, out, split, info, metrics):
        ax = fig.add_subplot()
        keep = split["in_split"]
        y, p = split["target"][keep].numpy(), out[keep].numpy()
        ax.scatter(y, p, s=12, alpha=0.7)
        lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(xlabel="true", ylabel="predicted",
               title=f"performance (test): Spearman {metrics['test/spearman']:.3f}, R² {metrics['test/r2']:.3f}")
        return "pred_vs_true"
