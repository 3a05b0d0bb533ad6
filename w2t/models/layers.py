"""Building blocks the encoders share: σ features, position binding, pooling over modules."""
from __future__ import annotations

import torch
import torch.nn as nn

from w2t.data.tokens import TokenSchema


def signed_log(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


class SigmaFeatures(nn.Module):
    """log σ expanded on a few fixed frequencies, so the encoder sees scale over many decades."""

    def __init__(self, d: int, n_freq: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(-2, 0.5, n_freq), persistent=False)
        self.proj = nn.Linear(2 * n_freq + 1, d)

    def forward(self, s: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., d)
        ls = torch.log(s.clamp_min(1e-12)).unsqueeze(-1)
        x = ls * self.freqs
        return self.proj(torch.cat([torch.sin(x), torch.cos(x), ls / 10], -1))


class ModulePositions(nn.Module):
    """Binds a module token to its (type, layer) position, with parameters per type and per layer
    (never per position). The binding is mostly multiplicative, so a mean over modules still keeps
    which module said what; the additive part is small, so that at initialisation adapters differ
    by their content, not by a shared offset."""

    def __init__(self, schema: TokenSchema, d: int):
        super().__init__()
        self.type_emb = nn.Parameter(0.02 * torch.randn(len(schema.groups), d))
        self.layer_emb = nn.Parameter(0.02 * torch.randn(schema.max_layer + 1, d))
        self.pos_gain = nn.Parameter(torch.randn(len(schema.groups), d))
        self.gain_emb = nn.Parameter(torch.randn(schema.max_layer + 1, d))
        for i, g in enumerate(schema.groups):
            self.register_buffer(f"layers_{i}", torch.tensor(g.layers), persistent=False)

    def forward(self, i: int, tok: torch.Tensor) -> torch.Tensor:  # tokens (B, L, d) of group i
        layers = getattr(self, f"layers_{i}")
        return tok * (1 + self.pos_gain[i] * self.gain_emb[layers]) + self.type_emb[i] + self.layer_emb[layers]


def pool_modules(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Masked mean (B, d) of module tokens x (B, M, d) over present (B, M) positions."""
    w = present.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp_min(1)
