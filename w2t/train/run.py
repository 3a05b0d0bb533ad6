"""The one place that turns a Hydra config into objects (`instantiate`) and runs fit → test → report."""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, OmegaConf, open_dict

from w2t.canon.reparam import REPARAMS, reparametrize
from w2t.canon.representation import adapter_components
from w2t.data.datamodule import AdapterDataModule
from w2t.data.tokens import collate_tokens, tokenize
from w2t.io.files import atomic_write
from w2t.models.pretrained import data_options
from w2t.train.spectral import SpectralModel
from w2t.tasks import TASKS
from w2t.train.console import quiet
from w2t.train.lightning_module import AdapterModel
from w2t.train.loggers import rewind
from w2t.train.report import print_results, save_plots

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig, eval_gallery: bool) -> AdapterDataModule:
    dm = instantiate(cfg.data, output_dir=cfg.paths.output_dir, eval_gallery=eval_gallery, _convert_="all")
    dm.prepare_data()
    dm.setup()
    return dm


def _callbacks(cfg: DictConfig, model: AdapterModel) -> list[L.Callback]:
    monitor, mode = model.monitor
    out = []
    for cb in (cfg.get("callbacks") or {}).values():
        if cb is None:
            continue
        extra = {"monitor": monitor, "mode": mode} if "monitor" in cb and cb.monitor is None else {}
        out.append(instantiate(cb, **extra, _convert_="all"))
    return out


def _loggers(cfg: DictConfig) -> list:
    return [instantiate(lg, _convert_="all") for lg in (cfg.get("logger") or {}).values() if lg is not None]


def setup_run(cfg: DictConfig) -> tuple[AdapterDataModule, AdapterModel | SpectralModel]:
    """The data, read as the model reads it (canonical or raw; a pretrained encoder's schema), and the model."""
    with open_dict(cfg):
        cfg.data.representation = cfg.model.get("input", "canonical")
        if cfg.model.get("pretrained"):
            cfg.data.update(data_options(cfg.model.pretrained))
    dm = build_datamodule(cfg, eval_gallery=TASKS[cfg.task.name].uses_gallery)
    model = instantiate(cfg.model, task=cfg.task.name, info=asdict(dm.info), head=cfg.task.get("head"), _convert_="all")
    return dm, model


def train(cfg: DictConfig) -> float | None:
    """Fit, test the best checkpoint, write metrics.json + config + plots; return the monitored value.

    With `ckpt_path=<run>/checkpoints/last.ckpt` the run continues in `<run>` (configs/hydra/default.yaml):
    its checkpoints, early stopping, logs and random streams carry on where the checkpoint left them."""
    quiet()
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    task = cfg.task.name
    if cfg.get("ckpt_path"):
        rewind(out_dir / "csv" / "metrics.csv", torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)["epoch"])

    t0 = time.perf_counter()
    dm, model = setup_run(cfg)
    t_data = time.perf_counter() - t0
    if isinstance(model, SpectralModel):
        return _fit_spectral(cfg, dm, model, out_dir, t_data)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s parameters (encoder %s)", f"{n_params:,}", f"{model.encoder.num_parameters():,}")

    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=_callbacks(cfg, model), logger=_loggers(cfg) or False)
    t1 = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    t_fit = time.perf_counter() - t1
    monitor = model.monitor[0]
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    value = trainer.callback_metrics.get(monitor)
    if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_score is not None:
        value = trainer.checkpoint_callback.best_model_score
    if not cfg.get("test", True):
        return None if value is None else float(value)

    blend = _fit_blend(model, dm, best, trainer.is_global_zero)
    test_metrics = trainer.test(model, datamodule=dm, weights_only=True, verbose=False)[0]
    metrics = {k: float(v) for k, v in test_metrics.items()} | blend
    if trainer.is_global_zero:
        # the best checkpoint's validation scores beside the test ones: choose settings on these, never on test
        metrics |= {f"val/{k}": v for k, v in model.score(dm.val_dataloader()).items()}
        model.export_encoder(out_dir / "encoder", sign_rule=dm.hp.sign_rule, representation=dm.hp.representation)
        model.eval()
        metrics |= reparam_metrics(model, dm, metrics, cfg.seed)
        baselines = _baselines_and_items(model, dm, cfg.seed, out_dir)
        _log_beside(trainer, baselines)
        n_train = len(dm.split_rows["train"])
        trained_here = trainer.current_epoch - model.first_epoch  # a resumed run trained only these
        metrics |= baselines | {"params": float(n_params), "train_adapters": float(n_train),
                                "epochs": float(trainer.current_epoch), "data_seconds": t_data, "fit_seconds": t_fit,
                                "train_adapters_per_s": n_train * trained_here / max(t_fit, 1e-9)}
        _write_metrics(out_dir, metrics)
        save_plots(model, dm, out_dir, metrics, trainer.loggers)
        print_results(task, metrics, out_dir, model_name(cfg.model), f"trained on {n_train} adapters")
        if not cfg.get("save_checkpoints", True):
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return None if value is None else float(value)


