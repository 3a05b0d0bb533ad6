"""A collection as a Hugging Face `datasets` folder: shared without its adapter files, trained on as `data=hf`.

One row per adapter, in the metadata's order: every metadata column (docs/design.md §4), `tokens` (its
cache entry: each module's type, layer, shape (m, n), U as m·r values row-major, S, V as n·r values,
mask and DoRA features) and `factors` (every field of each `LoraModule` as read from its file; tensors
as values + shape). A run reads the tokens; the factors are what it re-factors for `test_reparam/…`
and what retrieval's `raw` baseline reads, so a run on the folder scores exactly as one on the files.
Tokens are in the cache dtype (bfloat16, which Arrow lacks, as its 16 bits: w2t/data/token_table.py),
factors in float32 (the reader's dtype, except for float64 files, rounded).
The cache options, version stamps, token schema, collection manifest and failures are JSON in
`Dataset.info.description`.
"""
from __future__ import annotations

import json
import tempfile
import typing
from dataclasses import asdict
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from w2t.canon.canonical import CANON_VERSION, CanonicalModule
from w2t.data.cache import BuildReport, CacheOptions
from w2t.data.token_table import DTYPES, TokenColumn, as_numpy, token_type, tokens_value
from w2t.errors import CollectionError
from w2t.io.adapter import Adapter, LoraModule
from w2t.io.formats import READER_VERSION
from w2t.io.keys import KEYS_VERSION

if typing.TYPE_CHECKING:
    from w2t.data.datamodule import AdapterDataModule

FORMAT = "w2t-collection"
COLUMNS = ("adapter_id", "tokens", "factors", "factor_dtype")  # besides the metadata's own
# options that say how files were read (max_rank refuses, never truncates): a run on the folder reads no file
READING_OPTIONS = ("device", "allow_pickle", "base", "max_rank")
BATCH_ROWS = 64  # adapters per Arrow record batch while exporting: memory stays flat for big collections


@cache
def _lora_fields() -> list[tuple[str, bool, pa.DataType]]:
    """(name, is_tensor, Arrow type) of every `LoraModule` field, so a new field is carried without a change here."""
    scalars = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
    out = []
    for name, hint in typing.get_type_hints(LoraModule).items():
        kinds = {hint, *typing.get_args(hint)} - {type(None)}
        if torch.Tensor in kinds:
            out.append((name, True, pa.list_(pa.float32())))
        elif len(kinds) == 1 and (kind := kinds.pop()) in scalars:
            out.append((name, False, scalars[kind]))
        else:
            raise TypeError(f"LoraModule.{name}: {hint} has no Arrow form in w2t/data/hf.py")
    return out


def _factor_type() -> pa.DataType:
    fields = []
    for name, is_tensor, typ in _lora_fields():
        fields.append((name, typ))
        if is_tensor:
            fields.append((f"{name}_shape", pa.list_(pa.int64())))
    return pa.list_(pa.struct(fields))


def _factors_row(adapter: Adapter) -> list[dict]:
    rows = []
    for mod in adapter.modules:
        row = {}
        for name, is_tensor, _ in _lora_fields():
            value = getattr(mod, name)
            if is_tensor:
                row[name] = None if value is None else as_numpy(value)
                row[f"{name}_shape"] = None if value is None else list(value.shape)
            else:
                row[name] = value
        rows.append(row)
    return rows


def export_collection(dm: AdapterDataModule, out: str | Path) -> Path:
    """Write the collection a set-up `AdapterDataModule` reads (its rows, tokens and factors) to `out`.

    The module's data options decide the tokens, as they do for a run: export with the options you train with.
    """
    import datasets

    if dm.exported is not None:
        raise CollectionError("is already a datasets folder: share it as it is", dm.root)
    options = dm.cache_options()
    meta = dm.table.drop(columns=["abs_path"])
    if clash := [c for c in COLUMNS[1:] if c in meta.columns]:
        raise CollectionError(f"metadata columns {clash} would clash with the dataset's own (rename them)", dm.root)
    try:
        meta_schema = pa.Schema.from_pandas(meta, preserve_index=False).remove_metadata()
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:  # e.g. a column mixing numbers and text
        raise CollectionError(f"the metadata does not fit Arrow columns ({e})", dm.root) from None
    schema = meta_schema.append(pa.field("tokens", token_type(options.dtype))) \
        .append(pa.field("factors", _factor_type())).append(pa.field("factor_dtype", pa.string()))
    manifest = {"format": FORMAT, "version": 1, "options": {k: v for k, v in asdict(options).items() if k != "device"},
                "versions": {"reader": READER_VERSION, "keys": KEYS_VERSION, "canon": CANON_VERSION},
                "schema": dm.schema.to_dict(), "collection_manifest": dm.collection_manifest,
                "failed": dm.cache_report.failed}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        stream = Path(tmp) / "rows.arrow"  # the IPC stream `Dataset.from_file` maps: rows never all in memory
        with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for start in range(0, len(meta), BATCH_ROWS):
                rows = range(start, min(start + BATCH_ROWS, len(meta)))
                batch = pa.Table.from_pandas(meta.iloc[rows.start:rows.stop], schema=meta_schema, preserve_index=False)
                adapters = [dm.adapter(r) for r in rows]
                batch = batch.append_column(schema.field("tokens"), pa.array(
                    [tokens_value(dm.modules(r), options.dtype) for r in rows], type=schema.field("tokens").type))
                batch = batch.append_column(schema.field("factors"), pa.array(
                    [_factors_row(a) for a in adapters], type=schema.field("factors").type))
                batch = batch.append_column("factor_dtype", pa.array([str(a.dtype).removeprefix("torch.") for a in adapters]))
                writer.write_table(batch)
        info = datasets.DatasetInfo(description=json.dumps(manifest))
        datasets.Dataset.from_file(str(stream), info=info).save_to_disk(str(out))
    return out


