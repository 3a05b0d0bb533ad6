"""Command lines for a pretrained encoder: `w2t-embed` (a library → an embeddings file) and `w2t-search`."""
from __future__ import annotations

import argparse
import glob
import importlib.util
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from w2t.errors import W2TError
from w2t.io.lycoris import DEFAULT_MAX_RANK

ADAPTER_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth"}
DEFAULT_COLUMNS = 6  # metadata columns shown beside hits when --columns is not given


def list_adapters(spec: str) -> list[tuple[str, Path]]:
    """(id, path) of each adapter in a folder (its weight files and subfolders) or matching a glob."""
    if glob.has_magic(spec):
        paths = [Path(p) for p in sorted(glob.glob(spec))]
        return [(str(p), p) for p in paths]
    root = Path(spec)
    if not root.is_dir():
        raise W2TError("--adapters needs a folder of adapters or a glob pattern", root)
    children = sorted(p for p in root.iterdir() if not p.name.startswith(".")
                      and (p.is_dir() or p.suffix in ADAPTER_SUFFIXES))
    return [(p.name, p) for p in children]


def _load_table(root: str):
    from w2t.data.collection import read_metadata

    return read_metadata(root)


def _load_library(path: str):
    """(embeddings, ids, metadata, the dataset or None) of an embeddings file or a datasets folder (--format hf)."""
    if not Path(path).is_dir():
        from w2t.search.index import load_embeddings

        return *load_embeddings(path), None
    import datasets

    from w2t.search.hub import library_from_dataset

    try:
        dataset = datasets.load_from_disk(path)
        return *library_from_dataset(dataset), dataset
    except (FileNotFoundError, ValueError) as e:
        raise W2TError(f"not a datasets folder ({type(e).__name__}: {e})", path) from None
    except W2TError as e:
        raise W2TError(str(e), path) from None


def embed_main(argv: list[str] | None = None) -> int:
    """w2t-embed --encoder DIR (--collection ROOT | --adapters DIR_OR_GLOB) --out emb.safetensors"""
    ap = argparse.ArgumentParser(prog="w2t-embed", description="Embed a library of LoRA adapters with a pretrained encoder.")
    ap.add_argument("--encoder", required=True, help="exported encoder folder (<run dir>/encoder)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--collection", help="collection root with a metadata file (ids = adapter_id)")
    src.add_argument("--adapters", help="folder of adapter files/folders, or a glob (ids = names)")
    ap.add_argument("--out", required=True, help="embeddings file to write (.safetensors), or a folder with --format hf")
    ap.add_argument("--format", choices=("safetensors", "hf"), default="safetensors",
                    help="hf: a Hugging Face datasets folder (save_to_disk), with the collection's metadata columns")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--allow-pickle", action="store_true", help="also read .bin/.pt files (weights_only)")
    ap.add_argument("--base", help="the base model's safetensors (file or folder): DoRA adapters read exactly")
    ap.add_argument("--max-rank", type=int, default=DEFAULT_MAX_RANK, help="widest LoHa/LoKr product read exactly")
    args = ap.parse_args(argv)

    from w2t.models import load_pretrained
    from w2t.models.pretrained import fingerprint
    from w2t.search.index import save_embeddings

    try:
        encoder = load_pretrained(args.encoder, device=args.device)
        if args.collection:
            table = _load_table(args.collection)
            items = list(zip(table["adapter_id"], table["abs_path"]))
        else:
            items = list_adapters(args.adapters)
        if not items:
            raise W2TError("no adapters found", args.collection or args.adapters)
        ids, paths = zip(*items)
        result = encoder.embed_many(paths, ids, batch_size=args.batch_size, allow_pickle=args.allow_pickle,
                                     base=args.base, max_rank=args.max_rank)
        meta = {"encoder": str(Path(args.encoder).resolve()), "encoder_sha256": fingerprint(args.encoder),
                "failed": result.failed}
        if args.format == "hf":
            from w2t.search.hub import library_to_dataset

            table = _load_table(args.collection).set_index("adapter_id") if args.collection else None
            library_to_dataset(result.embeddings, result.ids, table, **meta).save_to_disk(args.out)
        else:
            save_embeddings(args.out, result.embeddings, result.ids, **meta)
    except W2TError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    console = Console(stderr=True)
    console.print(f"embedded {len(result.ids)} of {len(ids)} adapters ({result.embeddings.shape[1]}-d) → {args.out}")
    for adapter_id, error in result.failed.items():
        console.print(f"[red]failed[/red] {adapter_id}: {error}", markup=True, highlight=False)
    return 0  # failures are reported here and listed in the file's metadata ("failed")


