"""Example collections, built from real training: a recipe in, a collection folder (docs/design.md §4) out.

Apart from the library: nothing in w2t needs them, except that the default `data=` configs build one on first use.
"""
from __future__ import annotations

from pathlib import Path

from w2t.errors import CollectionError
from w2t.zoo import digits, digits_cnn, minilm_text
from w2t.zoo.builder import disk_usage, ensure_built

# name -> builder module: digits (a ViT trained here), minilm_text (a pretrained text model), digits_cnn (a CNN)
BUILDERS = {"digits": digits, "digits_tiny": digits, **{name: minilm_text for name in minilm_text.RECIPES},
            **{name: digits_cnn for name in digits_cnn.RECIPES}}


def make_recipe(name: str, seed: int = 0):
    if name not in BUILDERS:
        raise CollectionError(f"unknown default collection {name!r}; choose from {tuple(BUILDERS)}")
    return BUILDERS[name].make_recipe(name, seed)


def ensure_collection(name: str = "digits", root: str | Path = "data", *,
                      workers: int | None = None, seed: int = 0, force: bool = False) -> Path:
    """Return `root/name`, building the named default collection first if needed."""
    return ensure_built(make_recipe(name, seed), root, BUILDERS[name].build, workers=workers, force=force)


__all__ = ["BUILDERS", "disk_usage", "ensure_collection", "make_recipe"]
