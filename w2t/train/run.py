"""The one place that turns a Hydra config into objects (`instantiate`) and runs fit → test → report."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from w2t.data.datamodule import AdapterDataModule
from w2t.models.pretrained import data_options
from w2t.train.spectral import SpectralModel
from w2t.tasks import TASKS
from w2t.train.lightning_module import AdapterModel
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
    """Fit, test the best checkpoint, write metrics.json + config + plots; return the monitored value."""
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    task = cfg.task.name

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

    test_metrics = trainer.test(model, datamodule=dm, ckpt_path=best or None, weights_only=True)[0]
    metrics = {k: float(v) for k, v in test_metrics.items()}
    if trainer.is_global_zero:
        # the best checkpoint's validation scores beside the test ones: choose settings on these, never on test
        metrics |= {f"val/{k}": v for k, v in model.score(dm.val_dataloader()).items()}
        model.encoder.save_pretrained(out_dir / "encoder", sign_rule=dm.hp.sign_rule, representation=dm.hp.representation)
        metrics |= model.task.baseline_metrics(dm, cfg.seed, ("val", "test"))
        n_train = len(dm.split_rows["train"])
        metrics |= {"params": float(n_params), "train_adapters": float(n_train), "epochs": float(trainer.current_epoch),
                    "data_seconds": t_data, "fit_seconds": t_fit,
                    "train_adapters_per_s": n_train * trainer.current_epoch / max(t_fit, 1e-9)}
        _write_metrics(out_dir, metrics)
        model.eval()
        save_plots(model, dm, out_dir, trainer.loggers)
        print_results(task, metrics, out_dir, model_name(cfg.model))
    return None if value is None else float(value)


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
    metrics |= model.task.baseline_metrics(dm, cfg.seed, ("val", "test"))
    n_train = len(dm.split_rows["train"])
    metrics |= {"params": float(model.num_parameters()), "train_adapters": float(n_train), "epochs": 1.0,
                "data_seconds": t_data, "fit_seconds": t_fit, "train_adapters_per_s": n_train / max(t_fit, 1e-9)}
    _write_metrics(out_dir, metrics)
    save_plots(model, dm, out_dir)
    print_results(cfg.task.name, metrics, out_dir, model_name(cfg.model))
    return scores[model.monitor[0]]


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint on a collection (its schema fixes the token layout); writes metrics.json."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = AdapterModel.load_from_checkpoint(cfg.ckpt_path, map_location="cpu", weights_only=True)
    task = model.hparams.task
    with open_dict(cfg):
        cfg.data.schema = model.hparams.info["schema"]
        cfg.data.representation = model.hparams.get("input", "canonical")
        cfg.data.classes = model.hparams.info.get("classes") or None
    dm = build_datamodule(cfg, eval_gallery=TASKS[task].uses_gallery)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=_loggers(cfg) or False)
    metrics = {k: float(v) for k, v in trainer.test(model, datamodule=dm)[0].items()}
    metrics |= model.task.baseline_metrics(dm, cfg.seed, ("test",))
    _write_metrics(out_dir, metrics)
    print_results(task, metrics, out_dir, model_name(model.hparams))
    return metrics
