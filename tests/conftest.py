"""Shared fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `digits_tiny` default collection (24 real PEFT LoRAs), built once per test session."""
    from w2t.zoo import ensure_collection

    return ensure_collection("digits_tiny", tmp_path_factory.mktemp("collections"))
