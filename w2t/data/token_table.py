"""Canonical tokens as Arrow: one list of module structs per adapter, the form of the token cache's entries
and of the `tokens` column of an exported collection (w2t/data/hf.py).

A module is (module_type, layer, m, n, U as m·r values row-major, S, V as n·r values, mask, features).
Values are float32, or float16 for a float16 cache; bfloat16, which Arrow lacks, is stored as its 16 bits
(uint16), so a half-precision cache is half the size and tokens come back with the dtype, shape and values
they were written with. (A folder whose bfloat16 tokens were written as float32 reads too: they are cast.)
"""
from __future__ import annotations

from bisect import bisect_right

import numpy as np
import pyarrow as pa
import torch

from w2t.canon.canonical import CanonicalModule

_VALUES = ("U", "S", "V", "mask", "features")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # the cache dtypes
_ARROW_VALUES = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}


def token_type(dtype: str) -> pa.DataType:
    """The Arrow type of one adapter's tokens for cache dtype `dtype`."""
    values = pa.list_(_ARROW_VALUES[dtype])
    return pa.list_(pa.struct([("module_type", pa.string()), ("layer", pa.int64()), ("m", pa.int64()), ("n", pa.int64()),
                               ("U", values), ("S", values), ("V", values), ("mask", pa.list_(pa.bool_())),
                               ("features", pa.list_(pa.float32()))]))


def as_numpy(t: torch.Tensor, dtype: str = "float32") -> np.ndarray:
    flat = t.detach().to(DTYPES[dtype]).contiguous().reshape(-1)
    return flat.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else flat.numpy()


def tokens_value(modules: list[CanonicalModule], dtype: str) -> list[dict]:
    """One adapter's modules as a value of `token_type(dtype)`."""
    return [{"module_type": m.module_type, "layer": int(m.layer), "m": m.shape[0], "n": m.shape[1],
             "U": as_numpy(m.U, dtype), "S": as_numpy(m.S, dtype), "V": as_numpy(m.V, dtype),
             "mask": m.mask.numpy(), "features": None if m.features is None else as_numpy(m.features)}
            for m in modules]


class TokenColumn:
    """Decodes rows of a `token_type` column (a list of Arrow chunks, e.g. memory-mapped) into CanonicalModules."""

    def __init__(self, chunks: list[pa.ListArray], dtype: torch.dtype):
        self.chunks, self.dtype = chunks, dtype
        self._starts = list(np.cumsum([0] + [len(c) for c in chunks[:-1]]))
        self._decoded: dict[int, dict] = {}

    def _chunk(self, k: int) -> dict:
        """One chunk's module fields as numpy arrays: the float values are views of the Arrow buffers."""
        if k not in self._decoded:
            mods = self.chunks[k].values
            self._decoded[k] = {"rows": self.chunks[k].offsets.to_numpy(),
                                "module_type": mods.field("module_type").to_pylist(),
                                "null_features": mods.field("features").is_null().to_numpy(zero_copy_only=False),
                                **{f: mods.field(f).to_numpy() for f in ("layer", "m", "n")},
                                **{f: (mods.field(f).values.to_numpy(zero_copy_only=False), mods.field(f).offsets.to_numpy())
                                   for f in _VALUES}}
        return self._decoded[k]

    def modules(self, row: int) -> list[CanonicalModule]:
        k = bisect_right(self._starts, row) - 1
        d, i = self._chunk(k), row - self._starts[k]
        first, last = d["rows"][i], d["rows"][i + 1]  # the row's modules
        flat = {}  # one copy of the row's values per field (it must outlive the mapping), sliced per module
        for f in _VALUES:
            values, offsets = d[f]
            part_values = values[offsets[first]:offsets[last]].copy()
            flat[f] = (torch.from_numpy(part_values.view(np.int16)).view(torch.bfloat16) if part_values.dtype == np.uint16
                       else torch.from_numpy(part_values), offsets[first:last + 1] - offsets[first])

        def part(f: str, j: int) -> torch.Tensor:
            values, offsets = flat[f]
            return values[offsets[j]:offsets[j + 1]]

        out = []
        for j, jj in enumerate(range(first, last)):
            m, n, r = int(d["m"][jj]), int(d["n"][jj]), len(part("S", j))
            out.append(CanonicalModule(d["module_type"][jj], int(d["layer"][jj]), part("U", j).to(self.dtype).view(m, r),
                                       part("S", j).to(self.dtype), part("V", j).to(self.dtype).view(n, r), part("mask", j),
                                       None if d["null_features"][jj] else part("features", j)))
        return out
