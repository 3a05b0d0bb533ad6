"""One progress bar for every long loop (cache builds, collection builds, embedding)."""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield from `items` with a rich bar on a terminal; silent when W2T_PROGRESS=0 or not a TTY."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    enabled = os.environ.get("W2T_PROGRESS", "auto") != "0" and (sys.stderr.isatty() or os.environ.get("W2T_PROGRESS") == "1")
    if not enabled or not total:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
