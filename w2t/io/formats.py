"""Read every common LoRA file format into an `Adapter` (docs/design.md §1).

Sources: a PEFT folder (`adapter_model.safetensors` + `adapter_config.json`), a diffusers folder
(`pytorch_lora_weights.safetensors`), or a single kohya / diffusers `.safetensors` file. Pickle files
(`.bin`, `.pt`, ...) can run code when unpickled, so they are refused unless `allow_pickle=True`, and even
then only read with `torch.load(weights_only=True)`.

Scale: a PEFT config gives `lora_alpha / r` (`/ sqrt(r)` with `use_rslora`), with `rank_pattern` and
`alpha_pattern` resolved exactly as PEFT resolves them; a file without config uses its `.alpha` keys
(`alpha / r`) or scale 1. Conv factors are flattened: down `[r, c_in, *k]` → `A (r, c_in·∏k)`, up
`[c_out, r, 1, …]` → `B (c_out, r)` (Conv1d/2d/3d alike). LoHa and LoKr modules (a PEFT folder with
`peft_type` LOHA/LOKR, or LyCORIS' `hada_*`/`lokr_*` keys) are split off first and read by w2t/io/lycoris.py
as exact products scale·B·A of rank at most `max_rank`. Tensors that are not factors go to
`Adapter.extras` with a note. Every failure is a `W2TError` naming the file and the key.
"""
from __future__ import annotations

import json
import math
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from w2t.io.adapter import Adapter, LoraModule
from w2t.io.dora import apply_base
from w2t.errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    InvalidValueError,
    MissingFactorError,
    NoLoraKeysError,
    PickleRefusedError,
    ShapeMismatchError,
)
from w2t.io.keys import parse_module_name, split_key, strip_wrapper
from w2t.io.lycoris import DEFAULT_MAX_RANK, read_lycoris

READER_VERSION = 3  # bump when a file reads to other factors or scales; token cache keys include it
CONFIG_NAME = "adapter_config.json"
# Looked for, in this order, inside a folder; `adapter_model.*` needs the PEFT config beside it.
WEIGHT_FILES = (
    "adapter_model.safetensors",
    "pytorch_lora_weights.safetensors",
    "adapter_model.bin",
    "pytorch_lora_weights.bin",
)
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt"})