@torch.no_grad()
def _fit_blend(model: AdapterModel, dm: AdapterDataModule, best: str, write: bool) -> dict[str, float]:
    """Load the best checkpoint's weights (what is tested), choose the blend's λ for them on validation, and store
    it in that checkpoint, so eval.py tests what train.py did. Returns λ (`blend_weight`) and the model's own
    val and test metrics (`val_unblended/…`, `test_unblended/…`: what the blend adds is measured on the same
    weights), or {} without a blend."""
    if best:
        ckpt = torch.load(best, map_location=model.device, weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
    lam = model.fit_blend(dm)
    if lam is None:
        return {}
    if best and write:
        ckpt["state_dict"]["task.blend_weight"] = model.task.blend_weight.detach().clone()
        atomic_write(Path(best), lambda tmp: torch.save(ckpt, tmp))
    out = {"blend_weight": lam}
    model.eval()
    for stage in ("val", "test"):
        split = dm.whole_split(stage)
        alone = model.unblended(move_data_to_device(split["tokens"], model.device)).float().cpu()
        out |= {f"{stage}_unblended/{k}": float(v) for k, v in model.task.evaluate(alone, split).items()}
    return out


@torch.no_grad()
def reparam_metrics(model, dm: AdapterDataModule, metrics: dict[str, float], seed: int) -> dict[str, float]:
    """The test metrics with every test-split adapter re-written as another factorization of the same update
    (w2t/canon/reparam.py; the gallery stays as stored): `test_reparam/<kind>/<metric>`, and
    `test_reparam/<metric>` from the kind farthest from `test/<metric>`. An invariant model moves only by
    bf16 rounding; one that reads the raw factors shows what the factorization costs it."""
    split = dm.whole_split("test")
    rows = split["index"].tolist()
    tokens = [dm.tokens(row) for row in rows]
    adapters = {j: dm.adapter(rows[j])  # read each file once
                for j, keep in enumerate(split["in_split"].tolist()) if keep}
    device = getattr(model, "device", "cpu")
    out: dict[str, float] = {}
    for kind in REPARAMS:
        items = list(tokens)
        for j, adapter in adapters.items():
            modules = adapter_components(reparametrize(adapter, kind, seed), dm.hp.representation, sign_rule=dm.hp.sign_rule)
            items[j] = tokenize(modules, dm.schema, strict=False)[0]
        batch = {g: {k: v.to(device) for k, v in t.items()} for g, t in collate_tokens(items).items()}
        scores = model.task.evaluate(model(batch).float().cpu(), split)
        out |= {f"test_reparam/{kind}/{k}": float(v) for k, v in scores.items()}
    for k in model.task.columns:
        worst = max(REPARAMS, key=lambda kind: abs(out[f"test_reparam/{kind}/{k}"] - metrics[f"test/{k}"]))
        out[f"test_reparam/{k}"] = out[f"test_reparam/{worst}/{k}"]
    return out


@torch.no_grad()
def _baselines_and_items(model, dm: AdapterDataModule, seed: int, out_dir: Path) -> dict[str, float]:
    """The simple reads' val and test metrics; writes `test_items.npz`: per test item (adapter, or query), what
    the main metric is made of, for the model (`model/<key>`) and every simple read (`baseline_<name>/<key>`), in
    one order, so comparisons can resample items in pairs (scripts/compare.py)."""
    task, split = model.task, dm.whole_split("test")
    outputs = task.baseline_outputs(dm, seed, ("val", "test"))
    device = getattr(model, "device", "cpu")
    tokens = {g: {k: v.to(device) for k, v in t.items()} for g, t in split["tokens"].items()}
    items = {"model": task.item_values(model(tokens).float().cpu(), split)}
    if task.blend:
        items["unblended"] = task.item_values(model.unblended(tokens).float().cpu(), split)
    items |= {f"baseline_{name}": task.item_values(out, split) for name, out in outputs["test"].items()}
    arrays = {f"{source}/{k}": v for source, values in items.items() for k, v in values.items()}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(out_dir / "test_items.npz", write)
    return task.baseline_metrics(dm, seed, ("val", "test"), outputs)


def _log_beside(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """The simple reads' scores, in every logger (CSV, wandb, TensorBoard) beside the model's."""
    for lg in trainer.loggers:
        lg.log_metrics(metrics, step=trainer.global_step)
        lg.save()


def model_name(model_cfg) -> str:
    """How results tables name a model config: its architecture, and its input when not canonical."""
    name = model_cfg.get("arch") or model_cfg.get("_target_", "model").rsplit(".", 1)[-1].removesuffix("Model").lower()
    return name if model_cfg.get("input", "canonical") == "canonical" else f"{name}_{model_cfg.input}"


def _write_metrics(out_dir: Path, metrics: dict[str, float]) -> None:
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))


