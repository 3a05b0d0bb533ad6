"""What a run shows a person: the results table on the terminal and the task's plot in the run directory."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from w2t.canon.reparam import REPARAMS  # noqa: E402
from w2t.tasks import TASKS  # noqa: E402


def print_results(task: str, metrics: dict[str, float], out_dir: Path, name: str, about: str) -> None:
    """One row per method: the trained model (`name`), then each baseline found in `metrics`; then `about`
    (what was trained on, or which checkpoint and collection were scored) and where the metrics are.
    A job of a multirun prints nothing: the multirun says one line per job (w2t/train/sweep.py)."""
    if _in_multirun():
        return
    spec = TASKS[task]
    rows = [(f"{name} (trained)", "test/")]
    blend = metrics.get("blend_weight")
    if blend is not None:  # the trained model mixed with the fixed read, and alone
        rows = [(f"{name} (blend λ={blend:g})", "test/"), (f"{name} (alone)", "test_unblended/")]
    rows += [(f"baseline: {b}", f"test/baseline_{b}/") for b in spec.baselines
             if any(k.startswith(f"test/baseline_{b}/") for k in metrics)]
    notes = [about]
    if blend is not None:
        notes.append("blend λ: the best simple read's weight in the outputs (chosen on validation)")
    if (best := spec.best_baseline(metrics)) is not None:
        rows.append((f"best baseline: {best}", f"test/baseline_{best}/"))
        notes.append(f"best baseline: the simple read with the best validation {spec.primary}")
    reparam = metrics.get(f"test_reparam/{spec.primary}")  # the same test adapters, other factorizations
    if reparam is not None:
        notes.append(f"reparam: the model's {spec.primary} with the test adapters re-written as other factorizations "
                     f"of the same updates (the worst of {', '.join(REPARAMS)})")
    table = Table(title=f"{task} — test split")
    table.add_column("method")
    for k in spec.columns:
        table.add_column(k, justify="right")
    if reparam is not None:
        table.add_column("reparam", justify="right")
    for row_name, prefix in rows:
        cells = [f"{metrics.get(prefix + k, float('nan')):.4f}" for k in spec.columns]
        if reparam is not None:
            cells.append(f"{reparam:.4f}" if prefix == "test/" else "–")
        table.add_row(row_name, *cells)
    console = Console()
    console.print(table)
    console.print("\n".join(notes), highlight=False)
    console.print(f"metrics: {out_dir / 'metrics.json'}", highlight=False)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def save_plots(model, dm, out_dir: Path, metrics: dict[str, float], loggers=()) -> list[Path]:
    """The task's picture of the test split (`Task.plot`, its metric in the title), also sent to wandb."""
    test = dm.whole_split("test")
    with torch.no_grad():
        out = model(test["tokens"]).float()
    fig = plt.figure(figsize=(6, 5))
    path = out_dir / f"{model.task.plot(fig, out, test, dm.info, metrics)}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.log_image(key=path.stem, images=[str(path)])
    return [path]
