"""Models: tokens in, one adapter embedding out (every encoder reads the same tokens and feeds the same tasks).

* `w2t` (w2t.py): the W2T encoder on canonical components; `model=w2t_raw` is the same on raw factors;
* `w2t_paper` (w2t_paper.py): the published design, one sequence of every rank token, for reproduction;
* `flat_mlp`: an MLP on the flattened raw factors (not invariant to anything);
* `glnet`: a GL(r)-equivariant network on the factors (B, Aᵀ), after Putterman et al. 2024;
* `sketch`: a small MLP on a fixed random sketch of each module's ΔW (invariant, input not learned);
* `spectral` (w2t/train/spectral.py): scikit-learn on singular-value statistics, fitted by the task's own
  simple read: not an encoder.
"""
from w2t.models.registry import ENCODERS, build_encoder, load_pretrained

__all__ = ["ENCODERS", "build_encoder", "load_pretrained"]
