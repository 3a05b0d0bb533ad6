"""Canonical form of a LoRA update (DESIGN §2): the thin SVD of ΔW = s·B·A without forming ΔW.

QR of B and Aᵀ reduces the problem to the SVD of an r×r core, so the cost is O((m+n)·r²).
Every factorization (B·G, G⁻¹·A), G ∈ GL(r), of the same ΔW gives the same result up to the
three leftovers handled here:

* **Sign rule.** (uᵢ, vᵢ) and (−uᵢ, −vᵢ) give the same ΔW. We flip each pair so that its
  *deciding quantity* dᵢ = Σⱼ uᵢⱼ³ + Σₖ vᵢₖ³ is positive. dᵢ is odd under the flip, continuous in the
  weights and scale-free (|dᵢ| ≤ 2 for unit vectors), so a relative perturbation ε of the weights
  moves dᵢ by O(ε) and flips the sign only when |dᵢ| is itself O(ε): unlike the "largest entry of uᵢ
  is positive" rule, no near-tie between two entries can flip it. `sign_margin` returns |dᵢ|.
* **Rank deficiency.** Components with σᵢ ≤ rtol·σ₁ (all of them when B = 0) span an arbitrary
  subspace; `mask` is False for them and their u, v, σ are zeroed so nothing downstream can read them.
* **Repeated singular values.** A rotation inside a shared singular subspace stays free; it has
  measure zero for trained adapters and no test depends on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from w2t.adapter import Adapter

CANON_VERSION = 1  # bump when anything below changes the tokens; cache keys include it
DEFAULT_RTOL = 1e-6


@dataclass
class CanonicalForm:
    """U (…, m, r), S (…, r) descending, V (…, n, r), mask (…, r): ΔW = U diag(S) Vᵀ."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    mask: torch.Tensor

    def delta(self) -> torch.Tensor:
        """Dense ΔW (…, m, n); for tests and small modules only."""
        return (self.U * self.S.unsqueeze(-2)) @ self.V.transpose(-1, -2)


def _deciding_quantity(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return U.pow(3).sum(-2) + V.pow(3).sum(-2)  # (…, r)


def sign_margin(form: CanonicalForm) -> torch.Tensor:
    """|dᵢ| per component: how far the sign rule is from a tie (0 means undecided)."""
    return _deciding_quantity(form.U, form.V).abs()


def canonicalize(
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    *,
    rtol: float = DEFAULT_RTOL,
    sign_rule: bool = True,
) -> CanonicalForm:
    """Canonicalize ΔW = scale·B@A for A (…, r, n), B (…, m, r) and scale () or (…,).

    Works on one module or a batch of same-shaped modules in one call (batched QR/SVD), on the
    device the factors live on. Computes in float64 and returns float64.
    """
    if A.ndim < 2 or B.ndim < 2 or A.shape[-2] != B.shape[-1] or A.shape[:-2] != B.shape[:-2]:
        raise ValueError(f"canonicalize: need A (…, r, n) and B (…, m, r); got {tuple(A.shape)} and {tuple(B.shape)}")
    A64 = A.to(torch.float64)
    B64 = B.to(torch.float64)
    s = torch.as_tensor(scale, dtype=torch.float64, device=A.device)
    s = s.reshape(s.shape + (1, 1))  # broadcast over the r×r core

    Q_B, R_B = torch.linalg.qr(B64)  # (…, m, r), (…, r, r)
    Q_A, R_A = torch.linalg.qr(A64.transpose(-1, -2))  # (…, n, r), (…, r, r)
    core = s * (R_B @ R_A.transpose(-1, -2))  # (…, r, r)
    Uc, S, Vch = torch.linalg.svd(core)  # descending S
    U = Q_B @ Uc  # (…, m, r)
    V = Q_A @ Vch.transpose(-1, -2)  # (…, n, r)

    top = S[..., :1]
    mask = (S > rtol * top) & (top > 0)
    factor = mask.to(U.dtype)  # zero the masked components...
    if sign_rule:  # ...and flip the others to the sign rule, in one in-place pass over U and V
        factor = factor * torch.where(_deciding_quantity(U, V) < 0, -1.0, 1.0).to(U.dtype)
    U.mul_(factor.unsqueeze(-2))
    V.mul_(factor.unsqueeze(-2))
    return CanonicalForm(U=U, S=S * mask.to(S.dtype), V=V, mask=mask)


@dataclass
class CanonicalModule:
    """Canonical tokens of one module: r components (uᵢ, σᵢ, vᵢ) and their mask."""

    module_type: str
    layer: int
    U: torch.Tensor  # (m, r)
    S: torch.Tensor  # (r,)
    V: torch.Tensor  # (n, r)
    mask: torch.Tensor  # (r,) bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.U.shape[0], self.V.shape[0]


def _stack64(mats: list[torch.Tensor], device) -> torch.Tensor:
    """Stack and convert to float64 in one allocation (big adapters are bound by memory traffic)."""
    out = torch.empty((len(mats), *mats[0].shape), dtype=torch.float64, device=device)
    for i, m in enumerate(mats):
        out[i].copy_(m)
    return out


def canonicalize_adapter(
    adapter: "Adapter",
    *,
    rtol: float = DEFAULT_RTOL,
    sign_rule: bool = True,
    device: torch.device | str | None = None,
) -> list[CanonicalModule]:
    """Canonicalize every module of an adapter, one batched call per (shape, rank) bucket.

    Modules of one type share a shape, so a transformer adapter costs a handful of batched
    QR/SVD calls instead of one per module.
    """
    buckets: dict[tuple[int, int, int], list[int]] = {}
    for i, mod in enumerate(adapter.modules):
        buckets.setdefault((*mod.shape, mod.rank), []).append(i)
    out: list[CanonicalModule | None] = [None] * len(adapter.modules)
    for idx in buckets.values():
        mods = [adapter.modules[i] for i in idx]
        A = _stack64([m.A for m in mods], device)  # (k, r, n)
        B = _stack64([m.B for m in mods], device)  # (k, m, r)
        scale = torch.tensor([m.scale for m in mods], dtype=torch.float64, device=A.device)
        form = canonicalize(A, B, scale, rtol=rtol, sign_rule=sign_rule)
        U, S, V, mask = (t.cpu() for t in (form.U, form.S, form.V, form.mask))
        for j, (i, mod) in enumerate(zip(idx, mods)):
            out[i] = CanonicalModule(mod.module_type, mod.layer, U[j], S[j], V[j], mask[j])
    return out  # type: ignore[return-value]
