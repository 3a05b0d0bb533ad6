"""Hydra callbacks for multiruns: folders an Optuna study needs, and what a multirun says while it runs."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig


class MakeDirs(Callback):
    """Create folders when a multirun starts: the Optuna sweeper opens its SQLite storage before
    Hydra has created any folder, and SQLite does not create a missing parent folder."""

    def __init__(self, dirs: list[str]):
        self.dirs = list(dirs)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        for d in self.dirs:
            Path(d).mkdir(parents=True, exist_ok=True)


class JobReport(Callback):
    """A multirun says one line per finished job, and a summary table of every job at the end."""

    @staticmethod
    def _swept(config: DictConfig, overrides: list[str]) -> str:
        """The overrides that differ between jobs: swept on the command line (`k=a,b`) or by a sweeper."""
        keys = {a.split("=", 1)[0] for a in sys.argv[1:] if "," in a or "(" in a}
        keys |= set((config.hydra.sweeper.get("params") or {}).keys())
        return " ".join(o for o in overrides if o.split("=", 1)[0] in keys) or " ".join(overrides)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:  # a single run prints its own results table
            return
        try:
            value = job_return.return_value  # re-raises a failed job's exception
            result = f"{value:.4f}" if isinstance(value, float) else str(value)
        except Exception as e:  # noqa: BLE001  a failed job is reported, the multirun goes on
            result = f"FAILED ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        print(f"job {config.hydra.job.num}: {self._swept(config, list(job_return.overrides or []))} → {result}  "
              f"[{config.hydra.runtime.output_dir}]", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import json

        import yaml
        from rich.console import Console
        from rich.table import Table

        from w2t.tasks import TASKS

        sweep = Path(config.hydra.sweep.dir)
        task = TASKS.get(config.task.name) if "task" in config else None
        keys = [f"test/{task.primary}", f"val/{task.primary}"] if task else []
        table = Table(title="multirun summary")
        for name in ("job", "overrides", *keys):
            table.add_column(name)
        for job in sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
            overrides_file, metrics_file = job / ".hydra" / "overrides.yaml", job / "metrics.json"
            overrides = self._swept(config, yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.exists() else ""
            metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
            table.add_row(job.name, overrides, *(f"{metrics[k]:.4f}" if k in metrics else "–" for k in keys))
        Console().print(table)
        print(f"runs: {sweep}")
