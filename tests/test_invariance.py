"""Invariance on real PEFT adapters: files → canonical tokens → encoder outputs (docs/design.md §2, §3)."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters_factory import bert_adapter, llama_adapter
from w2t import load_adapter
from w2t.canon.canonical import canonicalize_adapter
from w2t.canon.reparam import reparametrize
from w2t.canon.representation import raw_components
from w2t.models.w2t import EncoderConfig, W2TEncoder
from w2t.data.tokens import TokenSchema, collate_tokens, tokenize


def reparametrized(adapter, cond: float, seed: int):
    """The same ΔW per module, factored as (B G, G⁻¹ A) with cond(G) = `cond`, in the adapter's (float64) dtype."""
    return reparametrize(adapter, "gl", seed, condition=cond)


def tokens_of(adapter, schema=None):
    mods = canonicalize_adapter(adapter)
    schema = schema or TokenSchema.from_modules(mods)
    return tokenize(mods, schema, dtype=torch.float64)[0], schema


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random and non-zero, as in a trained model: at its initialisation the W2T read-out and
    the Transformer's residual branches are zero, so u and v would never reach the output and an invariance
    test would prove nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.3
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std + 0.05)
    assert all((p != 0).all() for p in module.parameters())
    return module


def max_diff(t1, t2):
    return max((t1[g][k].double() - t2[g][k].double()).abs().max().item() for g in t1 for k in ("u", "v", "s"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return llama_adapter(tmp_path_factory.mktemp("llama") / "a", num_layers=3, seed=0).path


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4])
def test_tokens_invariant_to_gl_reparametrization(llama, cond):
    adapter = load_adapter(llama, dtype=torch.float64)
    ref, schema = tokens_of(adapter)
    rep, _ = tokens_of(reparametrized(adapter, cond, seed=int(cond)), schema)
    assert max_diff(ref, rep) < 1e-8


