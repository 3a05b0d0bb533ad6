"""On-disk token cache: every adapter is read and canonicalized once (docs/design.md §6).

One Arrow IPC file per adapter under `root/<tag>/` (w2t/data/token_table.py: one row, the same
`tokens` value as a shared collection's row): the entry is named by a hash of the adapter's files, and
the tag by the version stamps of everything that shapes a token (the reader, the key-naming rules,
canonicalization, the entry format) and the options. A changed file, reader, naming rule or
canonicalization is rebuilt, and nothing else is. Entries are written to a temporary file and renamed
into place, by one build at a time (a lock), which first removes what a killed build left: an
interrupted build leaves no corrupt entry and a rerun resumes where it stopped. Adapters that fail to
read are cached as an `.error.json` entry (and listed in a report file) stamped with the reading code's
fingerprint, so a rerun reads nothing again until that code changes. One file per entry lets each worker
write what it made; Arrow entries read back about 2x faster than safetensors ones (docs/benchmarks.md,
HF datasets: reading the token cache).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cache
from multiprocessing import get_context
from pathlib import Path

import pyarrow as pa
import torch

import w2t.canon
import w2t.io
from w2t.canon.canonical import CANON_VERSION, DEFAULT_RTOL, CanonicalModule
from w2t.canon.representation import REPRESENTATIONS, adapter_components
from w2t.data.token_table import DTYPES, TokenColumn, token_type, tokens_value
from w2t.errors import W2TError
from w2t.io.files import TMP_SUFFIX, atomic_write, atomic_write_text, exclusive_lock
from w2t.io.formats import READER_VERSION, load_adapter
from w2t.io.keys import KEYS_VERSION
from w2t.progress import progress

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = {".safetensors", ".json", ".bin", ".pt", ".pth"}
PARALLEL_MIN = 256  # below this many pending adapters, worker start-up costs more than it saves
ENTRY_FORMAT = "arrow-1"  # in the tag: a new entry layout is a new cache folder
ENTRY_SUFFIX = ".arrow"


@dataclass(frozen=True)
class CacheOptions:
    dtype: str = "float32"
    rtol: float = DEFAULT_RTOL
    sign_rule: bool = True
    allow_pickle: bool = False
    max_rank: int = 256  # LoHa/LoKr: the widest exact product read; a wider one fails (w2t/io/lycoris.py)
    representation: str = "canonical"  # or "raw" (w2t/canon/representation.py): the ablation models' input
    device: str | None = None  # where to canonicalize ("cuda"); not in the tag: tokens don't depend on it
    base: str | None = None  # base model safetensors (file or folder): DoRA modules read exactly (w2t/io/dora.py)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {self.representation!r}")

    @property
    def tag(self) -> str:
        """The cache folder's name: every version stamp and option that shapes a token (not `device`)."""
        key = {"reader": READER_VERSION, "keys": KEYS_VERSION, "canon": CANON_VERSION, "entry": ENTRY_FORMAT,
               "base_files": _stamp(self.base),
               **{k: v for k, v in asdict(self).items() if k != "device"}}
        return f"v{CANON_VERSION}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]}"


def _stamp(path: str | None) -> list | None:
    """(name, size, mtime) of the base model's files: a changed base rebuilds the cache, without hashing GBs."""
    if path is None:
        return None
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p] if p.exists() else []
    return [[f.name, (st := f.stat()).st_size, st.st_mtime_ns] for f in files]


