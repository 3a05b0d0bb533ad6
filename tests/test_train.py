"""Hydra configs and the training pipeline, in-process on the tiny collection (docs/style.md)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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
from w2t.tasks import TASKS
from w2t.tasks.base import BLEND_GRID, Projections
from w2t.train.lightning_module import AdapterModel
from w2t.train.run import evaluate, train

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("classification", "performance", "retrieval")
CONTRACT_KEYS = {
    "classification": ["test/acc", "test/macro_f1", "test/auroc", "test/baseline_sketch/acc",
                       "test/baseline_spectrum/acc", "test/baseline_dw+spectrum/acc",
                       "test/baseline_dw/acc", "test/baseline_dw_fit/acc", "test/baseline_dw_fit+spectrum/acc",
                       "val/acc", "val/baseline_sketch/acc"],
    "performance": ["test/r2", "test/spearman", "test/kendall", "test/mae", "test/baseline_sketch/spearman",
                    "test/baseline_dw/spearman", "test/baseline_dw_fit+spectrum/spearman", "val/spearman",
                    "val/baseline_sketch/spearman"],
    "retrieval": ["test/mrr", "test/hit@1", "test/hit@10", "test/ndcg@10", "test/map",
                  "test/baseline_raw/mrr", "test/baseline_sketch/mrr", "test/baseline_dw/mrr", "test/baseline_dw_white/mrr",
                  "test/baseline_dw_fit/mrr", "test/baseline_dw_exact/mrr",
                  "val/mrr", "val/baseline_sketch/mrr"],
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
    compare = runpy_module("scripts/compare.py")
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
    primary = {"classification": "acc", "performance": "spearman", "retrieval": "mrr"}[experiment]
    for kind in ("gl", "svd", "pad"):  # canonical tokens: the same factorization-free read of the same updates
        assert abs(metrics[f"test_reparam/{kind}/{primary}"] - metrics[f"test/{primary}"]) <= 1e-3, kind
    assert f"test_reparam/{primary}" in metrics and f"test_reparam/bf16/{primary}" in metrics
    # per-item values give back every test metric they stand for: the model's and each simple read's
    task = TASKS[experiment]
    with np.load(out / "test_items.npz") as f:
        items = {k: f[k] for k in f.files}
    keys = {"model": f"test/{primary}", "unblended": f"test_unblended/{primary}"}
    for source in ["model", "unblended", *(f"baseline_{b}" for b in task.baselines)]:
        values = {k.split("/", 1)[1]: v for k, v in items.items() if k.split("/", 1)[0] == source}
        assert task.primary_of(values) == pytest.approx(metrics[keys.get(source, f"test/{source}/{primary}")],
                                                        abs=1e-6), source
    # the blend's read weight, chosen on validation, is stored in the checkpoint that eval.py scores
    state = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert metrics["blend_weight"] in BLEND_GRID and float(state["task.blend_weight"]) == pytest.approx(metrics["blend_weight"])
    splits = json.loads((out / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["test"])
    assert (out / "config.yaml").exists() and (out / "checkpoints" / "best.ckpt").exists()
    assert list(out.glob("*.png")), "a plot is saved in the run directory"
    assert (out / "csv" / "metrics.csv").exists()


def test_checkpoint_loads_weights_only_and_resumes(tiny_collection, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = make_cfg(["experiment=classification", *fast(tiny_collection, tmp_path, "trainer.max_epochs=2")], out)
    train(cfg)
    last = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)  # no pickled OmegaConf / partial inside
    assert ckpt["epoch"] == 1
    model = AdapterModel.load_from_checkpoint(last, weights_only=True)
    assert model.hparams.task == "classification"

    # a checkpoint from before the fixed read kept its projections loads, reading through the fixed ones
    old = {**ckpt, "state_dict": {k: v for k, v in ckpt["state_dict"].items() if "prior_projections" not in k}}
    torch.save(old, tmp_path / "old.ckpt")
    reloaded = AdapterModel.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    fixed = Projections(reloaded.task.schema).state_dict()
    assert all(torch.equal(v, fixed[k]) for k, v in reloaded.task.prior_projections.state_dict().items())
    monkeypatch.setattr(AdapterModel, "_fill_fixed_projections", lambda self, state: None)  # the broken variant
    with pytest.raises(RuntimeError, match="prior_projections"):
        AdapterModel.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    monkeypatch.undo()

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
    out = proc.stdout + proc.stderr  # a quiet console: each event once, one results table, no third-party noise
    events = [line.split("] - ", 1)[1] for line in out.splitlines() if "] - " in line]
    assert events and len(events) == len(set(events)), events
    assert not [line for line in out.splitlines() if line.startswith("INFO:")], "Lightning's own handler printed too"
    assert "Test metric" not in out and "Tip:" not in out and "Warning" not in out, out[-3000:]
    runs = list((tmp_path / "logs" / "retrieval" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "metrics.json").exists()


def test_multilabel_classification_end_to_end(tiny_collection, tmp_path):
    """`data.label_columns`: one sigmoid per 0/1 column, monitored by AUROC, and eval.py reads it back."""
    labels = "digit_0,digit_1,digit_3,digit_5,digit_6,digit_8"  # digits_tiny: digit_0 is always 1, digit_5 always 0
    out = tmp_path / "run"
    cfg = make_cfg(["experiment=classification", "data.label_column=null", f"data.label_columns=[{labels}]",
                    "data.split=random", *fast(tiny_collection, tmp_path)], out)
    train(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test/acc", "test/macro_f1", "test/auroc", "val/auroc", "test/baseline_dw/auroc"):
        assert math.isfinite(metrics[key]), key
    model = AdapterModel.load_from_checkpoint(out / "checkpoints" / "best.ckpt", weights_only=True)
    assert model.task.multilabel and model.task.n == 6 and model.monitor == ("val/auroc", "max")
    assert (out / "per_label_auroc.png").exists()
    evaluated = tmp_path / "eval"
    cfg = make_cfg([f"paths.data_dir={tmp_path / 'data'}", f"ckpt_path={out / 'checkpoints' / 'best.ckpt'}"],
                   evaluated, config_name="eval")
    assert evaluate(cfg)["test/auroc"] == pytest.approx(metrics["test/auroc"])


@pytest.mark.parametrize("experiment,key", [("retrieval", "test/mrr"), ("performance", "test/spearman")])
def test_eval_scores_a_checkpoint_as_training_tested_it_without_being_told_the_experiment(experiment, key,
                                                                                         tiny_collection, tmp_path):
    out = tmp_path / "run"
    train(make_cfg([f"experiment={experiment}", *fast(tiny_collection, tmp_path)], out))
    trained = json.loads((out / "metrics.json").read_text())
    evaluated = tmp_path / "eval"
    cfg = make_cfg([f"paths.data_dir={tmp_path / 'data'}", f"ckpt_path={out / 'checkpoints' / 'best.ckpt'}"],
                   evaluated, config_name="eval")  # the task, head, columns and collection come from the checkpoint
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


TIMING = {"data_seconds", "fit_seconds", "train_adapters_per_s"}


@pytest.mark.slow
def test_a_killed_and_resumed_run_tests_the_same_checkpoint_as_an_uninterrupted_one(tiny_collection, tmp_path):
    """A real SIGKILL during epoch 1; `ckpt_path=<run>/checkpoints/last.ckpt` continues in the same run directory
    with its checkpoints' best score, early stopping and random streams, and ends exactly as the uninterrupted run."""
    common = ["experiment=retrieval", f"data.root={tiny_collection}", f"paths.data_dir={tmp_path / 'data'}",
              "trainer.max_epochs=8", "callbacks.progress_bar=null",
              "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path / 'logs'}"]
    env = {**os.environ, "W2T_PROGRESS": "0", "PYTHONPATH": str(ROOT / "tests")}

    def run(*extra):
        return subprocess.run([sys.executable, "train.py", *common, *extra], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run(f"hydra.run.dir={whole}").returncode == 0
    proc = run(f"hydra.run.dir={killed}", "+callbacks.kill._target_=killer.KillAt", "+callbacks.kill.epoch=1")
    assert proc.returncode == -9 and not (killed / "metrics.json").exists()
    proc = run(f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}")  # no run directory given: the checkpoint's
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "logs").exists(), "the resumed run wrote somewhere else"
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, killed))
    assert {k: v for k, v in b.items() if k not in TIMING} == {k: v for k, v in a.items() if k not in TIMING}
    best = [torch.load(d / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] for d in (whole, killed)]
    assert best[0] == best[1] and best[0] >= 1, "the best checkpoint is one trained after the resume (epoch ≥ 1)"
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    logged = pd.read_csv(killed / "csv" / "metrics.csv").dropna(subset=["val/mrr"])
    assert logged["epoch"].astype(int).tolist() == list(range(int(a["epochs"]))), "every epoch logged once, in place"
    trained_here = b["train_adapters_per_s"] * b["fit_seconds"] / b["train_adapters"]
    assert trained_here == pytest.approx(a["epochs"] - 1), "throughput counts only the epochs after the resume"


