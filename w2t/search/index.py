"""Search a library of adapter embeddings by cosine similarity (docs/design.md §6: embeddings → retrieval index).

Exact search in torch by default: rows are normalized once, and the library is scanned in chunks
with a running top-k, so 10⁶ rows need no (Q × N) score matrix. `backend="faiss"` uses FAISS's exact
`IndexFlatIP` (optional extra `w2t[faiss]`), the same ranking from a tuned BLAS kernel.

Embedding files are safetensors: tensor `embeddings` (N, d) and, in the metadata, the ids as JSON
plus whatever the writer adds (the encoder's fingerprint, failures).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from w2t.errors import W2TError

BACKENDS = ("torch", "faiss")


def save_embeddings(path: str | Path, embeddings: torch.Tensor, ids: Sequence[str], **metadata: object) -> None:
    """Write (N, d) embeddings with their ids; extra metadata values are stored as JSON."""
    if len(ids) != len(embeddings):
        raise ValueError(f"{len(ids)} ids for {len(embeddings)} embeddings")
    meta = {"ids": json.dumps(list(ids))} | {k: json.dumps(v) for k, v in metadata.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": embeddings.float().contiguous().cpu()}, str(path), metadata=meta)


def load_embeddings(path: str | Path) -> tuple[torch.Tensor, list[str], dict]:
    """(embeddings, ids, other metadata) of a file written by `save_embeddings`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            emb = f.get_tensor("embeddings")
    except (FileNotFoundError, SafetensorError, json.JSONDecodeError) as e:
        raise W2TError(f"not an embeddings file ({type(e).__name__}: {e})", path) from None
    if "ids" not in meta or len(meta["ids"]) != len(emb):
        raise W2TError("embeddings file without one id per row in its metadata", path, "ids")
    return emb, [str(i) for i in meta.pop("ids")], meta


class EmbeddingIndex:
    """Exact cosine top-k over a library of embeddings."""

    def __init__(self, embeddings: torch.Tensor, ids: Sequence[str] | None = None, *, backend: str = "torch",
                 chunk_rows: int = 1 << 16):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (N, d), got {tuple(embeddings.shape)}")
        self.ids = [str(i) for i in range(len(embeddings))] if ids is None else [str(i) for i in ids]
        if len(self.ids) != len(embeddings):
            raise ValueError(f"{len(self.ids)} ids for {len(embeddings)} embeddings")
        self.backend, self.chunk_rows = backend, chunk_rows
        vectors = F.normalize(embeddings.float().cpu(), dim=1).contiguous()  # (N, d)
        self._faiss = None
        if backend == "faiss":
            import faiss  # optional extra: pip install 'w2t[faiss]'

            self._faiss = faiss.IndexFlatIP(vectors.shape[1])
            self._faiss.add(vectors.numpy())
        # FAISS keeps its own copy: one copy of 10⁶ rows is enough
        self.vectors: torch.Tensor | None = None if self._faiss is not None else vectors

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> EmbeddingIndex:
        emb, ids, _ = load_embeddings(path)
        return cls(emb, ids, **kwargs)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, list[list[str]]]:
        """Cosine scores (Q, k), descending, and the ids of the hits; k is capped at the library size."""
        scores, rows = self.search_rows(queries, k)
        return scores, [[self.ids[j] for j in r] for r in rows.tolist()]

    def search_rows(self, queries: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `search`, with row numbers (Q, k) instead of ids."""
        q = F.normalize(torch.atleast_2d(queries).float().cpu(), dim=1)  # (Q, d)
        k = min(k, len(self))
        if self._faiss is not None:
            scores, rows = self._faiss.search(q.numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(rows)
        best_s = q.new_full((len(q), 0), float("-inf"))
        best_i = torch.empty(len(q), 0, dtype=torch.long)
        for start in range(0, len(self), self.chunk_rows):
            s = q @ self.vectors[start:start + self.chunk_rows].T  # (Q, chunk)
            top = s.topk(min(k, s.shape[1]), dim=1)
            merged_s = torch.cat([best_s, top.values], 1)
            merged_i = torch.cat([best_i, top.indices + start], 1)
            keep = merged_s.topk(min(k, merged_s.shape[1]), dim=1).indices
            best_s, best_i = merged_s.gather(1, keep), merged_i.gather(1, keep)
        return best_s, best_i
