"""LoHa and LoKr: exact low-rank products against PEFT's own ΔW and LyCORIS' formulas, rank limit, canonical form."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoHaConfig, LoKrConfig
from safetensors.torch import load_file

from adapters_factory import (
    KOHYA_MODULES,
    LLAMA_TARGETS,
    BuiltAdapter,
    TinyConvNet,
    build_lycoris_adapter,
    tiny_llama,
    write_lycoris_file,
)
from w2t import RankLimitError, W2TError, canonicalize_adapter, load_adapter
from w2t.io import lycoris
from w2t.io.adapter import Adapter

CONV_TARGETS = ["conv1", "conv2", "proj", "head"]


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Same shape and ‖got − want‖ ≤ rtol·‖want‖."""
    return got.shape == want.shape and float((got - want).norm()) <= rtol * float(want.norm())


def deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {m.name: m.scale * m.B.double() @ m.A.double() for m in adapter.modules}


def matches_peft(built: BuiltAdapter, **load_kwargs) -> bool:
    """Every module's scale·B·A equals PEFT's `get_delta_weight` (conv flattened) within 1e-5 relative."""
    expected = built.expected()
    modules = load_adapter(built.path, **load_kwargs).modules
    return {m.name for m in modules} == expected.keys() and all(
        m.shape == expected[m.name][1].shape  # before forming a product of the wrong shape
        and close(m.scale * m.B.double() @ m.A.double(), expected[m.name][1].double()) for m in modules)


def stored_roles(built: BuiltAdapter) -> set[str]:
    return {key.rpartition(".")[2] for key in load_file(built.path / "adapter_model.safetensors")}


# --- real PEFT adapters -------------------------------------------------------------------------

PEFT_CASES = {
    "loha-linear": lambda: (tiny_llama(2), LoHaConfig(r=3, alpha=5, target_modules=LLAMA_TARGETS, init_weights=False)),
    "loha-conv": lambda: (TinyConvNet(), LoHaConfig(r=2, alpha=3, target_modules=CONV_TARGETS, init_weights=False)),
    "loha-conv-tucker": lambda: (TinyConvNet(), LoHaConfig(r=2, alpha=3, target_modules=CONV_TARGETS,
                                                           init_weights=False, use_effective_conv2d=True)),
    "loha-patterns": lambda: (tiny_llama(2), LoHaConfig(
        r=3, alpha=5, target_modules=LLAMA_TARGETS, init_weights=False,
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 4}, alpha_pattern={"v_proj": 7})),
    "lokr-linear": lambda: (tiny_llama(2), LoKrConfig(r=4, alpha=5, target_modules=LLAMA_TARGETS, init_weights=False)),
    "lokr-decompose-both": lambda: (tiny_llama(2), LoKrConfig(r=2, alpha=5, target_modules=LLAMA_TARGETS,
                                                              init_weights=False, decompose_both=True)),
    "lokr-factor": lambda: (tiny_llama(2), LoKrConfig(r=1, alpha=5, target_modules=LLAMA_TARGETS,
                                                      init_weights=False, decompose_factor=4)),
    "lokr-conv": lambda: (TinyConvNet(), LoKrConfig(r=2, alpha=3, target_modules=CONV_TARGETS, init_weights=False)),
    "lokr-conv-tucker": lambda: (TinyConvNet(), LoKrConfig(r=1, alpha=3, target_modules=CONV_TARGETS,
                                                           init_weights=False, use_effective_conv2d=True,
                                                           decompose_both=True, decompose_factor=4)),
    "lokr-patterns": lambda: (tiny_llama(2), LoKrConfig(
        r=2, alpha=5, target_modules=LLAMA_TARGETS, init_weights=False, decompose_both=True,
        rank_pattern={"k_proj": 1}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 9})),
}
# (stored, not stored) factor names: each case must store the structure it is named after.
PEFT_ROLES = {
    "loha-conv": ({"hada_w1_a"}, {"hada_t1"}), "loha-conv-tucker": ({"hada_t1", "hada_t2"}, set()),
    "lokr-linear": ({"lokr_w1", "lokr_w2", "lokr_w2_a"}, {"lokr_w1_a"}), "lokr-decompose-both": ({"lokr_w1_a", "lokr_w2_a"}, set()),
    "lokr-factor": ({"lokr_w1", "lokr_w2_a"}, {"lokr_w1_a"}), "lokr-conv": ({"lokr_w1", "lokr_w2"}, {"lokr_t2"}),
    "lokr-conv-tucker": ({"lokr_w1_a", "lokr_t2"}, set()),
}


@pytest.fixture(scope="module", params=list(PEFT_CASES))
def peft_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, BuiltAdapter]:
    model, config = PEFT_CASES[request.param]()
    return request.param, build_lycoris_adapter(model, tmp_path_factory.mktemp(request.param), config)


def test_peft_adapter_matches_get_delta_weight(peft_case: tuple[str, BuiltAdapter]) -> None:
    case, built = peft_case
    present, absent = PEFT_ROLES.get(case, (set(), set()))
    assert present <= stored_roles(built) and not absent & stored_roles(built)
    if "patterns" in case:
        assert len({layer.scaling["default"] for layer in built.lora_layers().values()}) > 1
    adapter = load_adapter(built.path)
    expected = built.expected()
    assert adapter.extras == {} and adapter.notes == []
    for m in adapter.modules:
        assert m.scale == pytest.approx(expected[m.name][0], rel=1e-12), m.name
        assert m.A.dtype == torch.float32
    assert matches_peft(built)
    if "conv" in case:  # flattened as LoRA's conv factors are
        shapes = {m.module_type: m.shape for m in adapter.modules}
        assert shapes == {"conv1": (8, 27), "conv2": (16, 72), "proj": (16, 16), "head": (4, 16)}


