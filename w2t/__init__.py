"""w2t: learn what a LoRA adapter does by reading its weights (see DESIGN.md)."""
from w2t.adapter import Adapter, LoraModule
from w2t.canonical import CanonicalForm, canonicalize
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
from w2t.formats import load_adapter

__all__ = [
    "Adapter",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "CanonicalForm",
    "CollectionError",
    "InvalidValueError",
    "LoraModule",
    "MissingFactorError",
    "NoLoraKeysError",
    "PickleRefusedError",
    "SchemaError",
    "ShapeMismatchError",
    "W2TError",
    "canonicalize",
    "load_adapter",
]
