"""Every encoder by name: build a new one (`model=`), or rebuild an exported one from its folder alone."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model

from w2t.data.tokens import TokenSchema
from w2t.errors import W2TError
from w2t.models.flat_mlp import FlatMLPConfig, FlatMLPEncoder
from w2t.models.glnet import GLNetConfig, GLNetEncoder
from w2t.models.pretrained import CONFIG_FILE, OUTPUT_FILE, WEIGHTS_FILE, PretrainedConfig, w2t_version
from w2t.models.sketch import SketchConfig, SketchEncoder
from w2t.models.w2t import EncoderConfig, W2TEncoder
from w2t.models.w2t_paper import PaperConfig, W2TPaperEncoder

ENCODERS = {
    "w2t": (W2TEncoder, EncoderConfig),
    "w2t_paper": (W2TPaperEncoder, PaperConfig),
    "flat_mlp": (FlatMLPEncoder, FlatMLPConfig),
    "glnet": (GLNetEncoder, GLNetConfig),
    "sketch": (SketchEncoder, SketchConfig),
}


def build_encoder(arch: str, schema: TokenSchema, options: dict):
    if arch not in ENCODERS:
        raise ValueError(f"unknown encoder {arch!r}; choose from {sorted(ENCODERS)}")
    enc_cls, cfg_cls = ENCODERS[arch]
    return enc_cls(schema, cfg_cls(**options))


def load_pretrained(directory: str | Path, *, device: str | torch.device = "cpu"):
    """Rebuild an exported encoder of any architecture from its folder (safetensors + JSON only), in
    eval mode, ready to `.embed(paths)` new adapters as its training data was read (and through its output head,
    when it was exported with one)."""
    config = PretrainedConfig.read(directory)
    if config.arch not in ENCODERS:
        raise W2TError(f"unknown encoder architecture {config.arch!r}; this w2t ({w2t_version()}) knows "
                       f"{sorted(ENCODERS)}", Path(directory) / CONFIG_FILE, "arch")
    enc_cls, cfg_cls = ENCODERS[config.arch]
    if unknown := set(config.encoder) - {f.name for f in fields(cfg_cls)}:
        raise W2TError(f"encoder options {sorted(unknown)} are unknown to this w2t ({w2t_version()}); "
                       f"the encoder was saved by w2t {config.w2t_version}", Path(directory) / CONFIG_FILE)
    encoder = enc_cls(TokenSchema.from_dict(config.schema), cfg_cls(**config.encoder))
    encoder.canon = config.canon
    try:
        load_model(encoder, str(Path(directory) / WEIGHTS_FILE), strict=True, device=str(device))
    except (FileNotFoundError, SafetensorError, RuntimeError) as e:
        raise W2TError(f"weights do not load into the saved architecture ({e})", Path(directory) / WEIGHTS_FILE) from None
    if config.output:
        encoder.output = _output_head(config.output, Path(directory) / OUTPUT_FILE, device)
    return encoder.to(device).eval()


def _output_head(spec: dict, path: Path, device) -> torch.nn.Module:
    """The task head an exported encoder embeds through, rebuilt from its constructor arguments and weights."""
    from w2t.data.datamodule import DataInfo  # tasks build on models: imported here, not at module level
    from w2t.tasks import TASKS

    try:
        task = TASKS[spec["task"]](spec["d"], DataInfo(**spec["info"]), **spec["head"])
        load_model(task, str(path), strict=True, device=str(device))
    except (KeyError, TypeError, ValueError) as e:
        raise W2TError(f"not a readable output head ({type(e).__name__}: {e})", path.with_name(CONFIG_FILE), "output") from None
    except (FileNotFoundError, SafetensorError, RuntimeError) as e:
        raise W2TError(f"the output head's weights do not load ({e})", path) from None
    return task
