"""An MLP on the flattened factors: the naive reading of weights, for comparison.

Each module's rank components are flattened in stored order ([B columns | A rows], scaled by
√σᵢ so that their products give ΔW), projected by one linear map per module *type* (shared over
layers, so the size stays sane), concatenated over all module positions and read by an MLP. It
sees the factorization exactly as the file stores it, so it is not invariant to (B·G, G⁻¹·A).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from w2t.models.pretrained import Encoder
from w2t.data.tokens import TokenSchema, Tokens


@dataclass
class FlatMLPConfig:
    d_model: int = 64  # embedding size
    module_dim: int = 16  # per-module projection of the flattened factors
    hidden: int = 128
    dropout: float = 0.2


class FlatMLPEncoder(Encoder):
    arch = "flat_mlp"

    def __init__(self, schema: TokenSchema, config: FlatMLPConfig | None = None):
        super().__init__(schema, config or FlatMLPConfig())
        cfg = self.config
        self.inp = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(g.max_rank * (g.m + g.n)), nn.Linear(g.max_rank * (g.m + g.n), cfg.module_dim))
            for g in schema.groups)
        n_in = cfg.module_dim * sum(g.num_layers for g in schema.groups)
        self.mlp = nn.Sequential(nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(n_in, cfg.hidden), nn.GELU(),
                                 nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.d_model), nn.LayerNorm(cfg.d_model))

    def forward(self, tokens: Tokens) -> torch.Tensor:
        parts = []
        for g, name, inp in zip(self.schema.groups, self.names, self.inp):
            t = tokens[name]
            w = (t["s"] * t["mask"]).clamp_min(0).sqrt().unsqueeze(-1)  # (B, L, R, 1)
            x = torch.cat([t["u"] * w * g.m**0.5, t["v"] * w * g.n**0.5], -1)  # (B, L, R, m+n)
            parts.append(inp(x.flatten(2)).flatten(1))  # (B, L·module_dim)
        return self.mlp(torch.cat(parts, 1))
