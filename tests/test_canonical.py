"""Canonical form: reconstruction, GL(r) invariance, masking and sign-rule stability (docs/design.md §2)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from w2t.canon.canonical import CanonicalForm, canonicalize, sign_margin

F64 = torch.float64


def factors(m=40, n=30, r=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, n, generator=g, dtype=dtype), torch.randn(m, r, generator=g, dtype=dtype)


def random_gl(r: int, cond: float, seed: int) -> torch.Tensor:
    """A random G ∈ GL(r) with condition number exactly `cond`."""
    g = torch.Generator().manual_seed(seed)
    Q1, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))
    Q2, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))
    s = torch.logspace(0, -math.log10(cond), r, dtype=F64)
    return Q1 @ torch.diag(s) @ Q2


def same_tokens(f1, f2, atol):
    assert torch.equal(f1.mask, f2.mask)
    for a, b in ((f1.U, f2.U), (f1.S, f2.S), (f1.V, f2.V)):
        assert (a - b).abs().max().item() < atol


def test_reconstruction_float64():
    A, B = factors()
    form = canonicalize(A, B, 0.7)
    ref = 0.7 * B @ A
    rel = (form.delta() - ref).norm() / ref.norm()
    assert rel < 1e-10
    assert form.U.shape == (40, 6) and form.V.shape == (30, 6) and form.S.shape == (6,)
    assert torch.all(form.S[:-1] >= form.S[1:]), "singular values must descend"
    eye = torch.eye(6, dtype=F64)
    assert torch.allclose(form.U.T @ form.U, eye, atol=1e-12)
    assert torch.allclose(form.V.T @ form.V, eye, atol=1e-12)


@pytest.mark.parametrize("cond", [1.0, 10.0, 1e2, 1e4])
def test_gl_invariance(cond):
    A, B = factors(seed=1)
    G = random_gl(6, cond, seed=int(cond))
    ref = canonicalize(A, B, 1.3)
    rep = canonicalize(torch.linalg.solve(G, A), B @ G, 1.3)
    same_tokens(ref, rep, 1e-8)


def test_rank_permutation_and_scale_tradeoff():
    A, B = factors(seed=2)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    ref = canonicalize(A, B, 0.5)
    same_tokens(ref, canonicalize(A[perm], B[:, perm], 0.5), 1e-10)
    # alpha ×2 with B ×½: same ΔW, same tokens
    same_tokens(ref, canonicalize(A, B * 0.5, 1.0), 1e-10)


def test_sensitivity_different_update_changes_tokens():
    A, B = factors(seed=3)
    ref = canonicalize(A, B, 1.0)
    A2 = A.clone()
    A2[0, 0] += 0.1
    other = canonicalize(A2, B, 1.0)
    assert (ref.U - other.U).abs().max() > 1e-4
    assert (ref.S - canonicalize(A, B, 1.1).S).abs().max() > 1e-4


def test_batched_equals_one_by_one():
    As, Bs = zip(*(factors(seed=s) for s in range(5)))
    A, B = torch.stack(As), torch.stack(Bs)
    scale = torch.tensor([0.5, 1.0, 2.0, 0.1, 3.0], dtype=F64)
    batch = canonicalize(A, B, scale)
    assert batch.U.shape == (5, 40, 6)
    for k in range(5):
        one = canonicalize(As[k], Bs[k], float(scale[k]))
        same_tokens(one, type(one)(batch.U[k], batch.S[k], batch.V[k], batch.mask[k]), 1e-12)


def test_zero_b_masks_everything():
    A, B = factors(seed=4)
    form = canonicalize(A, torch.zeros_like(B), 1.0)
    assert not form.mask.any()
    assert form.U.abs().max() == 0 and form.V.abs().max() == 0 and form.S.abs().max() == 0


def test_rank_deficient_components_masked():
    A, B = factors(seed=5)
    B[:, 4] = B[:, 0] * 2.0  # column 4 duplicates column 0: rank 5
    B[:, 5] = 0.0  # and column 5 is dead: rank 4
    form = canonicalize(A, B, 1.0)
    assert form.mask.tolist() == [True] * 4 + [False] * 2
    assert form.S[4:].abs().max() == 0
    rel = (form.delta() - B @ A).norm() / (B @ A).norm()
    assert rel < 1e-10


def test_float32_input_tolerance():
    """Factors stored in float32 canonicalize in float64; a float32 reparametrization differs by ~1e-6."""
    A, B = factors(seed=6)
    G = random_gl(6, 10.0, seed=6)
    A32, B32 = torch.linalg.solve(G, A).float(), (B @ G).float()
    ref = canonicalize(A, B, 1.0)
    rep = canonicalize(A32, B32, 1.0)
    same_tokens(ref, rep, 1e-4)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(1, 8), eps_seed=st.integers(0, 10_000))
def test_sign_rule_stable_under_tiny_perturbation(seed, r, eps_seed):
    A, B = factors(m=24, n=16, r=r, seed=seed)
    form = canonicalize(A, B, 1.0)
    g = torch.Generator().manual_seed(eps_seed)
    A2 = A * (1 + 1e-7 * torch.randn(A.shape, generator=g, dtype=F64))
    B2 = B * (1 + 1e-7 * torch.randn(B.shape, generator=g, dtype=F64))
    form2 = canonicalize(A2, B2, 1.0)
    # Singular vectors themselves move by ε/gap; only compare well-separated components.
    S = form.S
    gaps = torch.cat([S[:-1] - S[1:], S[-1:]])
    gaps = torch.minimum(gaps, torch.cat([S[:1], S[:-1] - S[1:]])) / S[0]
    decided = (sign_margin(form) > 1e-6) & (gaps > 1e-3)
    cos = (form.U * form2.U).sum(0)
    assert torch.all(cos[decided] > 0.99), "a decided sign flipped under a 1e-7 perturbation"


def test_sign_rule_is_a_real_rule():
    """Sensitivity: without the rule, a flipped factorization gives flipped tokens."""
    A, B = factors(seed=7)
    D = torch.diag(torch.tensor([-1.0, 1, -1, 1, 1, -1], dtype=F64))
    ref = canonicalize(A, B, 1.0)
    flipped = canonicalize(D @ A, B @ D, 1.0)
    same_tokens(ref, flipped, 1e-10)
    assert torch.all(sign_margin(ref) >= 0)
    d = (ref.U.pow(3).sum(0) + ref.V.pow(3).sum(0))
    assert torch.all(d >= 0)


# --- the Gram/Cholesky QR path (method="auto") against the Householder reference -----------------


def ill_conditioned(m=300, n=200, r=8, cond=1e6, seed=0, k=3):
    """k modules whose B has condition number `cond` (A is well conditioned)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(k, r, n, generator=g, dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(k, m, r, generator=g, dtype=F64))
    B = Q * torch.logspace(0, -math.log10(cond), r, dtype=F64) @ random_gl(r, 1.0, seed)
    return A, B


