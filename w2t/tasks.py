"""Task heads on the adapter embedding: one class per task, chosen by name from `TASKS`.

Each task declares its monitored metric once (`monitor`, `mode`); checkpointing and early stopping
read it from here. Evaluation metrics are computed over the whole split (see `evaluate`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.functional import (
    auroc,
    kendall_rank_corrcoef,
    mean_absolute_error,
    r2_score,
    spearman_corrcoef,
)
from torchmetrics.functional.classification import accuracy, f1_score

from w2t.retrieval import retrieval_metrics


def _mlp(d_in: int, d_out: int, hidden: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_out))


class Task(nn.Module):
    monitor: str
    mode: str

    def loss(self, emb: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def outputs(self, emb: torch.Tensor) -> torch.Tensor:
        """What evaluation keeps per adapter (predictions or retrieval embeddings)."""
        return self.head(emb)

    def evaluate(self, out: torch.Tensor, batch: dict) -> dict[str, float]:
        raise NotImplementedError


class Classification(Task):
    """Multi-class (cross-entropy) over `label_column`, or multi-label (BCE) over `label_columns`."""

    mode = "max"

    def __init__(self, d: int, info, hidden: int = 64, dropout: float = 0.1, label_smoothing: float = 0.0):
        super().__init__()
        self.multilabel = bool(info.label_columns)
        self.n = len(info.label_columns) if self.multilabel else len(info.classes)
        if self.n < 2:
            raise ValueError("classification needs data.label_column with ≥ 2 classes or data.label_columns")
        self.monitor = "val/auroc" if self.multilabel else "val/acc"
        self.head = _mlp(d, self.n, hidden, dropout)
        self.label_smoothing = label_smoothing

    def loss(self, emb, batch):
        logits = self.head(emb)
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, batch["labels"])
        return F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)

    def evaluate(self, out, batch):
        keep = batch["in_split"]
        logits = out[keep].float()
        if self.multilabel:
            y = batch["labels"][keep].long()
            p = torch.sigmoid(logits)
            kw = dict(task="multilabel", num_labels=self.n)
            return {"acc": accuracy(p, y, average="micro", **kw).item(), "macro_f1": f1_score(p, y, average="macro", **kw).item(),
                    "auroc": auroc(p, y, average="macro", **kw).item()}
        y = batch["label"][keep]
        p = logits.softmax(-1)
        kw = dict(task="multiclass", num_classes=self.n)
        return {"acc": accuracy(p, y, average="micro", **kw).item(), "macro_f1": f1_score(p, y, average="macro", **kw).item(),
                "auroc": auroc(p, y, average="macro", **kw).item()}


class Regression(Task):
    """Performance prediction: MSE on the standardized `target_column`, metrics in its own units."""

    monitor = "val/spearman"
    mode = "max"

    def __init__(self, d: int, info, hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        self.head = _mlp(d, 1, hidden, dropout)
        self.mean, self.std = info.target_mean, info.target_std

    def outputs(self, emb):
        return self.head(emb).squeeze(-1) * self.std + self.mean

    def loss(self, emb, batch):
        z = (batch["target"] - self.mean) / self.std
        return F.mse_loss(self.head(emb).squeeze(-1), z)

    def evaluate(self, out, batch):
        keep = batch["in_split"]
        p, y = out[keep].double(), batch["target"][keep].double()
        return {"r2": r2_score(p, y).item(), "spearman": spearman_corrcoef(p, y).item(),
                "kendall": kendall_rank_corrcoef(p, y).item(), "mae": mean_absolute_error(p, y).item()}


class Retrieval(Task):
    """Supervised contrastive (InfoNCE) on groups; ranked by cosine of the projected embedding.

    `proxy_weight` adds a learned proxy per group (normalized-softmax cross-entropy): with a few
    hundred adapters over tens of groups a batch holds about one positive per anchor, so the
    contrastive term alone gets little signal; the proxies see every group at every step.
    """

    mode = "max"

    def __init__(self, d: int, info, hidden: int = 64, proj_dim: int = 64, temperature: float = 0.1, dropout: float = 0.0,
                 monitor: str = "val/map", proxy_weight: float = 0.0):
        super().__init__()
        if monitor not in {f"val/{k}" for k in ("mrr", "map", "hit@1", "hit@10", "ndcg@10")}:
            raise ValueError(f"retrieval monitor must be a val/ retrieval metric, got {monitor!r}")
        self.monitor = monitor
        if info.num_groups < 2:
            raise ValueError("retrieval needs data.group_column with ≥ 2 groups")
        self.head = _mlp(d, proj_dim, hidden, dropout)
        self.temperature = temperature
        self.proxy_weight = proxy_weight
        self.proxies = nn.Parameter(torch.randn(info.num_groups, proj_dim)) if proxy_weight > 0 else None

    def outputs(self, emb):
        return F.normalize(self.head(emb), dim=-1)

    def loss(self, emb, batch):
        z = self.outputs(emb)
        loss = supcon_loss(z, batch["group"], self.temperature)
        if self.proxies is not None:
            logits = z @ F.normalize(self.proxies, dim=-1).T / self.temperature
            loss = loss + self.proxy_weight * F.cross_entropy(logits, batch["group"])
        return loss

    def evaluate(self, out, batch):
        q = batch["in_split"] & batch["is_query"]
        g = batch["in_gallery"]
        g_idx = torch.full((len(out),), -1, dtype=torch.long, device=out.device)
        g_idx[g] = torch.arange(int(g.sum()), device=out.device)
        return retrieval_metrics(out[q], batch["group"][q], out[g], batch["group"][g], query_in_gallery=g_idx[q])


def supcon_loss(z: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """Khosla et al. supervised contrastive loss; anchors without a positive in the batch are skipped."""
    sim = z @ z.T / temperature  # (B, B)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    pos = (groups[:, None] == groups[None, :]) & ~eye
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not has.any():
        return z.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~pos, 0.0)).sum(1)[has] / n_pos[has]
    return per_anchor.mean()


TASKS: dict[str, type[Task]] = {"classification": Classification, "performance": Regression, "retrieval": Retrieval}
