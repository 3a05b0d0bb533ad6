"""The third default collection, `digits_cnn`: real PEFT conv LoRAs of a small CNN on digit pairs."""
from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_a_recorded_build
from w2t.data.collection import read_metadata
from w2t.zoo import ensure_collection, make_recipe
from w2t.zoo.builder import manifest_hash
from w2t.zoo.digits_cnn import CONVS, PAIRS, TARGETS, load_base, pair_accuracy, plan

TINY = "digits_cnn_tiny"
KEY = re.compile(r"base_model\.model\.(conv1|conv2|conv3|proj)\.lora_([AB])\.weight")
SHAPES = {"conv1": (16, 1, 3), "conv2": (32, 16, 3), "conv3": (32, 32, 3), "proj": (64, 32, 1)}  # c_out, c_in, k


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return ensure_collection(TINY, tmp_path_factory.mktemp("cnn"), workers=2)


def test_tiny_collection_reads_with_every_column(built):
    table = read_metadata(built)
    recipe = make_recipe(TINY)
    assert len(table) == len(recipe.tasks) * recipe.adapters_per_task
    for name in ("base_model.safetensors", "base_config.json", "recipe.json", "metadata.csv"):
        assert (built / name).is_file()
    expected = {"path", "adapter_id", "task", "positive", "negative", "role", "rank", "alpha", "rslora", "lr",
                "steps", "n_train", "targets", "seed", "accuracy", *(f"digit_{d}" for d in range(10))}
    assert expected <= set(table.columns)
    assert (table.groupby("task")["role"].nunique() == 2).all()  # queries and gallery per task
    assert ((table["role"] == "query") == (table["n_train"] <= 16)).all()
    for row in table.itertuples():
        assert row.task == f"{row.positive}-vs-{row.negative}"
        assert [getattr(row, f"digit_{d}") for d in range(10)] == [int(d in (row.positive, row.negative))
                                                                 for d in range(10)]
    assert table["accuracy"].between(0, 1).all() and table["accuracy"].max() > 0.9


def test_adapters_are_peft_conv_loras(built):
    for row in read_metadata(built).itertuples():
        config = json.loads((Path(row.abs_path) / "adapter_config.json").read_text())
        assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == \
            ("LORA", row.rank, row.alpha, bool(row.rslora))
        seen = Counter()
        for key, tensor in load_file(Path(row.abs_path) / "adapter_model.safetensors").items():
            module, factor = KEY.fullmatch(key).groups()
            c_out, c_in, k = SHAPES[module]
            assert tuple(tensor.shape) == ((row.rank, c_in, k, k) if factor == "A" else (c_out, row.rank, 1, 1))
            assert torch.isfinite(tensor).all()
            seen[module] += 1
        assert seen == {m: 2 for m in TARGETS[row.targets]}


def test_token_schema_has_the_conv_modules_and_reads_them_exactly(built, tmp_path):
    """The data module sees one token group per conv (flattened: c_out × c_in·k·k), and w2t's reader gives
    PEFT's own ΔW, rsLoRA scale included."""
    from peft import PeftModel

    from w2t.data.datamodule import AdapterDataModule
    from w2t.io.formats import load_adapter

    dm = AdapterDataModule(root=str(built), data_dir=str(tmp_path), cache_workers=1, group_column="task",
                           role_column="role")
    dm.prepare_data()
    dm.setup()
    groups = {g.module_type: (g.m, g.n) for g in dm.schema.groups}
    assert groups == {m: (c_out, c_in * k * k) for m, (c_out, c_in, k) in SHAPES.items()}

    table = read_metadata(built)
    base, _ = load_base(built)
    for row in (table[table["rslora"] == 1].iloc[0], table[table["rslora"] == 0].iloc[0]):
        peft = PeftModel.from_pretrained(copy.deepcopy(base), row["abs_path"]).base_model.model
        for module in load_adapter(row["abs_path"]).modules:
            expected = getattr(peft, module.module_type).get_delta_weight("default").flatten(1)
            torch.testing.assert_close(module.scale * module.B @ module.A, expected)


def test_adapters_do_what_their_metadata_says(built):
    """Reloading base + adapter reproduces the recorded held-out accuracy; the base alone does worse."""
    from peft import PeftModel

    table = read_metadata(built)
    base, data = load_base(built)
    for _, row in table.loc[table.groupby("task")["accuracy"].idxmax()].iterrows():
        model = PeftModel.from_pretrained(copy.deepcopy(base), row["abs_path"])
        assert pair_accuracy(model, base.probe, data, row["positive"], row["negative"]) == \
            pytest.approx(row["accuracy"], abs=1e-4)
        assert pair_accuracy(base, base.probe, data, row["positive"], row["negative"]) < row["accuracy"]


def test_build_is_deterministic_and_matches_the_committed_bytes(built, tmp_path):
    """One thread and deterministic kernels: a second build with one worker gives the same manifest, and both
    the bytes of one of the recorded builds (torch 2.13.0 on x86_64 CPUs that run other float kernels differ)."""
    again = ensure_collection(TINY, tmp_path, workers=1)
    assert manifest_hash(again) == manifest_hash(built)
    assert_a_recorded_build(built, "digits_cnn_tiny_hashes.json")


def test_full_recipe_plan():
    jobs = plan(make_recipe("digits_cnn"))
    assert len(jobs) == 360 and jobs == plan(make_recipe("digits_cnn")) != plan(make_recipe("digits_cnn", seed=1))
    assert len({j.task for j in jobs}) == 45 and len({j.adapter_id for j in jobs}) == 360
    assert {frozenset(p) for p in PAIRS} == {frozenset((a, b)) for a in range(10) for b in range(a + 1, 10)}
    assert sorted(Counter(p for p, _ in PAIRS).values()) == [4] * 5 + [5] * 5  # every digit positive 4-5 times
    assert {j.rank for j in jobs} == {1, 3, 6} and {j.alpha for j in jobs} == {4, 16}
    assert 0.2 < sum(j.rslora for j in jobs) / len(jobs) < 0.45
    assert set(Counter(j.targets for j in jobs)) == set(TARGETS) and set(TARGETS["all"]) == set(CONVS)
    assert Counter(j.task for j in jobs if j.role == "query") == {t: 2 for t in {j.task for j in jobs}}
