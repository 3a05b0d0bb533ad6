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


def print_results(task: str, metrics: dict[str, float], out_dir: Path, name: str, about: str) -> None:
    """One row per method: the trained model (`name`), then each baseline found in `metrics`; then `about`
    (what was trained on, or which checkpoint and collection were scored) and where the metrics are.
    A job of a multirun prints nothing: the multirun says one line per job (w2t/train/sweep.py)."""
    if _in_multirun():
        return
    keys = TASKS[task].columns
    rows = [(f"{name} (trained)", "test/")]
    rows += [(f"baseline: {b}", f"test/baseline_{b}/") for b in TASKS[task].baselines
             if any(k.startswith(f"test/baseline_{b}/") for k in metrics)]
    if (best := TASKS[task].best_baseline(metrics)) is not None:
        rows.append((f"best baseline (on val): {best}", f"test/baseline_{best}/"))
    table = Table(title=f"{task} — test split")
    table.add_column("method")
    for k in keys:
        table.add_column(k, justify="right")
    for row_name, prefix in rows:
        table.add_row(row_name, *(f"{metrics.get(prefix + k, float('nan')):.4f}" for k in keys))
    console = Console()
    console.print(table)
    console.print(about, highlight=False)
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
