"""Pretrained encoders: export, reload anywhere, embed new adapters, search a library."""
from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from safetensors.torch import load_file, save_file

import w2t.train.run
from w2t.canon.canonical import CANON_VERSION
from adapters_factory import llama_adapter
from w2t.search.cli import embed_main, search_main
from w2t.data.collection import read_metadata
from w2t.data.datamodule import AdapterDataModule, DataInfo
from w2t.models import load_pretrained
from w2t.errors import SchemaError, W2TError
from w2t.train.lightning_module import AdapterModel
from w2t.search.index import EmbeddingIndex, load_embeddings, save_embeddings
from w2t.data.tokens import TokenSchema

ROOT = Path(__file__).resolve().parents[1]


def make_cfg(overrides: list[str], out_dir: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="module")
def tiny(tiny_collection) -> Path:
    return tiny_collection


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")  # one token cache for every run of this module


@pytest.fixture(scope="module")
def run_overrides(tiny, data_dir) -> list[str]:
    return ["experiment=classification", f"data.root={tiny}", f"paths.data_dir={data_dir}", "trainer.max_epochs=2",
            "callbacks.progress_bar=null", "++trainer.enable_progress_bar=false", "logger=csv"]


@pytest.fixture(scope="module")
def run_dir(run_overrides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "run"
    w2t.train.run.train(make_cfg(run_overrides, out))
    return out


@pytest.fixture(scope="module")
def paths(tiny) -> list[str]:
    return list(read_metadata(tiny)["abs_path"])


def test_export_reloads_in_a_fresh_process_bitwise(run_dir, tiny, data_dir, paths, tmp_path, capsys):
    encoder = load_pretrained(run_dir / "encoder")
    config = json.loads((run_dir / "encoder" / "config.json").read_text())
    assert config["canonicalization"] == {"version": CANON_VERSION, "sign_rule": True, "rtol": 1e-6,
                                           "representation": "canonical"} and config["w2t_version"]
    expected = encoder.embed(paths)
    assert expected.shape == (len(paths), encoder.dim) and torch.isfinite(expected).all()
    dm = AdapterDataModule(root=str(tiny), data_dir=str(data_dir), schema=encoder.schema.to_dict())
    dm.setup()
    trained_on = encoder.embed_tokens([dm.tokens(i) for i in range(len(paths))])
    assert torch.equal(trained_on, expected), "embed reads adapters exactly as training read them"

    out = tmp_path / "emb.safetensors"
    proc = subprocess.run([sys.executable, "embed.py", "--encoder", str(run_dir / "encoder"), "--collection", str(tiny),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    emb, ids, meta = load_embeddings(out)
    assert ids == list(read_metadata(tiny)["adapter_id"]) and meta["failed"] == {}
    assert torch.equal(emb, expected), "a fresh process reproduces the embeddings bit for bit"

    # the best checkpoint exports the same encoder the run saved
    exported = tmp_path / "from_ckpt"
    runpy.run_path(str(ROOT / "scripts" / "export_encoder.py"))["main"](
        ["--ckpt", str(run_dir / "checkpoints" / "best.ckpt"), "--out", str(exported)])
    a, b = load_file(exported / "model.safetensors"), load_file(run_dir / "encoder" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    capsys.readouterr()
    assert search_main(["--index", str(out), "--encoder", str(run_dir / "encoder"), "--query", paths[0], "-k", "3",
                        "--metadata", str(tiny), "--columns", "task,rank"]) == 0
    printed = capsys.readouterr().out
    assert ids[0] in printed and "1.0000" in printed and "task" in printed, printed

    # the same library as a Hugging Face dataset folder, with the collection's columns
    import datasets

    from w2t.search.hub import library_from_dataset

    hf = tmp_path / "library_hf"
    assert embed_main(["--encoder", str(run_dir / "encoder"), "--collection", str(tiny), "--out", str(hf),
                       "--format", "hf"]) == 0
    library = datasets.load_from_disk(str(hf))
    assert {"adapter_id", "embedding", "task", "accuracy"} <= set(library.column_names)
    emb_hf, ids_hf, meta_hf = library_from_dataset(library)
    assert ids_hf == ids and torch.equal(emb_hf, expected) and meta_hf["encoder_sha256"] == meta["encoder_sha256"]
    capsys.readouterr()
    assert search_main(["--index", str(hf), "--encoder", str(run_dir / "encoder"), "--query", paths[0], "-k", "3"]) == 0
    assert ids[0] in capsys.readouterr().out


class Snapshot(L.Callback):
    """Weights at the start and end of fit, and the modes the encoder and head trained in."""

    def on_fit_start(self, trainer, pl_module):
        self.start = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.modes: set[tuple[bool, bool]] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.add((pl_module.encoder.training, pl_module.task.training))

    def on_fit_end(self, trainer, pl_module):
        self.end = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_frozen_encoder_probe_trains_only_the_head(run_dir, run_overrides, tmp_path, monkeypatch):
    snap = Snapshot()
    callbacks = w2t.train.run._callbacks
    monkeypatch.setattr(w2t.train.run, "_callbacks", lambda cfg, model: [*callbacks(cfg, model), snap])
    out = tmp_path / "probe"
    w2t.train.run.train(make_cfg([*run_overrides, f"model.pretrained={run_dir / 'encoder'}", "model.freeze_encoder=true"], out))

    pretrained = load_file(run_dir / "encoder" / "model.safetensors")
    for name, value in pretrained.items():
        assert torch.equal(snap.start[f"encoder.{name}"], value), "fit starts from the pretrained weights"
        assert torch.equal(snap.end[f"encoder.{name}"], value), f"frozen encoder weight {name} changed"
    head = [k for k in snap.start if k.startswith("task.")]
    assert any(not torch.equal(snap.start[k], snap.end[k]) for k in head), "the head trained"
    assert snap.modes == {(False, True)}, "frozen encoder stays in eval mode (no dropout), the head trains"
    probe = load_file(out / "encoder" / "model.safetensors")
    assert all(torch.equal(probe[k], pretrained[k]) for k in pretrained)


def test_pretrained_needs_the_data_schema(run_dir):
    schema = TokenSchema.from_dict(json.loads((run_dir / "encoder" / "config.json").read_text())["schema"])
    other = TokenSchema(schema.groups[:2])
    info = asdict(DataInfo(schema=other.to_dict(), classes=["a", "b"]))
    with pytest.raises(W2TError, match="schema differs"):
        AdapterModel("classification", info, pretrained=str(run_dir / "encoder"))
    model = AdapterModel("classification", {**info, "schema": schema.to_dict()}, pretrained=str(run_dir / "encoder"))
    assert model.hparams.encoder == asdict(model.encoder.config)


def test_other_canonicalization_version_is_refused(run_dir, tmp_path):
    folder = shutil.copytree(run_dir / "encoder", tmp_path / "encoder")
    config = json.loads((folder / "config.json").read_text())
    config["canonicalization"]["version"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(W2TError, match=f"trained on canonicalization version {CANON_VERSION + 1}"):
        load_pretrained(folder)


def test_unknown_modules_are_masked_and_reported(run_dir, paths, tmp_path):
    encoder = load_pretrained(run_dir / "encoder")
    folder = shutil.copytree(paths[0], tmp_path / "extra")
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    a, b = next((tensors[k], tensors[k.replace("lora_A", "lora_B")]) for k in sorted(tensors) if "lora_A" in k)
    extra = "base_model.model.blocks.9.mlp.fc1"  # a layer the base model (and so the schema) lacks
    tensors |= {f"{extra}.lora_A.weight": torch.randn(a.shape[0], 48), f"{extra}.lora_B.weight": torch.randn(96, b.shape[1])}
    save_file(tensors, str(weights))
    with pytest.warns(UserWarning, match=r"extra: 1 of .* masked: mlp\.fc1\[layer 9, 96x48\]: unknown layer"):
        got = encoder.embed(folder)
    assert torch.equal(got, encoder.embed(paths[0])), "the unknown module changes nothing"


def test_incompatible_adapter_is_reported_and_the_rest_embed(run_dir, paths, tmp_path):
    encoder = load_pretrained(run_dir / "encoder")
    library = tmp_path / "library"
    good = [shutil.copytree(p, library / Path(p).name) for p in paths[:3]]
    llama_adapter(library / "llama")  # a real PEFT adapter of another base model
    with pytest.raises(SchemaError, match="none of its .* modules fits"):
        encoder.embed(library / "llama")

    result = encoder.embed_many([good[0], library / "llama", *good[1:]], ["g0", "llama", "g1", "g2"], batch_size=2)
    assert result.ids == ["g0", "g1", "g2"] and list(result.failed) == ["llama"]
    expected = encoder.embed(good)
    assert torch.allclose(result.embeddings, expected, atol=1e-6)

    out = tmp_path / "lib.safetensors"
    assert embed_main(["--encoder", str(run_dir / "encoder"), "--adapters", str(library), "--out", str(out)]) == 0
    emb, ids, meta = load_embeddings(out)
    assert ids == [p.name for p in good] and list(meta["failed"]) == ["llama"] and emb.shape == expected.shape


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_search_equals_brute_force(backend, tmp_path):
    if backend == "faiss":
        pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(0)
    library, queries = torch.randn(3000, 32, generator=gen), torch.randn(20, 32, generator=gen)
    ids = [f"id{i}" for i in range(len(library))]
    save_embeddings(tmp_path / "lib.safetensors", library, ids)
    index = EmbeddingIndex.from_file(tmp_path / "lib.safetensors", backend=backend, chunk_rows=700)
    scores, hits = index.search(queries, k=10)

    cos = torch.nn.functional.normalize(queries.double(), dim=1) @ torch.nn.functional.normalize(library.double(), dim=1).T
    top = cos.topk(10, dim=1)
    assert hits == [[ids[j] for j in row] for row in top.indices.tolist()]
    assert torch.allclose(scores.double(), top.values, atol=1e-5)
    assert index.search(queries[0], k=5000)[0].shape == (1, 3000), "k is capped at the library size"


def test_the_readme_python_snippet_runs_as_written(run_dir, tiny, tmp_path):
    """The README's snippet, verbatim, where the main command left `data/digits` and a run's `encoder/`."""
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits").symlink_to(tiny)
    shutil.copytree(run_dir / "encoder", tmp_path / "logs" / "retrieval" / "runs" / "2026-01-01_00-00-00_000000" / "encoder")
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "W2T_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[1] == f"{len(read_metadata(tiny))} adapters cached, 0 skipped"
    assert lines[2] == f"torch.Size([8, {load_pretrained(run_dir / 'encoder').dim}])"


def test_export_of_a_checkpoint_keeps_the_representation_it_was_trained_on(run_overrides, tmp_path):
    """A raw-factor encoder exported from its checkpoint must embed raw factors, as it was trained."""
    export = runpy.run_path(str(ROOT / "scripts" / "export_encoder.py"))["main"]
    out = tmp_path / "run"
    w2t.train.run.train(make_cfg([*run_overrides, "model=w2t_raw", "trainer.max_epochs=1"], out))
    export(["--ckpt", str(out / "checkpoints" / "best.ckpt"), "--out", str(tmp_path / "exported")])
    saved = json.loads((tmp_path / "exported" / "config.json").read_text())["canonicalization"]
    assert saved["representation"] == "raw"
    assert load_pretrained(tmp_path / "exported").canon.representation == "raw"



def test_a_retrieval_runs_encoder_embeds_into_the_space_its_test_mrr_was_measured_in(tiny, data_dir, tmp_path):
    """A retrieval run exports its head and blend with the encoder: `w2t-embed` in a fresh process gives the outputs
    the run tested, and ranking the test split by their cosine gives the run's test MRR. So does an encoder exported
    from a checkpoint whose blend mixes both (λ = ½); the encoder alone does not."""
    from w2t.train.run import setup_run

    cfg = make_cfg(["experiment=retrieval", f"data.root={tiny}", f"paths.data_dir={data_dir}", "trainer.max_epochs=2",
                    "callbacks.progress_bar=null", "++trainer.enable_progress_bar=false", "logger=csv"], tmp_path / "run")
    w2t.train.run.train(cfg)
    run = tmp_path / "run"
    dm, _ = setup_run(cfg)
    test = dm.whole_split("test")
    rows = test["index"].tolist()
    library = tmp_path / "library"
    library.mkdir()
    for i, row in enumerate(rows):  # the test split's adapters, named so that the CLI keeps their order
        (library / f"{i:04d}").symlink_to(Path(dm.table.abs_path[row]).resolve())
    out = tmp_path / "emb.safetensors"
    proc = subprocess.run([sys.executable, "embed.py", "--encoder", str(run / "encoder"), "--adapters", str(library),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    emb, ids, _ = load_embeddings(out)
    assert ids == [f"{i:04d}" for i in range(len(rows))]
    model = AdapterModel.load_from_checkpoint(run / "checkpoints" / "best.ckpt", weights_only=True).eval()
    with torch.no_grad():
        assert torch.allclose(emb, model(test["tokens"]), atol=1e-5)
    assert model.task.evaluate(emb, test)["mrr"] == pytest.approx(json.loads((run / "metrics.json").read_text())["test/mrr"])

    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["state_dict"]["task.blend_weight"].fill_(0.5)  # the head and the dw read both count
    torch.save(ckpt, tmp_path / "half.ckpt")
    runpy.run_path(str(ROOT / "scripts" / "export_encoder.py"))["main"](
        ["--ckpt", str(tmp_path / "half.ckpt"), "--out", str(tmp_path / "half")])
    encoder = load_pretrained(tmp_path / "half")
    model = AdapterModel.load_from_checkpoint(tmp_path / "half.ckpt", weights_only=True).eval()
    items = [dm.tokens(r) for r in rows]
    with torch.no_grad():
        assert torch.allclose(encoder.embed_tokens(items), model(test["tokens"]), atol=1e-5)
    encoder.output = None  # the broken variant: the encoder's own embedding, which was never scored
    alone = encoder.embed_tokens(items)
    assert alone.shape != emb.shape or not torch.allclose(alone, emb, atol=1e-5)
