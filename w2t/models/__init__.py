"""Every encoder `model=` can select, by name; all read the same tokens and share tasks and metrics.

* `w2t` (w2t/encoder.py): the W2T encoder on canonical components; `w2t_raw` is the same on raw factors;
* `flat_mlp`: an MLP on the flattened raw factors (not invariant to anything);
* `glnet`: a GL(r)-equivariant network on the factors (B, Aᵀ), after Putterman et al. 2024;
* `sketch`: a small MLP on a fixed random sketch of each module's ΔW (invariant, input not learned);
* `spectral` (w2t/models/spectral.py): scikit-learn on singular-value statistics, not an encoder.
"""
from __future__ import annotations

from w2t.encoder import EncoderConfig, W2TEncoder
from w2t.models.flat_mlp import FlatMLPConfig, FlatMLPEncoder
from w2t.models.glnet import GLNetConfig, GLNetEncoder
from w2t.models.sketch import SketchConfig, SketchEncoder

ENCODERS = {
    "w2t": (W2TEncoder, EncoderConfig),
    "flat_mlp": (FlatMLPEncoder, FlatMLPConfig),
    "glnet": (GLNetEncoder, GLNetConfig),
    "sketch": (SketchEncoder, SketchConfig),
}


def build_encoder(arch: str, schema, options: dict):
    if arch not in ENCODERS:
        raise ValueError(f"unknown encoder {arch!r}; choose from {sorted(ENCODERS)}")
    enc_cls, cfg_cls = ENCODERS[arch]
    return enc_cls(schema, cfg_cls(**options))


__all__ = ["ENCODERS", "build_encoder"]
