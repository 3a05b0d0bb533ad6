"""Scaling out: the Optuna sweep, the submitit launcher (SLURM's code path, run locally), the
cache's process pool, and the pins of the `sweep` / `slurm` extras."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from packaging.requirements import Requirement

from w2t.data.cache import CacheOptions, TokenCache
from w2t.data.collection import read_metadata

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def compose_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("extra", ["sweep", "slurm"])
def test_installed_plugins_satisfy_the_extras(extra):
    """Network-free: what is installed meets every pin of the extra (hydra-core < 1.4 above all)."""
    assert "w2t[sweep,slurm]" in EXTRAS["dev"], "CI installs .[dev] only and the tests below need the plugins"
    for line in EXTRAS[extra]:
        req = Requirement(line)
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            pytest.fail(f"{req.name} is not installed: pip install -e '.[{extra}]'")
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} breaks {line}"


def test_optuna_search_space_names_real_options(tmp_path):
    cfg = compose_hydra(["hparams_search=optuna", "experiment=performance", f"paths.log_dir={tmp_path}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.storage == f"sqlite:///{tmp_path}/performance/optuna.db"
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"the search space names a missing option: {key}"


def test_slurm_launcher_runs_one_gpu_per_job(tmp_path):
    cfg = compose_hydra(["launcher=slurm", "experiment=retrieval", f"paths.log_dir={tmp_path}"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1 and launcher.nodes == 1
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
    HydraConfig.instance().set_config(cfg)
    assert cfg.data.cache_workers == launcher.cpus_per_task, "the cache build uses the job's CPUs, not the node's"
    assert compose_hydra(["launcher=slurm", "trainer=cpu"]).trainer.accelerator == "cpu", "the command line wins"


@pytest.mark.slow
def test_cache_process_pool_matches_in_process_build(tiny_collection, tmp_path):
    """`parallel_min=0` forces the spawn pool; `device` picks where to canonicalize, not the tokens."""
    table = read_metadata(tiny_collection)
    items = list(zip(table["adapter_id"].astype(str), table["abs_path"]))[:4]
    serial = TokenCache(tmp_path / "serial").build(items, workers=1)
    pooled_cache = TokenCache(tmp_path / "pooled", CacheOptions(device="cpu"))
    pooled = pooled_cache.build(items, workers=2, parallel_min=0)
    assert pooled.built == serial.built == len(items)
    assert pooled_cache.options.tag == CacheOptions().tag
    for adapter_id, entry in serial.entries.items():
        assert pooled.entries[adapter_id].name == entry.name
        assert pooled.entries[adapter_id].read_bytes() == entry.read_bytes()


def _multirun(args: list[str], tiny_collection, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "W2T_DATA_DIR": str(tmp_path / "data"), "W2T_PROGRESS": "0"}
    cmd = [sys.executable, "train.py", "-m", f"data.root={tiny_collection}", "trainer.max_epochs=1",
           "callbacks.progress_bar=null", f"paths.log_dir={tmp_path / 'logs'}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_optuna_sweep_reports_its_best_trial_and_resumes(tiny_collection, tmp_path):
    args = ["hparams_search=optuna", "experiment=performance", "test=false", "hydra.sweeper.n_trials=3"]
    out = _multirun(args, tiny_collection, tmp_path).stdout
    (sweep,) = (tmp_path / "logs" / "performance" / "multiruns").iterdir()
    finished = [line for line in out.splitlines() if line.startswith("job ")]  # one line per job, its trial's values
    assert len(finished) == 3 and all("model.lr=" in line and f"[{sweep}/" in line for line in finished), out[-3000:]
    assert "multirun summary" in out and "val/spearman" in out
    assert sorted(p.parts[-3] for p in sweep.glob("*/checkpoints/best.ckpt")) == ["0", "1", "2"]
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert math.isfinite(results.best_value)
    assert set(results.best_params) == set(compose_hydra(["hparams_search=optuna"]).hydra.sweeper.params)

    _multirun([*args[:3], "hydra.sweeper.n_trials=1"], tiny_collection, tmp_path)  # same study, one more trial
    import optuna

    study = optuna.load_study(study_name="w2t-performance",
                              storage=f"sqlite:///{tmp_path / 'logs' / 'performance' / 'optuna.db'}")
    assert len(study.trials) == 4


@pytest.mark.slow
def test_submitit_local_launcher_runs_each_job(tiny_collection, tmp_path):
    _multirun(["launcher=local", "experiment=retrieval", "seed=0,1"], tiny_collection, tmp_path)
    (sweep,) = (tmp_path / "logs" / "retrieval" / "multiruns").iterdir()
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == ["0", "1"]
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 2, "each job went through submitit"
