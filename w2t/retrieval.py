"""Retrieval protocol of DESIGN §5: queries rank the whole gallery by cosine similarity.

Relevant = same group. A query never retrieves itself. Metrics are computed over the whole
split at once (never averaged per batch); queries with no relevant gallery item are left out
and counted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def retrieval_metrics(
    query_emb: torch.Tensor,  # (Q, d)
    query_groups: torch.Tensor,  # (Q,) int
    gallery_emb: torch.Tensor,  # (G, d)
    gallery_groups: torch.Tensor,  # (G,) int
    query_in_gallery: torch.Tensor | None = None,  # (Q,) gallery position of each query, -1 if absent
    k: int = 10,
) -> dict[str, float]:
    """MRR, hit@1, hit@k, nDCG@k and mAP, averaged over queries that have a relevant item."""
    sims = F.normalize(query_emb.double(), dim=-1) @ F.normalize(gallery_emb.double(), dim=-1).T  # (Q, G)
    relevant = query_groups[:, None] == gallery_groups[None, :]  # (Q, G)
    if query_in_gallery is not None:
        rows = torch.nonzero(query_in_gallery >= 0).squeeze(-1)
        sims[rows, query_in_gallery[rows]] = float("-inf")
        relevant[rows, query_in_gallery[rows]] = False
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices
    rel = torch.gather(relevant, 1, order).double()  # (Q, G) relevance in ranked order
    n_rel = rel.sum(1)
    keep = n_rel > 0
    rel, n_rel = rel[keep], n_rel[keep]
    n_q = int(keep.sum())
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
