"""Lightning DataModule over a collection (docs/design.md §4) and its token cache, or over a collection
exported as a datasets folder (w2t/data/hf.py), which holds the tokens itself.

`setup` reads the metadata, canonicalizes what the cache lacks, splits (manifest into the run
directory), fixes the token schema and encodes the label columns. Batches are grouped by module
type: `batch["tokens"][group]` holds (B, L, R, ·) tensors with ranks padded and missing modules masked.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils.data import DataLoader, Dataset

from w2t.canon.canonical import CanonicalModule
from w2t.data.cache import CacheOptions, TokenCache, load_entry
from w2t.data.collection import read_metadata, recorded_manifest
from w2t.data.hf import ExportedCollection
from w2t.zoo import ensure_collection
from w2t.errors import CollectionError
from w2t.data.splits import make_splits, write_manifest
from w2t.data.tokens import TokenSchema, Tokens, collate_tokens, tokenize
from w2t.io.adapter import Adapter
from w2t.io.formats import load_adapter

log = logging.getLogger(__name__)


@dataclass
class DataInfo:
    """What a task head needs to know about the labels; plain types so checkpoints stay loadable."""

    schema: dict
    classes: list[str] = field(default_factory=list)  # multi-class label values
    label_columns: list[str] = field(default_factory=list)  # multi-label columns
    target_mean: float = 0.0
    target_std: float = 1.0
    num_groups: int = 0
    group_names: list[str] = field(default_factory=list)  # group_column values, by group index


class TokenDataset(Dataset):
    def __init__(self, dm: "AdapterDataModule", rows: np.ndarray, flags: dict[str, np.ndarray]):
        self.dm, self.rows, self.flags = dm, rows, flags

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        item = {"tokens": self.dm.tokens(row), "index": row}
        for k, v in self.dm.targets.items():
            item[k] = v[row]
        for k, v in self.flags.items():
            item[k] = bool(v[i])
        return item


def collate(items: list[dict]) -> dict:
    out = {"tokens": collate_tokens([it.pop("tokens") for it in items])}
    for k in items[0]:
        out[k] = torch.as_tensor(np.stack([it[k] for it in items]))
    return out


class AdapterDataModule(L.LightningDataModule):
    def __init__(
        self,
        root: str | None = None,
        path: str | None = None,  # a collection exported as a datasets folder (data=hf): no adapter files
        collection: str = "digits",
        data_dir: str = "data",
        label_column: str | None = None,
        label_columns: list[str] | None = None,
        target_column: str | None = None,
        group_column: str | None = None,
        role_column: str | None = None,
        split_column: str | None = None,
        split: str = "random",
        val_frac: float = 0.15,
        test_frac: float = 0.15,
        seed: int = 0,
        cache_dir: str | None = None,
        cache_dtype: str = "float32",
        sign_rule: bool = True,
        representation: str = "canonical",
        strict: bool = False,
        allow_pickle: bool = False,
        max_rank: int = 256,
        base: str | None = None,
        cache_workers: int | None = None,
        eval_gallery: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        output_dir: str | None = None,
        schema: dict | None = None,
        classes: list[str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.hp = self.hparams
        self._tokens: dict[int, Tokens] = {}
        self._modules: dict[int, list] = {}  # canonical modules read by setup, not yet tokenized
        self.exported: ExportedCollection | None = None  # set by setup when reading a datasets folder

    # ---- setup -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        # Lightning calls this on one process: build the collection and the cache here, so that
        # DDP ranks' `setup` only find entries instead of each canonicalizing every adapter
        self._prepared = self._cached_table()

    def _root(self) -> Path:
        if self.hp.path:
            return Path(self.hp.path)
        if self.hp.root:
            return Path(self.hp.root)
        if not self.hp.collection:
            raise CollectionError("no collection given: pass data.root=DIR (data=collection) or data.path=DIR (data=hf)")
        return ensure_collection(self.hp.collection, self.hp.data_dir)

    def _cached_table(self):
        """(root, metadata, cache report): the collection read and every adapter in the token cache.

        Under `isolate_rng`: building the collection trains adapters, and a run that had to build it
        must then initialize and shuffle exactly like one that found it built."""
        with isolate_rng():
            return self._build_cached_table()

    def cache_options(self) -> CacheOptions:
        hp = self.hp
        return CacheOptions(dtype=hp.cache_dtype, sign_rule=hp.sign_rule, allow_pickle=hp.allow_pickle,
                            representation=hp.representation, base=hp.base, max_rank=hp.max_rank)

    def _build_cached_table(self):
        hp = self.hp
        root = self._root()
        if hp.path:  # the tokens were cached when it was exported
            exported = ExportedCollection(root, self.cache_options())
            return root, exported.table, exported, exported.report
        table = read_metadata(root)
        cache = TokenCache(hp.cache_dir or Path(hp.data_dir) / "cache", self.cache_options())
        report = cache.build(list(zip(table["adapter_id"].astype(str), table["abs_path"])), workers=hp.cache_workers,
                             strict=hp.strict)
        return root, table, cache, report

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "table"):
            return
        hp = self.hp
        root, table, cache, report = self.__dict__.pop("_prepared", None) or self._cached_table()
        self.root, self.cache_report = root, report
        self.exported = cache if isinstance(cache, ExportedCollection) else None
        if report.failed:
            log.warning("%d bad adapters skipped (listed in %s)", len(report.failed), cache.dir)
        table = table[table["adapter_id"].astype(str).isin(report.entries)].reset_index(drop=True)
        self.entries = [report.entries[a] for a in table["adapter_id"].astype(str)]
        self.table = table
        self._check_columns()

        self.splits = make_splits(table, method=hp.split, val_frac=hp.val_frac, test_frac=hp.test_frac, seed=hp.seed,
                                  stratify_column=hp.label_column, group_column=hp.group_column,
                                  split_column=hp.split_column)
        self.collection_manifest = self.exported.manifest.get("collection_manifest") if self.exported \
            else recorded_manifest(root)
        log.info("collection %s: %d adapters%s", root, len(table),
                 f", manifest {self.collection_manifest}" if self.collection_manifest else "")
        if hp.output_dir:
            write_manifest(self.splits, Path(hp.output_dir) / "splits.json", method=hp.split, seed=hp.seed,
                           root=str(root), group_column=hp.group_column, collection_manifest=self.collection_manifest)
            if report.failed:
                (Path(hp.output_dir) / "bad_adapters.json").write_text(json.dumps(report.failed, indent=1))
        pos = {a: i for i, a in enumerate(table["adapter_id"].astype(str))}
        self.split_rows = {s: np.array([pos[a] for a in ids], dtype=np.int64) for s, ids in self.splits.items()}
        if len(self.split_rows["train"]) == 0:
            raise CollectionError("the training split is empty", path=root)

        if hp.schema is not None:
            self.schema = TokenSchema.from_dict(hp.schema)
        else:
            # read every entry once here; tokens() consumes these instead of reading them again
            self._modules = {row: self.modules(row) for row in range(len(self.entries))}
            self.schema = TokenSchema.from_modules(m for mods in self._modules.values() for m in mods)
        self.targets, self.info = self._encode_targets()

    def _check_columns(self) -> None:
        hp = self.hp
        for col in [hp.label_column, hp.target_column, hp.group_column, hp.role_column, *(hp.label_columns or [])]:
            if col and col not in self.table:
                raise CollectionError(f"column '{col}' is not in the metadata (columns: {[c for c in self.table.columns if c != 'abs_path']})",
                                      path=self._root())

    def _encode_targets(self) -> tuple[dict[str, np.ndarray], DataInfo]:
        hp, t = self.hp, self.table
        targets: dict[str, np.ndarray] = {}
        info = DataInfo(schema=self.schema.to_dict())
        if hp.label_column:
            values = t[hp.label_column].astype(str)
            # a trained model's label order (eval.py) must win over the order this collection implies
            info.classes = list(hp.classes) if hp.classes else sorted(values.unique().tolist())
            unknown = sorted(set(values) - set(info.classes))
            if unknown:
                raise CollectionError(f"label_column '{hp.label_column}' has values the model was not trained on: "
                                      f"{unknown[:10]} (it knows {info.classes})", path=self._root())
            targets["label"] = t[hp.label_column].astype(str).map({c: i for i, c in enumerate(info.classes)}).to_numpy(np.int64)
        if hp.label_columns:
            info.label_columns = list(hp.label_columns)
            targets["labels"] = t[info.label_columns].to_numpy(np.float32)
        if hp.target_column:
            y = pd.to_numeric(t[hp.target_column], errors="coerce").to_numpy(np.float64)
            if np.isnan(y).any():
                raise CollectionError(f"target_column '{hp.target_column}' has non-numeric or missing values")
            train = y[self.split_rows["train"]]
            info.target_mean, info.target_std = float(train.mean()), float(train.std() or 1.0)
            targets["target"] = y.astype(np.float32)
        if hp.group_column:
            groups = sorted(t[hp.group_column].astype(str).unique().tolist())
            info.num_groups, info.group_names = len(groups), groups
            targets["group"] = t[hp.group_column].astype(str).map({g: i for i, g in enumerate(groups)}).to_numpy(np.int64)
        return targets, info

    # ---- items -------------------------------------------------------------------------------
    def modules(self, row: int) -> list[CanonicalModule]:
        """The canonical modules of table row `row`: its cache entry, or its row of the datasets folder."""
        if (read := self._modules.pop(row, None)) is not None:
            return read
        return self.exported.modules(self.entries[row]) if self.exported else load_entry(self.entries[row])

    def adapter(self, row: int) -> Adapter:
        """The factors of table row `row` as its file gives them (re-factored scores, raw reads)."""
        if self.exported:
            return self.exported.adapter(self.entries[row])
        return load_adapter(self.table.abs_path[row], allow_pickle=self.hp.allow_pickle, base=self.hp.base,
                            max_rank=self.hp.max_rank)

    def tokens(self, row: int) -> Tokens:
        if row not in self._tokens:
            modules = self.modules(row)
            toks, unknown = tokenize(modules, self.schema, strict=False)
            if unknown:
                log.warning("%s: modules outside the schema are masked: %s", self.entries[row], "; ".join(unknown))
            self._tokens[row] = toks
        return self._tokens[row]

    def _role(self) -> np.ndarray | None:
        if not self.hp.role_column:
            return None
        return self.table[self.hp.role_column].astype(str).str.lower().to_numpy()

    def dataset(self, split: str) -> TokenDataset:
        """Training: the split. Evaluation with a gallery: the split plus every gallery adapter (docs/design.md §5)."""
        rows = self.split_rows[split]
        n = len(self.table)
        in_split = np.zeros(n, bool)
        in_split[rows] = True
        role = self._role()
        in_gallery = np.ones(n, bool) if role is None else role == "gallery"
        # test follows the protocol (queries = role "query"); validation asks every split adapter,
        # since model selection on a handful of queries would pick noise
        is_query = in_split.copy() if role is None or split != "test" else in_split & (role == "query")
        if split != "train" and self.hp.eval_gallery:
            rows = np.flatnonzero(in_split | in_gallery)
        flags = {"in_split": in_split[rows], "in_gallery": in_gallery[rows], "is_query": is_query[rows]}
        return TokenDataset(self, rows, flags)

    def whole_split(self, split: str) -> dict:
        """Every item of a split (with its gallery, as evaluated) collated into one batch."""
        ds = self.dataset(split)
        return collate([ds[i] for i in range(len(ds))])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=self.hp.batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.hp.num_workers, pin_memory=self.hp.pin_memory,
                          persistent_workers=self.hp.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