def load_adapter(path: str | Path, *, allow_pickle: bool = False, dtype: torch.dtype | None = None,
                 base: str | Path | None = None, max_rank: int = DEFAULT_MAX_RANK) -> Adapter:
    """Read one adapter (a folder or a file) into an `Adapter` with modules sorted by (type, layer).

    `dtype=None` gives float32 factors (float64 files stay float64); `Adapter.dtype` keeps the
    storage dtype. `allow_pickle=True` admits `.bin`/`.pt` files, read with `weights_only=True` only.
    `base` (the base model's safetensors file or folder) makes DoRA modules exact (w2t/io/dora.py).
    `max_rank` bounds the rank of the exact LoHa/LoKr products; a wider one raises `RankLimitError`.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    source = Path(path)
    weights = _locate(source)
    tensors = _read_tensors(weights, allow_pickle)
    config = PeftLoraConfig.read(weights.with_name(CONFIG_NAME)) if weights.name.startswith("adapter_model.") else None
    adapter = _assemble(source, weights, tensors, config, dtype, max_rank)
    if base is not None:
        apply_base(adapter, base, transposed=config is not None and config.fan_in_fan_out)
    return adapter


@dataclass(frozen=True)
class PeftLoraConfig:
    """The fields of PEFT's `LoraConfig` (or `LoHaConfig`, `LoKrConfig`) that decide the scale (defaults are PEFT's).

    LoHa and LoKr configs name their alpha `alpha`; it is kept as `lora_alpha`, so scales resolve alike.
    """

    path: Path
    peft_type: str = "LORA"  # or LOHA, LOKR (w2t/io/lycoris.py)
    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False  # the base stores its weight as (in, out) (GPT-2's Conv1D)
    use_effective_conv2d: bool = False  # LoHa/LoKr: Tucker cores on convs with a kernel
    decompose_both: bool = False  # LoKr: w1 stored as w1_a·w1_b too

    @classmethod
    def read(cls, path: Path) -> PeftLoraConfig:
        if not path.is_file():
            raise AdapterFormatError(
                f"{CONFIG_NAME} is missing beside the weights: the scale lora_alpha/r cannot be known", path
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterFormatError(f"not a readable JSON config ({e})", path) from None
        if not isinstance(raw, dict):
            raise AdapterFormatError("the config is not a JSON object", path)
        peft_type = raw.get("peft_type", "LORA")
        if peft_type not in ("LORA", "LOHA", "LOKR"):
            raise AdapterFormatError(f"peft_type {peft_type!r} is not LoRA, LoHa or LoKr: ΔW is not a low-rank "
                                     "product w2t can read", path, "peft_type")
        alpha_name = "lora_alpha" if peft_type == "LORA" else "alpha"
        try:
            config = cls(
                path=path,
                peft_type=peft_type,
                r=_rank("r", raw.get("r", cls.r)),
                lora_alpha=_alpha(alpha_name, raw.get(alpha_name, cls.lora_alpha)),
                use_rslora=bool(raw.get("use_rslora") or False),
                rank_pattern={str(k): _rank(k, v) for k, v in (raw.get("rank_pattern") or {}).items()},
                alpha_pattern={str(k): _alpha(k, v) for k, v in (raw.get("alpha_pattern") or {}).items()},
                modules_to_save=_names(raw.get("modules_to_save")),
                init_lora_weights=raw.get("init_lora_weights", True),
                fan_in_fan_out=bool(raw.get("fan_in_fan_out") or False),
                use_effective_conv2d=bool(raw.get("use_effective_conv2d") or False),
                decompose_both=bool(raw.get("decompose_both") or False),
            )
        except (TypeError, ValueError, AttributeError) as e:
            raise AdapterFormatError(f"malformed LoRA config ({e})", path) from None
        if _modifies_base(config.init_lora_weights):
            raise AdapterFormatError(
                f"init_lora_weights={config.init_lora_weights!r} changes the base weights when the adapter is created, "
                "so these factors are a delta from that modified base, not s·B·A from the original one. Save it with "
                "PEFT's conversion: model.save_pretrained(DIR, path_initial_model_for_weight_conversion=<the adapter "
                "saved before training>) (PiSSA, OLoRA, CorDA); PEFT converts no LoftQ or LoRA-GA adapter",
                path, "init_lora_weights")
        return config

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """Config `r` and `lora_alpha` of a module, as PEFT's `_create_and_replace` resolves them."""
        r_key = self._pattern_key(self.rank_pattern, "rank_pattern", module)
        alpha_key = self._pattern_key(self.alpha_pattern, "alpha_pattern", module)
        return self.rank_pattern.get(r_key, self.r), self.alpha_pattern.get(alpha_key, self.lora_alpha)

    def scale(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def saves_module(self, module: str) -> bool:
        """PEFT's `modules_to_save` test: the module name ends with one of the listed names."""
        return any(module == m or module.endswith("." + m) for m in self.modules_to_save)

    def _pattern_key(self, patterns: Mapping[str, object], field_name: str, module: str) -> str:
        """Mirror of `peft.utils.other.get_pattern_key`: the first pattern that matches a dotted suffix."""
        for key in patterns:
            try:
                if re.match(rf"(.*\.)?({key})$", module):
                    return key
            except re.error as e:
                raise AdapterFormatError(f"invalid {field_name} regex ({e})", self.path, key) from None
        return module


# PEFT inits that rewrite the base layer (PEFT's lora/layer.py: W_res = W - s·B₀A₀, or a quantized W);
# `gaussian`, `orthogonal`, `eva`, True and False leave the base as it was
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _modifies_base(init: object) -> bool:
    return isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS)


def _rank(name: str, value: object) -> int:
    """A config rank: a positive int; ValueError otherwise (the caller names the config file)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"rank '{name}' must be a positive integer, got {value!r}")
    return value


def _alpha(name: str, value: object) -> float:
    """A config alpha: any finite number (PEFT does not restrict its sign)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"alpha '{name}' must be a finite number, got {value!r}")
    return float(value)


