"""OWL layer budgets (kf.masks.owl_sparsities) against a float64 transcription of the authors'
procedure (luuyin/OWL, lib/prune_all.py, prune_wanda_outlier), and the three budgets (uniform,
global, OWL) through the same selection kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import koopfast as kf

pytest.importorskip("transformers")
from zoo import CASES


def _transcription(groups: list[list[np.ndarray]], sparsity: float, lam: float, m: float, weights=None):
    """The authors' steps in float64 NumPy: one sparsity per group."""
    ratios = []
    for tensors in groups:
        flat = np.concatenate([t.ravel() for t in tensors]).astype(np.float64)
        ratios.append(100.0 * np.sum(flat > np.mean(flat) * m) / flat.size)
    r = np.array(ratios)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    mean = np.mean(r) if weights is None else np.average(r, weights=weights)
    density = r - mean + (1 - sparsity)
    return 1 - density, ratios


def _llama_scores():
    c = CASES["llama"]
    model = c.model()
    scores = kf.criteria.wanda(model, c.batches(2))
    return model, scores, {n: t for n, t in scores.items() if n.startswith("model.layers.")}


def test_matches_the_transcription_on_llama_blocks():
    _, wanda, scores = _llama_scores()
    blocks = sorted({kf.masks.block_of(n) for n in scores})
    assert len(blocks) >= 2 and all(b.startswith("model.layers.") and b.count(".") == 2 for b in blocks)
    groups = [[scores[n].double().numpy() for n in scores if kf.masks.block_of(n) == b] for b in blocks]
    for m in (2.0, 5.0):
        want, ratios = _transcription(groups, 0.6, 0.08, m)
        got_ratios = kf.masks.outlier_ratios(scores, m)
        assert [got_ratios[b] for b in blocks] == pytest.approx(ratios, abs=0, rel=1e-12)
        if max(ratios) == min(ratios):
            continue
        for weighting in ("parameters", "layers"):  # equal blocks: the two agree
            got = kf.masks.owl_sparsities(scores, 0.6, lam=0.08, m=m, weighting=weighting)
            assert set(got) == set(scores)
            for b, s in zip(blocks, want):
                assert all(got[n] == pytest.approx(s, abs=1e-12) for n in scores if kf.masks.block_of(n) == b)
    budget = kf.masks.owl_sparsities(scores, 0.6)
    weighted = sum(budget[n] * scores[n].numel() for n in scores) / sum(t.numel() for t in scores.values())
    assert weighted == pytest.approx(0.6, abs=1e-12)
    assert max(budget.values()) - min(budget.values()) == pytest.approx(2 * 0.08, abs=1e-12)

    masks = wanda.masks(budget)  # per output row, as the authors prune each block
    for name, mask in masks.items():
        cols = mask.shape[1]
        expected = round((1 - budget.get(name, 0.0)) * cols)
        assert bool((mask.sum(1) == expected).all()), name
    assert bool(masks["lm_head.weight"].all())  # not in the budget: kept


