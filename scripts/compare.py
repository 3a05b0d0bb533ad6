"""Run every model on each experiment with several seeds and write one comparison report.

python scripts/compare.py [--models ...] [--experiments ...] [--seeds 0 1 2] [--ablations] [--jobs 2]
                          [--out results/compare/digits] [--extra EXPERIMENT=OVERRIDE ...] [OVERRIDE ...]

Each run is `python train.py experiment=E model=M seed=S` in its own process, writing to
OUT/E/M/seed_S (a run whose metrics.json and test_items.npz exist is reused, so an interrupted comparison resumes).
Trailing OVERRIDEs go to every run (e.g. `data=minilm_text`); `--extra E=OVERRIDE` only to runs of
experiment E (e.g. `--extra classification=data.label_column=category`). Experiments are the files of
configs/experiment (retrieval_open: retrieval on groups never trained on). Writes OUT/compare.md (mean
± std over seeds per metric, parameter count, training throughput, and the main metric's difference to
the best simple read, chosen on validation per seed, with a paired bootstrap 95% CI over seeds × test
items), OUT/compare.json (every run's metrics and those differences) and OUT/compare.png (the main
metric per experiment). A model whose outputs are blended with a fixed read (task.head.blend, the default)
gets a second row, `<model> (unblended)`: the same runs scored on the trained model's outputs alone; a
model name ending in `-no-blend` runs without the blend. One comparison reads one collection; run it once
per collection (`data=...`). `--update` keeps the runs of OUT/compare.json that this invocation does not make
(other models or experiments, run at the commit recorded for each in `sources`) and writes them beside the new ones.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # works without `pip install -e .`

from w2t.tasks import TASKS  # noqa: E402


def experiment_tasks() -> dict[str, str]:
    """configs/experiment/<name>.yaml -> the task it runs (an `override /task:` or the experiment it extends)."""
    def task_of(name: str) -> str:
        for d in OmegaConf.load(ROOT / "configs" / "experiment" / f"{name}.yaml").get("defaults", []):
            if isinstance(d, str) and d != "_self_":
                return task_of(d)
            if not isinstance(d, str) and "override /task" in d:
                return d["override /task"]
        raise ValueError(f"configs/experiment/{name}.yaml names no task")

    return {f.stem: task_of(f.stem) for f in sorted((ROOT / "configs" / "experiment").glob("*.yaml"))}


EXPERIMENTS = experiment_tasks()

MODELS = ["w2t", "w2t_paper", "w2t_raw", "flat_mlp", "glnet", "sketch", "spectral"]
# W2T options worth ablating: name -> overrides on top of model=w2t
ABLATIONS = {
    "w2t-no-transformer": ["model=w2t", "model.encoder.depth=0"],
    "w2t-no-sigma": ["model=w2t", "model.encoder.sigma_features=false"],
    "w2t-k8": ["model=w2t", "model.encoder.sketch_dim=8"],
    "w2t-no-module-dropout": ["model=w2t", "model.encoder.module_dropout=0"],
    "w2t+neighbourhood": ["model=w2t", "task.head.neighbourhood_weight=1"],  # keep ΔW's neighbourhoods
    "w2t+warm-start": ["model=w2t", "task.head.warm_start=true"],  # start as the best linear read, add to it
    "w2t-no-rank-attention": ["model=w2t", "model.encoder.rank_attention=false"],  # the read-out of ΔW without it
    "w2t+mixup": ["model=w2t", "task.head.mixup=0.4"],  # weight-space mixup of the training adapters and their labels
    "w2t-random-projections": ["model=w2t", "model.encoder.fit_projections=false"],  # Pᵤ, Pᵥ start random
}
ONLY_FOR = {"w2t+neighbourhood": {"retrieval"}, "w2t+mixup": {"classification"}}  # ablations of one task's head: run for that task alone
NO_BLEND = "-no-blend"  # after any model or ablation name: its outputs not blended with the fixed read (task.head.blend)
LOWER_IS_BETTER = {"mae"}


def models_per_experiment(experiments: list[str], models: list[str]) -> dict[str, list[str]]:
    return {e: [m for m in models if EXPERIMENTS[e] in ONLY_FOR.get(m.removesuffix(NO_BLEND), {EXPERIMENTS[e]})]
            for e in experiments}


def model_overrides(name: str) -> list[str]:
    """The train.py overrides of a model name: a config of configs/model, or an ablation, with `-no-blend`."""
    base = name.removesuffix(NO_BLEND)
    return ABLATIONS.get(base, [f"model={base}"]) + (["task.head.blend=false"] if name.endswith(NO_BLEND) else [])


def run_one(experiment: str, name: str, seed: int, out: Path, overrides: list[str], threads: int) -> dict:
    run_dir = out / experiment / name / f"seed_{seed}"
    metrics_file = run_dir / "metrics.json"
    if not (metrics_file.exists() and (run_dir / "test_items.npz").exists()):
        model = model_overrides(name)
        cmd = [sys.executable, str(ROOT / "train.py"), f"experiment={experiment}", *model, f"seed={seed}",
               f"hydra.run.dir={run_dir}", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false",
               *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if run_dir.exists():  # killed before its metrics.json: start again, not beside its stale checkpoints
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        t = time.perf_counter()
        with open(run_dir / "compare.log", "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode or not metrics_file.exists():
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {run_dir / 'compare.log'}")
        print(f"  {experiment:<14} {name:<18} seed {seed}: {time.perf_counter() - t:6.1f} s", flush=True)
    return json.loads(metrics_file.read_text())


def git_state() -> dict:
    """The commit the comparison ran on, and whether the tree had uncommitted changes (then it is not that commit);
    results/, where comparisons write, does not count."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results")
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