def _names(value: object) -> tuple[str, ...]:
    """`modules_to_save` as PEFT accepts it: None, one name, or a list of names."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


# --- finding and reading the weights -----------------------------------------------------------


def _locate(path: Path) -> Path:
    """The weights file of a file or folder path."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise AdapterNotFoundError(f"folder holds no adapter weights (looked for {', '.join(WEIGHT_FILES)})", path)
    raise AdapterNotFoundError("no such file or folder", path)


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Named tensors of a weights file; any name without a pickle suffix must be safetensors."""
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return _read_safetensors(path)
    if not allow_pickle:
        raise PickleRefusedError(
            "pickle files can run code when loaded; to read it with torch.load(weights_only=True) add "
            "data.allow_pickle=true (train.py, eval.py), --allow-pickle (w2t-embed, w2t-search) or "
            "allow_pickle=True (Python), or convert it to .safetensors",
            path,
        )
    return _read_pickle(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise AdapterFormatError(f"not a readable safetensors file ({e})", path) from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Only `weights_only=True`: the restricted unpickler refuses any global but tensors' own."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error: ([^.]*)", str(e))
        why = found.group(1) if found else str(e).splitlines()[0]
        raise AdapterFormatError(
            f"holds more than plain tensors ({why}); torch.load(weights_only=True) refused it, since "
            "unpickling arbitrary objects can run code",
            path,
        ) from None
    # Anything else (a bad zip, a truncated file, ...) means the file is damaged, whatever its kind.
    except Exception as e:  # noqa: BLE001
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise AdapterFormatError(f"not a readable torch file ({type(e).__name__}: {first_line})", path) from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise AdapterFormatError(f"expected a state dict of named tensors, got {type(state).__name__}", path)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(state):
        odd = next(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        raise AdapterFormatError(f"entry is a {type(state[odd]).__name__}, not a tensor", path, odd)
    return tensors



# --- from named tensors to modules -------------------------------------------------------------

# First matching marker names the kind of a tensor that is not a LoRA factor.
_EXTRA_MARKERS = (
    ("lora_magnitude_vector", "DoRA magnitude vector(s) of modules without LoRA factors kept in extras"),
    (".dora_scale", "DoRA magnitude vector(s) of modules without LoRA factors kept in extras"),
    ("lora_embedding_", "embedding LoRA factor(s) kept in extras, not read as modules"),
    (".base_layer.", "saved base-layer weight(s) kept in extras (PEFT save_embedding_layers)"),
)


def _extra_kind(key: str, config: PeftLoraConfig | None) -> str:
    for marker, kind in _EXTRA_MARKERS:
        if marker in key:
            return kind
    if config is not None and config.saves_module(strip_wrapper(key).rpartition(".")[0]):
        return "modules_to_save tensor(s) kept in extras: fully trained copies of base modules"
    if split_key(key)[1] == "alpha":
        return f"'.alpha' key(s) kept in extras, unused: {CONFIG_NAME} sets the scale"
    if key.endswith("bias"):
        return "bias tensor(s) kept in extras"
    return "unrecognized tensor(s) kept in extras"


def _group(
    path: Path, tensors: Mapping[str, torch.Tensor], config: PeftLoraConfig | None
) -> tuple[dict[str, dict[str, str]], dict[str, torch.Tensor]]:
    """Factor, DoRA magnitude (and kohya alpha) keys per module name, and every other tensor by its key."""
    groups: dict[str, dict[str, str]] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module, role = split_key(key)
        if role in ("A", "B", "dora_magnitude") or (role == "alpha" and config is None):
            slot = groups.setdefault(module, {})
            if role in slot:
                raise AdapterFormatError(f"a second '{role}' for module '{module}' (first: '{slot[role]}')", path, key)
            slot[role] = key
        else:
            extras[key] = tensor
    for module in [m for m, slot in groups.items() if not slot.keys() & {"A", "B"}]:  # e.g. embedding DoRA
        for key in groups.pop(module).values():
            extras[key] = tensors[key]
    return groups, extras


def _matrix(path: Path, key: str, t: torch.Tensor, role: str) -> torch.Tensor:
    """A factor as a matrix: conv down `[r, c_in, *k]` → `(r, c_in·∏k)`; up `[c_out, r, 1, …]` → `(c_out, r)`.

    A conv up-projection is 1x1 in every LoRA implementation; any other kernel there is not LoRA.
    """
    if t.ndim == 2:
        return t
    if 3 <= t.ndim <= 5 and (role == "A" or all(d == 1 for d in t.shape[2:])):
        return t.reshape(t.shape[0], -1)
    expected = "[r, c_in, *kernel]" if role == "A" else "[c_out, r, 1, ...]"
    raise ShapeMismatchError(f"shape {tuple(t.shape)} is neither a matrix nor a conv factor {expected}", path, key)


def _check_finite(path: Path, key: str, t: torch.Tensor) -> None:
    # One reduction and no mask: any NaN/Inf makes the sum non-finite; only a non-finite sum
    # (an overflow, rarely) pays for the exact elementwise test.
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise InvalidValueError("holds NaN or Inf values", path, key)


def _factor(path: Path, key: str, t: torch.Tensor, role: str, dtype: torch.dtype | None) -> torch.Tensor:
    if not t.is_floating_point():
        raise InvalidValueError(f"dtype {t.dtype} is not a floating-point dtype", path, key)
    target = dtype or (torch.float64 if t.dtype == torch.float64 else torch.float32)
    m = _matrix(path, key, t, role).to(target)
    _check_finite(path, key, m)
    return m


def _alpha_over_rank(path: Path, key: str, alpha: torch.Tensor, rank: int) -> float:
    """Scale from a file's own scalar `.alpha` key: `alpha / r`."""
    if alpha.numel() != 1:
        raise ShapeMismatchError(f"alpha must be a scalar, got shape {tuple(alpha.shape)}", path, key)
    if alpha.is_complex() or alpha.dtype == torch.bool or not math.isfinite(value := float(alpha)):
        raise InvalidValueError(f"alpha must be a finite real number, got {alpha}", path, key)
    return value / rank


