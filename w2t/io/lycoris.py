"""LoHa and LoKr (LyCORIS) modules as exact low-rank products ΔW = scale·B·A (docs/design.md §1).

Neither format stores B and A, but both updates are exactly such a product, found without forming ΔW:

* LoHa: ΔW = (W1a·W1b) ⊙ (W2a·W2b). A Hadamard product of two products B1·A1 and B2·A2 is B·A with B the
  row-wise Kronecker product of B1 and B2 (m × r1·r2) and A the column-wise one of A1 and A2 (r1·r2 × n).
* LoKr: ΔW = kron(P, Q), P = w1 or w1_a·w1_b, Q = w2, w2_a·w2_b or a Tucker product, and
  kron(B1·A1, B2·A2) = kron(B1, B2)·kron(A1, A2). A full factor P (a × c) is I·P or P·I, whichever has
  the smaller inner dimension.
* A Tucker core t (r, r', *k) with wa (r, m), wb (r', c_in) (PEFT `use_effective_conv2d`, LyCORIS
  `use_tucker`) rebuilds to waᵀ·(t ×₂ wb): inner dimension r.

Conv updates are flattened as LoRA's are, columns in (c_in, *kernel) order, so tokens, the cache and every
model see ordinary `LoraModule`s. The price is the rank: r1·r2 (LoHa), rank(P)·rank(Q) (LoKr). A product
wider than `max_rank` raises `RankLimitError` instead of being truncated, which would change ΔW.

Scale: a PEFT config gives alpha/r (`rank_pattern`, `alpha_pattern` as for LoRA; PEFT uses it even when
both LoKr factors are full). A LyCORIS file gives `.alpha` over the rank of `hada_w1_b` (LoHa) or of the
decomposed LoKr factor (`lokr_w1_b`, else `lokr_w2_b`), and scale 1 without `.alpha` or when both LoKr
factors are full, as LyCORIS itself computes it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from w2t.errors import AdapterFormatError, InvalidValueError, MissingFactorError, RankLimitError, ShapeMismatchError
from w2t.io.adapter import LoraModule
from w2t.io.keys import LOHA_ROLES, LOKR_ROLES, parse_module_name, split_key, strip_wrapper

if TYPE_CHECKING:
    from w2t.io.formats import PeftLoraConfig

DEFAULT_MAX_RANK = 256
_KIND = {**{role: "LOHA" for role in LOHA_ROLES}, **{role: "LOKR" for role in LOKR_ROLES}}
_NAMES = {"LOHA": "LoHa", "LOKR": "LoKr"}


def read_lycoris(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    config: PeftLoraConfig | None,
    dtype: torch.dtype | None,
    max_rank: int = DEFAULT_MAX_RANK,
) -> tuple[list[LoraModule], dict[str, torch.Tensor]]:
    """The LoHa/LoKr modules among `tensors`, and the tensors left for the LoRA reader.

    A LyCORIS file's `<module>.alpha` goes with its module; everything else (LoRA factors, DoRA scales,
    biases) is left as it was.
    """
    if max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank}")
    groups: dict[str, dict[str, str]] = {}
    for key in tensors:
        module, role = split_key(key)
        if role in _KIND:
            groups.setdefault(module, {})[role] = key
    peft_type = "LORA" if config is None else config.peft_type
    if peft_type != "LORA":
        lora = next((k for k in tensors if split_key(k)[1] in ("A", "B")), None)
        if lora is not None:
            raise AdapterFormatError(f"a LoRA factor, but the config's peft_type is {peft_type!r}", path, lora)
    rest = dict(tensors)
    modules = []
    for name, keys in groups.items():
        kind = _kind(path, keys)
        if config is not None and kind != peft_type:
            raise AdapterFormatError(f"a {_NAMES[kind]} factor, but the config's peft_type is {peft_type!r}",
                                     path, next(iter(keys.values())))
        alpha_key = f"{name}.alpha" if config is None and f"{name}.alpha" in tensors else None
        module = _Module(path, name, keys, tensors, config, dtype, max_rank)
        modules.append(module.loha() if kind == "LOHA" else module.lokr())
        for key in [*keys.values(), *([alpha_key] if alpha_key else [])]:
            del rest[key]
    return modules, rest


def _kind(path: Path, keys: Mapping[str, str]) -> str:
    kinds = {_KIND[role] for role in keys}
    if len(kinds) > 1:
        raise AdapterFormatError("one module holds both LoHa (hada_*) and LoKr (lokr_*) factors",
                                 path, keys[min(keys)])
    return kinds.pop()


class _Module:
    """One LyCORIS module's stored factors, read into float64 matrices and combined into B, A."""

    def __init__(self, path, name, keys, tensors, config, dtype, max_rank):
        self.path, self.name, self.keys, self.tensors = path, name, keys, tensors
        self.config, self.max_rank = config, max_rank
        stored = [tensors[k] for k in keys.values()]
        self.target = dtype or (torch.float64 if any(t.dtype == torch.float64 for t in stored) else torch.float32)

    # --- the two formats ---------------------------------------------------------------------

    def loha(self) -> LoraModule:
        self._require("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        tucker = self._tucker("hada_t1", "hada_t2")
        B1, A1 = self._product("hada_w1_a", "hada_w1_b", "hada_t1" if tucker else None)
        B2, A2 = self._product("hada_w2_a", "hada_w2_b", "hada_t2" if tucker else None)
        if B1.shape[0] != B2.shape[0] or A1.shape[1] != A2.shape[1]:
            raise ShapeMismatchError(
                f"the second Hadamard factor is {B2.shape[0]}x{A2.shape[1]} but the first "
                f"is {B1.shape[0]}x{A1.shape[1]}", self.path, self.keys["hada_w2_a"])
        self._check_rank("LoHa", "(W1a·W1b)⊙(W2a·W2b)", B1.shape[1], B2.shape[1])
        ranks = [self._shape("hada_w1_b")[0], self._shape("hada_w2_b")[0]]
        return self._lora_module(*_hadamard(B1, A1, B2, A2), ranks, ranks[0])

    def lokr(self) -> LoraModule:
        w1 = self._one_of("lokr_w1", ("lokr_w1_a", "lokr_w1_b"))
        w2 = self._one_of("lokr_w2", ("lokr_w2_a", "lokr_w2_b"))
        if "lokr_t2" in self.keys and w2 == "lokr_w2":
            raise AdapterFormatError("a Tucker core lokr_t2 beside a full lokr_w2", self.path, self.keys["lokr_t2"])
        if "lokr_w1_a" in self.keys and self.config is not None and not self.config.decompose_both:
            raise AdapterFormatError("lokr_w1 is decomposed but the config has decompose_both=false",
                                     self.path, self.keys["lokr_w1_a"])
        self._tucker("lokr_t2")
        if w1 == "lokr_w1":
            B1, A1 = _full_as_product(self._matrix("lokr_w1", up=True))
        else:
            B1, A1 = self._product("lokr_w1_a", "lokr_w1_b", None)
        if w2 == "lokr_w2":
            B2, A2 = _full_as_product(self._matrix("lokr_w2", up=False))
        else:
            B2, A2 = self._product("lokr_w2_a", "lokr_w2_b", "lokr_t2" if "lokr_t2" in self.keys else None)
        self._check_rank("LoKr", "kron(w1, w2)", B1.shape[1], B2.shape[1])
        ranks = [self._shape(k)[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in self.keys]
        if self.config is None and len(set(ranks)) > 1:
            raise ShapeMismatchError(f"lokr_w1_b has rank {ranks[0]} but lokr_w2_b has rank {ranks[1]}: "
                                     "the scale alpha/r is ambiguous", self.path, self.keys["lokr_w2_b"])
        return self._lora_module(*_kronecker(B1, A1, B2, A2), ranks, ranks[0] if ranks else None)

    # --- pieces ----------------------------------------------------------------------------------

    def _product(self, up: str, down: str, core: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of one stored low-rank product: up·down, or the Tucker product of core, up, down."""
        if core is None:
            B, A = self._matrix(up, up=True), self._matrix(down, up=False)
            if B.shape[1] != A.shape[0]:
                raise ShapeMismatchError(f"{up} {tuple(B.shape)} has {B.shape[1]} columns but {down} "
                                         f"{tuple(A.shape)} has {A.shape[0]} rows", self.path, self.keys[up])
            return B, A
        t = self._tensor(core)
        wa, wb = self._tensor(up), self._tensor(down)
        if t.ndim < 3 or wa.ndim != 2 or wb.ndim != 2 or t.shape[0] != wa.shape[0] or t.shape[1] != wb.shape[0]:
            raise ShapeMismatchError(
                f"a Tucker core [r, r', *kernel] with {up} [r, c_out] and {down} [r', c_in] was expected, got "
                f"{tuple(t.shape)}, {tuple(wa.shape)}, {tuple(wb.shape)}", self.path, self.keys[core])
        # rebuild[p, q, *k] = Σ_ij t[i, j, *k]·wa[i, p]·wb[j, q]  →  waᵀ (c_out × r) times (r × c_in·∏k)
        return wa.T, torch.einsum("ij...,jq->iq...", t, wb).reshape(t.shape[0], -1)

    def _matrix(self, role: str, *, up: bool) -> torch.Tensor:
        """An up factor `[m, r, 1, …]` → (m, r); a down factor or full conv `[r, c_in, *k]` → (r, c_in·∏k)."""
        t = self._tensor(role)
        if t.ndim == 2:
            return t
        if 3 <= t.ndim <= 5 and (not up or all(d == 1 for d in t.shape[2:])):
            return t.reshape(t.shape[0], -1)
        expected = "[m, r, 1, ...]" if up else "[r, c_in, *kernel]"
        raise ShapeMismatchError(f"shape {tuple(t.shape)} is neither a matrix nor a conv factor {expected}",
                                 self.path, self.keys[role])

    def _tensor(self, role: str) -> torch.Tensor:
        key = self.keys[role]
        t = self.tensors[key]
        if not t.is_floating_point():
            raise InvalidValueError(f"dtype {t.dtype} is not a floating-point dtype", self.path, key)
        if 0 in t.shape:
            raise ShapeMismatchError(f"empty factor of shape {tuple(t.shape)}", self.path, key)
        t = t.to(torch.float64)
        if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise InvalidValueError("holds NaN or Inf values", self.path, key)
        return t

    def _shape(self, role: str) -> tuple[int, ...]:
        return tuple(self.tensors[self.keys[role]].shape)

    def _require(self, *roles: str) -> None:
        missing = [r for r in roles if r not in self.keys]
        if missing:
            raise MissingFactorError(f"{', '.join(missing)} missing for module '{self.name}'",
                                     self.path, self.keys[min(self.keys)])

    def _one_of(self, full: str, pair: tuple[str, str]) -> str:
        """`full` or the decomposed `pair`, exactly one of them."""
        present = [r for r in (full, *pair) if r in self.keys]
        if present == [full] or present == list(pair):
            return present[0]
        raise MissingFactorError(f"module '{self.name}' needs either {full} or both {pair[0]} and {pair[1]}; "
                                 f"it has {', '.join(present) or 'none of them'}", self.path, self.keys[min(self.keys)])

    def _tucker(self, *cores: str) -> bool:
        """Whether the module has its Tucker cores (all of them or none; only where the config allows)."""
        present = [c for c in cores if c in self.keys]
        if present and len(present) != len(cores):
            missing = next(c for c in cores if c not in self.keys)
            raise MissingFactorError(f"{missing} missing beside {present[0]}", self.path, self.keys[present[0]])
        if present and self.config is not None and not self.config.use_effective_conv2d:
            raise AdapterFormatError("a Tucker core, but the config has use_effective_conv2d=false",
                                     self.path, self.keys[present[0]])
        return bool(present)

    def _check_rank(self, kind: str, formula: str, r1: int, r2: int) -> None:
        if r1 * r2 > self.max_rank:
            raise RankLimitError(
                f"module '{self.name}': its {kind} update {formula} is exactly a product of inner dimension "
                f"{r1}·{r2} = {r1 * r2}, above max_rank={self.max_rank}; to read it exactly, raise max_rank "
                "(load_adapter(..., max_rank=N), data.max_rank=N in the data config)",
                self.path, self.keys[min(self.keys)])

    def _scale(self, ranks: list[int], file_rank: int | None) -> float:
        """alpha/r from the PEFT config (checked against the stored `ranks`) or from the file's `.alpha`."""
        if self.config is not None:
            r, alpha = self.config.rank_and_alpha(strip_wrapper(self.name))
            if any(rank != r for rank in ranks):
                raise ShapeMismatchError(f"the weights have rank {ranks} but the config gives r={r}",
                                         self.path, self.keys[min(self.keys)])
            return self.config.scale(r, alpha)
        alpha_key = f"{self.name}.alpha"
        if file_rank is None or alpha_key not in self.tensors:
            return 1.0
        alpha = self.tensors[alpha_key]
        if alpha.numel() != 1:
            raise ShapeMismatchError(f"alpha must be a scalar, got shape {tuple(alpha.shape)}", self.path, alpha_key)
        if alpha.is_complex() or alpha.dtype == torch.bool or not math.isfinite(value := float(alpha)):
            raise InvalidValueError(f"alpha must be a finite real number, got {alpha}", self.path, alpha_key)
        return value / file_rank

    def _lora_module(self, B: torch.Tensor, A: torch.Tensor, ranks: list[int], file_rank: int | None) -> LoraModule:
        layer, module_type = parse_module_name(self.name)
        return LoraModule(name=self.name, A=A.to(self.target).contiguous(), B=B.to(self.target).contiguous(),
                          scale=self._scale(ranks, file_rank), layer=layer, module_type=module_type)


def _hadamard(B1, A1, B2, A2) -> tuple[torch.Tensor, torch.Tensor]:
    """(B1·A1) ⊙ (B2·A2) as B·A: B[p, i·r2 + j] = B1[p, i]·B2[p, j], A[i·r2 + j, q] = A1[i, q]·A2[j, q]."""
    B = (B1[:, :, None] * B2[:, None, :]).reshape(B1.shape[0], -1)
    A = (A1[:, None, :] * A2[None, :, :]).reshape(-1, A1.shape[1])
    return B, A


def _kronecker(B1, A1, B2, A2) -> tuple[torch.Tensor, torch.Tensor]:
    """kron(B1·A1, B2·A2) as B·A = kron(B1, B2)·kron(A1, A2)."""
    B1, A1, B2, A2 = (t.contiguous() for t in (B1, A1, B2, A2))  # torch.kron refuses some strided views
    return torch.kron(B1, B2), torch.kron(A1, A2)


def _full_as_product(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full factor (a × c) as I·P or P·I, the one with the smaller inner dimension."""
    a, c = P.shape
    return (torch.eye(a, dtype=P.dtype), P) if a <= c else (P, torch.eye(c, dtype=P.dtype))
