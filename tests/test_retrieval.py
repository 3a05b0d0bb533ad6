"""Retrieval metrics against a brute-force reference, on hand-built and random cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from w2t.models.features import delta_w_features
from w2t.data.datamodule import AdapterDataModule
from w2t.tasks.retrieval import Retrieval, neighbourhood_loss, retrieval_metrics, supcon_loss


def brute_force(q, qg, g, gg, q_in_g, k=10):
    """Plain-Python docs/design.md §5: rank the gallery by cosine, skip the query itself."""
    mrr = hit1 = hitk = ndcg = ap = 0.0
    n = 0
    for i in range(len(q)):
        cands = [j for j in range(len(g)) if j != q_in_g[i]]
        sims = {j: float(torch.nn.functional.cosine_similarity(q[i].double(), g[j].double(), dim=0)) for j in cands}
        ranked = sorted(cands, key=lambda j: (-sims[j], j))
        rel = [int(gg[j] == qg[i]) for j in ranked]
        if sum(rel) == 0:
            continue
        n += 1
        first = rel.index(1) + 1
        mrr += 1 / first
        hit1 += first <= 1
        hitk += first <= k
        dcg = sum(r / math.log2(p + 2) for p, r in enumerate(rel[:k]))
        idcg = sum(1 / math.log2(p + 2) for p in range(min(sum(rel), k)))
        ndcg += dcg / idcg
        hits, prec = 0, 0.0
        for p, r in enumerate(rel):
            if r:
                hits += 1
                prec += hits / (p + 1)
        ap += prec / sum(rel)
    return {"mrr": mrr / n, "hit@1": hit1 / n, f"hit@{k}": hitk / n, f"ndcg@{k}": ndcg / n, "map": ap / n, "num_queries": n}


def test_hand_built_case():
    # gallery: two of group 0, one of group 1; the query (group 0) is closest to the group-1 item
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    gg = torch.tensor([1, 0, 0])
    q = torch.tensor([[1.0, 0.05]])
    m = retrieval_metrics(q, torch.tensor([0]), g, gg, torch.tensor([-1]), k=2)
    assert m["mrr"] == pytest.approx(0.5)  # ranks: item0 (wrong), item2 (right), item1 (right)
    assert m["hit@1"] == 0.0 and m["hit@2"] == 1.0
    assert m["map"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    idcg = 1 + 1 / math.log2(3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / idcg)


def test_query_never_retrieves_itself():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    gg = torch.tensor([0, 0, 1])
    m = retrieval_metrics(g[:1], gg[:1], g, gg, torch.tensor([0]))
    assert m["mrr"] == pytest.approx(0.5)  # itself (rank 1) excluded: item 2 (wrong) then item 1


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_on_random_cases(seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(40, 6, generator=gen)
    gg = torch.randint(0, 5, (40,), generator=gen)
    q_in_g = torch.tensor([3, 7, -1, 12, 30, -1, 0, 39])
    q = torch.where((q_in_g >= 0)[:, None], g[q_in_g.clamp_min(0)], torch.randn(8, 6, generator=gen))
    qg = torch.where(q_in_g >= 0, gg[q_in_g.clamp_min(0)], torch.randint(0, 6, (8,), generator=gen))
    fast = retrieval_metrics(q, qg, g, gg, q_in_g)
    ref = brute_force(q, qg, g, gg, q_in_g.tolist())
    assert fast["num_queries"] == ref["num_queries"]
    for key in ("mrr", "hit@1", "hit@10", "ndcg@10", "map"):
        assert fast[key] == pytest.approx(ref[key], abs=1e-9), key


def test_supcon_prefers_grouped_embeddings():
    groups = torch.tensor([0, 0, 1, 1])
    good = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [-0.1, 1.0], [0.1, 1.0]]), dim=-1)
    bad = good[[0, 2, 1, 3]]
    assert supcon_loss(good, groups, 0.1) < supcon_loss(bad, groups, 0.1)


@pytest.fixture(scope="module")
def tiny_split(tiny_collection, tmp_path_factory):
    dm = AdapterDataModule(root=str(tiny_collection), group_column="task", role_column="role", eval_gallery=True,
                           cache_dir=str(tmp_path_factory.mktemp("cache")))
    dm.setup()
    return dm, dm.whole_split("test")


def _brute_force_protocol(emb, batch):
    """docs/design.md §5 from the flags alone, by brute force: queries rank the gallery, never themselves."""
    idx = batch["index"].tolist()
    q = (batch["in_split"] & batch["is_query"]).tolist()
    g = batch["in_gallery"].tolist()
    gallery = [i for i in range(len(idx)) if g[i]]
    queries = [i for i in range(len(idx)) if q[i]]
    q_in_g = [gallery.index(i) if i in gallery else -1 for i in queries]
    return brute_force(emb[queries], batch["group"][queries], emb[gallery], batch["group"][gallery], q_in_g)


def test_queries_and_gallery_follow_the_protocol_with_roles(tiny_split):
    """Queries: the test-split adapters whose role is `query`; gallery: every `gallery` adapter of every split."""
    dm, batch = tiny_split
    role = dm.table["role"].str.lower().to_numpy()
    test_rows = set(dm.split_rows["test"].tolist())
    gallery_rows = set(np.flatnonzero(role == "gallery").tolist())
    idx = batch["index"].numpy()
    assert sorted(idx.tolist()) == sorted(test_rows | gallery_rows)  # evaluated: the split and its gallery
    queries = set(idx[(batch["in_split"] & batch["is_query"]).numpy()].tolist())
    assert queries == {r for r in test_rows if role[r] == "query"} and queries
    assert not queries & set(dm.split_rows["train"].tolist())  # a query is never trained on
    assert set(idx[batch["in_gallery"].numpy()].tolist()) == gallery_rows
    emb = torch.randn(len(idx), 8, generator=torch.Generator().manual_seed(0))
    got = Retrieval(8, dm.info).evaluate(emb, batch)
    ref = _brute_force_protocol(emb, batch)
    assert got["num_queries"] == ref["num_queries"] == len(queries)
    for key in ("mrr", "hit@1", "hit@10", "ndcg@10", "map"):
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key
    val = dm.dataset("val")  # validation asks every adapter of its split, whatever its role
    assert val.flags["is_query"][val.flags["in_split"]].all()


def test_without_roles_every_adapter_is_in_the_gallery_and_no_query_finds_itself(tiny_collection, tmp_path):
    dm = AdapterDataModule(root=str(tiny_collection), group_column="task", role_column=None, eval_gallery=True,
                           cache_dir=str(tmp_path))
    dm.setup()
    batch = dm.whole_split("test")
    assert sorted(batch["index"].tolist()) == list(range(len(dm.table)))  # the whole library
    assert batch["in_gallery"].all()
    queries = batch["index"][batch["in_split"] & batch["is_query"]]
    assert sorted(queries.tolist()) == sorted(dm.split_rows["test"].tolist())
    emb = torch.randn(len(batch["index"]), 8, generator=torch.Generator().manual_seed(1))
    got = Retrieval(8, dm.info).evaluate(emb, batch)
    ref = _brute_force_protocol(emb, batch)
    for key in ("mrr", "hit@1", "hit@10", "ndcg@10", "map"):
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key
    # an embedding equal for every adapter ranks by index: a query that could see itself would still
    # rank it first; with the self-exclusion the first hit is another adapter
    same = torch.ones(len(batch["index"]), 8)
    assert Retrieval(8, dm.info).evaluate(same, batch)["num_queries"] == len(queries)


def test_delta_w_baseline_is_the_cosine_of_normalized_updates(tiny_split):
    """With k ≥ every module width the ΔW features are exact: their inner products are the summed
    cosines of the modules' updates, formed here explicitly as U diag(S) Vᵀ."""
    dm, batch = tiny_split
    k = max(max(g.m, g.n) for g in dm.schema.groups)
    feats = delta_w_features(batch["tokens"], dm.schema, k=k).double()
    explicit = []
    for g in dm.schema.groups:
        t = batch["tokens"][g.name]
        dw = torch.einsum("blrm,blr,blrn->blmn", t["u"].double(), (t["s"] * t["mask"]).double(), t["v"].double())
        explicit.append(F.normalize(dw.flatten(2), dim=-1).flatten(1))
    explicit = torch.cat(explicit, 1)
    assert torch.allclose(feats @ feats.T, explicit @ explicit.T, atol=1e-5)
    small = delta_w_features(batch["tokens"], dm.schema, k=2).double()  # a sketch: approximate only
    assert not torch.allclose(small @ small.T, explicit @ explicit.T, atol=1e-2)
    with_norms = delta_w_features(batch["tokens"], dm.schema, k=k, norms=True)
    assert with_norms.shape[1] == feats.shape[1] + sum(g.num_layers for g in dm.schema.groups)
    # the exact read: its Gram matrix is the explicit one at any width, where the default k=2 sketch is not, and
    # rows in chunks give the same matrix; the vectors `dw_exact` ranks by have that Gram matrix
    from w2t.models.features import delta_w_gram, gram_embedding

    gram = delta_w_gram(batch["tokens"], dm.schema, chunk=3)
    assert torch.allclose(gram, explicit @ explicit.T, atol=1e-5)
    emb = gram_embedding(gram).double()
    assert torch.allclose(emb @ emb.T, gram, atol=1e-5)


