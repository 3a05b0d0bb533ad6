"""Attention over a module's canonical rank tokens (docs/design.md §3), invariant to what canonicalization leaves free.

Each rank token (uᵢ, σᵢ, vᵢ) is read through features that do not change when (uᵢ, vᵢ) → (−uᵢ, −vᵢ):
bilinear probes (Lᵀuᵢ)⊙(Rᵀvᵢ) = uᵢᵀ Lⱼ Rⱼᵀ vᵢ, squared projections (Lᵀuᵢ)², (Rᵀvᵢ)², log σᵢ and σᵢ/‖σ‖.
Components whose σ are tied (|σᵢ − σⱼ| ≤ `tie_rtol`·σ₁) span a subspace in which any rotation gives the
same ΔW; the quadratic features are averaged over each such block, which makes them exactly invariant to
that rotation (Σᵢ (Lᵀuᵢ)(Rᵀvᵢ)ᵀ over a block is). The tokens then go through self-attention among the
ranks of their module (permutation-equivariant) and a σ-weighted mean, so rank order never matters either.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from w2t.models.features import orthonormal


def tied_blocks(s: torch.Tensor, mask: torch.Tensor, rtol: float) -> torch.Tensor:
    """(…, R, R) 0/1 matrix: components i, j are both present and |σᵢ − σⱼ| ≤ rtol·max σ (tied).

    Pairwise, so it does not depend on the order the ranks are stored in."""
    top = s.abs().amax(-1, keepdim=True).unsqueeze(-1).clamp_min(1e-30)
    tied = (s.unsqueeze(-1) - s.unsqueeze(-2)).abs() <= rtol * top
    return (tied & mask.unsqueeze(-1) & mask.unsqueeze(-2)).to(s.dtype)


class RankAttention(nn.Module):
    """Rank tokens of one module type → one (B, L, d_out) vector per module, sign- and rotation-invariant."""

    def __init__(self, m: int, n: int, d_out: int, probes: int = 16, d: int = 32, heads: int = 4,
                 tie_rtol: float = 1e-4):
        super().__init__()
        self.L = nn.Parameter(orthonormal(m, min(probes, m)))
        self.R = nn.Parameter(orthonormal(n, min(probes, n)))
        self.tie_rtol = tie_rtol
        pm, pn = min(probes, m), min(probes, n)
        n_feat = min(pm, pn) + pm + pn + 2  # probes, squared projections, log σ, σ/‖σ‖
        self.embed = nn.Sequential(nn.Linear(n_feat, d), nn.GELU(), nn.Linear(d, d))
        self.attend = nn.TransformerEncoderLayer(d, heads, 2 * d, 0.0, batch_first=True, norm_first=True)
        self.out = nn.Linear(d, d_out)
        nn.init.zeros_(self.out.weight)  # a residual beside the module's read-out: it starts by adding nothing
        nn.init.zeros_(self.out.bias)

    def features(self, u: torch.Tensor, v: torch.Tensor, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, R, F) per-rank features, quadratic ones averaged over tied blocks."""
        pu, pv = u @ self.L, v @ self.R  # (B, L, R, p)
        k = min(pu.shape[-1], pv.shape[-1])
        quad = torch.cat([pu[..., :k] * pv[..., :k], pu.square(), pv.square()], -1)
        blocks = tied_blocks(s, mask, self.tie_rtol)  # (B, L, R, R)
        quad = blocks @ quad / blocks.sum(-1, keepdim=True).clamp_min(1)
        norm = s.square().sum(-1, keepdim=True).sqrt().clamp_min(1e-30)
        sigma = torch.stack([torch.log(s.clamp_min(1e-12)) / 10, s / norm], -1)
        return torch.cat([quad * quad.shape[-1] ** 0.5, sigma], -1) * mask.unsqueeze(-1)

    def forward(self, u: torch.Tensor, v: torch.Tensor, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, R = s.shape
        h = self.embed(self.features(u, v, s, mask)).flatten(0, 1)  # (B·L, R, d)
        keep = mask.flatten(0, 1)
        empty = ~keep.any(-1, keepdim=True)  # absent modules: attend to something finite, then weigh 0
        h = self.attend(h, src_key_padding_mask=~(keep | empty))
        w = (s * mask).flatten(0, 1)
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)  # σ-weighted mean over ranks
        return self.out((h * w.unsqueeze(-1)).sum(1)).view(B, L, -1)
