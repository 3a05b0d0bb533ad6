"""The OmegaConf resolvers the configs use; train.py and eval.py register them before Hydra composes."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def run_dir(ckpt_path: str | None, fresh: str) -> str:
    """A run resumed from `<run>/checkpoints/<name>.ckpt` continues in `<run>`; any other run starts in `fresh`."""
    if ckpt_path and Path(str(ckpt_path)).parent.name == "checkpoints":
        return str(Path(str(ckpt_path)).resolve().parent.parent)
    return fresh


def register() -> None:
    if not OmegaConf.has_resolver("w2t.run_dir"):
        OmegaConf.register_new_resolver("w2t.run_dir", run_dir)


register()
