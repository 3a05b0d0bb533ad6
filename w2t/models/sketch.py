"""A small MLP on a fixed random sketch Rᵤᵀ ΔW Rᵥ of every module (w2t/models/features.py).

The input is invariant to every factorization by construction and is not learned; only the MLP
is. It isolates what a learned read-out of the weights adds over a fixed linear one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from w2t.models.features import bilinear_readout, fixed_projections
from w2t.models.layers import signed_log
from w2t.models.pretrained import Encoder
from w2t.data.tokens import TokenSchema, Tokens


@dataclass
class SketchConfig:
    d_model: int = 64
    k: int = 8  # the sketch is k×k per module
    hidden: int = 128
    dropout: float = 0.2
    seed: int = 0  # of the fixed projections


class SketchEncoder(Encoder):
    arch = "sketch"

    def __init__(self, schema: TokenSchema, config: SketchConfig | None = None):
        super().__init__(schema, config or SketchConfig())
        cfg = self.config
        for i, g in enumerate(schema.groups):  # buffers: saved with the weights, never trained
            Ru, Rv = fixed_projections(g, cfg.k, cfg.seed)
            self.register_buffer(f"Ru_{i}", Ru.float())
            self.register_buffer(f"Rv_{i}", Rv.float())
        n_in = cfg.k**2 * sum(g.num_layers for g in schema.groups)
        self.mlp = nn.Sequential(nn.LayerNorm(n_in), nn.Linear(n_in, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.hidden, cfg.d_model), nn.LayerNorm(cfg.d_model))

    def forward(self, tokens: Tokens) -> torch.Tensor:
        feats = []
        for i, name in enumerate(self.names):
            t = tokens[name]
            g = self.schema.groups[i]
            pu = (t["u"] * g.m**0.5) @ getattr(self, f"Ru_{i}")  # (B, L, R, k)
            pv = (t["v"] * g.n**0.5) @ getattr(self, f"Rv_{i}")
            feats.append(bilinear_readout(pu, t["s"] * t["mask"], pv).flatten(1))
        return self.mlp(signed_log(torch.cat(feats, 1)))
