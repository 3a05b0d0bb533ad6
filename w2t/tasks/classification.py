"""Attribute classification: multi-class (cross-entropy) over `label_column`, or multi-label (BCE) over `label_columns`."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.multioutput import MultiOutputClassifier
from sklearn.neighbors import KNeighborsClassifier
from torchmetrics.functional import auroc
from torchmetrics.functional.classification import accuracy, f1_score, multilabel_auroc

from w2t.data.tokens import mix_tokens
from w2t.tasks.base import PredictionTask, mlp, register


@register
class Classification(PredictionTask):
    name = "classification"
    columns = ("acc", "macro_f1", "auroc")
    primary = "acc"

    def __init__(self, d: int, info, hidden: int = 64, dropout: float = 0.1, label_smoothing: float = 0.0,
                 warm_start: bool = False, blend: bool = False, mixup: float = 0.0):
        super().__init__()
        self.multilabel = bool(info.label_columns)
        self.n = len(info.label_columns) if self.multilabel else len(info.classes)
        if self.n < 2:
            raise ValueError("classification needs data.label_column with ≥ 2 classes or data.label_columns")
        self.monitor = "val/auroc" if self.multilabel else "val/acc"
        self.head = mlp(d, self.n, hidden, dropout, zero_out=warm_start)
        self.init_prior(info, self.n, warm_start, blend)
        self.label_smoothing = label_smoothing
        self.mixup = mixup

    def model_outputs(self, emb, tokens=None):
        return self.head(emb) + self.prior_outputs(tokens)

    def mix(self, out, read, lam):
        """Logits of the mixed probabilities (per label when multi-label)."""
        if self.multilabel:
            p = (1 - lam) * torch.sigmoid(out) + lam * torch.sigmoid(read)
            return torch.logit(p, eps=1e-7)
        return torch.log((1 - lam) * out.softmax(-1) + lam * read.softmax(-1)).clamp_min(-60.0)

    def augment(self, batch):
        """Weight-space mixup (`mixup` = α > 0): each adapter becomes t·ΔW + (1 − t)·ΔW' of itself and another of
        the batch, t ~ Beta(α, α), re-canonicalized (`mix_tokens`), and its target the same mixture of the two."""
        if not self.mixup:
            return batch
        n = len(batch["index"])
        partner = torch.randperm(n, device=batch["index"].device)
        t = torch.distributions.Beta(self.mixup, self.mixup).sample((n,)).to(batch["index"].device)
        t = torch.maximum(t, 1 - t)  # the adapter itself keeps the larger weight
        y = batch["labels"] if self.multilabel else F.one_hot(batch["label"], self.n).float()
        target = t.unsqueeze(1) * y + (1 - t.unsqueeze(1)) * y[partner]
        return batch | {"tokens": mix_tokens(batch["tokens"], partner, t), "target": target}

    def loss(self, emb, batch):
        logits = self.model_outputs(emb, batch["tokens"])
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, batch.get("target", batch["labels"]))
        return F.cross_entropy(logits, batch.get("target", batch["label"]), label_smoothing=self.label_smoothing)

    def evaluate(self, out, batch):
        keep = batch["in_split"]
        logits = out[keep].float()
        if self.multilabel:
            y, p = batch["labels"][keep].long(), torch.sigmoid(logits)
            kw = dict(task="multilabel", num_labels=self.n)
        else:
            y, p = batch["label"][keep], logits.softmax(-1)
            kw = dict(task="multiclass", num_classes=self.n)
        return {"acc": accuracy(p, y, average="micro", **kw).item(), "macro_f1": f1_score(p, y, average="macro", **kw).item(),
                "auroc": auroc(p, y, average="macro", **kw).item()}

    def item_values(self, out, batch):
        """Per adapter: the share of its labels predicted right (accuracy is their mean)."""
        keep = batch["in_split"]
        logits = out[keep].float()
        if self.multilabel:
            right = ((logits > 0).long() == batch["labels"][keep].long()).double().mean(1)
        else:
            right = (logits.argmax(-1) == batch["label"][keep]).double()
        return {"correct": right.cpu().numpy()}

    # ---- the simple reads: logistic regression (C=0.1) or a 5-nearest-neighbour vote -------------
    def estimator(self, kind, seed):
        est = (LogisticRegression(C=0.1, max_iter=2000, random_state=seed) if kind == "linear"
               else KNeighborsClassifier(5, weights="distance"))
        return _PerLabel(est) if self.multilabel else est

    def targets(self, split):
        return split["labels" if self.multilabel else "label"].numpy()

    def linear_coefficients(self, est):
        """Logits of every class (multi-class; a class absent from training gets a bias of -30) or of each label."""
        W, b = np.zeros((self.n, est.n_features_in_)), np.zeros(self.n)
        if self.multilabel:
            for j, e in enumerate(est.estimators_):
                if hasattr(e, "coef_"):
                    W[j], b[j] = e.coef_[0], e.intercept_[0]
                else:  # a label constant in training: its constant
                    b[j] = 30.0 if e.classes_[0] else -30.0
            return W, b
        classes = est.classes_.astype(int)
        b[:] = -30.0
        if len(classes) == 2:  # one logit: class 1 against class 0
            W[classes[1]], b[classes] = est.coef_[0], (0.0, est.intercept_[0])
        else:
            W[classes], b[classes] = est.coef_, est.intercept_
        return W, b

    def estimator_outputs(self, est, X):
        """Logits: of P(label = 1) per label (multi-label), or log-probabilities over all classes."""
        if self.multilabel:  # a label constant in training predicts its constant
            p = np.stack([pr[:, -1] if pr.shape[1] > 1 else np.full(len(X), float(e.classes_[0]))
                          for pr, e in zip(est.predict_proba(X), est[-1].estimators_)], 1)
            p = np.clip(p, 1e-7, 1 - 1e-7)
            return torch.as_tensor(np.log(p / (1 - p)), dtype=torch.float32)
        proba = np.full((len(X), self.n), 1e-7)
        proba[:, est.classes_.astype(int)] = np.clip(est.predict_proba(X), 1e-7, None)
        return torch.as_tensor(np.log(proba), dtype=torch.float32)

    def plot(self, fig, out, split, info, metrics):
        ax = fig.add_subplot()
        keep = split["in_split"]
        if self.multilabel:
            per = multilabel_auroc(torch.sigmoid(out[keep]), split["labels"][keep].long(), num_labels=self.n, average="none")
            ax.bar(range(self.n), per.numpy())
            ax.set_xticks(range(self.n))
            ax.set_xticklabels(info.label_columns, rotation=45, ha="right")
            ax.set(ylim=(0, 1), ylabel="AUROC", title=f"per-label AUROC (test; macro {metrics['test/auroc']:.3f})")
            return "per_label_auroc"
        y, p = split["label"][keep].numpy(), out[keep].argmax(-1).numpy()
        counts = np.zeros((self.n, self.n), int)
        np.add.at(counts, (y, p), 1)
        rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # each true class sums to 1
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        ax.set(xticks=range(self.n), yticks=range(self.n), xlabel="predicted", ylabel="true",
               title=f"confusion matrix, rows normalized (test; accuracy {metrics['test/acc']:.3f})")
        ax.set_xticklabels(info.classes, rotation=45, ha="right")
        ax.set_yticklabels(info.classes)
        for i in range(self.n):
            for j in range(self.n):
                if counts[i, j]:
                    ax.text(j, i, f"{rows[i, j]:.2f}\n({counts[i, j]})", ha="center", va="center", fontsize=6,
                            color="white" if rows[i, j] > 0.5 else "black")
        return "confusion_matrix"


class _PerLabel(MultiOutputClassifier):
    """One classifier per 0/1 label column; a label constant in the training split (a small split, a rare
    label) gets a DummyClassifier instead of failing the fit: logistic regression needs two classes."""

    def fit(self, X, Y, **fit_params):
        self.estimators_ = [(clone(self.estimator) if len(np.unique(y)) > 1 else DummyClassifier(strategy="prior"))
                            .fit(X, y) for y in np.asarray(Y).T]
        self.classes_ = [e.classes_ for e in self.estimators_]
        self.n_features_in_ = np.asarray(X).shape[1]
        return self
