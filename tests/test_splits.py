"""Splits: disjoint, seeded, group-safe, stratified, and `split_column` honored."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from w2t.errors import CollectionError
from w2t.data.splits import make_splits, write_manifest


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    n = 120
    return pd.DataFrame({
        "adapter_id": [f"a{i:03d}" for i in range(n)],
        "task": [f"t{i % 12}" for i in range(n)],
        "label": rng.choice(["x", "y", "z"], size=n, p=[0.6, 0.3, 0.1]),
    })


def test_disjoint_and_complete(table):
    s = make_splits(table, method="random", seed=1)
    ids = s["train"] + s["val"] + s["test"]
    assert sorted(ids) == sorted(table.adapter_id) and len(set(ids)) == len(ids)
    assert len(s["test"]) == 18 and len(s["val"]) == 18


def test_seeded(table):
    assert make_splits(table, seed=3) == make_splits(table, seed=3)
    assert make_splits(table, seed=3) != make_splits(table, seed=4)


def test_group_split_never_straddles(table):
    s = make_splits(table, method="group", group_column="task", seed=0)
    group_of = dict(zip(table.adapter_id, table.task))
    groups = {k: {group_of[a] for a in v} for k, v in s.items()}
    assert not groups["train"] & groups["test"]
    assert not groups["train"] & groups["val"] and not groups["val"] & groups["test"]
    assert groups["test"] and groups["val"]


def test_stratified_keeps_proportions(table):
    s = make_splits(table, method="stratified", stratify_column="label", seed=0, test_frac=0.25)
    label_of = dict(zip(table.adapter_id, table.label))
    test_labels = pd.Series([label_of[a] for a in s["test"]]).value_counts(normalize=True)
    overall = table.label.value_counts(normalize=True)
    for lab in overall.index:
        assert abs(test_labels.get(lab, 0) - overall[lab]) < 0.06


def test_split_column_overrides(table, tmp_path):
    table = table.assign(fold=["train"] * 100 + ["val"] * 10 + ["TEST"] * 10)
    s = make_splits(table, method="group", group_column="task", split_column="fold")
    assert s["test"] == [f"a{i:03d}" for i in range(110, 120)]
    path = write_manifest(s, tmp_path / "run" / "splits.json", seed=0)
    assert json.loads(path.read_text())["val"] == s["val"]
    with pytest.raises(CollectionError, match="holdout"):
        make_splits(table.assign(fold="holdout"), split_column="fold")


def test_group_split_needs_group_column(table):
    with pytest.raises(CollectionError, match="group_column"):
        make_splits(table, method="group")
