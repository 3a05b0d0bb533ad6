"""DoRA: magnitudes are read with their module, make the update exact with the base model, and reach the embedding.

Ground truth is PEFT itself: `merge_and_unload` writes DoRA's effective weight, so merged − W₀ is the
update a reader must describe. Magnitudes are perturbed away from their init (the base's row norms), as
training does, and the factors are random, so no identity hides a bug.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import w2t
from tests.adapters_factory import TinyConvNet, tiny_llama
from w2t.canon.dora import MODULE_FEATURES
from w2t.canon.reparam import reparametrize
from w2t.data.cache import load_entry, save_entry
from w2t.data.tokens import TokenSchema, collate_tokens, tokenize
from w2t.errors import W2TError
from w2t.io.formats import load_adapter
from w2t.models.w2t import W2TEncoder


def _dora(model: torch.nn.Module, out: Path, **lora_kwargs) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(adapter folder, base safetensors, effective ΔW per module name as PEFT merges it)."""
    base = out / "base.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, use_dora=True, **lora_kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))  # as training moves it off the base's norms
    peft_model.save_pretrained(out / "adapter")
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    delta = {}
    for key, w in merged.items():
        if key in w0 and not torch.equal(w, w0[key]):
            d = (w.double() - w0[key].double())
            delta[key[: -len(".weight")]] = d.reshape(d.shape[0], -1)
    return out / "adapter", base, delta


def _assert_exact(adapter, base_file: Path, delta: dict[str, torch.Tensor]) -> None:
    """diag(c)·s·B·A + diag(c − 1)·W₀ equals PEFT's merged update, module by module."""
    base = load_file(str(base_file))
    assert len(delta) == len(adapter.modules)
    for mod in adapter.modules:
        name = mod.name.removeprefix("base_model.model.")
        w0 = base[f"{name}.weight"].double()
        w0 = w0.reshape(w0.shape[0], -1)
        c = mod.magnitude_scale
        ours = mod.scale * mod.B.double() @ mod.A.double() + (c - 1)[:, None] * w0
        err = (ours - delta[name]).norm() / delta[name].norm()
        assert err < 1e-5, (name, float(err))


