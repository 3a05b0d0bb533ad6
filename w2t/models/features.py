"""Fixed (not learned) reads of the tokens, and the three helpers every model and baseline shares.

Helpers: `orthonormal` (every fixed or initial projection), `bilinear_readout` (Σᵢ wᵢ (Pᵤᵀuᵢ)(Pᵥᵀvᵢ)ᵀ:
a projection of ΔW computed from rank components, never forming ΔW) and `gram_norm` (‖ΔW‖_F of any
factorization, from r×r Gram matrices).

Feature maps (the simple reads of docs/design.md §5, printed beside every result):
* raw: the flattened factors (A, B) as they sit in the files: not invariant to any symmetry;
* sketch: a fixed Gaussian projection Rᵤᵀ ΔW Rᵥ of each module's update (k×k); invariant;
* dw: each module's ΔW/‖ΔW‖ seen through fixed orthonormal Qᵤ, Qᵥ (exact when k ≥ m, n), plus
  log‖ΔW‖ per module for the fitted reads; invariant;
* dw_fit (retrieval): `dw` through the principal directions of the training split's updates
  (`principal_projections`, fitted without labels) instead of random ones: most of ΔŴ in k columns;
* dw_exact (retrieval): the exact inner products of the modules' ΔW/‖ΔW‖ within a set of adapters, from
  r×r products of their components (`delta_w_gram`): what `dw` approximates where k < m or n;
* spectral: singular-value statistics per module; invariant, blind to the singular vectors.
"""
from __future__ import annotations

import hashlib

import torch

from w2t.data.tokens import GroupSpec, TokenSchema, Tokens
from w2t.io.adapter import Adapter