def test_principal_projections_keep_the_updates_they_were_fitted_on(tiny_split):
    """Fitted on one adapter, k = rank × layers principal directions per side span every rank component of it, so
    the `dw_fit` features keep its updates exactly (its inner products with any adapter are the exact cosines)
    where the same number of random columns does not."""
    from w2t.models.features import fixed_projections, principal_projections

    dm, batch = tiny_split
    one = {name: {key: x[:1] for key, x in t.items()} for name, t in batch["tokens"].items()}
    k = max(g.max_rank * g.num_layers for g in dm.schema.groups)
    assert any(k < min(g.m, g.n) for g in dm.schema.groups)  # narrower than some module: random columns sketch it
    fitted = principal_projections(one, dm.schema, k)
    for g, (Qu, Qv) in zip(dm.schema.groups, fitted):
        assert Qu.shape == (g.m, min(k, g.m)) and Qv.shape == (g.n, min(k, g.n))
        assert torch.allclose(Qu.T @ Qu, torch.eye(Qu.shape[1], dtype=Qu.dtype), atol=1e-8)
    exact = delta_w_features(batch["tokens"], dm.schema, k=max(max(g.m, g.n) for g in dm.schema.groups)).double()
    feats = delta_w_features(batch["tokens"], dm.schema, projections=fitted).double()
    assert torch.allclose(feats[:1] @ feats.T, exact[:1] @ exact.T, atol=1e-6)
    assert not torch.allclose(feats[1:] @ feats[1:].T, exact[1:] @ exact[1:].T, atol=1e-2)  # the others: projected
    random = [fixed_projections(g, k, kind="orthonormal") for g in dm.schema.groups]
    sketch = delta_w_features(batch["tokens"], dm.schema, projections=random).double()
    assert not torch.allclose(sketch[:1] @ sketch.T, exact[:1] @ exact.T, atol=1e-2)


