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
    full = TokenCache(tmp_path / "float32").build(items[:1]).entries[items[0][0]].stat().st_size
    for dtype, tol in (("float16", 2e-3), ("bfloat16", 1.6e-2)):
        report = TokenCache(tmp_path / dtype, CacheOptions(dtype=dtype)).build(items[:1])
        assert report.entries[items[0][0]].stat().st_size < 0.6 * full
        for m in load_entry(report.entries[items[0][0]]):
            assert m.U.dtype == m.S.dtype == m.V.dtype == getattr(torch, dtype)
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
    real_save = cache_mod.write_ipc
    n = {"calls": 0}

    def dying_save(table, filename):
        n["calls"] += 1
        if n["calls"] == 4:
            with open(filename, "wb") as f:  # half-written temporary file, then the process "dies"
                f.write(b"garbage")
            raise KeyboardInterrupt
        return real_save(table, filename)

    monkeypatch.setattr(cache_mod, "write_ipc", dying_save)
    cache = TokenCache(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cache.build(items)
    files = [p for p in cache.dir.rglob("*") if p.is_file()]
    assert len(files) == 3 and all(p.suffix == ".arrow" for p in files), "only complete entries remain"
    for p in files:
        load_entry(p)
    monkeypatch.setattr(cache_mod, "write_ipc", real_save)
    resumed = cache.build(items)
    assert resumed.reused == 3 and resumed.built == len(items) - 3


def test_cache_key_tracks_content_and_options(items, tmp_path, tiny_collection):
    a = TokenCache(tmp_path)
    b = TokenCache(tmp_path, CacheOptions(sign_rule=False))
    assert a.dir != b.dir
    h1 = cache_mod.content_hash(items[0][1])
    assert h1 == cache_mod.content_hash(items[0][1]) and h1 != cache_mod.content_hash(items[1][1])


@pytest.mark.parametrize("stamp", ["READER_VERSION", "KEYS_VERSION", "CANON_VERSION"])
def test_a_new_reader_naming_rule_or_canonicalization_rebuilds(stamp, items, tmp_path, monkeypatch, counted):
    """Each version stamp is part of the cache key: bumping one reads every adapter again."""
    TokenCache(tmp_path).build(items[:3])
    assert TokenCache(tmp_path).build(items[:3]).reused == 3
    monkeypatch.setattr(cache_mod, stamp, getattr(cache_mod, stamp) + 1)
    again = TokenCache(tmp_path).build(items[:3])
    assert again.built == 3 and again.reused == 0 and len(counted) == 6


def test_a_cached_failure_is_retried_once_the_reading_code_changes(items, tmp_path, monkeypatch):
    bad_id, bad_path = items[0]
    real_load = cache_mod.load_adapter

    def broken_reader(path, **kw):  # a reader bug that refuses one good adapter
        if str(path) == str(bad_path):
            raise W2TError("refused by a reader bug", path)
        return real_load(path, **kw)

    monkeypatch.setattr(cache_mod, "load_adapter", broken_reader)
    first = TokenCache(tmp_path).build(items[:3])
    assert [f["adapter_id"] for f in first.failed] == [bad_id]
    monkeypatch.setattr(cache_mod, "load_adapter", real_load)  # the bug is fixed...
    same_code = TokenCache(tmp_path).build(items[:3])
    assert [f["adapter_id"] for f in same_code.failed] == [bad_id], "...but this code version recorded the failure"
    monkeypatch.setattr(cache_mod, "reading_code_version", lambda: "fixed")  # ...and the code that reads changed
    fixed = TokenCache(tmp_path).build(items[:3])
    assert not fixed.failed and fixed.built == 1 and bad_id in fixed.entries


KILLED_BUILD = """
import os, signal, sys
import w2t.data.cache as cache_mod
from w2t.data.cache import TokenCache
from w2t.data.collection import read_metadata

real_save, calls = cache_mod.write_ipc, []

def save_then_die(table, filename):
    calls.append(filename)
    if len(calls) == 4:  # half of the fourth entry is on disk when the process is killed
        with open(filename, "wb") as f:
            f.write(b"half an entry")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(table, filename)

cache_mod.write_ipc = save_then_die
table = read_metadata(sys.argv[1])
TokenCache(sys.argv[2]).build(list(zip(table["adapter_id"], table["abs_path"])), workers=1)
"""


def test_a_build_killed_by_sigkill_leaves_no_temporary_file_after_the_next_build(items, tiny_collection, tmp_path):
    import signal
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(tiny_collection), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    cache = TokenCache(tmp_path / "cache")
    assert len(list(cache.dir.rglob("*.tmp"))) == 1 and len(list(cache.dir.rglob("*.arrow"))) == 3
    report = cache.build(items)
    assert report.built == len(items) - 3 and report.reused == 3 and not report.failed
    assert not list(cache.dir.rglob("*.tmp")), "the next build removes what the killed one left"
    clean = TokenCache(tmp_path / "clean").build(items)
    for adapter_id, _ in items:  # consistent: every entry equals the one a clean build writes
        got, ref = load_entry(report.entries[adapter_id]), load_entry(clean.entries[adapter_id])
        assert all(torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.V, b.V) for a, b in zip(got, ref))


def test_a_corrupt_entry_is_named_not_misread(items, tmp_path):
    report = TokenCache(tmp_path).build(items[:1])
    entry = report.entries[items[0][0]]
    entry.write_bytes(entry.read_bytes()[:100])
    with pytest.raises(W2TError, match=f"{entry.name}.*unreadable cache entry"):
        load_entry(entry)
