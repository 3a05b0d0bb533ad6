"""GLNet (w2t/models/glnet.py): the reference design's sizes, and invariance by its own equivariance on the raw
factors of real PEFT adapters, with every parameter random and non-zero; each check is shown to catch a
variant that is not invariant."""
from __future__ import annotations

import pytest
import torch

import w2t.models.glnet as glnet
from adapters_factory import llama_adapter
from test_invariance import randomize_
from w2t import load_adapter
from w2t.canon.canonical import canonicalize_adapter
from w2t.canon.reparam import reparametrize
from w2t.canon.representation import raw_components
from w2t.data.tokens import TokenSchema, collate_tokens, tokenize
from w2t.models.glnet import GLNetConfig, GLNetEncoder, gl_gate


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """One adapter, the same updates re-factored (GL(r) with κ(G) = 10³, and SVD), and another adapter, of a
    higher rank on fewer modules: types differ in rank (padded) and modules are missing (zeros)."""
    root = tmp_path_factory.mktemp("glnet")
    ref = load_adapter(llama_adapter(root / "a", num_layers=2, seed=0).path, dtype=torch.float64)
    other = load_adapter(llama_adapter(root / "b", num_layers=2, seed=5, r=8, target_modules=["q_proj", "k_proj"]).path,
                         dtype=torch.float64)
    return ref, [reparametrize(ref, "gl", seed=1), reparametrize(ref, "svd")], other


def _tokens(modules, schema):
    return tokenize(modules, schema, dtype=torch.float64)[0]


def _encode(enc, adapters):
    """Embeddings of: the raw factors, each re-factoring's raw factors, the canonical factors, another adapter."""
    ref, refactored, other = adapters
    schema = enc.schema
    toks = [_tokens(raw_components(a), schema) for a in (ref, *refactored)]
    toks += [_tokens(canonicalize_adapter(ref), schema), _tokens(raw_components(other), schema)]
    with torch.no_grad():
        return enc(collate_tokens(toks))


def _schema(adapters) -> TokenSchema:
    schema = TokenSchema.from_modules(raw_components(adapters[0]) + raw_components(adapters[2]))
    assert len({g.max_rank for g in schema.groups}) == 2
    return schema


def test_parameters_are_the_reference_designs(adapters):
    """Per position: W_u (h×m), W_v (h×n), and per extra layer two h×h maps; then Linear(L·h², d) and a LayerNorm.
    The read-out is the whole h×h U Vᵀ of every module (no bottleneck)."""
    schema = _schema(adapters)
    L = sum(g.num_layers for g in schema.groups)
    for n_layers in (1, 3):
        h, d = 8, 16
        enc = GLNetEncoder(schema, GLNetConfig(d_model=d, equiv_dim=h, n_layers=n_layers))
        first = sum(h * (g.m + g.n) * g.num_layers for g in schema.groups)
        assert enc.num_parameters() == first + (n_layers - 1) * 2 * L * h * h + (L * h * h + 1) * d + 2 * d
    defaults = GLNetConfig()
    assert (defaults.equiv_dim, defaults.d_model, defaults.n_layers) == (64, 128, 1)  # run_imagenette.py's


@pytest.mark.parametrize("n_layers", [1, 2])
def test_outputs_invariant_to_the_factorization_and_sensitive(adapters, n_layers):
    enc = GLNetEncoder(_schema(adapters), GLNetConfig(d_model=32, equiv_dim=16, n_layers=n_layers))
    z = _encode(randomize_(enc).double().eval(), adapters)
    ref, same, other = z[0], z[1:-1], z[-1]
    scale = ref.abs().max()
    assert (same - ref).abs().max() < 1e-9 * scale  # GL(r), SVD and canonical factors of the same ΔW
    assert (other - ref).abs().max() > 1e-2 * scale


def test_gate_commutes_with_gl():
    gen = torch.Generator().manual_seed(0)
    U, V = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64).unbind(0)  # (batch, r, h)
    G = torch.randn(3, 5, 5, generator=gen, dtype=torch.float64)  # rank components mix as U → G U, V → G⁻ᵀ V
    gu, gv = gl_gate(U, V)
    hu, hv = gl_gate(G @ U, torch.linalg.inv(G).transpose(-1, -2) @ V)
    torch.testing.assert_close((hu, hv), (G @ gu, torch.linalg.inv(G).transpose(-1, -2) @ gv))
    assert 0 < (gu != 0).double().mean() < 1  # it does gate


class _LeftGram(GLNetEncoder):
    """Deliberately not invariant: reads U Uᵀ instead of U Vᵀ."""

    def _readout(self, U, V):
        return super()._readout(U, U)


def test_the_checks_catch_encoders_that_are_not_invariant(adapters, monkeypatch):
    schema = _schema(adapters)

    def moved(enc):
        z = _encode(randomize_(enc).double().eval(), adapters)
        return (z[1] - z[0]).abs().max() / z[0].abs().max()

    assert moved(_LeftGram(schema, GLNetConfig(d_model=32, equiv_dim=16))) > 1e-3
    # a gate that reads U alone (not U Vᵀ): the n_layers = 2 check above would see it
    monkeypatch.setattr(glnet, "gl_gate", lambda U, V: (U * (U.sum(-2, keepdim=True) > 0), V))
    assert moved(GLNetEncoder(schema, GLNetConfig(d_model=32, equiv_dim=16, n_layers=2))) > 1e-3


def test_exported_encoder_rebuilds_from_its_folder(adapters, tmp_path):
    """With n_layers = 1 the hidden maps are empty (0, P, h, h) tensors: they save and load too."""
    from w2t.models.registry import load_pretrained

    enc = randomize_(GLNetEncoder(_schema(adapters), GLNetConfig(d_model=32, equiv_dim=16))).eval()
    loaded = load_pretrained(enc.save_pretrained(tmp_path / "enc", representation="raw"))
    assert loaded.hidden_u.shape == (0, sum(g.num_layers for g in enc.schema.groups), 16, 16)
    toks = collate_tokens([tokenize(raw_components(a), enc.schema)[0] for a in (adapters[0], adapters[2])])
    with torch.no_grad():
        torch.testing.assert_close(loaded(toks), enc(toks), rtol=0, atol=0)
