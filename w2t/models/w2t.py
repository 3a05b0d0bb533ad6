"""The W2T encoder (docs/design.md §3): canonical rank tokens → module tokens → one adapter embedding.

Built to learn from a few hundred adapters. There, a linear read-out of the normalized update
ΔŴ = ΔW/‖ΔW‖ is what works: on digits, logistic regression on ΔŴ reaches 0.75 accuracy where an
encoder with nonlinear per-rank features reached 0.57, and ΔŴ's cosine alone retrieves at MRR 0.74
against its 0.39. So the path from the weights to the embedding is linear at initialisation, and
the rest is residual:

* rank level: each rank token (uᵢ, σᵢ, vᵢ) gives the outer product (Pᵤᵀuᵢ)(Pᵥᵀvᵢ)ᵀ; pooling
  with weights σᵢ/‖σ‖ gives Pᵤᵀ ΔŴ Pᵥ (k×k), a learned bilinear read-out of ΔŴ. It depends on ΔW
  only, so it is unchanged by sign flips, rank order and rotations among repeated σ (the
  leftovers of docs/design.md §2), and Pᵤ, Pᵥ start orthonormal, so at k ≥ max(m, n) it keeps all of ΔŴ.
  Where a module is wider than k, they start as the principal directions of the training split's updates
  (`fit_projections`), which keep most of ΔŴ in k columns where random ones keep about k/m of it.
  σ also enters as log-scaled features: the update's size ‖ΔW‖ and its spectrum σᵢ/‖σ‖; so do a
  module's features (DoRA's magnitudes, w2t/canon/dora.py; zero for plain LoRA, so they add nothing there);
* rank level (`rank_attention`, on by default): attention among a module's rank tokens, read through
  features invariant to each token's sign and to rotations among tied σ (w2t/models/rank_tokens.py),
  added to the module token as a residual that starts at zero;
* module level: one linear map per module *type* (shared by every layer), then a small binding
  matrix per position, so a mean over modules keeps which module said what;
* adapter level: a module-level Transformer whose residual branches start at zero (the identity),
  then a masked mean. Whole modules are dropped at random while training: adapters of one task
  differ in which modules they adapt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from w2t.canon.dora import MODULE_FEATURES
from w2t.models.features import bilinear_readout, orthonormal
from w2t.models.layers import SigmaFeatures, pool_modules
from w2t.models.pretrained import Encoder
from w2t.models.rank_tokens import RankAttention
from w2t.data.tokens import TokenSchema, Tokens


@dataclass
class EncoderConfig:
    d_model: int = 128  # the adapter embedding
    d_module: int = 64  # a module token before its position binding
    sketch_dim: int = 48  # k of the bilinear read-out Pᵤᵀ ΔŴ Pᵥ per module: min(k, m) × min(k, n)
    depth: int = 1  # module-level Transformer layers
    n_heads: int = 4
    dropout: float = 0.1  # inside the Transformer
    module_dropout: float = 0.15  # augmentation: drop whole modules while training
    sigma_features: bool = True  # log-scaled ‖ΔW‖ and σᵢ/‖σ‖ (mean over ranks) per module
    rank_attention: bool = True  # also read each module's rank tokens by attention (w2t/models/rank_tokens.py)
    fit_projections: bool = True  # Pᵤ, Pᵥ start as the training split's principal directions, not at random

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.sketch_dim < 1:
            raise ValueError(f"sketch_dim must be ≥ 1, got {self.sketch_dim}")
        if not 0 <= self.module_dropout < 1:
            raise ValueError(f"module_dropout must be in [0, 1), got {self.module_dropout}")


class W2TEncoder(Encoder):
    arch = "w2t"

    def __init__(self, schema: TokenSchema, config: EncoderConfig | None = None):
        super().__init__(schema, config or EncoderConfig())
        cfg = self.config
        d, dm = cfg.d_model, cfg.d_module
        k = cfg.sketch_dim
        self.P_u = nn.ParameterList(nn.Parameter(orthonormal(g.m, min(k, g.m))) for g in schema.groups)
        self.P_v = nn.ParameterList(nn.Parameter(orthonormal(g.n, min(k, g.n))) for g in schema.groups)
        # the read-out starts at zero: its gradients lie in the span of the training sketches, so it only
        # ever holds directions that training updates have (a random start adds noise from all others)
        self.read = nn.ParameterList(nn.Parameter(torch.zeros(min(k, g.m) * min(k, g.n), dm)) for g in schema.groups)
        if cfg.sigma_features:
            self.size = nn.ModuleList(SigmaFeatures(dm) for _ in schema.groups)
            self.spectrum = nn.ModuleList(SigmaFeatures(dm) for _ in schema.groups)
        if cfg.rank_attention:
            self.ranks = nn.ModuleList(RankAttention(g.m, g.n, dm) for g in schema.groups)
        self.magnitude = nn.ModuleList(nn.Linear(MODULE_FEATURES, dm, bias=False) for _ in schema.groups)
        self.bind = nn.ParameterList(nn.Parameter(torch.randn(g.num_layers, dm, d) / dm**0.5) for g in schema.groups)
        if cfg.depth:
            layer = nn.TransformerEncoderLayer(d, cfg.n_heads, 2 * d, cfg.dropout, batch_first=True, norm_first=True)
            self.modules_tf = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
            for block in self.modules_tf.layers:  # residual branches start at zero: the identity
                nn.init.zeros_(block.self_attn.out_proj.weight)
                nn.init.zeros_(block.linear2.weight)
        else:
            self.modules_tf = None

    @torch.no_grad()
    def fit_projections(self, principal: Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Start Pᵤ, Pᵥ as the principal directions of the training adapters' normalized updates (`principal(k)`:
        `tasks.base.training_principal_projections` of the run's datamodule)."""
        if not self.config.fit_projections:
            return
        for i, (Qu, Qv) in enumerate(principal(self.config.sketch_dim)):
            self.P_u[i].copy_(Qu)
            self.P_v[i].copy_(Qv)

    def _module_tokens(self, i: int, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of group i: (B, L, d) module tokens and (B, L) presence mask."""
        s = t["s"] * t["mask"]  # (B, L, R)
        norm = s.square().sum(-1).sqrt()  # (B, L) ‖ΔW‖_F: canonical uᵢ, vᵢ are orthonormal
        present = norm > 0
        w = s / norm.clamp_min(1e-30).unsqueeze(-1)  # σᵢ/‖σ‖: the read-out sees ΔŴ
        pu = t["u"] @ self.P_u[i]  # (B, L, R, k)
        pv = t["v"] @ self.P_v[i]  # (B, L, R, k)
        sketch = bilinear_readout(pu, w, pv).flatten(2)  # (B, L, kᵤkᵥ), ‖·‖ ≤ 1
        sketch = sketch * sketch.shape[-1] ** 0.5  # O(1) entries
        x = sketch @ self.read[i]  # (B, L, d_module)
        if self.config.sigma_features:
            m = t["mask"].unsqueeze(-1).to(x.dtype)
            x = x + self.size[i](norm) + (self.spectrum[i](w) * m).sum(2) / m.sum(2).clamp_min(1)  # mean over ranks
        if self.config.rank_attention:
            x = x + self.ranks[i](t["u"], t["v"], t["s"], t["mask"])
        x = x + self.magnitude[i](t["f"])
        x = torch.einsum("blc,lcd->bld", x, self.bind[i])  # (B, L, d) bound to its position
        return x, present

    def forward(self, tokens: Tokens) -> torch.Tensor:
        """Adapter embeddings (B, d_model)."""
        toks, present = zip(*(self._module_tokens(i, tokens[name]) for i, name in enumerate(self.names)))
        x = torch.cat(toks, 1)  # (B, M, d) over all module positions
        p = torch.cat(present, 1)  # (B, M)
        if self.training and self.config.module_dropout:
            kept = p & (torch.rand(p.shape, device=p.device) >= self.config.module_dropout)
            p = torch.where(kept.any(1, keepdim=True), kept, p)  # never drop every module of an adapter
        x = x * p.unsqueeze(-1)
        if self.modules_tf is not None:
            none = ~p.any(1, keepdim=True)  # adapters with no module at all (all-zero B): keep attention finite
            x = self.modules_tf(x, src_key_padding_mask=~(p | none))
        return pool_modules(x, p)
