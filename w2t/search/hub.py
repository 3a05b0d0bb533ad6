"""An embedding library as a Hugging Face `datasets.Dataset`: the form the field shares on dataset hubs.

Columns: `adapter_id`, `embedding` (float32, one list per adapter) and any metadata columns given; the
library's own metadata (the encoder's fingerprint, failures) is JSON in `Dataset.info.description`.
`save_to_disk` / `load_from_disk` round-trip it exactly, and with faiss installed
`dataset.add_faiss_index("embedding")` searches it.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from w2t.errors import W2TError


def library_to_dataset(embeddings: torch.Tensor, ids: Sequence[str], table: pd.DataFrame | None = None,
                       **metadata: object):
    """A `datasets.Dataset` of one row per adapter; `table` (indexed by adapter_id) adds its columns."""
    import datasets

    if len(ids) != len(embeddings):
        raise ValueError(f"{len(ids)} ids for {len(embeddings)} embeddings")
    columns: dict[str, object] = {"adapter_id": [str(i) for i in ids]}
    if table is not None:
        rows = table.reindex([str(i) for i in ids])
        columns |= {c: rows[c].tolist() for c in rows.columns if c not in ("path", "abs_path")}
    columns["embedding"] = list(embeddings.float().cpu().numpy())  # float32 rows: a Sequence(float32) column
    info = datasets.DatasetInfo(description=json.dumps({"format": "w2t-embeddings", **metadata}))
    return datasets.Dataset.from_dict(columns, info=info)


def library_from_dataset(dataset) -> tuple[torch.Tensor, list[str], dict]:
    """(embeddings, ids, library metadata) of a dataset written by `library_to_dataset`."""
    try:
        meta = json.loads(dataset.info.description or "{}")
    except json.JSONDecodeError:
        meta = {}
    if meta.pop("format", None) != "w2t-embeddings" or "embedding" not in dataset.column_names:
        raise W2TError("not a w2t embedding library (library_to_dataset writes one)")
    embeddings = torch.from_numpy(np.asarray(dataset.with_format("numpy")["embedding"], dtype=np.float32))
    return embeddings, [str(i) for i in dataset["adapter_id"]], meta