def _fit_spectral(cfg: DictConfig, dm: AdapterDataModule, model: SpectralModel, out_dir: Path, t_data: float) -> float:
    """model=spectral: fit scikit-learn on the training split, score val and test like a trained encoder."""
    t1 = time.perf_counter()
    model.fit(dm.whole_split("train"))
    t_fit = time.perf_counter() - t1
    scores = {}
    for stage in ("val", "test"):
        split = dm.whole_split(stage)
        scores |= {f"{stage}/{k}": float(v) for k, v in model.task.evaluate(model(split["tokens"]), split).items()}
    metrics = scores
    metrics |= reparam_metrics(model, dm, metrics, cfg.seed)
    metrics |= _baselines_and_items(model, dm, cfg.seed, out_dir)
    n_train = len(dm.split_rows["train"])
    metrics |= {"params": float(model.num_parameters()), "train_adapters": float(n_train), "epochs": 1.0,
                "data_seconds": t_data, "fit_seconds": t_fit, "train_adapters_per_s": n_train / max(t_fit, 1e-9)}
    _write_metrics(out_dir, metrics)
    save_plots(model, dm, out_dir, metrics)
    print_results(cfg.task.name, metrics, out_dir, model_name(cfg.model), f"trained on {n_train} adapters")
    return scores[model.monitor[0]]


# what a checkpoint says about the data it was trained on; eval.py takes these unless given data.<key>=
TRAINED_DATA = ("root", "collection", "label_column", "label_columns", "target_column", "group_column", "role_column",
                "split_column", "split", "val_frac", "test_frac", "seed", "sign_rule")


def _given_on_the_command_line() -> set[str]:
    try:
        overrides = HydraConfig.get().overrides.task
    except ValueError:  # no Hydra run (plain Python)
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint: its task, head and data columns come from it (no experiment= needed), and so
    does the collection unless data options are given; writes metrics.json into logs/eval/runs/<time>."""
    quiet()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = AdapterModel.load_from_checkpoint(cfg.ckpt_path, map_location="cpu", weights_only=True)
    trained = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters", {})
    given = _given_on_the_command_line()
    task = model.hparams.task
    with open_dict(cfg):
        if not given & {"data", "data.root", "data.path", "data.collection"}:
            cfg.data.root, cfg.data.collection = trained.get("root"), trained.get("collection", cfg.data.collection)
            cfg.data.path = trained.get("path")
        for key in TRAINED_DATA[2:]:
            if key in trained and f"data.{key}" not in given and not (key == "seed" and "seed" in given):
                cfg.data[key] = trained[key]
        cfg.data.schema = model.hparams.info["schema"]
        cfg.data.representation = model.hparams.get("input", "canonical")
        cfg.data.classes = model.hparams.info.get("classes") or None
        cfg.task.name = task
    dm = build_datamodule(cfg, eval_gallery=TASKS[task].uses_gallery)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=_loggers(cfg) or False)
    metrics = {k: float(v) for k, v in trainer.test(model, datamodule=dm, verbose=False)[0].items()}
    model.eval()
    metrics |= reparam_metrics(model, dm, metrics, dm.hp.seed)
    metrics |= model.task.baseline_metrics(dm, dm.hp.seed, ("test",))
    _write_metrics(out_dir, metrics)
    print_results(task, metrics, out_dir, model_name(model.hparams),
                  f"checkpoint: {Path(cfg.ckpt_path).resolve()}\ncollection: {Path(dm.root).resolve()}")
    return metrics