UNBLENDED = " (unblended)"  # a blended model's runs scored on the trained model's outputs alone


def with_unblended(results: dict) -> dict:
    """`{experiment: {model: runs}}` with, after each model whose runs blend its outputs with a fixed read
    (`blend_weight`), `<model> (unblended)`: the same runs' `test_unblended/…` scores as `test/…`, so what the
    blend adds is measured on the same trained weights."""
    out = {}
    for experiment, by_model in results.items():
        out[experiment] = {}
        for model, runs in by_model.items():
            out[experiment][model] = runs
            if all("blend_weight" in m for m in runs):
                out[experiment][model + UNBLENDED] = [
                    m | {f"test/{k.split('/', 1)[1]}": v for k, v in m.items() if k.startswith("test_unblended/")}
                    for m in runs]
    return out


def trained_models(record: dict) -> dict[str, list[str]]:
    """`{experiment: [model, ...]}` of a compare.json's runs, in the order they were first written."""
    out: dict[str, list[str]] = {}
    for key in record["runs"]:
        experiment, model, _ = key.rsplit("/", 2)
        if model not in out.setdefault(experiment, []):
            out[experiment].append(model)
    return out


def merged(old: dict, new: dict) -> dict:
    """`new` (a compare.json record) with the runs of `old` it does not replace: same seeds and overrides only.
    A kept run keeps the git state it was made at (`sources`; a file without it made all its runs at its `git`)."""
    for key in ("seeds", "overrides", "extra"):
        if old.get(key) != new[key]:
            raise SystemExit(f"--update: compare.json has {key} {old.get(key)!r}, this comparison {new[key]!r}")
    replaced = set(new["sources"])
    keep = {k: v for k, v in old["runs"].items() if k.rsplit("/", 1)[0] not in replaced}
    sources = {k: v for k, v in old.get("sources", {}).items() if k not in replaced}
    sources |= {k.rsplit("/", 1)[0]: old["git"] for k in keep if k.rsplit("/", 1)[0] not in sources}
    diffs = {e: {m: d for m, d in by_model.items() if f"{e}/{m.removesuffix(UNBLENDED)}" not in replaced}
             for e, by_model in old.get("vs_best_baseline", {}).items()}
    for e, by_model in new["vs_best_baseline"].items():
        diffs.setdefault(e, {}).update(by_model)
    return new | {"runs": new["runs"] | keep, "sources": sources | new["sources"], "vs_best_baseline": diffs}


