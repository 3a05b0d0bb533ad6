"""Hydra callback for sweeps (configs/hparams_search/optuna.yaml)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class MakeDirs(Callback):
    """Create folders when a multirun starts: the Optuna sweeper opens its SQLite storage before
    Hydra has created any folder, and SQLite does not create a missing parent folder."""

    def __init__(self, dirs: list[str]):
        self.dirs = list(dirs)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        for d in self.dirs:
            Path(d).mkdir(parents=True, exist_ok=True)