def _train_cli(*args, cwd=ROOT, tmp_path):
    env = {**os.environ, "W2T_PROGRESS": "0"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "train.py", f"paths.log_dir={tmp_path / 'logs'}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no metadata", "unknown column", "strict", "pickle", "no root"])
def test_a_bad_input_is_one_line_exit_code_2_and_recorded_in_the_run(case, tiny_collection, tmp_path):
    from safetensors.torch import load_file

    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(tiny_collection, broken)
    (broken / "adapters" / "a0000" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_collection, pickled)
    weights = pickled / "adapters" / "a0000" / "adapter_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    args, expected = {
        "no metadata": ([f"data.root={empty}"], "no metadata file"),
        "unknown column": ([f"data.root={tiny_collection}", "data.label_column=colour"], "column 'colour' is not in"),
        "strict": ([f"data.root={broken}", "data.strict=true"], "not a readable safetensors file"),
        "pickle": ([f"data.root={pickled}", "data.strict=true"], "add data.allow_pickle=true"),
        "no root": (["data=collection"], "no collection given: pass data.root=DIR"),  # not the default collection
    }[case]
    proc = _train_cli("experiment=classification", f"paths.data_dir={tmp_path / 'data'}", *args, tmp_path=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and expected in errors[0], out[-3000:]
    (log,) = (tmp_path / "logs" / "classification" / "runs").glob("*/train.log")
    assert expected in log.read_text()


def test_baselines_are_logged_beside_the_model_and_checkpoints_can_be_left_out(tiny_collection, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(["experiment=classification", "save_checkpoints=false",
                    *fast(tiny_collection, tmp_path, "trainer.max_epochs=1")], out))
    assert not (out / "checkpoints").exists() and (out / "encoder" / "model.safetensors").exists()
    logged = pd.read_csv(out / "csv" / "metrics.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test/baseline_dw/acc", "val/baseline_sketch/acc"):
        assert logged[key].dropna().tolist() == [pytest.approx(metrics[key])], key


def test_each_task_plot_names_its_metric_and_reads_at_a_glance(tiny_collection, tmp_path):
    import matplotlib.pyplot as plt

    from w2t.tasks import TASKS

    dm = AdapterDataModule(root=str(tiny_collection), label_column="transform", target_column="accuracy",
                           group_column="task", role_column="role", eval_gallery=True, cache_dir=str(tmp_path))
    dm.setup()
    split = dm.whole_split("test")
    n = len(split["index"])
    metrics = {"test/acc": 0.5, "test/spearman": 0.25, "test/r2": -0.125, "test/mrr": 0.75}
    for name, out in (("classification", torch.randn(n, len(dm.info.classes))), ("performance", torch.randn(n)),
                      ("retrieval", torch.randn(n, 8))):
        fig = plt.figure()
        TASKS[name](8, dm.info).plot(fig, out, split, dm.info, metrics)
        titles = " ".join([ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""])
        assert {"classification": "accuracy 0.500", "performance": "Spearman 0.250, R² -0.125",
                "retrieval": "MRR 0.750"}[name] in titles, titles
        if name == "classification":  # rows normalized: every true class's row sums to 1
            rows = fig.axes[0].images[0].get_array()
            assert np.allclose(rows.sum(1)[rows.sum(1) > 0], 1.0)
        if name == "retrieval":
            assert [ax.get_title() for ax in fig.axes] == ["PCA", "t-SNE"] and fig.axes[1].get_legend() is not None
        plt.close(fig)


def test_compare_report_marks_the_best_and_draws_the_best_baseline(tmp_path):
    import matplotlib.image

    compare = runpy_module("scripts/compare.py")
    runs = [{"test/acc": a, "test/macro_f1": a, "test/auroc": a, "test/baseline_sketch/acc": 0.3,
             "test/baseline_sketch/macro_f1": 0.3, "test/baseline_sketch/auroc": 0.3, "test/baseline_dw/acc": b,
             "test/baseline_dw/macro_f1": b, "test/baseline_dw/auroc": b, "params": 10.0, "train_adapters_per_s": 5.0}
            for a, b in ((0.6, 0.7), (0.62, 0.74))]
    text = compare.report({"classification": {"w2t": runs}}, tmp_path, [0, 1], "header")
    assert "| baseline: dw | **0.7200 ± 0.0283** |" in text and "| w2t | 0.6100 ± 0.0141 |" in text
    assert matplotlib.image.imread(tmp_path / "compare.png").shape[0] > 100
    assert compare._plot({"classification": {"w2t": runs}}, tmp_path / "again.png") == {"classification": ("dw", 0.72)}
    state = compare.git_state()  # recorded in compare.json
    assert len(state["commit"]) == 40 and isinstance(state["dirty"], bool)


def test_compare_update_keeps_the_runs_it_does_not_make_with_the_commit_that_made_them(tmp_path):
    compare = runpy_module("scripts/compare.py")
    old_git, new_git = {"commit": "a" * 40, "dirty": False}, {"commit": "b" * 40, "dirty": False}
    run = lambda acc, baselines: {"test/acc": acc, "test/macro_f1": acc, "test/auroc": acc, "params": 1.0,  # noqa: E731
                                  "train_adapters_per_s": 1.0} | {f"test/baseline_{b}/{k}": 0.5 for b in baselines
                                                                    for k in ("acc", "macro_f1", "auroc")}
    common = {"seeds": [0], "overrides": ["data=x"], "extra": {}}
    old = common | {"git": old_git, "runs": {"classification/w2t/seed_0": run(0.6, ["dw"]),
                                            "classification/glnet/seed_0": run(0.7, ["dw"])},
                    "vs_best_baseline": {"classification": {"w2t": {"diff": 0.1}, "glnet": {"diff": 0.2}}}}
    new = common | {"git": new_git, "runs": {"classification/w2t/seed_0": run(0.8, ["dw", "spectrum"])},
                    "vs_best_baseline": {"classification": {"w2t": {"diff": 0.3}}},
                    "sources": {"classification/w2t": new_git}}
    got = compare.merged(old, new)
    assert got["runs"]["classification/w2t/seed_0"]["test/acc"] == 0.8  # replaced
    assert got["runs"]["classification/glnet/seed_0"]["test/acc"] == 0.7  # kept, with the commit that made it
    assert got["sources"] == {"classification/w2t": new_git, "classification/glnet": old_git}
    assert got["vs_best_baseline"]["classification"] == {"w2t": {"diff": 0.3}, "glnet": {"diff": 0.2}}
    assert compare.trained_models(got) == {"classification": ["w2t", "glnet"]}
    results = {"classification": {m: [got["runs"][f"classification/{m}/seed_0"]] for m in ("glnet", "w2t")}}
    text = compare.report(results, tmp_path, [0], "header", sources=got["sources"])
    assert "glnet at aaaaaaa; w2t at bbbbbbb" in text and "| baseline: spectrum |" in text  # rows of the newest runs
    with pytest.raises(SystemExit, match="seeds"):
        compare.merged(old | {"seeds": [0, 1]}, new)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_a_warm_started_model_starts_as_the_best_linear_read(experiment, tiny_collection, tmp_path):
    """Before any training, with every encoder parameter random and non-zero, the model's test metrics are
    those of the simple read it was warm-started from; a head that does not start at zero breaks that."""
    from w2t.train.run import setup_run

    cfg = make_cfg([f"experiment={experiment}", "task.head.warm_start=true", *fast(tiny_collection, tmp_path)], tmp_path / "run")
    dm, model = setup_run(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.copy_(torch.randn_like(p))
    task = model.task
    read = task.fit_prior(dm) if experiment != "retrieval" else "dw"
    split = dm.whole_split("test")
    model.eval()
    baseline = task.baseline_metrics(dm, 0, ("test",))
    scores = task.evaluate(model(split["tokens"]).float(), split)
    assert scores[task.primary] == pytest.approx(baseline[f"test/baseline_{read}/{task.primary}"], abs=1e-5)
    with torch.no_grad():  # the broken variant: a head that adds something from the start
        model.task.head[-1].bias.add_(torch.randn_like(model.task.head[-1].bias))
        model.task.head[-1].weight.add_(torch.randn_like(model.task.head[-1].weight))
    moved = task.evaluate(model(split["tokens"]).float(), split)
    assert any(moved[k] != pytest.approx(scores[k], abs=1e-6) for k in task.columns)


@pytest.mark.parametrize("experiment", ["classification", "performance"])
def test_every_prior_read_scores_as_its_baseline_the_principal_ones_through_their_projections(
        experiment, tiny_collection, tmp_path, monkeypatch):
    """Whichever read validation picks, the fitted prior reads exactly as the baseline of that name: `dw_fit`
    through the training split's principal directions, kept in the prior's buffers; a prior that keeps its
    fixed projections breaks the `dw_fit` reads."""
    from w2t.tasks.base import Projections
    from w2t.train.run import setup_run

    dm, model = setup_run(make_cfg([f"experiment={experiment}", *fast(tiny_collection, tmp_path)], tmp_path / "run"))
    task, test = model.task, dm.whole_split("test")
    baseline = task.baseline_metrics(dm, 0, ("test",))

    def read_score(read: str) -> float:
        monkeypatch.setattr(type(task), "PRIOR_READS", (read,))
        assert task.fit_prior(dm) == read
        return task.evaluate(task.read_outputs(test["tokens"]), test)[task.primary]

    for read in ("dw", "spectrum", "dw+spectrum", "dw_fit", "dw_fit+spectrum"):
        assert read_score(read) == pytest.approx(baseline[f"test/baseline_{read}/{task.primary}"], abs=1e-5), read
    assert bool(task.prior_projections.fitted)
    fresh = Projections(task.schema)
    monkeypatch.setattr(Projections, "load", lambda self, projections: None)  # the broken variant
    task.prior_projections.load_state_dict(fresh.state_dict())
    assert read_score("dw_fit") != pytest.approx(baseline[f"test/baseline_dw_fit/{task.primary}"], abs=1e-5)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_blend_is_chosen_on_validation_between_the_model_and_the_read(experiment, tiny_collection, tmp_path,
                                                                          monkeypatch):
    """With every encoder and head parameter random and non-zero: the blended model's validation score is the best
    over `BLEND_GRID`, so it is never below the trained model alone (λ = 0) nor below the simple read it blends
    with (λ = 1), which scores exactly as that baseline; a mix that ignores the read breaks it."""
    from w2t.train.run import setup_run

    dm, model = setup_run(make_cfg([f"experiment={experiment}", *fast(tiny_collection, tmp_path)], tmp_path / "run"))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in [*model.encoder.parameters(), *model.task.head.parameters()]:
            p.copy_(torch.randn_like(p))
    task = model.task
    read = task.fit_prior(dm) if experiment != "retrieval" else "dw"
    val = dm.whole_split("val")
    baseline = task.baseline_metrics(dm, 0, ("val",))[f"val/baseline_{read}/{task.primary}"]

    def scores() -> tuple[float, float]:
        lam = model.fit_blend(dm)
        model.eval()
        with torch.no_grad():
            blended, alone = (task.evaluate(f(val["tokens"]).float(), val)[task.primary] for f in (model, model.unblended))
            task.blend_weight.fill_(1.0)
            read_alone = task.evaluate(model(val["tokens"]).float(), val)[task.primary]
        assert lam in BLEND_GRID and blended >= alone - 1e-9
        return blended, read_alone

    blended, read_alone = scores()
    assert read_alone == pytest.approx(baseline, abs=1e-5) and blended >= baseline - 1e-9
    monkeypatch.setattr(type(task), "mix", lambda self, out, read, lam: out)  # the broken variant: λ does nothing
    assert scores()[1] != pytest.approx(baseline, abs=1e-5)


def test_mixup_trains_on_mixed_updates_with_mixed_targets(tiny_collection, tmp_path):
    """`task.head.mixup`: the loss sees re-canonicalized mixtures of the batch's updates, each with the same mixture of
    the two targets (its own label weighing at least ½), and such a run trains and tests like any other."""
    import torch.nn.functional as F

    from w2t.models.features import delta_w_features
    from w2t.train.run import setup_run

    cfg = make_cfg(["experiment=classification", *fast(tiny_collection, tmp_path), "task.head.mixup=0.4"], tmp_path / "run")
    dm, model = setup_run(cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    mixed = model.task.augment(batch)
    y = F.one_hot(batch["label"], model.task.n).float()
    target = mixed["target"]
    assert torch.allclose(target.sum(1), torch.ones(len(y))) and (target[y.bool()] >= 0.5).all()
    assert (target < 1).any(1).sum() > 0, "some adapters are mixed with another class"
    before, after = (delta_w_features(b["tokens"], dm.schema) for b in (batch, mixed))
    assert not torch.allclose(before, after, atol=1e-4), "the updates themselves are mixed"
    assert train(cfg) is not None
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert math.isfinite(metrics["test/acc"]) and math.isfinite(metrics["test_unblended/acc"])


def test_compare_paired_bootstrap_against_the_best_baseline_chosen_on_val(tmp_path):
    compare = runpy_module("scripts/compare.py")
    assert compare.EXPERIMENTS["retrieval_open"] == "retrieval" and compare.EXPERIMENTS["classification"] == "classification"
    task = TASKS["classification"]
    rng = np.random.default_rng(0)
    runs, dirs = [], []
    for seed in range(3):
        truth = rng.random(200)
        model, dw, sketch = (truth < q for q in (0.8, 0.7, 0.75))  # accuracies ≈ 0.8, 0.7 and 0.75
        d = tmp_path / f"seed_{seed}"
        d.mkdir()
        np.savez(d / "test_items.npz", **{"model/correct": model.astype(float), "baseline_dw/correct": dw.astype(float),
                                          "baseline_sketch/correct": sketch.astype(float),
                                          "unblended/correct": sketch.astype(float)})
        # validation prefers dw, although sketch is better on test: the bar is chosen on validation
        runs.append({"val/baseline_dw/acc": 0.9, "val/baseline_sketch/acc": 0.5})
        dirs.append(d)
    got = compare.paired_difference(runs, dirs, task, n_boot=500)
    want = np.mean([np.load(d / "test_items.npz")["model/correct"].mean() - np.load(d / "test_items.npz")["baseline_dw/correct"].mean()
                    for d in dirs])
    assert got["diff"] == pytest.approx(want) and 0 < got["ci"][0] < want < got["ci"][1]
    # a blended model's runs also give its trained model alone, from the same runs' items and test_unblended/ scores
    unblended = compare.paired_difference(runs, dirs, task, n_boot=200, source="unblended")
    assert unblended["diff"] == pytest.approx(np.mean([np.load(d / "test_items.npz")["baseline_sketch/correct"].mean() -
                                                       np.load(d / "test_items.npz")["baseline_dw/correct"].mean()
                                                       for d in dirs]))
    blended = [r | {"blend_weight": 0.5, "test/acc": 0.8, "test_unblended/acc": 0.75} for r in runs]
    rows = compare.with_unblended({"classification": {"w2t": blended, "glnet": runs}})["classification"]
    assert list(rows) == ["w2t", "w2t (unblended)", "glnet"] and rows["w2t (unblended)"][0]["test/acc"] == 0.75
    # the same items against themselves: no difference, and a CI of width 0 (the resampling is paired)
    for d in dirs:
        np.savez(d / "test_items.npz", **{"model/correct": np.ones(50), "baseline_dw/correct": np.ones(50)})
    assert compare.paired_difference(runs, dirs, task, n_boot=50) == {"diff": 0.0, "ci": [0.0, 0.0]}


def runpy_module(relative: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
