"""Other factorizations of the same updates, to measure what a model's reading of them is worth.

Each turns an `Adapter` into one whose modules give the same ΔW = s·B·A (up to storage rounding for
`bf16`) through other factors, as another trainer, tool or file could have stored it:
* `gl`: B·G, G⁻¹·A for a random G ∈ GL(r) with condition number 10³;
* `svd`: the SVD-extracted form B = U√Σ, A = √Σ Vᵀ (scale folded in), as LoRA-extraction tools write it;
* `pad`: rank 2r, zero columns of B and zero rows of A appended;
* `bf16`: the factors stored in bfloat16.
Canonical tokens are the same for all but `bf16`; raw factors are not (docs/design.md §2).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import torch

from w2t.canon.canonical import canonicalize
from w2t.io.adapter import Adapter, LoraModule

REPARAMS = ("gl", "svd", "pad", "bf16")


def _generator(name: str, seed: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _gl(mod: LoraModule, gen: torch.Generator, condition: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    r = mod.rank
    q1 = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))[0]
    G = q1 @ torch.diag(torch.logspace(0, -math.log10(condition), r, dtype=torch.float64)) @ q2
    return mod.B.double() @ G, torch.linalg.solve(G, mod.A.double()), mod.scale


def _svd(mod: LoraModule) -> tuple[torch.Tensor, torch.Tensor, float]:
    form = canonicalize(mod.A, mod.B, mod.scale, sign_rule=False)
    root = form.S.sqrt()
    return form.U * root, (form.V * root).T, 1.0


def _pad(mod: LoraModule) -> tuple[torch.Tensor, torch.Tensor, float]:
    return (torch.cat([mod.B, torch.zeros_like(mod.B)], 1), torch.cat([mod.A, torch.zeros_like(mod.A)], 0), mod.scale)


def reparametrize(adapter: Adapter, kind: str, seed: int = 0, *, condition: float = 1e3) -> Adapter:
    """The same adapter, every module re-written as the factorization `kind` (`REPARAMS`), in the factors'
    own dtype; `condition` is κ(G) for `gl`."""
    if kind not in REPARAMS:
        raise ValueError(f"reparametrization must be one of {REPARAMS}, got {kind!r}")
    modules = []
    for mod in adapter.modules:
        if kind == "gl":
            B, A, scale = _gl(mod, _generator(mod.name, seed), condition)
        elif kind == "svd":
            B, A, scale = _svd(mod)
        elif kind == "pad":
            B, A, scale = _pad(mod)
        else:
            B, A, scale = mod.B.to(torch.bfloat16), mod.A.to(torch.bfloat16), mod.scale
        dtype = mod.A.dtype
        modules.append(dataclasses.replace(mod, A=A.to(dtype), B=B.to(dtype), scale=scale))
    return dataclasses.replace(adapter, modules=modules)