def test_dora_with_base_is_exact(tmp_path: Path) -> None:
    path, base, delta = _dora(tiny_llama(2), tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    adapter = load_adapter(path, base=base)
    assert all(m.magnitude is not None and m.magnitude_scale is not None for m in adapter.modules)
    assert not adapter.extras
    _assert_exact(adapter, base, delta)
    # without the base, the factors are the plain LoRA ones: c is unknown, and so is the exact update
    plain = load_adapter(path)
    assert plain.modules[0].magnitude_scale is None
    assert not torch.allclose(plain.modules[0].B, adapter.modules[0].B.float())


def test_conv_dora_with_base_is_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path, base, delta = _dora(TinyConvNet(), tmp_path, r=2, lora_alpha=4, target_modules=["conv1", "conv2", "proj"])
    _assert_exact(load_adapter(path, base=base), base, delta)


def test_a_broken_rescale_is_caught(tmp_path: Path) -> None:
    """The exactness check fails when c is taken over the wrong axis (columns instead of rows)."""
    path, base, delta = _dora(tiny_llama(1), tmp_path, r=4, lora_alpha=8, target_modules=["down_proj"])
    adapter = load_adapter(path, base=base)
    mod = adapter.modules[0]
    mod.magnitude_scale = mod.magnitude_scale.flip(0)  # the right values in the wrong rows
    with pytest.raises(AssertionError):
        _assert_exact(adapter, base, delta)


def _kohya_dora(path: Path, *, per_input: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One kohya module `lora_unet_mid_proj` with a `.dora_scale` over rows (m, 1) or input channels (1, c_in)."""
    gen = torch.Generator().manual_seed(0)
    m, c_in, k, r = 12, 5, 3, 3
    w0 = torch.randn(m, c_in, k, k, generator=gen, dtype=torch.float64)
    down, up = torch.randn(r, c_in, k, k, generator=gen), torch.randn(m, r, 1, 1, generator=gen)
    W = w0 + 0.5 * (up.reshape(m, r) @ down.reshape(r, -1)).double().reshape(w0.shape)
    norms = W.transpose(0, 1).reshape(c_in, -1).norm(dim=1) if per_input else W.reshape(m, -1).norm(dim=1)
    scale = norms * (1 + 0.3 * torch.randn(norms.shape, generator=gen, dtype=torch.float64))
    tensors = {"lora_unet_mid_proj.lora_down.weight": down, "lora_unet_mid_proj.lora_up.weight": up,
               "lora_unet_mid_proj.alpha": torch.tensor(1.5),
               "lora_unet_mid_proj.dora_scale": (scale.reshape(1, c_in, 1, 1) if per_input else scale.reshape(m, 1, 1, 1)).float()}
    save_file(tensors, str(path / "dora.safetensors"))
    save_file({"unet.mid.proj.weight": w0.float()}, str(path / "base.safetensors"))
    c = scale.float().double() / norms
    dense = (W * (c.reshape(1, c_in, 1, 1) if per_input else c.reshape(m, 1, 1, 1)) - w0).reshape(m, -1)
    return tensors, dense


@pytest.mark.parametrize("per_input", [False, True])
def test_kohya_dora_scale(tmp_path: Path, per_input: bool) -> None:
    _, dense = _kohya_dora(tmp_path, per_input=per_input)
    mod = load_adapter(tmp_path / "dora.safetensors").modules[0]
    assert mod.magnitude.shape == ((1, 5) if per_input else (12, 1))
    mod = load_adapter(tmp_path / "dora.safetensors", base=tmp_path / "base.safetensors").modules[0]
    w0 = load_file(str(tmp_path / "base.safetensors"))["unet.mid.proj.weight"].double().reshape(12, -1)
    c = mod.magnitude_scale
    rest = w0 * (c.repeat_interleave(9)[None, :] - 1) if per_input else (c - 1)[:, None] * w0
    ours = mod.scale * mod.B.double() @ mod.A.double() + rest
    assert (ours - dense).norm() / dense.norm() < 1e-5


def _lora_twin(dora_dir: Path, out: Path) -> Path:
    """The same B, A without magnitudes: a plain LoRA adapter."""
    out.mkdir()
    tensors = {k: v for k, v in load_file(str(dora_dir / "adapter_model.safetensors")).items() if "magnitude" not in k}
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = json.loads((dora_dir / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    return out


def _random_encoder(modules) -> W2TEncoder:
    torch.manual_seed(0)
    enc = W2TEncoder(TokenSchema.from_modules(modules))
    with torch.no_grad():
        for p in enc.parameters():  # random non-zero values everywhere: the zero-init read-out hides nothing
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return enc.eval()


@pytest.mark.parametrize("with_base", [False, True])
def test_magnitudes_change_the_embedding(tmp_path: Path, with_base: bool) -> None:
    path, base, _ = _dora(tiny_llama(2), tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    twin = _lora_twin(path, tmp_path / "lora")
    read = {"base": base} if with_base else {}
    dora_mods = w2t.canonicalize_adapter(load_adapter(path, **read))
    lora_mods = w2t.canonicalize_adapter(load_adapter(twin, **read))
    assert all(m.features is None for m in lora_mods)
    feats = torch.stack([m.features for m in dora_mods])
    assert feats.shape == (len(dora_mods), MODULE_FEATURES) and (feats[:, 0] == 1).all()
    assert (feats[:, 3] == float(with_base)).all()
    enc = _random_encoder(dora_mods)

    def embed(mods):
        return enc(collate_tokens([tokenize(mods, enc.schema)[0]]))

    assert not torch.allclose(embed(dora_mods), embed(lora_mods), atol=1e-4)
    if not with_base:  # same B, A: the features are the only difference, and a model that ignores them is caught
        with torch.no_grad():
            for lin in enc.magnitude:
                lin.weight.zero_()
        torch.testing.assert_close(embed(dora_mods), embed(lora_mods))


def test_features_survive_the_cache_and_reparametrization(tmp_path: Path) -> None:
    path, base, _ = _dora(tiny_llama(1), tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    adapter = load_adapter(path, base=base)
    mods = w2t.canonicalize_adapter(adapter)
    save_entry(tmp_path / "e.arrow", mods, "float32")
    back = load_entry(tmp_path / "e.arrow")
    torch.testing.assert_close(back[0].features, mods[0].features.float())
    again = w2t.canonicalize_adapter(reparametrize(adapter, "gl", seed=3))
    torch.testing.assert_close(again[0].features, mods[0].features)


def test_base_errors_name_the_file(tmp_path: Path) -> None:
    path, base, _ = _dora(tiny_llama(1), tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    save_file({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 64)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(W2TError, match="other.safetensors.*no weight for DoRA module"):
        load_adapter(path, base=tmp_path / "other.safetensors")
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 64)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(W2TError, match="bad.safetensors.*does not match"):
        load_adapter(path, base=tmp_path / "bad.safetensors")
    with pytest.raises(W2TError, match="missing.safetensors"):
        load_adapter(path, base=tmp_path / "missing.safetensors")


def test_dora_on_a_lycoris_loha_module(tmp_path: Path) -> None:
    """LyCORIS `dora_wd` on LoHa: the magnitude attaches to the module read from `hada_*`, exact with the base."""
    gen = torch.Generator().manual_seed(0)
    m, n, r = 12, 10, 2
    w1a, w1b, w2a, w2b = (torch.randn(*s, generator=gen) for s in ((m, r), (r, n), (m, r), (r, n)))
    w0 = torch.randn(m, n, generator=gen)
    delta = ((w1a @ w1b) * (w2a @ w2b)).double()  # alpha = r: scale 1
    norms = (w0.double() + delta).norm(dim=1)
    mag = norms * (1 + 0.3 * torch.randn(m, generator=gen, dtype=torch.float64))
    save_file({"lora_unet_mid_proj.hada_w1_a": w1a, "lora_unet_mid_proj.hada_w1_b": w1b,
               "lora_unet_mid_proj.hada_w2_a": w2a, "lora_unet_mid_proj.hada_w2_b": w2b,
               "lora_unet_mid_proj.alpha": torch.tensor(float(r)),
               "lora_unet_mid_proj.dora_scale": mag.float().reshape(m, 1)}, str(tmp_path / "loha.safetensors"))
    save_file({"mid.proj.weight": w0}, str(tmp_path / "base.safetensors"))
    adapter = load_adapter(tmp_path / "loha.safetensors")
    assert not adapter.extras and adapter.modules[0].magnitude.shape == (m, 1)
    mod = load_adapter(tmp_path / "loha.safetensors", base=tmp_path / "base.safetensors").modules[0]
    c = mag.float().double() / norms
    want = c[:, None] * (w0.double() + delta) - w0.double()
    ours = mod.scale * mod.B.double() @ mod.A.double() + (mod.magnitude_scale - 1)[:, None] * w0.double()
    assert (ours - want).norm() / want.norm() < 1e-5
