"""DoRA read with its base model: the exact rank-r part of the update, and the rescaling c.

DoRA's weight is m ⊙ (W₀ + s·B·A)/‖W₀ + s·B·A‖, the norm taken over each output row (PEFT, and
LyCORIS by default) or each input channel (LyCORIS `wd_on_out=False`). With c = m/‖W₀ + s·B·A‖ its
update is diag(c)·s·B·A + diag(c − 1)·W₀ (rows; columns alike): a rank-r part, kept exactly as
factors (B ← diag(c)·B, or A ← A·diag(c)), plus the base rescaled, which is full rank and is kept
only as c (`LoraModule.magnitude_scale`, summarized into module features by w2t/canon/dora.py).
The norms come from W₀Aᵀ (or BᵀW₀) and an r×r Gram matrix: W₀ + s·B·A is never formed.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from w2t.errors import AdapterFormatError, AdapterNotFoundError, ShapeMismatchError
from w2t.io.adapter import Adapter, LoraModule
from w2t.io.keys import strip_wrapper


def apply_base(adapter: Adapter, base: str | Path, *, transposed: bool = False) -> None:
    """Make every DoRA module of `adapter` exact from the base model's weights (in place).

    `base` is a safetensors file or a folder of them (sharded checkpoints); only the weights of
    DoRA modules are read. `transposed`: the base stores weights as (in, out) (PEFT's fan_in_fan_out).
    """
    dora = [mod for mod in adapter.modules if mod.magnitude is not None]
    if not dora:
        return
    with BaseWeights(base) as weights:
        for mod in dora:
            _rescale(mod, weights.matrix(mod, transposed))


class BaseWeights:
    """The `.weight` tensors of a base checkpoint, found by the module names adapters use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors")) if self.path.is_dir() else [self.path]
        if not self.path.exists() or not files:
            raise AdapterNotFoundError("base model: no such safetensors file, or a folder without any", self.path)
        self._files, self._stack = files, ExitStack()

    def __enter__(self) -> BaseWeights:
        self._where: dict[str, object] = {}
        for f in self._files:
            try:
                handle = self._stack.enter_context(safe_open(str(f), framework="pt"))
            except (SafetensorError, OSError) as e:
                raise AdapterFormatError(f"base model: not a readable safetensors file ({e})", f) from None
            self._where.update(dict.fromkeys(handle.keys(), handle))
        # kohya names a module by its path with '_' for '.', behind `lora_<component>_`
        self._flat = {k[: -len(".weight")].replace(".", "_"): k for k in self._where if k.endswith(".weight")}
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def key(self, name: str) -> str:
        """The base key of an adapter's module name: `<name>.weight`, allowing a different wrapper prefix."""
        name = strip_wrapper(name)
        if f"{name}.weight" in self._where:
            return f"{name}.weight"
        if name.startswith("lora_") and "." not in name:
            _, _, flat = name[len("lora_"):].partition("_")
            found = [k for f, k in self._flat.items() if f == flat or f.endswith("_" + flat)]
        else:
            found = [k for k in self._where if k.endswith(f".{name}.weight") or name.endswith("." + k[: -len(".weight")])]
        if len(found) != 1:
            why = "no" if not found else f"{len(found)} candidate"
            raise AdapterFormatError(f"base model has {why} weight for DoRA module '{name}' "
                                     f"(looked for '{name}.weight' and names ending in it)", self.path)
        return found[0]

    def matrix(self, mod: LoraModule, transposed: bool) -> torch.Tensor:
        """W₀ of a module as the (m, n) float64 matrix its factors multiply to (conv flattened)."""
        key = self.key(mod.name)
        w = self._where[key].get_tensor(key).to(torch.float64)  # type: ignore[attr-defined]
        w = w.T if transposed and w.ndim == 2 else w.reshape(w.shape[0], -1)
        if w.shape != mod.shape:
            raise ShapeMismatchError(f"base weight {tuple(w.shape)} does not match the module's update "
                                     f"{mod.shape} (DoRA module '{mod.name}')", self.path, key)
        return w


def _rescale(mod: LoraModule, W0: torch.Tensor) -> None:
    """c = m/‖W₀ + s·B·A‖ over DoRA's axis; fold c into B (rows) or A (input channels)."""
    A, B, s = mod.A.to(torch.float64), mod.B.to(torch.float64), mod.scale
    rows = mod.magnitude.shape[1] == 1
    if rows:  # ‖W₀ᵢ + s·(BA)ᵢ‖² = ‖W₀ᵢ‖² + 2s·(W₀Aᵀ)ᵢ·Bᵢ + s²·Bᵢ(AAᵀ)Bᵢᵀ
        sq = W0.square().sum(1) + 2 * s * ((W0 @ A.T) * B).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)
    else:  # columns alike, then summed over the kernel positions of each input channel
        sq = W0.square().sum(0) + 2 * s * ((B.T @ W0) * A).sum(0) + s * s * (((B.T @ B) @ A) * A).sum(0)
        sq = sq.reshape(mod.magnitude.shape[1], -1).sum(1)
    c = mod.magnitude.reshape(-1) / sq.clamp_min(0).sqrt().clamp_min(1e-30)
    if rows:
        mod.B = B * c[:, None]  # float64: c is exact, storage precision is not
    else:
        mod.A = A * c.repeat_interleave(A.shape[1] // c.numel())
    mod.magnitude_scale = c
