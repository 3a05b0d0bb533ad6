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

from w2t.baselines import delta_w_features, sketch_features
from w2t.retrieval import retrieval_metrics
from w2t.tokens import Tokens, TokenSchema


def _mlp(d_in: int, d_out: int, hidden: int, dropout: float) -> nn.Module:
    """A one-hidden-layer MLP; `hidden=0`: a linear map (keeps a linear encoder's geometry)."""
    if not hidden:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, d_out))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_out))


class Task(nn.Module):
    monitor: str
    mode: str

    def loss(self, emb: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def outputs(self, emb: torch.Tensor, tokens: Tokens | None = None) -> torch.Tensor:
        """Per adapter: predictions, or the retrieval embedding."""
        return self.head(emb)

    def eval_outputs(self, emb: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """What whole-split evaluation keeps per adapter (`score` turns it into metrics)."""
        return self.outputs(emb, tokens)

    def score(self, kept: torch.Tensor, batch: dict, calibrate: bool = False) -> dict[str, float]:
        """Metrics of a whole split from `eval_outputs`; `calibrate`: the validation pass may fit
        post-hoc settings of the head (saved with the checkpoint, then used on test)."""
        return self.evaluate(kept, batch)

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

    def outputs(self, emb, tokens=None):
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

    `sketch_fusion` λ appends the fixed invariant sketch of ΔW (the baseline of DESIGN §5) to the
    embedding as [√(1-λ)·z, √λ·s] with both parts unit-norm, so cosine ranks by (1-λ)·cos z + λ·cos s:
    the sketch keeps the direction of each update, which a few hundred training adapters cannot
    teach; the learned part adds what the sketch misses. "auto" picks λ on every validation pass
    (grid, the monitored metric); the chosen λ is a buffer, saved with the checkpoint. 0: off.

    `geometry` weights a second term, `neighbourhood_loss`: the contrastive loss alone separates
    the training groups and forgets how unseen ones lie; keeping each adapter's neighbourhood of
    normalized-ΔW cosines (softmax at `geometry_temperature`) is what carries over to open-set
    retrieval (`experiment=retrieval_open`). 0: off.
    """

    mode = "max"
    FUSION_GRID = torch.linspace(0, 1, 21).tolist()
    SKETCH_SEED = 0  # fixed: the sketch is part of the model, not of the run's seed

    def __init__(self, d: int, info, hidden: int = 64, proj_dim: int = 64, temperature: float = 0.1, dropout: float = 0.0,
                 monitor: str = "val/mrr", sketch_fusion: float | str = 0.0, sketch_dim: int = 8,
                 geometry: float = 0.0, geometry_temperature: float = 0.05):
        super().__init__()
        if monitor not in {f"val/{k}" for k in ("mrr", "map", "hit@1", "hit@10", "ndcg@10")}:
            raise ValueError(f"retrieval monitor must be a val/ retrieval metric, got {monitor!r}")
        self.monitor = monitor
        if info.num_groups < 2:
            raise ValueError("retrieval needs data.group_column with ≥ 2 groups")
        self.head = _mlp(d, proj_dim, hidden, dropout)
        self.temperature = temperature
        self.auto_fusion = sketch_fusion == "auto"
        if not self.auto_fusion and not (isinstance(sketch_fusion, (int, float)) and 0 <= sketch_fusion <= 1):
            raise ValueError(f"sketch_fusion must be 'auto' or a weight in [0, 1], got {sketch_fusion!r}")
        self.register_buffer("fusion", torch.tensor(0.5 if self.auto_fusion else float(sketch_fusion)))
        self.fused = self.auto_fusion or sketch_fusion > 0
        self.schema = TokenSchema.from_dict(info.schema)
        self.proj_dim, self.sketch_dim = proj_dim, sketch_dim
        self.geometry, self.geometry_temperature = geometry, geometry_temperature

    def _learned(self, emb):
        return F.normalize(self.head(emb), dim=-1)

    def eval_outputs(self, emb, tokens):
        """[z, s], each unit-norm and unweighted, so that validation can choose λ."""
        z = self._learned(emb)
        if not self.fused:
            return z
        s = sketch_features(tokens, self.schema, k=self.sketch_dim, seed=self.SKETCH_SEED).to(z)
        return torch.cat([z, F.normalize(s, dim=-1)], -1)

    def _fuse(self, parts, lam: float):
        z, s = parts[:, : self.proj_dim], parts[:, self.proj_dim:]
        return torch.cat([(1 - lam) ** 0.5 * z, lam**0.5 * s], -1)

    def outputs(self, emb, tokens=None):
        if not self.fused:
            return self._learned(emb)
        if tokens is None:
            raise ValueError("this retrieval head fuses the ΔW sketch: outputs() needs the tokens")
        return self._fuse(self.eval_outputs(emb, tokens), float(self.fusion))

    def score(self, kept, batch, calibrate=False):
        if not self.fused:
            return self.evaluate(kept, batch)
        if calibrate and self.auto_fusion:
            key = self.monitor.removeprefix("val/")
            scores = [self.evaluate(self._fuse(kept, lam), batch)[key] for lam in self.FUSION_GRID]
            self.fusion.fill_(self.FUSION_GRID[max(range(len(scores)), key=scores.__getitem__)])  # first best
        lam = float(self.fusion)
        learned = {f"learned/{k}": v for k, v in self.evaluate(self._fuse(kept, 0.0), batch).items()}
        return self.evaluate(self._fuse(kept, lam), batch) | learned | {"fusion": lam}

    def loss(self, emb, batch):
        z = self._learned(emb)
        loss = supcon_loss(z, batch["group"], self.temperature)
        if self.geometry:
            teacher = delta_w_features(batch["tokens"], self.schema).to(z)
            loss = loss + self.geometry * neighbourhood_loss(z, teacher, self.temperature, self.geometry_temperature)
        return loss

    def evaluate(self, out, batch):
        q = batch["in_split"] & batch["is_query"]
        g = batch["in_gallery"]
        g_idx = torch.full((len(out),), -1, dtype=torch.long, device=out.device)
        g_idx[g] = torch.arange(int(g.sum()), device=out.device)
        return retrieval_metrics(out[q], batch["group"][q], out[g], batch["group"][g], query_in_gallery=g_idx[q])


def neighbourhood_loss(z: torch.Tensor, teacher: torch.Tensor, temperature: float, teacher_temperature: float) -> torch.Tensor:
    """KL from the teacher's neighbour distribution (softmax of its cosines, self excluded) to the
    embedding's: keeps who is near whom in ΔW, not the cosines themselves, so it can sit beside a
    contrastive loss that pulls groups together."""
    t = F.normalize(teacher, dim=-1)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_p = F.log_softmax((t @ t.T / teacher_temperature).masked_fill(eye, float("-inf")), dim=1)
    log_q = F.log_softmax((z @ z.T / temperature).masked_fill(eye, float("-inf")), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).masked_fill(eye, 0.0).sum(1)
    return kl.mean()


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
