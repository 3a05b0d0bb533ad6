"""What a run shows a person: the results table on the terminal and the task's plot in the run directory."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from w2t.tasks import TASKS  # noqa: E402


def print_results(task: str, metrics: dict[str, float], out_dir: Path, name: str = "w2t") -> None:
    """One row per method: the trained model (`name`), then each baseline found in `metrics`."""
    keys = TASKS[task].columns
    rows = [(f"{name} (trained)", "test/")]
    rows += [(f"baseline: {b}", f"test/baseline_{b}/") for b in TASKS[task].baselines
             if any(k.startswith(f"test/baseline_{b}/") for k in metrics)]
    table = Table(title=f"{task} — test split ({int(metrics.get('train_adapters', 0))} training adapters)")
    table.add_column("method")
    for k in keys:
        table.add_column(k, justify="right")
    for row_name, prefix in rows:
        table.add_row(row_name, *(f"{metrics.get(prefix + k, float('nan')):.4f}" for k in keys))
    console = Console()
    console.print(table)
    console.print(f"metrics: {out_dir / 'metrics.json'}")


def save_plots(model, dm, out_dir: Path, loggers=()) -> list[Path]:
    """The task's picture of the test split (`Task.plot`), also sent to wandb when it logs."""
    test = dm.whole_split("test")
    with torch.no_grad():
        out = model(test["tokens"]).float()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    path = out_dir / f"{model.task.plot(ax, out, test, dm.info)}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.log_image(key=path.stem, images=[str(path)])
    return [path]
