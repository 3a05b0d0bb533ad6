"""Module features of DoRA's magnitude vector: what a DoRA update adds beyond its rank components.

Without the base model only m itself is known; m starts as the base's row norms ‖W₀ᵢ‖, so its
summary mostly describes the base and little of the training. With the base (w2t/io/dora.py), the
rank components are already exact and c = m/‖W₀ + s·B·A‖ says how DoRA rescales each row of the
base: log c is 0 where DoRA leaves a row's norm alone. Every feature is a function of ΔW and m,
so it is the same for every factorization of the update. A plain LoRA module has all zeros.
"""
from __future__ import annotations

import torch

from w2t.io.adapter import LoraModule

# is DoRA, log RMS of |m|, std of log |m|, base read, mean of log c, std of log c
MODULE_FEATURES = 6


def module_features(mod: LoraModule) -> torch.Tensor | None:
    """(MODULE_FEATURES,) float64 features of one module; None (read as zeros) without a magnitude."""
    if mod.magnitude is None:
        return None
    f = torch.zeros(MODULE_FEATURES, dtype=torch.float64)
    log_m = mod.magnitude.abs().reshape(-1).to(torch.float64).clamp_min(1e-30).log()
    f[0], f[1], f[2] = 1.0, 0.5 * (2 * log_m).exp().mean().log(), _std(log_m)
    if mod.magnitude_scale is not None:
        log_c = mod.magnitude_scale.abs().to(torch.float64).clamp_min(1e-30).log()
        f[3], f[4], f[5] = 1.0, log_c.mean(), _std(log_c)
    return f


def _std(x: torch.Tensor) -> torch.Tensor:
    return x.std(unbiased=False) if x.numel() > 1 else x.new_zeros(())
