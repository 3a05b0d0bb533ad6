"""An embedding library as a Hugging Face `datasets.Dataset`: the form the field shares on dataset hubs.

Columns: `adapter_id`, `embedding` (float32, one list per adapter) and any metadata columns given; the
library's own metadata (the encoder's fingerprint, failures) is JSON in `Dataset.info.description`.
`save_to_disk` / `load_from_disk` round-trip it exactly, and with faiss installed `search_library` searches
it through the dataset's own FAISS index.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

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


def search_library(dataset, queries: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, list[list[str]]]:
    """Cosine top-k as `EmbeddingIndex.search` returns it, through a FAISS index the dataset holds
    (`add_faiss_index_from_external_arrays`: exact inner product of the normalized rows, which cosine needs and
    the stored `embedding` column is not). Needs faiss (`pip install 'w2t[faiss]'`)."""
    import faiss

    embeddings, ids, _ = library_from_dataset(dataset)
    vectors = F.normalize(embeddings, dim=1).numpy()
    if "embedding" not in dataset.list_indexes():
        dataset.add_faiss_index_from_external_arrays(vectors, "embedding", custom_index=faiss.IndexFlatIP(vectors.shape[1]))
    found = dataset.search_batch("embedding", F.normalize(queries.float().cpu(), dim=1).numpy(), k=min(k, len(ids)))
    return torch.from_numpy(np.stack(found.total_scores)), [[ids[i] for i in row] for row in found.total_indices]