def paired_difference(runs: list[dict], run_dirs: list[Path], task, n_boot: int = 2000, seed: int = 0,
                      source: str = "model") -> dict:
    """The main metric of the model (its items `source`: `model`, or `unblended`) minus that of the best simple
    read (chosen on validation, per seed): its mean over seeds, and a 95% CI from a paired bootstrap that
    resamples each seed's test items (the same items for both), averaging over seeds. Reads each run's
    test_items.npz."""
    rng = np.random.default_rng(seed)
    pairs = []
    for metrics, run_dir in zip(runs, run_dirs):
        best = task.best_baseline(metrics)
        with np.load(run_dir / "test_items.npz") as f:
            items = {k: f[k] for k in f.files}
        pick = lambda source: {k.split("/", 1)[1]: v for k, v in items.items() if k.split("/", 1)[0] == source}  # noqa: E731
        pairs.append((pick(source), pick(f"baseline_{best}")))
    point = np.mean([task.primary_of(m) - task.primary_of(b) for m, b in pairs])
    boot = np.zeros(n_boot)
    for model, base in pairs:
        n = len(next(iter(model.values())))
        for i in range(n_boot):
            idx = rng.integers(0, n, n)
            boot[i] += task.primary_of(model, idx) - task.primary_of(base, idx)
    lo, hi = np.nanpercentile(boot / len(pairs), [2.5, 97.5])
    return {"diff": float(point), "ci": [float(lo), float(hi)]}


def scored_most(by_model: dict) -> list[dict]:
    """The runs that scored the most simple reads (runs of an older commit may lack newer reads): the baseline rows."""
    return max(by_model.values(), key=lambda runs: sum(k.startswith("test/baseline_") for k in runs[0]))


def _cell(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.4f}"


def report(results: dict, out: Path, seeds: list[int], header: str, diffs: dict | None = None,
           sources: dict | None = None) -> str:
    """Markdown tables (one per experiment) and a bar chart of each experiment's main metric.

    `diffs[experiment][model]`: `paired_difference`, shown as the last column; `sources["experiment/model"]`: the
    git state its runs were made at, shown when the runs of one table come from several commits."""
    lines = [header, ""]
    diffs = diffs or {}
    for experiment, by_model in results.items():
        task = TASKS[EXPERIMENTS.get(experiment, experiment)]
        keys = task.columns
        lines += [f"**{experiment}** (test split; mean ± std over seeds {', '.join(map(str, seeds))}; "
                  f"Δ: {task.primary} − best baseline's, paired bootstrap 95% CI)", "",
                  "| model | " + " | ".join(keys) + " | params | train adapters/s | Δ [95% CI] |",
                  "|---" * (len(keys) + 4) + "|"]
        rows = dict(by_model)
        commits = {m: (sources or {}).get(f"{experiment}/{m.removesuffix(UNBLENDED)}", {}).get("commit") for m in rows}
        if len(set(commits.values())) > 1:  # say which commit made which rows
            lines[-2:-2] = [f"Runs of {experiment} from several commits: " + "; ".join(
                f"{m} at {(c or '?')[:7]}" for m, c in commits.items() if not m.endswith(UNBLENDED)) + ".", ""]
        first = scored_most(by_model)
        for b in task.baselines:  # the simple reads every run also scores (docs/design.md §5)
            if f"test/baseline_{b}/{keys[0]}" in first[0]:
                rows[f"baseline: {b}"] = [{f"test/{k}": m[f"test/baseline_{b}/{k}"] for k in keys} for m in first]
        best = [task.best_baseline(m) for m in first]  # per seed, chosen on validation: the bar to clear
        if all(best):
            rows["best baseline (chosen on val)"] = [{f"test/{k}": m[f"test/baseline_{b}/{k}"] for k in keys}
                                              for b, m in zip(best, first)]
        best = {k: (min if k in LOWER_IS_BETTER else max)(np.mean([m[f"test/{k}"] for m in ms]) for ms in rows.values())
                for k in keys}
        for name, ms in rows.items():
            cells = []
            for k in keys:
                c = _cell([m[f"test/{k}"] for m in ms])
                cells.append(f"**{c}**" if np.isclose(np.mean([m[f"test/{k}"] for m in ms]), best[k]) else c)
            params = f"{int(ms[0]['params']):,}" if "params" in ms[0] else "–"
            speed = f"{np.mean([m['train_adapters_per_s'] for m in ms]):.0f}" if "train_adapters_per_s" in ms[0] else "–"
            d = diffs.get(experiment, {}).get(name)
            delta = f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]" if d else "–"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {params} | {speed} | {delta} |")
        lines.append("")
    text = "\n".join(lines)
    (out / "compare.md").write_text(text)
    _plot(results, out / "compare.png")
    return text


