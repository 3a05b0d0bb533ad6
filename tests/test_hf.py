"""A collection exported as a datasets folder: the same rows, tokens and factors, and runs that score the same."""
from __future__ import annotations

import dataclasses
import json
import runpy
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from w2t.data.cache import CacheOptions, TokenCache, load_entry
from w2t.data.collection import read_metadata
from w2t.data.datamodule import AdapterDataModule
from w2t.data.hf import ExportedCollection
from w2t.errors import CollectionError
from w2t.io.formats import load_adapter
from w2t.train.run import evaluate, train

from test_train import TIMING, fast, make_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tiny_collection, tmp_path_factory):
    """(collection copy, its datasets folder, data dir): the copy's adapter files can be deleted by a test."""
    tmp = tmp_path_factory.mktemp("hf")
    work = tmp / "collection"
    shutil.copytree(tiny_collection, work)
    out = tmp / "digits_tiny_hf"
    export = runpy.run_path(str(ROOT / "scripts" / "export_collection.py"))["main"]
    assert export(["--out", str(out), f"data.root={work}", f"paths.data_dir={tmp / 'data'}"]) == out
    return work, out, tmp / "data"


def test_rows_tokens_and_factors_round_trip_exactly(exported):
    work, out, data_dir = exported
    hf = ExportedCollection(out, CacheOptions())
    table = read_metadata(work)
    pd.testing.assert_frame_equal(hf.table, table.drop(columns=["abs_path"]))
    report = TokenCache(data_dir / "cache").build(list(zip(table["adapter_id"], table["abs_path"])))
    assert hf.report.entries == {a: i for i, a in enumerate(table["adapter_id"])}
    for row, (adapter_id, path) in enumerate(zip(table["adapter_id"], table["abs_path"])):
        for got, ref in zip(hf.modules(row), load_entry(report.entries[adapter_id]), strict=True):
            assert (got.module_type, got.layer) == (ref.module_type, ref.layer)
            for f in ("U", "S", "V", "mask", "features"):
                a, b = getattr(got, f), getattr(ref, f)
                assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), f
        got, ref = hf.adapter(row), load_adapter(path)
        assert got.dtype == ref.dtype
        for a, b in zip(got.modules, ref.modules, strict=True):
            for f in dataclasses.fields(b):  # every field, so a new one must be carried too
                x, y = getattr(a, f.name), getattr(b, f.name)
                assert torch.equal(x, y) if isinstance(y, torch.Tensor) else x == y, f.name
    manifest = json.loads((out / "dataset_info.json").read_text())["description"]
    assert json.loads(manifest)["collection_manifest"] == hf.manifest["collection_manifest"] is not None


def test_a_run_on_the_folder_without_adapter_files_scores_as_one_on_the_collection(exported, tmp_path):
    """Retrieval reads the most of a collection: its raw baseline and re-factored scores read the factors."""
    work, out, data_dir = exported
    runs = {}
    for name, data in (("files", []), ("hf", ["data=hf", f"data.path={out}"])):
        if name == "hf":
            shutil.rmtree(work / "adapters")  # nothing left but the datasets folder
        runs[name] = tmp_path / name
        train(make_cfg(["experiment=retrieval", *fast(work, data_dir.parent, "trainer.max_epochs=1", *data)], runs[name]))
    a, b = (json.loads((runs[n] / "metrics.json").read_text()) for n in ("files", "hf"))
    assert "test/baseline_raw/mrr" in a and "test_reparam/bf16/mrr" in a
    assert {k: v for k, v in b.items() if k not in TIMING} == {k: v for k, v in a.items() if k not in TIMING}
    split_a, split_b = (json.loads((runs[n] / "splits.json").read_text()) for n in ("files", "hf"))
    assert all(split_a[s] == split_b[s] for s in ("train", "val", "test"))
    evaluated = tmp_path / "eval"  # eval.py finds the folder in the checkpoint, as it finds a collection
    cfg = make_cfg([f"paths.data_dir={data_dir}", f"ckpt_path={runs['hf'] / 'checkpoints' / 'best.ckpt'}"], evaluated,
                   config_name="eval")
    assert evaluate(cfg)["test/mrr"] == pytest.approx(b["test/mrr"])


def test_a_bad_folder_a_missing_column_or_other_options_say_which_folder(exported, tmp_path):
    import datasets

    _, out, _ = exported

    def refused(path, **options):
        with pytest.raises(CollectionError) as e:
            AdapterDataModule(path=str(path), **options).prepare_data()
        assert str(path) in str(e.value)
        return str(e.value)

    assert "not a datasets folder" in refused(tmp_path / "nowhere")
    datasets.Dataset.from_dict({"adapter_id": ["a"]}).save_to_disk(str(tmp_path / "other"))
    assert "not a w2t collection" in refused(tmp_path / "other")
    datasets.load_from_disk(str(out)).remove_columns(["factors"]).save_to_disk(str(tmp_path / "cut"))
    assert "['factors'] missing" in refused(tmp_path / "cut")
    assert "dtype='float32' there, 'float16' here" in refused(out, cache_dtype="float16")


def test_a_library_dataset_searches_through_its_faiss_index_as_the_torch_scan_does():
    pytest.importorskip("faiss")
    from w2t.search.hub import library_to_dataset, search_library
    from w2t.search.index import EmbeddingIndex

    gen = torch.Generator().manual_seed(0)
    embeddings, queries = torch.randn(200, 16, generator=gen) * 3, torch.randn(5, 16, generator=gen)
    ids = [f"a{i:03d}" for i in range(200)]
    scores, hits = search_library(library_to_dataset(embeddings, ids), queries, k=300)
    ref_scores, ref_hits = EmbeddingIndex(embeddings, ids).search(queries, k=300)
    assert hits == ref_hits and torch.allclose(scores, ref_scores, atol=1e-5)