def check_form(form, A, B, scale, atol_orth=1e-12):
    ref = scale * B @ A
    rel = ((form.delta() - ref).norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1))).max()
    assert rel < 1e-10
    eye = torch.eye(A.shape[-2], dtype=F64)
    keep = form.mask.to(F64)
    for X in (form.U, form.V):  # orthonormal columns (masked ones are zero)
        assert (X.mT @ X - eye * keep.unsqueeze(-1)).abs().max() < atol_orth


@pytest.mark.parametrize("cond", [1.0, 50.0, 1e4, 1e6, 1e9])
def test_auto_matches_householder(cond):
    """One pass (κ ≤ 100), CholeskyQR2 (1e4, 1e6) and the Householder fallback (1e9) all agree."""
    A, B = ill_conditioned(cond=cond, seed=int(math.log10(cond)))
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    auto = canonicalize(A, B, scale, rtol=1e-13)  # keep every component, however small
    ref = canonicalize(A, B, scale, rtol=1e-13, method="householder")
    assert auto.mask.all() and ref.mask.all()
    check_form(auto, A, B, scale.reshape(-1, 1, 1))
    # singular vectors are accurate to about ε·‖ΔW‖/gap, and the spectrum here spans `cond`
    tol = max(1e-12, 1e-14 * cond)
    assert (auto.U - ref.U).abs().max() < tol and (auto.V - ref.V).abs().max() < tol
    assert ((auto.S - ref.S).abs() / ref.S[..., :1]).max() < 1e-13


