"""Module identity from tensor key names (docs/design.md §1).

A tensor key is `<wrapper prefix><module name><factor suffix>`:

* the factor suffix says the role: `.lora_A.weight` / `.lora_A.default.weight` / `.lora_down.weight` /
  diffusers' `.lora.down.weight`, `_lora.down.weight`, `.lora_linear_layer.down.weight` are `A`; the
  matching `B`/`up` names are `B`; `.alpha` is the kohya scale numerator; `.lora_magnitude_vector` and
  kohya's `.dora_scale` are DoRA magnitudes; LyCORIS' LoHa and LoKr factors (`.hada_w1_a`, ...,
  `.lokr_t2`, as PEFT and LyCORIS both write them) keep their own name as role (w2t/io/lycoris.py);
  anything else (biases, embedding LoRA, saved base layers, `modules_to_save`) is `other` and keeps its
  full key as its name;
* the wrapper prefix `base_model.model.` that PEFT adds is not part of the module's identity.

The module name then gives `(layer, module_type)`:

1. split it into segments on '.'; a kohya name (`lora_unet_down_blocks_0_..._to_q`, `lora_te1_...`) has
   no dots, so strip `lora_`, take the first '_' token as the component (`unet`, `te`, `te1`, `te2`)
   and split the rest on '_';
2. the LAST pure-integer segment is the layer, compared as an int (layer 10 sorts after layer 2);
3. the segments after it, joined ('.' for dotted names, '_' for kohya), are the module type,
   prefixed by the segments before it ONLY when those hold another integer: a UNet's
   `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` is layer 0 of type
   `down_blocks.1.attentions.0.transformer_blocks.attn1.to_q`, so every module of one type has one
   shape, while `model.layers.12.self_attn.q_proj` is layer 12 of type `self_attn.q_proj`; a module
   that is itself a list element (`net.3`) takes its container's name as type (`net`);
4. the component (kohya's, or a leading diffusers `unet` / `text_encoder*` segment) prefixes the type
   as `<component>.`, so SDXL's two text encoders (different widths) never share a type;
5. a name without any integer is layer 0, and its type is the whole name.
"""
from __future__ import annotations

import re
from typing import Literal, get_args

LohaRole = Literal["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"]
LokrRole = Literal["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"]
Role = Literal["A", "B", "alpha", "dora_magnitude", "other", LohaRole, LokrRole]
LOHA_ROLES: tuple[LohaRole, ...] = get_args(LohaRole)
LOKR_ROLES: tuple[LokrRole, ...] = get_args(LokrRole)

KEYS_VERSION = 1  # bump when a key parses to another (layer, module type); token cache keys include it

WRAPPER_PREFIXES = ("base_model.model.",)
DIFFUSERS_COMPONENTS = frozenset({"unet", "text_encoder", "text_encoder_2", "text_encoder_3"})

# Longest suffixes first: `.lora_A.default.weight` must win over a bare `.weight`.
_ROLE_SUFFIXES: tuple[tuple[str, Role], ...] = tuple(
    sorted(
        {
            ".lora_A.default.weight": "A",
            ".lora_B.default.weight": "B",
            ".lora_A.weight": "A",
            ".lora_B.weight": "B",
            ".lora_down.weight": "A",
            ".lora_up.weight": "B",
            ".lora_linear_layer.down.weight": "A",
            ".lora_linear_layer.up.weight": "B",
            ".lora.down.weight": "A",
            ".lora.up.weight": "B",
            "_lora.down.weight": "A",
            "_lora.up.weight": "B",
            ".alpha": "alpha",
            ".lora_magnitude_vector.default.weight": "dora_magnitude",
            ".lora_magnitude_vector.weight": "dora_magnitude",
            ".lora_magnitude_vector": "dora_magnitude",
            ".dora_scale": "dora_magnitude",
            **{f".{role}": role for role in (*LOHA_ROLES, *LOKR_ROLES)},
        }.items(),
        key=lambda item: -len(item[0]),
    )
)

_INT = re.compile(r"[0-9]+")


def split_key(key: str) -> tuple[str, Role]:
    """`(module_name, role)` of one tensor key; the name keeps the file's own prefix.

    Keys of role 'other' return the whole key as their name: they are not attached to a module.
    """
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return key, "other"


def strip_wrapper(name: str) -> str:
    """The module name as the base model calls it (what PEFT's patterns are matched against)."""
    for prefix in WRAPPER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _segments(name: str) -> tuple[str | None, list[str], str]:
    """(component, segments, joiner) of a module name, kohya or dotted."""
    if name.startswith("lora_") and "." not in name:
        component, _, rest = name[len("lora_") :].partition("_")
        return component, rest.split("_") if rest else [], "_"
    segments = name.split(".")
    if len(segments) > 1 and segments[0] in DIFFUSERS_COMPONENTS:
        return segments[0], segments[1:], "."
    return None, segments, "."


def parse_module_name(name: str) -> tuple[int, str]:
    """`(layer, module_type)` of a module name, by the rule in this module's docstring."""
    component, segments, joiner = _segments(strip_wrapper(name))
    ints = [i for i, s in enumerate(segments) if _INT.fullmatch(s)]
    if not ints:
        layer, parts = 0, segments
    else:
        last = ints[-1]
        layer = int(segments[last])
        before, after = segments[:last], segments[last + 1 :]
        # A module that is itself a list element (`net.0`) takes its container's name as type.
        parts = before + after if len(ints) > 1 or not after else after
    module_type = joiner.join(parts)
    if component is not None:
        module_type = f"{component}.{module_type}" if module_type else component
    return layer, module_type or name