def orthonormal(rows: int, cols: int, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(rows, cols) with orthonormal columns (cols ≤ rows), from a Gaussian draw."""
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=dtype))[0]


def bilinear_readout(pu: torch.Tensor, w: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    """Σᵢ wᵢ pᵤᵢ pᵥᵢᵀ: (B, L, k, k') from projected components pu (B, L, R, k), pv (B, L, R, k') and weights w (B, L, R)."""
    return torch.einsum("blri,blr,blrj->blij", pu, w, pv)


def gram_norm(U: torch.Tensor, V: torch.Tensor, s: torch.Tensor | None = None, floor: float = 0.0) -> torch.Tensor:
    """‖Σᵢ sᵢ uᵢ vᵢᵀ‖_F for rows uᵢ of U (..., r, m), vᵢ of V (..., r, n) and weights s (..., r) (None: 1).

    Exact for any factorization (the rows need not be orthogonal); `floor` on the square keeps the
    gradient finite where the update is zero."""
    gram = (U @ U.transpose(-1, -2)) * (V @ V.transpose(-1, -2))  # (..., r, r); the identity if canonical
    sq = gram.sum((-1, -2)) if s is None else torch.einsum("...r,...rq,...q->...", s, gram, s)
    return sq.clamp_min(floor).sqrt()


def _seeded(name: str, seed: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def fixed_projections(group: GroupSpec, k: int, seed: int = 0, *,
                      kind: str = "gaussian") -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed (m×k, n×k) projections of one module type, seeded by its name: `gaussian` (scaled
    by 1/√m, 1/√n: the sketch) or `orthonormal` (min(k, m), min(k, n) columns: the dw read)."""
    gen = _seeded(group.name, seed)
    if kind == "gaussian":
        Ru = torch.randn(group.m, k, generator=gen, dtype=torch.float64) / group.m**0.5
        Rv = torch.randn(group.n, k, generator=gen, dtype=torch.float64) / group.n**0.5
        return Ru, Rv
    if kind == "orthonormal":
        return (orthonormal(group.m, min(k, group.m), gen, torch.float64),
                orthonormal(group.n, min(k, group.n), gen, torch.float64))
    raise ValueError(f"kind must be 'gaussian' or 'orthonormal', got {kind!r}")


def principal_projections(tokens: Tokens, schema: TokenSchema, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per module type, (m×min(k, m), n×min(k, n)) orthonormal: the top eigenvectors of Σ U diag(σ/‖σ‖)² Uᵀ
    and of Σ V diag(σ/‖σ‖)² Vᵀ over the given adapters and layers (the directions their normalized updates
    use most). Where ΔW is wider than k, these keep far more of it than random columns: on minilm_text
    (384×384 and 1536×384 modules) the cosine through them ranks nearly as the exact one does."""
    out = []
    for g in schema.groups:
        t = tokens[g.name]
        s, u, v = (t["s"] * t["mask"]).double(), t["u"].double(), t["v"].double()
        w2 = (s / gram_norm(u, v, s).clamp_min(1e-300).unsqueeze(-1)) ** 2  # (B, L, R)
        bases = []
        for x, dim in ((u, g.m), (v, g.n)):
            cov = torch.einsum("blri,blr,blrj->ij", x, w2, x)
            bases.append(torch.linalg.eigh(cov)[1].flip(-1)[:, : min(k, dim)].cpu())  # descending eigenvalues
        out.append(tuple(bases))
    return out


def sketch_features(tokens: Tokens, schema: TokenSchema, k: int = 8, seed: int = 0) -> torch.Tensor:
    """(B, F) features: per module position, the k×k sketch Rᵤᵀ U diag(S) Vᵀ Rᵥ (zeros when absent)."""
    feats = []
    for g in schema.groups:
        t = tokens[g.name]
        Ru, Rv = (R.to(t["u"].device) for R in fixed_projections(g, k, seed))
        s = (t["s"] * t["mask"]).double()  # (B, L, R)
        feats.append(bilinear_readout(t["u"].double() @ Ru, s, t["v"].double() @ Rv).flatten(1))
    return torch.cat(feats, 1).float()


def delta_w_features(tokens: Tokens, schema: TokenSchema, k: int = 48, seed: int = 0, norms: bool = False,
                     projections: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """(B, F): per module position Qᵤᵀ (ΔW/‖ΔW‖) Qᵥ (zeros when absent); `norms` appends log‖ΔW‖ per
    module (0 when absent). Cosines of these are mean cosines of the modules' normalized updates.
    Q: `projections` per module type (`principal_projections`), or the fixed orthonormal ones of `k`, `seed`."""
    feats, logs = [], []
    for i, g in enumerate(schema.groups):
        t = tokens[g.name]
        Qs = projections[i] if projections is not None else fixed_projections(g, k, seed, kind="orthonormal")
        Qu, Qv = (Q.to(t["u"].device, torch.float64) for Q in Qs)
        s, u, v = (t["s"] * t["mask"]).double(), t["u"].double(), t["v"].double()  # (B, L, R), ...
        norm = gram_norm(u, v, s)  # (B, L)
        w = s / norm.clamp_min(1e-300).unsqueeze(-1)
        feats.append(bilinear_readout(u @ Qu, w, v @ Qv).flatten(1))
        logs.append(torch.where(norm > 0, torch.log(norm.clamp_min(1e-300)), 0.0))
    return torch.cat(feats + (logs if norms else []), 1).float()


def delta_w_gram(tokens: Tokens, schema: TokenSchema, chunk: int = 64) -> torch.Tensor:
    """(N, N) Σ over module positions of ⟨ΔWₐ/‖ΔWₐ‖, ΔW_b/‖ΔW_b‖⟩_F, exact, without forming any ΔW: per module,
    Σᵢⱼ wₐᵢ w_bⱼ (uₐᵢ·u_bⱼ)(vₐᵢ·v_bⱼ) with w = σ/‖σ‖ (absent modules add 0). Rows in chunks of `chunk` adapters."""
    n = next(iter(tokens.values()))["s"].shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64)
    for g in schema.groups:
        t = tokens[g.name]
        s, u, v = (t["s"] * t["mask"]).double(), t["u"].double(), t["v"].double()  # (N, L, R), (N, L, R, m), ...
        w = s / gram_norm(u, v, s).clamp_min(1e-300).unsqueeze(-1)
        for a in range(0, n, chunk):
            uu = torch.einsum("alim,bljm->ablij", u[a:a + chunk], u)
            vv = torch.einsum("alin,bljn->ablij", v[a:a + chunk], v)
            gram[a:a + chunk] += torch.einsum("ali,blj,ablij->ab", w[a:a + chunk], w, uu * vv).cpu()
    return gram


def gram_embedding(gram: torch.Tensor) -> torch.Tensor:
    """(N, N) vectors whose inner products are the PSD matrix `gram` (its eigenvectors scaled by √eigenvalue)."""
    vals, vecs = torch.linalg.eigh(gram.double())
    return (vecs * vals.clamp_min(0).sqrt()).float()


def spectral_features(tokens: Tokens, schema: TokenSchema, top_k: int = 4) -> torch.Tensor:
    """(B, F) per module position: the top-k log σᵢ, log‖ΔW‖_F, log‖ΔW‖_*, the effective rank
    exp(H(σ²/Σσ²)), the stable rank ‖ΔW‖²_F/σ₁² and a presence flag; zeros where a module is absent."""
    feats = []
    for g in schema.groups:
        t = tokens[g.name]
        s = (t["s"].double() * t["mask"]).clamp_min(0)  # (B, L, R), descending
        present = t["mask"].any(-1)
        k = min(top_k, s.shape[-1])
        top = torch.zeros(*s.shape[:-1], top_k, dtype=s.dtype, device=s.device)
        top[..., :k] = torch.log(s[..., :k] + 1e-8)
        fro2 = (s**2).sum(-1)
        p = s**2 / fro2.clamp_min(1e-30).unsqueeze(-1)
        eff = torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum(-1))
        stable = fro2 / (s[..., 0] ** 2).clamp_min(1e-30)
        stats = torch.stack([0.5 * torch.log(fro2 + 1e-16), torch.log(s.sum(-1) + 1e-8), eff, stable], -1)
        f = torch.cat([top, stats], -1) * present.unsqueeze(-1)
        feats.append(torch.cat([f, present.unsqueeze(-1).double()], -1).flatten(1))
    return torch.cat(feats, 1)


def raw_features(adapter: Adapter, schema: TokenSchema) -> torch.Tensor:
    """(F,) the adapter's factors flattened in schema order, rank-padded, zeros where absent."""
    parts = []
    by_pos = {(m.module_type, *m.shape, m.layer): m for m in adapter.modules}
    for g in schema.groups:
        for layer in g.layers:
            A = torch.zeros(g.max_rank, g.n)
            B = torch.zeros(g.m, g.max_rank)
            mod = by_pos.get((g.module_type, g.m, g.n, layer))
            if mod is not None and mod.rank <= g.max_rank:
                A[: mod.rank] = mod.A.float()
                B[:, : mod.rank] = mod.B.float()
            parts += [A.flatten(), B.flatten()]
    return torch.cat(parts)
