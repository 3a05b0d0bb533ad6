"""Canonical form of a LoRA update (docs/design.md §2): the thin SVD of ΔW = s·B·A without forming ΔW.

QR of B and Aᵀ reduces the problem to the SVD of an r×r core, so the cost is O((m+n)·r²).
The thin QRs come from Gram matrices and Cholesky (CholeskyQR, a second pass, CholeskyQR2, when a
factor is not well conditioned, Householder QR when even that is not accurate): batched matmuls
over the modules of one shape (a chunk at a time), in float64, and Q is never formed — U and V
are one batched r×r·r×m product each. Only two passes over each m×r panel are unavoidable (its Gram
matrix, then the product); everything else is r×r work. See `canonicalize` for the accuracy rule.
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
import torch.nn.functional as F

from w2t.canon.dora import module_features

if TYPE_CHECKING:
    from w2t.io.adapter import Adapter

CANON_VERSION = 2  # bump when anything below changes the tokens; cache keys include it
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
    tokens want them). The factors may have any strides (matmuls read transposed operands in place).

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
    A = A if A.is_floating_point() else A.to(torch.float64)
    B = B if B.is_floating_point() else B.to(torch.float64)
    batch = A.shape[:-2]
    k = math.prod(batch)  # 1 for a single module
    s = torch.as_tensor(scale, dtype=torch.float64, device=A.device)
    s = s.reshape(s.shape + (1, 1)).expand(*batch, 1, 1).reshape(k, 1, 1)  # broadcast over the r×r core
    # Both sides as "tall" factors X (k, m, r): B, and Aᵀ (a view)
    Ut, S, Vt, mask = _canonicalize(_Panels(A.reshape(k, *A.shape[-2:]).mT), _Panels(B.reshape(k, *B.shape[-2:])),
                                    s, rtol, sign_rule, method)
    return CanonicalForm(
        U=Ut.reshape(*batch, *Ut.shape[-2:]).transpose(-1, -2),
        S=S.reshape(*batch, S.shape[-1]),
        V=Vt.reshape(*batch, *Vt.shape[-2:]).transpose(-1, -2),
        mask=mask.reshape(*batch, mask.shape[-1]),
    )


def _canonicalize(Pa: _Panels, Pb: _Panels, s: torch.Tensor, rtol: float, sign_rule: bool, method: str):
    """Uᵀ (k, r, m), S (k, r), Vᵀ (k, r, n), mask (k, r) of ΔW = s·B·A for the factors X_B = B and X_A = Aᵀ."""
    if method == "householder":
        Lb, Qb, La, Qa, S = _svd_householder(Pa.whole(), Pb.whole(), s, rtol)
        Yb, Ya, fix = _Panels(Qb), _Panels(Qa), None
    else:
        Lb, Yb, La, Ya, S, ok = _svd_cholqr(Pa, Pb, s, rtol)
        fix = None
        if not bool(ok.all()):  # redo, by Householder QR, the modules the Gram QR cannot handle
            bad = (~ok).nonzero().squeeze(-1)
            fix = bad, *_svd_householder(Pa.take(bad), Pb.take(bad), s[bad], rtol)
            S[bad] = fix[-1]
    Ut, Vt = _products(Lb, Yb, La, Ya, fix, sign_rule)
    mask = _mask_factor(S, rtol) > 0
    S = S * mask.to(S.dtype)  # masked components of U, V are already exactly zero (_mask_factor)
    return Ut, S, Vt, mask


# The passes over the m×r panels (the Gram matrices, then the products) run a few modules at a time:
# factors stored in a lower precision (bf16, float32) are converted to float64 (exactly) into a small
# reused buffer that stays in cache, and Uᵀ, Vᵀ are formed straight into the output, where the
# chunk's cubes (the sign rule) and flips find them still in cache. Every output byte is written
# once, and with one thread no float64 copy of all the factors is made and no large temporary is
# allocated (fresh pages cost as much as a memory pass on a VM). With several intra-op threads every
# op is a parallel region ending in a barrier, and on a loaded machine each one waits for descheduled
# peers (GNU OpenMP's default active waiting makes that worse): there a bucket is one chunk, its
# factors converted to float64 once, and each pass is one batched op. Measured on 2 shared cores
# (load 4–6): with 1 thread, 2–4 MiB chunks (whole buckets cost 1.4–1.5×); with 2 threads, whole
# buckets (2 MiB chunks cost 1.6–2.0×, 16 MiB ones 1.1–1.3×; with OMP_WAIT_POLICY=PASSIVE the order
# reverses, whole buckets cost 1.5–1.6× of 2 MiB chunks).
_CHUNK_BYTES = 2 << 20
_CHUNK_BYTES_THREADED = 1 << 40  # whole buckets


def _chunk_bytes() -> int:
    return _CHUNK_BYTES if torch.get_num_threads() == 1 else _CHUNK_BYTES_THREADED


class _Panels:
    """The k factors X (m, r) of one side of a batch (B, or Aᵀ), handed out in float64 a chunk at a time.

    `src` is a (k, m, r) tensor of any float dtype and strides (`A.mT` is a view), or a list of k
    matrices of one shape: the modules' own factors, X = mat (`transposed=False`) or mat.mT. Stacked
    float64 factors are used in place; anything else is converted chunk by chunk into a reused
    buffer (stacking and converting in one pass), or, when one chunk holds them all, once (`convert`).
    """

    def __init__(self, src: torch.Tensor | list[torch.Tensor], transposed: bool = False):
        if isinstance(src, torch.Tensor):
            self.x, self.mats, self.transposed = src, None, False
            self.k, self.m, self.r = src.shape
            self.dtype, self.device = src.dtype, src.device
        else:
            self.x, self.mats, self.transposed = None, src, transposed
            self.k = len(src)
            self.m, self.r = src[0].shape[::-1] if transposed else src[0].shape
            self.dtype, self.device = src[0].dtype, src[0].device
            for mat in src[1:]:
                self.dtype = torch.promote_types(self.dtype, mat.dtype)

    @property
    def in_place(self) -> bool:
        return self.x is not None and self.dtype == torch.float64

    def step(self, bytes_per_module: int) -> int:
        """Modules per chunk: as many as `_chunk_bytes()` holds, at least 1, at most k."""
        return max(1, min(self.k, _chunk_bytes() // bytes_per_module))

    def buffer(self, step: int) -> torch.Tensor | None:
        """The conversion buffer for `chunk` (None when the factors are used in place)."""
        if self.in_place:
            return None
        if self.x is not None:  # same strides as the factors: the conversion reads them in order
            return torch.empty_like(self.x[:step], dtype=torch.float64)
        return torch.empty((step, *self.mats[0].shape), dtype=torch.float64, device=self.device)

    def chunk(self, i: int, j: int, buf: torch.Tensor | None) -> torch.Tensor:
        """X of modules i … i+j−1 in float64, (j, m, r)."""
        if buf is None:
            return self.x[i : i + j]
        if self.x is not None:
            return buf[:j].copy_(self.x[i : i + j])
        x = torch.stack(self.mats[i : i + j], out=buf[:j])  # converts while stacking, one pass
        return x.mT if self.transposed else x

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """X of the modules `idx` (an index tensor), float64 (len(idx), m, r)."""
        if self.x is not None:
            return self.x[idx].to(torch.float64)
        x = torch.stack([self.mats[i] for i in idx.tolist()]).to(torch.float64)
        return x.mT if self.transposed else x

    def whole(self) -> torch.Tensor:
        """X of every module in float64 (k, m, r); a copy unless stacked float64 already."""
        if self.in_place:
            return self.x
        if self.x is not None:
            return self.x.to(torch.float64)
        # Stack, then convert: one op each. stack(out=float64) would convert module by module, one
        # parallel region each with several threads, which is far slower on a loaded machine.
        x = torch.stack(self.mats).to(torch.float64)
        return x.mT if self.transposed else x

    def convert(self) -> None:
        """From now on, hold X as one float64 tensor (for the passes that would each convert it whole)."""
        if not self.in_place:
            self.x, self.mats, self.transposed, self.dtype = self.whole(), None, False, torch.float64


def _products(Lb, Yb: _Panels, La, Ya: _Panels, fix, sign_rule):
    """Uᵀ (k, r, m) = Lb @ Ybᵀ and Vᵀ (k, r, n) = La @ Yaᵀ, the rows of `fix`, and the sign rule."""
    k, r = Lb.shape[:2]
    m, n = Yb.m, Ya.m
    Ut = Lb.new_empty(k, r, m)  # float64, like Lb and La
    Vt = La.new_empty(k, r, n)
    step = Yb.step(8 * r * (m + n))
    yb, ya = Yb.buffer(step), Ya.buffer(step)
    cube = Ut.new_empty(step * r * max(m, n)) if sign_rule else None
    for i in range(0, k, step):  # a loop over chunks of modules, not over modules
        j = min(k, i + step) - i
        u = torch.matmul(Lb[i : i + j], Yb.chunk(i, j, yb).mT, out=Ut[i : i + j])
        v = torch.matmul(La[i : i + j], Ya.chunk(i, j, ya).mT, out=Vt[i : i + j])
        if sign_rule:  # the chunk is still in cache: dᵢ, then the flips, in place
            d = torch.pow(u, 3, out=cube[: u.numel()].view(u.shape)).sum(-1)
            d += torch.pow(v, 3, out=cube[: v.numel()].view(v.shape)).sum(-1)
            flip = torch.where(d < 0, -1.0, 1.0).to(u.dtype).unsqueeze(-1)
            u.mul_(flip)
            v.mul_(flip)
    if fix is not None:
        bad, lb, yb_bad, la, ya_bad, _ = fix
        u, v = lb @ yb_bad.mT, la @ ya_bad.mT
        if sign_rule:
            _apply_sign_rule_(u, v)
        Ut[bad], Vt[bad] = u, v
    return Ut, Vt


def _apply_sign_rule_(Ut: torch.Tensor, Vt: torch.Tensor) -> None:
    """Flip, in place, each component (uᵢ, vᵢ) whose deciding quantity dᵢ is negative."""
    flip = torch.where(_deciding_quantity_t(Ut, Vt) < 0, -1.0, 1.0).to(Ut.dtype).unsqueeze(-1)
    Ut.mul_(flip)
    Vt.mul_(flip)


def _deciding_quantity_t(Ut: torch.Tensor, Vt: torch.Tensor) -> torch.Tensor:
    """dᵢ = Σ uᵢ³ + Σ vᵢ³ for Uᵀ (k, r, m) and Vᵀ (k, r, n) (the rule of the module docstring)."""
    return Ut.pow(3).sum(-1) + Vt.pow(3).sum(-1)


def _mask_factor(S: torch.Tensor, rtol: float) -> torch.Tensor:
    """1 for kept components, 0 for masked ones (σᵢ ≤ rtol·σ₁, or σ₁ = 0)."""
    top = S[..., :1]
    return ((S > rtol * top) & (top > 0)).to(S.dtype)


def _svd_householder(Xa, Xb, s, rtol):
    """Reference path: Householder QR of X_B = B and X_A = Aᵀ (float64 (k, ·, r)) and SVD of the core.

    Returns (Cb, Q_B, Ca, Q_A, S) with Uᵀ = Cb @ Q_Bᵀ = U'ᵀ Q_Bᵀ and Vᵀ = Ca @ Q_Aᵀ = V'ᵀ Q_Aᵀ.
    """
    Q_B, R_B = torch.linalg.qr(Xb)  # (k, m, p), (k, p, r) with p = min(m, r)
    Q_A, R_A = torch.linalg.qr(Xa)  # (k, n, q), (k, q, r) with q = min(n, r)
    Uc, S, Vch = torch.linalg.svd(s * (R_B @ R_A.mT), full_matrices=False)  # descending S, min(p, q) of them
    # a rank above min(m, n) (a 1-channel conv, a zero-padded factor) has r − min(p, q) exactly-zero components
    extra = Xb.shape[-1] - S.shape[-1]
    Ct, Ca = F.pad(Uc.mT, (0, 0, 0, extra)), F.pad(Vch, (0, 0, 0, extra))  # (k, r, p), (k, r, q)
    S = F.pad(S, (0, extra))
    f = _mask_factor(S, rtol).unsqueeze(-1)  # masked components come out exactly zero
    return Ct * f, Q_B, Ca * f, Q_A, S


# A Gram (Cholesky) QR done once leaves Q orthogonal to about √m·ε·κ(X)²; we accept one pass when
# the cheap upper bound κ_F(R) = ‖R‖_F‖R⁻¹‖_F ≥ κ₂(X) is at most this (error ≲ 1e-10 at worst,
# ~1e-14 for typical LoRA factors with κ ≈ 1–20), and otherwise run the second pass.
_ONE_PASS_KAPPA = 100.0
# The second pass (CholeskyQR2) restores orthogonality to rounding level when its Gram matrix
# Q₁ᵀQ₁ is this close to I (max entry, i.e. κ(X) ≲ 1e7); beyond it, or when a Cholesky fails
# (rank-deficient factors, B = 0), the module is redone by Householder QR.
_CHOLQR_TOL = 1e-2


def _gram64(X: _Panels) -> torch.Tensor:
    """XᵀX per module (k, r, r), in float64: chunk by chunk, or in one batched matmul when one chunk holds all."""
    step = X.step(8 * X.r * X.m)
    if step == X.k:  # one chunk: convert once, and the products (and a second pass) reuse it
        X.convert()
    if X.in_place:
        return X.x.mT @ X.x
    G = torch.empty(X.k, X.r, X.r, dtype=torch.float64, device=X.device)
    buf = X.buffer(step)
    for i in range(0, X.k, step):
        j = min(X.k, i + step) - i
        x = X.chunk(i, j, buf)
        torch.matmul(x.mT, x, out=G[i : i + j])
    return G


def _gram_qr(X: _Panels):
    """Thin QR X = Q R, by Gram/Cholesky in float64, of the k factors X (m, r).

    Returns (Y, R, L, ok) with Q = Y L⁻ᵀ (L lower triangular r×r): Y is X itself after one pass
    (when every module of the batch is well conditioned), or Q₁ = X L₁⁻ᵀ after the second
    (CholeskyQR2); ok (k,) is False where the result is not trustworthy (see _CHOLQR_TOL).
    """
    eye = torch.eye(X.r, dtype=torch.float64, device=X.device)
    L1, info1 = torch.linalg.cholesky_ex(_gram64(X))  # XᵀX = L₁L₁ᵀ, R₁ = L₁ᵀ
    ok = info1 == 0
    if not bool(ok.all()):
        L1[~ok] = eye  # finite placeholder; these modules are redone by the caller
    L1inv = torch.linalg.solve_triangular(L1, eye, upper=False)
    kappa_f = torch.linalg.matrix_norm(L1) * torch.linalg.matrix_norm(L1inv)  # ≥ κ₂(X); r for placeholders
    if bool((kappa_f <= _ONE_PASS_KAPPA).all()):
        return X, L1.mT, L1, ok  # X may still be in its storage dtype
    Q1t = torch.linalg.solve_triangular(L1, X.whole().mT, upper=False)  # L₁⁻¹ Xᵀ = (X R₁⁻¹)ᵀ, backward stable
    G2 = Q1t @ Q1t.mT
    L2, info2 = torch.linalg.cholesky_ex(G2)
    ok &= (info2 == 0) & ((G2 - eye).abs().amax((-2, -1)) <= _CHOLQR_TOL)  # NaN fails too
    if not bool(ok.all()):
        L2[~ok] = eye
    return _Panels(Q1t.mT), L2.mT @ L1.mT, L2, ok  # R = R₂ R₁


def _svd_cholqr(Pa: _Panels, Pb: _Panels, s, rtol):
    """Gram-QR path: (Cb, Yb, Ca, Ya, S, ok) with Uᵀ = Cb @ Ybᵀ, Vᵀ = Ca @ Yaᵀ, ok (k,) as in _gram_qr.

    Uᵀ = U'ᵀ Q_Bᵀ = (L_B⁻ᵀ U')ᵀ Y_Bᵀ and Vᵀ = (L_A⁻ᵀ V')ᵀ Y_Aᵀ: one batched r×r·r×m matmul per side.
    """
    Yb, Rb, Lb, okb = _gram_qr(Pb)
    Ya, Ra, La, oka = _gram_qr(Pa)
    Uc, S, Vch = torch.linalg.svd(s * (Rb @ Ra.mT))  # descending S
    f = _mask_factor(S, rtol).unsqueeze(-2)  # masked components come out exactly zero
    Cb = torch.linalg.solve_triangular(Lb.mT, Uc * f, upper=True)  # L⁻ᵀ U'
    Ca = torch.linalg.solve_triangular(La.mT, Vch.mT * f, upper=True)  # L⁻ᵀ V'
    return Cb.mT, Yb, Ca.mT, Ya, S, okb & oka


@dataclass
class CanonicalModule:
    """Canonical tokens of one module: r components (uᵢ, σᵢ, vᵢ), their mask, and module features.

    `features` (MODULE_FEATURES,) describe what is not a rank component: DoRA's magnitude vector
    (w2t/canon/dora.py); all zero for a plain LoRA module.
    """

    module_type: str
    layer: int
    U: torch.Tensor  # (m, r)
    S: torch.Tensor  # (r,)
    V: torch.Tensor  # (n, r)
    mask: torch.Tensor  # (r,) bool
    features: torch.Tensor | None = None  # (MODULE_FEATURES,); None reads as zeros

    @property
    def shape(self) -> tuple[int, int]:
        return self.U.shape[0], self.V.shape[0]


def _stack(mats: list[torch.Tensor], device) -> torch.Tensor:
    """Stack on `device` in the factors' own (promoted) dtype, in one C++ call (the non-CPU path)."""
    dtype = mats[0].dtype
    for m in mats[1:]:
        dtype = torch.promote_types(dtype, m.dtype)
    out = torch.empty((len(mats), *mats[0].shape), dtype=dtype, device=device)
    return torch.stack([m.to(device) for m in mats], out=out)


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
    building the result list (views into the batched outputs). On the CPU (`device` None or "cpu")
    the factors are read where they are, in their own dtype: with one thread a few modules at a time
    (stacked and converted to float64 in cache, never whole), with several a bucket at a time (see
    `_CHUNK_BYTES`). On another device they are stacked there, in their own dtype, and the results
    come back to the CPU. `method` as in `canonicalize`.
    """
    on_cpu = device is None or torch.device(device).type == "cpu"
    buckets: dict[tuple[int, int, int], list[int]] = {}
    for i, mod in enumerate(adapter.modules):
        buckets.setdefault((*mod.shape, mod.rank), []).append(i)
    out: list[CanonicalModule | None] = [None] * len(adapter.modules)
    for idx in buckets.values():
        mods = [adapter.modules[i] for i in idx]
        if on_cpu:  # X_A = Aᵀ and X_B = B, as the modules hold them
            to = (lambda t: t) if device is None else (lambda t: t.to(device))
            Pa, Pb = _Panels([to(m.A) for m in mods], transposed=True), _Panels([to(m.B) for m in mods])
        else:
            Pa = _Panels(_stack([m.A for m in mods], device).mT)  # views of (k, r, n)
            Pb = _Panels(_stack([m.B.mT for m in mods], device).mT)  # views of (k, r, m)
        scale = torch.tensor([m.scale for m in mods], dtype=torch.float64, device=Pa.device).reshape(-1, 1, 1)
        Ut, S, Vt, mask = _canonicalize(Pa, Pb, scale, rtol, sign_rule, method)
        U, S, V, mask = (t.cpu().unbind(0) for t in (Ut.mT, S, Vt.mT, mask))
        for i, mod, u, sv, v, keep in zip(idx, mods, U, S, V, mask):
            out[i] = CanonicalModule(mod.module_type, mod.layer, u, sv, v, keep, module_features(mod))
    return out  # type: ignore[return-value]