def _plot(results: dict, path: Path) -> dict[str, tuple[str, float]]:
    """Bars of each experiment's main metric (error bars: std over seeds), the best baseline as a line; returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    drawn = {}
    for ax, (experiment, by_model) in zip(axes[0], results.items()):
        task = TASKS[EXPERIMENTS.get(experiment, experiment)]
        k = task.primary
        first = scored_most(by_model)
        found = [b for b in task.baselines if f"test/baseline_{b}/{k}" in first[0]]
        names = list(by_model) + [f"baseline: {b}" for b in found]
        vals = [[m[f"test/{k}"] for m in ms] for ms in by_model.values()]
        vals += [[m[f"test/baseline_{b}/{k}"] for m in first] for b in found]
        ax.bar(range(len(names)), [np.mean(v) for v in vals], yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals],
               capsize=3,
               color=["C0"] * len(by_model) + ["0.6"] * len(found))
        if found:  # the bar a learned model must clear: the best simple read
            means = [np.mean(v) for v in vals[len(by_model):]]
            i = int(np.argmin(means) if k in LOWER_IS_BETTER else np.argmax(means))
            ax.axhline(means[i], color="k", ls="--", lw=1, label=f"best baseline ({found[i]}): {means[i]:.3f}")
            drawn[experiment] = (found[i], float(means[i]))
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set(title=experiment, ylabel=f"test {k}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS,
                    help=f"from {MODELS} and {list(ABLATIONS)}, each optionally with {NO_BLEND}")
    ap.add_argument("--ablations", action="store_true", help="also run the W2T ablations")
    ap.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each gets cores/jobs threads)")
    ap.add_argument("--out", default="results/compare/digits")
    ap.add_argument("--extra", action="append", default=[], metavar="EXPERIMENT=OVERRIDE")
    ap.add_argument("--update", action="store_true",
                    help="keep the other experiments' and models' runs of OUT/compare.json (same seeds and overrides)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = ap.parse_args()

    models = args.models + (list(ABLATIONS) if args.ablations else [])
    unknown = [m for m in models if m.removesuffix(NO_BLEND) not in MODELS and m.removesuffix(NO_BLEND) not in ABLATIONS]
    if unknown:
        ap.error(f"unknown models {unknown}")
    extra: dict[str, list[str]] = {}
    for item in args.extra:
        experiment, _, override = item.partition("=")
        if experiment not in EXPERIMENTS or not override:
            ap.error(f"--extra takes EXPERIMENT=OVERRIDE with EXPERIMENT in {list(EXPERIMENTS)}, got {item!r}")
        extra.setdefault(experiment, []).append(override)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, len(os.sched_getaffinity(0)) // args.jobs)  # the cores this process may use
    runs_for = models_per_experiment(args.experiments, models)
    jobs = [(e, m, s) for e in args.experiments for m in runs_for[e] for s in args.seeds]
    pending = sum(not (out / e / m / f"seed_{s}" / "test_items.npz").exists() for e, m, s in jobs)
    print(f"{len(jobs)} runs, {args.jobs} at a time, {threads} thread(s) each -> {out}", flush=True)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {j: pool.submit(run_one, *j, out, args.overrides + extra.get(j[0], []), threads) for j in jobs}
        metrics = {j: f.result() for j, f in futures.items()}
    results = {e: {m: [metrics[(e, m, s)] for s in args.seeds] for m in runs_for[e]} for e in args.experiments}
    diffs = {e: {m: paired_difference(ms, [out / e / m.removesuffix(UNBLENDED) / f"seed_{s}" for s in args.seeds],
                                      TASKS[EXPERIMENTS[e]], source="unblended" if m.endswith(UNBLENDED) else "model")
                 for m, ms in by_model.items()} for e, by_model in with_unblended(results).items()}
    state = git_state()
    record = {"git": state, "overrides": args.overrides, "extra": extra, "seeds": args.seeds,
              "runs": {f"{e}/{m}/seed_{s}": v for (e, m, s), v in metrics.items()}, "vs_best_baseline": diffs,
              "sources": {f"{e}/{m}": state for e in args.experiments for m in runs_for[e]}}
    if args.update and (out / "compare.json").exists():
        record = merged(json.loads((out / "compare.json").read_text()), record)
        results = {e: {m: [record["runs"][f"{e}/{m}/seed_{s}"] for s in args.seeds] for m in models_of}
                   for e, models_of in trained_models(record).items()}
    (out / "compare.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    command = "python scripts/compare.py " + " ".join(sys.argv[1:])
    took = f"{len(jobs)} runs; {pending} run now in {time.perf_counter() - start:.0f} s, the rest reused"
    print(report(with_unblended(results), out, args.seeds, f"`{command}` ({took})", record["vs_best_baseline"],
                 record["sources"]))


if __name__ == "__main__":
    main()
