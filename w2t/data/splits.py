"""Seeded train/val/test splits over adapter ids, saved as a manifest in the run directory.

`group` splits whole groups (open-set: the test tasks are never seen in training), so adapters of
one task or seed never straddle train and test; `stratified` keeps label proportions; a
`split_column` in the metadata overrides both.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from w2t.errors import CollectionError

SPLITS = ("train", "val", "test")
METHODS = ("random", "stratified", "group")


def _cut(n: int, val_frac: float, test_frac: float) -> tuple[int, int]:
    n_test = max(1, round(n * test_frac)) if test_frac > 0 else 0
    n_val = max(1, round(n * val_frac)) if val_frac > 0 else 0
    if n_test + n_val >= n:
        raise CollectionError(f"cannot split {n} units into train/val/test with val={val_frac}, test={test_frac}")
    return n_val, n_test


def make_splits(
    table: pd.DataFrame,
    *,
    method: str = "random",
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    seed: int = 0,
    stratify_column: str | None = None,
    group_column: str | None = None,
    split_column: str | None = None,
) -> dict[str, list[str]]:
    """Return {"train": ids, "val": ids, "test": ids} over `table.adapter_id`."""
    ids = table["adapter_id"].astype(str).to_numpy()
    if split_column:
        if split_column not in table:
            raise CollectionError(f"split_column '{split_column}' is not a metadata column")
        values = table[split_column].astype(str).str.lower()
        bad = sorted(set(values) - set(SPLITS))
        if bad:
            raise CollectionError(f"split_column '{split_column}' has values {bad}; expected train/val/test")
        return {s: ids[(values == s).to_numpy()].tolist() for s in SPLITS}
    if method not in METHODS:
        raise ValueError(f"split method must be one of {METHODS}, got {method!r}")
    rng = np.random.default_rng(seed)

    if method == "group":
        if not group_column or group_column not in table:
            raise CollectionError(f"split method 'group' needs data.group_column (got {group_column!r})")
        groups = table[group_column].astype(str).to_numpy()
        uniq = np.array(sorted(set(groups)))
        rng.shuffle(uniq)
        n_val, n_test = _cut(len(uniq), val_frac, test_frac)
        split_of = {g: "test" for g in uniq[:n_test]} | {g: "val" for g in uniq[n_test:n_test + n_val]}
        labels = np.array([split_of.get(g, "train") for g in groups])
        return {s: ids[labels == s].tolist() for s in SPLITS}

    if method == "stratified":
        if not stratify_column or stratify_column not in table:
            raise CollectionError(f"split method 'stratified' needs a label column (got {stratify_column!r})")
        strata = table[stratify_column].astype(str).to_numpy()
    else:
        strata = np.zeros(len(ids), dtype=object)
    labels = np.full(len(ids), "train", dtype=object)
    for value in sorted(set(strata)):  # shuffle and cut each stratum on its own
        idx = np.flatnonzero(strata == value)
        rng.shuffle(idx)
        n_val = round(len(idx) * val_frac)
        n_test = round(len(idx) * test_frac)
        labels[idx[:n_test]] = "test"
        labels[idx[n_test:n_test + n_val]] = "val"
    return {s: ids[labels == s].tolist() for s in SPLITS}


def write_manifest(splits: dict[str, list[str]], path: str | Path, **info) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**info, **{s: splits[s] for s in SPLITS}}, indent=1))
    return path
