"""w2t: learn what a LoRA adapter does by reading its weights (docs/design.md).

The packages follow the data path:
    io      an adapter file → `Adapter` (A, B, scale per module)
    canon   `Adapter` → canonical rank components (uᵢ, σᵢ, vᵢ) of every ΔW
    data    a collection → cached tokens → splits → padded batches
    models  tokens → one adapter embedding
    tasks   embedding → predictions, metrics, baselines, plots
    train   a Hydra config → fit → test → metrics.json
    search  embeddings → a cosine index, `w2t-embed` / `w2t-search`
    zoo     builders of example collections (apart from the library)
"""
from w2t.canon.canonical import CanonicalForm, CanonicalModule, canonicalize, canonicalize_adapter
from w2t.data.cache import CacheOptions, TokenCache
from w2t.data.collection import Collection
from w2t.errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    CollectionError,
    InvalidValueError,
    MissingFactorError,
    NoLoraKeysError,
    PickleRefusedError,
    SchemaError,
    ShapeMismatchError,
    W2TError,
)
from w2t.io.adapter import Adapter, LoraModule
from w2t.io.formats import load_adapter
from w2t.models import load_pretrained

__all__ = [
    "Adapter",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "CacheOptions",
    "CanonicalForm",
    "CanonicalModule",
    "Collection",
    "CollectionError",
    "InvalidValueError",
    "LoraModule",
    "MissingFactorError",
    "NoLoraKeysError",
    "PickleRefusedError",
    "SchemaError",
    "ShapeMismatchError",
    "TokenCache",
    "W2TError",
    "canonicalize",
    "canonicalize_adapter",
    "load_adapter",
    "load_pretrained",
]
