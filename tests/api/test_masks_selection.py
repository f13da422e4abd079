"""kf.masks.Selection, keep_count, resolve_keep and layerwise: the public layer under the top-k functions."""

from __future__ import annotations

import pytest
import torch

import koopfast as kf
from koopfast.masks import Selection, layerwise, resolve_keep


def test_selection_topk_matches_global_topk_and_names_errors():
    torch.manual_seed(0)
    scores = {"a": torch.randn(7, 5), "b": torch.randn(11)}
    sel = Selection.from_scores(scores, fn="caller")
    assert sel.numel == 46 and sel.names == ["a", "b"] and sel.keys == ["a", "b"]
    masks = sel.pack(sel.topk(20))
    expected = kf.masks.global_topk(scores, keep=20)
    assert all(torch.equal(masks[k], expected[k]) for k in scores)
    assert sum(int(m.sum()) for m in masks.values()) == 20
    bad = {"a": scores["a"], "b": torch.tensor([1.0, float("nan")])}
    with pytest.raises(ValueError, match=r"^caller: .*NaN in 'b'"):
        Selection(bad, "value", "caller").topk(3)
    named = Selection([torch.tensor([1.0, float("nan")])], "abs", "caller", names=["the weight"])
    with pytest.raises(ValueError, match="NaN in 'the weight'"):
        named.topk(1)
    with pytest.raises(ValueError, match="expected 1 names"):
        Selection([torch.ones(2)], "abs", "caller", names=["x", "y"])


def test_selection_pairs_subset_and_duplicates():
    a, b = torch.randn(6), torch.randn(6)
    sel = Selection([(a, b), (b, a)], "abs_product", "caller")
    none = sel.pack(sel.topk(0))
    assert isinstance(none, list) and len(sel.b) == 2 and not any(bool(m.any()) for m in none)
    one = sel.subset(1)
    assert one.names == ["scores[1]"] and one.numel == 6
    assert torch.equal(one.topk(6)[0], torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="the same tensor as 'x' and 'y'"):
        Selection({"x": a, "y": a}, "value", "caller").check_distinct()
    with pytest.raises(TypeError, match="pair of tensors"):
        Selection([a], "product", "caller")


def test_resolve_keep_and_layerwise():
    assert resolve_keep(10, 0.25, None) == 8 and resolve_keep(10, None, 3) == 3
    with pytest.raises(ValueError, match="exactly one of sparsity and keep"):
        resolve_keep(10, 0.5, 3, "caller")
    with pytest.raises(ValueError, match=r"caller: expected keep in \[0, 10\]"):
        resolve_keep(10, None, 11, "caller")
    scores = {"a": torch.arange(10.0), "b": torch.arange(4.0)}
    masks = layerwise(Selection(scores, "value", "caller"), {"a": 0.5}, "caller")
    assert masks[0].tolist() == [False] * 5 + [True] * 5 and bool(masks[1].all())
