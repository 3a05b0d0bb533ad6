"""Build a default LoRA collection now instead of on first use: `python scripts/make_collection.py`.

Prints the build time, the number of adapters and the size on disk; see data/README.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works without `pip install -e .`

from w2t.collection import disk_usage, ensure_collection, read_metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", default="digits", choices=["digits", "digits_tiny"])
    parser.add_argument("--root", default="data", help="the collection goes to ROOT/NAME")
    parser.add_argument("--workers", type=int, default=None, help="default: one per CPU core")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args()

    start = time.perf_counter()
    path = ensure_collection(args.name, args.root, workers=args.workers, seed=args.seed,
                             force=args.force)
    seconds = time.perf_counter() - start
    table = read_metadata(path)
    print(f"{path}: {len(table)} adapters, {disk_usage(path) / 2**20:.1f} MiB on disk, "
          f"ready in {seconds:.1f} s")


if __name__ == "__main__":
    main()
