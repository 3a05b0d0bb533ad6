"""What a model reads of each module: canonical components (docs/design.md §2) or, as an ablation, raw factors.

Both give the same token layout (uᵢ, σᵢ, vᵢ per rank component), so every model and the cache
take either. Only the canonical one is the same for every factorization (B·G, G⁻¹·A); the raw one
is how the files happen to store ΔW, and is what `model=w2t_raw` and `model=flat_mlp` read to show
what that ambiguity costs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from w2t.canon.canonical import DEFAULT_RTOL, CanonicalModule, canonicalize_adapter
from w2t.canon.dora import module_features

if TYPE_CHECKING:
    from w2t.io.adapter import Adapter

REPRESENTATIONS = ("canonical", "raw")


def raw_components(adapter: Adapter) -> list[CanonicalModule]:
    """Rank components as stored: uᵢ = bᵢ/‖bᵢ‖, vᵢ = aᵢ/‖aᵢ‖, σᵢ = s‖bᵢ‖‖aᵢ‖, so Σᵢ σᵢuᵢvᵢᵀ = s·B·A.

    Neither sorted nor sign-fixed, and not orthogonal: they change under every reparametrization.
    A component with a zero column of B or row of A is masked (it adds nothing to ΔW).
    """
    out = []
    for mod in adapter.modules:
        B, A = mod.B.double(), mod.A.double()
        nb, na = B.norm(dim=0), A.norm(dim=1)  # (r,), (r,)
        mask = (nb > 0) & (na > 0)
        U = torch.where(mask, B / nb.clamp_min(1e-300), 0.0)
        V = torch.where(mask[:, None], A / na.clamp_min(1e-300)[:, None], 0.0).T
        S = torch.where(mask, abs(mod.scale) * nb * na, 0.0)
        if mod.scale < 0:
            U = -U
        out.append(CanonicalModule(mod.module_type, mod.layer, U, S, V, mask, module_features(mod)))
    return out


def adapter_components(adapter: Adapter, representation: str = "canonical", *, rtol: float = DEFAULT_RTOL,
                       sign_rule: bool = True, device: torch.device | str | None = None) -> list[CanonicalModule]:
    """The adapter's rank components in the chosen representation (`REPRESENTATIONS`)."""
    if representation == "canonical":
        return canonicalize_adapter(adapter, rtol=rtol, sign_rule=sign_rule, device=device)
    if representation == "raw":
        return raw_components(adapter)
    raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
