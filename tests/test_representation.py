"""The raw-factor representation (the ablation input) is a faithful, non-canonical reading of ΔW."""
from __future__ import annotations

import pytest
import torch

from w2t.io.adapter import Adapter, LoraModule
from w2t.data.cache import CacheOptions
from w2t.canon.representation import adapter_components, raw_components


def _adapter(scale: float = 0.5, zero_col: bool = False) -> Adapter:
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 12, generator=gen, dtype=torch.float64), torch.randn(10, 4, generator=gen, dtype=torch.float64)
    if zero_col:
        B[:, 2] = 0
    return Adapter("mem", [LoraModule("layers.0.q", A, B, scale, 0, "q")])


@pytest.mark.parametrize("scale", [0.5, -2.0])
def test_raw_components_reconstruct_the_update(scale):
    ad = _adapter(scale)
    (mod,) = raw_components(ad)
    dW = scale * ad.modules[0].B @ ad.modules[0].A
    rec = mod.U @ torch.diag(mod.S) @ mod.V.T
    assert (rec - dW).norm() / dW.norm() < 1e-12
    assert (mod.S >= 0).all() and torch.allclose(mod.U.norm(dim=0), torch.ones(4, dtype=torch.float64))


def test_raw_components_mask_dead_components_and_differ_from_canonical():
    ad = _adapter(zero_col=True)
    (raw,) = raw_components(ad)
    assert raw.mask.tolist() == [True, True, False, True] and raw.S[2] == 0 and (raw.U[:, 2] == 0).all()
    (canon,) = adapter_components(ad, "canonical")
    assert canon.mask.sum() == 3 and not torch.allclose(raw.S.sort(descending=True).values[:3], canon.S[:3])


def test_unknown_representation_is_refused():
    with pytest.raises(ValueError, match="representation"):
        adapter_components(_adapter(), "spectral")
    with pytest.raises(ValueError, match="representation"):
        CacheOptions(representation="spectral")
    assert CacheOptions(representation="raw").tag != CacheOptions().tag  # separate cache entries


@pytest.mark.parametrize("kind", ["gl", "svd", "pad", "bf16"])
def test_reparametrizations_keep_the_update_and_the_canonical_tokens(kind, tmp_path):
    """Every re-written factorization gives the same ΔW (bf16: up to its storage rounding); canonical tokens
    stay the same, and tokenize places a zero-padded rank-2r module in the rank-r schema."""
    from adapters_factory import llama_adapter

    from w2t.canon.reparam import reparametrize
    from w2t.data.tokens import TokenSchema, tokenize
    from w2t.io.formats import load_adapter

    adapter = load_adapter(llama_adapter(tmp_path / "a").path)
    other = reparametrize(adapter, kind, seed=3)
    tol = 1e-2 if kind == "bf16" else 1e-4  # bf16 keeps 8 bits; float32 factors of a κ=10³ G lose ~3 digits
    for a, b in zip(adapter.modules, other.modules):
        dw, dw2 = a.scale * a.B.double() @ a.A.double(), b.scale * b.B.double() @ b.A.double()
        assert (dw2 - dw).norm() <= tol * dw.norm()
        assert b.rank == (2 * a.rank if kind == "pad" else a.rank)
        if kind in ("gl", "svd"):
            assert not torch.allclose(b.B, a.B), "the factors themselves change"
    schema = TokenSchema.from_modules(adapter_components(adapter))
    ref, _ = tokenize(adapter_components(adapter), schema)
    got, unknown = tokenize(adapter_components(other), schema, strict=False)
    assert not unknown
    for g in ref:
        for k in ("s", "mask"):
            assert torch.allclose(got[g][k].double(), ref[g][k].double(), rtol=tol, atol=tol * ref[g]["s"].max().item())
    with pytest.raises(ValueError, match="reparametrization"):
        reparametrize(adapter, "transpose")


def test_mixed_tokens_are_the_canonical_tokens_of_the_mixed_update(tmp_path):
    """Weight-space mixup of two real PEFT adapters gives exactly the canonical tokens (sign rule included) of the
    adapter whose update is t·ΔW₁ + (1 − t)·ΔW₂, where the two ranks fit the schema; mixing the tokens themselves
    linearly, without canonicalizing again, does not."""
    from adapters_factory import llama_adapter

    from w2t.data.tokens import TokenSchema, collate_tokens, mix_tokens, tokenize
    from w2t.io.formats import load_adapter

    one, two = (load_adapter(llama_adapter(tmp_path / f"a{s}", seed=s).path) for s in (1, 2))
    t = 0.7
    merged = Adapter("merged", [LoraModule(a.name, torch.cat([a.A, b.A]).double(),
                                           torch.cat([t * a.scale * a.B, (1 - t) * b.scale * b.B], 1).double(), 1.0,
                                           a.layer, a.module_type) for a, b in zip(one.modules, two.modules)])
    schema = TokenSchema.from_modules(adapter_components(merged))  # rank 2r: the mixture fits exactly
    batch = collate_tokens([tokenize(adapter_components(a), schema)[0] for a in (one, two)])
    assert max(g.max_rank for g in schema.groups) == 2 * one.modules[0].rank
    want, _ = tokenize(adapter_components(merged), schema)
    got = mix_tokens(batch, torch.tensor([1, 0]), torch.tensor([t, 1 - t]))
    for name, ref in want.items():
        for k in ("u", "v", "s"):
            scale = ref["s"].abs().max().item() if k == "s" else 1.0
            assert torch.allclose(got[name][k][0], ref[k], atol=1e-4 * scale) and torch.allclose(got[name][k][1], ref[k],
                                                                                                    atol=1e-4 * scale)
        assert torch.equal(got[name]["mask"][0], ref["mask"])
    linear = {k: t * batch[name][k][0] + (1 - t) * batch[name][k][1] for k in ("u", "s")}  # the broken variant
    assert not torch.allclose(linear["u"], want[name]["u"], atol=1e-3)
