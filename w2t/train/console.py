"""What the console shows during a run: one line per event, one results table, errors in one line.

Third-party noise the user cannot act on is filtered here, narrowly, by message: nowhere else.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import (
    BatchesProcessedColumn,
    CustomBarColumn,
    CustomTimeColumn,
    RichProgressBarTheme,
)
from rich.progress import TextColumn

from w2t.errors import W2TError

log = logging.getLogger("w2t")

# (category, message regex): deprecations inside Lightning, advice that does not apply to whole-split
# evaluation or to small collections, and torch's note on Lightning's own checkpoint pickles
_WARNINGS = (
    (Warning, r".*isinstance\(treespec, LeafSpec\)` is deprecated"),
    (Warning, r"The number of training batches \(\d+\) is smaller than the logging interval"),
    (Warning, r"Found \d+ module\(s\) in eval mode at the start of training"),  # a frozen encoder is meant so
    (Warning, r"No positive samples in targets"),  # a label absent from a small split: its AUROC term is 0
    (Warning, r"Detected pickle protocol \d+ in the checkpoint"),
    (Warning, r"Starting from v1\.9\.0, `tensorboardX` has been removed"),
    (Warning, r".*does not have many workers which may be a bottleneck"),  # tokens are in memory: workers do not help
)
_LOG_MESSAGES = ("💡 Tip:",)  # advertisements for other products


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(m in str(record.msg) for m in _LOG_MESSAGES)


def quiet() -> None:
    """Install the filters; give Lightning's loggers to the run's handlers (console and train.log), once."""
    for category, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):  # its own bare handler would print every line a second time
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):  # who logs the tips
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages())


def report_errors(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn`; a `W2TError` (bad input: it names the file and the fix) becomes one logged line, also in
    the run's train.log, and exit code 2. HYDRA_FULL_ERROR=1 keeps the traceback."""
    try:
        return fn(*args)
    except W2TError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", e)
        raise SystemExit(2) from None


class ProgressBar(RichProgressBar):
    """Lightning's rich bar on one line of an 80-column terminal: a 10-cell bar, no speed column, and the
    metrics (train loss and the monitored one) beside it instead of stacked under it."""

    def __init__(self, **kwargs: Any):
        super().__init__(theme=RichProgressBarTheme(metrics_text_delimiter=" ", metrics_format=".3f"), **kwargs)

    def configure_columns(self, trainer) -> list:
        return [TextColumn("[progress.description]{task.description}"),
                CustomBarColumn(bar_width=10, complete_style=self.theme.progress_bar,
                                finished_style=self.theme.progress_bar_finished, pulse_style=self.theme.progress_bar_pulse),
                BatchesProcessedColumn(style=self.theme.batch_progress), CustomTimeColumn(style=self.theme.time)]
