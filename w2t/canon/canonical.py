"""Canonical form of a LoRA update (docs/design.md §2): the thin SVD of ΔW = s·B·A without forming ΔW.

QR of B and Aᵀ reduces the problem to the SVD of an r×r core, so the cost is O((m+n)·r²).
The thin QRs come from Gram matrices and Cholesky (CholeskyQR, a second pass, CholeskyQR2, when a
factor is not well conditioned, Householder QR when even that is not accurate): batched matmuls
over all modules of one shape, in float64, and Q is never formed — U and V are one batched
r×r·r×m product each. Only two passes over each m×r panel are unavoidable (its Gram matrix, then
the product); everything else is r×r work. See `canonicalize` for the accuracy rule.
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

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from w2t.io.adapter import Adapter

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
    method: str = "auto",
) -> CanonicalForm:
    """Canonicalize ΔW = scale·B@A for A (…, r, n), B (…, m, r) and scale () or (…,).

    Works on one module or a batch of same-shaped modules in one call (batched QR/SVD), on the
    device the factors live on. Computes in float64 and returns float64. `U` and `V` are returned
    as transposed views of contiguous (…, r, m) and (…, r, n) tensors (rows uᵢ, vᵢ contiguous, as
    tokens want them).

    `method="auto"` takes the thin QRs from Gram matrices and Cholesky (batched matmuls only, no
    Q formed): one pass when every factor of the batch is well conditioned (κ ≤ 100), else
    CholeskyQR2 (a second pass); every module whose Cholesky fails or whose second pass would not
    be orthogonal to rounding level (rank-deficient or very ill-conditioned factors, B = 0) is
    redone by Householder QR. `method="householder"` uses Householder QR for all (the reference).
    """
    if A.ndim < 2 or B.ndim < 2 or A.shape[-2] != B.shape[-1] or A.shape[:-2] != B.shape[:-2]:
        raise ValueError(f"canonicalize: need A (…, r, n) and B (…, m, r); got {tuple(A.shape)} and {tuple(B.shape)}")
    if method not in ("auto", "householder"):
        raise ValueError(f"canonicalize: method must be 'auto' or 'householder', got {method!r}")
    # Everything below works on the "wide" layouts A (k, r, n) and Bᵀ (k, r, m): Gram matrices and
    # products of r×r matrices with r×m panels are the fastest batched-matmul shapes on CPU, and
    # rows uᵢ, vᵢ come out contiguous. Pass B as `Bt.mT` (a view) to avoid any transposing copy.
    # Factors stored in a lower precision (bf16, float32) are converted to float64 (exactly) a few
    # modules at a time, in cache, where the math needs them; they are never copied whole.
    A = A if A.is_floating_point() else A.to(torch.float64)
    B = B if B.is_floating_point() else B.to(torch.float64)
    s = torch.as_tensor(scale, dtype=torch.float64, device=A.device)
    batch = A.shape[:-2]
    k = math.prod(batch)  # 1 for a single module
    s = s.reshape(s.shape + (1, 1)).expand(*batch, 1, 1).reshape(k, 1, 1)  # broadcast over the r×r core
    At, Bt = A.reshape(k, *A.shape[-2:]), B.mT.reshape(k, B.shape[-1], B.shape[-2])

    if method == "householder":
        Lb, Yb, La, Ya, S = _svd_householder(At.to(torch.float64), Bt.to(torch.float64), s, rtol)
        fix = None
    else:
        Lb, Yb, La, Ya, S, ok = _svd_cholqr(At, Bt, s, rtol)
        fix = None
        if not bool(ok.all()):  # redo, by Householder QR, the modules the Gram QR cannot handle
            bad = (~ok).nonzero().squeeze(-1)
            fix = bad, *_svd_householder(At[bad].to(torch.float64), Bt[bad].to(torch.float64), s[bad], rtol)
            S[bad] = fix[-1]
    Ut, Vt = _products(Lb, Yb, La, Ya, fix, sign_rule)

    mask = _mask_factor(S, rtol) > 0
    S = S * mask.to(S.dtype)  # masked components of U, V are already exactly zero (_mask_factor)
    return CanonicalForm(
        U=Ut.reshape(*batch, *Ut.shape[-2:]).transpose(-1, -2),
        S=S.reshape(*batch, S.shape[-1]),
        V=Vt.reshape(*batch, *Vt.shape[-2:]).transpose(-1, -2),
        mask=mask.reshape(*batch, mask.shape[-1]),
    )


# Uᵀ = Cb·Yb and Vᵀ = Ca·Ya are formed a few modules at a time into a small reused buffer that stays
# in cache while the chunk's cubes are summed; the sign-corrected chunk is then written to the
# output once. Every output byte is written exactly once and no large temporary is allocated
# (fresh pages cost as much as a memory pass on a VM). With several intra-op threads every op is a
# parallel region ending in a barrier, so there few large chunks win (measured on 2 shared cores:
# 2 MiB chunks are best with 1 thread, 32 MiB ones with 2, where small chunks cost 3×).
_CHUNK_BYTES = 2 << 20
_CHUNK_BYTES_THREADED = 32 << 20


def _chunk_bytes() -> int:
    return _CHUNK_BYTES if torch.get_num_threads() == 1 else _CHUNK_BYTES_THREADED


def _products(Lb, Yb, La, Ya, fix, sign_rule):
    """Uᵀ (k, r, m) = Lb @ Yb and Vᵀ (k, r, n) = La @ Ya, then the rows of `fix`, then the sign rule."""
    k, r = Lb.shape[:2]
    m, n = Yb.shape[-1], Ya.shape[-1]
    Ut = Lb.new_empty(k, r, m)  # float64, like Lb and La
    Vt = La.new_empty(k, r, n)
    if not sign_rule or fix is not None:
        torch.matmul(Lb, Yb.to(torch.float64), out=Ut)
        torch.matmul(La, Ya.to(torch.float64), out=Vt)
        if fix is not None:
            bad, lb, yb, la, ya, _ = fix
            Ut[bad], Vt[bad] = lb @ yb, la @ ya
        if sign_rule:
            _apply_sign_rule_(Ut, Vt)
        return Ut, Vt
    step = max(1, min(k, _chunk_bytes() // (8 * r * (m + n))))
    su, sv, cube = Ut.new_empty(step, r, m), Vt.new_empty(step, r, n), Ut.new_empty(step * r * max(m, n))
    # factors still in their storage dtype (one-pass Gram QR) are converted chunk by chunk, in cache
    yb = None if Yb.dtype == torch.float64 else Ut.new_empty(step, r, m)
    ya = None if Ya.dtype == torch.float64 else Vt.new_empty(step, r, n)
    for i in range(0, k, step):  # a loop over chunks of modules, not over modules
        c, j = slice(i, i + step), min(k, i + step) - i
        u = torch.matmul(Lb[c], Yb[c] if yb is None else yb[:j].copy_(Yb[c]), out=su[:j])
        v = torch.matmul(La[c], Ya[c] if ya is None else ya[:j].copy_(Ya[c]), out=sv[:j])
        d = torch.mul(u, u, out=cube[: u.numel()].view(u.shape)).mul_(u).sum(-1)
        d += torch.mul(v, v, out=cube[: v.numel()].view(v.shape)).mul_(v).sum(-1)
        flip = torch.where(d < 0, -1.0, 1.0).to(u.dtype).unsqueeze(-1)
        torch.mul(u, flip, out=Ut[c])
        torch.mul(v, flip, out=Vt[c])
    return Ut, Vt


def _apply_sign_rule_(Ut: torch.Tensor, Vt: torch.Tensor) -> None:
    """Flip, in place, each component (uᵢ, vᵢ) whose deciding quantity dᵢ is negative."""
    flip = torch.where(_deciding_quantity_t(Ut, Vt) < 0, -1.0, 1.0).to(Ut.dtype).unsqueeze(-1)
    Ut.mul_(flip)
    Vt.mul_(flip)


def _deciding_quantity_t(Ut: torch.Tensor, Vt: torch.Tensor) -> torch.Tensor:
    """dᵢ = Σ uᵢ³ + Σ vᵢ³ for Uᵀ (k, r, m) and Vᵀ (k, r, n) (the rule of the module docstring)."""
    return Ut.square().mul_(Ut).sum(-1) + Vt.square().mul_(Vt).sum(-1)


def _mask_factor(S: torch.Tensor, rtol: float) -> torch.Tensor:
    """1 for kept components, 0 for masked ones (σᵢ ≤ rtol·σ₁, or σ₁ = 0)."""
    top = S[..., :1]
    return ((S > rtol * top) & (top > 0)).to(S.dtype)


def _svd_householder(A64, Bt64, s, rtol):
    """Reference path: Householder QR of B and Aᵀ and SVD of the core.

    Returns (Cb, Yb, Ca, Ya, S) with Uᵀ = Cb @ Yb = U'ᵀ Q_Bᵀ and Vᵀ = Ca @ Ya = V'ᵀ Q_Aᵀ.
    """
    Q_B, R_B = torch.linalg.qr(Bt64.mT)  # (k, m, r), (k, r, r)
    Q_A, R_A = torch.linalg.qr(A64.mT)  # (k, n, r), (k, r, r)
    Uc, S, Vch = torch.linalg.svd(s * (R_B @ R_A.mT))  # descending S
    f = _mask_factor(S, rtol).unsqueeze(-1)  # masked components come out exactly zero
    return Uc.mT * f, Q_B.mT, Vch * f, Q_A.mT, S


# A Gram (Cholesky) QR done once leaves Q orthogonal to about √m·ε·κ(X)²; we accept one pass when
# the cheap upper bound κ_F(R) = ‖R‖_F‖R⁻¹‖_F ≥ κ₂(X) is at most this (error ≲ 1e-10 at worst,
# ~1e-14 for typical LoRA factors with κ ≈ 1–20), and otherwise run the second pass.
_ONE_PASS_KAPPA = 100.0
# The second pass (CholeskyQR2) restores orthogonality to rounding level when its Gram matrix
# Q₁ᵀQ₁ is this close to I (max entry, i.e. κ(X) ≲ 1e7); beyond it, or when a Cholesky fails
# (rank-deficient factors, B = 0), the module is redone by Householder QR.
_CHOLQR_TOL = 1e-2


def _chunks64(Xt: torch.Tensor):
    """(slice, float64 chunk of Xt) a few modules at a time; lower precisions go through one buffer."""
    k, r, m = Xt.shape
    step = max(1, min(k, _chunk_bytes() // (8 * r * m)))
    buf = None if Xt.dtype == torch.float64 else Xt.new_empty(step, r, m, dtype=torch.float64)
    for i in range(0, k, step):
        c = slice(i, i + step)
        yield c, (Xt[c] if buf is None else buf[: min(k, i + step) - i].copy_(Xt[c]))


def _gram64(Xt: torch.Tensor) -> torch.Tensor:
    """X Xᵀ per module, in float64, for Xt (k, r, m) of any float dtype."""
    if Xt.dtype == torch.float64:
        return Xt @ Xt.mT
    G = Xt.new_empty(Xt.shape[0], Xt.shape[1], Xt.shape[1], dtype=torch.float64)
    for c, x in _chunks64(Xt):
        torch.matmul(x, x.mT, out=G[c])
    return G


def _gram_qr(Xt: torch.Tensor):
    """Thin QR X = Q R of X = Xtᵀ, Xt (k, r, m) of any float dtype, by Gram/Cholesky in float64.

    Returns (Yt, R, L, ok) with Qᵀ = L⁻¹ Yt (L lower triangular r×r): Yt is Xt itself after one
    pass (when every module of the batch is well conditioned), or Q₁ᵀ = L₁⁻¹ Xt after the second
    (CholeskyQR2); ok (k,) is False where the result is not trustworthy (see _CHOLQR_TOL).
    """
    eye = torch.eye(Xt.shape[-2], dtype=torch.float64, device=Xt.device)
    L1, info1 = torch.linalg.cholesky_ex(_gram64(Xt))  # XᵀX = L₁L₁ᵀ, R₁ = L₁ᵀ
    ok = info1 == 0
    if not bool(ok.all()):
        L1[~ok] = eye  # finite placeholder; these modules are redone by the caller
    L1inv = torch.linalg.solve_triangular(L1, eye, upper=False)
    kappa_f = torch.linalg.matrix_norm(L1) * torch.linalg.matrix_norm(L1inv)  # ≥ κ₂(X)
    if bool((ok & (kappa_f <= _ONE_PASS_KAPPA)).all()):
        return Xt, L1.mT, L1, ok  # Xt may still be in its storage dtype
    Q1t = torch.linalg.solve_triangular(L1, Xt.to(torch.float64), upper=False)  # L₁⁻¹ Xt = (X R₁⁻¹)ᵀ, backward stable
    G2 = Q1t @ Q1t.mT
    L2, info2 = torch.linalg.cholesky_ex(G2)
    ok &= (info2 == 0) & ((G2 - eye).abs().amax((-2, -1)) <= _CHOLQR_TOL)  # NaN fails too
    if not bool(ok.all()):
        L2[~ok] = eye
    return Q1t, L2.mT @ L1.mT, L2, ok  # R = R₂ R₁


def _svd_cholqr(At, Bt, s, rtol):
    """Gram-QR path: (Cb, Yb, Ca, Ya, S, ok) with Uᵀ = Cb @ Yb, Vᵀ = Ca @ Ya, ok (k,) as in _gram_qr.

    Uᵀ = U'ᵀ Q_Bᵀ = (L_B⁻ᵀ U')ᵀ Y_B and Vᵀ = (L_A⁻ᵀ V')ᵀ Y_A: one batched r×r·r×m matmul per side.
    """
    Ybt, Rb, Lb, okb = _gram_qr(Bt)
    Yat, Ra, La, oka = _gram_qr(At)
    Uc, S, Vch = torch.linalg.svd(s * (Rb @ Ra.mT))  # descending S
    f = _mask_factor(S, rtol).unsqueeze(-2)  # masked components come out exactly zero
    Cb = torch.linalg.solve_triangular(Lb.mT, Uc * f, upper=True)  # L⁻ᵀ U'
    Ca = torch.linalg.solve_triangular(La.mT, Vch.mT * f, upper=True)  # L⁻ᵀ V'
    return Cb.mT, Ybt, Ca.mT, Yat, S, okb & oka


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


def _stack(mats: list[torch.Tensor], device) -> torch.Tensor:
    """Stack in the factors' own (promoted) dtype, in one C++ call; canonicalize converts to float64
    chunk by chunk, so the float64 copy of the factors is never materialized."""
    dtype = mats[0].dtype
    for m in mats[1:]:
        dtype = torch.promote_types(dtype, m.dtype)
    out = torch.empty((len(mats), *mats[0].shape), dtype=dtype, device=device)
    return torch.stack([m.to(device) for m in mats] if device is not None else mats, out=out)


def canonicalize_adapter(
    adapter: "Adapter",
    *,
    rtol: float = DEFAULT_RTOL,
    sign_rule: bool = True,
    device: torch.device | str | None = None,
    method: str = "auto",
) -> list[CanonicalModule]:
    """Canonicalize every module of an adapter, one batched call per (shape, rank) bucket.

    Modules of one type share a shape, so a transformer adapter costs a handful of batched
    Gram/Cholesky/SVD calls instead of one per module; the per-module work left in Python is
    building the result list (views into the batched outputs). Factors are stacked in their own dtype
    and converted to float64 in cache, chunk by chunk (pass `load_adapter(..., dtype=torch.bfloat16)`
    for bf16 files to skip load_adapter's float32 copy). `method` as in `canonicalize`.
    """
    buckets: dict[tuple[int, int, int], list[int]] = {}
    for i, mod in enumerate(adapter.modules):
        buckets.setdefault((*mod.shape, mod.rank), []).append(i)
    out: list[CanonicalModule | None] = [None] * len(adapter.modules)
    for idx in buckets.values():
        mods = [adapter.modules[i] for i in idx]
        A = _stack([m.A for m in mods], device)  # (k, r, n)
        B = _stack([m.B.mT for m in mods], device).mT  # (k, m, r), stored as (k, r, m)
        scale = torch.tensor([m.scale for m in mods], dtype=torch.float64, device=A.device)
        form = canonicalize(A, B, scale, rtol=rtol, sign_rule=sign_rule, method=method)
        U, S, V, mask = (t.cpu() for t in (form.U, form.S, form.V, form.mask))
        for j, (i, mod) in enumerate(zip(idx, mods)):
            out[i] = CanonicalModule(mod.module_type, mod.layer, U[j], S[j], V[j], mask[j])
    return out  # type: ignore[return-value]
