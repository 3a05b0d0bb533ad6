"""A GL(r)-equivariant network on LoRA factors, in the style of Putterman et al. 2024
("Learning on LoRAs: GL-equivariant processing of low-rank weight spaces"), written here.

Each module is the pair (U, V) = (B, Aᵀ) up to U·G, V·G⁻ᵀ for any G ∈ GL(r). Every layer acts on
the m (resp. n) side only, so it commutes with G:
* linear: channel mixing plus a low-rank map on the row space, U_c ← Σ_c' α U_c' + β (U_c' Q) Pᵀ;
* gated nonlinearity: each row j of U is scaled by sigmoid((U Vᵀ w)_j), a function of the
  invariant ΔW = U Vᵀ, computed as U (Vᵀ w) in O((m+n)r) without forming ΔW (and likewise for V);
* invariant head: a learned k×k bilinear read-out Pᵤᵀ U_c V_cᵀ Pᵥ per channel, plus log‖ΔW‖.
Module features are bound to their (type, layer) position and mean-pooled, as in the W2T encoder.
Sides wider than `row_dim` are first mapped to `row_dim` rows by a learned linear map (it acts on
the m or n side, so it commutes with G too): without it the (C, r, m) activations of a 1536-wide
MLP module make every layer memory-bound.
It reads any factorization: fed the raw factors (`input: raw`), its outputs are unchanged by
(B·G, G⁻¹·A) because of its own equivariance, not because of canonicalization.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from w2t.models.features import gram_norm, orthonormal
from w2t.models.layers import ModulePositions, pool_modules, signed_log
from w2t.models.pretrained import Encoder
from w2t.data.tokens import TokenSchema, Tokens


@dataclass
class GLNetConfig:
    d_model: int = 64
    channels: int = 4
    depth: int = 2  # equivariant layers
    row_rank: int = 8  # rank of the learned map on the row space of U and of V
    sketch_dim: int = 8  # k of the invariant head
    row_dim: int | None = 128  # wider sides are mapped to this many rows first; None: never
    dropout: float = 0.1


class _RowMap(nn.Module):
    """U_c ← Σ_c' α_cc' U_c' + Σ_c' β_cc' (U_c' Q) Pᵀ on (..., C, r, m): acts on channels and rows only."""

    def __init__(self, channels: int, m: int, h: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.eye(channels) + 0.1 * torch.randn(channels, channels))
        self.beta = nn.Parameter(torch.randn(channels, channels) / channels**0.5)
        self.Q = nn.Parameter(torch.randn(m, h) / m**0.5)
        self.P = nn.Parameter(torch.randn(m, h) / h**0.5)

    def forward(self, U: torch.Tensor) -> torch.Tensor:
        low = torch.einsum("dc,...crh->...drh", self.beta, U @ self.Q) @ self.P.T  # mixed in the h-space: cheaper
        return torch.einsum("dc,...crm->...drm", self.alpha, U) + low


class _GLLayer(nn.Module):
    def __init__(self, channels: int, m: int, n: int, h: int):
        super().__init__()
        self.map_u, self.map_v = _RowMap(channels, m, h), _RowMap(channels, n, h)
        self.w_u = nn.Parameter(torch.randn(channels, n) / n**0.5)  # gate of U's rows reads ΔW w_u
        self.w_v = nn.Parameter(torch.randn(channels, m) / m**0.5)  # gate of V's rows reads ΔWᵀ w_v
        self.b_u, self.b_v = nn.Parameter(torch.zeros(channels, 1)), nn.Parameter(torch.zeros(channels, 1))

    def forward(self, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        U1, V1 = self.map_u(U), self.map_v(V)  # (..., C, r, m), (..., C, r, n)
        a = torch.einsum("...crn,cn->...cr", V1, self.w_u)  # Vᵀ w per channel: (..., C, r)
        b = torch.einsum("...crm,cm->...cr", U1, self.w_v)
        gate_u = torch.sigmoid(torch.einsum("...crm,...cr->...cm", U1, a) + self.b_u)  # rows of U Vᵀ w
        gate_v = torch.sigmoid(torch.einsum("...crn,...cr->...cn", V1, b) + self.b_v)
        return U + U1 * gate_u.unsqueeze(-2), V + V1 * gate_v.unsqueeze(-2)


class GLNetEncoder(Encoder):
    arch = "glnet"

    def __init__(self, schema: TokenSchema, config: GLNetConfig | None = None):
        super().__init__(schema, config or GLNetConfig())
        cfg = self.config
        C, k, d = cfg.channels, cfg.sketch_dim, cfg.d_model
        dims = [(self._width(g.m), self._width(g.n)) for g in schema.groups]
        self.reduce_u = nn.ParameterList(self._reducer(g.m, m) for g, (m, _) in zip(schema.groups, dims))
        self.reduce_v = nn.ParameterList(self._reducer(g.n, n) for g, (_, n) in zip(schema.groups, dims))
        self.lift = nn.Parameter(torch.randn(len(schema.groups), C))  # channel c starts as λ_c·(U, V)
        self.layers = nn.ModuleList(
            nn.ModuleList(_GLLayer(C, m, n, cfg.row_rank) for _ in range(cfg.depth)) for m, n in dims)
        self.head_u = nn.ParameterList(nn.Parameter(torch.randn(m, k) / m**0.5) for m, _ in dims)
        self.head_v = nn.ParameterList(nn.Parameter(torch.randn(n, k) / n**0.5) for _, n in dims)
        self.head = nn.Sequential(nn.Linear(C * k * k + C + 1, d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(d, d))
        self.module_norm = nn.LayerNorm(d)
        self.positions = ModulePositions(schema, d)
        self.out_norm = nn.LayerNorm(d)

    def _width(self, size: int) -> int:
        return size if self.config.row_dim is None else min(size, self.config.row_dim)

    @staticmethod
    def _reducer(size: int, width: int) -> nn.Parameter:
        """(size, width) orthonormal columns scaled to keep ‖U R‖ ≈ ‖U‖; empty when nothing is reduced."""
        if width == size:
            return nn.Parameter(torch.empty(0))
        return nn.Parameter(orthonormal(size, width) * (size / width) ** 0.5)

    def _module_tokens(self, i: int, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.schema.groups[i]
        w = (t["s"] * t["mask"]).clamp_min(0).sqrt().unsqueeze(-1)  # (B, L, r, 1)
        U, V = t["u"] * w * g.m**0.5, t["v"] * w * g.n**0.5  # one factorization of ΔW: (B, L, r, m), (B, L, r, n)
        norm = gram_norm(U, V, floor=1e-24)  # (B, L), invariant; floored: finite gradient for absent modules
        scale = norm.clamp_min(1e-12).sqrt()[..., None, None]
        U, V = U / scale, V / scale  # ‖U Vᵀ‖_F = 1: the layers see shape, the head also sees size
        if self.reduce_u[i].numel():
            U = U @ self.reduce_u[i]
        if self.reduce_v[i].numel():
            V = V @ self.reduce_v[i]
        lift = self.lift[i][:, None, None]  # (C, 1, 1)
        U, V = U.unsqueeze(2) * lift, V.unsqueeze(2) * lift  # (B, L, C, r, ·)
        for layer in self.layers[i]:
            U, V = layer(U, V)
        pu, pv = U @ self.head_u[i], V @ self.head_v[i]  # (B, L, C, r, k)
        sk = torch.einsum("blcri,blcrj->blcij", pu, pv).flatten(2)  # Pᵤᵀ U Vᵀ Pᵥ per channel
        feats = torch.cat([signed_log(sk), torch.log1p(gram_norm(U, V, floor=1e-24)), torch.log(norm.clamp_min(1e-12)).unsqueeze(-1) / 10], -1)
        present = t["mask"].any(-1)  # (B, L)
        tok = self.positions(i, self.module_norm(self.head(feats)))
        return tok * present.unsqueeze(-1), present

    def forward(self, tokens: Tokens) -> torch.Tensor:
        toks, present = zip(*(self._module_tokens(i, tokens[name]) for i, name in enumerate(self.names)))
        return self.out_norm(pool_modules(torch.cat(toks, 1), torch.cat(present, 1)))