@pytest.mark.parametrize("peft_case", ["loha-conv-tucker", "lokr-decompose-both", "lokr-linear"], indirect=True)
def test_canonical_form_reconstructs_delta(peft_case: tuple[str, BuiltAdapter]) -> None:
    _, built = peft_case
    adapter = load_adapter(built.path, dtype=torch.float64)
    for m, c in zip(adapter.modules, canonicalize_adapter(adapter)):
        assert (c.module_type, c.layer) == (m.module_type, m.layer)
        assert close((c.U * c.S) @ c.V.T, m.scale * m.B @ m.A, rtol=1e-8), m.name


# --- broken variants must fail the comparison -----------------------------------------------------


def _kron_swapped(B1, A1, B2, A2):
    return torch.kron(B2, B1), torch.kron(A2, A1)


def _plain_kron(B1, A1, B2, A2):
    return torch.kron(B1, B2), torch.kron(A1, A2)


def _face_split_misaligned(B1, A1, B2, A2, hadamard=lycoris._hadamard):
    """B pairs (i, j) as i·r2 + j but A as j·r1 + i: the wrong rank terms multiply."""
    return hadamard(B1, A1, B2, A2)[0], hadamard(B2, A2, B1, A1)[1]


@pytest.mark.parametrize(
    ("peft_case", "name", "broken"),
    [
        ("lokr-decompose-both", "_kronecker", _kron_swapped),
        ("loha-linear", "_hadamard", _plain_kron),
        ("loha-linear", "_hadamard", _face_split_misaligned),
        ("loha-conv-tucker", "_hadamard", _face_split_misaligned),
    ],
    indirect=["peft_case"],
)
def test_a_broken_product_fails_the_peft_comparison(peft_case, name, broken, monkeypatch) -> None:
    _, built = peft_case
    assert matches_peft(built)
    monkeypatch.setattr(lycoris, name, broken)
    assert not matches_peft(built)


# --- LyCORIS (kohya) single files -----------------------------------------------------------------


@pytest.mark.parametrize("alpha", [3.0, None])
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_file_matches_the_format_formula(kind: str, alpha: float | None, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.safetensors"
    expected = write_lycoris_file(path, kind, alpha=alpha)
    adapter = load_adapter(path)
    got = deltas(adapter)
    assert got.keys() == expected.keys() and adapter.extras == {} and adapter.notes == []
    for name, delta in expected.items():
        assert close(got[name], delta), name
    assert adapter.dtype == torch.float16
    te_q = [m.layer for m in adapter.modules if m.module_type == "te.self_attn_q_proj"]
    assert te_q == [0, 11]
    conv = next(m for m in adapter.modules if m.name.endswith("resnets_0_conv1"))
    assert conv.shape == (32, 32 * 9)


def test_lokr_scale_follows_lycoris(tmp_path: Path) -> None:
    """alpha/r with r the decomposed factor's rank; 1 when both factors are full."""
    path = tmp_path / "lokr.safetensors"
    write_lycoris_file(path, "lokr", rank=2, alpha=3.0)
    scales = {m.name: m.scale for m in load_adapter(path).modules}
    names = [name for name, *_ in KOHYA_MODULES]
    assert scales[names[0]] == 1.5 and scales[names[1]] == 1.5  # w2 low-rank; both decomposed
    assert scales[names[2]] == 1.0 and scales[names[5]] == 1.0  # both full


# --- the rank limit -------------------------------------------------------------------------------


def test_rank_limit_is_an_error_never_a_truncation(tmp_path: Path) -> None:
    path = tmp_path / "wide.safetensors"
    expected = write_lycoris_file(path, "loha", rank=4)  # r1·r2 = 16
    with pytest.raises(RankLimitError) as error:
        load_adapter(path, max_rank=15)
    message = str(error.value)
    assert str(path) in message and "max_rank=15" in message and "= 16" in message
    assert any(f"module '{name}'" in message for name, *_ in KOHYA_MODULES)
    adapter = load_adapter(path, max_rank=16)
    assert max(m.rank for m in adapter.modules) == 16
    assert all(close(delta, expected[name]) for name, delta in deltas(adapter).items())


# --- configs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loha(tmp_path_factory: pytest.TempPathFactory) -> BuiltAdapter:
    model, config = PEFT_CASES["loha-conv-tucker"]()
    return build_lycoris_adapter(model, tmp_path_factory.mktemp("loha"), config)


def edited(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return dst


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"peft_type": "IA3"}, "'IA3' is not LoRA, LoHa or LoKr"),
        ({"peft_type": "BOFT"}, "'BOFT' is not LoRA, LoHa or LoKr"),
        ({"peft_type": "LOKR"}, "a LoHa factor, but the config's peft_type is 'LOKR'"),
        ({"peft_type": "LORA"}, "a LoHa factor, but the config's peft_type is 'LORA'"),
        ({"use_effective_conv2d": False}, "use_effective_conv2d=false"),
        ({"r": 3}, "config gives r=3"),
    ],
)
def test_a_config_that_does_not_fit_is_refused(loha: BuiltAdapter, tmp_path: Path, changes: dict, match: str) -> None:
    with pytest.raises(W2TError, match=match) as error:
        load_adapter(edited(loha.path, tmp_path / "x", **changes))
    assert str(tmp_path / "x") in str(error.value)
