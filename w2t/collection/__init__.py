"""LoRA collections: reading one (DESIGN §4) and building the default ones from real training."""
from __future__ import annotations

from pathlib import Path

from w2t.collection import digits, minilm_text
from w2t.collection.building import disk_usage
from w2t.collection.digits import Recipe, make_recipe
from w2t.collection.metadata import METADATA_FILES, Collection, read_metadata
from w2t.errors import CollectionError

# name -> builder: digits (a ViT trained here) and minilm_text (a pretrained text model)
BUILDERS = {"digits": digits.ensure_collection, "digits_tiny": digits.ensure_collection,
            **{name: minilm_text.ensure_collection for name in minilm_text.RECIPES}}


def ensure_collection(name: str = "digits", root: str | Path = "data", *,
                      workers: int | None = None, seed: int = 0, force: bool = False) -> Path:
    """Return `root/name`, building the named default collection first if needed."""
    if name not in BUILDERS:
        raise CollectionError(f"unknown default collection {name!r}; choose from {tuple(BUILDERS)}")
    return BUILDERS[name](name, root, workers=workers, seed=seed, force=force)


__all__ = ["BUILDERS", "Collection", "METADATA_FILES", "Recipe", "disk_usage",
           "ensure_collection", "make_recipe", "read_metadata"]
