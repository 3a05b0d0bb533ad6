"""Every `model=` choice trains through the same pipeline, and the invariance claim on trained models:
reparametrizing test adapters (B·G, G⁻¹·A) leaves the invariant models' predictions unchanged and
changes the raw-factor models' ones (issue: baselines and ablations)."""
from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from test_train import CONTRACT_KEYS, fast, make_cfg
from w2t.io.formats import load_adapter
from w2t.train.spectral import SpectralModel
from w2t.canon.representation import adapter_components
from w2t.canon.reparam import reparametrize
from w2t.train.run import setup_run, train
from w2t.data.tokens import collate_tokens, tokenize

MODELS = ("w2t", "w2t_paper", "w2t_raw", "flat_mlp", "glnet", "sketch", "spectral")
INVARIANT = ("w2t", "w2t_paper", "glnet", "sketch", "spectral")  # w2t_paper: through the canonical form


@pytest.mark.parametrize("model", MODELS)
def test_every_model_trains_and_writes_the_metrics_contract(model, tiny_collection, tmp_path):
    train(make_cfg(["experiment=classification", f"model={model}", *fast(tiny_collection, tmp_path)], tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in CONTRACT_KEYS["classification"]:
        assert math.isfinite(metrics[key]), key
    assert metrics["params"] > 0 and metrics["train_adapters_per_s"] > 0


@pytest.mark.parametrize("experiment", ("performance", "retrieval"))
def test_spectral_fits_every_task(experiment, tiny_collection, tmp_path):
    train(make_cfg([f"experiment={experiment}", "model=spectral", *fast(tiny_collection, tmp_path)], tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in CONTRACT_KEYS[experiment])


@pytest.fixture(scope="module")
def trained(tiny_collection, tmp_path_factory):
    """Each model fitted for a few epochs on the tiny collection (classification)."""
    out = {}
    for name in MODELS:
        tmp = tmp_path_factory.mktemp(name)
        cfg = make_cfg(["experiment=classification", f"model={name}", *fast(tiny_collection, tmp)], tmp)
        L.seed_everything(0)
        dm, model = setup_run(cfg)
        if isinstance(model, SpectralModel):
            model.fit(dm.whole_split("train"))
        else:
            L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False).fit(model, datamodule=dm)
            model.eval()
        out[name] = (dm, model)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_trained_predictions_under_reparametrization(name, trained):
    dm, model = trained[name]
    rows = dm.split_rows["test"]
    adapters = [load_adapter(dm.table.abs_path[int(r)]) for r in rows]

    def predict(ads):
        toks = [tokenize(adapter_components(a, dm.hp.representation, sign_rule=dm.hp.sign_rule), dm.schema)[0]
                for a in ads]
        with torch.no_grad():
            return model(collate_tokens(toks)).double()

    before = predict(adapters)
    after = predict([reparametrize(a, "gl", seed=i) for i, a in enumerate(adapters)])  # κ(G) = 10³, float32
    change = (after - before).abs().max().item()
    if name in INVARIANT:
        assert change < 1e-4, f"{name}: predictions moved by {change:.2e} under (B·G, G⁻¹·A)"
    else:
        assert change > 1e-2 * before.abs().max().item(), f"{name}: raw-factor model unexpectedly invariant ({change:.2e})"


def test_paper_model_reads_one_sequence_of_rank_tokens_with_either_projection(tiny_collection, tmp_path):
    """`projections=position` gives each (type, layer) its own Pᵤ, Pᵥ, as the reference code does."""
    from w2t.data.datamodule import AdapterDataModule
    from w2t.models.w2t_paper import PaperConfig, W2TPaperEncoder

    dm = AdapterDataModule(root=str(tiny_collection), cache_dir=str(tmp_path))
    dm.setup()
    batch = dm.whole_split("test")["tokens"]
    sizes = {}
    for projections in ("type", "position"):
        torch.manual_seed(0)
        enc = W2TPaperEncoder(dm.schema, PaperConfig(d_model=32, depth=1, projections=projections)).eval()
        with torch.no_grad():
            z = enc(batch)
        assert z.shape == (len(dm.split_rows["test"]), 32) and torch.isfinite(z).all()
        sizes[projections] = sum(p.numel() for p in enc.proj_u.parameters())
    assert sizes["position"] == sizes["type"] * dm.schema.groups[0].num_layers
    with pytest.raises(ValueError, match="projections"):
        PaperConfig(projections="module")


@pytest.mark.parametrize("fit", (True, False))
def test_w2t_starts_from_the_training_splits_principal_directions(fit, tiny_collection, tmp_path):
    """Training starts with Pᵤ, Pᵥ and the retrieval read's projections at the principal directions of the
    training split (`fit_projections`); with the option off, Pᵤ, Pᵥ keep their random start. lr = 0: what the
    first step sees is what on_fit_start put there."""
    from w2t.models.features import principal_projections

    cfg = make_cfg(["experiment=retrieval", "model=w2t", "model.lr=0", f"model.encoder.fit_projections={fit}",
                    *fast(tiny_collection, tmp_path)], tmp_path)
    L.seed_everything(0)
    dm, model = setup_run(cfg)
    random_start = [p.detach().clone() for p in model.encoder.P_u]
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0).fit(model, datamodule=dm)
    principal = principal_projections(dm.whole_split("train")["tokens"], dm.schema, 48)
    for i, (Qu, Qv) in enumerate(principal):
        assert torch.allclose(model.task.prior.projections()[i][0], Qu.float(), atol=1e-6)  # the read: always fitted
        want = Qu.float() if fit else random_start[i]
        assert torch.allclose(model.encoder.P_u[i].detach(), want, atol=1e-6)
        assert not torch.allclose(model.encoder.P_u[i].detach(), random_start[i] if fit else Qu.float(), atol=1e-3)
        if fit:
            assert torch.allclose(model.encoder.P_v[i].detach(), Qv.float(), atol=1e-6)
