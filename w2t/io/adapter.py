"""The in-memory form of one LoRA adapter, whatever file format it came from (docs/design.md §1)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class LoraModule:
    """One adapted linear (or flattened conv) module: ΔW = scale · B @ A.

    A DoRA module also has its magnitude vector m (one entry per output row). DoRA's update is
    diag(c)·(W₀ + s·B·A) − W₀ with c = m/‖W₀ + s·B·A‖ (row norms), which needs the base weight W₀:
    read with a base model, B already holds diag(c)·B, so scale·B·A is the exact rank-r part
    diag(c)·s·B·A, and `magnitude_scale` keeps c (what diag(c − 1)·W₀ adds is summarized from it).
    """

    name: str  # module path as written in the file, without the lora_A/lora_B suffix
    A: torch.Tensor  # (r, n)
    B: torch.Tensor  # (m, r)
    scale: float
    layer: int
    module_type: str
    magnitude: torch.Tensor | None = None  # DoRA's m, flattened (m,)
    magnitude_scale: torch.Tensor | None = None  # DoRA's c = m/‖W₀ + s·B·A‖ (m,), when the base was read

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n): the shape of ΔW."""
        return self.B.shape[0], self.A.shape[1]


@dataclass
class Adapter:
    """All LoRA modules of one adapter, ordered by (module_type, layer).

    `extras` keeps tensors that are not LoRA factors or DoRA magnitudes (embedding LoRA,
    `modules_to_save`, biases), read deliberately and reported, never mixed into `modules`.
    """

    path: Path
    modules: list[LoraModule]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dtype: torch.dtype = torch.float32  # storage dtype of the factors in the file

    @property
    def module_types(self) -> list[str]:
        return sorted({m.module_type for m in self.modules})

    def __len__(self) -> int:
        return len(self.modules)
