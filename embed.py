"""Embed a library of LoRA adapters with a pretrained encoder (same as the `w2t-embed` command):
python embed.py --encoder <run dir>/encoder --collection ROOT --out emb.safetensors"""
import sys

from w2t.search.cli import embed_main

if __name__ == "__main__":
    sys.exit(embed_main())
