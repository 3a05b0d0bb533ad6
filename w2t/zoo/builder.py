"""What every collection builder shares: recipes, deterministic training, worker pools, one build at a time.

A builder (digits, minilm_text) is a `Recipe` dataclass and a `build(recipe, dest, workers)` that
trains its adapters through `pooled_map` under `deterministic`; `ensure_built` runs it under
`build_lock` into a hidden partial folder and renames that into place once `built_hash` says the
recipe changed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from itertools import repeat
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any, ClassVar

import torch

from w2t.io.files import exclusive_lock

log = logging.getLogger(__name__)


class RecipeBase:
    """A frozen dataclass of everything that determines a collection's bytes; its hash decides when to rebuild."""

    name: str
    version: ClassVar[int]  # bump whenever the build code changes what a recipe produces

    def to_dict(self) -> dict:
        return {"recipe_version": self.version, **asdict(self)}

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def deterministic() -> Iterator[None]:
    """Train on one thread with deterministic kernels, in this process and in every worker: the same
    bytes whatever the machine's core count, named by the collection's manifest hash."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)


def _deterministic_worker(init: Callable[..., None], *args: Any) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    init(*args)


@contextmanager
def pooled_map(fn: Callable[..., Any], jobs: Iterable, *args: Any, init: Callable[..., None],
               init_args: tuple, clear: Callable[[], None], workers: int,
               chunksize: int = 1) -> Iterator[Iterator]:
    """`fn(job, *args)` for every job, in order, run here or by `workers` forked processes.

    `init(*init_args)` sets up the worker state `fn` reads (once per process); with one worker it
    runs here and `clear()` drops that state on exit. `pool.map` submits every job at once, so
    all workers fork here, before a progress bar starts its refresh thread (a fork must not copy
    a lock that thread holds). On exit, error or Ctrl-C included, queued jobs are cancelled
    instead of run.
    """
    constant = [repeat(a) for a in args]
    if workers == 1:
        init(*init_args)
        try:
            yield map(fn, jobs, *constant)
        finally:
            clear()
        return
    import peft  # noqa: F401  imported once here so that forked workers inherit it (~5 s each)

    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=get_context(method), initializer=_deterministic_worker,
                               initargs=(init, *init_args))
    try:
        yield pool.map(fn, jobs, *constant, chunksize=chunksize)
    finally:
        pool.shutdown(cancel_futures=True)


def plan_jobs(recipe: Any, groups: Iterable, per_group: int, prefix: str,
              make_job: Callable[[str, Any, str, dict], Any]) -> list:
    """Every adapter of a recipe, in a fixed order from its seed: `make_job(adapter_id, group, role,
    hyperparameters)` for `per_group` adapters of each group. The first `query_fraction` of each group
    are few-shot (role `query`), so every group has queries to retrieve with and a gallery trained on
    more data to retrieve from."""
    rng = random.Random(recipe.seed)
    n_query = max(1, round(per_group * recipe.query_fraction))
    jobs = []
    for group in groups:
        for k in range(per_group):
            role = "query" if k < n_query else "gallery"
            jobs.append(make_job(f"{prefix}{len(jobs):04d}", group, role, sample_training(rng, recipe, role)))
    return jobs


def sample_training(rng: random.Random, recipe: Any, role: str) -> dict:
    """One adapter's rank, alpha, lr, steps, n_train, targets and seed, drawn from the recipe's ranges in
    this fixed order (a recipe's plan depends on it). Queries are trained few-shot (`query_n_train`).

    lora_alpha is `alpha_factors` × rank, or one of the fixed values `alphas` where a recipe has them;
    a recipe with an `rslora` share also draws `rslora` (0/1, PEFT's use_rslora), last."""
    rank = rng.choice(recipe.ranks)
    alphas = getattr(recipe, "alphas", None)
    names, weights = zip(*recipe.targets)
    log_lr = [math.log10(x) for x in recipe.lr_range]
    hyper = dict(rank=rank, alpha=rng.choice(alphas) if alphas else rank * rng.choice(recipe.alpha_factors),
                 lr=float(f"{10 ** rng.uniform(*log_lr):.3g}"), steps=rng.choice(recipe.steps),
                 n_train=rng.choice(recipe.query_n_train if role == "query" else recipe.gallery_n_train),
                 targets=rng.choices(names, weights)[0], seed=rng.randrange(2**31))
    if getattr(recipe, "rslora", None) is not None:
        hyper["rslora"] = int(rng.random() < recipe.rslora)
    return hyper


MANIFEST_FILES = ("*.safetensors", "metadata.csv")  # the weights and the measured labels: what runs read


def manifest_hash(folder: str | Path) -> str:
    """sha256 over the weight files and the metadata of a built collection (path and bytes of each).

    Configs and model cards are left out: PEFT writes its own version and set-ordered lists into them."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(p for pattern in MANIFEST_FILES for p in folder.rglob(pattern)):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def built_hash(folder: Path) -> str | None:
    """The recipe hash a finished build recorded in `folder`, or None if there is none."""
    try:
        return json.loads((folder / "recipe.json").read_text())["hash"]
    except (OSError, ValueError, KeyError):
        return None


@contextmanager
def build_lock(root: Path, name: str) -> Iterator[None]:
    """Serialize builds of one collection across processes (parallel sweep jobs, test workers).

    Holding the lock, a leftover folder of a replaced collection belongs to a killed build: remove it.
    """
    with exclusive_lock(root / f".{name}.lock") as held:  # no flock (Windows): builds still end in one valid folder
        if held:
            for stale in root.glob(f".{name}.old-*"):
                shutil.rmtree(stale, ignore_errors=True)
        yield


def available_cores() -> int:
    """Cores this process may use (a container's CPU affinity, not the host's core count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def disk_usage(folder: str | Path) -> int:
    """Bytes the folder occupies on disk (allocated blocks, like `du`)."""
    return sum(p.stat().st_blocks * 512 for p in Path(folder).rglob("*"))


def ensure_built(recipe: RecipeBase, root: str | Path, build: Callable[[Any, Path, int], Any], *,
                 workers: int | None = None, force: bool = False) -> Path:
    """Return `root/recipe.name`, building it first if absent or built from another recipe.

    Adapters are trained into `.{name}.partial-{hash}`, kept across interruptions (a builder may skip
    what is already there); the finished folder is renamed into place at once, so a reader never
    finds half a collection.
    """
    root = Path(root)
    name = recipe.name
    target = root / name
    if not force and built_hash(target) == recipe.hash:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with build_lock(root, name):
        if not force and built_hash(target) == recipe.hash:  # built while we waited
            return target
        partial = root / f".{name}.partial-{recipe.hash}"
        for stale in root.glob(f".{name}.partial-*"):  # from another recipe: never resumable
            if stale != partial:
                shutil.rmtree(stale)
        partial.mkdir(mode=0o755, exist_ok=True)
        start = time.perf_counter()
        build(recipe, partial, workers or min(available_cores(), 8))
        manifest = manifest_hash(partial)
        (partial / "recipe.json").write_text(json.dumps({**recipe.to_dict(), "hash": recipe.hash, "manifest": manifest},
                                                        indent=2))
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=root))
            target.rename(old / name)
            partial.rename(target)
            shutil.rmtree(old)
        else:
            partial.rename(target)
        log.info("built %s in %.1f s: manifest %s", target, time.perf_counter() - start, manifest)
    return target