def _module(
    path: Path,
    name: str,
    keys: dict[str, str],
    tensors: Mapping[str, torch.Tensor],
    config: PeftLoraConfig | None,
    dtype: torch.dtype | None,
) -> LoraModule:
    if "A" not in keys or "B" not in keys:
        present, missing = ("A", "B") if "A" in keys else ("B", "A")
        raise MissingFactorError(f"LoRA factor {present} has no matching {missing} factor", path, keys[present])
    a_key, b_key = keys["A"], keys["B"]
    A = _factor(path, a_key, tensors[a_key], "A", dtype)
    B = _factor(path, b_key, tensors[b_key], "B", dtype)
    if tensors[a_key].ndim != tensors[b_key].ndim:
        raise ShapeMismatchError(
            f"B has {tensors[b_key].ndim} dims but A '{a_key}' has {tensors[a_key].ndim}", path, b_key
        )
    rank = A.shape[0]
    if rank == 0 or 0 in A.shape or 0 in B.shape:
        raise ShapeMismatchError(f"empty factor (rank {rank}, A {tuple(A.shape)}, B {tuple(B.shape)})", path, a_key)
    if B.shape[1] != rank:
        raise ShapeMismatchError(
            f"B {tuple(B.shape)} has {B.shape[1]} columns but A '{a_key}' {tuple(A.shape)} has {rank} rows", path, b_key
        )
    if config is None:  # kohya / diffusers: the file's own alpha, or alpha = r when it has none
        alpha_key = keys.get("alpha")
        scale = 1.0 if alpha_key is None else _alpha_over_rank(path, alpha_key, tensors[alpha_key], rank)
    else:
        r, alpha = config.rank_and_alpha(strip_wrapper(name))
        if r != rank:
            raise ShapeMismatchError(f"the weights have rank {rank} but {CONFIG_NAME} gives r={r}", path, a_key)
        scale = config.scale(r, alpha)
    layer, module_type = parse_module_name(name)
    magnitude = None
    if (m_key := keys.get("dora_magnitude")) is not None:
        magnitude = _magnitude(path, m_key, tensors[m_key], B.shape[0], tensors[a_key].shape[1])
    return LoraModule(name=name, A=A, B=B, scale=scale, layer=layer, module_type=module_type, magnitude=magnitude)


