"""Tasks: an adapter embedding in, predictions, metrics, baselines and plots out; found by name in `TASKS`.

Every module of this folder is imported here, so a task registers itself by being a file in it.
"""
import importlib
import pkgutil

from w2t.tasks.base import TASKS, Task, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TASKS", "Task", "register"]
