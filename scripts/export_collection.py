"""Export a collection as a Hugging Face datasets folder: its metadata, tokens and factors, no adapter files.

python scripts/export_collection.py --out DIR [train.py's data and model overrides]
    --out data/digits_hf                                    # the default collection
    --out loras_hf data=collection data.root=/path/to/loras # your own

The tokens are made with the options given, exactly as `train.py` with the same overrides reads them, so
`python train.py experiment=... data=hf data.path=DIR` trains (same split, same scores) with nothing else
(w2t/data/hf.py; data/README.md). Share DIR as it is, or with `datasets.load_from_disk(DIR).push_to_hub(...)`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # works without `pip install -e .`

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import open_dict

from w2t.data.hf import export_collection
from w2t.errors import W2TError
from w2t.zoo import disk_usage


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the datasets folder to write")
    ap.add_argument("overrides", nargs="*", help="train.py overrides that choose and read the collection")
    args = ap.parse_args(argv)
    os.environ.setdefault("W2T_PROGRESS", "0")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is first imported

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    with open_dict(cfg):
        cfg.data.representation = cfg.model.get("input", "canonical")  # what the model reads, as train.py decides
    try:
        dm = instantiate(cfg.data, _convert_="all")
        dm.prepare_data()
        dm.setup()
        out = export_collection(dm, args.out)
    except W2TError as error:  # a bad input: which and how to fix it, no traceback
        sys.exit(f"error: {error}")
    print(f"{out}: {len(dm.table)} adapters ({len(dm.cache_report.failed)} skipped), "
          f"{disk_usage(out) / 2**20:.1f} MiB")
    return out


if __name__ == "__main__":
    main()
