"""Reading LoRA files: real PEFT adapters against the live model, kohya/diffusers files, bad inputs."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_factory import (
    LLAMA_TARGETS,
    BuiltAdapter,
    bert_adapter,
    conv_adapter,
    llama_adapter,
    write_kohya_file,
)
from w2t import (
    AdapterFormatError,
    AdapterNotFoundError,
    InvalidValueError,
    MissingFactorError,
    NoLoraKeysError,
    PickleRefusedError,
    ShapeMismatchError,
    load_adapter,
)
from w2t.canon.canonical import canonicalize_adapter
from w2t.errors import SchemaError
from w2t.io.keys import parse_module_name, split_key
from w2t.data.tokens import TokenSchema, tokenize


# --- key names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.12.self_attn.q_proj", (12, "self_attn.q_proj")),
        ("base_model.model.model.layers.2.mlp.down_proj", (2, "mlp.down_proj")),
        ("encoder.layer.3.attention.self.query", (3, "attention.self.query")),
        (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            (0, "down_blocks.1.attentions.0.transformer_blocks.attn1.to_q"),
        ),
        (
            "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q",
            (0, "unet.down_blocks_0_attentions_1_transformer_blocks_attn1_to_q"),
        ),
        ("lora_te_text_model_encoder_layers_11_self_attn_q_proj", (11, "te.self_attn_q_proj")),
        ("lora_te2_text_model_encoder_layers_1_mlp_fc2", (1, "te2.mlp_fc2")),
        ("text_encoder_2.text_model.encoder.layers.4.self_attn.k_proj", (4, "text_encoder_2.self_attn.k_proj")),
        ("lm_head", (0, "lm_head")),
        ("net.3", (3, "net")),
    ],
)
def test_parse_module_name(name: str, expected: tuple[int, str]) -> None:
    assert parse_module_name(name) == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("base_model.model.x.q_proj.lora_A.weight", ("base_model.model.x.q_proj", "A")),
        ("base_model.model.x.q_proj.lora_B.default.weight", ("base_model.model.x.q_proj", "B")),
        ("lora_unet_a_to_q.lora_down.weight", ("lora_unet_a_to_q", "A")),
        ("lora_unet_a_to_q.lora_up.weight", ("lora_unet_a_to_q", "B")),
        ("lora_unet_a_to_q.alpha", ("lora_unet_a_to_q", "alpha")),
        ("unet.b.attn1.processor.to_q_lora.down.weight", ("unet.b.attn1.processor.to_q", "A")),
        ("x.q_proj.lora_magnitude_vector", ("x.q_proj", "dora_magnitude")),
        ("x.lora_embedding_A", ("x.lora_embedding_A", "other")),
        ("classifier.bias", ("classifier.bias", "other")),
    ],
)
def test_split_key(key: str, expected: tuple[str, str]) -> None:
    assert split_key(key) == expected


# --- real PEFT adapters against the live model -------------------------------------------------


def assert_matches_peft(built: BuiltAdapter, **load_kwargs) -> None:
    """Same modules, PEFT's own scaling, and scale·B@A equal to PEFT's ΔW."""
    adapter = load_adapter(built.path, **load_kwargs)
    expected = built.expected()
    assert {m.name for m in adapter.modules} == set(expected)
    for m in adapter.modules:
        scale, delta = expected[m.name]
        assert m.scale == pytest.approx(scale, rel=1e-12), m.name
        torch.testing.assert_close(m.scale * m.B @ m.A, delta)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> BuiltAdapter:
    return llama_adapter(tmp_path_factory.mktemp("llama"))


def test_llama_gqa_adapter(llama: BuiltAdapter) -> None:
    assert_matches_peft(llama)
    adapter = load_adapter(llama.path)
    assert len(adapter) == 3 * len(LLAMA_TARGETS) and adapter.extras == {} and adapter.notes == []
    assert adapter.dtype == torch.float32 and all(m.A.dtype == torch.float32 for m in adapter.modules)
    shapes = {m.module_type: m.shape for m in adapter.modules}
    assert shapes["self_attn.q_proj"] == (64, 64) and shapes["self_attn.k_proj"] == (32, 64)
    assert shapes["mlp.down_proj"] == (64, 96)
    order = [(m.module_type, m.layer) for m in adapter.modules]
    assert order == sorted(order)


def test_layer_ten_sorts_after_layer_two(tmp_path: Path) -> None:
    built = llama_adapter(tmp_path, num_layers=12, target_modules=["q_proj", "v_proj"])
    adapter = load_adapter(built.path)
    assert [m.layer for m in adapter.modules] == list(range(12)) * 2
    assert adapter.modules[10].name.endswith("layers.10.self_attn.q_proj")


def test_bert_adapter(tmp_path: Path) -> None:
    built = bert_adapter(tmp_path)
    assert_matches_peft(built)
    adapter = load_adapter(built.path)
    assert adapter.module_types == ["attention.self.query", "attention.self.value"]


def test_conv_adapter_flattens_kernels(tmp_path: Path) -> None:
    built = conv_adapter(tmp_path)
    assert_matches_peft(built)
    shapes = {m.module_type: (tuple(m.A.shape), tuple(m.B.shape)) for m in load_adapter(built.path).modules}
    assert shapes == {"conv1": ((2, 27), (8, 2)), "conv2": ((2, 72), (16, 2)), "proj": ((2, 16), (16, 2))}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"use_rslora": True},
        {
            "rank_pattern": {"q_proj": 6, r"layers\.[12]\.mlp\.down_proj": 2},
            "alpha_pattern": {"model.layers.0.self_attn.k_proj": 3, "up_proj": 32},
        },
        {"use_rslora": True, "rank_pattern": {"v_proj": 8}, "alpha_pattern": {"o_proj": 5}},
    ],
    ids=["rslora", "patterns", "rslora+patterns"],
)
def test_scale_matches_peft(tmp_path: Path, kwargs: dict) -> None:
    built = llama_adapter(tmp_path, **kwargs)
    ranks = {layer.r["default"] for layer in built.lora_layers().values()}
    scales = {layer.scaling["default"] for layer in built.lora_layers().values()}
    assert len(scales) > 1 or kwargs == {"use_rslora": True}, "patterns must give modules different scales"
    assert len(ranks) > 1 or "rank_pattern" not in kwargs
    assert_matches_peft(built)


def test_old_default_keys(llama: BuiltAdapter, tmp_path: Path) -> None:
    tensors = load_file(llama.path / "adapter_model.safetensors")
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "adapter_model.safetensors")
    shutil.copy(llama.path / "adapter_config.json", tmp_path)
    assert_matches_peft(BuiltAdapter(tmp_path, llama.model))


def test_pickled_peft_folder_needs_allow_pickle(tmp_path: Path) -> None:
    built = bert_adapter(tmp_path, safe=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    with pytest.raises(PickleRefusedError, match="adapter_model.bin"):
        load_adapter(tmp_path)
    assert_matches_peft(built, allow_pickle=True)


# --- what is not a plain LoRA factor: kept and reported, never a crash ------------------------


def test_modules_to_save_and_lora_bias_go_to_extras(tmp_path: Path) -> None:
    built = bert_adapter(tmp_path, modules_to_save=["classifier"], lora_bias=True)
    adapter = load_adapter(built.path)
    assert len(adapter) == 4
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(adapter.extras)
    assert any("modules_to_save" in note for note in adapter.notes)
    assert any(note.startswith("4 bias") for note in adapter.notes)  # the lora_B biases


def test_embedding_lora_goes_to_extras(tmp_path: Path) -> None:
    built = llama_adapter(tmp_path, target_modules=["embed_tokens", "q_proj"])
    adapter = load_adapter(built.path)
    assert adapter.module_types == ["self_attn.q_proj"]
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in adapter.extras
    assert any("embedding LoRA" in note for note in adapter.notes)


# --- single files: kohya and diffusers ---------------------------------------------------------


def assert_modules(path: Path, expected: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    adapter = load_adapter(path)
    got = {m.name: m for m in adapter.modules}
    assert set(got) == set(expected)
    for name, (A, B, scale) in expected.items():
        assert got[name].scale == pytest.approx(scale)
        torch.testing.assert_close(got[name].A, A, rtol=0, atol=0)
        torch.testing.assert_close(got[name].B, B, rtol=0, atol=0)


def test_kohya_file(tmp_path: Path) -> None:
    path = tmp_path / "style.safetensors"
    expected = write_kohya_file(path, rank=4, alpha=2.0)
    assert_modules(path, expected)
    adapter = load_adapter(path)
    assert adapter.dtype == torch.float16 and adapter.modules[0].A.dtype == torch.float32
    conv = next(m for m in adapter.modules if m.name.endswith("resnets_0_conv1"))
    assert conv.shape == (32, 32 * 9) and conv.module_type == "unet.down_blocks_0_resnets_conv1"
    te_q = [m.layer for m in adapter.modules if m.module_type == "te.self_attn_q_proj"]
    assert te_q == [0, 11]


def test_kohya_without_alpha_has_scale_one(tmp_path: Path) -> None:
    path = tmp_path / "noalpha.safetensors"
    assert_modules(path, write_kohya_file(path, alpha=None))


def test_diffusers_files(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 32, generator=gen), torch.randn(48, 4, generator=gen)
    unet = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    save_file({f"{unet}.lora_A.weight": A, f"{unet}.lora_B.weight": B}, tmp_path / "peft_style.safetensors")
    assert_modules(tmp_path / "peft_style.safetensors", {unet: (A, B, 1.0)})
    save_file(
        {f"{te}.lora_A.weight": A, f"{te}.lora_B.weight": B, f"{te}.alpha": torch.tensor(8.0)},
        tmp_path / "with_alpha.safetensors",
    )
    assert_modules(tmp_path / "with_alpha.safetensors", {te: (A, B, 2.0)})
    old = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q"
    (folder := tmp_path / "folder").mkdir()
    save_file({f"{old}_lora.down.weight": A, f"{old}_lora.up.weight": B}, folder / "pytorch_lora_weights.safetensors")
    assert_modules(folder, {old: (A, B, 1.0)})
    assert load_adapter(tmp_path / "with_alpha.safetensors").module_types == ["text_encoder.self_attn.q_proj"]


def test_shared_identity_is_reported(tmp_path: Path) -> None:
    """Flux-style names: the identity rule drops integer-free prefixes, so two blocks can collide."""
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    names = ["transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.attn.to_q"]
    tensors = {f"{n}.lora_{f}.weight": t.clone() for n in names for f, t in (("A", A), ("B", B))}
    save_file(tensors, tmp_path / "f.safetensors")
    adapter = load_adapter(tmp_path / "f.safetensors")
    assert len(adapter) == 2 and any("shared by several modules" in note for note in adapter.notes)
    modules = canonicalize_adapter(adapter)
    schema = TokenSchema.from_modules(modules)
    _, left_out = tokenize(modules, schema, strict=False)  # the second never overwrites the first
    assert len(left_out) == 1 and "already taken" in left_out[0]
    with pytest.raises(SchemaError, match="already taken"):
        tokenize(modules, schema)


@pytest.mark.parametrize(
    ("stored", "requested", "factor_dtype"),
    [
        (torch.bfloat16, None, torch.float32),
        (torch.float64, None, torch.float64),
        (torch.float32, torch.float64, torch.float64),
        (torch.float16, torch.float16, torch.float16),
    ],
)
def test_dtypes(tmp_path: Path, stored: torch.dtype, requested: torch.dtype | None, factor_dtype: torch.dtype) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"m.lora_A.weight": torch.ones(2, 3, dtype=stored), "m.lora_B.weight": torch.ones(4, 2, dtype=stored)},
              path)
    adapter = load_adapter(path, dtype=requested)
    assert adapter.dtype == stored
    assert adapter.modules[0].A.dtype == factor_dtype and adapter.modules[0].B.dtype == factor_dtype


# --- pickle files ------------------------------------------------------------------------------


class Exploit:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_never_runs(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"m.lora_A.weight": Exploit(marker), "m.lora_B.weight": torch.ones(2, 2)}
    path = tmp_path / ("adapter.pt" if writer == "torch.save" else "adapter.bin")
    with open(path, "wb") as f:
        torch.save(payload, f) if writer == "torch.save" else pickle.dump(payload, f)
    # The payload is real: an unrestricted load does run it.
    torch.load(path, weights_only=False) if writer == "torch.save" else pickle.loads(path.read_bytes())
    assert marker.exists()
    marker.unlink()

    with pytest.raises(PickleRefusedError, match=path.name):
        load_adapter(path)
    with pytest.raises(AdapterFormatError, match=path.name):
        load_adapter(path, allow_pickle=True)
    assert not marker.exists()


def test_benign_pickle_loads_with_allow_pickle(tmp_path: Path) -> None:
    A, B = torch.randn(2, 5), torch.randn(3, 2)
    path = tmp_path / "state.pt"
    name = "lora_unet_mid_block_attentions_0_proj_in"
    torch.save({f"{name}.lora_down.weight": A, f"{name}.lora_up.weight": B, f"{name}.alpha": torch.tensor(1.0)}, path)
    adapter = load_adapter(path, allow_pickle=True)
    (m,) = adapter.modules
    assert m.scale == 0.5 and m.module_type == "unet.proj_in"
    torch.testing.assert_close(m.B @ m.A, B @ A)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(AdapterFormatError, match="state.pt"):
        load_adapter(path, allow_pickle=True)


# --- bad inputs: a specific error naming the file and the key ----------------------------------

A_KEY, B_KEY = "m.layers.0.q.lora_A.weight", "m.layers.0.q.lora_B.weight"


def good() -> dict[str, torch.Tensor]:
    return {A_KEY: torch.randn(2, 3), B_KEY: torch.randn(4, 2)}


def with_nan(key: str, value: float) -> dict[str, torch.Tensor]:
    tensors = good()
    tensors[key][0, 1] = value
    return tensors


BAD_FILES = {
    "A without B": ({A_KEY: torch.randn(2, 3)}, MissingFactorError, A_KEY),
    "B without A": ({B_KEY: torch.randn(4, 2)}, MissingFactorError, B_KEY),
    "B cols != A rows": ({A_KEY: torch.randn(2, 3), B_KEY: torch.randn(4, 3)}, ShapeMismatchError, B_KEY),
    "NaN": (with_nan(A_KEY, float("nan")), InvalidValueError, A_KEY),
    "Inf": (with_nan(B_KEY, float("-inf")), InvalidValueError, B_KEY),
    "int dtype": ({A_KEY: torch.ones(2, 3, dtype=torch.int32), B_KEY: torch.randn(4, 2)}, InvalidValueError, A_KEY),
    "1-D factor": ({A_KEY: torch.randn(3), B_KEY: torch.randn(4, 2)}, ShapeMismatchError, A_KEY),
    "3x3 up kernel": (
        {A_KEY: torch.randn(2, 3, 3, 3), B_KEY: torch.randn(4, 2, 3, 3)},
        ShapeMismatchError,
        B_KEY,
    ),
    "6-D factor": ({A_KEY: torch.randn(2, 3, 1, 1, 1, 1), B_KEY: torch.randn(4, 2)}, ShapeMismatchError, A_KEY),
    "rank 0": ({A_KEY: torch.randn(0, 3), B_KEY: torch.randn(4, 0)}, ShapeMismatchError, A_KEY),
    "no LoRA keys": ({"model.embed.weight": torch.randn(4, 4)}, NoLoraKeysError, None),
    "no tensors": ({}, NoLoraKeysError, None),
}


def assert_names(error: pytest.ExceptionInfo, path: Path, key: str | None) -> None:
    assert path.name in str(error.value)
    if key is not None:
        assert key in str(error.value) and error.value.key == key


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_bad_file(tmp_path: Path, case: str) -> None:
    tensors, error, key = BAD_FILES[case]
    path = tmp_path / "bad_adapter.safetensors"
    save_file(tensors, path)
    with pytest.raises(error) as info:
        load_adapter(path)
    assert_names(info, path, key)


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFoundError) as info:
        load_adapter(tmp_path / "nowhere.safetensors")
    assert_names(info, tmp_path / "nowhere.safetensors", None)
    (empty := tmp_path / "empty_folder").mkdir()
    with pytest.raises(AdapterNotFoundError, match="empty_folder"):
        load_adapter(empty)


@pytest.mark.parametrize("content", [b"not a safetensors file at all", b"", "truncated"])
def test_unreadable_safetensors(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "broken.safetensors"
    if content == "truncated":
        save_file(good(), path)
        content = path.read_bytes()[:-8]
    path.write_bytes(content)
    with pytest.raises(AdapterFormatError) as info:
        load_adapter(path)
    assert_names(info, path, None)
    assert info.value.__suppress_context__  # no raw safetensors traceback attached


def peft_folder(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return dst


def test_bad_or_missing_config(llama: BuiltAdapter, tmp_path: Path) -> None:
    folder = peft_folder(llama.path, tmp_path / "a")
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="adapter_config.json"):
        load_adapter(folder)
    os.remove(folder / "adapter_config.json")
    with pytest.raises(AdapterFormatError, match="adapter_config.json"):
        load_adapter(folder / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="ADALORA"):
        load_adapter(peft_folder(llama.path, tmp_path / "b", peft_type="ADALORA"))


def test_config_rank_disagrees(llama: BuiltAdapter, tmp_path: Path) -> None:
    folder = peft_folder(llama.path, tmp_path / "a", r=8)
    with pytest.raises(ShapeMismatchError, match="r=8") as info:
        load_adapter(folder)
    assert_names(info, folder / "adapter_model.safetensors", info.value.key)
    assert info.value.key.endswith(".lora_A.weight")

    folder = peft_folder(llama.path, tmp_path / "b", rank_pattern={"layers.1.self_attn.v_proj": 2})
    with pytest.raises(ShapeMismatchError, match="r=2") as info:
        load_adapter(folder)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    assert_names(info, folder / "adapter_model.safetensors", key)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_unconverted_base_modifying_init_is_refused_and_a_converted_one_reads_exactly(init, tmp_path):
    """PiSSA/OLoRA rewrite the base weights: their raw factors are no s·B·A of the original base. PEFT's
    conversion (`path_initial_model_for_weight_conversion`) makes a rank-2r LoRA of the original base."""
    import copy

    from peft import LoraConfig, get_peft_model

    from adapters_factory import tiny_llama
    from w2t.data.cache import TokenCache

    base = tiny_llama(2, seed=0)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=init))
    model.save_pretrained(tmp_path / "initial")
    with torch.no_grad():  # stands for training: the factors move away from their init
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "unconverted")
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    with pytest.raises(AdapterFormatError, match=rf"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion") as e:
        load_adapter(tmp_path / "unconverted")
    assert str(tmp_path / "unconverted") in str(e.value) and "\n" not in str(e.value)
    adapter = load_adapter(tmp_path / "converted")
    merged = model.merge_and_unload().state_dict()
    for m in adapter.modules:
        key = m.name.removeprefix("base_model.model.") + ".weight"
        ref = merged[key].double() - original[key].double()  # what the trained adapter does to the original base
        assert m.rank == 8 and (m.scale * m.B.double() @ m.A.double() - ref).norm() <= 1e-5 * ref.norm()
    report = TokenCache(tmp_path / "cache").build([("good", tmp_path / "converted"), ("bad", tmp_path / "unconverted")])
    assert list(report.entries) == ["good"] and [f["adapter_id"] for f in report.failed] == ["bad"]
