"""Token schema: the module positions of a collection, and padded per-type token tensors.

Every module of one type has the same (m, n), so tokens are grouped by type into dense tensors
(one batched projection per type downstream). The schema is the union of (type, layer) positions
over a collection, with the largest rank per type, so adapters with different ranks and different
target modules batch together: absent ranks and absent modules are masked, never dropped.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch

from w2t.canon.canonical import CanonicalModule, canonicalize
from w2t.canon.dora import MODULE_FEATURES
from w2t.errors import SchemaError

Tokens = dict[str, dict[str, torch.Tensor]]  # group name -> {"u", "v", "s", "mask", "f"}


@dataclass(frozen=True)
class GroupSpec:
    """All modules of one type: ΔW is m×n, layers lists the positions, max_rank pads r."""

    name: str
    module_type: str
    m: int
    n: int
    layers: tuple[int, ...]
    max_rank: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class TokenSchema:
    groups: tuple[GroupSpec, ...]

    @classmethod
    def from_modules(cls, modules: Iterable[CanonicalModule]) -> "TokenSchema":
        """Union of positions; a type seen with two shapes becomes two groups named `type@mxn`."""
        seen: dict[tuple[str, int, int], tuple[set[int], int]] = {}
        for mod in modules:
            key = (mod.module_type, *mod.shape)
            layers, rank = seen.get(key, (set(), 0))
            layers.add(mod.layer)
            seen[key] = (layers, max(rank, mod.S.shape[0]))
        shapes_per_type: dict[str, int] = {}
        for t, _, _ in seen:
            shapes_per_type[t] = shapes_per_type.get(t, 0) + 1
        groups = []
        for (t, m, n), (layers, rank) in sorted(seen.items()):
            name = t if shapes_per_type[t] == 1 else f"{t}@{m}x{n}"
            groups.append(GroupSpec(name, t, m, n, tuple(sorted(layers)), rank))
        return cls(tuple(groups))

    def group_for(self, module_type: str, m: int, n: int) -> GroupSpec | None:
        for g in self.groups:
            if g.module_type == module_type and g.m == m and g.n == n:
                return g
        return None

    @property
    def max_layer(self) -> int:
        return max((max(g.layers) for g in self.groups), default=0)

    def to_dict(self) -> dict:
        return {"groups": [asdict(g) for g in self.groups]}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenSchema":
        return cls(tuple(GroupSpec(**{**g, "layers": tuple(g["layers"])}) for g in d["groups"]))


def tokenize(
    modules: list[CanonicalModule],
    schema: TokenSchema,
    *,
    dtype: torch.dtype = torch.float32,
    strict: bool = True,
    source: object = None,
) -> tuple[Tokens, list[str]]:
    """Place an adapter's canonical modules into the schema's padded tensors.

    Returns the tokens and the list of modules the schema has no position for. With
    `strict`, such a module raises SchemaError (naming `source`); otherwise it is left out and
    reported, so callers can warn.
    """
    out: Tokens = {}
    for g in schema.groups:
        out[g.name] = {
            "u": torch.zeros(g.num_layers, g.max_rank, g.m, dtype=dtype),  # (L, R, m)
            "v": torch.zeros(g.num_layers, g.max_rank, g.n, dtype=dtype),  # (L, R, n)
            "s": torch.zeros(g.num_layers, g.max_rank, dtype=dtype),  # (L, R)
            "mask": torch.zeros(g.num_layers, g.max_rank, dtype=torch.bool),  # (L, R)
            "f": torch.zeros(g.num_layers, MODULE_FEATURES, dtype=dtype),  # (L, F) module features (DoRA)
        }
    unknown: list[str] = []
    taken: set[tuple[str, int]] = set()
    for mod in modules:
        g = schema.group_for(mod.module_type, *mod.shape)
        if g is not None and mod.S.shape[0] > g.max_rank and not mod.mask[g.max_rank:].any():
            mod = _drop_masked_tail(mod, g.max_rank)  # zero-padded rank: what lies past the schema's rank is nothing
        r = mod.S.shape[0]
        li = g.layers.index(mod.layer) if g is not None and mod.layer in g.layers else -1
        if g is None or li < 0 or r > g.max_rank or (g.name, li) in taken:
            why = ("unknown type/shape" if g is None else "unknown layer" if li < 0 else f"rank {r} > {g.max_rank}"
                   if r > g.max_rank else "position already taken by another module of the same (type, layer)")
            unknown.append(f"{mod.module_type}[layer {mod.layer}, {mod.shape[0]}x{mod.shape[1]}]: {why}")
            continue
        taken.add((g.name, li))
        t = out[g.name]
        t["u"][li, :r] = mod.U.T.to(dtype)
        t["v"][li, :r] = mod.V.T.to(dtype)
        t["s"][li, :r] = mod.S.to(dtype)
        t["mask"][li, :r] = mod.mask
        if mod.features is not None:
            t["f"][li] = mod.features.to(dtype)
    if unknown and strict:
        raise SchemaError("modules outside the schema: " + "; ".join(unknown), path=source)
    return out, unknown


def _drop_masked_tail(mod: CanonicalModule, rank: int) -> CanonicalModule:
    return CanonicalModule(mod.module_type, mod.layer, mod.U[:, :rank], mod.S[:rank], mod.V[:, :rank], mod.mask[:rank],
                           mod.features)


def collate_tokens(items: list[Tokens]) -> Tokens:
    """Stack per-adapter tokens into a batch: every tensor gains a leading dimension B."""
    return {g: {k: torch.stack([it[g][k] for it in items]) for k in items[0][g]} for g in items[0]}


def mix_tokens(tokens: Tokens, partner: torch.Tensor, t: torch.Tensor) -> Tokens:
    """Canonical tokens of t·ΔW + (1 − t)·ΔW[partner] for every module of a batch (weight-space mixup).

    The two updates side by side, [U₁ U₂]·diag(t·σ₁, (1 − t)·σ₂)·[V₁ V₂]ᵀ, are canonicalized again (QR and the SVD
    of the 2r×2r core, sign rule included), so the mixture is what any factorization of it would give; its top
    `max_rank` components are kept, the best update of the schema's rank (exact when the two ranks sum to at most
    it). `partner`: (B,) batch indices; `t`: (B,) weights. Module features (DoRA) are mixed linearly."""
    out: Tokens = {}
    for name, x in tokens.items():
        R = x["s"].shape[-1]
        a = t.to(x["s"]).view(-1, 1, 1)  # (B, 1, 1)
        s = torch.cat([a * x["s"] * x["mask"], (1 - a) * (x["s"] * x["mask"])[partner]], -1)  # (B, L, 2R)
        u = torch.cat([x["u"], x["u"][partner]], -2)  # (B, L, 2R, m)
        v = torch.cat([x["v"], x["v"][partner]], -2)
        form = canonicalize(v, u.transpose(-1, -2) * s.unsqueeze(-2))  # A = [V₁ V₂]ᵀ, B = [U₁ U₂]·diag(s)
        dtype = x["u"].dtype
        keep = form.mask[..., :R]
        out[name] = {"u": (form.U.transpose(-1, -2)[..., :R, :] * keep.unsqueeze(-1)).to(dtype),
                     "v": (form.V.transpose(-1, -2)[..., :R, :] * keep.unsqueeze(-1)).to(dtype),
                     "s": (form.S[..., :R] * keep).to(dtype), "mask": keep,
                     "f": (a * x["f"] + (1 - a) * x["f"][partner]).to(x["f"].dtype)}
    return out