def test_fallback_redoes_only_bad_modules():
    """A batch mixing healthy modules, a rank-deficient one and B = 0: each equals its own result."""
    As, Bs = zip(*(factors(seed=s) for s in range(4)))
    A, B = torch.stack(As), torch.stack(Bs)
    B[1, :, 3] = B[1, :, 0]  # rank 5: Cholesky of BᵀB fails (or is not trustworthy)
    B[2] = 0.0  # untrained adapter: everything masked
    batch = canonicalize(A, B, 1.5)
    assert batch.mask[0].all() and batch.mask[3].all()
    assert batch.mask[1].tolist() == [True] * 5 + [False] and not batch.mask[2].any()
    for k in range(4):
        one = canonicalize(A[k], B[k], 1.5, method="householder")
        same_tokens(one, type(one)(batch.U[k], batch.S[k], batch.V[k], batch.mask[k]), 1e-12)


def test_bf16_factors_auto_matches_householder():
    """bf16 storage (as in real files): the float64 result does not depend on the QR method."""
    g = torch.Generator().manual_seed(11)
    A = (torch.randn(6, 16, 512, generator=g) / 20).to(torch.bfloat16)
    B = (torch.randn(6, 384, 16, generator=g) / 16).to(torch.bfloat16)
    auto = canonicalize(A, B, 2.0)
    ref = canonicalize(A, B, 2.0, method="householder")
    same_tokens(auto, ref, 1e-12)
    check_form(auto, A.double(), B.double(), 2.0)


def test_unknown_method_rejected():
    A, B = factors()
    with pytest.raises(ValueError, match="method"):
        canonicalize(A, B, method="cholesky")


def test_low_precision_input_equals_its_float64_copy():
    """bf16/float32 factors are converted to float64 chunk by chunk: same result as converting first."""
    g = torch.Generator().manual_seed(12)
    A = torch.randn(9, 8, 700, generator=g).to(torch.bfloat16)
    B = torch.randn(9, 900, 8, generator=g).float()
    low = canonicalize(A, B, 0.25)
    ref = canonicalize(A.double(), B.double(), 0.25)
    same_tokens(low, ref, 1e-11)  # rounding of differently blocked Gram sums, amplified by 1/gap


@pytest.mark.parametrize("chunk_modules", [1, 2, 5])
def test_chunked_products_match_unchunked(monkeypatch, chunk_modules):
    """Any chunking of the Gram and product passes (including a partial last chunk) gives the same tokens."""
    import w2t.canon.canonical as canonical

    g = torch.Generator().manual_seed(13)
    A = torch.randn(7, 6, 50, generator=g).float()  # float32: the chunked float64 conversion path
    B = torch.randn(7, 40, 6, generator=g).to(torch.bfloat16)
    ref = canonicalize(A, B, 1.5, method="householder")
    monkeypatch.setattr(canonical, "_chunk_bytes", lambda: 8 * 6 * (40 + 50) * chunk_modules)
    same_tokens(canonicalize(A, B, 1.5), ref, 1e-11)


# --- canonicalize_adapter: the modules' own factors, read chunk by chunk, never stacked ---------------


def mixed_adapter():
    """Two shape buckets; bf16, float32 and float64 factors; a non-contiguous A; in the first bucket a
    rank-deficient B (Householder fallback), an ill-conditioned B (CholeskyQR2) and B = 0."""
    from w2t.io.adapter import Adapter, LoraModule

    g = torch.Generator().manual_seed(21)
    mods = []
    for layer in range(7):
        for name, (m, n, r) in {"q": (48, 40, 6), "k": (24, 40, 4)}.items():
            A = torch.randn(r, n, generator=g, dtype=F64) / n**0.5
            B = torch.randn(m, r, generator=g, dtype=F64) / r
            if name == "q" and layer == 1:
                B[:, 3] = B[:, 0]
            if name == "q" and layer == 2:
                B = B @ random_gl(r, 1e5, seed=layer)
            if name == "q" and layer == 3:
                B = torch.zeros_like(B)
            if name == "k" and layer == 4:
                A = A.T.contiguous().T  # same values, column-major
            dtype = (torch.bfloat16, torch.float32, F64)[layer % 3]
            mods.append(LoraModule(f"l{layer}.{name}", A.to(dtype), B.to(dtype), 0.5 + layer, layer, name))
    return Adapter(path=None, modules=mods)  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk_modules", [None, 1, 3])
