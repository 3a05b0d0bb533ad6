"""Multi-process DDP on CPU (gloo): one run directory, one metrics.json, metrics over the whole split."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from w2t.data.collection import read_metadata

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_run_gathers_the_whole_test_split(tiny_collection, tmp_path):
    env = {**os.environ, "W2T_DATA_DIR": str(tmp_path / "data"), "W2T_PROGRESS": "0"}
    # Without a role column every test-split adapter is a query: ten of them, about five per rank.
    cmd = [sys.executable, "train.py", "experiment=retrieval", "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.devices=2", f"data.root={tiny_collection}", "data.role_column=null", "data.test_frac=0.4",
           "trainer.max_epochs=2", "callbacks.progress_bar=null", f"paths.log_dir={tmp_path / 'logs'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = list((tmp_path / "logs" / "retrieval" / "runs").iterdir())
    assert len(runs) == 1, "rank 1 re-runs train.py with the parent's hydra.run.dir"
    run = runs[0]
    assert [p.name for p in run.rglob("metrics.json")] == ["metrics.json"]
    assert (run / "train_ddp_process_1.log").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    queries = set(json.loads((run / "splits.json").read_text())["test"])

    # The test loader holds every adapter in metadata order; the DistributedSampler deals them out
    # alternately, so a rank scoring only its own share would count fewer queries than the split has.
    ids = read_metadata(tiny_collection)["adapter_id"].astype(str).tolist()
    per_rank = [len(queries & set(ids[rank::2])) for rank in range(2)]
    assert max(per_rank) < len(queries)
    assert metrics["test/num_queries"] == len(queries)
    assert metrics["test/baseline_sketch/num_queries"] == len(queries)