class ExportedCollection:
    """A folder written by `export_collection`, memory-mapped: its metadata table, and each row's tokens and factors."""

    def __init__(self, path: str | Path, options: CacheOptions):
        import datasets

        self.dir = Path(path)
        try:
            ds = datasets.load_from_disk(str(self.dir))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise CollectionError(f"not a datasets folder ({type(e).__name__}: {e}); "
                                  "scripts/export_collection.py writes one", self.dir) from None
        if not isinstance(ds, datasets.Dataset):
            raise CollectionError(f"holds several splits {list(ds)}: a collection is one Dataset", self.dir)
        try:
            self.manifest = json.loads(ds.info.description or "{}")
        except json.JSONDecodeError:
            self.manifest = {}
        if self.manifest.get("format") != FORMAT:
            raise CollectionError(f"not a w2t collection (its info names no '{FORMAT}' format); "
                                  "scripts/export_collection.py writes one", self.dir)
        if missing := [c for c in COLUMNS if c not in ds.column_names]:
            raise CollectionError(f"column(s) {missing} missing (columns: {ds.column_names})", self.dir)
        made = {k: v for k, v in self.manifest.get("options", {}).items() if k not in READING_OPTIONS}
        wanted = {k: v for k, v in asdict(options).items() if k not in READING_OPTIONS}
        if diff := sorted(k for k in made.keys() | wanted.keys() if made.get(k) != wanted.get(k)):
            told = ", ".join(f"{k}={made.get(k)!r} there, {wanted.get(k)!r} here" for k in diff)
            raise CollectionError(f"its tokens were made with other options than this run reads ({told}): "
                                  "export it with this run's data and model options", self.dir)
        self.dtype = DTYPES[options.dtype]
        meta = ds.remove_columns(list(COLUMNS[1:])).to_pandas()
        for c in meta.columns[meta.dtypes == object]:  # Arrow's null reads as None; pandas' own files give NaN
            meta[c] = meta[c].where(meta[c].notna(), np.nan)
        meta["adapter_id"] = meta["adapter_id"].astype(str)
        self.table = meta
        arrow = ds.select_columns(list(COLUMNS[1:])).with_format("arrow")[:]  # zero-copy views of the mapped file
        self._tokens = TokenColumn(arrow.column("tokens").chunks, self.dtype)
        self._factors = arrow.column("factors")
        self._factor_dtype = arrow.column("factor_dtype").to_pylist()

    @property
    def report(self) -> BuildReport:
        """The cache report a run would have had: every row an entry (its row), the export's failures."""
        return BuildReport(reused=len(self.table), failed=list(self.manifest.get("failed", [])),
                           entries={a: i for i, a in enumerate(self.table["adapter_id"])})

    def modules(self, row: int) -> list[CanonicalModule]:
        """Row `row`'s canonical modules, the same tensors (dtype, shape, values) as its cache entry."""
        return self._tokens.modules(row)

    def adapter(self, row: int) -> Adapter:
        """Row `row`'s adapter as its file was read (every `LoraModule` field; no extras or notes)."""
        mods = self._factors[row].values
        columns = {f: mods.field(f).to_pylist() for f, is_tensor, _ in _lora_fields() if not is_tensor}
        modules = []
        for j in range(len(mods)):
            kw = {f: v[j] for f, v in columns.items()}
            for name, is_tensor, _ in _lora_fields():
                if is_tensor:
                    values, shape = mods.field(name)[j], mods.field(f"{name}_shape")[j]
                    kw[name] = None if not values.is_valid else \
                        torch.from_numpy(values.values.to_numpy(zero_copy_only=False).copy()).view(shape.as_py())
            modules.append(LoraModule(**kw))
        return Adapter(path=self.dir / str(self.table["adapter_id"][row]), modules=modules,
                       dtype=getattr(torch, self._factor_dtype[row]))