def test_key_order_and_scale_tradeoff_in_files(llama, tmp_path):
    ref, schema = tokens_of(load_adapter(llama, dtype=torch.float64))
    tensors = load_file(str(llama / "adapter_model.safetensors"))
    config = json.loads((llama / "adapter_config.json").read_text())

    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    keys = list(tensors)
    random.Random(0).shuffle(keys)
    save_file({k: tensors[k] for k in keys}, str(shuffled / "adapter_model.safetensors"))
    (shuffled / "adapter_config.json").write_text(json.dumps(config))
    assert max_diff(ref, tokens_of(load_adapter(shuffled, dtype=torch.float64), schema)[0]) == 0.0

    traded = tmp_path / "traded"  # alpha ×2 with B ×½: the same ΔW (exact in binary floating point)
    traded.mkdir()
    save_file({k: v * 0.5 if "lora_B" in k else v for k, v in tensors.items()}, str(traded / "adapter_model.safetensors"))
    (traded / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": config["lora_alpha"] * 2}))
    assert max_diff(ref, tokens_of(load_adapter(traded, dtype=torch.float64), schema)[0]) < 1e-12


def test_float32_file_reparametrized_in_float32(llama):
    """A reparametrization stored in float32 (as a real file would be) agrees to ~1e-5, not 1e-8."""
    adapter = load_adapter(llama, dtype=torch.float64)
    ref, schema = tokens_of(adapter)
    rep = reparametrized(adapter, 10.0, seed=3)
    for mod in rep.modules:
        mod.A, mod.B = mod.A.float(), mod.B.float()
    assert max_diff(ref, tokens_of(rep, schema)[0]) < 1e-4


def test_encoder_outputs_invariant_and_sensitive(llama, tmp_path):
    adapter = load_adapter(llama, dtype=torch.float64)
    ref, schema = tokens_of(adapter)
    rep, _ = tokens_of(reparametrized(adapter, 1e3, seed=1), schema)
    other, _ = tokens_of(load_adapter(llama_adapter(tmp_path / "b", num_layers=3, seed=5).path, dtype=torch.float64), schema)
    enc = randomize_(W2TEncoder(schema, EncoderConfig(d_model=32, n_heads=4, depth=1)).double().eval())
    with torch.no_grad():
        z_ref, z_rep, z_other = enc(collate_tokens([ref, rep, other])).unbind(0)
    scale = z_ref.abs().max()
    assert (z_ref - z_rep).abs().max() < 1e-6 * scale
    assert (z_ref - z_other).abs().max() > 1e-2 * scale
    # the check can fail: fed the raw factors instead (no canonical form), the same encoder moves
    raw = [tokenize(raw_components(a), schema, dtype=torch.float64)[0]
           for a in (adapter, reparametrized(adapter, 1e3, seed=1))]
    with torch.no_grad():
        z_raw, z_raw_rep = enc(collate_tokens(raw)).unbind(0)
    assert (z_raw - z_raw_rep).abs().max() > 1e-2 * scale


def test_mixed_ranks_and_module_sets_batch_together(tmp_path):
    a = load_adapter(llama_adapter(tmp_path / "a", r=2, target_modules=["q_proj", "v_proj"]).path)
    b = load_adapter(llama_adapter(tmp_path / "b", r=8, target_modules=["q_proj", "k_proj", "o_proj"], seed=1).path)
    ma, mb = canonicalize_adapter(a), canonicalize_adapter(b)
    schema = TokenSchema.from_modules(ma + mb)
    names = {g.name: g for g in schema.groups}
    assert set(names) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    assert names["self_attn.q_proj"].max_rank == 8 and names["self_attn.k_proj"].m == 32  # GQA: k is narrower
    ta, tb = (tokenize(m, schema)[0] for m in (ma, mb))
    batch = collate_tokens([ta, tb])
    assert batch["self_attn.q_proj"]["mask"].shape == (2, 3, 8)
    assert batch["self_attn.q_proj"]["mask"][0].sum(-1).tolist() == [2, 2, 2]  # rank 2, padded to 8
    assert not batch["self_attn.k_proj"]["mask"][0].any()  # missing module: masked, not dropped
    assert not batch["self_attn.v_proj"]["mask"][1].any()
    enc = W2TEncoder(schema, EncoderConfig(d_model=32, n_heads=4, depth=1)).eval()
    assert torch.isfinite(enc(batch)).all()


def test_zero_adapter_is_fully_masked_and_encodes(tmp_path):
    built = bert_adapter(tmp_path / "z")
    adapter = load_adapter(built.path)
    for mod in adapter.modules:
        mod.B = torch.zeros_like(mod.B)
    mods = canonicalize_adapter(adapter)
    assert not any(m.mask.any() for m in mods)
    toks, _ = tokenize(mods, TokenSchema.from_modules(mods))
    enc = W2TEncoder(TokenSchema.from_modules(mods), EncoderConfig(d_model=32, n_heads=4, depth=1)).eval()
    assert torch.isfinite(enc(collate_tokens([toks]))).all()


def _with_tied_sigmas(tokens):
    """The same tokens with σ₁ = σ₂ in every module, so that (u₁, u₂) may rotate freely (docs/design.md §2)."""
    out = {g: {k: v.clone() for k, v in t.items()} for g, t in tokens.items()}
    for t in out.values():
        t["s"][:, 1] = t["s"][:, 0]
    return out


def _edit(tokens, fn):
    out = {g: {k: v.clone() for k, v in t.items()} for g, t in tokens.items()}
    for t in out.values():
        fn(t)
    return out


@pytest.mark.parametrize("rank_attention", [False, True])
def test_encoder_reads_delta_w_only_not_the_leftovers_of_canonicalization(llama, rank_attention):
    """Sign flips, rank order and rotations among tied σ change the tokens, never the encoder's output,
    with or without attention over the rank tokens: it needs no sign rule. Changing ΔW itself does change it."""
    ref = _with_tied_sigmas(tokens_of(load_adapter(llama, dtype=torch.float64))[0])
    schema = TokenSchema.from_modules(canonicalize_adapter(load_adapter(llama)))
    config = EncoderConfig(d_model=32, n_heads=4, depth=1, rank_attention=rank_attention)
    enc = randomize_(W2TEncoder(schema, config).double().eval())
    leaky = randomize_(_FirstRankLeak(schema, config).double().eval())

    def flip(t):  # (uᵢ, vᵢ) → (−uᵢ, −vᵢ) for ranks 0 and 2
        t["u"][:, [0, 2]] *= -1
        t["v"][:, [0, 2]] *= -1

    def permute(t):
        perm = torch.randperm(t["s"].shape[1], generator=torch.Generator().manual_seed(1))
        for k in ("u", "v", "s", "mask"):
            t[k] = t[k][:, perm]

    def rotate(t):  # a rotation inside the span of the tied components 0 and 1
        c, s = math.cos(0.7), math.sin(0.7)
        for k in ("u", "v"):
            a, b = t[k][:, 0].clone(), t[k][:, 1].clone()
            t[k][:, 0], t[k][:, 1] = c * a + s * b, -s * a + c * b

    def perturb(t):  # a different ΔW: σ₂ doubled
        t["s"][:, 2] *= 2

    variants = {name: _edit(ref, fn) for name, fn in [("flip", flip), ("permute", permute), ("rotate", rotate),
                                                       ("perturb", perturb)]}
    for name in ("flip", "permute", "rotate"):
        assert max_diff(ref, variants[name]) > 0.1, f"{name} must change the tokens themselves"
    with torch.no_grad():
        z = enc(collate_tokens([ref, *variants.values()]))
        z_leak = leaky(collate_tokens([ref, *variants.values()]))
    scale = z[0].abs().max().item()
    for i, name in enumerate(variants, start=1):
        change = (z[i] - z[0]).abs().max().item()
        if name == "perturb":
            assert change > 1e-2 * scale, "the encoder must respond to a change of ΔW"
        else:
            assert change < 1e-10 * scale, f"{name}: output moved by {change:.2e}"
            # the same check catches an encoder that reads the first rank token as it is stored
            assert (z_leak[i] - z_leak[0]).abs().max().item() > 1e-3 * z_leak[0].abs().max().item(), name


def test_rank_attention_needs_its_tied_blocks(llama, monkeypatch):
    """The rotation check catches a rank reader that does not average over tied σ: each token's own
    probes then follow the arbitrary basis of the tied subspace."""
    import w2t.models.rank_tokens as rank_tokens

    ref = _with_tied_sigmas(tokens_of(load_adapter(llama, dtype=torch.float64))[0])
    schema = TokenSchema.from_modules(canonicalize_adapter(load_adapter(llama)))
    enc = randomize_(W2TEncoder(schema, EncoderConfig(d_model=32, n_heads=4, depth=1, rank_attention=True)).double().eval())

    def rotate(t):
        c, s = math.cos(0.7), math.sin(0.7)
        for k in ("u", "v"):
            a, b = t[k][:, 0].clone(), t[k][:, 1].clone()
            t[k][:, 0], t[k][:, 1] = c * a + s * b, -s * a + c * b

    rotated = _edit(ref, rotate)
    with torch.no_grad():
        z, z_rot = enc(collate_tokens([ref, rotated])).unbind(0)
        assert (z - z_rot).abs().max() < 1e-10 * z.abs().max()
        monkeypatch.setattr(rank_tokens, "tied_blocks", lambda s, mask, rtol: torch.diag_embed(mask.to(s.dtype)))
        z, z_rot = enc(collate_tokens([ref, rotated])).unbind(0)
    assert (z - z_rot).abs().max() > 1e-3 * z.abs().max()


class _FirstRankLeak(W2TEncoder):
    """Deliberately not invariant: adds a read of u₁ itself, which flips with its sign and follows rank order."""

    def __init__(self, schema, config):
        super().__init__(schema, config)
        self.leak = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(g.m, config.d_model)) for g in schema.groups)

    def _module_tokens(self, i, t):
        x, present = super()._module_tokens(i, t)
        return x + t["u"][:, :, 0] @ self.leak[i], present


def test_encoder_parameters_do_not_grow_with_depth_except_position_binding(tmp_path):
    """Projections are shared per module type: a deeper model adds only its binding matrices."""
    def n_params(layers):
        mods = canonicalize_adapter(load_adapter(llama_adapter(tmp_path / f"l{layers}", num_layers=layers).path))
        enc = W2TEncoder(TokenSchema.from_modules(mods), EncoderConfig(d_model=32, d_module=16, depth=1))
        return enc.num_parameters(), len(TokenSchema.from_modules(mods).groups)

    (p3, types), (p6, _) = n_params(3), n_params(6)
    assert p6 - p3 == 3 * types * 16 * 32  # 3 more layers × types × one d_module × d_model binding each
