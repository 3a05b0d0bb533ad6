"""Pretrained encoders: save, load (no pickle) and embed adapters the encoder never saw.

An exported encoder is a folder with `model.safetensors` (weights) and `config.json` (architecture,
token schema, canonicalization version and options, w2t version), so it rebuilds anywhere from the
artifact alone. The encoder of a run whose task outputs an embedding space (retrieval) also exports
that task's head, blend included (`output.safetensors`, `config.json`'s `output`): it embeds adapters
into the space the run's test MRR was measured in, which is what `w2t-search` ranks by. Embedding
reads each adapter exactly as training read it: the same canonicalization options and the saved schema.
Modules the schema has no position for are masked and reported; an adapter none of whose modules fits
(another base model) is an error for that adapter only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_model

from w2t.canon.canonical import CANON_VERSION, DEFAULT_RTOL
from w2t.errors import SchemaError, W2TError
from w2t.io.formats import load_adapter
from w2t.io.lycoris import DEFAULT_MAX_RANK
from w2t.progress import progress
from w2t.canon.representation import adapter_components
from w2t.data.tokens import TokenSchema, Tokens, collate_tokens, tokenize


log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
OUTPUT_FILE = "output.safetensors"
FORMAT = "w2t-encoder"


@dataclass(frozen=True)
class CanonOptions:
    """How adapters are canonicalized before tokenizing: embedding must repeat what training did."""

    sign_rule: bool = True
    rtol: float = DEFAULT_RTOL
    representation: str = "canonical"  # "raw" for encoders trained on raw factors (ablations)


@dataclass(frozen=True)
class PretrainedConfig:
    """The `config.json` of an exported encoder."""

    encoder: dict
    schema: dict
    arch: str = "w2t"  # key of w2t.models.ENCODERS
    canon: CanonOptions = CanonOptions()
    canon_version: int = CANON_VERSION
    w2t_version: str = "unknown"
    output: dict | None = None  # the task head embeddings go through: {"task", "d", "info", "head"} (its arguments)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "w2t_version": self.w2t_version, "arch": self.arch, "encoder": self.encoder,
                "schema": self.schema,
                "canonicalization": {"version": self.canon_version, **asdict(self.canon)}} | (
                    {"output": self.output} if self.output else {})

    @classmethod
    def read(cls, directory: str | Path) -> PretrainedConfig:
        """Read and check a saved config; a different canonicalization version is refused."""
        path = Path(directory) / CONFIG_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            canon = dict(raw["canonicalization"])
            config = cls(encoder=raw["encoder"], schema=raw["schema"], arch=raw.get("arch", "w2t"),
                         canon_version=canon.pop("version"),
                         canon=CanonOptions(**canon), w2t_version=raw.get("w2t_version", "unknown"),
                         output=raw.get("output"))
        except FileNotFoundError:
            raise W2TError(f"no {CONFIG_FILE}: not an exported encoder folder (save_pretrained writes one)", path) from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise W2TError(f"not a readable encoder config ({type(e).__name__}: {e})", path) from None
        if config.canon_version != CANON_VERSION:
            raise W2TError(
                f"the encoder was trained on canonicalization version {config.canon_version} (w2t "
                f"{config.w2t_version}), but this w2t (version {w2t_version()}) canonicalizes with version "
                f"{CANON_VERSION}: its tokens would differ from what the encoder learned. Use the w2t version it "
                "was trained with, or retrain/export it with this one.", path, "canonicalization.version")
        return config


@dataclass
class EmbedResult:
    """Embeddings of the adapters that could be read, and the error of each one that could not."""

    embeddings: torch.Tensor  # (N_ok, d)
    ids: list[str]
    failed: dict[str, str] = field(default_factory=dict)  # id -> error message


def w2t_version() -> str:
    try:
        return version("w2t")
    except PackageNotFoundError:
        return "unknown"


def fingerprint(directory: str | Path) -> str:
    """sha256 of an exported encoder's weights (and its output head's): embeddings from different encoders are not
    comparable."""
    digest = hashlib.sha256((Path(directory) / WEIGHTS_FILE).read_bytes())
    if (Path(directory) / OUTPUT_FILE).exists():
        digest.update((Path(directory) / OUTPUT_FILE).read_bytes())
    return digest.hexdigest()


class Encoder(nn.Module):
    """What every encoder of `w2t.models.ENCODERS` shares: its schema and config, `save_pretrained` and
    `embed` (`load_pretrained` reads it back). A subclass defines `arch` (its registry key) and a
    config dataclass with `d_model`, the embedding size."""

    arch: str = "w2t"
    canon: CanonOptions = CanonOptions()  # the options its training data used; load_pretrained sets the saved ones

    def __init__(self, schema: TokenSchema, config):
        super().__init__()
        self.schema = schema
        self.config = config
        self.names = [g.name for g in schema.groups]
        self.output = None  # a task whose `outputs` `embed` returns (load_pretrained sets an exported one)

    @property
    def dim(self) -> int:
        return self.config.d_model

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def config_dict(self) -> dict:
        return {"arch": self.arch, "encoder": asdict(self.config), "schema": self.schema.to_dict()}

    def save_pretrained(self, directory: str | Path, *, sign_rule: bool | None = None,
                        rtol: float | None = None, representation: str | None = None,
                        output: tuple[nn.Module, dict] | None = None) -> Path:
        """Write `model.safetensors` + `config.json`; `sign_rule`/`rtol` (default: `self.canon`) must be
        the canonicalization options the training data was built with. `output`: (task, its constructor arguments
        `{"task", "d", "info", "head"}`), the head `embed` then maps embeddings through (`output.safetensors`)."""
        canon = CanonOptions(self.canon.sign_rule if sign_rule is None else sign_rule,
                             self.canon.rtol if rtol is None else rtol,
                             self.canon.representation if representation is None else representation)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = PretrainedConfig(**self.config_dict(), canon=canon, w2t_version=w2t_version(),
                                  output=output[1] if output else None)
        (directory / OUTPUT_FILE).unlink(missing_ok=True)
        if output:
            save_model(output[0], str(directory / OUTPUT_FILE), metadata={"format": FORMAT})
        kept, self.output = self.output, None  # the weights file holds the encoder alone
        try:
            save_model(self, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        finally:
            self.output = kept
        (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1))
        return directory

    # ---- embedding -----------------------------------------------------------------------------
    def adapter_tokens(self, path: str | Path, *, allow_pickle: bool = False, base: str | Path | None = None,
                       max_rank: int = DEFAULT_MAX_RANK) -> Tokens:
        """Read → canonicalize → tokenize one adapter against this encoder's schema (options: see `load_adapter`).

        Modules outside the schema are masked with a warning naming them; SchemaError when none fits.
        """
        adapter = load_adapter(path, allow_pickle=allow_pickle, base=base, max_rank=max_rank)
        modules = adapter_components(adapter, self.canon.representation, rtol=self.canon.rtol,
                                     sign_rule=self.canon.sign_rule)
        tokens, unknown = tokenize(modules, self.schema, strict=False, source=path)
        if len(unknown) == len(modules):
            raise SchemaError(f"none of its {len(modules)} modules fits this encoder's schema (an adapter of another "
                              f"base model?): {'; '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}", path=path)
        if unknown:
            warnings.warn(f"{path}: {len(unknown)} of {len(modules)} modules are outside the encoder's schema and "
                          f"masked: {'; '.join(unknown)}", stacklevel=2)
        return tokens

    @torch.no_grad()
    def embed_tokens(self, items: list[Tokens]) -> torch.Tensor:
        """Embeddings (B, d) of tokenized adapters, through `output` when there is one, in eval mode whatever mode
        the encoder is in."""
        device = next(self.parameters()).device
        batch = {g: {k: v.to(device) for k, v in t.items()} for g, t in collate_tokens(items).items()}
        was_training = self.training
        self.eval()
        try:
            emb = self(batch)
            return (emb if self.output is None else self.output.outputs(emb, batch)).float()
        finally:
            self.train(was_training)

    def _no_embeddings(self) -> torch.Tensor:
        """(0, d) in the width `embed` returns."""
        return self.embed_tokens([tokenize([], self.schema)[0]])[:0]

    def embed(self, paths: str | Path | Sequence[str | Path], *, batch_size: int = 32,
              allow_pickle: bool = False, base: str | Path | None = None, max_rank: int = DEFAULT_MAX_RANK) -> torch.Tensor:
        """Embeddings (N, d) of adapter files/folders, in order; the first unreadable adapter raises."""
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        out = [emb for _, emb in self._embed_batches(paths, batch_size, {"allow_pickle": allow_pickle, "base": base,
                                                                           "max_rank": max_rank}, on_error=None)]
        return torch.cat(out) if out else self._no_embeddings()

    def embed_many(self, paths: Sequence[str | Path], ids: Sequence[str] | None = None, *,
                   batch_size: int = 32, allow_pickle: bool = False, base: str | Path | None = None,
                   max_rank: int = DEFAULT_MAX_RANK) -> EmbedResult:
        """Embed a library: an adapter that fails is logged and listed in `failed`, the rest go on."""
        ids = [str(p) for p in paths] if ids is None else [str(i) for i in ids]
        if len(ids) != len(paths):
            raise ValueError(f"{len(ids)} ids for {len(paths)} paths")
        failed: dict[str, str] = {}

        def report(i: int, error: W2TError) -> None:
            log.warning("skipping %s: %s", ids[i], error)
            failed[ids[i]] = f"{type(error).__name__}: {error}"

        done, out = [], []
        for idx, emb in self._embed_batches(list(paths), batch_size, {"allow_pickle": allow_pickle, "base": base, "max_rank": max_rank},
                                            on_error=report):
            done += [ids[i] for i in idx]
            out.append(emb)
        return EmbedResult(torch.cat(out) if out else self._no_embeddings(), done, failed)

    def _embed_batches(self, paths: list[str | Path], batch_size: int, read: dict,
                       on_error: Callable[[int, W2TError], None] | None) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield (indices, embeddings) batch by batch, so a library of any size never holds more than one
        batch of tokens. A failing adapter goes to `on_error` (None: raise)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        idx: list[int] = []
        items: list[Tokens] = []
        for i, path in progress(list(enumerate(paths)), "embedding adapters"):
            try:
                items.append(self.adapter_tokens(path, **read))
                idx.append(i)
            except W2TError as e:
                if on_error is None:
                    raise
                on_error(i, e)
            if items and (len(items) == batch_size or i == len(paths) - 1):
                yield idx, self.embed_tokens(items)
                idx, items = [], []


def data_options(directory: str | Path) -> dict[str, Any]:
    """Data options a run fine-tuning this encoder must use: its schema and sign rule."""
    config = PretrainedConfig.read(directory)
    return {"schema": config.schema, "sign_rule": config.canon.sign_rule, "representation": config.canon.representation}