def test_adapter_matches_module_by_module_householder(monkeypatch, chunk_modules):
    """Lists of factors (any dtype, any strides, fallbacks mixed in) give each module's own reference result."""
    import w2t.canon.canonical as canonical
    from w2t.canon.canonical import canonicalize_adapter

    adapter = mixed_adapter()
    if chunk_modules is not None:  # several chunks per bucket, with a partial last one
        monkeypatch.setattr(canonical, "_chunk_bytes", lambda: 8 * 6 * (48 + 40) * chunk_modules)
    out = canonicalize_adapter(adapter, rtol=1e-9)
    assert [(c.module_type, c.layer) for c in out] == [(m.module_type, m.layer) for m in adapter.modules]
    for mod, got in zip(adapter.modules, out):
        ref = canonicalize(mod.A, mod.B, mod.scale, rtol=1e-9, method="householder")
        same_tokens(ref, got, 1e-10)
        assert got.U.shape == (mod.B.shape[0], mod.rank) and got.V.shape == (mod.A.shape[1], mod.rank)
        if got.mask.all():  # reconstruction ≤ 1e-10 relative, orthonormal U and V
            check_form(CanonicalForm(got.U, got.S, got.V, got.mask), mod.A.double(), mod.B.double(), mod.scale)
    assert not out[6].mask.any()  # q, layer 3: B = 0
    assert out[2].mask.tolist() == [True] * 5 + [False]  # q, layer 1: rank 5


def test_adapter_householder_and_cpu_device_agree():
    from w2t.canon.canonical import canonicalize_adapter

    adapter = mixed_adapter()
    auto = canonicalize_adapter(adapter)
    for other in (canonicalize_adapter(adapter, method="householder"), canonicalize_adapter(adapter, device="cpu")):
        for a, b in zip(auto, other):
            same_tokens(a, b, 1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    """device="cuda" (factors stacked on the GPU, results back on the CPU) equals the CPU path; so does
    canonicalize on CUDA tensors, bf16 included."""
    from w2t.canon.canonical import canonicalize_adapter

    adapter = mixed_adapter()
    cpu, gpu = canonicalize_adapter(adapter), canonicalize_adapter(adapter, device="cuda")
    for a, b in zip(cpu, gpu):
        assert b.U.device.type == "cpu" and b.U.dtype == F64
        same_tokens(a, b, 1e-10)
    g = torch.Generator().manual_seed(22)
    A = (torch.randn(5, 16, 300, generator=g) / 20).to(torch.bfloat16)
    B = (torch.randn(5, 200, 16, generator=g) / 16).to(torch.bfloat16)
    ref = canonicalize(A, B, 2.0)
    got = canonicalize(A.cuda(), B.cuda(), 2.0)
    same_tokens(ref, type(ref)(*(t.cpu() for t in (got.U, got.S, got.V, got.mask))), 1e-10)


@pytest.mark.parametrize("r,m,n", [(10, 16, 9), (12, 5, 7)])
def test_rank_above_a_side_of_the_update(r, m, n):
    """A rank above min(m, n) (a first conv layer's 1·3·3 inputs, a zero-padded factor): exact, the extra
    components masked, every output of rank r."""
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(r, n, generator=gen, dtype=torch.float64), torch.randn(m, r, generator=gen, dtype=torch.float64)
    for method in ("auto", "householder"):
        form = canonicalize(A, B, 0.5, method=method)
        assert form.U.shape == (m, r) and form.V.shape == (n, r) and form.S.shape == (r,)
        assert int(form.mask.sum()) == min(m, n) and not form.S[~form.mask].any()
        assert torch.linalg.norm(form.delta() - 0.5 * B @ A) <= 1e-12 * torch.linalg.norm(B @ A)