def _magnitude(path: Path, key: str, t: torch.Tensor, rows: int, channels: int) -> torch.Tensor:
    """DoRA's magnitude as (rows, 1), one per output row (PEFT; kohya's default), or (1, c_in), one per
    input channel (LyCORIS `wd_on_out=False`): the axis its norms are taken over."""
    if not t.is_floating_point():
        raise InvalidValueError(f"dtype {t.dtype} is not a floating-point dtype", path, key)
    flat = t.reshape(-1).to(torch.float64)
    _check_finite(path, key, flat)
    if flat.numel() == rows and (t.ndim < 2 or t.shape[0] == rows or t.shape[1] == rows):
        return flat.reshape(rows, 1)
    if flat.numel() == channels and t.ndim >= 2 and t.shape[0] == 1:
        return flat.reshape(1, channels)
    raise ShapeMismatchError(f"DoRA magnitude of shape {tuple(t.shape)} fits neither the {rows} output rows "
                             f"nor the {channels} input channels of its module", path, key)


def _notes(extras: Mapping[str, torch.Tensor], modules: list[LoraModule], config: PeftLoraConfig | None) -> list[str]:
    """Human notes on what was kept aside and on identities that collide."""
    kinds: dict[str, list[str]] = {}
    for key in extras:
        kinds.setdefault(_extra_kind(key, config), []).append(key)
    notes = [f"{len(keys)} {kind}; e.g. '{keys[0]}'" for kind, keys in kinds.items()]
    shared = [ident for ident, n in Counter((m.module_type, m.layer) for m in modules).items() if n > 1]
    if shared:
        notes.append(f"{len(shared)} (module_type, layer) identities are shared by several modules, e.g. {shared[0]}")
    return notes


def _assemble(
    source: Path,
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    config: PeftLoraConfig | None,
    dtype: torch.dtype | None,
    max_rank: int = DEFAULT_MAX_RANK,
) -> Adapter:
    if not tensors:
        raise NoLoraKeysError("the file holds no tensors", path)
    lycoris, left = read_lycoris(path, tensors, config, dtype, max_rank)
    groups, extras = _group(path, left, config)
    by_name = {m.name: m for m in lycoris}
    for key in [k for k in extras if split_key(k)[1] == "dora_magnitude" and split_key(k)[0] in by_name]:
        mod, t = by_name[split_key(key)[0]], extras.pop(key)  # DoRA on LoHa/LoKr (LyCORIS `dora_wd`)
        mod.magnitude = _magnitude(path, key, t, mod.shape[0], t.shape[1] if t.ndim >= 2 else mod.shape[1])
    if not groups and not lycoris:
        sample = ", ".join(f"'{k}'" for k in list(tensors)[:3])
        raise NoLoraKeysError(
            f"no LoRA factors (lora_A/lora_B, lora_down/lora_up, LoHa hada_*, LoKr lokr_*) among {len(tensors)} "
            f"keys, e.g. {sample}", path
        )
    modules = sorted(
        [*(_module(path, name, keys, tensors, config, dtype) for name, keys in groups.items()), *lycoris],
        key=lambda m: (m.module_type, m.layer, m.name),
    )
    storage = Counter(tensors[k].dtype for keys in groups.values() for role, k in keys.items() if role in ("A", "B"))
    storage.update(tensors[k].dtype for k in tensors.keys() - left.keys() if split_key(k)[1] != "alpha")
    notes = _notes(extras, modules, config)
    if len(storage) > 1:
        notes.append(f"factors are stored in several dtypes: {', '.join(map(str, storage))}")
    return Adapter(path=source, modules=modules, extras=extras, notes=notes, dtype=storage.most_common(1)[0][0])
