"""The base model of the default collection: a tiny ViT on scikit-learn's bundled 8×8 digits.

Everything here is small enough to train on a CPU in seconds and needs no download, so a fresh
machine can build real LoRA adapters (see `digits.py`) without network access or a GPU.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

@dataclass(frozen=True)
class ViTConfig:
    """Shapes of the tiny ViT; stored next to the weights so the base can be rebuilt anywhere."""

    image: int = 8
    patch: int = 4  # 4 tokens + CLS: on one CPU core 1.4× faster than 2×2 patches (16 + CLS),
    #                 and both the base and its adapters reach higher accuracy in few steps
    dim: int = 48
    heads: int = 4
    mlp: int = 96
    depth: int = 4
    classes: int = 10

    def __post_init__(self) -> None:
        if self.image % self.patch or self.dim % self.heads:
            raise ValueError(f"patch must divide image and heads must divide dim: {self}")

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        # Four separate linears (not one fused qkv) so each is its own LoRA module type.
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, h, T, c)
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class DigitsViT(nn.Module):
    """Pre-LN ViT; `forward` returns the CLS feature, read by `head` (10 classes) or `probe`.

    `probe` is a frozen random binary readout that belongs to the base: adapters are trained
    through it, so whatever an adapter learned must live in its LoRA update, not in a new head.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        n_patches = (cfg.image // cfg.patch) ** 2
        self.embed = nn.Linear(cfg.patch**2, cfg.dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n_patches + 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.classes)
        self.probe = nn.Linear(cfg.dim, 1)
        self.probe.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, p = x.shape[0], self.cfg.patch
        patches = x.unfold(1, p, p).unfold(2, p, p).reshape(B, -1, p * p)  # (B, 4, 16)
        h = torch.cat([self.cls.expand(B, -1, -1), self.embed(patches)], dim=1) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.ln(h[:, 0])  # (B, dim)


# ---- data -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DigitsData:
    """scikit-learn digits scaled to [0, 1], split once into a training pool and a held-out test set.

    The base and every adapter train on `x_train` only; adapter accuracy is measured on `x_test`.
    """

    x_train: torch.Tensor  # (N, 8, 8)
    y_train: torch.Tensor  # (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor

    @classmethod
    def load(cls, n_test: int, seed: int) -> DigitsData:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        test, train = order[:n_test], order[n_test:]
        return cls(x[train], y[train], x[test], y[test])


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Move the digit 2 pixels down and right, filling with background (no wrap-around)."""
    return F.pad(x, (2, 0, 2, 0))[..., :-2, :-2]


def _noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)


TRANSFORM_FNS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "identity": lambda x, g: x,
    "rot90": lambda x, g: torch.rot90(x, 1, dims=(-2, -1)),
    "hflip": lambda x, g: torch.flip(x, dims=(-1,)),
    "invert": lambda x, g: 1.0 - x,
    "noise": _noise,
    "shift": _shift,
}
TRANSFORMS = tuple(TRANSFORM_FNS)


def apply_transform(name: str, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Apply input transform `name` to images (B, 8, 8); `g` drives the random ones (noise)."""
    return TRANSFORM_FNS[name](x, g)


# ---- base training ----------------------------------------------------------------------------

@torch.no_grad()
def evaluate_classes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model.head(model(x)).argmax(-1) == y).float().mean().item()


@torch.no_grad()
def heldout_accuracy(features: nn.Module, probe: nn.Module, data: DigitsData, transform: str,
                     positive: tuple[int, ...], seed: int) -> float:
    """Held-out accuracy of the probe's "digit ∈ positive" on test images under `transform`.

    `features` is the base or a PEFT model wrapping it. `seed` fixes the noise draw, so every
    adapter of a task is scored on the same images.
    """
    x = apply_transform(transform, data.x_test, torch.Generator().manual_seed(seed))
    hit = (probe(features(x)).squeeze(-1) > 0) == torch.isin(data.y_test, torch.tensor(positive))
    return round(hit.float().mean().item(), 4)


def train_base(cfg: Any, data: DigitsData, *, steps: int, lr: float, batch: int,
               seed: int, make: Callable[[Any], nn.Module] = DigitsViT) -> nn.Module:
    """Train the 10-class model `make(cfg)` (the ViT; a CNN in `digits_cnn`) on untransformed images,
    then fix the random binary probe.

    The model's `forward` gives a LayerNorm'd feature read by `head` (10 classes) and by `probe`.
    The probe bias centres its logit on the training pool so an untrained adapter starts near
    chance on every binary task instead of predicting one class for everything.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = make(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for _ in range(steps):
        idx = torch.randint(len(data.y_train), (batch,), generator=g)
        loss = F.cross_entropy(model.head(model(data.x_train[idx])), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        w = torch.randn(1, model.probe.in_features, generator=g)
        w = 2.0 * w / w.norm()  # logits of a few units on LayerNorm'd features
        model.probe.weight.copy_(w)
        model.probe.bias.copy_(-(model(data.x_train) @ w.T).mean(0))
    return model


def save_base(model: nn.Module, data: DigitsData, folder: Path, *, n_test: int, seed: int, arch: str,
              probe: str) -> None:
    """Write `base_model.safetensors` + `base_config.json` (`model.cfg` under the key `arch`, the split, the
    10-way test accuracy, what the probe means): enough to rebuild any digits base and its split."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "base_model.safetensors")
    info = {arch: model.cfg.to_dict(), "data": {"n_test": n_test, "seed": seed},
            "test_accuracy_10way": round(evaluate_classes(model, data.x_test, data.y_test), 4),
            "probe": probe}
    (folder / "base_config.json").write_text(json.dumps(info, indent=2))


def load_base(folder: str | Path) -> tuple[DigitsViT, DigitsData]:
    """The base model of a built collection and the exact train/test split it and its adapters used."""
    folder = Path(folder)
    info = json.loads((folder / "base_config.json").read_text())
    model = DigitsViT(ViTConfig(**info["vit"]))
    model.load_state_dict(load_file(folder / "base_model.safetensors"))
    return model.eval(), DigitsData.load(**info["data"])
