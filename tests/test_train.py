"""Hydra configs and the training pipeline, in-process on the tiny collection (docs/style.md)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from w2t.data.datamodule import AdapterDataModule
from w2t.errors import CollectionError
from w2t.train.lightning_module import AdapterModel
from w2t.train.run import evaluate, train

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("classification", "performance", "retrieval")
CONTRACT_KEYS = {
    "classification": ["test/acc", "test/macro_f1", "test/auroc", "test/baseline_sketch/acc",
                       "test/baseline_dw/acc", "val/acc", "val/baseline_sketch/acc"],
    "performance": ["test/r2", "test/spearman", "test/kendall", "test/mae", "test/baseline_sketch/spearman",
                    "test/baseline_dw/spearman", "val/spearman", "val/baseline_sketch/spearman"],
    "retrieval": ["test/mrr", "test/hit@1", "test/hit@10", "test/ndcg@10", "test/map",
                  "test/baseline_raw/mrr", "test/baseline_sketch/mrr", "test/baseline_dw/mrr", "val/mrr", "val/baseline_sketch/mrr"],
}


def make_cfg(overrides: list[str], out_dir: Path, config_name: str = "train") -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        del cfg["hydra"]
    return cfg


def fast(tiny_collection, tmp_path, *extra):
    return [f"data.root={tiny_collection}", f"paths.data_dir={tmp_path / 'data'}", "trainer.max_epochs=3",
            "callbacks.progress_bar=null", "trainer.enable_progress_bar=false", *extra]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose(experiment, tmp_path):
    cfg = make_cfg([f"experiment={experiment}"], tmp_path)
    assert cfg.task.name == experiment
    assert cfg.data._target_ == "w2t.data.datamodule.AdapterDataModule"
    {"classification": lambda: cfg.data.label_column, "performance": lambda: cfg.data.target_column,
     "retrieval": lambda: cfg.data.group_column}[experiment]()


def test_open_set_experiment_splits_by_group_and_keeps_delta_w_neighbourhoods(tiny_collection, tmp_path):
    cfg = make_cfg(["experiment=retrieval_open"], tmp_path)
    assert cfg.task.name == "retrieval" and cfg.data.split == "group" and cfg.task.head.neighbourhood_weight > 0
    out = tmp_path / "run"
    train(make_cfg(["experiment=retrieval_open", *fast(tiny_collection, tmp_path)], out))
    splits = json.loads((out / "splits.json").read_text())
    groups = dict(zip(*(pd.read_csv(tiny_collection / "metadata.csv")[c].astype(str) for c in ("adapter_id", "task"))))
    assert not {groups[a] for a in splits["train"]} & {groups[a] for a in splits["test"]}, "a test task was trained on"
    assert math.isfinite(json.loads((out / "metrics.json").read_text())["test/mrr"])


def test_every_compare_model_and_ablation_composes_for_the_experiments_it_runs_in(tmp_path):
    """`scripts/compare.py --ablations` passes each ablation's overrides to train.py: a head option
    of one task (retrieval's `neighbourhood_weight`) must not be sent to the others, where Hydra rejects it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare", ROOT / "scripts" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    names = compare.MODELS + list(compare.ABLATIONS)
    runs = compare.models_per_experiment(list(EXPERIMENTS), names)
    assert "w2t+neighbourhood" in runs["retrieval"] and "w2t+neighbourhood" not in runs["classification"]
    for experiment, models in runs.items():
        for name in models:
            cfg = make_cfg([f"experiment={experiment}", *compare.ABLATIONS.get(name, [f"model={name}"])], tmp_path)
            assert cfg.task.name == experiment
    with pytest.raises(Exception, match="neighbourhood_weight"):
        make_cfg(["experiment=classification", *compare.ABLATIONS["w2t+neighbourhood"]], tmp_path)


@pytest.mark.parametrize("group,choice", [("logger", "csv"), ("logger", "wandb"), ("callbacks", "default"),
                                          ("trainer", "cpu"), ("trainer", "ddp"), ("data", "digits")])
def test_config_groups_instantiate(group, choice, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = make_cfg([f"{group}={choice}"], tmp_path)
    node = cfg[group]
    if group in ("logger", "callbacks"):
        objs = [instantiate(v, **({"monitor": "val/x"} if "monitor" in v and v.monitor is None else {}))
                for v in node.values() if v is not None]
        assert objs
        if choice == "wandb":
            assert cfg.logger.wandb.mode == "offline"
    elif group == "trainer" and choice == "ddp":
        assert cfg.trainer.strategy == "ddp"  # instantiating it would start processes; test_ddp covers it
    else:
        assert instantiate(node) is not None


def test_other_trainer_configs_compose(tmp_path):
    for choice in ("gpu", "ddp"):
        assert make_cfg([f"trainer={choice}"], tmp_path).trainer._target_ == "lightning.Trainer"
    for name in ("fast", "default"):
        assert make_cfg([f"debug={name}"], tmp_path).trainer.max_epochs <= 2


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fit_and_test_each_experiment(experiment, tiny_collection, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg([f"experiment={experiment}", *fast(tiny_collection, tmp_path)], out)
    value = train(cfg)
    assert value is not None and math.isfinite(value)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in CONTRACT_KEYS[experiment]:
        assert key in metrics and math.isfinite(metrics[key]), key
    assert all(isinstance(v, float) for v in metrics.values())
    splits = json.loads((out / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["test"])
    assert (out / "config.yaml").exists() and (out / "checkpoints" / "best.ckpt").exists()
    assert list(out.glob("*.png")), "a plot is saved in the run directory"
    assert (out / "csv" / "metrics.csv").exists()


def test_checkpoint_loads_weights_only_and_resumes(tiny_collection, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(["experiment=classification", *fast(tiny_collection, tmp_path, "trainer.max_epochs=2")], out)
    train(cfg)
    last = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)  # no pickled OmegaConf / partial inside
    assert ckpt["epoch"] == 1
    model = AdapterModel.load_from_checkpoint(last, weights_only=True)
    assert model.hparams.task == "classification"

    resumed = tmp_path / "resumed"
    cfg = make_cfg(["experiment=classification", *fast(tiny_collection, tmp_path, "trainer.max_epochs=4"),
                    f"ckpt_path={last}"], resumed)
    train(cfg)
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 3
    logged = pd.read_csv(resumed / "csv" / "metrics.csv")
    assert set(logged.dropna(subset=["val/acc"])["epoch"].astype(int)) == {2, 3}, "resumed at epoch 2, not from scratch"

    evaluated = tmp_path / "eval"
    cfg = make_cfg(["experiment=classification", f"data.root={tiny_collection}", f"paths.data_dir={tmp_path / 'data'}",
                    f"ckpt_path={resumed / 'checkpoints' / 'best.ckpt'}"], evaluated, config_name="eval")
    metrics = evaluate(cfg)
    assert "test/acc" in json.loads((evaluated / "metrics.json").read_text())
    assert math.isfinite(metrics["test/macro_f1"])


def test_eval_encodes_labels_in_the_models_class_order(tiny_collection, tmp_path):
    kw = dict(root=str(tiny_collection), label_column="transform", cache_dir=str(tmp_path / "cache"))
    dm = AdapterDataModule(**kw)
    dm.setup()
    classes = dm.info.classes[::-1]  # as a model trained on another collection might order them
    other = AdapterDataModule(**kw, classes=classes)
    other.setup()
    assert other.info.classes == classes
    assert [classes[i] for i in other.targets["label"]] == other.table["transform"].astype(str).tolist()
    with pytest.raises(CollectionError, match="not trained on"):
        AdapterDataModule(**kw, classes=classes[1:]).setup()


def test_wandb_offline_run(tiny_collection, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = make_cfg(["experiment=classification", "logger=wandb", *fast(tiny_collection, tmp_path, "trainer.max_epochs=1")], out)
    train(cfg)
    assert list((out / "wandb").glob("offline-run-*")), "wandb wrote an offline run"
    assert (out / "csv" / "metrics.csv").exists(), "CSV logging stays on beside wandb"


@pytest.mark.slow
def test_readme_main_command_subprocess(tiny_collection, tmp_path):
    env = {**os.environ, "W2T_DATA_DIR": str(tmp_path / "data"), "W2T_PROGRESS": "0"}
    cmd = [sys.executable, "train.py", "experiment=retrieval", f"data.root={tiny_collection}", "trainer.max_epochs=2",
           f"paths.log_dir={tmp_path / 'logs'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline: sketch" in proc.stdout and "mrr" in proc.stdout
    runs = list((tmp_path / "logs" / "retrieval" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "metrics.json").exists()


def test_multilabel_classification_end_to_end(tiny_collection, tmp_path):
    """`data.label_columns`: one sigmoid per 0/1 column, monitored by AUROC, and eval.py reads it back."""
    labels = "digit_1,digit_3,digit_6,digit_8"  # digits_tiny's subsets (even, low) leave the other columns constant
    out = tmp_path / "run"
    cfg = make_cfg(["experiment=classification", "data.label_column=null", f"data.label_columns=[{labels}]",
                    "data.split=random", *fast(tiny_collection, tmp_path)], out)
    train(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test/acc", "test/macro_f1", "test/auroc", "val/auroc", "test/baseline_dw/auroc"):
        assert math.isfinite(metrics[key]), key
    model = AdapterModel.load_from_checkpoint(out / "checkpoints" / "best.ckpt", weights_only=True)
    assert model.task.multilabel and model.task.n == 4 and model.monitor == ("val/auroc", "max")
    assert (out / "per_label_auroc.png").exists()
    evaluated = tmp_path / "eval"
    cfg = make_cfg(["experiment=classification", f"data.root={tiny_collection}", f"paths.data_dir={tmp_path / 'data'}",
                    "data.label_column=null", f"data.label_columns=[{labels}]", "data.split=random",
                    f"ckpt_path={out / 'checkpoints' / 'best.ckpt'}"], evaluated, config_name="eval")
    assert evaluate(cfg)["test/auroc"] == pytest.approx(metrics["test/auroc"])


@pytest.mark.parametrize("experiment,key", [("retrieval", "test/mrr"), ("performance", "test/spearman")])
def test_eval_scores_a_checkpoint_as_training_tested_it(experiment, key, tiny_collection, tmp_path):
    out = tmp_path / "run"
    train(make_cfg([f"experiment={experiment}", *fast(tiny_collection, tmp_path)], out))
    trained = json.loads((out / "metrics.json").read_text())
    evaluated = tmp_path / "eval"
    cfg = make_cfg([f"experiment={experiment}", f"data.root={tiny_collection}", f"paths.data_dir={tmp_path / 'data'}",
                    f"ckpt_path={out / 'checkpoints' / 'best.ckpt'}"], evaluated, config_name="eval")
    metrics = evaluate(cfg)
    assert json.loads((evaluated / "metrics.json").read_text()) == metrics
    for k in CONTRACT_KEYS[experiment]:
        if k.startswith("test/"):
            assert metrics[k] == pytest.approx(trained[k], abs=1e-6), k  # same checkpoint, same split, same scores


def test_a_checkpoint_fine_tuned_from_an_exported_encoder_needs_nothing_else(tiny_collection, tmp_path):
    first = tmp_path / "first"
    train(make_cfg(["experiment=classification", *fast(tiny_collection, tmp_path, "trainer.max_epochs=1")], first))
    exported = tmp_path / "exported"
    (first / "encoder").rename(exported)
    tuned = tmp_path / "tuned"
    train(make_cfg(["experiment=classification", f"model.pretrained={exported}",
                    *fast(tiny_collection, tmp_path, "trainer.max_epochs=1")], tuned))
    scores = json.loads((tuned / "metrics.json").read_text())
    for f in exported.iterdir():  # the folder it started from is gone
        f.unlink()
    exported.rmdir()
    model = AdapterModel.load_from_checkpoint(tuned / "checkpoints" / "best.ckpt", weights_only=True)
    assert model.hparams.pretrained is None
    evaluated = tmp_path / "eval"
    cfg = make_cfg(["experiment=classification", f"data.root={tiny_collection}", f"paths.data_dir={tmp_path / 'data'}",
                    f"ckpt_path={tuned / 'checkpoints' / 'best.ckpt'}"], evaluated, config_name="eval")
    assert evaluate(cfg)["test/acc"] == pytest.approx(scores["test/acc"])


def test_a_pickle_collection_trains_and_scores_its_raw_baseline_when_allowed(tiny_collection, tmp_path):
    """Legacy `.bin` adapters: read with weights_only=True behind data.allow_pickle, baselines included."""
    from safetensors.torch import load_file

    root = tmp_path / "bin_collection"
    shutil.copytree(tiny_collection, root)
    for weights in root.rglob("adapter_model.safetensors"):
        torch.save(load_file(weights), weights.with_suffix(".bin"))
        weights.unlink()
    out = tmp_path / "run"
    train(make_cfg(["experiment=retrieval", "data.allow_pickle=true",
                    *fast(root, tmp_path, "trainer.max_epochs=1")], out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["test/baseline_raw/mrr"]) and math.isfinite(metrics["test/mrr"])
