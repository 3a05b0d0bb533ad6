"""Export the encoder of a Lightning checkpoint as a pretrained encoder folder (safetensors + JSON).

python scripts/export_encoder.py --ckpt <run dir>/checkpoints/best.ckpt --out DIR

Training runs already export their best encoder to `<run dir>/encoder/`; this covers older runs
and other checkpoints (e.g. last.ckpt).
"""
from __future__ import annotations

import argparse

import torch

from w2t.train.lightning_module import AdapterModel


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="Lightning checkpoint of an AdapterModel")
    ap.add_argument("--out", required=True, help="folder to write model.safetensors + config.json into")
    args = ap.parse_args(argv)
    model = AdapterModel.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True)
    data = torch.load(args.ckpt, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters", {})
    out = model.export_encoder(args.out, sign_rule=data.get("sign_rule", True),
                               representation=data.get("representation", "canonical"))
    print(f"encoder ({model.encoder.num_parameters():,} parameters) → {out}")


if __name__ == "__main__":
    main()
