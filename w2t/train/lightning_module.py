"""The LightningModule: one encoder, one task head, whole-split evaluation.

Hyperparameters are plain dicts and numbers (`save_hyperparameters`), so checkpoints rebuild the
model anywhere and load with `torch.load(weights_only=True)`. A checkpoint is self-contained: one
fine-tuned from an exported encoder records that encoder's architecture, not the folder it came from.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict
from functools import partial

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from lightning.fabric.utilities.apply_func import move_data_to_device

from w2t.data.datamodule import DataInfo
from w2t.models import build_encoder, load_pretrained
from w2t.errors import W2TError
from w2t.tasks import TASKS
from w2t.tasks.base import Projections, training_principal_projections
from w2t.data.tokens import TokenSchema

log = logging.getLogger(__name__)


class AdapterModel(L.LightningModule):
    def __init__(
        self,
        task: str,
        info: dict,
        arch: str = "w2t",
        input: str = "canonical",
        encoder: dict | None = None,
        head: dict | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_frac: float = 0.05,
        pretrained: str | None = None,
        freeze_encoder: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
        self.encoder = self._build_encoder(TokenSchema.from_dict(info["schema"]), arch, encoder or {}, pretrained)
        self.new_encoder = not pretrained  # its initialisation may be fitted to the training split (on_fit_start)
        if freeze_encoder:
            self.encoder.requires_grad_(False)
        self.task = TASKS[task](self.encoder.dim, DataInfo(**info), **(head or {}))
        self._eval: list[dict] = []
        self.first_epoch = 0  # the epoch this process started training at (> 0 when resumed)

    def _build_encoder(self, schema: TokenSchema, arch: str, encoder: dict, pretrained: str | None) -> nn.Module:
        """A new encoder (`w2t.models.ENCODERS[arch]`), or the exported one in `pretrained` (its
        architecture and input representation win over `arch`, `input` and `encoder`)."""
        if not pretrained:
            return build_encoder(arch, schema, encoder)
        enc = load_pretrained(pretrained)
        enc.output = None  # the encoder alone: this model trains its own head
        if enc.schema != schema:
            raise W2TError("the data's token schema differs from the pretrained encoder's: tokenize the data with "
                           "the encoder's schema (AdapterDataModule(schema=...); train.py does it for model.pretrained)",
                           path=pretrained)
        ignored = {k: v for k, v in encoder.items() if asdict(enc.config).get(k) != v}
        if ignored:
            log.warning("model.encoder options %s ignored: the pretrained encoder's architecture is used", ignored)
        # checkpoints rebuild this architecture from their own hyperparameters (the weights are in them:
        # `pretrained` is not needed again), and eval.py reads adapters as the encoder was trained on them
        self.hparams.update(encoder=asdict(enc.config), arch=enc.arch, input=enc.canon.representation, pretrained=None)
        return enc

    def export_encoder(self, directory, *, sign_rule: bool, representation: str):
        """The encoder as a pretrained folder (`Encoder.save_pretrained`), with the task head (blend included) when the
        task's outputs are an embedding space: the exported encoder then embeds as the run was scored."""
        output = None
        if self.task.embeds:
            hp = self.hparams
            output = (self.task, {"task": hp.task, "d": self.encoder.dim, "info": hp.info, "head": dict(hp.head or {})})
        return self.encoder.save_pretrained(directory, sign_rule=sign_rule, representation=representation,
                                            output=output)

    def train(self, mode: bool = True) -> AdapterModel:
        super().train(mode)
        if self.hparams.freeze_encoder:
            self.encoder.eval()  # a frozen encoder is a fixed feature map: no dropout inside it
        return self

    @property
    def monitor(self) -> tuple[str, str]:
        return self.task.monitor, self.task.mode

    def forward(self, tokens) -> torch.Tensor:
        return self.task.outputs(self.encoder(tokens), tokens)

    def unblended(self, tokens) -> torch.Tensor:
        """The trained model's outputs alone, not mixed with the fixed read (what the blend is measured against)."""
        return self.task.model_outputs(self.encoder(tokens), tokens)

    def on_fit_start(self):
        fit = getattr(self.encoder, "fit_projections", None)
        if fit is not None and self.trainer.ckpt_path is None and self.new_encoder:
            # a resumed or pretrained encoder keeps its own
            fit(partial(training_principal_projections, self.trainer.datamodule))
        prior = getattr(self.task, "prior", None)
        if prior is not None and not bool(prior.fitted):  # a resumed run keeps the prior it started from
            log.info("prior (warm start, blend): the %s read fitted on the training split",
                     self.task.fit_prior(self.trainer.datamodule))

    @torch.no_grad()
    def fit_blend(self, dm) -> float | None:
        """Choose the blend's λ (the fixed read's weight, `Task.fit_blend`) on the validation split, for the current
        weights; None when the task does not blend."""
        if not self.task.blend:
            return None
        was_training = self.training
        self.eval()
        val = dm.whole_split("val")
        scores = self.task.fit_blend(self.unblended(move_data_to_device(val["tokens"], self.device)).float().cpu(), val)
        self.train(was_training)
        lam = round(float(self.task.blend_weight), 6)
        log.info("blend: the fixed read weighs %g (validation %s: %s)", lam, self.task.primary,
                 ", ".join(f"{k:g}: {v:.4f}" for k, v in scores.items()))
        return lam

    def training_step(self, batch, batch_idx):
        batch = self.task.augment(batch)
        loss = self.task.loss(self.encoder(batch["tokens"]), batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["index"]))
        return loss

    # whole-split evaluation: keep every output, score once at epoch end ------------------------
    def _record(self, batch) -> dict:
        out = self(batch["tokens"])
        return {"out": out.detach(), **{k: v for k, v in batch.items() if k != "tokens"}}

    def _eval_step(self, batch):
        self._eval.append(self._record(batch))

    @torch.no_grad()
    def score(self, loader) -> dict[str, float]:
        """Whole-split metrics of the current weights outside a Trainer (nothing is logged)."""
        was_training = self.training
        self.eval()
        records = [self._record(move_data_to_device(batch, self.device)) for batch in loader]
        self.train(was_training)
        cat = {k: torch.cat([r[k] for r in records]) for k in records[0]}
        return {k: float(v) for k, v in self.task.evaluate(cat["out"], cat).items()}

    def _eval_end(self, stage: str):
        if not self._eval:
            return
        cat = {k: torch.cat([e[k] for e in self._eval]) for k in self._eval[0]}
        self._eval.clear()
        if self.trainer.world_size > 1:  # gather across ranks, then drop the sampler's padding duplicates
            cat = {k: v.flatten(0, 1) for k, v in self.all_gather(cat).items()}
            first = np.unique(cat["index"].cpu().numpy(), return_index=True)[1]
            keep = torch.as_tensor(first, device=cat["index"].device)
            cat = {k: v[keep] for k, v in cat.items()}
        metrics = {f"{stage}/{k}": float(v) for k, v in self.task.evaluate(cat["out"], cat).items()}
        monitored = {k: v for k, v in metrics.items() if k == self.task.monitor}  # the progress bar shows only it
        self.log_dict({k: v for k, v in metrics.items() if k not in monitored}, sync_dist=False)
        self.log_dict(monitored, prog_bar=True, sync_dist=False)

    def on_train_start(self):
        self.first_epoch = self.current_epoch

    # resuming continues the random streams where the checkpoint left them (shuffles, dropout), so a
    # killed and resumed run trains exactly like an uninterrupted one
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._fill_fixed_projections(checkpoint["state_dict"])
        if "rng" not in checkpoint:
            return
        rng = checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))

    def _fill_fixed_projections(self, state: dict) -> None:
        """A checkpoint written before a task's fixed read kept its projections (`Projections` buffers) read ΔW
        through the fixed ones, which a new `Projections` holds: put those in, so it loads and reads as trained."""
        for prefix, module in self.named_modules():
            if isinstance(module, Projections):
                for name, value in module.state_dict().items():
                    state.setdefault(f"{prefix}.{name}", value)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_test_epoch_end(self):
        self._eval_end("test")

    def predict_step(self, batch, batch_idx):
        return self(batch["tokens"])

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if p.ndim >= 2 and "emb" not in n]
        no_decay = [p for n, p in self.named_parameters() if p.ndim < 2 or "emb" in n]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)
        total = max(1, self.trainer.estimated_stepping_batches)
        warm = max(1, int(self.hparams.warmup_frac * total))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
