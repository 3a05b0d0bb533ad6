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
