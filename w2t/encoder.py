"""The W2T encoder (DESIGN §3): canonical rank tokens → module tokens → one adapter embedding.

Built to learn from a few hundred adapters: every parameter is shared across layers (one u- and
one v-projection per module *type*, never per position), and each module token also carries a
learned bilinear sketch Pᵤ ΔW Pᵥᵀ = Σᵢ σᵢ (Pᵤuᵢ)(Pᵥvᵢ)ᵀ (k×k), a linear read-out of ΔW that is
invariant to every factorization, sign and rank order by construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from w2t.pretrained import PretrainedMixin
from w2t.tokens import TokenSchema, Tokens


@dataclass
class EncoderConfig:
    d_model: int = 64
    n_heads: int = 4
    depth: int = 2  # module-level Transformer layers
    rank_encoder: bool = True  # one attention layer across the ranks of each module
    log_sigma: bool = True  # σ enters as log-scaled features (absolute update size is informative)
    sign_invariant: bool = False  # drop sign-carrying features (use when the sign rule is off)
    sign_flip: bool = False  # augmentation: flip (uᵢ, vᵢ) -> (-uᵢ, -vᵢ) at random while training (sign rule off)
    dropout: float = 0.1
    component_dropout: float = 0.0  # training-time masking of whole rank components
    sketch_dim: int = 8  # k of the learned bilinear sketch Pᵤ ΔW Pᵥᵀ (k×k per module); 0 turns it off
    pool: str = "cls"  # "cls": a learned query token reads the modules; "mean": masked mean
    scale_norm: bool = False  # divide every σ by the adapter's ‖ΔW‖ (over all modules); log‖ΔW‖ enters once

    def __post_init__(self):
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")


def _signed_log(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


class SigmaFeatures(nn.Module):
    """log σ expanded on a few fixed frequencies, so the encoder sees scale over many decades."""

    def __init__(self, d: int, n_freq: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(-2, 0.5, n_freq), persistent=False)
        self.proj = nn.Linear(2 * n_freq + 1, d)

    def forward(self, s: torch.Tensor) -> torch.Tensor:  # (..., R) -> (..., R, d)
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


class W2TEncoder(nn.Module, PretrainedMixin):
    arch = "w2t"

    def __init__(self, schema: TokenSchema, config: EncoderConfig | None = None):
        super().__init__()
        self.schema = schema
        self.config = cfg = config or EncoderConfig()
        d = cfg.d_model
        self.names = [g.name for g in schema.groups]
        self.proj_u = nn.ModuleList(nn.Linear(g.m, d, bias=False) for g in schema.groups)
        self.proj_v = nn.ModuleList(nn.Linear(g.n, d, bias=False) for g in schema.groups)
        self.sigma = SigmaFeatures(d) if cfg.log_sigma else None
        n_in = d if cfg.sign_invariant else 3 * d
        self.rank_in = nn.Sequential(nn.Linear(n_in, d), nn.GELU(), nn.Linear(d, d))
        self.rank_layer = (
            nn.TransformerEncoderLayer(d, cfg.n_heads, 2 * d, cfg.dropout, batch_first=True, norm_first=True)
            if cfg.rank_encoder else None
        )
        k = cfg.sketch_dim
        if k:
            # initialised as the random sketch baseline (w2t/baselines.py), then learned
            self.sketch_u = nn.ParameterList(nn.Parameter(torch.randn(g.m, k) / g.m**0.5) for g in schema.groups)
            self.sketch_v = nn.ParameterList(nn.Parameter(torch.randn(g.n, k) / g.n**0.5) for g in schema.groups)
            self.sketch_in = nn.Sequential(nn.Linear(k * k, d), nn.GELU(), nn.Linear(d, d))
        self.positions = ModulePositions(schema, d)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d)) if cfg.pool == "cls" else None
        self.module_norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, 2 * d, cfg.dropout, batch_first=True, norm_first=True)
        self.modules_tf = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False) if cfg.depth else None
        self.scale_feat = SigmaFeatures(d) if cfg.scale_norm else None
        self.out_norm = nn.LayerNorm(d)

    @property
    def dim(self) -> int:
        return self.config.d_model

    def _module_tokens(self, i: int, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of group i: (B, L, d) module tokens and (B, L) presence mask."""
        cfg = self.config
        u, v, s, mask = t["u"], t["v"], t["s"], t["mask"]  # (B,L,R,m) (B,L,R,n) (B,L,R) (B,L,R)
        if self.training and cfg.component_dropout > 0:
            mask = mask & (torch.rand_like(s) >= cfg.component_dropout)
        if self.training and cfg.sign_flip:
            flip = torch.where(torch.rand_like(s) < 0.5, -1.0, 1.0).unsqueeze(-1).to(u.dtype)
            u, v = u * flip, v * flip
        B, L, R = s.shape
        g = self.schema.groups[i]
        a = self.proj_u[i](u * g.m**0.5)  # (B, L, R, d); unit vectors rescaled to O(1) entries
        b = self.proj_v[i](v * g.n**0.5)  # (B, L, R, d)
        ab = a * b  # unchanged by the joint flip (u, v) -> (-u, -v)
        x = self.rank_in(ab if cfg.sign_invariant else torch.cat([a, b, ab], -1))
        if self.sigma is not None:
            x = x + self.sigma(s)
        x = x.reshape(B * L, R, -1)
        m = mask.reshape(B * L, R)
        present = m.any(-1)  # (B*L,)
        if self.rank_layer is not None:
            # fully masked rows would give NaN attention; let them attend to themselves, then zero them
            x = self.rank_layer(x, src_key_padding_mask=~(m | ~present[:, None]))
        w = m.unsqueeze(-1).to(x.dtype)
        pooled = (x * w).sum(1) / w.sum(1).clamp_min(1)  # (B*L, d)
        tok = pooled.reshape(B, L, -1)
        if cfg.sketch_dim:
            su = (u * g.m**0.5) @ self.sketch_u[i]  # (B, L, R, k)
            sv = (v * g.n**0.5) @ self.sketch_v[i]  # (B, L, R, k)
            sk = torch.einsum("blri,blr,blrj->blij", su, s * mask, sv).flatten(2)  # (B, L, k²) = Pᵤ ΔW Pᵥᵀ
            tok = tok + self.sketch_in(_signed_log(sk))
        tok = self.positions(i, self.module_norm(tok))
        return tok * present.reshape(B, L, 1), present.reshape(B, L)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        """Adapter embeddings (B, d_model)."""
        norm = None
        if self.config.scale_norm:
            # the overall size of an update varies ~20× with lr/steps/alpha inside one task: read the shape
            # of ΔW scale-free, and its size once, as a feature
            norm = sum(((t["s"] * t["mask"]) ** 2).sum((-1, -2)) for t in tokens.values()).sqrt()  # (B,)
            tokens = {g: {**t, "s": t["s"] / norm.clamp_min(1e-12)[:, None, None]} for g, t in tokens.items()}
        toks, present = zip(*(self._module_tokens(i, tokens[name]) for i, name in enumerate(self.names)))
        x = torch.cat(toks, 1)  # (B, M, d) over all module positions
        p = torch.cat(present, 1)  # (B, M)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1)
            p = torch.cat([torch.ones_like(p[:, :1]), p], 1)
        none = ~p.any(1, keepdim=True)  # adapters with no module at all (all-zero B): keep attention finite
        if self.modules_tf is not None:
            x = self.modules_tf(x, src_key_padding_mask=~(p | none))
        out = x[:, 0] if self.cls is not None else pool_modules(x, p)
        if norm is not None:
            out = out + self.scale_feat(norm[:, None])[:, 0]
        return self.out_norm(out)
