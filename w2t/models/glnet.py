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
The read-outs of all positions, concatenated, go through Linear → LayerNorm → ReLU: that is the
embedding (`d_model` wide). The reference's last Linear is the task head (`task.head.hidden=0`).
Sizes: `equiv_dim` h and `d_model` are the reference's hidden_dim_equiv and hidden_dim_inv.

What differs from the reference, and why:
* Modules of one type are batched (one matmul per type over its layers) instead of a Python loop
  over modules; the parameters are still one set per position, so the function is the same.
* It reads the factors of the update the adapter applies, ΔW = (α/r)·B·A (rows uᵢ√σᵢ and vᵢ√σᵢ of
  the tokens); the reference's loader passes the stored (B, Aᵀ), without PEFT's α/r (the same when
  α = r). Being GL(r)-invariant, it gives the same outputs for any factorization of ΔW (raw factors
  with `input: raw`, or canonical ones) up to rounding; the gate is a step function, so a row sum
  within rounding of 0 can flip it.
* Modules an adapter lacks read as zeros (the reference's zero padding). DoRA's magnitudes (the
  tokens' `f`) are not read: the reference has no such input.
* `dropout` on the read-out is the one of the authors' LLM variant (`llm/metanet`); their GLNet has
  none (0). The training loop is the framework's: its learning-rate schedule, gradient clipping,
  batch size and loss, where the reference trains at a constant rate with binary cross-entropy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

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
    row_sums = torch.einsum("...rh,...r->...h", U, V.sum(-1))  # U Vᵀ 1
    col_sums = torch.einsum("...rh,...r->...h", V, U.sum(-1))  # (1ᵀ U Vᵀ)ᵀ
    return U * (row_sums > 0).to(U.dtype).unsqueeze(-2), V * (col_sums > 0).to(V.dtype).unsqueeze(-2)


class GLNetEncoder(Encoder):
    arch = "glnet"

    def __init__(self, schema: TokenSchema, config: GLNetConfig | None = None):
        super().__init__(schema, config or GLNetConfig())
        cfg = self.config
        h, depth = cfg.equiv_dim, cfg.n_layers - 1
        groups = schema.groups
        self.lin_u = nn.ParameterList(nn.Parameter(torch.randn(g.num_layers, g.m, h) / g.m**0.5) for g in groups)
        self.lin_v = nn.ParameterList(nn.Parameter(torch.randn(g.num_layers, g.n, h) / g.n**0.5) for g in groups)
        self.hidden_u = nn.ParameterList(nn.Parameter(torch.randn(depth, g.num_layers, h, h) / h**0.5) for g in groups)
        self.hidden_v = nn.ParameterList(nn.Parameter(torch.randn(depth, g.num_layers, h, h) / h**0.5) for g in groups)
        self.dropout = nn.Dropout(cfg.dropout)
        self.read = nn.Linear(sum(g.num_layers for g in groups) * h * h, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)

    def _factors(self, i: int, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """U, V of group i after the equivariant layers, rank-major: (B, L, R, h) each."""
        w = (t["s"] * t["mask"]).clamp_min(0).sqrt().unsqueeze(-1)  # (B, L, R, 1)
        U = torch.einsum("blrm,lmh->blrh", t["u"] * w, self.lin_u[i])  # rows uᵢ√σᵢ: Σᵢ uᵢσᵢvᵢᵀ = ΔW
        V = torch.einsum("blrn,lnh->blrh", t["v"] * w, self.lin_v[i])
        for hu, hv in zip(self.hidden_u[i], self.hidden_v[i]):
            U, V = gl_gate(U, V)
            U = torch.einsum("blrh,lhk->blrk", U, hu)
            V = torch.einsum("blrh,lhk->blrk", V, hv)
        return U, V

    def _readout(self, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """U Vᵀ per module: (B, L, h, h), invariant to (U·G, V·G⁻ᵀ)."""
        return torch.einsum("blri,blrj->blij", U, V)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        """Adapter embeddings (B, d_model)."""
        reads = [self._readout(*self._factors(i, tokens[name])).flatten(1) for i, name in enumerate(self.names)]
        return torch.relu(self.norm(self.read(self.dropout(torch.cat(reads, 1)))))
