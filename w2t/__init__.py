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

The public names below are imported on first use, so `import w2t.<stage>` pays only for that stage.
"""
from importlib import import_module

_PUBLIC = {
    "Adapter": "w2t.io.adapter",
    "LoraModule": "w2t.io.adapter",
    "load_adapter": "w2t.io.formats",
    "CanonicalForm": "w2t.canon.canonical",
    "CanonicalModule": "w2t.canon.canonical",
    "canonicalize": "w2t.canon.canonical",
    "canonicalize_adapter": "w2t.canon.canonical",
    "Collection": "w2t.data.collection",
    "CacheOptions": "w2t.data.cache",
    "TokenCache": "w2t.data.cache",
    "load_pretrained": "w2t.models",
    **{name: "w2t.errors" for name in (
        "AdapterFormatError", "AdapterNotFoundError", "CollectionError", "InvalidValueError", "MissingFactorError",
        "NoLoraKeysError", "PickleRefusedError", "RankLimitError", "SchemaError", "ShapeMismatchError", "W2TError")},
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'w2t' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
