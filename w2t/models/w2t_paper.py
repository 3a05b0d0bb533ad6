"""`model=w2t_paper`: the published Weight2Token design, kept for reproduction and comparison.

Every canonical rank component of every module is one token of a single sequence:
    token = Pᵤ uᵢ + Pᵥ vᵢ + f(σᵢ) + type + layer + rank embeddings,
with Pᵤ, Pᵥ one pair per module type, or one pair per (type, layer) position with
`projections=position` as in the reference code. A Transformer encoder runs over the whole sequence
(masked ranks and absent modules are padding), then a masked mean and a LayerNorm.
It reads uᵢ and vᵢ as they are, so it relies on the canonical sign rule and on σ not being tied
(docs/design.md §2): it is not invariant by construction, unlike `model=w2t`. It is the model
docs/design.md §3 describes as memorizing small collections: compare it, do not default to it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from w2t.data.tokens import TokenSchema, Tokens
from w2t.models.layers import SigmaFeatures, pool_modules
from w2t.models.pretrained import Encoder

PROJECTIONS = ("type", "position")


@dataclass
class PaperConfig:
    d_model: int = 128
    depth: int = 2  # Transformer layers over the sequence of all rank tokens
    n_heads: int = 4
    dropout: float = 0.1
    projections: str = "type"  # type: one (Pᵤ, Pᵥ) per module type | position: one per (type, layer)

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.projections not in PROJECTIONS:
            raise ValueError(f"projections must be one of {PROJECTIONS}, got {self.projections!r}")


class W2TPaperEncoder(Encoder):
    arch = "w2t_paper"

    def __init__(self, schema: TokenSchema, config: PaperConfig | None = None):
        super().__init__(schema, config or PaperConfig())
        cfg = self.config
        d = cfg.d_model
        copies = [g.num_layers if cfg.projections == "position" else 1 for g in schema.groups]
        self.proj_u = nn.ParameterList(nn.Parameter(torch.randn(c, g.m, d) / g.m**0.5) for c, g in zip(copies, schema.groups))
        self.proj_v = nn.ParameterList(nn.Parameter(torch.randn(c, g.n, d) / g.n**0.5) for c, g in zip(copies, schema.groups))
        self.sigma = SigmaFeatures(d)
        self.type_emb = nn.Parameter(0.02 * torch.randn(len(schema.groups), d))
        self.layer_emb = nn.Parameter(0.02 * torch.randn(schema.max_layer + 1, d))
        self.rank_emb = nn.Parameter(0.02 * torch.randn(max(g.max_rank for g in schema.groups), d))
        for i, g in enumerate(schema.groups):
            self.register_buffer(f"layers_{i}", torch.tensor(g.layers), persistent=False)
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, 4 * d, cfg.dropout, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def _rank_tokens(self, i: int, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L·R, d) tokens of group i and their (B, L·R) mask."""
        layers = getattr(self, f"layers_{i}")
        R = t["s"].shape[-1]
        x = (torch.einsum("blrm,lmd->blrd", t["u"], self.proj_u[i].expand(len(layers), -1, -1))
             + torch.einsum("blrn,lnd->blrd", t["v"], self.proj_v[i].expand(len(layers), -1, -1)))  # (B, L, R, d)
        x = x + self.sigma(t["s"]) + self.type_emb[i] + self.layer_emb[layers][:, None] + self.rank_emb[:R]
        return x.flatten(1, 2), t["mask"].flatten(1)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        x, mask = zip(*(self._rank_tokens(i, tokens[name]) for i, name in enumerate(self.names)))
        x, mask = torch.cat(x, 1), torch.cat(mask, 1)  # (B, T, d), (B, T): every rank token of the adapter
        none = ~mask.any(1, keepdim=True)  # an all-zero adapter: keep attention finite
        x = self.transformer(x, src_key_padding_mask=~(mask | none))
        return self.norm(pool_modules(x, mask))
