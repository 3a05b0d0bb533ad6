"""Every failure on user input is a `W2TError` naming the file (and the key when there is one)."""
from __future__ import annotations


class W2TError(Exception):
    """Base class: `path` and `key` say where the problem is."""

    def __init__(self, message: str, path: object = None, key: str | None = None):
        self.path = None if path is None else str(path)
        self.key = key
        where = ""
        if self.path is not None:
            where += f"{self.path}: "
        if key is not None:
            where += f"key '{key}': "
        super().__init__(where + message)


class AdapterNotFoundError(W2TError, FileNotFoundError):
    """The adapter path (file or folder) does not exist or holds no weights file."""


class AdapterFormatError(W2TError):
    """The file cannot be parsed as safetensors (not safetensors, truncated, bad config)."""


class MissingFactorError(W2TError):
    """`lora_A` without `lora_B`, or the reverse."""


class ShapeMismatchError(W2TError):
    """Factor shapes disagree (B's columns vs A's rows, conv kernels, a config's `r`)."""


class RankLimitError(W2TError):
    """An exact factorization (LoHa, LoKr) is wider than the `max_rank` it was read with."""


class InvalidValueError(W2TError):
    """NaN/Inf values or a non-floating dtype."""


class NoLoraKeysError(W2TError):
    """The file holds no LoRA factors at all."""


class PickleRefusedError(W2TError):
    """A pickle-based file (`.bin`/`.pt`) was given without `allow_pickle=True`."""


class SchemaError(W2TError):
    """An adapter does not fit a token schema (a module no known type matches)."""


class CollectionError(W2TError):
    """A collection's metadata or layout breaks the format of docs/design.md §4."""