def test_neighbourhood_loss_is_zero_on_the_teacher_geometry_and_grows_away_from_it():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    z = F.normalize(teacher, dim=-1)
    assert neighbourhood_loss(z, teacher * 3.0, 0.1, 0.1).item() == pytest.approx(0.0, abs=1e-12)  # scale-free
    shuffled = z[torch.randperm(12, generator=gen)]
    assert neighbourhood_loss(shuffled, teacher, 0.1, 0.1) > 0.1


def test_delta_w_baseline_is_the_same_for_raw_and_canonical_components(tiny_collection, tmp_path):
    """The baseline reads ΔW, whatever factorization feeds it (models with `input: raw` score it too)."""
    feats = {}
    for rep in ("canonical", "raw"):
        dm = AdapterDataModule(root=str(tiny_collection), representation=rep, cache_dir=str(tmp_path / rep))
        dm.setup()
        feats[rep] = delta_w_features(dm.whole_split("test")["tokens"], dm.schema, norms=True)
    assert torch.allclose(feats["raw"], feats["canonical"], rtol=1e-4, atol=1e-5)


def test_whitening_decorrelates_the_training_split_and_the_best_baseline_is_chosen_on_validation():
    from w2t.tasks.retrieval import whitening

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(60, 10, generator=gen, dtype=torch.float64) @ torch.randn(10, 300, generator=gen, dtype=torch.float64)
    Z = whitening(X, dims=8, shrink=0.0)(X).double()
    assert torch.allclose(Z.T @ Z / (len(X) - 1), torch.eye(8, dtype=torch.float64), atol=1e-4)
    assert whitening(X, dims=64)(X).shape == (60, 10), "never more directions than the data has"
    metrics = {"val/baseline_raw/mrr": 0.1, "val/baseline_dw/mrr": 0.5, "val/baseline_dw_white/mrr": 0.4,
               "test/baseline_dw_white/mrr": 0.9, "test/baseline_dw/mrr": 0.3}
    assert Retrieval.best_baseline(metrics) == "dw", "validation decides, not test"
