"""LoRA collections: reading one (DESIGN §4) and building the default one from real training."""
from w2t.collection.digits import Recipe, disk_usage, ensure_collection, make_recipe
from w2t.collection.metadata import METADATA_FILES, Collection, read_metadata

__all__ = ["Collection", "METADATA_FILES", "Recipe", "disk_usage", "ensure_collection",
           "make_recipe", "read_metadata"]
