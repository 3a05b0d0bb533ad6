"""`model=spectral`, a non-neural baseline: scikit-learn on singular-value statistics of every module
(`spectral_features`), fitted where an encoder would be trained.

All are functions of the singular values, so they are invariant to every factorization; they ignore
the singular *vectors*, i.e. what the update does, and keep only how big and how spread it is.
Fitted on the training split (no gradient descent) by the task's own simple read: logistic / ridge /
kNN by `estimator` for predictions, standardized features ranked by cosine for retrieval.
"""
from __future__ import annotations

import torch

from w2t.data.datamodule import DataInfo
from w2t.data.tokens import TokenSchema, Tokens
from w2t.models.features import spectral_features
from w2t.tasks import TASKS


class SpectralModel:
    """Selected by `model=spectral`; `run.train` fits it where it would train an encoder."""

    arch = "spectral"

    def __init__(self, task: str, info: dict, head: dict | None = None, estimator: str = "linear", top_k: int = 4,
                 seed: int = 0, input: str = "canonical"):
        # `head` and `input` are accepted so every model= config instantiates alike (no neural head here;
        # singular values are the same in either representation only when canonical, so that is the default)
        self.estimator, self.top_k, self.seed = estimator, top_k, seed
        self.schema = TokenSchema.from_dict(info["schema"])
        self.task = TASKS[task](1, DataInfo(**info))  # for its metrics, simple read and monitor only
        self.read = None

    @property
    def monitor(self) -> tuple[str, str]:
        return self.task.monitor, self.task.mode

    def num_parameters(self) -> int:
        return 0 if self.read is None else self.read.num_parameters()

    def fit(self, train: dict) -> SpectralModel:
        X = spectral_features(train["tokens"], self.schema, self.top_k).numpy()
        self.read = self.task.fit_read(X, train, self.estimator, self.seed)
        return self

    def __call__(self, tokens: Tokens) -> torch.Tensor:
        """Outputs the task's `evaluate` takes: logits, predictions, or retrieval embeddings."""
        return self.read(spectral_features(tokens, self.schema, self.top_k).numpy())
