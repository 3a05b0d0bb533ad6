"""What a run shows a person: the results table on the terminal and the plots in the run directory."""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

log = logging.getLogger(__name__)

MAIN_KEYS = {
    "classification": ["acc", "macro_f1", "auroc"],
    "performance": ["r2", "spearman", "kendall", "mae"],
    "retrieval": ["mrr", "hit@1", "hit@10", "ndcg@10", "map"],
}

BASELINES = ("raw", "sketch", "dw")  # w2t/baselines.py; each run scores those its task has


def print_results(task: str, metrics: dict[str, float], out_dir: Path, name: str = "w2t") -> None:
    """One row per method: the trained model (`name`), then each baseline found in `metrics`."""
    keys = MAIN_KEYS[task]
    fusion = metrics.get("test/fusion")
    rows = [(f"{name} (trained)" if fusion is None else f"{name} (trained, sketch λ={fusion:.2f})", "test/")]
    if fusion is not None:
        rows.append((f"{name}: learned part alone", "test/learned/"))
    rows += [(f"baseline: {b}", f"test/baseline_{b}/") for b in BASELINES if any(k.startswith(f"test/baseline_{b}/") for k in metrics)]
    table = Table(title=f"{task} — test split ({int(metrics.get('train_adapters', 0))} training adapters)")
    table.add_column("method")
    for k in keys:
        table.add_column(k, justify="right")
    for name, prefix in rows:
        table.add_row(name, *(f"{metrics.get(prefix + k, float('nan')):.4f}" for k in keys))
    console = Console()
    console.print(table)
    console.print(f"metrics: {out_dir / 'metrics.json'}")


def save_plots(model, dm, task: str, out_dir: Path, loggers=()) -> list[Path]:
    test = dm.whole_split("test")
    with torch.no_grad():
        out = model(test["tokens"]).float()
    keep = test["in_split"] & (test["is_query"] if task == "retrieval" else True)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if task == "performance":
        y, p = test["target"][keep].numpy(), out[keep].numpy()
        ax.scatter(y, p, s=12, alpha=0.7)
        lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(xlabel="true", ylabel="predicted", title="performance prediction (test)")
        name = "pred_vs_true.png"
    elif task == "classification" and not model.task.multilabel:
        y, p = test["label"][keep].numpy(), out[keep].argmax(-1).numpy()
        n = model.task.n
        cm = np.zeros((n, n), int)
        np.add.at(cm, (y, p), 1)
        ax.imshow(cm, cmap="Blues")
        classes = dm.info.classes
        ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title="confusion matrix (test)")
        ax.set_xticklabels(classes, rotation=45, ha="right")
        ax.set_yticklabels(classes)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7)
        name = "confusion_matrix.png"
    elif task == "classification":
        from torchmetrics.functional.classification import multilabel_auroc

        per = multilabel_auroc(torch.sigmoid(out[keep]), test["labels"][keep].long(), num_labels=model.task.n, average="none")
        ax.bar(range(model.task.n), per.numpy())
        ax.set_xticks(range(model.task.n))
        ax.set_xticklabels(dm.info.label_columns, rotation=45, ha="right")
        ax.set(ylim=(0, 1), ylabel="AUROC", title="per-label AUROC (test)")
        name = "per_label_auroc.png"
    else:
        z = out[test["in_split"]].double()
        z = z - z.mean(0)
        _, _, V = torch.linalg.svd(z, full_matrices=False)
        xy = (z @ V[:2].T).numpy()
        ax.scatter(xy[:, 0], xy[:, 1], c=test["group"][test["in_split"]].numpy(), cmap="tab20", s=14)
        ax.set(xlabel="PC 1", ylabel="PC 2", title="test embeddings, colored by group")
        name = "embeddings_2d.png"
    fig.tight_layout()
    path = out_dir / name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.log_image(key=name.removesuffix(".png"), images=[str(path)])
    return [path]