@cache
def reading_code_version() -> str:
    """Fingerprint of the code that reads and canonicalizes (w2t/io, w2t/canon): a cached failure is
    retried once it changes, so a fixed reader reads what it once refused."""
    h = hashlib.sha256()
    for package in (w2t.io, w2t.canon):
        for f in sorted(Path(package.__file__).parent.glob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class BuildReport:
    built: int = 0
    reused: int = 0
    failed: list[dict] = field(default_factory=list)  # {"adapter_id", "path", "error"}
    entries: dict[str, Path] = field(default_factory=dict)  # adapter_id -> entry file


def content_hash(path: str | Path) -> str:
    """sha256 over an adapter file, or over the weight/config files of an adapter folder."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def save_entry(target: Path, modules: list[CanonicalModule], dtype: str) -> None:
    """One adapter's tokens in cache dtype `dtype` (a key of DTYPES), written atomically."""
    typ = token_type(dtype)
    table = pa.table({"tokens": pa.array([tokens_value(modules, dtype)], type=typ)}).replace_schema_metadata({"dtype": dtype})
    atomic_write(target, lambda tmp: write_ipc(table, tmp))


def write_ipc(table: pa.Table, path: str) -> None:
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def load_entry(path: str | Path) -> list[CanonicalModule]:
    """The modules `save_entry` wrote, in the dtype it was given."""
    try:  # read whole, not memory-mapped: faster for files this small, and nothing stays open
        table = pa.ipc.open_file(pa.BufferReader(Path(path).read_bytes())).read_all()
        dtype = DTYPES[table.schema.metadata[b"dtype"].decode()]
    except (OSError, pa.ArrowInvalid, KeyError, TypeError) as e:
        raise W2TError(f"unreadable cache entry ({type(e).__name__}: {e}); delete it to rebuild", path=path) from None
    return TokenColumn(table.column("tokens").chunks, dtype).modules(0)


def _build_one(args: tuple[str, str, str, CacheOptions]) -> tuple[str, str | None]:
    """Worker: read + canonicalize one adapter into its entry; returns (adapter_id, error)."""
    adapter_id, src, target, opts = args
    try:
        adapter = load_adapter(src, allow_pickle=opts.allow_pickle, base=opts.base, max_rank=opts.max_rank)
        modules = adapter_components(adapter, opts.representation, rtol=opts.rtol, sign_rule=opts.sign_rule,
                                     device=opts.device)
        save_entry(Path(target), modules, opts.dtype)
        return adapter_id, None
    except W2TError as e:
        return adapter_id, f"{type(e).__name__}: {e}"


class TokenCache:
    """Content-addressed canonical tokens under `root/<version tag>/`."""

    def __init__(self, root: str | Path, options: CacheOptions | None = None):
        self.options = options or CacheOptions()
        self.dir = Path(root) / self.options.tag

    def entry_path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}{ENTRY_SUFFIX}"

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """One build at a time; holding the lock, every temporary file is a killed build's: remove it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.dir.parent / f".{self.dir.name}.lock") as held:  # no flock: whole entries still
            if held:
                for stale in self.dir.rglob(f".*{TMP_SUFFIX}"):
                    stale.unlink(missing_ok=True)
            yield

    def _cached_error(self, error_file: Path) -> dict | None:
        """A failure recorded by this reading code, or None (none, unreadable, or from other code: retry)."""
        try:
            entry = json.loads(error_file.read_text())
        except (OSError, ValueError):
            return None
        return {"error": entry["error"]} if entry.get("code") == reading_code_version() else None

    def build(self, items: list[tuple[str, str | Path]], *, workers: int | None = None, strict: bool = False,
              report_name: str = "report", parallel_min: int = PARALLEL_MIN) -> BuildReport:
        """Make sure every (adapter_id, path) has an entry; returns what was built, reused and failed.

        `strict` raises the first failure instead of skipping it. `workers` processes are used only
        when at least `parallel_min` adapters are pending (benchmarks set it to 0).
        """
        with self._lock():
            return self._build(items, workers, strict, report_name, parallel_min)

    def _build(self, items, workers, strict, report_name, parallel_min) -> BuildReport:
        report = BuildReport()
        pending: list[tuple[str, str, str, CacheOptions]] = []
        targets: dict[str, Path] = {}
        for adapter_id, src in progress(items, "hashing adapters"):
            if not Path(src).exists():
                report.failed.append({"adapter_id": adapter_id, "path": str(src), "error": f"AdapterNotFoundError: {src}: no such file or folder"})
                continue
            target = self.entry_path(content_hash(src))
            targets[adapter_id] = target
            if target.exists():
                report.reused += 1
                report.entries[adapter_id] = target
            elif (cached := self._cached_error(target.with_suffix(".error.json"))) is not None:
                report.reused += 1
                report.failed.append({"adapter_id": adapter_id, "path": str(src), **cached})
            else:
                pending.append((adapter_id, str(src), str(target), self.options))
        if strict and report.failed:
            raise W2TError(report.failed[0]["error"], path=report.failed[0]["path"])

        workers = workers if workers is not None else (os.cpu_count() or 1)
        if workers > 1 and len(pending) >= parallel_min:
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),  # one thread each:
                                       initializer=torch.set_num_threads, initargs=(1,))  # no N×N oversubscription
            results = pool.map(_build_one, pending, chunksize=8)
        else:
            pool, results = None, map(_build_one, pending)
        try:
            by_id = {p[0]: p for p in pending}
            for adapter_id, error in progress(results, "canonicalizing adapters", total=len(pending)):
                src, target = by_id[adapter_id][1], Path(by_id[adapter_id][2])
                if error is None:
                    report.built += 1
                    report.entries[adapter_id] = target
                    continue
                if strict:
                    raise W2TError(error, path=src)
                log.warning("skipping bad adapter %s", error)
                report.failed.append({"adapter_id": adapter_id, "path": src, "error": error})
                atomic_write_text(target.with_suffix(".error.json"), json.dumps({"error": error, "code": reading_code_version()}))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        atomic_write_text(self.dir / f"{report_name}.json", json.dumps(
            {"built": report.built, "reused": report.reused, "failed": report.failed}, indent=1))
        return report
