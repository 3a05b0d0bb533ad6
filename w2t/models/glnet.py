"""GLNet, the GL(r)-invariant network of Putterman et al. 2024 ("Learning on LoRAs: GL-equivariant
processing of low-rank weight spaces"), built as the authors' code builds it (moeputt/LoL,
`diffusion/models/models.py`, `GLInvariantMLP`), written here.

A module is the pair (U, V) = (B, Aᵀ), with U Vᵀ = ΔW, defined up to (U·G, V·G⁻ᵀ) for G ∈ GL(r).
Every equivariant layer acts on rows only (the m or n side), so it commutes with G:
* equivariant linear, one per module position (type, layer): U ← W_u U (m → h rows), V ← W_v V (n → h);
* `n_layers` − 1 times: the GL nonlinearity, which keeps row j of U when row j of U Vᵀ sums to more
  than 0 and zeroes it otherwise (V likewise with the columns), computed as U (Vᵀ 1) without forming
  U Vᵀ; then another linear map per position on the rows (h → h);
* invariant read-out: U Vᵀ, the whole h×h matrix of every module position.
The read-outs of all positions, concatenated (no k×k bottleneck), go through Linear → LayerNorm → ReLU:
that is the embedding (`d_model` wide). The reference's last Linear is the task head (`task.head.hidden=0`).
Sizes: `equiv_dim` h and `d_model` are the reference's hidden_dim_equiv and hidden_dim_inv.

What differs from the reference, and why:
* Positions are batched, where the reference loops over modules in Python: the first linear is one
  batched matmul per module type (over its layers), every later step one over all positions. The
  parameters are still one set per position, so the function is the same.
* It reads the factors of the update the adapter applies, ΔW = (α/r)·B·A (rows σᵢuᵢ and vᵢ of the
  tokens); the reference's loader passes the stored (B, Aᵀ), without PEFT's α/r (the same when
  α = r). Being GL(r)-invariant, it gives the same outputs for any factorization of ΔW (raw factors
  with `input: raw`, or canonical ones) up to rounding; the gate is a step function, so a row sum
  within rounding of 0 can flip it.
* Modules an adapter lacks read as zeros, and ranks a type lacks as zero rows (the reference's zero
  padding). DoRA's magnitudes (the tokens' `f`) are not read: the reference has no such input.
* `dropout` on the read-out is the one of the authors' LLM variant (`llm/metanet`); their GLNet has
  none (0), nor a dropout before its last Linear (`task.head.dropout`, 0.1 by default here). The
  training loop is the framework's: its learning-rate schedule, gradient clipping, batch size and
  loss, where the reference trains at a constant rate with binary cross-entropy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from w2t.models.pretrained import Encoder
from w2t.data.tokens import TokenSchema, Tokens


@dataclass
class GLNetConfig:
    d_model: int = 128  # hidden_dim_inv: the invariant head's hidden layer, the embedding
    equiv_dim: int = 64  # hidden_dim_equiv: rows of U and V after the first equivariant linear
    n_layers: int = 1  # equivariant layers: the first linear, then n_layers − 1 × (GL gate, linear)
    dropout: float = 0.0  # on the concatenated read-outs

    def __post_init__(self):
        for name in ("d_model", "equiv_dim", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def gl_gate(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows j of U (..., r, h) kept where (U Vᵀ 1)_j > 0, rows of V where (1ᵀ U Vᵀ)_j > 0: both read
    only U Vᵀ (rows uᵢ of U and vᵢ of V are the rank components), so the gate commutes with GL(r)."""
    row_sums = V.sum(-1).unsqueeze(-2) @ U  # (..., 1, h): U Vᵀ 1
    col_sums = U.sum(-1).unsqueeze(-2) @ V  # (1ᵀ U Vᵀ)ᵀ
    return U * (row_sums > 0).to(U.dtype), V * (col_sums > 0).to(V.dtype)


class GLNetEncoder(Encoder):
    arch = "glnet"

    def __init__(self, schema: TokenSchema, config: GLNetConfig | None = None):
        super().__init__(schema, config or GLNetConfig())
        cfg = self.config
        h, d = cfg.equiv_dim, cfg.d_model
        positions = sum(g.num_layers for g in schema.groups)  # every (type, layer), in schema order
        self.max_rank = max(g.max_rank for g in schema.groups)
        self.lin_u = nn.ParameterList(nn.Parameter(torch.randn(g.num_layers, g.m, h) / g.m**0.5) for g in schema.groups)
        self.lin_v = nn.ParameterList(nn.Parameter(torch.randn(g.num_layers, g.n, h) / g.n**0.5) for g in schema.groups)
        self.hidden_u = nn.Parameter(torch.randn(cfg.n_layers - 1, positions, h, h) / h**0.5)
        self.hidden_v = nn.Parameter(torch.randn(cfg.n_layers - 1, positions, h, h) / h**0.5)
        self.dropout = nn.Dropout(cfg.dropout)
        bound = (positions * h * h) ** -0.5  # nn.Linear's initialisation
        self.read = nn.Parameter(torch.empty(positions, h * h, d).uniform_(-bound, bound))  # Linear(positions·h², d)
        self.read_bias = nn.Parameter(torch.empty(d).uniform_(-bound, bound))
        self.norm = nn.LayerNorm(d)

    def _factors(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """U, V of every module position after the equivariant layers, position-major: (P, B, R, h) each.

        Rows σᵢuᵢ of U and vᵢ of V factor ΔW = Σᵢ σᵢuᵢvᵢᵀ (σ scales U after the first layer: it is linear).
        Position-major, every layer after the first is one batched matmul over all positions."""
        us, vs, ss = [], [], []
        for i, name in enumerate(self.names):
            t = tokens[name]
            B, L, R, _ = t["u"].shape
            u = t["u"].transpose(0, 1).reshape(L, B * R, -1)  # (L, B·R, m)
            v = t["v"].transpose(0, 1).reshape(L, B * R, -1)
            us.append(torch.bmm(u, self.lin_u[i]).view(L, B, R, -1))  # (L, B, R, h)
            vs.append(torch.bmm(v, self.lin_v[i]).view(L, B, R, -1))
            ss.append((t["s"] * t["mask"]).transpose(0, 1))  # (L, B, R)
            if R < self.max_rank:  # a lower-rank type: its missing ranks are zero rows, which add nothing to U Vᵀ
                us[-1], vs[-1] = (F.pad(x, (0, 0, 0, self.max_rank - R)) for x in (us[-1], vs[-1]))
                ss[-1] = F.pad(ss[-1], (0, self.max_rank - R))
        U = torch.cat(us) * torch.cat(ss).unsqueeze(-1)
        V = torch.cat(vs)
        for hu, hv in zip(self.hidden_u, self.hidden_v):
            U, V = gl_gate(U, V)
            U = torch.bmm(U.flatten(1, 2), hu).view_as(U)
            V = torch.bmm(V.flatten(1, 2), hv).view_as(V)
        return U, V

    def _readout(self, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """U Vᵀ per module position, flattened: (P, B, h·h), invariant to (U·G, V·G⁻ᵀ)."""
        return (U.transpose(-1, -2) @ V).flatten(-2)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        """Adapter embeddings (B, d_model)."""
        x = torch.bmm(self.dropout(self._readout(*self._factors(tokens))), self.read).sum(0) + self.read_bias
        return torch.relu(self.norm(x))