def test_unequal_groups_weight_by_parameters():
    gen = torch.Generator().manual_seed(3)
    scores = {
        "h.0.a.weight": torch.rand(8, 16, generator=gen) ** 6,
        "h.0.b.weight": torch.rand(4, 16, generator=gen),
        "h.1.a.weight": torch.rand(30, 10, generator=gen) ** 3,
        "h.2.a.weight": torch.rand(5, 7, generator=gen) ** 9,
        "head.weight": torch.rand(3, 5, generator=gen),
    }
    keys = ["h.0", "h.1", "h.2", "head.weight"]
    members = {k: [n for n in scores if kf.masks.block_of(n) == k] for k in keys}
    groups = [[scores[n].double().numpy() for n in members[k]] for k in keys]
    sizes = [sum(scores[n].numel() for n in members[k]) for k in keys]
    for weighting, weights in (("parameters", sizes), ("layers", None)):
        want, _ = _transcription(groups, 0.5, 0.1, 3.0, weights)
        got = kf.masks.owl_sparsities(scores, 0.5, lam=0.1, m=3.0, weighting=weighting)
        for k, s in zip(keys, want):
            assert all(got[n] == pytest.approx(s, abs=1e-12) for n in members[k])
    got = kf.masks.owl_sparsities(scores, 0.5, lam=0.1, m=3.0)
    assert sum(got[n] * t.numel() for n, t in scores.items()) / sum(t.numel() for t in scores.values()) == (
        pytest.approx(0.5, abs=1e-12)
    )
    # the same budget through the layerwise selection kernel: exact counts per tensor
    masks = kf.masks.layerwise_topk(scores, got)
    for n, mask in masks.items():
        assert int(mask.sum()) == round((1 - got[n]) * mask.numel())
    # a caller's grouping: every tensor its own group
    own = kf.masks.owl_sparsities(scores, 0.5, lam=0.1, m=3.0, group=lambda n: n)
    want, _ = _transcription(
        [[scores[n].double().numpy()] for n in scores], 0.5, 0.1, 3.0, [t.numel() for t in scores.values()]
    )
    assert [own[n] for n in scores] == pytest.approx(list(want), abs=1e-12)


def test_equal_outlier_ratios_give_the_target_everywhere():
    scores = {"l.0.w": torch.ones(4, 4), "l.1.w": torch.ones(2, 8)}
    assert kf.masks.outlier_ratios(scores, 5.0) == {"l.0": 0.0, "l.1": 0.0}
    assert kf.masks.owl_sparsities(scores, 0.7) == {"l.0.w": pytest.approx(0.7), "l.1.w": pytest.approx(0.7)}


def test_the_three_budgets_prune_the_target():
    _, _, scores = _llama_scores()
    total = sum(t.numel() for t in scores.values())
    uniform = kf.masks.layerwise_topk(scores, 0.5)
    global_ = kf.masks.global_topk(scores, 0.5)
    owl = kf.masks.layerwise_topk(scores, kf.masks.owl_sparsities(scores, 0.5))
    assert sum(int(m.sum()) for m in global_.values()) == round(0.5 * total)
    for masks in (uniform, owl):
        assert abs(sum(int(m.sum()) for m in masks.values()) - round(0.5 * total)) <= len(scores)
    assert not all(torch.equal(owl[n], uniform[n]) for n in scores)


def test_bad_arguments():
    gen = torch.Generator().manual_seed(0)
    scores = {"l.0.w": torch.rand(4, 4, generator=gen), "l.1.w": torch.rand(4, 4, generator=gen) ** 4}
    ratios = kf.masks.outlier_ratios(scores, 1.0)
    assert ratios["l.0"] != ratios["l.1"]
    with pytest.raises(ValueError, match="owl_sparsities: expected sparsity in"):
        kf.masks.owl_sparsities(scores, 1.0)
    with pytest.raises(ValueError, match="lam >= 0"):
        kf.masks.owl_sparsities(scores, 0.5, lam=-0.1)
    with pytest.raises(ValueError, match=r"every budget in \[0, 1\)"):
        kf.masks.owl_sparsities(scores, 0.05, lam=0.2, m=1.0)
    assert min(kf.masks.owl_sparsities(scores, 0.05, lam=0.2, m=1.0, weighting="layers").values()) == 0.01
    with pytest.raises(ValueError, match="weighting"):
        kf.masks.owl_sparsities(scores, 0.5, weighting="blocks")
    with pytest.raises(ValueError, match="m > 0"):
        kf.masks.outlier_ratios(scores, 0)
    with pytest.raises(TypeError, match="floating-point"):
        kf.masks.owl_sparsities({"a": torch.ones(3, dtype=torch.int64)}, 0.5)
    with pytest.raises(TypeError, match="non-empty dict"):
        kf.masks.owl_sparsities({}, 0.5)
    with pytest.raises(ValueError, match="owl_sparsities: expected finite"):
        kf.masks.owl_sparsities({"a": torch.tensor([1.0, float("nan")])}, 0.5)
