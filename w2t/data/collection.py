"""Reading a collection's metadata table (docs/design.md §4, a contract: keep it exactly)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from w2t.errors import CollectionError

METADATA_FILES = ("metadata.csv", "metadata.parquet", "metadata.jsonl")


def _read_table(file: Path) -> pd.DataFrame:
    try:
        if file.suffix == ".csv":
            # `path` and `adapter_id` stay strings: ids like "007" must not become 7
            return pd.read_csv(file, dtype={"path": str, "adapter_id": str})
        if file.suffix == ".parquet":
            return pd.read_parquet(file)
        # dtype=False: JSON types as written (ids stay strings, no guessed dates)
        return pd.read_json(file, lines=True, dtype=False)
    except (ValueError, OSError, ImportError) as err:
        raise CollectionError(f"cannot read the metadata table: {err}", file) from err


def read_metadata(root: str | Path) -> pd.DataFrame:
    """The metadata of the collection in `root`, one row per adapter.

    Adds `abs_path` (the adapter's absolute path) and `adapter_id` when absent (= `path`).
    Missing adapter files are not checked here: the reader reports them with their own error.
    """
    root = Path(root).resolve()
    found = [root / name for name in METADATA_FILES if (root / name).is_file()]
    if len(found) != 1:
        what = "no metadata file" if not found else f"several metadata files {found}"
        raise CollectionError(f"{what}; a collection holds exactly one of "
                              f"{', '.join(METADATA_FILES)}", root)
    file = found[0]
    table = _read_table(file)
    if "path" not in table.columns:
        raise CollectionError(f"required column 'path' missing (columns: {list(table.columns)})",
                              file)
    if table["path"].isna().any():
        rows = table.index[table["path"].isna()].tolist()
        raise CollectionError(f"empty 'path' in rows {rows[:10]}", file)
    table["path"] = table["path"].astype(str)
    if "adapter_id" not in table.columns:
        table["adapter_id"] = table["path"]
    table["adapter_id"] = table["adapter_id"].astype(str)
    duplicated = table["adapter_id"][table["adapter_id"].duplicated()].unique().tolist()
    if duplicated:
        raise CollectionError(f"adapter_id must be unique; duplicated: {duplicated[:10]}"
                              + (f" and {len(duplicated) - 10} more" if len(duplicated) > 10
                                 else ""), file)
    table["abs_path"] = [str(root / p) for p in table["path"]]
    return table.reset_index(drop=True)


@dataclass(frozen=True)
class Collection:
    """A collection root and its metadata table (with `adapter_id` and `abs_path` filled in)."""

    root: Path
    table: pd.DataFrame

    @classmethod
    def open(cls, root: str | Path) -> "Collection":
        return cls(Path(root).resolve(), read_metadata(root))

    def __len__(self) -> int:
        return len(self.table)


def recorded_manifest(root: str | Path) -> str | None:
    """The manifest hash a builder recorded in `root/recipe.json` (w2t/zoo), naming the collection's bytes."""
    try:
        return json.loads((Path(root) / "recipe.json").read_text()).get("manifest")
    except (OSError, ValueError, AttributeError):
        return None
