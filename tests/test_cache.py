"""Token cache: built once, resumable, atomic, bad adapters skipped and reported, strict stops."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import w2t.data.cache as cache_mod
from w2t.data.cache import CacheOptions, TokenCache, load_entry
import w2t.canon.representation as representation
from w2t.canon.canonical import canonicalize_adapter
from w2t.data.collection import read_metadata
from w2t.errors import W2TError
from w2t.io.formats import load_adapter


@pytest.fixture
def items(tiny_collection):
    table = read_metadata(tiny_collection)
    return list(zip(table["adapter_id"].astype(str), table["abs_path"]))


@pytest.fixture
def counted(monkeypatch):
    """Count real canonicalizations (the build runs in-process for small collections)."""
    calls = []

    def counting(adapter, **kw):
        calls.append(adapter.path)
        return canonicalize_adapter(adapter, **kw)

    monkeypatch.setattr(representation, "canonicalize_adapter", counting)  # what the cache build calls
    return calls


def test_second_build_canonicalizes_nothing(items, tmp_path, counted):
    cache = TokenCache(tmp_path)
    first = cache.build(items)
    assert first.built == len(items) == len(counted) and not first.failed
    second = cache.build(items)
    assert second.built == 0 and second.reused == len(items)
    assert len(counted) == len(items), "the second build must not canonicalize"
    assert second.entries == first.entries


def test_entry_round_trip(items, tmp_path):
    cache = TokenCache(tmp_path)
    report = cache.build(items[:1])
    mods = load_entry(report.entries[items[0][0]])
    ref = canonicalize_adapter(load_adapter(items[0][1]))
    assert [(m.module_type, m.layer) for m in mods] == [(m.module_type, m.layer) for m in ref]
    for a, b in zip(mods, ref):
        assert torch.equal(a.mask, b.mask)
        assert (a.U.double() - b.U).abs().max() < 1e-6 and (a.S.double() - b.S).abs().max() < 1e-6 * b.S.max()


def test_half_precision_storage_cost(items, tmp_path):
    """float16/bfloat16 storage halves the cache; measured token error stays at their precision."""
    ref = {m.module_type + str(m.layer): m for m in canonicalize_adapter(load_adapter(items[0][1]))}
    for dtype, tol in (("float16", 2e-3), ("bfloat16", 1.6e-2)):
        report = TokenCache(tmp_path / dtype, CacheOptions(dtype=dtype)).build(items[:1])
        for m in load_entry(report.entries[items[0][0]]):
            r = ref[m.module_type + str(m.layer)]
            assert (m.U.double() - r.U).abs().max() < tol
            assert ((m.S.double() - r.S).abs() / r.S.max()).max() < tol


def test_bad_adapter_in_the_middle_is_skipped_and_reported(items, tmp_path, tiny_collection):
    work = tmp_path / "coll"
    shutil.copytree(tiny_collection, work)
    bad_id = items[len(items) // 2][0]
    table = read_metadata(work)
    bad_path = table.set_index("adapter_id").loc[bad_id, "abs_path"]
    weights = next(Path(bad_path).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated file
    work_items = list(zip(table["adapter_id"].astype(str), table["abs_path"]))
    cache = TokenCache(tmp_path / "cache")
    report = cache.build(work_items)
    assert [f["adapter_id"] for f in report.failed] == [bad_id]
    assert "AdapterFormatError" in report.failed[0]["error"] and str(weights.name) in report.failed[0]["error"]
    assert len(report.entries) == len(items) - 1
    on_disk = json.loads((cache.dir / "report.json").read_text())
    assert on_disk["failed"][0]["adapter_id"] == bad_id
    again = cache.build(work_items)
    assert again.built == 0 and [f["adapter_id"] for f in again.failed] == [bad_id]
    with pytest.raises(W2TError, match="AdapterFormatError"):
        TokenCache(tmp_path / "strict").build(work_items, strict=True)


def test_interrupted_build_leaves_no_corrupt_entry_and_resumes(items, tmp_path, monkeypatch):
    real_save = cache_mod.save_file
    n = {"calls": 0}

    def dying_save(tensors, filename, metadata=None):
        n["calls"] += 1
        if n["calls"] == 4:
            with open(filename, "wb") as f:  # half-written temporary file, then the process "dies"
                f.write(b"garbage")
            raise KeyboardInterrupt
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(cache_mod, "save_file", dying_save)
    cache = TokenCache(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cache.build(items)
    files = [p for p in cache.dir.rglob("*") if p.is_file()]
    assert len(files) == 3 and all(p.suffix == ".safetensors" for p in files), "only complete entries remain"
    for p in files:
        load_entry(p)
    monkeypatch.setattr(cache_mod, "save_file", real_save)
    resumed = cache.build(items)
    assert resumed.reused == 3 and resumed.built == len(items) - 3


def test_cache_key_tracks_content_and_options(items, tmp_path, tiny_collection):
    a = TokenCache(tmp_path)
    b = TokenCache(tmp_path, CacheOptions(sign_rule=False))
    assert a.dir != b.dir
    h1 = cache_mod.content_hash(items[0][1])
    assert h1 == cache_mod.content_hash(items[0][1]) and h1 != cache_mod.content_hash(items[1][1])