def search_main(argv: list[str] | None = None) -> int:
    """w2t-search --index emb.safetensors --encoder DIR --query ADAPTER [-k 10] [--metadata ROOT]"""
    ap = argparse.ArgumentParser(prog="w2t-search", description="Find the library adapters most similar to a query adapter.")
    ap.add_argument("--index", required=True, help="embeddings written by w2t-embed (a file, or a --format hf folder)")
    ap.add_argument("--encoder", required=True, help="the exported encoder that wrote the index")
    ap.add_argument("--query", required=True, nargs="+", help="query adapter file(s)/folder(s)")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--metadata", help="collection root: show its metadata columns beside the hits")
    ap.add_argument("--columns", help=f"comma-separated metadata columns (default: the first {DEFAULT_COLUMNS})")
    ap.add_argument("--backend", choices=("auto", "torch", "faiss"), default="auto",
                    help="auto: faiss where it is installed (a datasets folder through its own FAISS index), else torch")
    ap.add_argument("--allow-pickle", action="store_true")
    ap.add_argument("--base", help="the base model's safetensors (file or folder): DoRA queries read exactly")
    ap.add_argument("--max-rank", type=int, default=DEFAULT_MAX_RANK, help="widest LoHa/LoKr product read exactly")
    args = ap.parse_args(argv)

    from w2t.models import load_pretrained
    from w2t.models.pretrained import fingerprint
    from w2t.search.index import EmbeddingIndex

    try:
        emb, ids, meta, dataset = _load_library(args.index)
        encoder = load_pretrained(args.encoder)
        if meta.get("encoder_sha256") not in (None, fingerprint(args.encoder)):
            raise W2TError(f"the index was written by another encoder ({meta.get('encoder')}): "
                           "embeddings of different encoders are not comparable", args.index)
        queries = encoder.embed(args.query, allow_pickle=args.allow_pickle, base=args.base, max_rank=args.max_rank)
        backend = args.backend if args.backend != "auto" else "faiss" if importlib.util.find_spec("faiss") else "torch"
        if dataset is not None and backend == "faiss":
            from w2t.search.hub import search_library

            scores, hits = search_library(dataset, queries, args.k)
        else:
            scores, hits = EmbeddingIndex(emb, ids, backend=backend).search(queries, args.k)
        table = _load_table(args.metadata).set_index("adapter_id") if args.metadata else None
    except W2TError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    columns = []
    if table is not None:
        user = [c for c in table.columns if c not in ("path", "abs_path")]
        columns = args.columns.split(",") if args.columns else user[:DEFAULT_COLUMNS]
        if missing := [c for c in columns if c not in table.columns]:
            print(f"error: columns {missing} are not in the metadata", file=sys.stderr)
            return 2
    console = Console()
    for query, row_scores, row_ids in zip(args.query, scores.tolist(), hits):
        out = Table(title=f"top {len(row_ids)} for {query}")
        out.add_column("#", justify="right")
        out.add_column("adapter_id", no_wrap=True, min_width=max(map(len, row_ids)))  # ids are copied: never cut
        out.add_column("cosine", justify="right", no_wrap=True)
        for name in columns:
            out.add_column(name)
        for rank, (adapter_id, score) in enumerate(zip(row_ids, row_scores), 1):
            extra = [str(table.at[adapter_id, c]) if adapter_id in table.index else "" for c in columns] if columns else []
            out.add_row(str(rank), adapter_id, f"{score:.4f}", *extra)
        console.print(out)
    return 0
