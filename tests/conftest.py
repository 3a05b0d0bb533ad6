"""Shared fixtures and checks."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `digits_tiny` default collection (24 real PEFT LoRAs), built once per test session."""
    from w2t.zoo import ensure_collection

    return ensure_collection("digits_tiny", tmp_path_factory.mktemp("collections"))


def assert_a_recorded_build(root: Path, hashes: str) -> None:
    """The collection in `root` has the manifest and file bytes of one of the builds recorded in tests/data/`hashes`
    (machines whose CPUs run other float kernels build other bytes), and its recipe.json records that manifest."""
    from w2t.zoo.builder import manifest_hash

    builds = json.loads((Path(__file__).parent / "data" / hashes).read_text())["builds"]
    manifest = manifest_hash(root)
    match = [b for b in builds if b["manifest"] == manifest]
    assert match, f"manifest {manifest} is none of the recorded builds {[b['manifest'] for b in builds]}"
    assert {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in match[0]["files"]} == match[0]["files"]
    assert json.loads((root / "recipe.json").read_text())["manifest"] == manifest
