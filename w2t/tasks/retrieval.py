"""Adapter retrieval (docs/design.md §5): queries rank the gallery by cosine of their embeddings; relevant = same group.

A query never retrieves itself. Metrics are computed over the whole split at once (never averaged
per batch); queries with no relevant gallery item are left out and counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from w2t.data.tokens import TokenSchema
from w2t.models.features import delta_w_features, delta_w_gram, gram_embedding, raw_features, sketch_features
from w2t.tasks.base import Projections, Task, mlp, register, training_principal_projections


@dataclass
class Standardize:
    """The fitted read of fixed features for retrieval: standardized with the training split's statistics."""

    mean: np.ndarray
    std: np.ndarray

    def __call__(self, X: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((X - self.mean) / self.std, dtype=torch.float32)

    def num_parameters(self) -> int:
        return 0


class ProjectedRead(Projections):
    """The read a retrieval model blends with (and a warm start or the neighbourhood loss keeps): the normalized
    `dw` features through its projections (the `dw_fit` read once `load` has put the principal directions in)."""

    def forward(self, tokens) -> torch.Tensor:
        return F.normalize(delta_w_features(tokens, self.schema, projections=self.projections()), dim=-1)


@register
class Retrieval(Task):
    """Supervised contrastive (InfoNCE) on groups; ranked by cosine of the projected embedding.

    `neighbourhood_weight` weights a second term, `neighbourhood_loss`: the contrastive loss alone
    separates the training groups and forgets how unseen ones lie; keeping each adapter's
    neighbourhood of normalized-ΔW cosines (softmax at `neighbourhood_temperature`) is what carries
    over to open-set retrieval (`experiment=retrieval_open`). 0: off.

    The fixed read (`prior`, a `ProjectedRead`) is `dw_fit`: normalized ΔW through the training split's principal
    directions, fitted when training starts (`fit_prior`). `warm_start`: the embedding is the read beside the
    head's projection, which starts at zero: ranking starts as the read's cosine, and training adds what it
    learns to it. `blend` (Task): after training, the cosine becomes (1 − λ)·the model's + λ·the read's, λ chosen
    on validation.
    """

    name = "retrieval"
    columns = ("mrr", "hit@1", "hit@10", "ndcg@10", "map")
    primary = "mrr"
    baselines = ("raw", "sketch", "dw", "dw_white", "dw_fit", "dw_exact")
    uses_gallery = True
    embeds = True

    def __init__(self, d: int, info, hidden: int = 64, proj_dim: int = 64, temperature: float = 0.1, dropout: float = 0.0,
                 monitor: str = "val/mrr", neighbourhood_weight: float = 0.0, neighbourhood_temperature: float = 0.05,
                 warm_start: bool = False, blend: bool = False):
        super().__init__()
        if monitor not in {f"val/{k}" for k in self.columns}:
            raise ValueError(f"retrieval monitor must be a val/ retrieval metric, got {monitor!r}")
        self.monitor = monitor
        if info.num_groups < 2:
            raise ValueError("retrieval needs data.group_column with ≥ 2 groups")
        self.head = mlp(d, proj_dim, hidden, dropout, zero_out=warm_start)
        self.warm_start = warm_start
        self.temperature = temperature
        self.schema = TokenSchema.from_dict(info.schema)
        self.prior = ProjectedRead(self.schema)
        self.neighbourhood_weight, self.neighbourhood_temperature = neighbourhood_weight, neighbourhood_temperature
        self.init_blend(blend)

    def model_outputs(self, emb, tokens=None):
        z = self.head(emb)
        if self.warm_start:
            z = torch.cat([self.read_outputs(tokens).to(z), z], -1)
        return F.normalize(z, dim=-1)

    def read_outputs(self, tokens):
        """The fixed read: normalized ΔW features, whose cosines are the modules' mean normalized-ΔW cosines."""
        return self.prior(tokens)

    @torch.no_grad()
    def fit_prior(self, dm) -> str:
        """Put the training split's principal directions in the read (labels are not used)."""
        self.prior.load(training_principal_projections(dm, self.prior.K))
        return "dw_fit"

    def mix(self, out, read, lam):
        """Both unit vectors side by side, scaled so that the cosine is (1 − λ)·model's + λ·read's."""
        return torch.cat([lam**0.5 * read.to(out), (1 - lam) ** 0.5 * out], -1)

    def loss(self, emb, batch):
        z = self.model_outputs(emb, batch["tokens"])
        loss = supcon_loss(z, batch["group"], self.temperature)
        if self.neighbourhood_weight:
            teacher = self.read_outputs(batch["tokens"]).to(z)
            loss = loss + self.neighbourhood_weight * neighbourhood_loss(z, teacher, self.temperature,
                                                                         self.neighbourhood_temperature)
        return loss

    def evaluate(self, out, batch):
        return retrieval_metrics(*self._queries_and_gallery(out, batch))

    def item_values(self, out, batch):
        """Per query with a relevant gallery item: its reciprocal rank (MRR is their mean)."""
        rel, _ = ranked_relevance(*self._queries_and_gallery(out, batch))
        return {"rr": (1.0 / (rel.argmax(1) + 1).double()).cpu().numpy()}

    @staticmethod
    def _queries_and_gallery(out, batch):
        q = batch["in_split"] & batch["is_query"]
        g = batch["in_gallery"]
        g_idx = torch.full((len(out),), -1, dtype=torch.long, device=out.device)
        g_idx[g] = torch.arange(int(g.sum()), device=out.device)
        return out[q], batch["group"][q], out[g], batch["group"][g], g_idx[q]

    def fit_read(self, X, train, kind="linear", seed=0) -> Standardize:
        return Standardize(X.mean(0), X.std(0) + 1e-12)

    def baseline_outputs(self, dm, seed, stages):
        """Cosine ranking of fixed features: `raw`, `sketch` and `dw` fit nothing, so unseen groups are read
        like seen ones; `dw_white` ranks `dw` after a whitening fitted on the training split (no labels), `dw_fit`
        through the training split's principal directions (no labels: the read a model blends with); `dw_exact` ranks
        by the exact cosine that `dw` sketches (vectors with the split's exact Gram matrix)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        train = dm.whole_split("train")["tokens"]
        white = whitening(delta_w_features(train, dm.schema, seed=seed))
        principal = training_principal_projections(dm, ProjectedRead.K)
        raw_of: dict[int, torch.Tensor] = {}  # the gallery is in every stage's items: read each file once
        for stage in stages:
            split = dm.whole_split(stage)
            for i in split["index"].tolist():
                if i not in raw_of:
                    raw_of[i] = raw_features(dm.adapter(i), dm.schema)
            raw = torch.stack([raw_of[i] for i in split["index"].tolist()])
            dw = delta_w_features(split["tokens"], dm.schema, seed=seed)
            out[stage] = {"raw": raw, "sketch": sketch_features(split["tokens"], dm.schema, seed=seed), "dw": dw,
                          "dw_white": white(dw),
                          "dw_fit": delta_w_features(split["tokens"], dm.schema, projections=principal),
                          "dw_exact": gram_embedding(delta_w_gram(split["tokens"], dm.schema))}
        return out

    LEGEND_GROUPS = 10  # the largest groups get a colour and a legend entry; the rest are grey

    def plot(self, fig, out, split, info, metrics):
        """PCA and t-SNE of the evaluated embeddings (queries ×, gallery ●), coloured by group."""
        from sklearn.manifold import TSNE

        z = F.normalize(out.double(), dim=-1)
        z = z - z.mean(0)
        pca = (z @ torch.linalg.svd(z, full_matrices=False)[2][:2].T).numpy()
        tsne = TSNE(2, perplexity=min(30.0, (len(z) - 1) / 3), init="pca", random_state=0).fit_transform(z.numpy())
        groups = split["group"].numpy()
        query = (split["in_split"] & split["is_query"]).numpy()
        ids, counts = np.unique(groups, return_counts=True)
        largest = ids[np.argsort(-counts, kind="stable")[: self.LEGEND_GROUPS]]
        for k, (xy, how) in enumerate(((pca, "PCA"), (tsne, "t-SNE"))):
            ax = fig.add_subplot(1, 2, k + 1)
            other = ~np.isin(groups, largest)
            for marks, marker in ((~query, "o"), (query, "x")):
                ax.scatter(*xy[marks & other].T, c="0.8", s=10, marker=marker)
                for c, g in enumerate(largest):
                    sel = marks & (groups == g)
                    ax.scatter(*xy[sel].T, color=f"C{c}", s=14, marker=marker,
                               label=(info.group_names[g] if info.group_names else str(g)) if marker == "o" else None)
            ax.set(title=how, xticks=[], yticks=[])
        ax.legend(fontsize=6, loc="best", title=f"largest {len(largest)} groups", title_fontsize=6)
        fig.suptitle(f"test embeddings (× query, ● gallery): MRR {metrics['test/mrr']:.3f}")
        fig.set_size_inches(10, 5.5)
        return "embeddings_2d"


def whitening(X: torch.Tensor, dims: int = 128, shrink: float = 0.1):
    """PCA whitening fitted on X (N, F): the top `dims` principal directions, each scaled to unit variance,
    the variances shrunk toward their mean (by `shrink`) so that the smallest directions are not blown up."""
    mean = X.double().mean(0)
    _, S, Vh = torch.linalg.svd(X.double() - mean, full_matrices=False)
    k = min(dims, int((S > S[0] * 1e-9).sum()))
    var = S[:k] ** 2 / max(1, len(X) - 1)
    scale = (var + shrink * var.mean()).rsqrt()
    return lambda Z: (((Z.double() - mean) @ Vh[:k].T) * scale).float()


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


def ranked_relevance(
    query_emb: torch.Tensor,  # (Q, d)
    query_groups: torch.Tensor,  # (Q,) int
    gallery_emb: torch.Tensor,  # (G, d)
    gallery_groups: torch.Tensor,  # (G,) int
    query_in_gallery: torch.Tensor | None = None,  # (Q,) gallery position of each query, -1 if absent
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q', G) relevance of the gallery in each query's cosine order, and (Q',) its relevant count, for the
    Q' queries that have a relevant item; a query never retrieves itself."""
    sims = F.normalize(query_emb.double(), dim=-1) @ F.normalize(gallery_emb.double(), dim=-1).T  # (Q, G)
    relevant = query_groups[:, None] == gallery_groups[None, :]  # (Q, G)
    if query_in_gallery is not None:
        rows = torch.nonzero(query_in_gallery >= 0).squeeze(-1)
        sims[rows, query_in_gallery[rows]] = float("-inf")
        relevant[rows, query_in_gallery[rows]] = False
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices
    rel = torch.gather(relevant, 1, order).double()
    n_rel = rel.sum(1)
    keep = n_rel > 0
    return rel[keep], n_rel[keep]


def retrieval_metrics(
    query_emb: torch.Tensor,  # (Q, d)
    query_groups: torch.Tensor,  # (Q,) int
    gallery_emb: torch.Tensor,  # (G, d)
    gallery_groups: torch.Tensor,  # (G,) int
    query_in_gallery: torch.Tensor | None = None,  # (Q,) gallery position of each query, -1 if absent
    k: int = 10,
) -> dict[str, float]:
    """MRR, hit@1, hit@k, nDCG@k and mAP, averaged over queries that have a relevant item."""
    rel, n_rel = ranked_relevance(query_emb, query_groups, gallery_emb, gallery_groups, query_in_gallery)
    n_q = len(rel)
    if n_q == 0:
        return {"mrr": float("nan"), "hit@1": float("nan"), f"hit@{k}": float("nan"), f"ndcg@{k}": float("nan"),
                "map": float("nan"), "num_queries": 0}
    ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
    first = rel.argmax(1).double() + 1  # rank of the first relevant item
    discounts = 1.0 / torch.log2(ranks[:k] + 1)
    dcg = (rel[:, :k] * discounts).sum(1)
    ideal = torch.stack([discounts[: int(min(c, k))].sum() for c in n_rel.tolist()])
    precision_at = rel.cumsum(1) / ranks
    ap = (precision_at * rel).sum(1) / n_rel
    return {
        "mrr": (1.0 / first).mean().item(),
        "hit@1": (first <= 1).double().mean().item(),
        f"hit@{k}": (first <= k).double().mean().item(),
        f"ndcg@{k}": (dcg / ideal).mean().item(),
        "map": ap.mean().item(),
        "num_queries": n_q,
    }
